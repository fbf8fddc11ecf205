"""auth: real peers and real accounts -> Caller; every cell of SPEC §3's table -> Scope."""

from __future__ import annotations

import os
import pwd
import socket
import subprocess
import unicodedata
from pathlib import Path
from typing import Iterator

import pytest

from jobd import auth
from jobd.config import Auth, Config
from jobd.errors import Forbidden, InvalidParams, Unauthenticated
from jobd.models import Role

SUFFIX = f"{os.getpid() % 100000}"
ALICE, CIDX, GROUPIE, BOSS = (f"jt{SUFFIX}{n}" for n in ("alice", "cidx", "groupie", "boss"))
ADMINS_GROUP, SERVICES_GROUP = f"jt{SUFFIX}adm", f"jt{SUFFIX}svc"
MEMBER = f"jt{SUFFIX}member"

CONFIG = Config(socket=Path("/nonexistent/jobd.sock"), db=Path("/nonexistent/jobd.db"),
                auth=Auth(admins=("root", BOSS, f"@{ADMINS_GROUP}"),
                          services=(CIDX, f"@{SERVICES_GROUP}")))


def _unused_uid() -> int:
    uid = 4_000_000 + os.getpid() % 100_000
    while True:
        try:
            pwd.getpwuid(uid)
        except KeyError:
            return uid
        uid += 1


# -- peer credentials and identify ---------------------------------------------------------

def test_peer_credentials_of_a_real_socket_peer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        assert auth.peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())


def test_peer_credentials_name_the_process_at_the_other_end(tmp_path: Path) -> None:
    path = str(tmp_path / "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        child = subprocess.Popen(
            ["python3", "-c", "import socket,sys; s=socket.socket(socket.AF_UNIX); "
             "s.connect(sys.argv[1]); s.recv(1)", path])
        try:
            conn, _ = listener.accept()
            with conn:
                pid, uid, gid = auth.peer_credentials(conn)
                conn.sendall(b"x")
        finally:
            child.wait(timeout=10)
    assert (pid, uid, gid) == (child.pid, os.getuid(), os.getgid())


def test_root_is_admin_whatever_the_lists_say() -> None:
    config = Config(socket=CONFIG.socket, db=CONFIG.db, auth=Auth(admins=(), services=()))
    caller = auth.identify(0, 0, 123, config, daemon_uid=4242)
    assert caller == auth.Caller(uid=0, pid=123, user="root", role=Role.ADMIN,
                                 groups=caller.groups)
    assert "root" in caller.groups


def test_the_daemons_own_uid_is_admin() -> None:
    uid = _unused_uid()
    assert auth.identify(uid, uid, 1, CONFIG, daemon_uid=uid).role is Role.ADMIN
    assert auth.identify(uid, uid, 1, CONFIG, daemon_uid=uid + 1).role is Role.USER


def test_an_unknown_uid_is_named_by_number_and_is_a_plain_user() -> None:
    uid = _unused_uid()
    caller = auth.identify(uid, uid, 7, CONFIG, daemon_uid=0)
    assert caller.user == f"uid-{uid}"
    assert caller.role is Role.USER
    assert caller.pid == 7


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@pytest.fixture(scope="module")
def accounts() -> Iterator[dict[str, pwd.struct_passwd]]:
    if os.geteuid() != 0:
        pytest.skip("creating real accounts with useradd needs root")
    _run("groupadd", ADMINS_GROUP)
    _run("groupadd", SERVICES_GROUP)
    made = []
    try:
        for name, extra in ((ALICE, []), (CIDX, []), (BOSS, []),
                            (GROUPIE, ["-G", ADMINS_GROUP]), (MEMBER, ["-G", SERVICES_GROUP])):
            _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin",
                 "--user-group", *extra, name)
            made.append(name)
        yield {name: pwd.getpwnam(name) for name in made}
    finally:
        for name in made:
            subprocess.run(["userdel", name], capture_output=True)
        for group in (ADMINS_GROUP, SERVICES_GROUP):
            subprocess.run(["groupdel", group], capture_output=True)


def _identify(entry: pwd.struct_passwd) -> auth.Caller:
    return auth.identify(entry.pw_uid, entry.pw_gid, 99, CONFIG, daemon_uid=0)


@pytest.mark.root
def test_a_plain_account_is_a_user(accounts: dict[str, pwd.struct_passwd]) -> None:
    caller = _identify(accounts[ALICE])
    assert (caller.user, caller.role, caller.uid) == (ALICE, Role.USER, accounts[ALICE].pw_uid)
    assert caller.groups == {ALICE}


@pytest.mark.root
def test_an_account_listed_in_services_is_a_service(
        accounts: dict[str, pwd.struct_passwd]) -> None:
    assert _identify(accounts[CIDX]).role is Role.SERVICE


@pytest.mark.root
def test_a_member_of_a_services_group_is_a_service(
        accounts: dict[str, pwd.struct_passwd]) -> None:
    caller = _identify(accounts[MEMBER])
    assert SERVICES_GROUP in caller.groups
    assert caller.role is Role.SERVICE


@pytest.mark.root
def test_an_account_listed_in_admins_is_admin(accounts: dict[str, pwd.struct_passwd]) -> None:
    assert _identify(accounts[BOSS]).role is Role.ADMIN


@pytest.mark.root
def test_a_member_of_an_admin_group_is_admin(accounts: dict[str, pwd.struct_passwd]) -> None:
    caller = _identify(accounts[GROUPIE])
    assert caller.groups == {GROUPIE, ADMINS_GROUP}
    assert caller.role is Role.ADMIN


@pytest.mark.root
def test_admin_wins_over_service(accounts: dict[str, pwd.struct_passwd]) -> None:
    config = Config(socket=CONFIG.socket, db=CONFIG.db,
                    auth=Auth(admins=(CIDX,), services=(CIDX,)))
    entry = accounts[CIDX]
    assert auth.identify(entry.pw_uid, entry.pw_gid, 1, config, daemon_uid=0).role is Role.ADMIN


# -- scope: SPEC §3's table, column by column ----------------------------------------------

USER = auth.Caller(uid=1000, pid=1, user="alice", role=Role.USER, groups=frozenset())
SERVICE = auth.Caller(uid=990, pid=2, user="cidx", role=Role.SERVICE, groups=frozenset())
ADMIN = auth.Caller(uid=0, pid=3, user="root", role=Role.ADMIN, groups=frozenset())

# column: (caller, as_user, as_admin)
COLUMNS = {
    "user": (USER, None, False),
    "service": (SERVICE, "bob", False),
    "service+as_admin": (SERVICE, "carol", True),
    "admin": (ADMIN, None, False),
    "admin+as_user": (ADMIN, "bob", False),
}

# row -> the value in each column, in COLUMNS' order
TABLE = {
    "user_id": ("alice", "bob", None, None, "bob"),
    "owner": ("alice", "bob", "carol", "root", "bob"),
    "actor": ("alice", "service:cidx", "service:cidx", "admin:root", "admin:root"),
    "may_repo_path": (False, True, True, True, True),
    "may_admin_types": (False, False, False, True, True),
    "may_raise_priority": (False, True, True, True, True),
    "may_stats": (False, False, True, True, False),
    "may_pause": (False, False, True, True, False),
    "may_any_timeout": (False, True, True, True, True),
}


@pytest.mark.parametrize("column", COLUMNS)
def test_scope_matches_every_row_of_the_table(column: str) -> None:
    s = auth.scope(*COLUMNS[column])
    index = list(COLUMNS).index(column)
    got = {row: getattr(s, row) for row in TABLE}
    assert got == {row: values[index] for row, values in TABLE.items()}
    assert s.caller is COLUMNS[column][0]


# jobs.list user_id filter: own only / the user only / any / any / that user only
@pytest.mark.parametrize("column, asked, effective", [
    ("user", None, "alice"), ("user", "alice", "alice"), ("user", "bob", Forbidden),
    ("service", None, "bob"), ("service", "bob", "bob"), ("service", "alice", Forbidden),
    ("service+as_admin", None, None), ("service+as_admin", "alice", "alice"),
    ("admin", None, None), ("admin", "alice", "alice"),
    ("admin+as_user", None, "bob"), ("admin+as_user", "bob", "bob"),
    ("admin+as_user", "alice", Forbidden),
])
def test_list_filter_is_confined_to_the_scope(column: str, asked: str | None,
                                              effective: object) -> None:
    s = auth.scope(*COLUMNS[column])
    if effective is Forbidden:
        with pytest.raises(Forbidden, match=repr(asked)):
            s.check_filter(asked)
    else:
        assert s.check_filter(asked) == effective


def test_a_user_may_name_themselves() -> None:
    assert auth.scope(USER, "alice", False) == auth.scope(USER, None, False)


def test_a_user_may_not_act_as_someone_else() -> None:
    with pytest.raises(Forbidden) as e:
        auth.scope(USER, "bob", False)
    assert e.value.code == -32003


def test_a_user_may_not_act_as_admin() -> None:
    for as_user in (None, "alice"):
        with pytest.raises(Forbidden):
            auth.scope(USER, as_user, True)


def test_a_service_must_say_whom_it_acts_for() -> None:
    for as_admin in (False, True):
        with pytest.raises(Unauthenticated) as e:
            auth.scope(SERVICE, None, as_admin)
        assert e.value.code == -32001 and "as_user" in e.value.message


def test_admin_with_as_admin_keeps_every_right() -> None:
    s = auth.scope(ADMIN, "dave", True)
    assert (s.user_id, s.owner, s.may_stats, s.may_pause) == (None, "dave", True, True)


#: (an id §3a refuses, a word the refusal must contain)
BAD_IDS = [
    ("", "empty"), ("a" * 256, "256 bytes"), ("é" * 128, "256 bytes"), ("\ud800", "surrogate"),
    ("a\udfffb", "surrogate"), ("a\n", "U+000A"), ("a\x00b", "U+0000"), ("a\x7fb", "U+007F"),
    ("a\u202eb", "U+202E"), ("a\u200bb", "U+200B"), ("\ufeffa", "U+FEFF"),
    ("a\u2028b", "U+2028"), ("a\u2029b", "U+2029"), (" a", "white space"),
    ("a ", "white space"), ("a\u00a0", "white space"), ("\u3000a", "white space"),
    (" ", "white space"), (5, "string"), (["a"], "string"),
]
GOOD_IDS = ["alice@example.com", "Jane Doe", "org/repo", "Ünïcode", "..", ".", ".hidden",
            "-rf", "a" * 255, "é" * 127 + "a", "😀" * 63 + "abc", "日本語", "100%",
            "e\u0301", "a  b"]


@pytest.mark.parametrize("bad, why", BAD_IDS)
@pytest.mark.parametrize("caller", [USER, SERVICE, ADMIN], ids=["user", "service", "admin"])
def test_as_user_must_be_a_valid_id(caller: auth.Caller, bad: object, why: str) -> None:
    with pytest.raises(InvalidParams) as e:
        auth.scope(caller, bad, False)  # type: ignore[arg-type]
    assert e.value.field == "as_user" and e.value.code == -32602
    assert e.value.message.startswith("as_user ") and why in e.value.message, e.value.message


@pytest.mark.parametrize("field", ["user_id", "project_id"])
@pytest.mark.parametrize("bad, why", BAD_IDS)
def test_check_id_names_the_field_and_the_problem(field: str, bad: object, why: str) -> None:
    with pytest.raises(InvalidParams) as e:
        auth.check_id(bad, field)
    assert e.value.field == field and why in e.value.message
    assert len(e.value.message) < 300  # a 256-byte id is not echoed whole
    # the value is shown escaped: no raw control, bidi or zero-width character
    assert not [c for c in e.value.message if unicodedata.category(c) in ("Cc", "Cf", "Cs")]


@pytest.mark.parametrize("good", GOOD_IDS)
def test_the_names_a_web_server_uses_are_valid_ids(good: str) -> None:
    assert auth.check_id(good, "user_id") == good
    assert auth.scope(ADMIN, good, False).user_id == good
    assert auth.scope(SERVICE, good, False).owner == good


def test_ids_are_compared_exactly() -> None:
    composed, decomposed = "\u00e9", "e\u0301"
    scope = auth.scope(ADMIN, composed, False)
    with pytest.raises(Forbidden):
        scope.check_filter(decomposed)
    with pytest.raises(Forbidden):
        auth.scope(USER, USER.user.upper(), False)


def test_an_id_starting_with_a_dash_is_refused_only_as_a_program_argument() -> None:
    assert auth.check_id("-rf", "project_id") == "-rf"
    with pytest.raises(InvalidParams) as e:
        auth.check_id("-rf", "project_id", argument=True)
    assert e.value.field == "project_id" and "'-'" in e.value.message
    argv = ["indexer", "--user={user_id}", "{project_id}"]
    auth.check_argv_ids([argv], user_id="-alice", project_id="p")  # not at an argument's start
    auth.check_argv_ids(["builtin:manifest"], user_id="-alice", project_id="-p")
    with pytest.raises(InvalidParams) as e:
        auth.check_argv_ids(["builtin:manifest", argv], user_id="alice", project_id="-p")
    assert e.value.field == "project_id"
    with pytest.raises(InvalidParams) as e:
        auth.check_argv_ids([["x", "{user_id}/{project_id}"]], user_id="-a", project_id="p")
    assert e.value.field == "user_id"


def test_a_service_still_may_not_act_as_root() -> None:
    with pytest.raises(Forbidden) as e:
        auth.scope(SERVICE, "root", False, config=CONFIG)
    assert e.value.data()["field"] == "as_user"
    assert auth.scope(SERVICE, "root", True, config=CONFIG).owner == "root"
    assert auth.scope(SERVICE, "root@example.com", False, config=CONFIG).owner == (
        "root@example.com")


def test_as_admin_must_be_a_boolean() -> None:
    with pytest.raises(InvalidParams) as e:
        auth.scope(SERVICE, "bob", "yes")  # type: ignore[arg-type]
    assert e.value.field == "as_admin"


# -- as_role "user" and the names a service may not take (SPEC §3) -------------------------

@pytest.mark.parametrize("caller", [SERVICE, ADMIN], ids=["service", "admin"])
def test_as_role_user_gives_exactly_a_plain_users_rights(caller: auth.Caller) -> None:
    s = auth.scope(caller, "bob", False, "user")
    plain = auth.scope(auth.Caller(uid=1001, pid=1, user="bob", role=Role.USER,
                                   groups=frozenset()), None, False)
    rights = [row for row in TABLE if row != "actor"]
    assert {r: getattr(s, r) for r in rights} == {r: getattr(plain, r) for r in rights}
    assert s.actor == ("service:cidx" if caller is SERVICE else "admin:root")
    with pytest.raises(Forbidden):
        s.check_filter("carol")


@pytest.mark.parametrize("as_user, as_admin, as_role, field", [
    (None, False, "user", "as_role"),      # whose rights? as_user is needed
    ("bob", True, "user", "as_role"),      # a plain user's rights and an admin's at once
    ("bob", False, "admin", "as_role"),    # only "user" is a role one may take on
    ("bob", False, 1, "as_role"),
])
def test_as_role_refuses_what_does_not_make_sense(as_user: str | None, as_admin: bool,
                                                  as_role: object, field: str) -> None:
    with pytest.raises(InvalidParams) as caught:
        auth.scope(SERVICE, as_user, as_admin, as_role)  # type: ignore[arg-type]
    assert caught.value.data()["field"] == field


def test_a_plain_user_may_not_claim_a_role() -> None:
    # as_role changes nothing for a plain user: they have a plain user's rights already
    s = auth.scope(USER, None, False, "user")
    assert s.user_id == "alice" and not s.may_repo_path


def test_a_service_may_not_act_as_root_or_an_admin() -> None:
    config = Config(socket=CONFIG.socket, db=CONFIG.db,
                    auth=Auth(admins=("root", "ops-lead"), services=("cidx",)))
    own = pwd.getpwuid(os.getuid()).pw_name
    for name in ("root", own, "ops-lead"):
        with pytest.raises(Forbidden) as caught:
            auth.scope(SERVICE, name, False, config=config)
        assert "as_admin" in caught.value.message and caught.value.data()["field"] == "as_user"
        with pytest.raises(Forbidden):
            auth.scope(SERVICE, name, False, "user", config=config)
        # as one of the web server's own admins it may
        assert auth.scope(SERVICE, name, True, config=config).user_id is None
    assert auth.scope(SERVICE, "alice", False, config=config).user_id == "alice"


def test_no_one_gives_a_local_admins_name_a_plain_users_rights() -> None:
    """A web server run as an admin (root, say) sends what a service sends: a web account
    named root, with as_role "user", is refused as it is through a service, not shown
    root's jobs; without as_role an admin still acts for any user."""
    config = Config(socket=CONFIG.socket, db=CONFIG.db,
                    auth=Auth(admins=("root", "ops-lead"), services=("cidx",)))
    own = pwd.getpwuid(os.getuid()).pw_name
    for name in ("root", own, "ops-lead"):
        with pytest.raises(Forbidden) as caught:
            auth.scope(ADMIN, name, False, "user", config=config)
        assert caught.value.data()["field"] == "as_user", caught.value.message
        assert auth.scope(ADMIN, name, False, config=config).user_id == name
    assert auth.scope(ADMIN, "alice", False, "user", config=config).user_id == "alice"
