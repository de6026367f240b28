"""Persistence: SQLAlchemy 2 async over SQLite (embedded) or PostgreSQL, with Alembic migrations."""

from broker.store.repo import Store, Tx

__all__ = ["Store", "Tx"]
