"""The fake Discord, exercised by a real discord.py bot over real HTTP and a real websocket on 127.0.0.1.

The bot here is deliberately minimal (defined in this file): it proves that the fake is faithful enough for
discord.py and that the fake holds a bot to Discord's rules. The project's own bot is tested elsewhere.
"""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import discord
import pytest
from discord import app_commands
from discord.ext import commands

from tests.fakes.discord_server import (
    DiscordErrorLog,
    FakeDiscord,
    FakeInteraction,
    FakeMessage,
    Permissions,
    point_discord_py_at,
    running_bot,
    running_fake_discord,
)

pytestmark = pytest.mark.timeout(30)


def tiny_png(width: int = 3, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ----------------------------------------------------------------------------------------------------------------------
# The minimal bot
# ----------------------------------------------------------------------------------------------------------------------


class PressView(discord.ui.View):
    """A persistent view: no timeout, explicit custom id."""

    def __init__(self) -> None:
        super().__init__(timeout=None)

    @discord.ui.button(label="Press", style=discord.ButtonStyle.primary, custom_id="mini:press")
    async def press(self, interaction, button):
        await interaction.response.edit_message(content=f"pressed by {interaction.user.id}")


class RenameModal(discord.ui.Modal, title="Rename"):
    name: discord.ui.TextInput[RenameModal] = discord.ui.TextInput(label="New name", custom_id="mini:new-name")

    def __init__(self) -> None:
        super().__init__(custom_id="mini:rename-modal")

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.edit_message(content=f"renamed to {self.name.value}")


class MenuView(discord.ui.View):
    def __init__(self) -> None:
        super().__init__(timeout=60)

    @discord.ui.select(custom_id="mini:select", options=[discord.SelectOption(label=x, value=x) for x in "abc"])
    async def choose(self, interaction, select):
        await interaction.response.edit_message(content=f"chose {select.values}")

    @discord.ui.button(label="Rename", custom_id="mini:rename")
    async def rename(self, interaction, button):
        await interaction.response.send_modal(RenameModal())


class NoteModal(discord.ui.Modal, title="Add a note"):
    note: discord.ui.TextInput[NoteModal] = discord.ui.TextInput(label="Note", custom_id="mini:note", max_length=100)

    def __init__(self, target_id: int) -> None:
        super().__init__(custom_id="mini:note-modal")
        self.target_id = target_id

    async def on_submit(self, interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"note on {self.target_id}: {self.note.value}")


class MiniBot(commands.Bot):
    def __init__(self, guild_id: int, *, intents: discord.Intents | None = None) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,
            intents=intents or discord.Intents.default(),
            guild_ready_timeout=0.05,
        )
        self.guild_id = guild_id
        self.notes: asyncio.Queue[tuple[Any, ...]] = asyncio.Queue()
        self.release = asyncio.Event()
        add_commands(self)

    async def setup_hook(self) -> None:
        self.add_view(PressView())
        await self.tree.sync()
        await self.tree.sync(guild=discord.Object(self.guild_id))

    async def next_note(self, wait: float = 5) -> tuple[Any, ...]:
        return await asyncio.wait_for(self.notes.get(), wait)


def add_commands(bot: MiniBot) -> None:
    tree = bot.tree

    @tree.command(name="hello", description="Say hello")
    @app_commands.describe(name="Who to greet", times="How many times")
    async def hello(interaction: discord.Interaction, name: str, times: app_commands.Range[int, 1, 5] = 1) -> None:
        await bot.notes.put(("hello", name, times, type(times).__name__))
        await interaction.response.send_message(" ".join([f"Hello {name}!"] * times))

    @tree.command(name="draw", description="Draw something", guild=discord.Object(bot.guild_id))
    async def draw(interaction: discord.Interaction, prompt: str, image: discord.Attachment | None = None) -> None:
        await interaction.response.defer(thinking=True)
        data = await image.read() if image is not None else tiny_png()
        picture = discord.File(io.BytesIO(data), filename="drawing.png")
        await interaction.edit_original_response(content=f"Drew {prompt}", attachments=[picture])

    @tree.command(name="twice", description="Answer, then follow up")
    async def twice(interaction: discord.Interaction) -> None:
        response = await interaction.response.send_message("one")
        followup = await interaction.followup.send("two", wait=True)
        await bot.notes.put(("twice", response.message_id, followup.id))

    @tree.command(name="later", description="Think, then answer with a followup")
    async def later(interaction: discord.Interaction) -> None:
        await interaction.response.defer(thinking=True, ephemeral=True)
        message = await interaction.followup.send("finished", wait=True)
        await bot.notes.put(("later", message.id))

    @tree.command(name="secret", description="Answer privately")
    async def secret(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("for your eyes only", ephemeral=True)

    @tree.command(name="slow", description="Answer too late")
    async def slow(interaction: discord.Interaction) -> None:
        await asyncio.sleep(3.2)
        try:
            await interaction.response.send_message("sorry, I was slow")
        except discord.NotFound as exc:
            await bot.notes.put(("slow", exc.status, exc.code))

    @tree.command(name="double", description="Answer twice")
    async def double(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("first")
        try:
            # A second InteractionResponse bypasses discord.py's own guard, as two code paths in a bot could.
            await discord.InteractionResponse(interaction).send_message("second")
        except discord.HTTPException as exc:
            await bot.notes.put(("double", exc.status, exc.code))

    @tree.command(name="remember", description="Answer, then edit much later")
    async def remember(interaction: discord.Interaction) -> None:
        response = await interaction.response.send_message("working")
        await bot.release.wait()
        try:
            await interaction.edit_original_response(content="done")
        except discord.HTTPException as exc:
            await bot.notes.put(("remember-error", exc.status, exc.code))
            channel = interaction.channel
            assert isinstance(channel, discord.TextChannel)
            assert response.message_id is not None
            await channel.get_partial_message(response.message_id).edit(content="done via channel")
        await bot.notes.put(("remember", "ok"))

    @tree.command(name="big", description="Upload a file of this size")
    async def big(interaction: discord.Interaction, size: int) -> None:
        await interaction.response.defer()
        try:
            await interaction.followup.send(file=discord.File(io.BytesIO(b"x" * size), filename="big.bin"))
        except discord.HTTPException as exc:
            await bot.notes.put(("big", exc.status, exc.code))
            await interaction.followup.send("too big")

    async def style_choices(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return [app_commands.Choice(name=f"{current}-{i}", value=f"{current}-{i}") for i in range(3)]

    @tree.command(name="pick", description="Pick a style")
    @app_commands.autocomplete(style=style_choices)
    async def pick(interaction: discord.Interaction, style: str) -> None:
        await interaction.response.send_message(f"picked {style}")

    @tree.command(name="admin", description="For server managers")
    @app_commands.default_permissions(manage_guild=True)
    async def admin(interaction: discord.Interaction) -> None:
        await interaction.response.send_message(f"manage_guild={interaction.permissions.manage_guild}")

    config = app_commands.Group(name="config", description="Settings")

    @config.command(name="set", description="Change a setting")
    @app_commands.choices(key=[app_commands.Choice(name="Steps", value="steps")])
    async def config_set(interaction: discord.Interaction, key: str, value: int) -> None:
        await interaction.response.send_message(f"{key}={value}", ephemeral=True)

    tree.add_command(config)

    @tree.command(name="menu", description="Show a menu")
    async def menu(interaction: discord.Interaction) -> None:
        await interaction.response.send_message("pick one", view=MenuView())

    @tree.context_menu(name="Wave")
    async def wave(interaction: discord.Interaction, user: discord.Member) -> None:
        await interaction.response.send_message(f"waves at {user.id}")

    @tree.context_menu(name="Add note")
    async def add_note(interaction: discord.Interaction, message: discord.Message) -> None:
        await interaction.response.send_modal(NoteModal(message.id))


# ----------------------------------------------------------------------------------------------------------------------
# Fixtures
# ----------------------------------------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def discord_errors() -> Iterator[DiscordErrorLog]:
    """discord.py only logs errors in commands and views: any ERROR record fails the test."""
    with DiscordErrorLog() as log:
        yield log
    assert not log.records, log.formatted()


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeDiscord]:
    async with running_fake_discord() as server:
        point_discord_py_at(server, monkeypatch)
        yield server
        assert server.violations == [], server.violations


@pytest.fixture
async def bot(fake: FakeDiscord) -> AsyncIterator[MiniBot]:
    async with running_bot(MiniBot(fake.guild_id), fake) as client:
        yield client


def original_of(interaction: FakeInteraction) -> FakeMessage:
    message = interaction.original
    assert message is not None, f"interaction {interaction.id} has no original response"
    return message


def text_channel(bot: MiniBot, channel_id: int) -> discord.TextChannel:
    channel = bot.get_channel(channel_id)
    assert isinstance(channel, discord.TextChannel)
    return channel


def take_violations(fake: FakeDiscord) -> list[str]:
    found = list(fake.violations)
    fake.violations.clear()
    return found


# ----------------------------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------------------------


async def test_login_and_command_sync(fake: FakeDiscord, bot: MiniBot) -> None:
    assert bot.user is not None and bot.user.id == fake.bot_user_id
    assert bot.application_id == fake.application_id
    calls = [(r.method, r.path) for r in fake.requests]
    assert calls[:2] == [("GET", "/users/@me"), ("GET", "/oauth2/applications/@me")]
    assert ("PUT", f"/applications/{fake.application_id}/commands") in calls
    assert ("PUT", f"/applications/{fake.application_id}/guilds/{fake.guild_id}/commands") in calls

    synced = {c["name"]: c for c in fake.commands[None]}
    expected = {"hello", "twice", "later", "secret", "slow", "double", "remember", "big", "pick", "admin", "config"}
    assert set(synced) == expected | {"menu", "Wave", "Add note"}
    assert [c["name"] for c in fake.commands[fake.guild_id]] == ["draw"]
    for command in [*fake.commands[None], *fake.commands[fake.guild_id]]:
        assert int(command["id"]) > 0 and int(command["version"]) > 0
        assert command["application_id"] == str(fake.application_id)
    assert synced["Add note"]["type"] == 3 and synced["Add note"]["description"] == ""
    assert [(o["name"], o["type"], o.get("required", False)) for o in synced["hello"]["options"]] == [
        ("name", 3, True),
        ("times", 4, False),
    ]
    assert synced["admin"]["default_member_permissions"] == str(Permissions.MANAGE_GUILD)

    guild = bot.get_guild(fake.guild_id)
    assert guild is not None and guild.owner_id == fake.owner_id
    assert {c.id for c in guild.text_channels} == {fake.channel_id, fake.second_channel_id}
    assert guild.member_count == 5  # without the members intent discord.py caches only its own member
    assert guild.me.id == fake.bot_user_id

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{fake.api_base}/users/@me", headers={"Authorization": f"Bot {fake.token}"}) as response,
    ):
        assert response.headers["Content-Type"] == "application/json"


async def test_slash_command_answered_with_send_message(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("hello", {"name": "Ann", "times": 2})
    callback = await interaction.wait_callback()

    assert callback.query == {"with_response": "1"}
    assert interaction.callback_type == 4
    assert interaction.callback_latency is not None and 0 < interaction.callback_latency < 3
    assert await bot.next_note() == ("hello", "Ann", 2, "int")
    message = original_of(interaction)
    assert message.content == "Hello Ann! Hello Ann!"
    assert message.interaction_id == interaction.id and message.author_id == fake.bot_user_id
    assert fake.messages_in(fake.channel_id) == [message]


async def test_deferred_command_edits_original_with_a_file(fake: FakeDiscord, bot: MiniBot) -> None:
    picture = tiny_png(5, 4)
    upload = fake.add_attachment("cat.png", picture, "image/png")
    interaction = await fake.invoke_slash("draw", {"prompt": "a cat", "image": upload})

    edit = await fake.wait_for_request("PATCH", r"^/webhooks/\d+/[^/]+/messages/@original$")
    assert interaction.callback_type == 5
    assert edit.json is not None and edit.json["attachments"] == [{"id": 0, "filename": "drawing.png"}]
    assert [(f.id, f.filename, f.data) for f in edit.files] == [(0, "drawing.png", picture)]
    # the bot downloaded the user's upload from the fake's CDN with Attachment.read()
    assert [r.path for r in fake.requests if r.path.startswith("/ephemeral-attachments/")] == [
        f"/ephemeral-attachments/{fake.application_id}/{upload['id']}/cat.png"
    ]

    message = original_of(interaction)
    assert message.content == "Drew a cat" and not message.loading and message.edits == 1
    [attachment] = message.attachments
    assert attachment.data == picture
    assert (attachment.content_type, attachment.width, attachment.height) == ("image/png", 5, 4)
    assert message.to_payload()["attachments"][0]["size"] == len(picture)


async def test_followups(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("twice")
    note = await bot.next_note()
    assert original_of(interaction).content == "one"
    [followup] = interaction.followups
    # InteractionCallbackResponse.message_id comes from the callback answer's interaction.response_message_id
    assert followup.content == "two" and note == ("twice", original_of(interaction).id, followup.id)

    # After a "thinking" defer the first followup replaces the loading message instead of adding one.
    deferred = await fake.invoke_slash("later")
    note = await bot.next_note()
    message = original_of(deferred)
    assert deferred.callback_type == 5 and deferred.followups == []
    assert note == ("later", message.id)
    assert message.content == "finished" and message.ephemeral and not message.loading


async def test_ephemeral_reply_is_invisible_to_channel_endpoints(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("secret")
    await interaction.wait_callback()
    message = original_of(interaction)
    assert message.content == "for your eyes only" and message.flags & 64
    with pytest.raises(discord.NotFound):
        await text_channel(bot, fake.channel_id).fetch_message(message.id)


async def test_callback_after_three_seconds_is_refused(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("slow")
    assert await bot.next_note(wait=8) == ("slow", 404, 10062)
    assert interaction.callback_latency is not None and interaction.callback_latency > 3
    assert not interaction.acknowledged and interaction.original is None
    [violation] = take_violations(fake)
    assert "3 s" in violation and "10062" in violation


async def test_second_callback_is_refused(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("double")
    assert await bot.next_note() == ("double", 400, 40060)
    assert [r.status for r in interaction.callbacks] == [200, 400]
    assert original_of(interaction).content == "first"
    [violation] = take_violations(fake)
    assert "40060" in violation


async def test_expired_token_then_channel_endpoint_edit(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("remember")
    await interaction.wait_callback()
    fake.expire_interaction(interaction)
    bot.release.set()

    assert await bot.next_note() == ("remember-error", 401, 50027)
    assert await bot.next_note() == ("remember", "ok")
    message = original_of(interaction)
    assert message.content == "done via channel" and message.edits == 1
    assert fake.expired_token_calls == 1
    patches = [(r.path.split("/")[1], r.status) for r in fake.requests if r.method == "PATCH"]
    assert patches == [("webhooks", 401), ("channels", 200)]
    assert fake.violations == []  # the 15-minute rule is Discord's doing, not the bot's fault


async def test_uploads_over_the_limit_get_413(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_slash("big", {"size": 2048}, attachment_size_limit=1024)
    assert await bot.next_note() == ("big", 413, 40005)
    message = await fake.wait_for_message(lambda m: m.content == "too big")
    assert message.id == original_of(interaction).id and not message.attachments
    [violation] = take_violations(fake)
    assert "413" in violation and "attachment_size_limit" in violation

    huge = discord.File(io.BytesIO(b"\0" * (10 * 1024 * 1024 + 1)), filename="huge.bin")
    with pytest.raises(discord.HTTPException) as refused:
        await text_channel(bot, fake.channel_id).send(file=huge)
    assert (refused.value.status, refused.value.code) == (413, 40005)
    [violation] = take_violations(fake)
    assert "upload limit of channel" in violation


async def test_button_on_a_persistent_view(fake: FakeDiscord, bot: MiniBot) -> None:
    panel = await text_channel(bot, fake.channel_id).send("panel", view=PressView())
    stored = fake.messages[panel.id]
    assert stored.components[0]["components"][0]["custom_id"] == "mini:press"

    press = await fake.invoke_component(panel.id, "mini:press", user_id=fake.other_member_id)
    await press.wait_callback()
    assert press.callback_type == 7
    assert stored.content == f"pressed by {fake.other_member_id}" and stored.edits == 1
    assert original_of(press) is stored

    with pytest.raises(ValueError, match="no component"):
        await fake.invoke_component(panel.id, "mini:missing")


async def test_message_context_menu_opens_a_modal_and_takes_its_submission(fake: FakeDiscord, bot: MiniBot) -> None:
    target = fake.post_user_message(fake.channel_id, "a picture of a cat")
    opened = await fake.invoke_message_command("Add note", target)
    await opened.wait_callback()
    assert opened.callback_type == 9
    assert opened.modal is not None and opened.modal["custom_id"] == "mini:note-modal"
    assert opened.modal["title"] == "Add a note"

    with pytest.raises(ValueError, match="required"):
        await fake.submit_modal("mini:note-modal", {"mini:note": ""})
    submitted = await fake.submit_modal("mini:note-modal", {"mini:note": "nice"})
    await submitted.wait_callback()
    assert submitted.user_id == fake.member_id
    assert original_of(submitted).content == f"note on {target.id}: nice"


async def test_subcommands_selects_user_menus_dms_and_component_modals(fake: FakeDiscord, bot: MiniBot) -> None:
    configured = await fake.invoke_slash("config", {"key": "steps", "value": 30}, subcommand="set")
    await configured.wait_callback()
    assert original_of(configured).content == "steps=30" and original_of(configured).ephemeral
    with pytest.raises(ValueError, match="one of"):
        await fake.invoke_slash("config", {"key": "cfg", "value": 1}, subcommand="set")

    shown = await fake.invoke_slash("menu")
    await shown.wait_callback()
    menu = original_of(shown)
    chosen = await fake.invoke_component(menu.id, "mini:select", component_type=3, values=["b"])
    await chosen.wait_callback()
    assert menu.content == "chose ['b']"
    with pytest.raises(ValueError, match="no options"):
        await fake.invoke_component(menu.id, "mini:select", component_type=3, values=["z"])

    opened = await fake.invoke_component(menu.id, "mini:rename")
    await opened.wait_callback()
    assert opened.callback_type == 9
    renamed = await fake.submit_modal("mini:rename-modal", {"mini:new-name": "Zed"})
    await renamed.wait_callback()
    assert renamed.callback_type == 7 and renamed.payload["message"]["id"] == str(menu.id)
    assert menu.content == "renamed to Zed" and menu.edits == 2

    waved = await fake.invoke_user_command("Wave", fake.other_member_id)
    await waved.wait_callback()
    assert original_of(waved).content == f"waves at {fake.other_member_id}"

    direct = await fake.invoke_slash("hello", {"name": "DM"}, guild_id=None)
    await direct.wait_callback()
    dm_message = original_of(direct)
    assert dm_message.content == "Hello DM!" and fake.channels[dm_message.channel_id]["type"] == 1


async def test_autocomplete(fake: FakeDiscord, bot: MiniBot) -> None:
    interaction = await fake.invoke_autocomplete("pick", {"style": "oil"}, focused="style")
    await interaction.wait_callback()
    assert interaction.callback_type == 8
    assert interaction.autocomplete_choices is not None
    assert [c["value"] for c in interaction.autocomplete_choices] == ["oil-0", "oil-1", "oil-2"]


async def test_rate_limited_requests_are_retried(fake: FakeDiscord, bot: MiniBot) -> None:
    fake.fail_next("POST", r"^/interactions/\d+/[^/]+/callback$", 429)
    interaction = await fake.invoke_slash("hello", {"name": "Bo"})
    message = await fake.wait_for_message(lambda m: m.interaction_id == interaction.id)
    callbacks = [r for r in fake.requests if r.path.endswith("/callback")]
    assert [(r.status, r.injected) for r in callbacks] == [(429, True), (200, False)]
    assert message.content == "Hello Bo!"

    since = len(fake.requests)
    fake.fail_next("POST", r"^/channels/\d+/messages$", 429)
    await text_channel(bot, fake.channel_id).send("after a rate limit")
    assert [r.status for r in fake.requests[since:] if r.method == "POST"] == [429, 200]
    assert [m.content for m in fake.messages_in(fake.channel_id)].count("after a rate limit") == 1


async def test_a_failure_after_handling_keeps_the_effects_and_a_told_bot_may_look_and_resend(
    fake: FakeDiscord, bot: MiniBot, discord_errors: DiscordErrorLog
) -> None:
    """``handled=True``: the callback is acted on (the member sees the answer), the bot is told 408. Looking for the
    response, and a second callback (answered 40060 as Discord does), are then no violation."""
    fake.fail_next("POST", r"^/interactions/\d+/[^/]+/callback$", 408, handled=True)
    interaction = await fake.invoke_slash("hello", {"name": "Bo"})
    await interaction.wait_callback()
    assert interaction.acknowledged and original_of(interaction).content == "Hello Bo!"
    assert [(r.status, r.injected) for r in fake.requests if r.path.endswith("/callback")] == [(408, True)]
    assert interaction.told_callback_failed

    webhook = discord.Webhook.partial(fake.application_id, interaction.token, client=bot)
    assert (await webhook.fetch_message("@original")).content == "Hello Bo!"  # type: ignore[arg-type]
    async with aiohttp.ClientSession() as session:
        url = f"{fake.api_base}/interactions/{interaction.id}/{interaction.token}/callback"
        async with session.post(url, json={"type": 4, "data": {"content": "again"}}) as response:
            assert response.status == 400 and (await response.json())["code"] == 40060
    assert fake.violations == []
    # MiniBot's /hello knows nothing of this: discord.py logs the 408 it raised, which is what was asked for.
    assert ["408 Request Timeout" in line for line in discord_errors.formatted()] == [True]
    discord_errors.records.clear()


async def test_repeated_nonce_returns_the_earlier_message(fake: FakeDiscord, bot: MiniBot) -> None:
    channel = text_channel(bot, fake.channel_id)
    first = await channel.send("first", nonce="job-42")
    second = await channel.send("second", nonce="job-42")
    assert second.id == first.id and second.content == "first"
    assert [m.content for m in fake.messages_in(fake.channel_id)] == ["first"]
    posts = [r.json or {} for r in fake.requests if r.method == "POST" and r.path.endswith("/messages")]
    assert [(p["nonce"], p["enforce_nonce"]) for p in posts] == [("job-42", True), ("job-42", True)]


async def test_channel_edit_keeps_listed_attachments(fake: FakeDiscord, bot: MiniBot) -> None:
    sent = await text_channel(bot, fake.channel_id).send("files", file=discord.File(io.BytesIO(b"aaa"), "a.txt"))
    stored = fake.messages[sent.id]
    [kept] = stored.attachments
    assert (kept.data, kept.content_type) == (b"aaa", "text/plain")
    assert await sent.attachments[0].read() == b"aaa"  # served by the fake's CDN

    edited = await sent.edit(attachments=[sent.attachments[0], discord.File(io.BytesIO(b"bbb"), "b.txt")])
    patch = fake.requests[-1]
    assert patch.json is not None
    assert [a["id"] for a in patch.json["attachments"]] == [kept.id, 0]
    assert [a.filename for a in edited.attachments] == ["a.txt", "b.txt"]
    assert [a.data for a in stored.attachments] == [b"aaa", b"bbb"] and stored.attachments[0] is kept

    await edited.edit(attachments=[])
    assert stored.attachments == [] and stored.content == "files" and stored.edits == 2


async def test_deleted_message_is_unknown(fake: FakeDiscord, bot: MiniBot) -> None:
    sent = await text_channel(bot, fake.channel_id).send("will vanish")
    deleted = asyncio.create_task(bot.wait_for("raw_message_delete", timeout=5))
    fake.delete_message(sent.id)
    event = await deleted
    assert event.message_id == sent.id
    with pytest.raises(discord.NotFound) as missing:
        await sent.edit(content="too late")
    assert missing.value.code == 10008
    assert fake.messages_in(fake.channel_id) == []


async def test_default_member_permissions_and_interaction_permissions(fake: FakeDiscord, bot: MiniBot) -> None:
    with pytest.raises(PermissionError):
        await fake.invoke_slash("admin")  # a plain member does not even see the command
    interaction = await fake.invoke_slash("admin", user_id=fake.moderator_id)
    await interaction.wait_callback()
    assert original_of(interaction).content == "manage_guild=True"
    member = interaction.payload["member"]
    assert int(member["permissions"]) & Permissions.MANAGE_GUILD
    assert not int(fake.permissions_for(fake.member_id)) & (Permissions.MANAGE_GUILD | Permissions.MANAGE_MESSAGES)


async def test_invocations_must_match_the_synced_commands(fake: FakeDiscord, bot: MiniBot) -> None:
    with pytest.raises(LookupError):
        await fake.invoke_slash("nope")
    with pytest.raises(ValueError, match="required"):
        await fake.invoke_slash("hello", {})
    with pytest.raises(TypeError):
        await fake.invoke_slash("hello", {"name": 3})
    with pytest.raises(ValueError, match="1 to 5"):
        await fake.invoke_slash("hello", {"name": "x", "times": 9})
    with pytest.raises(LookupError):
        await fake.invoke_slash("draw", {"prompt": "x"}, guild_id=None)  # a guild command is not in DMs
    with pytest.raises(TimeoutError, match="waiting for a message"):
        await fake.wait_for_message(lambda m: False, timeout=0.05)
    assert fake.interactions == {}


async def test_unknown_route_and_wrong_token(fake: FakeDiscord, bot: MiniBot) -> None:
    route = discord.http.Route("GET", "/guilds/{guild_id}/bans", guild_id=fake.guild_id)
    with pytest.raises(discord.NotFound):
        await bot.http.request(route)
    [violation] = take_violations(fake)
    assert "unknown route" in violation

    stranger = MiniBot(fake.guild_id)
    with pytest.raises(discord.LoginFailure):
        await stranger.login("not-the-token")
    await stranger.close()
    assert fake.unauthorized_calls == 1


async def test_privileged_intents_are_refused(fake: FakeDiscord) -> None:
    with pytest.raises(discord.PrivilegedIntentsRequired):
        async with running_bot(MiniBot(fake.guild_id, intents=discord.Intents.all()), fake):
            pass
    [violation] = take_violations(fake)
    assert "privileged intents" in violation


async def test_gateway_reconnect_resumes_the_session(fake: FakeDiscord, bot: MiniBot) -> None:
    resumed = asyncio.create_task(bot.wait_for("resumed", timeout=5))
    await fake.request_reconnect()
    await fake.wait_until_ready()
    await resumed
    assert (fake.identify_count, fake.resume_count) == (1, 1)
    interaction = await fake.invoke_slash("hello", {"name": "again"})
    await interaction.wait_callback()
    assert original_of(interaction).content == "Hello again!"


async def test_bot_restart_against_the_same_fake(fake: FakeDiscord) -> None:
    first = MiniBot(fake.guild_id)
    async with running_bot(first, fake):
        panel = await text_channel(first, fake.channel_id).send("panel", view=PressView())
        before = await fake.invoke_slash("hello", {"name": "one"})
        await before.wait_callback()
    assert first.is_closed()
    with pytest.raises(RuntimeError, match=r"no discord\.py client"):
        await fake.invoke_slash("hello", {"name": "nobody"})

    fake.let_identify_window_pass()  # a restarted process takes longer than the 5 s between two IDENTIFYs
    second = MiniBot(fake.guild_id)
    async with running_bot(second, fake):
        after = await fake.invoke_slash("hello", {"name": "two"})
        await after.wait_callback()
        assert original_of(after).content == "Hello two!"
        # the new process only has the persistent view registered by add_view()
        press = await fake.invoke_component(panel.id, "mini:press")
        await press.wait_callback()
        assert fake.messages[panel.id].content == f"pressed by {fake.member_id}"
    assert fake.identify_count == 2
    assert [c["name"] for c in fake.commands[fake.guild_id]] == ["draw"]
