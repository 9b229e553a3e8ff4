"""Every answer variant of shared/docs/modelslab-api.md §2 reads into the right outcome."""

from __future__ import annotations

import json

import pytest

from bot.modelslab.client import ErrorKind, Failure, Finished, Pending, read_answer


def read(body, status=200, **kwargs):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return read_answer(status, raw, **kwargs)


def test_success_with_meta_and_proxy_links_list():
    answer = read(
        {
            "status": "success",
            "generationTime": 2.92,
            "id": 302455,
            "output": ["https://cdn.example/a-0.png"],
            "proxy_links": ["https://cdn.modelslab.com/a-0.png"],
            "nsfw_content_detected": False,
            "meta": {"seed": 1793745243, "W": 512, "H": 512},
            "tip": "buy more",
        }
    )
    assert answer == Finished(
        request_id="302455",
        output_urls=("https://cdn.example/a-0.png",),
        proxy_urls=("https://cdn.modelslab.com/a-0.png",),
        generation_time=2.92,
        meta={"seed": 1793745243, "W": 512, "H": 512},
    )
    assert answer.seed == 1793745243


@pytest.mark.parametrize(
    ("proxy_links", "expected"),
    [
        ({"1": "https://p/b.png", "0": "https://p/a.png"}, ("https://p/a.png", "https://p/b.png")),
        ("https://p/a.png", ("https://p/a.png",)),
        ("", ()),
        (None, ()),
    ],
)
def test_proxy_links_in_any_shape(proxy_links, expected):
    answer = read({"status": "success", "id": "1", "output": ["https://o/a.png"], "proxy_links": proxy_links})
    assert isinstance(answer, Finished)
    assert answer.proxy_urls == expected


def test_super_resolution_output_as_one_string():
    answer = read({"status": "success", "id": 3, "output": "https://o/up.png"})
    assert isinstance(answer, Finished) and answer.output_urls == ("https://o/up.png",)


def test_processing_full_form_keeps_eta_fetch_url_and_future_links():
    answer = read(
        {
            "status": "processing",
            "eta": 2.75,
            "messege": "Try to fetch request after seconds estimated",
            "fetch_result": "https://modelslab.com/api/v6/images/fetch/134701497",
            "id": 134701497,
            "output": [],
            "future_links": ["https://cdn/x-0.jpg"],
            "meta": {"id": "134701497", "seed": 5},
        }
    )
    assert answer == Pending(
        request_id="134701497",
        eta=2.75,
        fetch_url="https://modelslab.com/api/v6/images/fetch/134701497",
        future_links=("https://cdn/x-0.jpg",),
        meta={"id": "134701497", "seed": 5},
    )


def test_processing_slim_form_and_fetch_still_queued_with_empty_string_output():
    assert read({"status": "processing", "id": 12345678, "eta": 10, "message": "..."}) == Pending("12345678", eta=10)
    assert read({"status": "processing", "messege": "try again later.", "output": ""}) == Pending(None)


@pytest.mark.parametrize("status", ["pending", "queued", "PROCESSING", "something-new"])
def test_unknown_or_queued_statuses_keep_polling(status):
    assert isinstance(read({"status": status, "id": 1}), Pending)


def test_success_without_images_yet_keeps_waiting():
    assert isinstance(read({"status": "success", "id": 1, "output": []}), Pending)


@pytest.mark.parametrize(
    ("body", "status", "kind"),
    [
        ({"status": "error", "message": "Invalid API key"}, 200, ErrorKind.INVALID_KEY),
        ({"status": "error", "message": "Invalid API key"}, 401, ErrorKind.INVALID_KEY),
        ({"status": "error", "messege": "Insufficient credits, please recharge"}, 402, ErrorKind.NO_CREDITS),
        ({"status": "error", "message": "Your balance is too low"}, 200, ErrorKind.NO_CREDITS),
        ({"status": "error", "message": "Not allowed"}, 403, ErrorKind.NOT_ON_PLAN),
        ({"status": "error", "message": "Model not found"}, 200, ErrorKind.MODEL_NOT_FOUND),
        ({"status": "error", "message": "Unable to fetch image from provided URL"}, 200, ErrorKind.IMAGE_UNREACHABLE),
        ({"status": "error", "message": "NSFW prompt is not allowed"}, 200, ErrorKind.PROMPT_REFUSED),
        ({"status": "error", "message": "Internal server error"}, 500, ErrorKind.SERVICE_DOWN),
        ({"status": "error", "message": "Service unavailable"}, 503, ErrorKind.SERVICE_DOWN),
        ({"status": "error", "message": "Rate limit exceeded ... spam filter"}, 200, ErrorKind.QUEUE_FULL),
        ({"status": "error", "messege": {"width": ["The width must be a number."]}}, 400, ErrorKind.INVALID_REQUEST),
        (
            {"status": "failed", "id": "", "message": "Failed, Try Again", "output": ""},
            200,
            ErrorKind.GENERATION_FAILED,
        ),
    ],
)
def test_errors_are_sorted_into_what_the_member_is_told(body, status, kind):
    answer = read(body, status)
    assert isinstance(answer, Failure)
    assert answer.kind is kind


def test_queue_full_carries_retry_after():
    answer = read(
        {"status": "error", "message": "Rate limit exceeded. Maximum 5 queued requests allowed.", "retry_after": 30},
        429,
    )
    assert answer == Failure(ErrorKind.QUEUE_FULL, answer.detail, retry_after=30, http_status=429)
    too_many = read({"status": "error", "message": "Too many requests"}, 429)
    assert isinstance(too_many, Failure) and too_many.retry_after == 30


def test_validation_object_is_flattened_into_a_readable_detail():
    answer = read({"status": "error", "messege": {"width": ["The width must be a number."], "samples": ["max 4"]}})
    assert isinstance(answer, Failure)
    assert answer.detail == "width: The width must be a number.; samples: max 4"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"<html><body><h1>502 Bad Gateway</h1></body></html>", 502),
        (b'{"status": "succ', 200),
        (b"[1, 2]", 200),
        (b"", 503),
    ],
)
def test_non_json_and_odd_bodies_are_a_transient_service_error(body, status):
    answer = read(body, status)
    assert isinstance(answer, Failure) and answer.kind is ErrorKind.SERVICE_DOWN and answer.transient


def test_a_5xx_without_an_error_status_is_service_down():
    assert read({"detail": "oops"}, 500) == Failure(ErrorKind.SERVICE_DOWN, "HTTP 500", http_status=500)


def test_the_key_and_markup_never_survive_into_the_detail():
    answer = read(
        {"status": "error", "message": "Key sk-secret-123 is <b>invalid</b> @everyone `x`"}, api_key="sk-secret-123"
    )
    assert isinstance(answer, Failure)
    assert "sk-secret-123" not in answer.detail
    assert "<b>" not in answer.detail and "`" not in answer.detail and "@everyone" not in answer.detail


def test_non_http_fetch_result_is_ignored():
    answer = read({"status": "processing", "id": 1, "fetch_result": "file:///etc/passwd"})
    assert isinstance(answer, Pending) and answer.fetch_url is None


def test_a_null_message_falls_back_to_messege():
    answer = read({"status": "error", "message": None, "messege": "Invalid API key"})
    assert isinstance(answer, Failure) and answer.kind is ErrorKind.INVALID_KEY
    assert answer.detail == "Invalid API key"


def test_a_429_with_an_html_body_is_still_a_full_queue():
    answer = read(b"<html>Too Many Requests</html>", 429)
    assert isinstance(answer, Failure) and answer.kind is ErrorKind.QUEUE_FULL and answer.retry_after == 30
