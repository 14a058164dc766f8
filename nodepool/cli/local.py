"""Settings for commands that run on the server host: serve and the local admin commands.

``nodepool serve`` checks what it can before it starts (addresses, files, directories,
Redis), so a bad setting is one line naming it rather than a failure deep in start-up.

The local admin commands (``db migrate``, ``keys rotate``, ``user create-admin``, ``user
reset-password``) must act on the server's own data. Without ``NODEPOOL_DATA_DIR`` or
``NODEPOOL_DATABASE_URL`` (environment or ``--config``) they use the data directory
``scripts/run`` uses when there is one here (``$NODEPOOL_DEV_DIR/data`` or ``.dev/data``),
and otherwise refuse rather than create a second, empty ``./nodepool-data``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
from dataclasses import replace
from pathlib import Path

import click
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from nodepool.cli.errors import CommandError
from nodepool.settings import Settings, SettingsError, load_settings

__all__ = ["admin_settings", "check_server_settings", "load_cli_settings"]

_DEFAULT_DATA_DIR = Path("nodepool-data")


def load_cli_settings(config_file: Path | None) -> Settings:
    try:
        return load_settings(config_file)
    except SettingsError as exc:
        raise CommandError(str(exc)) from None


def _dev_data_dirs() -> list[Path]:
    candidates = []
    if os.environ.get("NODEPOOL_DEV_DIR"):
        candidates.append(Path(os.environ["NODEPOOL_DEV_DIR"]).expanduser() / "data")
    candidates.append(Path(".dev") / "data")
    return candidates


def admin_settings(config_file: Path | None, *, creating: bool = False) -> Settings:
    """The settings of the server on this host, or a one-line refusal naming the setting.

    ``creating``: the command may make the data directory when it was named explicitly.
    """
    settings = load_cli_settings(config_file)
    chosen = settings.data_dir != _DEFAULT_DATA_DIR or "NODEPOOL_DATA_DIR" in os.environ
    if not settings.is_sqlite or (chosen and (creating or settings.data_dir.is_dir())):
        return settings
    if chosen:
        raise CommandError(
            f"NODEPOOL_DATA_DIR: {settings.data_dir} does not exist "
            "(name the directory the server uses)"
        )
    url_chosen = settings.database_url != f"sqlite:///{_DEFAULT_DATA_DIR / 'nodepool.db'}"
    if url_chosen:
        return settings
    if settings.data_dir.is_dir():
        return settings
    for candidate in _dev_data_dirs():
        if (candidate / "nodepool.db").is_file():
            click.echo(
                f"using the data directory of scripts/run, {candidate} "
                "(set NODEPOOL_DATA_DIR for another)",
                err=True,
            )
            return replace(
                settings,
                data_dir=candidate,
                database_url=f"sqlite:///{candidate / 'nodepool.db'}",
            )
    raise CommandError(
        f"NODEPOOL_DATA_DIR: not set, and there is no ./{_DEFAULT_DATA_DIR} here; name the "
        "server's data directory (NODEPOOL_DATA_DIR, NODEPOOL_DATABASE_URL or --config)"
    )


# -- nodepool serve: checks before start-up ------------------------------------------------


def check_server_settings(settings: Settings) -> None:
    """Refuses, in one line naming the setting, what would make start-up fail."""
    _check_pki_dir(settings)
    _check_tls_files(settings)
    _check_listen_address(settings)
    _check_data_dir(settings)
    _check_redis(settings)


def _check_pki_dir(settings: Settings) -> None:
    pki_dir = settings.pki_dir
    if pki_dir is None:
        return  # the server's own message names it
    if not pki_dir.is_dir():
        raise CommandError(
            f"NODEPOOL_PKI_DIR: {pki_dir} is not a directory "
            f"(create a CA with: nodepool-pki init --dir {pki_dir})"
        )
    if not (pki_dir / "ca.crt").is_file():
        raise CommandError(
            f"NODEPOOL_PKI_DIR: {pki_dir} is not a CA directory (no ca.crt; "
            f"create one with: nodepool-pki init --dir {pki_dir})"
        )


def _check_tls_files(settings: Settings) -> None:
    try:
        cert, key, ca = settings.tls_paths()
    except SettingsError as exc:
        raise CommandError(str(exc)) from None

    def label(name: str, explicit: Path | None) -> str:
        return name if explicit is not None else f"{name} (from NODEPOOL_PKI_DIR)"

    labels = (
        label("NODEPOOL_TLS_CERT", settings.tls_cert),
        label("NODEPOOL_TLS_KEY", settings.tls_key),
        label("NODEPOOL_TLS_CA", settings.tls_ca),
    )
    contents = []
    for path, name in zip((cert, key, ca), labels, strict=True):
        try:
            contents.append(path.read_bytes())
        except OSError as exc:
            raise CommandError(f"{name}: cannot read {path} ({exc.strerror})") from None
    try:
        chain = x509.load_pem_x509_certificates(contents[0])
    except ValueError:
        raise CommandError(f"{labels[0]}: {cert} is not a PEM certificate") from None
    try:
        private = serialization.load_pem_private_key(contents[1], password=None)
    except TypeError:
        raise CommandError(f"{labels[1]}: {key} is encrypted; the server needs it plain") from None
    except (ValueError, UnsupportedAlgorithm):
        raise CommandError(f"{labels[1]}: {key} is not a PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if private.public_key().public_bytes(*spki) != chain[0].public_key().public_bytes(*spki):
        raise CommandError(f"{labels[1]}: {key} is not the key of the certificate {cert}")
    try:
        x509.load_pem_x509_certificates(contents[2])
    except ValueError:
        raise CommandError(f"{labels[2]}: {ca} is not a PEM certificate") from None


def _check_listen_address(settings: Settings) -> None:
    host = settings.grpc_host.strip("[]")
    try:
        addresses = socket.getaddrinfo(
            host or None, settings.grpc_port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        raise CommandError(
            f"NODEPOOL_GRPC_HOST: cannot resolve {settings.grpc_host!r} "
            "(use an address of this machine, or [::] for all)"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                with contextlib.suppress(OSError):
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            try:
                probe.bind(address)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise CommandError(
                        f"NODEPOOL_GRPC_PORT: port {settings.grpc_port} is in use on "
                        f"{settings.grpc_host} (another server? choose another port)"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise CommandError(
                        f"NODEPOOL_GRPC_HOST: {settings.grpc_host} is not an address of "
                        "this machine (use one of its addresses, or [::] for all)"
                    ) from None
                if exc.errno == errno.EACCES:
                    raise CommandError(
                        f"NODEPOOL_GRPC_PORT: port {settings.grpc_port} needs privileges "
                        "(use a port above 1023)"
                    ) from None
                # Anything else is left to the server's own bind and its message.


def _check_data_dir(settings: Settings) -> None:
    if not settings.is_sqlite and settings.jwt_key_dir is not None:
        return
    directory = settings.data_dir
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CommandError(
            f"NODEPOOL_DATA_DIR: cannot create {directory} ({exc.strerror})"
        ) from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise CommandError(f"NODEPOOL_DATA_DIR: {directory} is not writable by this user")


def _check_redis(settings: Settings) -> None:
    if settings.redis_url is None:
        return
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise CommandError(
            f"NODEPOOL_REDIS_URL: Redis does not answer ({_first_line(exc)}); "
            "start it, or unset the variable for single-instance mode"
        ) from None
    finally:
        client.close()


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
