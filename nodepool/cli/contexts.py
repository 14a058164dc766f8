"""Named connection contexts, as kubeconfig contexts or ``step context``.

A context is a server address and the certificate, key and CA files to reach it with. They
live in ``$NODEPOOL_HOME/contexts.json`` (mode 0600); one of them is current. Each context
keeps its own login session (``$NODEPOOL_HOME/sessions/<name>.json``), so logging in to one
pool does not log out of another.

Client settings resolve per setting: a flag, then its ``NODEPOOL_*`` variable, then the
selected context (``nodepool --context NAME``, ``NODEPOOL_CONTEXT``, or the current one).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from nodepool.cli.errors import CommandError
from nodepool.client import DEFAULT_SERVER, ClientConfigError, normalize_target

__all__ = [
    "ClientContext",
    "ContextFile",
    "Endpoint",
    "context_group",
    "nodepool_home",
    "resolve_endpoint",
    "selected_context_name",
]

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def nodepool_home() -> Path:
    return Path(os.environ.get("NODEPOOL_HOME") or Path.home() / ".nodepool").expanduser()


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise click.BadParameter(
            "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param_hint="NAME",
        )
    return name


@dataclass(frozen=True, slots=True)
class ClientContext:
    name: str
    server: str
    cert: str
    key: str
    ca: str


@dataclass(slots=True)
class ContextFile:
    """The contexts and which one is current, as stored."""

    current: str | None
    contexts: dict[str, ClientContext]

    @staticmethod
    def path() -> Path:
        return nodepool_home() / "contexts.json"

    @classmethod
    def load(cls) -> ContextFile:
        path = cls.path()
        try:
            text = path.read_text()
        except FileNotFoundError:
            return cls(None, {})
        except OSError as exc:
            raise CommandError(f"contexts file {path}: cannot read it ({exc.strerror})") from None
        try:
            document = json.loads(text)
            current = document["current"]
            contexts = {c["name"]: ClientContext(**c) for c in document["contexts"]}
            if not (current is None or isinstance(current, str)) or not all(
                isinstance(v, str) for c in contexts.values() for v in asdict(c).values()
            ):
                raise TypeError("wrong types")
        except (ValueError, TypeError, KeyError):
            raise CommandError(
                f"contexts file {path} is damaged; fix or remove it and add the contexts again"
            ) from None
        return cls(current, contexts)

    def save(self) -> None:
        home = nodepool_home()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        document: dict[str, Any] = {
            "current": self.current,
            "contexts": [asdict(c) for _, c in sorted(self.contexts.items())],
        }
        handle, name = tempfile.mkstemp(dir=home, prefix=".contexts.")
        try:
            os.fchmod(handle, 0o600)
            os.write(handle, (json.dumps(document, indent=2) + "\n").encode())
        finally:
            os.close(handle)
        os.replace(name, self.path())

    @classmethod
    @contextmanager
    def editing(cls) -> Iterator[ContextFile]:
        """Loads, yields for changes, saves; one writer at a time."""
        import fcntl

        home = nodepool_home()
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(home / "contexts.lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            contexts = cls.load()
            yield contexts
            contexts.save()
        finally:
            os.close(descriptor)


def selected_context_name(environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The context asked for and where from: ``--context``, NODEPOOL_CONTEXT, or current."""
    env = os.environ if environ is None else environ
    click_context = click.get_current_context(silent=True)
    if click_context is not None:
        chosen = click_context.find_root().meta.get("nodepool.context")
        if chosen:
            return str(chosen), "--context"
    if env.get("NODEPOOL_CONTEXT"):
        return env["NODEPOOL_CONTEXT"], "NODEPOOL_CONTEXT"
    return None, "current"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where a command connects and with what, each setting from flag, env or context."""

    target: str
    cert: Path
    key: Path
    ca: Path
    # The context whose session this connection uses; None: $NODEPOOL_HOME/session.json.
    context: str | None


def resolve_endpoint(
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
    environ: Mapping[str, str] | None = None,
) -> Endpoint:
    """Flags, then NODEPOOL_* variables, then the selected context. One-line errors."""
    env = os.environ if environ is None else environ
    name, source = selected_context_name(env)
    stored = ContextFile.load()
    context: ClientContext | None = None
    if name is not None:
        context = stored.contexts.get(name)
        if context is None:
            raise CommandError(
                f"context {name!r} (from {source}) does not exist (see: nodepool context list)"
            )
    elif stored.current is not None:
        context = stored.contexts.get(stored.current)
        if context is None:
            raise CommandError(
                f"the current context {stored.current!r} does not exist "
                "(choose one: nodepool context use NAME)"
            )

    def pick(flag: str | None, variable: str, from_context: str | None) -> str | None:
        return flag or env.get(variable) or from_context

    target = normalize_target(
        pick(server, "NODEPOOL_SERVER", context.server if context else None) or DEFAULT_SERVER
    )
    paths: list[Path] = []
    for what, flag in (("cert", cert), ("key", key), ("ca", ca)):
        variable = f"NODEPOOL_{what.upper()}"
        value = pick(flag, variable, getattr(context, what) if context else None)
        if not value:
            raise CommandError(
                f"{what}: not given (use --{what} or {variable}, "
                "or add a context: nodepool context add NAME --server ... --cert ... )"
            )
        paths.append(Path(value).expanduser())
    # The session belongs to the context when the command talks to the context's server.
    session_context = (
        context.name if context is not None and target == normalize_target(context.server) else None
    )
    return Endpoint(target, paths[0], paths[1], paths[2], session_context)


def check_files(cert: Path, key: Path, ca: Path) -> None:
    """The same checks a connection makes, for ``context add``."""
    from nodepool.client import ClientCredentials

    try:
        ClientCredentials.resolve("x:1", cert=cert, key=key, ca=ca, environ={})
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None


# -- nodepool context ... ------------------------------------------------------------------


@click.group("context")
def context_group() -> None:
    """Named servers and credentials to connect with (kept under NODEPOOL_HOME)."""


@context_group.command("add")
@click.argument("name", callback=lambda _c, _p, value: check_name(value))
@click.option("--server", required=True, help="HOST[:PORT] of the pool (port 50051 if left out)")
@click.option("--cert", required=True, type=click.Path(dir_okay=False), help="client certificate")
@click.option("--key", required=True, type=click.Path(dir_okay=False), help="its private key")
@click.option("--ca", required=True, type=click.Path(dir_okay=False), help="the pool's CA")
@click.option("--use", "use_it", is_flag=True, help="make it the current context")
@click.option("--replace", is_flag=True, help="overwrite a context of the same name")
def context_add(
    name: str, server: str, cert: str, key: str, ca: str, use_it: bool, replace: bool
) -> None:
    """Add a context. The first one added becomes current."""
    paths = [Path(value).expanduser().resolve() for value in (cert, key, ca)]
    check_files(*paths)
    with ContextFile.editing() as stored:
        if name in stored.contexts and not replace:
            raise CommandError(f"context {name!r} exists (use --replace, or another name)")
        stored.contexts[name] = ClientContext(
            name, normalize_target(server), *(str(path) for path in paths)
        )
        if use_it or stored.current is None or stored.current not in stored.contexts:
            stored.current = name
        selected = stored.current == name
    click.echo(f"context {name} added{' and selected' if selected else ''}", err=True)


@context_group.command("use")
@click.argument("name")
def context_use(name: str) -> None:
    """Make NAME the current context."""
    with ContextFile.editing() as stored:
        if name not in stored.contexts:
            raise CommandError(f"context {name!r} does not exist (see: nodepool context list)")
        stored.current = name
    click.echo(f"current context: {name}", err=True)


@context_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def context_list(as_json: bool) -> None:
    """The contexts; the current one is marked."""
    from nodepool.cli.connection import SavedSession
    from nodepool.cli.output import emit_json, print_table

    stored = ContextFile.load()

    def logged_in_as(name: str) -> str | None:
        try:
            session = SavedSession.load(name)
        except CommandError:
            return None
        return session.username if session else None

    rows = [
        {
            "name": c.name,
            "current": c.name == stored.current,
            "server": c.server,
            "cert": c.cert,
            "key": c.key,
            "ca": c.ca,
            "logged_in_as": logged_in_as(c.name),
        }
        for c in sorted(stored.contexts.values(), key=lambda c: c.name)
    ]
    if as_json:
        emit_json({"current": stored.current, "contexts": rows})
        return
    print_table(
        None,
        ("", "name", "server", "user", "certificate"),
        [
            (
                "*" if row["current"] else "",
                str(row["name"]),
                str(row["server"]),
                str(row["logged_in_as"] or "-"),
                str(row["cert"]),
            )
            for row in rows
        ],
        empty="no contexts (add one: nodepool context add NAME --server ... --cert ...)",
    )


@context_group.command("remove")
@click.argument("name")
def context_remove(name: str) -> None:
    """Forget NAME and its saved session (the session is not ended on the server)."""
    from nodepool.cli.connection import SavedSession

    with ContextFile.editing() as stored:
        if stored.contexts.pop(name, None) is None:
            raise CommandError(f"context {name!r} does not exist (see: nodepool context list)")
        if stored.current == name:
            stored.current = None
        SavedSession.forget(name)
    click.echo(f"context {name} removed", err=True)
