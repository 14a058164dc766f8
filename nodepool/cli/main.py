"""``nodepool``: run the server and talk to it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.cli.accounts import apikey, audit, user
from nodepool.cli.connection import client_options, connect, describe
from nodepool.cli.contexts import context_group, resolve_endpoint
from nodepool.cli.errors import CommandError, run_command
from nodepool.cli.local import admin_settings, check_server_settings, load_cli_settings
from nodepool.cli.nodes import node
from nodepool.cli.output import console, emit_json, status_text
from nodepool.cli.tasks import task
from nodepool.client import ClientConfigError, secure_channel
from nodepool.settings import Settings

# The server, store, worker and renewal modules load only in the commands that use them,
# so a client command starts without them.
if TYPE_CHECKING:
    from nodepool.renewal import CertificateFiles
    from nodepool.worker import WorkerOptions

__all__ = ["cli", "main"]

_F = TypeVar("_F", bound=Callable[..., Any])

_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file (NODEPOOL_* environment variables win over it).",
)


_settings = load_cli_settings


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_level != "DEBUG":
        # Alembic tells at INFO which dialect it found on every start; that is not news.
        logging.getLogger("alembic").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="nodepool", prog_name="nodepool")
@click.option(
    "--context",
    "context_name",
    metavar="NAME",
    help="connect with this context instead of the current one [NODEPOOL_CONTEXT]",
)
@click.pass_context
def cli(ctx: click.Context, context_name: str | None) -> None:
    """Node Pool: the zero-trust control plane of HiveMind.

    Client commands connect with --server/--cert/--key/--ca, else the NODEPOOL_SERVER,
    NODEPOOL_CERT, NODEPOOL_KEY and NODEPOOL_CA variables, else the current context
    (see: nodepool context --help).
    """
    if context_name:
        ctx.meta["nodepool.context"] = context_name


@cli.command()
@_config_option
def serve(config_file: Path | None) -> None:
    """Run the gRPC server (mutual TLS only) until SIGTERM or SIGINT."""
    from nodepool.server.app import StartupError

    settings = _settings(config_file)
    check_server_settings(settings)
    _configure_logging(settings)
    try:
        asyncio.run(_serve(settings))
    except StartupError as exc:
        raise CommandError(str(exc)) from None


async def _serve(settings: Settings) -> None:
    from nodepool.server.app import NodePoolServer

    loop = asyncio.get_running_loop()
    # The server sizes its own store threads from the settings (MAX_WORKERS).
    server = NodePoolServer(settings)
    await server.start()
    stopping = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    click.echo(f"nodepool: serving on port {server.port}", err=True)
    await stopping.wait()
    logging.getLogger("nodepool").info("shutting down (grace %.0f s)", settings.shutdown_grace)
    await server.stop()


@cli.command()
@_config_option
@client_options
def worker(
    config_file: Path | None,
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
) -> None:
    """Run this machine as a worker node (with its node certificate) until SIGTERM."""
    from nodepool.renewal import CertificateFiles
    from nodepool.worker import WorkerError, WorkerOptions

    settings = _settings(config_file)
    _configure_logging(settings)
    endpoint = resolve_endpoint(server, cert, key, ca)
    try:
        files = CertificateFiles(endpoint.cert, endpoint.key, endpoint.ca)
        options = WorkerOptions(
            allow_python=settings.worker_allow_python, task_slots=settings.worker_task_slots
        )
        asyncio.run(_work(files, endpoint.target, options))
    except (ClientConfigError, WorkerError) as exc:
        raise CommandError(str(exc)) from None


async def _work(files: CertificateFiles, server: str | None, options: WorkerOptions) -> None:
    from nodepool.worker import run_worker

    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await run_worker(files, server, stopping, options)


@cli.group()
def keys() -> None:
    """Token signing keys (local, on the server host)."""


@keys.command("rotate")
@_config_option
def keys_rotate(config_file: Path | None) -> None:
    """Sign new tokens with a new key; tokens signed by older keys stay valid."""
    from nodepool.auth.tokens import SigningKeyError, SigningKeys

    settings = _settings(config_file)
    if settings.jwt_key_dir is None:
        settings = admin_settings(config_file)
    try:
        kid = SigningKeys.rotate(settings.jwt_keys, settings.jwt_algorithm)
    except (SigningKeyError, OSError) as exc:
        raise CommandError(f"NODEPOOL_JWT_KEY_DIR: {exc}") from None
    click.echo(kid)
    click.echo("servers sharing this key directory sign with it within seconds", err=True)


@cli.group()
def db() -> None:
    """Local database administration (runs on the server host)."""


@db.command("migrate")
@_config_option
def db_migrate(config_file: Path | None) -> None:
    """Apply the schema migrations (the server also does this at start)."""
    from nodepool.store import StoreError, migrate

    settings = admin_settings(config_file, creating=True)
    try:
        migrate(settings.database_url)
    except StoreError as exc:
        raise CommandError(f"database: cannot migrate ({exc})") from None
    click.echo("database schema is up to date", err=True)


@cli.command()
@client_options
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=5.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def health(
    server: str | None,
    cert: str | None,
    key: str | None,
    ca: str | None,
    timeout: float,
    as_json: bool,
) -> None:
    """Ask the server whether it is serving (gRPC health check over mTLS)."""
    endpoint = resolve_endpoint(server, cert, key, ca)
    try:
        channel = secure_channel(
            endpoint.target, cert=endpoint.cert, key=endpoint.key, ca=endpoint.ca, environ={}
        )
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise CommandError(describe(exc, endpoint)) from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if as_json:
        emit_json({"server": endpoint.target, "context": endpoint.context, "status": status})
    else:
        console().print(status_text(status))
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise click.exceptions.Exit(1)


@cli.group()
def cert() -> None:
    """This machine's own certificate."""


@cert.command("renew")
@client_options
@click.option(
    "--if-due", is_flag=True, help="Renew only once two thirds of the lifetime have passed."
)
def cert_renew(
    server: str | None, cert: str | None, key: str | None, ca: str | None, if_due: bool
) -> None:
    """Renew the certificate with a new key made here; the files are replaced in place."""
    from nodepool.renewal import CertificateFiles, RenewalError, renew_certificate, renewal_due_at

    endpoint = resolve_endpoint(server, cert, key, ca)
    files = CertificateFiles(endpoint.cert, endpoint.key, endpoint.ca)
    server = endpoint.target
    try:
        if if_due and datetime.now(UTC) < renewal_due_at(files.load()):
            click.echo("not due yet", err=True)
            return
        renewed = renew_certificate(files, server, metadata=_renewal_credential(files, server))
    except (ClientConfigError, RenewalError) as exc:
        raise CommandError(str(exc)) from None
    click.echo(f"renewed; valid until {renewed.not_valid_after_utc.isoformat()}")


def _renewal_credential(files: CertificateFiles, server: str | None) -> tuple[tuple[str, str], ...]:
    """A client certificate renews with its user's credential; a node's needs none."""
    identity = files.load().extensions.get_extension_for_class(x509.SubjectAlternativeName)
    uris = identity.value.get_values_for_type(x509.UniformResourceIdentifier)
    if any("/node/" in uri for uri in uris):
        return ()
    with connect(server, str(files.cert), str(files.key), str(files.ca)) as conn:
        return conn.credential_metadata()


cli.add_command(user)
cli.add_command(apikey)
cli.add_command(audit)
cli.add_command(node)
cli.add_command(task)
cli.add_command(context_group)


def main() -> None:
    sys.exit(run_command(cli))
