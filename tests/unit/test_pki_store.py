"""CertificateStore: the revocation read interface, and that it fails closed."""

from __future__ import annotations

import sqlite3
import stat
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import URL

from pki import (
    CertificateAuthority,
    CertificateKind,
    CertificateRecord,
    CertificateStore,
    NotInitializedError,
    RevocationSource,
    StoreError,
)
from tests.fixtures.pki import TEST_TRUST_DOMAIN


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.init(tmp_path / "ca", TEST_TRUST_DOMAIN) as authority:
        yield authority


@pytest.fixture
def reader(ca: CertificateAuthority) -> Iterator[CertificateStore]:
    with CertificateStore.open(ca.directory) as store:
        yield store


def record(serial: int, name: str = "n1") -> CertificateRecord:
    now = datetime.now(UTC)
    return CertificateRecord(
        serial=serial,
        kind=CertificateKind.CLIENT,
        name=name,
        owner=None,
        spiffe_id=f"spiffe://{TEST_TRUST_DOMAIN}/client/{name}",
        not_before=now,
        not_after=now + timedelta(days=1),
        issued_at=now,
        fingerprint_sha256=f"{serial:064x}",
    )


def test_is_a_revocation_source(reader: CertificateStore) -> None:
    source: RevocationSource = reader
    assert source.revocation_version() == 0
    assert source.revoked_serials() == frozenset()


def test_a_second_reader_sees_revocations(
    ca: CertificateAuthority, reader: CertificateStore, tmp_path: Path
) -> None:
    issued = [ca.issue("client", f"c{i}", tmp_path) for i in range(3)]
    assert reader.revoked_serials() == frozenset()
    ca.revoke(name="c1", actor="root")
    assert reader.revocation_version() == 1
    assert reader.revoked_serials() == {issued[1].serial}
    ca.revoke(name="c1", actor="root")  # already revoked: nothing moves
    assert reader.revocation_version() == 1
    ca.revoke(serial=issued[2].serial, actor="root")
    assert reader.revocation_version() == 2
    assert reader.revoked_serials() == {issued[1].serial, issued[2].serial}


def test_serials_beyond_64_bits_round_trip(ca: CertificateAuthority) -> None:
    serials = [2**159 - 1, 2**64 + 1, 1]
    with ca.store.transaction() as tx:
        for index, serial in enumerate(serials):
            tx.add(record(serial, name=f"n{index}"))
    [big] = ca.store.records(serial=2**159 - 1)
    assert big.serial == 2**159 - 1
    ca.revoke(serial=2**159 - 1, actor="root")
    assert ca.store.revoked_serials() == {2**159 - 1}


def test_times_are_utc_aware(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("client", "c1", tmp_path)
    ca.revoke(name="c1", actor="root")
    [stored] = ca.store.records()
    for value in (stored.not_before, stored.not_after, stored.issued_at, stored.revoked_at):
        assert value is not None
        assert value.utcoffset() == timedelta(0)


def test_failed_transaction_leaves_nothing(ca: CertificateAuthority) -> None:
    def add_then_fail() -> None:
        with ca.store.transaction() as tx:
            tx.add(record(7))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        add_then_fail()
    assert ca.store.records() == []


def test_open_never_creates_a_database(tmp_path: Path) -> None:
    with pytest.raises(NotInitializedError):
        CertificateStore.open(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_create_refuses_existing(ca: CertificateAuthority) -> None:
    with pytest.raises(StoreError, match="already exists"):
        CertificateStore.create(ca.directory)


def test_sqlite_settings(ca: CertificateAuthority) -> None:
    path = ca.directory / "pki.db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    connection = sqlite3.connect(path)
    try:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        connection.close()


@pytest.mark.parametrize(
    ("statement", "read"),
    [
        ("DROP TABLE pki_certificates", "revoked_serials"),
        ("DROP TABLE pki_state", "revocation_version"),
        ("DELETE FROM pki_state", "revocation_version"),
    ],
)
def test_damaged_store_fails_closed(
    ca: CertificateAuthority, reader: CertificateStore, tmp_path: Path, statement: str, read: str
) -> None:
    ca.issue("client", "c1", tmp_path)
    ca.revoke(name="c1", actor="root")
    connection = sqlite3.connect(ca.directory / "pki.db")
    try:
        connection.execute(statement)
        connection.commit()
    finally:
        connection.close()
    with pytest.raises(StoreError):
        getattr(reader, read)()


def test_deleted_database_fails_closed(ca: CertificateAuthority, reader: CertificateStore) -> None:
    for path in ca.directory.glob("pki.db*"):
        path.unlink()
    # Connections opened from now on must fail rather than create an empty store.
    reader.close()
    with pytest.raises(StoreError):
        reader.revoked_serials()
    assert not (ca.directory / "pki.db").exists()


def test_garbage_file_fails_closed(tmp_path: Path) -> None:
    (tmp_path / "pki.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError):
        CertificateStore.open(tmp_path)


def test_from_url(tmp_path: Path) -> None:
    url = URL.create("sqlite", database=str(tmp_path / "shared.db"))
    with pytest.raises(StoreError):
        CertificateStore.from_url(url)
    with CertificateStore.from_url(url, create=True) as writer:
        with writer.transaction() as tx:
            revoked = tx.revoke(
                [*tx.records(), record(5)], reason="superseded", at=datetime.now(UTC), actor="x"
            )
        assert revoked == []  # record(5) was never added
        with writer.transaction() as tx:
            tx.add(record(5))
            tx.revoke(tx.records(), reason="superseded", at=datetime.now(UTC), actor="x")
    with CertificateStore.from_url(url.render_as_string(hide_password=False)) as reader:
        assert reader.revoked_serials() == {5}
        assert reader.revocation_version() == 1
    with pytest.raises(StoreError, match="invalid"):
        CertificateStore.from_url("nonsense://")


def test_concurrent_writers_are_serialized(ca: CertificateAuthority) -> None:
    with ca.store.transaction() as tx:
        for serial in range(1, 41):
            tx.add(record(serial, name=f"n{serial}"))
    stores = [CertificateStore.open(ca.directory) for _ in range(4)]
    errors: list[BaseException] = []

    def revoke_all(store: CertificateStore) -> None:
        try:
            for serial in range(1, 41):
                with store.transaction() as tx:
                    tx.revoke(
                        tx.records(serial=serial),
                        reason="unspecified",
                        at=datetime.now(UTC),
                        actor="t",
                    )
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=revoke_all, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for store in stores:
        store.close()
    assert errors == []
    # Each certificate was revoked exactly once, so the counter moved exactly 40 times.
    assert ca.store.revocation_version() == 40
    assert len(ca.store.revoked_serials()) == 40
