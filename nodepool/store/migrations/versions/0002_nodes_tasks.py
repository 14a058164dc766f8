"""Nodes and tasks grow what the scheduler needs; node history, removals, task attempts;
device-bound API keys; an index for the per-second revoked-session poll.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("nodes") as batch:
        batch.add_column(sa.Column("drain_deadline", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("task_slots", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(
            sa.Column("priority", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("required_labels", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("exit_code", sa.Integer(), nullable=True))
    op.create_index(
        "idx_tasks_status_user_priority",
        "tasks",
        ["status", "user_id", "priority", "created_at", "id"],
    )
    op.drop_index("idx_tasks_assigned_node_id", table_name="tasks")
    op.create_index("idx_tasks_assigned_node_id_status", "tasks", ["assigned_node_id", "status"])
    op.create_index("idx_tasks_status_assigned_node_id", "tasks", ["status", "assigned_node_id"])
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("bound_device", sa.String(length=255), nullable=True))
    op.create_index("idx_refresh_sessions_revoked_at", "refresh_sessions", ["revoked_at"])
    op.create_table(
        "node_events",
        sa.Column("id", _BIG_ID, autoincrement=True, nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column("event", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.String(length=255), server_default=sa.text("''"), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_node_events")),
    )
    op.create_index("idx_node_events_node_id_id", "node_events", ["node_id", "id"])
    op.create_table(
        "task_attempts",
        sa.Column("task_id", sa.String(length=32), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column(
            "assigned_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["task_id"],
            ["tasks.id"],
            name=op.f("fk_task_attempts_task_id_tasks"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("task_id", "attempt", name=op.f("pk_task_attempts")),
    )
    op.create_table(
        "removed_nodes",
        sa.Column("node_id", sa.String(length=128), nullable=False),
        sa.Column(
            "removed_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("removed_by", sa.String(length=255), nullable=False),
        sa.Column("reason", sa.String(length=255), server_default=sa.text("''"), nullable=False),
        sa.PrimaryKeyConstraint("node_id", name=op.f("pk_removed_nodes")),
    )


def downgrade() -> None:
    op.drop_table("removed_nodes")
    op.drop_table("task_attempts")
    op.drop_index("idx_node_events_node_id_id", table_name="node_events")
    op.drop_table("node_events")
    op.drop_index("idx_refresh_sessions_revoked_at", table_name="refresh_sessions")
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("bound_device")
    op.drop_index("idx_tasks_status_user_priority", table_name="tasks")
    op.drop_index("idx_tasks_status_assigned_node_id", table_name="tasks")
    op.drop_index("idx_tasks_assigned_node_id_status", table_name="tasks")
    op.create_index("idx_tasks_assigned_node_id", "tasks", ["assigned_node_id"])
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("exit_code")
        batch.drop_column("required_labels")
        batch.drop_column("priority")
    with op.batch_alter_table("nodes") as batch:
        batch.drop_column("task_slots")
        batch.drop_column("drain_deadline")
