"""Speed benchmark: the real bot, as a process of its own, against the fake Discord and the fake ModelsLab.

    python -m bench.run                       # every scenario, default sizes (about two and a half minutes)
    python -m bench.run --modes ack,webhook   # some of them
    python -m bench.run --help                # sizes, latencies, profiling

The bot runs as ``python -m bench.botproc`` (``bot.__main__.main()`` unchanged, plus a loop-stall monitor), or as
plain ``python -m bot`` for the memory scenario, configured by environment variables as an admin configures it. The
fakes (tests/fakes/) and this script share one process and one event loop; the bot has its own, so what the fakes
cost is not charged to the bot, and the bot's peak memory is its own. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))

from aiohttp import web  # noqa: E402
from PIL import Image, ImageChops  # noqa: E402

from bot.jobs.progress import PROGRESS_MIN_INTERVAL  # noqa: E402
from bot.jobs.waiting import poll_delays  # noqa: E402
from tests.fakes.discord_rate_limits import DiscordBudget  # noqa: E402
from tests.fakes.discord_server import FakeDiscord, FakeInteraction  # noqa: E402
from tests.fakes.modelslab_server import DEFAULT_KEY, Behaviour, FakeJob, FakeModelsLab, Hang, Queued  # noqa: E402

BOT_TOKEN = "fake-bot-token.Bench.secretpart"
SECRET_KEY = "bench-secret-key-0123456789abcdef"
MEMBER_BASE_ID = 1_600_000_000_000_000_000
MODES = ("ack", "webhook", "polling", "stall", "memory")
WEBHOOK_ETA = 60.0  # webhook scenarios: ModelsLab's ETA, far beyond the job, so every result comes by webhook
NEVER = 300.0  # an ETA for jobs that the benchmark never lets finish
DEFAULT_SIZE = (512, 512)  # the bot's default width and height
STALL_SIZE = (1024, 1024)
RESULT_PATH = re.compile(r"^/webhooks/\d+/(?P<token>[^/]+)/messages/")
STALL_FLOOR_MS = 1.0  # the monitor writes down overshoots from 1 ms

# Targets.
ACK_P99_TARGET = 0.250
WEBHOOK_P50_TARGET = 0.300
POLLING_MARGIN = 0.300
STALL_TARGET = 0.100
MEMORY_TARGET_MB = 150.0
HAPPY_PATH_REQUESTS = 3  # the acknowledgement, one status edit, the result
PENDING_MEAN_REQUESTS = 6.0  # per job, on average, with 1000 pending
INVALID_SHARE_TARGET = 0.01  # of Discord's ban threshold, in the worst 10 minutes
HAPPY_PATH_SCENARIOS = ("webhook/stall", "polling")  # MODELSLAB_MAX_QUEUED=100: no job waits in the bot's line
WEBHOOK_CPU_TARGET_MS = 8.0  # the bot's CPU per job, paced webhook path (2a)
BURST_CPU_TARGET_MS = 5.0  # the same when the results are ready at once (5)
STATEMENTS_TARGET = 8  # SQL statements per job
# The alternatives, for the comparison line.
VENDOR_BOT_WAIT = 130.0  # the vendor's sample Discord bot sleeps this long, then fetches once
SDK_POLL_INTERVAL = 60.0  # the vendor's Python SDK polls this often


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    measure: str
    result: str
    target: str = ""
    passed: bool | None = None  # None: information, no target
    section: str = ""  # rows are printed by section: 1, 2a, 2b, 3, 4, 5

    @property
    def verdict(self) -> str:
        return "" if self.passed is None else ("PASS" if self.passed else "FAIL")


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    section: str = ""  # the section of the rows added next

    def add(self, measure: str, result: str, target: str = "", passed: bool | None = None) -> None:
        self.rows.append(Row(measure, result, target, passed, self.section))

    def note(self, text: str) -> None:
        self.notes.append(text)


def percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def secs(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds:.2f} s"


def spread(values: Sequence[float], unit: Callable[[float], str] = ms) -> str:
    return f"p50 {unit(percentile(values, 0.5))} / p99 {unit(percentile(values, 0.99))} / max {unit(max(values))}"


# ---------------------------------------------------------------------------------------------- images


class Images:
    """Result images the fake ModelsLab serves instead of its solid colours (which compress to nothing).

    "photo": smooth gradients with fine grain, which PNG compresses about as badly as a real generated picture
    (about 2 MB at 1024x1024); "noise": incompressible (3 MB at 1024x1024); "solid": the fake's own.
    They are rendered before a scenario starts (`prepare`, in a thread): rendering one takes a few hundred
    milliseconds, which would stall the fakes' loop in the middle of a measurement.
    """

    def __init__(self, style: str) -> None:
        self.style = style
        self._cache: dict[tuple[str, int, int], bytes] = {}

    async def prepare(self, *variants: tuple[str | None, tuple[int, int]]) -> Images:
        for style, size in variants:
            style = style or self.style
            if style != "solid" and (style, *size) not in self._cache:
                self._cache[(style, *size)] = await asyncio.to_thread(self._render, size, style)
        return self

    def get(self, size: tuple[int, int], style: str | None = None) -> bytes | None:
        """The prepared image of this size and style; None (the fake's own) if there is none."""
        return self._cache.get((style or self.style, *size))

    @staticmethod
    def _render(size: tuple[int, int], style: str) -> bytes:
        if style == "noise":
            image = Image.frombytes("RGB", size, os.urandom(size[0] * size[1] * 3))
        else:
            red = Image.linear_gradient("L").resize(size)
            green = Image.radial_gradient("L").resize(size)
            blue = Image.linear_gradient("L").rotate(90).resize(size)
            channels = [ImageChops.add(c, Image.effect_noise(size, 6), 1, -128) for c in (red, green, blue)]
            image = Image.merge("RGB", channels)
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- the fakes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


LISTEN_BACKLOG = 1024  # the fakes' default (aiohttp's) is 128


class BenchDiscord(FakeDiscord):
    """The fake Discord with a longer listen queue. With aiohttp's default of 128, a burst of a few hundred new
    connections overflows it and each dropped connection waits for the client's SYN retry, a full second, which
    real Discord never charges and which would be counted against the bot."""

    async def start(self) -> None:
        app = web.Application(client_max_size=512 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG).start()
        self._port = int(self._runner.addresses[0][1])


class BenchModelsLab(FakeModelsLab):
    """The fake ModelsLab, with every job's result images replaced by the benchmark's realistic ones (`Images`) the
    moment the job is made: whenever the bot downloads them, and however the scenario paces its commands, it gets
    the realistic bytes. The fake's behaviour is otherwise its own."""

    def __init__(self, images: Images) -> None:
        super().__init__()
        self.images = images
        self.image_style: str | None = None

    async def _create_job(self, *args: Any, **kwargs: Any) -> FakeJob:
        job = await super()._create_job(*args, **kwargs)
        data = self.images.get(job.size, self.image_style)
        if data is not None:
            for url in job.outputs:
                entry = self._images.get(url.rsplit("/", 1)[-1])
                if entry is not None:
                    entry.data = data
        return job


def listen_overflows() -> int:
    """The system's count of connections dropped because a listen queue was full (TcpExt ListenOverflows)."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


OPENED: list[Fakes] = []


class Fakes:
    """A fake Discord (with `members` extra members, for the fair queue) and a fake ModelsLab, for one bot."""

    def __init__(self, members: int, images: Images) -> None:
        self.discord: FakeDiscord = BenchDiscord(token=BOT_TOKEN)
        self.modelslab = BenchModelsLab(images)
        self.images = images
        self.member_ids = [MEMBER_BASE_ID + n for n in range(max(members, 1))]
        for user_id in self.member_ids:
            self.discord.add_member(user_id, f"member{user_id - MEMBER_BASE_ID}")
        self.interactions: dict[str, FakeInteraction] = {}  # prompt -> its /imagine
        self._by_token: dict[str, str] = {}  # interaction token -> prompt
        self.posted_at: dict[str, float] = {}  # prompt -> when the PATCH with the images reached Discord
        self.jobs: dict[str, FakeJob] = {}  # prompt -> the job at ModelsLab
        self.realistic: set[str] = set()  # prompts whose posted images are all the benchmark's realistic ones
        self._request_cursor = 0
        self._job_cursor = 0

    async def __aenter__(self) -> Fakes:
        OPENED.append(self)  # for the Discord budget of each scenario (run())
        await self.discord.start()
        await self.modelslab.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.modelslab.stop()
        await self.discord.stop()

    def member(self, n: int) -> int:
        return self.member_ids[n % len(self.member_ids)]

    def behave(self, behaviour: Queued, api_latency: float) -> None:
        """What ModelsLab does with every submission from now on; `api_latency`: every submit and fetch is held."""
        default: Behaviour = Hang(api_latency, then=behaviour) if api_latency > 0 else behaviour
        self.modelslab.default_behaviour = default
        self.modelslab.clear_script()
        if api_latency > 0 and not self.modelslab._fetch_faults:
            self.modelslab.fail_fetches(10**9, Hang(api_latency))

    async def imagine(self, prompt: str, user: int, **options: Any) -> FakeInteraction:
        interaction = await self.discord.invoke_slash("imagine", {"prompt": prompt, **options}, user_id=user)
        self.interactions[prompt] = interaction
        self._by_token[interaction.token] = prompt
        return interaction

    async def imagine_paced(self, prompts: Sequence[str], rate: float) -> list[FakeInteraction]:
        """Send the commands at a steady `rate` per second."""
        start = time.monotonic()
        sent = []
        for n, prompt in enumerate(prompts):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(await self.imagine(prompt, self.member(n)))
        return sent

    async def imagine_at_once(self, prompts: Sequence[str], **options: Any) -> list[FakeInteraction]:
        return list(await asyncio.gather(*(self.imagine(p, self.member(n), **options) for n, p in enumerate(prompts))))

    def scan(self) -> None:
        """Take note of new jobs at ModelsLab and of results posted to Discord (and whether their images were the
        realistic ones)."""
        jobs = self.modelslab.jobs
        if len(jobs) > self._job_cursor:
            for job in itertools.islice(jobs.values(), self._job_cursor, None):
                self.jobs[str(job.request.get("prompt"))] = job
            self._job_cursor = len(jobs)
        requests = self.discord.requests
        first_unanswered = None
        for index in range(self._request_cursor, len(requests)):
            rec = requests[index]
            if rec.status == 0:
                if first_unanswered is None:
                    first_unanswered = index
                continue
            if not rec.files or not 200 <= rec.status < 300:
                continue
            match = RESULT_PATH.match(rec.path)
            token = match["token"] if match else None
            shown = self._by_token.get(token) if token else None
            if shown is not None and shown not in self.posted_at:
                self.posted_at[shown] = rec.at
                job = self.jobs.get(shown)
                realistic = self.images.get(job.size, self.modelslab.image_style) if job is not None else None
                if realistic is not None and all(file.data == realistic for file in rec.files):
                    self.realistic.add(shown)
        self._request_cursor = first_unanswered if first_unanswered is not None else len(requests)

    def use_images(self, style: str | None) -> None:
        """The style of the realistic images of the jobs made from now on (None: the scenario's own)."""
        self.modelslab.image_style = style

    def realistic_text(self, prompts: Sequence[str]) -> str:
        """How many of these jobs posted the realistic image (the rest posted the fake's tiny solid colour)."""
        return f"{sum(1 for p in prompts if p in self.realistic)} of {len(prompts)}"

    async def wait(self, what: str, done: Callable[[], bool], within: float, poll: float = 0.01) -> None:
        deadline = time.monotonic() + within
        while True:
            self.scan()
            if done():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out after {within:.0f} s waiting for {what}")
            await asyncio.sleep(poll)

    async def wait_acknowledged(self, prompts: Iterable[str], within: float = 60) -> None:
        wanted = [self.interactions[p] for p in prompts]
        await self.wait("the acknowledgements", lambda: all(i.callback is not None for i in wanted), within)

    async def wait_submitted(self, prompts: Iterable[str], within: float = 60) -> None:
        """Until ModelsLab has answered each prompt's submission (the job exists at ModelsLab)."""
        wanted = list(prompts)

        def answered() -> bool:
            if any(p not in self.jobs for p in wanted):
                return False
            calls = [c for c in self.modelslab.requests if c.job_id is not None and c.path.endswith("text2img")]
            done = {c.job_id for c in calls if c.answered}
            return all(self.jobs[p].id in done for p in wanted)

        await self.wait("the submissions", answered, within, poll=0.05)

    async def wait_posted(self, prompts: Iterable[str], within: float = 120) -> None:
        wanted = list(prompts)
        await self.wait("the results in Discord", lambda: all(p in self.posted_at for p in wanted), within)

    async def wait_quiet(self, quiet: float = 0.5, within: float = 30) -> None:
        """Until neither fake has received a request for `quiet` seconds (the bot is done with what it had)."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            latest = max(
                self.discord.requests[-1].at if self.discord.requests else 0.0,
                self.modelslab.requests[-1].at if self.modelslab.requests else 0.0,
            )
            if time.monotonic() - latest >= quiet:
                return
            await asyncio.sleep(0.05)

    def edits_between(self, start: float, end: float) -> int:
        """Edits of status messages without images (progress: "position 3 of 12", "Generating...") in the window."""
        return sum(
            1
            for rec in self.discord.requests
            if rec.method == "PATCH" and not rec.files and start <= rec.at <= end and "/messages/" in rec.path
        )

    def delays(self, prompts: Iterable[str]) -> list[float]:
        """For each prompt: from "finished at ModelsLab" to "the images reached Discord"."""
        result = []
        for prompt in prompts:
            job = self.jobs.get(prompt)
            posted = self.posted_at.get(prompt)
            if job is not None and job.finished_at is not None and posted is not None:
                result.append(posted - job.finished_at)
        return result


@dataclass
class EditCheck:
    """What members saw of their status messages, from the requests the fake Discord recorded."""

    edits: int = 0  # accepted edits of status messages (progress and outcomes)
    identical: int = 0  # edits that showed what the message already showed (words, embeds, buttons)
    too_close: int = 0  # progress edits less than PROGRESS_MIN_INTERVAL after the previous edit of their message

    @classmethod
    def measure(cls, fake: FakeDiscord, interactions: Iterable[FakeInteraction]) -> EditCheck:
        check = cls()
        by_message: dict[int, FakeInteraction] = {}
        by_interaction: dict[int, FakeInteraction] = {}
        for interaction in interactions:
            by_interaction[interaction.id] = interaction
            if interaction.original_message_id is not None:
                by_message[interaction.original_message_id] = interaction
        edits: dict[int, list[Any]] = {}
        for rec in fake.requests:
            if rec.method != "PATCH" or not 200 <= rec.status < 300:
                continue
            owner = by_interaction.get(rec.interaction_id) if rec.interaction_id is not None else None
            if owner is None or not rec.path.endswith("/messages/@original"):
                tail = rec.path.rsplit("/", 1)[-1]
                owner = by_message.get(int(tail)) if tail.isdigit() else owner
            if owner is not None:
                edits.setdefault(owner.id, []).append(rec)
        for interaction_id, recs in edits.items():
            callback = by_interaction[interaction_id].callback
            showing = _shown(((callback.json or {}) if callback else {}).get("data"))
            previous_at: float | None = None
            for rec in sorted(recs, key=lambda r: r.at):
                now = _shown(rec.json)
                check.edits += 1
                check.identical += now == showing
                outcome = isinstance(rec.json, dict) and "attachments" in rec.json
                if not outcome and previous_at is not None and rec.at - previous_at < PROGRESS_MIN_INTERVAL - 0.05:
                    check.too_close += 1
                showing, previous_at = now, rec.at
        return check


def _shown(payload: Any) -> tuple[Any, ...]:
    payload = payload if isinstance(payload, dict) else {}
    return (payload.get("content"), payload.get("embeds") or [], payload.get("components") or [])


class LoopMonitor:
    """The same stall monitor as in the bot, for this process's loop: the fakes timestamp what reaches them, so a
    stall here would make the bot look slower than it is."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bench-loop-monitor")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            before = time.monotonic()
            await asyncio.sleep(self.interval)
            after = time.monotonic()
            overshoot = after - before - self.interval
            if overshoot >= STALL_FLOOR_MS / 1000:
                self.samples.append((after, overshoot))

    def max_stall(self, start: float, end: float) -> float:
        return max((over for woke, over in self.samples if start <= woke <= end), default=0.0)


MONITOR = LoopMonitor()


# ---------------------------------------------------------------------------------------------- the bot


@dataclass
class Statements:
    """SQL statements counted in the bot (`bench.botproc`): how many, and how many of each kind."""

    seq: int = 0
    total: int = 0
    by_statement: dict[str, int] = field(default_factory=dict)

    def __sub__(self, before: Statements) -> Statements:
        counts = {k: v - before.by_statement.get(k, 0) for k, v in self.by_statement.items()}
        return Statements(self.seq, self.total - before.total, {k: v for k, v in counts.items() if v})

    def per_job(self, jobs: int) -> float:
        return self.total / jobs if jobs else math.nan

    def top(self, jobs: int, n: int = 6) -> str:
        """The most frequent statements, per job."""
        ranked = sorted(self.by_statement.items(), key=lambda item: -item[1])[:n]
        return "; ".join(f"{count / jobs:.1f} x {statement[:70]}" for statement, count in ranked)


class BotProcess:
    """The bot as a separate process, configured only through environment variables."""

    def __init__(self, fakes: Fakes, workdir: Path, name: str, options: argparse.Namespace, **env: str) -> None:
        self.fakes = fakes
        self.name = name
        self.options = options
        self.directory = workdir / name
        self.log_path = self.directory / "bot.log"
        self.stall_path = self.directory / "stalls.txt"
        self.profile_path = self.directory / "bot.prof"
        self.sql_stats_path = self.directory / "sql.json"
        self.plain = env.pop("PLAIN", "") == "1"
        self.module = "bot" if self.plain else "bench.botproc"
        self.env = self._environment(env)
        self.process: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    def _environment(self, extra: dict[str, str]) -> dict[str, str]:
        keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "TMPDIR") if name in os.environ}
        env = {
            **keep,
            "PYTHONPATH": str(ROOT),
            "DISCORD_TOKEN": BOT_TOKEN,
            "DISCORD_API_BASE": self.fakes.discord.api_base,
            "DISCORD_GATEWAY_URL": self.fakes.discord.gateway_url,
            "DISCORD_DEV_GUILD_ID": str(self.fakes.discord.guild_id),
            "MODELSLAB_API_KEY": DEFAULT_KEY,
            "MODELSLAB_BASE_URL": self.fakes.modelslab.base_url,
            "DATABASE_PATH": str(self.directory / "data" / "bot.sqlite3"),
            "SECRET_KEY": SECRET_KEY,
            "WEBHOOK_HOST": "127.0.0.1",
            "WEBHOOK_PORT": "0",
            "LOG_LEVEL": self.options.log_level,
            **extra,
        }
        if not self.plain:
            env["BENCH_STALL_FILE"] = str(self.stall_path)
            env["BENCH_SQL_STATS"] = str(self.sql_stats_path)
            if self.options.asyncio_debug:
                env["PYTHONASYNCIODEBUG"] = "1"
                env["BENCH_SLOW_CALLBACK"] = str(self.options.slow_callback)
            if self.options.profile:
                env["BENCH_PROFILE"] = str(self.profile_path)
            if self.options.event_loop == "asyncio":
                env["BENCH_EVENT_LOOP"] = "asyncio"
        return env

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def _open_log(self) -> IO[bytes]:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        return self._log

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    async def start(self, within: float = 60) -> None:
        log = self._open_log()
        seed: Path | None = getattr(self.options, "seed_database", None)
        if seed is not None:  # bench.history: the bot starts on a copy of a database with a long history
            (self.directory / "data").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(seed, self.directory / "data" / "bot.sqlite3")
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            env=self.env,
            cwd=self.directory,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
        deadline = time.monotonic() + within
        # on_ready: commands synced, guilds loaded (after discord.py's guild_ready_timeout, 2 s in `python -m bot`).
        while "Connected to Discord as" not in self.log_text():
            if self.process.returncode is not None:
                raise RuntimeError(f"the bot exited with {self.process.returncode}:\n{self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the bot did not connect within {within:.0f} s:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def memory_mb(self) -> dict[str, float]:
        """VmRSS and VmHWM (peak resident set) of the bot process, in MB (10^6 bytes)."""
        values = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e6
        return values

    def stalls(self, start: float, end: float) -> list[float]:
        """Every loop overshoot of 1 ms or more (in seconds) whose wake-up fell within [start, end]."""
        try:
            lines = self.stall_path.read_text(encoding="ascii").splitlines()
        except FileNotFoundError:
            return []
        found = []
        for line in lines:
            woke, _, overshoot = line.partition(" ")
            if woke in ("start", "paused", "resumed") or not overshoot:
                continue
            if start <= float(woke) <= end:
                found.append(float(overshoot))
        return found

    def max_stall(self, start: float, end: float) -> float:
        return max(self.stalls(start, end), default=0.0)

    async def watch_loop(self, on: bool, within: float = 10) -> None:
        """Pause (False) or resume (True) the stall monitor in the bot (bench.botproc: what `<stall file>.want`
        says, on SIGUSR2); returns once it did. The signal is sent again each second without an answer: asking twice
        is harmless, and a run of the benchmark must not fail on one signal that went astray."""
        if self.plain:
            return
        word = "resumed" if on else "paused"
        self._want_monitor("resume" if on else "pause")
        before = self._monitor_lines(word)
        deadline = time.monotonic() + within
        tries = 0
        while time.monotonic() < deadline:
            if tries:
                print(f"  the bot's stall monitor did not answer within 1 s; asked again ({word})", file=sys.stderr)
            os.kill(self.pid, signal.SIGUSR2)
            tries += 1
            asked = time.monotonic()
            while time.monotonic() - asked < 1:
                if self._monitor_lines(word) > before:
                    return
                await asyncio.sleep(0.01)
        raise TimeoutError(f"the bot's stall monitor was not {word}")

    def _want_monitor(self, state: str) -> None:
        Path(f"{self.stall_path}.want").write_text(state, encoding="ascii")

    def _monitor_lines(self, word: str) -> int:
        try:
            text = self.stall_path.read_text(encoding="ascii")
        except FileNotFoundError:
            return 0
        return sum(1 for line in text.splitlines() if line.startswith(word + " "))

    def cpu_seconds(self) -> float:
        """User + system CPU time the bot process has used so far (all its threads)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def threads_cpu_seconds(self) -> tuple[float, float]:
        """CPU time of the bot's threads so far, in nanoseconds' precision (/proc/<pid>/task/*/schedstat, where
        /proc/<pid>/stat counts 10 ms ticks): (all its threads, its main thread alone: the event loop). Threads that
        ended are not in it; the bot's (the database thread, the thread pool's) live as long as it does."""
        total = loop = 0.0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                seconds = int((task / "schedstat").read_text().split()[0]) / 1e9
            except (OSError, ValueError, IndexError):
                continue  # a thread that just ended
            total += seconds
            if task.name == str(self.pid):
                loop = seconds
        return total, loop

    def threads_wakeups(self) -> tuple[int, int]:
        """Voluntary context switches of the bot's threads so far (/proc/<pid>/task/*/status): each is a thread
        that went to sleep and was woken again, (all its threads, its main thread alone). On this VM a wake-up
        after idling costs far more CPU than the work it wakes for (bench/README.md), so this says how many of
        them a job costs."""
        total = loop = 0
        for task in Path(f"/proc/{self.pid}/task").iterdir():
            try:
                text = (task / "status").read_text()
            except OSError:
                continue  # a thread that just ended
            found = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", text, re.M)
            if found is None:
                continue
            total += int(found.group(1))
            if task.name == str(self.pid):
                loop = int(found.group(1))
        return total, loop

    async def statements(self, within: float = 10) -> Statements:
        """The SQL statements the bot has run so far (bench.botproc counts them; not in the plain `python -m bot`)."""
        if self.plain:
            return Statements()
        seq = self._statements_read(self.sql_stats_path).seq
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + within
        while True:
            found = self._statements_read(self.sql_stats_path)
            if found.seq > seq:
                return found
            if time.monotonic() > deadline:
                raise TimeoutError("the bot did not report its SQL statements")
            await asyncio.sleep(0.01)

    @staticmethod
    def _statements_read(path: Path) -> Statements:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return Statements()
        return Statements(int(data["seq"]), int(data["total"]), dict(data["statements"]))

    def problems(self) -> list[str]:
        """ERROR lines and tracebacks in the bot's log."""
        return [line for line in self.log_text().splitlines() if " ERROR " in line or line.startswith("Traceback")]

    def slow_callbacks(self, limit: int = 3) -> list[str]:
        """asyncio's "Executing <...> took N seconds" lines (debug mode), slowest first."""
        found = re.findall(r"Executing (.+?) took ([0-9.]+) seconds", self.log_text())
        found.sort(key=lambda item: -float(item[1]))
        return [f"{float(took) * 1000:.0f} ms: {what[:160]}" for what, took in found[:limit]]


def stall_text(seconds: float) -> str:
    return f"< {STALL_FLOOR_MS:.0f} ms" if seconds * 1000 < STALL_FLOOR_MS else ms(seconds)


def stalls_row(
    report: Report, bot: BotProcess, start: float, end: float, cpu: float | None = None, *, watched: bool = True
) -> float | None:
    """The largest stall of the bot's loop in [start, end], with the fakes' own as a check of the measurement.
    Not `watched`: the bot's monitor was paused (its CPU was measured meanwhile), only the fakes' is shown."""
    stall = bot.max_stall(start, end) if watched else None
    bot_text = stall_text(stall) if stall is not None else "not watched (CPU measured)"
    text = f"bot {bot_text} / fakes {stall_text(MONITOR.max_stall(start, end))}"
    if cpu is not None:
        text += f"; bot CPU {cpu:.2f} s in {end - start:.2f} s"
    report.add("    ...largest event-loop stall meanwhile", text)
    return stall


IDLE_CALIBRATION = 1.0  # seconds the idle bot is watched before a measured window


def machine_busy_seconds() -> float:
    """CPU time every process of the machine has used so far, all CPUs together (/proc/stat: user, nice, system,
    irq, softirq, steal; not idle or iowait)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


@dataclass
class Costs:
    """The bot's CPU time and SQL statements from `begin()` to `end()`, to be divided by the jobs served.

    The benchmark's stall monitor (bench.botproc) wakes the bot's loop every 5 ms, which costs the bot CPU; more
    while jobs run than while it idles (measured: bench/README.md), so subtracting its idle rate was not enough.
    It is paused from `begin()` to `end()`: the window's CPU is the bot's own. `begin()` still watches the idle bot
    for `IDLE_CALIBRATION` seconds (its heartbeats and timers, about nothing) and `cpu_s` is the window's CPU beyond
    that rate (`gross_cpu_s` all of it).
    """

    bot: BotProcess
    gross_cpu_s: float = 0.0
    loop_cpu_s: float = 0.0  # of which the main thread, the event loop (gross)
    wakeups: int = 0  # voluntary context switches, all threads
    loop_wakeups: int = 0  # of which the main thread's
    idle_cpu_s: float = 0.0  # what the idle bot would have used over the window
    statements: Statements = field(default_factory=Statements)
    # The machine's other processes (other sessions' tests), and this script (the fakes), in CPUs over the window:
    # a busy machine makes every job cost the bot more CPU (the two CPUs' caches and cores are shared).
    others_cpus: float = 0.0
    fakes_cpus: float = 0.0
    _began: float = 0.0
    _idle_rate: float = 0.0
    _machine_busy_s: float = 0.0
    _fakes_cpu_s: float = 0.0

    @property
    def cpu_s(self) -> float:
        return self.gross_cpu_s - self.idle_cpu_s

    async def begin(self) -> Costs:
        await self.bot.watch_loop(False)
        total, _ = self.bot.threads_cpu_seconds()
        await asyncio.sleep(IDLE_CALIBRATION)
        self._idle_rate = (self.bot.threads_cpu_seconds()[0] - total) / IDLE_CALIBRATION
        self.statements = await self.bot.statements()
        self.gross_cpu_s, self.loop_cpu_s = self.bot.threads_cpu_seconds()
        self.wakeups, self.loop_wakeups = self.bot.threads_wakeups()
        self._machine_busy_s, self._fakes_cpu_s = machine_busy_seconds(), time.process_time()
        self._began = time.monotonic()
        return self

    async def end(self) -> Costs:
        """Read once the bot has settled (its last writes after the last post included)."""
        total, loop = self.bot.threads_cpu_seconds()
        wakeups, loop_wakeups = self.bot.threads_wakeups()
        self.wakeups, self.loop_wakeups = wakeups - self.wakeups, loop_wakeups - self.loop_wakeups
        busy, fakes, window = machine_busy_seconds(), time.process_time(), time.monotonic() - self._began
        self.gross_cpu_s, self.loop_cpu_s = total - self.gross_cpu_s, loop - self.loop_cpu_s
        self.idle_cpu_s = self._idle_rate * window
        fakes -= self._fakes_cpu_s
        if window > 0:
            self.fakes_cpus = fakes / window
            self.others_cpus = max(busy - self._machine_busy_s - fakes - self.gross_cpu_s, 0.0) / window
        self.statements = await self.bot.statements() - self.statements
        await self.bot.watch_loop(True)
        return self


def per_job_rows(
    report: Report, costs: Costs, jobs: int, realistic: str, cpu_target_ms: float | None
) -> dict[str, Any]:
    """The bot's CPU and SQL statements per job, and how many jobs carried the realistic image."""
    per_job = 1000 / jobs if jobs else math.nan
    cpu_ms, gross_ms, idle_ms = costs.cpu_s * per_job, costs.gross_cpu_s * per_job, costs.idle_cpu_s * per_job
    loop_ms = costs.loop_cpu_s * per_job
    statements = costs.statements.per_job(jobs)
    report.add(
        "    ...bot CPU per job (/proc schedstat, all threads; stall monitor paused)",
        f"{cpu_ms:.1f} ms (gross {gross_ms:.1f}, idle {idle_ms:.1f}; loop {loop_ms:.1f})",
        f"<= {cpu_target_ms:g} ms" if cpu_target_ms is not None else "",
        cpu_ms <= cpu_target_ms if cpu_target_ms is not None else None,
    )
    report.add(  # the targets are the webhook path's (2a, 5); polling (2b) is shown for comparison
        "    ...SQL statements per job",
        f"{statements:.1f}",
        f"<= {STATEMENTS_TARGET}" if cpu_target_ms is not None else "",
        statements <= STATEMENTS_TARGET if cpu_target_ms is not None else None,
    )
    report.add(
        "    ...wake-ups per job (voluntary context switches, all threads; no target)",
        f"{costs.wakeups * per_job / 1000:.1f} (loop {costs.loop_wakeups * per_job / 1000:.1f})",
    )
    report.add("    ...jobs whose posted image was the realistic one", realistic)
    report.add(
        "    ...other processes' CPU meanwhile (this script's fakes)",
        f"{costs.others_cpus:.2f} of {os.cpu_count()} CPUs ({costs.fakes_cpus:.2f})",
    )
    if jobs and costs.statements.total:
        report.note(f"{report.section}: statements per job: {costs.statements.top(jobs)}")
    return {
        "bot_cpu_ms_per_job": cpu_ms,
        "gross_cpu_ms_per_job": gross_ms,
        "idle_cpu_ms_per_job": idle_ms,
        "loop_cpu_ms_per_job": loop_ms,
        "statements_per_job": statements,
        "wakeups_per_job": costs.wakeups / jobs if jobs else math.nan,
        "loop_wakeups_per_job": costs.loop_wakeups / jobs if jobs else math.nan,
        "others_cpus": costs.others_cpus,
        "fakes_cpus": costs.fakes_cpus,
        "statements": costs.statements.by_statement,
        "realistic_images": realistic,
    }


@contextlib.asynccontextmanager
async def running_bot(fakes: Fakes, workdir: Path, name: str, options: argparse.Namespace, **env: str) -> Any:
    bot = BotProcess(fakes, workdir, name, options, **env)
    try:
        await bot.start()
        yield bot
    finally:
        await bot.stop()
        for problem in bot.problems()[:5]:
            print(f"  [{name}] bot log: {problem[:200]}", file=sys.stderr)


def webhook_env() -> dict[str, str]:
    port = free_port()
    return {"WEBHOOK_PORT": str(port), "PUBLIC_URL": f"http://127.0.0.1:{port}"}


# ---------------------------------------------------------------------------------------------- scenarios


async def scenario_ack(options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """`--commands` /imagine at once, `--ack-runs` times (a fresh bot each time); how long each waits for its
    acknowledgement. The percentiles are over every command of every run."""
    count = options.commands
    latencies: list[float] = []
    per_run: list[str] = []
    refused = edits = 0
    worst_stall = worst_fakes = 0.0
    cpu_total = 0.0
    images = await Images(options.images).prepare((None, DEFAULT_SIZE))
    for run in range(options.ack_runs):
        async with Fakes(options.members, images) as fakes:
            # ModelsLab keeps every job (it never finishes during the scenario): the bot's queue and its
            # position edits run as they would, without results to post.
            fakes.behave(Queued(eta=NEVER), options.api_latency)
            async with running_bot(fakes, workdir, f"ack{run}", options) as bot:
                prompts = [f"ack burst {n}" for n in range(count)]
                if not options.ack_cold:
                    # A bot that has served a command before: what it keeps in memory is loaded.
                    await fakes.imagine("ack warm-up", fakes.member(0))
                    await fakes.wait_acknowledged(["ack warm-up"])
                await fakes.wait_quiet(0.3)
                cpu = bot.cpu_seconds()
                start = time.monotonic()
                interactions = await fakes.imagine_at_once(prompts)
                await fakes.wait_acknowledged(prompts)
                last_ack = max(i.callback.at for i in interactions if i.callback is not None)
                cpu_total += bot.cpu_seconds() - cpu
                run_latencies = [i.callback_latency for i in interactions if i.callback_latency is not None]
                latencies.extend(run_latencies)
                refused += sum(1 for i in interactions if not i.acknowledged)
                edits += fakes.edits_between(start, last_ack)
                worst_stall = max(worst_stall, bot.max_stall(start, last_ack))
                worst_fakes = max(worst_fakes, MONITOR.max_stall(start, last_ack))
                per_run.append(
                    f"{ms(min(run_latencies))} / {ms(percentile(run_latencies, 0.5))} / "
                    f"{ms(percentile(run_latencies, 0.99))}"
                )
                # Every waiting member is shown a place (within the bot's edit budgets: a second of quiet is the end).
                await fakes.wait_quiet(1.2, within=30)
    if not latencies:
        return
    p50, p99 = percentile(latencies, 0.5), percentile(latencies, 0.99)
    runs = options.ack_runs
    report.section = "1"
    warm = "cold bot, " if options.ack_cold else ""
    plural = "run" if runs == 1 else "runs"
    report.add(f"1. Acknowledgement, {count} x /imagine at once ({warm}{runs} {plural}): p50", ms(p50))
    report.add(f"    Acknowledgement p99 (max {ms(max(latencies))})", ms(p99), f"< {ms(ACK_P99_TARGET)}", p99 < 0.25)
    report.add("    ...refused by Discord (later than 3 s)", str(refused), "0", refused == 0)
    report.add(
        "    ...largest event-loop stall meanwhile",
        f"bot {stall_text(worst_stall)} / fakes {stall_text(worst_fakes)}; bot CPU {cpu_total / runs:.2f} s a burst",
    )
    report.add("    ...status edits sent before the last acknowledgement", f"{edits / runs:.0f} a burst")
    report.note("ack: min / p50 / p99 of each run: " + "; ".join(per_run))
    report.data["ack"] = {
        "commands": count,
        "runs": runs,
        "cold": options.ack_cold,
        "min_s": min(latencies),
        "p50_s": p50,
        "p99_s": p99,
        "max_s": max(latencies),
        "per_run": per_run,
        "refused": refused,
        "max_stall_s": worst_stall,
        "fakes_max_stall_s": worst_fakes,
        "bot_cpu_per_burst_s": cpu_total / runs,
        "edits_before_last_ack_per_burst": edits / runs,
    }


async def scenario_webhook_and_stall(
    options: argparse.Namespace, workdir: Path, report: Report, modes: set[str]
) -> None:
    images = await Images(options.images).prepare((None, DEFAULT_SIZE), ("photo", STALL_SIZE), ("noise", STALL_SIZE))
    async with (
        Fakes(options.members, images) as fakes,
        running_bot(fakes, workdir, "webhook", options, MODELSLAB_MAX_QUEUED="100", **webhook_env()) as bot,
    ):
        if "stall" in modes:
            await stall_runs(options, fakes, bot, report)
        if "webhook" in modes:
            await webhook_latency(options, fakes, bot, report)
            await webhook_burst(options, fakes, bot, report)


async def stall_runs(options: argparse.Namespace, fakes: Fakes, bot: BotProcess, report: Report) -> None:
    """One /imagine of four 1024x1024 images at a time; the largest stall of the bot's loop while it posts them."""
    fakes.behave(Queued(eta=NEVER), options.api_latency)
    report.section = "3"
    variants = [("photo", options.stall_runs), ("noise", options.reencode_runs)]
    for style, runs in variants:
        per_run: list[float] = []
        fakes_worst = 0.0
        sizes: list[int] = []
        for run in range(runs):
            fakes.use_images(style)
            prompt = f"stall {style} {run}"
            await fakes.imagine(prompt, fakes.member(run), samples=4, width=STALL_SIZE[0], height=STALL_SIZE[1])
            await fakes.wait_acknowledged([prompt])
            await fakes.wait_submitted([prompt])
            await fakes.wait_quiet(0.5)
            job = fakes.jobs[prompt]
            fakes.modelslab.complete(job.id)
            ready = job.finished_at or time.monotonic()
            await fakes.wait_posted([prompt], within=60)
            await fakes.wait_quiet(0.3)  # the PATCH answered, the job recorded as posted
            end = time.monotonic()
            per_run.append(bot.max_stall(ready, end))
            fakes_worst = max(fakes_worst, MONITOR.max_stall(ready, end))
            message = fakes.interactions[prompt].original
            if message is not None:
                sizes = [len(a.data) for a in message.attachments]
        fakes.use_images(None)
        if not runs:
            continue
        worst = max(per_run)
        total = sum(sizes) / 1e6
        if style == "photo":
            label = f"3. Largest loop stall posting 4 x 1024x1024 ({total:.1f} MB), worst of {runs}"
        else:
            label = f"    ...incompressible, over 10 MiB, re-encoded (posted {total:.1f} MB), worst of {runs}"
        report.add(label, stall_text(worst), f"< {ms(STALL_TARGET)}", worst < STALL_TARGET)
        report.note(
            f"stall ({style}): per run " + ", ".join(stall_text(s) for s in per_run) + f"; fakes' loop at worst "
            f"{stall_text(fakes_worst)}"
        )
        report.data.setdefault("stall", {})[style] = {"runs_s": per_run, "posted_mb": total}
    for line in bot.slow_callbacks():
        report.note(f"stall: slow callback {line}")


async def webhook_latency(options: argparse.Namespace, fakes: Fakes, bot: BotProcess, report: Report) -> None:
    """`--jobs` commands at `--rate` per second; ModelsLab finishes each `--job-time` s after its submission and
    calls the webhook; from that moment to the PATCH with the images at Discord."""
    fakes.behave(Queued(eta=WEBHOOK_ETA, ready_after_seconds=options.job_time), options.api_latency)
    # A bot that has served each member before (what it keeps in memory, such as their /settings, is loaded).
    warm_up = [f"webhook warm-up {n}" for n in range(len(fakes.member_ids))]
    await fakes.imagine_at_once(warm_up)
    await fakes.wait_posted(warm_up, within=60)
    await fakes.wait_quiet(0.3)
    prompts = [f"webhook paced {n}" for n in range(options.jobs)]
    costs = await Costs(bot).begin()
    cpu = bot.cpu_seconds()
    start = time.monotonic()
    await fakes.imagine_paced(prompts, options.rate)
    await fakes.wait_posted(prompts, within=60 + options.jobs / options.rate + options.job_time)
    end = max(fakes.posted_at[p] for p in prompts)
    cpu = bot.cpu_seconds() - cpu
    await fakes.wait_quiet(0.3)
    await costs.end()
    delays = fakes.delays(prompts)
    p50 = percentile(delays, 0.5)
    report.section = "2a"
    report.add(
        f"2a. Ready -> posted, webhook ({options.jobs} jobs at {options.rate:g}/s): p50",
        ms(p50),
        f"< {ms(WEBHOOK_P50_TARGET)}",
        p50 < WEBHOOK_P50_TARGET,
    )
    report.add("    ...webhook p99 / max", f"{ms(percentile(delays, 0.99))} / {ms(max(delays))}")
    stall = stalls_row(report, bot, start, end, cpu, watched=False)
    per_job = per_job_rows(report, costs, len(prompts), fakes.realistic_text(prompts), WEBHOOK_CPU_TARGET_MS)
    at_once, at_once_realistic = await whole_jobs_at_once(options, fakes, bot)
    at_once_ms = at_once.cpu_s * 1000 / options.jobs
    report.add(
        f"    ...the same {options.jobs} jobs, their commands at once: bot CPU per job (no target; see bench/README)",
        f"{at_once_ms:.1f} ms, {at_once.wakeups / options.jobs:.1f} wake-ups (realistic image: {at_once_realistic})",
    )
    floor = await exchanges_floor(options)
    report.add(
        "    ...the floor: the same exchanges in bare aiohttp, no bot (bench.floor), paced / at once (no target)",
        (
            f"{floor['paced']:.1f} ms / {floor['at once']:.1f} ms; wake-ups {floor['paced wake-ups']:.1f} / "
            f"{floor['at once wake-ups']:.1f}"
        )
        if floor
        else "not measured (bench.floor failed)",
    )
    report.data["webhook"] = {
        "jobs": len(delays),
        "p50_s": p50,
        "p99_s": percentile(delays, 0.99),
        "max_stall_s": stall,
        "bot_cpu_s": cpu,
        "at_once_cpu_ms_per_job": at_once_ms,
        "at_once_wakeups_per_job": at_once.wakeups / options.jobs,
        "floor_ms_per_job": floor,
        **per_job,
    }


async def whole_jobs_at_once(options: argparse.Namespace, fakes: Fakes, bot: BotProcess) -> tuple[Costs, str]:
    """2a's jobs again, every command at once: the bot's CPU per job, command to posted result, when its work is
    not spread out. The paced figure is higher on a machine where a thread woken after an idle gap runs slower
    (measured on the development VM: bench/README.md, "Paced and at once"); the difference is the host's, the
    instructions are the same. Returns the costs and how many posted the realistic image."""
    prompts = [f"webhook at once {n}" for n in range(options.jobs)]
    costs = await Costs(bot).begin()
    await fakes.imagine_at_once(prompts)
    await fakes.wait_posted(prompts, within=60 + options.job_time)
    await fakes.wait_quiet(0.3)
    await costs.end()
    return costs, fakes.realistic_text(prompts)


async def exchanges_floor(options: argparse.Namespace) -> dict[str, float] | None:
    """`python -m bench.floor` with 2a's jobs and rate, while the bot idles: what the eight exchanges of these jobs
    cost on this machine now, with no bot around them (milliseconds of CPU per job by round), or None."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.floor",
        "--jobs",
        str(options.jobs),
        "--rate",
        str(options.rate),
        "--json",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await child.communicate()
    if child.returncode != 0:
        return None
    found: dict[str, float] = json.loads(out.decode().strip().splitlines()[-1])
    return found


async def webhook_burst(options: argparse.Namespace, fakes: Fakes, bot: BotProcess, report: Report) -> None:
    """`--burst` jobs at ModelsLab finish at the same instant: how many results a second the bot gets into Discord."""
    fakes.behave(Queued(eta=NEVER), options.api_latency)
    prompts = [f"webhook burst {n}" for n in range(options.burst)]
    await fakes.imagine_at_once(prompts)
    await fakes.wait_acknowledged(prompts)
    await fakes.wait_submitted(prompts)
    await fakes.wait_quiet(0.5)
    costs = await Costs(bot).begin()
    cpu = bot.cpu_seconds()
    start = time.monotonic()
    for prompt in prompts:
        fakes.modelslab.complete(fakes.jobs[prompt].id)
    await fakes.wait_posted(prompts, within=120)
    cpu = bot.cpu_seconds() - cpu
    await fakes.wait_quiet(0.3)
    await costs.end()
    first_ready = min(fakes.jobs[p].finished_at or start for p in prompts)
    last_posted = max(fakes.posted_at[p] for p in prompts)
    elapsed = last_posted - first_ready
    delays = fakes.delays(prompts)
    throughput = len(prompts) / elapsed if elapsed > 0 else math.inf
    report.section = "5"
    size = sum(len(a.data) for a in (fakes.interactions[prompts[0]].original or fakes.discord.messages[0]).attachments)
    report.add(
        f"5. Throughput, webhook: {len(prompts)} jobs ready at once (1 image, {size / 1e6:.1f} MB each)",
        f"{throughput:.0f} jobs/s",
    )
    report.add("    ...their ready -> posted delays", spread(delays))
    stall = stalls_row(report, bot, start, last_posted, cpu, watched=False)
    per_job = per_job_rows(report, costs, len(prompts), fakes.realistic_text(prompts), BURST_CPU_TARGET_MS)
    report.data["throughput"] = {
        "jobs": len(prompts),
        "jobs_per_s": throughput,
        "elapsed_s": elapsed,
        "p50_s": percentile(delays, 0.5),
        "p99_s": percentile(delays, 0.99),
        "max_stall_s": stall,
        "bot_cpu_s": cpu,
        **per_job,
    }


async def scenario_polling(options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """No PUBLIC_URL. Each job finishes right after the bot's first fetch (at ModelsLab's ETA) was answered
    "processing", so the result waits for the next poll: the worst case of the first back-off interval."""
    eta = options.eta
    first_poll, interval = list(itertools.islice(poll_delays(eta), 2))
    images = await Images(options.images).prepare((None, DEFAULT_SIZE))
    async with (
        Fakes(options.members, images) as fakes,
        running_bot(fakes, workdir, "polling", options, MODELSLAB_MAX_QUEUED="100") as bot,
    ):
        fakes.behave(Queued(eta=eta, ready_after_fetches=1), options.api_latency)
        prompts = [f"polling paced {n}" for n in range(options.jobs)]
        costs = await Costs(bot).begin()
        cpu = bot.cpu_seconds()
        start = time.monotonic()
        await fakes.imagine_paced(prompts, options.rate)
        await fakes.wait_posted(prompts, within=60 + options.jobs / options.rate + eta + interval)
        end = max(fakes.posted_at[p] for p in prompts)
        cpu = bot.cpu_seconds() - cpu
        await fakes.wait_quiet(0.3)
        await costs.end()
        delays = fakes.delays(prompts)
        fetches = [len(fakes.modelslab.fetches(fakes.jobs[p].id)) for p in prompts if p in fakes.jobs]
        p50 = percentile(delays, 0.5)
        target = interval + POLLING_MARGIN
        report.section = "2b"
        report.add(
            f"2b. Ready -> posted, polling ({options.jobs} jobs at {options.rate:g}/s): p50",
            ms(p50),
            f"< {ms(target)} ({interval:g} s poll + {ms(POLLING_MARGIN)})",
            p50 < target,
        )
        report.add("    ...polling p99 / max", f"{ms(percentile(delays, 0.99))} / {ms(max(delays))}")
        stall = stalls_row(report, bot, start, end, cpu, watched=False)
        per_job = per_job_rows(report, costs, len(prompts), fakes.realistic_text(prompts), None)
    twice = sum(1 for f in fetches if f == 2)
    report.note(
        f"polling: ModelsLab's ETA {eta:g} s; the bot's fetches come at {first_poll:g} s after the submit answer, then "
        f"every {interval:g} s x1.5 (at most 10 s). Each job finished right after its first fetch, so the interval "
        f"that applies is the first back-off step, {interval:g} s; {twice} of {len(fetches)} jobs took exactly "
        "2 fetches."
    )
    report.data["polling"] = {
        "jobs": len(delays),
        "eta_s": eta,
        "interval_s": interval,
        "p50_s": p50,
        "p99_s": percentile(delays, 0.99),
        "max_stall_s": stall,
        **per_job,
    }


async def scenario_memory(options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """Plain `python -m bot` with `--pending` jobs it cannot send yet: its peak resident memory (VmHWM)."""
    count = options.pending
    async with Fakes(options.members, Images("solid")) as fakes:
        fakes.behave(Queued(eta=NEVER), options.api_latency)
        env = {"PLAIN": "1", "MODELSLAB_MAX_QUEUED": str(options.max_queued), **webhook_env()}
        async with running_bot(fakes, workdir, "memory", options, **env) as bot:
            await fakes.wait_quiet(0.5)
            idle = bot.memory_mb()
            prompts = [f"pending {n}" for n in range(count)]
            cpu = bot.cpu_seconds()
            start = time.monotonic()
            await fakes.imagine_paced(prompts, options.pending_rate)
            await fakes.wait_acknowledged(prompts, within=120)
            # Every waiting member is shown a place (front first, within the bot's edit budgets), then all is quiet.
            await fakes.wait_quiet(1.0, within=180)
            cpu = bot.cpu_seconds() - cpu
            end = time.monotonic()
            memory = bot.memory_mb()
            statuses = _job_statuses(bot.directory / "data" / "bot.sqlite3")
            edits = fakes.edits_between(start, end)
            head_edits = await move_the_head(fakes, prompts)
    interactions = [fakes.interactions[p] for p in prompts]
    latencies = [i.callback_latency for i in interactions if i.callback_latency is not None]
    refused = sum(1 for i in interactions if not i.acknowledged)
    waiting, sent = statuses.get("queued", 0), statuses.get("processing", 0) + statuses.get("submitting", 0)
    peak = memory["VmHWM"]
    report.section = "4"
    report.add(
        f"4. Peak memory (VmHWM) of `python -m bot`, {waiting + sent} jobs pending ({waiting} in its queue)",
        f"{peak:.0f} MB",
        f"< {MEMORY_TARGET_MB:.0f} MB",
        peak < MEMORY_TARGET_MB,
    )
    per_job = (memory["VmRSS"] - idle["VmRSS"]) * 1000 / max(waiting + sent, 1)
    report.add(
        "    ...resident when idle, before the jobs / after",
        f"{idle['VmRSS']:.0f} / {memory['VmRSS']:.0f} MB ({per_job:.0f} kB a job)",
    )
    report.add(
        f"    ...acknowledgements of those {count} (sent at {options.pending_rate:g}/s)",
        f"p50 {ms(percentile(latencies, 0.5))} / p99 {ms(percentile(latencies, 0.99))} / max {ms(max(latencies))}",
    )
    report.add("    ...refused by Discord (later than 3 s)", str(refused), "0", refused == 0)
    report.add(
        "    ...bot CPU while they came in and settled; status edits",
        f"{cpu:.1f} s in {end - start:.1f} s; {edits} edits",
    )
    report.add(
        f"    ...status edits when the head of that line moved (one of {options.max_queued} at ModelsLab finished)",
        f"{head_edits} of {waiting} waiting",
    )
    report.data["memory"] = {
        "pending": count,
        "statuses": statuses,
        "vm_hwm_mb": peak,
        "idle_rss_mb": idle["VmRSS"],
        "rss_mb": memory["VmRSS"],
        "ack_p50_s": percentile(latencies, 0.5),
        "ack_p99_s": percentile(latencies, 0.99),
        "refused": refused,
        "bot_cpu_s": cpu,
        "elapsed_s": end - start,
        "status_edits": edits,
        "status_edits_when_the_head_moved": head_edits,
        "fakes_max_stall_s": MONITOR.max_stall(start, end),
    }


async def move_the_head(fakes: Fakes, prompts: Sequence[str]) -> int:
    """One job at ModelsLab finishes (its webhook comes): its result is posted, the next in line is sent, and
    everybody behind moves up one place. How many status edits (not the result) that took."""
    fakes.scan()
    running = [p for p in prompts if p in fakes.jobs]
    if not running:
        return 0
    start = time.monotonic()
    fakes.modelslab.complete(fakes.jobs[running[0]].id)
    await fakes.wait_posted(running[:1], within=30)
    await fakes.wait_quiet(PROGRESS_MIN_INTERVAL + 1.0, within=60)  # the edits that waited for their message's turn
    return fakes.edits_between(start, time.monotonic())


def _job_statuses(database: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
        return dict(connection.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())


# ---------------------------------------------------------------------------------------------- output


def comparison(report: Report) -> str:
    webhook = report.data.get("webhook", {}).get("p50_s")
    polling = report.data.get("polling", {}).get("p50_s")
    ours = []
    if webhook is not None:
        ours.append(f"webhook p50 {ms(webhook)}")
    if polling is not None:
        ours.append(f"polling p50 {secs(polling)}")
    return (
        f"Compared with: the vendor's sample bot waits a fixed {VENDOR_BOT_WAIT:.0f} s, then fetches once (a job "
        f"done in 10 s is shown {VENDOR_BOT_WAIT - 10:.0f} s late, one not done by then is lost); its Python SDK polls "
        f"every {SDK_POLL_INTERVAL:.0f} s ({SDK_POLL_INTERVAL / 2:.0f} s late on average, up to "
        f"{SDK_POLL_INTERVAL:.0f} s). "
        f"This bot: {', '.join(ours) if ours else 'not measured in this run'}."
    )


def print_rows(headers: tuple[str, ...], rows: list[tuple[str, ...]], notes: list[str]) -> None:
    """A plain-text table, its columns as wide as their widest cell, then the notes as `* ` lines."""
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(line)
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(line)
    for note in notes:
        print(f"* {note}")


def print_table(report: Report) -> None:
    order = {name: n for n, name in enumerate(("1", "2a", "2b", "3", "4", "5", "6"))}
    ordered = sorted(report.rows, key=lambda r: order.get(r.section, len(order)))
    rows = [(r.measure, r.result, r.target, r.verdict) for r in ordered]
    print_rows(("Measure", "Result", "Target", ""), rows, report.notes)
    print(comparison(report))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Speed benchmark of the bot against the fake Discord and fake ModelsLab (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated scenarios: {', '.join(MODES)}")
    parser.add_argument("--commands", type=int, default=200, help="ack: /imagine commands sent at once")
    parser.add_argument("--ack-runs", type=int, default=3, help="ack: bursts, each to a freshly started bot")
    parser.add_argument(
        "--ack-cold", action="store_true", help="ack: no warm-up command before the burst (the first after start)"
    )
    parser.add_argument("--jobs", type=int, default=100, help="webhook, polling: jobs, sent at --rate")
    parser.add_argument("--rate", type=float, default=20.0, help="webhook, polling: commands per second")
    parser.add_argument("--burst", type=int, default=100, help="webhook: jobs finishing at once (throughput)")
    parser.add_argument("--job-time", type=float, default=2.0, help="webhook: seconds ModelsLab takes per job")
    parser.add_argument("--eta", type=float, default=2.0, help="polling: the ETA ModelsLab announces, in seconds")
    parser.add_argument(
        "--api-latency", type=float, default=0.0, help="seconds ModelsLab holds every submit and fetch call (Hang)"
    )
    parser.add_argument("--stall-runs", type=int, default=3, help="stall: posts of 4 x 1024x1024 images")
    parser.add_argument(
        "--reencode-runs", type=int, default=1, help="stall: posts of 4 incompressible 1024x1024 images (re-encoded)"
    )
    parser.add_argument("--pending", type=int, default=1000, help="memory: jobs left pending")
    parser.add_argument("--pending-rate", type=float, default=100.0, help="memory: commands per second")
    parser.add_argument("--max-queued", type=int, default=5, help="memory: MODELSLAB_MAX_QUEUED (jobs at ModelsLab)")
    parser.add_argument("--members", type=int, default=10, help="members the commands come from (round robin)")
    parser.add_argument(
        "--images", choices=("photo", "noise", "solid"), default="photo", help="what ModelsLab's result images are like"
    )
    parser.add_argument("--log-level", default="INFO", help="the bot's LOG_LEVEL")
    parser.add_argument("--asyncio-debug", action="store_true", help="asyncio debug mode in the bot; slow callbacks")
    parser.add_argument("--slow-callback", type=float, default=0.05, help="with --asyncio-debug: seconds")
    parser.add_argument("--profile", action="store_true", help="cProfile the bot's event loop (files kept)")
    parser.add_argument(
        "--event-loop",
        choices=("bot", "asyncio"),
        default="bot",
        help="the bot's own choice (uvloop where installed), or asyncio's loop (not for the memory scenario)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the bot's logs and databases")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    options = parser.parse_args(argv)
    modes = {m.strip() for m in options.modes.split(",") if m.strip()}
    unknown = modes - set(MODES)
    if unknown:
        parser.error(f"unknown mode(s): {', '.join(sorted(unknown))}")
    options.mode_set = modes
    return options


async def run(options: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    MONITOR.start()
    modes: set[str] = options.mode_set
    steps: list[tuple[str, Callable[[], Awaitable[None]]]] = []
    if "ack" in modes:
        steps.append(("ack", lambda: scenario_ack(options, workdir, report)))
    if modes & {"webhook", "stall"}:
        steps.append(("webhook/stall", lambda: scenario_webhook_and_stall(options, workdir, report, modes)))
    if "polling" in modes:
        steps.append(("polling", lambda: scenario_polling(options, workdir, report)))
    if "memory" in modes:
        steps.append(("memory", lambda: scenario_memory(options, workdir, report)))
    for name, step in steps:
        began = time.monotonic()
        report.section = ""
        overflows = listen_overflows()
        opened = len(OPENED)
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            await step()
        except (TimeoutError, RuntimeError) as exc:
            report.add(f"{name}: did not finish", str(exc).splitlines()[0][:100], "", False)
        overflows = listen_overflows() - overflows
        if overflows:
            report.note(
                f"{name}: {overflows} TCP connection(s) dropped by a full listen queue (system-wide count) meanwhile; "
                "each waits 1 s for its SYN to be sent again. The fake Discord listens with a backlog of "
                f"{LISTEN_BACKLOG}; the bot's webhook receiver with aiohttp's default, 128."
            )
        print(f"  {name} took {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
        # What the fake Discord (its default rate limits on) recorded in this scenario, per /imagine.
        budget = DiscordBudget.measure((f.discord, f.interactions.values()) for f in OPENED[opened:])
        check = EditCheck()
        for fakes in OPENED[opened:]:
            one = EditCheck.measure(fakes.discord, fakes.interactions.values())
            check.edits, check.identical, check.too_close = (
                check.edits + one.edits,
                check.identical + one.identical,
                check.too_close + one.too_close,
            )
        report.notes.extend(f"{name}: {line}" for line in budget.lines())
        per_job = budget.per_job.get("all", [])
        mean = sum(per_job) / len(per_job) if per_job else math.nan
        report.notes.append(
            f"{name}: {mean:.2f} Discord requests per job on average; {check.edits} edits of status messages, "
            f"{check.identical} identical to what the message showed, {check.too_close} progress edits less than "
            f"{PROGRESS_MIN_INTERVAL:g} s after the previous edit of their message"
        )
        report.data.setdefault("discord", {})[name] = budget.as_dict() | {"mean_per_job": mean} | check.__dict__
    await MONITOR.stop()
    budget_rows(report)
    return report


def budget_rows(report: Report) -> None:
    """Section 6: Discord's budget, over the scenarios that ran."""
    spent: dict[str, dict[str, Any]] = report.data.get("discord", {})
    if not spent:
        return
    report.section = "6"
    happy = [spent[name] for name in HAPPY_PATH_SCENARIOS if name in spent and spent[name]["jobs"]]
    if happy:
        worst = max(data["requests_per_job"]["all"]["max"] for data in happy)
        report.add(
            "6. Discord requests per job, no wait in the bot's line (2a, 2b, 3, 5): max",
            f"{worst}",
            f"<= {HAPPY_PATH_REQUESTS}",
            worst <= HAPPY_PATH_REQUESTS,
        )
    for name, label, target in (("ack", "200 at once", None), ("memory", "1000 pending", PENDING_MEAN_REQUESTS)):
        data = spent.get(name)
        if data is None or not data["jobs"]:
            continue
        spread = data["requests_per_job"]["all"]
        result = f"{data['mean_per_job']:.2f} (p50 {spread['p50']:g} / p99 {spread['p99']:g} / max {spread['max']})"
        passed = data["mean_per_job"] <= target if target is not None else None
        report.add(f"    ...{label}: mean", result, f"<= {target:g}" if target is not None else "", passed)
    identical = sum(data["identical"] for data in spent.values())
    report.add("    ...edits identical to what the message showed", str(identical), "0", identical == 0)
    close = sum(data["too_close"] for data in spent.values())
    report.add(f"    ...progress edits of one message within {PROGRESS_MIN_INTERVAL:g} s", str(close), "0", close == 0)
    unasked = {name: data["unasked_rate_limited"] for name, data in spent.items()}
    report.add(
        "    ...429s received, by scenario",
        ", ".join(f"{name} {n}" for name, n in unasked.items()),
        "0 each",
        not any(unasked.values()),
    )
    invalid = max(data["worst_invalid_window"] for data in spent.values())
    limit = max(data["invalid_limit"] for data in spent.values())
    report.add(
        "    ...invalid requests in the worst 10 minutes (worst scenario)",
        f"{invalid} ({100 * invalid / limit:.2f}% of {limit})",
        f"<= {INVALID_SHARE_TARGET:.0%}",
        invalid <= INVALID_SHARE_TARGET * limit,
    )


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        report = asyncio.run(run(options, workdir))
    finally:
        if options.keep or options.profile:
            print(f"logs, databases and profiles kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(report)
    print(
        f"(whole run: {time.monotonic() - began:.0f} s on {os.cpu_count()} CPU(s); 1-minute load average "
        f"{load_before:.2f} before, {os.getloadavg()[0]:.2f} after: other processes compete for the same CPUs)"
    )
    if options.json:
        report.data["rows"] = [r.__dict__ | {"verdict": r.verdict} for r in report.rows]
        Path(options.json).write_text(json.dumps(report.data, indent=2, default=str), encoding="utf-8")
    return 0 if all(r.passed is not False for r in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
