"""Labels and label selectors: the contract's rules, and any text parses or raises one LabelError naming it."""

from __future__ import annotations

import json
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fleet.config.errors import SettingsError
from fleet.config.labels import (
    MAX_LABELS,
    LabelError,
    Labels,
    Selector,
    Spread,
    diff,
    is_selector,
    label_text,
    labels_json,
    merge,
)
from fleet.config.payloads import build_report, encode, parse_report, report_labels
from fleet.config.settings import load_settings


def test_labels_parse_sorted_and_round_trip():
    labels = Labels.parse(["role=web", "env=prod", "site=Paris 1 (rack=3)"])
    assert labels.as_dict() == {"env": "prod", "role": "web", "site": "Paris 1 (rack=3)"}
    assert str(labels) == "env=prod,role=web,site=Paris 1 (rack=3)"
    assert Labels.parse_text(" env=prod, role=web ,").as_dict() == {"env": "prod", "role": "web"}
    assert Labels.parse_text("") == Labels()


@pytest.mark.parametrize(("pairs", "named"), [
    (["Env=prod"], "'Env'"),
    (["1env=prod"], "'1env'"),
    (["env-x=prod"], "'env-x'"),
    (["a" * 33 + "=x"], "'aaaa"),
    (["env="], "label 'env'"),
    (["env=" + "x" * 65], "label 'env'"),
    (["env=a\tb"], "label 'env'"),
    (["env"], "'env'"),
    (["env=a", "env=b"], "'env' given twice"),
    ([f"k{i}=v" for i in range(MAX_LABELS + 1)], "too many labels"),
])
def test_bad_labels_name_the_problem(pairs, named):
    with pytest.raises(LabelError, match=re.escape(named)):
        Labels.parse(pairs)


def test_limits_are_inclusive():
    labels = Labels.parse([f"k{i}=" + "v" * 64 for i in range(MAX_LABELS)])
    assert len(labels.items) == MAX_LABELS
    assert Labels.parse(["a" * 32 + "=x"]).as_dict() == {"a" * 32: "x"}


def test_settings_take_a_table_an_env_text_and_flags(tmp_path):
    path = tmp_path / "fleet.toml"
    path.write_text('[labels]\nenv = "prod"\nrole = "web"\n')
    assert load_settings(path, env={}).labels.as_dict() == {"env": "prod", "role": "web"}
    assert load_settings(None, env={"FLEET_LABELS": "env=prod,role=db"}).labels.as_dict() == {"env": "prod",
                                                                                               "role": "db"}
    assert load_settings(None, env={}, flags={"labels": ("env=dev",)}).labels.as_dict() == {"env": "dev"}
    with pytest.raises(SettingsError, match="labels.*'Env'"):
        load_settings(None, env={"FLEET_LABELS": "Env=prod"})
    path.write_text('labels = "env=prod"\n[fleet]\n')
    assert load_settings(path, env={}).labels.as_dict() == {"env": "prod"}
    path.write_text('[labels]\nenv = 3\n')
    with pytest.raises(SettingsError, match="label 'env'"):
        load_settings(path, env={})


def test_selector_terms_all_must_hold_and_a_missing_key_satisfies_not_equal():
    selector = Selector.parse("env=prod,role!=db")
    assert selector.matches({"env": "prod", "role": "web"})
    assert selector.matches({"env": "prod"})
    assert not selector.matches({"env": "prod", "role": "db"})
    assert not selector.matches({"role": "web"})
    assert str(selector) == "env=prod,role!=db"
    assert Selector.parse_all(["env=prod", "role!=db"]) == selector
    assert Selector.parse("note=a=b").matches({"note": "a=b"})


@pytest.mark.parametrize(("text", "named"), [
    ("", "invalid selector term ''"),
    ("env", "invalid selector term 'env'"),
    ("Env=prod", "invalid label key 'Env'"),
    ("env=", "label 'env'"),
    ("env=prod,", "invalid selector term ''"),
    ("=prod", "invalid label key ''"),
    (",".join(["a=b"] * 17), "too many selector terms"),
])
def test_bad_selectors_name_the_problem(text, named):
    with pytest.raises(LabelError, match=re.escape(named)):
        Selector.parse(text)


def test_glob_or_selector():
    assert is_selector("env=prod")
    assert is_selector("role!=db")
    assert not is_selector("web-*")
    assert not is_selector("[!a]*")


def test_merge_and_diff():
    assert merge({"env": "dev", "role": "web"}, {"env": "prod"}) == {"env": "prod", "role": "web"}
    assert diff({"env": "dev", "site": "a"}, {"env": "prod", "role": "web"}) == "env=dev->prod, +role=web, -site"
    assert diff({"a": "b"}, {"a": "b"}) == ""


def test_report_carries_labels_and_bad_ones_cost_only_the_labels():
    body = build_report("web-1", "hw", "s1", 0, 1.0, {"cpu_percent": 1.0}, {}, {"env": "prod"})
    report = parse_report(encode(body), "fleet/acme/web-1/report")
    assert report_labels(report) == ({"env": "prod"}, None)
    assert build_report("web-1", "hw", "s1", 0, 1.0, {}, {})["labels"] == {}
    for bad in ({f"k{i}": "v" for i in range(17)}, {"env": "x" * 65}, ["env=prod"], {"env": 3}):
        body["labels"] = bad
        report = parse_report(encode(body), "fleet/acme/web-1/report")  # the report itself is valid
        labels, problem = report_labels(report)
        assert labels == {}
        assert problem


def parsed_or_none(parse, value):
    """``parse(value)``, or None when it raised LabelError with a message (no other error may escape)."""
    try:
        return parse(value)
    except LabelError as exc:
        message = str(exc)
    assert message
    return None


@given(st.text(max_size=200))
def test_any_selector_text_parses_or_raises_label_error(text):
    selector = parsed_or_none(Selector.parse, text)
    if selector is not None:
        assert Selector.parse(str(selector)) == selector
        assert isinstance(selector.matches({}), bool)


@given(st.lists(st.text(max_size=80), max_size=20))
def test_any_label_flags_parse_or_raise_label_error(pairs):
    labels = parsed_or_none(Labels.parse, pairs)
    if labels is not None:
        assert Labels.from_mapping(labels.as_dict()) == labels


@given(st.one_of(st.dictionaries(st.text(max_size=40), st.one_of(st.text(max_size=70), st.integers(), st.none())),
                 st.text(), st.integers(), st.lists(st.text())))
def test_any_json_labels_parse_or_raise_label_error(value):
    labels = parsed_or_none(Labels.from_mapping, value)
    if labels is not None:
        assert all(key and value for key, value in labels.items)

def test_spread_gives_every_combination_in_turn():
    spread = Spread.parse("env=prod,dev; role=web,db,worker")
    assert [spread.labels(i) for i in (0, 1, 2, 5, 6)] == [
        {"env": "prod", "role": "web"}, {"env": "dev", "role": "web"}, {"env": "prod", "role": "db"},
        {"env": "dev", "role": "worker"}, {"env": "prod", "role": "web"}]
    assert Spread.parse("").labels(3) == {}
    for bad, named in (("env", "invalid label spread"), ("Env=a", "'Env'"), ("env=a,", "label 'env'"),
                       ("env=a;env=b", "given twice")):
        with pytest.raises(LabelError, match=re.escape(named)):
            Spread.parse(bad)


@given(st.text(max_size=120))
def test_any_spread_parses_or_raises_label_error(text):
    spread = parsed_or_none(Spread.parse, text)
    if spread is not None:
        assert Labels.from_mapping(spread.labels(7)).as_dict() == spread.labels(7)


_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,5}", fullmatch=True)
_VALUES = st.text(alphabet=st.sampled_from('ab"\\:,{}é =ü'), min_size=1, max_size=8)


@given(st.dictionaries(_KEYS, _VALUES, max_size=5), _KEYS, _VALUES)
def test_a_labels_text_holds_a_labels_text_exactly_when_the_labels_hold_it(labels, key, value):
    stored = labels_json(labels)
    assert json.loads(stored) == labels
    assert (label_text(key, value) in stored) == (labels.get(key) == value)
