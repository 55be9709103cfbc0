"""What differs between the two databases of the job table, and nothing else: the engine, how a transaction
takes its locks, one owner's submits at a time, an ``INSERT`` that leaves a row already there, and bringing
the schema to the newest migration.

Statements themselves are written once (:mod:`gateway.store.store`): a claim's ``FOR UPDATE SKIP LOCKED``
is PostgreSQL's way to hand a row to one gateway only, and SQLAlchemy leaves it out on SQLite, whose
``BEGIN IMMEDIATE`` transactions run one at a time.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, Engine, Table, create_engine, event, inspect, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.pool import StaticPool

from gateway.store.records import StoreUnavailable
from gateway.store.schema import metadata

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MIGRATION_LOCK = 0x6C697073  # any constant shared by every gateway: the advisory lock of schema upgrades
_WRITE = "lipsync_write"
"""Execution option: whether an SQLite transaction writes (``BEGIN IMMEDIATE``) or only reads."""


def sqlite_url(path: Path) -> str:
    """The SQLAlchemy URL of the SQLite job table at ``path``."""
    return f"sqlite:///{path}"


def upgrade(connection: Connection) -> None:
    """Bring the schema to the newest revision, on ``connection`` (inside its transaction)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class Dialect:
    """The engine of one database and the few things done differently on it."""

    engine: Engine

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Connection]:
        """One transaction, committed when the block ends, rolled back if it raises. ``write=False``:
        the block only reads."""
        with self.engine.begin() as db:
            yield db

    def lock_owner(self, db: Connection, owner: str) -> None:
        """Until the transaction ends, no other transaction of ``owner`` passes this point (a quota's count
        and the insert it allows stay together)."""

    def insert(self, table: Table) -> Any:
        """An ``INSERT`` construct with ``on_conflict_do_nothing``."""
        raise NotImplementedError

    def migrate(self) -> None:
        """Bring the schema to the newest revision; safe when several gateways open the table at once."""
        with self.transaction() as db:
            upgrade(db)

    def close(self) -> None:
        self.engine.dispose()


class Postgres(Dialect):
    """A pool of connections; READ COMMITTED transactions. Gateways sharing the table migrate it under an
    advisory lock, so that those starting together migrate once."""

    def __init__(self, url: str, pool_size: int) -> None:
        # Connections beyond pool_size (up to as many again) are closed when handed back: under a load
        # that needs them, every request would pay a new connection.
        self.engine = create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Connection]:
        """A server out of reach (refused or lost connection, shutting down) raises :class:`StoreUnavailable`;
        a pooled connection the server dropped is replaced at its next checkout (``pool_pre_ping``), so
        calls succeed again as soon as the server is back."""
        try:
            with self.engine.begin() as db:
                yield db
        except (OperationalError, InterfaceError) as exc:
            raise StoreUnavailable(_first_line(exc)) from exc

    def lock_owner(self, db: Connection, owner: str) -> None:
        db.execute(text("SELECT pg_advisory_xact_lock(hashtext(:owner))"), {"owner": owner})

    def insert(self, table: Table) -> Any:
        return postgresql.insert(table)

    def migrate(self) -> None:
        with self.transaction() as db:
            db.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _MIGRATION_LOCK})
            upgrade(db)


class Sqlite(Dialect):
    """``jobs.db`` in WAL mode with ``synchronous=FULL`` (a commit is on disk before a client hears of it):
    one connection for the process, its transactions serialised by a lock; a transaction that writes
    starts with ``BEGIN IMMEDIATE``, so it holds the file's write lock from its first statement, and
    reads run in autocommit."""

    def __init__(self, url: str) -> None:
        path = Path(make_url(url).database or "")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.engine = create_engine(
            url,
            poolclass=StaticPool,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        self._lock = threading.Lock()
        event.listen(self.engine, "connect", _sqlite_connect)
        event.listen(self.engine, "begin", _sqlite_begin)

    @contextmanager
    def transaction(self, write: bool = True) -> Iterator[Connection]:
        with self._lock, self.engine.connect() as db, db.execution_options(**{_WRITE: write}).begin():
            yield db

    def insert(self, table: Table) -> Any:
        return sqlite.insert(table)

    def migrate(self) -> None:
        """A ``jobs.db`` made before migrations (no ``alembic_version``) has its tables renamed, the
        newest schema made, and its rows copied over, column by column as far as it has them."""
        with self.transaction() as db:
            present = set(inspect(db).get_table_names())
            legacy = [] if "alembic_version" in present else [t for t in metadata.sorted_tables if t.name in present]
            for table in legacy:
                for index in inspect(db).get_indexes(table.name):
                    db.exec_driver_sql(f'DROP INDEX "{index["name"]}"')
                db.exec_driver_sql(f'ALTER TABLE "{table.name}" RENAME TO "legacy_{table.name}"')
            upgrade(db)
            for table in legacy:
                kept = [c["name"] for c in inspect(db).get_columns(f"legacy_{table.name}") if c["name"] in table.c]
                columns = ", ".join(f'"{name}"' for name in kept)
                db.exec_driver_sql(
                    f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "legacy_{table.name}"'
                )
                db.exec_driver_sql(f'DROP TABLE "legacy_{table.name}"')


def _first_line(error: OperationalError | InterfaceError) -> str:
    """The driver's own message, first line (no SQL, no parameters)."""
    lines = str(error.orig or type(error).__name__).strip().splitlines()
    return lines[0] if lines else type(error).__name__


_WAL_SWITCH_S = 10.0
"""How long a new connection keeps trying to put the database in WAL mode while another one holds it."""


def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # the driver's own BEGINs off: _sqlite_begin says which
    # Two gateways opening one new database at once: SQLite answers "locked" to one of them at once (no busy
    # wait, to avoid a lock-upgrade deadlock) while the other switches the file to WAL or migrates it.
    deadline = time.monotonic() + _WAL_SWITCH_S
    while True:
        try:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")
            break
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    dbapi_connection.execute("PRAGMA synchronous=FULL")


def _sqlite_begin(db: Connection) -> None:
    """A transaction that writes holds the write lock from its start; one that only reads runs its statements
    in autocommit (each is consistent in itself, and this process's transactions take turns anyway)."""
    if db.get_execution_options().get(_WRITE, True):
        db.exec_driver_sql("BEGIN IMMEDIATE")


def dialect_for(url: str, pool_size: int) -> Dialect:
    """:class:`Postgres` for a ``postgresql…`` URL (``pool_size`` connections kept open), :class:`Sqlite` for
    a ``sqlite…`` one."""
    name = make_url(url).get_backend_name()
    if name == "postgresql":
        return Postgres(url, pool_size)
    if name == "sqlite":
        return Sqlite(url)
    raise ValueError(f"database_url: {name!r} is not supported (postgresql+psycopg://… or empty for SQLite)")
