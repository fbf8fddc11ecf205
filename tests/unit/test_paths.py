"""``paths.segment``: an id as one path segment, one-to-one (SPEC §3a)."""

from __future__ import annotations

import hashlib
import itertools
import random
import re
import string
import textwrap
from pathlib import Path

import pytest

import jobd.paths
from jobd.auth import check_id
from jobd.config import Config
from jobd.handlers.manifest import manifest_path
from jobd.paths import segment


@pytest.mark.parametrize("id, encoded", [
    ("org/repo", "org%2Frepo"),
    ("..", "%2E."),
    (".", "%2E"),
    (".hidden", "%2Ehidden"),
    ("a.b.", "a.b."),  # only a leading dot is encoded
    ("a b", "a%20b"),
    ("alice@example.com", "alice%40example.com"),
    ("Jane Doe", "Jane%20Doe"),
    ("Ünïcode", "%C3%9Cn%C3%AFcode"),
    ("日本", "%E6%97%A5%E6%9C%AC"),
    ("😀", "%F0%9F%98%80"),
    ("100%", "100%25"),
    ("a~b", "a%7Eb"),
    ("-rf", "-rf"),
    ("a\\b", "a%5Cb"),
])
def test_each_byte_outside_the_safe_set_becomes_uppercase_percent_hex(id: str,
                                                                       encoded: str) -> None:
    assert segment(id) == encoded


@pytest.mark.parametrize("id", ["alice", "p1", "my-repo", "my_repo", "v1.2.3", "A", "_x",
                                "0", "a" + "b._-" * 31 + "xyz"])
def test_ids_the_old_rule_allowed_encode_to_themselves(id: str) -> None:
    # the old rule: [A-Za-z0-9_][A-Za-z0-9._-]{0,127}; their folders must not move
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}", id)
    assert segment(id) == id


def old_rule_ids(count: int = 500) -> list[str]:
    """Random ids of the rule before SPEC §3a: ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``."""
    rng = random.Random(10)
    first = string.ascii_letters + string.digits + "_"
    rest = first + ".-"
    return [rng.choice(first) + "".join(rng.choices(rest, k=rng.randrange(128)))
            for _ in range(count)]


def test_every_old_rule_id_is_still_valid_and_keeps_its_folder() -> None:
    for id in old_rule_ids():
        assert check_id(id, "project_id") == id
        assert segment(id) == id


def test_an_encoding_of_exactly_200_bytes_is_kept_whole() -> None:
    assert segment("a" * 200) == "a" * 200
    assert segment("a" * 197 + "/") == "a" * 197 + "%2F"  # 200 bytes


def test_a_long_encoding_is_cut_at_180_bytes_plus_a_hash() -> None:
    id = "a" * 201
    digest = hashlib.sha256(id.encode()).hexdigest()[:16]
    assert segment(id) == "a" * 180 + "~" + digest


def test_the_cut_never_splits_a_percent_escape() -> None:
    # 179 safe bytes, then escapes: the escape at 179..181 would pass 180, so it goes
    id = "a" * 179 + "é" * 20
    out = segment(id)
    digest = hashlib.sha256(id.encode()).hexdigest()[:16]
    assert out == "a" * 179 + "~" + digest
    for prefix in range(0, 4):  # every alignment of the escapes against the cut
        id = "b" * prefix + "ü" * 120
        head, _, tail = segment(id).partition("~")
        assert len(head) <= 180 and len(head) > 176
        assert re.fullmatch(r"b*(%[0-9A-F]{2})*", head), head
        assert tail == hashlib.sha256(id.encode()).hexdigest()[:16]


def test_the_longest_id_fits_in_a_file_name() -> None:
    for id in ("a" * 255, "é" * 127, "/" * 255, "😀" * 63):
        out = segment(id)
        assert len(out.encode()) == len(out) <= 197  # ASCII, and room for ".json"
        assert out.count("~") == 1


TRICKY = ["a", "A", "a/b", "a%2Fb", "a%2fb", "a b", "a%20b", "a_b", "a-b", "a.b", ".a", "%2Ea",
          "..", ".", "%2E.", "%2E", "a~b", "~", "a" * 200, "a" * 201, "a" * 202,
          "a" * 180 + "~" + "0" * 16, "é", "e\u0301",  # composed and decomposed stay apart
          "Ünïcode", "U\u0308n\u0308i\u0308code", "alice@example.com", "alice%40example.com",
          "Jane Doe", "Jane  Doe", "org/repo", "org%2Frepo", "org/repo/", "/org/repo", "é" * 127,
          "é" * 126 + "e", "-", "_", "x" * 254 + "/", "x" * 254 + "\\"]


def test_distinct_ids_never_share_a_segment() -> None:
    assert len(set(TRICKY)) == len(TRICKY)
    encoded = {segment(id): id for id in TRICKY}
    assert len(encoded) == len(TRICKY), [
        (a, b) for a, b in itertools.combinations(TRICKY, 2) if segment(a) == segment(b)]


@pytest.mark.parametrize("id", TRICKY)
def test_a_segment_is_one_plain_path_part(id: str) -> None:
    out = segment(id)
    assert out not in ("", ".", "..") and not out.startswith(".")
    assert re.fullmatch(r"[A-Za-z0-9_.%~-]+", out)
    assert Path("/r", out).parent == Path("/r")


def test_an_empty_or_invalid_id_has_no_segment() -> None:
    for bad in ("", "\ud800"):
        with pytest.raises(ValueError):
            segment(bad)


def test_the_repository_template_and_the_manifest_use_the_segment(tmp_path: Path) -> None:
    config = Config(socket=tmp_path / "s", db=tmp_path / "state" / "jobd.db")
    path = config.expand(config.sync.repo_path_template, user_id="alice@example.com",
                         project_id="../org/repo")
    assert path == f"{tmp_path}/state/repos/alice%40example.com/%2E.%2Forg%2Frepo"
    assert manifest_path(config, "Jane Doe", "org/repo") == (
        tmp_path / "state" / "manifests" / "Jane%20Doe" / "org%2Frepo.json")
    # any value a template takes (a [types] repo's option) is one segment too
    assert config.expand("{state_dir}/golden/{alias}", alias="../x") == (
        f"{tmp_path}/state/golden/%2E.%2Fx")
    # ids the old rule allowed keep the paths they had
    assert config.expand(config.sync.repo_path_template, user_id="alice",
                         project_id="p-1.x") == f"{tmp_path}/state/repos/alice/p-1.x"
    assert manifest_path(config, "alice", "proj") == (
        tmp_path / "state" / "manifests" / "alice" / "proj.json")


def test_the_documented_recipe_computes_the_same_segments() -> None:
    # the module docstring is what a CIDX server copies: it must agree with the code
    doc = jobd.paths.__doc__ or ""
    recipe = textwrap.dedent(doc.split("In Python::\n", 1)[1].split("\nDistinct ids", 1)[0])
    namespace: dict[str, object] = {"hashlib": hashlib}
    exec(recipe, namespace)
    documented = namespace["segment"]
    for id in TRICKY + old_rule_ids(50) + ["ü" * 120, "b" + "ü" * 120, "bb" + "ü" * 120]:
        assert documented(id) == segment(id), id  # type: ignore[operator]
