"""Smaller per-connection TLS read buffers for the broker's asyncio server.

CPython's asyncio SSLProtocol allocates (and zero-fills) a 256 KiB read buffer for every TLS
connection (asyncio/sslproto.py, ``max_size = 256 * 1024``): 2,000 idle clients cost ~500 MB for
buffers alone. A TLS record carries at most 16 KiB of plaintext, so a buffer of that size reads
every record in a few reads; a 4 KiB buffer keeps idle connections small and costs a few more recv calls per large record.
"""

from __future__ import annotations

from asyncio import sslproto

TLS_READ_BUFFER = 4 * 1024
STOCK_MAX_SIZE = 256 * 1024


def install() -> None:
    """Patch SSLProtocol.max_size for this process (idempotent)."""
    sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def installed() -> bool:
    """True once install() ran."""
    return sslproto.SSLProtocol.max_size == TLS_READ_BUFFER
