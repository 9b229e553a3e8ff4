"""Small pure rules: poll timing, failure sentences, webhook tokens, log redaction, image checks."""

from __future__ import annotations

import base64
import io
import itertools
import logging

import pytest
from PIL import Image

from bot.discord.markup import timestamp
from bot.discord.texts import failure_sentence
from bot.images.processing import NotAnImage, fit_to_limit, read_image
from bot.jobs.waiting import poll_delays
from bot.log import MAX_RUNTIME_SECRETS, SecretFilter, register_secret
from bot.modelslab.client import ErrorKind
from bot.web.signing import WebhookSigner


def png(width=64, height=32, colour=(200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_first_poll_follows_the_eta_then_backs_off_to_ten_seconds():
    delays = list(itertools.islice(poll_delays(4.0), 10))
    assert delays[0] == 4.0
    assert delays[1:4] == [1.5, 2.25, 3.375]
    assert max(delays) == 10.0 and delays[-1] == 10.0
    assert all(b >= a for a, b in itertools.pairwise(delays[1:]))


def test_first_poll_without_eta_and_with_a_huge_eta():
    assert next(poll_delays(None)) == 1.5
    assert next(poll_delays(3600)) == 120.0  # never trust an ETA blindly for long
    assert next(poll_delays(-30)) == 0.5  # overdue (resumed after a restart): look soon


@pytest.mark.parametrize(
    ("kind", "words"),
    [
        (ErrorKind.INVALID_KEY, "invalid key"),
        (ErrorKind.NO_CREDITS, "out of credits"),
        (ErrorKind.QUEUE_FULL, "try again in 45 s"),
        (ErrorKind.MODEL_NOT_FOUND, "no model called `nope`"),
        (ErrorKind.PROMPT_REFUSED, "refused this prompt (NSFW)"),
        (ErrorKind.SERVICE_DOWN, "service down"),
        (ErrorKind.TIMED_OUT, "within 10 minutes"),
    ],
)
def test_failure_sentences_say_what_happened_and_what_to_do(kind, words):
    sentence = failure_sentence(kind, "NSFW", model_id="nope", retry_after=44.2, timeout=600)
    assert words in sentence
    assert "Traceback" not in sentence and sentence.count("\n") == 0


def test_relative_timestamp_is_discords_format():
    assert timestamp(1700000000.2) == "<t:1700000001:R>"


def test_webhook_tokens_are_per_job_and_verified_in_constant_time():
    signer = WebhookSigner(b"k" * 32)
    job_a, job_b = "a" * 32, "b" * 32
    token = signer.token_for(job_a)
    assert token != job_a and len(token) >= 40
    assert signer.verify(job_a, token)
    assert not signer.verify(job_b, token)
    assert not WebhookSigner(b"z" * 32).verify(job_a, token)
    assert (
        signer.webhook_url("https://bot.example/", job_a) == f"https://bot.example/webhooks/modelslab/{job_a}/{token}"
    )


def test_log_filter_masks_secrets_and_tokens_in_urls_and_tracebacks():
    secret_filter = SecretFilter(["sk-modelslab-123456", "bot.token.value"])
    record = logging.LogRecord(
        "x", logging.INFO, __file__, 1, "key %s token %s url %s", ("sk-modelslab-123456", "bot.token.value", ""), None
    )
    record.args = (
        "sk-modelslab-123456",
        "bot.token.value",
        "/webhooks/modelslab/" + "c" * 32 + "/SECRETTOKEN and /webhooks/123/interaction-token",
    )
    try:
        raise RuntimeError("failed with sk-modelslab-123456")
    except RuntimeError:
        import sys

        record.exc_info = sys.exc_info()
    secret_filter.filter(record)
    text = record.getMessage()
    for secret in ("sk-modelslab-123456", "bot.token.value", "SECRETTOKEN", "interaction-token"):
        assert secret not in text
    assert text.count("[redacted]") >= 5


def test_read_image_accepts_png_and_base64_text_and_refuses_html():
    info = read_image(png(64, 32))
    assert (info.format, info.width, info.height) == ("PNG", 64, 32)
    encoded = b"data:image/png;base64," + base64.b64encode(png(8, 8))
    assert read_image(encoded).width == 8
    with pytest.raises(NotAnImage):
        read_image(b"<html>not ready</html>")
    with pytest.raises(NotAnImage):
        read_image(png()[:40])  # truncated


def test_fit_to_limit_reencodes_until_the_images_fit():
    noisy = Image.effect_noise((512, 512), 100).convert("RGB")
    buffer = io.BytesIO()
    noisy.save(buffer, format="PNG")
    big = read_image(buffer.getvalue())
    images = [big, big]
    limit = len(big.data)  # two of them do not fit
    fitted = fit_to_limit(images, limit)
    assert sum(len(i.data) for i in fitted) <= limit
    assert all(read_image(i.data).format == "WEBP" for i in fitted)
    assert fit_to_limit(images, 10 * limit) == images


def test_the_secrets_learnt_while_running_are_bounded_oldest_dropped_first():
    """20,000 keys would make every log line pay 20,000 replace() calls: the set stays bounded."""
    keys = [f"ml-key-{n:06d}-abcdef" for n in range(20_000)]
    for key in keys:
        register_secret(key)
    cleaned = SecretFilter().clean(" ".join(keys[-MAX_RUNTIME_SECRETS:]))
    assert set(cleaned.split()) == {"[redacted]"}  # the most recent ones are all masked
    assert SecretFilter().clean(keys[0]) == keys[0]  # the oldest was let go
    register_secret(keys[-MAX_RUNTIME_SECRETS])  # registered again: now the most recent, kept longest
    for key in keys[: MAX_RUNTIME_SECRETS - 1]:
        register_secret(key)
    assert SecretFilter().clean(keys[-MAX_RUNTIME_SECRETS]) == "[redacted]"
