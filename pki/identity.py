"""Identities carried by our certificates: kinds, names, SPIFFE IDs, and reading them back.

A leaf certificate names its holder in exactly one URI SAN,
``spiffe://<trust-domain>/<kind>/<name>``. A node certificate also names its owner, the
user who contributed the machine, as the subject's ``UID`` attribute (RFC 4519 ``uid``,
OID 0.9.2342.19200300.100.1.1): it is signed with the rest of the certificate, shows up
plainly in ``openssl x509 -text`` and keeps the SPIFFE rule of a single URI SAN.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pki.errors import InvalidInputError

__all__ = [
    "CertificateKind",
    "Identity",
    "parse_identity",
    "spiffe_id",
    "validate_name",
    "validate_trust_domain",
    "validate_username",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_USERNAME = re.compile(r"[a-z0-9][a-z0-9_.-]{2,31}")
_TRUST_DOMAIN = re.compile(r"[a-z0-9](?:[a-z0-9._-]{0,253}[a-z0-9])?")


class CertificateKind(enum.StrEnum):
    SERVER = "server"
    NODE = "node"
    CLIENT = "client"

    @classmethod
    def parse(cls, value: CertificateKind | str) -> CertificateKind:
        try:
            return cls(value)
        except ValueError:
            raise InvalidInputError(
                f"unknown certificate kind {value!r} (expected server, node or client)"
            ) from None

    @property
    def extended_key_usage(self) -> x509.ObjectIdentifier:
        if self is CertificateKind.SERVER:
            return ExtendedKeyUsageOID.SERVER_AUTH
        return ExtendedKeyUsageOID.CLIENT_AUTH


_KINDS = frozenset(kind.value for kind in CertificateKind)


def validate_name(name: str) -> str:
    """A server name, node id or client name; also the file name of the issued files."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidInputError(
            f"invalid name {name!r}: use 1-63 of a-z 0-9 . _ -, starting with a letter or digit"
        )
    return name


def validate_username(username: str) -> str:
    if not isinstance(username, str) or not _USERNAME.fullmatch(username):
        raise InvalidInputError(
            f"invalid username {username!r}: use 3-32 of a-z 0-9 . _ -, "
            "starting with a letter or digit"
        )
    return username


def validate_trust_domain(trust_domain: str) -> str:
    if not isinstance(trust_domain, str) or not _TRUST_DOMAIN.fullmatch(trust_domain):
        raise InvalidInputError(
            f"invalid trust domain {trust_domain!r}: use lowercase letters, digits, . _ -"
        )
    return trust_domain


def spiffe_id(trust_domain: str, kind: CertificateKind, name: str) -> str:
    return f"spiffe://{trust_domain}/{kind.value}/{name}"


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a certificate speaks for. ``owner`` is set for node certificates only."""

    kind: CertificateKind
    name: str
    spiffe_id: str
    owner: str | None
    serial: int
    not_after: datetime


def parse_identity(certificate: x509.Certificate, trust_domain: str) -> Identity | None:
    """The identity ``certificate`` carries in ``trust_domain``, or None if it carries none.

    None unless the certificate is a leaf with exactly one URI SAN naming a server, node or
    client of this trust domain, an extended key usage matching that kind (and not the
    other TLS usage), and, for a node, exactly one valid owner. This does not check the
    signature, the chain or the validity dates: the TLS handshake does that.
    """
    try:
        return _parse_identity(certificate, trust_domain)
    except (
        ValueError,
        x509.ExtensionNotFound,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ):
        # Missing, malformed or duplicated extensions: such a certificate names nobody.
        return None


def _parse_identity(certificate: x509.Certificate, trust_domain: str) -> Identity | None:
    extensions = certificate.extensions
    try:
        if extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return None
    except x509.ExtensionNotFound:
        pass

    san = extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        return None
    prefix = f"spiffe://{trust_domain}/"
    if not uris[0].startswith(prefix):
        return None
    parts = uris[0][len(prefix) :].split("/")
    if len(parts) != 2 or parts[0] not in _KINDS:
        return None
    kind, name = CertificateKind(parts[0]), parts[1]
    if not _NAME.fullmatch(name):
        return None

    usages = set(extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    tls_usages = {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    if usages & tls_usages != {kind.extended_key_usage}:
        return None

    owner: str | None = None
    if kind is CertificateKind.NODE:
        owners = certificate.subject.get_attributes_for_oid(NameOID.USER_ID)
        if len(owners) != 1:
            return None
        value = owners[0].value
        if not isinstance(value, str) or not _USERNAME.fullmatch(value):
            return None
        owner = value

    return Identity(
        kind=kind,
        name=name,
        spiffe_id=uris[0],
        owner=owner,
        serial=certificate.serial_number,
        not_after=certificate.not_valid_after_utc,
    )
