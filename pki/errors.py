"""Errors raised by the CA. Every message is one line, safe to show to the operator."""

from __future__ import annotations

__all__ = [
    "InvalidInputError",
    "IssuanceRefusedError",
    "NotFoundError",
    "NotInitializedError",
    "PassphraseError",
    "PkiError",
    "StoreError",
]


class PkiError(Exception):
    """Base class: the CA refused or could not complete an operation."""


class InvalidInputError(PkiError, ValueError):
    """A name, reason, address, lifetime or CSR is malformed (a usage error)."""


class NotInitializedError(PkiError):
    """The directory holds no CA."""


class PassphraseError(PkiError):
    """The CA key is encrypted and the passphrase is missing or wrong."""


class IssuanceRefusedError(PkiError):
    """Issuing would break a rule: the name is revoked, already valid, or owned by someone else."""


class NotFoundError(PkiError):
    """No certificate matches the given name or serial."""


class StoreError(PkiError):
    """The certificate store cannot be read or written; callers must treat state as unknown."""
