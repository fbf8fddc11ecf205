"""Progress lines: each form a program may print, and what is not progress."""

from __future__ import annotations

import pytest

from jobd.progress import parse_progress


@pytest.mark.parametrize("line, expected", [
    ('{"current": 25, "total": 200, "info": "src/a.py"}', (12.5, "src/a.py")),
    ('{"current": 3, "total": 0, "info": "scanning"}', (None, "scanning")),
    ('  {"progress": 42.5, "message": "indexing"}\n', (42.5, "indexing")),
    ('{"progress": 7}', (7.0, None)),
    ("Receiving objects:  45% (45/100)", (45.0, "Receiving objects:  45% (45/100)")),
    ("Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s",
     (45.0, "Receiving objects:  45% (45/100), 1.00 MiB | 2.00 MiB/s")),
    ("remote: Counting objects: 100% (3/3), done.",
     (100.0, "remote: Counting objects: 100% (3/3), done.")),
    ("copying 12.5%  ", (12.5, "copying 12.5%")),
])
def test_parse_progress_reads_each_form(line, expected):
    assert parse_progress(line) == expected


@pytest.mark.parametrize("line", [
    "", "hello world", "50% of the time it works", "load 150%", '{"current": 1}',
    '{"name": "x"}', "{not json 40%}", '["progress", 40]', '{"progress": true}',
])
def test_parse_progress_ignores_other_lines(line):
    assert parse_progress(line) is None
