"""Role-based authorization of every call: Casbin behind a decision cache.

The policy (``policies/model.conf`` + ``policies/policy.csv``) is loaded once into a Casbin
enforcer. Casbin's ``enforce`` costs about 100 µs, so decisions are cached per
(roles, method) and the hot path is one dict lookup. The files are re-read when they change;
a new policy replaces the old one in a single assignment (enforcer, method and role sets and
an empty cache together), so a call never sees a half-loaded policy or a decision of the old
policy after the swap. A file that does not load or does not validate is logged and ignored:
the previous policy stays in force.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import casbin
from casbin.persist import Adapter
from casbin.persist.adapter import load_policy_line
from casbin.util.log import disabled_logging

__all__ = ["AUTHORIZED_ACTION", "Authorizer", "PolicyError", "default_policy_dir"]

_log = logging.getLogger(__name__)

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"
# The only action in the policy: a call to a method.
AUTHORIZED_ACTION = "call"
# Past this many cached decisions the cache is cleared. The real key space is small
# (the role combinations the server hands out x the methods), so this only guards
# against a caller that invents role sets.
_MAX_CACHED_DECISIONS = 10_000

# What a policy line may contain. Casbin itself silently skips lines with an unknown
# section and accepts lines of the wrong length (which then make *every* enforce raise),
# so the file is checked line by line before Casbin sees it.
_ROLE_RE = re.compile(r"[a-z][a-z0-9_-]*")
_METHOD_RE = re.compile(r"/[A-Za-z_][A-Za-z0-9_.]*/[A-Za-z_][A-Za-z0-9_]*")
# A role no policy can name (it fails _ROLE_RE): used to check that a freshly loaded
# model denies what it was not told to allow, e.g. a matcher edited to "true".
_PROBE_ROLE = "-probe-"


def default_policy_dir() -> Path:
    """The shipped ``policies/`` directory.

    In a source checkout (and an editable install) it sits at the repository root beside
    the ``nodepool`` package; a wheel installs it as data under ``<prefix>/share/nodepool``.
    The server setting ``NODEPOOL_POLICY_DIR`` overrides both.
    """
    beside_package = Path(__file__).resolve().parents[2] / "policies"
    if (beside_package / "policy.csv").is_file():
        return beside_package
    return Path(sys.prefix) / "share" / "nodepool" / "policies"


class PolicyError(ValueError):
    """The model or policy file cannot be loaded or is malformed."""


class _TextAdapter(Adapter):  # type: ignore[misc]  # casbin is untyped
    """Feeds Casbin the policy text already read and validated, instead of letting
    Casbin's FileAdapter re-open the file (which could have changed in between)."""

    def __init__(self, lines: list[str]) -> None:
        self._lines = lines

    def load_policy(self, model: Any) -> None:
        for line in self._lines:
            load_policy_line(line, model)


@dataclass(frozen=True)
class _Policy:
    """One loaded policy and the decisions made with it; replaced as a whole."""

    enforcer: Any  # casbin.Enforcer (untyped)
    methods: frozenset[str]
    roles: frozenset[str]
    cache: dict[tuple[frozenset[str], str], bool] = field(default_factory=dict)
    # Casbin's enforcer is not thread-safe: its role manager adds entries while it
    # answers. Held only on a cache miss.
    lock: threading.Lock = field(default_factory=threading.Lock)


_Signature = tuple[tuple[int, int, int], tuple[int, int, int]]


class Authorizer:
    """Answers "may a caller with these roles call this method?" from the Casbin policy."""

    def __init__(self, model_path: Path, policy_path: Path) -> None:
        self._model_path = Path(model_path)
        self._policy_path = Path(policy_path)
        # Serializes reloads (the watcher thread and an operator-triggered reload).
        self._reload_lock = threading.Lock()
        # A policy that does not load at start-up stops the server: raise, do not guess.
        try:
            signature = self._signature()
        except OSError as exc:
            raise PolicyError(f"cannot read the policy files: {exc}") from None
        self._policy = self._load()
        self._loaded_signature: _Signature | None = signature
        self._rejected_signature: _Signature | None = None

    @classmethod
    def from_directory(cls, directory: Path) -> Authorizer:
        directory = Path(directory)
        return cls(directory / MODEL_FILE, directory / POLICY_FILE)

    # -- the hot path --------------------------------------------------------------------

    def allowed(self, roles: frozenset[str], method: str) -> bool:
        """True when any of ``roles`` (with inheritance) may call ``method``.

        Unknown methods, unknown roles and an empty role set are denied.
        """
        # One read of self._policy: the cache and the enforcer always belong together.
        policy = self._policy
        decision = policy.cache.get((roles, method))
        if decision is not None:
            return decision
        return self._decide(policy, roles, method)

    def _decide(self, policy: _Policy, roles: frozenset[str], method: str) -> bool:
        if method not in policy.methods:
            # Not cached: a flood of invented method names must not evict real decisions.
            return False
        # Only roles the policy names can be allowed anything; skipping the others also
        # keeps Casbin's role manager from growing an entry per unknown name.
        known = sorted(roles & policy.roles)
        with policy.lock:
            decision = any(
                bool(policy.enforcer.enforce(role, method, AUTHORIZED_ACTION)) for role in known
            )
        cache = policy.cache
        if len(cache) >= _MAX_CACHED_DECISIONS:
            cache.clear()
        cache[(roles, method)] = decision
        return decision

    # -- what the policy names -------------------------------------------------------------

    def methods(self) -> frozenset[str]:
        """Every method named in the policy."""
        return self._policy.methods

    def roles(self) -> frozenset[str]:
        """Every role named in the policy, as a subject or in a role-inheritance line."""
        return self._policy.roles

    # -- changes -----------------------------------------------------------------------------

    def invalidate(self) -> None:
        """Forgets every cached decision (roles or policy changed)."""
        current = self._policy
        # A fresh _Policy rather than cache.clear(): a decision being computed right now
        # with the old cache lands in the discarded dict, not in the new one.
        self._policy = _Policy(current.enforcer, current.methods, current.roles)

    def reload_if_changed(self) -> bool:
        """Re-reads the files if their size, mtime or inode changed.

        Returns True when a new policy is in force. A file that fails to load is logged
        (once per version of the files) and the old policy and its decisions stay.
        """
        with self._reload_lock:
            try:
                signature = self._signature()
            except OSError as exc:
                # Mid-replacement, or deleted: keep what works, look again next time.
                _log.warning("authorization policy not reloaded: %s", exc)
                return False
            if signature in (self._loaded_signature, self._rejected_signature):
                return False
            try:
                new_policy = self._load()
            except PolicyError as exc:
                self._rejected_signature = signature
                _log.error("authorization policy not reloaded, keeping the previous one: %s", exc)
                return False
            # Built completely above; one assignment puts it (and an empty cache) in force.
            self._policy = new_policy
            self._loaded_signature = signature
            self._rejected_signature = None
            _log.info(
                "authorization policy reloaded: %d methods, %d roles",
                len(new_policy.methods),
                len(new_policy.roles),
            )
            return True

    # -- loading -------------------------------------------------------------------------------

    def _signature(self) -> _Signature:
        def one(path: Path) -> tuple[int, int, int]:
            st = path.stat()
            # The inode catches a replacement by rename that keeps size and mtime.
            return (st.st_mtime_ns, st.st_size, st.st_ino)

        return (one(self._model_path), one(self._policy_path))

    def _load(self) -> _Policy:
        try:
            model_text = self._model_path.read_text(encoding="utf-8")
            policy_text = self._policy_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read the policy files: {exc}") from None
        lines, rules, links = _parse_policy(policy_text, self._policy_path)
        # Casbin logs the whole model and policy at INFO while loading, and every request
        # (denials at WARNING) afterwards. enable_log=False below silences its loggers, but
        # only once the constructor has finished loading, so silence them first as well.
        disabled_logging()
        try:
            model = casbin.Enforcer.new_model(text=model_text)
            enforcer = casbin.Enforcer(model, _TextAdapter(lines), enable_log=False)
        except Exception as exc:  # Casbin raises anything from configparser to KeyError.
            raise PolicyError(f"{self._model_path}: cannot load: {exc!r}") from None
        methods = frozenset(method for _, method in rules)
        roles = frozenset(role for role, _ in rules) | frozenset(r for link in links for r in link)
        _check_model(enforcer, rules, self._model_path)
        return _Policy(enforcer, methods, roles)


def _parse_policy(
    text: str, path: Path
) -> tuple[list[str], list[tuple[str, str]], list[tuple[str, str]]]:
    """Checks every line; returns the lines for Casbin, the (role, method) grants and
    the (role, inherited role) links."""
    lines: list[str] = []
    rules: list[tuple[str, str]] = []
    links: list[tuple[str, str]] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [part.strip() for part in line.split(",")]
        where = f"{path}:{number}"
        if fields[0] == "p":
            if len(fields) != 4:
                raise PolicyError(f"{where}: expected 'p, <role>, <method>, call'")
            _, role, method, action = fields
            if not _ROLE_RE.fullmatch(role):
                raise PolicyError(f"{where}: bad role {role!r}")
            if not _METHOD_RE.fullmatch(method):
                raise PolicyError(f"{where}: bad method {method!r}")
            if action != AUTHORIZED_ACTION:
                raise PolicyError(f"{where}: the action must be {AUTHORIZED_ACTION!r}")
            rules.append((role, method))
        elif fields[0] == "g":
            if len(fields) != 3 or not all(_ROLE_RE.fullmatch(f) for f in fields[1:]):
                raise PolicyError(f"{where}: expected 'g, <role>, <inherited role>'")
            links.append((fields[1], fields[2]))
        else:
            raise PolicyError(f"{where}: a line starts with 'p' or 'g'")
        lines.append(line)
    if not rules:
        # An empty or truncated-to-nothing file would deny every call: treat it as broken.
        raise PolicyError(f"{path}: no policy lines")
    return lines, rules, links


def _check_model(enforcer: Any, rules: list[tuple[str, str]], model_path: Path) -> None:
    """The model must grant exactly what the lines say, as the Authorizer asks it."""
    try:
        for role, method in rules:
            if not enforcer.enforce(role, method, AUTHORIZED_ACTION):
                raise PolicyError(f"{model_path}: does not allow the line {role}, {method}")
        role, method = rules[0]
        probes = [(_PROBE_ROLE, method), (role, "/-probe-/-probe-")]
        for probe_role, probe_method in probes:
            if enforcer.enforce(probe_role, probe_method, AUTHORIZED_ACTION):
                raise PolicyError(f"{model_path}: allows what no line allows")
    except PolicyError:
        raise
    except Exception as exc:  # e.g. a request definition of the wrong size
        raise PolicyError(f"{model_path}: cannot evaluate: {exc!r}") from None
