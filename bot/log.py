"""Logging set-up, in one place. Secrets never reach a log line: a filter masks them in every record."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable

# Interaction tokens and our webhook tokens travel in URL paths that libraries may log.
_TOKEN_PATHS = (
    re.compile(r"(/webhooks/modelslab/[0-9a-f]{32}/)[A-Za-z0-9_\-]+"),
    re.compile(r"(/webhooks/\d+/)[A-Za-z0-9_.\-]+"),
    re.compile(r"(/interactions/\d+/)[A-Za-z0-9_.\-]+"),
    re.compile(r"""(['"]token['"]\s*:\s*['"])[^'"]+"""),  # gateway payloads: interaction tokens
)
REDACTED = "[redacted]"
# Secrets learnt while running (servers' keys, once accepted and stored, or read back): every filter masks them
# too. Bounded, the least recently registered dropped first: each one costs every log line a replace(), and a
# stored key is never logged anyway (this is the second line of defence).
MAX_RUNTIME_SECRETS = 1000
_RUNTIME_SECRETS: OrderedDict[str, None] = OrderedDict()
_runtime_secrets_longest_first: list[str] = []


def register_secret(value: str) -> None:
    """Mask `value` in every later log line. Only for real secrets (a key that was accepted and stored):
    whatever is registered disappears from the logs, so a bogus "key" must never get here."""
    global _runtime_secrets_longest_first
    if not value or len(value) < 6:
        return
    _RUNTIME_SECRETS[value] = None
    _RUNTIME_SECRETS.move_to_end(value)
    while len(_RUNTIME_SECRETS) > MAX_RUNTIME_SECRETS:
        _RUNTIME_SECRETS.popitem(last=False)
    _runtime_secrets_longest_first = sorted(_RUNTIME_SECRETS, key=len, reverse=True)


class SecretFilter(logging.Filter):
    """Replaces known secret values, and tokens in webhook/interaction URLs, with `[redacted]`."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self._secrets = sorted({s for s in secrets if s and len(s) >= 6}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self.clean(message)
        if record.exc_info and record.exc_info[1] is not None:
            # Render the traceback now so the secret filter sees it too.
            formatter = logging.Formatter()
            cleaned += "\n" + self.clean(formatter.formatException(record.exc_info))
            record.exc_info = None
            record.exc_text = None
        if cleaned != message or record.args:
            record.msg = cleaned
            record.args = None
        return True

    def clean(self, text: str) -> str:
        for secret in (*self._secrets, *_runtime_secrets_longest_first):
            text = text.replace(secret, REDACTED)
        if "/webhooks/" in text or "/interactions/" in text or "token" in text:  # what every pattern needs
            for pattern in _TOKEN_PATHS:
                text = pattern.sub(lambda m: m.group(1) + REDACTED, text)
        return text


_JOB_ID = re.compile(r"\bJob ([0-9a-f]{32})\b")


class JsonFormatter(logging.Formatter):
    """One JSON object a line, for log collectors: time, level, logger, message, and the job id if any."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        entry: dict[str, object] = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        found = _JOB_ID.search(message)
        if found:
            entry["job_id"] = found.group(1)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


JsonFormatter.converter = time.gmtime


class TextFormatter(logging.Formatter):
    """`time level logger: message`, with the time's text made once per second rather than once per line."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self._second = -1
        self._second_text = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._second_text = time.strftime("%Y-%m-%d %H:%M:%S", self.converter(record.created))
            self._second = second
        return f"{self._second_text},{int(record.msecs):03d}"


def setup_logging(level: str = "INFO", *, secrets: Iterable[str] = (), log_format: str = "text") -> None:
    """One stream handler on the root logger, with the secret filter on the handler (it sees every record)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    handler.addFilter(SecretFilter(secrets))
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    quiet_noisy_loggers()
    # No line shows the caller's file, thread or process: the logging HOWTO's "Optimization" settings, so that a
    # record does not walk the stack or look them up (a few hundredths of a millisecond a line, several lines a job).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def quiet_noisy_loggers() -> None:
    """Libraries whose DEBUG lines are noise or carry secrets, even at LOG_LEVEL=DEBUG.

    aiosqlite logs SQL parameters; discord.py's gateway logs whole event payloads and its HTTP and webhook
    clients log URLs, all of which hold interaction tokens.
    """
    for name in ("aiosqlite", "discord.gateway", "discord.http", "discord.webhook.async_", "discord.state"):
        logging.getLogger(name).setLevel(logging.INFO)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    for name in ("discord.http", "discord.webhook.async_"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, DiscordPyRateLimitLines) for f in logger.filters):
            logger.addFilter(DiscordPyRateLimitLines())


class DiscordPyRateLimitLines(logging.Filter):
    """discord.py's own warning for each 429 it waits out: the bot writes its own line for every 429
    (`bot.discord.rate_limits`, with the scope, the route without its token, and how long), so one is enough."""

    TEMPLATES = (
        "We are being rate limited. %s %s responded with 429. Retrying in",
        "Global rate limit has been hit. Retrying in",
        "Webhook ID %s is rate limited. Retrying in",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith(self.TEMPLATES))
