"""Many processes on one PostgreSQL (issue 15): throughput and acknowledgements for 1, 2 and 3 processes, the delay
before a killed process's jobs are taken over, and quota reservations per second.

    python -m bench.cluster                               # every scenario
    python -m bench.cluster --modes scale --processes 1,3 # some of them
    python -m bench.cluster --help                        # sizes, the database, --any-gateway

The bot runs as `python -m bot` processes configured only by environment variables (tests/cluster.py: one
DATABASE_URL and SECRET_KEY, SHARD_COUNT/SHARD_IDS per process, a round-robin proxy in front of their webhook
receivers as PUBLIC_URL), against the fake Discord and the fake ModelsLab in this process. PostgreSQL is the one
--database-url (or TEST_DATABASE_URL) names, with a user that may create databases, or a throwaway server started
here (tests/postgres.py); every scenario gets a database of its own. See bench/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/cluster.py` puts bench/ first on the path, not the project
    sys.path.insert(0, str(ROOT))

from bench.run import BenchDiscord, LoopMonitor, ms, percentile, print_rows  # noqa: E402
from bot.guilds.rules import Limits  # noqa: E402
from bot.jobs.model import Job, JobStatus  # noqa: E402
from bot.requests.generation import build_generation_request  # noqa: E402
from tests.cluster import Cluster, eventually, uploads_by_interaction  # noqa: E402
from tests.fakes.discord_server import FakeDiscord, FakeGuild, FakeInteraction  # noqa: E402
from tests.fakes.modelslab_server import FakeModelsLab, Queued  # noqa: E402
from tests.postgres import PostgresServer, PostgresUnavailable  # noqa: E402

BOT_TOKEN = "fake-bot-token.Cluster.secretpart"
MODES = ("scale", "takeover", "quota")
NEVER = 300.0  # an ETA beyond any scenario: ModelsLab finishes jobs when the benchmark says
ACK_TARGET = 0.250  # the one-process acknowledgement target of bench/run.py, for every process count


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Row:
    section: str
    measure: str
    result: str
    verdict: str = ""  # "PASS", "FAIL", or "" (information)


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)

    def add(self, section: str, measure: str, result: str, passed: bool | None = None) -> None:
        verdict = "" if passed is None else ("PASS" if passed else "FAIL")
        self.rows.append(Row(section, measure, result, verdict))

    def fail(self, section: str, measure: str, why: str) -> None:
        self.add(section, measure, why, False)

    def print(self) -> None:
        rows = [(r.section, r.measure, r.result, r.verdict) for r in self.rows]
        print_rows(("", "Measure", "Result", ""), rows, self.notes)


# ---------------------------------------------------------------------------------------------- the cluster


@asynccontextmanager
async def running_cluster(
    server: PostgresServer, workdir: Path, name: str, options: argparse.Namespace, guilds: int, **common: str
) -> AsyncIterator[Cluster]:
    """Fresh fakes (with `guilds` servers of `options.members` members each), a fresh database, a cluster."""
    database = server.create_database(prefix="bench")
    discord = BenchDiscord(token=BOT_TOKEN, max_concurrency=16)  # shards of several processes IDENTIFY at once
    discord.add_guilds(guilds, members=options.members)
    modelslab = FakeModelsLab()
    await discord.start()
    await modelslab.start()
    try:
        settings = {"LOG_LEVEL": options.log_level, **common}
        async with Cluster(discord, modelslab, server.url_of(database), workdir / name, **settings) as cluster:
            yield cluster
    finally:
        await modelslab.stop()
        await discord.stop()
        server.drop_database(database)


def members_of(discord: FakeDiscord, guilds: Sequence[FakeGuild]) -> list[tuple[int, int]]:
    """(guild id, member id) of every plain member of these servers, interleaved across servers."""
    lanes = [
        [(guild.id, uid) for uid in guild.member_ids if uid not in (discord.bot_user_id, guild.owner_id)]
        for guild in guilds
    ]
    return [pair for group in itertools.zip_longest(*lanes) for pair in group if pair is not None]


def added_guilds(discord: FakeDiscord) -> list[FakeGuild]:
    return [guild for guild in discord.guilds.values() if guild.id != discord.guild_id]


def posted_at(discord: FakeDiscord) -> dict[int, float]:
    """Interaction id -> when its images first reached Discord (an accepted upload on its token)."""
    found: dict[int, float] = {}
    for request in discord.requests:
        if request.files and 200 <= request.status < 300 and request.interaction_id is not None:
            found.setdefault(request.interaction_id, request.at)
    return found


def double_work(cluster: Cluster, interactions: Sequence[FakeInteraction]) -> list[str]:
    """What members would see twice, or ModelsLab be paid for twice: jobs sent more than once, results posted more
    than once."""
    sent = Counter(str(call.json.get("track_id")) for call in cluster.modelslab.submissions())
    uploads = uploads_by_interaction(cluster.discord)
    problems = []
    twice_sent = sum(1 for count in sent.values() if count > 1)
    if twice_sent:
        problems.append(f"{twice_sent} job(s) sent to ModelsLab more than once")
    twice_posted = sum(1 for i in interactions if uploads[i.id] > 1)
    if twice_posted:
        problems.append(f"{twice_posted} result(s) uploaded to Discord more than once")
    return problems


def gateway_failure(exc: BaseException) -> str:
    """The harness's sentence, up to the list of every process's shards."""
    return str(exc).splitlines()[0].split("; the processes'")[0][:160]


# ---------------------------------------------------------------------------------------------- scale


async def scenario_scale(server: PostgresServer, options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """For 1, 2, 3 processes: bursts of commands at once (acknowledgement latency), then all their jobs finishing
    at ModelsLab at the same instant (results posted per second, through webhooks landing on any process)."""
    for count in options.process_counts:
        section = f"{count} proc"
        print(f"  scale: {count} process(es)", file=sys.stderr, flush=True)
        name = f"scale-{count}"
        async with running_cluster(
            server, workdir, name, options, options.guilds, MODELSLAB_MAX_QUEUED=str(options.commands)
        ) as cluster:
            if count == 1:
                cluster.add("bot")  # unsharded: one process as on main
            else:
                for shard in range(count):
                    cluster.add(f"shard-{shard}", SHARD_COUNT=str(count), SHARD_IDS=str(shard))
            try:
                await cluster.start(check_gateway=not options.any_gateway)
            except AssertionError as exc:
                report.fail(section, "processes started as their settings ask", gateway_failure(exc))
                continue
            await scale_rounds(cluster, count, options, report, section)


async def scale_rounds(cluster: Cluster, count: int, options: argparse.Namespace, report: Report, section: str) -> None:
    discord = cluster.discord
    members = members_of(discord, added_guilds(discord))
    cluster.modelslab.default_behaviour = Queued(eta=NEVER)
    latencies: list[float] = []
    rates: list[float] = []
    refused = 0
    cpu = 0.0
    every: list[FakeInteraction] = []
    stalls: list[float] = []  # the fakes' loop: stalled, it stamps what reaches it late and the bot looks slower
    # Warm-up, not measured: one command from each member at once, so that every process has its servers' and
    # members' settings in memory and its pool of database connections open, as after its first minutes of work.
    warm, _ = await burst(cluster, [f"warm-up {n}" for n in range(len(members))], members)
    every += warm
    for round_number in range(options.rounds):
        before_cpu = sum(p.cpu_seconds() for p in cluster.processes.values())
        prompts = [f"round {round_number} job {n}" for n in range(options.commands)]
        began = time.monotonic()
        interactions, rate = await burst(cluster, prompts, members)
        stalls.append(MONITOR.max_stall(began, time.monotonic()))
        every += interactions
        latencies += [i.callback_latency for i in interactions if i.callback_latency is not None]
        refused += sum(1 for i in interactions if not i.acknowledged)
        rates.append(rate)
        cpu += sum(p.cpu_seconds() for p in cluster.processes.values()) - before_cpu
    codes = await cluster.stop_all()
    problems = double_work(cluster, every)
    errors = cluster.errors()
    p99 = percentile(latencies, 0.99)
    report.add(
        section,
        f"acknowledgement p50 / p99 ({len(latencies)} commands, {options.commands} at once)",
        f"{ms(percentile(latencies, 0.5))} / {ms(p99)}",
        p99 < ACK_TARGET,
    )
    report.add(section, "...refused by Discord (later than 3 s)", str(refused), refused == 0)
    report.add(section, "...the fakes' largest loop stall during a round", ms(max(stalls, default=0.0)))
    report.add(
        section,
        f"results posted a second, {options.commands} ready at once (median of {len(rates)})",
        f"{percentile(rates, 0.5):.0f}/s (runs: {', '.join(f'{r:.0f}' for r in rates)})",
    )
    report.add(section, "...bot CPU a round (all processes)", f"{cpu / max(options.rounds, 1):.2f} s")
    report.add(section, "each job sent once, each result posted once", "; ".join(problems) or "yes", not problems)
    report.add(
        section,
        "ERROR lines in the logs; exit codes",
        f"{len(errors)}; {codes}",
        not errors and set(codes.values()) <= {0},
    )
    if errors:
        report.notes.append(f"{section}: first ERROR: {errors[0][:200]}")
    if discord.violations:
        report.notes.append(
            f"{section}: Discord's rules broken {len(discord.violations)} time(s), first: {discord.violations[0][:200]}"
        )
    report.data.setdefault("scale", {})[count] = {
        "ack_p50_s": percentile(latencies, 0.5),
        "ack_p99_s": p99,
        "refused": refused,
        "posted_per_s": rates,
        "cpu_per_round_s": cpu / max(options.rounds, 1),
        "double_work": problems,
        "errors": len(errors),
        "violations": len(discord.violations),
    }


async def burst(
    cluster: Cluster, prompts: list[str], members: list[tuple[int, int]]
) -> tuple[list[FakeInteraction], float]:
    """The commands at once (each on its server's shard); once every job is at ModelsLab, all finish at the same
    instant. The interactions, and the results posted a second (from the first finish to the last upload)."""
    discord, modelslab = cluster.discord, cluster.modelslab
    interactions = list(
        await asyncio.gather(
            *(
                discord.invoke_slash("imagine", {"prompt": prompt}, user_id=uid, guild_id=gid)
                for prompt, (gid, uid) in zip(prompts, itertools.cycle(members), strict=False)
            )
        )
    )
    ids = {i.id for i in interactions}
    await eventually(
        lambda: all(i.callback is not None for i in interactions), "the acknowledgements", timeout=60, poll=0.02
    )
    wanted = set(prompts)

    def submitted() -> bool:
        return wanted <= {str(c.json.get("prompt")) for c in modelslab.submissions() if c.answered}

    await eventually(submitted, "every job at ModelsLab", timeout=120, poll=0.05)
    jobs = [job for job in modelslab.jobs.values() if not job.finished]
    modelslab.complete_all()
    first_finish = min(job.finished_at or math.inf for job in jobs)
    await eventually(lambda: ids <= set(posted_at(discord)), "every result posted", timeout=120, poll=0.02)
    shown = posted_at(discord)
    last_post = max(shown[i] for i in ids)
    return interactions, len(interactions) / max(last_post - first_finish, 1e-6)


# ---------------------------------------------------------------------------------------------- takeover


async def scenario_takeover(server: PostgresServer, options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """3 processes (shard 0, shard 1, a worker), polling only (no PUBLIC_URL: a webhook would only wake the dead
    owner). The shard-1 process holds jobs at ModelsLab; it is SIGKILLed and ModelsLab finishes them that instant:
    the delay is from the kill to each result's upload to Discord by another process."""
    section = "takeover"
    lease = options.lease
    async with running_cluster(
        server,
        workdir,
        "takeover",
        options,
        4,
        PUBLIC_URL="",
        LEASE_SECONDS=str(lease),
        MODELSLAB_MAX_QUEUED=str(max(options.takeover_jobs, 5)),
    ) as cluster:
        discord, modelslab = cluster.discord, cluster.modelslab
        cluster.add("shard-0", SHARD_COUNT="2", SHARD_IDS="0")
        cluster.add("shard-1", SHARD_COUNT="2", SHARD_IDS="1")
        cluster.add("worker", SHARD_COUNT="2", SHARD_IDS="")
        try:
            await cluster.start(check_gateway=not options.any_gateway)
        except AssertionError as exc:
            report.fail(section, "processes started as their settings ask", gateway_failure(exc))
            return
        modelslab.default_behaviour = Queued(eta=1.0)  # polled every few seconds, finished when the benchmark says
        on_shard_1 = [guild for guild in added_guilds(discord) if guild.shard_id(2) == 1]
        members = members_of(discord, on_shard_1)
        interactions = []
        for n in range(options.takeover_jobs):
            gid, uid = members[n % len(members)]
            interactions.append(
                await discord.invoke_slash("imagine", {"prompt": f"held {n}"}, user_id=uid, guild_id=gid)
            )

        async def at_modelslab() -> bool:
            return Counter(row.status for row in await cluster.jobs())["processing"] == len(interactions)

        await eventually(at_modelslab, "the jobs at ModelsLab", timeout=60)
        try:
            held = await cluster.unposted_owned_by("shard-1")
        except Exception as exc:  # asyncpg's UndefinedColumnError, before the lease work
            report.fail(section, "shard-1 holds its servers' jobs", f"cannot tell: {str(exc)[:120]}")
            return
        if held["processing"] != len(interactions):
            report.fail(section, "shard-1 holds its servers' jobs", f"it holds {dict(held)}")
            return
        await cluster.kill("shard-1")
        killed = time.monotonic()
        modelslab.complete_all()
        try:
            claimed = await cluster.wait_until_owned_by_none("shard-1", timeout=lease * 3 + 30)
            await eventually(
                lambda: set(posted_at(discord)) >= {i.id for i in interactions}, "the results", timeout=lease * 3 + 30
            )
        except TimeoutError as exc:
            report.fail(section, "a killed process's jobs finished by the others", str(exc).splitlines()[0][:160])
            return
        shown = posted_at(discord)
        delays = [shown[i.id] - killed for i in interactions]
        report.add(
            section,
            f"kill -> its jobs held by others (LEASE_SECONDS={lease})",
            f"{claimed:.1f} s",
            claimed <= lease + 5,
        )
        report.add(
            section,
            f"kill -> results posted, {len(delays)} jobs: p50 / max",
            f"{percentile(delays, 0.5):.1f} s / {max(delays):.1f} s",
            max(delays) <= lease + 15,
        )
        problems = double_work(cluster, interactions)
        report.add(section, "each job sent once, each result posted once", "; ".join(problems) or "yes", not problems)
        report.data["takeover"] = {"lease_s": lease, "claimed_s": claimed, "posted_s": delays, "double": problems}


# ---------------------------------------------------------------------------------------------- quota


def reservation(n: int, guild_id: int, user_id: int) -> Job:
    now = time.time()
    return Job(
        id=f"{n:032x}",
        kind="text2img",
        guild_id=guild_id,
        channel_id=2,
        user_id=user_id,
        request=build_generation_request(flavour="v6", default_model="flux", prompt="a cat", seed=5),
        api_flavour="v6",
        status=JobStatus.QUEUED,
        created_at=now,
        deadline_at=now + 600,
        updated_at=now,
        charged_images=1,
    )


async def scenario_quota(server: PostgresServer, options: argparse.Namespace, workdir: Path, report: Report) -> None:
    """The reservation every /imagine makes before its acknowledgement (one statement that checks the limits under
    a per-server lock), called directly on the storage from several pools at once, as several processes would."""
    from bot.storage.postgres import PostgresStorage

    section = "quota"
    database = server.create_database(prefix="bench")
    url = server.url_of(database)
    ids = itertools.count(1)
    try:
        async with AsyncExitStack() as stack:
            pools = [
                await stack.enter_async_context(PostgresStorage.open(url, upgrade=n == 0, pool_size=options.pool_size))
                for n in range(options.pools)
            ]

            async def reserve(jobs: list[Job], limits: Limits) -> tuple[float, list[bool]]:
                began = time.perf_counter()
                admitted = await asyncio.gather(
                    *(pools[n % len(pools)].jobs.insert_within_limits(job, limits) for n, job in enumerate(jobs))
                )
                return time.perf_counter() - began, list(admitted)

            count = options.quota_requests
            generous = Limits(guild_daily=1_000_000, user_daily=1_000_000)
            await reserve([reservation(next(ids), 10**6, 1) for _ in range(50)], generous)  # warm the pools
            spread = [reservation(next(ids), 1000 + n % 100, 5000 + n) for n in range(count)]
            took, admitted = await reserve(spread, generous)
            report.add(
                section,
                f"reservations a second, {count} over 100 servers, {options.pools} pools at once",
                f"{count / took:.0f}/s",
                all(admitted),
            )
            one = [reservation(next(ids), 7, 9000 + n) for n in range(count)]
            took_one, admitted = await reserve(one, generous)
            report.add(
                section,
                f"...{count} for one server (each waits for that server's lock)",
                f"{count / took_one:.0f}/s",
                all(admitted),
            )
            exact = []
            for run in range(options.exact_runs):
                jobs = [reservation(next(ids), 2_000_000 + run, 100 + n) for n in range(50)]
                _, admitted = await reserve(jobs, Limits(guild_daily=10))
                exact.append(admitted.count(True))
            report.add(
                section,
                f"limit 10, 50 at once across {options.pools} pools: admitted, {len(exact)} runs",
                ", ".join(map(str, exact)),
                set(exact) == {10},
            )
            report.data["quota"] = {"spread_per_s": count / took, "one_server_per_s": count / took_one, "exact": exact}
    finally:
        server.drop_database(database)


# ---------------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cluster",
        description="Several bot processes on one PostgreSQL, against the fakes (see bench/README.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated scenarios: {', '.join(MODES)}")
    parser.add_argument("--processes", default="1,2,3", help="scale: process counts (1: unsharded; N: N shards)")
    parser.add_argument("--commands", type=int, default=100, help="scale: /imagine commands at once, a round")
    parser.add_argument("--rounds", type=int, default=3, help="scale: rounds per process count")
    parser.add_argument("--guilds", type=int, default=6, help="scale: servers the commands come from")
    parser.add_argument("--members", type=int, default=3, help="members of each server")
    parser.add_argument("--lease", type=int, default=10, help="takeover: LEASE_SECONDS")
    parser.add_argument("--takeover-jobs", type=int, default=10, help="takeover: jobs the killed process holds")
    parser.add_argument("--pools", type=int, default=3, help="quota: storages (pools) at once, as processes")
    parser.add_argument("--pool-size", type=int, default=10, help="quota: DATABASE_POOL_SIZE of each")
    parser.add_argument("--quota-requests", type=int, default=2000, help="quota: reservations per measure")
    parser.add_argument("--exact-runs", type=int, default=5, help="quota: runs of 50 at once against a limit of 10")
    parser.add_argument(
        "--any-gateway",
        action="store_true",
        help="do not stop when the processes' gateway sessions are not those SHARD_COUNT/SHARD_IDS ask for",
    )
    parser.add_argument("--database-url", help="a PostgreSQL whose user may create databases (else a throwaway one)")
    parser.add_argument("--log-level", default="INFO", help="the bot's LOG_LEVEL")
    parser.add_argument("--keep", action="store_true", help="keep the processes' logs")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    options = parser.parse_args(argv)
    modes = {m.strip() for m in options.modes.split(",") if m.strip()}
    if modes - set(MODES):
        parser.error(f"unknown mode(s): {', '.join(sorted(modes - set(MODES)))}")
    options.mode_set = modes
    options.process_counts = [int(n) for n in options.processes.split(",") if n.strip()]
    return options


MONITOR = LoopMonitor()


async def run(server: PostgresServer, options: argparse.Namespace, workdir: Path) -> Report:
    report = Report()
    MONITOR.start()
    scenarios = {"scale": scenario_scale, "takeover": scenario_takeover, "quota": scenario_quota}
    for name in MODES:
        if name not in options.mode_set:
            continue
        began = time.monotonic()
        print(f"running {name} ...", file=sys.stderr, flush=True)
        try:
            await scenarios[name](server, options, workdir, report)
        except (TimeoutError, RuntimeError, AssertionError) as exc:
            report.fail(name, "did not finish", str(exc).splitlines()[0][:160])
        print(f"  {name} took {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    await MONITOR.stop()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_args(argv)
    if options.database_url:
        os.environ["TEST_DATABASE_URL"] = options.database_url
    try:
        server = PostgresServer.from_environment()
    except PostgresUnavailable as exc:
        print(f"error: PostgreSQL cannot be used: {exc}.", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    began = time.monotonic()
    load_before = os.getloadavg()[0]
    try:
        report = asyncio.run(run(server, options, workdir))
    finally:
        server.stop()
        if options.keep:
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report.print()
    print(
        f"(whole run: {time.monotonic() - began:.0f} s on {os.cpu_count()} CPU(s), the bot processes, PostgreSQL and "
        f"the fakes sharing them; 1-minute load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after)"
    )
    if options.json:
        Path(options.json).write_text(json.dumps(report.data, indent=2, default=str), encoding="utf-8")
    return 0 if all(row.verdict != "FAIL" for row in report.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
