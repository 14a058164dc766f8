"""``nodepool``: run the server and talk to it."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click
import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nodepool.auth.tokens import SigningKeyError, SigningKeys
from nodepool.cli.accounts import apikey, audit, user
from nodepool.cli.connection import client_options, connect
from nodepool.cli.errors import CommandError, run_command
from nodepool.cli.nodes import node
from nodepool.cli.tasks import task
from nodepool.client import ClientConfigError, credential_paths, secure_channel
from nodepool.renewal import CertificateFiles, RenewalError, renew_certificate, renewal_due_at
from nodepool.server.app import NodePoolServer, StartupError
from nodepool.settings import Settings, SettingsError, load_settings
from nodepool.store import StoreError, migrate
from nodepool.worker import WorkerError, WorkerOptions, run_worker

__all__ = ["cli", "main"]

_F = TypeVar("_F", bound=Callable[..., Any])

_config_option = click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML settings file (NODEPOOL_* environment variables win over it).",
)


def _settings(config_file: Path | None) -> Settings:
    try:
        return load_settings(config_file)
    except SettingsError as exc:
        raise CommandError(str(exc)) from None


def _configure_logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Node Pool: the zero-trust control plane of HiveMind."""


@cli.command()
@_config_option
def serve(config_file: Path | None) -> None:
    """Run the gRPC server (mutual TLS only) until SIGTERM or SIGINT."""
    settings = _settings(config_file)
    _configure_logging(settings)
    try:
        asyncio.run(_serve(settings))
    except StartupError as exc:
        raise CommandError(str(exc)) from None


async def _serve(settings: Settings) -> None:
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
    settings = _settings(config_file)
    _configure_logging(settings)
    try:
        files = CertificateFiles(*credential_paths(cert=cert, key=key, ca=ca))
        options = WorkerOptions(
            allow_python=settings.worker_allow_python, task_slots=settings.worker_task_slots
        )
        asyncio.run(_work(files, server, options))
    except (ClientConfigError, WorkerError) as exc:
        raise CommandError(str(exc)) from None


async def _work(files: CertificateFiles, server: str | None, options: WorkerOptions) -> None:
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
    settings = _settings(config_file)
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
    settings = _settings(config_file)
    try:
        migrate(settings.database_url)
    except StoreError as exc:
        raise CommandError(f"database: cannot migrate ({exc})") from None
    click.echo("database schema is up to date", err=True)


@cli.command()
@client_options
@click.option("--timeout", type=click.FloatRange(0.1, 300), default=5.0, show_default=True)
def health(
    server: str | None, cert: str | None, key: str | None, ca: str | None, timeout: float
) -> None:
    """Ask the server whether it is serving (gRPC health check over mTLS)."""
    try:
        channel = secure_channel(server, cert=cert, key=key, ca=ca)
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise CommandError(f"{exc.code().name}: {exc.details()}") from None
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    click.echo(status)
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
    try:
        files = CertificateFiles(*credential_paths(cert=cert, key=key, ca=ca))
    except ClientConfigError as exc:
        raise CommandError(str(exc)) from None
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


def main() -> None:
    sys.exit(run_command(cli))
