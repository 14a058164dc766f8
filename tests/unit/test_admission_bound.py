"""A permission cannot stay stale longer than 10 s when an announcement is lost: an
admission is kept no longer than the cached user it was made from (the caches once
stacked: a 10 s admission made from a 9 s old user lasted 19 s)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

import pytest

from nodepool.auth.credentials import (
    ApiKeyDirectory,
    CredentialResolver,
    SessionDenyList,
    UserDirectory,
    UserSnapshot,
)
from nodepool.auth.events import AuthEvents
from nodepool.auth.principal import PeerIdentity, PeerKind
from nodepool.auth.rules import Access, MethodRule
from nodepool.auth.tokens import SigningKeys, TokenConfig, TokenIssuer, TokenVerifier
from nodepool.cache import create_cache
from nodepool.errors import UnauthenticatedError

DEVICE = "spiffe://nodepool.test/client/alice-laptop"
PEER = PeerIdentity(PeerKind.CLIENT, "alice-laptop", DEVICE, serial=7, not_after=2**40)


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class _Context:
    metadata: tuple[tuple[str, str], ...]

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


@dataclass
class _Call:
    context: _Context
    peer: PeerIdentity = PEER
    rule: MethodRule = field(default_factory=lambda: MethodRule(Access.USER, audited=False))
    principal: Any = None


def test_an_admission_does_not_outlive_the_user_it_was_made_from() -> None:
    clock = Clock()
    active = {"alice": True}

    async def load_user(name: str) -> UserSnapshot:
        return UserSnapshot(name, frozenset({"user"}), active[name])

    async def load_key(lookup_id: str) -> None:
        return None

    async def touch(used: Any) -> None:
        return None

    async def revoked(since: Any) -> list[str]:
        return []

    keys = SigningKeys.in_memory()
    config = TokenConfig(issuer="i", audience="a")
    issuer = TokenIssuer(keys, config, clock=clock)
    # Two sessions of one user: the second is first seen while the user is cached.
    first = issuer.issue_access("alice", "s1", device=DEVICE).token
    second = issuer.issue_access("alice", "s2", device=DEVICE).token
    events = AuthEvents(create_cache(None, namespace="t"))
    events.healthy = True
    resolver = CredentialResolver(
        tokens=TokenVerifier(keys, config, clock=clock),
        sessions=SessionDenyList(revoked, keep_for=config.access_ttl),
        users=UserDirectory(load_user, clock=clock),
        api_keys=ApiKeyDirectory(load_key, touch, clock=clock),
        events=events,
        clock=clock,
    )

    def admit(token: str) -> None:
        call = _Call(_Context((("authorization", f"Bearer {token}"),)))
        pending = resolver(call)
        if pending is not None:
            asyncio.run(pending)  # type: ignore[arg-type]

    admit(first)  # t=0: the user is loaded and cached for 10 s
    clock.now += 9
    # t=9: the cached user admits the other session; that admission could last to t=19.
    admit(second)
    # The user is deactivated and the announcement is lost.
    active["alice"] = False
    clock.now += 1.5
    # t=10.5: past the 10 s bound, the user must be read again, and is refused.
    with pytest.raises(UnauthenticatedError):
        admit(second)
