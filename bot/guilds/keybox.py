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
        return self._seal(b"guild:" + str(guild_id).encode(), api_key)

    def open(self, guild_id: int, sealed: bytes) -> str:
        return self._open(b"guild:" + str(guild_id).encode(), sealed)

    def seal_for_job(self, job_id: str, api_key: str) -> bytes:
        return self._seal(b"job:" + job_id.encode(), api_key)

    def open_for_job(self, job_id: str, sealed: bytes) -> str:
        return self._open(b"job:" + job_id.encode(), sealed)

    def _seal(self, context: bytes, text: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, text.encode(), context)

    def _open(self, context: bytes, sealed: bytes) -> str:
        if len(sealed) <= 1 + _NONCE_BYTES or sealed[:1] != _VERSION:
            raise KeyUnreadable("unknown key format")
        nonce, ciphertext = sealed[1 : 1 + _NONCE_BYTES], sealed[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, ciphertext, context).decode()
        except InvalidTag:
            raise KeyUnreadable("the key does not decrypt with this SECRET_KEY") from None


def last4(api_key: str) -> str:
    return api_key[-4:] if len(api_key) > 8 else "…"
