"""The blocklist end to end: a crafted prompt cannot freeze the bot, and an admin's list is capped with a sentence."""

from __future__ import annotations

from bot.guilds.rules import MAX_BLOCKLIST_RULE_LENGTH, MAX_BLOCKLIST_RULES
from tests.e2e.conftest import BotRunner
from tests.e2e.test_config import config, private_text
from tests.fakes.discord_server import FakeDiscord


async def test_a_crafted_prompt_against_a_many_star_rule_does_not_hold_up_other_members(
    runner: BotRunner, discord_server: FakeDiscord, modelslab
):
    """Before: the rule became nested `\\w*` and this 251-character prompt kept the event loop busy for seconds,
    so every command in every server missed Discord's 3 seconds (the fake Discord refuses a late answer)."""
    await runner.start()
    added = await config(discord_server, "blocklist", {"action": "add", "rule": "n*i*g*g*e*r"})
    assert "added" in await private_text(discord_server, added)
    crafted = "n" + "i" * 60 + "g" * 130 + "e" * 60  # every letter of the rule but the last
    attacker = await discord_server.invoke_slash("imagine", {"prompt": crafted})
    bystander = await discord_server.invoke_slash(
        "imagine", {"prompt": "a castle"}, user_id=discord_server.other_member_id
    )
    await attacker.wait_callback()
    await bystander.wait_callback()
    assert attacker.acknowledged and bystander.acknowledged
    refused = await discord_server.invoke_slash("imagine", {"prompt": crafted + "r"})
    await refused.wait_callback()
    assert refused.acknowledged and "(rule: `n*i*g*g*e*r`)" in await private_text(discord_server, refused)


async def test_the_blocklist_is_capped_with_a_sentence_and_older_long_rules_can_be_removed(
    runner: BotRunner, discord_server: FakeDiscord, modelslab
):
    app = await runner.start()
    guild = discord_server.guild_id
    store = app.storage.guilds
    legacy = "a rule from before the cap " + "x" * MAX_BLOCKLIST_RULE_LENGTH
    await store.add_blocklist_rule(guild, legacy, added_by=1)
    for number in range(MAX_BLOCKLIST_RULES - 2):
        await store.add_blocklist_rule(guild, f"word{number}", added_by=1)
    await runner.restart()  # the bot reads the list afresh

    too_long = await config(
        discord_server, "blocklist", {"action": "add", "rule": "y" * (MAX_BLOCKLIST_RULE_LENGTH + 1)}
    )
    assert await private_text(discord_server, too_long) == (
        f"A blocklist rule may be at most {MAX_BLOCKLIST_RULE_LENGTH} characters long."
    )
    last = await config(discord_server, "blocklist", {"action": "add", "rule": "gore"})
    assert "`gore` added" in await private_text(discord_server, last)
    full = await config(discord_server, "blocklist", {"action": "add", "rule": "blood*"})
    assert await private_text(discord_server, full) == (
        f"This server's blocklist already holds {MAX_BLOCKLIST_RULES} rules, the most it can: "
        "remove one before adding another."
    )
    removed = await config(discord_server, "blocklist", {"action": "remove", "rule": legacy.upper()})
    assert "removed" in await private_text(discord_server, removed)
    assert len((await runner.guilds.config(guild)).blocklist) == MAX_BLOCKLIST_RULES - 1
