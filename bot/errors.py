"""Errors whose message is safe, and meant, to be shown to a Discord member as is."""

from __future__ import annotations


class UserFacingError(Exception):
    """A refusal or failure explained in one plain sentence for the member who asked."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidOption(UserFacingError):
    """A command option broke a rule; the message names the option and what it accepts."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"`{option}` {message}")
        self.option = option


class MissingApiKey(UserFacingError):
    """No ModelsLab key is available for this server."""
