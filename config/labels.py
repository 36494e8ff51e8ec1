"""Machine labels and label selectors of the wire contract: parse, validate, match.

A label is ``KEY=VALUE``: the key matches ``^[a-z][a-z0-9_]{0,31}$``, the value is 1-64 printable
characters, a machine has at most 16. A selector is ``KEY=VALUE`` and ``KEY!=VALUE`` terms joined by
commas (``env=prod,role!=db``); all must hold, and a machine without the key satisfies ``!=``.
Every rejection raises LabelError whose message names the problem.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fleet.config.errors import ContractError

KEY_PATTERN = r"[a-z][a-z0-9_]{0,31}"
_KEY_RE = re.compile(KEY_PATTERN)
MAX_VALUE = 64
MAX_LABELS = 16
MAX_TERMS = 16  # terms of one selector
MAX_SELECTOR = 2048  # characters of one selector's text


class LabelError(ContractError):
    """A label or a selector does not follow the contract; the message names the problem."""


def _show(text: str) -> str:
    return repr(text[:70])


def check_key(key: Any) -> str:
    """A label key, or LabelError naming it."""
    if type(key) is not str or _KEY_RE.fullmatch(key) is None:
        raise LabelError(f"invalid label key {_show(str(key))}: must match ^{KEY_PATTERN}$")
    return key


def check_value(key: str, value: Any) -> str:
    """A label value (1-64 printable characters), or LabelError naming its key."""
    if type(value) is not str or not 1 <= len(value) <= MAX_VALUE or not value.isprintable():
        raise LabelError(f"invalid value {_show(str(value))} of label {key!r}: "
                         f"must be 1-{MAX_VALUE} printable characters")
    return value


@dataclass(frozen=True, slots=True)
class Labels:
    """A machine's labels, sorted by key; validates itself on creation."""

    items: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if type(self.items) is not tuple:
            raise LabelError("labels must be a tuple of (key, value) pairs")
        if len(self.items) > MAX_LABELS:
            raise LabelError(f"too many labels: {len(self.items)} > {MAX_LABELS}")
        keys = set()
        for pair in self.items:
            if type(pair) is not tuple or len(pair) != 2:
                raise LabelError("labels must be (key, value) pairs")
            key, value = pair
            check_value(check_key(key), value)
            if key in keys:
                raise LabelError(f"label {key!r} given twice")
            keys.add(key)
        if list(self.items) != sorted(self.items):
            object.__setattr__(self, "items", tuple(sorted(self.items)))

    @classmethod
    def from_mapping(cls, mapping: Any) -> Labels:
        """Labels from a JSON object or TOML table of strings."""
        if not isinstance(mapping, Mapping):
            raise LabelError(f"labels must be an object of KEY: VALUE, not {type(mapping).__name__}")
        return cls(tuple((key, value) for key, value in mapping.items()))

    @classmethod
    def parse(cls, pairs: Iterable[str]) -> Labels:
        """Labels from ``KEY=VALUE`` texts (command-line flags); a key given twice is an error."""
        items = []
        for text in pairs:
            key, sep, value = text.partition("=")
            if not sep:
                raise LabelError(f"invalid label {_show(text)}: use KEY=VALUE")
            items.append((key, value))
        return cls(tuple(items))

    @classmethod
    def parse_text(cls, text: str) -> Labels:
        """Labels from ``KEY=VALUE,KEY=VALUE`` (the environment form, spaces around each pair ignored)."""
        return cls.parse(part.strip() for part in text.split(",") if part.strip())

    def as_dict(self) -> dict[str, str]:
        """``{"KEY": "VALUE"}``, as sent in a report and shown by the API."""
        return dict(self.items)

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.items)


def labels_json(labels: Mapping[str, str]) -> str:
    """Labels as the database keeps them (``machines.agent_labels``): compact JSON, keys sorted, UTF-8 as is.

    A label value is printable, so only ``"`` and ``\\`` are escaped, and the text of one label,
    ``label_text(key, value)``, occurs in this text exactly when the labels hold that label (a key holds no
    quote, so the text cannot start inside a string): filters search the text instead of decoding it.
    """
    return json.dumps(dict(sorted(labels.items())), separators=(",", ":"), ensure_ascii=False)


def label_text(key: str, value: str) -> str:
    """``"key":"value"``: what ``labels_json`` holds for one label."""
    return labels_json({key: value})[1:-1]


def merge(agent: Mapping[str, str], server: Mapping[str, str]) -> dict[str, str]:
    """A machine's labels: the agent's, with the server's winning for the same key."""
    return {**agent, **server} if server else dict(agent)


def diff(old: Mapping[str, str], new: Mapping[str, str]) -> str:
    """A label change as one line: ``env=dev->prod, +role=web, -site``; empty when equal."""
    parts = []
    for key in sorted(set(old) | set(new)):
        if key not in new:
            parts.append(f"-{key}")
        elif key not in old:
            parts.append(f"+{key}={new[key]}")
        elif old[key] != new[key]:
            parts.append(f"{key}={old[key]}->{new[key]}")
    return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Term:
    """One term of a selector: ``key=value``, or ``key!=value`` when ``negated``."""

    key: str
    value: str
    negated: bool = False

    def __post_init__(self) -> None:
        check_value(check_key(self.key), self.value)

    def holds(self, labels: Mapping[str, str]) -> bool:
        """True when the labels satisfy the term (a missing key satisfies ``!=``)."""
        return (labels.get(self.key) != self.value) if self.negated else labels.get(self.key) == self.value

    def __str__(self) -> str:
        return f"{self.key}{'!=' if self.negated else '='}{self.value}"


@dataclass(frozen=True, slots=True)
class Selector:
    """Terms that must all hold; validates itself on creation."""

    terms: tuple[Term, ...]

    def __post_init__(self) -> None:
        if not self.terms:
            raise LabelError("empty label selector: use KEY=VALUE or KEY!=VALUE")
        if len(self.terms) > MAX_TERMS:
            raise LabelError(f"too many selector terms: {len(self.terms)} > {MAX_TERMS}")
        if not all(isinstance(term, Term) for term in self.terms):
            raise LabelError("a selector holds terms")

    @classmethod
    def parse(cls, text: Any) -> Selector:
        """A selector from ``env=prod,role!=db``."""
        return cls.parse_all([text])

    @classmethod
    def parse_all(cls, texts: Iterable[Any]) -> Selector:
        """One selector from several texts (repeated ``label=`` query parameters), all of whose terms must hold."""
        terms = []
        for text in texts:
            if type(text) is not str:
                raise LabelError(f"a label selector is text, not {type(text).__name__}")
            if len(text) > MAX_SELECTOR:
                raise LabelError(f"label selector too long: {len(text)} > {MAX_SELECTOR} characters")
            terms += [parse_term(part) for part in text.split(",")]
        return cls(tuple(terms))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when every term holds for the labels."""
        return all(term.holds(labels) for term in self.terms)

    def __str__(self) -> str:
        return ",".join(map(str, self.terms))


def parse_term(text: str) -> Term:
    """``KEY=VALUE`` or ``KEY!=VALUE`` (surrounding spaces of the key ignored)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise LabelError(f"invalid selector term {_show(text)}: use KEY=VALUE or KEY!=VALUE")
    negated = key.endswith("!")
    key = (key[:-1] if negated else key).strip()
    return Term(check_key(key), check_value(key, value), negated)


@dataclass(frozen=True, slots=True)
class Spread:
    """Labels to spread over simulated machines: each key with its values (``env=prod,dev;role=web,db``)."""

    keys: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        if len(self.keys) > MAX_LABELS:
            raise LabelError(f"too many labels: {len(self.keys)} > {MAX_LABELS}")
        seen = set()
        for key, values in self.keys:
            check_key(key)
            if key in seen:
                raise LabelError(f"label {key!r} given twice")
            seen.add(key)
            if not values:
                raise LabelError(f"label {key!r} has no values")
            for value in values:
                check_value(key, value)

    @classmethod
    def parse(cls, text: str) -> Spread:
        """``KEY=V1,V2;KEY=V1,...``; empty text spreads nothing."""
        keys = []
        for part in (p.strip() for p in text.split(";")):
            if not part:
                continue
            key, sep, values = part.partition("=")
            if not sep:
                raise LabelError(f"invalid label spread {_show(part)}: use KEY=VALUE,VALUE;KEY=VALUE")
            keys.append((key.strip(), tuple(v.strip() for v in values.split(","))))
        return cls(tuple(keys))

    def labels(self, index: int) -> dict[str, str]:
        """The labels of machine ``index``: every combination of values in turn, the first key changing fastest."""
        labels, step = {}, 1
        for key, values in self.keys:
            labels[key] = values[(index // step) % len(values)]
            step *= len(values)
        return labels


def is_selector(text: str) -> bool:
    """True when a ``--machines`` value is a label selector rather than a machine-id glob (it holds ``=``)."""
    return "=" in text
