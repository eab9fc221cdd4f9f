"""Tests for torncat_sse.py and trigger.sql.

The sections mirror the server's, in its order (settings, wire format, access, hub,
database, Torn's API, the HTTP side, main), after the helpers they share; then the
server file's layout and the docs. Within a section, byte-exact unit tests of the pure
functions (no sockets) come first, then integration tests of the real server (a
subprocess on port 0) against a real PostgreSQL, over real sockets. Tests wait on
events with short timeouts through the kit (testkit.wait_until), never on sleeps;
"nothing arrived" is proved with a short timeout. docs/testing.md maps each section
to the server's.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import datetime
import json
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import symtable
import sys
import time
from pathlib import Path

import asyncpg
import pytest

import torncat_sse as t
from fake_torn import FORGED_LOG_LINE, FakeTorn
from testkit import (
    DEBIAN_PG_BIN,
    HERE,
    STEP_TIMEOUT,
    TRIGGER_SQL,
    PgCluster,
    SseClient,
    free_port,
    http,
    http_raw,
    make_tls_files,
    pg_execute,
    raise_nofile_limit,
    read_response_head,
    run_cli,
    sse_clients,
    wait_until,
    wait_until_sync,
)

# ---------------------------------------------------------------------------
# Shared: helpers and fixtures of the sections below
# ---------------------------------------------------------------------------

def head(*lines: str) -> bytes:
    return "\r\n".join(lines).encode("latin-1")


def _req(target: str, **headers: str) -> t.Request:
    lines = [f"GET {target} HTTP/1.1", "Host: x", *(f"{k}: {v}" for k, v in headers.items())]
    return t.parse_request_head(head(*lines))


def _status(auth: t.Auth, req: t.Request) -> int:
    with pytest.raises(t.HttpError) as e:
        auth.grant(req, time.time())
    assert "s3cret" not in e.value.message
    return e.value.status


RED, BLUE = "red-faction-token-0123456789", "blue-faction-token-0123456789"


RED_ID, BLUE_ID = 111, 222


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def conn(db):
    connection = await asyncpg.connect(db)
    yield connection
    await connection.close()


@pytest.fixture
def live_server(start_server, db):
    """Factory: a server on the test's database, waited on until its listener is live."""
    def start(*args, **env):
        env.setdefault("DATABASE_URL", db)
        server = start_server(*args, **env)
        server.wait_for_log("postgres listener live")
        return server
    return start


@pytest.fixture
def factions(live_server):
    """A server with two factions' tokens."""
    return live_server(FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")


async def call(conn, caller_id: int, target_id: int, **columns) -> int:
    names = ["caller_id", "target_id", *columns]
    values = [caller_id, target_id, *columns.values()]
    placeholders = ", ".join(f"${i + 1}" for i in range(len(values)))
    return await conn.fetchval(f"INSERT INTO target_calls ({', '.join(names)}) "
                               f"VALUES ({placeholders}) RETURNING id", *values)


async def post_call(port, token, target_id, caller_id=1, caller_name="Ann", **extra):
    body = {"target_id": target_id, "caller_id": caller_id, "caller_name": caller_name, **extra}
    return await http(port, "POST", "/calls", bearer(token), body)


async def table_state(conn) -> tuple:
    return (await conn.fetch("SELECT * FROM target_calls ORDER BY id"),
            await conn.fetch("SELECT event_id FROM target_call_events ORDER BY event_id"))


async def applied(server, event_id: int) -> None:
    """Wait until the server has read `event_id` from the log (it reads on each NOTIFY)."""
    async def read() -> bool:
        return (await http(server.port, "GET", "/healthz")).json()["last_event_id"] >= event_id

    await wait_until(read, what=f"event {event_id} applied")


async def drain(client: SseClient, until_id: int) -> list[int]:
    """Event ids (snapshots excluded) a client receives until it has seen `until_id`."""
    ids: list[int] = []
    while not ids or ids[-1] < until_id:
        ev = await client.next()
        if ev.event != "snapshot":
            ids.append(ev.int_id)
    return ids


async def all_event_ids(dsn: str) -> list[int]:
    c = await asyncpg.connect(dsn)
    try:
        return [r[0] for r in await c.fetch("SELECT event_id FROM target_call_events ORDER BY 1")]
    finally:
        await c.close()


class LongPoll:
    """One keep-alive connection for `GET /calls?since=N&wait=S` requests."""

    def __init__(self, port: int, token: str | None):
        self.port, self.token = port, token

    async def __aenter__(self) -> LongPoll:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.writer.close()

    def send(self, since: int | None, wait: int | None = 30, **headers: str) -> None:
        query = "&".join(f"{k}={v}" for k, v in (("since", since), ("wait", wait)) if v is not None)
        if self.token:
            headers.setdefault("Authorization", f"Bearer {self.token}")
        self.writer.write(f"GET /calls?{query} HTTP/1.1\r\nHost: x\r\n".encode() + "".join(
            f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n")

    async def answer(self, timeout: float = STEP_TIMEOUT) -> tuple[int, dict[str, str], dict]:
        status, headers = await asyncio.wait_for(read_response_head(self.reader), timeout)
        body = await asyncio.wait_for(self.reader.readexactly(int(headers["content-length"])),
                                      STEP_TIMEOUT)
        return status, headers, json.loads(body)


async def held_count(port: int, n: int) -> bool:
    return (await http(port, "GET", "/healthz")).json()["long_polls"] == n


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def server_fds_and_rss(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/fd")), rss_bytes(pid)


def metric_value(metrics: bytes, name: str) -> int:
    m = re.search(rb"^torncat_" + name.encode() + rb" (\d+)", metrics, re.MULTILINE)
    return int(m.group(1)) if m else -1


FAST_PROBES = {"PROBE_INTERVAL_SECONDS": "0.3", "PROBE_TIMEOUT_SECONDS": "0.5"}


async def insert_through_faults(dsn: str, targets, during=None) -> None:
    """Insert one call per target, reconnecting through failures; runs `during` mid-way."""
    conn = None

    async def inserted(target: int) -> bool:
        nonlocal conn
        try:
            if conn is None or conn.is_closed():
                conn = await asyncpg.connect(dsn, timeout=2)
            await conn.execute("INSERT INTO target_calls (caller_id, target_id) "
                               "VALUES (1, $1)", target)
        except asyncpg.UniqueViolationError:
            return True  # it did commit before the crash
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            # Unknown outcome when the server died mid-statement: the event log says.
            conn = None
            return False
        return True

    deadline = time.monotonic() + 60  # for them all
    for i, target in enumerate(targets):
        if during is not None and i == len(targets) // 3:
            await during()
        await wait_until(lambda target=target: inserted(target),
                         timeout=max(0.0, deadline - time.monotonic()),
                         what=f"every insert within 60 s (target {target})")
    if conn is not None:
        await conn.close()


class PgBouncer:
    """A real pgbouncer (Debian's package) in front of a cluster."""

    def __init__(self, cluster: PgCluster, pool_mode: str):
        import tempfile
        self.dir = Path(tempfile.mkdtemp(prefix="torncat-pgbouncer-"))
        self.dir.chmod(0o777)
        self.port = free_port()
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            f"[databases]\n* = host=127.0.0.1 port={cluster.port}\n"
            f"[pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
            f"auth_type = trust\nauth_file = {self.dir}/users.txt\npool_mode = {pool_mode}\n"
            f"unix_socket_dir =\nlogfile = {self.dir}/pgbouncer.log\n")
        user = "embedded_postgres" if os.geteuid() == 0 else None  # it refuses to run as root
        self.proc = subprocess.Popen(["pgbouncer", str(self.dir / "pgbouncer.ini")], user=user,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def listening() -> bool:
            assert self.proc.poll() is None, "pgbouncer exited"
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until_sync(listening, what="pgbouncer listening")

    def dsn(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
async def torn():
    """A fake Torn API on loopback: factions RED_ID and BLUE_ID, and their players."""
    fake = await FakeTorn().start()
    fake.add_faction(RED_ID, "Red")
    fake.add_faction(BLUE_ID, "Blue")
    yield fake
    await fake.stop()


@pytest.fixture
def torn_server(live_server, torn):
    """Factory: a server asking the fake Torn, with faction RED_ID on it (FACTIONS)."""
    def start(**env):
        env.setdefault("TORN_API_URL", torn.base_url)
        env.setdefault("FACTIONS", str(RED_ID))
        env.setdefault("SIGNINS_PER_MINUTE", "600")  # tests sign in from one address
        return live_server(**env)
    return start


async def sign_in(port: int, key: str, headers: dict[str, str] | None = None):
    return await http(port, "POST", "/auth/torn", headers or {}, {"key": key})


# ---------------------------------------------------------------------------
# Settings and limits
# ---------------------------------------------------------------------------

def test_public_url_setting_falls_back_to_renders_and_refuses_more_than_an_origin():
    assert t.parse_settings([], {}).public_url == ""
    render = {"RENDER_EXTERNAL_URL": "https://torncat-sse.onrender.com"}
    assert t.parse_settings([], render).public_url == "https://torncat-sse.onrender.com"
    assert t.parse_settings([], {**render, "PUBLIC_URL": "https://Calls.Example:8443/"}).public_url == \
        "https://calls.example:8443"
    for bad in ("ftp://x.example", "https://x.example/path", "https://x.example?a=1", "https://u@x.example",
                "https://x.example'"):
        with pytest.raises(ValueError):
            t._public_url(bad)


def test_faction_tokens_setting():
    config = t.parse_settings([], {"FACTION_TOKENS": "12:aaaaaaaaaaaaaaaa, 34:bbbbbbbbbbbbbbbbbb"})
    assert config.faction_tokens == ((12, "aaaaaaaaaaaaaaaa"), (34, "bbbbbbbbbbbbbbbbbb"))
    assert t.parse_settings([], {}).faction_tokens == ()


def test_settings_from_environment_and_flags():
    config = t.parse_settings(["--port", "4000"], {"PORT": "5000", "SECRET_TOKEN": "x",
                                                   "ALLOWED_ORIGINS": "https://a.example, https://B.example/",
                                                   "INIT_DB": "yes"})
    assert config.port == 4000 and config.secret_token == "x" and config.init_db is True
    assert config.allowed_origins == ("https://a.example", "https://b.example")
    defaults = t.parse_settings([], {})
    assert (defaults.host, defaults.port, defaults.retry_ms, defaults.keepalive_seconds) == (
        "0.0.0.0", 3000, 10000, 10)
    assert defaults.allowed_origins == ("https://www.torn.com",) and defaults.init_db is False
    assert t.parse_settings(["--init-db"], {}).init_db is True


@pytest.mark.parametrize(("argv", "env", "message"), [
    ([], {"PORT": "abc"}, "PORT='abc'"),
    (["--port", "70000"], {}, "PORT='70000'"),
    ([], {"ALLOWED_ORIGINS": "*"}, "not allowed"),
    ([], {"ALLOWED_ORIGINS": "torn.com"}, "not an origin"),
    ([], {"CLIENT_BUFFER_BYTES": "0"}, "at least 1"),
    ([], {"FACTION_TOKENS": "12:short"}, "shorter than 16"),
    ([], {"FACTION_TOKENS": "abc:aaaaaaaaaaaaaaaaaaaa"}, "<faction_id>:<token>"),
    ([], {"DATABASE_URL": ""}, None),
])
def test_settings_errors_name_the_setting(argv, env, message, capsys):
    if message is None:
        t.parse_settings(argv, env)
        return
    with pytest.raises(SystemExit) as e:
        t.parse_settings(argv, env)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_torn_api_url_is_https_except_on_loopback():
    assert t.parse_settings([], {}).torn_api_url == "https://api.torn.com/v2"
    assert t.parse_settings(["--torn-api-url", "http://127.0.0.1:8099/v2/"], {}).torn_api_url == (
        "http://127.0.0.1:8099/v2")
    for url in ("http://api.torn.com/v2", "ftp://x/v2", "https://api.torn.com/v2?key=x"):
        with pytest.raises(SystemExit):
            t.parse_settings(["--torn-api-url", url], {})


def test_help_lists_every_setting():
    r = run_cli("--help")
    assert r.returncode == 0
    for s in t.SETTINGS:
        assert "--" + s.name.lower().replace("_", "-") in r.stdout and s.name in r.stdout
    assert "token" in r.stdout


def test_bad_settings_exit_2_with_one_clear_line():
    r = run_cli(PORT="abc")
    assert r.returncode == 2
    assert "PORT='abc'" in r.stderr and "Traceback" not in r.stderr


# ---------------------------------------------------------------------------
# Wire format: HTTP/1.1, Server-Sent Events, CORS, JSON bodies
# ---------------------------------------------------------------------------

USERSCRIPT_TEXT = (HERE / "torn-war-caller.user.js").read_text()


def test_the_served_userscript_names_this_server_and_keeps_the_rest():
    served = t.userscript_for(USERSCRIPT_TEXT, "https://calls.example:8443").decode()
    metadata, _, rest = served.partition("// ==/UserScript==")
    link = "https://calls.example:8443/torn-war-caller.user.js"
    assert re.findall(r"^// @connect +(\S+)$", metadata, re.MULTILINE) == ["calls.example"]
    assert f"// @updateURL    {link}\n" in metadata and f"// @downloadURL  {link}\n" in metadata
    assert "  const DEFAULT_SERVER = 'https://calls.example:8443';\n" in rest
    # Nothing else changes: the same lines, one fewer @connect at most.
    before = [line for line in USERSCRIPT_TEXT.split("\n") if not line.startswith(
        ("// @connect", "// @updateURL", "// @downloadURL", "  const DEFAULT_SERVER"))]
    after = [line for line in served.split("\n") if not line.startswith(
        ("// @connect", "// @updateURL", "// @downloadURL", "  const DEFAULT_SERVER"))]
    assert before == after


@pytest.mark.parametrize(("headers", "proxies", "origin"), [
    ({"host": "calls.example"}, 0, "http://calls.example"),
    ({"host": "127.0.0.1:3000", "x-forwarded-proto": "https"}, 0, "http://127.0.0.1:3000"),
    ({"host": "Calls.Example", "x-forwarded-proto": "http, https"}, 1, "https://calls.example"),
    ({"host": "[::1]:80"}, 0, "http://[::1]:80"),
    ({"host": "evil.example/x"}, 0, None),
    ({"host": "a.example'"}, 0, None),
    ({}, 0, None),
])
def test_request_origin_from_host_and_a_trusted_proxys_scheme(headers, proxies, origin):
    req = t.Request("GET", "/", "/", {}, "HTTP/1.1", headers, 0, True)
    assert t.request_origin(req, proxies) == origin


def test_parse_request_head_reads_method_path_query_and_headers():
    req = t.parse_request_head(head(
        "GET /events?last_event_id=7&token=abc HTTP/1.1", "Host: x", "Last-Event-ID: 9",
        "Accept: text/event-stream", "Accept: */*"))
    assert (req.method, req.path, req.version) == ("GET", "/events", "HTTP/1.1")
    assert req.query == {"last_event_id": "7", "token": "abc"}
    assert req.headers["last-event-id"] == "9"
    assert req.headers["accept"] == "text/event-stream, */*"
    assert req.keep_alive and req.content_length == 0


def test_parse_request_head_keep_alive_rules():
    assert not t.parse_request_head(head("GET / HTTP/1.1", "Host: x", "Connection: close")).keep_alive
    assert not t.parse_request_head(head("GET / HTTP/1.0")).keep_alive
    assert t.parse_request_head(head("GET / HTTP/1.0", "Connection: keep-alive")).keep_alive


def test_parse_request_head_absolute_form():
    req = t.parse_request_head(head("GET http://example.com/healthz?x=1 HTTP/1.1", "Host: a"))
    assert (req.path, req.query) == ("/healthz", {"x": "1"})
    for scheme in ("HTTP", "Https", "hTtP"):  # a scheme is case-insensitive, RFC 3986 3.1
        req = t.parse_request_head(head(f"GET {scheme}://example.com/events?x=1 HTTP/1.1", "Host: a"))
        assert (req.path, req.query) == ("/events", {"x": "1"})


@pytest.mark.parametrize(("raw", "status"), [
    (head("GET /events"), 400),                                    # no version
    (head("GET  /events HTTP/1.1", "Host: x"), 400),               # double space
    (head("GET /events HTTP/2.0", "Host: x"), 505),
    (head("GET /events HTTP/1.x", "Host: x"), 400),
    (head("G(T /events HTTP/1.1", "Host: x"), 400),                # not a token
    (head("GET events HTTP/1.1", "Host: x"), 400),                 # not origin-form
    (head("GET /ev\x7fents HTTP/1.1", "Host: x"), 400),
    ("GET /caf\xe9 HTTP/1.1\r\nHost: x".encode("latin-1"), 400),   # non-ASCII target
    (head("GET /events HTTP/1.1"), 400),                           # HTTP/1.1 needs Host
    (head("GET / HTTP/1.1", "Host: x", "Host: y"), 400),
    (head("GET / HTTP/1.1", "Host: x", " folded"), 400),           # obs-fold
    (head("GET / HTTP/1.1", "Host : x"), 400),                     # space before colon
    (head("GET / HTTP/1.1", "Host: x", "X: a\x00b"), 400),
    (b"GET / HTTP/1.1\r\nHost: x\nX: y", 400),                     # bare LF
    (head("POST / HTTP/1.1", "Host: x", "Content-Length: -1"), 400),
    ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2".encode("latin-1"), 400),  # "²"
    (head("POST / HTTP/1.1", "Host: x", "Content-Length: +1"), 400),
    (head("GET ftp://example.com/events HTTP/1.1", "Host: x"), 400),
    (head("POST / HTTP/1.1", "Host: x", "Content-Length: 1", "Content-Length: 2"), 400),
    (head("POST / HTTP/1.1", "Host: x", "Transfer-Encoding: chunked"), 411),
    (head("GET /?a=%ff HTTP/1.1", "Host: x"), 400),                # not UTF-8 once decoded
    (head("GET /?" + "&".join(f"k{i}=v" for i in range(50)) + " HTTP/1.1", "Host: x"), 400),
    (head("GET / HTTP/1.1", "Host: x", *[f"X-{i}: y" for i in range(t.MAX_HEADERS + 1)]), 431),
])
def test_parse_request_head_rejects(raw, status):
    with pytest.raises(t.HttpError) as e:
        t.parse_request_head(raw)
    assert e.value.status == status


def read_all(data: bytes, step: int | None = None) -> list:
    """Feed a RequestReader `data` in chunks of `step` bytes (all at once: None); collect
    (method, path, body) of each complete request, and the HttpError status that ends it."""
    reader, out = t.RequestReader(), []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    try:
        for piece in chunks:
            reader.feed(piece)
            while (got := reader.next_request()) is not None:
                out.append((got[0].method, got[0].path, got[1]))
    except t.HttpError as e:
        out.append(e.status)
    return out


PIPELINE = (b"\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"             # blank lines first
            b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
            b"DELETE /calls/7 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
            b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")


@pytest.mark.parametrize("step", [None, 1, 2, 3, 5, 7, 64])
def test_request_reader_frames_pipelined_requests_at_any_chunk_boundary(step):
    assert read_all(PIPELINE, step) == [("GET", "/healthz", b""), ("POST", "/calls", b"hello"),
                                        ("DELETE", "/calls/7", b""), ("GET", "/events", b"")]


def test_request_reader_waits_for_the_whole_head_and_body():
    reader = t.RequestReader()
    assert not reader.started
    reader.feed(b"\r\n")
    assert reader.next_request() is None and not reader.started  # a blank line is not a request
    reader.feed(b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nab")
    assert reader.next_request() is None and reader.started       # one body byte short
    reader.feed(b"cGET")
    req, body = reader.next_request()
    assert (req.method, body, reader.buffered) == ("POST", b"abc", 3)  # "GET" stays for later
    assert reader.next_request() is None and reader.started


@pytest.mark.parametrize(("data", "status"), [
    # A head one byte over the limit, with or without its end: 431.
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * t.MAX_HEAD_BYTES + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * (t.MAX_HEAD_BYTES * 2), 431),
    # A body over the limit is refused from its Content-Length, before it arrives.
    (b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (t.MAX_BODY_BYTES + 1), 413),
    (b"POST /calls HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n", 411),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n", 400),  # the second request is junk
])
@pytest.mark.parametrize("step", [None, 1, 1000])
def test_request_reader_errors(data, status, step):
    assert read_all(data, step)[-1] == status


def test_request_reader_head_exactly_at_the_limit_is_read():
    line = b"GET / HTTP/1.1\r\nHost: x\r\nX: "
    data = line + b"a" * (t.MAX_HEAD_BYTES - len(line)) + b"\r\n\r\n"
    assert read_all(data, 997) == [("GET", "/", b"")]


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("1", 1), ("25", 25), ("30", 30), ("0", 400), ("31", 400), ("-1", 400),
    ("1.5", 400), ("", 400), ("²", 400), ("9" * 5000, 400)])
def test_parse_wait(value, expected):
    if expected == 400:
        with pytest.raises(t.HttpError) as e:
            t.parse_wait(value)
        assert e.value.status == 400 and "from 1 to 30" in e.value.message
    else:
        assert t.parse_wait(value) == expected


def test_redact_hides_tokens_in_urls_and_passwords_in_dsns():
    assert t.redact("/events?token=s3cret&last_event_id=4") == "/events?token=REDACTED&last_event_id=4"
    assert t.redact("/x?a=1&TOKEN=s3cret") == "/x?a=1&TOKEN=REDACTED"
    # Names as the query parser reads them: percent-encoded or not, any case, plus as space.
    assert t.redact("/calls?%74oken=s3cret") == "/calls?%74oken=REDACTED"
    assert t.redact("/calls?x=1&%54%4F%4B%45%4E=s3cret&y=2") == "/calls?x=1&%54%4F%4B%45%4E=REDACTED&y=2"
    assert t.redact("/calls?api+key=s3cret&api%5Fkey=s3cret") == "/calls?api+key=s3cret&api%5Fkey=REDACTED"
    assert t.redact("/calls/5?since=4") == "/calls/5?since=4"
    assert t.redact("/calls") == "/calls"
    assert t.redact_dsn("postgresql://u:p%40ss@db:5432/x") == "postgresql://u:REDACTED@db:5432/x"
    assert t.redact_dsn("postgresql://u@db/x") == "postgresql://u@db/x"


def test_sse_frame_and_chunk_are_byte_exact():
    frame = t.sse_frame(42, "target_call", b'{"id":1}')
    assert frame == b'id: 42\nevent: target_call\ndata: {"id":1}\n\n'
    assert t.chunk(b"hello") == b"5\r\nhello\r\n"
    assert t.chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"
    assert t.retry_field(10000) == b"retry: 10000\n\n"


def test_json_bytes_is_one_line_even_with_line_breaks_in_names():
    data = t.json_bytes({"caller_name": "a\nb\rc\u2028", "x": None})
    assert b"\n" not in data and b"\r" not in data
    assert json.loads(data) == {"caller_name": "a\nb\rc\u2028", "x": None}


@pytest.mark.parametrize(("value", "expected"), [
    ("42", 42), (" 7 ", 7), ("0", 0), (None, None), ("", None), ("-1", None), ("1e3", None),
    ("abc", None), ("9" * 20, None), (str(2**63), None), ("\u0661", None),  # Arabic-Indic 1
])
def test_parse_event_id(value, expected):
    assert t.parse_event_id(value) == expected


def test_cors_echoes_allowed_origin_exactly_and_never_star():
    allowed = ("https://www.torn.com",)
    assert t.cors_headers("https://www.torn.com", allowed)[:2] == [
        ("Access-Control-Allow-Origin", "https://www.torn.com"), ("Vary", "Origin")]
    for origin in ("https://evil.example", None, "https://www.torn.com.evil.example"):
        headers = dict(t.cors_headers(origin, allowed))
        assert "Access-Control-Allow-Origin" not in headers and headers["Vary"] == "Origin"


@pytest.mark.parametrize(("body", "message"), [
    (b"", "target_id is required"),
    (b"[]", "the body must be a JSON object"),
    (b"{", "not valid UTF-8 JSON"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": "\xff"}', "not valid UTF-8 JSON"),
    (b'{"target_id": NaN, "caller_id": 2, "caller_name": "a"}', "not valid UTF-8 JSON"),
    (b'{"target_id": "1", "caller_id": 2, "caller_name": "a"}', "target_id must be a positive integer"),
    (b'{"target_id": 0, "caller_id": 2, "caller_name": "a"}', "target_id must be a positive integer"),
    (b'{"target_id": 1.0, "caller_id": 2, "caller_name": "a"}', "target_id must be a positive integer"),
    (b'{"target_id": true, "caller_id": 2, "caller_name": "a"}', "target_id must be a positive integer"),
    (b'{"target_id": 9223372036854775808, "caller_id": 2, "caller_name": "a"}',
     "target_id must be a positive integer"),
    # Above Number.MAX_SAFE_INTEGER the userscript cannot hold the id exactly.
    (b'{"target_id": 9007199254740992, "caller_id": 2, "caller_name": "a"}',
     "target_id must be a positive integer"),
    (b'{"target_id": 1, "caller_id": 9223372036854775807, "caller_name": "a"}',
     "caller_id must be a positive integer"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": "a", "war_id": 9007199254740992}',
     "war_id must be a positive integer"),
    (b"[" * 2000, "the body nests too deeply"),               # RecursionError, not a 500
    (b'{"target_id": ' * 2000, "the body nests too deeply"),
    (b'{"target_id": 1, "caller_id": 2}', "caller_name is required"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": "   "}', "caller_name is required"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": 5}', "caller_name must be a string"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": "' + b"x" * 65 + b'"}', "at most 64"),
    (rb'{"target_id": 1, "caller_id": 2, "caller_name": "a\u0000b"}', "control characters"),
    (rb'{"target_id": 1, "caller_id": 2, "caller_name": "a\u202eb"}', "control characters"),
    (b'{"target_id": 1, "caller_id": 2, "caller_name": "a", "faction_id": 9}', "unknown field 'faction_id'"),
])
def test_call_bodies_are_validated_field_by_field(body, message):
    req = t.parse_request_head(head("POST /calls HTTP/1.1", "Host: x", "Content-Type: application/json",
                                    f"Content-Length: {len(body)}"))
    with pytest.raises(t.HttpError) as e:
        t.parse_body(req, body, t.CALL_FIELDS)
    assert e.value.status == 400 and message in e.value.message


def test_call_bodies_are_trimmed_and_need_json():
    req = t.parse_request_head(head("POST /calls HTTP/1.1", "Host: x",
                                    "Content-Type: application/json; charset=utf-8"))
    body = json.dumps({"target_id": 7, "caller_id": 8, "caller_name": "  Ann ", "target_name": "",
                       "war_id": None}).encode()
    assert t.parse_body(req, body, t.CALL_FIELDS) == {
        "target_id": 7, "caller_id": 8, "caller_name": "Ann", "target_name": None, "war_id": None}
    largest = 2**53 - 1  # Number.MAX_SAFE_INTEGER: still exact in JavaScript
    body = json.dumps({"target_id": largest, "caller_id": largest, "caller_name": "Ann",
                       "war_id": largest}).encode()
    assert t.parse_body(req, body, t.CALL_FIELDS)["target_id"] == largest
    form = t.parse_request_head(head("POST /calls HTTP/1.1", "Host: x",
                                     "Content-Type: application/x-www-form-urlencoded"))
    with pytest.raises(t.HttpError) as e:
        t.parse_body(form, b"target_id=7", t.CALL_FIELDS)
    assert e.value.status == 415


def test_a_notification_only_announces_an_event_id():
    assert t.announced_event_id(json.dumps({"event_id": 5, "event": "target_uncall",
                                            "faction_id": 9, "data": {"id": 3}})) == 5
    assert t.announced_event_id('{"event_id": 6, "event": "target_call", "truncated": true}') == 6
    assert t.announced_event_id('{"event_id": 9223372036854775807}') == 2**63 - 1
    for bad in ("not json", "[]", "", '{"event_id": "5"}', '{"event_id": true}',
                '{"event_id": 0}', '{"event_id": 9223372036854775808}', '{"event_id": 5.0}',
                "[" * 5000):
        with pytest.raises(ValueError):
            t.announced_event_id(bad)


# ---------------------------------------------------------------------------
# Access: tokens, grants, budgets
# ---------------------------------------------------------------------------

def test_auth_grants_by_token_and_never_guesses_before_the_table_is_read():
    auth = t.Auth("s3cret-seed-token", ((5, "s3cret-faction-5-token"),))
    seed = auth.grant(_req("/events", Authorization="Bearer s3cret-seed-token"), time.time())
    assert seed.faction is None  # the seed's token sees every faction
    assert auth.grant(_req("/events", Authorization="bearer s3cret-seed-token"), time.time()) is seed
    assert auth.grant(_req("/calls?token=s3cret-faction-5-token"), time.time()).faction == 5
    assert _status(auth, _req("/events")) == 401
    assert _status(auth, _req("/events", Authorization="Basic czNjcmV0")) == 401
    # Not in the environment, and the table is not read yet: cannot say no, cannot say yes.
    assert _status(auth, _req("/events?token=s3cret-db-token-xyz")) == 503
    db_digest = t.token_digest("s3cret-db-token-xyz")
    assert auth.set_db_tokens([(db_digest, 7, "main", False)]) == set()
    db_grant = auth.grant(_req("/events?token=s3cret-db-token-xyz"), time.time())
    assert (db_grant.faction, db_grant.label) == (7, "main")
    assert _status(auth, _req("/events?token=s3cret-db-token-xy")) == 401
    assert auth.set_db_tokens([(db_digest, 7, "main", False)]) == set()  # a reload keeps it
    assert auth.grant(_req("/events?token=s3cret-db-token-xyz"), time.time()) is db_grant
    assert auth.set_db_tokens([(db_digest, 7, "main", True)]) == {db_grant}  # revoked
    assert _status(auth, _req("/events?token=s3cret-db-token-xyz")) == 401


def test_auth_is_open_only_when_asked_and_no_token_exists_anywhere():
    auth = t.Auth("", (), open_access=True)
    assert _status(auth, _req("/events")) == 503  # the table might hold tokens
    auth.set_db_tokens([])
    assert auth.grant(_req("/events"), time.time()) is t.OPEN and t.OPEN.faction is None
    auth.set_db_tokens([(t.token_digest("s3cret-db-token-xyz"), 7, "", False)])
    assert _status(auth, _req("/events")) == 401
    # Revoking the last token must not open the server to everyone.
    auth.set_db_tokens([(t.token_digest("s3cret-db-token-xyz"), 7, "", True)])
    assert _status(auth, _req("/events")) == 401


def test_auth_without_open_access_is_closed_whatever_the_table_holds():
    auth = t.Auth("", ())  # DATABASE_URL without OPEN_ACCESS=1: the default is closed
    assert not auth.open_access and auth.required
    assert _status(auth, _req("/events")) == 401  # no token can be right: no need to wait
    assert _status(auth, _req("/events?token=s3cret-db-token-xyz")) == 503  # this one might be
    for rows in ([], [(t.token_digest("s3cret-db-token-xyz"), 7, "", False)], []):
        auth.set_db_tokens(rows)  # empty at start-up, a token, then DELETE/TRUNCATE
        assert _status(auth, _req("/events")) == 401
        assert _status(auth, _req("/calls")) == 401
    assert _status(auth, _req("/events?token=s3cret-db-token-xyz")) == 401


def test_write_budget_is_a_token_bucket():
    bucket = t.Grant(5, "x").writes
    assert [bucket.take(60, 100.0) for _ in range(10)] == [0.0] * 10  # a burst of ten
    wait = bucket.take(60, 100.0)
    assert wait == pytest.approx(1.0)
    assert bucket.take(60, 101.0) == 0.0  # one more a second later


def test_client_address_trusts_x_forwarded_for_only_as_far_as_told():
    req = _req("/auth/torn", **{"X-Forwarded-For": "6.6.6.6, 1.2.3.4, 104.22.17.40"})
    assert t.client_address("10.0.0.1:5555", req, 0) == "10.0.0.1"
    assert t.client_address("10.0.0.1:5555", req, 1) == "104.22.17.40"
    assert t.client_address("10.0.0.1:5555", req, 2) == "1.2.3.4"  # Render: Cloudflare, its proxy
    assert t.client_address("10.0.0.1:5555", req, 4) == "10.0.0.1"  # a shorter chain: not ours
    assert t.client_address("[::1]:5555", _req("/auth/torn"), 2) == "[::1]"
    # Straight from a public address (not through our proxies): the header is its own say.
    assert t.client_address("93.184.216.34:5555", req, 2) == "93.184.216.34"


def test_a_member_writes_only_in_their_own_name():
    member = t.Grant(111, "Ann", 1001, "Ann", time.time() + 60)
    assert t.writer_of(member, {"caller_id": None, "caller_name": "Zed"}) == (1001, "Ann")
    assert t.writer_of(member, {"caller_id": 1001, "caller_name": None}) == (1001, "Ann")
    with pytest.raises(t.HttpError) as e:
        t.writer_of(member, {"caller_id": 1002, "caller_name": None})
    assert e.value.status == 403 and "signed in as Ann [1001]" in e.value.message
    assert t.writer_of(t.Grant(111, "main"), {"caller_id": 7, "caller_name": None}) == (7, None)
    req = t.parse_request_head(head("POST /calls HTTP/1.1", "Host: x", "Content-Type: application/json"))
    assert t.parse_body(req, b'{"target_id": 3}', t.MEMBER_CALL_FIELDS)["caller_id"] is None
    assert t.parse_body(req, b'{"force": true}', t.MEMBER_UNCALL_FIELDS)["force"] is True


def test_member_tokens_issued_here_survive_a_stale_read_and_expire():
    auth = t.Auth("", (), factions=(111,))
    assert auth.required  # FACTIONS alone closes the server: members sign in
    faction_row = (t.token_digest("faction-token-of-111"), 111, "main", False)
    assert auth.set_db_tokens([faction_row]) == set()
    mine = t.Grant(111, "Ann", 1001, "Ann", time.time() + 60)
    auth.add_member(t.token_digest("tm_ann"), mine)
    assert auth.grant(_req("/events?token=tm_ann"), time.time()) is mine
    # A read of the table that began before the INSERT committed does not drop it...
    assert auth.set_db_tokens([faction_row]) == set()
    assert auth.grant(_req("/events?token=tm_ann"), time.time()) is mine
    # ...a read that shows it keeps the same grant, now settled...
    row = (t.token_digest("tm_ann"), 111, "Ann", False, 1001, "Ann", time.time() - 1)
    assert auth.set_db_tokens([faction_row, row]) == set() and not auth.pending
    assert auth.db[t.token_digest("tm_ann")] is mine
    assert auth.token_factions == {111}  # from the faction token: a member token is no faction's
    faction_grant = auth.grant(_req("/x?token=faction-token-of-111"), time.time())
    assert auth.set_db_tokens([row]) == {faction_grant}
    # ...and a token past its expiry is refused with the reason.
    with pytest.raises(t.HttpError, match="expired"):
        auth.grant(_req("/events?token=tm_ann"), time.time())
    assert auth.expire(time.time() - 2) == set()
    assert auth.expire(time.time()) == {mine}
    assert _status(auth, _req("/events?token=tm_ann")) == 401
    assert auth.drop([t.token_digest("tm_ann")]) == set()


async def test_token_required_refused_accepted_and_never_logged(live_server, conn):
    secret = "tok-" + "x7" * 10
    server = live_server(SECRET_TOKEN=secret)
    for headers, path in (({}, "/events"), ({"Authorization": "Bearer wrong"}, "/events"),
                          ({}, "/events?token=wrong"), ({"Authorization": f"Basic {secret}"}, "/events")):
        r = await http(server.port, "GET", path, headers)
        assert r.status == 401, (headers, path)
        assert r.json() == {"error": "missing or invalid token"}
        assert r.headers["www-authenticate"].startswith("Bearer")
    for client in (SseClient(server.port, headers={"Authorization": f"Bearer {secret}"}),
                   SseClient(server.port, path=f"/events?token={secret}")):
        async with client:
            await client.next()
    r = await http(server.port, "GET", "/healthz")  # health needs no token and shows none
    assert r.status == 200 and secret not in r.body.decode()
    await server.await_log(r"GET /events\?token=REDACTED")
    server.stop()
    assert secret not in server.log


async def test_writes_are_rate_limited_per_token(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}", WRITES_PER_MINUTE="6")
    statuses = [(await post_call(server.port, RED, 50 + i)).status for i in range(6)]
    assert statuses == [201] * 5 + [429]
    r = await post_call(server.port, RED, 60)
    assert r.status == 429 and 1 <= int(r.headers["retry-after"]) <= 10
    assert (await post_call(server.port, BLUE, 60)).status == 201  # another token, its own budget


async def test_sign_ins_are_limited_per_client_address(torn_server, torn):
    server = torn_server(SIGNINS_PER_MINUTE="1", TRUSTED_PROXIES="1")  # bursts of five
    key = torn.add_player(1001, "Ann", RED_ID)

    async def from_(address: str) -> int:
        return (await sign_in(server.port, key, {"X-Forwarded-For": address})).status

    assert [await from_("198.51.100.1") for _ in range(5)] == [200] * 5
    r = await sign_in(server.port, key, {"X-Forwarded-For": "198.51.100.1"})
    assert r.status == 429 and int(r.headers["retry-after"]) > 0, r
    assert await from_("198.51.100.2") == 200  # another player, another budget
    assert torn.count("/user/profile") == 1


async def test_members_write_in_their_own_name_and_have_their_own_budget(torn_server, torn, conn):
    server = torn_server(WRITES_PER_MINUTE="6")  # bursts of 5
    port = server.port
    ann_key = torn.add_player(1001, "Ann", RED_ID)
    ann = (await sign_in(port, ann_key)).json()["token"]
    bob = (await sign_in(port, torn.add_player(1002, "Bob", RED_ID))).json()["token"]
    assert (await http(port, "POST", "/calls", bearer(ann), {"target_id": 1})).status == 201
    before = await table_state(conn)
    r = await http(port, "POST", "/calls", bearer(ann), {"target_id": 2, "caller_id": 1002})
    assert r.status == 403 and "signed in as Ann [1001]" in r.json()["error"], r
    r = await http(port, "DELETE", "/calls/1", bearer(bob), {})
    assert r.status == 403 and "called by Ann" in r.json()["error"], r
    r = await http(port, "DELETE", "/calls/1", bearer(bob), {"caller_id": 1001})
    assert r.status == 403 and "signed in as Bob [1002]" in r.json()["error"], r
    assert await table_state(conn) == before
    r = await http(port, "DELETE", "/calls/1", bearer(bob), {"force": True})
    assert r.status == 200, r
    call = r.json()["call"]
    assert (call["uncall_reason"], call["uncalled_by"], call["uncalled_by_name"]) == (
        "forced", 1002, "Bob")
    # Ann's writes count against Ann, across her tokens; Bob keeps his budget.
    ann2 = (await sign_in(port, ann_key)).json()["token"]  # another device
    statuses = [(await http(port, "POST", "/calls", bearer(tok), {"target_id": 10 + i})).status
                for i, tok in enumerate([ann, ann2, ann, ann2, ann])]
    assert statuses == [201] * 4 + [429]  # the burst is five: her first call was one of them
    assert (await http(port, "POST", "/calls", bearer(bob), {"target_id": 20})).status == 201


async def test_token_cli_create_list_revoke_and_revocation_closes_streams(live_server, db, conn):
    created = await asyncio.to_thread(run_cli, "token", "create", "--faction", "333",
                                      "--label", "main", DATABASE_URL=db)
    assert created.returncode == 0, created.stderr
    token = created.stdout.strip()
    assert token.startswith("tc_") and len(token) > 30
    assert "shown only this once" in created.stderr
    stored = await conn.fetchrow("SELECT faction_id, label, token_sha256 FROM torncat_tokens")
    assert (stored["faction_id"], stored["label"]) == (333, "main")
    assert bytes(stored["token_sha256"]) == t.token_digest(token)  # only the hash is stored
    listing = await asyncio.to_thread(run_cli, "token", "list", DATABASE_URL=db)
    assert listing.returncode == 0 and "main" in listing.stdout and token not in listing.stdout

    server = live_server()
    async with SseClient(server.port, headers=bearer(token)) as stream:
        await stream.next()
        r = await post_call(server.port, token, 70)
        assert r.status == 201 and r.json()["call"]["faction_id"] == 333
        await stream.next()
        assert (await http(server.port, "GET", "/calls", {})).status == 401  # no longer open
        revoked = await asyncio.to_thread(run_cli, "token", "revoke", "1", DATABASE_URL=db)
        assert revoked.returncode == 0, revoked.stderr
        await asyncio.wait_for(stream.closed.wait(), STEP_TIMEOUT)
        assert stream.ended_cleanly
        assert (await post_call(server.port, token, 71)).status == 401
        assert (await http(server.port, "GET", "/calls", {})).status == 401  # still not open
        again = await asyncio.to_thread(run_cli, "token", "revoke", "1", DATABASE_URL=db)
        assert again.returncode == 1 and "no active token with id 1" in again.stderr
    server.stop()
    assert token not in server.log


async def test_a_real_database_without_open_access_stays_closed_whatever_the_token_table_does(
        start_server, db, conn):
    server = start_server(DATABASE_URL=db, OPEN_ACCESS="")  # unset, as on a real deployment
    server.wait_for_log("postgres listener live")
    assert re.search(r"INFO access: closed: streams, polls and writes without a token get 401 "
                     r"\(OPEN_ACCESS unset: off with DATABASE_URL\); no SECRET_TOKEN or "
                     r"FACTION_TOKENS is set", server.log)
    await call(conn, 1, 2, faction_id=100)  # faction 100 has an active call to protect
    token = "tc_faction-100-token-abcdef"

    async def assert_closed(port: int) -> None:
        for method, path, body in (("GET", "/events", None), ("GET", "/calls", None),
                                   ("GET", "/calls?since=0", None),
                                   ("POST", "/calls", {"target_id": 3, "caller_id": 1, "caller_name": "A"}),
                                   ("DELETE", "/calls/2", {"caller_id": 1})):
            r = await http(port, method, path, body=body)
            assert (r.status, r.json()) == (401, {"error": "missing or invalid token"}), (method, path)

    async def token_table(sql: str) -> None:
        """Change the table while a stream holds the token; its end proves the reload."""
        async with SseClient(server.port, headers=bearer(token)) as client:
            assert (await client.next()).event == "snapshot"
            await conn.execute(sql)
            await asyncio.wait_for(client.closed.wait(), STEP_TIMEOUT)

    await assert_closed(server.port)  # an empty table at start-up
    insert = ("INSERT INTO torncat_tokens (faction_id, label, token_sha256) "
              f"VALUES (100, 'main', '\\x{t.token_digest(token).hex()}')")
    for change in ("DELETE FROM torncat_tokens", "TRUNCATE torncat_tokens"):
        mark = server.mark()
        await conn.execute(insert)
        await server.await_log("tokens: 1 active in the database", start=mark)
        r = await http(server.port, "GET", "/calls", bearer(token))
        assert r.status == 200 and [c["target_id"] for c in r.json()["calls"]] == [2]
        await assert_closed(server.port)
        await token_table(change)
        await assert_closed(server.port)
    server.stop()
    again = start_server(DATABASE_URL=db, OPEN_ACCESS="0")  # a restart on the empty table
    again.wait_for_log("postgres listener live")
    assert "(OPEN_ACCESS=0)" in again.log
    await assert_closed(again.port)


async def test_a_member_token_expires_and_its_stream_ends(torn_server, torn, conn):
    server = torn_server()
    token = (await sign_in(server.port, torn.add_player(1001, "Ann", RED_ID))).json()["token"]
    async with SseClient(server.port, headers=bearer(token)) as stream:
        await stream.next()
        await conn.execute("UPDATE torncat_tokens SET expires_at = now() - interval '1 second' "
                           "WHERE player_id = 1001")
        await asyncio.wait_for(stream.closed.wait(), STEP_TIMEOUT)
        assert stream.ended_cleanly
    r = await http(server.port, "GET", "/calls", bearer(token))
    assert (r.status, r.json()) == (401, {"error": t.MEMBER_TOKEN_ENDED["expired"],
                                          "signed_out": "expired"}), r


async def test_a_revoked_member_token_gets_401_saying_it_was_revoked(torn_server, torn, db):
    server = torn_server()
    token = (await sign_in(server.port, torn.add_player(1001, "Ann", RED_ID))).json()["token"]
    revoked = (401, {"error": t.MEMBER_TOKEN_ENDED["revoked"], "signed_out": "revoked"})
    async with SseClient(server.port, headers=bearer(token)) as stream:
        since = (await http(server.port, "GET", "/calls", bearer(token))).json()["last_event_id"]
        held = asyncio.create_task(http(server.port, "GET", f"/calls?since={since}&wait=25",
                                        bearer(token)))
        try:
            await stream.next()
            await wait_until(lambda: held_count(server.port, 1), what="a held long-poll")
            done = await asyncio.to_thread(run_cli, "token", "revoke", "--player", "1001",
                                           DATABASE_URL=db)
            assert done.returncode == 0, done
            await asyncio.wait_for(stream.closed.wait(), STEP_TIMEOUT)
            r = await asyncio.wait_for(held, STEP_TIMEOUT)  # the held long-poll answers at once
            assert (r.status, r.json()) == revoked, r
        finally:
            held.cancel()
    for method, path, body in (("GET", "/calls", None), ("GET", "/events", None),
                               ("POST", "/calls", {"target_id": 20})):
        r = await http(server.port, method, path, bearer(token), body)
        assert (r.status, r.json()) == revoked, (method, path, r)
    r = await http(server.port, "GET", "/calls", bearer("tm_" + "x" * 32))
    assert r.json() == {"error": "missing or invalid token"}  # a token never issued: no reason


# ---------------------------------------------------------------------------
# The hub: streams, snapshots, replays, held requests
# ---------------------------------------------------------------------------

class FakeTransport:
    """Only for the Hub unit tests below: records writes. Integration tests use real sockets."""

    def __init__(self):
        self.written = b""

    def write(self, data):
        self.written += data

    def get_write_buffer_size(self):
        return 0


class FakeWriter:
    """A StreamWriter's surface that the hub uses: write() and its transport."""

    def __init__(self):
        self.transport = FakeTransport()

    def write(self, data):
        self.transport.write(data)

    def get_extra_info(self, name):
        return None


def Sub(scope):
    client = t.Client(FakeWriter())
    client.grant = t.Grant(scope, "test")
    return client


def _event(eid, kind, faction, call_id):
    return t.Event(eid, kind, faction, {"id": call_id, "faction_id": faction})


def test_hub_keeps_each_factions_last_poll_health_for_its_snapshot_only():
    loop = asyncio.new_event_loop()
    try:
        hub = t.Hub(loop, replay_events=3, client_buffer=1000, stats=t.Stats())
        hub.load([], 1, [], health=[(20, b'{"faction_id":20,"state":"ok"}')])
        assert b'"poll_health":[{"faction_id":20,"state":"ok"}]' in hub.snapshot_frame(20)
        assert b"poll_health" not in hub.snapshot_frame(10)  # never unwell: as it was
        for eid, state in ((2, "stale"), (3, "ok")):
            assert hub.apply(t.Event(eid, "poll_health", 10, {"faction_id": 10, "state": state}))
            assert hub.snapshot(10)[0] == (b'{"calls":[],"poll_health":[{"faction_id":10,'
                                           b'"state":"%s"}],"last_event_id":%d}' % (state.encode(), eid))
        assert [e.kind for e in hub.events_after(1, 10)] == ["poll_health", "poll_health"]
        assert hub.events_after(1, 20) == []
        with pytest.raises(ValueError):
            t.Event(4, "poll_health", 10, {"state": "ok"})  # no faction_id
    finally:
        loop.close()


def test_hub_snapshot_replay_and_floor():
    loop = asyncio.new_event_loop()
    try:
        hub = t.Hub(loop, replay_events=3, client_buffer=1000, stats=t.Stats())
        hub.load([(1, 10, b'{"id":1}')], 4, [_event(4, "target_call", 10, 1)])
        assert hub.floor == 3 and hub.snapshot_frame(None).startswith(b"id: 4\nevent: snapshot\n")
        hub.apply(_event(5, "target_call", 20, 2))
        hub.apply(_event(6, "target_uncall", 10, 1))
        assert not hub.apply(_event(6, "target_uncall", 10, 1))  # already applied
        assert hub.snapshot_frame(None).endswith(b'data: {"calls":[{"id":2,"faction_id":20}],'
                                                 b'"last_event_id":6}\n\n')
        assert b'"calls":[]' in hub.snapshot_frame(10)
        assert [e.id for e in hub.events_after(4, None)] == [5, 6]
        assert [e.id for e in hub.events_after(4, 10)] == [6]
        hub.apply(_event(7, "target_call", 10, 3))  # pushes event 4 out of the window
        assert hub.floor == 4 and hub.can_replay(4) and not hub.can_replay(3)
        assert not hub.can_replay(8) and not hub.can_replay(None)
        faction10, everyone = Sub(10), Sub(None)
        faction10.cursor, everyone.cursor = 5, 2
        hub.subscribe(faction10, b"HEAD")
        assert faction10.writer.transport.written == b"HEAD" + t.chunk(
            _event(6, "target_uncall", 10, 1).frame + _event(7, "target_call", 10, 3).frame)
        hub.subscribe(everyone, b"")
        assert b"id: 7\nevent: snapshot\n" in everyone.writer.transport.written
        faction10.writer.transport.written = everyone.writer.transport.written = b""
        hub.apply(_event(8, "target_call", 20, 4))
        hub.apply(_event(9, "target_call", 10, 5))
        hub.flush()
        # One write per subscriber with every queued event of its scope, in order.
        assert everyone.writer.transport.written == t.chunk(
            _event(8, "target_call", 20, 4).frame + _event(9, "target_call", 10, 5).frame)
        assert faction10.writer.transport.written == t.chunk(_event(9, "target_call", 10, 5).frame)
        # A stream that resumes with nothing missed gets no empty chunk: that would end it.
        quiet = Sub(10)
        quiet.cursor = 9
        hub.subscribe(quiet, b"HEAD")
        assert quiet.writer.transport.written == b"HEAD"
        hub.unsubscribe(quiet)
        hub.unsubscribe(quiet)  # twice is harmless and counted once
        assert hub.stats.disconnects == 1 and hub.stream_count == 2
    finally:
        loop.close()


async def test_stream_headers_retry_snapshot_then_a_seed_style_insert(live_server, conn):
    server = live_server()
    async with SseClient(server.port) as client:
        h = client.response_headers
        assert h["content-type"] == "text/event-stream"
        assert h["cache-control"] == "no-cache"
        assert h["x-accel-buffering"] == "no"
        assert h["transfer-encoding"] == "chunked"
        snapshot = await client.next()
        assert client.retry == 10000
        assert (snapshot.event, snapshot.id) == ("snapshot", "0")
        assert snapshot.json == {"calls": [], "last_event_id": 0}
        call_id = await conn.fetchval(
            "INSERT INTO target_calls (caller_id, target_id) VALUES (111, 222) RETURNING id")
        ev = await client.next()
        assert (ev.event, ev.id) == ("target_call", "1")
        data = ev.json
        assert data.pop("created_at").endswith("Z")
        assert data == {"id": call_id, "caller_id": 111, "target_id": 222, "faction_id": None,
                        "war_id": None, "caller_name": None, "target_name": None,
                        "uncalled_at": None, "uncalled_by": None, "uncalled_by_name": None,
                        "uncall_reason": None}


async def test_two_clients_receive_identical_ordered_streams(live_server, conn):
    server = live_server()
    async with SseClient(server.port) as a, SseClient(server.port) as b:
        await a.next()
        await b.next()
        for i in range(40):
            await call(conn, i, 1000 + i, caller_name=f"caller {i}")
        got_a, got_b = await a.take(40), await b.take(40)
        assert [(e.id, e.data) for e in got_a] == [(e.id, e.data) for e in got_b]
        assert [e.int_id for e in got_a] == list(range(1, 41))
        assert [e.json["target_id"] for e in got_a] == [1000 + i for i in range(40)]
        await a.assert_quiet()


async def test_snapshot_lists_exactly_the_active_calls(live_server, conn):
    kept = await call(conn, 1, 10, faction_id=5, war_id=7, caller_name="Ann", target_name="Bob")
    gone = await call(conn, 2, 20)
    deleted = await call(conn, 3, 30)
    await conn.execute("UPDATE target_calls SET uncalled_at = now() WHERE id = $1", gone)
    await conn.execute("DELETE FROM target_calls WHERE id = $1", deleted)
    server = live_server()
    async with SseClient(server.port) as client:
        snap = await client.next()
        assert snap.event == "snapshot" and snap.id == "5"
        calls = snap.json["calls"]
        assert snap.json["last_event_id"] == 5
        assert [c["id"] for c in calls] == [kept]
        assert {k: calls[0][k] for k in ("caller_id", "target_id", "faction_id", "war_id",
                                         "caller_name", "target_name", "uncalled_at")} == {
            "caller_id": 1, "target_id": 10, "faction_id": 5, "war_id": 7,
            "caller_name": "Ann", "target_name": "Bob", "uncalled_at": None}


async def test_uncall_by_update_and_by_delete(live_server, conn):
    server = live_server()
    async with SseClient(server.port) as client:
        await client.next()
        first, second = await call(conn, 1, 10), await call(conn, 2, 20)
        await client.take(2)
        await conn.execute("UPDATE target_calls SET uncalled_at = now() WHERE id = $1", first)
        await conn.execute("DELETE FROM target_calls WHERE id = $1", second)
        by_update, by_delete = await client.take(2)
        assert (by_update.event, by_update.json["id"]) == ("target_uncall", first)
        assert (by_delete.event, by_delete.json["id"]) == ("target_uncall", second)
        assert by_update.json["uncalled_at"].endswith("Z")
        assert by_delete.json["uncalled_at"].endswith("Z")
        # Updating an already uncalled row, or deleting it, tells clients nothing new.
        await conn.execute("UPDATE target_calls SET caller_name = 'x' WHERE id = $1", first)
        await conn.execute("DELETE FROM target_calls WHERE id = $1", first)
        await client.assert_quiet()
        async with SseClient(server.port) as fresh:
            assert (await fresh.next()).json["calls"] == []


async def test_last_event_id_replays_exactly_what_was_missed(live_server, conn):
    server = live_server()
    async with SseClient(server.port) as client:
        await client.next()
        for i in range(5):
            await call(conn, i, 100 + i)
        seen = await client.take(5)
    for i in range(5, 10):
        await call(conn, i, 100 + i)
    missed = [6, 7, 8, 9, 10]
    for target, how in ((998, {"headers": {"Last-Event-ID": seen[-1].id}}),
                        (999, {"path": f"/events?last_event_id={seen[-1].id}"})):
        async with SseClient(server.port, **how) as again:
            replayed = await again.take(len(missed))
            assert [e.int_id for e in replayed] == missed
            assert [e.json["target_id"] for e in replayed][:5] == [105, 106, 107, 108, 109]
            await again.assert_quiet()
            await call(conn, 99, target)
            live = await again.next()
            assert live.event == "target_call" and live.json["target_id"] == target
            missed.append(live.int_id)


async def test_too_old_or_invalid_last_event_id_gets_a_fresh_snapshot(live_server, conn):
    server = live_server(REPLAY_EVENTS="3")
    for i in range(6):
        await call(conn, i, 100 + i)
    await applied(server, 6)
    for last_id in ("1", "2", "not-a-number", "9" * 40, "7"):  # 7 is in the future
        async with SseClient(server.port, headers={"Last-Event-ID": last_id}) as client:
            ev = await client.next()
            assert (ev.event, ev.id) == ("snapshot", "6"), last_id
            assert len(ev.json["calls"]) == 6
    async with SseClient(server.port, headers={"Last-Event-ID": "3"}) as client:
        # the oldest id that can still be replayed
        assert [e.int_id for e in await client.take(3)] == [4, 5, 6]


async def test_concurrent_writers_and_resuming_clients_miss_nothing(live_server, db):
    """Writers commit out of id order on purpose; clients resuming mid-burst still get it all."""
    server = live_server()
    writers, per_writer = 6, 25

    async def writer(w: int) -> None:
        c = await asyncpg.connect(db)
        try:
            for i in range(per_writer):
                async with c.transaction():
                    await c.execute("INSERT INTO target_calls (caller_id, target_id) "
                                    "VALUES ($1, $2)", w, w * 1000 + i)
                    if random.random() < 0.5:  # hold the transaction open a little
                        await c.execute("SELECT pg_sleep(0.002)")
        finally:
            await c.close()

    async def hopping_client() -> list[int]:
        """Reconnects with Last-Event-ID after every few events until it has them all."""
        ids: list[int] = []
        last = "0"  # the log is empty: "after 0" is everything
        while len(ids) < writers * per_writer:
            async with SseClient(server.port, headers={"Last-Event-ID": last}) as client:
                for _ in range(random.randint(1, 15)):
                    ev = await client.next()
                    assert ev.event != "snapshot", "a resuming client was sent a snapshot"
                    ids.append(ev.int_id)
                    last = ev.id
                    if len(ids) == writers * per_writer:
                        break
        return ids

    hoppers = [asyncio.create_task(hopping_client()) for _ in range(3)]
    await asyncio.gather(*(writer(w) for w in range(writers)))
    results = await asyncio.wait_for(asyncio.gather(*hoppers), 60)
    check = await asyncpg.connect(db)
    all_ids = [r["event_id"] for r in await check.fetch(
        "SELECT event_id FROM target_call_events ORDER BY event_id")]
    await check.close()
    assert len(all_ids) == writers * per_writer
    for ids in results:
        assert ids == all_ids  # every event, once, in order


async def test_a_call_reaches_its_faction_and_no_other(factions, conn):
    port = factions.port
    async with sse_clients(SseClient(port, headers=bearer(RED)), SseClient(port, headers=bearer(RED)),
                           SseClient(port, headers=bearer(BLUE))) as (red1, red2, blue):
        for c in (red1, red2, blue):
            assert (await c.next()).json == {"calls": [], "last_event_id": 0}
        r = await post_call(port, RED, 5001, caller_id=7, caller_name=" Ann ", target_name="Zed",
                            war_id=42)
        assert r.status == 201, r
        call = r.json()["call"]
        assert r.json()["event_id"] == 1
        assert {k: call[k] for k in ("faction_id", "target_id", "caller_id", "caller_name",
                                     "target_name", "war_id")} == {
            "faction_id": RED_ID, "target_id": 5001, "caller_id": 7, "caller_name": "Ann",
            "target_name": "Zed", "war_id": 42}
        for c in (red1, red2):
            ev = await c.next()
            assert (ev.event, ev.int_id, ev.json) == ("target_call", 1, call)
        await blue.assert_quiet()
        # Blue calls the same target for itself: factions do not collide.
        r = await post_call(port, BLUE, 5001, caller_id=8, caller_name="Bo")
        assert r.status == 201 and r.json()["call"]["faction_id"] == BLUE_ID
        assert (await blue.next()).json["caller_name"] == "Bo"
        await red1.assert_quiet()
        # Snapshots, replays and polls are filtered the same way.
        async with SseClient(port, headers=bearer(BLUE)) as late_blue:
            assert [c["caller_name"] for c in (await late_blue.next()).json["calls"]] == ["Bo"]
        async with SseClient(port, headers={**bearer(BLUE), "Last-Event-ID": "0"}) as resumed:
            assert [e.int_id for e in await resumed.take(1)] == [2]
            await resumed.assert_quiet()
        poll = (await http(port, "GET", "/calls", bearer(BLUE))).json()
        assert [c["caller_name"] for c in poll["calls"]] == ["Bo"] and poll["last_event_id"] == 2
        since = (await http(port, "GET", "/calls?since=0", bearer(RED))).json()
        assert [e["id"] for e in since["events"]] == [1] and since["last_event_id"] == 2
        assert since["events"][0] == {"id": 1, "event": "target_call", "data": call}
        # Another faction's call does not exist for a token, even with force.
        assert (await post_call(port, RED, 5002, caller_id=7)).status == 201
        assert (await red1.next()).json["target_id"] == 5002
        r = await http(port, "DELETE", "/calls/5002", bearer(BLUE), {"caller_id": 7, "force": True})
        assert r.status == 404
        rows = await conn.fetch("SELECT faction_id, target_id FROM target_calls "
                                "WHERE uncalled_at IS NULL ORDER BY id")
        assert [tuple(r) for r in rows] == [(RED_ID, 5001), (BLUE_ID, 5001), (RED_ID, 5002)]


async def test_get_calls_returns_exactly_the_missed_events_and_resets_when_too_old(live_server, conn):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}", REPLAY_EVENTS="4")
    port = server.port
    first = (await http(port, "GET", "/calls", bearer(RED))).json()
    assert first == {"calls": [], "last_event_id": 0}
    for target in (1, 2, 3):
        assert (await post_call(port, RED, target)).status == 201
    # Read-your-writes: the POST answered after its event went out, so a poll sees it.
    r = await http(port, "GET", "/calls?since=1", bearer(RED))
    assert [(e["id"], e["event"], e["data"]["target_id"]) for e in r.json()["events"]] == [
        (2, "target_call", 2), (3, "target_call", 3)]
    assert r.json()["last_event_id"] == 3 and r.headers["cache-control"] == "no-store"
    assert (await http(port, "GET", "/calls?since=3", bearer(RED))).json() == {
        "events": [], "last_event_id": 3}
    assert (await http(port, "DELETE", "/calls/1", bearer(RED), {"caller_id": 1})).status == 200
    for target in (4, 5):
        assert (await post_call(port, RED, target)).status == 201
    reset = (await http(port, "GET", "/calls?since=1", bearer(RED))).json()  # 2..6 > 4 events
    assert reset["reset"] is True and reset["last_event_id"] == 6
    assert sorted(c["target_id"] for c in reset["calls"]) == [2, 3, 4, 5]
    r = await http(port, "HEAD", "/calls", bearer(RED))
    assert r.status == 200 and r.body == b""


async def test_max_clients_gets_503_with_retry_after(live_server):
    server = live_server(MAX_CLIENTS="2")
    async with sse_clients(SseClient(server.port), SseClient(server.port)) as clients:
        r = await http(server.port, "GET", "/events")
        assert r.status == 503 and r.headers["retry-after"] == "10"
        assert r.json() == {"error": "too many clients, retry later"}
        mark = server.mark()
        await clients[0].close()
        await server.await_log("stream closed", start=mark)
        async with SseClient(server.port):  # the freed slot is reused
            pass


async def test_keepalive_comments_arrive(live_server):
    server = live_server(KEEPALIVE_SECONDS="0.1")
    async with SseClient(server.port) as client:
        await client.next()
        await asyncio.wait_for(client.comment_arrived.wait(), STEP_TIMEOUT)
        assert client.comments[0] == " ping"
        await client.assert_quiet()  # comments dispatch no event


async def test_the_client_count_is_logged_periodically(live_server):
    server = live_server(STATS_LOG_SECONDS="0.2")
    async with SseClient(server.port) as client:
        await client.next()
        await server.await_log(r"clients=1 connects=\+1 disconnects=\+0 evictions=\+0")


async def test_a_client_that_never_reads_is_dropped_while_others_get_everything(live_server, conn):
    server = live_server(CLIENT_BUFFER_BYTES="65536")
    async with SseClient(server.port) as good, \
            SseClient(server.port, rcvbuf=4096, read=False):  # it never reads
        await good.next()
        mark = server.mark()
        name = "n" * 3000
        total = 400
        got = []
        for i in range(total):  # about 1.2 MB of events
            await call(conn, i, i, caller_name=name)
            # In step with the reader: the good client is never more than an event behind,
            # whatever the load on the machine, so only the one that never reads can be
            # evicted (a reader that falls 64 KB behind on a busy machine would be too).
            got.append(await good.next())
        await server.await_log("evicting a slow client", start=mark)
        assert [e.int_id for e in got] == list(range(1, total + 1))
        r = await http(server.port, "GET", "/healthz")
        assert r.json()["clients"] == 1


async def test_a_reconnect_storm_is_served_from_memory(live_server, conn):
    """Snapshots and replays for many clients at once run no database query."""
    server = live_server(PROBE_INTERVAL_SECONDS="3600")
    for i in range(20):
        await call(conn, i, i)
    await applied(server, 20)
    async with SseClient(server.port) as seeded:
        while (await seeded.next()).id != "20":  # the snapshot, then any NOTIFY on its way
            pass

    async def server_backends():  # state_change moves whenever a backend runs a statement
        rows = await conn.fetch("SELECT pid, state_change FROM pg_stat_activity "
                                "WHERE application_name LIKE 'torncat-sse%'")
        return {r["pid"]: r["state_change"] for r in rows}

    before = await server_backends()
    clients = [SseClient(server.port, headers={"Last-Event-ID": "10"} if i % 2 else {})
               for i in range(200)]
    async with contextlib.AsyncExitStack() as stack:  # all at once, closed whatever happens
        await asyncio.gather(*(stack.enter_async_context(c) for c in clients))
        for i, c in enumerate(clients):
            first = await c.next()
            assert (first.event, first.id) == (("target_call", "11") if i % 2 else ("snapshot", "20"))
        assert await server_backends() == before


async def test_a_long_poll_answers_at_once_with_news_and_resets_when_too_old(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}", REPLAY_EVENTS="2")
    first = (await post_call(server.port, RED, 1)).json()["event_id"]
    async with LongPoll(server.port, RED) as poll:
        poll.send(since=first - 1, wait=30)  # something is new: no waiting
        status, _, body = await poll.answer()
        assert status == 200 and [e["id"] for e in body["events"]] == [first]
        assert body["last_event_id"] == first and body["events"][0]["data"]["target_id"] == 1
        poll.send(since=None)  # no cursor yet: the snapshot, at once
        assert [c["target_id"] for c in (await poll.answer())[2]["calls"]] == [1]
        for target in (2, 3):
            await post_call(server.port, RED, target)
        poll.send(since=first - 1)  # fell out of the replay window: a reset, at once
        _, _, body = await poll.answer()
        assert body["reset"] is True and sorted(c["target_id"] for c in body["calls"]) == [1, 2, 3]


async def test_a_held_long_poll_wakes_for_its_faction_only_and_reuses_its_connection(factions):
    port = factions.port
    start = (await post_call(port, RED, 1)).json()["event_id"]
    async with LongPoll(port, RED) as red:
        red.send(since=start, wait=30, Origin="https://www.torn.com")
        await wait_until(lambda: held_count(port, 1), what="the long-poll held")
        blue_event = (await post_call(port, BLUE, 2)).json()["event_id"]
        # post_call returns once its event went out: another faction's event left it held.
        assert await held_count(port, 1)
        red_event = (await post_call(port, RED, 3, caller_id=9)).json()["event_id"]
        status, headers, body = await red.answer()
        assert status == 200 and headers["access-control-allow-origin"] == "https://www.torn.com"
        assert [(e["id"], e["event"], e["data"]["target_id"]) for e in body["events"]] == [
            (red_event, "target_call", 3)]
        assert body["last_event_id"] == red_event > blue_event
        assert await held_count(port, 0)
        # The same connection, again: this time nothing comes, and S seconds end the wait.
        red.send(since=red_event, wait=1)
        status, headers, body = await red.answer()
        assert (status, body) == (200, {"events": [], "last_event_id": red_event})
        assert headers.get("connection") != "close"


async def test_long_polls_count_as_clients_and_show_in_health_and_metrics(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}", MAX_CLIENTS="2")
    port = server.port
    async with SseClient(port, headers=bearer(RED)) as stream, LongPoll(port, RED) as poll:
        await stream.next()
        poll.send(since=0)
        await wait_until(lambda: held_count(port, 1), what="the long-poll held")
        health = (await http(port, "GET", "/healthz")).json()
        assert (health["clients"], health["long_polls"]) == (1, 1)
        metrics = (await http(port, "GET", "/metrics")).body.decode()
        assert "torncat_long_polls 1\n" in metrics and "torncat_long_polls_total 1\n" in metrics
        assert (await http(port, "GET", "/events", bearer(RED))).status == 503  # full
        r = await http(port, "GET", "/calls?since=0&wait=5", bearer(RED))
        assert r.status == 503 and r.headers["retry-after"] == "10"
        await post_call(port, RED, 4)
        assert [e["data"]["target_id"] for e in (await poll.answer())[2]["events"]] == [4]


async def test_a_client_that_leaves_a_long_poll_costs_nothing_after(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}")
    for _ in range(3):
        async with LongPoll(server.port, RED) as poll:
            poll.send(since=0)
            await wait_until(lambda: held_count(server.port, 1), what="the long-poll held")
    await wait_until(lambda: held_count(server.port, 0), what="the held long-poll released")
    assert (await http(server.port, "GET", "/healthz")).json()["clients"] == 0


async def test_what_a_stream_is_sent_first_counts_against_its_buffer(live_server, conn):
    """A faction's snapshot past CLIENT_BUFFER_BYTES (rows written straight into the table,
    as the old tool does): its never-reading streams are refused, never registered with the
    snapshot pinned (they were: 200 of them held 309 MB); a normal faction streams."""
    await conn.execute("INSERT INTO target_calls (faction_id, target_id, target_name, caller_id, "
                       "caller_name) SELECT $1, t, repeat('T', 64), 1001, repeat('C', 64) "
                       "FROM generate_series(1, 600) t", RED_ID)
    server = live_server(CLIENT_BUFFER_BYTES="65536",
                         FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    r = await http(server.port, "GET", "/calls", bearer(RED))  # ~200 KB: refused too
    assert r.status == 503 and "CLIENT_BUFFER_BYTES" in r.json()["error"], r
    assert r.headers["retry-after"].isdigit()
    await server.await_log(rf"faction {RED_ID}'s calls are \d+ bytes, more than CLIENT_BUFFER_BYTES")
    loop = asyncio.get_running_loop()
    socks = []
    try:
        for _ in range(10):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            await loop.sock_sendall(sock, f"GET /events HTTP/1.1\r\nHost: x\r\n"
                                    f"Authorization: Bearer {RED}\r\n\r\n".encode())
            socks.append(sock)

        async def refused() -> bool:
            text = (await http(server.port, "GET", "/metrics")).body
            return metric_value(text, "clients") == 0 and \
                metric_value(text, "refused_streams_total") >= 1 + 10

        await wait_until(refused, what="the 10 streams refused")
        async with SseClient(server.port, headers=bearer(BLUE)) as blue:
            assert (await blue.next()).event == "snapshot"
    finally:
        for sock in socks:
            sock.close()


async def test_the_calls_cache_is_bounded_in_bytes_and_a_long_answer_is_the_snapshot(
        live_server, conn):
    """The GET /calls cache held up to 1,024 bodies, one per `since`: 300 values took 503 MB."""
    await conn.execute("SELECT torncat_call($1, NULL, t, repeat('T', 64), 1001, "
                       "repeat('C', 64)) FROM generate_series(1, 150) t", RED_ID)
    await conn.execute("UPDATE target_calls SET uncalled_at = now() WHERE target_id > 10")
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}", CLIENT_BUFFER_BYTES="65536")
    for since in range(1, 290):
        assert (await http(server.port, "GET", f"/calls?since={since}", bearer(RED))).status == 200
    cached = metric_value((await http(server.port, "GET", "/metrics")).body, "calls_cache_bytes")
    assert 0 <= cached <= 1 << 20, cached  # CALLS_CACHE_BYTES, as the docs say: 1 MiB
    # 289 events for 10 calls: more than CLIENT_BUFFER_BYTES, so the snapshot instead.
    r = await http(server.port, "GET", "/calls?since=1", bearer(RED))
    assert r.json()["reset"] is True and len(r.json()["calls"]) == 10, r
    assert len(r.body) <= 65536


# ---------------------------------------------------------------------------
# The database: the schema, the pool, the LISTEN connection, and their faults
# ---------------------------------------------------------------------------

SEED_TABLE = """CREATE TABLE target_calls (id bigserial PRIMARY KEY, caller_id bigint,
                target_id bigint, created_at timestamptz DEFAULT now())"""


async def test_trigger_sql_upgrades_a_seed_table_without_touching_rows_and_is_idempotent(pg):
    name = f"seedtable{os.getpid()}"
    admin = await asyncpg.connect(pg.dsn())
    await admin.execute(f"CREATE DATABASE {name}")
    conn = await asyncpg.connect(pg.dsn(name))
    try:
        await conn.execute(SEED_TABLE)
        await conn.execute("INSERT INTO target_calls (caller_id, target_id, created_at) "
                           "VALUES (1, 2, '2026-01-01T00:00:00Z'), (3, 4, now())")
        before = await conn.fetch("SELECT * FROM target_calls ORDER BY id")
        await conn.execute(TRIGGER_SQL)
        await conn.execute(TRIGGER_SQL)  # runs twice cleanly
        after = await conn.fetch("SELECT id, caller_id, target_id, created_at FROM target_calls "
                                 "ORDER BY id")
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        columns = {r["column_name"] for r in await conn.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name='target_calls'")}
        assert columns >= {"faction_id", "war_id", "caller_name", "target_name", "uncalled_at"}
        triggers = await conn.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal "
                                    "AND tgrelid = 'target_calls'::regclass")
        assert sorted(r["tgname"] for r in triggers) == [
            "trg_notify_target_call", "trg_torncat_target_calls", "trg_torncat_target_calls_truncate"]
        assert await conn.fetchval("SELECT count(*) FROM target_call_events") == 0
    finally:
        await conn.close()
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_prune_keeps_the_newest_event(db):
    conn = await asyncpg.connect(db)
    try:
        for i in range(3):
            await conn.execute("INSERT INTO target_calls (caller_id, target_id) VALUES ($1, $1)", i)
        await conn.execute("UPDATE target_call_events SET created_at = now() - interval '10 days'")
        assert await conn.fetchval("SELECT prune_target_call_events(interval '1 day')") == 2
        assert await conn.fetchval("SELECT array_agg(event_id) FROM target_call_events") == [3]
    finally:
        await conn.close()


async def test_concurrent_writers_commit_in_event_id_order(db):
    """The advisory lock makes a second writer wait until the first commits."""
    first, second = await asyncpg.connect(db), await asyncpg.connect(db)
    try:
        tx = first.transaction()
        await tx.start()
        await first.execute("INSERT INTO target_calls (caller_id, target_id) VALUES (1, 1)")
        blocked = asyncio.create_task(second.execute(
            "INSERT INTO target_calls (caller_id, target_id) VALUES (2, 2)"))
        done, _ = await asyncio.wait([blocked], timeout=0.5)
        assert not done, "the second writer committed while the first still held its event id"
        await tx.commit()
        await asyncio.wait_for(blocked, STEP_TIMEOUT)
        rows = await first.fetch("SELECT event_id, call_id FROM target_call_events ORDER BY event_id")
        assert [(r["event_id"], r["call_id"]) for r in rows] == [(1, 1), (2, 2)]
    finally:
        await first.close()
        await second.close()


async def test_racing_callers_exactly_one_wins(factions, conn):
    results = await asyncio.gather(*(
        post_call(factions.port, RED, 777, caller_id=100 + i, caller_name=f"m{i}")
        for i in range(30)))
    statuses = sorted(r.status for r in results)
    assert statuses == [201] + [409] * 29
    winner = next(r for r in results if r.status == 201).json()["call"]
    for r in results:
        if r.status == 409:
            assert r.json()["call"] == winner
            assert r.json()["error"] == f"target 777 is already called by {winner['caller_name']}"
    assert await conn.fetchval("SELECT count(*) FROM target_calls WHERE target_id = 777") == 1


async def test_uncall_by_the_caller_refused_for_others_forced_with_force(factions, conn):
    port = factions.port
    async with SseClient(port, headers=bearer(RED)) as stream:
        await stream.next()
        assert (await post_call(port, RED, 10, caller_id=1, caller_name="Ann")).status == 201
        assert (await post_call(port, RED, 20, caller_id=1, caller_name="Ann")).status == 201
        await stream.take(2)
        # The caller uncalls their own call.
        r = await http(port, "DELETE", "/calls/10", bearer(RED), {"caller_id": 1})
        assert r.status == 200 and r.json()["event_id"] == 3
        ev = await stream.next()
        assert (ev.event, ev.json["target_id"], ev.json["uncall_reason"], ev.json["uncalled_by"]) == (
            "target_uncall", 10, "uncalled", 1)
        # Another member may not...
        before = await table_state(conn)
        r = await http(port, "POST", "/calls/20/uncall", bearer(RED), {"caller_id": 2,
                                                                     "caller_name": "Bob"})
        assert r.status == 403 and "called by Ann" in r.json()["error"]
        assert r.json()["call"]["caller_id"] == 1
        assert await table_state(conn) == before
        await stream.assert_quiet(0.2)
        # ...unless they force it, and the faction sees who cleared it.
        r = await http(port, "POST", "/calls/20/uncall", bearer(RED),
                       {"caller_id": 2, "caller_name": "Bob", "force": True})
        assert r.status == 200
        ev = await stream.next()
        assert (ev.json["uncall_reason"], ev.json["uncalled_by"], ev.json["uncalled_by_name"]) == (
            "forced", 2, "Bob")
        r = await http(port, "DELETE", "/calls/20", bearer(RED), {"caller_id": 1})
        assert r.status == 404 and r.json() == {"error": "target 20 is not called"}
        # Called again after an uncall: a new call.
        assert (await post_call(port, RED, 20, caller_id=3, caller_name="Cy")).status == 201


async def test_calls_expire_once_even_with_two_servers(live_server, conn):
    env = {"FACTION_TOKENS": f"{RED_ID}:{RED}", "CALL_TTL_SECONDS": "1"}
    first, second = live_server(**env), live_server(**env)
    async with SseClient(first.port, headers=bearer(RED)) as stream:
        await stream.next()
        assert (await post_call(second.port, RED, 31)).status == 201
        called, expired = await stream.take(2)
        assert called.event == "target_call"
        assert (expired.event, expired.json["uncall_reason"], expired.json["target_id"]) == (
            "target_uncall", "expired", 31)
        await stream.assert_quiet(0.5)
        uncalls = await conn.fetchval("SELECT count(*) FROM target_call_events "
                                      "WHERE event = 'target_uncall'")
        assert uncalls == 1
    logs = [server.log for server in (first, second) if server.stop() == 0]
    assert sum(log.count("expired 1 calls older than 1s") for log in logs) == 1


async def test_big_events_go_through_the_log_not_notify(live_server, conn):
    """Events over NOTIFY's 8000 bytes are read from the log, in order, while probes keep running."""
    server = live_server(PROBE_INTERVAL_SECONDS="0.02")
    async with SseClient(server.port) as client:
        await client.next()
        for i in range(30):
            # 12 KB of UTF-8 in every other event
            await call(conn, i, i, caller_name=("é" * 6000 if i % 2 else f"small {i}"))
        got = await client.take(30)
        assert [e.int_id for e in got] == list(range(1, 31))
        assert all(e.json["caller_name"] == "é" * 6000 for e in got[1::2])
        sizes = await conn.fetch("SELECT octet_length(data::text) AS n FROM target_call_events")
        assert sum(r["n"] > 8000 for r in sizes) == 15
        assert "WARNING" not in server.log and "ERROR" not in server.log


async def test_listen_connection_killed_during_inserts_loses_nothing(live_server, conn, db):
    server = live_server()
    async with SseClient(server.port) as client:
        await client.next()
        total = 120

        async def insert_all():
            for i in range(total):
                await call(conn, i, i)

        async def kill_listener_twice():
            killer = await asyncpg.connect(db)
            try:
                for _ in range(2):
                    mark = server.mark()
                    killed = await killer.fetchval(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE application_name = 'torncat-sse listener'")
                    assert killed >= 1
                    await server.await_log("postgres listener live", start=mark)
            finally:
                await killer.close()

        await asyncio.gather(insert_all(), kill_listener_twice())
        got = await client.take(total)
        assert [e.int_id for e in got] == list(range(1, total + 1))
        await client.assert_quiet()
        await server.await_log("reconnecting")


async def test_health_is_503_while_the_database_is_unreachable_and_streams_wait(start_server):
    token = "faction-12-token-abcdef"
    server = start_server(DATABASE_URL=f"postgresql://postgres@127.0.0.1:{free_port()}/x",
                          FACTION_TOKENS=f"12:{token}")
    await server.await_log("reconnecting")
    r = await http(server.port, "GET", "/healthz")
    assert r.status == 503 and r.json()["listener"] == "down"
    # A token from the environment can be checked: the stream is accepted and waits.
    async with SseClient(server.port, headers={"Authorization": f"Bearer {token}"}) as client:
        await client.assert_quiet()
        assert client.retry == 10000
    # A token that may be in the database cannot be checked yet: 503, not a guess.
    r = await http(server.port, "GET", "/events", {"Authorization": "Bearer maybe-in-the-table-0"})
    assert r.status == 503 and r.headers["retry-after"] == "5"
    r = await http(server.port, "GET", "/calls", {"Authorization": f"Bearer {token}"})
    assert r.status == 503


async def test_init_db_applies_the_schema_to_an_empty_database(pg, start_server):
    name = f"empty{os.getpid()}"
    admin = await asyncpg.connect(pg.dsn())
    await admin.execute(f"CREATE DATABASE {name}")
    try:
        server = start_server("--init-db", DATABASE_URL=pg.dsn(name))
        await server.await_log("postgres listener live")
        assert "applied trigger.sql" in server.log
        c = await asyncpg.connect(pg.dsn(name))
        async with SseClient(server.port) as client:
            await client.next()
            await call(c, 5, 6)
            assert (await client.next()).json["target_id"] == 6
        await c.close()
    finally:
        await admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
        await admin.close()


async def test_listen_self_test_fails_behind_a_transaction_pooler(pg, db, start_server):
    """Supabase's port 6543 is a transaction-mode pooler: LISTEN never fires through it."""
    database = db.rsplit("/", 1)[1]
    bouncer = PgBouncer(pg, "transaction")
    try:
        server = start_server(DATABASE_URL=bouncer.dsn(database), PROBE_TIMEOUT_SECONDS="1")
        await server.await_log("LISTEN self-test failed")
        assert "session pooler (port 5432)" in server.log
        r = await http(server.port, "GET", "/healthz")
        assert r.status == 503 and r.json()["listener"] == "self-test failed"
        server.stop()
        # The same pooler in session mode works: the test above is about the mode.
        session = PgBouncer(pg, "session")
        try:
            ok = start_server(DATABASE_URL=session.dsn(database))
            await ok.await_log("postgres listener live")
        finally:
            ok.stop()
            session.stop()
    finally:
        bouncer.stop()


@pytest.fixture
def tls_pg():
    """A cluster that speaks TLS with a certificate from a throwaway CA."""
    assert (DEBIAN_PG_BIN / "postgres").exists(), "install Debian's postgresql-15 (.ci/run does)"
    cluster = PgCluster(bin_dir=DEBIAN_PG_BIN)
    directory = cluster.root / "tls"  # inside the cluster's directory, which postgres can read
    directory.mkdir()
    directory.chmod(0o755)
    files = make_tls_files(directory, cluster.user)
    cluster.settings.update({"ssl": "on", "ssl_cert_file": str(files["server"]),
                             "ssl_key_file": str(files["key"])})
    cluster.start()
    asyncio.run(pg_execute(cluster.dsn(), TRIGGER_SQL))
    yield cluster, files
    cluster.destroy()


async def listener_uses_tls(dsn: str) -> bool:
    c = await asyncpg.connect(dsn)
    try:
        return await c.fetchval("SELECT bool_and(ssl) FROM pg_stat_ssl JOIN pg_stat_activity "
                                "USING (pid) WHERE application_name = 'torncat-sse listener'")
    finally:
        await c.close()


async def test_tls_sslmode_require_and_a_verified_ca(tls_pg, start_server):
    cluster, files = tls_pg
    plain = start_server(DATABASE_URL=cluster.dsn() + "?sslmode=require")
    await plain.await_log("postgres listener live")
    assert await listener_uses_tls(cluster.dsn()) is True
    plain.stop()
    verified = start_server(DATABASE_URL=cluster.dsn(), DATABASE_CA_CERT=files["ca"].read_text())
    await verified.await_log("postgres listener live")
    assert await listener_uses_tls(cluster.dsn()) is True
    verified.stop()
    wrong = start_server(DATABASE_URL=cluster.dsn(), DATABASE_CA_CERT=str(files["other-ca"]))
    await wrong.await_log("postgres listener: .*certificate verify failed")
    assert (await http(wrong.port, "GET", "/healthz")).status == 503


def test_an_unusable_ca_certificate_is_one_clear_line(tmp_path):
    r = run_cli(DATABASE_URL="postgresql://x@127.0.0.1/x",
                DATABASE_CA_CERT=str(tmp_path / "missing.crt"))
    assert r.returncode == 1 and "DATABASE_CA_CERT is not a usable CA certificate" in r.stderr
    assert "Traceback" not in r.stderr


SUPABASE_ROLES = """
DO $$ BEGIN
    -- Like Supabase: the Data API's roles, and the secret key's role, which bypasses RLS.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN; END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN; END IF;
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN BYPASSRLS; END IF;
    -- The server's role: an ordinary role (no superuser, no BYPASSRLS) that owns the tables.
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'torncat_owner') THEN
        CREATE ROLE torncat_owner LOGIN; END IF;
END $$;
GRANT anon, authenticated, service_role TO torncat_owner;
"""


# What Supabase grants on every table of `public` (its default privileges).
SUPABASE_GRANTS = """
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;
GRANT ALL ON ALL TABLES IN SCHEMA public TO anon, authenticated, service_role;
GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO anon, authenticated, service_role;
"""


async def test_supabase_roles_read_no_calls_while_the_owner_serves(pg, start_server):
    name = f"rls{os.getpid()}"
    await pg_execute(pg.dsn(), SUPABASE_ROLES)
    await pg_execute(pg.dsn(), f"CREATE DATABASE {name} OWNER torncat_owner")
    owner_dsn = f"postgresql://torncat_owner@127.0.0.1:{pg.port}/{name}"
    owner = await asyncpg.connect(owner_dsn)
    try:
        for _ in range(2):  # idempotent, as the owner
            await owner.execute(TRIGGER_SQL)
        await owner.execute(SUPABASE_GRANTS)
        # The server, connected as the owner, keeps reading and writing the calls.
        server = start_server(DATABASE_URL=owner_dsn, FACTION_TOKENS=f"{RED_ID}:{RED}")
        server.wait_for_log("postgres listener live")
        async with SseClient(server.port, headers=bearer(RED)) as client:
            assert (await client.next()).event == "snapshot"
            assert (await post_call(server.port, RED, 77)).status == 201
            await call(owner, 5, 78, faction_id=RED_ID)  # and a seed-style insert by the owner
            assert [(await client.next()).json["target_id"] for _ in range(2)] == [77, 78]
        await owner.execute("INSERT INTO torncat_tokens (faction_id, token_sha256) "
                            "VALUES (1, '\\x00')")

        async def as_role(role: str) -> tuple[int, int, int, int]:
            async with owner.transaction():
                await owner.execute(f"SET LOCAL ROLE {role}")
                return tuple([
                    *[await owner.fetchval(f"SELECT count(*) FROM {table}") for table in
                      ("target_calls", "target_call_events", "torncat_tokens")],
                    await owner.fetchval("SELECT count(*) FROM torncat_holders")])

        assert await as_role("torncat_owner") == (2, 2, 1, 2)
        assert await as_role("service_role") == (2, 2, 1, 2)  # BYPASSRLS
        for role in ("anon", "authenticated"):
            assert await as_role(role) == (0, 0, 0, 0), role
            with pytest.raises(asyncpg.InsufficientPrivilegeError):  # RLS: no policy allows it
                async with owner.transaction():
                    await owner.execute(f"SET LOCAL ROLE {role}")
                    await owner.execute("INSERT INTO target_calls (caller_id, target_id) VALUES (1, 9)")
        # The operations doc's check, run as it is written there.
        command = re.search(r'^psql "\$DATABASE_URL" (.+)$', (HERE / "docs" / "operations.md").read_text(),
                            re.MULTILINE).group(1)
        r = await asyncio.to_thread(
            subprocess.run, ["sh", "-c", f'"$PSQL" "$DATABASE_URL" {command}'], capture_output=True,
            text=True, timeout=60, check=True,
            env={**os.environ, "PSQL": str(pg.bin / "psql"), "DATABASE_URL": owner_dsn})
        for table in ("target_call_events", "target_calls", "torncat_tokens"):
            assert re.search(rf"^ {table} +\| t +\| torncat_owner$", r.stdout, re.MULTILINE), r.stdout
        assert re.search(r"calls_anon_can_read\s*\n-+\n\s+0\n", r.stdout), r.stdout
    finally:
        await owner.close()
        await pg_execute(pg.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.mark.faults
async def test_postgres_killed_hard_mid_burst_loses_nothing(own_pg, start_server):
    server = start_server(DATABASE_URL=own_pg.dsn(), **FAST_PROBES)
    await server.await_log("postgres listener live")

    async def crash_and_restart():
        await asyncio.to_thread(own_pg.kill)
        await asyncio.to_thread(own_pg.start)

    async with sse_clients(*(SseClient(server.port) for _ in range(3))) as clients:
        for c in clients:
            await c.next()
        await insert_through_faults(own_pg.dsn(), range(1, 151), during=crash_and_restart)
        expected = await all_event_ids(own_pg.dsn())
        assert 140 <= len(expected) <= 150
        for c in clients:
            assert await drain(c, expected[-1]) == expected  # in order, once, none missing
        await server.await_log("reconnecting")


@pytest.mark.faults
async def test_postgres_unreachable_at_start_up_then_appears(start_server):
    cluster = PgCluster(durable=True)  # initialised, not started
    try:
        server = start_server(DATABASE_URL=cluster.dsn(), INIT_DB="1",
                              FACTION_TOKENS=f"{RED_ID}:{RED}")
        await server.await_log("reconnecting")
        assert (await http(server.port, "GET", "/healthz")).status == 503
        async with SseClient(server.port, headers=bearer(RED)) as stream:
            await stream.assert_quiet()  # open, waiting
            await asyncio.to_thread(cluster.start)
            await server.await_log("postgres listener live", timeout=60)
            assert (await http(server.port, "GET", "/healthz")).status == 200
            assert (await stream.next()).event == "snapshot"
            assert (await post_call(server.port, RED, 5)).status == 201
            assert (await stream.next()).json["target_id"] == 5
    finally:
        cluster.destroy()


@pytest.mark.faults
async def test_a_frozen_listen_backend_is_detected_and_nothing_is_lost(own_pg, start_server):
    server = start_server(DATABASE_URL=own_pg.dsn(), **FAST_PROBES)
    await server.await_log("postgres listener live")
    async with SseClient(server.port) as client:
        await client.next()
        admin = await asyncpg.connect(own_pg.dsn())
        frozen = await admin.fetchval("SELECT pid FROM pg_stat_activity "
                                      "WHERE application_name = 'torncat-sse listener'")
        mark = server.mark()

        async def freeze():
            os.kill(frozen, signal.SIGSTOP)  # a half-open link: nothing arrives, nothing errors

        try:
            await insert_through_faults(own_pg.dsn(), range(1, 61), during=freeze)
            await server.await_log(r"no answer to a probe within .*half-open", start=mark)
            await server.await_log("postgres listener live", start=mark)
            expected = await all_event_ids(own_pg.dsn())
            assert len(expected) == 60
            assert await drain(client, 60) == expected
        finally:
            os.kill(frozen, signal.SIGCONT)
            await admin.close()


ADMIN_TOKEN = "admin-token-sees-every-faction-0123"


SERVER_BACKENDS_SQL = "SELECT pid FROM pg_stat_activity WHERE application_name LIKE 'torncat-sse%'"


EVENT_LOCK = 7402531  # TORNCAT_EVENT_LOCK in trigger.sql: writers queue on it


class FreezingProxy:
    """A loopback TCP proxy to Postgres that can stop forwarding on the connections it
    has while keeping both of their sockets open, as a network blackhole, a pooler
    failover or a NAT that dropped its state looks to each end. New connections pass."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.flows: list[asyncio.Event] = []  # one per connection: set while it forwards
        self.held = 0  # chunks read and not yet passed on (kept while frozen)
        self.tasks: set[asyncio.Task] = set()
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> FreezingProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer) -> None:
        self.tasks.add(asyncio.current_task())
        self.writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self.writers.append(up_writer)
        flowing = asyncio.Event()
        flowing.set()
        self.flows.append(flowing)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while True:
                    await flowing.wait()
                    data = await src.read(65536)
                    self.held += 1
                    try:
                        await flowing.wait()  # what arrived while frozen stays here
                        if not data:
                            break
                        dst.write(data)
                        await dst.drain()
                    finally:
                        self.held -= 1
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    def freeze(self) -> None:
        for flowing in self.flows:
            flowing.clear()

    def thaw(self) -> None:
        for flowing in self.flows:
            flowing.set()

    async def close(self) -> None:
        self.thaw()
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()  # each pump then ends on its own
        await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), STEP_TIMEOUT)


async def each_worker_logs(server, pattern: str, start: int, workers: int) -> None:
    """Wait until every worker (WORKERS=N prefixes its lines with [wN]) has logged `pattern`."""
    if workers == 1:
        await server.await_log(pattern, start=start)
        return
    for number in range(workers):
        await server.await_log(rf"\[w{number}\] .*{pattern}", start=start)


def process_state(pid: int) -> str:
    """R, S, T (stopped)...: the third field of /proc/<pid>/stat."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def unread_bytes(pid: int) -> int:
    """Bytes waiting, unread, on the TCP sockets of process `pid` (0 once it is gone): its
    sockets' inodes from /proc/<pid>/fd, their receive queues from /proc/net/tcp[6]."""
    inodes = set()
    with contextlib.suppress(FileNotFoundError):  # gone: nothing waits
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(FileNotFoundError):  # closed meanwhile
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    unread = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                unread += int(fields[4].split(":")[1], 16)
    return unread


SETTLED_SECONDS = 60.0  # a frozen backend resumed finishes what it had within this, even
                        # on a loaded 2-core machine (the suite and a second one beside it)


async def wait_settled(admin, pids: list[int], proxy: FreezingProxy | None) -> None:
    """Wait until no backend frozen mid-burst has work left: each is gone, or idle with
    nothing unread on its socket (and the proxy holds nothing for it). A write the server
    gave up on (its outcome unknown) has then committed or failed. Not "gone": a frozen
    connection whose last statement was still within its deadline when it resumed (a
    pool check's ping, a reset) is healthy, and the server keeps it."""
    async def settled() -> bool:
        if proxy is not None and proxy.held:
            return False
        rows = await admin.fetch("SELECT pid, state FROM pg_stat_activity WHERE pid = ANY($1)",
                                 pids)
        return all(r["state"] == "idle" and not unread_bytes(r["pid"]) for r in rows)

    await wait_until(settled, SETTLED_SECONDS, "the frozen backends settled after the resume")


@pytest.mark.faults
@pytest.mark.parametrize(("fault", "workers"), [("sigstop", 1), ("proxy", 1), ("sigstop", 2)])
async def test_every_database_link_frozen_mid_burst(own_pg, start_server, fault, workers):
    """Every backend of the server frozen (SIGSTOP), or every link to them blackholed (a
    proxy): writes answer 503 fast, the listener is live again on a fresh connection while
    the old ones are still frozen, and every committed call reaches every client once."""
    proxy = await FreezingProxy(own_pg.port).start() if fault == "proxy" else None
    dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres" if proxy else own_pg.dsn()
    probe_interval, probe_timeout = 1.0, 1.0
    server = start_server(DATABASE_URL=dsn, WORKERS=workers, SECRET_TOKEN=ADMIN_TOKEN,
                          PROBE_INTERVAL_SECONDS=probe_interval,
                          PROBE_TIMEOUT_SECONDS=probe_timeout, DB_TIMEOUT_SECONDS=1)
    admin = await asyncpg.connect(own_pg.dsn())
    clients: list[SseClient] = []
    frozen: list[int] = []
    async with contextlib.AsyncExitStack() as cleanup:  # streams, then admin, then the server
        cleanup.callback(server.stop)
        cleanup.push_async_callback(admin.close)
        await each_worker_logs(server, "postgres listener live", 0, workers)
        for _ in range(2 * workers + 1):
            clients.append(await cleanup.enter_async_context(
                SseClient(server.port, headers=bearer(ADMIN_TOKEN))))
            assert (await clients[-1].next()).event == "snapshot"
        # Several writes at once, so that each pool holds several connections to freeze.
        warm = await asyncio.gather(*(post_call(server.port, ADMIN_TOKEN, 900 + i, caller_id=9)
                                      for i in range(4 * workers)))
        assert {r.status for r in warm} == {201}
        mark = server.mark()
        frozen_at = 0.0
        busy: asyncio.Future | None = None  # writes caught mid-statement by the blackhole

        async def freeze() -> None:
            nonlocal frozen_at, busy
            if proxy:
                # Writes that are in Postgres at the moment the links die: they queue on the
                # event lock we hold, we blackhole the links, then let them commit. Their
                # answers never arrive. (Not with SIGSTOP: a stopped backend granted that lock
                # would hold up every writer of the database until it resumes.)
                await admin.execute("SELECT pg_advisory_lock($1)", EVENT_LOCK)
                busy = asyncio.gather(*(post_call(server.port, ADMIN_TOKEN, 2100 + i,
                                                  caller_id=6) for i in range(workers)))
                await wait_until(lambda: admin.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND "
                    "objid = $1 AND NOT granted", EVENT_LOCK), what="a write in the database")
            frozen.extend(r["pid"] for r in await admin.fetch(SERVER_BACKENDS_SQL))
            assert len(frozen) > workers  # the listeners and the pools' connections
            if proxy:
                proxy.freeze()
                await admin.execute("SELECT pg_advisory_unlock($1)", EVENT_LOCK)
            else:
                for pid in frozen:
                    os.kill(pid, signal.SIGSTOP)
            frozen_at = time.monotonic()

        try:
            await insert_through_faults(own_pg.dsn(), range(1, 31), during=freeze)
            # Writes drawing a frozen connection: 503 with Retry-After, saying what is unknown.
            started = time.monotonic()
            answers = await asyncio.gather(*(post_call(server.port, ADMIN_TOKEN, 2000 + i,
                                                       caller_id=7) for i in range(3 * workers)))
            write_seconds = time.monotonic() - started
            assert {r.status for r in answers} <= {201, 503}, answers
            unavailable = [r for r in answers if r.status == 503]
            assert any(r.json()["outcome"] == "unknown" for r in unavailable), answers
            for r in unavailable:
                assert r.headers["retry-after"].isdigit()
                assert r.json()["outcome"] in ("unknown", "not applied")
            # The listener gives up on its frozen link and is live again on a fresh one.
            await each_worker_logs(server, "no answer to a probe", mark, workers)
            await each_worker_logs(server, "postgres listener live", mark, workers)
            recovered = time.monotonic() - frozen_at
            if not proxy:
                assert {process_state(pid) for pid in frozen} == {"T"}  # still frozen
            health = await http(server.port, "GET", "/healthz")
            assert health.status == 200 and health.json()["listener"] == "live"
            # Events flow again, and writes go through, while the old backends stay frozen.
            await insert_through_faults(own_pg.dsn(), range(31, 41))
            for _ in range(5):  # a frozen connection the pool check has not reached yet: 503
                r = await post_call(server.port, ADMIN_TOKEN, 3000, caller_id=8)
                if r.status != 503:
                    break
            assert r.status == 201, r
        finally:
            if proxy:
                proxy.thaw()
            for pid in frozen:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        await wait_settled(admin, frozen, proxy)  # a write whose outcome was unknown may commit now
        if busy is not None:  # they committed, but their answers were lost: 503, unknown
            caught = await busy
            assert [(r.status, r.json()["outcome"]) for r in caught] == \
                [(503, "unknown")] * workers, caught
            for i in range(workers):  # and sending one again says it is made already
                again = await post_call(server.port, ADMIN_TOKEN, 2100 + i, caller_id=6)
                assert again.status == 201 and again.json()["event_id"] is None, again
        for i, r in enumerate(answers):  # sending it again is safe: it is made, or it was
            if r.status == 503:
                again = await post_call(server.port, ADMIN_TOKEN, 2000 + i, caller_id=7)
                assert again.status == 201 and again.json()["call"]["caller_id"] == 7, again
        expected = await all_event_ids(own_pg.dsn())
        for c in clients:
            assert await drain(c, expected[-1]) == expected  # in order, once, none missing
        db_health = (await http(server.port, "GET", "/healthz")).json()["database"]
        assert db_health["timeouts"] >= 1 and db_health["terminated_connections"] >= 1
        metrics = (await http(server.port, "GET", "/metrics")).body.decode()
        assert re.search(r'^torncat_db_timeouts_total\{connection="listener"\} [1-9]', metrics,
                         re.MULTILINE)
        print(f"\nfrozen links ({fault}, WORKERS={workers}): {len(unavailable)} of "
              f"{len(answers)} writes answered 503 within {write_seconds:.2f}s; listener live "
              f"again {recovered:.2f}s after the freeze (bound: PROBE_INTERVAL_SECONDS + "
              f"PROBE_TIMEOUT_SECONDS = {probe_interval + probe_timeout:g}s + a few)")
    if proxy:
        await proxy.close()


@pytest.mark.faults
async def test_a_forged_notify_changes_nothing_and_real_events_keep_flowing(live_server, conn, db):
    server = live_server()
    async with SseClient(server.port) as client:
        assert (await client.next()).event == "snapshot"
        real = await call(conn, 1, 10, faction_id=200)
        assert (await client.next()).int_id == 1
        role = f"torncat_nobody_{os.getpid()}"
        await conn.execute(f"CREATE ROLE {role} LOGIN")  # no grant at all: only PUBLIC's
        nobody = await asyncpg.connect(db.replace("//postgres@", f"//{role}@"))
        try:
            forged = [
                {"event_id": 2**63 - 1, "event": "target_call", "faction_id": 200,
                 "data": {"id": 99, "caller_id": 6, "target_id": 66}},
                {"event_id": 1000, "event": "target_uncall", "faction_id": 200,
                 "data": {"id": real, "caller_id": 1, "target_id": 10,
                          "uncalled_at": "2026-11-24T18:41:07.123Z"}},
                {"event_id": 1001, "event": "target_call", "faction_id": [1],
                 "data": {"id": 98, "caller_id": 5, "target_id": 55}},
            ]
            for payload in [*map(json.dumps, forged), "garbage {"]:
                await nobody.execute("SELECT pg_notify('torncat_events', $1)", payload)
            await call(conn, 2, 11, faction_id=200)
            ev = await client.next()
            assert (ev.int_id, ev.event, ev.json["target_id"]) == (2, "target_call", 11)
            await client.assert_quiet()

            async def four_ignored() -> bool:
                return metric_value((await http(server.port, "GET", "/metrics")).body,
                                    "notifications_ignored_total") >= 4

            await wait_until(four_ignored, what="4 notifications ignored")
            health = (await http(server.port, "GET", "/healthz")).json()
            assert (health["status"], health["last_event_id"]) == ("ok", 2)
            async with SseClient(server.port) as fresh:
                snapshot = (await fresh.next()).json
            assert snapshot["last_event_id"] == 2
            assert sorted(c["target_id"] for c in snapshot["calls"]) == [10, 11]
            assert metric_value((await http(server.port, "GET", "/metrics")).body,
                                "notifications_ignored_total") == 4
            assert server.log.count("ignoring") == 1  # once, not once per notification
            assert "Traceback" not in server.log
        finally:
            await nobody.close()
            await conn.execute(f"DROP ROLE {role}")


@pytest.mark.faults
async def test_every_postgres_socket_has_keepalives_and_a_user_timeout(live_server, pg, db):
    server = live_server(SECRET_TOKEN=ADMIN_TOKEN, DB_KEEPALIVE_SECONDS="7")
    assert (await post_call(server.port, ADMIN_TOKEN, 5)).status == 201  # a pool connection
    ss = (await asyncio.to_thread(
        subprocess.run, ["ss", "-tnpo", "state", "established", f"( dport = :{pg.port} )"],
        capture_output=True, text=True, check=True)).stdout
    ours = [line for line in ss.splitlines() if f"pid={server.proc.pid}," in line]
    assert len(ours) >= 2, ss  # the LISTEN connection and the pool's
    for line in ours:
        assert "timer:(keepalive," in line, line
    conn = await asyncpg.connect(db)  # the options themselves, read back from a real socket
    try:
        t.tune_db_socket(conn, 7, 20)
        sock = conn._transport.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == t.DB_KEEPALIVE_PROBES
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 20_000
    finally:
        await conn.close()


@pytest.mark.faults
async def test_a_burst_of_notifications_is_one_read_of_the_log(live_server, conn):
    server = live_server()
    async with SseClient(server.port) as client:
        assert (await client.next()).event == "snapshot"
        before = metric_value((await http(server.port, "GET", "/metrics")).body, "log_reads_total")
        async with conn.transaction():  # 300 NOTIFYs, delivered on commit
            await conn.executemany("INSERT INTO target_calls (caller_id, target_id) VALUES (1, $1)",
                                   [(i,) for i in range(1, 301)])
        assert [e.int_id for e in await client.take(300)] == list(range(1, 301))
        reads = metric_value((await http(server.port, "GET", "/metrics")).body,
                             "log_reads_total") - before
        assert reads == 1  # not one per event: the first read has them all


async def test_a_slow_token_read_never_holds_up_events(live_server, db, conn):
    """Tokens are read on the pool, not under the LISTEN connection's lock: a read held up
    (here by a lock on the table) delays no event. Each sign-in re-read every token there,
    and 300,000 rows delayed every event by 0.9 s."""
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}")
    blocker = await asyncpg.connect(db)
    try:
        async with SseClient(server.port, headers=bearer(RED)) as stream:
            await stream.next()
            async with blocker.transaction():
                await blocker.execute("LOCK TABLE torncat_tokens IN ACCESS EXCLUSIVE MODE")
                await conn.execute("NOTIFY torncat_tokens")  # every server reads the table...
                await wait_until(lambda: conn.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE relation = 'torncat_tokens'::regclass "
                    "AND NOT granted"), what="the token read waiting on the lock")
                await conn.execute("INSERT INTO target_calls (faction_id, caller_id, target_id) "
                                   "VALUES ($1, 1, 2001)", RED_ID)
                assert (await stream.next()).event == "target_call"  # ...events flow meanwhile
    finally:
        await blocker.close()


# ---------------------------------------------------------------------------
# Torn's API: the client, signing in, the central poll (against fake_torn.py on loopback)
# ---------------------------------------------------------------------------

def test_torn_errors_map_to_clear_statuses():
    cases = {2: (401, "incorrect"), 13: (401, "inactive"), 18: (401, "paused"),
             16: (403, "Public"), 5: (503, "100 requests"), 8: (503, "blocking"),
             9: (503, "disabled"), 14: (503, "daily"), 17: (503, "error"),
             None: (503, "did not answer"), 0: (503, "temporary"), 99: (502, "99"),
             t.TORN_BAD_ANSWER: (502, "does not understand")}
    for code, (status, words) in cases.items():
        e = t.torn_error_to_http(code)
        assert (e.status, words in e.message) == (status, True), (code, e.message)
        assert ("Retry-After" in dict(e.headers)) == (status == 503), code
    assert t.torn_error_to_http(16).extra == {"torn_error_code": 16, "access_needed": "Public Only"}


async def test_the_torn_client_reads_every_framing_over_verified_tls_and_never_follows_a_redirect(
        tmp_path):
    """The client speaks HTTP/1.1 itself (one deadline for the whole request), so what
    urllib did for it is checked here: Torn's answers come through Cloudflare chunked, or
    delimited by the connection's end, in pieces; TLS verifies the certificate and the
    host; a redirect is an error, never followed (it would carry the key elsewhere)."""
    files = make_tls_files(tmp_path, None)
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_tls.load_cert_chain(files["server"], files["key"])
    obj = {"profile": {"id": 1001, "name": "Ann", "faction_id": RED_ID}}
    body = json.dumps(obj).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
    pieces = [body[i:i + 7] for i in range(0, len(body), 7)]
    answers = {
        "/v2/length": [head + b"Content-Length: %d\r\n\r\n" % len(body), *pieces],
        "/v2/chunked": [head + b"Transfer-Encoding: chunked\r\n\r\n",
                        *(b"%x;ext=1\r\n%s\r\n" % (len(p), p) for p in pieces), b"0\r\n\r\n"],
        "/v2/closed": [head + b"Connection: close\r\n\r\n", *pieces],
        "/v2/redirect": [b"HTTP/1.1 302 Found\r\nLocation: https://127.0.0.1:1/v2/length\r\n"
                         b"Content-Length: 0\r\n\r\n"],
    }
    seen = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            request = await reader.readuntil(b"\r\n\r\n")
            seen.append(request)
            for piece in answers[request.split(b" ")[1].decode()]:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.005)  # each piece its own segment
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0, ssl=server_tls)
    key = "A1b2C3d4E5f6G7h8"
    try:
        client = t.TornClient(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/v2", 5.0)
        client.tls = ssl.create_default_context(cafile=files["ca"])
        for path in ("/length", "/chunked", "/closed"):
            assert await client.get(key, path, t.TornUse.SIGN_IN) == obj, path
        assert all(b"\r\nAuthorization: ApiKey " + key.encode() + b"\r\n" in r and
                   key.encode() not in r.split(b"\r\n")[0] for r in seen)
        with pytest.raises(t.TornError, match="HTTP 302"):
            await client.get(key, "/redirect", t.TornUse.SIGN_IN)
        assert len(seen) == 4  # the redirect's target was never asked
        client.tls = ssl.create_default_context(cafile=files["other-ca"])
        with pytest.raises(t.TornError, match="CERTIFICATE_VERIFY_FAILED"):
            await client.get(key, "/length", t.TornUse.SIGN_IN)
        assert len(seen) == 4  # nothing was sent to a server that could not prove it is Torn
    finally:
        server.close()
        await server.wait_closed()


async def test_the_fake_torn_speaks_v2_shapes_errors_and_the_rate_limit(torn):
    async def get(path: str, key: str | None = None, **headers: str):
        hdrs = {"Authorization": f"ApiKey {key}"} if key else {}
        return (await http(torn.port, "GET", "/v2" + path, {**hdrs, **headers})).json()

    torn.factions[RED_ID].ranked_war = {
        "war_id": 9, "start": 1, "end": None, "target": 100, "winner": None,
        "factions": [{"id": RED_ID, "name": "Red", "score": 3, "chain": 1},
                     {"id": BLUE_ID, "name": "Blue", "score": 2, "chain": 0}]}
    key = torn.add_player(1001, "Ann", RED_ID)
    info = (await get("/key/info", key))["info"]
    assert info["user"] == {"id": 1001, "faction_id": RED_ID, "company_id": None}
    assert (info["access"]["level"], info["access"]["type"]) == (1, "Public Only")
    assert (await get(f"/user/basic?key={key}"))["profile"]["name"] == "Ann"
    profile = (await get("/user/profile", key))["profile"]
    assert (profile["id"], profile["name"], profile["faction_id"]) == (1001, "Ann", RED_ID)
    wars = await get("/faction/wars", key)
    assert wars["wars"]["ranked"]["factions"][1]["id"] == BLUE_ID and wars["pacts"] == []
    member = (await get(f"/faction/{RED_ID}/members", key))["members"][0]
    assert (member["id"], member["status"]["state"], member["status"]["until"]) == (1001, "Okay", None)
    assert {"last_action", "days_in_faction", "position", "revive_setting"} <= set(member)
    assert await get("/user/profile") == {"error": {"code": 1, "error": "Key is empty"}}
    assert (await get("/user/profile", "WrongWrongWrong1"))["error"]["code"] == 2
    assert (await get("/faction/999/members", key))["error"]["code"] == 6
    # 100 requests a minute per player, across their keys; the 101st is code 5.
    other_key = torn.add_key(1001)
    for _ in range(100 - 6):
        assert "profile" in await get("/user/basic", other_key)
    assert (await get("/user/basic", key))["error"]["code"] == 5
    assert torn.count("/user/basic") == 1 + 94 + 1


async def test_sign_in_answers_a_member_token_that_streams_polls_and_writes(torn_server, torn, db, conn):
    server = torn_server(FACTION_TOKENS=f"{BLUE_ID}:{BLUE}")  # RED by FACTIONS, BLUE by its token
    ann_key = torn.add_player(1001, "Ann", RED_ID)
    zed_key = torn.add_player(2001, "Zed", BLUE_ID)
    r = await http(server.port, "OPTIONS", "/auth/torn", {
        "Origin": "https://www.torn.com", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert r.status == 204 and r.headers["access-control-allow-origin"] == "https://www.torn.com"
    assert "POST" in r.headers["access-control-allow-methods"]
    r = await sign_in(server.port, ann_key, {"Origin": "https://www.torn.com"})
    assert r.status == 200, r
    assert r.headers["access-control-allow-origin"] == "https://www.torn.com"
    answer = r.json()
    assert {k: answer[k] for k in ("player_id", "name", "faction_id")} == {
        "player_id": 1001, "name": "Ann", "faction_id": RED_ID}
    token = answer["token"]
    expires = datetime.datetime.fromisoformat(answer["expires_at"])
    days = (expires - datetime.datetime.now(datetime.UTC)).total_seconds() / 86400
    assert 6.99 < days <= 7
    # Torn was asked once who owns the key, with the key in the header (the fake counts by
    # header or ?key=), and once for the faction's member list (re-verification, see
    # SignIn: once per REVERIFY_HOURS per faction).
    assert torn.requests == {(ann_key, "/user/profile"): 1, (ann_key, "/faction/{id}/members"): 1}
    stored = await conn.fetchrow("SELECT * FROM torncat_tokens")
    assert (stored["kind"], stored["faction_id"], stored["player_id"], stored["player_name"]) == (
        "member", RED_ID, 1001, "Ann")
    assert bytes(stored["token_sha256"]) == t.token_digest(token)
    # The token streams and polls its faction's calls, and its writes are Ann's.
    async with SseClient(server.port, headers=bearer(token)) as stream:
        assert (await stream.next()).event == "snapshot"
        r = await http(server.port, "POST", "/calls", bearer(token), {"target_id": 5001})
        assert r.status == 201, r
        call = r.json()["call"]
        assert (call["caller_id"], call["caller_name"], call["faction_id"]) == (1001, "Ann", RED_ID)
        assert (await stream.next()).json == call
        poll = (await http(server.port, "GET", "/calls", bearer(token))).json()
        assert [c["target_id"] for c in poll["calls"]] == [5001]
    # A faction with a faction token may sign in too.
    r = await sign_in(server.port, zed_key)
    assert r.status == 200 and r.json()["faction_id"] == BLUE_ID
    listing = await asyncio.to_thread(run_cli, "token", "list", DATABASE_URL=db)
    assert listing.returncode == 0, listing.stderr
    assert re.search(r"member .*Ann \[1001\]", listing.stdout), listing.stdout
    async with SseClient(server.port, headers=bearer(token)) as stream:
        await stream.next()
        revoked = await asyncio.to_thread(run_cli, "token", "revoke", "--player", "1001", DATABASE_URL=db)
        assert revoked.returncode == 0 and "revoked 1 member tokens" in revoked.stderr
        await asyncio.wait_for(stream.closed.wait(), STEP_TIMEOUT)
    assert (await http(server.port, "GET", "/calls", bearer(token))).status == 401


async def test_wrong_inactive_paused_and_weak_keys_and_foreign_factions_are_refused(torn_server, torn):
    server = torn_server()
    wrong = "WrongWrongWrong1"
    inactive = torn.add_player(1001, "Ann", RED_ID, status=13)
    paused = torn.add_player(1002, "Bob", RED_ID, status=18)
    weak = torn.add_player(1003, "Cy", RED_ID, level=0, selections={"user": ["basic"]})
    foreign = torn.add_player(2001, "Zed", BLUE_ID)
    loner = torn.add_player(3001, "Lone")
    cases = [
        (wrong, 401, "incorrect"), (inactive, 401, "inactive"), (paused, 401, "paused"),
        (weak, 403, "access level is too low"),
        (foreign, 403, f"your faction ({BLUE_ID}) is not on this server"),
        (loner, 403, "Lone [3001] is not in a faction"),
    ]
    for key, status, words in cases:
        r = await sign_in(server.port, key)
        assert r.status == status and words in r.json()["error"], (key, r)
        assert key not in r.body.decode()
    assert (await sign_in(server.port, weak)).json()["access_needed"] == "Public Only"
    # Refusals are remembered: asking again did not ask Torn again.
    assert torn.count() == len(cases)
    for body, words in (({"key": "short"}, "must be a Torn API key"), ({}, "key is required"),
                        ({"key": 12}, "must be a Torn API key"), ({"kee": "x"}, "unknown field")):
        r = await http(server.port, "POST", "/auth/torn", {}, body)
        assert r.status == 400 and words in r.json()["error"], (body, r)
        assert "short" not in r.body.decode()
    assert (await http(server.port, "GET", "/auth/torn")).status == 405
    assert torn.count() == len(cases)


async def test_torn_slow_or_down_gets_503_with_retry_after_and_never_blocks(torn_server, torn):
    server = torn_server(TORN_TIMEOUT_SECONDS="0.5")
    keys = [torn.add_player(1001 + i, f"P{i}", RED_ID) for i in range(6)]
    # A Torn that holds the request: other requests are served meanwhile, then it answers.
    torn.hold = asyncio.Event()
    pending = asyncio.create_task(sign_in(server.port, keys[0]))
    await asyncio.wait_for(torn.arrivals.get(), STEP_TIMEOUT)
    assert (await http(server.port, "GET", "/healthz")).status == 200
    assert (await http(server.port, "GET", "/calls?token=" + RED, {})).status == 401
    # ...until the deadline: 503, and a clear reason.
    r = await pending
    assert r.status == 503 and "did not answer in time" in r.json()["error"], r
    assert int(r.headers["retry-after"]) > 0
    torn.hold.set()
    torn.hold = None
    # Torn answers an outage error, or a proxy answers for it, or nobody answers at all.
    for key, (knob, value), words in (
            (keys[1], ("error_code", 17), "backend error"),
            (keys[2], ("error_code", 9), "disabled"),
            (keys[3], ("error_code", 5), "100 requests a minute"),
            (keys[4], ("http_status", 502), "did not answer")):
        setattr(torn, knob, value)
        r = await sign_in(server.port, key)
        assert r.status == 503 and words in r.json()["error"], (knob, value, r)
        assert int(r.headers["retry-after"]) > 0
        setattr(torn, knob, None)
    # Outages are not remembered: the same key signs in once Torn is back.
    r = await sign_in(server.port, keys[1])
    assert r.status == 200, r
    await torn.stop()
    r = await sign_in(server.port, keys[5])
    assert r.status == 503 and "did not answer" in r.json()["error"], r
    assert "Traceback" not in server.log


async def test_a_sign_in_storm_costs_one_torn_request_per_player(torn_server, torn, conn):
    server = torn_server(TRUSTED_PROXIES="2", SIGNINS_PER_MINUTE="60")  # bursts of 10
    players = [(1001 + i, torn.add_player(1001 + i, f"P{i}", RED_ID)) for i in range(50)]
    torn.latency = 0.2  # answers take a while: sign-ins of the same key arrive meanwhile

    async def one(player_id: int, key: str):
        return player_id, await sign_in(server.port, key, {  # as on Render, behind Cloudflare
            "X-Forwarded-For": f"10.0.{player_id // 256}.{player_id % 256}, 104.22.17.40"})

    started = time.monotonic()
    results = await asyncio.gather(*(one(pid, key) for _ in range(10) for pid, key in players))
    print(f"500 sign-ins of 50 players: {torn.count()} Torn requests, "
          f"{time.monotonic() - started:.2f} s (Torn answering in 0.2 s)")  # measured, not asserted
    assert [r.status for _, r in results] == [200] * 500, [r for _, r in results if r.status != 200][:3]
    assert all(r.json()["player_id"] == pid for pid, r in results)
    assert len({r.json()["token"] for _, r in results}) == 500
    assert torn.count("/user/profile") <= 50, torn.count()
    assert torn.count("/faction/{id}/members") == 1  # re-verified at the first sign-in only
    assert await conn.fetchval("SELECT count(*) FROM torncat_tokens WHERE kind = 'member'") == 500


async def test_the_key_never_reaches_logs_errors_or_the_database(torn_server, torn, pg, db):
    server = torn_server(LOG_LEVEL="DEBUG")
    good = torn.add_player(1001, "Ann", RED_ID)
    inactive = torn.add_player(1002, "Bob", RED_ID, status=13)
    foreign = torn.add_player(2001, "Zed", BLUE_ID)
    keys = [good, inactive, foreign, "WrongWrongWrong1"]
    bodies = []
    for key in keys:
        r = await sign_in(server.port, key)
        bodies.append(r.body.decode())
        r = await http(server.port, "POST", "/auth/torn?key=" + key, {"Content-Type": "text/plain"},
                       key)
        assert r.status == 415
        bodies.append(r.body.decode())
    torn.error_code = 17
    bodies.append((await sign_in(server.port, "Another1Another2")).body.decode())
    assert json.loads(bodies[0])["player_id"] == 1001
    server.stop()
    dump = (await asyncio.to_thread(subprocess.run, [str(pg.bin / "pg_dump"), "--data-only", db],
                                    capture_output=True, text=True, check=True)).stdout
    assert "Ann" in dump and "torncat_tokens" in dump  # the dump has the sign-in in it
    await server.await_log(r"/auth/torn\?key=REDACTED")  # the log is read in a thread: all of it
    for key in [*keys, "Another1Another2"]:
        assert key not in server.log, key
        assert key not in dump, key
        assert not any(key in body for body in bodies), key


async def test_a_token_issued_by_one_server_works_on_the_other_after_a_storm(torn_server, torn):
    first, second = torn_server(), torn_server()
    keys = [torn.add_player(1001 + i, f"P{i}", RED_ID) for i in range(60)]
    answers = await asyncio.gather(*(sign_in(first.port, key) for key in keys))
    tokens = [a.json()["token"] for a in answers]
    # The other server learns of them through the token table's NOTIFY.
    await second.await_log(r"tokens: 60 active in the database")
    statuses = [(await http(second.port, "GET", "/calls", bearer(tok))).status for tok in tokens]
    assert statuses == [200] * len(tokens), statuses.count(401)


async def test_members_who_left_the_faction_are_cut_off(torn_server, torn, db, conn):
    server = torn_server()
    ann_key = torn.add_player(1001, "Ann", RED_ID)
    ann = (await sign_in(server.port, ann_key)).json()["token"]
    bob = (await sign_in(server.port, torn.add_player(1002, "Bob", RED_ID))).json()["token"]
    async with sse_clients(*(SseClient(server.port, headers=bearer(tok))
                             for tok in (ann, bob))) as streams:
        for s_ in streams:
            await s_.next()
        torn.leave_faction(1002)
        # What the central poll does: read the member list, revoke the rest.
        config = t.parse_settings([], {"TORN_API_URL": torn.base_url, "FACTIONS": str(RED_ID)})
        stats = t.Stats()
        hub = t.Hub(asyncio.get_running_loop(), config.replay_events, config.client_buffer_bytes,
                    stats)
        auth = t.Auth("", (), factions=config.factions)
        database, torn_api = t.Database(db, config, stats), t.TornClient(torn.base_url, 5.0)
        sign_ins = t.SignIn(config, torn_api, database, auth, hub)
        await database.open()
        try:
            members = await torn_api.faction_member_ids(ann_key, RED_ID, t.TornUse.POLL)
            assert members == {1001}
            read_at = time.time()
            assert await sign_ins.sign_out_departed(RED_ID, members, 1001, read_at) == (1, None)
            assert await sign_ins.sign_out_departed(RED_ID, members, 1001, read_at) == (0, None)
        finally:
            await database.pool.close()
            torn_api.close()
        await asyncio.wait_for(streams[1].closed.wait(), STEP_TIMEOUT)
        r = await http(server.port, "GET", "/calls", bearer(bob))  # told by the NOTIFY
        assert (r.status, r.json()) == (401, {"error": t.MEMBER_TOKEN_ENDED["left_faction"],
                                              "signed_out": "left_faction"}), r
        assert (await http(server.port, "GET", "/calls", bearer(ann))).status == 200
        assert not streams[0].closed.is_set()


WAR_ID = 9001


FAST_POLL = "0.3"  # seconds; below POLL_SECONDS' 5-10 only with TORNCAT_TESTING=1


def ranked_war(one: int = RED_ID, other: int = BLUE_ID, war_id: int = WAR_ID, **fields) -> dict:
    """FactionRankedWar: `one` (RED_ID) against `other` (BLUE_ID), on since a minute."""
    now = int(time.time())
    return {"war_id": war_id, "start": now - 60, "end": None, "target": 1000, "winner": None,
            "factions": [{"id": one, "name": "Red", "score": 0, "chain": 0},
                         {"id": other, "name": "Blue", "score": 0, "chain": 0}], **fields}


@pytest.fixture
def war(torn):
    """RED_ID at war with BLUE_ID; Ann (RED) has a key; Zed [2001] and Yan [2002] are BLUE."""
    torn.factions[RED_ID].ranked_war = torn.factions[BLUE_ID].ranked_war = ranked_war()
    torn.add_player(2001, "Zed", BLUE_ID)
    torn.add_player(2002, "Yan", BLUE_ID)
    return torn.add_player(1001, "Ann", RED_ID)


# At FAST_POLL a key is asked ~400 times a minute: over TORN_KEY_BUDGET's 30 and Torn's
# 100, which would make the poll wait (or back off) mid-test. Tests of those limits set them.
FAST_POLL_BUDGET = "100000"


@pytest.fixture
def poll_server(torn_server, torn):
    """Factory: a server polling the fake Torn every FAST_POLL seconds with RED's token on."""
    torn.rate_limit = int(FAST_POLL_BUDGET)

    def start(**env):
        env.setdefault("POLL_SECONDS", FAST_POLL)
        env.setdefault("TORN_KEY_BUDGET", FAST_POLL_BUDGET)
        env.setdefault("FACTION_TOKENS", f"{RED_ID}:{RED}")
        return torn_server(TORNCAT_TESTING="1", **env)
    return start


async def poll_health(server) -> dict:
    return (await http(server.port, "GET", "/healthz")).json()["torn_poll"]


async def polled(server, faction: int = RED_ID, rounds: int = 1) -> int:
    """Wait until `server` has completed `rounds` polls of `faction`; returns its count."""
    async def done() -> int:
        info = (await poll_health(server))["factions"].get(str(faction), {})
        return info["polls"] if info.get("polls", 0) >= rounds else 0

    return await wait_until(done, what=f"{rounds} polls of faction {faction}")


async def members_asked(torn, times: int) -> None:
    """Wait until the fake was asked for BLUE's members `times` more times: a status set
    before the first of them has been read by the poll when the second arrives."""
    while not torn.arrivals.empty():
        torn.arrivals.get_nowait()
    seen = 0
    while seen < times:
        _, path = await asyncio.wait_for(torn.arrivals.get(), STEP_TIMEOUT)
        seen += path == "/faction/{id}/members"


def hospitalise(torn, player_id: int, minutes: int = 10) -> None:
    player = torn.players[player_id]
    player.state, player.until = "Hospital", int(time.time()) + minutes * 60
    player.description = f"In hospital for {minutes} mins"


def set_okay(torn, player_id: int) -> None:
    player = torn.players[player_id]
    player.state, player.until, player.description = "Okay", None, "Okay"


def assert_no_key(key: str, *texts) -> None:
    for text in texts:
        assert key not in (text.decode() if isinstance(text, bytes) else text)


async def test_the_poll_clears_calls_of_targets_hospitalised_or_jailed_and_at_war_end(
        poll_server, war, torn, conn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}")
    await server.await_log("torn poll: this process polls")
    await polled(server)
    async with SseClient(server.port, headers=bearer(RED)) as stream:
        snapshot = (await stream.next()).json
        assert snapshot["calls"] == []
        assert sorted((s["target_id"], s["state"], s["war_id"], s["faction_id"])
                      for s in snapshot["statuses"]) == [(2001, "Okay", WAR_ID, RED_ID),
                                                         (2002, "Okay", WAR_ID, RED_ID)]
        # A new call carries the current war.
        r = await post_call(server.port, RED, 2001, caller_id=1001, caller_name="Ann")
        assert r.status == 201 and r.json()["call"]["war_id"] == WAR_ID, r
        assert (await stream.next()).event == "target_call"
        # Hospitalised: the stream shows the call ended by the poll, then the status (its
        # rows are written before the event lock is taken: trigger.sql, "Lock order").
        hospitalise(torn, 2001)
        uncall, status = await stream.take(2)
        assert (status.event, status.json["target_id"], status.json["state"]) == (
            "target_status", 2001, "Hospital")
        assert status.json["until"] == torn.players[2001].until
        assert status.json["description"] == "In hospital for 10 mins"
        assert uncall.event == "target_uncall"
        assert (uncall.json["target_id"], uncall.json["uncall_reason"],
                uncall.json["uncalled_by"]) == (2001, "hospitalized", None)
        # Back to Okay: the status changes, nobody is called again.
        set_okay(torn, 2001)
        ev = await stream.next()
        assert (ev.event, ev.json["state"]) == ("target_status", "Okay")
        await members_asked(torn, 2)
        await stream.assert_quiet()
        assert await conn.fetchval("SELECT count(*) FROM target_calls WHERE uncalled_at IS NULL") == 0
        # A call on a target already in hospital stays...
        hospitalise(torn, 2002)
        assert (await stream.next()).json["state"] == "Hospital"
        assert (await post_call(server.port, RED, 2002, caller_id=1001, caller_name="Ann")).status == 201
        assert (await stream.next()).event == "target_call"
        await members_asked(torn, 2)
        await stream.assert_quiet()
        # ...until the target is hit again (its hospital time moves later).
        hospitalise(torn, 2002, minutes=30)
        uncall, status = await stream.take(2)
        assert (status.json["target_id"], uncall.event, uncall.json["uncall_reason"]) == (
            2002, "target_uncall", "hospitalized")
        # Jailed: its call ends with reason "jailed".
        assert (await post_call(server.port, RED, 2001, caller_id=1001, caller_name="Ann")).status == 201
        assert (await stream.next()).event == "target_call"
        player = torn.players[2001]
        player.state, player.until, player.description = "Jail", int(time.time()) + 600, "In jail"
        uncall, status = await stream.take(2)
        assert (status.json["state"], uncall.json["uncall_reason"]) == ("Jail", "jailed")
        # Travel only shows in the status: the call stays.
        set_okay(torn, 2002)
        assert (await stream.next()).json["state"] == "Okay"
        assert (await post_call(server.port, RED, 2002, caller_id=1001, caller_name="Ann")).status == 201
        assert (await stream.next()).event == "target_call"
        player = torn.players[2002]
        player.state, player.until, player.description = "Traveling", None, "Traveling to Mexico"
        assert (await stream.next()).json["state"] == "Traveling"
        await members_asked(torn, 2)
        await stream.assert_quiet()
        # The war ends: its remaining calls end with it.
        torn.factions[RED_ID].ranked_war = ranked_war(end=int(time.time()) - 1, winner=RED_ID)
        ev = await stream.next()
        assert (ev.event, ev.json["target_id"], ev.json["uncall_reason"]) == (
            "target_uncall", 2002, "war_ended")
        await server.await_log(f"torn poll: faction {RED_ID}: no war")
        # The long-poll and a replay carry statuses like any event.
        events = (await http(server.port, "GET", "/calls?since=0", bearer(RED))).json()["events"]
        assert "target_status" in {e["event"] for e in events}
        async with SseClient(server.port, headers={**bearer(RED), "Last-Event-ID": "0"}) as replay:
            first = await replay.take(2)  # the war the poll found, then the statuses it read
            assert [e.event for e in first] == ["war", "target_status"], first
        health = await poll_health(server)
        assert health["role"] == "polling" and health["factions"][str(RED_ID)]["last_success"]
        metrics = (await http(server.port, "GET", "/metrics")).body
        assert metric_value(metrics, "torn_poll_holder") == 1
        assert b'torncat_torn_requests_total{key="env:1"}' in metrics
        assert_no_key(war, server.log, metrics, json.dumps(health))
        assert await conn.fetchval("SELECT count(*) FROM target_call_events WHERE "
                                   "data::text LIKE '%' || $1 || '%'", war) == 0


async def test_members_are_told_when_the_war_starts_and_ends_even_with_no_call_left(
        poll_server, war, torn):
    """A `war` event each time the faction's current war changes, and the snapshot's (and
    GET /calls') `war`: a war that ends with no call left to end still says so, a stream
    opened after its end is told at once, and the next war is announced. (The panel's "War
    over" and its Call buttons follow them.)"""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", SECRET_TOKEN=ADMIN_TOKEN,
                         FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    await polled(server)
    async with SseClient(server.port, headers=bearer(RED)) as stream:
        at_war = (await stream.next()).json["war"]
        assert {k: at_war[k] for k in ("faction_id", "known", "war_id", "opponent_id", "source",
                                       "ended_war_id")} == {
            "faction_id": RED_ID, "known": True, "war_id": WAR_ID, "opponent_id": BLUE_ID,
            "source": "torn_poll", "ended_war_id": None}
        torn.factions[RED_ID].ranked_war = ranked_war(end=int(time.time()) - 1, winner=RED_ID)
        ended = await stream.next()  # no call was on: the war event alone
        assert ended.event == "war", ended
        assert (ended.json["known"], ended.json["war_id"], ended.json["ended_war_id"]) == (
            True, None, WAR_ID)
    async with SseClient(server.port, headers=bearer(RED)) as late:
        assert (await late.next()).json["war"]["war_id"] is None  # a reload after the end
        body = (await http(server.port, "GET", "/calls", bearer(RED))).json()
        assert (body["war"]["known"], body["war"]["war_id"]) == (True, None)
        since = (await http(server.port, "GET", f"/calls?since={ended.int_id - 1}",
                            bearer(RED))).json()
        assert [e["event"] for e in since["events"]] == ["war"]
        torn.factions[RED_ID].ranked_war = torn.factions[BLUE_ID].ranked_war = ranked_war(
            war_id=WAR_ID + 1)
        began = await late.next()
        assert (began.event, began.json["war_id"], began.json["ended_war_id"]) == (
            "war", WAR_ID + 1, None)
    # Another faction's streams hear nothing of RED's war; every faction's see each war.
    async with SseClient(server.port, headers=bearer(BLUE)) as other:
        assert "war" not in (await other.next()).json
    body = (await http(server.port, "GET", "/calls", bearer(ADMIN_TOKEN))).json()
    assert [(w["faction_id"], w["war_id"]) for w in body["wars"]] == [(RED_ID, WAR_ID + 1)]


async def test_two_servers_poll_once_and_the_second_takes_over_when_the_first_is_killed(
        poll_server, war, torn):
    servers = [poll_server(TORN_API_KEYS=f"{RED_ID}:{war}") for _ in range(2)]
    holder = next(s for s in servers if "this process polls" in s.log) if any(
        "this process polls" in s.log for s in servers) else None
    if holder is None:
        await asyncio.wait_for(asyncio.wait(
            [asyncio.ensure_future(s.await_log("this process polls")) for s in servers],
            return_when=asyncio.FIRST_COMPLETED), STEP_TIMEOUT)
        holder = next(s for s in servers if "this process polls" in s.log)
    other = servers[1 - servers.index(holder)]
    await polled(holder, rounds=5)
    assert (await poll_health(other))["role"] == "standby"
    # One poller: Torn saw one /faction/{id}/wars per round of the holder's (one may be in flight).
    before = await polled(holder)
    wars = torn.count("/faction/{id}/wars")
    after = await polled(holder)
    assert before <= wars <= after + 1, (before, wars, after)
    assert "this process polls" not in other.log
    holder.stop(signal.SIGKILL)
    await other.await_log("torn poll: this process polls")
    counted = torn.count("/faction/{id}/wars")
    await polled(other, rounds=2)
    assert torn.count("/faction/{id}/wars") > counted
    assert_no_key(war, other.log, holder.log)


async def test_torn_down_or_slow_backs_off_keeps_calls_and_loses_nothing(poll_server, war, torn, conn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", TORN_TIMEOUT_SECONDS="0.5")
    await polled(server)
    async with SseClient(server.port, headers=bearer(RED)) as stream:
        await stream.next()
        for n, (knob, value, normal) in enumerate((("error_code", 17, None),
                                                   ("http_status", 502, None),
                                                   ("latency", 1.0, 0.0))):
            target = 2001 + n % 2
            assert (await post_call(server.port, RED, target, caller_id=1001,
                                    caller_name="Ann")).status == 201
            assert (await stream.next()).event == "target_call"
            mark = server.mark()
            setattr(torn, knob, value)
            await server.await_log("Torn's API failed .*backing off", start=mark)
            hospitalise(torn, target)  # while Torn cannot tell us
            await wait_until(lambda: _failures(server, 2), what="two failed polls")
            await stream.assert_quiet()
            assert await conn.fetchval(
                "SELECT count(*) FROM target_calls WHERE uncalled_at IS NULL") == 1
            setattr(torn, knob, normal)
            await server.await_log("Torn's API answers again", start=mark)
            # Nothing was lost: the change made during the outage is seen now.
            uncall, status = await stream.take(2)
            assert (status.json["target_id"], status.json["state"]) == (target, "Hospital")
            assert (uncall.json["target_id"], uncall.json["uncall_reason"]) == (
                target, "hospitalized")
            set_okay(torn, target)
            assert (await stream.next()).json["state"] == "Okay"
        errors = (await poll_health(server))["torn_errors"]
        assert errors["17"] >= 2 and errors["timeout"] >= 4, errors
        await server.await_log("backing off", count=3)
        assert server.log.count("backing off") == 3  # once per outage, not once per poll
        assert_no_key(war, server.log)


async def test_the_polls_health_reaches_its_factions_streams_when_torn_is_down_and_a_key_is_refused(
        poll_server, war, torn, conn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", POLL_SECONDS="0.2",
                         FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    await polled(server)
    async with SseClient(server.port, headers=bearer(RED)) as red, \
            SseClient(server.port, headers=bearer(BLUE)) as blue:
        first = await red.next()
        assert "poll_health" not in first.json  # healthy: the snapshot is as it was
        await blue.next()
        torn.error_code = 17  # Torn's backend fails
        stale = await red.next()  # the first event, and it says 3 polls failed: not before
        assert stale.event == "poll_health", stale
        assert stale.json["faction_id"] == RED_ID and stale.json["state"] == "stale"
        assert stale.json["failures"] == t.POLL_STALE_ROUNDS and stale.json["error_code"] == 17
        assert stale.json["reason"].startswith("error 17: ") and stale.json["since"]
        await wait_until(lambda: _failures(server, t.POLL_STALE_ROUNDS + 1),
                         what="more failed polls")
        await red.assert_quiet()  # said once per outage, not once per poll
        # A stream that comes now gets it in its snapshot, a poll since before it in a replay.
        async with SseClient(server.port, headers=bearer(RED)) as late:
            assert (await late.next()).json["poll_health"] == [stale.json]
        r = await http(server.port, "GET", f"/calls?since={first.id}", bearer(RED))
        assert [e["event"] for e in r.json()["events"]] == ["poll_health"]
        torn.error_code = None
        ok = await red.next()
        assert (ok.event, ok.json["state"], ok.json["reason"], ok.json["failures"]) == (
            "poll_health", "ok", None, 0)
        # The faction's only key is refused: disabled, and its members are told once.
        torn.keys[war].status = 2
        refused = await red.next()
        assert (refused.event, refused.json["state"], refused.json["error_code"]) == (
            "poll_health", "key_refused", 2)
        assert refused.json["reason"].startswith("error 2: ")
        assert refused.json["disabled_keys"] == 1
        await red.assert_quiet()
        # The operator adds a key: the next poll succeeds, and the panels clear.
        fresh = torn.add_key(1001)
        await conn.execute("INSERT INTO torncat_torn_keys (faction_id, api_key, source) "
                           "VALUES ($1, $2, 'operator')", RED_ID, fresh)
        assert (await red.next()).json["state"] == "ok"
        await blue.assert_quiet()  # another faction never hears of it
        assert await conn.fetchval("SELECT state FROM torncat_poll_health WHERE faction_id = $1",
                                   RED_ID) == "ok"
        assert_no_key(war, server.log, stale.data, refused.data)


async def _failures(server, n: int) -> bool:
    info = (await poll_health(server))["factions"].get(str(RED_ID), {})
    return info.get("failures", 0) >= n


async def test_a_players_keys_share_one_budget_and_bad_keys_are_disabled_once(poll_server, war,
                                                                              torn):
    """Torn allows a player 100 requests a minute across all their keys: TORN_KEY_BUDGET
    counts a player's keys together (their owner asked once, GET /key/info, counted too)."""
    second = torn.add_key(1001)  # Ann's second key
    paused = torn.add_player(1002, "Bob", RED_ID, status=18)
    cy = torn.add_player(1003, "Cy", RED_ID)
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{paused},{RED_ID}:{war},{RED_ID}:{second},"
                                       f"{RED_ID}:{cy}", TORN_KEY_BUDGET="4", POLL_SECONDS="0.2")
    await server.await_log(r"key env:1 of faction \d+ disabled: Torn error 18")

    def spent(*keys: str) -> int:
        return sum(n for (k, _), n in torn.requests.items() if k in keys)

    await wait_until(lambda: spent(war, second) >= 4 and spent(cy) >= 4,
                     what="Ann's and Cy's budgets used")
    # Nothing more is asked for the rest of the minute (ten polling intervals prove it).
    while not torn.arrivals.empty():
        torn.arrivals.get_nowait()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(torn.arrivals.get(), 2.0)
    assert (spent(war, second), spent(cy), spent(paused)) == (4, 4, 1), torn.requests
    assert torn.requests[(war, "/key/info")] == torn.requests[(second, "/key/info")] == 1
    assert server.log.count("disabled: Torn error") == 1
    health = await poll_health(server)
    assert health["keys"]["env:1"]["disabled"] and health["torn_errors"] == {"18": 1}
    keys = health["keys"]
    assert keys["env:2"]["requests_last_minute"] + keys["env:3"]["requests_last_minute"] == 4
    metrics = (await http(server.port, "GET", "/metrics")).body
    assert b'torncat_torn_key_requests_last_minute{key="env:4"} 4' in metrics
    for key in (war, second, paused, cy):
        assert_no_key(key, server.log, metrics, json.dumps(health))


async def test_a_lent_key_must_be_public_and_then_feeds_the_poll(poll_server, war, torn, db, conn):
    server = poll_server()  # no operator key: nothing to poll with
    full = torn.add_player(1003, "Cy", RED_ID, level=4)
    r = await http(server.port, "POST", "/auth/torn", {}, {"key": full, "lend": True})
    assert r.status == 403, r
    assert "only keys with Public access" in r.json()["error"]
    assert r.json()["create_key_url"] == t.PUBLIC_KEY_URL
    assert "type=1" in t.PUBLIC_KEY_URL
    assert_no_key(full, r.body)
    assert await conn.fetchval("SELECT count(*) FROM torncat_torn_keys") == 0
    assert await conn.fetchval("SELECT count(*) FROM torncat_tokens") == 0
    assert (await http(server.port, "POST", "/auth/torn", {}, {"key": war, "lend": "yes"})).status == 400
    assert torn.count("/faction/{id}/wars") == 0
    r = await http(server.port, "POST", "/auth/torn", {}, {"key": war, "lend": True})
    assert r.status == 200 and r.json()["lent"] is True, r
    assert_no_key(war, r.body)
    row = await conn.fetchrow("SELECT * FROM torncat_torn_keys")
    assert (row["faction_id"], row["source"], row["player_id"]) == (RED_ID, "lent", 1001)
    await polled(server)
    assert torn.requests[(war, "/faction/{id}/wars")] >= 1
    listing = await asyncio.to_thread(run_cli, "torn-key", "list", DATABASE_URL=db)
    assert listing.returncode == 0 and "lent by Ann [1001]" in listing.stdout, listing
    assert_no_key(war, listing.stdout, listing.stderr, server.log)


async def test_torn_key_cli_reads_the_key_from_stdin_and_never_shows_it(db, conn, war):
    run = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HERE / "torncat_sse.py"), "torn-key", "add",
                         "--faction", str(RED_ID)], input=war + "\n", capture_output=True,
        text=True, timeout=30, env={**os.environ, "DATABASE_URL": db})
    assert run.returncode == 0 and "stored for faction" in run.stderr, run
    again = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HERE / "torncat_sse.py"), "torn-key", "add",
                         "--faction", str(RED_ID)], input=war + "\n", capture_output=True,
        text=True, timeout=30, env={**os.environ, "DATABASE_URL": db})
    assert again.returncode == 0 and "already stored" in again.stderr, again
    bad = await asyncio.to_thread(
        subprocess.run, [sys.executable, str(HERE / "torncat_sse.py"), "torn-key", "add",
                         "--faction", str(RED_ID)], input="not a key\n", capture_output=True,
        text=True, timeout=30, env={**os.environ, "DATABASE_URL": db})
    assert bad.returncode == 2 and "not a Torn API key" in bad.stderr
    listing = await asyncio.to_thread(run_cli, "torn-key", "list", DATABASE_URL=db)
    assert listing.returncode == 0 and "operator" in listing.stdout, listing
    for out in (run, again, bad, listing):
        assert_no_key(war, out.stdout, out.stderr)
    assert await conn.fetchval("SELECT count(*) FROM torncat_torn_keys") == 1
    removed = await asyncio.to_thread(run_cli, "torn-key", "remove", "1", DATABASE_URL=db)
    assert removed.returncode == 0
    assert await conn.fetchval("SELECT count(*) FROM torncat_torn_keys") == 0


async def test_the_poll_refuses_a_transaction_pooler_and_never_polls(pg, db, start_server, war, torn):
    database = db.rsplit("/", 1)[1]
    bouncer = PgBouncer(pg, "transaction")
    try:
        server = start_server(DATABASE_URL=bouncer.dsn(database), PROBE_TIMEOUT_SECONDS="1",
                              TORN_API_URL=torn.base_url, TORN_API_KEYS=f"{RED_ID}:{war}",
                              TORNCAT_TESTING="1", POLL_SECONDS=FAST_POLL)
        await server.await_log("torn poll: DATABASE_URL does not give this process a session")
        assert "session pooler (port 5432)" in server.log
        assert (await poll_health(server))["role"] == "transaction pooler"
        assert torn.count() == 0
    finally:
        bouncer.stop()


async def test_the_poll_signs_out_members_who_left_the_faction(poll_server, war, torn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", REVERIFY_HOURS="0.0003")  # ~1 s
    bob = (await sign_in(server.port, torn.add_player(1002, "Bob", RED_ID))).json()["token"]
    async with SseClient(server.port, headers=bearer(bob)) as stream:
        await stream.next()
        await members_asked(torn, 1)
        assert not stream.closed.is_set()
        torn.leave_faction(1002)
        await asyncio.wait_for(stream.closed.wait(), STEP_TIMEOUT)
        await server.await_log(rf"Bob \[1002\] is no longer in faction {RED_ID}")
        r = await http(server.port, "GET", "/calls", bearer(bob))  # dropped by this process
        assert (r.status, r.json()["signed_out"]) == (401, "left_faction"), r
        assert torn.requests[(war, "/faction/{id}/members")] >= 2


async def answered(torn, route: str, faction: int, times: int) -> None:
    """Wait until the fake has answered `route` about `faction` `times` more times."""
    start = torn.answered[(route, faction)]
    await wait_until(lambda: torn.answered[(route, faction)] >= start + times,
                     what=f"{times} answers of {route} about faction {faction}")


MEMBERS, WARS = "/faction/{id}/members", "/faction/{id}/wars"
GREEN_ID, ORANGE_ID = 333, 444


async def active_targets(port: int, token: str = RED) -> set[int]:
    return {c["target_id"] for c in (await http(port, "GET", "/calls", bearer(token))).json()["calls"]}


@pytest.mark.parametrize(("mode", "route"), [
    ("member_not_object", MEMBERS), ("status_not_object", MEMBERS), ("deep_json", MEMBERS),
    ("id_past_bigint", MEMBERS), ("id_past_2_53", MEMBERS), ("members_many", MEMBERS),
    ("factions_not_array", WARS), ("war_id_negative", WARS), ("not_object", WARS),
])
async def test_an_answer_off_the_document_fails_that_factions_round_only(poll_server, war, torn,
                                                                         mode, route):
    """One faction's answers broken in each way fake_torn.HOSTILE knows (every one stopped
    every faction's poll, reset the failure counts, and no "stale" was ever said): that
    faction's round fails, counted and backed off, "stale" after POLL_STALE_ROUNDS; the
    other faction is polled all along, and the session never restarts."""
    torn.add_faction(GREEN_ID, "Green", ranked_war(GREEN_ID, ORANGE_ID, WAR_ID + 1))
    torn.add_faction(ORANGE_ID, "Orange", ranked_war(GREEN_ID, ORANGE_ID, WAR_ID + 1))
    torn.add_player(4001, "Olga", ORANGE_ID)
    green = torn.add_player(3001, "Gus", GREEN_ID)
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war},{GREEN_ID}:{green}")
    await polled(server, RED_ID)
    await polled(server, GREEN_ID)
    async with SseClient(server.port, headers=bearer(RED)) as red:
        await red.next()
        mark = server.mark()
        # RED's answers break (BLUE's member list, or RED's war); GREEN's stay right.
        torn.misbehave(mode, route, BLUE_ID if route == MEMBERS else RED_ID)
        stale = await red.next()
        assert (stale.event, stale.json["state"]) == ("poll_health", "stale"), stale
        assert stale.json["reason"].startswith("an answer off Torn's API document: "), stale.json
        green_polls = (await poll_health(server))["factions"][str(GREEN_ID)]["polls"]
        await polled(server, GREEN_ID, green_polls + 3)
        assert "stopped polling" not in "\n".join(server.lines[mark:])
        assert server.log.count("this process polls") == 1  # the session never restarted
        assert "Traceback" not in server.log
        torn.behave()
        ok = await red.next()
        assert (ok.event, ok.json["state"]) == ("poll_health", "ok"), ok


async def test_the_war_is_read_for_the_polled_faction_not_the_key_owners(poll_server, war, torn):
    """/faction/wars answers for the key owner's faction: Ann, whose key polls RED, moved to
    a faction at peace, and every RED call ended with 'war_ended'."""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}")
    await polled(server)
    assert (await post_call(server.port, RED, 2001, caller_id=1001)).status == 201
    torn.add_faction(GREEN_ID, "Green")
    torn.join_faction(1001, GREEN_ID)
    await answered(torn, MEMBERS, BLUE_ID, 3)  # RED's war was read, and BLUE polled, since
    assert await active_targets(server.port) == {2001}
    assert (await poll_health(server))["factions"][str(RED_ID)]["war_id"] == WAR_ID
    assert "calls ended with their war" not in server.log


async def test_one_answer_without_the_war_ends_nothing_two_end_it(poll_server, war, torn):
    """One `ranked: null` answer, or a war_id of -1, ended every call."""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}")
    await polled(server)
    assert (await post_call(server.port, RED, 2001, caller_id=1001)).status == 201
    for mode in ("ranked_null", "war_id_negative"):
        torn.misbehave(mode, WARS, RED_ID, times=1)
        await wait_until(lambda: not torn.misbehaviours, what=f"one {mode} answer")
        await answered(torn, MEMBERS, BLUE_ID, 2)
        assert await active_targets(server.port) == {2001}, mode
    torn.misbehave("ranked_null", WARS, RED_ID)  # from now on: the war is over
    await wait_until(lambda: _no_calls(server.port), what="the war's calls ended")
    await server.await_log("calls ended with their war")  # logged once the UPDATE is back


async def _no_calls(port: int) -> bool:
    return await active_targets(port) == set()


async def test_calls_made_before_the_poll_knew_the_war_end_with_it(poll_server, war, torn, conn):
    """A call made while the poll had no key (war_id NULL) never ended with its war."""
    server = poll_server()
    r = await post_call(server.port, RED, 2001, caller_id=1001)
    assert r.status == 201 and r.json()["call"]["war_id"] is None, r
    await conn.execute("INSERT INTO torncat_torn_keys (faction_id, api_key, source) "
                       "VALUES ($1, $2, 'operator')", RED_ID, war)
    await polled(server)
    assert await active_targets(server.port) == {2001}  # a war starting ends nothing
    for f in (RED_ID, BLUE_ID):
        torn.factions[f].ranked_war = ranked_war(winner=RED_ID, end=int(time.time()) - 5)
    await wait_until(lambda: _no_calls(server.port), what="the call ended with its war")
    assert await conn.fetchval("SELECT uncall_reason FROM target_calls WHERE target_id = 2001") \
        == "war_ended"


async def test_a_faction_without_a_poll_key_is_reverified_at_its_members_sign_ins(torn_server,
                                                                                   torn):
    """Members who left kept access: a faction without a poll key was never re-verified,
    and the 5-minute identity cache gave a player who left a fresh token of the old one."""
    server = torn_server(REVERIFY_HOURS="0.000001")  # every sign-in reads the member list
    ann_key = torn.add_player(1001, "Ann", RED_ID)
    ann = (await sign_in(server.port, ann_key)).json()["token"]
    bob_key = torn.add_player(1002, "Bob", RED_ID)
    torn.join_faction(1001, BLUE_ID)  # Ann leaves for the enemy
    assert (await sign_in(server.port, bob_key)).status == 200
    r = await http(server.port, "GET", "/calls", bearer(ann))
    assert (r.status, r.json().get("signed_out")) == (401, "left_faction"), r
    r = await sign_in(server.port, ann_key)  # within the identity cache's 30 s
    assert r.status == 403 and r.json()["faction_id"] == BLUE_ID, r


async def test_a_player_whose_faction_changed_is_refused_the_old_one_at_once(poll_server, war,
                                                                            torn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", REVERIFY_HOURS="0.0003",
                         FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    bob_key = torn.add_player(1002, "Bob", RED_ID)
    bob = (await sign_in(server.port, bob_key)).json()["token"]
    torn.join_faction(1002, BLUE_ID)
    await server.await_log(r"Bob \[1002\] is no longer in faction")
    assert (await http(server.port, "GET", "/calls", bearer(bob))).status == 401
    r = await sign_in(server.port, bob_key)  # within the identity cache's lifetime
    assert r.status == 200 and r.json()["faction_id"] == BLUE_ID, r  # BLUE's, never RED's


@pytest.mark.parametrize("mode", ["members_empty", "members_partial"])
async def test_an_implausible_member_list_signs_nobody_out(poll_server, war, torn, mode):
    """`members: []` (or a partial list) from Torn revoked every member token of the faction."""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", REVERIFY_HOURS="0.0003",
                         SIGNOUT_MAX_DROP="1")
    tokens = [(await sign_in(server.port, torn.add_player(1010 + n, f"M{n}", RED_ID))).json()["token"]
              for n in range(4)]
    await answered(torn, MEMBERS, RED_ID, 1)
    torn.misbehave(mode, MEMBERS, RED_ID, times=1)
    await wait_until(lambda: not torn.misbehaviours, what=f"one {mode} answer")
    await answered(torn, MEMBERS, RED_ID, 2)  # and the reads after it
    for token in tokens:
        assert (await http(server.port, "GET", "/calls", bearer(token))).status == 200
    await server.await_log("member list looks implausible")
    assert "is no longer in faction" not in server.log


async def test_a_member_who_left_is_signed_out_when_two_reads_agree(poll_server, war, torn):
    """A drop past SIGNOUT_MAX_DROP is acted on once the next read agrees."""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", REVERIFY_HOURS="0.0003",
                         SIGNOUT_MAX_DROP="1")
    tokens = [(await sign_in(server.port, torn.add_player(1010 + n, f"M{n}", RED_ID))).json()["token"]
              for n in range(3)]
    for n in range(2):
        torn.leave_faction(1010 + n)
    await server.await_log("2 signed-in members are missing from it")
    await server.await_log(r"M1 \[1011\] is no longer in faction")
    statuses = [(await http(server.port, "GET", "/calls", bearer(tok))).status for tok in tokens]
    assert statuses == [401, 401, 200]


@pytest.mark.parametrize("mode", ["deep_json", "id_past_bigint", "id_past_2_53", "id_zero",
                                  "not_json", "not_object"])
async def test_a_bad_profile_answer_is_502_with_a_reason(torn_server, torn, mode):
    """100k-deep JSON or an id past bigint answered 500; ids past 2^53 were taken."""
    server = torn_server()
    key = torn.add_player(1001, "Ann", RED_ID)
    torn.misbehave(mode, "/user/profile")
    r = await sign_in(server.port, key)
    assert r.status == 502 and "does not understand" in r.json()["error"], r
    assert "Traceback" not in server.log


@pytest.mark.parametrize("mode", ["name_nul", "name_newline", "name_control", "name_long"])
async def test_names_from_torn_are_printable_and_bounded(torn_server, torn, conn, mode):
    """A NUL in a name answered 500, a newline forged a log line, control characters
    reached `caller_name`."""
    server = torn_server()
    torn.misbehave(mode, "/user/profile")
    r = await sign_in(server.port, torn.add_player(1001, "Ann", RED_ID))
    assert r.status == 200, r
    name = r.json()["name"]
    assert name.isprintable() and 0 < len(name) <= t.MAX_NAME_CHARS and "Ann" in name, name
    r = await http(server.port, "POST", "/calls", bearer(r.json()["token"]), {"target_id": 2001})
    assert r.status == 201 and r.json()["call"]["caller_name"] == name, r
    assert FORGED_LOG_LINE not in server.log.splitlines()
    assert await conn.fetchval("SELECT caller_name FROM target_calls") == name


async def test_enemy_names_from_the_poll_are_printable(poll_server, war, torn):
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}")
    await polled(server)
    async with SseClient(server.port, headers=bearer(RED)) as red:
        await red.next()
        torn.misbehave("name_control", MEMBERS, BLUE_ID)
        torn.players[2001].state = "Jail"  # a change: a status event goes out
        ev = await red.next()
        assert (ev.event, ev.json["target_id"]) == ("target_status", 2001), ev
        assert ev.json["target_name"].isprintable() and "Zed" in ev.json["target_name"], ev


async def test_a_dripping_torn_starves_neither_sign_ins_nor_the_poll(poll_server, war, torn):
    """A Torn that drips a byte every 2 s held urllib's threads for 100 s and more: every
    uncached sign-in answered 503, and the poll timed out. The drip is faster than the
    timeout (as 2 s is than the default 5 s): a per-read timeout never fires."""
    server = poll_server(TORN_API_KEYS=f"{RED_ID}:{war}", TORN_TIMEOUT_SECONDS="1")
    torn.drip_seconds = 0.25
    await polled(server)
    keys = [torn.add_player(1100 + n, f"P{n}", RED_ID) for n in range(12)]
    torn.misbehave("drip", "/user/profile")  # every sign-in's answer, a byte every 2 s
    answers = await asyncio.gather(*(sign_in(server.port, k) for k in keys[:10]))
    assert {r.status for r in answers} == {503}, answers  # each at its deadline
    polls = (await poll_health(server))["factions"][str(RED_ID)]["polls"]
    await polled(server, rounds=polls + 3)  # the poll went on meanwhile
    torn.behave()
    r = await sign_in(server.port, keys[11])  # a fresh key: no cache helps
    assert r.status == 200, r


async def test_member_tokens_per_player_are_capped(torn_server, torn, conn):
    """Each sign-in added a token row: 300,000 of them cost every server 0.9 s per reload."""
    server = torn_server(MEMBER_TOKENS_PER_PLAYER="3")
    key = torn.add_player(1001, "Ann", RED_ID)
    tokens = [(await sign_in(server.port, key)).json()["token"] for _ in range(6)]
    answers = [await http(server.port, "GET", "/calls", bearer(tok)) for tok in tokens]
    assert [r.status for r in answers] == [401] * 3 + [200] * 3, answers
    assert answers[0].json()["signed_out"] == "replaced"
    assert await conn.fetchval("SELECT count(*) FROM torncat_tokens WHERE player_id = 1001 "
                               "AND revoked_at IS NULL") == 3


async def test_expiry_ends_streams_and_held_long_polls_within_seconds(torn_server, torn):
    """An expired token's stream ended up to 60 s late, and a long-poll held across the
    expiry answered 200."""
    server = torn_server(MEMBER_TOKEN_DAYS="0.00005")  # 4.32 s
    r = await sign_in(server.port, torn.add_player(1001, "Ann", RED_ID))
    token, signed_in = r.json()["token"], time.monotonic()
    async with SseClient(server.port, headers=bearer(token)) as stream:
        since = (await stream.next()).int_id
        held = asyncio.create_task(http(server.port, "GET", f"/calls?since={since}&wait=25",
                                        bearer(token)))
        try:
            await asyncio.wait_for(stream.closed.wait(), 4.32 + STEP_TIMEOUT / 2)
            r = await asyncio.wait_for(held, STEP_TIMEOUT / 2)
        finally:
            held.cancel()
    assert (r.status, r.json()["signed_out"]) == (401, "expired"), r
    print(f"\nended {time.monotonic() - signed_in - 4.32:.1f} s after the expiry")  # measured


# ---------------------------------------------------------------------------
# The HTTP side: connections and routes
# ---------------------------------------------------------------------------

async def test_routes_methods_and_health(live_server):
    server = live_server()
    r = await http(server.port, "GET", "/healthz")
    assert r.status == 200
    poll = r.json().pop("torn_poll")  # no key anywhere: nothing polled, whatever the role
    assert poll["factions"] == {} and poll["keys"] == {} and poll["torn_errors"] == {}
    assert {k: v for k, v in r.json().items() if k != "torn_poll"} == {
                        "status": "ok", "listener": "live", "clients": 0, "long_polls": 0,
                        "last_event_id": 0,  # the pool has read the tokens
                        "database": {"pool": "ok", "pool_connections": 1,
                                     "pool_idle_connections": 1, "timeouts": 0,
                                     "terminated_connections": 0}}
    assert (await http(server.port, "HEAD", "/healthz")).body == b""
    assert (await http(server.port, "GET", "/nope")).status == 404
    r = await http(server.port, "POST", "/events", body=b"{}")
    assert r.status == 405 and r.headers["allow"] == "GET"
    r = await http(server.port, "DELETE", "/healthz")
    assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
    r = await http_raw(server.port, b"GET /events HTTP/1.0\r\n\r\n")
    assert r.status == 505


async def test_the_userscript_is_served_pointed_at_this_server(live_server):
    server = live_server()
    r = await http(server.port, "GET", "/torn-war-caller.user.js")
    assert r.status == 200 and r.headers["content-type"] == "text/javascript; charset=utf-8", r
    assert r.body == t.userscript_for(USERSCRIPT_TEXT, f"http://127.0.0.1:{server.port}")
    head = await http(server.port, "HEAD", "/torn-war-caller.user.js")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == str(len(r.body))
    r = await http_raw(server.port, b"GET /torn-war-caller.user.js HTTP/1.1\r\nHost: bad/host\r\n\r\n")
    assert r.status == 400 and "PUBLIC_URL" in r.json()["error"]
    # Behind a proxy (Render's): the scheme it says; with PUBLIC_URL, that, whatever the Host.
    proxied = live_server(TRUSTED_PROXIES="1")
    r = await http(proxied.port, "GET", "/torn-war-caller.user.js",
                   {"X-Forwarded-Proto": "https", "Host": "calls.example"})
    assert b"// @updateURL    https://calls.example/torn-war-caller.user.js\n" in r.body
    public = live_server(PUBLIC_URL="https://calls.example")
    r = await http(public.port, "GET", "/torn-war-caller.user.js", {"Host": "other.example"})
    assert r.body == t.userscript_for(USERSCRIPT_TEXT, "https://calls.example")


async def test_keep_alive_and_pipelined_requests(live_server):
    server = live_server()
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
        statuses = []
        for _ in range(2):
            status, headers = await read_response_head(reader)
            await reader.readexactly(int(headers["content-length"]))
            statuses.append(status)
        assert statuses == [200, 404]
    finally:
        writer.close()


async def test_hostile_request_heads(live_server):
    server = live_server(REQUEST_TIMEOUT_SECONDS="0.5")
    port = server.port
    big = b"GET /events HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (t.MAX_HEAD_BYTES + 10) + b"\r\n\r\n"
    assert (await http_raw(port, big)).status == 431
    endless = b"GET /events HTTP/1.1\r\nHost: x\r\nX: " + b"b" * (t.MAX_HEAD_BYTES * 4)
    assert (await http_raw(port, endless)).status == 431
    for raw in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # a TLS hello
                b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
                b"GET / HTTP/1.1\r\nHost: x\r\nX: \xc3\x28\x00\r\n\r\n",
                b"POST /events HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999\r\n\r\n"):
        r = await http_raw(port, raw)
        assert r.status in (400, 413), raw
        assert r.headers["connection"] == "close"
    # A client that sends half a request and then nothing: 408, then closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /events HTTP/1.1\r\nHo")
    status, headers = await read_response_head(reader)
    assert status == 408 and headers["connection"] == "close"
    body = await reader.readexactly(int(headers["content-length"]))
    assert json.loads(body) == {"error": "request not received in time"}
    assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""  # and closed
    writer.close()
    # A client that connects and says nothing is simply closed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.read(), STEP_TIMEOUT) == b""
    writer.close()
    # A request dribbled one byte at a time, within the time limit, is served.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n":
        writer.write(bytes([byte]))
        await writer.drain()
    status, _ = await read_response_head(reader)
    assert status == 200
    writer.close()
    # After all that the server is healthy and holds no stray connections.
    r = await http(port, "GET", "/healthz")
    assert r.status == 200 and r.json()["clients"] == 0


async def test_cors_allowed_refused_and_preflight(live_server):
    server = live_server(ALLOWED_ORIGINS="https://www.torn.com,https://torn.example")
    async with SseClient(server.port, headers={"Origin": "https://torn.example"}) as ok:
        assert ok.response_headers["access-control-allow-origin"] == "https://torn.example"
        assert ok.response_headers["vary"] == "Origin"
    async with SseClient(server.port, headers={"Origin": "https://evil.example"}) as refused:
        assert "access-control-allow-origin" not in refused.response_headers
    pre = await http(server.port, "OPTIONS", "/events", {
        "Origin": "https://www.torn.com", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id"})
    assert pre.status == 204
    assert pre.headers["access-control-allow-origin"] == "https://www.torn.com"
    assert "GET" in pre.headers["access-control-allow-methods"]
    assert {"authorization", "last-event-id"} <= {
        h.strip().lower() for h in pre.headers["access-control-allow-headers"].split(",")}
    assert pre.headers["vary"] == "Origin"
    bad = await http(server.port, "OPTIONS", "/events", {
        "Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert bad.status == 403 and "access-control-allow-origin" not in bad.headers


async def test_preflight_allows_writes_with_authorization(factions):
    r = await http(factions.port, "OPTIONS", "/calls/5", {
        "Origin": "https://www.torn.com", "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert r.status == 204
    assert r.headers["access-control-allow-origin"] == "https://www.torn.com"
    assert {"POST", "DELETE"} <= {m.strip() for m in r.headers["access-control-allow-methods"].split(",")}
    assert {"authorization", "content-type"} <= {
        h.strip().lower() for h in r.headers["access-control-allow-headers"].split(",")}
    r = await http(factions.port, "POST", "/calls", {**bearer(RED), "Origin": "https://www.torn.com"},
                   {"target_id": 9, "caller_id": 1, "caller_name": "Ann"})
    assert r.status == 201 and r.headers["access-control-allow-origin"] == "https://www.torn.com"


async def test_bad_writes_get_their_status_and_change_nothing(factions, conn):
    port = factions.port
    assert (await post_call(port, RED, 40)).status == 201
    before = await table_state(conn)
    good = {"target_id": 41, "caller_id": 1, "caller_name": "Ann"}
    cases = [
        (http(port, "POST", "/calls", {}, good), 401),
        (http(port, "POST", "/calls", bearer("nope-nope-nope-nope"), good), 401),
        (http(port, "POST", "/calls?token=" + RED[:-1], {}, good), 401),
        (http(port, "POST", "/calls", bearer(RED), b"{oops"), 400),
        (http(port, "POST", "/calls", bearer(RED), {**good, "faction_id": BLUE_ID}), 400),
        (http(port, "POST", "/calls", bearer(RED), {**good, "target_id": -4}), 400),
        (http(port, "POST", "/calls", {**bearer(RED), "Content-Type": "text/plain"}, b"x"), 415),
        (http(port, "POST", "/calls", bearer(RED), "x" * (t.MAX_BODY_BYTES + 1)), 413),
        (http(port, "PUT", "/calls", bearer(RED), good), 405),
        (http(port, "DELETE", "/calls/40", bearer(RED), {}), 400),
        (http(port, "DELETE", "/calls/40", bearer(RED), {"caller_id": "1"}), 400),
        (http(port, "DELETE", "/calls/abc", bearer(RED), {"caller_id": 1}), 404),
        (http(port, "DELETE", "/calls/0", bearer(RED), {"caller_id": 1}), 400),
        (http(port, "POST", "/calls/40", bearer(RED), {"caller_id": 1}), 405),
        (http(port, "DELETE", "/calls/40", bearer(BLUE), {"caller_id": 1}), 404),
        (http(port, "GET", "/calls", {}), 401),
        (http(port, "GET", "/calls?since=x", bearer(RED)), 400),
    ]
    for request, status in cases:
        r = await request
        assert r.status == status, (status, r)
        assert "error" in r.json()
    r = await http(port, "POST", "/calls", bearer(RED), {**good, "caller_name": None})
    assert r.json() == {"error": "caller_name is required"}
    assert await table_state(conn) == before


async def test_small_ones_content_length_nesting_percent_encoded_token_big_ids_scheme(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}")
    port = server.port
    # A Unicode digit in Content-Length (str.isdigit() is true for it): 400, not a dropped link.
    # (Header bytes are read as Latin-1, RFC 9110 section 5.5, where 0xB2 is "²".)
    r = await http_raw(port, b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: \xb2\r\n\r\n")
    assert (r.status, r.json()) == (400, {"error": "malformed Content-Length"})
    # 2,000 nested brackets: 400, not a RecursionError and a 500.
    r = await http(port, "POST", "/calls", bearer(RED), body=b"[" * 2000)
    assert (r.status, r.json()) == (400, {"error": "the body nests too deeply"})
    # Ids JavaScript cannot hold exactly (above Number.MAX_SAFE_INTEGER) are refused.
    for field, value in (("target_id", 2**53), ("caller_id", 2**63 - 1), ("war_id", 2**53)):
        body = {"target_id": 5, "caller_id": 1, "caller_name": "Ann", field: value}
        r = await http(port, "POST", "/calls", bearer(RED), body)
        assert (r.status, r.json()) == (400, {"error": f"{field} must be a positive integer"})
    r = await http(port, "DELETE", f"/calls/{2**53}", bearer(RED), body={"caller_id": 1})
    assert (r.status, r.json()) == (400, {"error": "target_id must be a positive integer"})
    assert (await post_call(port, RED, 2**53 - 1, caller_id=2**53 - 1)).status == 201
    # An absolute-form target with an upper-case scheme (RFC 3986 section 3.1).
    async with SseClient(port, path=f"HTTP://127.0.0.1:{port}/events?token={RED}") as client:
        assert (await client.next()).json["calls"][0]["target_id"] == 2**53 - 1
    # A percent-encoded parameter name is still a token, and still redacted from the log.
    mark = server.mark()
    r = await http(port, "GET", f"/calls?%74oken={RED}")
    assert r.status == 200
    await server.await_log(r"GET /calls\?%74oken=REDACTED", start=mark)
    server.stop()
    assert RED not in server.log and "Traceback" not in server.log


async def test_long_poll_auth_and_bad_input(factions):
    port = factions.port
    async with LongPoll(port, None) as anonymous:
        anonymous.send(since=0)
        assert (await anonymous.answer())[0] == 401
    async with LongPoll(port, "not-a-token-of-this-server") as wrong:
        wrong.send(since=0)
        assert (await wrong.answer())[0] == 401
    for query in ("since=0&wait=0", "since=0&wait=31", "since=0&wait=abc", "since=x&wait=5",
                  "since=0&wait=" + "9" * 5000):
        r = await http(port, "GET", f"/calls?{query}", bearer(RED))
        assert r.status == 400, query
    assert await held_count(port, 0)


async def test_metrics_in_prometheus_format_without_secrets(live_server, conn):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}")
    async with SseClient(server.port, headers=bearer(RED)) as stream:
        await stream.next()
        assert (await post_call(server.port, RED, 1)).status == 201
        assert (await post_call(server.port, RED, 1, caller_id=2)).status == 409
        await stream.next()
        await call(conn, 5, 6, faction_id=RED_ID)  # through SQL, so its lag is measured too
        await stream.next()
        r = await http(server.port, "GET", "/metrics")
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4")
        text = r.body.decode()
        assert RED not in text
        values = {line.split(" ")[0]: float(line.split(" ")[1])
                  for line in text.splitlines() if line and not line.startswith("#")}
        assert values["torncat_clients"] == 1 and values["torncat_listener_up"] == 1
        assert values["torncat_connects_total"] == 1 and values["torncat_snapshots_total"] == 1
        assert values['torncat_calls_total{result="made"}'] == 1
        assert values['torncat_calls_total{result="refused"}'] == 1
        assert values["torncat_events_total"] == 2 and values["torncat_deliveries_total"] == 2
        assert values["torncat_last_event_id"] == 2 and values["torncat_active_calls"] == 2
        assert values["torncat_broadcast_lag_seconds_count"] == 2
        assert values['torncat_broadcast_lag_seconds_bucket{le="+Inf"}'] == 2
        assert "# TYPE torncat_broadcast_lag_seconds histogram" in text
        assert "# TYPE torncat_evictions_total counter" in text


async def test_sigterm_ends_streams_with_a_jittered_retry_and_exits(live_server):
    server = live_server(RECONNECT_SPREAD_SECONDS="4")
    async with sse_clients(*(SseClient(server.port) for _ in range(5))) as clients:
        for c in clients:
            await c.next()
        started = time.monotonic()
        code = await asyncio.to_thread(server.stop, signal.SIGTERM)
        elapsed = time.monotonic() - started
        assert code == 0, server.log_tail()
        assert elapsed < 10
        for c in clients:
            await asyncio.wait_for(c.closed.wait(), STEP_TIMEOUT)
            assert c.ended_cleanly
            assert 1000 <= c.retry <= 4000
    assert "stopped" in server.log


async def test_sigterm_answers_held_long_polls_at_once(live_server):
    server = live_server(FACTION_TOKENS=f"{RED_ID}:{RED}")
    async with LongPoll(server.port, RED) as poll:
        poll.send(since=0, wait=30)
        await wait_until(lambda: held_count(server.port, 1), what="the long-poll held")
        server.proc.send_signal(signal.SIGTERM)
        status, _, body = await poll.answer()  # well before its 30 s
        assert (status, body) == (200, {"events": [], "last_event_id": 0})
        assert await asyncio.wait_for(poll.reader.read(), STEP_TIMEOUT) == b""  # then closed
    assert await asyncio.to_thread(server.proc.wait, STEP_TIMEOUT) == 0


async def test_a_pipelining_client_that_never_reads_cannot_take_the_servers_memory(live_server):
    """60,000 pipelined GET /metrics on one unread socket once took 140 MB."""
    server = live_server()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never read from it
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", server.port))
    before = rss_bytes(server.proc.pid)
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    batch, sent = request * 1000, 0
    try:
        while sent < 60_000 * len(request):
            # The server stops reading once its answers back up: then our writes block too.
            await asyncio.wait_for(loop.sock_sendall(sock, batch), 2.0)
            sent += len(batch)
    except TimeoutError:
        pass
    # Held over RESPONSE_BUFFER_BYTES longer than SLOW_READER_SECONDS, the connection is
    # closed; until then the server answers nothing more on it, however much is queued.
    peak = before

    async def closed() -> bool:
        nonlocal peak
        peak = max(peak, rss_bytes(server.proc.pid))
        metrics = (await http(server.port, "GET", "/metrics")).body.decode()
        return "torncat_connections 1\n" in metrics  # only this /metrics request is left

    await wait_until(closed, t.SLOW_READER_SECONDS + STEP_TIMEOUT, "the flooding connection closed")
    after = rss_bytes(server.proc.pid)
    sock.close()
    mb = 2**20
    assert peak - before < 16 * mb, f"RSS grew {(peak - before) / mb:.1f} MB ({sent / mb:.1f} MB sent)"
    assert after - before < 16 * mb
    assert (await http(server.port, "GET", "/healthz")).status == 200


@pytest.mark.faults
async def test_hostile_traffic_leaves_no_trace_and_honest_clients_get_everything(live_server, conn):
    server = live_server(REQUEST_TIMEOUT_SECONDS="1")
    port, pid = server.port, server.proc.pid
    async with sse_clients(SseClient(server.port), SseClient(server.port)) as honest:
        for c in honest:
            await c.next()
        for _ in range(5):  # warm up the code paths the attack will use, for a fair baseline
            await http_raw(port, b"GARBAGE\r\n\r\n")
        base_fds, base_rss = server_fds_and_rss(pid)
        rng = random.Random(7)

        async def send(data: bytes, hold: bool = False) -> None:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                return
            try:
                writer.write(data)
                await writer.drain()
                await asyncio.wait_for(reader.read(), 5 if hold else STEP_TIMEOUT)
            except (OSError, TimeoutError):
                pass
            finally:
                writer.close()

        attacks = []
        attacks += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400))) + b"\r\n\r\n"
                    for _ in range(1500)]                                          # junk, non-UTF-8
        attacks += [b"GET /events HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 20000 + b"\r\n\r\n"] * 200
        attacks += [b"GET / HTTP/1.1\r\nHost: x\r\n" + b"X-F: 1\r\n" * 150 + b"\r\n"] * 200
        attacks += [b"GET /events HTTP/1.1\r\nHost: x\r\nLast-Event-ID: " + b"9" * 10000 + b"\r\n\r\n"] * 100
        attacks += [b"POST /calls HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"] * 100
        slow = [b"GET /events HTTP/1.1\r\nHo"] * 300                               # slow loris
        sem = asyncio.Semaphore(200)

        async def limited(data: bytes, hold: bool = False) -> None:
            async with sem:
                await send(data, hold)

        async def insert_during():
            for i in range(50):
                await call(conn, i, i)

        await asyncio.gather(insert_during(), *(limited(a) for a in attacks),
                             *(send(s, hold=True) for s in slow))
        for c in honest:
            assert await drain(c, 50) == list(range(1, 51))
        # The server lets go of every hostile connection (the slow ones time out).
        await wait_until(lambda: server_fds_and_rss(pid)[0] <= base_fds + 2, timeout=20,
                         what=f"the server back to {base_fds} + 2 open files")
        _, rss = server_fds_and_rss(pid)
        assert rss - base_rss < 16 * 1024 * 1024, (base_rss, rss)
        assert (await http(port, "GET", "/healthz")).json()["clients"] == 2
    assert "Traceback" not in server.log


@pytest.mark.faults
async def test_sigterm_mid_burst_clients_move_to_the_other_server(own_pg, start_server):
    env = {"DATABASE_URL": own_pg.dsn(), "RECONNECT_SPREAD_SECONDS": "1"}
    a, b = start_server(**env), start_server(**env)
    await a.await_log("postgres listener live")
    await b.await_log("postgres listener live")

    async def run(client_no: int) -> list[int]:
        ids: list[int] = []
        client = SseClient(a.port)
        while True:
            async with client:
                if not ids:
                    assert (await client.next()).event == "snapshot"
                while not ids or ids[-1] < 90:
                    get = asyncio.ensure_future(client.next())
                    closed = asyncio.ensure_future(client.closed.wait())
                    done, _ = await asyncio.wait({get, closed}, timeout=STEP_TIMEOUT,
                                                 return_when=asyncio.FIRST_COMPLETED)
                    if get in done:
                        closed.cancel()
                        ids.append(get.result().int_id)
                        continue
                    get.cancel()
                    assert closed in done and client.ended_cleanly and client.retry <= 1000
                    break
                else:
                    return ids
            await asyncio.sleep(client.retry / 1000)  # as EventSource would
            client = SseClient(b.port, headers={"Last-Event-ID": str(ids[-1])})

    runners = [asyncio.create_task(run(n)) for n in range(5)]

    async def stop_a():
        await asyncio.to_thread(a.stop, signal.SIGTERM)

    await insert_through_faults(own_pg.dsn(), range(1, 91), during=stop_a)
    results = await asyncio.wait_for(asyncio.gather(*runners), 60)
    expected = await all_event_ids(own_pg.dsn())
    for ids in results:
        assert ids == expected
    assert a.proc.returncode == 0


# ---------------------------------------------------------------------------
# main(): running the server, workers and instances, the command line
# ---------------------------------------------------------------------------

def test_without_database_url_it_starts_an_embedded_postgres(tmp_path, start_server):
    # OPEN_ACCESS unset: the development database is open by default (no token below).
    server = start_server(EMBEDDED_PG_DIR=str(tmp_path / "pg"), OPEN_ACCESS="")
    server.wait_for_log("postgres listener live", timeout=60)
    assert "access: open while the torncat_tokens table holds no token" in server.log
    dsn = server.wait_for_log(r"DATABASE_URL=(\S+)").group(1)

    async def check():
        async with SseClient(server.port) as client:
            c = await asyncpg.connect(dsn)
            try:
                await client.next()
                await call(c, 1, 2)
                assert (await client.next()).json["target_id"] == 2
            finally:
                await c.close()

    asyncio.run(check())
    assert server.stop(signal.SIGINT) == 0


def test_without_database_url_or_embedded_postgres_it_says_what_to_set(tmp_path):
    code = ("import sys; sys.modules['embedded_postgres'] = None; sys.argv = ['torncat_sse.py']; "
            "import torncat_sse; sys.exit(torncat_sse.main())")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    r = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "DATABASE_URL is not set and embedded-postgres is not installed" in r.stderr
    assert "Traceback" not in r.stderr


async def test_without_uvloop_it_says_so_and_serves(db, tmp_path):
    code = ("import sys; sys.modules['uvloop'] = None; sys.argv = ['torncat_sse.py']; "
            "import torncat_sse; sys.exit(torncat_sse.main())")
    env = {**os.environ, "DATABASE_URL": db, "HOST": "127.0.0.1", "PORT": "0"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=HERE, env=env,
                                                stderr=asyncio.subprocess.PIPE)
    try:
        seen = []
        while not any("listener live" in line for line in seen):
            line = await asyncio.wait_for(proc.stderr.readline(), STEP_TIMEOUT)
            assert line, "\n".join(seen)
            seen.append(line.decode())
        log_text = "".join(seen)
        assert "uvloop is not installed: using the default asyncio event loop" in log_text
        port = int(re.search(r"listening on http://[\d.]+:(\d+)", log_text).group(1))
        assert (await http(port, "GET", "/healthz")).status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), STEP_TIMEOUT)
    assert proc.returncode == 0


async def test_two_workers_share_the_port_and_both_deliver(live_server, conn):
    server = live_server(WORKERS="2")
    await server.await_log(r"\[w1\] postgres listener live")
    await server.await_log(r"\[w0\] postgres listener live")
    async with sse_clients(*(SseClient(server.port) for _ in range(16))) as clients:
        for c in clients:
            await c.next()
        await server.await_log(r"stream opened", count=16)
        workers = {m.group(1) for m in re.finditer(r"\[(w\d)\] \S+: stream opened", server.log)}
        assert workers == {"w0", "w1"}  # SO_REUSEPORT spread the streams over both
        for i in range(5):
            await call(conn, i, i)
        for c in clients:
            assert await drain(c, 5) == [1, 2, 3, 4, 5]
    assert server.stop() == 0
    assert server.log.count("stopped") == 2


async def test_two_instances_both_deliver_and_a_client_can_move(live_server, conn, db):
    a, b = live_server(), live_server()
    async with SseClient(a.port) as on_a, SseClient(b.port) as on_b:
        await on_a.next()
        await on_b.next()
        for i in range(10):
            await call(conn, i, i)
        assert await drain(on_a, 10) == list(range(1, 11))
        assert await drain(on_b, 10) == list(range(1, 11))
        await on_a.close()  # the client leaves A after event 10 ...
        for i in range(10, 20):
            await call(conn, i, i)
        async with SseClient(b.port, headers={"Last-Event-ID": "10"}) as moved:  # ... and joins B
            assert await drain(moved, 20) == list(range(11, 21))
            await moved.assert_quiet()


async def status_from(port: int, source: str, path: str) -> int:
    """The status of GET `path` sent from the loopback address `source`."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), STEP_TIMEOUT)
        return int(line.split()[1]) if line else 0
    finally:
        writer.close()


async def test_idle_connections_from_one_address_never_take_the_slots_or_the_health_check(
        live_server):
    """MAX_CLIENTS + 1,024 idle connections from one address made every request 503,
    /healthz included (so Render restarts the instance). Now /healthz and streams answer,
    from that address too, and it keeps CONNECTIONS_PER_ADDRESS idle ones at most."""
    raise_nofile_limit()
    server = live_server(MAX_CLIENTS="20", CONNECTIONS_PER_ADDRESS="16",
                         FACTION_TOKENS=f"{BLUE_ID}:{BLUE}")
    loop = asyncio.get_running_loop()
    idle = []
    try:
        for _ in range(20 + t.REQUEST_SLOTS + 50):
            sock = socket.socket()
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", server.port))
            idle.append(sock)
        # Accepted in order: these come after every idle one.
        assert await status_from(server.port, "127.0.0.2", "/healthz") == 200
        assert await status_from(server.port, "127.0.0.1", "/healthz") == 200
        async with SseClient(server.port, headers=bearer(BLUE)) as stream:
            assert (await stream.next()).event == "snapshot"

        def held() -> int:
            n = 0
            for sock in idle:
                try:
                    n += sock.recv(1, socket.MSG_PEEK) != b""  # an answer: not idle any more
                except BlockingIOError:
                    n += 1  # nothing: the server still holds it open
                except OSError:
                    pass
            return n

        await wait_until(lambda: held() <= 16, what="at most 16 idle connections held")
        metrics = (await http(server.port, "GET", "/metrics")).body
        assert metric_value(metrics, "connections") <= 16 + 4, metrics
        assert metric_value(metrics, "idle_closed_total") >= t.REQUEST_SLOTS
    finally:
        for sock in idle:
            sock.close()


async def test_slots_are_shared_per_token_and_per_faction(torn_server, torn):
    """300 streams or long-polls of one member token took every slot."""
    server = torn_server(MAX_CLIENTS="30", MAX_CLIENTS_PER_TOKEN="4",
                         MAX_CLIENTS_PER_FACTION="10",
                         FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    ann = (await sign_in(server.port, torn.add_player(1001, "Ann", RED_ID))).json()["token"]
    async with sse_clients(*(SseClient(server.port, headers=bearer(ann)) for _ in range(4))):
        over = await http(server.port, "GET", "/events", bearer(ann))
        assert over.status == 429 and int(over.headers["retry-after"]) > 0, over
        since = (await http(server.port, "GET", "/calls", bearer(ann))).json()["last_event_id"]
        r = await http(server.port, "GET", f"/calls?since={since}&wait=5", bearer(ann))
        assert r.status == 429 and "retry-after" in r.headers, r  # a long-poll is a slot too
        # The faction's other tokens share its share; another faction's is its own.
        async with sse_clients(*(SseClient(server.port, headers=bearer(RED)) for _ in range(6))):
            r = await http(server.port, "GET", "/events", bearer(RED))
            assert r.status == 503 and f"faction {RED_ID}" in r.json()["error"], r
            assert int(r.headers["retry-after"]) > 0
            async with SseClient(server.port, headers=bearer(BLUE)) as blue:
                assert (await blue.next()).event == "snapshot"
    metrics = (await http(server.port, "GET", "/metrics")).body.decode()
    assert 'torncat_slots_refused_total{over="token"} 2' in metrics
    assert 'torncat_slots_refused_total{over="faction"} 1' in metrics


async def test_active_calls_per_faction_are_bounded(live_server):
    """A member calling 300 targets a minute for the 15-minute TTL made a 1.2 MB snapshot."""
    server = live_server(CALLS_PER_FACTION="5", FACTION_TOKENS=f"{RED_ID}:{RED},{BLUE_ID}:{BLUE}")
    for target in range(1, 6):
        assert (await post_call(server.port, RED, target)).status == 201
    r = await post_call(server.port, RED, 6)
    assert r.status == 429 and "5 active calls" in r.json()["error"], r
    assert (await post_call(server.port, BLUE, 6, caller_id=2)).status == 201  # its own bound
    assert (await http(server.port, "DELETE", "/calls/1", bearer(RED), {"caller_id": 1})).status == 200
    assert (await post_call(server.port, RED, 6)).status == 201


# ---------------------------------------------------------------------------
# The server file's layout: each section uses only what is above it
# ---------------------------------------------------------------------------
#
# What counts. A section starts at a banner: a line of dashes, `# <title>`, a line of
# dashes (everything above the first banner is the prologue: imports, `log`, paths). A
# module-level name is one bound by a top-level statement (def, class, assignment,
# import); it belongs to the section of its first binding. A use is every read of such a
# name anywhere in the file, as Python resolves it (`symtable`): in a function body, a
# default, a decorator, a base class or an annotation; a parameter, a local, a class
# attribute or a comprehension variable of the same name is not a use. A back arrow is a
# use in a section above the one that defines the name.

SECTION_BANNER = re.compile(r"^# -{20,}\n# (.+)\n# -{20,}$", re.MULTILINE)


SERVER_SECTIONS = ("Settings", "Wire format", "Access", "The hub", "The database", "Torn",
                   "The HTTP side", "main()")


def file_sections(src: str) -> list[tuple[int, str]]:
    """(first line, title) of each section, the prologue first."""
    return [(1, "prologue"), *((src.count("\n", 0, m.start()) + 1, m.group(1))
                               for m in SECTION_BANNER.finditer(src))]


def module_definitions(tree: ast.Module) -> dict[str, int]:
    """Each module-level name, and the line of its first top-level binding."""
    defs: dict[str, int] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names = [node.name]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.asname or a.name.partition(".")[0] for a in node.names]
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)]
        else:
            names = []
        for name in names:
            defs.setdefault(name, node.lineno)
    return defs


SCOPES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef, ast.ListComp,
          ast.SetComp, ast.DictComp, ast.GeneratorExp)


def module_name_uses(src: str, tree: ast.Module, defs: dict[str, int]) -> list[tuple[str, int]]:
    """(name, line) of every read of a module-level name (see "What counts" above)."""
    tables = {}  # (line, name) of a scope -> its symbol table

    def index(table):
        for child in table.get_children():
            tables.setdefault((child.get_lineno(), child.get_name()), child)
            index(child)

    top = symtable.symtable(src, "torncat_sse.py", "exec")
    index(top)

    def reads_module(name: str, table) -> bool:
        if name not in defs:
            return False
        if table.get_type() == "module":
            return True
        try:
            symbol = table.lookup(name)
        except KeyError:
            return True
        return symbol.is_global() or not (symbol.is_local() or symbol.is_free())

    uses = []

    def visit(node, table):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            if reads_module(node.id, table):
                uses.append((node.id, node.lineno))
            return
        if not isinstance(node, SCOPES):
            for child in ast.iter_child_nodes(node):
                visit(child, table)
            return
        # What a scope evaluates where it is defined, then what it evaluates inside.
        if isinstance(node, ast.ClassDef):
            outside = [*node.decorator_list, *node.bases, *(k.value for k in node.keywords)]
            inside, name = node.body, node.name
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = node.args
            outside = [*args.defaults, *filter(None, args.kw_defaults)]
            if isinstance(node, ast.Lambda):
                inside, name = [node.body], "lambda"
            else:
                every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
                outside += [*node.decorator_list, *filter(None, [node.returns]),
                            *(a.annotation for a in every if a is not None and a.annotation)]
                inside, name = node.body, node.name
        else:  # a comprehension: its first iterable is evaluated outside
            outside = [node.generators[0].iter]
            inside = [*(part for g in node.generators for part in (g.target, *g.ifs)),
                      *(g.iter for g in node.generators[1:]),
                      *([node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt])]
            name = {ast.ListComp: "listcomp", ast.SetComp: "setcomp", ast.DictComp: "dictcomp",
                    ast.GeneratorExp: "genexpr"}[type(node)]
        for part in outside:
            visit(part, table)
        for part in inside:
            visit(part, tables[node.lineno, name])

    visit(tree, top)
    return uses


def back_arrows(src: str) -> list[str]:
    """Every use of a module-level name in a section above the one that defines it."""
    tree = ast.parse(src)
    sections = file_sections(src)

    def section(line: int) -> int:
        return max(i for i, (start, _) in enumerate(sections) if start <= line)

    defs = module_definitions(tree)
    arrows = {f"line {line} ({sections[section(line)][1]}) uses {name}, defined in "
              f"{sections[section(defs[name])][1]}"
              for name, line in module_name_uses(src, tree, defs)
              if section(line) < section(defs[name])}
    return sorted(arrows)


def test_each_section_of_the_server_uses_only_what_is_above_it():
    src = (HERE / "torncat_sse.py").read_text()
    titles = [title for _, title in file_sections(src)[1:]]
    assert len(titles) == len(SERVER_SECTIONS), titles
    for title, start in zip(titles, SERVER_SECTIONS, strict=True):
        assert title.startswith(start), (title, start)
    assert back_arrows(src) == []


# A file with every case "What counts" names, and two back arrows (lines 11 and 12).
BACK_ARROW_PROBE = '''\
import os
# ------------------------------
# First
# ------------------------------
A = 1
def f(B=None):
    return A + B, os.sep
def g():
    return [A for C in range(3)], lambda C: C
def h():
    return C
def i(x: C) -> None: ...
class K:
    C = 2
    y = C
# ------------------------------
# Second
# ------------------------------
B = 2
C = 3
def k():
    return [C for C in range(3)] + [A, B, K]
'''


def test_the_section_check_finds_a_back_arrow_and_only_that():
    assert back_arrows(BACK_ARROW_PROBE) == ["line 11 (First) uses C, defined in Second",
                                             "line 12 (First) uses C, defined in Second"]
    # The server with one arrow drawn back up the file: access reaching down into the hub.
    src = (HERE / "torncat_sse.py").read_text()
    line = "        self.writes = Bucket()"
    assert src.count(line) == 1
    arrows = back_arrows(src.replace(line, line + "; Hub"))
    assert len(arrows) == 1 and "(Access" in arrows[0] and "uses Hub, defined in The hub" \
        in arrows[0], arrows


# ---------------------------------------------------------------------------
# The docs
# ---------------------------------------------------------------------------

README = (HERE / "README.md").read_text()


OPERATIONS = (HERE / "docs/operations.md").read_text()  # holds the settings table


def test_operations_doc_documents_every_setting_with_its_default():
    for s in t.SETTINGS:
        flag = "--" + s.name.lower().replace("_", "-")
        default = f"`{s.default}`" if s.default else "unset"
        assert f"| `{s.name}` | `{flag}` | {default} |" in OPERATIONS, s.name


def heading_anchor(heading: str) -> str:
    """The fragment GitHub gives a Markdown heading: lower case, punctuation dropped,
    spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_readme_and_docs_lead_somewhere():
    pages = [HERE / "README.md", *sorted((HERE / "docs").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # an absolute URL: not checked, the tests have no network
            path, _, fragment = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name}: {target} leads nowhere"
            if fragment:
                anchors = {heading_anchor(h) for h in
                           re.findall(r"^#+ (.+)$", linked.read_text(), flags=re.MULTILINE)}
                assert fragment in anchors, f"{page.name}: {target}: no such heading"


def test_ci_runs_exactly_the_readme_test_command():
    ci_lines = [line for line in (HERE / ".ci/run").read_text().splitlines()
                if line and not line.startswith("#")]
    assert f"```sh\n{ci_lines[-1]}\n```" in README
    script = [line for line in (HERE / ci_lines[-1].split()[-1]).read_text().splitlines()
              if line and not line.startswith("#")]
    assert script[-1] == 'exec .venv/bin/python -m pytest "$@"'  # pytest's exit code, as is
