"""Engines and sessions for the configured database (SQLite embedded, PostgreSQL distributed)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Lock

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from covid_cxr.settings import Settings

_engines: dict[str, Engine] = {}
_lock = Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    # WAL lets the watcher, the worker and analysts read while one process writes;
    # busy_timeout makes concurrent writers wait instead of failing.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def engine_for_url(url: str) -> Engine:
    """One engine per URL and process (engines are not fork-safe: call after forking)."""
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            parsed = make_url(url)
            if parsed.get_backend_name() == "sqlite":
                if parsed.database and parsed.database != ":memory:":
                    Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 30})
                event.listen(engine, "connect", _sqlite_pragmas)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return engine


def create_engine_for(settings: Settings) -> Engine:
    return engine_for_url(settings.database)


def dispose_engines() -> None:
    """Drop pooled connections, e.g. in a child process after fork."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=False)
        _engines.clear()
        _factories.clear()


_factories: dict[Engine, sessionmaker[Session]] = {}


def _session_factory(engine: Engine) -> sessionmaker[Session]:
    """One session factory per engine: ``sessionmaker`` builds a new Session class each time it is called."""
    with _lock:
        factory = _factories.get(engine)
        if factory is None:
            factory = _factories[engine] = sessionmaker(bind=engine, expire_on_commit=False)
        return factory


@contextmanager
def session_scope(settings: Settings) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    session = _session_factory(create_engine_for(settings))()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()
