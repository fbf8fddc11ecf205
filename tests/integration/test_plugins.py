"""Entry-point plugins (SPEC §5) as a real daemon loads them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import plugin_env

PLUGIN = '''
from jobd.handlers.noop import NoopHandler


class Picky(NoopHandler):
    name = "picky"

    def validate(self, options, **context):
        if "colour" not in options:
            raise ValueError("a colour is needed")
        if not isinstance(options["colour"], str):
            raise TypeError("colour must be a string")
        return {}
'''


def test_a_plugin_whose_validate_raises_refuses_the_submit_naming_why(
        make_daemon: Any, tmp_path: Path) -> None:
    d = make_daemon(env=plugin_env(tmp_path / "site", "jobd_picky", PLUGIN, picky="Picky"))
    for options, why in (({}, "a colour is needed"), ({"colour": 3}, "colour must be a string")):
        error = d.raw("jobs.submit", type="picky", options=options)["error"]
        assert error["code"] == -32602, error
        assert error["message"] == f"picky jobs refuse these options: {why}"
        assert error["data"]["field"] == "options"
    assert "result" in d.raw("jobs.submit", type="picky", options={"colour": "red"})
