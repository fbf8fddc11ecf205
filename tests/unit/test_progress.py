"""Progress lines: each form a program may print, what is not progress, a program's
result line, and an indexer's passes."""

from __future__ import annotations

import pytest

import json

from jobd.progress import MAX_RESULT, Counts, Passes, parse_progress, parse_result


@pytest.mark.parametrize("line, expected", [
    ('{"current": 25, "total": 200, "info": "src/a.py"}',
     (12.5, "src/a.py", Counts(25, 200, None))),
    ('{"current": 3, "total": 0, "info": "scanning"}', (None, "scanning", Counts(3, 0, None))),
    ('{"current": 3, "total": 6, "pass": 2}', (50.0, None, Counts(3, 6, 2))),
    ('  {"progress": 42.5, "message": "indexing"}\n', (42.5, "indexing", None)),
    ('{"progress": 7}', (7.0, None, None)),
    ("Receiving objects:  45% (45/100)", (45.0, "Receiving objects:  45% (45/100)", None)),
    ("Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s",
     (45.0, "Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s", None)),
    ("remote: Counting objects: 100% (3/3), done.",
     (100.0, "remote: Counting objects: 100% (3/3), done.", None)),
    ("copying 12.5%  ", (12.5, "copying 12.5%", None)),
])
def test_parse_progress_reads_each_form(line, expected):
    assert parse_progress(line) == expected


@pytest.mark.parametrize("line", [
    "", "hello world", "50% of the time it works", "load 150%", '{"current": 1}',
    '{"name": "x"}', "{not json 40%}", '["progress", 40]', '{"progress": true}',
])
def test_parse_progress_ignores_other_lines(line):
    assert parse_progress(line) is None


@pytest.mark.parametrize("line, expected", [
    (b'{"result": {"files": 3, "alias": "\\u00dc"}}', {"files": 3, "alias": "\u00dc"}),
    (b'  {"result": {}}\n', {}),
    # JSON's whitespace wherever JSON allows it
    (b'{ "result": {"a": 1}}', {"a": 1}),
    (b'{\t"result" :\r{"a": 1}}', {"a": 1}),
    (b'{"result": [1, 2]}', None),
    (b'{"result": {"a": 1}, "extra": 2}', None),
    (b'{"result": {"a": 1', None),
    (b'{"progress": 5}', None),
    (b'{"result": {"x": "\xff"}}', None),
    (b'{"result": {"x": "' + b"a" * MAX_RESULT + b'"}}', None),
    # no JSON numbers, though Python's parser takes them: stored, every listing failed
    (b'{"result": {"x": NaN}}', None),
    (b'{"result": {"x": [1, -Infinity]}}', None),
    (b'{"result": {"x": 1e999}}', None),
    (b'{"result": {"x": "NaN", "y": 1e308}}', {"x": "NaN", "y": 1e308}),
])
def test_parse_result_takes_only_a_result_object_within_the_limit(line, expected):
    assert parse_result(line) == expected


def _cidx_lines(n: int) -> list[str]:
    """CIDX's ``--progress-json`` lines (cidx-research §3.2): hashing 0..n, then
    embedding from 1..n, emoji and non-ASCII as json.dumps escapes them."""
    lines = [{"current": 0, "total": n, "info": f"0/{n} files (0%) | 0.0 files/s | 0.0 KB/s "
                                                "| 0 threads | \U0001f50d Starting hash calculation..."}]
    lines += [{"current": k, "total": n, "info": f"{k}/{n} files | \U0001f50d f{k}.py"}
              for k in range(1, n + 1)]
    lines += [{"current": k, "total": n, "info": f"{k}/{n} files | \U0001f4ca \u00dcn{k}.py"}
              for k in range(1, n + 1)]
    return [json.dumps(line) for line in lines]


def _run_passes(lines: list[str], passes: int) -> tuple[Passes, list[tuple[float | None, str | None]]]:
    seen: list[tuple[float | None, str | None]] = []
    tracker = Passes(lambda percent, message: seen.append((percent, message)), passes)
    for line in lines:
        hit = parse_progress(line)
        assert hit is not None and hit[2] is not None, line
        tracker.count(hit[2], hit[1])
    return tracker, seen


def test_two_passes_each_fill_half_and_never_go_back():
    tracker, seen = _run_passes(_cidx_lines(10), passes=2)
    percents = [p for p, _ in seen]
    assert percents == sorted(percents)
    assert percents[10] == pytest.approx(50.0)        # the end of hashing: half way
    assert percents[11] == pytest.approx(55.0)        # embedding 1/10: into the second half
    assert percents[-1] == pytest.approx(100.0)
    assert seen[11][1] == "pass 2/2: 1/10 files | \U0001f4ca \u00dcn1.py"
    assert seen[5][1].startswith("pass 1/2: 5/10 files | \U0001f50d")
    assert tracker.total == 10 and tracker.number == 2


def test_one_pass_said_but_two_made_keeps_filling_the_last_part():
    _, seen = _run_passes(_cidx_lines(10), passes=1)
    percents = [p for p, _ in seen]
    assert percents == sorted(percents)
    assert percents[10] == pytest.approx(100.0)  # all of it was the first pass
    assert seen[11][1].startswith("pass 2: ")
    assert seen[5][1] == "5/10 files | \U0001f50d f5.py"  # one pass: no pass in the message


def test_a_third_pass_beyond_two_fills_what_is_left():
    lines = _cidx_lines(4)[:5]  # hashing 0..4 (done: 50%)
    lines += [json.dumps({"current": 2, "total": 4, "info": "embedding"})]  # 75%
    lines += [json.dumps({"current": 1, "total": 4, "info": "third"}),
              json.dumps({"current": 4, "total": 4, "info": "third"})]
    tracker, seen = _run_passes(lines, passes=2)
    assert [p for p, _ in seen][-3:] == [pytest.approx(75.0), pytest.approx(81.25),
                                         pytest.approx(100.0)]
    assert seen[-1][1] == "pass 3: third" and tracker.number == 3


def test_a_changed_total_rescales_the_pass_and_a_pass_field_starts_one():
    lines = [json.dumps({"current": 5, "total": 10}), json.dumps({"current": 6, "total": 20}),
             json.dumps({"current": 10, "total": 20}),
             json.dumps({"current": 10, "total": 20, "pass": 2})]
    tracker, seen = _run_passes(lines, passes=2)
    # 5/10 = 25%; 6/20 would be 15%: still the first pass, and never lower than before
    assert [p for p, _ in seen] == [pytest.approx(25.0), pytest.approx(25.0),
                                    pytest.approx(25.0), pytest.approx(75.0)]
    assert tracker.number == 2 and tracker.total == 20


def test_a_zero_total_reports_only_the_message():
    _, seen = _run_passes([json.dumps({"current": 0, "total": 0, "info": "scanning"})], 2)
    assert seen == [(None, "pass 1/2: scanning")]


def test_a_long_line_split_over_many_reads_keeps_its_start() -> None:
    # a pipe hands a long line over in pieces: what is kept must still say what it is
    # (a result line too big to take), whatever the pieces were
    from jobd.progress import MAX_LINE, Lines
    line = b'{"result": {"big": "' + b"x" * 70000 + b'"}}\n'
    lines = Lines()
    out = []
    for start in range(0, len(line), 4096):
        out += lines.feed(line[start:start + 4096])
    assert len(out) == 1
    assert out[0].startswith(b'{"result"') and MAX_LINE <= len(out[0]) < MAX_LINE + 4096
