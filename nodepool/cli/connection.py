"""How CLI commands reach the server: mTLS channel, user credential, one-line errors.

Where to connect and with which files resolves per setting: a flag, its ``NODEPOOL_*``
variable, then the selected context (:mod:`nodepool.cli.contexts`). The login session is
kept per context in ``$NODEPOOL_HOME/sessions/<context>.json``, or in
``$NODEPOOL_HOME/session.json`` without one (default home ``~/.nodepool``), mode 0600; a
session file others can read is refused, as ssh refuses such a key. ``NODEPOOL_API_KEY``,
when set, is used instead. An expired access token is refreshed transparently with the
refresh token, which rotates on every use.
"""

from __future__ import annotations

import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc

from nodepool.cli.contexts import Endpoint, nodepool_home, resolve_endpoint
from nodepool.cli.errors import CommandError
from nodepool.client import ClientConfigError, secure_channel
from nodepool.v1 import user_manager_pb2, user_manager_pb2_grpc

__all__ = [
    "Connection",
    "SavedSession",
    "client_options",
    "connect",
    "describe",
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
            click.option(
                "--server",
                help="HOST[:PORT], port 50051 if left out "
                "[NODEPOOL_SERVER, the context, or localhost:50051]",
            ),
            click.option(
                "--cert",
                type=click.Path(dir_okay=False),
                help="client certificate [NODEPOOL_CERT, or the context]",
            ),
            click.option(
                "--key",
                type=click.Path(dir_okay=False),
                help="its private key [NODEPOOL_KEY, or the context]",
            ),
            click.option(
                "--ca",
                type=click.Path(dir_okay=False),
                help="the pool's CA certificate [NODEPOOL_CA, or the context]",
            ),
        )
    ):
        function = option(function)
    return function


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
    def path(context: str | None = None) -> Path:
        home = nodepool_home()
        return home / "session.json" if context is None else home / "sessions" / f"{context}.json"

    @classmethod
    def load(cls, context: str | None = None) -> SavedSession | None:
        """The saved session; None when there is none. A file that cannot be used is a
        :class:`CommandError` of its own (unreadable, readable by others, damaged)."""
        path = cls.path(context)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise CommandError(f"session file {path}: cannot read it ({exc.strerror})") from None
        try:
            info = os.fstat(descriptor)
            if not stat.S_ISREG(info.st_mode):
                raise CommandError(f"session file {path} is not a regular file; remove it")
            if info.st_mode & 0o077:
                raise CommandError(
                    f"session file {path} is accessible by others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o}); its tokens may be stolen: "
                    f"run chmod 600 {path}, or log in again after removing it"
                )
            with os.fdopen(os.dup(descriptor), "rb") as handle:
                raw = handle.read()
        except OSError as exc:
            raise CommandError(f"session file {path}: cannot read it ({exc.strerror})") from None
        finally:
            os.close(descriptor)
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or set(data) != _SESSION_FIELDS:
                raise TypeError("unexpected fields")
            if not all(isinstance(value, str) for value in data.values()):
                raise TypeError("unexpected types")
            session = cls(**data)
            session.access_expired()  # the timestamps parse
        except (ValueError, TypeError):
            raise CommandError(
                f"session file {path} is damaged; remove it and log in again"
            ) from None
        return session

    def save(self, context: str | None = None) -> None:
        path = self.path(context)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=".session.")
        try:
            os.fchmod(handle, 0o600)
            os.write(handle, json.dumps(asdict(self), indent=2).encode())
        finally:
            os.close(handle)
        os.replace(name, path)

    @classmethod
    def forget(cls, context: str | None = None) -> None:
        cls.path(context).unlink(missing_ok=True)

    def access_expired(self) -> bool:
        expires = datetime.fromisoformat(self.access_expires_at)
        return datetime.now(UTC) + _REFRESH_MARGIN >= expires


_SESSION_FIELDS = {
    "server",
    "username",
    "access_token",
    "access_expires_at",
    "refresh_token",
    "refresh_expires_at",
}


class Connection:
    def __init__(
        self, channel: grpc.Channel, target: str, endpoint: Endpoint | None = None
    ) -> None:
        self.channel = channel
        self.target = target
        self.endpoint = endpoint

    @property
    def context(self) -> str | None:
        """The context whose session this connection uses (None: the default session)."""
        return self.endpoint.context if self.endpoint is not None else None

    def save_session(self, session: SavedSession) -> None:
        session.save(self.context)

    def forget_session(self) -> None:
        SavedSession.forget(self.context)

    def call(self, method: Callable[..., R], request: Any, *, auth: bool = True) -> R:
        """Calls ``method`` with the user credential (if ``auth``); errors become one line."""
        metadata = self.credential_metadata() if auth else ()
        try:
            return method(request, metadata=metadata, timeout=30)
        except grpc.RpcError as exc:
            raise CommandError(describe(exc, self.endpoint)) from None

    def credential_metadata(self) -> tuple[tuple[str, str], ...]:
        api_key = os.environ.get("NODEPOOL_API_KEY")
        if api_key:
            return (("x-api-key", api_key),)
        session = SavedSession.load(self.context)
        if session is None:
            where = f" to context {self.context!r}" if self.context else ""
            raise CommandError(f"not logged in{where} (run: nodepool user login USERNAME)")
        if session.access_expired():
            # A refresh token works once: two commands refreshing at the same moment would
            # look like a stolen token and end the session. One refreshes; the other waits
            # and then finds the new tokens.
            with _session_lock(self.context):
                session = SavedSession.load(self.context) or session
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
                self.forget_session()
                raise CommandError("session expired (run: nodepool user login USERNAME)") from None
            raise CommandError(describe(exc, self.endpoint)) from None
        renewed = SavedSession.from_reply(session.server, session.username, reply)
        self.save_session(renewed)
        return renewed


@contextmanager
def _session_lock(context: str | None = None) -> Iterator[None]:
    path = SavedSession.path(context).with_suffix(".lock")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def describe(error: grpc.RpcError, endpoint: Endpoint | None = None) -> str:
    """One line: the status, and for a failed connection its likely cause and what to do."""
    if not isinstance(error, grpc.Call):
        return "the server could not be reached"
    code, details = error.code(), error.details() or ""
    target = endpoint.target if endpoint else "the server"
    cert = str(endpoint.cert) if endpoint else "the client certificate"
    ca = str(endpoint.ca) if endpoint else "the CA file"
    if code == grpc.StatusCode.UNAVAILABLE:
        cause = _connection_failure(details, target, cert, ca)
        if cause:
            return cause
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details.startswith("Deadline"):
        return (
            f"no answer from {target} in time: is the server up at that address? "
            "(a firewall may drop the connection)"
        )
    if code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in details:
        return f"the server refused {cert}: the certificate has been revoked (get a new one)"
    if code == grpc.StatusCode.UNAUTHENTICATED and details == "certificate has expired":
        return f"the server refused {cert}: the certificate has expired (nodepool cert renew)"
    return f"{code.name}: {details}"


def _connection_failure(details: str, target: str, cert: str, ca: str) -> str | None:
    if "Connection refused" in details:
        return (
            f"nothing answers at {target}: is the server running there? "
            "(check --server, NODEPOOL_SERVER or the context)"
        )
    if "resolving" in details or "DNS" in details or "Domain name not found" in details:
        return (
            f"cannot resolve the host of {target} (check --server, NODEPOOL_SERVER or the context)"
        )
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (
            f"the server at {target} has a certificate that {ca} does not vouch for: "
            "wrong --ca, or not this pool's server"
        )
    if "Hostname Verification" in details or "Peer name" in details:
        return (
            f"the server's certificate does not name the host in {target}: connect by a name "
            "it was issued for (such as localhost), or reissue it with --dns/--ip"
        )
    if any(
        sign in details
        for sign in ("Socket closed", "alert", "Connection reset", "handshake", "Handshake")
    ):
        return (
            f"the server at {target} refused the TLS handshake: {cert} is likely from another "
            "CA or expired (check --cert/--key, or the context)"
        )
    if "No route to host" in details or "Network is unreachable" in details:
        return f"{target} cannot be reached from here (no route to the host)"
    return None


@contextmanager
def connect(
    server: str | None, cert: str | None, key: str | None, ca: str | None
) -> Iterator[Connection]:
    """A channel to the server, from flags, NODEPOOL_* variables, then the context."""
    endpoint = resolve_endpoint(server, cert, key, ca)
    try:
        channel = secure_channel(
            endpoint.target, cert=endpoint.cert, key=endpoint.key, ca=endpoint.ca, environ={}
        )
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
    with channel:
        yield Connection(channel, endpoint.target, endpoint)
