"""The installation's pepper: the secret key in ``<data_dir>/pepper`` that keys every stored hash and sealed secret."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fleet.store.errors import CredentialError

PEPPER_FILE = "pepper"
PEPPER_BYTES = 32


def load_pepper(data_dir: Path, create: bool = True) -> bytes:
    """The installation's HMAC key, created (mode 0600) on first use."""
    path = Path(data_dir) / PEPPER_FILE
    try:
        return bytes.fromhex(path.read_text().strip())
    except FileNotFoundError:
        if not create:
            raise CredentialError(
                f"no credential store in {data_dir} (run 'fleet org add' or 'fleet up' first)") from None
    except ValueError as exc:
        raise CredentialError(f"corrupt pepper file {path}") from exc
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    write_private(path, secrets.token_bytes(PEPPER_BYTES).hex() + "\n")
    return load_pepper(data_dir, create=False)


def write_private(path: Path, text: str) -> None:
    """Create ``path`` with mode 0600 unless it exists (first writer wins)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
