"""How an id becomes one path segment (SPEC §3a): the only code that turns a user or
project id into part of a file path.

Every path built from an id goes through ``segment``: the ``{user_id}`` and
``{project_id}`` of ``repo_path_template`` (``Config.expand``) and the manifests
(``<state dir>/manifests/<user>/<project>.json``). Job logs are named by job id, which
never needs it.

The encoding, for a client (a CIDX server) that computes the same path itself:

1. Take the id's UTF-8 bytes. Each byte in ``[A-Za-z0-9_.-]`` stays as it is; every other
   byte becomes ``%XX``, two uppercase hex digits (``/`` is ``%2F``, a space ``%20``,
   ``@`` ``%40``, ``Ü`` ``%C3%9C``).
2. A ``.`` at the very start becomes ``%2E``, so no segment is ``.``, ``..`` or hidden.
3. When the result is longer than 200 bytes, keep its first 180 bytes, cut back to the
   start of a ``%XX`` that would be split, then append ``~`` and the first 16 hex digits
   (lowercase) of the SHA-256 of the id's UTF-8 bytes.

In Python::

    SAFE = set(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")

    def segment(id: str) -> str:
        data = id.encode("utf-8")
        parts = [chr(b) if b in SAFE else f"%{b:02X}" for b in data]
        if parts[0] == ".":
            parts[0] = "%2E"
        out = "".join(parts)
        if len(out) > 200:
            kept, size = [], 0
            for p in parts:
                if size + len(p) > 180:
                    break
                kept.append(p)
                size += len(p)
            out = "".join(kept) + "~" + hashlib.sha256(data).hexdigest()[:16]
        return out

Distinct ids give distinct segments: ``%`` and ``~`` are always encoded, so an encoded
segment decodes back to its id, and a shortened one (the only kind with a ``~``) is
told apart by the hash. Ids of letters, digits, ``_``, ``.`` and ``-`` that do not start
with ``.`` — every id the rule before §3a allowed — encode to themselves, so the
folders of existing jobs keep their paths.
"""

from __future__ import annotations

import hashlib

__all__ = ["segment"]

_SAFE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-")
_LONGEST_KEPT = 200
_CUT_AT = 180
_HASH_DIGITS = 16


def segment(id: str) -> str:
    """The one path segment for a user or project id (see the module docstring).

    ``id`` is a valid id (``auth.check_id``); an empty one or one that is not valid
    Unicode text raises ValueError.
    """
    if not id:
        raise ValueError("an empty id has no path segment")
    data = id.encode("utf-8")  # a lone surrogate raises UnicodeEncodeError, a ValueError
    parts = [chr(b) if b in _SAFE else f"%{b:02X}" for b in data]
    if parts[0] == ".":
        parts[0] = "%2E"
    encoded = "".join(parts)
    if len(encoded) <= _LONGEST_KEPT:
        return encoded
    kept, size = [], 0
    for part in parts:
        if size + len(part) > _CUT_AT:
            break
        kept.append(part)
        size += len(part)
    return "".join(kept) + "~" + hashlib.sha256(data).hexdigest()[:_HASH_DIGITS]
