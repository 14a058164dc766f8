"""Users and their credentials on SQL: accounts, roles, API keys, refresh sessions."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Connection,
    and_,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    text,
    update,
)

from nodepool.store.base import (
    UNSET,
    ApiKeyRecord,
    Page,
    SessionRecord,
    Unset,
    UserRecord,
    UserStore,
)
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    NotFound,
)
from nodepool.store.schema import ApiKey, RefreshSession, User, UserRole
from nodepool.store.sqlbase import (
    AnyRow,
    AnySelect,
    SqlBase,
    canonical_username,
    check_limit,
    check_roles,
    decode_int_cursor,
    encode_cursor,
)

__all__ = ["SqlUserStore"]

_ADMIN = "admin"

_USER_COLUMNS = (
    User.id,
    User.username,
    User.password_hash,
    User.email,
    User.is_active,
    User.created_at,
    User.updated_at,
    User.last_login,
    User.failed_logins,
    User.locked_until,
    User.password_changed_at,
)

_API_KEY_COLUMNS = (
    ApiKey.id,
    ApiKey.user_id.label("owner_id"),
    User.username.label("owner"),
    ApiKey.lookup_id,
    ApiKey.secret_hash,
    ApiKey.name,
    ApiKey.scopes,
    ApiKey.created_at,
    ApiKey.expires_at,
    ApiKey.last_used_at,
    ApiKey.revoked_at,
    ApiKey.bound_device,
)

# Any fixed number: the PostgreSQL advisory lock that serializes "is an administrator
# left?" checks. SQLite needs none: its write transactions are already serial.
_ADMIN_COUNT_LOCK = 0x6E70_6164  # "npad"

_SESSION_COLUMNS = (
    RefreshSession.id,
    RefreshSession.user_id.label("owner_id"),
    User.username.label("owner"),
    RefreshSession.current_token_hash,
    RefreshSession.generation,
    RefreshSession.created_at,
    RefreshSession.expires_at,
    RefreshSession.rotated_at,
    RefreshSession.revoked_at,
    RefreshSession.revoked_reason,
)


# Rows become records by column name (labels match the record fields), never by position.


def _user(row: AnyRow, roles: Iterable[str]) -> UserRecord:
    fields = dict(row._mapping)
    fields.pop("role", None)
    fields["is_active"] = bool(fields["is_active"])
    return UserRecord(**fields, roles=frozenset(roles))


def _api_key(row: AnyRow) -> ApiKeyRecord:
    fields = dict(row._mapping)
    fields["scopes"] = frozenset(fields["scopes"] or ())
    return ApiKeyRecord(**fields)


def _session(row: AnyRow) -> SessionRecord:
    return SessionRecord(**row._mapping)


class SqlUserStore(SqlBase, UserStore):
    # -- users --------------------------------------------------------------------------

    def _load_user(self, conn: Connection, where: ColumnElement[bool]) -> UserRecord:
        # One statement: a row per role (or one with no role), folded here.
        rows = conn.execute(
            select(*_USER_COLUMNS, UserRole.role)
            .outerjoin(UserRole, UserRole.user_id == User.id)
            .where(where)
        ).all()
        if not rows:
            raise NotFound("no such user")
        return _user(rows[0], [row.role for row in rows if row.role is not None])

    def _load_user_by_name(self, conn: Connection, username: str) -> UserRecord:
        return self._load_user(conn, User.username_canonical == canonical_username(username))

    def create_user(
        self,
        username: str,
        password_hash: str,
        *,
        email: str | None = None,
        roles: Iterable[str] = ("user",),
    ) -> UserRecord:
        wanted = check_roles(roles)
        now = self._now()
        try:
            with self._write() as conn:
                user_id = conn.scalar(
                    insert(User)
                    .values(
                        username=username,
                        username_canonical=canonical_username(username),
                        password_hash=password_hash,
                        email=email,
                        is_active=True,
                        failed_logins=0,
                        created_at=now,
                        updated_at=now,
                        password_changed_at=now,
                    )
                    .returning(User.id)
                )
                if wanted:
                    conn.execute(
                        insert(UserRole), [{"user_id": user_id, "role": r} for r in wanted]
                    )
                return self._load_user(conn, User.id == user_id)
        except AlreadyExists:
            raise AlreadyExists("username already taken") from None

    def get_user(self, username: str) -> UserRecord:
        with self._read_one() as conn:
            return self._load_user_by_name(conn, username)

    def get_user_by_id(self, user_id: int) -> UserRecord:
        with self._read_one() as conn:
            return self._load_user(conn, User.id == user_id)

    def update_user_fields(
        self,
        username: str,
        *,
        email: str | Unset | None = UNSET,
        password_hash: str | Unset = UNSET,
        is_active: bool | Unset = UNSET,
        keep_an_admin: bool = False,
    ) -> UserRecord:
        now = self._now()
        values: dict[str, Any] = {"updated_at": now}
        if not isinstance(email, Unset):
            values["email"] = email
        if not isinstance(password_hash, Unset):
            values["password_hash"] = password_hash
            values["password_changed_at"] = now
        if not isinstance(is_active, Unset):
            values["is_active"] = is_active
        where = User.username_canonical == canonical_username(username)
        with self._write() as conn:
            if keep_an_admin:
                self._lock_admin_count(conn)
            if conn.execute(update(User).where(where).values(**values)).rowcount == 0:
                raise NotFound("no such user")
            if keep_an_admin:
                self._check_an_admin_remains(conn)
            return self._load_user(conn, where)

    def _lock_admin_count(self, conn: Connection) -> None:
        """Serializes every change that must keep an administrator, until commit.

        Without it two transactions demoting two administrators at once would each count
        the other as still there (neither sees the other's uncommitted change) and both
        commit, leaving none. Taken before the change; the count follows the change in
        a new statement, which under READ COMMITTED sees every earlier commit.
        """
        if not self._sqlite:
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADMIN_COUNT_LOCK})

    @staticmethod
    def _check_an_admin_remains(conn: Connection) -> None:
        remaining = conn.scalar(
            select(func.count())
            .select_from(User)
            .join(UserRole, UserRole.user_id == User.id)
            .where(UserRole.role == _ADMIN, User.is_active)
        )
        if not remaining:
            # Raised inside the transaction: the change is rolled back.
            raise Conflict("the last active administrator cannot be removed")

    def _change_roles(
        self,
        username: str,
        add: frozenset[str],
        remove: frozenset[str],
        replace: bool,
        keep_an_admin: bool = False,
    ) -> UserRecord:
        with self._write() as conn:
            if keep_an_admin:
                self._lock_admin_count(conn)
            user_id = self._user_id(conn, username, lock=True)
            held = set(conn.scalars(select(UserRole.role).where(UserRole.user_id == user_id)))
            target = set(add) if replace else (held | add) - remove
            if held - target:
                conn.execute(
                    delete(UserRole).where(
                        UserRole.user_id == user_id, UserRole.role.in_(held - target)
                    )
                )
            if target - held:
                conn.execute(
                    insert(UserRole), [{"user_id": user_id, "role": r} for r in target - held]
                )
            conn.execute(update(User).where(User.id == user_id).values(updated_at=self._now()))
            if keep_an_admin:
                self._check_an_admin_remains(conn)
            return self._load_user(conn, User.id == user_id)

    def set_roles(self, username: str, roles: Iterable[str]) -> UserRecord:
        return self._change_roles(username, check_roles(roles), frozenset(), replace=True)

    def add_role(self, username: str, role: str) -> UserRecord:
        return self._change_roles(username, check_roles([role]), frozenset(), replace=False)

    def remove_role(self, username: str, role: str, *, keep_an_admin: bool = False) -> UserRecord:
        return self._change_roles(
            username, frozenset(), check_roles([role]), replace=False, keep_an_admin=keep_an_admin
        )

    def record_login_success(self, username: str) -> UserRecord:
        where = User.username_canonical == canonical_username(username)
        with self._write() as conn:
            result = conn.execute(
                update(User)
                .where(where)
                .values(last_login=self._now(), failed_logins=0, locked_until=None)
            )
            if result.rowcount == 0:
                raise NotFound("no such user")
            return self._load_user(conn, where)

    def record_login_failure(
        self, username: str, *, lock_after: int, lock_for: timedelta
    ) -> UserRecord:
        where = User.username_canonical == canonical_username(username)
        until = self._now() + lock_for
        # One UPDATE, so concurrent failures are all counted.
        with self._write() as conn:
            result = conn.execute(
                update(User)
                .where(where)
                .values(
                    failed_logins=User.failed_logins + 1,
                    locked_until=case(
                        (User.failed_logins + 1 >= lock_after, until),
                        else_=User.locked_until,
                    ),
                )
            )
            if result.rowcount == 0:
                raise NotFound("no such user")
            return self._load_user(conn, where)

    def list_users(self, *, limit: int = 100, cursor: str | None = None) -> Page[UserRecord]:
        limit = check_limit(limit)
        query = select(*_USER_COLUMNS).order_by(User.id).limit(limit + 1)
        if cursor is not None:
            query = query.where(User.id > decode_int_cursor(cursor))
        with self._read() as conn:
            rows = conn.execute(query).all()
            page, more = rows[:limit], len(rows) > limit
            roles: dict[int, list[str]] = {row.id: [] for row in page}
            if page:
                for user_id, role in conn.execute(
                    select(UserRole.user_id, UserRole.role).where(UserRole.user_id.in_(roles))
                ):
                    roles[user_id].append(role)
        items = [_user(row, roles[row.id]) for row in page]
        return Page(items, encode_cursor(str(page[-1].id)) if more else None)

    # -- api keys -----------------------------------------------------------------------

    @staticmethod
    def _api_key_query() -> AnySelect:
        return select(*_API_KEY_COLUMNS).join(User, User.id == ApiKey.user_id)

    def _load_api_key(self, conn: Connection, lookup_id: str) -> ApiKeyRecord:
        row = conn.execute(self._api_key_query().where(ApiKey.lookup_id == lookup_id)).first()
        if row is None:
            raise NotFound("no such API key")
        return _api_key(row)

    def create_api_key(
        self,
        *,
        owner: str,
        lookup_id: str,
        secret_hash: str,
        name: str,
        scopes: Iterable[str],
        expires_at: datetime | None = None,
        bound_device: str | None = None,
    ) -> ApiKeyRecord:
        wanted = sorted(check_roles(scopes))
        with self._write() as conn:
            owner_id = self._user_id(conn, owner)
            conn.execute(
                insert(ApiKey).values(
                    user_id=owner_id,
                    lookup_id=lookup_id,
                    secret_hash=secret_hash,
                    name=name,
                    scopes=wanted,
                    created_at=self._now(),
                    expires_at=expires_at,
                    bound_device=bound_device,
                )
            )
            return self._load_api_key(conn, lookup_id)

    def get_api_key_by_lookup_id(self, lookup_id: str) -> ApiKeyRecord:
        with self._read_one() as conn:
            return self._load_api_key(conn, lookup_id)

    def list_api_keys(self, owner: str) -> list[ApiKeyRecord]:
        query = (
            self._api_key_query()
            .where(self._owner_filter(ApiKey.user_id, owner))
            .order_by(ApiKey.id)
        )
        with self._read_one() as conn:
            return [_api_key(row) for row in conn.execute(query)]

    def revoke_api_key(self, lookup_id: str, *, owner: str | None = None) -> ApiKeyRecord:
        where = ApiKey.lookup_id == lookup_id
        if owner is not None:
            where = and_(where, self._owner_filter(ApiKey.user_id, owner))
        with self._write() as conn:
            if conn.scalar(select(ApiKey.id).where(where)) is None:
                raise NotFound("no such API key")
            conn.execute(
                update(ApiKey)
                .where(where, ApiKey.revoked_at.is_(None))
                .values(revoked_at=self._now())
            )
            return self._load_api_key(conn, lookup_id)

    def revoke_api_keys_of_user(self, owner: str) -> list[str]:
        with self._write() as conn:
            rows = conn.execute(
                update(ApiKey)
                .where(self._owner_filter(ApiKey.user_id, owner), ApiKey.revoked_at.is_(None))
                .values(revoked_at=self._now())
                .returning(ApiKey.lookup_id)
            ).all()
        return sorted(row[0] for row in rows)

    def touch_api_key_last_used(self, lookup_id: str, at: datetime | None = None) -> None:
        when = at or self._now()
        with self._write() as conn:
            conn.execute(
                update(ApiKey)
                .where(
                    ApiKey.lookup_id == lookup_id,
                    or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < when),
                )
                .values(last_used_at=when)
            )

    # -- refresh sessions ---------------------------------------------------------------

    @staticmethod
    def _session_query() -> AnySelect:
        return select(*_SESSION_COLUMNS).join(User, User.id == RefreshSession.user_id)

    def _load_session(self, conn: Connection, where: ColumnElement[bool]) -> SessionRecord:
        row = conn.execute(self._session_query().where(where)).first()
        if row is None:
            raise NotFound("no such session")
        return _session(row)

    def create_session(
        self, *, session_id: str, owner: str, token_hash: str, expires_at: datetime
    ) -> SessionRecord:
        with self._write() as conn:
            owner_id = self._user_id(conn, owner)
            conn.execute(
                insert(RefreshSession).values(
                    id=session_id,
                    user_id=owner_id,
                    current_token_hash=token_hash,
                    created_at=self._now(),
                    expires_at=expires_at,
                    generation=0,
                )
            )
            return self._load_session(conn, RefreshSession.id == session_id)

    def get_session(self, session_id: str) -> SessionRecord:
        with self._read_one() as conn:
            return self._load_session(conn, RefreshSession.id == session_id)

    def get_session_by_token_hash(self, token_hash: str) -> SessionRecord:
        with self._read_one() as conn:
            return self._load_session(conn, RefreshSession.current_token_hash == token_hash)

    def rotate_session(
        self,
        session_id: str,
        *,
        old_token_hash: str,
        new_token_hash: str,
        expires_at: datetime | None = None,
    ) -> SessionRecord:
        now = self._now()
        values: dict[str, Any] = {
            "current_token_hash": new_token_hash,
            "generation": RefreshSession.generation + 1,
            "rotated_at": now,
        }
        if expires_at is not None:
            values["expires_at"] = expires_at
        with self._write() as conn:
            result = conn.execute(
                update(RefreshSession)
                .where(
                    RefreshSession.id == session_id,
                    RefreshSession.current_token_hash == old_token_hash,
                    RefreshSession.revoked_at.is_(None),
                    RefreshSession.expires_at > now,
                )
                .values(**values)
            )
            if result.rowcount == 0:
                if conn.scalar(select(RefreshSession.id).where(RefreshSession.id == session_id)):
                    raise Conflict("the session was rotated, revoked or has expired")
                raise NotFound("no such session")
            return self._load_session(conn, RefreshSession.id == session_id)

    def revoke_session(self, session_id: str, *, reason: str) -> SessionRecord:
        where = RefreshSession.id == session_id
        with self._write() as conn:
            conn.execute(
                update(RefreshSession)
                .where(where, RefreshSession.revoked_at.is_(None))
                .values(revoked_at=self._now(), revoked_reason=reason)
            )
            return self._load_session(conn, where)

    def revoke_sessions_of_user(
        self, owner: str, *, reason: str, except_session_id: str | None = None
    ) -> list[str]:
        where = and_(
            self._owner_filter(RefreshSession.user_id, owner), RefreshSession.revoked_at.is_(None)
        )
        if except_session_id is not None:
            where = and_(where, RefreshSession.id != except_session_id)
        with self._write() as conn:
            rows = conn.execute(
                update(RefreshSession)
                .where(where)
                .values(revoked_at=self._now(), revoked_reason=reason)
                .returning(RefreshSession.id)
            ).all()
        return sorted(row[0] for row in rows)

    def list_sessions_revoked_since(self, since: datetime) -> list[str]:
        with self._read_one() as conn:
            rows = conn.execute(
                select(RefreshSession.id)
                .where(RefreshSession.revoked_at >= since)
                .order_by(RefreshSession.revoked_at, RefreshSession.id)
            )
            return [row[0] for row in rows]

    def delete_sessions_expired_before(self, cutoff: datetime) -> int:
        with self._write() as conn:
            return conn.execute(
                delete(RefreshSession).where(RefreshSession.expires_at < cutoff)
            ).rowcount
