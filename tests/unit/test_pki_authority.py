"""CertificateAuthority: certificate profiles, issuing rules, renewal, revocation, CRL."""

from __future__ import annotations

import ipaddress
import stat
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import (
    CertificateAuthority,
    CertificateKind,
    CertificateStatus,
    InvalidInputError,
    IssuanceRefusedError,
    IssuedCertificate,
    NotFoundError,
    NotInitializedError,
    PassphraseError,
    PkiError,
    parse_identity,
)
from tests.fixtures.pki import TEST_TRUST_DOMAIN

EKU = {
    "server": ExtendedKeyUsageOID.SERVER_AUTH,
    "node": ExtendedKeyUsageOID.CLIENT_AUTH,
    "client": ExtendedKeyUsageOID.CLIENT_AUTH,
}


@pytest.fixture
def ca(tmp_path: Path) -> Iterator[CertificateAuthority]:
    with CertificateAuthority.init(tmp_path / "ca", TEST_TRUST_DOMAIN) as authority:
        yield authority


def load(issued: IssuedCertificate) -> x509.Certificate:
    return x509.load_pem_x509_certificate(issued.cert_path.read_bytes())


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


CsrKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey


def make_csr(
    uri: str | None, *, common_name: str | None = None, key: CsrKey | None = None
) -> bytes:
    key = key or ec.generate_private_key(ec.SECP256R1())
    attributes = [x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else []
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    if uri is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.PEM)


# -- the CA itself ---------------------------------------------------------------------------


def test_ca_certificate_profile(ca: CertificateAuthority) -> None:
    cert = ca.certificate
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(ca.signing_key.public_key())
    assert isinstance(ca.signing_key, ec.EllipticCurvePrivateKey)
    assert ca.signing_key.curve.name == "secp256r1"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert timedelta(days=3649) < lifetime < timedelta(days=3651)
    assert ca.trust_domain == TEST_TRUST_DOMAIN


def test_ca_directory_modes(ca: CertificateAuthority) -> None:
    assert mode(ca.directory) == 0o700
    assert mode(ca.directory / "ca.key") == 0o600
    assert mode(ca.directory / "pki.db") == 0o600


def test_reopen_reads_trust_domain_from_certificate(ca: CertificateAuthority) -> None:
    with CertificateAuthority.open(ca.directory) as reopened:
        assert reopened.trust_domain == TEST_TRUST_DOMAIN
        assert reopened.certificate == ca.certificate


def test_init_refuses_existing_ca(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="already exists"):
        CertificateAuthority.init(ca.directory)


def test_open_without_ca(tmp_path: Path) -> None:
    with pytest.raises(NotInitializedError, match="no CA in"):
        CertificateAuthority.open(tmp_path)


@pytest.mark.parametrize("domain", ["", "Upper.test", "a/b", "-lead.test", "trail.", "x y"])
def test_invalid_trust_domain(tmp_path: Path, domain: str) -> None:
    with pytest.raises(InvalidInputError):
        CertificateAuthority.init(tmp_path / "ca", domain)
    assert not (tmp_path / "ca").exists()


def test_encrypted_key_needs_the_right_passphrase(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, passphrase=b"correct horse").close()
    assert b"ENCRYPTED PRIVATE KEY" in (directory / "ca.key").read_bytes()
    with pytest.raises(PassphraseError, match="wrong CA passphrase"):
        CertificateAuthority.open(directory, b"wrong")
    # Without a passphrase the CA opens locked: records yes, signing no.
    with CertificateAuthority.open(directory) as locked:
        assert locked.list_certificates() == []
        with pytest.raises(PassphraseError):
            locked.issue("client", "c1", tmp_path / "out")
    with CertificateAuthority.open(directory, b"correct horse") as unlocked:
        unlocked.issue("client", "c1", tmp_path / "out")


def _pbkdf2_rounds(key_file: Path) -> int:
    """The PBKDF2 iteration count in an encrypted PKCS#8 key, as openssl reads it."""
    listing = subprocess.run(
        ["openssl", "asn1parse", "-in", str(key_file)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    kdf = next(i for i, line in enumerate(listing) if ":PBKDF2" in line)
    # PBKDF2-params: SEQUENCE { salt OCTET STRING, iterationCount INTEGER, ... }
    count = next(line for line in listing[kdf:] if "INTEGER" in line)
    return int(count.rsplit(":", 1)[1], 16)


def test_encrypted_key_uses_a_strong_kdf_setting(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory, passphrase=b"correct horse").close()
    assert _pbkdf2_rounds(directory / "ca.key") >= 600_000


def test_a_key_encrypted_the_old_way_still_opens(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    CertificateAuthority.init(directory).close()
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    # What earlier versions wrote: BestAvailableEncryption, PBKDF2 at 2,048 rounds.
    (directory / "ca.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"correct horse"),
        )
    )
    assert _pbkdf2_rounds(directory / "ca.key") < 600_000
    with CertificateAuthority.open(directory, b"correct horse") as unlocked:
        unlocked.issue("client", "c1", tmp_path / "out")


def test_passphrase_for_unencrypted_key_is_refused(ca: CertificateAuthority) -> None:
    with pytest.raises(PassphraseError, match="not encrypted"):
        CertificateAuthority.open(ca.directory, b"secret")


# -- leaf profiles ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["server", "node", "client"])
def test_leaf_profile(ca: CertificateAuthority, tmp_path: Path, kind: str) -> None:
    owner = "alice" if kind == "node" else None
    issued = ca.issue(kind, "leaf-1", tmp_path / "out", owner=owner)
    cert = load(issued)
    ext = cert.extensions

    constraints = ext.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca
    usage = ext.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.digital_signature
    assert not usage.value.key_cert_sign
    assert not usage.value.crl_sign
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [EKU[kind]]
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ca_ski.digest
    uris = ext.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier
    )
    assert uris == [f"spiffe://{TEST_TRUST_DOMAIN}/{kind}/leaf-1"] == [issued.spiffe_id]

    assert cert.serial_number == issued.serial > 2**64
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca.certificate)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    expected = {"server": 366, "node": 7, "client": 90}[kind]
    assert timedelta(days=expected) <= lifetime <= timedelta(days=expected, minutes=2)


def test_server_alternative_names(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue(
        "server",
        "api",
        tmp_path,
        dns_names=["LocalHost", "api.example.com"],
        ip_addresses=["127.0.0.1", "::1"],
    )
    san = load(issued).extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "api.example.com"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]


def test_node_owner_is_in_subject_and_records(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue("node", "node-a", tmp_path, owner="alice")
    cert = load(issued)
    assert [a.value for a in cert.subject.get_attributes_for_oid(NameOID.USER_ID)] == ["alice"]
    identity = parse_identity(cert, TEST_TRUST_DOMAIN)
    assert identity is not None
    assert identity.owner == "alice"
    [record] = ca.list_certificates()
    assert record.owner == "alice"
    assert record.kind is CertificateKind.NODE


def test_issued_files_and_modes(ca: CertificateAuthority, tmp_path: Path) -> None:
    out = tmp_path / "new" / "out"
    issued = ca.issue("client", "dev-1", out)
    assert mode(out) == 0o700
    assert mode(issued.key_path) == 0o600
    assert issued.cert_path == out / "dev-1.crt"
    assert issued.key_path == out / "dev-1.key"
    assert issued.ca_path.read_bytes() == ca.certificate_pem
    key = serialization.load_pem_private_key(issued.key_path.read_bytes(), None)
    assert key.public_key() == load(issued).public_key()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_existing_out_dir_mode_is_kept(ca: CertificateAuthority, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir(mode=0o755)
    out.chmod(0o755)
    ca.issue("client", "dev-1", out)
    assert mode(out) == 0o755


@pytest.mark.parametrize(
    "name", ["", "Upper", "-lead", ".lead", "a/b", "../x", "a" * 64, "x y", "node-a\n", "é"]
)
def test_invalid_names(ca: CertificateAuthority, tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid name"):
        ca.issue("client", name, tmp_path)
    assert ca.list_certificates() == []


@pytest.mark.parametrize("owner", ["al", "Alice", "-bob", "a" * 33, "bob\n", "a b"])
def test_invalid_owner(ca: CertificateAuthority, tmp_path: Path, owner: str) -> None:
    with pytest.raises(InvalidInputError, match="invalid username"):
        ca.issue("node", "node-a", tmp_path, owner=owner)


def test_valid_name_edges(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("client", "a", tmp_path)
    ca.issue("client", "0" + "z" * 62, tmp_path)
    ca.issue("node", "n.1_x-y", tmp_path, owner="bob")


def test_kind_specific_arguments(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="needs an owner"):
        ca.issue("node", "n1", tmp_path)
    with pytest.raises(InvalidInputError, match="only node"):
        ca.issue("client", "c1", tmp_path, owner="alice")
    with pytest.raises(InvalidInputError, match="only server"):
        ca.issue("client", "c1", tmp_path, dns_names=["x.example"])
    with pytest.raises(InvalidInputError, match="invalid IP"):
        ca.issue("server", "s1", tmp_path, ip_addresses=["300.1.1.1"])
    with pytest.raises(InvalidInputError, match="invalid DNS"):
        ca.issue("server", "s1", tmp_path, dns_names=["*.example.com"])
    with pytest.raises(InvalidInputError, match="unknown certificate kind"):
        ca.issue("admin", "s1", tmp_path)
    with pytest.raises(InvalidInputError, match="lifetime"):
        ca.issue("client", "c1", tmp_path, lifetime=timedelta(0))
    assert ca.list_certificates() == []


def test_files_never_land_on_the_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="reserved"):
        ca.issue("client", "ca", tmp_path)
    with pytest.raises(InvalidInputError, match="CA directory"):
        ca.issue("client", "c1", ca.directory / ".." / ca.directory.name)
    assert ca.list_certificates() == []


def test_leaf_never_outlives_ca(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue("client", "c1", tmp_path, lifetime=timedelta(days=20000))
    assert issued.not_after == ca.certificate.not_valid_after_utc


def test_failed_write_records_nothing(ca: CertificateAuthority, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PkiError, match="cannot write"):
        ca.issue("client", "c1", blocker)
    assert ca.list_certificates() == []


# -- issuing rules ---------------------------------------------------------------------------


def test_valid_name_is_not_issued_twice(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.issue("client", "c1", tmp_path)
    with pytest.raises(IssuanceRefusedError, match="already has a valid certificate"):
        ca.issue("client", "c1", tmp_path)
    second = ca.issue("client", "c1", tmp_path, allow_reissue=True)
    assert second.serial != first.serial
    assert len(ca.list_certificates()) == 2


def test_expired_name_may_be_issued_again(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue(
        "client",
        "c1",
        tmp_path,
        not_before=datetime.now(UTC) - timedelta(days=3),
        lifetime=timedelta(days=1),
    )
    ca.issue("client", "c1", tmp_path)


def test_revoked_name_needs_allow_reissue(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("node", "n1", tmp_path, owner="alice")
    ca.revoke(name="n1", reason="keyCompromise", actor="root")
    with pytest.raises(IssuanceRefusedError, match="was revoked"):
        ca.issue("node", "n1", tmp_path, owner="alice")
    ca.issue("node", "n1", tmp_path, owner="alice", allow_reissue=True)


def test_names_are_unique_across_kinds(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("node", "shared", tmp_path, owner="alice")
    with pytest.raises(IssuanceRefusedError, match="node certificate"):
        ca.issue("client", "shared", tmp_path, allow_reissue=True)


def test_node_owner_change_needs_allow_reissue(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue(
        "node",
        "n1",
        tmp_path,
        owner="alice",
        not_before=datetime.now(UTC) - timedelta(days=30),
        lifetime=timedelta(days=1),
    )
    with pytest.raises(IssuanceRefusedError, match="belongs to alice"):
        ca.issue("node", "n1", tmp_path, owner="mallory")
    ca.issue("node", "n1", tmp_path, owner="bob", allow_reissue=True)


# -- revocation ------------------------------------------------------------------------------


def test_revoke_by_name_revokes_every_certificate(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.issue("client", "c1", tmp_path)
    second = ca.issue("client", "c1", tmp_path, allow_reissue=True)
    other = ca.issue("client", "c2", tmp_path)
    revoked = ca.revoke(name="c1", reason="key-compromise", actor="root")
    assert {r.serial for r in revoked} == {first.serial, second.serial}
    assert all(r.revocation_reason == "keyCompromise" and r.revoked_by == "root" for r in revoked)
    assert ca.store.revoked_serials() == {first.serial, second.serial}
    statuses = {r.serial: r.status() for r in ca.list_certificates()}
    assert statuses[other.serial] is CertificateStatus.VALID


def test_revoke_is_idempotent(ca: CertificateAuthority, tmp_path: Path) -> None:
    issued = ca.issue("client", "c1", tmp_path)
    assert len(ca.revoke(serial=issued.serial, actor="root")) == 1
    version = ca.store.revocation_version()
    assert ca.revoke(serial=issued.serial, reason="superseded", actor="someone") == []
    assert ca.revoke(name="c1", actor="someone") == []
    assert ca.store.revocation_version() == version
    [record] = ca.list_certificates()
    assert (record.revocation_reason, record.revoked_by) == ("unspecified", "root")


def test_revoke_errors(ca: CertificateAuthority, tmp_path: Path) -> None:
    ca.issue("client", "c1", tmp_path)
    with pytest.raises(NotFoundError, match="named nobody"):
        ca.revoke(name="nobody", actor="root")
    with pytest.raises(NotFoundError, match="serial ff"):
        ca.revoke(serial=0xFF, actor="root")
    with pytest.raises(InvalidInputError, match="unknown revocation reason"):
        ca.revoke(name="c1", reason="bored", actor="root")
    with pytest.raises(InvalidInputError):
        ca.revoke(actor="root")
    with pytest.raises(InvalidInputError):
        ca.revoke(name="c1", serial=1, actor="root")
    with pytest.raises(InvalidInputError, match="actor"):
        ca.revoke(name="c1", actor=" ")
    assert ca.store.revoked_serials() == frozenset()


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("keyCompromise", "keyCompromise"),
        ("key_compromise", "keyCompromise"),
        ("KEY-COMPROMISE", "keyCompromise"),
        ("ca_compromise", "cACompromise"),
        ("cessation-of-operation", "cessationOfOperation"),
        ("privilegeWithdrawn", "privilegeWithdrawn"),
        ("certificate_hold", "certificateHold"),
    ],
)
def test_reason_spellings(
    ca: CertificateAuthority, tmp_path: Path, given: str, stored: str
) -> None:
    ca.issue("client", "c1", tmp_path)
    [record] = ca.revoke(name="c1", reason=given, actor="root")
    assert record.revocation_reason == stored


def test_statuses(ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    ca.issue("client", "good", tmp_path)
    ca.issue("client", "old", tmp_path, not_before=now - timedelta(days=2), lifetime=timedelta(1))
    ca.issue("client", "bad", tmp_path)
    ca.issue("client", "later", tmp_path, not_before=now + timedelta(days=1))
    ca.revoke(name="bad", actor="root")
    statuses = {r.name: r.status() for r in ca.list_certificates()}
    assert statuses == {
        "good": CertificateStatus.VALID,
        "old": CertificateStatus.EXPIRED,
        "bad": CertificateStatus.REVOKED,
        "later": CertificateStatus.NOT_YET_VALID,
    }


# -- CRL -------------------------------------------------------------------------------------


def test_crl_lists_revocations_with_reasons(ca: CertificateAuthority, tmp_path: Path) -> None:
    compromised = ca.issue("client", "c1", tmp_path)
    plain = ca.issue("client", "c2", tmp_path)
    ca.issue("client", "c3", tmp_path)
    ca.revoke(name="c1", reason="keyCompromise", actor="root")
    ca.revoke(name="c2", actor="root")
    path = tmp_path / "crl.pem"
    ca.write_crl(path, lifetime=timedelta(days=2))
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.is_signature_valid(ca.signing_key.public_key())
    assert crl.issuer == ca.certificate.subject
    assert crl.next_update_utc - crl.last_update_utc == timedelta(days=2)  # type: ignore[operator]
    assert {entry.serial_number for entry in crl} == {compromised.serial, plain.serial}
    entry = crl.get_revoked_certificate_by_serial_number(compromised.serial)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason is (
        x509.ReasonFlags.key_compromise
    )
    # RFC 5280: "unspecified" is expressed by leaving the reason code out.
    unspecified = crl.get_revoked_certificate_by_serial_number(plain.serial)
    assert unspecified is not None
    assert len(unspecified.extensions) == 0
    first_number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    ca.write_crl(path)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number > first_number


# -- renewal from a CSR ----------------------------------------------------------------------


def test_sign_csr_renews_node(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = ca.issue("node", "node-a", tmp_path, owner="alice")
    key = ec.generate_private_key(ec.SECP256R1())
    pem = ca.sign_csr(
        make_csr(old.spiffe_id, common_name="node-a", key=key),
        expected_kind="node",
        expected_name="node-a",
        presented_serial=old.serial,
    )
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(ca.certificate)
    assert cert.public_key() == key.public_key()
    assert cert.serial_number != old.serial
    identity = parse_identity(cert, TEST_TRUST_DOMAIN)
    assert identity is not None
    assert (identity.kind, identity.name, identity.owner) == ("node", "node-a", "alice")
    assert [r.serial for r in ca.list_certificates()] == [old.serial, cert.serial_number]


def test_sign_csr_accepts_ed25519(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = ca.issue("client", "dev", tmp_path)
    csr = make_csr(old.spiffe_id, key=ed25519.Ed25519PrivateKey.generate())
    cert = x509.load_pem_x509_certificate(
        ca.sign_csr(csr, expected_kind="client", expected_name="dev")
    )
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


def test_sign_csr_checks_the_requested_identity(ca: CertificateAuthority, tmp_path: Path) -> None:
    old = ca.issue("node", "node-a", tmp_path, owner="alice")
    ca.issue("node", "node-b", tmp_path, owner="bob")
    cases = {
        "node-b": make_csr(f"spiffe://{TEST_TRUST_DOMAIN}/node/node-b"),
        "foreign": make_csr("spiffe://elsewhere.test/node/node-a"),
        "no SAN": make_csr(None, common_name="node-a"),
        "bad CN": make_csr(old.spiffe_id, common_name="node-b"),
        "garbage": b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
    }
    for label, csr in cases.items():
        try:
            ca.sign_csr(csr, expected_kind="node", expected_name="node-a")
        except InvalidInputError:
            continue
        pytest.fail(f"CSR with {label} was signed")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(InvalidInputError, match="unsupported CSR key"):
        ca.sign_csr(
            make_csr(old.spiffe_id, key=rsa_key), expected_kind="node", expected_name="node-a"
        )
    assert len(ca.list_certificates()) == 2


def test_sign_csr_refusals(ca: CertificateAuthority, tmp_path: Path) -> None:
    uri = f"spiffe://{TEST_TRUST_DOMAIN}/node/node-a"
    with pytest.raises(IssuanceRefusedError, match="no valid node certificate"):
        ca.sign_csr(make_csr(uri), expected_kind="node", expected_name="node-a")

    old = ca.issue(
        "node",
        "node-a",
        tmp_path,
        owner="alice",
        not_before=datetime.now(UTC) - timedelta(days=10),
        lifetime=timedelta(days=1),
    )
    with pytest.raises(IssuanceRefusedError, match="no valid"):
        ca.sign_csr(make_csr(uri), expected_kind="node", expected_name="node-a")

    current = ca.issue("node", "node-a", tmp_path, owner="alice")
    with pytest.raises(IssuanceRefusedError, match="no valid"):
        ca.sign_csr(
            make_csr(uri), expected_kind="node", expected_name="node-a", presented_serial=old.serial
        )
    ca.sign_csr(
        make_csr(uri), expected_kind="node", expected_name="node-a", presented_serial=current.serial
    )
    with pytest.raises(InvalidInputError, match="server"):
        ca.sign_csr(make_csr(uri), expected_kind="server", expected_name="node-a")


def test_revocation_stops_renewal_until_reissued(ca: CertificateAuthority, tmp_path: Path) -> None:
    first = ca.issue("node", "node-a", tmp_path, owner="alice")
    second = ca.issue("node", "node-a", tmp_path, owner="alice", allow_reissue=True)
    csr = make_csr(first.spiffe_id)
    # Revoking one certificate of the name bans renewal of all of them.
    ca.revoke(serial=first.serial, actor="root")
    with pytest.raises(IssuanceRefusedError, match="revoked"):
        ca.sign_csr(
            csr, expected_kind="node", expected_name="node-a", presented_serial=second.serial
        )
    ca.issue("node", "node-a", tmp_path, owner="alice", allow_reissue=True)
    ca.sign_csr(csr, expected_kind="node", expected_name="node-a")


def test_locked_ca_cannot_sign(tmp_path: Path) -> None:
    CertificateAuthority.init(tmp_path / "ca", TEST_TRUST_DOMAIN, b"pw").close()
    with CertificateAuthority.open(tmp_path / "ca") as ca:
        with pytest.raises(PassphraseError):
            ca.write_crl(tmp_path / "crl.pem")
        with pytest.raises(PassphraseError):
            ca.sign_csr(make_csr(None), expected_kind="node", expected_name="n1")
