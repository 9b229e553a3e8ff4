"""`python -m bot` as a separate process, configured only through environment variables, as an admin runs it."""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import os
import signal
import sqlite3
import stat
import sys
from pathlib import Path

import pytest
from PIL import Image

from bot.storage.migrations import available_migrations, migrations_directory
from bot.web.signing import WebhookSigner
from tests.e2e.conftest import BOT_TOKEN, free_port
from tests.fakes.discord_server import FakeDiscord
from tests.fakes.modelslab_server import DEFAULT_KEY, FakeModelsLab, Queued

ROOT = Path(__file__).resolve().parents[2]


def bot_environment(discord_server: FakeDiscord, modelslab: FakeModelsLab, data: Path, **extra: str) -> dict[str, str]:
    keep = {name: os.environ[name] for name in ("PATH", "HOME", "LANG", "SYSTEMROOT") if name in os.environ}
    return {
        **keep,
        "PYTHONPATH": str(ROOT),
        "DISCORD_TOKEN": BOT_TOKEN,
        "DISCORD_API_BASE": discord_server.api_base,
        "DISCORD_GATEWAY_URL": discord_server.gateway_url,
        "DISCORD_DEV_GUILD_ID": str(discord_server.guild_id),
        "MODELSLAB_API_KEY": DEFAULT_KEY,
        "MODELSLAB_BASE_URL": modelslab.base_url,
        "DATABASE_PATH": str(data / "bot.sqlite3"),
        "WEBHOOK_HOST": "127.0.0.1",
        "LOG_LEVEL": "DEBUG",
        **extra,
    }


async def run_module(*args: str, env: dict[str, str], cwd: Path) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        *args,
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    assert process.returncode is not None
    return process.returncode, output.decode()


async def test_the_bot_runs_as_a_process_from_environment_variables_only(discord_server, modelslab, tmp_path):
    port = free_port()
    env = bot_environment(
        discord_server,
        modelslab,
        tmp_path / "data",
        WEBHOOK_PORT=str(port),
        PUBLIC_URL=f"http://127.0.0.1:{port}",
        LOG_FORMAT="json",
    )
    modelslab.script(Queued(eta=30, ready_after_seconds=0.5))  # finished by ModelsLab's webhook, not by polling
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bot",
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        await discord_server.wait_until_ready(timeout=30)
        interaction = await discord_server.invoke_slash("imagine", {"prompt": "a process of its own", "width": 640})
        await interaction.wait_callback()
        assert interaction.callback_latency is not None and interaction.callback_latency < 3

        message = await discord_server.wait_for_message(
            lambda m: m.id == (interaction.original.id if interaction.original else -1) and bool(m.attachments),
            timeout=30,
        )
        with Image.open(io.BytesIO(message.attachments[0].data)) as image:
            assert image.size == (640, 512)
        delivery = await modelslab.wait_for_webhook_delivery(timeout=10)
        assert delivery.status == 200
        # Interaction tokens, prompts, pictures, sealed keys: for the bot's user only, while it runs.
        data = tmp_path / "data"
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        for name in ("bot.sqlite3", "bot.sqlite3-wal", "bot.sqlite3-shm", "secret.key"):
            assert stat.S_IMODE((data / name).stat().st_mode) == 0o600, name
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    log_text = output.decode()
    assert process.returncode == 0, log_text
    entries = [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]
    assert entries and len(entries) == len([line for line in log_text.splitlines() if line.strip()])  # all JSON
    assert any("Webhook receiver listening" in e["message"] for e in entries)
    assert any(e["level"] == "DEBUG" for e in entries)
    # uvloop's loop where it is installed (a dependency, except on Windows), asyncio's otherwise.
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert any(e["message"] == f"Event loop: {expected_loop}" for e in entries), log_text

    with sqlite3.connect(tmp_path / "data" / "bot.sqlite3") as database:
        rows = database.execute("SELECT id, status, image_count, posted_at IS NOT NULL FROM jobs").fetchall()
    [(job_id, status, image_count, posted)] = rows
    assert (status, image_count, posted) == ("succeeded", 1, 1)
    assert any(e.get("job_id") == job_id and "posted" in e["message"] for e in entries)  # one line per event
    secret_key = (tmp_path / "data" / "secret.key").read_bytes().strip()
    webhook_token = WebhookSigner(secret_key).token_for(job_id)
    # Even at LOG_LEVEL=DEBUG: no bot token, API key, interaction token or webhook token in the output.
    for secret in (BOT_TOKEN, DEFAULT_KEY, interaction.token, webhook_token):
        assert secret not in log_text
    assert (tmp_path / "data" / "secret.key").stat().st_mode & 0o777 == 0o600


async def test_a_missing_token_stops_the_process_with_a_plain_error(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    code, output = await run_module(env=env, cwd=tmp_path)
    assert code == 2
    assert "DISCORD_TOKEN is required but not set" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("content", "why"),
    [(b"", "it is empty"), (b"\n\n", "it is empty"), (b"\x00\xff" * 40, "it is not a key")],
    ids=["empty", "blank", "binary"],
)
async def test_an_empty_or_damaged_secret_key_stops_the_process_with_one_plain_error(
    discord_server, modelslab, tmp_path, content, why
):
    data = tmp_path / "data"
    data.mkdir()
    (data / "secret.key").write_bytes(content)
    code, output = await run_module(env=bot_environment(discord_server, modelslab, data), cwd=tmp_path)
    assert code == 2 and "Traceback" not in output
    [line] = [line for line in output.splitlines() if line.startswith("error:")]
    assert f"secret.key is damaged ({why}" in line and "restore it from your backup, or set SECRET_KEY" in line
    assert (data / "secret.key").read_bytes() == content  # never replaced: the stored server keys depend on it


async def test_db_upgrade_and_current_from_the_command_line(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), "DATABASE_PATH": str(tmp_path / "x.sqlite3")}
    latest = available_migrations(migrations_directory("sqlite"))[-1]
    code, output = await run_module("db", "upgrade", env=env, cwd=tmp_path)
    assert code == 0, output
    assert "applied 0001_jobs" in output and f"applied {latest.version:04d}_{latest.name}" in output
    code, output = await run_module("db", "current", env=env, cwd=tmp_path)
    assert code == 0 and f"schema version {latest.version}" in output


async def test_a_thousand_idle_connections_starve_neither_the_bot_nor_its_receiver(discord_server, modelslab, tmp_path):
    """1,100 idle sockets on the receiver of a bot held to 1,024 open files (no room to raise it): the bot's own
    calls to Discord and ModelsLab still work, and ModelsLab's webhook still gets an answer."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 1500:  # this test process holds the 1,100 client ends
        if hard != resource.RLIM_INFINITY and hard < 1500:
            pytest.skip("the test process may not open 1,500 files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (1500, hard))
    port = free_port()
    env = bot_environment(
        discord_server, modelslab, tmp_path / "data", WEBHOOK_PORT=str(port), PUBLIC_URL=f"http://127.0.0.1:{port}"
    )
    held_to_1024 = (
        "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024)); "
        "sys.argv = ['bot']; runpy.run_module('bot', run_name='__main__', alter_sys=True)"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        held_to_1024,
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        await discord_server.wait_until_ready(timeout=30)
        for _ in range(1100):
            flood.append(await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout=10))
        # The receiver took them all in: the oldest ones were closed to make room (or at their deadline).
        async with asyncio.timeout(30):
            assert await flood[800][0].read() == b""

        modelslab.script(Queued(eta=30, ready_after_seconds=0.5))
        interaction = await discord_server.invoke_slash("imagine", {"prompt": "under siege"})
        await interaction.wait_callback()
        message = await discord_server.wait_for_message(
            lambda m: m.id == (interaction.original.id if interaction.original else -1) and bool(m.attachments),
            timeout=30,
        )
        assert len(message.attachments) == 1
        delivery = await modelslab.wait_for_webhook_delivery(timeout=10)
        assert delivery.status == 200, delivery.error
    finally:
        for _, writer in flood:
            writer.close()
        process.send_signal(signal.SIGTERM)
        output, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert "Too many open files" not in output.decode()
