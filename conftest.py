"""The pytest fixtures: a real PostgreSQL (one cluster for the session, a fresh
database per test, or a cluster of the test's own) and the real server in a
subprocess. What they are built from, and the clients the tests use, is in testkit.py.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from pathlib import Path

import pytest

from testkit import SERVER_SCRIPT, TRIGGER_SQL, PgCluster, ServerProcess, pg_execute


@pytest.fixture(scope="session")
def pg():
    """One cluster for the session, with a template database that has trigger.sql applied."""
    cluster = PgCluster()
    cluster.start()
    asyncio.run(_make_template(cluster))
    yield cluster
    cluster.destroy()


async def _make_template(cluster: PgCluster) -> None:
    await pg_execute(cluster.dsn(), "CREATE DATABASE torncat_template")
    await pg_execute(cluster.dsn("torncat_template"), TRIGGER_SQL)


@pytest.fixture
def own_pg():
    """A cluster of the test's own, durable, that the test may kill or freeze."""
    cluster = PgCluster(durable=True)
    cluster.start()
    asyncio.run(pg_execute(cluster.dsn(), TRIGGER_SQL))
    yield cluster
    cluster.destroy()


_db_numbers = itertools.count(1)


@pytest.fixture
def db(pg):
    """A fresh database (from the template) for one test; yields its DSN."""
    name = f"t{os.getpid()}_{next(_db_numbers)}"
    asyncio.run(pg_execute(pg.dsn(), f"CREATE DATABASE {name} TEMPLATE torncat_template"))
    yield pg.dsn(name)
    asyncio.run(pg_execute(pg.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
def start_server():
    """Factory: start_server(DATABASE_URL=..., SECRET_TOKEN=...) -> ServerProcess.

    OPEN_ACCESS=1 unless a test says otherwise: most tests are about streams, not
    tokens, and run against a DATABASE_URL, where the server is closed by default.
    A test of that default passes OPEN_ACCESS="" (unset). `script` runs another copy of
    the server file (a deploy of another version: the userscript it serves is the one
    beside it)."""
    started: list[ServerProcess] = []

    def start(*args: str, script: Path = SERVER_SCRIPT, **env: str) -> ServerProcess:
        env.setdefault("OPEN_ACCESS", "1")
        server = ServerProcess({k: str(v) for k, v in env.items()}, list(args), script=script)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(timeout=5)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Each phase's report on the test item, so that a fixture can tell, as it tears down,
    that its test failed (and say what it saw: test_userscript's harness does)."""
    report = yield
    setattr(item, f"report_{report.when}", report)
    return report
