"""How CLI commands reach the server: mTLS channel, user credential, one-line errors.

The login session is kept in ``$NODEPOOL_HOME/session.json`` (default ``~/.nodepool``),
mode 0600. ``NODEPOOL_API_KEY``, when set, is used instead. An expired access token is
refreshed transparently with the refresh token, which rotates on every use.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from nodepool.cli.errors import CommandError
from nodepool.client import ClientConfigError, secure_channel
from nodepool.v1 import user_manager_pb2, user_manager_pb2_grpc

__all__ = [
    "Connection",
    "SavedSession",
    "client_options",
    "connect",
    "nodepool_home",
    "read_password",
]

F = TypeVar("F", bound=Callable[..., Any])
R = TypeVar("R")

# Refresh a little early so a token does not expire between the check and the call.
_REFRESH_MARGIN = timedelta(seconds=30)


def client_options(function: F) -> F:
    """--server, --cert, --key and --ca, each defaulting to its NODEPOOL_* variable."""
    for option in reversed(
        (
            click.option("--server", help="HOST:PORT [NODEPOOL_SERVER, or localhost:50051]"),
            click.option("--cert", type=click.Path(dir_okay=False), help="[NODEPOOL_CERT]"),
            click.option("--key", type=click.Path(dir_okay=False), help="[NODEPOOL_KEY]"),
            click.option("--ca", type=click.Path(dir_okay=False), help="[NODEPOOL_CA]"),
        )
    ):
        function = option(function)
    return function


def nodepool_home() -> Path:
    return Path(os.environ.get("NODEPOOL_HOME") or Path.home() / ".nodepool").expanduser()


def read_password(password_file: Path | None, *, confirm: bool = False) -> str:
    """From --password-file, else NODEPOOL_PASSWORD, else a prompt on the terminal."""
    if password_file is not None:
        try:
            return password_file.read_text().removesuffix("\n").removesuffix("\r")
        except OSError as exc:
            raise CommandError(f"password file: cannot read it ({exc.strerror})") from None
    from_env = os.environ.get("NODEPOOL_PASSWORD")
    if from_env:
        return from_env
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt=confirm, err=True)
    return password


@dataclass
class SavedSession:
    server: str
    username: str
    access_token: str
    access_expires_at: str
    refresh_token: str
    refresh_expires_at: str

    @classmethod
    def from_reply(cls, server: str, username: str, reply: Any) -> SavedSession:
        return cls(
            server=server,
            username=username,
            access_token=reply.access_token,
            access_expires_at=reply.access_token_expires_at.ToDatetime(tzinfo=UTC).isoformat(),
            refresh_token=reply.refresh_token,
            refresh_expires_at=reply.refresh_token_expires_at.ToDatetime(tzinfo=UTC).isoformat(),
        )

    @staticmethod
    def path() -> Path:
        return nodepool_home() / "session.json"

    @classmethod
    def load(cls) -> SavedSession | None:
        try:
            data = json.loads(cls.path().read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError):
            return None

    def save(self) -> None:
        home = nodepool_home()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=home, prefix=".session.")
        try:
            os.fchmod(handle, 0o600)
            os.write(handle, json.dumps(asdict(self), indent=2).encode())
        finally:
            os.close(handle)
        os.replace(name, self.path())

    @classmethod
    def forget(cls) -> None:
        cls.path().unlink(missing_ok=True)

    def access_expired(self) -> bool:
        expires = datetime.fromisoformat(self.access_expires_at)
        return datetime.now(UTC) + _REFRESH_MARGIN >= expires


class Connection:
    def __init__(self, channel: grpc.Channel, target: str) -> None:
        self.channel = channel
        self.target = target

    def call(self, method: Callable[..., R], request: Any, *, auth: bool = True) -> R:
        """Calls ``method`` with the user credential (if ``auth``); errors become one line."""
        metadata = self.credential_metadata() if auth else ()
        try:
            return method(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            raise CommandError(describe(exc)) from None

    def credential_metadata(self) -> tuple[tuple[str, str], ...]:
        api_key = os.environ.get("NODEPOOL_API_KEY")
        if api_key:
            return (("x-api-key", api_key),)
        session = SavedSession.load()
        if session is None:
            raise CommandError("not logged in (run: nodepool user login USERNAME)")
        if session.access_expired():
            # A refresh token works once: two commands refreshing at the same moment would
            # look like a stolen token and end the session. One refreshes; the other waits
            # and then finds the new tokens.
            with _session_lock():
                session = SavedSession.load() or session
                if session.access_expired():
                    session = self._refresh(session)
        return (("authorization", f"Bearer {session.access_token}"),)

    def _refresh(self, session: SavedSession) -> SavedSession:
        stub = user_manager_pb2_grpc.UserManagerStub(self.channel)
        try:
            reply = stub.RefreshToken(
                user_manager_pb2.RefreshTokenRequest(refresh_token=session.refresh_token),
                timeout=30,
            )
        except grpc.RpcError as exc:
            if isinstance(exc, grpc.Call) and exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                SavedSession.forget()
                raise CommandError("session expired (run: nodepool user login USERNAME)") from None
            raise CommandError(describe(exc)) from None
        renewed = SavedSession.from_reply(session.server, session.username, reply)
        renewed.save()
        return renewed


@contextmanager
def _session_lock() -> Iterator[None]:
    home = nodepool_home()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(home / "session.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def describe(error: grpc.RpcError) -> str:
    if isinstance(error, grpc.Call):
        return f"{error.code().name}: {error.details()}"
    return "the server could not be reached"


@contextmanager
def connect(
    server: str | None, cert: str | None, key: str | None, ca: str | None
) -> Iterator[Connection]:
    target = server or os.environ.get("NODEPOOL_SERVER") or "localhost:50051"
    try:
        channel = secure_channel(target, cert=cert, key=key, ca=ca)
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
    with channel:
        yield Connection(channel, target)
