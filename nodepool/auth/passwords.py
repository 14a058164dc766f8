"""Passwords (argon2id) and the rules for usernames, passwords and e-mail addresses.

Every ``validate_*`` function raises ``InvalidArgumentError`` with a message that is safe to
show the caller and never repeats the value that was refused.
"""

from __future__ import annotations

import re
import secrets
from typing import Final

import argon2
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import RFC_9106_LOW_MEMORY

from nodepool.errors import InvalidArgumentError

__all__ = [
    "COMMON_PASSWORDS",
    "MAX_PASSWORD_LENGTH",
    "MIN_PASSWORD_LENGTH",
    "RESERVED_SIGNUP_NAMES",
    "RESERVED_USERNAMES",
    "PasswordHasher",
    "check_signup_username",
    "validate_email",
    "validate_password",
    "validate_username",
]

# --------------------------------------------------------------------------- hashing


class PasswordHasher:
    """argon2id with explicit parameters.

    The defaults are RFC 9106's second recommended profile ("low memory": t=3, m=64 MiB,
    p=4), written out here rather than taken from argon2-cffi's defaults so that a library
    upgrade cannot silently change them; when they do change on purpose, ``needs_rehash``
    reports the old hashes and the caller rehashes them at the next successful login.
    """

    __slots__ = ("_dummy_hash", "_hasher")

    def __init__(
        self,
        *,
        time_cost: int = RFC_9106_LOW_MEMORY.time_cost,
        memory_cost: int = RFC_9106_LOW_MEMORY.memory_cost,
        parallelism: int = RFC_9106_LOW_MEMORY.parallelism,
        hash_len: int = RFC_9106_LOW_MEMORY.hash_len,
        salt_len: int = RFC_9106_LOW_MEMORY.salt_len,
    ) -> None:
        self._hasher = argon2.PasswordHasher(
            time_cost=time_cost,
            memory_cost=memory_cost,
            parallelism=parallelism,
            hash_len=hash_len,
            salt_len=salt_len,
            type=argon2.Type.ID,
        )
        # Made once with the same parameters, so verifying against it costs what verifying
        # a real user's hash costs. Its password is random and never kept.
        self._dummy_hash = self._hasher.hash(secrets.token_urlsafe(24))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, stored_hash: str, password: str) -> bool:
        """True only on a match; any mismatch, corrupt hash or unencodable input is False."""
        try:
            return self._hasher.verify(stored_hash, password)
        except (VerificationError, InvalidHashError, UnicodeError):
            return False

    def needs_rehash(self, stored_hash: str) -> bool:
        try:
            return self._hasher.check_needs_rehash(stored_hash)
        except (InvalidHashError, UnicodeError):
            # Unreadable: it cannot be the current format. (It will not verify either.)
            return True

    def dummy_verify(self, password: str) -> None:
        """Burns the time of one verify, for logins naming a user that does not exist.

        Without it a failed login would answer faster for unknown usernames than for wrong
        passwords, and the difference would tell which usernames exist.
        """
        self.verify(self._dummy_hash, password)


# --------------------------------------------------------------------------- passwords

MIN_PASSWORD_LENGTH: Final = 12
MAX_PASSWORD_LENGTH: Final = 1024

# Compared case-insensitively. Only entries of at least MIN_PASSWORD_LENGTH characters
# matter (shorter ones fail the length rule first). Not a substitute for rate limiting,
# just the first guesses of every credential-stuffing list.
COMMON_PASSWORDS: Final = frozenset(
    {
        "password1234",
        "password12345",
        "password123456",
        "passwordpassword",
        "123456789012",
        "1234567890123",
        "12345678901234",
        "123123123123",
        "qwertyuiopas",
        "qwertyuiop12",
        "qwerty123456",
        "qwertyqwerty",
        "1q2w3e4r5t6y",
        "1qaz2wsx3edc",
        "qazwsxedcrfv",
        "zaq12wsxcde3",
        "asdfghjkl123",
        "abcdefghijkl",
        "abc123abc123",
        "iloveyou1234",
        "letmein12345",
        "welcome12345",
        "changeme1234",
        "admin1234567",
        "adminadmin12",
        "nodepool1234",
    }
)


def validate_password(password: str, *, username: str) -> None:
    if not isinstance(password, str):
        raise InvalidArgumentError("password must be a string")
    # len() counts code points, so "ééé..." is as long as "eee...", whatever its UTF-8 size.
    if not MIN_PASSWORD_LENGTH <= len(password) <= MAX_PASSWORD_LENGTH:
        raise InvalidArgumentError(
            f"password must be {MIN_PASSWORD_LENGTH} to {MAX_PASSWORD_LENGTH} characters long"
        )
    try:
        password.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates cannot be hashed
        raise InvalidArgumentError("password contains invalid characters") from None
    folded = password.casefold()
    if username and username.casefold() in folded:
        raise InvalidArgumentError("password must not contain the username")
    if len(set(password)) == 1:
        raise InvalidArgumentError("password must not be one character repeated")
    if folded in COMMON_PASSWORDS:
        raise InvalidArgumentError("password is too common; choose another")


# --------------------------------------------------------------------------- usernames

# Usernames are unique case-insensitively: input may be mixed case, the stored and
# compared form is lowercase. ASCII only, so no two different-looking names collide.
_USERNAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}")
# Names that would read as the system itself in audit logs and messages.
RESERVED_USERNAMES: Final = frozenset({"root", "system", "nodepool", "anonymous"})
# Names a remote sign-up may not take: a stranger called "admin" or "security" could pass
# for staff in messages and audit listings. They stay usable for accounts made on the
# server host (``nodepool user create-admin admin``). Compared with separators and
# trailing digits removed, so "adm.in", "Support_" and "root2" are refused too.
RESERVED_SIGNUP_NAMES: Final = RESERVED_USERNAMES | frozenset(
    {
        "admin",
        "administrator",
        "admins",
        "sysadmin",
        "superuser",
        "support",
        "security",
        "operator",
        "staff",
        "moderator",
        "owner",
        "hivemind",
        "postmaster",
        "hostmaster",
        "webmaster",
        "abuse",
        "noreply",
        "daemon",
        "server",
        "ca",
        "pki",
    }
)


def check_signup_username(username: str) -> str:
    """:func:`validate_username`, and none of :data:`RESERVED_SIGNUP_NAMES`."""
    normalised = validate_username(username)
    skeleton = re.sub(r"[0-9]+$", "", re.sub(r"[_.-]", "", normalised))
    if normalised in RESERVED_SIGNUP_NAMES or skeleton in RESERVED_SIGNUP_NAMES:
        raise InvalidArgumentError("this username is reserved")
    return normalised


def validate_username(username: str) -> str:
    """Returns the normalised (lowercase) username."""
    # fullmatch, not match + "$": "$" would accept a trailing newline.
    if not isinstance(username, str) or not _USERNAME_RE.fullmatch(username):
        raise InvalidArgumentError(
            "username must be 3 to 32 characters: letters, digits, '_', '.', '-', "
            "starting with a letter or digit"
        )
    normalised = username.lower()
    if normalised in RESERVED_USERNAMES:
        raise InvalidArgumentError("this username is reserved")
    return normalised


# --------------------------------------------------------------------------- e-mail

_MAX_EMAIL: Final = 254  # RFC 5321 path limit
# Conservative on purpose: RFC 5322 "atext" dot-atoms only (no quoted local parts, no
# comments, no IP literals) and ASCII domains (IDNs arrive as xn-- punycode).
_LOCAL_RE: Final = re.compile(
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
)
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def validate_email(email: str) -> str:
    """Returns ``""`` for an empty address, else the address with its domain lowercased."""
    if not isinstance(email, str):
        raise InvalidArgumentError("e-mail address must be a string")
    if email == "":
        return ""
    if len(email) > _MAX_EMAIL or email.count("@") != 1:
        raise InvalidArgumentError("invalid e-mail address")
    local, domain = email.split("@")
    labels = domain.split(".")
    if (
        len(local) > 64
        or not _LOCAL_RE.fullmatch(local)
        or len(labels) < 2
        or not all(_LABEL_RE.fullmatch(label) for label in labels)
    ):
        raise InvalidArgumentError("invalid e-mail address")
    return f"{local}@{domain.lower()}"
