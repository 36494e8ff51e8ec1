"""Secrets that must be read back (a webhook's signing secret, a channel URL with a token), encrypted at rest.

Keys of orgs are only ever compared, so they are stored hashed; a channel's secret must sign every
notification, so it is stored encrypted instead (Fernet: AES-128-CBC with HMAC-SHA256). The key is
derived from the installation's pepper (``<data_dir>/pepper``, mode 0600) with HKDF, so it never
leaves the data dir and a copy of ``fleet.db`` alone reveals nothing.
"""

from __future__ import annotations

import base64
from pathlib import Path

from fleet.store.errors import CredentialError
from fleet.store.pepper import load_pepper

HKDF_INFO = b"fleet alert channel secrets v1"


class SecretBox:
    """Encrypts and decrypts short texts with a key derived from the pepper; its repr shows nothing."""

    __slots__ = ("_fernet",)

    def __init__(self, pepper: bytes) -> None:
        from cryptography.fernet import Fernet
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=HKDF_INFO).derive(pepper)
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def __repr__(self) -> str:
        return "SecretBox(<hidden>)"

    def seal(self, text: str) -> str:
        """The encrypted form of ``text`` (URL-safe ASCII)."""
        return self._fernet.encrypt(text.encode("utf-8")).decode("ascii")

    def open(self, token: str) -> str:
        """The text sealed in ``token``; CredentialError if it was sealed with another pepper or altered."""
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet.decrypt(token.encode("ascii")).decode("utf-8")
        except (InvalidToken, UnicodeError, ValueError) as exc:
            raise CredentialError("cannot decrypt a stored channel secret (was the pepper file replaced?)") from exc


def secret_box(data_dir: Path, create: bool = True) -> SecretBox:
    """The data dir's SecretBox (creating the pepper on first use when ``create``)."""
    return SecretBox(load_pepper(Path(data_dir), create=create))
