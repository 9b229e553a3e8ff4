"""The same Discord request, back to back and with idle gaps between: the CPU one request costs on this machine.

    python -m bench.idle_gaps [--calls 200]

One process edits an interaction's message through discord.py (the bot's own call for a status edit) against a
small aiohttp server on 127.0.0.1, and reads its own CPU time (`time.process_time()`, both sides together) per
call. Nothing of the bot runs, so what changes from row to row is only how long the process idled before each call.
The sleep alone is measured too, so that the last columns are the call's own cost. On the development VM a call
costs several times more CPU after an idle gap of 5-50 ms than back to back: a
paced benchmark (bench.run's 2a, 20 jobs a second) pays that on every event of a job, a burst does not. Run it on
the machine you measure the bot on before comparing paced CPU figures between machines (bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import aiohttp
import discord
from aiohttp import web

from bot.__main__ import new_event_loop

GAPS_MS = (0, 1, 5, 20, 50)
MESSAGE = {
    "id": "1",
    "channel_id": "2",
    "type": 20,
    "content": "Generating…",
    "author": {"id": "3", "username": "bot", "discriminator": "0", "avatar": None, "bot": True},
    "attachments": [],
    "embeds": [],
    "components": [],
    "timestamp": "2026-12-01T00:00:00+00:00",
    "edited_timestamp": None,
    "tts": False,
    "mention_everyone": False,
    "mentions": [],
    "mention_roles": [],
    "pinned": False,
    "flags": 0,
    "webhook_id": "4",
    "application_id": "4",
}


async def measure(calls: int) -> list[tuple[int, float, float]]:
    body = json.dumps(MESSAGE).encode()

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rows = []
    try:
        async with aiohttp.ClientSession() as session:
            discord.http.Route.BASE = f"http://127.0.0.1:{port}/api/v10"
            webhook = discord.Webhook.partial(4, "token", session=session)
            webhook.type = discord.WebhookType.application

            async def edit() -> None:
                await webhook.edit_message("@original", content="Generating…", view=None)  # type: ignore[call-overload]

            for _ in range(100):  # warm: connections open, code paths taken
                await edit()
            for gap_ms in GAPS_MS:
                start = time.process_time()
                for _ in range(calls):
                    await edit()
                    if gap_ms:
                        await asyncio.sleep(gap_ms / 1000)
                with_calls = (time.process_time() - start) / calls
                start = time.process_time()
                for _ in range(calls if gap_ms else 0):
                    await asyncio.sleep(gap_ms / 1000)
                rows.append((gap_ms, with_calls, (time.process_time() - start) / calls))
    finally:
        await runner.cleanup()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="edits per gap")
    options = parser.parse_args()
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        rows = runner.run(measure(options.calls))
    base = rows[0][1]
    print("Idle gap   CPU per call and gap   the gap alone (a sleep)   the call   vs back to back")
    for gap_ms, with_calls, gap_alone in rows:
        call = with_calls - gap_alone
        print(
            f"{gap_ms:>5} ms {with_calls * 1e6:>14.0f} us {gap_alone * 1e6:>18.0f} us {call * 1e6:>9.0f} us"
            f" {call / base:>10.1f}x"
        )


if __name__ == "__main__":
    main()
