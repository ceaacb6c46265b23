"""Which errors mean the job store could not be reached: a connection cut, a database
restarting or refusing logins. The gateway answers them UNAVAILABLE with RetryInfo; the
scheduler writes an attempt's ending again until the store takes it."""

from __future__ import annotations

from sqlalchemy import exc as sql_errors


def _unreachable_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [sql_errors.OperationalError, sql_errors.InterfaceError,
                                         sql_errors.DisconnectionError, sql_errors.TimeoutError]
    try:
        import psycopg  # the PostgreSQL driver; the store's listener uses it directly
    except ImportError:
        pass
    else:
        errors += [psycopg.OperationalError, psycopg.InterfaceError]
    return tuple(errors)


UNREACHABLE_ERRORS = _unreachable_errors()


def store_unreachable(error: BaseException) -> bool:
    return isinstance(error, UNREACHABLE_ERRORS) or (
        isinstance(error, sql_errors.DBAPIError) and error.connection_invalidated)
