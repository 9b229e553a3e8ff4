"""Servers' ModelsLab keys, encrypted at rest.

AES-256-GCM (authenticated: a tampered or swapped ciphertext fails to open) under a key derived from
`SECRET_KEY` with HKDF, so the signing key and the encryption key are never the same bytes. The
guild id is the associated data: a ciphertext copied to another server's row does not open there.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_NONCE_BYTES = 12
_VERSION = b"\x01"


class KeyUnreadable(Exception):
    """The stored key cannot be decrypted (SECRET_KEY changed, or the row was tampered with)."""


class KeyBox:
    def __init__(self, secret_key: bytes) -> None:
        derived = HKDF(
            algorithm=hashes.SHA256(), length=32, salt=b"modelslab-imagine-bot", info=b"guild-api-keys/v1"
        ).derive(secret_key)
        self._aead = AESGCM(derived)

    def seal(self, guild_id: int, api_key: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, api_key.encode(), _associated(guild_id))

    def open(self, guild_id: int, sealed: bytes) -> str:
        if len(sealed) <= 1 + _NONCE_BYTES or sealed[:1] != _VERSION:
            raise KeyUnreadable("unknown key format")
        nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, ciphertext, _associated(guild_id)).decode()
        except InvalidTag:
            raise KeyUnreadable("the key does not decrypt with this SECRET_KEY") from None


def _associated(guild_id: int) -> bytes:
    return b"guild:" + str(guild_id).encode()


def last4(api_key: str) -> str:
    return api_key[-4:] if len(api_key) > 8 else "…"
