"""Who is calling and what they may do: socket peer -> Caller, and Caller -> Scope (SPEC §3).

The daemon trusts only the kernel's word on the peer (``SO_PEERCRED``) and the password
and group databases; ``as_user``/``as_admin`` are claims this module accepts or refuses
by the table of SPEC §3. ``Scope`` is the answer every user-scoped call works from.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import socket
import struct
import unicodedata
from typing import Iterable, Sequence

from jobd.config import Config
from jobd.errors import Forbidden, InvalidParams, Unauthenticated
from jobd.models import Role
from jobd.params import flag

__all__ = ["MAX_ID_BYTES", "Caller", "Scope", "check_argv_ids", "check_id", "identify",
           "peer_credentials", "scope"]

#: the longest user or project id, in UTF-8 bytes (SPEC §3a)
MAX_ID_BYTES = 255
#: the categories no id may contain, and what they are called in a refusal
_REFUSED_CATEGORIES = {"Cc": "a control character", "Cf": "a format character",
                       "Zl": "a line separator", "Zp": "a paragraph separator"}
_UCRED = struct.Struct("3i")


@dataclasses.dataclass(frozen=True)
class Caller:
    uid: int
    pid: int
    user: str
    role: Role
    groups: frozenset[str]


def check_id(value: object, field: str, *, argument: bool = False) -> str:
    """A user or project id as SPEC §3a allows it, else InvalidParams naming ``field``.

    1-255 UTF-8 bytes of valid Unicode text, no character of category Cc, Cf, Zl or Zp
    (control, format such as bidi overrides and zero-width characters, line and
    paragraph separators), no white space at either end; compared exactly, never
    normalised. ``argument``: the id also becomes a program argument, so it may not start
    with ``-``. Where it becomes a path, ``paths.segment`` encodes it.
    """
    problem = _id_problem(value, argument=argument)
    if problem is not None:
        raise InvalidParams(f"{field} {_shown(value)} is not a valid id: {problem}",
                            field=field)
    return value  # type: ignore[return-value]


def check_argv_ids(argvs: Iterable[str | Sequence[str]], *, user_id: str,
                   project_id: str | None) -> None:
    """Refuse ids that would start an argument of one of ``argvs`` with ``-`` (SPEC §3a).

    ``argvs`` are argv templates (a plain string is a built-in command, not an argv);
    an argument beginning with ``{user_id}`` or ``{project_id}`` would begin with the
    id, which a program could read as an option.
    """
    args = [arg for argv in argvs if not isinstance(argv, str) for arg in argv]
    for field, value in (("user_id", user_id), ("project_id", project_id)):
        if value is not None and any(arg.startswith(f"{{{field}}}") for arg in args):
            check_id(value, field, argument=True)


def _id_problem(value: object, *, argument: bool) -> str | None:
    if not isinstance(value, str):
        return "it must be a string"
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        return "it contains a lone surrogate; send valid Unicode text"
    if not size:
        return f"it is empty; an id has 1 to {MAX_ID_BYTES} bytes of UTF-8"
    if size > MAX_ID_BYTES:
        return f"it is {size} bytes of UTF-8; an id has 1 to {MAX_ID_BYTES}"
    for char in value:
        category = unicodedata.category(char)
        if category in _REFUSED_CATEGORIES:
            return (f"it contains U+{ord(char):04X}, {_REFUSED_CATEGORIES[category]} "
                    f"(category {category}); remove it")
    if value != value.strip():
        return "it starts or ends with white space; strip it"
    if argument and value.startswith("-"):
        return ("it starts with '-' and would begin a program's argument, which the "
                "program could read as an option; use an id that does not start with '-'")
    return None


def _shown(value: object) -> str:
    """``value`` for an error message: repr escapes what a terminal should not see, and a
    long one is cut."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:60]}... ({len(text)} characters)"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a connected Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def _listed(entries: tuple[str, ...], user: str, groups: frozenset[str]) -> bool:
    return any(e[1:] in groups if e.startswith("@") else e == user for e in entries)


def identify(uid: int, gid: int, pid: int, config: Config, *,
             daemon_uid: int | None = None) -> Caller:
    """The Caller for a peer: its login name, group names and role."""
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = f"uid-{uid}"
        gids = [gid]
    else:
        gids = os.getgrouplist(user, gid)
    names = set()
    for g in gids:
        try:
            names.add(grp.getgrgid(g).gr_name)
        except KeyError:
            pass  # a gid without a name cannot be listed as @group anyway
    groups = frozenset(names)
    own_uid = os.getuid() if daemon_uid is None else daemon_uid
    if uid in (0, own_uid) or _listed(config.auth.admins, user, groups):
        role = Role.ADMIN
    elif _listed(config.auth.services, user, groups):
        role = Role.SERVICE
    else:
        role = Role.USER
    return Caller(uid=uid, pid=pid, user=user, role=role, groups=groups)


@dataclasses.dataclass(frozen=True)
class Scope:
    caller: Caller
    user_id: str | None      #: whose jobs this call sees; None = everyone's
    owner: str               #: who owns a job submitted in this scope
    actor: str               #: for event rows: "alice", "admin:root", "service:cidx"
    may_repo_path: bool      #: options.repo_path
    may_admin_types: bool    #: submit or retry `command` and `noop`
    may_raise_priority: bool  #: priority above 0
    may_stats: bool          #: admin.stats and admin.cleanup
    may_pause: bool          #: admin.pause, admin.resume and admin.maintenance
    may_any_timeout: bool = False  #: timeout_s of 0 (no limit) or past max_timeout

    def check_filter(self, user_id: str | None) -> str | None:
        """The ``user_id`` filter of jobs.list, as it applies in this scope."""
        if self.user_id is None:
            return user_id
        if user_id is None or user_id == self.user_id:
            return self.user_id
        raise Forbidden(f"user_id {user_id!r} is outside this call's scope: "
                        f"you see only the jobs of {self.user_id!r}")


def _reserved(name: str, config: Config | None) -> bool:
    """Whether ``name`` is a local admin's login that a service may not act as (SPEC §3).

    uid 0's login, the daemon's own user, and the users and groups of ``auth.admins``.
    """
    logins = {_login(0), _login(os.getuid())}
    if name in logins:
        return True
    if config is None:
        return False
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return any(e == name for e in config.auth.admins)
    groups = set()
    for g in os.getgrouplist(name, entry.pw_gid):
        try:
            groups.add(grp.getgrgid(g).gr_name)
        except KeyError:
            pass
    return _listed(config.auth.admins, name, frozenset(groups))


def _login(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def scope(caller: Caller, as_user: str | None, as_admin: bool, as_role: str | None = None,
          *, config: Config | None = None) -> Scope:
    """The scope of one call by ``caller`` with ``as_user``/``as_admin``/``as_role`` (SPEC §3).

    ``as_role: "user"`` (services and admins, with ``as_user``) gives the call exactly a
    plain user's rights for that user: what a web server sends for its ordinary users.
    With ``config``, a service may not act as a local admin (root, the daemon's user,
    ``auth.admins``) unless ``as_admin``, and no call with ``as_role`` may.
    """
    if as_user is not None:
        check_id(as_user, "as_user")
    flag(as_admin, "as_admin")
    if as_role is not None and as_role != "user":
        raise InvalidParams(f'as_role must be "user" when given, not {as_role!r}',
                            field="as_role")
    role, name = caller.role, caller.user

    if role is Role.USER:
        if as_admin:
            raise Forbidden(f"{name} is not a jobd admin: as_admin is for admins and services "
                            "(see auth.admins and auth.services in jobd.toml)")
        if as_user is not None and as_user != name:
            raise Forbidden(f"{name} may act only as themselves, not as {as_user!r}: "
                            "drop as_user")
        return _plain(caller, name, actor=name)

    if as_role is not None:
        if as_user is None:
            raise InvalidParams('as_role "user" needs as_user: the user whose rights apply',
                                field="as_role")
        if as_admin:
            raise InvalidParams('as_role "user" and as_admin contradict each other; '
                                "send one of them", field="as_role")
        # a plain user's rights for a local admin's name contradict each other too: a web
        # account named root never sees root's jobs, whoever runs the web server
        if _reserved(as_user, config):
            raise Forbidden(f"{name} may not act as {as_user!r}, a local admin's name, with "
                            'as_role "user" (a web account so named is not that admin)',
                            field="as_user")

    if role is Role.SERVICE:
        if as_user is None:
            raise Unauthenticated(f"service {name} must say whom it acts for: "
                                  "pass as_user (with as_admin for one of its admins)")
        if not as_admin and _reserved(as_user, config):
            raise Forbidden(f"service {name} may not act as {as_user!r}, a local admin's "
                            "name, unless with as_admin (for one of its own admins)",
                            field="as_user")
        actor = f"service:{name}"
        if as_role is not None:
            return _plain(caller, as_user, actor=actor)
        return Scope(caller, user_id=None if as_admin else as_user, owner=as_user,
                     actor=actor, may_repo_path=True, may_admin_types=False,
                     may_raise_priority=True, may_stats=as_admin, may_pause=as_admin,
                     may_any_timeout=True)

    actor = f"admin:{name}"
    if as_role is not None:
        return _plain(caller, as_user, actor=actor)  # type: ignore[arg-type]
    # an admin acting for a user keeps the rights over jobs, not over the daemon
    scoped = as_user is not None and not as_admin
    return Scope(caller, user_id=as_user if scoped else None, owner=as_user or name,
                 actor=actor, may_repo_path=True, may_admin_types=True,
                 may_raise_priority=True, may_stats=not scoped, may_pause=not scoped,
                 may_any_timeout=True)


def _plain(caller: Caller, user: str, *, actor: str) -> Scope:
    """A plain user's rights over ``user``'s own jobs."""
    return Scope(caller, user_id=user, owner=user, actor=actor, may_repo_path=False,
                 may_admin_types=False, may_raise_priority=False, may_stats=False,
                 may_pause=False)
