"""Insert-or-ignore and insert-or-update on a unique key, in the two databases covid-cxr runs on.

Redelivered tasks and re-run jobs write the same rows again; these statements make that idempotent
without a read first. SQLite and PostgreSQL spell ``ON CONFLICT`` alike but SQLAlchemy builds it per
dialect, so any other database is refused with a clear error instead of a guessed statement.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from covid_cxr.errors import DatabaseError
from covid_cxr.reasons import Reason
from db.models import Base


def insert_or_ignore(session: Session, table: type[Base], rows: Sequence[Mapping[str, Any]],
                     key: Sequence[str]) -> None:
    """Insert ``rows``, leaving any row whose ``key`` columns match an existing one untouched.

    A database other than SQLite or PostgreSQL raises :class:`DatabaseError` (``unsupported_dialect``).
    """
    if rows:
        session.execute(_insert(session, table).on_conflict_do_nothing(index_elements=list(key)), list(rows))


def insert_or_update(session: Session, table: type[Base], rows: Sequence[Mapping[str, Any]],
                     key: Sequence[str], update: Sequence[str] | None = None) -> None:
    """Insert ``rows``; a row whose ``key`` columns match an existing one gets the other columns given here.

    ``update`` narrows what an existing row takes (e.g. not its first-seen time). Every row names
    the same columns. A database other than SQLite or PostgreSQL raises :class:`DatabaseError`
    (``unsupported_dialect``).
    """
    if rows:
        statement = _insert(session, table)
        names = update if update is not None else [name for name in rows[0] if name not in key]
        updated = {name: statement.excluded[name] for name in names}
        session.execute(statement.on_conflict_do_update(index_elements=list(key), set_=updated), list(rows))


def _insert(session: Session, table: type[Base]) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT without values: the rows go as parameters, so the compiled statement is cached
    (a statement with the rows in its VALUES was compiled anew each time, about 1.4 ms)."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise DatabaseError(f"no upsert for database dialect {dialect!r}: use SQLite or PostgreSQL",
                        reason=Reason.UNSUPPORTED_DIALECT)
