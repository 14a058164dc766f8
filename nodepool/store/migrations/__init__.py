"""Alembic migrations for the Node Pool database (run by ``nodepool.store.migrate``)."""
