"""Database shapes: trigger.sql on databases shaped like the tool TornCat replaces.

TornCat is applied to a live database that other programs keep using (the seed's step 1
is a trigger on *their* `target_calls`). These tests build that database as Supabase
runs it, in every shape its public code allows, with a history, and check that
trigger.sql applies there, that the old tool keeps working, and that TornCat shows what
the old tool shows. The shapes are written here from facts, in our own words; no code of
the old tool is copied.

Facts relied on, with where they come from (GitHub Thomas-Dgh/torn-cat, "torn-cat", and
Thomas-Dgh/torn-cat-SSE, "torn-cat-SSE"; ../shared/EXISTING-DATABASE.md sums them up):

- Shape A. torn-cat `supabase/schema.sql`: target_calls(id bigserial, war_id bigint
  REFERENCES wars(id), target_id, target_name, faction_id NOT NULL, caller_id,
  caller_name, called_at DEFAULT now(), uncalled_at, status text with no default) and
  wars(id bigserial, faction_id, enemy_faction_id, status, started_at, ended_at, ...).
  Its code also writes target_level, target_faction_id (faction-api/index.ts `call`),
  target_status and updated_at (api/relay/server.js `update_status`), so those columns
  exist too. No created_at: the seed's trigger, which reads NEW.created_at, would fail
  every insert there, so this shape has none.
- Shape B. torn-cat-SSE `sql/create_tables.sql`: target_calls(id serial, war_id integer
  REFERENCES wars(war_id), caller_id integer NOT NULL, caller_name varchar(255),
  target_id integer NOT NULL, target_name varchar(255), created_at DEFAULT
  CURRENT_TIMESTAMP): no status, faction_id, uncalled_at, target_status. wars(id serial,
  war_id integer UNIQUE NOT NULL, faction_a_id, faction_b_id, names, is_active DEFAULT
  true). torn-cat-SSE `sql/create_sse_trigger.sql` installs the seed's trigger. The
  only uncall its clients make is a DELETE (scripts/torn-realtime-final.user.js).
- Shape C: both creation times, status, target_status, no faction_id and no
  uncalled_at ("an older variant has no faction_id and no uncalled_at",
  EXISTING-DATABASE.md), wars as in B.
- Shape D: created_at (what the seed's trigger reads), status, uncalled_at, faction_id,
  target_status, wars as in A.
- war_id holds Torn's ranked war id: the userscript (torn-cat
  scripts/torn-war-calling.user.js, war detection) takes `war_id` from Torn's
  `wars.ranked` and creates the wars row with it; faction-api/index.ts looks wars up
  `.eq('war_id', war_id)`. In the wars(id, ...) variant the FK is on wars.id, so there
  wars.id is Torn's war id. A war is current while `is_active` (call-management.tsx
  war detection sets is_active false and ended_at when the war is over) or, in the
  other variant, while `ended_at` is NULL.
- The old tool's writes (all made with Supabase's anon key, hence as role `anon`, except
  where noted): a call inserts a row with status 'active' (faction-api/index.ts
  manageCalls `call`; it checks nothing, so the same target can be held twice); a
  manual uncall sets status 'cancelled' and updated_at, no uncalled_at (manageCalls
  `uncall`); the automatic uncall sets status 'uncalled' and uncalled_at
  (working_function.sql auto_uncall_expired_targets, run by the relay every 30 s);
  hospital or dead targets are DELETEd (auto-uncall.sql); the relay rewrites
  target_status and updated_at on active rows (server.js `update_status`). Its relay
  reads every row of a (war_id, faction_id) (server.js `get_calls`), with the anon key
  (server.js falls back to a hard-coded anon key); another reader lists rows with status
  'active' (faction-api/index.ts syncAllData).
- Supabase: `postgres` is not a superuser and owns `public` (Supabase docs, "Roles,
  superuser access and unsupported operations"); anon and authenticated are NOLOGIN
  NOINHERIT, service_role has BYPASSRLS, and default privileges grant the three ALL on
  new tables, functions and sequences in public (supabase/realtime and supabase/supavisor
  `dev/postgres/00-setup.sql`); `authenticator` logs in and switches role (PostgREST).
  Hosted Supabase runs PostgreSQL 15, so these clusters use Debian's postgresql-15.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import os
import random
import re
import subprocess

import asyncpg
import pytest

from testkit import (
    DEBIAN_PG_BIN,
    HERE,
    STEP_TIMEOUT,
    TRIGGER_SQL,
    PgCluster,
    SseClient,
    http,
    pg_execute,
    run_cli,
    wait_until,
)
from torncat_sse import migrate_report

RED, BLUE = 9001, 9002                  # the two factions that use the old tool
STRANGER = 9555                         # a faction nobody knows the war of
# (war id, faction, enemy faction, ended)
WARS = [(31001, RED, 8101, True), (31002, RED, 8102, True), (31003, RED, 8103, True),
        (31004, RED, 8104, True), (31005, RED, 8105, False),
        (32001, BLUE, 8201, True), (32002, BLUE, 8202, True), (32003, BLUE, 8203, False)]
CURRENT = {RED: 31005, BLUE: 32003}
NOW = datetime.datetime.now(datetime.UTC)
PSQL = DEBIAN_PG_BIN / "psql"
SUPABASE = """
    CREATE ROLE postgres LOGIN CREATEDB CREATEROLE;        -- not a superuser, as hosted
    CREATE ROLE anon NOLOGIN NOINHERIT;
    CREATE ROLE authenticated NOLOGIN NOINHERIT;
    CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
    CREATE ROLE authenticator LOGIN NOINHERIT;
    GRANT anon, authenticated, service_role TO authenticator;
    CREATE ROLE intruder LOGIN;                            -- owns nothing
"""
# Per database, as the superuser: what a Supabase project's `public` looks like.
SUPABASE_DB = """
    ALTER SCHEMA public OWNER TO postgres;
    GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role, intruder;
    ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
        GRANT ALL ON TABLES TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
        GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
    ALTER DEFAULT PRIVILEGES FOR ROLE postgres IN SCHEMA public
        GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
"""


@dataclasses.dataclass(frozen=True)
class Shape:
    """One shape of the old tool's database (see the module docstring)."""
    name: str
    wars: str | None = None          # "by_id": wars(id, faction_id, ...); "by_war_id":
                                     # wars(war_id unique, faction_a_id, ...)
    created: tuple[str, ...] = ()    # the creation-time column(s)
    status: bool = False
    uncalled_at: bool = False
    faction: bool = False
    target_status: str | None = None  # its type, if any
    int_ids: bool = False            # serial and integer columns (shape B)
    seed_trigger: bool = False
    fresh: bool = False              # no target_calls at all: trigger.sql creates it

    @property
    def old_tool(self) -> bool:
        return self.wars is not None

    @property
    def key(self):
        """The faction key a row of faction f has: 0 where the table has no faction."""
        return (lambda f: f) if self.faction or not self.old_tool else (lambda f: 0)


SHAPES = [
    Shape("fresh", fresh=True),
    Shape("seed", created=("created_at",), seed_trigger=True),
    Shape("A", wars="by_id", created=("called_at",), status=True, uncalled_at=True,
          faction=True, target_status="jsonb"),
    Shape("B", wars="by_war_id", created=("created_at",), int_ids=True, seed_trigger=True),
    Shape("C", wars="by_war_id", created=("created_at", "called_at"), status=True,
          target_status="json", seed_trigger=True),
    Shape("D", wars="by_id", created=("created_at",), status=True, uncalled_at=True,
          faction=True, target_status="jsonb", seed_trigger=True),
]
OLD_SHAPES = [s for s in SHAPES if s.old_tool]


def shape_ddl(s: Shape) -> str:
    """The old tool's tables in shape `s`, as its owner `postgres` would have made them."""
    i = "integer" if s.int_ids else "bigint"
    parts = []
    if s.wars == "by_id":
        parts.append("""CREATE TABLE wars (id bigserial PRIMARY KEY, faction_id bigint NOT NULL,
            enemy_faction_id bigint, status text, started_at timestamptz, ended_at timestamptz,
            created_at timestamptz DEFAULT now(), updated_at timestamptz DEFAULT now())""")
    elif s.wars == "by_war_id":
        parts.append("""CREATE TABLE wars (id serial PRIMARY KEY, war_id integer UNIQUE NOT NULL,
            faction_a_id integer NOT NULL, faction_b_id integer NOT NULL,
            faction_a_name varchar(255), faction_b_name varchar(255),
            is_active boolean DEFAULT true, created_at timestamptz DEFAULT CURRENT_TIMESTAMP,
            updated_at timestamptz DEFAULT CURRENT_TIMESTAMP)""")
    cols = [f"id {'serial' if s.int_ids else 'bigserial'} PRIMARY KEY"]
    if s.wars:
        cols.append(f"war_id {i} REFERENCES wars({'id' if s.wars == 'by_id' else 'war_id'})")
    cols += [f"caller_id {i} NOT NULL", f"target_id {i} NOT NULL"]
    if s.old_tool:
        cols += ["caller_name varchar(255)", "target_name varchar(255)"]
    if s.faction:
        cols.append("faction_id bigint NOT NULL")
    if s.status:
        cols += ["status text", "target_level integer", "target_faction_id bigint",
                 "updated_at timestamptz DEFAULT now()"]
    if s.uncalled_at:
        cols.append("uncalled_at timestamptz")
    if s.target_status:
        cols.append(f"target_status {s.target_status}")
    cols += [f"{c} timestamptz DEFAULT now()" for c in s.created]
    parts.append(f"CREATE TABLE target_calls ({', '.join(cols)})")
    return ";\n".join(parts)


# The seed document's own trigger (its step 1), as the seed's users installed it
# (torn-cat-SSE sql/create_sse_trigger.sql installs the same). Written out here as the
# seed gives it (two lines wrapped), so that a clone of this repository alone runs these
# tests: ../shared is not part of it.
SEED_TRIGGER = """\
CREATE OR REPLACE FUNCTION notify_target_call() RETURNS trigger AS $$
DECLARE payload json;
BEGIN
  payload := json_build_object('id', NEW.id,'caller_id', NEW.caller_id,'target_id', NEW.target_id,
    'created_at', to_char(NEW.created_at, 'YYYY-MM-DD"T"HH24:MI:SSZ'));
  PERFORM pg_notify('target_calls', payload::text);
  RETURN NEW;
END;
$$ LANGUAGE plpgsql;
DROP TRIGGER IF EXISTS trg_notify_target_call ON target_calls;
CREATE TRIGGER trg_notify_target_call AFTER INSERT ON target_calls
  FOR EACH ROW EXECUTE FUNCTION notify_target_call();
"""


@dataclasses.dataclass
class Row:
    war: int | None
    faction: int
    target: int
    caller: int
    at: datetime.datetime
    status: str          # 'active', 'cancelled', 'uncalled' ('deleted' rows are not stored)

    @property
    def live_by_row(self) -> bool:
        return self.status == "active"


def history(s: Shape) -> list[Row]:
    """Five wars of RED and three of BLUE, as the old tool leaves them: mostly ended,
    some rows still 'active' in wars long over, some targets held twice."""
    rng = random.Random(f"torncat-{s.name}")
    rows: list[Row] = []
    if not s.old_tool:
        if s.seed_trigger:  # the seed's sketch: calls without faction or war
            rows = [Row(None, 0, 700 + k, 1 + k % 3, NOW - datetime.timedelta(hours=k), "active")
                    for k in range(5)]
        return rows
    for n, (war, faction, enemy, ended) in enumerate(WARS):
        start = NOW - datetime.timedelta(days=40 - 7 * n) if ended else NOW - datetime.timedelta(hours=1)
        targets = [enemy * 100 + k for k in range(1, 31)]
        callers = [faction * 100 + k for k in range(1, 16)]
        count = 70 if ended else (25 if faction == RED else 12)
        for k in range(count):
            at = start + datetime.timedelta(seconds=120 * k if ended else 100 * k)
            if ended:
                roll = rng.random()
                outcome = ("cancelled" if roll < 0.45 else "uncalled" if roll < 0.8
                           else "deleted" if roll < 0.9 else "active")
                target = rng.choice(targets)
            else:
                live = 10 if faction == RED else 5
                outcome = "active" if k < live else rng.choice(["cancelled", "uncalled", "deleted"])
                target = targets[k] if k < live else targets[live + (k - live) % (30 - live)]
            rows.append(Row(war, faction, target, rng.choice(callers), at, outcome))
        # Held twice: two 'active' rows on one target in one war (nothing enforced one caller).
        dup = targets[0] if not ended else rng.choice(targets)
        rows.append(Row(war, faction, dup, callers[-1], start + datetime.timedelta(minutes=50),
                        "active"))
    rows.sort(key=lambda r: r.at)
    kept = []
    for r in rows:
        if r.status == "deleted":
            continue
        if not s.status:
            # No status: a row is a call while it exists. The current war's ended calls
            # were deleted (its only uncall); ended wars were never cleaned up.
            if r.status != "active" and r.war in CURRENT.values():
                continue
            r = dataclasses.replace(r, status="active")
        elif not s.uncalled_at and r.status == "uncalled":
            r = dataclasses.replace(r, status="cancelled")  # that write needs uncalled_at
        kept.append(r)
    return kept


def row_values(s: Shape, r: Row) -> dict:
    v = {"caller_id": r.caller, "target_id": r.target}
    if s.old_tool:
        v |= {"war_id": r.war, "caller_name": f"Caller {r.caller}", "target_name": f"Enemy {r.target}"}
    if s.faction:
        v["faction_id"] = r.faction
    if s.status:
        v |= {"status": r.status, "target_level": 50, "target_faction_id": r.target // 100,
              "updated_at": r.at}
    if s.uncalled_at and r.status == "uncalled":
        v["uncalled_at"] = r.at + datetime.timedelta(minutes=3)
    if s.target_status:
        v["target_status"] = json.dumps({"state": "Okay", "until": None, "description": "Okay"})
    for c in s.created:
        v[c] = r.at
    return v


def expected_live(s: Shape, rows: list[Row]) -> dict[tuple[int, int], int]:
    """(faction key, target) -> caller of its holder, computed from the history alone:
    active rows of a current war (or of no war), the earliest first."""
    live: dict[tuple[int, int], int] = {}
    for r in rows:  # sorted by creation time, which is also id order
        if r.live_by_row and (r.war is None or CURRENT.get(r.faction) == r.war):
            live.setdefault((s.key(r.faction), r.target), r.caller)
    return live


# --------------------------------------------------------------------------
# The cluster and the databases
# --------------------------------------------------------------------------

@pytest.fixture(scope="session")
def supa():
    """A PostgreSQL 15 cluster with Supabase's roles; one template database per shape."""
    cluster = PgCluster(bin_dir=DEBIAN_PG_BIN, superuser="supabase_admin")
    cluster.start()
    asyncio.run(pg_execute(cluster.dsn(), SUPABASE))
    cluster.templates = set()
    yield cluster
    cluster.destroy()


async def make_template(cluster: PgCluster, s: Shape) -> str:
    name = f"shape_{s.name.lower()}"
    if name in cluster.templates:
        return name
    await pg_execute(cluster.dsn(), f"CREATE DATABASE {name}")
    await pg_execute(cluster.dsn(name), SUPABASE_DB)
    if not s.fresh:
        owner = await asyncpg.connect(cluster.dsn(name, "postgres"))
        try:
            await owner.execute(shape_ddl(s))
            if s.wars == "by_id":
                await owner.executemany(
                    "INSERT INTO wars (id, faction_id, enemy_faction_id, status, started_at, "
                    "ended_at) VALUES ($1, $2, $3, $4, $5, $6)",
                    [(w, f, e, "ended" if ended else "active", NOW, NOW if ended else None)
                     for w, f, e, ended in WARS])
            elif s.wars == "by_war_id":
                await owner.executemany(
                    "INSERT INTO wars (war_id, faction_a_id, faction_b_id, faction_a_name, "
                    "faction_b_name, is_active) VALUES ($1, $2, $3, $4, $5, $6)",
                    [(w, f, e, f"Faction {f}", f"Faction {e}", not ended) for w, f, e, ended in WARS])
            for r in history(s):
                v = row_values(s, r)
                await owner.execute(
                    f"INSERT INTO target_calls ({', '.join(v)}) VALUES "
                    f"({', '.join(f'${i + 1}' for i in range(len(v)))})", *v.values())
            if s.seed_trigger:
                await owner.execute(SEED_TRIGGER)
        finally:
            await owner.close()
    cluster.templates.add(name)
    return name


class World:
    """One database of one shape: the owner's and anon's connections, the old tool's
    writes, TornCat's calls API (its SQL functions), and the views to compare."""

    def __init__(self, cluster: PgCluster, shape: Shape, name: str):
        self.cluster, self.shape, self.name = cluster, shape, name
        self.owner: asyncpg.Connection | None = None
        self.anon: asyncpg.Connection | None = None

    def dsn(self, user: str = "postgres") -> str:
        return self.cluster.dsn(self.name, user)

    async def open(self) -> None:
        self.owner = await asyncpg.connect(self.dsn())
        self.anon = await asyncpg.connect(self.dsn("authenticator"))
        self.original_columns = [r["column_name"] for r in await self.owner.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = "
            "'target_calls' ORDER BY ordinal_position")]

    async def close(self) -> None:
        for conn in (self.owner, self.anon):
            if conn is not None:
                await conn.close()

    def psql(self, *args: str, user: str = "postgres", stop: bool = True) -> subprocess.CompletedProcess:
        argv = [str(PSQL), "-X", "-q", *(["-v", "ON_ERROR_STOP=1"] if stop else []),
                self.dsn(user), *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    async def apply(self) -> subprocess.CompletedProcess:
        r = await asyncio.to_thread(self.psql, "-f", str(HERE / "trigger.sql"))
        assert r.returncode == 0, r.stderr
        assert "ERROR" not in r.stderr, r.stderr
        return r

    # -- as the old tool, through Supabase's Data API (PostgREST runs each request as
    # -- `authenticator` with SET LOCAL ROLE anon inside a transaction) ----------------

    async def as_anon(self, sql: str, *args, fetch: bool = False):
        async with self.anon.transaction():
            await self.anon.execute("SET LOCAL ROLE anon")
            return await (self.anon.fetch if fetch else self.anon.execute)(sql, *args)

    def _where(self, war: int, faction: int, target: int | None = None) -> tuple[str, list]:
        conds, args = ["war_id = $1"], [war]
        if self.shape.faction:
            conds.append(f"faction_id = ${len(args) + 1}")
            args.append(faction)
        if target is not None:
            conds.append(f"target_id = ${len(args) + 1}")
            args.append(target)
        if self.shape.status:
            conds.append("status = 'active'")
        return " AND ".join(conds), args

    async def old_call(self, faction: int, target: int, caller: int) -> int:
        """faction-api manageCalls `call`: an insert with status 'active', nothing checked."""
        r = Row(CURRENT.get(faction), faction, target, caller, NOW, "active")
        v = row_values(self.shape, r)
        for c in (*self.shape.created, "updated_at"):
            v.pop(c, None)  # their defaults, as the old tool leaves them
        rows = await self.as_anon(
            f"INSERT INTO target_calls ({', '.join(v)}) VALUES "
            f"({', '.join(f'${i + 1}' for i in range(len(v)))}) RETURNING id", *v.values(),
            fetch=True)
        return rows[0]["id"]

    async def old_cancel(self, faction: int, target: int) -> None:
        """faction-api manageCalls `uncall`: status 'cancelled', updated_at, no uncalled_at."""
        where, args = self._where(CURRENT[faction], faction, target)
        await self.as_anon(f"UPDATE target_calls SET status = 'cancelled', updated_at = now() "
                           f"WHERE {where}", *args)

    async def old_auto_uncall(self, faction: int, target: int) -> None:
        """auto_uncall_expired_targets (working_function.sql): status 'uncalled' and
        uncalled_at. Its own filter (target Okay for 30 s) is narrowed to one target here."""
        where, args = self._where(CURRENT[faction], faction, target)
        await self.as_anon(f"UPDATE target_calls SET status = 'uncalled', uncalled_at = now() "
                           f"WHERE {where}", *args)

    async def old_delete(self, faction: int, target: int) -> None:
        """remove_hospital_dead_targets (auto-uncall.sql): DELETE of the target's calls."""
        where, args = self._where(CURRENT[faction], faction, target)
        await self.as_anon(f"DELETE FROM target_calls WHERE {where}", *args)

    async def old_target_status(self, faction: int, target: int, state: str) -> None:
        """The relay's `update_status`: target_status and updated_at on active rows."""
        where, args = self._where(CURRENT[faction], faction, target)
        value = json.dumps({"state": state, "until": None, "description": state})
        await self.as_anon(f"UPDATE target_calls SET target_status = ${len(args) + 1}, "
                           f"updated_at = now() WHERE {where}", *args, value)

    async def old_read(self, faction: int) -> list:
        """The relay's `get_calls`: every row of the faction's war."""
        where, args = self._where(CURRENT[faction], faction)
        where = where.replace(" AND status = 'active'", "")
        return await self.as_anon(f"SELECT * FROM target_calls WHERE {where} ORDER BY id",
                                  *args, fetch=True)

    async def old_view(self) -> dict[tuple[int, int], int]:
        """What the old tool shows: rows with status 'active' (rows that exist, where there
        is no status) of each faction's current war, the earliest per target."""
        shown: dict[tuple[int, int], int] = {}
        for faction in CURRENT:
            for r in await self.old_read(faction):
                if (not self.shape.status or r["status"] == "active"):
                    shown.setdefault((self.shape.key(faction), r["target_id"]), r["caller_id"])
        return shown

    # -- TornCat ---------------------------------------------------------------------

    async def api_call(self, faction: int | None, target: int, caller: int,
                       war: int | None = None) -> asyncpg.Record:
        return await self.owner.fetchrow(
            "SELECT * FROM torncat_call($1, $2, $3, $4, $5, $6)", faction, war, target,
            f"Enemy {target}", caller, f"Caller {caller}")

    async def api_uncall(self, faction: int | None, target: int, by: int,
                         force: bool = False) -> asyncpg.Record:
        return await self.owner.fetchrow("SELECT * FROM torncat_uncall($1, $2, $3, $4, $5)",
                                         faction, target, by, f"Caller {by}", force)

    async def holders(self) -> dict[tuple[int, int], int]:
        """What the snapshot serves."""
        return {(r["faction_key"], r["target_id"]): r["caller_id"] for r in await self.owner.fetch(
            "SELECT faction_key, target_id, caller_id FROM torncat_holders")}

    async def last_event_id(self) -> int:
        return await self.owner.fetchval("SELECT coalesce(max(event_id), 0) FROM target_call_events")


@pytest.fixture
async def world(supa, request):
    """A fresh database of the shape the test is parametrised with."""
    shape = request.param
    template = await make_template(supa, shape)
    name = f"m{os.getpid()}_{shape.name.lower()}_{next(_numbers)}"
    await pg_execute(supa.dsn(), f"CREATE DATABASE {name} TEMPLATE {template}")
    w = World(supa, shape, name)
    await w.open()
    yield w
    await w.close()
    await pg_execute(supa.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


_numbers = iter(range(1, 1_000_000))


def shapes(selection=SHAPES):
    return pytest.mark.parametrize("world", selection, ids=[s.name for s in selection],
                                   indirect=True)


class Follower:
    """A client's view from the event log: the snapshot, then every event after it."""

    def __init__(self, world: World):
        self.world = world
        self.calls: dict[int, tuple[tuple[int, int], int]] = {}  # call id -> (key, caller)
        self.cursor = 0
        self.events: list[asyncpg.Record] = []

    async def start(self) -> Follower:
        async with self.world.owner.transaction(isolation="repeatable_read"):
            self.cursor = await self.world.last_event_id()
            for r in await self.world.owner.fetch("SELECT * FROM torncat_holders"):
                self.calls[r["call_id"]] = ((r["faction_key"], r["target_id"]), r["caller_id"])
        return self

    async def catch_up(self) -> list[asyncpg.Record]:
        new = await self.world.owner.fetch(
            "SELECT event_id, event, call_id, faction_id, data::jsonb AS data "
            "FROM target_call_events WHERE event_id > $1 AND event IN ('target_call', "
            "'target_uncall') ORDER BY event_id", self.cursor)
        for e in new:
            data = json.loads(e["data"])
            self.calls.pop(e["call_id"], None)
            if e["event"] == "target_call":
                self.calls[e["call_id"]] = ((e["faction_id"] or 0, data["target_id"]),
                                            data["caller_id"])
            self.cursor = e["event_id"]
        self.events += new
        return new

    def view(self) -> dict[tuple[int, int], int]:
        shown = dict(self.calls.values())
        assert len(shown) == len(self.calls), f"a target shown twice: {self.calls}"
        return shown


TOKENS = {RED: "red-old-tool-faction-0123456789", BLUE: "blue-old-tool-faction-0123456789",
          STRANGER: "stranger-faction-token-0123456789"}

EVERY_FACTION = "secret-token-for-every-faction-0123456789"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def serve(w: World, start_server, **env):
    """The server on this database, connected as its owner, trigger.sql applied already."""
    server = start_server(DATABASE_URL=w.dsn(), SECRET_TOKEN=EVERY_FACTION,
                          FACTION_TOKENS=",".join(f"{f}:{t}" for f, t in TOKENS.items()), **env)
    server.wait_for_log("postgres listener live")
    return server


# --------------------------------------------------------------------------
# trigger.sql applies everywhere, loudly, and changes nothing the old tool owns
# --------------------------------------------------------------------------

async def original_rows(w: World) -> list[tuple]:
    """Every row, in the columns the table had before trigger.sql (read when it opened)."""
    if not w.original_columns:
        return []
    return [tuple(r) for r in await w.owner.fetch(
        f"SELECT {', '.join(w.original_columns)} FROM target_calls ORDER BY id")]


TORNCAT_TABLES = ("target_call_events", "torncat_tokens", "torncat_poll_health", "torncat_wars",
                  "torncat_target_status", "torncat_torn_keys", "torncat_holders")

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


async def assert_locked_down(w: World, target_calls: bool = False) -> None:
    """Every object TornCat made: RLS on (tables), no privilege for PUBLIC, anon, authenticated."""
    target_calls = target_calls or w.shape.fresh
    tables = TORNCAT_TABLES + (("target_calls",) if target_calls else ())
    for table in tables:
        assert await w.owner.fetchval(
            "SELECT relrowsecurity FROM pg_class WHERE oid = $1::regclass", table), table
    objects = await w.owner.fetch(
        "SELECT c.oid::regclass::text AS name, c.relkind FROM pg_class c "
        "WHERE c.relnamespace = 'public'::regnamespace AND (c.relname = ANY($1::text[]) "
        "OR c.relname LIKE 'torncat\\_%' OR c.relname LIKE 'target\\_call\\_events%' "
        "OR ($2 AND c.relname LIKE 'target\\_calls\\_id\\_seq')) AND c.relkind IN ('r', 'v', 'S')",
        list(tables), w.shape.fresh)
    assert {o["name"] for o in objects} >= set(tables) | {"torncat_calls", "torncat_live_calls"}
    for o in objects:
        privileges = ("USAGE", "SELECT", "UPDATE") if o["relkind"] == "S" else TABLE_PRIVILEGES
        check = "has_sequence_privilege" if o["relkind"] == "S" else "has_table_privilege"
        for role in ("anon", "authenticated"):
            for p in privileges:
                assert not await w.owner.fetchval(f"SELECT {check}($1, $2, $3)", role,
                                                  o["name"], p), (role, o["name"], p)
        assert not await w.owner.fetchval(
            "SELECT bool_or(a.grantee = 0) FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.oid = $1::regclass", o["name"]), o["name"]
    functions = await w.owner.fetch(
        "SELECT oid::regprocedure::text AS f FROM pg_proc WHERE pronamespace = 'public'::regnamespace "
        "AND (proname LIKE 'torncat\\_%' OR proname IN ('prune_target_call_events', "
        "'target_status_json', 'poll_health_json'))")
    assert len(functions) > 20
    for f in functions:
        for role in ("anon", "authenticated", "public"):
            assert not await w.owner.fetchval(
                "SELECT has_function_privilege($1, $2, 'EXECUTE')", role, f["f"]), (role, f["f"])


@shapes()
async def test_trigger_sql_applies_twice_with_psql_and_changes_no_row(world):
    w = world
    before = await original_rows(w)
    rls_before = None if w.shape.fresh else await w.owner.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'target_calls'::regclass")
    first = await w.apply()
    second = await w.apply()
    assert await original_rows(w) == before
    # Nothing is announced for what was already there; the second run changes nothing.
    assert await w.last_event_id() == 0
    # Row level security on a target_calls that others use: left off, and said so.
    rls = await w.owner.fetchval(
        "SELECT relrowsecurity FROM pg_class WHERE oid = 'target_calls'::regclass")
    if w.shape.fresh:
        assert rls and "row level security" not in first.stderr
    else:
        assert rls is rls_before is False
        for r in (first, second):
            assert re.search(r"NOTICE:  row level security stays OFF on target_calls: "
                             r"anon, authenticated may use it", r.stderr), r.stderr
    await assert_locked_down(w)
    # The columns TornCat needs are there; none of the old tool's went away.
    columns = {r["column_name"] for r in await w.owner.fetch(
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'target_calls'")}
    assert columns >= {"faction_id", "war_id", "uncalled_at", "uncall_reason", "torncat_made"}
    assert {"status", "created_at", "called_at"} & columns == (
        {"status"} if w.shape.status else set()) | set(w.shape.created or ("created_at",))


@shapes([s for s in SHAPES if s.name in ("fresh", "A")])
async def test_a_failure_stops_with_its_own_error(world):
    w = world
    # Not the owner of target_calls (or of the schema): the real error, exit status 3,
    # and nothing of TornCat's left behind. Without ON_ERROR_STOP psql carries on after
    # the error and exits 0: why every command in the docs sets it.
    r = await asyncio.to_thread(w.psql, "-f", str(HERE / "trigger.sql"), user="intruder")
    assert r.returncode == 3, r
    error = ("permission denied for schema public" if w.shape.fresh
             else "trigger.sql must run as the owner of target_calls (postgres), not as intruder")
    assert f"ERROR:  {error}" in r.stderr, r.stderr
    loose = await asyncio.to_thread(w.psql, "-f", str(HERE / "trigger.sql"), user="intruder",
                                    stop=False)
    assert loose.returncode == 0 and "ERROR:" in loose.stderr
    assert await w.owner.fetchval("SELECT to_regclass('torncat_holders')") is None


@shapes([s for s in OLD_SHAPES if s.name == "A"])
@pytest.mark.parametrize("workers", [1, 2])
async def test_init_db_logs_trigger_sqls_own_error_and_stops(world, start_server, workers):
    """A failing trigger.sql: the server logs the statement's own error (not "current
    transaction is aborted"), and exits instead of trying the same thing forever (with
    WORKERS, the parent stops every worker rather than starting them again)."""
    w = world
    server = start_server(DATABASE_URL=w.dsn("intruder"), INIT_DB="1", WORKERS=str(workers))
    assert await asyncio.to_thread(server.proc.wait, STEP_TIMEOUT) == 1
    log = server.log
    assert re.search(r"CRITICAL (\[w\d\] )?trigger.sql failed, so nothing of it was applied: "
                     r"RaiseError: trigger.sql must run as the owner of target_calls \(postgres\), "
                     r"not as intruder; HINT: On Supabase: the postgres role", log), log
    assert "current transaction is aborted" not in log
    if workers > 1:
        assert "cannot start (see above): stopping every worker" in log
        assert "starting it again" not in log and "Traceback" not in log


@shapes([s for s in OLD_SHAPES if s.name == "D"])
async def test_init_db_applies_it_as_the_owner_and_logs_the_notice(world, start_server):
    w = world
    server = start_server(DATABASE_URL=w.dsn(), INIT_DB="1", SECRET_TOKEN=EVERY_FACTION)
    server.wait_for_log("postgres listener live")
    assert re.search(r"INFO trigger.sql: row level security stays OFF on target_calls: anon, "
                     r"authenticated may use it", server.log), server.log
    r = await http(server.port, "GET", "/calls", bearer(EVERY_FACTION))
    assert len(r.json()["calls"]) == 15


# Run once with the session's own PostgreSQL too (the embedded one the server tests use).
async def test_trigger_sql_on_the_embedded_postgres_twice(pg):
    name = f"mig_embedded_{os.getpid()}"
    await pg_execute(pg.dsn(), f"CREATE DATABASE {name}")
    try:
        for _ in range(2):
            await pg_execute(pg.dsn(name), TRIGGER_SQL)
    finally:
        await pg_execute(pg.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


PREVIOUS_TRIGGER_SQL = "7c1149f"  # the last commit whose trigger.sql knew only the seed's table


def previous_trigger_sql() -> str:
    """That trigger.sql, from git history. A full clone (what CI makes) has it; a shallow
    one does not, and then the test fails, saying so: it never skips."""
    r = subprocess.run(["git", "show", f"{PREVIOUS_TRIGGER_SQL}:trigger.sql"], cwd=HERE,
                       capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        pytest.fail(f"the upgrade test reads trigger.sql at commit {PREVIOUS_TRIGGER_SQL} from "
                    f"git history, which this checkout lacks (a shallow clone? clone the "
                    f"repository in full): git says {r.stderr.strip()!r}", pytrace=False)
    return r.stdout


async def test_an_earlier_torncat_database_upgrades_in_place(supa):
    """The previous trigger.sql (before it knew the old tool's shapes), with calls made
    under it: the new one applies, keeps them, shows the active ones, and counts them as
    TornCat's."""
    old_sql = await asyncio.to_thread(previous_trigger_sql)
    name = f"m{os.getpid()}_upgrade"
    await pg_execute(supa.dsn(), f"CREATE DATABASE {name}")
    await pg_execute(supa.dsn(name), SUPABASE_DB)
    w = World(supa, SHAPES[0], name)
    await w.open()
    try:
        await w.owner.execute(old_sql)
        for target in (1, 2, 3):
            await w.owner.execute("SELECT * FROM torncat_call(5, NULL, $1, 'x', 7, 'Ann')", target)
        await w.owner.execute("UPDATE target_calls SET uncalled_at = now() WHERE target_id = 3")
        events = await w.last_event_id()
        await w.apply()
        await w.apply()
        assert await w.holders() == {(5, 1): 7, (5, 2): 7}
        assert await w.last_event_id() == events
        assert await w.owner.fetchval("SELECT count(*) FROM target_calls WHERE torncat_made") == 3
        await assert_locked_down(w, target_calls=True)
        assert await w.owner.fetchval("SELECT torncat_expire_calls(interval '0 s')") == 2
    finally:
        await w.close()
        await pg_execute(supa.dsn(), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# --------------------------------------------------------------------------
# Only today's calls, one per target
# --------------------------------------------------------------------------

@shapes([*OLD_SHAPES, SHAPES[1]])
async def test_the_snapshot_holds_exactly_todays_live_calls(world):
    w = world
    await w.apply()
    rows = history(w.shape)
    assert len(rows) >= (0 if not w.shape.old_tool else 400)
    expected = expected_live(w.shape, rows)
    assert await w.holders() == expected
    if w.shape.old_tool:
        assert await w.old_view() == expected
        # Rows of ended wars and ended rows are history, not calls.
        assert len(expected) == 15
        # What TornCat learnt of each faction's war, from the wars table.
        wars = {r["faction_id"]: r["war_id"] for r in await w.owner.fetch(
            "SELECT faction_id, war_id FROM torncat_wars WHERE source = 'wars_table'")}
        assert {f: wars.get(f) for f in CURRENT} == CURRENT


# --------------------------------------------------------------------------
# The old tool's writes and TornCat's calls, interleaved
# --------------------------------------------------------------------------

def by_target(w: World, shown: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """Where the old tool has no faction column, it knows targets only: so do we, and no
    target may then be shown twice, whatever faction TornCat's own calls carry."""
    if w.shape.faction or not w.shape.old_tool:
        return shown
    flat = {(0, target): caller for (_, target), caller in shown.items()}
    assert len(flat) == len(shown), f"a target shown twice: {shown}"
    return flat


async def agree(w: World, follower: Follower) -> dict:
    """The stream (a client's state from the log), the snapshot and the old tool agree."""
    await follower.catch_up()
    stream, snapshot = follower.view(), await w.holders()
    assert stream == snapshot, (stream, snapshot)
    snapshot = by_target(w, snapshot)
    if w.shape.old_tool:
        old = await w.old_view()
        assert old == snapshot, (old, snapshot)
    return snapshot


@shapes(OLD_SHAPES)
async def test_old_tool_writes_and_api_calls_show_the_same_calls(world):
    w = world
    s = w.shape
    k = s.key
    await w.apply()
    follower = await Follower(w).start()
    await agree(w, follower)
    t1, t2, t3, t4 = 810590, 810591, 810592, 810593   # enemies of RED's current war

    # The old tool calls t1: a call on the stream.
    await w.old_call(RED, t1, caller=900101)
    (ev,) = await follower.catch_up()
    assert (ev["event"], json.loads(ev["data"])["target_id"]) == ("target_call", t1)
    assert (await agree(w, follower))[k(RED), t1] == 900101
    # TornCat will not grant t1 to anyone else; the holder's own retry adds nothing.
    r = await w.api_call(RED, t1, caller=900102)
    assert (r["status"], json.loads(r["call"])["caller_id"]) == ("taken", 900101)
    r = await w.api_call(RED, t1, caller=900101)
    assert r["status"] == "yours" and r["event_id"] is None
    await agree(w, follower)

    # TornCat calls t2: the old tool sees it as its own ('active', creation time, updated_at).
    r = await w.api_call(RED, t2, caller=900102)
    assert r["status"] == "called" and r["event_id"] == follower.cursor + 1
    (row,) = [x for x in await w.old_read(RED) if x["target_id"] == t2]
    if s.status:
        assert row["status"] == "active" and row["updated_at"] is not None
    for c in s.created:
        assert row[c] is not None
    await agree(w, follower)
    # A retry never adds a row.
    r = await w.api_call(RED, t2, caller=900102)
    assert r["status"] == "yours"
    assert len([x for x in await w.old_read(RED) if x["target_id"] == t2]) == 1

    # The old tool writes a second caller on t2 (it checks nothing): no event, TornCat
    # still shows the first caller; the old tool's earliest row agrees.
    await w.old_call(RED, t2, caller=900103)
    assert await follower.catch_up() == []
    assert (await agree(w, follower))[k(RED), t2] == 900102

    if s.target_status:
        # The relay rewrites target_status on active rows: not a call, nothing sent.
        await w.old_target_status(RED, t2, "Hospital")
        await w.old_target_status(RED, t1, "Traveling")
        assert await follower.catch_up() == []

    # TornCat's caller uncalls t2: their call ends, and the waiting duplicate holds t2.
    r = await w.api_uncall(RED, t2, by=900102)
    assert r["status"] == "uncalled"
    uncall, call = await follower.catch_up()
    assert (uncall["event"], uncall["event_id"], json.loads(uncall["data"])["uncall_reason"]) == (
        "target_uncall", r["event_id"], "uncalled")
    assert (call["event"], json.loads(call["data"])["caller_id"]) == ("target_call", 900103)
    assert (await agree(w, follower))[k(RED), t2] == 900103

    if s.status:
        # The old tool's manual uncall: status 'cancelled', the reason shown.
        await w.old_cancel(RED, t1)
        (ev,) = await follower.catch_up()
        assert (ev["event"], json.loads(ev["data"])["uncall_reason"]) == ("target_uncall", "cancelled")
        assert (k(RED), t1) not in await agree(w, follower)
    if s.status and s.uncalled_at:
        # Its automatic uncall: status 'uncalled' with uncalled_at.
        await w.old_auto_uncall(RED, t2)
        (ev,) = await follower.catch_up()
        assert (ev["event"], json.loads(ev["data"])["uncall_reason"]) == ("target_uncall", "uncalled")
        assert (k(RED), t2) not in await agree(w, follower)

    # TornCat calls t3; the old tool deletes it (target in hospital): an uncall, 'deleted'.
    assert (await w.api_call(RED, t3, caller=900104))["status"] == "called"
    await agree(w, follower)
    await w.old_delete(RED, t3)
    (ev,) = await follower.catch_up()
    assert (ev["event"], json.loads(ev["data"])["uncall_reason"]) == ("target_uncall", "deleted")
    assert (k(RED), t3) not in await agree(w, follower)

    # Another faction, meanwhile, keeps its own calls (where rows have a faction).
    assert (await w.api_call(BLUE, 820390, caller=900201))["status"] == "called"
    await agree(w, follower)
    assert (await w.api_uncall(BLUE, 820390, by=900201))["status"] == "uncalled"

    # A war_id the faction is not at: refused, naming both; one the wars table does not
    # know, for a faction whose war is unknown: refused, naming it (not a 500).
    r = await w.api_call(RED, t4, caller=900105, war=31004)
    assert (r["status"], json.loads(r["call"])) == (
        "not_current_war", {"war_id": 31004, "current_war_id": 31005})
    r = await w.api_call(STRANGER, t4, caller=900105, war=424242)
    assert (r["status"], json.loads(r["call"])) == ("unknown_war", {"war_id": 424242})
    await agree(w, follower)


class StreamView:
    """One client's state from a real stream: the snapshot, then each event by call id."""

    def __init__(self, port: int, token: str):
        self.client = SseClient(port, headers=bearer(token))
        self.calls: dict[int, tuple[tuple[int, int], int]] = {}
        self.last = 0

    async def __aenter__(self) -> StreamView:
        await self.client.connect()
        snap = await self.client.next()
        assert snap.event == "snapshot"
        self._load(snap.json["calls"])
        self.last = snap.json["last_event_id"]
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.close()

    def _load(self, calls: list[dict]) -> None:
        self.calls = {c["id"]: ((c["faction_id"] or 0, c["target_id"]), c["caller_id"])
                      for c in calls}

    async def until(self, event_id: int) -> list:
        """Every event up to `event_id` (the log's last), applied."""
        seen = []
        while self.last < event_id:
            ev = await self.client.next()
            if ev.event in ("target_call", "target_uncall"):
                self.calls.pop(ev.json["id"], None)
                if ev.event == "target_call":
                    self.calls[ev.json["id"]] = ((ev.json["faction_id"] or 0, ev.json["target_id"]),
                                                 ev.json["caller_id"])
                seen.append(ev)
            self.last = ev.int_id
        return seen

    def view(self) -> dict[tuple[int, int], int]:
        shown = dict(self.calls.values())
        assert len(shown) == len(self.calls), f"a target shown twice: {self.calls}"
        return shown


async def served_agree(w: World, port: int, stream: StreamView, scope: int | None) -> dict:
    """After the last write: the stream, GET /calls, the snapshot's source and the old tool
    show the same calls (scope: a faction, or None for every faction)."""
    seen = await stream.until(await w.last_event_id())
    token = EVERY_FACTION if scope is None else TOKENS[scope]
    r = await http(port, "GET", "/calls", bearer(token))
    assert r.status == 200, r
    polled = {(c["faction_id"] or 0, c["target_id"]): c["caller_id"] for c in r.json()["calls"]}
    holders = {k: v for k, v in (await w.holders()).items() if scope is None or k[0] == scope}
    assert stream.view() == polled == holders, (stream.view(), polled, holders)
    old = {k: v for k, v in (await w.old_view()).items()
           if scope is None or not w.shape.faction or k[0] == scope}
    assert old == by_target(w, holders), (old, holders)
    return seen


@shapes(OLD_SHAPES)
async def test_the_server_shows_what_the_old_tool_shows_through_every_write(world, start_server):
    """Every write path of the old tool (as anon) interleaved with the API's calls and
    uncalls, through the real server: after each step the stream, GET /calls and the old
    tool's view (its 'active' rows of the faction's current war) agree."""
    w = world
    s = w.shape
    await w.apply()
    server = serve(w, start_server)
    port = server.port
    scope = RED if s.faction else None  # where rows have no faction, only every-faction tokens see them
    red = TOKENS[RED]
    t1, t2, t3, t4 = 810590, 810591, 810592, 810593

    async def post(target: int, caller: int, token: str = red, **extra):
        return await http(port, "POST", "/calls", bearer(token),
                          {"target_id": target, "caller_id": caller,
                           "caller_name": f"Caller {caller}", **extra})

    async def delete(target: int, caller: int, token: str = red, **extra):
        return await http(port, "DELETE", f"/calls/{target}", bearer(token),
                          {"caller_id": caller, **extra})

    async with StreamView(port, EVERY_FACTION if scope is None else red) as stream:
        assert len(stream.calls) == (10 if s.faction else 15)
        await served_agree(w, port, stream, scope)
        # The old tool calls t1; TornCat refuses it to another member, and a retry by the
        # holder changes nothing.
        await w.old_call(RED, t1, caller=900101)
        (ev,) = await served_agree(w, port, stream, scope)
        assert (ev.event, ev.json["target_id"], ev.json["caller_id"]) == ("target_call", t1, 900101)
        r = await post(t1, 900102)
        assert (r.status, r.json()["error"]) == (409, f"target {t1} is already called by "
                                                      "Caller 900101"), r
        r = await post(t1, 900101)
        assert (r.status, r.json()["event_id"]) == (201, None), r
        assert await served_agree(w, port, stream, scope) == []
        # TornCat calls t2; its retry adds no row; the old tool's own second caller waits.
        r = await post(t2, 900102)
        assert r.status == 201 and r.json()["event_id"] is not None, r
        await served_agree(w, port, stream, scope)
        assert (await post(t2, 900102)).status == 201
        await w.old_call(RED, t2, caller=900103)
        assert await served_agree(w, port, stream, scope) == []
        assert len([x for x in await w.old_read(RED) if x["target_id"] == t2]) == 2
        if s.target_status:  # the relay rewrites target_status: not a call
            await w.old_target_status(RED, t2, "Hospital")
            assert await served_agree(w, port, stream, scope) == []
        # TornCat's caller uncalls t2: the waiting second caller is shown.
        r = await delete(t2, 900102)
        assert r.status == 200 and r.json()["call"]["uncall_reason"] == "uncalled", r
        uncall, call = await served_agree(w, port, stream, scope)
        assert (uncall.event, uncall.int_id, call.event, call.json["caller_id"]) == (
            "target_uncall", r.json()["event_id"], "target_call", 900103)
        if s.status:  # the old tool's manual uncall
            await w.old_cancel(RED, t1)
            (ev,) = await served_agree(w, port, stream, scope)
            assert (ev.event, ev.json["uncall_reason"]) == ("target_uncall", "cancelled")
        if s.status and s.uncalled_at:  # and its automatic one
            await w.old_auto_uncall(RED, t2)
            (ev,) = await served_agree(w, port, stream, scope)
            assert (ev.event, ev.json["uncall_reason"]) == ("target_uncall", "uncalled")
        # TornCat calls t3; the old tool deletes it (hospital): an uncall, "deleted".
        assert (await post(t3, 900104)).status == 201
        await served_agree(w, port, stream, scope)
        await w.old_delete(RED, t3)
        (ev,) = await served_agree(w, port, stream, scope)
        assert (ev.event, ev.json["uncall_reason"]) == ("target_uncall", "deleted")
        # Wars: not RED's current one (409), and one the wars table does not know (422),
        # each naming the war; nothing written.
        r = await post(t4, 900105, war_id=31004)
        assert (r.status, r.json()["error"]) == (
            409, f"war 31004 is not faction {RED}'s current war (31005)"), r
        r = await post(t4, 900105, token=TOKENS[STRANGER], war_id=424242)
        assert (r.status, r.json()["error"]) == (422, "war 424242 is not in the wars table"), r
        assert await served_agree(w, port, stream, scope) == []
    assert server.problems() == [], server.problems()


@shapes(OLD_SHAPES)
async def test_anon_still_does_what_the_relay_does_and_nothing_of_torncats(world):
    w = world
    s = w.shape
    await w.apply()
    before = len(await w.old_read(RED))
    call_id = await w.old_call(RED, 810599, caller=900109)
    assert len(await w.old_read(RED)) == before + 1
    if s.target_status:
        await w.old_target_status(RED, 810599, "Hospital")
    if s.status:
        await w.old_cancel(RED, 810599)
    await w.as_anon("DELETE FROM target_calls WHERE id = $1", call_id)
    assert len(await w.old_read(RED)) == before
    # ...and nothing of TornCat's: not the log, the holders, the keys, nor a function.
    for sql in ("SELECT * FROM target_call_events", "TRUNCATE torncat_torn_keys",
                "SELECT * FROM torncat_holders", "SELECT * FROM torncat_calls",
                "SELECT torncat_call(1, NULL, 2, 'x', 3, 'y')",
                "SELECT torncat_append('target_call', 1, 1, '{}')",
                "INSERT INTO torncat_tokens (faction_id, token_sha256) VALUES (1, '\\x00')"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await w.as_anon(sql)


@shapes([s for s in OLD_SHAPES if s.name == "A"])
async def test_a_call_the_table_cannot_hold_is_refused_by_name(world, start_server):
    """faction_id is NOT NULL in shape A: a call without a faction (SECRET_TOKEN) says
    so, in SQL and over HTTP (422, not 500), and writes nothing."""
    w = world
    await w.apply()
    r = await w.api_call(None, 810596, caller=900110)
    assert (r["status"], json.loads(r["call"])) == ("refused", {"column": "faction_id"})
    server = serve(w, start_server)
    r = await http(server.port, "POST", "/calls", bearer(EVERY_FACTION),
                   {"target_id": 810596, "caller_id": 900110, "caller_name": "Cy"})
    assert (r.status, r.json()["error"]) == (
        422, "this database requires faction_id on every call, which this call does not have"), r
    assert await w.owner.fetchval("SELECT count(*) FROM target_calls WHERE target_id = 810596") == 0
    assert server.problems() == [], server.problems()


@shapes([s for s in SHAPES if s.name in ("fresh", "D")])
async def test_truncate_ends_every_call_on_the_stream(world):
    w = world
    await w.apply()
    assert (await w.api_call(RED, 810598, caller=900108))["status"] == "called"
    follower = await Follower(w).start()
    shown = len(await w.holders())
    await w.owner.execute("TRUNCATE target_calls" + (" CASCADE" if w.shape.old_tool else ""))
    events = await follower.catch_up()
    assert len(events) == shown and {json.loads(e["data"])["uncall_reason"] for e in events} == {
        "deleted"}
    assert await w.holders() == {}


# --------------------------------------------------------------------------
# Defaults that must not rewrite history
# --------------------------------------------------------------------------

@shapes(OLD_SHAPES)
async def test_expiry_and_war_ends_write_only_torncats_own_calls(world):
    w = world
    await w.apply()
    mine = await w.api_call(RED, 810595, caller=900106)
    before = await original_rows(w)
    assert await w.owner.fetchval("SELECT torncat_expire_calls(interval '0 s')") == 1
    after = {r[0]: r for r in await original_rows(w)}
    changed = {r[0] for r in before if after.get(r[0]) != r}
    assert changed == {json.loads(mine["call"])["id"]}  # ended; in B (no status): deleted
    assert len(after) == len(before) - (not w.shape.status)
    # The Torn poll sees RED at a new war: RED's calls of 31005 stop being shown (a
    # war_ended uncall each), and no row of the old tool is written.
    follower = await Follower(w).start()
    shown = len([k for k in await w.holders() if k[0] == w.shape.key(RED)])
    before = await original_rows(w)
    ended = await w.owner.fetchval("SELECT torncat_set_war($1, 31006, 8106)", RED)
    assert await original_rows(w) == before
    events = await follower.catch_up()
    if w.shape.faction:
        assert ended == shown == len(events) == 10
        assert {json.loads(e["data"])["uncall_reason"] for e in events} == {"war_ended"}
    else:  # rows without a faction: still some faction's current war (BLUE's, RED's old)
        assert ended == 0 or all(json.loads(e["data"])["war_id"] == 31005 for e in events)


# --------------------------------------------------------------------------
# Each faction's current war: the wars table, the operator, the poll
# --------------------------------------------------------------------------

@shapes([s for s in OLD_SHAPES if s.wars == "by_war_id"] + [
    s for s in OLD_SHAPES if s.name == "D"])
async def test_a_war_the_old_tool_ends_ends_its_calls_once_the_wars_table_is_read(world):
    w = world
    await w.apply()
    follower = await Follower(w).start()
    if w.shape.wars == "by_war_id":
        await w.as_anon("UPDATE wars SET is_active = false WHERE war_id = $1", CURRENT[RED])
    else:
        await w.as_anon("UPDATE wars SET ended_at = now() WHERE id = $1", CURRENT[RED])
    assert await follower.catch_up() == []  # the server syncs every WARS_SYNC_SECONDS
    assert await w.owner.fetchval("SELECT torncat_sync_wars()") >= 1
    events = await follower.catch_up()
    assert len(events) == 10
    assert {(e["event"], json.loads(e["data"])["uncall_reason"]) for e in events} == {
        ("target_uncall", "war_ended")}
    assert {k for k in await w.holders()} == {k for k in expected_live(w.shape, history(w.shape))
                                             if k[1] // 100 == 8203}


@shapes([s for s in OLD_SHAPES if s.name in ("A", "B")])
async def test_the_server_reads_the_wars_table_every_wars_sync_seconds(world, start_server):
    """The old tool ends RED's war in its wars table; nothing else happens. Within
    WARS_SYNC_SECONDS the server has read it: RED's ten calls end on the stream, in
    GET /calls and in the snapshot's source alike."""
    w = world
    await w.apply()
    server = serve(w, start_server, WARS_SYNC_SECONDS="1")
    async with StreamView(server.port, EVERY_FACTION) as stream:
        before, last = len(stream.calls), await w.last_event_id()
        if w.shape.wars == "by_war_id":
            await w.as_anon("UPDATE wars SET is_active = false, updated_at = now() "
                            "WHERE war_id = $1", CURRENT[RED])
        else:
            await w.as_anon("UPDATE wars SET ended_at = now() WHERE id = $1", CURRENT[RED])

        async def logged() -> bool:
            return await w.last_event_id() >= last + 10

        await wait_until(logged, what="the war's calls ended by the server's read of the wars table")
        ended = await stream.until(await w.last_event_id())
        assert len(ended) == 10 and {(e.event, e.json["war_id"], e.json["uncall_reason"])
                                     for e in ended} == {("target_uncall", CURRENT[RED], "war_ended")}
        r = await http(server.port, "GET", "/calls", bearer(EVERY_FACTION))
        polled = {(c["faction_id"] or 0, c["target_id"]): c["caller_id"] for c in r.json()["calls"]}
        assert stream.view() == polled == await w.holders()
        assert len(stream.calls) == before - 10
        await server.await_log(r"wars table: the current war of \d+ factions changed")


@shapes([s for s in OLD_SHAPES if s.name in ("A", "B")])
async def test_the_operator_sets_and_clears_a_factions_war(world):
    w = world
    await w.apply()
    follower = await Follower(w).start()
    start = follower.cursor
    # `war set`: RED is at war 31004 (say the wars table is wrong): its calls of 31005
    # end on the stream, and the leftovers of 31004 become today's calls.
    await w.owner.fetchval("SELECT torncat_set_war($1, 31004, 8104, 'operator')", RED)
    events = await follower.catch_up()
    # (Rows without a faction stay of today while any faction's war is theirs: the
    # wars table still has RED's enemy at 31005.)
    assert {e["event"] for e in events} == (
        {"target_call", "target_uncall"} if w.shape.faction else {"target_call"})
    assert {json.loads(e["data"])["war_id"] for e in events if e["event"] == "target_call"} == {31004}
    # The wars table no longer speaks for RED...
    assert await w.owner.fetchval("SELECT torncat_sync_wars()") == 0
    assert await w.owner.fetchval("SELECT source FROM torncat_wars WHERE faction_id = $1",
                                  RED) == "operator"
    # ...until `war clear`: back to what it says, and to the calls shown at first.
    await w.owner.fetchval("SELECT torncat_clear_war($1)", RED)
    await follower.catch_up()
    assert follower.view() == await w.holders()
    assert by_target(w, await w.holders()) == expected_live(w.shape, history(w.shape))
    # Each change was a `war` event to RED's members, after the calls it ended: set (from
    # the wars table's 31005), cleared (no one says), the wars table's again.
    wars = [(e["faction_id"], json.loads(e["data"])) for e in await w.owner.fetch(
        "SELECT faction_id, data::text AS data FROM target_call_events WHERE event = 'war' "
        "AND event_id > $1 ORDER BY event_id", start)]
    assert [(f, d["known"], d["war_id"], d["ended_war_id"], d["source"]) for f, d in wars] == [
        (RED, True, 31004, 31005, "operator"), (RED, False, None, None, None),
        (RED, True, 31005, None, "wars_table")]


@shapes([s for s in OLD_SHAPES if s.name == "D"])
async def test_war_set_list_clear_on_the_command_line(world):
    w = world
    await w.apply()

    def cli(*args: str):
        return run_cli("war", *args, DATABASE_URL=w.dsn())

    r = await asyncio.to_thread(cli, "set", "--faction", str(RED), "--war", "31004", "--opponent", "8104")
    assert r.returncode == 0 and f"faction {RED}: war 31004;" in r.stderr, r
    r = await asyncio.to_thread(cli, "list")
    assert re.search(rf"^ +{RED} +31004 +8104 +\d+ .* operator$", r.stdout, re.MULTILINE), r.stdout
    assert re.search(rf"^ +{BLUE} +32003 +8203 +5 .* wars_table$", r.stdout, re.MULTILINE), r.stdout
    r = await asyncio.to_thread(cli, "clear", "--faction", str(RED))
    assert r.returncode == 0, r
    assert by_target(w, await w.holders()) == expected_live(w.shape, history(w.shape))


@shapes([SHAPES[0]])
async def test_a_war_that_ends_ends_torncats_calls_made_before_it_was_known(world):
    """A call made with no war known belongs to the war that was on; when that war ends,
    the call ends with it."""
    w = world
    await w.apply()
    await w.api_call(RED, 1, caller=7)                 # no war known: war_id NULL
    await w.owner.fetchval("SELECT torncat_set_war($1, 555, 8, 'torn_poll')", RED)
    assert await w.holders() == {(RED, 1): 7}          # the war began: still its call
    assert await w.owner.fetchval("SELECT torncat_set_war($1, NULL, NULL)", RED) == 1
    assert await w.holders() == {}
    assert await w.owner.fetchval("SELECT uncall_reason FROM target_calls") == "war_ended"


# --------------------------------------------------------------------------
# Channel target_calls keeps the seed's payload
# --------------------------------------------------------------------------

SEED_PAYLOAD = re.compile(r'^\{"id" : \d+, "caller_id" : \d+, "target_id" : \d+, '
                          r'"created_at" : "\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"\}$')


@shapes([s for s in SHAPES if s.seed_trigger or s.name == "A"])
async def test_channel_target_calls_keeps_the_seeds_payload_on_inserts_only(world):
    w = world
    heard: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(w.dsn())
    await listener.add_listener("target_calls", lambda *a: heard.put_nowait(a[3]))
    try:
        async def insert() -> str:
            if w.shape.old_tool:
                await w.old_call(RED, 810597, caller=900107)
            else:
                await w.owner.execute("INSERT INTO target_calls (caller_id, target_id) VALUES (1, 2)")
            return await asyncio.wait_for(heard.get(), 5)

        seeds = await insert() if w.shape.seed_trigger else None
        await w.apply()
        ours = await insert()
        assert SEED_PAYLOAD.match(ours), ours
        if seeds is not None:  # the seed's own function said the same, byte for byte
            assert SEED_PAYLOAD.match(seeds)
            assert json.loads(ours)["created_at"][:13] == json.loads(seeds)["created_at"][:13]
            assert json.loads(ours).keys() == json.loads(seeds).keys()
        # Updates and deletes are not new calls there.
        await (w.as_anon if w.shape.old_tool else w.owner.execute)(
            "DELETE FROM target_calls WHERE target_id IN (810597, 2)")
        await w.owner.execute("SELECT pg_notify('target_calls', 'marker')")
        assert await asyncio.wait_for(heard.get(), 5) == "marker"
    finally:
        with contextlib.suppress(Exception):
            await listener.close()


# --------------------------------------------------------------------------
# migrate --check: look before you leap; migrate --close-leftovers
# --------------------------------------------------------------------------

@shapes()
async def test_migrate_check_reports_what_trigger_sql_will_do_and_changes_nothing(world):
    w = world
    before = await original_rows(w)
    objects = "SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace"
    tables = await w.owner.fetchval(objects)
    report = await migrate_report(w.owner)
    print(f"\n--- migrate --check on shape {w.shape.name} ---\n" + "\n".join(report))
    assert await original_rows(w) == before
    assert await w.owner.fetchval(objects) == tables
    text = "\n".join(report)
    if w.shape.fresh:
        assert report == ["target_calls: none here: trigger.sql creates it (the seed's columns "
                          "and TornCat's)"]
        return
    await w.apply()
    shown = int(re.search(r"^calls shown after trigger.sql: (\d+)", text, re.MULTILINE).group(1))
    assert shown == len(await w.holders())
    stale = int(re.search(r"^still active in wars that are not current: (\d+) rows", text,
                          re.MULTILINE).group(1))
    assert stale == await w.owner.fetchval("SELECT count(*) FROM torncat_leftovers")
    rows = history(w.shape)
    assert stale == sum(r.live_by_row and r.war is not None and CURRENT.get(r.faction) != r.war
                        for r in rows)
    if w.shape.old_tool:
        assert stale > 20 and "targets held twice or more: 0 " not in text
        assert "row level security on target_calls: off, and trigger.sql leaves it off: it would " \
               "lock out anon (" in text
        assert ("rows without a faction: 0" in text) == w.shape.faction
    # And again on the migrated database: the same findings.
    again = await migrate_report(w.owner)
    assert [line for line in again if line.startswith(("calls shown", "still active"))] == [
        line for line in report if line.startswith(("calls shown", "still active"))]


@shapes([s for s in SHAPES if s.name in ("fresh", "A", "C")])
async def test_migrate_check_on_the_command_line_changes_nothing(world):
    w = world
    before = await original_rows(w)
    r = await asyncio.to_thread(run_cli, "migrate", "--check", DATABASE_URL=w.dsn(), INIT_DB="1")
    assert r.returncode == 0, r.stderr
    print(f"\n--- python torncat_sse.py migrate --check, shape {w.shape.name} ---\n{r.stdout}")
    assert await original_rows(w) == before
    assert await w.owner.fetchval("SELECT to_regclass('torncat_holders')") is None  # even with INIT_DB
    if w.shape.fresh:
        assert r.stdout.startswith("target_calls: none here")
    else:
        assert "calls shown after trigger.sql: 15" in r.stdout
    # Closing leftovers needs trigger.sql; it asks first, or takes --yes.
    r = await asyncio.to_thread(run_cli, "migrate", "--close-leftovers", DATABASE_URL=w.dsn())
    assert r.returncode == 1 and "apply trigger.sql first" in r.stderr
    if w.shape.fresh:
        return
    await w.apply()
    r = await asyncio.to_thread(run_cli, "migrate", "--close-leftovers", DATABASE_URL=w.dsn())
    assert r.returncode == 2 and "add --yes" in r.stderr, r
    stale = await w.owner.fetchval("SELECT count(*) FROM torncat_leftovers")
    assert f"still active in wars that are not current: {stale} rows" in r.stdout
    r = await asyncio.to_thread(run_cli, "migrate", "--close-leftovers", "--yes",
                                DATABASE_URL=w.dsn())
    assert r.returncode == 0 and f"closed {stale} rows" in r.stderr, r
    assert await w.owner.fetchval("SELECT count(*) FROM torncat_leftovers") == 0


@shapes(OLD_SHAPES)
async def test_closing_leftovers_writes_what_the_old_tool_reads_and_nothing_else(world):
    w = world
    await w.apply()
    follower = await Follower(w).start()
    stale = await w.owner.fetch("SELECT id FROM torncat_leftovers ORDER BY id")
    shown = await w.holders()
    before = {r[0]: r for r in await original_rows(w)}
    assert await w.owner.fetchval("SELECT torncat_close_leftovers()") == len(stale) > 0
    after = {r[0]: r for r in await original_rows(w)}
    assert {i for i, r in before.items() if after.get(i) != r} == {r["id"] for r in stale}
    if w.shape.status:  # as the old tool's own automatic uncall writes it
        assert {r["status"] for r in await w.owner.fetch(
            "SELECT status FROM target_calls WHERE id = ANY($1::bigint[])", [r["id"] for r in stale])} \
            == {"uncalled"}
    else:  # no status, others use the table: a DELETE, the only uncall they can see
        assert not set(after) & {r["id"] for r in stale}
    assert await follower.catch_up() == []  # history: nothing was shown, nothing to say
    assert await w.holders() == shown
    assert await w.owner.fetchval("SELECT count(*) FROM torncat_leftovers") == 0


# --------------------------------------------------------------------------
# Under concurrency: one caller, no deadlock with the old tool's writes
# --------------------------------------------------------------------------

@shapes([s for s in OLD_SHAPES if s.name in ("A", "C")])
async def test_racing_writers_keep_one_caller_and_never_deadlock(world):
    """The old tool's writes (as anon), TornCat's calls and uncalls, the poll's status
    round and the expiry, all at once on the same few targets: no statement fails (no
    deadlock: everything takes target_calls, its rows, then the event lock), every
    target is shown with one caller, and the stream, the snapshot and the old tool agree."""
    w = world
    await w.apply()
    follower = await Follower(w).start()
    targets = [810580 + i for i in range(4)]
    errors: list[BaseException] = []

    async def api(caller: int) -> None:
        conn = await asyncpg.connect(w.dsn())
        rng = random.Random(caller)
        try:
            for _ in range(40):
                t = rng.choice(targets)
                if rng.random() < 0.6:
                    await conn.fetchrow("SELECT * FROM torncat_call($1, NULL, $2, 'x', $3, 'y')",
                                        RED, t, caller)
                else:
                    await conn.fetchrow("SELECT * FROM torncat_uncall($1, $2, $3, 'y', $4)",
                                        RED, t, caller, rng.random() < 0.3)
        finally:
            await conn.close()

    async def poll_and_expiry() -> None:
        conn = await asyncpg.connect(w.dsn())
        try:
            for i in range(30):
                statuses = [{"target_id": t, "target_name": "x", "state":
                             "Hospital" if (i + t) % 3 == 0 else "Okay", "until": i, "description": ""}
                            for t in targets]
                await conn.fetch("SELECT * FROM torncat_target_statuses($1, $2, $3::json)", RED,
                                 CURRENT[RED], json.dumps(statuses))
                await conn.fetchval("SELECT torncat_expire_calls(interval '50 ms')")
        finally:
            await conn.close()

    async def guarded(coro) -> None:
        try:
            await coro
        except BaseException as e:
            errors.append(f"{coro.__qualname__}: {e!r} {getattr(e, 'detail', '')} "
                          f"{getattr(e, 'context', '')}")

    # Each old-tool worker on a connection of its own, as PostgREST's pool would.
    workers = [World(w.cluster, w.shape, w.name) for _ in range(3)]
    for x in workers:
        await x.open()
    try:
        await asyncio.wait_for(asyncio.gather(
            *(guarded(old_tool(x, targets, seed)) for seed, x in enumerate(workers)),
            guarded(api(900171)), guarded(api(900172)), guarded(poll_and_expiry())), 120)
    finally:
        for x in workers:
            await x.close()
    assert errors == [], "\n".join(errors)
    await agree(w, follower)


async def old_tool(x: World, targets: list[int], seed: int) -> None:
    """The old tool's writes in a random order: calls, manual uncalls, status rewrites and
    the hospital DELETE, each on one target as its programs make them."""
    rng = random.Random(seed)
    for _ in range(40):
        t = rng.choice(targets)
        op = rng.choice(["call", "cancel", "status", "delete"])
        if op == "call":
            await x.old_call(RED, t, caller=900150 + seed)
        elif op == "cancel" and x.shape.status:
            await x.old_cancel(RED, t)
        elif op == "status" and x.shape.target_status:
            await x.old_target_status(RED, t, rng.choice(["Okay", "Hospital"]))
        else:
            await x.old_delete(RED, t)
