"""One typed, validated settings object, built at the entry point and passed down.

Sources, later wins: built-in defaults (the original Node Pool values), a TOML file,
then ``NODEPOOL_*`` environment variables. Nothing here is read at import time.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ENV_PREFIX", "Settings", "SettingsError", "load_settings"]

ENV_PREFIX = "NODEPOOL_"


class SettingsError(ValueError):
    """An invalid setting. The message is one line that names the setting."""


def _parse_int(low: int, high: int) -> Callable[[str, object], int]:
    def parse(name: str, raw: object) -> int:
        if isinstance(raw, bool):
            raise SettingsError(f"{name}: must be a whole number, got {raw!r}")
        try:
            value = int(str(raw).strip()) if not isinstance(raw, int) else raw
        except ValueError:
            raise SettingsError(f"{name}: must be a whole number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name}: must be between {low} and {high}, got {value}")
        return value

    return parse


def _parse_float(low: float, high: float) -> Callable[[str, object], float]:
    def parse(name: str, raw: object) -> float:
        if isinstance(raw, bool):
            raise SettingsError(f"{name}: must be a number, got {raw!r}")
        try:
            value = float(str(raw).strip()) if not isinstance(raw, int | float) else float(raw)
        except ValueError:
            raise SettingsError(f"{name}: must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise SettingsError(f"{name}: must be between {low:g} and {high:g}, got {value:g}")
        return value

    return parse


def _parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off", ""}:
        return False
    raise SettingsError(f"{name}: must be true or false, got {raw!r}")


def _parse_str(name: str, raw: object) -> str:
    if not isinstance(raw, str):
        raise SettingsError(f"{name}: must be a string, got {raw!r}")
    return raw.strip()


def _parse_required_str(name: str, raw: object) -> str:
    value = _parse_str(name, raw)
    if not value:
        raise SettingsError(f"{name}: must not be empty")
    return value


def _parse_namespace(name: str, raw: object) -> str:
    value = _parse_str(name, raw)
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", value):
        raise SettingsError(f"{name}: must be 1-64 letters, digits, '.', '_' or '-'")
    return value


def _parse_optional_str(name: str, raw: object) -> str | None:
    return _parse_str(name, raw) or None


def _parse_optional_path(name: str, raw: object) -> Path | None:
    text = _parse_str(name, raw)
    return Path(text).expanduser() if text else None


def _parse_path(name: str, raw: object) -> Path:
    path = _parse_optional_path(name, raw)
    if path is None:
        raise SettingsError(f"{name}: must not be empty")
    return path


def _parse_database_url(name: str, raw: object) -> str:
    url = _parse_str(name, raw)
    scheme = urlsplit(url).scheme.split("+", 1)[0]
    if scheme not in {"sqlite", "postgresql", "postgres"}:
        raise SettingsError(f"{name}: must be a sqlite:/// or postgresql:// URL")
    return url


def _parse_redis_url(name: str, raw: object) -> str | None:
    url = _parse_str(name, raw)
    if not url:
        return None
    if urlsplit(url).scheme not in {"redis", "rediss", "unix"}:
        raise SettingsError(f"{name}: must be a redis://, rediss:// or unix:// URL")
    return url


def _parse_log_level(name: str, raw: object) -> str:
    level = _parse_str(name, raw).upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise SettingsError(f"{name}: must be one of DEBUG, INFO, WARNING, ERROR")
    return level


def _parse_trust_domain(name: str, raw: object) -> str:
    domain = _parse_str(name, raw).lower()
    labels = domain.split(".")
    if (
        not domain
        or len(domain) > 253
        or not all(
            label and len(label) <= 63 and label.replace("-", "").isalnum() and label.isascii()
            for label in labels
        )
    ):
        raise SettingsError(f"{name}: must be a DNS-style name such as nodepool.local")
    return domain


def _parse_jwt_algorithm(name: str, raw: object) -> str:
    value = _parse_str(name, raw)
    if value not in {"EdDSA", "ES256"}:
        raise SettingsError(f"{name}: must be EdDSA or ES256")
    return value


@dataclass(frozen=True, slots=True)
class Settings:
    """Every server and worker setting, validated.

    The field name, upper-cased behind ``NODEPOOL_``, is the environment variable;
    the field name itself is the TOML key.
    """

    grpc_host: str = field(default="[::]", metadata={"parse": _parse_str})
    grpc_port: int = field(default=50051, metadata={"parse": _parse_int(0, 65535)})
    # Threads for store calls, and as many database connections: each store thread holds
    # at most one connection, so neither ever waits for the other.
    max_workers: int = field(default=10, metadata={"parse": _parse_int(1, 1024)})
    # The longest any call waits for the database (seconds): past it the call answers
    # UNAVAILABLE. PostgreSQL also gets it as connect_timeout and statement_timeout.
    database_timeout: float = field(default=5.0, metadata={"parse": _parse_float(0.1, 300)})
    data_dir: Path = field(default=Path("nodepool-data"), metadata={"parse": _parse_path})
    database_url: str = field(default="", metadata={"parse": _parse_database_url})
    redis_url: str | None = field(default=None, metadata={"parse": _parse_redis_url})
    node_heartbeat_interval: int = field(default=30, metadata={"parse": _parse_int(1, 3600)})
    node_timeout: int = field(default=120, metadata={"parse": _parse_int(2, 86400)})
    max_nodes_per_user: int = field(default=10, metadata={"parse": _parse_int(0, 100000)})
    offline_node_retention_days: int = field(default=30, metadata={"parse": _parse_int(1, 3650)})
    completed_task_retention_days: int = field(default=7, metadata={"parse": _parse_int(1, 3650)})
    max_task_payload_bytes: int = field(
        default=1 << 20, metadata={"parse": _parse_int(0, 3 * 1024 * 1024)}
    )
    max_task_result_bytes: int = field(
        default=1 << 20, metadata={"parse": _parse_int(0, 3 * 1024 * 1024)}
    )
    max_pending_tasks_per_user: int = field(
        default=10_000, metadata={"parse": _parse_int(1, 10_000_000)}
    )
    trust_domain: str = field(default="nodepool.local", metadata={"parse": _parse_trust_domain})
    pki_dir: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    # Where the CA's certificate and revocation records live when not in the CA directory:
    # a PostgreSQL database that servers on several hosts and nodepool-pki share.
    pki_database_url: str | None = field(default=None, metadata={"parse": _parse_optional_str})
    tls_cert: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    tls_key: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    tls_ca: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    # How often the server re-reads its certificate files, so a rotated
    # certificate is served to new connections without a restart.
    tls_reload_interval: float = field(default=5.0, metadata={"parse": _parse_float(0.1, 3600)})
    shutdown_grace: float = field(default=10.0, metadata={"parse": _parse_float(0, 600)})
    # Keys for several instances must be shared: the same files in each instance's dir.
    jwt_key_dir: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    jwt_algorithm: str = field(default="EdDSA", metadata={"parse": _parse_jwt_algorithm})
    token_issuer: str = field(default="nodepool", metadata={"parse": _parse_required_str})
    token_audience: str = field(default="nodepool", metadata={"parse": _parse_required_str})
    access_token_ttl: int = field(default=600, metadata={"parse": _parse_int(30, 86400)})
    refresh_token_ttl: int = field(
        default=30 * 86400, metadata={"parse": _parse_int(300, 365 * 86400)}
    )
    login_max_failures: int = field(default=5, metadata={"parse": _parse_int(1, 1000)})
    login_lockout_seconds: int = field(default=900, metadata={"parse": _parse_int(1, 86400)})
    login_attempts_per_user_per_minute: int = field(
        default=10, metadata={"parse": _parse_int(1, 100000)}
    )
    # Raise these when many users share one address (a NAT, a proxy).
    login_attempts_per_peer_per_minute: int = field(
        default=30, metadata={"parse": _parse_int(1, 100000)}
    )
    registrations_per_peer_per_minute: int = field(
        default=10, metadata={"parse": _parse_int(1, 100000)}
    )
    # A refresh retried from the same device this soon (its reply was lost) gets the
    # same new pair back instead of ending the session as a reused token; 0 turns it off.
    refresh_reuse_seconds: float = field(default=5.0, metadata={"parse": _parse_float(0, 60)})
    # argon2id cost; the defaults are RFC 9106's second recommended profile.
    password_hash_time_cost: int = field(default=3, metadata={"parse": _parse_int(1, 100)})
    # argon2 needs at least 8 KiB per lane, and the hasher uses 4 lanes.
    password_hash_memory_kib: int = field(
        default=65536, metadata={"parse": _parse_int(32, 4 * 1024 * 1024)}
    )
    policy_dir: Path | None = field(default=None, metadata={"parse": _parse_optional_path})
    # Prefix of every cache key and channel, so instances of different pools can share
    # one Redis without seeing each other.
    cache_namespace: str = field(default="nodepool", metadata={"parse": _parse_namespace})
    log_level: str = field(default="INFO", metadata={"parse": _parse_log_level})
    # The reference worker (nodepool worker). Running payloads as Python scripts is the
    # node owner's choice, off unless they turn it on.
    worker_allow_python: bool = field(default=False, metadata={"parse": _parse_bool})
    # Tasks run at once; 0 = one per CPU core.
    worker_task_slots: int = field(default=0, metadata={"parse": _parse_int(0, 4096)})

    def __post_init__(self) -> None:
        if not self.database_url:
            url = f"sqlite:///{self.data_dir / 'nodepool.db'}"
            object.__setattr__(self, "database_url", url)
        if self.node_timeout <= self.node_heartbeat_interval:
            raise SettingsError(
                "NODEPOOL_NODE_TIMEOUT: must be longer than NODEPOOL_NODE_HEARTBEAT_INTERVAL"
            )

    @property
    def jwt_keys(self) -> Path:
        return self.jwt_key_dir or self.data_dir / "jwt-keys"

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def bind_address(self) -> str:
        return f"{self.grpc_host}:{self.grpc_port}"

    def tls_paths(self) -> tuple[Path, Path, Path]:
        """The server certificate, key and CA bundle; from the PKI dir when not set."""
        cert, key, ca = self.tls_cert, self.tls_key, self.tls_ca
        if self.pki_dir is not None:
            cert = cert or self.pki_dir / "server" / "server.crt"
            key = key or self.pki_dir / "server" / "server.key"
            ca = ca or self.pki_dir / "ca.crt"
        missing = [
            env
            for env, value in (
                ("NODEPOOL_TLS_CERT", cert),
                ("NODEPOOL_TLS_KEY", key),
                ("NODEPOOL_TLS_CA", ca),
            )
            if value is None
        ]
        if missing or cert is None or key is None or ca is None:
            raise SettingsError(
                f"{missing[0]}: not set (set it, or set NODEPOOL_PKI_DIR to a CA directory)"
            )
        return cert, key, ca


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"config file: {path} does not exist") from None
    except OSError as exc:
        raise SettingsError(f"config file: {path} cannot be read ({exc.strerror})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file: {path} is not valid TOML ({exc})") from None
    # Both a flat file and one under a [nodepool] table are accepted.
    section = document.get("nodepool", document)
    if not isinstance(section, dict):
        raise SettingsError(f"config file: {path}: [nodepool] must be a table")
    return section


def load_settings(
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    **overrides: object,
) -> Settings:
    """Build the settings from defaults, ``config_file``, ``environ`` and ``overrides``.

    ``NODEPOOL_CONFIG`` in the environment names the file when ``config_file`` is None.
    Raises :class:`SettingsError` with one line naming the first bad setting.
    """
    env = os.environ if environ is None else environ
    values: dict[str, object] = {}
    if config_file is None and env.get(f"{ENV_PREFIX}CONFIG"):
        config_file = Path(env[f"{ENV_PREFIX}CONFIG"])
    if config_file is not None:
        for key, raw in _read_toml(config_file).items():
            if key not in _FIELDS:
                raise SettingsError(f"{key}: unknown setting in {config_file}")
            values[key] = _FIELDS[key].metadata["parse"](key, raw)
    for name, spec in _FIELDS.items():
        env_name = f"{ENV_PREFIX}{name.upper()}"
        if env_name in env:
            values[name] = spec.metadata["parse"](env_name, env[env_name])
    for name, raw in overrides.items():
        if name not in _FIELDS:
            raise SettingsError(f"{name}: unknown setting")
        values[name] = raw
    return Settings(**values)  # type: ignore[arg-type]
