"""Worker nodes on SQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)

from nodepool.store.base import (
    Heartbeat,
    NodeRecord,
    NodeStore,
    Page,
)
from nodepool.store.errors import (
    AlreadyExists,
    Conflict,
    LimitExceeded,
    NotFound,
)
from nodepool.store.schema import Node, Task, User
from nodepool.store.sqlbase import (
    AnyRow,
    AnySelect,
    SqlBase,
    check_limit,
    decode_cursor,
    encode_cursor,
    json_object,
)
from nodepool.store.tasks import requeue_tasks

__all__ = ["SqlNodeStore"]

_NODE_COLUMNS = (
    Node.id,
    Node.user_id.label("owner_id"),
    User.username.label("owner"),
    Node.ip_address,
    Node.port,
    Node.status,
    Node.cpu_cores,
    Node.memory_gb,
    Node.disk_gb,
    Node.labels,
    Node.metrics,
    Node.drain_requested,
    Node.registered_at,
    Node.last_heartbeat,
    Node.updated_at,
)


def _node(row: AnyRow) -> NodeRecord:
    fields = dict(row._mapping)
    fields["labels"] = dict(fields["labels"] or {})
    fields["metrics"] = dict(fields["metrics"] or {})
    fields["drain_requested"] = bool(fields["drain_requested"])
    return NodeRecord(**fields)


class SqlNodeStore(SqlBase, NodeStore):
    # -- nodes --------------------------------------------------------------------------

    @staticmethod
    def _node_query() -> AnySelect:
        return select(*_NODE_COLUMNS).join(User, User.id == Node.user_id)

    def _load_node(self, conn: Connection, node_id: str) -> NodeRecord:
        row = conn.execute(self._node_query().where(Node.id == node_id)).first()
        if row is None:
            raise NotFound("no such node")
        return _node(row)

    def register_node(
        self,
        node_id: str,
        *,
        owner: str,
        ip_address: str,
        port: int,
        cpu_cores: int | None = None,
        memory_gb: float | None = None,
        disk_gb: float | None = None,
        labels: Mapping[str, str] | None = None,
        max_nodes_per_owner: int | None = None,
    ) -> tuple[NodeRecord, bool]:
        now = self._now()
        values: dict[str, Any] = {
            "ip_address": ip_address,
            "port": port,
            "cpu_cores": cpu_cores,
            "memory_gb": memory_gb,
            "disk_gb": disk_gb,
            "labels": json_object(labels or {}),
            "status": "online",
            "last_heartbeat": now,
            "updated_at": now,
        }
        try:
            with self._write() as conn:
                # Locking the owner's row serialises this owner's registrations on
                # PostgreSQL, so the quota check and the insert cannot interleave.
                owner_id = self._user_id(conn, owner, lock=True)
                holder = conn.scalar(select(Node.user_id).where(Node.id == node_id))
                if holder is not None and holder != owner_id:
                    raise Conflict("node id is registered to another user")
                if holder is not None:
                    conn.execute(update(Node).where(Node.id == node_id).values(**values))
                    return self._load_node(conn, node_id), False
                if max_nodes_per_owner is not None:
                    count = conn.scalar(
                        select(func.count()).select_from(Node).where(Node.user_id == owner_id)
                    )
                    if (count or 0) >= max_nodes_per_owner:
                        raise LimitExceeded("the owner has reached the node limit")
                conn.execute(
                    insert(Node).values(
                        id=node_id,
                        user_id=owner_id,
                        metrics={},
                        drain_requested=False,
                        registered_at=now,
                        **values,
                    )
                )
                return self._load_node(conn, node_id), True
        except AlreadyExists:
            # Another owner inserted the same id between our check and insert.
            raise Conflict("node id is registered to another user") from None

    def get_node(self, node_id: str) -> NodeRecord:
        with self._read() as conn:
            return self._load_node(conn, node_id)

    def list_nodes(
        self,
        *,
        owner: str | None = None,
        status: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page[NodeRecord]:
        limit = check_limit(limit)
        query = self._node_query().order_by(Node.id).limit(limit + 1)
        if owner is not None:
            query = query.where(self._owner_filter(Node.user_id, owner))
        if status is not None:
            query = query.where(Node.status == status)
        if cursor is not None:
            (after,) = decode_cursor(cursor, 1)
            query = query.where(Node.id > after)
        with self._read() as conn:
            rows = conn.execute(query).all()
        items = [_node(row) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(items[-1].id) if more else None)

    def count_nodes(self, *, owner: str | None = None, status: str | None = None) -> int:
        query = select(func.count()).select_from(Node)
        if owner is not None:
            query = query.where(self._owner_filter(Node.user_id, owner))
        if status is not None:
            query = query.where(Node.status == status)
        with self._read() as conn:
            return int(conn.scalar(query) or 0)

    def remove_node(self, node_id: str, *, owner: str | None = None) -> None:
        where = Node.id == node_id
        if owner is not None:
            where = and_(where, self._owner_filter(Node.user_id, owner))
        with self._write() as conn:
            if conn.scalar(select(Node.id).where(where).with_for_update()) is None:
                raise NotFound("no such node")
            requeue_tasks(conn, Task.assigned_node_id == node_id, "node removed", self._now())
            conn.execute(delete(Node).where(Node.id == node_id))

    def set_node_drain(self, node_id: str, drain: bool) -> NodeRecord:
        with self._write() as conn:
            result = conn.execute(
                update(Node)
                .where(Node.id == node_id)
                .values(drain_requested=drain, updated_at=self._now())
            )
            if result.rowcount == 0:
                raise NotFound("no such node")
            return self._load_node(conn, node_id)

    def apply_heartbeats(self, beats: Sequence[Heartbeat]) -> None:
        if not beats:
            return
        # Last beat per node wins, so the executemany never updates one row twice.
        latest: dict[str, Heartbeat] = {}
        for beat in beats:
            if beat.node_id not in latest or beat.at >= latest[beat.node_id].at:
                latest[beat.node_id] = beat
        statement = (
            update(Node)
            .where(
                Node.id == bindparam("b_id"),
                or_(Node.last_heartbeat.is_(None), Node.last_heartbeat <= bindparam("b_at")),
            )
            .values(
                status=bindparam("b_status"),
                metrics=bindparam("b_metrics"),
                last_heartbeat=bindparam("b_at"),
                updated_at=bindparam("b_at"),
            )
        )
        params = [
            {
                "b_id": b.node_id,
                "b_status": b.status,
                "b_metrics": json_object(b.metrics),
                "b_at": b.at,
            }
            for b in sorted(latest.values(), key=lambda b: b.node_id)  # stable lock order
        ]
        with self._write() as conn:
            conn.execute(statement, params)

    def mark_stale_nodes_offline(self, older_than: datetime) -> list[str]:
        seen = func.coalesce(Node.last_heartbeat, Node.registered_at)
        with self._write() as conn:
            rows = conn.execute(
                update(Node)
                .where(Node.status != "offline", seen < older_than)
                .values(status="offline", updated_at=self._now())
                .returning(Node.id)
            ).all()
        return sorted(row[0] for row in rows)

    def delete_offline_nodes_before(self, cutoff: datetime) -> int:
        seen = func.coalesce(Node.last_heartbeat, Node.registered_at)
        with self._write() as conn:
            return conn.execute(
                delete(Node).where(Node.status == "offline", seen < cutoff)
            ).rowcount
