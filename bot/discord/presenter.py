"""Showing jobs in Discord: the `JobPresenter` of `bot.jobs.ports`, built on discord.py.

A job is shown in its status message, the interaction's original response. For its first 15
minutes that message is edited through the interaction webhook (which needs no channel
permission); after that, or if the token is refused, through the channel's message endpoint.
Edits are idempotent, which is what makes posting exactly-once across crashes. If a moderator
deleted the status message, the outcome is posted as a new message with a nonce that Discord
enforces, so a retried post cannot appear twice either.

Each status message is edited by one call at a time, and the presenter remembers what it shows:
a progress edit that would show the same content and buttons again is not sent, and none is sent
after the outcome. Discord's refusals are sorted by `bot.discord.rate_limits.classify`: a 429 of
any kind or a 408 means "later", and posting tries again. A ban is waited out here: while Discord
refuses every request, the outcome is tried again, one call of the bot's at a time and ever further
apart (`DiscordWatch.wait_turn`), and progress edits are not sent at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import aiohttp
import discord

from bot.discord.rate_limits import DiscordWatch, classify
from bot.discord.texts import failure_sentence, failure_text, gallery_text, result_summary, status_text
from bot.images.processing import ImageFile
from bot.jobs.model import Job, JobStatus, Progress
from bot.jobs.ports import PresentationDeferred
from bot.modelslab.client import ErrorKind

log = logging.getLogger(__name__)
T = TypeVar("T")

UNKNOWN_MESSAGE = 10008
UNKNOWN_WEBHOOK = 10015
NO_MENTIONS = discord.AllowedMentions.none()
RESULT_COLOUR = discord.Colour(0x5865F2)
OUTCOME = "outcome"  # what a status message shows once the result or failure is in it


@dataclass(eq=False)
class _StatusMessage:
    """A job's status message: what it shows (None: unknown), and the lock that lets one call edit it at a time."""

    shows: Hashable | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    users: int = 0
    forgotten: bool = False  # dropped once its last user is done


class ImageUpload(io.BytesIO):
    """An image's bytes as `discord.File` takes them (a seekable file), uploaded without a copy.

    discord.py hands the file object to aiohttp as a form field. aiohttp sends a plain `io.BytesIO` by unsharing its
    buffer (a copy of the whole image) and reading it back in 256 kB chunks (a copy of each, with a loop iteration
    between them): about 0.6 ms of CPU for a 0.5 MB image. `ImageUploadPayload`, registered with aiohttp for this
    type alone, sends slices of the very bytes instead. As a file it is an ordinary `BytesIO` sharing those bytes.
    """

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.data = data


@aiohttp.payload_type(ImageUpload)
class ImageUploadPayload(aiohttp.payload.Payload):
    """aiohttp's payload for an `ImageUpload`: its bytes from the file's position, sent as memoryview slices."""

    _autoclose = True  # bytes in memory: nothing to close
    CHUNK = 1024 * 1024  # a large image goes out a slice at a time, each slice once the socket took the last one

    def __init__(self, value: ImageUpload, *args: Any, **kwargs: Any) -> None:
        super().__init__(value, *args, **kwargs)
        self._view = memoryview(value.data)[value.tell() :]
        self._size = len(self._view)

    def decode(self, encoding: str = "utf-8", errors: str = "strict") -> str:
        return str(self._view, encoding, errors)

    async def as_bytes(self, encoding: str = "utf-8", errors: str = "strict") -> bytes:
        return self._view.tobytes()

    async def write(self, writer: aiohttp.abc.AbstractStreamWriter) -> None:
        await self.write_with_length(writer, None)

    async def write_with_length(self, writer: aiohttp.abc.AbstractStreamWriter, content_length: int | None) -> None:
        view = self._view if content_length is None else self._view[:content_length]
        for start in range(0, len(view), self.CHUNK):
            await writer.write(view[start : start + self.CHUNK])


def _files(job: Job, images: Sequence[ImageFile], *, spoiler: bool) -> list[discord.File]:
    return [
        discord.File(
            ImageUpload(image.data), filename=f"imagine-{job.id[:8]}-{index}.{image.extension}", spoiler=spoiler
        )
        for index, image in enumerate(images, start=1)
    ]


class DiscordPresenter:
    """Edits (or, when it is gone, replaces) each job's status message."""

    def __init__(
        self,
        client: discord.Client,
        *,
        job_timeout: float,
        result_view: Callable[[Job, int], discord.ui.View | None] | None = None,
        clock: Callable[[], float] = time.time,
        watch: DiscordWatch | None = None,
    ) -> None:
        self._client = client
        self._job_timeout = job_timeout
        self._result_view = result_view
        self._clock = clock
        self._watch = watch or DiscordWatch()
        self._messages: dict[str, _StatusMessage] = {}

    async def show_progress(self, job: Job, progress: Progress) -> None:
        # No `attachments`/`embed` keys: a progress edit leaves the rest of the message alone.
        text = status_text(
            job,
            position=progress.position,
            waiting=progress.waiting,
            retry_in=progress.retry_in,
            about_ahead=progress.about_ahead,
        )
        shows = (text, progress.cancellable)
        if self._watch.banned:
            raise PresentationDeferred("Discord refuses every request for now (a ban): not sent")
        async with self._status_message(job.id) as message:
            if message.shows is None and job.status is JobStatus.QUEUED:
                message.shows = (status_text(job), False)  # the acknowledgement: the words of a queued job, no button
            if message.shows in (shows, OUTCOME):
                return  # it shows that already, or the outcome, which no progress replaces
            message.shows = shows
            try:
                view = cancel_view(job.id) if progress.cancellable else None
                await self._show(job, lambda: {"content": text, "view": view}, replace_if_gone=False)
            except BaseException:
                message.shows = None  # whether the edit was taken is unknown
                raise

    def edit_lane(self, job: Job) -> str | None:
        # Through the interaction's webhook an edit spends from the token's own limit; through the channel, from
        # the channel's, which every message there shares (5 edits per 5 s).
        return None if self._token_usable(job) else f"channel:{job.channel_id}"

    def forget(self, job_id: str) -> None:
        message = self._messages.get(job_id)
        if message is not None:
            message.forgotten = True
            if message.users == 0:
                del self._messages[job_id]

    async def show_result(self, job: Job, images: list[ImageFile], *, spoiler: bool, withheld: bool) -> int | None:
        summary = result_summary(job, images, spoiler=spoiler, withheld=withheld)
        embed = discord.Embed(title=summary.title, description=summary.description, colour=RESULT_COLOUR)
        for name, value in summary.fields:
            embed.add_field(name=name, value=value, inline=name != "Negative prompt")
        embed.set_footer(text=f"Job {job.id[:8]}")
        return await self._show_outcome(
            job,
            lambda: {
                "content": summary.content,
                "embed": embed,
                "attachments": _files(job, images, spoiler=spoiler),
                "view": self._result_view(job, len(images)) if self._result_view else None,
            },
        )

    async def post_to_gallery(self, job: Job, images: list[ImageFile], channel_id: int) -> int:
        """A copy in the gallery channel, crediting the author and linking the original message."""

        async def post() -> int:
            try:
                message = await self._client.get_partial_messageable(channel_id).send(
                    content=gallery_text(job),
                    files=_files(job, images, spoiler=False),
                    allowed_mentions=NO_MENTIONS,
                    nonce=("g" + job.id)[:25],  # a retried post cannot appear twice
                )
            except discord.HTTPException as exc:
                raise _classified(exc) from exc
            return message.id

        return await self._despite_bans(post)

    async def show_failure(self, job: Job) -> int | None:
        if job.error_kind == ErrorKind.BAD_IMAGE and await self._refuse_privately(job):
            return None
        text = failure_text(job, timeout=self._job_timeout)
        return await self._show_outcome(job, lambda: {"content": text, "embed": None, "attachments": [], "view": None})

    async def _refuse_privately(self, job: Job) -> bool:
        """A member's picture turned out unusable after the public acknowledgement: tell them alone (an ephemeral
        follow-up) and take the public status message away. Needs the interaction token (minutes, here)."""
        webhook = self._interaction_webhook(job)
        if webhook is None:
            return False
        sentence = failure_sentence(
            job.error_kind, job.error_detail, model_id=job.request.model_id, retry_after=None, timeout=0
        )
        await self._watch.wait_turn()
        async with self._status_message(job.id) as message:
            try:
                await webhook.send(sentence, ephemeral=True, allowed_mentions=NO_MENTIONS, wait=True)
            except (discord.HTTPException, ValueError) as exc:
                log.info("Job %s: could not answer privately (%s); editing the status message instead", job.id, exc)
                return False
            message.shows = OUTCOME
            with contextlib.suppress(discord.NotFound):
                await webhook.delete_message("@original")  # type: ignore[arg-type]
        return True

    async def find_status_message(self, job: Job) -> int | None:
        webhook = self._interaction_webhook(job)
        if webhook is None:
            return None

        async def find() -> int | None:
            try:
                return await original_message_id(webhook)
            except discord.HTTPException as exc:
                raise _classified(exc) from exc

        return await self._despite_bans(find)

    # ------------------------------------------------------------------------------------------

    def _token_usable(self, job: Job) -> bool:
        """The job's interaction token may still be used (it expires after 15 minutes)."""
        if job.interaction_token is None or job.application_id is None:
            return False
        return job.token_expires_at is None or self._clock() < job.token_expires_at

    def _interaction_webhook(self, job: Job) -> discord.Webhook | None:
        if not self._token_usable(job) or job.interaction_token is None or job.application_id is None:
            return None
        webhook = discord.Webhook.partial(job.application_id, job.interaction_token, client=self._client)
        # An interaction's webhook is the application's own (what lets it send ephemeral follow-ups).
        webhook.type = discord.WebhookType.application
        return webhook

    @contextlib.asynccontextmanager
    async def _status_message(self, job_id: str) -> AsyncIterator[_StatusMessage]:
        """The job's status message, to be edited by this call alone (the others wait)."""
        message = self._messages.get(job_id)
        if message is None:
            message = self._messages[job_id] = _StatusMessage()
        message.users += 1
        try:
            async with message.lock:
                yield message
        finally:
            message.users -= 1
            if message.users == 0 and message.forgotten and self._messages.get(job_id) is message:
                del self._messages[job_id]

    async def _show_outcome(self, job: Job, message: Callable[[], dict[str, Any]]) -> int | None:
        """The result or the failure: after a progress edit under way (never one merely waiting for its turn), and
        remembered, so that no progress edit comes after it."""

        async def show() -> int | None:
            async with self._status_message(job.id) as status:
                replaced = await self._show(job, message)
                status.shows = OUTCOME
                return replaced

        return await self._despite_bans(show)

    async def _despite_bans(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, tried again for as long as Discord refuses every request of the bot (a ban), one call of the
        bot's at a time and ever further apart (`DiscordWatch.wait_turn`): a ban delays a result, never loses it,
        and it is posted as soon as Discord answers again. Other refusals are the caller's to handle."""
        while True:
            await self._watch.wait_turn()
            try:
                return await call()
            except PresentationDeferred:
                if not self._watch.banned:
                    raise

    async def _show(
        self, job: Job, message: Callable[[], dict[str, Any]], *, replace_if_gone: bool = True
    ) -> int | None:
        try:
            return await self._edit_or_replace(job, message, replace_if_gone=replace_if_gone)
        except discord.HTTPException as exc:
            raise _classified(exc) from exc

    async def _edit_or_replace(
        self, job: Job, message: Callable[[], dict[str, Any]], *, replace_if_gone: bool
    ) -> int | None:
        """Edit the job's message to `message()` (content, embed, attachments); returns a new id if it posted anew.

        `message` is called once per attempt: a `discord.File` can be uploaded only once.
        """
        webhook = self._interaction_webhook(job)
        if webhook is not None:
            try:
                await webhook.edit_message("@original", allowed_mentions=NO_MENTIONS, **message())  # type: ignore[call-overload]
                return None
            except discord.NotFound as exc:
                if exc.code == UNKNOWN_MESSAGE:
                    return await self._replace(job, message()) if replace_if_gone else None
                log.info("Job %s: interaction token refused (%s); using the channel", job.id, exc.code)
            except discord.HTTPException as exc:
                if exc.status != 401:
                    raise
                log.info("Job %s: interaction token expired; using the channel", job.id)

        if job.message_id is not None:
            partial = self._client.get_partial_messageable(job.channel_id).get_partial_message(job.message_id)
            try:
                await partial.edit(allowed_mentions=NO_MENTIONS, **message())
                return None
            except discord.NotFound:
                pass
        return await self._replace(job, message()) if replace_if_gone else None

    async def _replace(self, job: Job, message: dict[str, Any]) -> int:
        """The status message is gone (deleted by a moderator): post the outcome as a new message, once."""
        channel = self._client.get_partial_messageable(job.channel_id)
        embed = message.get("embed")
        sent = await channel.send(
            content=message.get("content"),
            embeds=[embed] if embed is not None else [],
            files=message.get("attachments") or [],
            view=message.get("view") or discord.utils.MISSING,
            allowed_mentions=NO_MENTIONS,
            nonce=job.id[:25],  # Discord drops a repeated nonce: a retried post cannot appear twice
        )
        log.info("Job %s: status message was gone; posted a new one", job.id)
        return sent.id


async def original_message_id(webhook: discord.Webhook) -> int | None:
    """The id of an interaction's response (`@original`, through the interaction's webhook); None if it has none,
    or the token is no longer accepted."""
    try:
        message = await webhook.fetch_message("@original")  # type: ignore[arg-type]
    except (discord.NotFound, discord.Forbidden):
        return None
    except discord.HTTPException as exc:
        if exc.status == 401:
            return None
        raise
    return message.id


def _classified(exc: discord.HTTPException) -> Exception:
    """What Discord's refusal means for the message: later (`PresentationDeferred`), never (`PresentationRefused`),
    or a passing fault (a 5xx, as it is)."""
    headers = exc.response.headers if isinstance(exc.response, aiohttp.ClientResponse) else {}
    return classify(exc.status, headers, exc.text or "") or exc


class CancelJobButton(
    discord.ui.DynamicItem[discord.ui.Button[discord.ui.View]], template=r"job:cancel:(?P<job_id>[0-9a-f]{32})"
):
    """The Cancel button of a waiting job. Persistent: the job id is in its custom id, the rest in the database."""

    def __init__(self, job_id: str) -> None:
        super().__init__(
            discord.ui.Button(label="Cancel", style=discord.ButtonStyle.secondary, custom_id=f"job:cancel:{job_id}")
        )
        self.job_id = job_id

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction, item: discord.ui.Item[Any], match: re.Match[str]
    ) -> CancelJobButton:
        return cls(match["job_id"])

    async def callback(self, interaction: discord.Interaction) -> None:
        jobs = getattr(interaction.client, "jobs", None)
        if jobs is None:
            return
        answer = await jobs.cancel(
            self.job_id, by_user_id=interaction.user.id, may_manage_messages=interaction.permissions.manage_messages
        )
        await interaction.response.send_message(answer, ephemeral=True)


def cancel_view(job_id: str) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    view.add_item(CancelJobButton(job_id))
    return view
