"""Many processes, many shards, one PostgreSQL (issue 15): `python -m bot` processes against the fakes.

Each process is configured only by environment variables (SHARD_COUNT, SHARD_IDS, WORKER_ID, LEASE_SECONDS, one
DATABASE_URL and SECRET_KEY for all), behind a round-robin proxy that is their PUBLIC_URL, so ModelsLab's webhooks
land on any process (see tests/cluster.py). What is asserted is what members would notice: every job posted once
and charged once, ModelsLab's per-key limit never passed, the fair order kept, nothing lost, no ERROR logged.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from tests.cluster import (
    Cluster,
    JobRow,
    eventually,
    fair_order_problems,
    images_shown,
    lift_failures,
    uploads_by_interaction,
)
from tests.fakes.discord_server import FakeDiscord, FakeGuild, FakeInteraction
from tests.fakes.modelslab_server import DEFAULT_KEY, FakeModelsLab, Hang, Queued, RecordedCall

LEASE_SECONDS = 3
# ModelsLab's estimate for every job: no job here is finished by the bot's polling (its first fetch comes at the
# ETA), only by a webhook that wakes the job's owner, wherever the webhook lands.
ETA = 30.0


@pytest.fixture
async def cluster(
    discord_server: FakeDiscord, modelslab: FakeModelsLab, postgres_url: str, tmp_path
) -> AsyncIterator[Cluster]:
    # Discord lets max_concurrency shards IDENTIFY at once (one per rate-limit key): two processes that start
    # together each identify their shard at once instead of 5 s apart.
    discord_server.max_concurrency = 2
    async with Cluster(discord_server, modelslab, postgres_url, tmp_path, LEASE_SECONDS=str(LEASE_SECONDS)) as running:
        yield running


async def imagine(discord: FakeDiscord, prompt: str, *, user_id: int, guild_id: int) -> FakeInteraction:
    interaction = await discord.invoke_slash("imagine", {"prompt": prompt}, user_id=user_id, guild_id=guild_id)
    await interaction.wait_callback()
    assert interaction.original is not None and not interaction.original.ephemeral, interaction.original
    return interaction


def submitted_prompts(modelslab: FakeModelsLab, since: int = 0) -> list[str]:
    """The prompts of the generation requests that reached ModelsLab, in the order they arrived."""
    later = {id(call) for call in modelslab.requests[since:]}
    return [str(call.json.get("prompt")) for call in modelslab.submissions() if id(call) in later]


# ---------------------------------------------------------------------------------------------- two processes


async def test_a_process_and_a_worker_on_one_database_drive_each_job_once(
    cluster: Cluster, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    modelslab.default_behaviour = Queued(eta=ETA)
    cluster.add("bot")  # unsharded, as one process runs today
    cluster.add("worker", SHARD_COUNT="1", SHARD_IDS="")  # no gateway: it drives jobs and receives webhooks
    await cluster.start()

    guild = discord_server.guild
    first = await imagine(discord_server, "first", user_id=discord_server.member_id, guild_id=guild.id)
    second = await imagine(discord_server, "second", user_id=discord_server.other_member_id, guild_id=guild.id)
    for prompt in ("first", "second"):
        await cluster.wait_job(prompt, lambda row: row.status == "processing", "at ModelsLab")
    modelslab.complete_all()  # two webhooks: the proxy sends one to each process, whoever holds the job

    await eventually(lambda: images_shown(first) == 1 and images_shown(second) == 1, "both results", timeout=20)
    assert await cluster.stop_all() == {"bot": 0, "worker": 0}
    assert Counter((row.status, row.charged_images, row.posted) for row in await cluster.jobs()) == {
        ("succeeded", 1, True): 2
    }
    assert sorted(submitted_prompts(modelslab)) == ["first", "second"]  # each sent once
    uploads = uploads_by_interaction(discord_server)
    assert (uploads[first.id], uploads[second.id]) == (1, 1)  # each posted once
    assert [d.status for d in modelslab.webhook_deliveries] == [200, 200]
    assert {cluster["bot"].address, cluster["worker"].address} == set(cluster.proxy.routed)  # one webhook each
    assert cluster.errors() == []


# ---------------------------------------------------------------------------------------------- the cluster


MAX_QUEUED = 4  # ModelsLab's per-key limit, MODELSLAB_MAX_QUEUED in every process
JOBS_EACH = 5  # 4 servers x 3 members x 5 jobs = 60 jobs
HANG = 6.0  # seconds ModelsLab holds the answer of the submission under way when the process is killed


@dataclass(frozen=True)
class Member:
    guild: FakeGuild
    user_id: int
    label: str  # "s1g0m2": on shard 1 (of 2), the first of that shard's servers, its member 2

    def prompt(self, n: int) -> str:
        return f"{self.label} job {n}"


def member_of(prompt: str) -> str:
    return prompt.split(" job ")[0]


def number_of(prompt: str) -> int:
    return int(prompt.split(" job ")[1])


class BusyDay:
    """60 jobs from 4 servers (3 members each, 2 servers on each of 2 shards), ModelsLab's limit of 4 in use, and
    jobs of shard 1's servers in every state at one moment: waiting in line, a submit call under way (ModelsLab
    holds its answer for HANG s), at ModelsLab, finished but not yet shown (Discord refuses its result for now).

    `hold_every_state()` brings the bot there; `finish()` lets ModelsLab finish one job at a time until every job is
    shown (so that each free place goes to the next job in line alone: the order jobs reach ModelsLab is the order
    the bot granted places); `check()` asserts what members would notice.
    """

    def __init__(self, cluster: Cluster, discord: FakeDiscord, modelslab: FakeModelsLab) -> None:
        self.cluster, self.discord, self.modelslab = cluster, discord, modelslab
        modelslab.max_queued, modelslab.enforce_max_queued = MAX_QUEUED, False  # count any excess, never refuse
        modelslab.default_behaviour = Queued(eta=ETA)  # ModelsLab finishes a job when the test says
        cluster.common["MODELSLAB_MAX_QUEUED"] = str(MAX_QUEUED)
        self.members: list[Member] = []
        guilds = discord.add_guilds(4, members=3)
        for shard in (0, 1):
            on_shard = [guild for guild in guilds if guild.shard_id(2) == shard]
            assert len(on_shard) == 2
            for g, guild in enumerate(on_shard):
                plain = [uid for uid in guild.member_ids if uid not in (discord.bot_user_id, guild.owner_id)]
                self.members += [Member(guild, uid, f"s{shard}g{g}m{m}") for m, uid in enumerate(plain)]
        self.on_shard_1 = [member for member in self.members if member.label.startswith("s1")]
        self.on_shard_0 = [member for member in self.members if member.label.startswith("s0")]
        self.interactions: dict[str, FakeInteraction] = {}
        self.result_post = ""  # the path of the result that Discord refuses for now
        self.under_way: RecordedCall | None = None  # the submission whose answer ModelsLab holds

    async def send(self, member: Member, n: int) -> FakeInteraction:
        prompt = member.prompt(n)
        interaction = await imagine(self.discord, prompt, user_id=member.user_id, guild_id=member.guild.id)
        self.interactions[prompt] = interaction
        return interaction

    async def at_modelslab(self, member: Member) -> JobRow:
        await self.send(member, 0)
        return await self.cluster.wait_job(member.prompt(0), lambda row: row.status == "processing", "at ModelsLab")

    async def hold_every_state(self) -> None:
        """Shard 1's servers' first jobs: one at ModelsLab, one finished but not shown, one being sent; two of shard
        0's at ModelsLab (4 places taken); then the 55 others, waiting in line."""
        await self.at_modelslab(self.on_shard_1[0])
        finished = await self.at_modelslab(self.on_shard_1[1])
        token = self.interactions[finished.prompt].token
        self.result_post = rf"/webhooks/\d+/{re.escape(token)}/messages/@original$"
        self.discord.fail_next("PATCH", self.result_post, 500, times=100_000)
        self.modelslab.complete(next(job.id for job in self.modelslab.jobs.values() if job.track_id == finished.id))
        await self.discord.wait_for_request(
            "PATCH", self.result_post, lambda r: r.injected and bool(r.files), timeout=20
        )
        await self.at_modelslab(self.on_shard_0[0])
        await self.at_modelslab(self.on_shard_0[1])
        self.modelslab.script(Hang(HANG, then=Queued(eta=ETA)))
        being_sent = self.on_shard_1[2].prompt(0)
        await self.send(self.on_shard_1[2], 0)
        self.under_way = await self.modelslab.wait_for_request(
            r"/text2img$", lambda call: isinstance(call.json, dict) and call.json.get("prompt") == being_sent
        )
        for n in range(JOBS_EACH):  # in rounds, so that each member's jobs are stored in the order asked
            for member in self.members:
                if member.prompt(n) not in self.interactions:
                    await self.send(member, n)
        statuses = Counter(row.status for row in await self.cluster.jobs())
        assert statuses == {"queued": 55, "processing": 3, "submitting": 1, "succeeded": 1}, statuses
        assert not self.under_way.answered, f"ModelsLab answered within {HANG} s: the machine is too slow for this"

    def let_results_through(self) -> None:
        """Discord takes the refused result again."""
        lift_failures(self.discord, self.result_post)

    async def finish(self) -> None:
        cluster, modelslab = self.cluster, self.modelslab
        while not all(row.posted for row in await cluster.jobs()):
            cluster.check_processes()
            unfinished = sorted((j for j in modelslab.jobs.values() if not j.finished), key=lambda j: j.submitted_at)
            if not unfinished:  # what is left: the job whose submit answer is held, until ModelsLab has it
                await eventually(progressed(cluster, modelslab), "ModelsLab to have a job again", timeout=HANG + 20)
                continue
            waiting = sum(1 for row in await cluster.jobs() if row.status == "queued")
            sent = len(modelslab.submissions())
            modelslab.complete(unfinished[0].id)
            if waiting:
                await eventually(next_sent(modelslab, sent), "the next job in line to be sent", timeout=20)
        shown = self.interactions.values()
        await eventually(lambda: all(images_shown(i) == 1 for i in shown), "every result shown", timeout=20)

    async def check(self) -> None:
        """Every job shown once, charged once, sent to ModelsLab once; never more than MODELSLAB_MAX_QUEUED at
        ModelsLab; the 55 that waited sent in round-robin order by member, each member's in the order asked."""
        rows = await self.cluster.jobs()
        assert Counter((row.status, row.charged_images, row.posted) for row in rows) == {("succeeded", 1, True): 60}
        assert sorted(submitted_prompts(self.modelslab)) == sorted(self.interactions), "each job sent once"
        uploads = uploads_by_interaction(self.discord)
        assert {prompt: uploads[i.id] for prompt, i in self.interactions.items() if uploads[i.id] != 1} == {}
        assert len([m for m in self.discord.messages.values() if m.attachments]) == 60  # no second message
        assert self.modelslab.limit_violations == 0 and self.modelslab.peak_queued[DEFAULT_KEY] <= MAX_QUEUED
        assert self.under_way is not None
        in_line = submitted_prompts(self.modelslab, since=self.modelslab.requests.index(self.under_way) + 1)
        assert len(in_line) == 55
        assert fair_order_problems([member_of(prompt) for prompt in in_line]) == []
        for member in self.members:
            numbers = [number_of(prompt) for prompt in in_line if member_of(prompt) == member.label]
            assert numbers == sorted(numbers), (member.label, numbers)
        assert all(d.status == 200 for d in self.modelslab.webhook_deliveries), self.modelslab.webhook_deliveries
        for call in self.modelslab.submissions():  # every webhook through the proxy, signed with the one SECRET_KEY
            assert call.json["webhook"] == self.cluster.webhook_url(call.json["track_id"])


def next_sent(modelslab: FakeModelsLab, sent: int) -> Callable[[], bool]:
    """A condition: more than `sent` jobs have reached ModelsLab."""
    return lambda: len(modelslab.submissions()) > sent


def progressed(cluster: Cluster, modelslab: FakeModelsLab) -> Callable[[], Awaitable[bool]]:
    """A condition: ModelsLab holds an unfinished job again, or every job has been shown."""

    async def condition() -> bool:
        cluster.check_processes()
        if any(not job.finished for job in modelslab.jobs.values()):
            return True
        return all(row.posted for row in await cluster.jobs())

    return condition


@pytest.mark.timeout(240)
async def test_one_process_killed_while_it_owns_jobs_in_every_state_finishes_them_when_started_again(
    cluster: Cluster, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """The cluster scenario's day for one unsharded process on PostgreSQL, as on main today: SIGKILLed in the same
    moment and started again by its supervisor, it finishes every job as the three processes must (the harness and
    the checks of the three-process test, on a bot that holds them today)."""
    day = BusyDay(cluster, discord_server, modelslab)
    cluster.add("bot")
    await cluster.start()
    await day.hold_every_state()
    await cluster.kill("bot")
    day.let_results_through()
    await cluster.start("bot")
    await day.finish()
    assert await cluster.stop_all() == {"bot": 0}
    await day.check()
    assert cluster.errors() == []


@pytest.mark.timeout(240)
async def test_three_processes_survive_one_killed_while_it_owns_jobs_in_every_state(
    cluster: Cluster, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """3 processes (SHARD_COUNT=2: shard 0, shard 1, and a worker without gateway), 60 jobs from 4 servers, and the
    shard-1 process SIGKILLed while it holds jobs waiting in line, one whose submit call is under way, one at
    ModelsLab and one finished but not yet shown. The two others take them over within LEASE_SECONDS and finish
    them as a restart would: every job shown once, charged once, sent to ModelsLab once (the one whose answer was
    lost is resolved by its webhook), never more than MODELSLAB_MAX_QUEUED at ModelsLab, in round-robin order by
    member."""
    day = BusyDay(cluster, discord_server, modelslab)
    cluster.add("shard-0", SHARD_COUNT="2", SHARD_IDS="0")
    cluster.add("shard-1", SHARD_COUNT="2", SHARD_IDS="1")
    cluster.add("worker", SHARD_COUNT="2", SHARD_IDS="")
    await cluster.start()
    await day.hold_every_state()
    held = await cluster.unposted_owned_by("shard-1")  # the jobs of shard 1's servers are its own
    assert {"queued", "submitting", "processing", "succeeded"} <= set(held), held

    await cluster.kill("shard-1")
    day.let_results_through()
    await cluster.wait_until_owned_by_none("shard-1", timeout=LEASE_SECONDS * 5 + 15)
    await day.finish()
    assert await cluster.stop_all() == {"shard-0": 0, "worker": 0}
    await day.check()
    assert cluster.errors() == []


# ---------------------------------------------------------------------------------------------- handing over


async def test_a_stopped_process_hands_its_jobs_over_at_once_and_a_cancel_reaches_their_new_owner(
    cluster: Cluster, discord_server: FakeDiscord, modelslab: FakeModelsLab
):
    """SIGTERM: the process's jobs go to the others at once, not after LEASE_SECONDS (a minute here). Then a member
    presses Cancel in the process that answers the server's commands, while their job waits in line in another."""
    modelslab.default_behaviour = Queued(eta=ETA)
    cluster.common.update(LEASE_SECONDS="60", MODELSLAB_MAX_QUEUED="1")
    cluster.add("bot")
    cluster.add("worker", SHARD_COUNT="1", SHARD_IDS="")
    await cluster.start()
    guild, member = discord_server.guild, discord_server.member_id
    running = await imagine(discord_server, "running", user_id=member, guild_id=guild.id)
    waiting = await imagine(discord_server, "waiting", user_id=member, guild_id=guild.id)
    await cluster.wait_job("running", lambda row: row.status == "processing", "at ModelsLab")
    assert set((await cluster.owners()).values()) == {"bot"}  # it stored both: they are its own

    assert await cluster.stop("bot") == 0
    took = await cluster.wait_until_owned_by_none("bot", timeout=20)
    assert took < 30 and set((await cluster.owners()).values()) == {"worker"}

    await cluster.start("bot")  # back, as a supervisor restarts it: it answers the commands, the worker drives
    job = await cluster.job("waiting")
    status = waiting.original
    assert job is not None and status is not None
    cancel = await discord_server.invoke_component(status.id, f"job:cancel:{job.id}", user_id=member)
    await cancel.wait_callback()
    assert cancel.original is not None and "Cancelled: it will not be sent" in cancel.original.content
    await eventually(lambda: "Cancelled by" in status.content, "the status to say cancelled")
    modelslab.complete_all()
    await eventually(lambda: images_shown(running) == 1, "the running job's result", timeout=20)
    assert submitted_prompts(modelslab) == ["running"]
    rows = {row.prompt: row for row in await cluster.jobs()}
    assert (rows["waiting"].status, rows["waiting"].charged_images, rows["waiting"].posted) == ("failed", 0, True)
    assert await cluster.stop_all() == {"bot": 0, "worker": 0}
    assert cluster.errors() == []
