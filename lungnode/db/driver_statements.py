"""Core statements run on SQLite's own connection, for the ingest hot path.

Receiving an instance writes its row and touches its series: three short
statements in one transaction, once per instance. Through SQLAlchemy's
execution (an execution context, a cursor result and its metadata for each
statement) they cost about twice what SQLite itself takes to run them
(``docs/benchmarks.md``). :func:`execute` runs such a statement on the driver's
connection instead, inside the transaction the caller's Connection has begun
(``db.session.write_connection``). What reaches SQLite is what SQLAlchemy would
send: the SQL text is SQLAlchemy's compilation for the dialect, compiled once
per statement and set of parameter names, and every value goes through its
type's bind processor (a UTC timestamp's text, a JSON list's encoding). A driver
error is raised as SQLAlchemy raises it (``IntegrityError`` and the rest, the
driver's error as the cause).

Only what that covers takes this path: a statement whose compiled form needs
nothing computed at execution (no Python-side column default or ``onupdate`` to
fill, no RETURNING), on the ``pysqlite`` driver. Everything else, and every
other database, runs through Core as before.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

#: One positional parameter: its name, its bind processor, and the value a
#: parameter the caller does not give takes (a literal of the statement).
_Parameter = tuple[str, Callable[[Any], Any] | None, bool, Any]


@dataclass(frozen=True)
class _DriverForm:
    sql: str
    parameters: tuple[_Parameter, ...]

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        values = []
        for name, process, given, literal in self.parameters:
            value = params[name] if given else literal
            values.append(process(value) if process is not None else value)
        return values


#: Compiled forms by statement and parameter names. Meant for statements built once
#: (module constants); past the bound, the forms are compiled afresh.
_forms: dict[tuple[ClauseElement, frozenset[str]], _DriverForm | None] = {}
_forms_lock = threading.Lock()
_MAX_FORMS = 256


def execute(connection: Connection, statement: ClauseElement, params: Mapping[str, Any]) -> int:
    """Run ``statement`` with ``params`` in ``connection``'s transaction; its row count."""
    form = _driver_form(connection, statement, params) if _on_pysqlite(connection) else None
    if form is None:
        result = connection.execute(cast(Any, statement), dict(params))
        return int(result.rowcount)
    return int(execute_driver_sql(connection, form.sql, form.arguments(params)).rowcount)


def execute_driver_sql(
    connection: Connection, sql: str, arguments: Sequence[Any] = ()
) -> sqlite3.Cursor:
    """Run ``sql`` on the ``pysqlite`` connection under ``connection``, as SQLAlchemy's
    ``exec_driver_sql`` would but without its execution context; errors as it raises them."""
    driver = cast(sqlite3.Connection, connection.connection.driver_connection)
    try:
        return driver.execute(sql, arguments)
    except sqlite3.Error as error:
        raise DBAPIError.instance(sql, list(arguments), error, sqlite3.Error) from error


def _on_pysqlite(connection: Connection) -> bool:
    return connection.dialect.name == "sqlite" and connection.dialect.driver == "pysqlite"


def _driver_form(
    connection: Connection, statement: ClauseElement, params: Mapping[str, Any]
) -> _DriverForm | None:
    key = (statement, frozenset(params))
    with _forms_lock:
        if key in _forms:
            return _forms[key]
    form = _compile(connection, statement, key[1])
    with _forms_lock:
        if len(_forms) >= _MAX_FORMS:
            _forms.clear()
        _forms[key] = form
    return form


def _compile(
    connection: Connection, statement: ClauseElement, names: frozenset[str]
) -> _DriverForm | None:
    """The statement's SQL and parameters for the driver, or None where Core must run it."""
    dialect = connection.dialect
    compiled = statement.compile(dialect=dialect, column_keys=sorted(names))
    if not isinstance(compiled, SQLCompiler) or compiled.positiontup is None:
        return None
    if compiled.insert_prefetch or compiled.update_prefetch or compiled.effective_returning:
        return None  # a default to compute, or rows to return: SQLAlchemy's own work
    parameters: list[_Parameter] = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        given = name in names
        if not given and bind.required:
            return None  # Core raises its own error for a missing parameter
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        parameters.append((name, process, given, None if given else bind.effective_value))
    return _DriverForm(compiled.string, tuple(parameters))
