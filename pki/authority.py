"""The certificate authority: creates the CA, issues, renews and revokes, publishes the CRL.

A CA directory holds ``ca.crt``, ``ca.key`` (0600, optionally encrypted) and the record
store ``pki.db`` (0600); the directory itself is 0700. The trust domain is the CA
certificate's own URI SAN (``spiffe://<trust-domain>``), so ``ca.crt`` is self-describing.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
import secrets
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Self, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.pbkdf2 import PBKDF2HMAC
from cryptography.x509.oid import NameOID

from pki.errors import (
    InvalidInputError,
    IssuanceRefusedError,
    NotFoundError,
    NotInitializedError,
    PassphraseError,
    PkiError,
)
from pki.identity import (
    CertificateKind,
    spiffe_id,
    validate_name,
    validate_trust_domain,
    validate_username,
)
from pki.store import (
    STORE_FILE,
    CertificateRecord,
    CertificateStatus,
    CertificateStore,
    format_serial,
)

__all__ = [
    "CA_LIFETIME",
    "DEFAULT_LIFETIMES",
    "DEFAULT_TRUST_DOMAIN",
    "REVOCATION_REASONS",
    "CertificateAuthority",
    "IssuedCertificate",
    "parse_revocation_reason",
]

DEFAULT_TRUST_DOMAIN = "nodepool.local"
CA_LIFETIME = timedelta(days=3650)
DEFAULT_LIFETIMES: dict[CertificateKind, timedelta] = {
    # Mozilla's root store policy caps TLS server certificates at 366 days (Apple and
    # Chrome are moving lower); rotation needs no restart, so a shorter life costs nothing.
    CertificateKind.SERVER: timedelta(days=366),
    CertificateKind.NODE: timedelta(days=7),
    CertificateKind.CLIENT: timedelta(days=90),
}
# PBKDF2-HMAC-SHA256 rounds for an encrypted CA key: OWASP's current recommendation
# (Password Storage Cheat Sheet, 2023+). BestAvailableEncryption uses 2,048, which a GPU
# tries by the million per second. Loading a key of any older setting still works: the
# rounds are stored in the PKCS#8 envelope.
CA_KEY_KDF_ROUNDS = 600_000
CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

# Backdating covers verifiers whose clocks run a little behind the CA's.
_BACKDATE = timedelta(minutes=1)

# RFC 5280 reason names; removeFromCRL and aACompromise have no use in this CA.
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
}
_REASON_LOOKUP = {name.lower(): name for name in REVOCATION_REASONS}

_DNS_NAME = re.compile(
    r"(?=.{1,253}\Z)[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
)

_SigningKey: TypeAlias = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey
_LeafPublicKey: TypeAlias = ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


def parse_revocation_reason(reason: str) -> str:
    """The RFC 5280 name of ``reason``; accepts any case and snake or kebab spellings."""
    canonical = _REASON_LOOKUP.get(reason.replace("_", "").replace("-", "").lower())
    if canonical is None:
        raise InvalidInputError(
            f"unknown revocation reason {reason!r} (one of: {', '.join(REVOCATION_REASONS)})"
        )
    return canonical


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    """The result of :meth:`CertificateAuthority.issue`: files written and what they hold."""

    kind: CertificateKind
    name: str
    owner: str | None
    serial: int
    spiffe_id: str
    not_before: datetime
    not_after: datetime
    cert_path: Path
    key_path: Path
    ca_path: Path


class CertificateAuthority:
    """A CA directory opened for use. Build with :meth:`init` or :meth:`open`; close when done."""

    def __init__(
        self,
        directory: Path,
        certificate: x509.Certificate,
        trust_domain: str,
        store: CertificateStore,
        signing_key: _SigningKey | None,
    ) -> None:
        self.directory = directory
        self.certificate = certificate
        self.trust_domain = trust_domain
        self.store = store
        self._signing_key = signing_key
        self._certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
        self._key_identifier = x509.SubjectKeyIdentifier.from_public_key(certificate.public_key())

    # -- lifecycle -------------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        directory: Path,
        trust_domain: str = DEFAULT_TRUST_DOMAIN,
        passphrase: bytes | None = None,
        *,
        store: CertificateStore | None = None,
    ) -> Self:
        """Creates a new CA in ``directory`` (made 0700); refuses if a CA is already there.

        ``passphrase`` encrypts the CA key. ``store`` replaces the default ``pki.db``, for
        instance with a shared PostgreSQL store.
        """
        directory = Path(directory)
        validate_trust_domain(trust_domain)
        if passphrase is not None and not passphrase:
            raise InvalidInputError("the CA passphrase is empty")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        except OSError as exc:
            raise PkiError(f"cannot create {directory}: {exc.strerror}") from None
        for file in (CA_CERT_FILE, CA_KEY_FILE, STORE_FILE):
            if (directory / file).exists():
                raise PkiError(f"a CA already exists in {directory}")

        key = ec.generate_private_key(ec.SECP256R1())
        certificate = _build_ca_certificate(key, trust_domain)
        key_pem = (
            encrypt_ca_key(key, passphrase)
            if passphrase
            else key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        created: list[Path] = []
        own_store = store is None
        try:
            if store is None:
                store = CertificateStore.create(directory)
                created += [directory / f"{STORE_FILE}{suffix}" for suffix in ("", "-wal", "-shm")]
            else:
                store.create_schema()
            _write_new_file(directory / CA_KEY_FILE, key_pem, 0o600)
            created.append(directory / CA_KEY_FILE)
            # ca.crt last: its presence is what makes the directory a CA.
            _write_new_file(
                directory / CA_CERT_FILE, certificate.public_bytes(serialization.Encoding.PEM)
            )
        except BaseException as exc:
            if own_store and store is not None:
                store.close()
            for path in created:
                path.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise PkiError(f"cannot write the CA into {directory}: {exc.strerror}") from None
            raise
        return cls(directory, certificate, trust_domain, store, key)

    @classmethod
    def open(
        cls,
        directory: Path,
        passphrase: bytes | None = None,
        *,
        store: CertificateStore | None = None,
    ) -> Self:
        """Opens the CA in ``directory``.

        An encrypted CA key opened without a passphrase stays locked: listing and revoking
        work, signing raises :class:`PassphraseError`. A wrong passphrase fails here.
        """
        directory = Path(directory)
        cert_path, key_path = directory / CA_CERT_FILE, directory / CA_KEY_FILE
        if not cert_path.is_file() or not key_path.is_file():
            raise NotInitializedError(f"no CA in {directory} (run nodepool-pki init)")
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key_pem = key_path.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read the CA in {directory}: {exc.strerror}") from None
        except ValueError:
            raise PkiError(f"the CA certificate in {directory} is damaged") from None
        trust_domain = _ca_trust_domain(certificate)
        if trust_domain is None:
            raise PkiError(f"the CA certificate in {directory} names no trust domain")

        signing_key = _load_signing_key(key_pem, passphrase)
        if signing_key is not None and signing_key.public_key() != certificate.public_key():
            raise PkiError(f"the CA key in {directory} does not match its certificate")
        if store is None:
            store = CertificateStore.open(directory)
        return cls(directory, certificate, trust_domain, store, signing_key)

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def signing_key(self) -> _SigningKey:
        """The CA private key; raises :class:`PassphraseError` while the key is locked."""
        if self._signing_key is None:
            raise PassphraseError(
                "the CA key is encrypted: set NODEPOOL_CA_PASSPHRASE or NODEPOOL_CA_PASSPHRASE_FILE"
            )
        return self._signing_key

    @property
    def certificate_pem(self) -> bytes:
        return self._certificate_pem

    # -- issuing ---------------------------------------------------------------------------

    def issue(
        self,
        kind: CertificateKind | str,
        name: str,
        out_dir: Path,
        *,
        owner: str | None = None,
        dns_names: Iterable[str] = (),
        ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
        lifetime: timedelta | None = None,
        not_before: datetime | None = None,
        allow_reissue: bool = False,
    ) -> IssuedCertificate:
        """Generates a key pair and issues a certificate for it, into ``out_dir``.

        Writes ``NAME.crt``, ``NAME.key`` (0600) and ``ca.crt``; ``out_dir`` is created
        0700 when missing. Names are unique across kinds. Refused without
        ``allow_reissue`` when the name was ever revoked, still has a valid certificate,
        or (for a node) belongs to another owner.
        """
        kind = CertificateKind.parse(kind)
        validate_name(name)
        out_dir = Path(out_dir)
        # OUT/ca.crt is written too, and leaf keys have no business beside the CA key.
        if name == "ca":
            raise InvalidInputError("'ca' is reserved: it would overwrite ca.crt")
        if out_dir.resolve() == self.directory.resolve():
            raise InvalidInputError("the output directory must not be the CA directory")
        if kind is CertificateKind.NODE:
            if owner is None:
                raise InvalidInputError("a node certificate needs an owner")
            validate_username(owner)
        elif owner is not None:
            raise InvalidInputError("only node certificates have an owner")
        sans = _alternative_names(kind, dns_names, ip_addresses)
        lifetime = _lifetime(kind, lifetime)
        signing_key = self.signing_key

        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        now = _now()
        start = not_before if not_before is not None else now - _BACKDATE
        if start.tzinfo is None:
            raise InvalidInputError("not_before must be timezone-aware")
        staged: _StagedFiles | None = None
        try:
            with self.store.transaction() as tx:
                _check_issuable(tx.records(name=name), kind, name, owner, allow_reissue, now)
                certificate = self._sign_leaf(
                    signing_key, kind, name, owner, key.public_key(), sans, start, lifetime
                )
                record = self._record(certificate, kind, name, owner, now)
                tx.add(record)
                staged = _StagedFiles(out_dir)
                staged.add(f"{name}.crt", certificate.public_bytes(serialization.Encoding.PEM))
                staged.add(f"{name}.key", key_pem, mode=0o600)
                staged.add(CA_CERT_FILE, self._certificate_pem)
            staged.publish()
        except BaseException:
            if staged is not None:
                staged.discard()
            raise
        return IssuedCertificate(
            kind=kind,
            name=name,
            owner=owner,
            serial=record.serial,
            spiffe_id=record.spiffe_id,
            not_before=record.not_before,
            not_after=record.not_after,
            cert_path=out_dir / f"{name}.crt",
            key_path=out_dir / f"{name}.key",
            ca_path=out_dir / CA_CERT_FILE,
        )

    def sign_csr(
        self,
        csr_pem: bytes,
        *,
        expected_kind: CertificateKind | str,
        expected_name: str,
        lifetime: timedelta | None = None,
        presented_serial: int | None = None,
    ) -> bytes:
        """Renews a node or client certificate from a CSR made on the holder's machine.

        The caller has authenticated the holder of a valid certificate for
        ``expected_kind``/``expected_name``; pass its serial as ``presented_serial`` to have
        that very certificate checked too. The CSR must be self-signed correctly and ask
        for exactly that identity (its one URI SAN; a CN, if any, equal to the name). The
        store must hold a valid, unrevoked certificate for it, and no revocation of the
        name since it was last issued: a revocation stops renewal until an administrator
        issues the name again. Only the public key is taken from the CSR; the owner comes
        from the records. Returns the new certificate in PEM.
        """
        kind = CertificateKind.parse(expected_kind)
        if kind is CertificateKind.SERVER:
            raise InvalidInputError("server certificates are renewed with nodepool-pki issue")
        name = validate_name(expected_name)
        lifetime = _lifetime(kind, lifetime)
        signing_key = self.signing_key
        public_key = _csr_public_key(csr_pem, spiffe_id(self.trust_domain, kind, name), name)

        now = _now()
        with self.store.transaction() as tx:
            records = tx.records(name=name)
            if _renewal_banned(records):
                raise IssuanceRefusedError(f"{name} has been revoked; renewal refused")
            current = [
                record
                for record in records
                if record.kind is kind
                and record.status(now) is CertificateStatus.VALID
                and presented_serial in (None, record.serial)
            ]
            if not current:
                raise IssuanceRefusedError(f"no valid {kind} certificate for {name} to renew")
            owner = current[-1].owner
            certificate = self._sign_leaf(
                signing_key, kind, name, owner, public_key, [], now - _BACKDATE, lifetime
            )
            tx.add(self._record(certificate, kind, name, owner, now))
        return certificate.public_bytes(serialization.Encoding.PEM)

    # -- revocation ------------------------------------------------------------------------

    def revoke(
        self,
        *,
        name: str | None = None,
        serial: int | None = None,
        reason: str = "unspecified",
        actor: str,
    ) -> list[CertificateRecord]:
        """Revokes every unrevoked certificate named ``name``, or the one with ``serial``.

        Returns the records revoked now; an empty list means all were already revoked.
        Raises :class:`NotFoundError` when nothing matches.
        """
        if (name is None) == (serial is None):
            raise InvalidInputError("give either a name or a serial to revoke")
        reason = parse_revocation_reason(reason)
        if not actor or not actor.strip():
            raise InvalidInputError("a revocation needs an actor")
        if name is not None:
            validate_name(name)
        with self.store.transaction() as tx:
            records = tx.records(name=name, serial=serial)
            if not records:
                what = f"named {name}" if name is not None else f"with serial {_hex(serial)}"
                raise NotFoundError(f"no certificate {what}")
            return tx.revoke(records, reason=reason, at=_now(), actor=actor)

    def write_crl(self, path: Path, lifetime: timedelta = timedelta(days=7)) -> None:
        """Writes a signed CRL (PEM, mode 0644) of every revoked certificate to ``path``.

        Per RFC 5280 the reason code is left out for "unspecified".
        """
        if lifetime <= timedelta(0):
            raise InvalidInputError("the CRL lifetime must be positive")
        signing_key = self.signing_key
        now = _now().replace(microsecond=0)
        with self.store.transaction() as tx:
            number = tx.next_crl_number()
            revoked = [record for record in tx.records() if record.revoked_at is not None]
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now)
            .next_update(now + lifetime)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self._key_identifier
                ),
                critical=False,
            )
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for record in revoked:
            assert record.revoked_at is not None
            entry = (
                x509.RevokedCertificateBuilder()
                .serial_number(record.serial)
                .revocation_date(record.revoked_at.replace(microsecond=0))
            )
            flag = REVOCATION_REASONS.get(record.revocation_reason or "unspecified")
            if flag is not None and flag is not x509.ReasonFlags.unspecified:
                entry = entry.add_extension(x509.CRLReason(flag), critical=False)
            builder = builder.add_revoked_certificate(entry.build())
        crl = builder.sign(signing_key, _hash_for(signing_key))
        staged = _StagedFiles(Path(path).parent, create_mode=None)
        try:
            staged.add(Path(path).name, crl.public_bytes(serialization.Encoding.PEM))
            staged.publish()
        except BaseException:
            staged.discard()
            raise

    def list_certificates(self) -> list[CertificateRecord]:
        """Every issued certificate, in issue order."""
        return self.store.records()

    # -- internals -------------------------------------------------------------------------

    def _sign_leaf(
        self,
        signing_key: _SigningKey,
        kind: CertificateKind,
        name: str,
        owner: str | None,
        public_key: _LeafPublicKey,
        sans: Sequence[x509.GeneralName],
        not_before: datetime,
        lifetime: timedelta,
    ) -> x509.Certificate:
        not_before = not_before.astimezone(UTC).replace(microsecond=0)
        # A leaf never outlives the CA that vouches for it.
        not_after = min(not_before + lifetime, self.certificate.not_valid_after_utc)
        if not_after <= not_before:
            raise IssuanceRefusedError("the CA certificate expires before this one would start")
        attributes = [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.trust_domain),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind.value),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
        if owner is not None:
            attributes.append(x509.NameAttribute(NameOID.USER_ID, owner))
        alternative_names = [
            x509.UniformResourceIdentifier(spiffe_id(self.trust_domain, kind, name)),
            *sans,
        ]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(attributes))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(_new_serial())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_leaf_key_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([kind.extended_key_usage]), critical=False)
            .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    self._key_identifier
                ),
                critical=False,
            )
        )
        return builder.sign(signing_key, _hash_for(signing_key))

    def _record(
        self,
        certificate: x509.Certificate,
        kind: CertificateKind,
        name: str,
        owner: str | None,
        issued_at: datetime,
    ) -> CertificateRecord:
        return CertificateRecord(
            serial=certificate.serial_number,
            kind=kind,
            name=name,
            owner=owner,
            spiffe_id=spiffe_id(self.trust_domain, kind, name),
            not_before=certificate.not_valid_before_utc,
            not_after=certificate.not_valid_after_utc,
            issued_at=issued_at,
            fingerprint_sha256=certificate.fingerprint(hashes.SHA256()).hex(),
        )


# -- helpers ---------------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


def _hex(serial: int | None) -> str:
    return format_serial(serial) if serial is not None else "?"


def _new_serial() -> int:
    # 127 random bits with the top bit set: positive, fixed length, well inside RFC 5280's
    # 20 octets, and unpredictable (the CA/B Forum asks for at least 64 random bits).
    return secrets.randbits(127) | (1 << 126)


def _hash_for(key: _SigningKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _leaf_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _lifetime(kind: CertificateKind, lifetime: timedelta | None) -> timedelta:
    if lifetime is None:
        return DEFAULT_LIFETIMES[kind]
    if lifetime <= timedelta(0):
        raise InvalidInputError("the certificate lifetime must be positive")
    return lifetime


def _alternative_names(
    kind: CertificateKind,
    dns_names: Iterable[str],
    ip_addresses: Iterable[str | ipaddress.IPv4Address | ipaddress.IPv6Address],
) -> list[x509.GeneralName]:
    dns_names, ip_addresses = list(dns_names), list(ip_addresses)
    if kind is not CertificateKind.SERVER:
        if dns_names or ip_addresses:
            raise InvalidInputError("only server certificates carry DNS names or IP addresses")
        return []
    names: list[x509.GeneralName] = []
    for dns_name in dict.fromkeys(dns_names):
        if not isinstance(dns_name, str) or not _DNS_NAME.fullmatch(dns_name.lower()):
            raise InvalidInputError(f"invalid DNS name {dns_name!r}")
        names.append(x509.DNSName(dns_name.lower()))
    for address in dict.fromkeys(ip_addresses):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise InvalidInputError(f"invalid IP address {address!r}") from None
    return names


def _check_issuable(
    records: list[CertificateRecord],
    kind: CertificateKind,
    name: str,
    owner: str | None,
    allow_reissue: bool,
    now: datetime,
) -> None:
    # Names are unique across kinds: revoke NAME and OUT/NAME.crt address them by name alone.
    for record in records:
        if record.kind is not kind:
            raise IssuanceRefusedError(f"{name} is already the name of a {record.kind} certificate")
    if allow_reissue:
        return
    if any(record.revoked for record in records):
        raise IssuanceRefusedError(f"{name} was revoked; pass --allow-reissue to issue it again")
    for record in records:
        if record.status(now) in (CertificateStatus.VALID, CertificateStatus.NOT_YET_VALID):
            raise IssuanceRefusedError(
                f"{name} already has a valid certificate (serial {format_serial(record.serial)}); "
                "pass --allow-reissue to issue another"
            )
    if kind is CertificateKind.NODE:
        for record in records:
            if record.owner != owner:
                raise IssuanceRefusedError(
                    f"node {name} belongs to {record.owner}; pass --allow-reissue to reassign it"
                )


def _renewal_banned(records: list[CertificateRecord]) -> bool:
    """True when a certificate of the name was revoked after its last unrevoked issue."""
    revocations = [record.revoked_at for record in records if record.revoked_at is not None]
    if not revocations:
        return False
    last_revocation = max(revocations)
    return not any(
        record.revoked_at is None and record.issued_at > last_revocation for record in records
    )


def _csr_public_key(csr_pem: bytes, expected_uri: str, expected_name: str) -> _LeafPublicKey:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
        signature_ok = csr.is_signature_valid
        public_key = csr.public_key()
        try:
            san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        except x509.ExtensionNotFound:
            raise InvalidInputError("the CSR requests no identity (URI SAN)") from None
        common_names = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except ValueError:
        raise InvalidInputError("malformed certificate signing request") from None
    if not signature_ok:
        raise InvalidInputError("the CSR signature is invalid")
    if list(san) != [x509.UniformResourceIdentifier(expected_uri)]:
        raise InvalidInputError(f"the CSR must request exactly the identity {expected_uri}")
    if any(attribute.value != expected_name for attribute in common_names):
        raise InvalidInputError(f"the CSR common name must be {expected_name}")
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if not isinstance(public_key.curve, ec.SECP256R1 | ec.SECP384R1):
            raise InvalidInputError("unsupported CSR key: use ECDSA P-256 or P-384, or Ed25519")
        return public_key
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        return public_key
    raise InvalidInputError("unsupported CSR key: use ECDSA P-256 or P-384, or Ed25519")


def _build_ca_certificate(key: ec.EllipticCurvePrivateKey, trust_domain: str) -> x509.Certificate:
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
            x509.NameAttribute(NameOID.COMMON_NAME, f"Node Pool CA {trust_domain}"),
        ]
    )
    now = _now().replace(microsecond=0)
    public_key = key.public_key()
    key_identifier = x509.SubjectKeyIdentifier.from_public_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public_key)
        .serial_number(_new_serial())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(now + CA_LIFETIME)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(key_identifier, critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(key_identifier),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def _ca_trust_domain(certificate: x509.Certificate) -> str | None:
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        trust_domain = uri.removeprefix("spiffe://")
        if trust_domain != uri:
            try:
                return validate_trust_domain(trust_domain)
            except InvalidInputError:
                return None
    return None


def _der(tag: int, content: bytes) -> bytes:
    length = len(content)
    if length < 0x80:
        return bytes([tag, length]) + content
    size = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def _der_oid(dotted: str) -> bytes:
    first, second, *rest = (int(part) for part in dotted.split("."))
    body = bytearray([40 * first + second])
    for arc in rest:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        body.extend(reversed(chunk))
    return _der(0x06, bytes(body))


def _der_int(value: int) -> bytes:
    return _der(0x02, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def encrypt_ca_key(key: _SigningKey, passphrase: bytes) -> bytes:
    """``key`` as an encrypted PKCS#8 PEM: PBES2, PBKDF2-HMAC-SHA256 at
    :data:`CA_KEY_KDF_ROUNDS` rounds, AES-256-CBC.

    ``BestAvailableEncryption`` fixes PBKDF2 at 2,048 rounds and the library offers no
    other setting for PKCS#8, so the (small, standard) envelope is built here. Every
    PKCS#8 reader, OpenSSL's included, opens it with the passphrase.
    """
    plain = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    salt, iv = os.urandom(16), os.urandom(16)
    derived = PBKDF2HMAC(
        algorithm=hashes.SHA256(), length=32, salt=salt, iterations=CA_KEY_KDF_ROUNDS
    ).derive(passphrase)
    padder = padding.PKCS7(128).padder()
    padded = padder.update(plain) + padder.finalize()
    encryptor = Cipher(algorithms.AES(derived), modes.CBC(iv)).encryptor()
    encrypted = encryptor.update(padded) + encryptor.finalize()
    sequence = 0x30
    pbkdf2 = _der(
        sequence,
        _der_oid("1.2.840.113549.1.5.12")
        + _der(
            sequence,
            _der(0x04, salt)
            + _der_int(CA_KEY_KDF_ROUNDS)
            + _der(sequence, _der_oid("1.2.840.113549.2.9") + b"\x05\x00"),  # hmacWithSHA256
        ),
    )
    aes = _der(sequence, _der_oid("2.16.840.1.101.3.4.1.42") + _der(0x04, iv))
    pbes2 = _der(sequence, _der_oid("1.2.840.113549.1.5.13") + _der(sequence, pbkdf2 + aes))
    der = _der(sequence, pbes2 + _der(0x04, encrypted))
    body = base64.encodebytes(der).decode("ascii").replace("\n", "")
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = "-----BEGIN ENCRYPTED PRIVATE KEY-----\n" + "\n".join(lines)
    return (pem + "\n-----END ENCRYPTED PRIVATE KEY-----\n").encode("ascii")


def _load_signing_key(key_pem: bytes, passphrase: bytes | None) -> _SigningKey | None:
    encrypted = b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in key_pem
    if encrypted and passphrase is None:
        return None
    if not encrypted and passphrase is not None:
        raise PassphraseError("a CA passphrase was given but the CA key is not encrypted")
    try:
        key = serialization.load_pem_private_key(key_pem, passphrase)
    except ValueError:
        if encrypted:
            raise PassphraseError("wrong CA passphrase") from None
        raise PkiError("the CA key is damaged") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
        raise PkiError("unsupported CA key type")
    return key


def _write_new_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


class _StagedFiles:
    """Files written to temporaries first and renamed into place together.

    Nothing appears under its final name until the certificate is recorded, and a
    private key never exists, even briefly, with wider permissions than 0600.
    """

    def __init__(self, directory: Path, create_mode: int | None = 0o700) -> None:
        self._directory = directory
        self._create_mode = create_mode
        self._staged: list[tuple[Path, Path]] = []

    def add(self, filename: str, data: bytes, mode: int = 0o644) -> None:
        final = self._directory / filename
        try:
            if self._create_mode is not None and not self._directory.exists():
                self._directory.mkdir(mode=self._create_mode, parents=True)
            fd, temporary = tempfile.mkstemp(dir=self._directory, prefix=f".{filename}.")
            self._staged.append((Path(temporary), final))
            with os.fdopen(fd, "wb") as file:
                os.fchmod(file.fileno(), mode)
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
        except OSError as exc:
            raise PkiError(f"cannot write {final}: {exc.strerror}") from None

    def publish(self) -> None:
        for temporary, final in self._staged:
            try:
                os.replace(temporary, final)
            except OSError as exc:
                raise PkiError(f"cannot write {final}: {exc.strerror}") from None
        self._staged.clear()

    def discard(self) -> None:
        for temporary, _ in self._staged:
            temporary.unlink(missing_ok=True)
        self._staged.clear()
