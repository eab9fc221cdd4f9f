"""Draft of `torncat_sse.py migrate`: moves into torncat_sse.py's CLI section after the
refactor (issue 18) lands. Read-only look at a database before trigger.sql."""

from __future__ import annotations

import asyncpg

CREATION = ("created_at", "called_at")
ADDED_COLUMNS = ("faction_id", "war_id", "caller_name", "target_name", "uncalled_at",
                 "uncalled_by", "uncalled_by_name", "uncall_reason", "torncat_made")
EXAMPLES = 3          # rows shown per finding
# Each side a wars row names, with its opponent (the same pairs trigger.sql reads).
WAR_SIDES = (("faction_id", "enemy_faction_id"), ("faction_a_id", "faction_b_id"),
             ("faction_b_id", "faction_a_id"), ("attacker_faction_id", "defender_faction_id"),
             ("defender_faction_id", "attacker_faction_id"))


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class Shape:
    """What the catalog says of target_calls and the wars table its war_id references:
    the SQL expressions trigger.sql's DO block "The shape" generates, built the same way."""

    def __init__(self, table: asyncpg.Record | None, cols: dict[str, str],
                 wars: tuple[str, str] | None, wars_cols: dict[str, str]):
        self.table, self.cols, self.wars, self.wars_cols = table, cols, wars, wars_cols
        created = [c for c in CREATION if c in cols]
        self.created = created
        self.created_sql = (f"coalesce({', '.join('t.' + c for c in created)})" if created
                            else "NULL::timestamptz")
        active = ["t.uncalled_at IS NULL"] if "uncalled_at" in cols else []
        if "status" in cols:
            active.insert(0, "t.status::text = 'active'")
        self.active_sql = f"coalesce({' AND '.join(active) or 'true'}, false)"
        self.faction_sql = "t.faction_id::bigint" if "faction_id" in cols else "NULL::bigint"
        self.war_sql = "t.war_id::bigint" if "war_id" in cols else "NULL::bigint"
        flags = (["w.is_active IS TRUE"] if "is_active" in wars_cols else []) + (
            ["w.ended_at IS NULL"] if "ended_at" in wars_cols else [])
        sides = [(f, o) for f, o in WAR_SIDES if f in wars_cols]
        self.wars_flags = " AND ".join(flags)
        self.wars_sql = None
        if wars and flags and sides:
            table_name, key = wars
            self.wars_sql = " UNION ALL ".join(
                f"SELECT w.{_q(f)}::bigint AS faction_id, w.{_q(key)}::bigint AS war_id, "
                f"({self.wars_flags}) AS is_current FROM {table_name} w" for f, _ in sides)

    def describe(self) -> str:
        if self.table is None:
            return "target_calls: none here: trigger.sql creates it (the seed's columns and TornCat's)"
        parts = [f"creation time {' and '.join(self.created) or 'none (trigger.sql adds created_at)'}"]
        for c in ("status", "uncalled_at", "faction_id", "target_status"):
            parts.append(f"{c} {'yes' if c in self.cols else 'no'}")
        if self.wars:
            parts.append(f"war_id -> {self.wars[0]}({self.wars[1]})")
        else:
            parts.append("war_id " + ("without a foreign key" if "war_id" in self.cols else "no"))
        return "shape: " + "; ".join(parts)


async def read_shape(conn) -> Shape:
    table = await conn.fetchrow(
        "SELECT c.oid, pg_get_userbyid(c.relowner) AS owner, c.relrowsecurity AS rls, "
        "pg_has_role(current_user, c.relowner, 'MEMBER') AS may_alter, "
        "(SELECT count(*) FROM target_calls) AS total "
        "FROM pg_class c WHERE c.oid = to_regclass('target_calls')") \
        if await conn.fetchval("SELECT to_regclass('target_calls') IS NOT NULL") else None
    cols, wars, wars_cols = {}, None, {}
    if table is not None:
        cols = {r["attname"]: r["type"] for r in await conn.fetch(
            "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
            "WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum", table["oid"])}
        fk = await conn.fetchrow(
            "SELECT k.confrelid::regclass::text AS t, a.attname AS c FROM pg_constraint k "
            "JOIN pg_attribute a ON a.attrelid = k.confrelid AND a.attnum = k.confkey[1] "
            "WHERE k.conrelid = $1 AND k.contype = 'f' AND cardinality(k.conkey) = 1 "
            "AND k.conkey[1] = (SELECT attnum FROM pg_attribute WHERE attrelid = $1 "
            "AND attname = 'war_id' AND NOT attisdropped) LIMIT 1", table["oid"])
        if fk is not None:
            wars = (fk["t"], fk["c"])
            wars_cols = {r["attname"]: r["type"] for r in await conn.fetch(
                "SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute "
                "WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped", fk["t"])}
    return Shape(table, cols, wars, wars_cols)


async def current_wars(conn, shape: Shape) -> tuple[dict[int, int | None], dict[int, str], list[str]]:
    """Each faction's current war as trigger.sql will know it: (faction -> war or None for
    at peace, faction -> where from, factions the wars table names twice)."""
    wars: dict[int, int | None] = {}
    source: dict[int, str] = {}
    ambiguous: list[str] = []
    if shape.wars_sql:
        for r in await conn.fetch(
                f"SELECT s.faction_id, array_agg(s.war_id ORDER BY s.war_id) FILTER (WHERE s.is_current) "
                f"AS current FROM ({shape.wars_sql}) s WHERE s.faction_id IS NOT NULL "
                f"GROUP BY s.faction_id"):
            current = r["current"] or []
            if len(current) > 1:
                ambiguous.append(f"faction {r['faction_id']}: wars {', '.join(map(str, current))}")
                continue
            wars[r["faction_id"]] = current[0] if current else None
            source[r["faction_id"]] = f"{shape.wars[0]} table"
    if await conn.fetchval("SELECT to_regclass('torncat_wars') IS NOT NULL"):
        has_source = await conn.fetchval(
            "SELECT count(*) > 0 FROM pg_attribute WHERE attrelid = 'torncat_wars'::regclass "
            "AND attname = 'source' AND NOT attisdropped")
        for r in await conn.fetch("SELECT faction_id, war_id, "
                                  + ("source" if has_source else "'torn_poll' AS source")
                                  + " FROM torncat_wars"):
            if r["source"] != "wars_table":
                wars[r["faction_id"]] = r["war_id"]
                source[r["faction_id"]] = {"torn_poll": "the Torn API poll",
                                           "operator": "`war set`"}.get(r["source"], r["source"])
    return wars, source, ambiguous


def _rows_sql(shape: Shape, wars: dict[int, int | None]) -> str:
    """Every row of target_calls, normalised, with whether it is active and of today."""
    values = ", ".join(f"({f}, {'NULL' if w is None else w})" for f, w in wars.items())
    cw = f"(VALUES {values}) AS cw(faction_id, war_id)" if values else \
        "(SELECT NULL::bigint AS faction_id, NULL::bigint AS war_id WHERE false) AS cw"
    return f"""
        WITH cw AS (SELECT * FROM {cw}),
        r AS (SELECT t.id::bigint AS id, {shape.faction_sql} AS faction_id, {shape.war_sql} AS war_id,
                     t.target_id::bigint AS target_id, t.caller_id::bigint AS caller_id,
                     ({shape.created_sql})::timestamptz AS created_at, {shape.active_sql} AS active
              FROM target_calls t)
        SELECT r.*, r.war_id IS NULL OR CASE
            WHEN r.faction_id IS NOT NULL THEN coalesce(
                (SELECT cw.war_id IS NOT DISTINCT FROM r.war_id FROM cw
                 WHERE cw.faction_id = r.faction_id), true)
            ELSE NOT EXISTS (SELECT 1 FROM cw) OR EXISTS (SELECT 1 FROM cw WHERE cw.war_id = r.war_id)
            END AS today
        FROM r"""


def _row(r) -> str:
    faction = f"faction {r['faction_id']}" if r["faction_id"] is not None else "no faction"
    when = f", {r['created_at']:%Y-%m-%d %H:%M}" if r["created_at"] else ""
    return (f"id {r['id']} ({faction}, war {r['war_id']}, target {r['target_id']}, "
            f"caller {r['caller_id']}{when})")


async def migrate_report(conn) -> list[str]:
    """What trigger.sql will do to this database: read in a read-only transaction."""
    lines: list[str] = []
    async with conn.transaction(readonly=True):
        shape = await read_shape(conn)
        me = await conn.fetchval("SELECT current_user")
        lines.append(shape.describe())
        if shape.table is None:
            return lines
        t = shape.table
        lines.append(f"rows: {t['total']}; owner {t['owner']}: " + (
            f"you connect as {me}, who may apply trigger.sql" if t["may_alter"] else
            f"you connect as {me}, who may NOT alter it: apply trigger.sql as {t['owner']}"))
        add = [c for c in ADDED_COLUMNS if c not in shape.cols]
        if not shape.created:
            add.append("created_at")
        lines.append("columns trigger.sql adds (nullable, no default: no row is rewritten): "
                     + (", ".join(add) or "none"))
        applied = await conn.fetchval("SELECT to_regclass('torncat_holders') IS NOT NULL")
        if applied:
            lines.append("trigger.sql (this version) was applied here already; what follows is "
                         "what it sees now")
        if shape.wars:
            how = (f"while {shape.wars_flags.replace('w.', '')}" if shape.wars_flags else
                   "never (it has no is_active or ended_at column): use `war set`")
            lines.append(f"wars: table {shape.wars[0]} says a war is current {how}")
        wars, source, ambiguous = await current_wars(conn, shape)
        for f in sorted(f for f in wars if wars[f] is not None):
            lines.append(f"  faction {f}: war {wars[f]} (from {source[f]})")
        peace = sorted(f for f in wars if wars[f] is None)
        if peace:
            lines.append(f"  {len(peace)} more factions at no war: "
                         + ", ".join(map(str, peace[:10])) + (" ..." if len(peace) > 10 else ""))
        if not wars and not ambiguous:
            lines.append("  no faction's current war is known: every call of every war counts "
                         "until the Torn API poll or `war set` says which war is current")
        for a in ambiguous:
            lines.append(f"  {a}: two current wars in the wars table, so its war is NOT known "
                         "and every war's calls count: `torncat_sse.py war set` fixes it")
        rows = _rows_sql(shape, wars)
        shown = await conn.fetch(
            f"SELECT coalesce(faction_id, 0) AS f, count(DISTINCT target_id) AS n FROM ({rows}) x "
            f"WHERE active AND today GROUP BY 1 ORDER BY 1")
        lines.append(f"calls shown after trigger.sql: {sum(r['n'] for r in shown)}" + (
            " (" + ", ".join(f"{'no faction' if r['f'] == 0 else 'faction ' + str(r['f'])}: {r['n']}"
                             for r in shown) + ")" if shown else ""))
        stale = await conn.fetch(f"SELECT * FROM ({rows}) x WHERE active AND NOT today "
                                 f"ORDER BY created_at NULLS FIRST, id")
        per_war: dict[int | None, int] = {}
        for r in stale:
            per_war[r["war_id"]] = per_war.get(r["war_id"], 0) + 1
        lines.append(f"still active in wars that are not current: {len(stale)} rows" + (
            f" over {len(per_war)} wars (" + ", ".join(f"war {w}: {n}" for w, n in per_war.items())
            + "); history to TornCat, left as they are; `migrate --close-leftovers` (after "
            "trigger.sql) ends them as the old tool would" if stale else ""))
        for r in stale[:EXAMPLES]:
            lines.append(f"  e.g. {_row(r)}")
        twice = await conn.fetch(
            f"SELECT coalesce(faction_id, 0) AS f, war_id, target_id, bool_and(today) AS today, "
            f"array_agg(id ORDER BY created_at, id) AS ids, "
            f"array_agg(caller_id ORDER BY created_at, id) AS callers "
            f"FROM ({rows}) x WHERE active GROUP BY 1, 2, 3 HAVING count(*) > 1 ORDER BY 4 DESC, 1, 2, 3")
        now = sum(r["today"] for r in twice)
        lines.append(f"targets held twice or more: {len(twice)} ({now} in current wars, "
                     f"{len(twice) - now} in wars that are not)" + (
                         "; TornCat shows the earliest live row of each, the others wait in line "
                         "and take over when it ends" if twice else ""))
        for r in twice[:EXAMPLES]:
            lines.append(f"  e.g. {'no faction' if r['f'] == 0 else 'faction ' + str(r['f'])}, "
                         f"war {r['war_id']}, target {r['target_id']}: rows "
                         + ", ".join(f"{i} (caller {c})"
                                     for i, c in zip(r["ids"], r["callers"], strict=True)))
        orphans = await conn.fetchval(f"SELECT count(*) FROM ({rows}) x WHERE faction_id IS NULL")
        lines.append(f"rows without a faction: {orphans}" + (
            "; TornCat shows their calls only to SECRET_TOKEN and open access (every "
            "faction), never to faction or member tokens" if orphans else ""))
        if "torncat_made" in shape.cols:
            mine = await conn.fetchval(f"SELECT count(*) FROM target_calls t WHERE t.torncat_made "
                                       f"AND {shape.active_sql}")
            lines.append(f"CALL_TTL_SECONDS expiry: ends only calls TornCat made ({mine} active now)")
        else:
            lines.append("CALL_TTL_SECONDS expiry: ends only calls TornCat makes: none of these rows")
        users = await conn.fetch(
            "SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE r.rolname END AS role, "
            "coalesce(r.rolbypassrls OR r.rolsuper, false) AS bypass, "
            "string_agg(a.privilege_type, ', ' ORDER BY a.privilege_type) AS what "
            "FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a "
            "LEFT JOIN pg_roles r ON r.oid = a.grantee "
            "WHERE c.oid = $1 AND a.grantee <> c.relowner GROUP BY 1, 2 ORDER BY 1", t["oid"])
        locked = [u for u in users if not u["bypass"]]
        if t["rls"]:
            lines.append("row level security on target_calls: ON already; trigger.sql leaves it on")
        elif locked:
            lines.append("row level security on target_calls: off, and trigger.sql leaves it off: "
                         "it would lock out " + "; ".join(f"{u['role']} ({u['what']})" for u in locked))
        else:
            lines.append("row level security on target_calls: off; no other role uses the table, "
                         "so trigger.sql turns it on")
        for u in users:
            if u["bypass"]:
                lines.append(f"  {u['role']} bypasses it ({u['what']})")
        triggers = [r["tgname"] for r in await conn.fetch(
            "SELECT tgname FROM pg_trigger WHERE tgrelid = $1 AND NOT tgisinternal ORDER BY 1",
            t["oid"])]
        lines.append("triggers on target_calls: " + (", ".join(triggers) or "none") +
                     "; trigger.sql (re)creates trg_notify_target_call (the seed's payload on "
                     "channel target_calls, inserts only) and adds trg_torncat_target_calls")
    return lines
