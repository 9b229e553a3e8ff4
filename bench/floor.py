"""The floor under 2a: one job's exchanges in bare aiohttp, with no bot around them, paced and at once.

    python -m bench.floor [--jobs 100] [--rate 20] [--json]

A job of the webhook path is eight exchanges that Discord and ModelsLab dictate, whatever the bot is written in:
the command arrives on the gateway's websocket; the interaction callback (POST); the submission (POST); the status
edit (PATCH); ModelsLab's webhook arrives (a POST to us, answered); the confirming fetch (POST); the download of the
0.5 MB result; the result edit (PATCH, multipart with the image). This script does exactly those eight with
aiohttp on the bot's event loop (uvloop), against a server in a process of its own, with bodies the size of the
real ones and the benchmark's realistic 512x512 image. No database, no discord.py, no validation, no logging, no
decoding: the image's PNG signature is all that is checked. It reads its own CPU (`time.process_time()`, every
thread of this process, not the server's) per job, for the jobs sent at `--rate` a second (2a's pacing) and for the
same jobs with their commands at once.

What it tells: the CPU that pacing alone adds on this machine to a job's exchanges, before anything the bot does.
bench.run's 2a and its "commands at once" row are the same two measures for the whole bot, and bench.run runs this
script after them and prints its figures beside them (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/floor.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from bench.idle_gaps import MESSAGE  # noqa: E402
from bot.__main__ import new_event_loop  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JOB_TIME = 0.5  # seconds from the submission to ModelsLab's webhook (2a's --job-time is of this order)
IMAGE_SIZE = (512, 512)

USER = {"id": "200000000000000001", "username": "member", "global_name": "Member", "discriminator": "0",
        "avatar": "a" * 32, "public_flags": 0}  # fmt: skip


def interaction(number: int) -> dict[str, Any]:
    """An INTERACTION_CREATE dispatch of /imagine, shaped and sized as Discord sends it (about 1.5 kB)."""
    return {
        "op": 0,
        "t": "INTERACTION_CREATE",
        "s": number + 2,
        "d": {
            "id": str(300000000000000000 + number),
            "application_id": "100000000000000001",
            "type": 2,
            "token": "aW50ZXJhY3Rpb246" + "t" * 160 + str(number),
            "version": 1,
            "guild_id": "400000000000000001",
            "channel_id": "500000000000000001",
            "channel": {"id": "500000000000000001", "type": 0, "name": "images", "nsfw": False, "guild_id": "1"},
            "member": {"user": USER, "roles": ["600000000000000001"], "joined_at": "2026-01-01T00:00:00+00:00",
                       "nick": None, "permissions": "2248473465835073", "flags": 0, "deaf": False, "mute": False},
            "locale": "en-US",
            "guild_locale": "en-US",
            "app_permissions": "2248473465835073",
            "entitlements": [],
            "authorizing_integration_owners": {"0": "400000000000000001"},
            "context": 0,
            "data": {"id": "700000000000000001", "name": "imagine", "type": 1,
                     "options": [{"name": "prompt", "type": 3, "value": f"a lighthouse at dusk, oil {number}"}]},
        },
    }  # fmt: skip


def message(content: str, attachments: int) -> dict[str, Any]:
    """The message Discord returns for an edit: `bench.idle_gaps`'s, with the result's attachments."""
    return {
        **MESSAGE,
        "content": content,
        "attachments": [
            {"id": str(900000000000000000 + n), "filename": f"image_{n}.png", "size": 524288,
             "url": "https://cdn.discordapp.com/attachments/x/y/image.png", "proxy_url": "https://media/x.png",
             "width": 512, "height": 512, "content_type": "image/png"}
            for n in range(attachments)
        ],
        "edited_timestamp": "2026-12-01T00:00:01+00:00",
    }  # fmt: skip


# ------------------------------------------------------------------------------------------ the server


async def serve(port_file: Path) -> None:
    """Discord and ModelsLab in one small aiohttp app; it writes its port to `port_file` once listening."""
    image = _render_image()
    session = aiohttp.ClientSession()
    pending: set[asyncio.Task[None]] = set()

    async def gateway(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=0)
        await ws.prepare(request)
        async for msg in ws:  # "<jobs> <rate>": send that many commands, `rate` a second (0: at once)
            jobs, rate = msg.data.split()
            start = time.monotonic()
            for number in range(int(jobs)):
                if float(rate) > 0:
                    await asyncio.sleep(max(0.0, start + number / float(rate) - time.monotonic()))
                await ws.send_str(json.dumps(interaction(number)))
        return ws

    async def callback(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=204)

    async def submit(request: web.Request) -> web.Response:
        body = await request.json()
        track_id = body["track_id"]

        async def call_webhook() -> None:
            await asyncio.sleep(JOB_TIME)
            payload = {"status": "success", "track_id": track_id, "id": track_id, "output": [f"{base}/image.png"]}
            async with session.post(body["webhook"], json=payload) as answer:
                await answer.read()

        base = f"http://{request.host}"
        task = asyncio.create_task(call_webhook())
        pending.add(task)
        task.add_done_callback(pending.discard)
        return web.json_response(
            {"status": "processing", "tip": "queued", "eta": 10, "messege": "Try to fetch request after given eta",
             "fetch_result": f"{base}/fetch/{track_id}", "id": track_id, "output": [], "future_links": [],
             "meta": {"prompt": body["prompt"], "width": 512, "height": 512, "seed": 42, "steps": 20}}
        )  # fmt: skip

    async def fetch(request: web.Request) -> web.Response:
        await request.read()
        job = request.match_info["job"]
        return web.json_response(
            {"status": "success", "id": job, "output": [f"http://{request.host}/image.png"], "generationTime": 3.2,
             "meta": {"width": 512, "height": 512, "seed": 42, "steps": 20}, "nsfw_content_detected": [False]}
        )  # fmt: skip

    async def download(request: web.Request) -> web.Response:
        return web.Response(body=image, content_type="image/png")

    async def edit(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response(message("Generating…" if len(body) < 4096 else "", 1 if len(body) >= 4096 else 0))

    app = web.Application(client_max_size=32 * 1024 * 1024)
    app.router.add_get("/gateway", gateway)
    app.router.add_post("/api/v10/interactions/{id}/{token}/callback", callback)
    app.router.add_post("/api/v6/images/text2img", submit)
    app.router.add_post("/fetch/{job}", fetch)
    app.router.add_get("/image.png", download)
    app.router.add_patch("/api/v10/webhooks/{app}/{token}/messages/@original", edit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await asyncio.to_thread(port_file.write_text, str(runner.addresses[0][1]))
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def _render_image() -> bytes:
    from bench.run import Images

    return Images._render(IMAGE_SIZE, "photo")


# ------------------------------------------------------------------------------------------ the client


class Client:
    """A job's eight exchanges and nothing else."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session
        self.webhook_url = ""
        self.waiting: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self.done: asyncio.Queue[int] = asyncio.Queue()
        self.tasks: set[asyncio.Task[None]] = set()

    async def receive_webhook(self, request: web.Request) -> web.Response:
        body = await request.json()
        future = self.waiting.pop(body["track_id"], None)
        if future is not None and not future.done():
            future.set_result(body)
        return web.json_response({"ok": True})

    def command(self, raw: str) -> None:
        task = asyncio.create_task(self.job(json.loads(raw)["d"]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def job(self, data: dict[str, Any]) -> None:
        api = f"{self.base}/api/v10"
        headers = {"Authorization": "Bot token", "Content-Type": "application/json"}
        first = {"type": 4, "data": {"content": "Sending to ModelsLab…", "flags": 0, "allowed_mentions": {"parse": []}}}
        async with self.session.post(
            f"{api}/interactions/{data['id']}/{data['token']}/callback", data=json.dumps(first), headers=headers
        ) as answer:
            await answer.read()
        track_id = data["id"]
        finished = asyncio.get_running_loop().create_future()
        self.waiting[track_id] = finished
        prompt = data["data"]["options"][0]["value"]
        submission = {"key": "k" * 60, "model_id": "flux", "prompt": prompt, "width": 512, "height": 512,
                      "samples": 1, "num_inference_steps": 20, "guidance_scale": 7.5, "seed": 42,
                      "safety_checker": "yes", "webhook": self.webhook_url, "track_id": track_id}  # fmt: skip
        async with self.session.post(f"{self.base}/api/v6/images/text2img", json=submission) as answer:
            queued = await answer.json()
        original = f"{api}/webhooks/{data['application_id']}/{data['token']}/messages/@original"
        status = {
            "content": f"Generating… about {queued['eta']} s",
            "components": [],
            "allowed_mentions": {"parse": []},
        }
        async with self.session.patch(original, data=json.dumps(status), headers=headers) as answer:
            await answer.read()
        await finished
        async with self.session.post(queued["fetch_result"], json={"key": "k" * 60}) as answer:
            result = await answer.json()
        async with self.session.get(result["output"][0]) as answer:
            image = await answer.read()
        if not image.startswith(PNG_SIGNATURE):
            raise RuntimeError("not a PNG")
        form = aiohttp.FormData()
        payload = {"content": "", "attachments": [{"id": 0, "filename": "image_0.png"}], "components": []}
        form.add_field("payload_json", json.dumps(payload), content_type="application/json")
        form.add_field("files[0]", image, filename="image_0.png", content_type="image/png")
        async with self.session.patch(original, data=form, headers={"Authorization": "Bot token"}) as answer:
            await answer.read()
        await self.done.put(1)


async def measure(jobs: int, rate: float) -> dict[str, tuple[float, float]]:
    """CPU seconds and wake-ups (voluntary context switches, every thread of this process) per job, by round."""
    port_file = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-floor-{os.getpid()}.port"
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.floor", "--serve", str(port_file), cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text():
            if time.monotonic() > deadline or server.returncode is not None:
                raise RuntimeError("the floor's server did not start")
            await asyncio.sleep(0.05)
        base = f"http://127.0.0.1:{port_file.read_text()}"
        async with aiohttp.ClientSession() as session:
            client = Client(base, session)
            app = web.Application(client_max_size=1024 * 1024)
            app.router.add_post("/webhook", client.receive_webhook)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            client.webhook_url = f"http://127.0.0.1:{runner.addresses[0][1]}/webhook"
            try:
                async with session.ws_connect(f"{base}/gateway", max_msg_size=0) as ws:
                    results = {}
                    for name, pace in (("warm-up", 0.0), ("paced", rate), ("at once", 0.0), ("paced again", rate)):
                        results[name] = await _round(client, ws, jobs if name != "warm-up" else 20, pace)
                    return results
            finally:
                await runner.cleanup()
    finally:
        server.terminate()
        await server.wait()
        port_file.unlink(missing_ok=True)


async def _round(client: Client, ws: aiohttp.ClientWebSocketResponse, jobs: int, rate: float) -> tuple[float, float]:
    await asyncio.sleep(JOB_TIME * 2)  # what the previous round left is over
    cpu = time.process_time()
    wakeups = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw
    await ws.send_str(f"{jobs} {rate}")
    received = 0
    finished = 0
    reading = asyncio.ensure_future(ws.receive())
    while finished < jobs:
        done_waiting = asyncio.ensure_future(client.done.get())
        waits: set[asyncio.Future[Any]] = {done_waiting}
        if received < jobs:
            waits.add(reading)
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if reading in done and received < jobs:
            client.command(reading.result().data)
            received += 1
            if received < jobs:
                reading = asyncio.ensure_future(ws.receive())
        if done_waiting in done:
            finished += 1
        else:
            done_waiting.cancel()
    wakeups = resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw - wakeups
    return (time.process_time() - cpu) / jobs, wakeups / jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=20.0, help="commands a second in the paced rounds")
    parser.add_argument("--json", action="store_true", help="print the milliseconds per job as one JSON object")
    parser.add_argument("--serve", metavar="PORT_FILE", help=argparse.SUPPRESS)
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        if options.serve:
            runner.run(serve(Path(options.serve)))
            return 0
        results = runner.run(measure(options.jobs, options.rate))
    if options.json:
        found = {name: seconds * 1000 for name, (seconds, _) in results.items()}
        found |= {f"{name} wake-ups": wakeups for name, (_, wakeups) in results.items()}
        print(json.dumps(found))
        return 0
    print(f"A job's eight exchanges in bare aiohttp ({options.jobs} jobs, 0.5 MB image), CPU of this process per job:")
    for name in ("paced", "at once", "paced again"):
        label = f"{options.rate:g} commands a second" if name.startswith("paced") else "the commands at once"
        seconds, wakeups = results[name]
        print(f"  {name:<12} ({label}): {seconds * 1000:.1f} ms, {wakeups:.1f} wake-ups")
    print("The bot's own figures for the same two: bench.run's 2a and its 'commands at once' row (bench/README.md).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
