"""Settings: exact names, defaults, plain errors, the generated SECRET_KEY, and .env.example in step."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest

from bot.settings import Settings, SettingsError, ensure_secret_key, load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)  # no stray .env


def test_defaults_are_the_documented_ones(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    settings = load_settings()
    assert settings.discord_api_base == "https://discord.com/api/v10"
    assert settings.discord_gateway_url is None and settings.discord_dev_guild_id is None
    assert settings.modelslab_api_key is None
    assert settings.modelslab_base == "https://modelslab.com"
    assert settings.modelslab_api == "v6"
    assert settings.modelslab_default_model == "flux"
    assert settings.modelslab_job_timeout == 600
    assert settings.database_path == Path("./data/bot.sqlite3")
    assert (settings.webhook_host, settings.webhook_port) == ("0.0.0.0", 8080)
    assert settings.public_url is None and settings.secret_key is None


def test_missing_token_is_a_plain_error():
    with pytest.raises(SettingsError, match="DISCORD_TOKEN is required but not set"):
        load_settings()


def test_bad_values_are_named(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    monkeypatch.setenv("MODELSLAB_API", "v5")
    with pytest.raises(SettingsError, match="MODELSLAB_API"):
        load_settings()


def test_empty_values_in_env_file_mean_unset(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("DISCORD_TOKEN=abc\nMODELSLAB_API_KEY=\nPUBLIC_URL=\nDISCORD_DEV_GUILD_ID=\n")
    settings = load_settings()
    assert settings.discord_token.get_secret_value() == "abc"
    assert settings.modelslab_api_key is None and settings.public_url is None


def test_secrets_are_not_in_the_repr(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "very-secret-token")
    monkeypatch.setenv("MODELSLAB_API_KEY", "very-secret-key")
    monkeypatch.setenv("METRICS_TOKEN", "very-secret-metrics-token")
    assert "very-secret" not in repr(load_settings())


@pytest.mark.parametrize("token", ["short", "sixteen chars\nbut"])
def test_a_weak_metrics_token_is_refused(monkeypatch, token):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    monkeypatch.setenv("METRICS_TOKEN", token)
    with pytest.raises(SettingsError, match=r"METRICS_TOKEN: .*at least 16 printable characters"):
        load_settings()


def test_secret_key_is_generated_once_with_mode_0600(monkeypatch, tmp_path):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    monkeypatch.setenv("DATABASE_PATH", str(tmp_path / "data" / "bot.sqlite3"))
    settings = load_settings()
    key = ensure_secret_key(settings)
    path = tmp_path / "data" / "secret.key"
    assert len(key) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_secret_key(settings) == key


def test_env_example_lists_every_setting_and_nothing_else():
    text = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^#?\s*([A-Z][A-Z0-9_]+)=", text, flags=re.M))
    assert listed == {name.upper() for name in Settings.model_fields}


def test_readme_documents_every_setting():
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        assert f"`{name.upper()}`" in readme, name


def test_a_short_secret_key_is_a_plain_error(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    monkeypatch.setenv("SECRET_KEY", "short")
    with pytest.raises(SettingsError, match=r"SECRET_KEY: .*at least 16 characters"):
        load_settings()


def test_postgresql_needs_a_secret_key_shared_by_every_process(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    settings = load_settings()
    assert settings.database_url is None and settings.database_pool_size == 10  # SQLite, as before
    monkeypatch.setenv("DATABASE_URL", "postgresql://bot:hunter2-password@db:5432/imagine")
    with pytest.raises(SettingsError) as refusal:
        load_settings()
    assert "SECRET_KEY is required with DATABASE_URL" in str(refusal.value)
    monkeypatch.setenv("SECRET_KEY", "0123456789abcdef-shared")
    monkeypatch.setenv("DATABASE_POOL_SIZE", "4")
    settings = load_settings()
    assert settings.database_pool_size == 4
    assert "hunter2" not in repr(settings)


def test_a_database_url_that_is_not_postgresql_is_refused_without_echoing_it(monkeypatch):
    monkeypatch.setenv("DISCORD_TOKEN", "t")
    monkeypatch.setenv("SECRET_KEY", "0123456789abcdef-shared")
    monkeypatch.setenv("DATABASE_URL", "mysql://bot:hunter2-password@db/imagine")
    with pytest.raises(SettingsError, match=r"DATABASE_URL: .*must be a postgresql:// URL") as refusal:
        load_settings()
    assert "hunter2" not in str(refusal.value)
