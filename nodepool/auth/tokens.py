"""JWT sessions: signing keys on disk, issuing access/refresh tokens, verifying them.

Verification runs on every call that carries a token, so everything expensive happens once:
key files are read and parsed when the server starts (``SigningKeys.load_or_create``), and a
successfully verified access token is cached by its exact string until it expires, so a
repeat call costs a dict lookup and a clock read instead of a signature check.

Token type. Access and refresh tokens are told apart by the JOSE header ``typ``:
``at+jwt`` for access tokens (RFC 9068) and ``rt+jwt`` for refresh tokens (explicit typing,
RFC 8725 section 3.11). The header is covered by the signature, and each ``verify_*`` accepts
exactly one value, so an access token never verifies as a refresh token or the reverse.
There is deliberately no ``typ`` claim: one source of truth, nothing to disagree.

Keys. A directory holds ``<kid>.pem`` private keys (PKCS#8, Ed25519 for EdDSA or P-256 for
ES256; both kinds may coexist after switching algorithm) and a file ``current`` naming the
signing kid. Rotating writes a new key and points ``current`` at it; old keys stay so the
tokens they signed remain valid until they expire. ``SigningKeys`` itself is immutable;
the server watches the directory and hands a new set to ``TokenIssuer.use_keys`` and
``TokenVerifier.use_keys`` (``nodepool.server.auth.SigningKeyWatcher``).

Device binding. Every token carries the certificate identity (URI SAN) of the device it
was issued through, RFC 8705 style, in a confirmation claim: ``"cnf": {"spiffe_id":
"spiffe://<trust-domain>/client/<name>"}``. RFC 8705 binds to the certificate's
thumbprint (``x5t#S256``); the URI SAN is bound instead so that a renewed certificate (new
key, same identity) keeps the session. The verifier returns the bound identity and the
credential stage compares it with the caller's certificate: a token copied to another
device is refused. A token without the claim is refused as malformed.

Algorithms are pinned per key: a token is checked only with the algorithm of the key its
``kid`` names, so ``alg: none``, HMAC-with-the-public-key and cross-algorithm tricks fail.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import secrets
import stat
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, TypeAlias

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nodepool.errors import UnauthenticatedError

__all__ = [
    "ACCESS_TOKEN_TYPE",
    "MAX_TOKEN_LENGTH",
    "REFRESH_TOKEN_TYPE",
    "SUPPORTED_ALGORITHMS",
    "AccessClaims",
    "InvalidToken",
    "IssuedToken",
    "RefreshClaims",
    "SigningKeyError",
    "SigningKeys",
    "TokenConfig",
    "TokenIssuer",
    "TokenVerifier",
]

_log = logging.getLogger(__name__)

ACCESS_TOKEN_TYPE: Final = "at+jwt"  # noqa: S105 - a JOSE typ, not a secret
REFRESH_TOKEN_TYPE: Final = "rt+jwt"  # noqa: S105 - a JOSE typ, not a secret
SUPPORTED_ALGORITHMS: Final = ("EdDSA", "ES256")
# Our tokens are a few hundred characters; anything bigger is refused before any base64 or
# JSON work so an attacker cannot make the server parse megabytes per call.
MAX_TOKEN_LENGTH: Final = 8 * 1024

_CURRENT_FILE: Final = "current"
_KEY_SUFFIX: Final = ".pem"
_KID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
_MAX_TIME: Final = 2**53  # exactly representable as a float
_REQUIRED_CLAIMS: Final = ("iss", "aud", "sub", "sid", "jti", "iat", "nbf", "exp", "cnf")
# The confirmation member naming the certificate identity a token is bound to.
_CNF_DEVICE: Final = "spiffe_id"
_MAX_DEVICE_LENGTH: Final = 512

_PrivateKey: TypeAlias = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
_PublicKey: TypeAlias = Ed25519PublicKey | ec.EllipticCurvePublicKey


class InvalidToken(UnauthenticatedError):
    """A token failed verification. The message is generic on purpose.

    ``reason`` is a short fixed code ("expired", "signature", ...) for logs and metrics;
    it never contains any part of the token.
    """

    default_message = "invalid or expired token"

    def __init__(self, reason: str = "invalid") -> None:
        super().__init__()
        self.reason = reason


class SigningKeyError(Exception):
    """The key directory cannot be used (bad permissions, unreadable or foreign keys)."""


# --------------------------------------------------------------------------- keys


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str
    algorithm: str
    private_key: _PrivateKey
    public_key: _PublicKey


def _algorithm_of(private_key: object) -> str | None:
    if isinstance(private_key, Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private_key, ec.EllipticCurvePrivateKey) and isinstance(
        private_key.curve, ec.SECP256R1
    ):
        return "ES256"
    return None


def _check_algorithm(algorithm: str) -> None:
    if algorithm not in SUPPORTED_ALGORITHMS:
        raise ValueError(
            f"unsupported JWT algorithm {algorithm!r}; use one of {SUPPORTED_ALGORITHMS}"
        )


def _generate(algorithm: str) -> _PrivateKey:
    _check_algorithm(algorithm)
    if algorithm == "EdDSA":
        return Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` atomically, created 0600 from the start (no chmod race)."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _read_key_file(path: Path) -> bytes:
    # O_NOFOLLOW + fstat checks the file actually read, not whatever a path points to later.
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise SigningKeyError(f"cannot open JWT signing key {path}: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as handle:
        mode = os.fstat(handle.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise SigningKeyError(f"JWT signing key {path} is not a regular file")
        if mode & 0o077:
            raise SigningKeyError(
                f"JWT signing key {path} has mode {stat.S_IMODE(mode):04o}; it must be 0600 "
                f"(readable by its owner only): chmod 600 {path}"
            )
        return handle.read()


class SigningKeys:
    """The JWT keys of this server, loaded once at start.

    ``current_kid`` names the key new tokens are signed with; every loaded key verifies.
    """

    __slots__ = ("_current", "_keys")

    def __init__(self, keys: Mapping[str, _Key], current_kid: str) -> None:
        if current_kid not in keys:
            raise SigningKeyError(f"current JWT key {current_kid!r} is not among the loaded keys")
        self._keys = dict(keys)
        self._current = current_kid

    @property
    def current_kid(self) -> str:
        return self._current

    @property
    def current_algorithm(self) -> str:
        return self._keys[self._current].algorithm

    @property
    def kids(self) -> frozenset[str]:
        return frozenset(self._keys)

    def algorithm_of(self, kid: str) -> str:
        return self._keys[kid].algorithm

    def public_key(self, kid: str) -> _PublicKey:
        return self._keys[kid].public_key

    def _signing_key(self) -> _Key:
        return self._keys[self._current]

    @classmethod
    def in_memory(cls, algorithm: str = "EdDSA") -> SigningKeys:
        """One fresh key that never touches disk (tests, ephemeral tools)."""
        private_key = _generate(algorithm)
        kid = secrets.token_hex(8)
        key = _Key(kid, algorithm, private_key, private_key.public_key())
        return cls({kid: key}, kid)

    @classmethod
    def load(cls, directory: Path) -> SigningKeys:
        """Reads every ``<kid>.pem`` and ``current``; raises ``SigningKeyError`` if unusable."""
        keys: dict[str, _Key] = {}
        for path in sorted(directory.glob(f"*{_KEY_SUFFIX}")):
            kid = path.name[: -len(_KEY_SUFFIX)]
            if not _KID_RE.fullmatch(kid):
                raise SigningKeyError(f"JWT key file name {path.name!r} is not a valid kid")
            data = _read_key_file(path)
            try:
                private_key = serialization.load_pem_private_key(data, password=None)
            except (ValueError, TypeError):
                raise SigningKeyError(f"{path} is not an unencrypted PEM private key") from None
            algorithm = _algorithm_of(private_key)
            if algorithm is None:
                raise SigningKeyError(f"{path} is neither an Ed25519 nor a P-256 private key")
            assert isinstance(private_key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
            keys[kid] = _Key(kid, algorithm, private_key, private_key.public_key())
        current_path = directory / _CURRENT_FILE
        try:
            current = current_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            raise SigningKeyError(
                f"{current_path} is missing; it must name the signing kid"
            ) from None
        except (OSError, UnicodeDecodeError):
            raise SigningKeyError(f"cannot read {current_path}") from None
        if current not in keys:
            raise SigningKeyError(f"{current_path} names kid {current!r}, which has no key file")
        return cls(keys, current)

    @classmethod
    def load_or_create(cls, directory: Path, algorithm: str = "EdDSA") -> SigningKeys:
        """Loads the keys, first creating one if the directory holds none.

        ``algorithm`` is the algorithm new tokens should be signed with. If the current key
        is of another algorithm (the setting changed), a new key of ``algorithm`` is rotated
        in; the old keys keep verifying the tokens they signed.
        """
        _check_algorithm(algorithm)
        if not directory.exists() or not any(directory.glob(f"*{_KEY_SUFFIX}")):
            cls.rotate(directory, algorithm)
        keys = cls.load(directory)
        if keys.current_algorithm != algorithm:
            kid = cls.rotate(directory, algorithm)
            _log.info("JWT algorithm changed to %s: new signing key %s", algorithm, kid)
            keys = cls.load(directory)
        return keys

    @staticmethod
    def rotate(directory: Path, algorithm: str = "EdDSA") -> str:
        """Writes a new key, makes it current and returns its kid.

        Running servers pick it up within seconds (they watch the directory).
        """
        private_key = _generate(algorithm)
        kid = secrets.token_hex(8)
        pem = private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            if not directory.exists():
                directory.mkdir(parents=True, mode=0o700)
                # mkdir's mode is filtered by the umask; make sure it is exactly 0700.
                directory.chmod(0o700)
            _write_private(directory / f"{kid}{_KEY_SUFFIX}", pem)
            # The key file exists before ``current`` names it, so a crash in between leaves
            # the previous current key in charge rather than a dangling name.
            _write_private(directory / _CURRENT_FILE, f"{kid}\n".encode("ascii"))
        except OSError as exc:
            # Callers at startup handle SigningKeyError; a bare OSError would be a crash.
            raise SigningKeyError(
                f"cannot write a JWT signing key in {directory}: {exc.strerror or exc}"
            ) from None
        return kid

    @staticmethod
    def prune(directory: Path, keep: int) -> list[str]:
        """Deletes all but the ``keep`` newest keys (the current one is always kept).

        Tokens signed by a deleted key stop verifying at the next start: only prune keys
        older than the refresh-token lifetime. Returns the deleted kids.
        """
        if keep < 1:
            raise ValueError("keep must be at least 1")
        current = (directory / _CURRENT_FILE).read_text(encoding="ascii").strip()
        paths = sorted(
            directory.glob(f"*{_KEY_SUFFIX}"), key=lambda p: p.stat().st_mtime, reverse=True
        )
        others = [p for p in paths if p.name != f"{current}{_KEY_SUFFIX}"]
        removed: list[str] = []
        for path in others[keep - 1 :]:
            path.unlink()
            removed.append(path.name[: -len(_KEY_SUFFIX)])
        return removed


# --------------------------------------------------------------------------- issuing


@dataclass(frozen=True, slots=True)
class TokenConfig:
    issuer: str
    audience: str
    access_ttl: timedelta = timedelta(minutes=10)
    refresh_ttl: timedelta = timedelta(days=30)
    # Seconds of clock skew tolerated on exp/nbf/iat: several server instances issue and
    # verify each other's tokens, and their clocks are never exactly equal.
    leeway: float = 5.0

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("issuer and audience must be non-empty")
        if self.access_ttl <= timedelta(0) or self.refresh_ttl <= timedelta(0):
            raise ValueError("token lifetimes must be positive")
        if self.leeway < 0:
            raise ValueError("leeway must not be negative")


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime  # timezone-aware, UTC


class TokenIssuer:
    def __init__(
        self,
        keys: SigningKeys,
        config: TokenConfig,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = keys._signing_key()
        self._config = config
        self._clock = clock
        self._access_seconds = int(config.access_ttl.total_seconds())
        self._refresh_seconds = int(config.refresh_ttl.total_seconds())

    def use_keys(self, keys: SigningKeys) -> None:
        """Signs with ``keys``' current key from now on (after a rotation)."""
        self._key = keys._signing_key()

    def issue_access(self, username: str, session_id: str, *, device: str) -> IssuedToken:
        """An access token usable only through the certificate identity ``device``."""
        return self._issue(username, session_id, device, ACCESS_TOKEN_TYPE, self._access_seconds)

    def issue_refresh(self, username: str, session_id: str, *, device: str) -> IssuedToken:
        """A refresh token usable only through the certificate identity ``device``."""
        return self._issue(username, session_id, device, REFRESH_TOKEN_TYPE, self._refresh_seconds)

    def _issue(
        self, username: str, session_id: str, device: str, typ: str, ttl: int
    ) -> IssuedToken:
        if not username or not session_id or not device:
            raise ValueError("username, session_id and device must be non-empty")
        now = int(self._clock())
        jti = secrets.token_hex(16)
        payload = {
            "iss": self._config.issuer,
            "aud": self._config.audience,
            "sub": username,
            "sid": session_id,
            "jti": jti,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "cnf": {_CNF_DEVICE: device},
        }
        token = jwt.encode(
            payload,
            self._key.private_key,
            algorithm=self._key.algorithm,
            headers={"kid": self._key.kid, "typ": typ},
        )
        return IssuedToken(token, jti, datetime.fromtimestamp(now + ttl, tz=UTC))


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True, slots=True)
class AccessClaims:
    username: str
    session_id: str
    jti: str
    expires_at: float  # seconds since the epoch
    device: str  # the certificate identity (URI SAN) the token is bound to


@dataclass(frozen=True, slots=True)
class RefreshClaims:
    username: str
    session_id: str
    jti: str
    expires_at: float  # seconds since the epoch
    device: str  # the certificate identity (URI SAN) the token is bound to


def _is_time(value: object) -> bool:
    # bool is an int subclass ("exp": true must not read as 1970-01-01T00:00:01); JSON as
    # Python parses it allows NaN and Infinity, which would compare as "never expires"; and
    # an int beyond float range would raise OverflowError in the comparisons.
    if isinstance(value, bool):
        return False
    # The range test also refuses NaN (every comparison is False) and the infinities.
    return isinstance(value, int | float) and 0 <= value < _MAX_TIME


def _peek_header(token: str) -> dict[str, Any]:
    """The unverified JOSE header, only to pick the key and skip hopeless tokens cheaply.

    PyJWT's own parser validates base64 character by character in Python (tens of µs);
    the authoritative parse is the one PyJWT does while verifying the signature.
    """
    segment, dot, _ = token.partition(".")
    if not dot:
        raise InvalidToken("malformed")
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):  # binascii.Error and UnicodeError are ValueErrors
        raise InvalidToken("malformed") from None
    if not isinstance(header, dict):
        raise InvalidToken("malformed")
    return header


class TokenVerifier:
    """Checks signatures and claims only; the caller checks the session deny-list."""

    def __init__(
        self,
        keys: SigningKeys,
        config: TokenConfig,
        clock: Callable[[], float] = time.time,
        cache_size: int = 100_000,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        # kid -> (public key, the one algorithm allowed with it). Built once: the hot path
        # never touches PEM or key objects' construction.
        self._keys = self._verification_keys(keys)
        self._config = config
        self._leeway = config.leeway
        self._access_seconds = config.access_ttl.total_seconds()
        self._refresh_seconds = config.refresh_ttl.total_seconds()
        self._clock = clock
        self._cache_size = cache_size
        # Only successful verifications are cached, so garbage cannot grow it, and it is
        # bounded: insertion order, oldest evicted first. Tokens live minutes, so the
        # oldest entry is also the nearest to expiring.
        self._cache: OrderedDict[str, AccessClaims] = OrderedDict()
        self._jws = jwt.PyJWS()

    @staticmethod
    def _verification_keys(keys: SigningKeys) -> dict[str, tuple[_PublicKey, list[str]]]:
        return {kid: (keys.public_key(kid), [keys.algorithm_of(kid)]) for kid in keys.kids}

    def use_keys(self, keys: SigningKeys) -> None:
        """Accepts tokens signed by any of ``keys`` from now on (one atomic swap).

        Cached verifications stay when keys are only added; when a key is removed (it may
        have leaked) every cached verification is dropped and re-checked.
        """
        new_keys = self._verification_keys(keys)
        removed = not self._keys.keys() <= new_keys.keys()
        self._keys = new_keys
        if removed:
            self._cache.clear()

    def verify_access(self, token: str) -> AccessClaims:
        try:
            cached = self._cache.get(token)
        except TypeError:  # unhashable: not a token
            raise InvalidToken("malformed") from None
        if cached is not None:
            if self._clock() < cached.expires_at + self._leeway:
                return cached
            self._cache.pop(token, None)
            raise InvalidToken("expired")
        payload = self._verify(token, ACCESS_TOKEN_TYPE)
        claims = AccessClaims(
            payload["sub"],
            payload["sid"],
            payload["jti"],
            float(payload["exp"]),
            payload["cnf"][_CNF_DEVICE],
        )
        if self._cache_size:
            self._cache[token] = claims
            while len(self._cache) > self._cache_size:
                try:
                    self._cache.popitem(last=False)
                except KeyError:  # emptied concurrently
                    break
        return claims

    def verify_refresh(self, token: str) -> RefreshClaims:
        # Not cached: a refresh token is presented once, then rotated by the caller.
        payload = self._verify(token, REFRESH_TOKEN_TYPE)
        return RefreshClaims(
            payload["sub"],
            payload["sid"],
            payload["jti"],
            float(payload["exp"]),
            payload["cnf"][_CNF_DEVICE],
        )

    def cache_len(self) -> int:
        return len(self._cache)

    def clear_cache(self) -> None:
        self._cache.clear()

    def _verify(self, token: str, typ: str) -> dict[str, Any]:
        if not isinstance(token, str) or not token:
            raise InvalidToken("malformed")
        if len(token) > MAX_TOKEN_LENGTH:
            raise InvalidToken("oversized")
        header = _peek_header(token)
        kid = header.get("kid")
        entry = self._keys.get(kid) if isinstance(kid, str) else None
        if entry is None:
            raise InvalidToken("unknown-key")
        # Checked here only to skip the signature work for a wrong type; the check that
        # counts is on the header PyJWT verified, below.
        if header.get("typ") != typ:
            raise InvalidToken("wrong-type")
        public_key, algorithms = entry
        try:
            decoded = self._jws.decode_complete(token, public_key, algorithms=algorithms)
        except jwt.InvalidSignatureError:
            raise InvalidToken("signature") from None
        except jwt.InvalidAlgorithmError:
            raise InvalidToken("algorithm") from None
        except (jwt.InvalidTokenError, ValueError, TypeError, RecursionError):
            raise InvalidToken("malformed") from None
        verified_header = decoded["header"]
        if verified_header.get("typ") != typ or verified_header.get("kid") != kid:
            raise InvalidToken("wrong-type")
        try:
            payload = json.loads(decoded["payload"])
        except (ValueError, RecursionError):
            raise InvalidToken("malformed") from None
        if not isinstance(payload, dict):
            raise InvalidToken("malformed")
        self._check_claims(payload, typ)
        return payload

    def _check_claims(self, payload: dict[str, Any], typ: str) -> None:
        for name in _REQUIRED_CLAIMS:
            if name not in payload:
                raise InvalidToken("missing-claim")
        # Exact string equality: our tokens carry one audience as a string, never a list.
        if payload["iss"] != self._config.issuer:
            raise InvalidToken("issuer")
        if payload["aud"] != self._config.audience:
            raise InvalidToken("audience")
        for name in ("sub", "sid", "jti"):
            value = payload[name]
            if not isinstance(value, str) or not value:
                raise InvalidToken("malformed")
        cnf = payload["cnf"]
        device = cnf.get(_CNF_DEVICE) if isinstance(cnf, dict) else None
        if not isinstance(device, str) or not device or len(device) > _MAX_DEVICE_LENGTH:
            raise InvalidToken("unbound")
        exp, nbf, iat = payload["exp"], payload["nbf"], payload["iat"]
        if not (_is_time(exp) and _is_time(nbf) and _is_time(iat)):
            raise InvalidToken("malformed")
        now = self._clock()
        if now >= exp + self._leeway:
            raise InvalidToken("expired")
        if nbf > now + self._leeway or iat > now + self._leeway:
            raise InvalidToken("not-yet-valid")
        # We never issue longer lifetimes; a longer one was signed by someone else's hand
        # (a leaked key) and must not outlive the key's removal in the cache.
        lifetime = self._access_seconds if typ == ACCESS_TOKEN_TYPE else self._refresh_seconds
        if exp - iat > lifetime + self._leeway:
            raise InvalidToken("lifetime")
