"""Discord's text markup for things the bot links to or dates: plain strings, no discord.py."""

from __future__ import annotations

import math


def timestamp(unix_time: float, style: str = "R") -> str:
    """A timestamp each member's client shows in their own time zone (`R`: "in 12 seconds", `f`: a full date)."""
    return f"<t:{math.ceil(unix_time)}:{style}>"


def message_link(guild_id: int, channel_id: int, message_id: int) -> str:
    return f"https://discord.com/channels/{guild_id}/{channel_id}/{message_id}"
