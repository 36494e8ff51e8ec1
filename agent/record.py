"""``fleet simulate --record FILE``: what each simulated agent published and had acknowledged, one line per event.

Lines are CSV without a header (ids cannot contain commas):

- ``c,<machine>,<session>,<unix time>``: a connection was accepted (CONNACK); ``session`` starts;
- ``p,<machine>,<session>,<seq>``: report ``seq`` of ``session`` was handed to the connection;
- ``a,<machine>,<session>,<seq>``: its PUBACK arrived.

Shards hand over lines in chunks through a bounded queue to one writer thread, so the file is written
off the hot path, and a disk slower than the simulator slows the simulator instead of growing memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fleet.agent.errors import AgentError

MAX_CHUNKS = 256  # chunks (one per shard loop pass) waiting for the writer; past this, shards wait
ReportKey = tuple[str, str, int]  # (machine, session, seq)


class Recorder:
    """Appends event lines to a file from its own thread."""

    def __init__(self, path: Path, max_chunks: int = MAX_CHUNKS) -> None:
        try:
            self._file = open(path, "w", encoding="utf-8", buffering=1 << 16)  # closed by close()
        except OSError as exc:
            raise AgentError(f"cannot write the record file {path}: {exc}") from exc
        self._queue: queue.Queue[list[str] | None] = queue.Queue(max_chunks)
        self._thread = threading.Thread(target=self._write_all, name="sim-record", daemon=True)
        self._thread.start()

    def write(self, lines: list[str]) -> None:
        """Queue a chunk of lines (each ending in a newline); blocks while the queue is full."""
        if lines:
            self._queue.put(lines)

    def _write_all(self) -> None:
        while (chunk := self._queue.get()) is not None:
            self._file.writelines(chunk)

    def close(self) -> None:
        """Write what is queued and close the file."""
        self._queue.put(None)
        self._thread.join()
        self._file.close()


def connected(machine: str, session: str, when: float) -> str:
    """The line for a connection accepted at ``when``."""
    return f"c,{machine},{session},{when:.3f}\n"


def published(machine: str, session: str, seq: int) -> str:
    """The line for a report handed to the connection."""
    return f"p,{machine},{session},{seq}\n"


def acked(machine: str, session: str, seq: int) -> str:
    """The line for a report's PUBACK."""
    return f"a,{machine},{session},{seq}\n"


@dataclass(frozen=True)
class Record:
    """Everything one or more record files say: reports published and acknowledged, connection times."""

    published: frozenset[ReportKey]
    acked: frozenset[ReportKey]
    connects: tuple[tuple[str, str, float], ...]  # (machine, session, unix time), in file order


def read_record(paths: Iterable[Path]) -> Record:
    """Read record files (e.g. one per simulator process); AgentError on a malformed line."""
    sent: set[ReportKey] = set()
    acks: set[ReportKey] = set()
    connects: list[tuple[str, str, float]] = []
    for path in paths:
        with open(path, encoding="utf-8") as fh:
            for number, line in enumerate(fh, 1):
                try:
                    kind, machine, session, value = line.rstrip("\n").split(",")
                    if kind == "c":
                        connects.append((machine, session, float(value)))
                    elif kind in ("p", "a"):
                        (sent if kind == "p" else acks).add((machine, session, int(value)))
                    else:
                        raise ValueError(kind)
                except ValueError as exc:
                    raise AgentError(f"{path}:{number}: not a record line: {line.strip()!r}") from exc
    return Record(frozenset(sent), frozenset(acks), tuple(connects))
