"""Custom metrics from ``*.prom`` files in Prometheus text format, read as node_exporter's textfile collector does.

Each interval the agent reads every ``*.prom`` file of ``textfile_dir`` and reports its samples in
``metrics.custom`` as ``{"<series>": value}``, the series written as in the file without spaces
(``queue_depth``, ``queue_depth{queue="mail"}``).

- A file is read whole or not at all: one read of an open file whose size and mtime did not change
  meanwhile, and whose last line is complete (the format ends every line with ``\\n``). A cron job that
  writes a temporary file and renames it over the old one is always read whole; a half-written file
  is skipped until it is complete.
- Limits: 64 KiB per file, 64 series per machine. A bad line, a bad file or a series past the
  limit is skipped and logged once per change of that file, never fatal.
- Unchanged files (same inode, size and mtime) are not read again: their parsed samples are kept.

prometheus_client's parser would not fit in the agent's RSS budget (its package imports an HTTP server
and more), so this is a small parser of the exposition format, held to prometheus_client's answers by a
property test (tests/agent/test_textfile.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
import stat
from dataclasses import dataclass, field

from fleet.config.payloads import MAX_CUSTOM_SERIES, is_series_name

log = logging.getLogger("fleet.agent")

MAX_FILE_BYTES = 64 * 1024
SUFFIX = ".prom"
MAX_FILES = 256  # files looked at per interval; more are skipped (and logged)

_NAME = r"[A-Za-z_:][A-Za-z0-9_:]*"
_LABEL = r"[A-Za-z_][A-Za-z0-9_]*"
_VALUE = r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[+-]?Inf|NaN"
_SAMPLE_RE = re.compile(rf"({_NAME})[ \t]*(?:\{{(.*)\}})?[ \t]*({_VALUE})(?:[ \t]+(-?[0-9]+))?[ \t]*")
_LABEL_RE = re.compile(rf'[ \t]*({_LABEL})[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*(,|$)')
_UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
_UNESCAPE_RE = re.compile(r"\\(.)")


class LineError(ValueError):
    """A line that is not a sample of the exposition format (the message says why)."""


def _unescape(value: str) -> str:
    # The format escapes only \\, \" and \n; any other backslash pair stands for itself (as Prometheus reads it).
    return _UNESCAPE_RE.sub(lambda m: _UNESCAPE.get(m.group(0), m.group(0)), value)


def escape_label_value(value: str) -> str:
    """A label value escaped as the exposition format writes it."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def parse_labels(text: str) -> list[tuple[str, str]]:
    """``a="1",b="x y"`` (a trailing comma allowed) into [(name, unescaped value)]; LineError if malformed."""
    labels: list[tuple[str, str]] = []
    pos, end = 0, len(text)
    if not text.strip():
        return labels
    while pos < end:
        match = _LABEL_RE.match(text, pos)
        if match is None:
            raise LineError(f"bad labels {text[:60]!r}")
        labels.append((match.group(1), _unescape(match.group(2))))
        pos = match.end()
        if match.group(3) == ",":
            if not text[pos:].strip():
                break  # a trailing comma
        elif pos < end:
            raise LineError(f"bad labels {text[:60]!r}")
    names = [name for name, _ in labels]
    if len(set(names)) != len(names):
        raise LineError(f"repeated label in {text[:60]!r}")
    return labels


def series_key(name: str, labels: list[tuple[str, str]]) -> str:
    """The series as reported: the metric name and its labels as in the file, without spaces."""
    if not labels:
        return name
    return name + "{" + ",".join(f'{k}="{escape_label_value(v)}"' for k, v in labels) + "}"


def parse_line(line: str) -> tuple[str, list[tuple[str, str]], float] | None:
    """One line: None for a blank line or comment (``# HELP``, ``# TYPE``), else (name, labels, value)."""
    text = line.strip(" \t")
    if not text or text.startswith("#"):
        return None
    match = _SAMPLE_RE.fullmatch(text)
    if match is None:
        raise LineError(f"not a sample: {text[:60]!r}")
    name, labels_text, value_text, timestamp = match.groups()
    if timestamp is not None:
        # node_exporter refuses client-side timestamps in text files too: the scrape time is the sample's time.
        raise LineError(f"timestamps are not supported: {text[:60]!r}")
    labels = parse_labels(labels_text) if labels_text is not None else []
    return name, labels, float(value_text)


def parse_text(text: str) -> tuple[list[tuple[str, float]], list[str]]:
    """Samples of an exposition text as (series, value), and the problems of the lines it skipped."""
    samples: list[tuple[str, float]] = []
    problems: list[str] = []
    seen: set[str] = set()
    for number, line in enumerate(text.split("\n"), 1):
        try:
            parsed = parse_line(line)
        except LineError as exc:
            problems.append(f"line {number}: {exc}")
            continue
        if parsed is None:
            continue
        name, labels, value = parsed
        key = series_key(name, labels)
        if not math.isfinite(value):
            problems.append(f"line {number}: {key[:60]} is {value} (JSON carries only finite numbers)")
        elif not is_series_name(key):
            problems.append(f"line {number}: series too long or unprintable: {key[:60]!r}")
        elif key in seen:
            problems.append(f"line {number}: {key[:60]} repeated")
        else:
            seen.add(key)
            samples.append((key, value))
    return samples, problems


@dataclass
class _File:
    """What one file held when last read, keyed by the stat that read it."""

    signature: tuple[int, int, int]
    samples: list[tuple[str, float]]
    problems: list[str]


def read_whole(path: str, limit: int = MAX_FILE_BYTES) -> tuple[str | None, str, tuple[int, int, int]]:
    """The text of a regular file read in one piece, or (None, why, signature) when it is skipped for now."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # O_NONBLOCK: a FIFO named *.prom must not hang us
    try:
        before = os.fstat(fd)
        signature = (before.st_ino, before.st_size, before.st_mtime_ns)
        if not stat.S_ISREG(before.st_mode):
            return None, "not a regular file", signature
        if before.st_size > limit:
            return None, f"{before.st_size} bytes > {limit}", signature
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, limit + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    if len(raw) > limit:
        return None, f"more than {limit} bytes", signature
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(raw) != after.st_size:
        return None, "changed while being read", (0, 0, 0)  # retried next interval
    if raw and not raw.endswith(b"\n"):
        return None, "last line incomplete (still being written?)", (0, 0, 0)
    try:
        return raw.decode("utf-8"), "", signature
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})", signature


@dataclass
class TextfileCollector:
    """Reads a directory's ``*.prom`` files each interval; remembers unchanged files and what it logged."""

    directory: str
    max_series: int = MAX_CUSTOM_SERIES
    files: dict[str, _File] = field(default_factory=dict)
    _dir_problem: str = ""
    _over_limit: frozenset[str] = frozenset()

    def collect(self) -> dict[str, float]:
        """The custom series of every readable file, in file-name order, at most ``max_series``."""
        try:
            with os.scandir(self.directory) as entries:
                names = sorted(e.name for e in entries if e.name.endswith(SUFFIX) and not e.name.startswith("."))
        except OSError as exc:
            self._once("dir", f"textfile directory {self.directory}: {exc.strerror or exc}")
            return {}
        self._dir_problem = ""
        if len(names) > MAX_FILES:
            self._once("dir", f"textfile directory {self.directory}: {len(names)} files, reading the first {MAX_FILES}")
            names = names[:MAX_FILES]
        for gone in set(self.files) - set(names):
            del self.files[gone]
        custom: dict[str, float] = {}
        skipped: list[str] = []
        for name in names:
            for key, value in self._read(name):
                if key in custom:
                    skipped.append(f"{key[:60]} (again in {name})")
                elif len(custom) >= self.max_series:
                    skipped.append(key[:60])
                else:
                    custom[key] = value
        over = frozenset(skipped)
        if over and over != self._over_limit:
            log.warning("textfile: %d series skipped (limit %d series per machine, or repeated): %s",
                        len(skipped), self.max_series, ", ".join(skipped[:5]) + (" …" if len(skipped) > 5 else ""))
        self._over_limit = over
        return custom

    def _read(self, name: str) -> list[tuple[str, float]]:
        path = os.path.join(self.directory, name)
        known = self.files.get(name)
        try:
            st = os.stat(path)
        except OSError:
            self.files.pop(name, None)  # removed since the listing
            return []
        if known is not None and known.signature == (st.st_ino, st.st_size, st.st_mtime_ns):
            return known.samples
        try:
            text, why, signature = read_whole(path)
        except OSError as exc:
            text, why, signature = None, exc.strerror or str(exc), (st.st_ino, st.st_size, st.st_mtime_ns)
        if text is None:
            # A skipped file keeps being retried; it is logged once per change (of its signature).
            if known is None or known.signature != signature or known.samples:
                log.warning("textfile %s skipped: %s", path, why)
            self.files[name] = _File(signature, [], [why])
            return []
        samples, problems = parse_text(text)
        if problems:
            log.warning("textfile %s: %d line(s) skipped: %s", path, len(problems),
                        "; ".join(problems[:3]) + (" …" if len(problems) > 3 else ""))
        self.files[name] = _File(signature, samples, problems)
        return samples

    def _once(self, key: str, message: str) -> None:
        if self._dir_problem != message:
            self._dir_problem = message
            log.warning("%s", message)
