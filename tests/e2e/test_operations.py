"""Running it for real: check, invite-url, /healthz, /metrics, JSON logs, graceful shutdown, the container files."""

from __future__ import annotations

import asyncio
import re
import sys
import tomllib
from asyncio.subprocess import PIPE, STDOUT
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from bot import PROJECT_URL, __version__
from bot.app import running_app
from bot.jobs.model import JobStatus
from bot.operations import PERMISSIONS_VALUE, USER_AGENT, open_to_strangers
from bot.settings import Settings
from tests.e2e.conftest import BOT_TOKEN, BotRunner, attachments_of, free_port
from tests.e2e.test_process import bot_environment
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import ErrorAnswer, FakeModelsLab, Queued

ROOT = Path(__file__).resolve().parents[2]


async def run_cli(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, env=env, cwd=cwd, stdout=PIPE, stderr=STDOUT
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_check_says_what_works_and_what_does_not(discord_server: FakeDiscord, modelslab: FakeModelsLab, tmp_path):
    env = bot_environment(discord_server, modelslab, tmp_path / "data")
    code, output = await run_cli("check", env=env, cwd=tmp_path)
    assert code == 0, output
    for part in ("settings", "database", "Discord", "ModelsLab", "webhooks"):
        assert re.search(rf"^✓ {part}: ", output, re.M), output
    assert "logged in as" in output and f"application {discord_server.application_id}" in output

    # The fake's application is public, as Discord's "Public Bot" switch is by default, and the default key is allowed.
    assert "⚠ default key: strangers can spend your ModelsLab credits: the application is a Public Bot" in output
    assert "MODELSLAB_API_KEY without limit; turn Public Bot off" in output
    # Discord's required User-Agent on the bot's own calls to Discord: DiscordBot ($url, $version).
    checked = [r for r in discord_server.requests if r.path in ("/users/@me", "/oauth2/applications/@me")]
    assert checked and {r.headers.get("User-Agent") for r in checked} == {USER_AGENT}
    assert f"DiscordBot ({PROJECT_URL}, {__version__})" == USER_AGENT

    capped = {**env, "DEFAULT_KEY_GUILD_DAILY": "20"}
    code, output = await run_cli("check", env=capped, cwd=tmp_path)
    assert code == 0 and "up to 20 images a day per server (DEFAULT_KEY_GUILD_DAILY)" in output
    code, output = await run_cli("check", env={**env, "ALLOW_DEFAULT_KEY": "false"}, cwd=tmp_path)
    assert code == 0 and "⚠" not in output

    bad = {**env, "MODELSLAB_API_KEY": "ml-wrong-key-000000", "DISCORD_TOKEN": "not.a.token"}
    code, output = await run_cli("check", env=bad, cwd=tmp_path)
    assert code == 1
    assert "✗ Discord: the bot token was refused" in output
    assert "✗ ModelsLab: MODELSLAB_API_KEY: ModelsLab refused this server's API key (invalid key)" in output
    assert "ml-wrong-key-000000" not in output and "not.a.token" not in output


async def test_invite_url_has_exactly_the_scopes_and_permissions(discord_server, modelslab, tmp_path):
    env = bot_environment(discord_server, modelslab, tmp_path / "data")
    code, output = await run_cli("invite-url", env=env, cwd=tmp_path)
    assert code == 0, output
    assert output.strip() == (
        f"https://discord.com/oauth2/authorize?client_id={discord_server.application_id}"
        f"&scope=bot+applications.commands&permissions={PERMISSIONS_VALUE}"
    )
    readme = (ROOT / "README.md").read_text()
    assert f"permissions={PERMISSIONS_VALUE}" in readme  # the README's link is the same
    assert {r.headers.get("User-Agent") for r in discord_server.requests} == {USER_AGENT}


async def test_the_start_up_log_warns_when_strangers_can_spend_the_default_key(runner, discord_server, logs):
    await runner.start()
    [warning] = [r for r in logs.records if r.getMessage().startswith("Default key: strangers can spend")]
    assert warning.levelname == "WARNING" and "Public Bot" in warning.getMessage()
    await runner.restart(allow_default_key=False)
    assert len([r for r in logs.records if "strangers can spend" in r.getMessage()]) == 1


async def test_interaction_calls_carry_the_discordbot_user_agent(runner, discord_server, modelslab):
    """discord.py sends none on interaction callbacks and webhooks; the bot's trace hook fills the gap."""
    await runner.start()
    interaction = await discord_server.invoke_slash("imagine", {"prompt": "a cat"})
    await interaction.wait_callback()
    await runner.wait_posted()
    agents: dict[str, set[str | None]] = {}
    for request in discord_server.requests:
        kind = "interaction" if request.path.startswith(("/interactions/", "/webhooks/")) else "rest"
        agents.setdefault(kind, set()).add(request.headers.get("User-Agent"))
    assert agents["interaction"] == {USER_AGENT}  # the callback, and the result's edit of @original
    assert all(
        agent and agent.startswith("DiscordBot (https://github.com/Rapptz/discord.py") for agent in agents["rest"]
    )


def test_only_a_public_application_that_allows_the_default_key_is_a_risk():
    settings = Settings(_env_file=None, discord_token="t", modelslab_api_key="ml-key-0123456789")  # type: ignore[call-arg,arg-type]
    assert open_to_strangers(True, settings) is not None
    assert open_to_strangers(False, settings) is None  # "Public Bot" off: only the owner can add it
    assert open_to_strangers(None, settings) is None  # not known
    no_default = settings.model_copy(update={"allow_default_key": False})
    assert open_to_strangers(True, no_default) is None
    assert open_to_strangers(True, settings.model_copy(update={"modelslab_api_key": None})) is None


def test_the_project_url_and_version_are_the_ones_in_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["urls"]["Repository"] == PROJECT_URL
    assert project["dynamic"] == ["version"]
    assert PROJECT_URL in (ROOT / "README.md").read_text()


async def test_healthz_is_503_until_connected_then_200(runner: BotRunner, discord_server, modelslab):
    port = free_port()
    settings = runner.settings(webhook_port=port)
    async with running_app(settings, guild_ready_timeout=0.05) as app, aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 503  # database open, Discord not yet
        identified = discord_server.identify_count
        task = asyncio.create_task(app.bot.start(BOT_TOKEN))
        await discord_server.wait_until_ready(after=identified)
        await app.bot.wait_until_ready()
        async with session.get(f"http://127.0.0.1:{port}/healthz") as response:
            assert response.status == 200
        await app.bot.close()
        await task


METRICS_TOKEN = "metrics-token-0123456789abcdef"


async def test_metrics_count_jobs_errors_queue_and_latencies(runner, discord_server, modelslab):
    port = free_port()
    modelslab.script(ErrorAnswer(message="Model not found"))
    await runner.start(webhook_port=port, metrics_token=METRICS_TOKEN)
    for prompt in ("first", "second"):
        interaction = await discord_server.invoke_slash("imagine", {"prompt": prompt})
        await interaction.wait_callback()
    await runner.jobs.wait_idle()
    bearer = {"Authorization": f"Bearer {METRICS_TOKEN}"}
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics", headers=bearer) as response,
    ):
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    assert 'imagine_jobs_total{kind="text2img",status="succeeded"} 1' in text
    assert 'imagine_jobs_total{kind="text2img",status="model_not_found"} 1' in text
    assert 'imagine_modelslab_errors_total{kind="model_not_found"} 1' in text
    assert "imagine_ack_latency_seconds_count 2" in text
    assert "imagine_ready_to_posted_seconds_count 1" in text
    assert "# TYPE imagine_queue_depth gauge" in text
    assert "ml-test-key" not in text


async def test_metrics_answer_only_to_the_metrics_token_and_healthz_to_anyone(runner, discord_server, modelslab):
    port = free_port()
    await runner.start(webhook_port=port, metrics_token=METRICS_TOKEN)
    url = f"http://127.0.0.1:{port}"
    wrong = [{}, {"Authorization": "Bearer wrong-token-0123456789ab"}, {"Authorization": METRICS_TOKEN}]
    wrong.append({"Authorization": f"Bearer {METRICS_TOKEN}x"})
    wrong.append({"Authorization": f"Basic {METRICS_TOKEN}"})
    async with aiohttp.ClientSession() as session:
        for headers in wrong:
            async with session.get(f"{url}/metrics", headers=headers) as response:
                assert response.status == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
                assert "imagine_" not in await response.text()
        async with session.get(f"{url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}) as response:
            assert response.status == 200 and "imagine_jobs_total" in await response.text()
        async with session.get(f"{url}/healthz") as response:
            assert response.status == 200  # public: it says only whether the bot is up

    await runner.restart(metrics_token=None)  # no METRICS_TOKEN: no /metrics at all
    [address] = runner.app.webhook_runner.addresses if runner.app else []
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": f"Bearer {METRICS_TOKEN}"}):
            async with session.get(f"http://127.0.0.1:{address[1]}/metrics", headers=headers) as response:
                assert response.status == 404


async def test_shutdown_finishes_posting_and_keeps_the_rest_queued(runner, discord_server, modelslab):
    modelslab.default_behaviour = Queued(eta=300)
    await runner.start(modelslab_max_queued=1)
    first = await discord_server.invoke_slash("imagine", {"prompt": "being posted"})
    await first.wait_callback()
    second = await discord_server.invoke_slash("imagine", {"prompt": "still waiting"})
    await second.wait_callback()
    call = await modelslab.wait_for_submission()
    await runner_generating(runner, discord_server, first)
    # Discord answers the result's upload with a 500 once: discord.py waits a second and tries again.
    its_message = rf"/webhooks/\d+/{re.escape(first.token)}/messages/@original$"
    discord_server.fail_next("PATCH", its_message, 500)
    assert call.job_id is not None
    modelslab.complete(call.job_id)
    runner.jobs.wake(call.json["track_id"])
    await discord_server.wait_for_request("PATCH", its_message, lambda r: r.injected and bool(r.files))
    assert runner.app is not None
    await runner.app.shutdown()

    assert len(attachments_of(first.original)) == 1  # finished posting before stopping
    await runner.start(modelslab_max_queued=1)
    waiting = await runner.store.get(await _job_of(runner, "still waiting"))
    assert waiting is not None and waiting.status in (JobStatus.QUEUED, JobStatus.SUBMITTING, JobStatus.PROCESSING)
    assert len(modelslab.submissions()) in (1, 2)  # kept, then taken up again after the start


async def runner_generating(runner: BotRunner, discord_server: FakeDiscord, interaction) -> None:
    await discord_server.wait_for_message(
        lambda m: m.id == (interaction.original.id if interaction.original else -1) and "Generating" in m.content
    )


async def _job_of(runner: BotRunner, prompt: str) -> str:
    assert runner.app is not None
    row = await runner.sql_one("SELECT id FROM jobs WHERE json_extract(request_json, '$.prompt') = ?", (prompt,))
    assert row is not None
    return str(row[0])


async def test_new_commands_are_refused_while_shutting_down(runner, discord_server, modelslab):
    await runner.start()
    runner.jobs.draining = True
    refused = await discord_server.invoke_slash("imagine", {"prompt": "too late"})
    await refused.wait_callback()
    assert refused.original.flags & 64 and "restarting" in refused.original.content
    assert await runner.job_count() == 0


def test_the_container_files_follow_the_rules():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", dockerfile, re.M)) >= 2  # multi-stage
    assert dockerfile.index("pip install") < dockerfile.index("COPY bot ")  # dependencies before the source
    assert re.search(r"^USER (?!root)\w+", dockerfile, re.M) and 'VOLUME ["/data"]' in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile
    assert "pip install --require-hashes -r requirements.lock" in dockerfile  # the hashed pins, nothing resolved
    assert re.search(r"install -d -m 0700 -o \w+ /data", dockerfile)  # the data folder is the bot user's only
    compose = (ROOT / "docker-compose.yml").read_text()
    assert "env_file: .env" in compose and "/data" in compose
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".env" in ignored and "data/" in ignored and "*.sqlite3" in ignored


# ---------------------------------------------------------------------------------------------- docker-compose.yml

# Issue 15's settings, named in the compose file's "large" profile before they reach `Settings` (then drop this).
PENDING_SETTINGS = {"SHARD_COUNT", "SHARD_IDS", "WORKER_ID", "LEASE_SECONDS"}


def read_yaml_subset(text: str) -> Any:
    """The block-style YAML that docker-compose.yml is written in: mappings, lists of scalars, flow lists of
    scalars ([a, "b c"]), quoted or plain scalars, comments. Anything else (anchors, multi-line strings) raises, so
    that the file stays readable by this test and by people."""
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        content = _without_comment(raw).rstrip()
        if content.strip():
            if re.search(r"(^|\s)[&*]\w|<<:|: [|>]", content):
                raise ValueError(f"not in the subset this test reads: {raw!r}")
            lines.append((len(content) - len(content.lstrip()), content.strip()))

    def block(start: int, indent: int) -> tuple[Any, int]:
        if lines[start][1].startswith("- "):
            items: list[Any] = []
            index = start
            while index < len(lines) and lines[index][0] == indent and lines[index][1].startswith("- "):
                items.append(_scalar(lines[index][1][2:]))
                index += 1
            return items, index
        mapping: dict[str, Any] = {}
        index = start
        while index < len(lines) and lines[index][0] == indent:
            key, _, value = lines[index][1].partition(":")
            if value.strip():
                mapping[key] = _scalar(value)
                index += 1
            elif index + 1 < len(lines) and lines[index + 1][0] > indent:
                mapping[key], index = block(index + 1, lines[index + 1][0])
            else:
                mapping[key] = None
                index += 1
        return mapping, index

    parsed, end = block(0, 0)
    assert end == len(lines), f"could not read line {lines[end]}"
    return parsed


def _without_comment(line: str) -> str:
    quote = None
    for index, char in enumerate(line):
        if char in "\"'" and quote in (None, char):
            quote = None if quote else char
        elif char == "#" and quote is None and (index == 0 or line[index - 1] == " "):
            return line[:index]
    return line


def _scalar(text: str) -> Any:
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):
        return [_scalar(part) for part in re.findall(r'"[^"]*"|\'[^\']*\'|[^,\s][^,]*', text[1:-1])]
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def test_docker_compose_up_still_runs_one_process_on_sqlite():
    services = read_yaml_subset((ROOT / "docker-compose.yml").read_text())["services"]
    assert [name for name, service in services.items() if "profiles" not in service] == ["bot"]
    assert services["bot"] == {
        "build": ".",
        "image": "modelslab-imagine-bot",
        "env_file": ".env",
        "environment": {"DATABASE_PATH": "/data/bot.sqlite3", "WEBHOOK_HOST": "0.0.0.0", "WEBHOOK_PORT": "8080"},
        "volumes": ["data:/data"],
        "ports": ["8080:8080"],
        "restart": "unless-stopped",
        "stop_grace_period": "45s",
    }


def test_the_large_profile_runs_two_shards_on_postgresql_behind_one_rest_proxy():
    compose = read_yaml_subset((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    large = {name: service for name, service in services.items() if "large" in service.get("profiles", [])}
    bots = {name: service for name, service in large.items() if service.get("image") == services["bot"]["image"]}
    assert len(bots) == 2 and set(large) - set(bots) == {"db", "discord-proxy"}

    db = services["db"]
    assert re.fullmatch(r"postgres:\d+(-alpine)?", db["image"]) and "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert db["volumes"] == ["pgdata:/var/lib/postgresql/data"] and "pgdata" in compose["volumes"]
    proxy = services["discord-proxy"]
    assert re.fullmatch(r"ghcr\.io/germanoeich/nirn-proxy:v\d+\.\d+\.\d+", proxy["image"])  # pinned, not latest
    assert int(proxy["environment"]["REQUEST_TIMEOUT"]) >= 60_000  # ms: its 5 s default cuts large uploads short
    assert "ports" not in proxy  # plain HTTP with the bot's token: never published

    environments = [bot["environment"] for bot in bots.values()]
    shared = {"DATABASE_URL", "DISCORD_API_BASE", "SHARD_COUNT"}
    for name in shared:
        assert len({environment[name] for environment in environments}) == 1, name
    settings = {name.upper() for name in Settings.model_fields} | PENDING_SETTINGS
    url = urlsplit(environments[0]["DATABASE_URL"])
    assert (url.scheme, url.hostname, url.port, url.path) == ("postgresql", "db", 5432, "/imagine")
    assert (url.username, url.password) == (db["environment"]["POSTGRES_USER"], "${POSTGRES_PASSWORD:-}")
    assert environments[0]["DISCORD_API_BASE"] == f"http://discord-proxy:{proxy['environment']['PORT']}/api/v10"
    count = int(environments[0]["SHARD_COUNT"])
    assert sorted(int(environment["SHARD_IDS"]) for environment in environments) == list(range(count))
    assert len({environment["WORKER_ID"] for environment in environments}) == 2
    for bot in bots.values():
        # SECRET_KEY, PUBLIC_URL, MODELSLAB_MAX_QUEUED: from the one .env, so the same in both processes.
        assert bot["env_file"] == ".env" and set(bot["environment"]) <= settings
        assert not {"SECRET_KEY", "MODELSLAB_MAX_QUEUED"} & set(bot["environment"])
        assert bot["depends_on"] == {
            "db": {"condition": "service_healthy"},
            "discord-proxy": {"condition": "service_started"},
        }
        assert all(port.startswith("127.0.0.1:") for port in bot["ports"])  # behind the operator's TLS proxy
    assert "asyncpg==" in (ROOT / "requirements.lock").read_text()  # the image can reach PostgreSQL
