"""parse_identity: only well-formed identities of our trust domain are recognised."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki import CertificateAuthority, CertificateKind, IssuedCertificate, parse_identity
from tests.fixtures.pki import TEST_TRUST_DOMAIN, issue_odd_certificate

CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


@pytest.mark.parametrize(
    ("fixture", "kind", "name", "owner"),
    [
        ("server_cert", "server", "server", None),
        ("client_cert", "client", "alice-laptop", None),
        ("node_cert", "node", "node-a", "alice"),
    ],
)
def test_issued_certificates(
    request: pytest.FixtureRequest, fixture: str, kind: str, name: str, owner: str | None
) -> None:
    issued: IssuedCertificate = request.getfixturevalue(fixture)
    cert = load(issued.cert_path)
    identity = parse_identity(cert, TEST_TRUST_DOMAIN)
    assert identity is not None
    assert identity.kind is CertificateKind(kind)
    assert (identity.name, identity.owner) == (name, owner)
    assert identity.spiffe_id == f"spiffe://{TEST_TRUST_DOMAIN}/{kind}/{name}" == issued.spiffe_id
    assert identity.serial == cert.serial_number == issued.serial
    assert identity.not_after == cert.not_valid_after_utc == issued.not_after


def test_other_trust_domain(node_cert: IssuedCertificate) -> None:
    assert parse_identity(load(node_cert.cert_path), "nodepool.other") is None
    assert parse_identity(load(node_cert.cert_path), "nodepool") is None


@pytest.mark.parametrize(
    ("label", "options"),
    [
        ("no URI SAN", {"uri": None}),
        ("foreign trust domain", {"uri": "spiffe://evil.test/client/x"}),
        ("trust domain prefix", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}.evil/client/x"}),
        ("unknown kind", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/admin/x"}),
        ("extra path", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/client/x/y"}),
        ("bad name", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/client/X"}),
        ("query", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/client/x?a=b"}),
        ("other scheme", {"uri": f"https://{TEST_TRUST_DOMAIN}/client/x"}),
        ("server EKU as client", {"eku": [SERVER_AUTH]}),
        ("dual use", {"eku": [SERVER_AUTH, CLIENT_AUTH]}),
        ("no EKU", {"eku": None}),
        ("CA certificate", {"ca_flag": True}),
        ("node without owner", {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/node/n1"}),
        (
            "node with bad owner",
            {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/node/n1", "owner": "X"},
        ),
        (
            "client EKU on server",
            {"uri": f"spiffe://{TEST_TRUST_DOMAIN}/server/s1", "eku": [CLIENT_AUTH]},
        ),
    ],
)
def test_refused(
    pki_ca: CertificateAuthority, tmp_path: Path, label: str, options: dict[str, object]
) -> None:
    odd = issue_odd_certificate(pki_ca, tmp_path, "odd", **options)  # type: ignore[arg-type]
    assert parse_identity(odd.certificate, TEST_TRUST_DOMAIN) is None, label


def test_crafted_node_with_owner_is_recognised(
    pki_ca: CertificateAuthority, tmp_path: Path
) -> None:
    # Guards the negative cases above: the crafter alone does not make certificates unreadable.
    odd = issue_odd_certificate(
        pki_ca, tmp_path, "n1", uri=f"spiffe://{TEST_TRUST_DOMAIN}/node/n1", owner="alice"
    )
    identity = parse_identity(odd.certificate, TEST_TRUST_DOMAIN)
    assert identity is not None
    assert identity.owner == "alice"


def test_validity_is_not_its_business(pki_ca: CertificateAuthority, tmp_path: Path) -> None:
    now = datetime.now(UTC)
    expired = issue_odd_certificate(
        pki_ca, tmp_path, "old", not_before=now - timedelta(days=2), not_after=now - timedelta(1)
    )
    assert parse_identity(expired.certificate, TEST_TRUST_DOMAIN) is not None


def test_two_uri_sans(pki_ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    uris = [f"spiffe://{TEST_TRUST_DOMAIN}/client/a", f"spiffe://{TEST_TRUST_DOMAIN}/client/b"]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a")]))
        .issuer_name(pki_ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([CLIENT_AUTH]), critical=False)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]),
            critical=False,
        )
        .sign(pki_ca.signing_key, hashes.SHA256())
    )
    assert parse_identity(cert, TEST_TRUST_DOMAIN) is None
