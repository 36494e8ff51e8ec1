"""The agent's textfile collector: the exposition format as prometheus_client reads it; whole files or none."""

from __future__ import annotations

import logging
import math
import os
import threading
import time

import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from fleet.agent import textfile
from fleet.agent.textfile import TextfileCollector, parse_text, series_key
from fleet.config import payloads

VALID = """# HELP queue_depth Messages waiting.
# TYPE queue_depth gauge
queue_depth 3
queue_depth{queue="mail"} 7.5
queue_depth{queue="sms",region="eu-1",} 1e3
# TYPE backups_total counter
backups_total 42
# a plain comment
  jobs_running{name="say \\"hi\\"\\\\now\\nplease"}   -2.5e-3
"""


def test_gauges_counters_labels_comments_and_types():
    samples, problems = parse_text(VALID)
    assert problems == []
    assert samples == [
        ("queue_depth", 3.0), ('queue_depth{queue="mail"}', 7.5), ('queue_depth{queue="sms",region="eu-1"}', 1000.0),
        ("backups_total", 42.0), ('jobs_running{name="say \\"hi\\"\\\\now\\nplease"}', -0.0025)]
    assert all(payloads.is_series_name(name) for name, _ in samples)


@pytest.mark.parametrize(("line", "why"), [
    ("queue_depth", "not a sample"),
    ("queue depth 3", "not a sample"),
    ("3queue 1", "not a sample"),
    ("queue_depth{queue=mail} 1", "bad labels"),
    ('queue_depth{queue="mail} 1', "bad labels"),
    ('queue_depth{queue="a\x01"} 1', "unprintable"),
    ('queue_depth{queue="a",queue="b"} 1', "repeated label"),
    ("queue_depth 0x10", "not a sample"),
    ("queue_depth 1_000", "not a sample"),
    ("queue_depth 12 1700000000000", "timestamps"),
    ("queue_depth NaN", "finite"),
    ("queue_depth +Inf", "finite"),
    ("queue_depth 1e400", "finite"),
    ("q{l=\"" + "x" * 300 + "\"} 1", "too long"),
])
def test_bad_lines_are_skipped_and_the_rest_kept(line, why):
    samples, problems = parse_text(f"good 1\n{line}\nalso_good 2\n")
    assert samples == [("good", 1.0), ("also_good", 2.0)]
    assert len(problems) == 1
    assert "line 2" in problems[0]
    assert why in problems[0]


def test_a_repeated_series_keeps_the_first():
    samples, problems = parse_text('a{x="1"} 1\na{x="1"} 2\n')
    assert samples == [('a{x="1"}', 1.0)]
    assert "repeated" in problems[0]


# --- the same answers as prometheus_client's parser -----------------------------------------------
names = st.from_regex(r"[A-Za-z_:][A-Za-z0-9_:]{0,12}", fullmatch=True)
# Label names starting with "__" are reserved for Prometheus itself; its parser refuses them.
label_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,8}", fullmatch=True).filter(lambda n: not n.startswith("__"))
# Control characters other than a newline (written \n) cannot be part of a series name: such lines are skipped.
label_values = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")) | st.just("\n"), max_size=10)
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
spaces = st.sampled_from([" ", "  ", "\t", " \t"])


@st.composite
def sample_lines(draw):
    name = draw(names)
    labels = draw(st.dictionaries(label_names, label_values, max_size=3))
    value = draw(finite | st.integers(-(10**15), 10**15))
    gap = draw(spaces)
    if labels:
        inner = ",".join(f'{k}="{textfile.escape_label_value(v)}"' for k, v in labels.items())
        text = f"{name}{{{inner}{draw(st.sampled_from(['', ',']))}}}{gap}{value!r}"
    else:
        text = f"{name}{gap}{value!r}"
    return name, labels, float(value), text


@pytest.mark.slow
@hsettings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # slow when loaded
@given(st.lists(sample_lines(), max_size=8, unique_by=lambda s: (s[0], tuple(sorted(s[1].items())))),
       st.lists(st.sampled_from(["", "# a comment", "# HELP x some help", "# TYPE x gauge"]), max_size=3))
def test_the_same_samples_as_prometheus_client(lines, comments):
    text = "\n".join(comments + [line for *_, line in lines]) + "\n"
    ours, problems = parse_text(text)
    assert problems == []
    theirs = [(s.name, s.labels, s.value) for family in text_string_to_metric_families(text) for s in family.samples]
    assert sorted((n, sorted(labels.items()), v) for n, labels, v in theirs) == sorted(
        (n, sorted(labels.items()), v) for n, labels, v, _ in lines)
    assert sorted(ours) == sorted((series_key(n, list(labels.items())), v) for n, labels, v, _ in lines)


@hsettings(max_examples=300)
@given(st.text(max_size=200))
def test_any_text_is_parsed_without_an_exception_and_only_valid_series_come_out(text):
    samples, _ = parse_text(text)
    for name, value in samples:
        assert payloads.is_series_name(name)
        assert math.isfinite(value)


@given(names, st.lists(st.tuples(label_names, label_values), max_size=3, unique_by=lambda kv: kv[0]), finite)
def test_a_series_key_parses_back_to_itself(name, labels, value):
    key = series_key(name, labels)
    assert parse_text(f"{key} {value!r}\n")[0] == ([(key, value)] if payloads.is_series_name(key) else [])


# --- files and the directory ----------------------------------------------------------------------
def write_atomically(path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def test_a_directory_with_valid_invalid_and_half_written_files(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "fleet.agent")
    (tmp_path / "a_valid.prom").write_text(VALID)
    (tmp_path / "b_bad_line.prom").write_text("ok_metric 1\nthis is not a sample\n")
    (tmp_path / "c_not_utf8.prom").write_bytes(b"x 1\n\xff\xfe 2\n")
    (tmp_path / "d_half.prom").write_text("half_a 1\nhalf_b 2")  # the writer has not finished the last line
    (tmp_path / "e_huge.prom").write_text("big 1\n" + "# padding\n" * 7000)  # over 64 KiB
    (tmp_path / "ignored.txt").write_text("not_prom 1\n")
    (tmp_path / "f_dir.prom").mkdir()
    collector = TextfileCollector(str(tmp_path))
    custom = collector.collect()
    assert custom == {"queue_depth": 3.0, 'queue_depth{queue="mail"}': 7.5,
                      'queue_depth{queue="sms",region="eu-1"}': 1000.0, "backups_total": 42.0,
                      'jobs_running{name="say \\"hi\\"\\\\now\\nplease"}': -0.0025, "ok_metric": 1.0}
    problems = [r.getMessage() for r in caplog.records]
    assert any("b_bad_line.prom: 1 line(s) skipped" in m for m in problems)
    assert any("c_not_utf8.prom skipped: not UTF-8" in m for m in problems)
    assert any("d_half.prom skipped: last line incomplete" in m for m in problems)
    assert any("e_huge.prom skipped" in m and "65536" in m for m in problems)
    # Logged once per change of a file: nothing new while nothing changes.
    logged = len(caplog.records)
    assert collector.collect() == custom
    assert collector.collect() == custom
    assert len(caplog.records) == logged
    # The half-written file, once complete, is read whole.
    (tmp_path / "d_half.prom").write_text("half_a 1\nhalf_b 2\n")
    assert collector.collect() == {**custom, "half_a": 1.0, "half_b": 2.0}
    # A changed bad file is logged again, a removed file forgotten.
    (tmp_path / "b_bad_line.prom").write_text("ok_metric 2\nstill bad\n")
    (tmp_path / "a_valid.prom").unlink()
    assert collector.collect() == {"ok_metric": 2.0, "half_a": 1.0, "half_b": 2.0}
    assert sum("b_bad_line.prom" in r.getMessage() for r in caplog.records) == 2


def test_at_most_64_series_per_machine_across_files(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "fleet.agent")
    (tmp_path / "a.prom").write_text("".join(f"a_{i} {i}\n" for i in range(40)))
    (tmp_path / "b.prom").write_text("".join(f"b_{i} {i}\n" for i in range(40)) + "a_0 99\n")
    collector = TextfileCollector(str(tmp_path))
    custom = collector.collect()
    assert len(custom) == 64
    assert list(custom)[:40] == [f"a_{i}" for i in range(40)]  # files in name order, first come first served
    assert custom["a_0"] == 0.0
    assert "b_23" in custom
    assert "b_24" not in custom
    collector.collect()
    assert sum("series skipped" in r.getMessage() for r in caplog.records) == 1


def test_a_missing_directory_is_logged_once_and_reports_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "fleet.agent")
    collector = TextfileCollector(str(tmp_path / "nope"))
    assert collector.collect() == {}
    assert collector.collect() == {}
    assert sum("textfile directory" in r.getMessage() for r in caplog.records) == 1
    (tmp_path / "nope").mkdir()
    (tmp_path / "nope" / "x.prom").write_text("x 1\n")
    assert collector.collect() == {"x": 1.0}


def test_hostile_files_never_stop_the_agent(tmp_path):
    (tmp_path / "a_mib.prom").write_bytes(b"m 1\n" * (1 << 18))  # 1 MiB
    many = "".join(f"s{i} {i}\n" for i in range(10_000))
    (tmp_path / "b_many.prom").write_text(many[:many.rindex("\n", 0, 60_000) + 1])
    (tmp_path / "c_nan.prom").write_text("nan NaN\ninf +Inf\nhuge 1e999\nbig 1e308\n")
    (tmp_path / "d_binary.prom").write_bytes(os.urandom(4096) + b"\n")
    os.mkfifo(tmp_path / "e_fifo.prom")  # must not block the agent
    custom = TextfileCollector(str(tmp_path)).collect()
    assert len(custom) == 64
    assert "m" not in custom
    assert custom["s0"] == 0.0
    assert "big" not in custom  # past the 64 series of b_many.prom
    report = payloads.build_report("m", "hw", "s", 0, 1.0, {"custom": custom}, {})
    assert payloads.parse_report(payloads.encode(report), "fleet/acme/m/report").metrics["custom"] == custom


def test_files_replaced_atomically_are_read_whole_or_not_at_all(tmp_path):
    path = tmp_path / "job.prom"
    versions = ["".join(f"job_{i} {v}\n" for i in range(20)) for v in range(50)]
    write_atomically(path, versions[0])
    stop = threading.Event()

    def writer():
        n = 0
        while not stop.is_set():
            write_atomically(path, versions[n % len(versions)])
            n += 1

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        collector = TextfileCollector(str(tmp_path))
        seen = set()
        collects, deadline = 0, time.monotonic() + 10
        # At least 300 reads, and on until the writer has been seen at work (it may not get the GIL at once).
        while (collects < 300 or len(seen) < 5) and time.monotonic() < deadline:
            collects += 1
            custom = collector.collect()
            assert len(custom) == 20
            assert len(set(custom.values())) == 1  # never half of one version and half of another
            seen.add(next(iter(custom.values())))
    finally:
        stop.set()
        thread.join(5)
    assert len(seen) > 1


def test_a_file_written_in_place_is_skipped_while_incomplete(tmp_path):
    path = tmp_path / "slow.prom"
    collector = TextfileCollector(str(tmp_path))
    with open(path, "w") as out:
        out.write("slow_a 1\nslow_b 2\nslow_")
        out.flush()
        assert collector.collect() == {}
        out.write("c 3\n")
        out.flush()
        assert collector.collect() == {"slow_a": 1.0, "slow_b": 2.0, "slow_c": 3.0}
