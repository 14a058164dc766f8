"""Worker nodes on SQL."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import (
    Connection,
    and_,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    true,
    update,
)

from nodepool.store.base import (
    Heartbeat,
    NodeEventRecord,
    NodeRecord,
    NodeStore,
    Page,
    PoolStats,
)
from nodepool.store.errors import AlreadyExists, Conflict, LimitExceeded, NodeRemoved, NotFound
from nodepool.store.schema import Node, NodeEvent, RemovedNode, Task, User
from nodepool.store.sqlbase import (
    AnyRow,
    AnySelect,
    SqlBase,
    check_limit,
    decode_cursor,
    decode_int_cursor,
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
    Node.drain_deadline,
    Node.task_slots,
)

_EVENT_COLUMNS = (
    NodeEvent.id,
    NodeEvent.node_id,
    NodeEvent.at,
    NodeEvent.event,
    NodeEvent.status,
    NodeEvent.detail,
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
        task_slots: int = 0,
    ) -> tuple[NodeRecord, bool]:
        now = self._now()
        values: dict[str, Any] = {
            "ip_address": ip_address,
            "port": port,
            "cpu_cores": cpu_cores,
            "memory_gb": memory_gb,
            "disk_gb": disk_gb,
            "labels": json_object(labels or {}),
            "task_slots": task_slots,
            "status": "online",
            "last_heartbeat": now,
            "updated_at": now,
        }
        try:
            with self._write() as conn:
                # Locking the owner's row serialises this owner's registrations on
                # PostgreSQL, so the quota check and the insert cannot interleave.
                owner_id = self._user_id(conn, owner, lock=True)
                if conn.scalar(select(RemovedNode.node_id).where(RemovedNode.node_id == node_id)):
                    raise NodeRemoved("the node was removed; an admin must re-admit it")
                holder = conn.scalar(select(Node.user_id).where(Node.id == node_id))
                if holder is not None and holder != owner_id:
                    raise Conflict("node id is registered to another user")
                if holder is not None:
                    # A draining node stays draining when it re-registers.
                    values["status"] = case(
                        (Node.drain_requested == true(), "draining"), else_="online"
                    )
                    conn.execute(update(Node).where(Node.id == node_id).values(**values))
                    node = self._load_node(conn, node_id)
                    self._event(conn, node_id, "registered", node.status, "again", now)
                    return node, False
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
                self._event(conn, node_id, "registered", "online", "", now)
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
        labels: Mapping[str, str] | None = None,
    ) -> Page[NodeRecord]:
        limit = check_limit(limit)
        query = self._node_query().order_by(Node.id).limit(limit + 1)
        if owner is not None:
            query = query.where(self._owner_filter(Node.user_id, owner))
        if status is not None:
            query = query.where(Node.status == status)
        for key, value in sorted((labels or {}).items()):
            query = query.where(Node.labels[key].as_string() == value)
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

    def remove_node(
        self, node_id: str, *, owner: str | None = None, removed_by: str = "", reason: str = ""
    ) -> None:
        where = Node.id == node_id
        if owner is not None:
            where = and_(where, self._owner_filter(Node.user_id, owner))
        with self._write() as conn:
            if conn.scalar(select(Node.id).where(where).with_for_update()) is None:
                raise NotFound("no such node")
            self._remove(conn, node_id, removed_by, reason or "removed", self._now())

    def _remove(
        self, conn: Connection, node_id: str, removed_by: str, reason: str, now: datetime
    ) -> None:
        requeue_tasks(conn, Task.assigned_node_id == node_id, "node removed", now)
        conn.execute(delete(Node).where(Node.id == node_id))
        conn.execute(delete(RemovedNode).where(RemovedNode.node_id == node_id))
        conn.execute(
            insert(RemovedNode).values(
                node_id=node_id, removed_at=now, removed_by=removed_by[:255], reason=reason[:255]
            )
        )
        self._event(conn, node_id, "removed", "offline", reason, now)

    def request_drain(
        self, node_id: str, *, deadline: datetime, owner: str | None = None
    ) -> NodeRecord:
        where = Node.id == node_id
        if owner is not None:
            where = and_(where, self._owner_filter(Node.user_id, owner))
        now = self._now()
        with self._write() as conn:
            result = conn.execute(
                update(Node)
                .where(where)
                .values(
                    drain_requested=True,
                    drain_deadline=deadline,
                    status=case((Node.status == "offline", "offline"), else_="draining"),
                    updated_at=now,
                )
            )
            if result.rowcount == 0:
                raise NotFound("no such node")
            node = self._load_node(conn, node_id)
            self._event(conn, node_id, "drain_requested", node.status, "", now)
            return node

    def finish_drains(self, now: datetime, removed_by: str) -> list[str]:
        active = (
            select(Task.id)
            .where(Task.assigned_node_id == Node.id, Task.status.in_(("assigned", "running")))
            .exists()
        )
        with self._write() as conn:
            rows = conn.execute(
                select(Node.id, Node.drain_deadline)
                .where(Node.drain_requested == true(), or_(~active, Node.drain_deadline < now))
                .order_by(Node.id)
                # PostgreSQL: two instances finishing drains never remove one node twice.
                .with_for_update(skip_locked=True)
            ).all()
            for row in rows:
                late = row.drain_deadline is not None and row.drain_deadline < now
                reason = "drain deadline passed" if late else "drained"
                self._remove(conn, row.id, removed_by, reason, now)
        return [row.id for row in rows]

    def readmit_node(self, node_id: str, actor: str) -> None:
        with self._write() as conn:
            result = conn.execute(delete(RemovedNode).where(RemovedNode.node_id == node_id))
            if result.rowcount == 0:
                raise NotFound("the node id was not removed")
            self._event(conn, node_id, "readmitted", "offline", actor, self._now())

    def fail_silent_nodes(self, older_than: datetime) -> tuple[list[str], list[str]]:
        seen = func.coalesce(Node.last_heartbeat, Node.registered_at)
        now = self._now()
        with self._write() as conn:
            rows = conn.execute(
                update(Node)
                .where(Node.status != "offline", seen < older_than)
                .values(status="offline", updated_at=now)
                .returning(Node.id)
            ).all()
            node_ids = sorted(row[0] for row in rows)
            if not node_ids:
                return [], []
            conn.execute(
                insert(NodeEvent),
                [
                    {
                        "node_id": node_id,
                        "at": now,
                        "event": "offline",
                        "status": "offline",
                        "detail": "no heartbeat",
                    }
                    for node_id in node_ids
                ],
            )
            tasks = requeue_tasks(conn, Task.assigned_node_id.in_(node_ids), "node lost", now)
        return node_ids, tasks

    def mark_node_online(self, node_id: str, at: datetime) -> bool:
        with self._write() as conn:
            result = conn.execute(
                update(Node)
                .where(Node.id == node_id, Node.status == "offline")
                .values(
                    status=case((Node.drain_requested == true(), "draining"), else_="online"),
                    last_heartbeat=at,
                    updated_at=at,
                )
            )
            if result.rowcount == 0:
                return False
            status = conn.scalar(select(Node.status).where(Node.id == node_id))
            self._event(conn, node_id, "online", str(status), "heartbeat resumed", at)
            return True

    def list_node_events(
        self, node_id: str, *, limit: int = 100, cursor: str | None = None
    ) -> Page[NodeEventRecord]:
        limit = check_limit(limit)
        query = (
            select(*_EVENT_COLUMNS)
            .where(NodeEvent.node_id == node_id)
            .order_by(NodeEvent.id.desc())
            .limit(limit + 1)
        )
        if cursor is not None:
            query = query.where(NodeEvent.id < decode_int_cursor(cursor))
        with self._read() as conn:
            rows = conn.execute(query).all()
        items = [NodeEventRecord(**row._mapping) for row in rows[:limit]]
        more = len(rows) > limit
        return Page(items, encode_cursor(str(items[-1].id)) if more else None)

    def node_events_since(self, after_id: int, *, limit: int = 1000) -> list[NodeEventRecord]:
        query = (
            select(*_EVENT_COLUMNS)
            .where(NodeEvent.id > after_id)
            .order_by(NodeEvent.id)
            .limit(check_limit(limit))
        )
        with self._read() as conn:
            return [NodeEventRecord(**row._mapping) for row in conn.execute(query)]

    def last_node_event_id(self) -> int:
        with self._read() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(NodeEvent.id), 0))) or 0)

    def get_nodes(self, node_ids: Sequence[str]) -> list[NodeRecord]:
        if not node_ids:
            return []
        query = self._node_query().where(Node.id.in_(sorted(set(node_ids))))
        with self._read() as conn:
            return [_node(row) for row in conn.execute(query)]

    def pool_stats(self) -> PoolStats:
        with self._read() as conn:
            nodes = dict(
                conn.execute(select(Node.status, func.count()).group_by(Node.status)).all()
            )
            tasks = dict(
                conn.execute(
                    select(Task.status, func.count())
                    .where(Task.status.in_(("pending", "assigned", "running")))
                    .group_by(Task.status)
                ).all()
            )
            slots = conn.scalar(
                select(func.coalesce(func.sum(Node.task_slots), 0)).where(
                    Node.status.in_(("online", "busy"))
                )
            )
        return PoolStats(
            {str(k): int(v) for k, v in nodes.items()},
            {str(k): int(v) for k, v in tasks.items()},
            int(slots or 0),
        )

    @staticmethod
    def _event(
        conn: Connection, node_id: str, event: str, status: str, detail: str, at: datetime
    ) -> None:
        conn.execute(
            insert(NodeEvent).values(
                node_id=node_id, at=at, event=event, status=status, detail=detail[:255]
            )
        )

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
                # Only mark_node_online brings an offline node back (with its event), and
                # a draining node stays draining whatever it reports.
                status=case(
                    (Node.status == "offline", "offline"),
                    (Node.drain_requested == true(), "draining"),
                    else_=bindparam("b_status"),
                ),
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
