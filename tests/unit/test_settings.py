from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nodepool.settings import Settings, SettingsError, load_settings


def test_original_defaults_hold() -> None:
    settings = load_settings(environ={})
    assert settings.grpc_port == 50051
    assert settings.max_workers == 10
    assert settings.node_heartbeat_interval == 30
    assert settings.node_timeout == 120
    assert settings.max_nodes_per_user == 10
    assert settings.redis_url is None
    assert settings.is_sqlite
    assert settings.database_url == "sqlite:///nodepool-data/nodepool.db"
    assert settings.database_timeout == 5.0


def test_database_timeout_comes_from_the_environment() -> None:
    settings = load_settings(environ={"NODEPOOL_DATABASE_TIMEOUT": "2.5"})
    assert settings.database_timeout == 2.5


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    config = tmp_path / "nodepool.toml"
    config.write_text('grpc_port = 6000\nmax_workers = 4\nredis_url = "redis://r:6379/1"\n')
    settings = load_settings(config, environ={"NODEPOOL_GRPC_PORT": "7000"})
    assert settings.grpc_port == 7000
    assert settings.max_workers == 4
    assert settings.redis_url == "redis://r:6379/1"


def test_a_nodepool_table_is_accepted(tmp_path: Path) -> None:
    config = tmp_path / "nodepool.toml"
    config.write_text("[nodepool]\nnode_timeout = 300\n")
    assert load_settings(config, environ={}).node_timeout == 300


def test_config_file_named_by_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("max_nodes_per_user = 3\n")
    settings = load_settings(environ={"NODEPOOL_CONFIG": str(config)})
    assert settings.max_nodes_per_user == 3


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("NODEPOOL_GRPC_PORT", "abc", "NODEPOOL_GRPC_PORT: must be a whole number"),
        ("NODEPOOL_GRPC_PORT", "70000", "NODEPOOL_GRPC_PORT: must be between 0 and 65535"),
        ("NODEPOOL_MAX_WORKERS", "0", "NODEPOOL_MAX_WORKERS: must be between"),
        ("NODEPOOL_DATABASE_TIMEOUT", "0", "NODEPOOL_DATABASE_TIMEOUT: must be between"),
        ("NODEPOOL_DATABASE_TIMEOUT", "soon", "NODEPOOL_DATABASE_TIMEOUT: must be a number"),
        ("NODEPOOL_DATABASE_URL", "mysql://x/y", "NODEPOOL_DATABASE_URL: must be a sqlite"),
        ("NODEPOOL_REDIS_URL", "http://x", "NODEPOOL_REDIS_URL: must be a redis"),
        ("NODEPOOL_NODE_TIMEOUT", "10", "NODEPOOL_NODE_TIMEOUT: must be longer"),
        ("NODEPOOL_TRUST_DOMAIN", "bad domain!", "NODEPOOL_TRUST_DOMAIN: must be a DNS-style"),
        ("NODEPOOL_LOG_LEVEL", "LOUD", "NODEPOOL_LOG_LEVEL: must be one of"),
        ("NODEPOOL_TOKEN_ISSUER", "", "NODEPOOL_TOKEN_ISSUER: must not be empty"),
        ("NODEPOOL_TOKEN_AUDIENCE", " ", "NODEPOOL_TOKEN_AUDIENCE: must not be empty"),
        ("NODEPOOL_PASSWORD_HASH_MEMORY_KIB", "16", "NODEPOOL_PASSWORD_HASH_MEMORY_KIB: must be"),
        ("NODEPOOL_CACHE_NAMESPACE", "a*b", "NODEPOOL_CACHE_NAMESPACE: must be 1-64"),
        ("NODEPOOL_CACHE_NAMESPACE", "", "NODEPOOL_CACHE_NAMESPACE: must be 1-64"),
        ("NODEPOOL_JWT_ALGORITHM", "HS256", "NODEPOOL_JWT_ALGORITHM: must be EdDSA or ES256"),
    ],
)
def test_invalid_values_name_the_setting(variable: str, value: str, expected: str) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(environ={variable: value})
    message = str(raised.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_unknown_and_mistyped_file_keys_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("grpc_prot = 1\n")
    with pytest.raises(SettingsError, match="^grpc_prot: unknown setting"):
        load_settings(config, environ={})
    config.write_text("grpc_port = true\n")
    with pytest.raises(SettingsError, match="^grpc_port: must be a whole number"):
        load_settings(config, environ={})


def test_unreadable_or_broken_file_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings(tmp_path / "missing.toml", environ={})
    broken = tmp_path / "broken.toml"
    broken.write_text("grpc_port = = 1\n")
    with pytest.raises(SettingsError, match="is not valid TOML"):
        load_settings(broken, environ={})


def test_tls_paths_come_from_the_pki_dir(tmp_path: Path) -> None:
    settings = Settings(pki_dir=tmp_path)
    assert settings.tls_paths() == (
        tmp_path / "server" / "server.crt",
        tmp_path / "server" / "server.key",
        tmp_path / "ca.crt",
    )
    with pytest.raises(SettingsError, match="^NODEPOOL_TLS_CERT: not set"):
        Settings().tls_paths()


@given(st.text(max_size=40))
def test_any_port_text_gives_a_valid_port_or_a_settings_error(text: str) -> None:
    try:
        settings = load_settings(environ={"NODEPOOL_GRPC_PORT": text})
    except SettingsError as exc:
        assert str(exc).startswith("NODEPOOL_GRPC_PORT:")
    else:
        assert 0 <= settings.grpc_port <= 65535
