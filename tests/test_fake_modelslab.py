"""Tests of the fake ModelsLab server itself, with plain aiohttp client calls over 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from PIL import Image

from tests.fakes.modelslab_server import (
    DEFAULT_KEY,
    DEFAULT_MODELS,
    ErrorAnswer,
    FakeModelsLab,
    Hang,
    Immediate,
    Queued,
    RawAnswer,
    Reset,
    colour_for,
    render_image,
    running_fake_modelslab,
)

KEY = DEFAULT_KEY
OTHER_KEY = "ml-other-key"
BROKE_KEY = "ml-broke-key"

T2I = {"v6": "/api/v6/images/text2img", "enterprise": "/api/v1/enterprise/text2img"}
I2I = {"v6": "/api/v6/images/img2img", "enterprise": "/api/v1/enterprise/img2img"}
SUPER_RES = {"v6": "/api/v6/image_editing/super_resolution", "enterprise": "/api/v1/enterprise/super_resolution"}


# ---------------------------------------------------------------------------------- helpers


class WebhookReceiver:
    """A tiny aiohttp app that records the webhooks it gets and answers with ``status``."""

    def __init__(self) -> None:
        self.status = 200
        self.received: list[tuple[float, str, Any]] = []  # (monotonic, path_qs, json body)
        self._runner: web.AppRunner | None = None
        self.base = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.received.append((time.monotonic(), request.path_qs, await request.json()))
        return web.Response(status=self.status, text="ok")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.base = f"http://127.0.0.1:{self._runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, token: str = "secret-token") -> str:
        return f"{self.base}/hook?token={token}"


@pytest.fixture
async def fake() -> AsyncIterator[FakeModelsLab]:
    async with running_fake_modelslab(valid_keys=(KEY, OTHER_KEY), broke_keys=(BROKE_KEY,)) as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def receiver() -> AsyncIterator[WebhookReceiver]:
    hook = WebhookReceiver()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.stop()


def t2i(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "key": KEY,
        "model_id": "sdxl",
        "prompt": "a red fox in the snow",
        "negative_prompt": "blurry",
        "width": "512",
        "height": "512",
        "samples": "1",
        "num_inference_steps": "20",
        "guidance_scale": 7.5,
        "scheduler": "UniPCMultistepScheduler",
        "safety_checker": "no",
        "seed": None,
        "webhook": None,
        "track_id": None,
    }
    body.update(overrides)
    return body


async def post(http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any) -> tuple[int, Any]:
    async with http.post(url, json=body, **kwargs) as resp:
        text = await resp.text()
    try:
        return resp.status, json.loads(text)
    except ValueError:
        return resp.status, text


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.read(), resp.content_type


async def submit(
    http: aiohttp.ClientSession, fake: FakeModelsLab, path: str = T2I["v6"], **overrides: Any
) -> dict[str, Any]:
    status, body = await post(http, fake.base_url + path, t2i(**overrides))
    assert status == 200, body
    assert isinstance(body, dict)
    return body


def open_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


# ---------------------------------------------------------------------------------- immediate


async def test_immediate_success_has_documented_shape_and_real_images(fake: FakeModelsLab, http) -> None:
    body = await submit(http, fake, width="256", height="128", samples="2")

    assert body["status"] == "success"
    assert isinstance(body["id"], int)
    assert isinstance(body["generationTime"], float)
    assert body["nsfw_content_detected"] is False
    assert body["webhook_status"] == ""
    assert body["tip"]
    meta = body["meta"]
    assert (meta["W"], meta["H"], meta["n_samples"], meta["prompt"]) == (256, 128, 2, "a red fox in the snow")
    assert meta["model_id"] == "sdxl" and meta["steps"] == 20 and meta["guidance_scale"] == 7.5
    assert isinstance(meta["seed"], int)
    outputs = body["output"]
    assert len(outputs) == 2 and all(url.startswith(fake.base_url + "/generations/") for url in outputs)
    assert [url.replace("/cdn/", "/") for url in body["proxy_links"]] == outputs
    assert fake.outputs_of(body["id"]) == outputs
    assert fake.submissions()[0].job_id == str(body["id"])

    colours = []
    for index, url in enumerate(outputs):
        status, data, content_type = await get(http, url)
        assert (status, content_type) == (200, "image/png")
        assert data == fake.image_bytes(url)
        image = open_image(data)
        assert (image.format, image.size) == ("PNG", (256, 128))
        assert image.convert("RGB").getpixel((10, 10)) == colour_for(meta["seed"], index)
        colours.append(colour_for(meta["seed"], index))
    assert colours[0] != colours[1]
    proxy_status, proxy_data, _ = await get(http, body["proxy_links"][1])
    assert (proxy_status, proxy_data) == (200, fake.image_bytes(outputs[1]))


async def test_seed_is_echoed_and_random_when_null(fake: FakeModelsLab, http) -> None:
    fixed = await submit(http, fake, seed=1234)
    assert fixed["meta"]["seed"] == 1234
    assert open_image(fake.image_bytes(fixed["output"][0])).getpixel((0, 0)) == colour_for(1234, 0)
    as_string = await submit(http, fake, seed="1234")
    assert as_string["meta"]["seed"] == 1234
    assert fake.image_bytes(as_string["output"][0]) == fake.image_bytes(fixed["output"][0])

    randoms = {(await submit(http, fake))["meta"]["seed"] for _ in range(3)}
    assert len(randoms) == 3


@pytest.mark.parametrize(
    ("behaviour", "check"),
    [
        (Immediate(id_as="str"), lambda b: isinstance(b["id"], str) and b["id"].isdigit()),
        (Immediate(id_as="uuid"), lambda b: isinstance(b["id"], str) and not b["id"].isdigit()),
        (Immediate(proxy_links="dict"), lambda b: list(b["proxy_links"]) == ["0"] and "/cdn/" in b["proxy_links"]["0"]),
        (Immediate(proxy_links="str"), lambda b: isinstance(b["proxy_links"], str)),
        (Immediate(proxy_links="absent"), lambda b: "proxy_links" not in b),
        (Immediate(with_meta=False), lambda b: "meta" not in b),
        (Immediate(tip=None), lambda b: "tip" not in b),
        (
            Immediate(extra_fields={"tip": "Upgrade now!", "instant": 1}),
            lambda b: (b["tip"], b["instant"]) == ("Upgrade now!", 1),
        ),
        (Immediate(generation_time=0.5), lambda b: b["generationTime"] == 0.5),
    ],
)
async def test_immediate_variants(fake: FakeModelsLab, http, behaviour: Immediate, check) -> None:
    fake.script(behaviour)
    body = await submit(http, fake)
    assert body["status"] == "success"
    assert check(body), body
    assert fake.outputs_of(body["id"]) == body["output"]


@pytest.mark.parametrize(
    ("ext", "pil_format", "content_type"), [("jpg", "JPEG", "image/jpeg"), ("webp", "WEBP", "image/webp")]
)
async def test_immediate_output_formats(fake: FakeModelsLab, http, ext, pil_format, content_type) -> None:
    fake.script(Immediate(output_ext=ext))
    body = await submit(http, fake, width="320", height="240")
    url = body["output"][0]
    assert url.endswith("." + ext)
    status, data, served_type = await get(http, url)
    assert (status, served_type) == (200, content_type)
    image = open_image(data)
    assert (image.format, image.size) == (pil_format, (320, 240))


async def test_nsfw_answer_flags_it_and_blanks_the_image(fake: FakeModelsLab, http) -> None:
    fake.script(Immediate(nsfw=True))
    body = await submit(http, fake)
    assert body["nsfw_content_detected"] is True
    assert open_image(fake.image_bytes(body["output"][0])).convert("RGB").getpixel((5, 5)) == (0, 0, 0)


async def test_enterprise_text2img_and_upscale(fake: FakeModelsLab, http) -> None:
    body = await submit(http, fake, T2I["enterprise"], num_inference_steps=None, width=256, height=256, upscale="yes")
    assert body["status"] == "success"
    assert body["meta"]["steps"] == 21
    assert open_image(fake.image_bytes(body["output"][0])).size == (512, 512)
    flux = await submit(http, fake, model_id="flux", width=256, height=256, upscale="yes")
    assert open_image(fake.image_bytes(flux["output"][0])).size == (256, 256)


# ---------------------------------------------------------------------------------- queued


async def test_queued_full_form_until_complete(fake: FakeModelsLab, http) -> None:
    fake.script(Queued())
    body = await submit(http, fake)
    job_id = body["id"]

    assert body["status"] == "processing"
    assert body["eta"] == 2.75
    assert body["messege"] and body["tip"] and body["tip_1"]
    assert body["fetch_result"] == f"{fake.base_url}/api/v6/images/fetch/{job_id}"
    assert body["output"] == []
    assert body["meta"]["id"] == str(job_id)
    future = body["future_links"]
    assert future == fake.outputs_of(job_id)
    assert (await get(http, future[0]))[0] == 404
    assert fake.queued(KEY) == 1

    status, waiting = await post(http, body["fetch_result"], {"key": KEY})
    assert (status, waiting) == (200, {"status": "processing", "messege": "try again later.", "output": ""})

    fake.complete(job_id)
    assert fake.queued(KEY) == 0
    status, done = await post(http, body["fetch_result"], {"key": KEY})
    assert (status, done) == (200, {"status": "success", "id": job_id, "output": future})
    status, data, _ = await get(http, future[0])
    assert status == 200 and data == fake.image_bytes(future[0])
    fake.complete(job_id)  # finishing a finished job does nothing
    with pytest.raises(KeyError):
        fake.complete("no-such-job")


def fetch_call(flavour: str, style: str, job_id: Any) -> tuple[str, dict[str, Any]]:
    if flavour == "v6":
        path = f"/api/v6/images/fetch/{job_id}" if style == "path" else "/api/v6/images/fetch"
    else:
        path = f"/api/v1/enterprise/images/fetch/{job_id}" if style == "path" else "/api/v1/enterprise/fetch"
    body: dict[str, Any] = {"key": KEY} if style == "path" else {"key": KEY, "request_id": job_id}
    return path, body


@pytest.mark.parametrize("flavour", ["v6", "enterprise"])
@pytest.mark.parametrize("style", ["path", "body"])
async def test_every_fetch_path_ready_after_fetches(fake: FakeModelsLab, http, flavour: str, style: str) -> None:
    fake.script(Queued(ready_after_fetches=2))
    body = await submit(http, fake, T2I[flavour])
    job_id = body["id"]
    expected_fetch = "/api/v1/enterprise/images/fetch/" if flavour == "enterprise" else "/api/v6/images/fetch/"
    assert body["fetch_result"] == f"{fake.base_url}{expected_fetch}{job_id}"

    path, fetch_body = fetch_call(flavour, style, job_id)
    answers = [(await post(http, fake.base_url + path, fetch_body))[1] for _ in range(3)]
    assert [a["status"] for a in answers] == ["processing", "processing", "success"]
    assert answers[2]["output"] == body["future_links"]
    assert len(fake.fetches(job_id)) == 3


async def test_fetch_refuses_other_flavour_other_key_and_unknown_ids(fake: FakeModelsLab, http) -> None:
    fake.script(Queued())
    job_id = (await submit(http, fake))["id"]
    not_found = {"status": "error", "messege": "Request not found"}
    assert await post(http, f"{fake.base_url}/api/v1/enterprise/images/fetch/{job_id}", {"key": KEY}) == (
        200,
        not_found,
    )
    assert await post(http, f"{fake.base_url}/api/v6/images/fetch/{job_id}", {"key": OTHER_KEY}) == (200, not_found)
    assert await post(http, f"{fake.base_url}/api/v6/images/fetch/999", {"key": KEY}) == (200, not_found)
    status, missing = await post(http, f"{fake.base_url}/api/v6/images/fetch", {"key": KEY})
    assert (status, missing["messege"]) == (200, {"request_id": ["The request id field is required."]})
    assert await post(http, f"{fake.base_url}/api/v6/images/fetch/{job_id}", {"key": "nope"}) == (
        401,
        {"status": "error", "message": "Invalid API key"},
    )
    fake.error_codes = "modern"
    assert (await post(http, f"{fake.base_url}/api/v6/images/fetch/999", {"key": KEY}))[0] == 404


async def test_queued_slim_form_with_string_id(fake: FakeModelsLab, http) -> None:
    fake.script(Queued(form="slim", id_as="str", eta=10))
    body = await submit(http, fake)
    assert body == {"status": "processing", "id": body["id"], "eta": 10, "message": "Your request is being processed"}
    assert isinstance(body["id"], str)
    fake.complete(body["id"])
    _, done = await post(http, f"{fake.base_url}/api/v6/images/fetch", {"key": KEY, "request_id": body["id"]})
    assert done["status"] == "success" and done["id"] == body["id"]


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (Queued(outcome="failed"), {"status": "failed", "id": "", "message": "Failed, Try Again", "output": ""}),
        (Queued(outcome="error", failure_message="GPU fell over"), {"status": "error", "messege": "GPU fell over"}),
    ],
)
async def test_queued_failures(fake: FakeModelsLab, http, behaviour: Queued, expected) -> None:
    fake.script(behaviour)
    body = await submit(http, fake)
    fake.complete(body["id"])
    assert await post(http, body["fetch_result"], {"key": KEY}) == (200, expected)
    assert (await get(http, body["future_links"][0]))[0] == 404
    assert fake.queued(KEY) == 0


async def test_fetch_waiting_variants_and_fetch_meta(fake: FakeModelsLab, http) -> None:
    fake.script(
        Queued(
            ready_after_fetches=1, fetch_status_while_waiting="pending", output_when_waiting=[], fetch_with_meta=True
        )
    )
    body = await submit(http, fake, seed=99)
    _, waiting = await post(http, body["fetch_result"], {"key": KEY})
    assert waiting == {"status": "pending", "messege": "try again later.", "output": []}
    _, done = await post(http, body["fetch_result"], {"key": KEY})
    assert done["status"] == "success" and done["generationTime"] == 2.92 and done["meta"]["seed"] == 99


async def test_ready_after_fetches_zero_is_ready_at_first_fetch(fake: FakeModelsLab, http) -> None:
    fake.script(Queued(ready_after_fetches=0))
    body = await submit(http, fake)
    assert body["status"] == "processing"
    assert (await post(http, body["fetch_result"], {"key": KEY}))[1]["status"] == "success"


async def test_ready_after_seconds_finishes_by_itself(fake: FakeModelsLab, http, receiver: WebhookReceiver) -> None:
    fake.script(Queued(ready_after_seconds=0.15))
    started = time.monotonic()
    body = await submit(http, fake, webhook=receiver.url(), track_id="t-1")
    delivery = await fake.wait_for_webhook_delivery(timeout=5)
    assert delivery.at - started >= 0.15
    assert delivery.body["status"] == "success"
    assert (await post(http, body["fetch_result"], {"key": KEY}))[1]["status"] == "success"


async def test_complete_all_and_default_behaviour(fake: FakeModelsLab, http) -> None:
    fake.default_behaviour = Queued(form="slim")
    ids = [(await submit(http, fake, seed=i))["id"] for i in range(3)]
    assert fake.queued(KEY) == 3 and fake.peak_queued[KEY] == 3
    fake.complete_all()
    assert fake.queued(KEY) == 0
    assert all(fake.jobs[str(i)].state == "success" for i in ids)
    fake.default_behaviour = ErrorAnswer(http_status=503, message="Service Unavailable")
    assert await post(http, fake.base_url + T2I["v6"], t2i()) == (
        503,
        {"status": "error", "message": "Service Unavailable"},
    )


# ---------------------------------------------------------------------------------- key, model, validation


async def test_key_errors(fake: FakeModelsLab, http) -> None:
    fake.script(Queued())
    invalid = (401, {"status": "error", "message": "Invalid API key"})
    assert await post(http, fake.base_url + T2I["v6"], t2i(key="wrong")) == invalid
    assert await post(http, fake.base_url + T2I["enterprise"], {"model_id": "sdxl", "prompt": "x"}) == invalid
    status, broke = await post(http, fake.base_url + T2I["v6"], t2i(key=BROKE_KEY))
    assert status == 402 and broke["status"] == "error" and broke["message"].startswith("Insufficient credits")
    status, models = await post(http, fake.base_url + "/api/v4/dreambooth/model_list", {"key": BROKE_KEY})
    assert status == 200 and isinstance(models, list)
    # refused submissions left the scripted job for the next accepted one
    assert fake.pending_script == (Queued(),)
    assert (await submit(http, fake))["status"] == "processing"


async def test_model_not_found_legacy_and_modern(fake: FakeModelsLab, http) -> None:
    not_found = {"status": "error", "message": "Model not found"}
    assert await post(http, fake.base_url + T2I["v6"], t2i(model_id="no-such-model")) == (200, not_found)
    fake.error_codes = "modern"
    assert await post(http, fake.base_url + I2I["enterprise"], t2i(model_id="nope", init_image="x")) == (404, not_found)
    fake.known_models.append("my-lora-model")
    assert (await submit(http, fake, model_id="my-lora-model"))["status"] == "success"


async def test_validation_errors_are_field_lists_under_messege(fake: FakeModelsLab, http) -> None:
    status, body = await post(
        http, fake.base_url + T2I["v6"], t2i(width="abc", height=2048, samples="5", prompt="", scheduler="Fast")
    )
    assert status == 200
    assert body == {
        "status": "error",
        "messege": {
            "prompt": ["The prompt field is required."],
            "width": ["The width must be a number."],
            "height": ["The height may not be greater than 1024."],
            "samples": ["The samples may not be greater than 4."],
            "scheduler": ["The selected scheduler is invalid."],
        },
    }
    fake.error_codes = "modern"
    status, body = await post(http, fake.base_url + I2I["v6"], t2i())
    assert (status, body["messege"]) == (400, {"init_image": ["The init image field is required."]})


# ---------------------------------------------------------------------------------- limits


async def test_max_queued_answers_429_and_keeps_the_script() -> None:
    async with running_fake_modelslab(max_queued=2) as fake, aiohttp.ClientSession() as http:
        fake.script(Queued(), Queued(), Queued(form="slim"))
        first = await submit(http, fake)
        await submit(http, fake)
        assert await post(http, fake.base_url + T2I["v6"], t2i()) == (
            429,
            {
                "status": "error",
                "message": "Rate limit exceeded. Maximum 2 queued requests allowed.",
                "retry_after": 30,
            },
        )
        status, _ = await post(http, fake.base_url + SUPER_RES["v6"], {"key": KEY, "init_image": "x", "scale": 2})
        assert status == 429  # all endpoints together
        assert fake.pending_script == (Queued(form="slim"),)
        fake.complete(first["id"])
        third = await submit(http, fake)
        assert set(third) == {"status", "id", "eta", "message"}
        assert fake.peak_queued[KEY] == 2 and fake.limit_violations == 0


async def test_max_queued_only_recorded_when_not_enforced() -> None:
    async with running_fake_modelslab(max_queued=1, enforce_max_queued=False) as fake, aiohttp.ClientSession() as http:
        fake.default_behaviour = Queued()
        for _ in range(3):
            assert (await submit(http, fake))["status"] == "processing"
        assert fake.peak_queued[KEY] == 3
        assert fake.limit_violations == 2


async def test_spam_filter_refuses_identical_payloads() -> None:
    async with (
        running_fake_modelslab(valid_keys=(KEY, OTHER_KEY), spam_filter=True) as fake,
        aiohttp.ClientSession() as http,
    ):
        assert (await submit(http, fake, seed=7))["status"] == "success"
        status, body = await post(http, fake.base_url + T2I["v6"], t2i(seed=7, webhook="http://x/y", track_id="2"))
        assert status == 200 and body["status"] == "error"
        assert body["message"].startswith("Rate limit exceeded") and "spam filter" in body["message"]
        assert (await submit(http, fake, seed=8))["status"] == "success"
        assert (await submit(http, fake, seed=7, key=OTHER_KEY))["status"] == "success"
        fake.spam_window = 0
        assert (await submit(http, fake, seed=7))["status"] == "success"


async def test_spam_filter_ignores_refused_submissions() -> None:
    async with (
        running_fake_modelslab(spam_filter=True, max_queued=1, default_behaviour=Queued()) as fake,
        aiohttp.ClientSession() as http,
    ):
        first = await submit(http, fake, seed=1)
        assert (await post(http, fake.base_url + T2I["v6"], t2i(seed=2)))[0] == 429
        fake.complete(first["id"])
        assert (await submit(http, fake, seed=2))["status"] == "processing"  # the same retry is not spam
        assert fake.limit_violations == 0


# ---------------------------------------------------------------------------------- scripted faults


@pytest.mark.parametrize(
    ("behaviour", "expected"),
    [
        (
            ErrorAnswer(http_status=503, message="Service Unavailable"),
            (503, {"status": "error", "message": "Service Unavailable"}),
        ),
        (
            ErrorAnswer(message={"width": ["The width must be a number."]}, key="messege"),
            (200, {"status": "error", "messege": {"width": ["The width must be a number."]}}),
        ),
        (
            ErrorAnswer(
                http_status=429, message="Rate limit exceeded. Maximum 5 queued requests allowed.", retry_after=12
            ),
            (
                429,
                {
                    "status": "error",
                    "message": "Rate limit exceeded. Maximum 5 queued requests allowed.",
                    "retry_after": 12,
                },
            ),
        ),
        (
            ErrorAnswer(http_status=403, message="This feature is not available on your plan"),
            (403, {"status": "error", "message": "This feature is not available on your plan"}),
        ),
    ],
)
async def test_error_answers_are_used_once(fake: FakeModelsLab, http, behaviour: ErrorAnswer, expected) -> None:
    fake.script(behaviour)
    assert await post(http, fake.base_url + T2I["enterprise"], t2i()) == expected
    assert (await submit(http, fake))["status"] == "success"
    assert fake.jobs.keys() == {fake.submissions()[1].job_id}


async def test_raw_answers(fake: FakeModelsLab, http) -> None:
    fake.script(RawAnswer(), RawAnswer(200, '{"status": "succ', "application/json"))
    async with http.post(fake.base_url + T2I["v6"], json=t2i()) as resp:
        assert (resp.status, resp.content_type) == (502, "text/html")
        assert "502 Bad Gateway" in await resp.text()
    async with http.post(fake.base_url + T2I["v6"], json=t2i()) as resp:
        assert (resp.status, resp.content_type) == (200, "application/json")
        with pytest.raises(ValueError):
            await resp.json()


async def test_hang_outlasts_a_client_timeout_and_still_creates_the_job(fake: FakeModelsLab, http) -> None:
    fake.script(Hang(0.3))
    with pytest.raises(TimeoutError):
        await post(http, fake.base_url + T2I["v6"], t2i(), timeout=aiohttp.ClientTimeout(total=0.1))
    call = await fake.wait_for_submission(timeout=5)
    assert call.job_id is not None and fake.jobs[call.job_id].state == "success"
    assert fake.peak_queued[KEY] == 1


async def test_hang_then_answer_and_then_default_not_script(fake: FakeModelsLab, http) -> None:
    fake.script(Hang(0.05, then=ErrorAnswer(http_status=500, message="Internal Server Error")), Hang(0.01), Queued())
    started = time.monotonic()
    assert (await post(http, fake.base_url + T2I["v6"], t2i()))[0] == 500
    assert time.monotonic() - started >= 0.05
    assert (await submit(http, fake))["status"] == "success"  # the default, not the scripted Queued
    assert (await submit(http, fake))["status"] == "processing"


async def test_reset_closes_the_connection(fake: FakeModelsLab, http) -> None:
    fake.script(Reset())
    with pytest.raises(aiohttp.ClientError):
        await post(http, fake.base_url + T2I["v6"], t2i())
    call = fake.submissions()[0]
    assert call.aborted and call.status is None and call.job_id is None
    assert (await submit(http, fake))["status"] == "success"


async def test_stop_does_not_wait_for_a_hanging_answer(http) -> None:
    fake = FakeModelsLab()
    await fake.start()
    fake.script(Hang(30))
    request = asyncio.ensure_future(post(http, fake.base_url + T2I["v6"], t2i()))
    await fake.wait_for_request("text2img")
    started = time.monotonic()
    await fake.stop()
    assert time.monotonic() - started < 2
    with pytest.raises(aiohttp.ClientError):
        await request
    assert fake.jobs == {}


async def test_fetch_faults(fake: FakeModelsLab, http) -> None:
    fake.script(Queued(ready_after_fetches=1), Queued())
    body = await submit(http, fake)
    other = await submit(http, fake)
    fake.fail_fetches(2)
    fake.fail_fetches(1, ErrorAnswer(http_status=500, message="Internal Server Error"), job_id=other["id"])
    for _ in range(2):
        async with http.post(body["fetch_result"], json={"key": KEY}) as resp:
            assert (resp.status, resp.content_type) == (502, "text/html")
    assert (await post(http, other["fetch_result"], {"key": KEY}))[0] == 500
    assert (await post(http, other["fetch_result"], {"key": KEY}))[1]["status"] == "processing"
    # faulted fetches did not count: this is the first real one, still processing
    assert (await post(http, body["fetch_result"], {"key": KEY}))[1]["status"] == "processing"
    fake.fail_fetches(1, Reset())
    with pytest.raises(aiohttp.ClientError):
        await post(http, body["fetch_result"], {"key": KEY})
    fake.fail_fetches(1, Hang(0.05))
    assert (await post(http, body["fetch_result"], {"key": KEY}))[1]["status"] == "success"
    with pytest.raises(TypeError):
        fake.fail_fetches(1, Hang(1, then=Immediate()))


# ---------------------------------------------------------------------------------- webhooks


async def test_webhook_after_immediate_success(fake: FakeModelsLab, http, receiver: WebhookReceiver) -> None:
    body = await submit(http, fake, webhook=receiver.url("tok-1"), track_id="job-1")
    delivery = await fake.wait_for_webhook_delivery(timeout=5)
    assert delivery.status == 200 and delivery.error is None and delivery.attempt == 1
    assert delivery.body == {
        "status": "success",
        "id": body["id"],
        "output": body["output"],
        "generationTime": body["generationTime"],
        "track_id": "job-1",
        "meta": body["meta"],
    }
    assert receiver.received[0][1:] == ("/hook?token=tok-1", delivery.body)


async def test_webhook_for_queued_job_and_receiver_status(fake: FakeModelsLab, http, receiver: WebhookReceiver) -> None:
    receiver.status = 500
    fake.script(Queued(), Queued(outcome="failed", failure_message="model crashed", id_as="str"))
    ok = await submit(http, fake, webhook=receiver.url(), track_id=41)
    failed = await submit(http, fake, webhook=receiver.url(), track_id=42, seed=3)
    assert fake.webhook_deliveries == []
    fake.complete(ok["id"])
    first = await fake.wait_for_webhook_delivery(timeout=5)
    assert first.status == 500 and first.body["status"] == "success" and first.body["track_id"] == 41
    fake.complete(failed["id"])
    second = await fake.wait_for_webhook_delivery(lambda d: d.job_id == failed["id"], timeout=5)
    assert second.body == {
        "status": "failed",
        "id": failed["id"],
        "message": "Processing failed: model crashed",
        "track_id": 42,
    }


async def test_webhook_twice_and_never(fake: FakeModelsLab, http, receiver: WebhookReceiver) -> None:
    fake.script(Immediate(webhook="never"), Immediate(webhook="twice"))
    never = await submit(http, fake, webhook=receiver.url(), track_id="a")
    twice = await submit(http, fake, webhook=receiver.url(), track_id="b")
    await fake.wait_for_webhook_delivery(lambda d: d.attempt == 2, timeout=5)
    assert [d.job_id for d in fake.webhook_deliveries] == [str(twice["id"])] * 2
    assert fake.webhook_deliveries[0].body == fake.webhook_deliveries[1].body
    assert str(never["id"]) not in {d.job_id for d in fake.webhook_deliveries}


async def test_webhook_before_response(fake: FakeModelsLab, http, receiver: WebhookReceiver) -> None:
    fake.script(Immediate(webhook="before_response"), Queued(webhook="before_response"))
    body = await submit(http, fake, webhook=receiver.url(), track_id="early")
    answered = time.monotonic()
    assert len(fake.webhook_deliveries) == 1 and len(receiver.received) == 1
    assert receiver.received[0][0] < answered
    assert fake.webhook_deliveries[0].body["id"] == body["id"]

    queued = await submit(http, fake, webhook=receiver.url(), track_id="early-2")
    assert queued["status"] == "processing"
    assert fake.webhook_deliveries[1].body["status"] == "success"
    assert (await post(http, queued["fetch_result"], {"key": KEY}))[1]["status"] == "success"


async def test_webhook_delay_track_id_in_meta_and_unreachable(
    fake: FakeModelsLab, http, receiver: WebhookReceiver
) -> None:
    fake.script(Immediate(webhook_delay=0.2, track_id_in="meta"), Immediate())
    await submit(http, fake, webhook=receiver.url(), track_id="m-1")
    job = fake.jobs[fake.submissions()[0].job_id or ""]
    delivery = await fake.wait_for_webhook_delivery(timeout=5)
    # At least the delay (less a millisecond: uvloop's timers, TEST_EVENT_LOOP=uvloop, round to whole ms).
    assert job.finished_at is not None and delivery.at - job.finished_at >= 0.2 - 0.001
    assert "track_id" not in delivery.body and delivery.body["meta"]["track_id"] == "m-1"

    await submit(http, fake, webhook="http://127.0.0.1:1/hook", track_id="lost")
    lost = await fake.wait_for_webhook_delivery(lambda d: d.body.get("track_id") == "lost", timeout=5)
    assert lost.status is None and lost.error


# ---------------------------------------------------------------------------------- base64


async def test_base64_outputs(fake: FakeModelsLab, http) -> None:
    fake.script(Immediate(), Immediate(base64_prefix=True, base64_html_first=2))
    plain = await submit(http, fake, base64="yes", width=64, height=64)
    url = plain["output"][0]
    assert url.endswith(".base64")
    status, text, content_type = await get(http, url)
    assert (status, content_type) == (200, "text/plain")
    assert base64.b64decode(text) == fake.image_bytes(url)
    assert open_image(fake.image_bytes(url)).size == (64, 64)

    prefixed = await submit(http, fake, base64="yes", seed=5)
    url = prefixed["output"][0]
    for _ in range(2):
        status, page, content_type = await get(http, url)
        assert (status, content_type) == (200, "text/html") and page.startswith(b"<!DOCTYPE html>")
    status, text, _ = await get(http, url)
    header, _, payload = text.decode().partition(",")
    assert header == "data:image/png;base64"
    assert open_image(base64.b64decode(payload)).getpixel((0, 0)) == colour_for(5, 0)


# ---------------------------------------------------------------------------------- img2img and super resolution


async def test_img2img_takes_the_init_image_size(fake: FakeModelsLab, http) -> None:
    init_url = fake.host_image(render_image((300, 200), (1, 2, 3)))
    for flavour in ("v6", "enterprise"):
        body = await submit(http, fake, I2I[flavour], init_image=init_url, strength=0.5, width=512, height=512)
        assert body["meta"]["init_image"] == init_url and body["meta"]["strength"] == 0.5
        assert open_image(fake.image_bytes(body["output"][0])).size == (300, 200)

    data_uri = "data:image/png;base64," + base64.b64encode(render_image((64, 48), (9, 9, 9))).decode()
    body = await submit(http, fake, I2I["v6"], init_image=data_uri)
    assert open_image(fake.image_bytes(body["output"][0])).size == (64, 48)

    previous = (await submit(http, fake, width=128, height=96))["output"][0]
    body = await submit(http, fake, I2I["v6"], init_image=previous)
    assert open_image(fake.image_bytes(body["output"][0])).size == (128, 96)

    unreachable = await submit(http, fake, I2I["v6"], init_image="http://127.0.0.1:1/missing.png")
    assert open_image(fake.image_bytes(unreachable["output"][0])).size == (512, 512)


async def test_super_resolution_both_flavours(fake: FakeModelsLab, http) -> None:
    source = (await submit(http, fake, width=128, height=64, seed=11))["output"][0]
    status, body = await post(
        http, fake.base_url + SUPER_RES["v6"], {"key": KEY, "init_image": source, "scale": 2, "face_enhance": False}
    )
    assert status == 200 and body["status"] == "success"
    assert isinstance(body["output"], str)
    upscaled = open_image((await get(http, body["output"]))[1])
    assert upscaled.size == (256, 128)
    assert upscaled.convert("RGB").getpixel((200, 100)) == colour_for(11, 0)

    fake.script(Queued(ready_after_fetches=0))
    status, queued = await post(
        http,
        fake.base_url + SUPER_RES["enterprise"],
        {"key": KEY, "url": source, "scale": 3, "model_id": "RealESRGAN_x4plus"},
    )
    assert queued["fetch_result"].startswith(fake.base_url + "/api/v1/enterprise/images/fetch/")
    _, done = await post(http, queued["fetch_result"], {"key": KEY})
    assert open_image(fake.image_bytes(done["output"])).size == (384, 192)

    status, missing = await post(http, fake.base_url + SUPER_RES["enterprise"], {"key": KEY, "init_image": source})
    assert missing["messege"] == {"url": ["The url field is required."]}
    status, unknown = await post(
        http, fake.base_url + SUPER_RES["v6"], {"key": KEY, "init_image": source, "model_id": "x"}
    )
    assert unknown == {"status": "error", "message": "Model not found"}


# ---------------------------------------------------------------------------------- other endpoints


async def test_model_list_request_count_and_system_details(fake: FakeModelsLab, http) -> None:
    status, models = await post(http, fake.base_url + "/api/v4/dreambooth/model_list", {"key": KEY})
    assert status == 200 and [m["model_id"] for m in models] == list(DEFAULT_MODELS)
    for model in models:
        assert {"model_id", "model_name", "status", "description", "screenshots"} <= model.keys()
    assert (await get(http, models[0]["screenshots"]))[0] == 200
    assert (await post(http, fake.base_url + "/api/v4/dreambooth/model_list", {"key": "bad"}))[0] == 401

    fake.script(Queued())
    await submit(http, fake)
    count_url = fake.base_url + "/api/v6/processing/request_count"
    assert await post(http, count_url, {"key": KEY}) == (200, {"status": "success", "processing_count": 1})
    assert (await post(http, count_url, {"key": OTHER_KEY}))[1]["processing_count"] == 0
    fake.request_count_per_minute = 1
    status, limited = await post(http, count_url, {"key": KEY})
    assert status == 429 and limited["retry_after"] >= 1

    status, details = await post(http, fake.base_url + "/api/v1/enterprise/system_details", {"key": KEY})
    assert status == 200 and details["status"] == "ok" and details["model_count"] == len(DEFAULT_MODELS)
    assert "queue_time" in details


# ---------------------------------------------------------------------------------- recording


async def test_recording_and_waiting(fake: FakeModelsLab, http) -> None:
    fake.script(Queued())
    body = await submit(http, fake, track_id="track-a")
    await submit(http, fake, track_id="track-b")
    assert [c.json["track_id"] for c in fake.submissions("track-b")] == ["track-b"]
    assert fake.submissions()[0].response == body and fake.submissions()[0].status == 200

    mark = len(fake.requests)
    waiter = asyncio.ensure_future(fake.wait_for_request(r"/fetch/", lambda c: c.status == 200, since=mark, timeout=5))
    await post(http, body["fetch_result"], {"key": KEY})
    call = await waiter
    assert call.job_id == str(body["id"]) and call.response["status"] == "processing"
    assert fake.fetches(body["id"]) == [call]

    with pytest.raises(TimeoutError, match="no request matching"):
        await fake.wait_for_request("img2img", since=mark, timeout=0.05)

    assert (await post(http, fake.base_url + "/api/v6/images/nope", {"key": KEY}))[0] == 404
    assert (await get(http, fake.base_url + T2I["v6"]))[0] == 404
    assert [(c.method, c.path) for c in fake.unmatched] == [("POST", "/api/v6/images/nope"), ("GET", T2I["v6"])]
    assert fake.requests[0].at <= fake.requests[-1].at
