"""Does the bot slow down as it ages? The acknowledgement and webhook scenarios of `bench.run`, on an empty database
and on one holding a long history (1,000,000 finished jobs by default), side by side.

    python -m bench.history                    # 1,000,000 jobs of history (building it takes a minute or two)
    python -m bench.history --history 100000   # a smaller one

The history is made once, with the real migrations, as `python -m bot` would have left it after years of use:
finished and posted jobs of many members in the benchmark's server (and a few others), spread over a year, some
with the pictures of remixes. Each scenario's bot then starts on a copy of it. Target: ack p99 and ready -> posted
(webhook p50) with the history within 10% of the empty database (issue 14).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import run as bench_run  # noqa: E402
from bot.requests.generation import build_generation_request  # noqa: E402
from bot.storage.sqlite import SqliteStorage  # noqa: E402

TARGET = 0.10  # within 10% of the empty database
GUILD_ID = 1_300_000_000_000_000_100  # the fake Discord's server, as the benchmark uses it
YEAR = 365 * 86400.0


async def _migrate(path: Path) -> None:
    async with SqliteStorage.open(path):
        pass


def build_history(path: Path, jobs: int, *, members: int = 5000, seed: int = 1) -> None:
    """A database at the current schema holding `jobs` finished, posted jobs (and a picture for one in fifty)."""
    asyncio.run(_migrate(path))
    rng = random.Random(seed)
    request = json.dumps(
        build_generation_request(flavour="v6", default_model="flux", prompt="a lighthouse at dusk", seed=7).to_json()
    )
    now = time.time()
    picture = bytes(rng.getrandbits(8) for _ in range(2048))
    with sqlite3.connect(path) as database:
        database.execute("PRAGMA journal_mode = WAL")
        database.execute("PRAGMA synchronous = OFF")
        batch = 20_000
        for start in range(0, jobs, batch):
            rows = []
            inputs = []
            for n in range(start, min(start + batch, jobs)):
                created = now - YEAR + YEAR * n / jobs - 3600  # the newest an hour old: none counts today
                guild = GUILD_ID if n % 10 else GUILD_ID + 1 + n % 7
                job_id = f"{n:032x}"
                rows.append(
                    (
                        job_id,
                        "img2img" if n % 50 == 0 else "text2img",
                        guild,
                        guild + 100,
                        1_600_000_000_000_000_000 + rng.randrange(members),
                        request,
                        "v6",
                        "succeeded",
                        1,
                        created,
                        created + 600,
                        created + 20,
                        created + 2,
                        created + 20,
                        created + 21,
                        json.dumps({"output": [f"https://cdn.example/{job_id}.png"], "proxy": []}),
                        rng.randrange(2**32),
                        1,
                        900_000_000_000_000_000 + n,
                    )
                )
                if n % 50 == 0:
                    inputs.append((job_id, picture, 512, 512, created))
            database.executemany(
                "INSERT INTO jobs (id, kind, guild_id, channel_id, user_id, request_json, api_flavour, status,"
                " charged_images, created_at, deadline_at, updated_at, submitted_at, finished_at, posted_at,"
                " output_json, seed, image_count, message_id) VALUES"
                " (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            database.executemany(
                "INSERT INTO job_inputs (job_id, image, width, height, created_at) VALUES (?, ?, ?, ?, ?)", inputs
            )
            database.commit()
        database.execute("ANALYZE")
        database.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def scenario_options(argv: list[str]) -> argparse.Namespace:
    return bench_run.parse_args(["--modes", "ack,webhook", *argv])


async def measure(options: argparse.Namespace, workdir: Path) -> dict[str, float]:
    report = await bench_run.run(options, workdir)
    return {
        "ack_p99_s": report.data["ack"]["p99_s"],
        "webhook_p50_s": report.data["webhook"]["p50_s"],
        "webhook_p99_s": report.data["webhook"]["p99_s"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.history", description=__doc__.splitlines()[0])
    parser.add_argument("--history", type=int, default=1_000_000, help="finished jobs in the long database")
    parser.add_argument("--keep", action="store_true", help="keep the databases")
    args, rest = parser.parse_known_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="bench-history-"))
    try:
        history = workdir / "history.sqlite3"
        began = time.monotonic()
        build_history(history, args.history)
        size = history.stat().st_size / 1e6
        print(
            f"history: {args.history:,} jobs, {size:.0f} MB, built in {time.monotonic() - began:.0f} s", file=sys.stderr
        )
        results = {}
        for label, database in (("empty", None), ("history", history)):
            options = scenario_options(rest)
            options.seed_database = database
            results[label] = asyncio.run(measure(options, workdir / label))
    finally:
        if args.keep:
            print(f"databases kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n{'measure':<40} {'empty':>10} {f'{args.history:,} jobs':>14} {'change':>8}  target")
    failed = False
    commands = scenario_options(rest).commands
    measures = (("ack_p99_s", f"ack p99 ({commands} at once)"), ("webhook_p50_s", "ready -> posted p50 (webhook)"))
    for key, name in measures:
        empty, full = results["empty"][key], results["history"][key]
        change = (full - empty) / empty if empty else 0.0
        ok = change <= TARGET
        failed |= not ok
        verdict = "ok" if ok else "MISSED"
        print(f"{name:<40} {empty * 1000:>8.0f}ms {full * 1000:>12.0f}ms {change:>+7.0%}  <= +10% {verdict}")
    print(f"(1-minute load average {os.getloadavg()[0]:.2f}: other processes compete for the same CPUs)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
