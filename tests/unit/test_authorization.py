"""The shipped RBAC policy and the Authorizer that enforces it (cache, reload, failures)."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
from pathlib import Path
from typing import Any

import pytest

from nodepool.auth.authorization import Authorizer, PolicyError, default_policy_dir
from nodepool.background import every, in_thread

HEALTH = "/grpc.health.v1.Health/"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"
USERS = "/nodepool.v1.UserManager/"
NODES = "/nodepool.v1.NodeManager/"
TASKS = "/nodepool.v1.MasterNodeService/"
AUDIT = "/nodepool.v1.AuditService/"
RENEW = "/nodepool.v1.CertificateService/RenewCertificate"

HEALTH_CHECKS = {HEALTH + "Check", HEALTH + "Watch", HEALTH + "List"}
PROBES = HEALTH_CHECKS | {REFLECTION, REFLECTION_V1}

# What each single role may call, spelled out: a change to the policy that widens or
# narrows a role must show up here in review.
EXPECTED_BY_ROLE: dict[str, set[str]] = {
    # Health only: reflection would describe the whole API to anyone with a device.
    "device": HEALTH_CHECKS | {USERS + "RegisterUser", USERS + "LoginUser", USERS + "RefreshToken"},
    "node": PROBES
    | {
        NODES + "RegisterNode",
        NODES + "UpdateNodeStatus",
        TASKS + "PullTasks",
        TASKS + "ReportTasks",
        RENEW,
    },
    "user": PROBES
    | {
        USERS + "UpdateUserProfile",
        USERS + "GetUserInfo",
        USERS + "LogoutUser",
        USERS + "CreateApiKey",
        USERS + "ListApiKeys",
        USERS + "RevokeApiKey",
        NODES + "GetNodeList",
        NODES + "RemoveNode",
        NODES + "GetNodeEvents",
        TASKS + "SubmitTask",
        TASKS + "SubmitTasks",
        TASKS + "GetTaskStatus",
        TASKS + "CancelTask",
        TASKS + "ListTasks",
        RENEW,
    },
}
ADMIN_ONLY = {
    NODES + "GetPoolStats",
    NODES + "ReadmitNode",
    USERS + "GrantRole",
    USERS + "RevokeRole",
    USERS + "SetUserActive",
    AUDIT + "ListAuditEvents",
}
EXPECTED_BY_ROLE["admin"] = EXPECTED_BY_ROLE["user"] | ADMIN_ONLY

# (roles, method) pairs that must be denied, each because no policy line grants it:
# test_each_denial_is_one_missing_line proves that adding that line flips it.
DENIALS: list[tuple[frozenset[str], str]] = [
    # A user calling an admin RPC.
    (frozenset({"user"}), USERS + "GrantRole"),
    (frozenset({"user"}), USERS + "RevokeRole"),
    (frozenset({"user"}), USERS + "SetUserActive"),
    (frozenset({"user"}), AUDIT + "ListAuditEvents"),
    (frozenset({"user"}), NODES + "GetPoolStats"),
    (frozenset({"user"}), NODES + "ReadmitNode"),
    # A bare device: nothing past sign-up, log-in and refresh.
    (frozenset({"device"}), USERS + "GetUserInfo"),
    (frozenset({"device"}), REFLECTION),
    (frozenset({"device"}), REFLECTION_V1),
    (frozenset({"device"}), USERS + "LogoutUser"),
    (frozenset({"device"}), TASKS + "SubmitTask"),
    (frozenset({"device"}), NODES + "RegisterNode"),
    (frozenset({"device"}), RENEW),
    (frozenset({"device"}), USERS + "GrantRole"),
    # A node: no user RPCs, no admin RPCs.
    (frozenset({"node"}), TASKS + "SubmitTask"),
    (frozenset({"node"}), NODES + "GetNodeList"),
    (frozenset({"node"}), NODES + "RemoveNode"),
    (frozenset({"node"}), USERS + "GetUserInfo"),
    (frozenset({"node"}), USERS + "CreateApiKey"),
    (frozenset({"node"}), AUDIT + "ListAuditEvents"),
    (frozenset({"node"}), TASKS + "ListTasks"),
    (frozenset({"node"}), NODES + "GetNodeEvents"),
    # Users do not act as nodes.
    (frozenset({"user"}), NODES + "RegisterNode"),
    (frozenset({"user"}), TASKS + "PullTasks"),
    (frozenset({"admin"}), TASKS + "ReportTasks"),
    (frozenset({"admin"}), NODES + "UpdateNodeStatus"),
    # A method the policy does not name, even for an admin.
    (frozenset({"admin"}), USERS + "DeleteEverything"),
    (frozenset({"admin", "user", "node", "device"}), "/nodepool.v1.Unknown/Call"),
    # A role the policy does not name.
    (frozenset({"auditor"}), AUDIT + "ListAuditEvents"),
    (frozenset({"root"}), USERS + "GetUserInfo"),
]


@pytest.fixture(scope="module")
def shipped() -> Authorizer:
    return Authorizer.from_directory(default_policy_dir())


@pytest.fixture
def policy_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    shutil.copytree(default_policy_dir(), directory)
    return directory


def _append(path: Path, line: str) -> None:
    with path.open("a", encoding="utf-8") as file:
        file.write(f"\n{line}\n")


def _remove(path: Path, line: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert f"{line}\n" in text
    path.write_text(text.replace(f"{line}\n", ""), encoding="utf-8")


# -- the shipped policy ----------------------------------------------------------------


def test_roles_of_the_shipped_policy(shipped: Authorizer) -> None:
    assert shipped.roles() == {"device", "node", "user", "admin"}


@pytest.mark.parametrize("role", sorted(EXPECTED_BY_ROLE))
def test_each_role_is_allowed_exactly_its_methods(shipped: Authorizer, role: str) -> None:
    allowed = {m for m in shipped.methods() if shipped.allowed(frozenset({role}), m)}
    assert allowed == EXPECTED_BY_ROLE[role]


def test_admin_inherits_user(shipped: Authorizer) -> None:
    admin = frozenset({"admin"})
    for method in EXPECTED_BY_ROLE["user"]:
        assert shipped.allowed(admin, method), method
    assert shipped.allowed(admin, USERS + "GrantRole")


def test_any_one_role_is_enough(shipped: Authorizer) -> None:
    # A user's device certificate plus a user credential: the union of both.
    both = frozenset({"device", "user"})
    assert shipped.allowed(both, USERS + "LoginUser")
    assert shipped.allowed(both, TASKS + "SubmitTask")
    assert not shipped.allowed(both, USERS + "GrantRole")


@pytest.mark.parametrize(("roles", "method"), DENIALS)
def test_denied(shipped: Authorizer, roles: frozenset[str], method: str) -> None:
    assert not shipped.allowed(roles, method)


def test_empty_roles_are_denied_everything(shipped: Authorizer) -> None:
    for method in shipped.methods():
        assert not shipped.allowed(frozenset(), method)


@pytest.mark.parametrize(("roles", "method"), DENIALS)
def test_each_denial_is_one_missing_line(
    policy_dir: Path, roles: frozenset[str], method: str
) -> None:
    # The denial comes from the policy, not from some other short-cut: the line that
    # would grant it turns it into an allow.
    role = sorted(roles)[0]
    _append(policy_dir / "policy.csv", f"p, {role}, {method}, call")
    assert Authorizer.from_directory(policy_dir).allowed(roles, method)


# -- the decision cache ----------------------------------------------------------------


class _CountingEnforcer:
    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls = 0

    def enforce(self, *request: str) -> bool:
        self.calls += 1
        return bool(self.inner.enforce(*request))


def _swap_enforcer(authorizer: Authorizer, enforcer: Any) -> None:
    # The loaded policy is a frozen dataclass; tests reach behind it on purpose.
    object.__setattr__(authorizer._policy, "enforcer", enforcer)


def test_cached_decisions_skip_casbin(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    counter = _CountingEnforcer(authorizer._policy.enforcer)
    _swap_enforcer(authorizer, counter)
    user = frozenset({"user"})
    assert authorizer.allowed(user, TASKS + "SubmitTask")
    assert not authorizer.allowed(user, USERS + "GrantRole")
    first = counter.calls
    assert first == 2
    for _ in range(3):
        assert authorizer.allowed(user, TASKS + "SubmitTask")
        assert not authorizer.allowed(user, USERS + "GrantRole")
    assert counter.calls == first


def test_invalidate_forgets_decisions(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    assert not authorizer.allowed(user, USERS + "GrantRole")
    # Swap in a permissive enforcer behind the cache's back: only after invalidate()
    # is the cached denial recomputed.
    _append(policy_dir / "policy.csv", f"p, user, {USERS}GrantRole, call")
    permissive = Authorizer.from_directory(policy_dir)
    _swap_enforcer(authorizer, permissive._policy.enforcer)
    assert not authorizer.allowed(user, USERS + "GrantRole")
    authorizer.invalidate()
    assert authorizer.allowed(user, USERS + "GrantRole")


def test_unknown_methods_are_not_cached(shipped: Authorizer) -> None:
    before = len(shipped._policy.cache)
    for n in range(100):
        assert not shipped.allowed(frozenset({"admin"}), f"/nodepool.v1.Made/Up{n}")
    assert len(shipped._policy.cache) == before


def test_cache_is_bounded(shipped: Authorizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("nodepool.auth.authorization._MAX_CACHED_DECISIONS", 5)
    shipped.invalidate()
    for n in range(20):
        assert not shipped.allowed(frozenset({f"made-up-{n}"}), TASKS + "SubmitTask")
        assert len(shipped._policy.cache) <= 5
    assert shipped.allowed(frozenset({"user"}), TASKS + "SubmitTask")


# -- reloading -------------------------------------------------------------------------


def test_reload_picks_up_a_granted_line(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    assert not authorizer.allowed(user, AUDIT + "ListAuditEvents")  # now cached
    assert not authorizer.reload_if_changed()
    _append(policy_dir / "policy.csv", f"p, user, {AUDIT}ListAuditEvents, call")
    assert authorizer.reload_if_changed()
    assert authorizer.allowed(user, AUDIT + "ListAuditEvents")
    assert not authorizer.reload_if_changed()


def test_reload_picks_up_a_removed_line(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    assert authorizer.allowed(user, TASKS + "CancelTask")  # now cached
    _remove(policy_dir / "policy.csv", f"p, user, {TASKS}CancelTask, call")
    assert authorizer.reload_if_changed()
    assert not authorizer.allowed(user, TASKS + "CancelTask")
    assert TASKS + "CancelTask" not in authorizer.methods()


def test_reload_picks_up_a_new_role(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    auditor = frozenset({"auditor"})
    assert not authorizer.allowed(auditor, AUDIT + "ListAuditEvents")
    _append(policy_dir / "policy.csv", f"p, auditor, {AUDIT}ListAuditEvents, call")
    assert authorizer.reload_if_changed()
    assert "auditor" in authorizer.roles()
    assert authorizer.allowed(auditor, AUDIT + "ListAuditEvents")


BAD_LINE = "p, user, /nodepool.v1.AuditService/ListAuditEvents, "


@pytest.mark.parametrize(
    ("file", "content", "replace"),
    [
        # One bad line appended to a good policy spoils the whole file.
        ("policy.csv", "p, user", False),  # too short: Casbin would raise on every enforce
        ("policy.csv", BAD_LINE + "call, extra", False),
        ("policy.csv", "q" + BAD_LINE[1:] + "call", False),  # Casbin would skip it silently
        ("policy.csv", BAD_LINE + "write", False),
        ("policy.csv", "p, user, *, call", False),
        # Emptied, e.g. caught half-way through a rewrite: would deny every call.
        ("policy.csv", "# nothing left\n", True),
        ("policy.csv", "", True),
        ("model.conf", "this is not a model\n", True),
        ("model.conf", "[request_definition]\nr = sub, obj\n", True),
    ],
)
def test_a_broken_file_keeps_the_old_policy(
    policy_dir: Path, caplog: pytest.LogCaptureFixture, file: str, content: str, replace: bool
) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    assert authorizer.allowed(user, TASKS + "SubmitTask")
    assert not authorizer.allowed(user, AUDIT + "ListAuditEvents")
    path = policy_dir / file
    good = path.read_text(encoding="utf-8")
    if replace:
        path.write_text(content, encoding="utf-8")
    else:
        _append(path, content)

    with caplog.at_level(logging.ERROR, logger="nodepool.auth.authorization"):
        assert not authorizer.reload_if_changed()
    assert any("keeping the previous one" in r.getMessage() for r in caplog.records)
    assert authorizer.allowed(user, TASKS + "SubmitTask")
    assert not authorizer.allowed(user, AUDIT + "ListAuditEvents")
    authorizer.invalidate()
    assert authorizer.allowed(user, TASKS + "SubmitTask")
    assert not authorizer.allowed(user, AUDIT + "ListAuditEvents")

    # The same broken version is reported once, not on every poll.
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="nodepool.auth.authorization"):
        assert not authorizer.reload_if_changed()
    assert not caplog.records

    # Fixed: the next reload takes it.
    path.write_text(good, encoding="utf-8")
    _append(policy_dir / "policy.csv", f"p, user, {AUDIT}ListAuditEvents, call")
    assert authorizer.reload_if_changed()
    assert authorizer.allowed(user, AUDIT + "ListAuditEvents")


def test_a_model_that_allows_everything_is_refused(policy_dir: Path) -> None:
    model = policy_dir / "model.conf"
    model.write_text(
        model.read_text(encoding="utf-8").replace(
            "m = g(r.sub, p.sub) && r.obj == p.obj && r.act == p.act", "m = true"
        ),
        encoding="utf-8",
    )
    with pytest.raises(PolicyError):
        Authorizer.from_directory(policy_dir)


def test_a_missing_file_at_start_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError):
        Authorizer.from_directory(tmp_path)


def test_a_file_that_disappears_keeps_the_old_policy(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    (policy_dir / "policy.csv").unlink()
    assert not authorizer.reload_if_changed()
    assert authorizer.allowed(frozenset({"user"}), TASKS + "SubmitTask")


async def test_watch_reloads_in_the_background(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    assert not authorizer.allowed(user, AUDIT + "ListAuditEvents")
    watcher = asyncio.create_task(
        every(0.01, in_thread(authorizer.reload_if_changed), "policy reload")
    )
    try:
        _append(policy_dir / "policy.csv", f"p, user, {AUDIT}ListAuditEvents, call")
        # The watcher has no event to wait on: poll for up to five seconds.
        for _ in range(500):
            if authorizer.allowed(user, AUDIT + "ListAuditEvents"):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the watcher did not reload the changed policy")
    finally:
        watcher.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watcher


def test_decisions_stay_consistent_during_reloads(policy_dir: Path) -> None:
    authorizer = Authorizer.from_directory(policy_dir)
    user = frozenset({"user"})
    policy = policy_dir / "policy.csv"
    good = policy.read_text(encoding="utf-8")
    errors: list[str] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            # Always granted in both versions of the file; never granted in either.
            if not authorizer.allowed(user, TASKS + "SubmitTask"):
                errors.append("lost a grant")
            if authorizer.allowed(user, USERS + "GrantRole"):
                errors.append("invented a grant")

    threads = [threading.Thread(target=hammer) for _ in range(2)]
    for thread in threads:
        thread.start()
    try:
        for n in range(10):
            policy.write_text(good + f"\np, user, {AUDIT}ListAuditEvents, call\n" * (n % 2))
            authorizer.reload_if_changed()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
    assert not errors


# -- logging ---------------------------------------------------------------------------


def test_casbin_does_not_log_on_the_hot_path(
    policy_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG):
        authorizer = Authorizer.from_directory(policy_dir)
        caplog.clear()
        # Misses (real enforce calls, allowed and denied) and hits.
        for _ in range(2):
            authorizer.allowed(frozenset({"user"}), TASKS + "SubmitTask")
            authorizer.allowed(frozenset({"node"}), TASKS + "SubmitTask")
            authorizer.allowed(frozenset({"admin"}), USERS + "GrantRole")
    assert not [r for r in caplog.records if r.name.startswith("casbin")]
