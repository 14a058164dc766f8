"""argon2id hashing and the username / password / e-mail rules."""

from __future__ import annotations

import pytest
from argon2.profiles import RFC_9106_LOW_MEMORY
from hypothesis import given
from hypothesis import strategies as st

from nodepool.auth.passwords import (
    COMMON_PASSWORDS,
    MAX_PASSWORD_LENGTH,
    MIN_PASSWORD_LENGTH,
    RESERVED_USERNAMES,
    PasswordHasher,
    check_signup_username,
    validate_email,
    validate_password,
    validate_username,
)
from nodepool.errors import InvalidArgumentError

FAST = {"time_cost": 1, "memory_cost": 8, "parallelism": 1}
GOOD = "correct horse battery staple"


@pytest.fixture(scope="module")
def hasher() -> PasswordHasher:
    return PasswordHasher(**FAST)


# --------------------------------------------------------------------------- hashing


def test_hash_and_verify(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert stored.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert GOOD not in stored
    assert hasher.verify(stored, GOOD)
    assert hasher.hash(GOOD) != stored  # salted


def test_wrong_password_is_false_not_an_exception(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert hasher.verify(stored, GOOD + "x") is False
    assert hasher.verify(stored, "") is False
    assert hasher.verify(stored, "\ud800 lone surrogate") is False


@pytest.mark.parametrize(
    "stored",
    ["", "nonsense", "$argon2id$v=19$m=8,t=1,p=1$bad", "$2b$12$abcdefghijklmnopqrstuv", "é"],
)
def test_invalid_stored_hash_is_false(hasher: PasswordHasher, stored: str) -> None:
    assert hasher.verify(stored, GOOD) is False
    assert hasher.needs_rehash(stored) is True


def test_needs_rehash_follows_parameters(hasher: PasswordHasher) -> None:
    stored = hasher.hash(GOOD)
    assert hasher.needs_rehash(stored) is False
    stronger = PasswordHasher(time_cost=2, memory_cost=16, parallelism=1)
    assert stronger.needs_rehash(stored) is True
    # Old hashes still verify with the new parameters, so they can be rehashed at login.
    assert stronger.verify(stored, GOOD)
    assert stronger.needs_rehash(stronger.hash(GOOD)) is False


def test_defaults_are_rfc_9106_low_memory() -> None:
    stored = PasswordHasher().hash(GOOD)
    params = RFC_9106_LOW_MEMORY
    assert stored.startswith(
        f"$argon2id$v=19$m={params.memory_cost},t={params.time_cost},p={params.parallelism}$"
    )


def test_dummy_verify_costs_a_real_verify(
    hasher: PasswordHasher, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Same parameters as real hashes, so the same argon2 work is done.
    assert hasher.needs_rehash(hasher._dummy_hash) is False
    calls: list[tuple[str, str]] = []
    real_verify = PasswordHasher.verify

    def spy(self: PasswordHasher, stored: str, password: str) -> bool:
        calls.append((stored, password))
        return real_verify(self, stored, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    assert hasher.dummy_verify(GOOD) is None  # type: ignore[func-returns-value]
    assert calls == [(hasher._dummy_hash, GOOD)]


# --------------------------------------------------------------------------- password rules


def refused(password: str, username: str = "alice") -> str:
    with pytest.raises(InvalidArgumentError) as info:
        validate_password(password, username=username)
    message = info.value.public_message
    if password:
        assert password not in message
    return message


def test_good_password_is_accepted() -> None:
    validate_password(GOOD, username="alice")


def test_length_bounds_count_characters() -> None:
    validate_password("abcdefghijkm", username="zed")  # exactly 12
    assert "12" in refused("abcdefghijk", username="zed")  # 11
    validate_password(("ab" * 512), username="zed")  # exactly 1024
    refused("ab" * 512 + "c", username="zed")  # 1025
    # 11 two-byte characters are 22 bytes but still too short...
    refused("éàüöñçøåßæœ", username="zed")
    # ...and 1024 four-byte characters (4096 bytes) are not too long.
    validate_password("😀😁" * 512, username="zed")
    assert MIN_PASSWORD_LENGTH == 12
    assert MAX_PASSWORD_LENGTH == 1024


def test_password_containing_the_username_is_refused() -> None:
    assert "username" in refused("my-ALICE-password-x", username="Alice")
    assert "username" in refused("xxalicexxxxxx", username="alice")
    validate_password("my-alic-password-x", username="alice")


def test_single_repeated_character_is_refused() -> None:
    assert "repeated" in refused("a" * 12)
    assert "repeated" in refused("." * 40)
    validate_password("a" * 11 + "b", username="zed")


@pytest.mark.parametrize("password", sorted(COMMON_PASSWORDS))
def test_common_passwords_are_refused(password: str) -> None:
    assert "common" in refused(password, username="zed")
    assert "common" in refused(password.upper(), username="zed")


def test_common_list_is_meaningful() -> None:
    assert len(COMMON_PASSWORDS) >= 12
    assert {"password1234", "123456789012", "qwertyuiopas"} <= COMMON_PASSWORDS
    # Entries the length rule already refuses would be dead weight.
    assert all(len(p) >= MIN_PASSWORD_LENGTH for p in COMMON_PASSWORDS)


def test_unencodable_password_is_refused() -> None:
    refused("abcdefghijk\ud800", username="zed")


def test_non_string_password_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_password(None, username="zed")  # type: ignore[arg-type]


@given(password=st.text(max_size=40), username=st.text(max_size=10))
def test_validate_password_only_raises_invalid_argument(password: str, username: str) -> None:
    try:
        validate_password(password, username=username)
    except InvalidArgumentError as exc:
        if len(password) >= 4:
            assert password not in exc.public_message


# --------------------------------------------------------------------------- usernames


@pytest.mark.parametrize(
    ("given_name", "expected"),
    [
        ("alice", "alice"),
        ("Alice", "alice"),
        ("BOB.smith-2_x", "bob.smith-2_x"),
        ("abc", "abc"),
        ("a" * 32, "a" * 32),
        ("0day", "0day"),
        ("admin", "admin"),
    ],
)
def test_valid_usernames(given_name: str, expected: str) -> None:
    assert validate_username(given_name) == expected


@pytest.mark.parametrize(
    "name",
    [
        "",
        "ab",
        "a" * 33,
        "_alice",
        ".alice",
        "-alice",
        "al ice",
        "alice\n",
        "al@ice",
        "ålice",
        "\uff41\uff44\uff4d\uff49\uff4e",  # fullwidth "admin" must not alias it
        "alice\x00",
        "al/ice",
    ],
)
def test_invalid_usernames(name: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_username(name)


@pytest.mark.parametrize("name", [*sorted(RESERVED_USERNAMES), "Root", "SYSTEM", "NodePool"])
def test_reserved_usernames(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        validate_username(name)


def test_reserved_names_are_the_agreed_ones() -> None:
    assert {"root", "system", "nodepool", "anonymous"} == RESERVED_USERNAMES


@pytest.mark.parametrize(
    "name",
    ["admin", "Administrator", "support", "security", "root", "adm.in", "Admin_1", "root2"],
)
def test_names_reserved_for_sign_up(name: str) -> None:
    with pytest.raises(InvalidArgumentError, match="reserved"):
        check_signup_username(name)


def test_reserved_sign_up_names_are_still_valid_usernames() -> None:
    # The first administrator may be called "admin" (made on the server host).
    assert validate_username("admin") == "admin"
    assert check_signup_username("adminton") == "adminton"
    assert check_signup_username("alice.support-fan") == "alice.support-fan"


def test_non_string_username_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_username(None)  # type: ignore[arg-type]


@given(name=st.text(max_size=40))
def test_validate_username_only_raises_invalid_argument(name: str) -> None:
    try:
        normalised = validate_username(name)
    except InvalidArgumentError:
        return
    assert normalised == name.lower()
    assert normalised.isascii()
    assert 3 <= len(normalised) <= 32


@given(name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{2,31}", fullmatch=True))
def test_every_name_matching_the_pattern_is_accepted(name: str) -> None:
    if name.lower() in RESERVED_USERNAMES:
        return
    assert validate_username(name) == name.lower()


# --------------------------------------------------------------------------- e-mail


@pytest.mark.parametrize(
    ("email", "expected"),
    [
        ("", ""),
        ("a@b.co", "a@b.co"),
        ("User.Name+tag@Example.COM", "User.Name+tag@example.com"),
        ("x@sub.xn--bcher-kva.example", "x@sub.xn--bcher-kva.example"),
        ("o'brien@mail.example.org", "o'brien@mail.example.org"),
    ],
)
def test_valid_emails(email: str, expected: str) -> None:
    assert validate_email(email) == expected


@pytest.mark.parametrize(
    "email",
    [
        "no-at-sign",
        "a@@b.co",
        "a@b@c.co",
        "a b@c.co",
        " a@b.co",
        "a@b.co ",
        "a@b.co\n",
        "a\t@b.co",
        "a@localhost",
        "@b.co",
        "a@",
        "a@.co",
        "a@b..co",
        "a@b.co.",
        "a@-b.co",
        "a@b-.co",
        ".a@b.co",
        "a.@b.co",
        "a..b@c.co",
        "x" * 65 + "@b.co",
        "a@" + "b" * 64 + ".co",
        "a@" + ("b" * 60 + ".") * 5 + "co",  # 309 characters
        '"quoted"@b.co',
        "a@b_c.co",
        "é@b.co",
        "a@bé.co",
    ],
)
def test_invalid_emails(email: str) -> None:
    with pytest.raises(InvalidArgumentError):
        validate_email(email)


def test_email_length_limit() -> None:
    local = "a" * 64
    domain_254 = ".".join(["b" * 61] * 3) + "." + "c" * (254 - 64 - 1 - 3 * 62)
    assert len(f"{local}@{domain_254}") == 254
    assert validate_email(f"{local}@{domain_254}")
    with pytest.raises(InvalidArgumentError):
        validate_email(f"{local}@{domain_254}c")


def test_non_string_email_is_refused() -> None:
    with pytest.raises(InvalidArgumentError):
        validate_email(None)  # type: ignore[arg-type]


@given(email=st.text(max_size=80) | st.emails())
def test_validate_email_only_raises_invalid_argument(email: str) -> None:
    try:
        result = validate_email(email)
    except InvalidArgumentError:
        return
    assert result.lower() == email.lower()
    assert result == "" or result.count("@") == 1
