"""Server rules without Discord: role limits, refusal sentences, blocklist patterns, key encryption."""

from __future__ import annotations

import datetime

import pytest

from bot.guilds.keybox import KeyBox, KeyUnreadable, last4
from bot.guilds.rules import (
    GuildConfig,
    Limits,
    Refused,
    Usage,
    check_blocklist,
    check_channel,
    check_model,
    explain_refusal,
    limits_for,
    next_reset,
    normalise_rule,
)

NOON = datetime.datetime(2026, 11, 21, 12, 0, tzinfo=datetime.UTC).timestamp()
MIDNIGHT = int(datetime.datetime(2026, 11, 22, tzinfo=datetime.UTC).timestamp())


@pytest.mark.parametrize(
    ("user_daily", "roles", "expected"),
    [
        (5, {}, 5),
        (5, {10: 20}, 20),  # a higher role limit
        (5, {10: 3}, 5),  # a lower one does not reduce the server's
        (5, {10: 20, 11: 0}, 0),  # any unlimited role wins
        (0, {10: 20}, 0),  # no server limit: nothing to lift
    ],
)
def test_role_limits(user_daily, roles, expected):
    config = GuildConfig(guild_id=1, user_daily=user_daily, role_limits=roles)
    assert limits_for(config, [10, 11, 12]).user_daily == expected


def test_daily_counts_reset_at_utc_midnight():
    assert next_reset(NOON) == MIDNIGHT


@pytest.mark.parametrize(
    ("limits", "usage", "words"),
    [
        (Limits(cooldown_seconds=60), Usage(user_last_request_at=NOON - 10), f"ask again <t:{int(NOON + 50)}:R>"),
        (Limits(user_concurrent=2), Usage(user_running=2), "You already have 2 job(s) running"),
        (Limits(guild_daily=10), Usage(guild_today=9), "This server has 1 of its 10 images for today left"),
        (Limits(user_daily=4), Usage(user_today=4), "You have 0 of your 4 images for today left"),
    ],
)
def test_each_refusal_names_the_limit_and_when_it_resets(limits, usage, words):
    sentence = explain_refusal(limits, usage, samples=2, now=NOON)
    assert words in sentence
    if "daily" in sentence:
        assert f"resets <t:{MIDNIGHT}:R>" in sentence


def test_channel_restriction_and_threads():
    config = GuildConfig(guild_id=1, allowed_channels=(5,))
    check_channel(config, 5)
    check_channel(config, 99, parent_id=5)  # a thread of an allowed channel
    with pytest.raises(Refused, match="use <#5>"):
        check_channel(config, 6)
    check_channel(GuildConfig(guild_id=1), 6)  # no list: everywhere


def test_allowed_models():
    check_model(GuildConfig(guild_id=1), "anything")
    with pytest.raises(Refused, match="`sdxl`"):
        check_model(GuildConfig(guild_id=1, allowed_models=("sdxl",)), "flux")


@pytest.mark.parametrize(
    ("rule", "text", "hit"),
    [
        ("cat", "A CAT sat", True),
        ("cat", "concatenate", False),
        ("cat", "cat's toy", True),
        ("cat*", "catapult", True),
        ("*cat", "wildcat", True),
        ("dark magic", "dark\tmagic", True),
        ("dark magic", "darkmagic", False),
        ("c++", "learning c++ today", True),
    ],
)
def test_blocklist_patterns(rule, text, hit):
    if hit:
        with pytest.raises(Refused, match=rf"rule: `{rule.replace('*', '[*]').replace('+', '[+]')}`"):
            check_blocklist([rule], text)
    else:
        check_blocklist([rule], text)


def test_blocklist_rules_are_normalised_and_checked():
    assert normalise_rule("  Dark   MAGIC ") == "dark magic"
    with pytest.raises(Refused):
        normalise_rule("***")


def test_keys_are_sealed_per_server_and_need_the_same_secret():
    box = KeyBox(b"s" * 32)
    sealed = box.seal(42, "ml-secret-key-1234")
    assert b"ml-secret-key-1234" not in sealed
    assert box.open(42, sealed) == "ml-secret-key-1234"
    assert box.seal(42, "ml-secret-key-1234") != sealed  # a fresh nonce each time
    with pytest.raises(KeyUnreadable):
        box.open(43, sealed)  # copied to another server's row
    with pytest.raises(KeyUnreadable):
        KeyBox(b"t" * 32).open(42, sealed)  # another SECRET_KEY
    with pytest.raises(KeyUnreadable):
        box.open(42, sealed[:-1] + bytes([sealed[-1] ^ 1]))  # tampered
    assert last4("ml-secret-key-1234") == "1234"


@pytest.mark.parametrize("text", ["g\u200bore", "g\u00adore", "ｇｏｒｅ", "gore_splatter", "GORE"])
def test_the_blocklist_sees_through_invisible_and_lookalike_characters(text):
    with pytest.raises(Refused, match="rule: `gore`"):
        check_blocklist(["gore"], text)


def test_a_prompt_too_long_once_spelled_out_is_refused_unread_and_one_just_within_is_read():
    """U+FDFA is one character that NFKC spells out in 18: 2,000 of them would make the blocklist read 36,000."""
    with pytest.raises(Refused, match=r"too long for this server's blocklist.*36,000 characters, at most 4,000"):
        check_blocklist(["gore"], "\ufdfa" * 2000)
    check_blocklist(["gore"], "\ufdfa" * 222)  # 3,996 characters: read, and allowed
    with pytest.raises(Refused, match="rule: `gore`"):
        check_blocklist(["gore"], "\ufdfa" * 221 + " gore")
    check_blocklist([], "\ufdfa" * 2000)  # no blocklist: nothing to read, nothing refused


def test_settings_and_refusals_stay_within_discords_message_limit():
    from cogs.config import describe

    config = GuildConfig(
        guild_id=1,
        role_limits={10**18 + n: n + 10 for n in range(25)},
        allowed_channels=tuple(10**18 + n for n in range(25)),
        allowed_models=tuple("m" * 90 + str(n) for n in range(25)),
        default_negative_prompt="x" * 2000,
        user_daily=5,
        api_key_last4="abcd",
    )
    assert len(describe(config, operator_key=False)) <= 2000
    for check in (lambda: check_channel(config, 5), lambda: check_model(config, "other")):
        with pytest.raises(Refused) as refusal:
            check()
        assert len(refusal.value.message) <= 2000 and "and 15 more" in refusal.value.message
