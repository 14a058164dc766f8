"""Domain records to protocol messages."""

from __future__ import annotations

from datetime import datetime

from google.protobuf.timestamp_pb2 import Timestamp

from nodepool.store import ApiKeyRecord, UserRecord
from nodepool.v1 import user_manager_pb2 as user_pb

__all__ = ["api_key_message", "timestamp", "user_message"]


def timestamp(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def user_message(user: UserRecord) -> user_pb.User:
    return user_pb.User(
        username=user.username,
        email=user.email or "",
        roles=sorted(user.roles),
        is_active=user.is_active,
        created_at=timestamp(user.created_at),
        last_login=timestamp(user.last_login),
    )


def api_key_message(key: ApiKeyRecord) -> user_pb.ApiKey:
    return user_pb.ApiKey(
        key_id=key.lookup_id,
        name=key.name,
        owner=key.owner,
        scopes=sorted(key.scopes),
        created_at=timestamp(key.created_at),
        expires_at=timestamp(key.expires_at),
        last_used_at=timestamp(key.last_used_at),
        revoked_at=timestamp(key.revoked_at),
        bound_device=key.bound_device or "",
    )
