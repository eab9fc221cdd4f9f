-- TornCat SSE: the schema, event log and triggers behind the real-time stream.
--
-- Apply with `psql -v ON_ERROR_STOP=1 "$DATABASE_URL" -f trigger.sql` (without
-- ON_ERROR_STOP psql carries on after an error and still exits 0), or let the server do
-- it (`INIT_DB=1` / `--init-db`, and always for the embedded development database). It
-- runs as one transaction: it applies completely or not at all. Idempotent: run it
-- again any number of times. Run it as the role that owns `target_calls` (on Supabase:
-- `postgres`, which is not a superuser); no superuser right is needed.
-- `python torncat_sse.py migrate --check` says beforehand what it will do to a database.
--
-- Two kinds of database. On a fresh one it creates `target_calls` itself (the seed's
-- four columns plus TornCat's). Usually, though, `target_calls` already belongs to
-- the tool TornCat replaces (C.A.T., docs/operations.md "Migrating"), whose programs
-- keep reading and writing it while players move over. Its exact columns differ from
-- one copy to another: a creation time named `created_at`, `called_at` or both; with
-- or without `status`, `uncalled_at`, `faction_id`, `target_status`; `war_id`
-- referencing one of two `wars` tables. This file never asks which: it reads the
-- catalog once, in the DO block "The shape", and generates from it
--   * the view `torncat_calls`: every row of target_calls with the same typed columns
--     whatever the shape (its creation time, its status or NULL, `active`), which
--     every other statement here reads, so none of them names a column that may be
--     missing;
--   * the three statements that write rows (`torncat_insert_call`, `torncat_end_rows`,
--     `torncat_wars_from_table`), which write or read exactly the columns that exist.
-- Trigger functions touch only `faction_id` and `target_id` of NEW/OLD (which always
-- exist after the ALTER below) and read anything else through to_jsonb().
--
-- What the old tool owns stays as it is:
--   * rows: existing rows keep every original column; TornCat only adds nullable
--     columns. TornCat's automatic endings (CALL_TTL expiry, the Torn poll's
--     hospital/jail/war end) write only rows TornCat made (`torncat_made`).
--   * channel `target_calls`: whoever LISTENs there keeps the seed's payload
--     ({"id", "caller_id", "target_id", "created_at"}) on every INSERT and nothing else
--     (trigger `trg_notify_target_call`). TornCat's own doorbell is `torncat_events`.
--   * privileges: row level security on an existing target_calls that other roles use
--     is left off (a NOTICE says so; docs/operations.md "Row level security" has the
--     step for later). Every table, view, sequence and function TornCat creates has RLS
--     on where it applies and no privilege at all for PUBLIC, `anon` and
--     `authenticated` (Supabase's Data API roles; TRUNCATE, TRIGGER, REFERENCES and
--     EXECUTE included). The trigger on target_calls runs as this file's owner
--     (SECURITY DEFINER), so the old tool's writes as `anon` still log their events.
--
-- The truth, shared with the old tool. A row is an active call while its `status` is
-- 'active' (where that column exists) and it has no `uncalled_at`; any other status
-- ends it (the new status is the uncall's reason), and so does a DELETE. A row is a
-- live call when it is active and of today: its faction's current war (below), or of
-- no war. Changes of other columns (`target_status`, `updated_at`, names) are not
-- calls and send nothing.
--
-- One caller per target. Clients are shown at most one call per faction and target:
-- its holder, kept in `torncat_holders`. The first live row seen holds the target
-- until it stops being live; then the earliest other live row (creation time, then
-- id), if any, takes over and is announced as a `target_call`. So duplicates the old
-- tool writes (it never enforced one caller) wait in line, unseen, and never reach a
-- client twice. The calls API (torncat_call) refuses a target any live row holds,
-- whoever wrote it, deciding under the event lock below, so two callers cannot both
-- win even where history keeps a unique index from being built (there is none: it
-- would make the old tool's own duplicate writes fail).
--
-- Today's war. `torncat_wars` holds each faction's current war as TornCat knows it
-- (war_id NULL: at peace; no row: not known, so every war of that faction counts),
-- from, in this order of authority: the Torn API poll (`torncat_set_war`, factions
-- with a key), the operator (`python torncat_sse.py war set|clear`), and the old
-- tool's `wars` table that `target_calls.war_id` references (`torncat_sync_wars`, run
-- here and by the server every WARS_SYNC_SECONDS): a war is current there while its
-- `is_active` is true and/or its `ended_at` is NULL, whichever columns it has. A
-- faction with two current wars in that table is left unknown (migrate --check says
-- so). Rows without a faction are of today when their war is some faction's current
-- war (or no faction's war is known).
--
-- Ordering under concurrency. A sequence hands out ids in call order, but two
-- transactions can commit in the other order: a client that had seen id 11
-- would then never be sent id 10. So every event is appended while holding one
-- transaction-scoped advisory lock (TORNCAT_EVENT_LOCK below): the second writer
-- waits for the first to commit or roll back before it draws its id. Commit order
-- therefore equals id order, and "everything after id N" is a stable question. The
-- cost: writes that change a call are serialised from the trigger to the end of their
-- transaction, so keep those transactions short (updates of other columns skip it).
-- Lock order, everywhere, so that no two writers wait for each other: the table
-- target_calls, then its rows, then the event lock, then TornCat's own tables. The
-- old tool's writes take them in that order by themselves (row triggers fire at the
-- end of each statement); TornCat's functions lock the rows they will write before
-- they take the event lock. Rows among themselves have no order: the old tool's
-- UPDATE and DELETE lock the rows of a target (it may hold several) in whatever order
-- their scan finds them, so two statements that each lock several of the same rows
-- can deadlock. TornCat's one writer of existing rows, torncat_end_rows, therefore
-- first takes target_calls in SHARE ROW EXCLUSIVE mode: it waits for the writes in
-- progress, and no other write starts until it commits (a few milliseconds; reads go
-- on). Its callers take no lock on target_calls above ACCESS SHARE before it, which
-- would be an upgrade, itself a deadlock. (test_migration.py's race of every writer:
-- without this lock, torncat_uncall and the old tool's multi-row writes deadlocked in
-- about 1 run of 40.)
--
-- The server reads every event from the log: a notification only tells it when to
-- look (any role may NOTIFY, so a payload proves nothing). The payload still carries
-- the event for other listeners; one over NOTIFY's 8000-byte limit (names can hold
-- anything) carries only its id and `"truncated": true`.
--
-- Retention. `SELECT prune_target_call_events(interval '3 days')` deletes older events
-- but always keeps the newest one, so the last event id never goes backwards. The
-- server runs it hourly (EVENT_RETENTION_HOURS). A client that resumes from a pruned id
-- gets a fresh snapshot instead of a replay.

BEGIN;

-- Quiet about the IF EXISTS / IF NOT EXISTS that have nothing to do; warnings and
-- errors still show, and the notice about row level security at the end.
SET LOCAL client_min_messages = warning;

-- The event lock's key (see "Ordering"); also written out in torncat_lock() below.
-- Taken first when target_calls exists, after the table itself: see "Lock order".
DO $$
DECLARE
    owner name;
BEGIN
    IF to_regclass('target_calls') IS NOT NULL THEN
        SELECT pg_get_userbyid(relowner) INTO owner FROM pg_class
        WHERE oid = 'target_calls'::regclass;
        IF NOT pg_has_role(current_user, owner, 'MEMBER') THEN
            RAISE EXCEPTION 'trigger.sql must run as the owner of target_calls (%), not as %',
                owner, current_user
                USING HINT = 'On Supabase: the postgres role (the SQL editor, or the session '
                             'pooler''s connection string)';
        END IF;
        LOCK TABLE target_calls IN ACCESS EXCLUSIVE MODE;
    END IF;
    PERFORM pg_advisory_xact_lock(7402531);
END
$$;

-- ---------------------------------------------------------------------------
-- target_calls: created on a fresh database, completed on an existing one
-- ---------------------------------------------------------------------------

DO $$
BEGIN
    IF to_regclass('target_calls') IS NULL THEN
        CREATE TABLE target_calls (
            id          bigserial PRIMARY KEY,
            caller_id   bigint NOT NULL,
            target_id   bigint NOT NULL,
            created_at  timestamptz NOT NULL DEFAULT now()
        );
        -- TornCat's own table: locked down with the others at the end of this file.
        PERFORM set_config('torncat.created_target_calls', 'yes', true);
    END IF;
    -- A table with no creation time at all: one for new rows, NULL for old ones (a
    -- volatile default in ADD COLUMN would stamp every existing row with now()).
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'target_calls'::regclass
                   AND attname IN ('created_at', 'called_at') AND NOT attisdropped) THEN
        ALTER TABLE target_calls ADD COLUMN created_at timestamptz;
        ALTER TABLE target_calls ALTER COLUMN created_at SET DEFAULT now();
    END IF;
    IF to_regclass('torncat_holders') IS NULL THEN
        -- First run of this version: the holders are filled in quietly below.
        PERFORM set_config('torncat.first_run', 'yes', true);
    END IF;
END
$$;

-- Nullable, no default: existing rows read NULL, and no row is rewritten.
ALTER TABLE target_calls
    ADD COLUMN IF NOT EXISTS faction_id  bigint,
    ADD COLUMN IF NOT EXISTS war_id      bigint,
    ADD COLUMN IF NOT EXISTS caller_name text,
    ADD COLUMN IF NOT EXISTS target_name text,
    ADD COLUMN IF NOT EXISTS uncalled_at timestamptz,
    ADD COLUMN IF NOT EXISTS uncalled_by bigint,
    ADD COLUMN IF NOT EXISTS uncalled_by_name text,
    ADD COLUMN IF NOT EXISTS uncall_reason text,  -- uncalled, forced, expired, hospitalized,
                                                  -- jailed, war_ended (TornCat's endings)
    ADD COLUMN IF NOT EXISTS torncat_made boolean;  -- true: made through TornCat's API

-- Earlier versions of this file: a unique index that would make the old tool's
-- duplicate writes fail, an index on the old liveness rule, and functions that took
-- the table's row type (they read columns a shape may lack).
DROP INDEX IF EXISTS target_calls_one_active_caller;
DROP INDEX IF EXISTS target_calls_active_idx;
DROP FUNCTION IF EXISTS torncat_emit(text, target_calls);
DROP FUNCTION IF EXISTS target_call_json(target_calls);
DROP FUNCTION IF EXISTS torncat_active_call(bigint, bigint);

-- Who holds a target is asked per target, by every write.
CREATE INDEX IF NOT EXISTS torncat_target_calls_target_idx ON target_calls (target_id);

-- ---------------------------------------------------------------------------
-- The event log
-- ---------------------------------------------------------------------------

CREATE TABLE IF NOT EXISTS target_call_events (
    event_id    bigserial PRIMARY KEY,
    event       text NOT NULL,
    call_id     bigint,
    faction_id  bigint,
    data        json NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
-- The poll's `target_status` and `poll_health` events share the log, so they are
-- ordered with the calls and replayed the same way; they belong to no call.
ALTER TABLE target_call_events ALTER COLUMN call_id DROP NOT NULL;
ALTER TABLE target_call_events DROP CONSTRAINT IF EXISTS target_call_events_event_check;
ALTER TABLE target_call_events ADD CONSTRAINT target_call_events_event_check
    CHECK (event IN ('target_call', 'target_uncall', 'target_status', 'poll_health', 'war'));
CREATE INDEX IF NOT EXISTS target_call_events_created_at_idx
    ON target_call_events (created_at);

-- ISO-8601 in UTC with milliseconds, e.g. 2026-11-24T18:41:07.123Z.
CREATE OR REPLACE FUNCTION torncat_iso(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- Append one event to the log and ring TornCat's doorbell (channel torncat_events).
CREATE OR REPLACE FUNCTION torncat_append(kind text, p_call bigint, p_faction bigint, body json)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    TORNCAT_EVENT_LOCK constant bigint := 7402531;  -- see "Ordering" above
    new_id    bigint;
    payload   text;
BEGIN
    PERFORM pg_advisory_xact_lock(TORNCAT_EVENT_LOCK);
    INSERT INTO target_call_events (event, call_id, faction_id, data)
        VALUES (kind, p_call, p_faction, body)
        RETURNING event_id INTO new_id;
    -- ts: when the event was made (seconds since the epoch), for the server's lag metric.
    payload := json_build_object('event_id', new_id, 'event', kind, 'faction_id', p_faction,
                                 'ts', extract(epoch FROM clock_timestamp()),
                                 'data', body)::text;
    IF octet_length(payload) >= 8000 THEN
        payload := json_build_object('event_id', new_id, 'event', kind,
                                     'faction_id', p_faction, 'truncated', true)::text;
    END IF;
    PERFORM pg_notify('torncat_events', payload);
    RETURN new_id;
END
$$;

-- The event lock, for functions that must decide before they write (torncat_call).
CREATE OR REPLACE FUNCTION torncat_lock() RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(7402531)
$$;

-- ---------------------------------------------------------------------------
-- Each faction's current war
-- ---------------------------------------------------------------------------

-- war_id NULL: the faction is at peace; no row: its war is not known. source: who said
-- so ('torn_poll', 'operator', 'wars_table': see "Today's war" above).
CREATE TABLE IF NOT EXISTS torncat_wars (
    faction_id   bigint PRIMARY KEY,
    war_id       bigint,
    opponent_id  bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE torncat_wars ALTER COLUMN war_id DROP NOT NULL;
ALTER TABLE torncat_wars ALTER COLUMN opponent_id DROP NOT NULL;
ALTER TABLE torncat_wars ADD COLUMN IF NOT EXISTS source text NOT NULL DEFAULT 'torn_poll';
ALTER TABLE torncat_wars DROP CONSTRAINT IF EXISTS torncat_wars_source_check;
ALTER TABLE torncat_wars ADD CONSTRAINT torncat_wars_source_check
    CHECK (source IN ('torn_poll', 'operator', 'wars_table'));

-- A faction's current war as its members are told (the `war` event, and the snapshot's
-- `war`): known false when no one says (no row); war_id null when it is at peace;
-- ended_war_id, in an event, the war that ended with this change.
CREATE OR REPLACE FUNCTION torncat_war_json(p_faction bigint, w torncat_wars, p_ended bigint)
RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_build_object('faction_id', p_faction, 'known', w.faction_id IS NOT NULL,
        'war_id', w.war_id, 'opponent_id', w.opponent_id, 'source', w.source,
        'ended_war_id', p_ended, 'updated_at', torncat_iso(coalesce(w.updated_at, now())))
$$;

-- Every change of a faction's war (the poll, the operator, the wars table) is a `war`
-- event to its members, after the calls it ended: the panel says "War over" even when
-- no call was left to end, and shows Call again when the next war starts.
CREATE OR REPLACE FUNCTION torncat_wars_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    ended bigint;
BEGIN
    IF current_setting('torncat.quiet', true) IS NOT DISTINCT FROM 'yes' THEN
        RETURN NULL;  -- the first run: what was there already is not news
    END IF;
    IF TG_OP = 'DELETE' THEN
        PERFORM torncat_append('war', NULL, OLD.faction_id,  -- no longer known; none ended
                               torncat_war_json(OLD.faction_id, NULL, NULL));
        RETURN NULL;
    END IF;
    IF TG_OP = 'UPDATE' THEN
        IF (OLD.war_id, OLD.opponent_id) IS NOT DISTINCT FROM (NEW.war_id, NEW.opponent_id) THEN
            RETURN NULL;  -- who says so changed, not the war
        END IF;
        IF OLD.war_id IS DISTINCT FROM NEW.war_id THEN
            ended := OLD.war_id;
        END IF;
    END IF;
    PERFORM torncat_append('war', NULL, NEW.faction_id,
                           torncat_war_json(NEW.faction_id, NEW, ended));
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS trg_torncat_wars ON torncat_wars;
CREATE TRIGGER trg_torncat_wars AFTER INSERT OR UPDATE OR DELETE ON torncat_wars
    FOR EACH ROW EXECUTE FUNCTION torncat_wars_changed();

-- Whether a call of faction p_faction in war p_war is of today (see "Today's war").
CREATE OR REPLACE FUNCTION torncat_today(p_faction bigint, p_war bigint) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT p_war IS NULL OR CASE
        WHEN p_faction IS NOT NULL THEN coalesce(
            (SELECT w.war_id IS NOT DISTINCT FROM p_war FROM torncat_wars w
             WHERE w.faction_id = p_faction), true)
        ELSE NOT EXISTS (SELECT 1 FROM torncat_wars)
             OR EXISTS (SELECT 1 FROM torncat_wars w WHERE w.war_id = p_war)
    END
$$;

-- ---------------------------------------------------------------------------
-- The shape: a view of target_calls and its writers, generated from the catalog
-- ---------------------------------------------------------------------------

DO $shape$
DECLARE
    tc        constant regclass := 'target_calls'::regclass;
    cols      text[];
    wars      regclass;
    wars_key  text;
    wcols     text[];
    created   text;
    status    text := 'NULL::text';
    active    text := 't.uncalled_at IS NULL';
    ins_cols  text := '';
    ins_vals  text := '';
    end_set   text := '';
    end_del   text := '';
    flags     text[] := '{}';
    sides     text[] := '{}';
    pair      text[];
BEGIN
    SELECT array_agg(attname::text) INTO cols FROM pg_attribute
    WHERE attrelid = tc AND attnum > 0 AND NOT attisdropped;

    -- The creation time: created_at, called_at, or both (created_at first).
    created := CASE
        WHEN cols @> '{created_at,called_at}' THEN 'coalesce(t.created_at, t.called_at)'
        WHEN 'created_at' = ANY (cols) THEN 't.created_at' ELSE 't.called_at' END;
    IF 'status' = ANY (cols) THEN
        status := 't.status::text';
        active := $$t.status::text = 'active' AND t.uncalled_at IS NULL$$;
    END IF;

    EXECUTE format($v$
        CREATE OR REPLACE VIEW torncat_calls AS
        SELECT t.id::bigint AS id, t.faction_id::bigint AS faction_id,
               t.war_id::bigint AS war_id, t.target_id::bigint AS target_id,
               t.caller_id::bigint AS caller_id, t.caller_name::text AS caller_name,
               t.target_name::text AS target_name, (%s)::timestamptz AS created_at,
               %s AS status, t.uncalled_at::timestamptz AS uncalled_at,
               t.uncalled_by::bigint AS uncalled_by, t.uncalled_by_name::text AS uncalled_by_name,
               t.uncall_reason::text AS uncall_reason,
               coalesce(t.torncat_made, false) AS torncat_made,
               coalesce(%s, false) AS active
        FROM target_calls t $v$, created, status, active);

    -- A call made through the API writes what the old tool reads: 'active', its creation
    -- time(s) and updated_at (one of its readers asks for rows updated since a time).
    FOR pair IN SELECT ARRAY[c, v] FROM (VALUES ('status', $$'active'$$),
            ('created_at', 'now()'), ('called_at', 'now()'), ('updated_at', 'now()')) AS x(c, v)
            WHERE c = ANY (cols) LOOP
        ins_cols := ins_cols || ', ' || pair[1];
        ins_vals := ins_vals || ', ' || pair[2];
    END LOOP;
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION torncat_insert_call(p_faction bigint, p_war bigint,
            p_target bigint, p_target_name text, p_caller bigint, p_caller_name text)
        RETURNS bigint LANGUAGE sql AS $b$
            INSERT INTO target_calls (faction_id, war_id, target_id, target_name, caller_id,
                                      caller_name, torncat_made%s)
            VALUES (p_faction, p_war, p_target, p_target_name, p_caller, p_caller_name,
                    true%s)
            RETURNING id::bigint
        $b$ $f$, ins_cols, ins_vals);

    -- An uncall writes what the old tool reads too: status 'uncalled' with uncalled_at
    -- (as its own automatic uncall does), and updated_at. Where there is no status and
    -- other roles use the table, the only uncall their programs can see is a DELETE: the
    -- row is ended (logged, with its reason), then deleted.
    IF 'status' = ANY (cols) THEN end_set := end_set || $$, status = 'uncalled'$$; END IF;
    IF 'updated_at' = ANY (cols) THEN end_set := end_set || ', updated_at = now()'; END IF;
    IF NOT 'status' = ANY (cols) AND current_setting('torncat.created_target_calls', true)
            IS DISTINCT FROM 'yes' AND EXISTS (
            SELECT 1 FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
            LEFT JOIN pg_roles r ON r.oid = a.grantee
            WHERE c.oid = tc AND a.grantee <> c.relowner
              AND (a.grantee = 0 OR NOT (r.rolbypassrls OR r.rolsuper))) THEN
        -- (rows this transaction has just ended, and therefore holds locked already)
        end_del := 'DELETE FROM target_calls t WHERE t.id = ANY (p_ids) AND t.uncalled_at = now();';
    END IF;
    -- Each row its own reason. One UPDATE: every row it writes is locked before its
    -- trigger takes the event lock, and no other write of target_calls runs meanwhile
    -- (see "Lock order").
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION torncat_end_rows(p_ids bigint[], p_reasons text[],
                                                    p_by bigint, p_by_name text)
        RETURNS bigint LANGUAGE plpgsql AS $b$
        DECLARE
            n bigint;
        BEGIN
            IF cardinality(p_ids) = 0 THEN
                RETURN 0;  -- (the expiry's usual case: no lock taken)
            END IF;
            LOCK TABLE target_calls IN SHARE ROW EXCLUSIVE MODE;
            UPDATE target_calls t SET uncalled_at = now(), uncall_reason = d.reason,
                uncalled_by = p_by, uncalled_by_name = p_by_name%s
            FROM unnest(p_ids, p_reasons) AS d(id, reason)
            WHERE t.id = d.id AND %s;
            GET DIAGNOSTICS n = ROW_COUNT;
            %s
            RETURN n;
        END
        $b$ $f$, end_set, active, end_del);

    -- The old tool's wars: the table war_id references, and which of its wars are current.
    SELECT c.confrelid::regclass, a.attname INTO wars, wars_key
    FROM pg_constraint c
    JOIN pg_attribute a ON a.attrelid = c.confrelid AND a.attnum = c.confkey[1]
    WHERE c.conrelid = tc AND c.contype = 'f' AND cardinality(c.conkey) = 1
      AND c.conkey[1] = (SELECT attnum FROM pg_attribute
                         WHERE attrelid = tc AND attname = 'war_id' AND NOT attisdropped)
    LIMIT 1;
    IF wars IS NOT NULL THEN
        SELECT array_agg(attname::text) INTO wcols FROM pg_attribute
        WHERE attrelid = wars AND attnum > 0 AND NOT attisdropped;
        IF 'is_active' = ANY (wcols) THEN flags := flags || 'w.is_active IS TRUE'::text; END IF;
        IF 'ended_at' = ANY (wcols) THEN flags := flags || 'w.ended_at IS NULL'::text; END IF;
        -- Each side a row names, with its opponent (both sides where the row names two).
        FOR pair IN SELECT ARRAY[f, o] FROM (VALUES ('faction_id', 'enemy_faction_id'),
                ('faction_a_id', 'faction_b_id'), ('faction_b_id', 'faction_a_id'),
                ('attacker_faction_id', 'defender_faction_id'),
                ('defender_faction_id', 'attacker_faction_id')) AS x(f, o)
                WHERE f = ANY (wcols) LOOP
            sides := sides || format('SELECT w.%I::bigint AS faction_id, w.%I::bigint AS war_id, '
                '%s AS opponent_id, (%s) AS is_current FROM %s w', pair[1], wars_key,
                CASE WHEN pair[2] = ANY (wcols) THEN format('w.%I::bigint', pair[2])
                     ELSE 'NULL::bigint' END,
                array_to_string(flags, ' AND '), wars);
        END LOOP;
    END IF;
    IF cardinality(flags) = 0 OR cardinality(sides) = 0 THEN
        -- No wars table, or none that says which war is current: nothing to learn there.
        sides := ARRAY['SELECT NULL::bigint AS faction_id, NULL::bigint AS war_id, '
                       'NULL::bigint AS opponent_id, false AS is_current WHERE false'];
    END IF;
    -- (faction, its current war, opponent, how many wars the table calls current for it)
    EXECUTE format($f$
        CREATE OR REPLACE FUNCTION torncat_wars_from_table()
        RETURNS TABLE (faction_id bigint, war_id bigint, opponent_id bigint, current_wars integer)
        LANGUAGE sql STABLE AS $b$
            SELECT s.faction_id, min(s.war_id) FILTER (WHERE s.is_current),
                   min(s.opponent_id) FILTER (WHERE s.is_current),
                   (count(*) FILTER (WHERE s.is_current))::integer
            FROM (%s) s WHERE s.faction_id IS NOT NULL GROUP BY s.faction_id
        $b$ $f$, array_to_string(sides, ' UNION ALL '));
END
$shape$;

-- The same, with one reason for every row.
CREATE OR REPLACE FUNCTION torncat_end_rows(p_ids bigint[], p_reason text, p_by bigint,
                                            p_by_name text)
RETURNS bigint LANGUAGE sql AS $$
    SELECT torncat_end_rows(p_ids, array_fill(p_reason, ARRAY[cardinality(p_ids)]), p_by,
                            p_by_name)
$$;

CREATE OR REPLACE VIEW torncat_live_calls AS
    SELECT c.* FROM torncat_calls c WHERE c.active AND torncat_today(c.faction_id, c.war_id);

-- ---------------------------------------------------------------------------
-- Who holds each target, as clients are shown it
-- ---------------------------------------------------------------------------

-- One row per faction (0: calls without one) and target: the call clients were last
-- shown as holding it, exactly as they were shown it. The server's snapshot is this.
CREATE TABLE IF NOT EXISTS torncat_holders (
    faction_key  bigint NOT NULL,
    target_id    bigint NOT NULL,
    call_id      bigint NOT NULL,
    caller_id    bigint,
    data         json NOT NULL,
    PRIMARY KEY (faction_key, target_id)
);

-- A call as clients see it: the seed's fields first, then the new ones.
CREATE OR REPLACE FUNCTION torncat_call_json(c torncat_calls) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id',          c.id,
        'caller_id',   c.caller_id,
        'target_id',   c.target_id,
        'created_at',  torncat_iso(c.created_at),
        'faction_id',  c.faction_id,
        'war_id',      c.war_id,
        'caller_name', c.caller_name,
        'target_name', c.target_name,
        'uncalled_at', torncat_iso(c.uncalled_at),
        'uncalled_by', c.uncalled_by,
        'uncalled_by_name', c.uncalled_by_name,
        'uncall_reason', c.uncall_reason)
$$;

-- A shown call that ended: as it was shown, with when, by whom (if the row still says)
-- and why.
CREATE OR REPLACE FUNCTION torncat_ended_json(shown json, c torncat_calls, reason text)
RETURNS json LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'id', shown->'id', 'caller_id', shown->'caller_id', 'target_id', shown->'target_id',
        'created_at', shown->'created_at', 'faction_id', shown->'faction_id',
        'war_id', shown->'war_id', 'caller_name', shown->'caller_name',
        'target_name', shown->'target_name',
        'uncalled_at', torncat_iso(coalesce(c.uncalled_at, now())),
        'uncalled_by', c.uncalled_by, 'uncalled_by_name', c.uncalled_by_name,
        'uncall_reason', reason)
$$;

-- Bring what clients are shown for one faction and target in line with the table:
-- announce the end of a holder that is no longer live (why: the uncall's own reason or
-- the new status, 'deleted', 'moved', or 'war_ended' when its war is no longer today's)
-- and the next holder, if any. A row without a faction holds its target for every
-- faction (see torncat_holding), so a live row waits while another faction's holder, or
-- one without a faction, holds the target, and a holder that ends lets those waiting in
-- the other groups take it. Announces nothing while torncat.quiet is 'yes' (the first
-- run of this file). Returns 1 when a shown holder ended.
CREATE OR REPLACE FUNCTION torncat_reconcile(p_key bigint, p_target bigint,
                                             p_cascade boolean DEFAULT true)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    h       torncat_holders;
    c       torncat_calls;
    reason  text;
    ended   integer := 0;
    quiet   constant boolean := current_setting('torncat.quiet', true) IS NOT DISTINCT FROM 'yes';
    other   bigint;
BEGIN
    PERFORM torncat_lock();  -- before reading: the state read is the state written
    SELECT * INTO h FROM torncat_holders WHERE faction_key = p_key AND target_id = p_target;
    IF FOUND THEN
        SELECT * INTO c FROM torncat_calls WHERE id = h.call_id;
        IF NOT FOUND THEN
            reason := 'deleted';
        ELSIF NOT c.active THEN
            reason := coalesce(c.uncall_reason, c.status, 'uncalled');
        ELSIF coalesce(c.faction_id, 0) <> p_key OR c.target_id <> p_target THEN
            reason := 'moved';
        ELSIF NOT torncat_today(c.faction_id, c.war_id) THEN
            reason := 'war_ended';
        ELSE
            IF c.caller_id IS DISTINCT FROM h.caller_id THEN  -- the row changed hands
                UPDATE torncat_holders SET caller_id = c.caller_id, data = torncat_call_json(c)
                WHERE faction_key = p_key AND target_id = p_target;
                IF NOT quiet THEN
                    PERFORM torncat_append('target_call', c.id, nullif(p_key, 0),
                                           torncat_call_json(c));
                END IF;
            END IF;
            RETURN 0;
        END IF;
        DELETE FROM torncat_holders WHERE faction_key = p_key AND target_id = p_target;
        IF NOT quiet THEN
            PERFORM torncat_append('target_uncall', h.call_id, nullif(p_key, 0),
                                   torncat_ended_json(h.data, c, reason));
        END IF;
        ended := 1;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM torncat_holders x WHERE x.target_id = p_target
                   AND x.faction_key <> p_key AND (p_key = 0 OR x.faction_key = 0)) THEN
        SELECT * INTO c FROM torncat_live_calls l
        WHERE l.target_id = p_target AND coalesce(l.faction_id, 0) = p_key
        ORDER BY l.created_at, l.id LIMIT 1;
        IF FOUND THEN
            INSERT INTO torncat_holders VALUES (p_key, p_target, c.id, c.caller_id,
                                                torncat_call_json(c));
            IF NOT quiet THEN
                PERFORM torncat_append('target_call', c.id, nullif(p_key, 0), torncat_call_json(c));
            END IF;
            RETURN ended;
        END IF;
    END IF;
    IF ended = 1 AND p_cascade THEN  -- the target is free here: those waiting elsewhere
        FOR other IN SELECT DISTINCT coalesce(l.faction_id, 0) FROM torncat_live_calls l
                     WHERE l.target_id = p_target AND coalesce(l.faction_id, 0) <> p_key
                       AND (p_key = 0 OR coalesce(l.faction_id, 0) = 0)
                     ORDER BY 1 LOOP
            PERFORM torncat_reconcile(other, p_target, false);
        END LOOP;
    END IF;
    RETURN ended;
END
$$;

-- Every target of a faction, and those of calls without a faction (whose today depends
-- on every faction's war): after a faction's war changed; every target of every faction
-- with p_all. Returns the holders ended.
CREATE OR REPLACE FUNCTION torncat_reconcile_targets(p_all boolean, p_faction bigint)
RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    g      record;
    ended  integer := 0;
BEGIN
    FOR g IN SELECT h.faction_key AS k, h.target_id AS t FROM torncat_holders h
             WHERE p_all OR h.faction_key IN (coalesce(p_faction, 0), 0)
             UNION
             SELECT coalesce(c.faction_id, 0), c.target_id FROM torncat_calls c
             WHERE c.active AND (p_all OR coalesce(c.faction_id, 0) IN (coalesce(p_faction, 0), 0))
             ORDER BY 1, 2 LOOP
        ended := ended + torncat_reconcile(g.k, g.t);
    END LOOP;
    RETURN ended;
END
$$;

CREATE OR REPLACE FUNCTION torncat_reconcile_faction(p_faction bigint) RETURNS integer
LANGUAGE sql AS $$ SELECT torncat_reconcile_targets(false, p_faction) $$;

CREATE OR REPLACE FUNCTION torncat_reconcile_all() RETURNS integer
LANGUAGE sql AS $$ SELECT torncat_reconcile_targets(true, NULL) $$;

-- ---------------------------------------------------------------------------
-- The triggers on target_calls
-- ---------------------------------------------------------------------------

-- Every change of a row that may change who holds a target. Runs as this file's owner
-- (SECURITY DEFINER, with a fixed search_path set below), so that a write by any role
-- that may write target_calls (the old tool writes as `anon`) logs its events, while
-- no such role may touch the log itself.
CREATE OR REPLACE FUNCTION torncat_target_calls_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND (to_jsonb(OLD)->'status', OLD.uncalled_at, OLD.faction_id,
                             OLD.target_id, OLD.war_id, OLD.caller_id)
            IS NOT DISTINCT FROM (to_jsonb(NEW)->'status', NEW.uncalled_at, NEW.faction_id,
                                  NEW.target_id, NEW.war_id, NEW.caller_id) THEN
        RETURN NULL;  -- target_status, updated_at, names...: not a call, no lock, no event
    END IF;
    IF TG_OP <> 'INSERT' THEN
        PERFORM torncat_reconcile(coalesce(OLD.faction_id, 0), OLD.target_id);
    END IF;
    IF TG_OP = 'INSERT' OR (TG_OP = 'UPDATE' AND (coalesce(NEW.faction_id, 0), NEW.target_id)
            IS DISTINCT FROM (coalesce(OLD.faction_id, 0), OLD.target_id)) THEN
        PERFORM torncat_reconcile(coalesce(NEW.faction_id, 0), NEW.target_id);
    END IF;
    RETURN NULL;  -- AFTER trigger: the return value is ignored
END
$$;

-- TRUNCATE fires no row trigger: every shown holder ends ('deleted').
CREATE OR REPLACE FUNCTION torncat_target_calls_truncated() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    PERFORM torncat_reconcile_all();
    RETURN NULL;
END
$$;

DO $$
BEGIN
    -- The search_path of the definer functions: this schema only, then pg_temp last,
    -- so no other role's objects are ever resolved in them.
    EXECUTE format('ALTER FUNCTION torncat_target_calls_changed() SET search_path = %I, pg_temp',
                   current_schema());
    EXECUTE format('ALTER FUNCTION torncat_target_calls_truncated() SET search_path = %I, pg_temp',
                   current_schema());
END
$$;

DROP TRIGGER IF EXISTS trg_torncat_target_calls ON target_calls;
CREATE TRIGGER trg_torncat_target_calls
    AFTER INSERT OR UPDATE OR DELETE ON target_calls
    FOR EACH ROW EXECUTE FUNCTION torncat_target_calls_changed();
DROP TRIGGER IF EXISTS trg_torncat_target_calls_truncate ON target_calls;
CREATE TRIGGER trg_torncat_target_calls_truncate
    AFTER TRUNCATE ON target_calls
    FOR EACH STATEMENT EXECUTE FUNCTION torncat_target_calls_truncated();

-- The seed's trigger (step 1 of the seed document), under the seed's names, with the
-- seed's payload on every INSERT, byte for byte, for whatever listens on channel
-- `target_calls`. Only its creation time is read by name-independent means, so it also
-- works where that column is `called_at` (where the seed's own function failed every
-- insert).
CREATE OR REPLACE FUNCTION notify_target_call() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    r jsonb := to_jsonb(NEW);
BEGIN
    PERFORM pg_notify('target_calls', json_build_object(
        'id', NEW.id, 'caller_id', NEW.caller_id, 'target_id', NEW.target_id,
        'created_at', to_char(coalesce(r->>'created_at', r->>'called_at')::timestamptz,
                              'YYYY-MM-DD"T"HH24:MI:SSZ'))::text);
    RETURN NEW;
END
$$;

DROP TRIGGER IF EXISTS trg_notify_target_call ON target_calls;
CREATE TRIGGER trg_notify_target_call
    AFTER INSERT ON target_calls
    FOR EACH ROW EXECUTE FUNCTION notify_target_call();

-- ---------------------------------------------------------------------------
-- The calls API. Each returns (status, event_id, call): `call` is the call as clients
-- see it, `event_id` the event this write produced (NULL if none).
-- ---------------------------------------------------------------------------

-- The live call that keeps faction p_faction from calling p_target, if any: the
-- faction's own shown holder first, then any live row on the target in the faction or
-- without one (a row without a faction holds the target for every faction: in a
-- ranked war a target is called from one side only).
CREATE OR REPLACE FUNCTION torncat_holding(p_faction bigint, p_target bigint)
RETURNS SETOF torncat_calls LANGUAGE sql STABLE AS $$
    SELECT l.id, l.faction_id, l.war_id, l.target_id, l.caller_id, l.caller_name,
           l.target_name, l.created_at, l.status, l.uncalled_at, l.uncalled_by,
           l.uncalled_by_name, l.uncall_reason, l.torncat_made, l.active
    FROM torncat_live_calls l
    LEFT JOIN torncat_holders h ON h.call_id = l.id
    WHERE l.target_id = p_target
      AND (coalesce(l.faction_id, 0) = coalesce(p_faction, 0) OR l.faction_id IS NULL
           OR p_faction IS NULL)
    ORDER BY coalesce(l.faction_id, 0) = coalesce(p_faction, 0) DESC, h.call_id IS NULL,
             l.created_at, l.id
    LIMIT 1
$$;

-- Call a target: 'called'; 'yours' when the same caller holds it already (a retry of a
-- call whose answer was lost, so retrying never adds a row); 'taken' with the call that
-- holds it; 'not_current_war' when p_war is not the faction's current war (the call
-- would be history at once); 'unknown_war' when the war_id foreign key refuses it;
-- 'refused' (call = {"column": ...}) when the table requires a column the call lacks.
-- A call without a war belongs to the faction's current war.
CREATE OR REPLACE FUNCTION torncat_call(p_faction bigint, p_war bigint, p_target bigint,
                                        p_target_name text, p_caller bigint, p_caller_name text)
RETURNS TABLE (status text, event_id bigint, call json)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c        torncat_calls;
    war      bigint;
    known    boolean := false;
    new_id   bigint;
    detail   text;
BEGIN
    LOCK TABLE target_calls IN ROW EXCLUSIVE MODE;  -- see "Lock order"
    PERFORM torncat_lock();  -- decide and write as one: racing callers cannot both win
    SELECT w.war_id, true INTO war, known FROM torncat_wars w WHERE w.faction_id = p_faction;
    IF p_war IS NOT NULL AND known AND p_war IS DISTINCT FROM war THEN
        RETURN QUERY SELECT 'not_current_war'::text, NULL::bigint,
            json_build_object('war_id', p_war, 'current_war_id', war);
        RETURN;
    END IF;
    war := coalesce(p_war, war);
    SELECT * INTO c FROM torncat_holding(p_faction, p_target);
    IF FOUND THEN
        RETURN QUERY SELECT CASE WHEN c.caller_id = p_caller THEN 'yours' ELSE 'taken' END,
            NULL::bigint, torncat_call_json(c);
        RETURN;
    END IF;
    BEGIN
        new_id := torncat_insert_call(p_faction, war, p_target, p_target_name, p_caller,
                                      p_caller_name);
    EXCEPTION
        WHEN foreign_key_violation THEN
            GET STACKED DIAGNOSTICS detail = CONSTRAINT_NAME;
            IF EXISTS (SELECT 1 FROM pg_constraint k JOIN pg_attribute a
                       ON a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey)
                       WHERE k.conname = detail AND k.conrelid = 'target_calls'::regclass
                         AND a.attname = 'war_id') THEN
                RETURN QUERY SELECT 'unknown_war'::text, NULL::bigint,
                    json_build_object('war_id', war);
                RETURN;
            END IF;
            RAISE;
        WHEN not_null_violation THEN
            GET STACKED DIAGNOSTICS detail = COLUMN_NAME;
            RETURN QUERY SELECT 'refused'::text, NULL::bigint, json_build_object('column', detail);
            RETURN;
    END;
    SELECT * INTO c FROM torncat_calls WHERE id = new_id;
    RETURN QUERY SELECT 'called'::text,
        CASE WHEN EXISTS (SELECT 1 FROM torncat_holders h WHERE h.call_id = new_id)
             THEN currval(pg_get_serial_sequence('target_call_events', 'event_id')) END,
        torncat_call_json(c);
END
$$;

-- Uncall a target: 'uncalled'; 'not_yours' (with the holder's call) when another member
-- holds it and p_force is false; 'not_called' when nobody in the faction holds it. Ends
-- every live row of the holder's caller on the target (an old tool's duplicates too);
-- another caller's duplicate, if any, then holds it.
CREATE OR REPLACE FUNCTION torncat_uncall(p_faction bigint, p_target bigint, p_by bigint,
                                          p_by_name text, p_force boolean)
RETURNS TABLE (status text, event_id bigint, call json)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    h       torncat_holders;
    ids     bigint[];
    before  bigint;
BEGIN
    FOR attempt IN 1..3 LOOP
        SELECT * INTO h FROM torncat_holders
        WHERE faction_key = coalesce(p_faction, 0) AND target_id = p_target;
        IF NOT FOUND THEN
            RETURN QUERY SELECT 'not_called'::text, NULL::bigint, NULL::json;
            RETURN;
        END IF;
        IF h.caller_id IS DISTINCT FROM p_by AND NOT p_force THEN
            RETURN QUERY SELECT 'not_yours'::text, NULL::bigint, h.data;
            RETURN;
        END IF;
        -- One UPDATE: its rows are locked before its trigger takes the event lock. When it
        -- wrote nothing (the holder ended in between), no lock is held: look again.
        before := (SELECT coalesce(max(event_id), 0) FROM target_call_events);
        ids := ARRAY(SELECT l.id FROM torncat_live_calls l
                     WHERE l.target_id = p_target AND coalesce(l.faction_id, 0) = h.faction_key
                       AND (l.id = h.call_id OR l.caller_id = h.caller_id));
        IF torncat_end_rows(ids, CASE WHEN h.caller_id = p_by THEN 'uncalled' ELSE 'forced' END,
                            p_by, p_by_name) > 0 THEN
            RETURN QUERY SELECT 'uncalled'::text, e.event_id, e.data
                FROM (SELECT e.event_id, e.data FROM target_call_events e
                      WHERE e.event_id > before AND e.call_id = ANY (ids)
                        AND e.event = 'target_uncall'
                      ORDER BY e.event_id LIMIT 1) e
                UNION ALL SELECT 'uncalled'::text, NULL::bigint, h.data
                LIMIT 1;
            RETURN;
        END IF;
        -- The holder ended in between (or was not really live): look again.
    END LOOP;
    RAISE EXCEPTION 'target % keeps changing hands', p_target;
END
$$;

-- Uncall every call TornCat made that is older than `ttl`, with reason 'expired'. Only
-- TornCat's own: another program's rows are its own to end. Row locks make this
-- exactly-once when several servers run it at the same moment: the second UPDATE
-- re-checks that the row is still active after the first commits, and skips it.
CREATE OR REPLACE FUNCTION torncat_expire_calls(ttl interval) RETURNS bigint
LANGUAGE sql AS $$
    SELECT torncat_end_rows(ARRAY(
        SELECT c.id FROM torncat_calls c
        WHERE c.active AND c.torncat_made AND c.created_at < now() - ttl), 'expired', NULL, NULL)
$$;

-- End TornCat's active calls of a faction on a target for a reason of the poll's
-- (uncalled_by NULL). Exactly once, as torncat_expire_calls.
CREATE OR REPLACE FUNCTION torncat_end_call(p_faction bigint, p_target bigint, p_reason text)
RETURNS bigint LANGUAGE sql AS $$
    SELECT torncat_end_rows(ARRAY(
        SELECT c.id FROM torncat_calls c
        WHERE coalesce(c.faction_id, 0) = coalesce(p_faction, 0) AND c.target_id = p_target
          AND c.active AND c.torncat_made), p_reason, NULL, NULL)
$$;

-- A faction's current war is p_war (NULL: none), as the Torn poll (or, with p_source
-- 'operator', the operator) says. TornCat's own calls of other wars end with reason
-- 'war_ended', and so, once the war known before has ended, do TornCat's calls made
-- before it was known (war_id NULL): a call belongs to the war it was made in. Other
-- programs' rows of other wars stop being live, untouched. Returns how many shown calls
-- ended.
CREATE OR REPLACE FUNCTION torncat_set_war(p_faction bigint, p_war bigint, p_opponent bigint,
                                           p_source text DEFAULT 'torn_poll')
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    had      bigint;  -- the war known before (NULL: none, or not known)
    written  bigint;
    ended    bigint;
BEGIN
    -- (No lock here: torncat_wars is written under the event lock, below.)
    SELECT w.war_id INTO had FROM torncat_wars w WHERE w.faction_id = p_faction;
    written := torncat_end_rows(ARRAY(
        SELECT c.id FROM torncat_calls c
        WHERE c.faction_id = p_faction AND c.active AND c.torncat_made
          AND CASE WHEN c.war_id IS NULL THEN had IS NOT NULL AND had IS DISTINCT FROM p_war
                   ELSE c.war_id IS DISTINCT FROM p_war END), 'war_ended', NULL, NULL);
    PERFORM torncat_lock();
    INSERT INTO torncat_wars (faction_id, war_id, opponent_id, source)
        VALUES (p_faction, p_war, p_opponent, p_source)
    ON CONFLICT (faction_id) DO UPDATE SET war_id = excluded.war_id,
        opponent_id = excluded.opponent_id, source = excluded.source, updated_at = now()
    WHERE (torncat_wars.war_id, torncat_wars.opponent_id, torncat_wars.source)
          IS DISTINCT FROM (excluded.war_id, excluded.opponent_id, excluded.source);
    ended := torncat_reconcile_faction(p_faction);
    RETURN written + ended;
END
$$;

-- Forget a faction's war (`war clear`): back to the wars table, or unknown.
CREATE OR REPLACE FUNCTION torncat_clear_war(p_faction bigint) RETURNS bigint
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM torncat_lock();
    DELETE FROM torncat_wars WHERE faction_id = p_faction;
    RETURN torncat_sync_wars() + torncat_reconcile_faction(p_faction);
END
$$;

-- Learn current wars from the old tool's wars table, for the factions that neither the
-- Torn poll nor the operator speaks for. Returns how many factions changed.
CREATE OR REPLACE FUNCTION torncat_sync_wars(p_reconcile boolean DEFAULT true)
RETURNS integer LANGUAGE plpgsql AS $$
DECLARE
    r        record;
    cur      torncat_wars;
    known    boolean;
    changed  boolean;
    n        integer := 0;
BEGIN
    PERFORM torncat_lock();
    FOR r IN SELECT * FROM torncat_wars_from_table() t ORDER BY t.faction_id LOOP
        SELECT * INTO cur FROM torncat_wars w WHERE w.faction_id = r.faction_id;
        known := FOUND;
        IF known AND cur.source <> 'wars_table' THEN
            CONTINUE;
        END IF;
        changed := false;
        IF r.current_wars > 1 THEN  -- two current wars: not known
            IF known THEN
                DELETE FROM torncat_wars w WHERE w.faction_id = r.faction_id;
                changed := true;
            END IF;
        ELSIF NOT known OR (cur.war_id, cur.opponent_id)
                IS DISTINCT FROM (r.war_id, r.opponent_id) THEN
            INSERT INTO torncat_wars (faction_id, war_id, opponent_id, source)
                VALUES (r.faction_id, r.war_id, r.opponent_id, 'wars_table')
            ON CONFLICT (faction_id) DO UPDATE SET war_id = excluded.war_id,
                opponent_id = excluded.opponent_id, updated_at = now();
            changed := true;
        END IF;
        IF changed THEN
            n := n + 1;
            IF p_reconcile THEN
                PERFORM torncat_reconcile_faction(r.faction_id);
            END IF;
        END IF;
    END LOOP;
    FOR r IN DELETE FROM torncat_wars w WHERE w.source = 'wars_table' AND NOT EXISTS (
                 SELECT 1 FROM torncat_wars_from_table() t WHERE t.faction_id = w.faction_id)
             RETURNING w.faction_id LOOP
        n := n + 1;
        IF p_reconcile THEN
            PERFORM torncat_reconcile_faction(r.faction_id);
        END IF;
    END LOOP;
    RETURN n;
END
$$;

-- Rows the old tool left active in wars that are not today's (history to the stream):
-- what `torncat_sse.py migrate --close-leftovers` ends, writing what the old tool reads
-- (status 'uncalled', uncalled_at, updated_at) with reason 'war_ended'.
CREATE OR REPLACE VIEW torncat_leftovers AS
    SELECT c.* FROM torncat_calls c
    WHERE c.active AND NOT torncat_today(c.faction_id, c.war_id);

CREATE OR REPLACE FUNCTION torncat_close_leftovers() RETURNS bigint
LANGUAGE sql AS $$
    SELECT torncat_end_rows(ARRAY(SELECT id FROM torncat_leftovers), 'war_ended', NULL, NULL)
$$;

-- ---------------------------------------------------------------------------
-- Tokens
-- ---------------------------------------------------------------------------

-- Faction tokens. Only SHA-256 digests are stored; the plain token is shown once
-- by `python torncat_sse.py token create`. Any change NOTIFYs the servers, which
-- reload the list and close the streams of revoked tokens.
CREATE TABLE IF NOT EXISTS torncat_tokens (
    id            bigserial PRIMARY KEY,
    faction_id    bigint NOT NULL CHECK (faction_id > 0),
    label         text NOT NULL DEFAULT '',
    token_sha256  bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);

-- Member tokens live in the same table: one digest index, one NOTIFY, one `token
-- list|revoke` for both kinds. A member token names its player (every write made with
-- it is theirs) and ends at expires_at (MEMBER_TOKEN_DAYS after sign-in).
ALTER TABLE torncat_tokens
    ADD COLUMN IF NOT EXISTS kind        text NOT NULL DEFAULT 'faction',
    ADD COLUMN IF NOT EXISTS player_id   bigint,
    ADD COLUMN IF NOT EXISTS player_name text,
    ADD COLUMN IF NOT EXISTS expires_at  timestamptz;

DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'torncat_tokens_kind_check') THEN
        ALTER TABLE torncat_tokens ADD CONSTRAINT torncat_tokens_kind_check CHECK (
            (kind = 'faction' AND player_id IS NULL)
            OR (kind = 'member' AND player_id > 0 AND expires_at IS NOT NULL));
    END IF;
END
$$;

-- Why a member token was revoked, for the 401 its player gets: NULL when the operator
-- revoked it (`token revoke`), 'left_faction' when the poll found the player gone.
ALTER TABLE torncat_tokens ADD COLUMN IF NOT EXISTS revoked_reason text;

-- Cutting off the players who left a faction reads that faction's member tokens.
CREATE INDEX IF NOT EXISTS torncat_tokens_members_idx
    ON torncat_tokens (faction_id, player_id) WHERE kind = 'member' AND revoked_at IS NULL;

-- A player's valid member tokens: capped at each sign-in (MEMBER_TOKENS_PER_PLAYER, the
-- oldest revoked), and revoked in every other faction once Torn shows the player in a new one.
CREATE INDEX IF NOT EXISTS torncat_tokens_player_idx
    ON torncat_tokens (player_id) WHERE kind = 'member' AND revoked_at IS NULL;

CREATE OR REPLACE FUNCTION torncat_tokens_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('torncat_tokens', '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS trg_torncat_tokens_changed ON torncat_tokens;
CREATE TRIGGER trg_torncat_tokens_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON torncat_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION torncat_tokens_changed();

-- Delete events older than `keep`, always keeping the newest. Returns the count.
CREATE OR REPLACE FUNCTION prune_target_call_events(keep interval DEFAULT interval '3 days')
RETURNS bigint LANGUAGE sql AS $$
    WITH gone AS (
        DELETE FROM target_call_events
        WHERE created_at < now() - keep
          AND event_id < (SELECT max(event_id) FROM target_call_events)
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- ---------------------------------------------------------------------------
-- The central Torn API poll (issue 14)
-- ---------------------------------------------------------------------------

-- The poll's own health per faction, as its members should see it: 'ok', 'stale' (Torn
-- down or slow for POLL_STALE_ROUNDS polls in a row: statuses are as of `since`) or
-- 'key_refused' (Torn refused a key of the faction, which is disabled). Only the process
-- holding the poll lock knows it; written here, and appended to the event log as a
-- `poll_health` event, only when it changes (torncat_set_poll_health).
CREATE TABLE IF NOT EXISTS torncat_poll_health (
    faction_id     bigint PRIMARY KEY,
    state          text NOT NULL CHECK (state IN ('ok', 'stale', 'key_refused')),
    reason         text,
    since          timestamptz,    -- stale: the last successful poll (or the first failure)
    last_success   timestamptz,
    failures       integer NOT NULL DEFAULT 0,  -- polls failed in a row
    disabled_keys  integer NOT NULL DEFAULT 0,
    error_code     integer,        -- Torn's error code of the last failure; NULL: no answer
    updated_at     timestamptz NOT NULL DEFAULT now()
);

-- Each enemy's last known status, per watching faction: what the snapshot carries, and
-- what a change is measured against.
CREATE TABLE IF NOT EXISTS torncat_target_status (
    faction_id   bigint NOT NULL,
    target_id    bigint NOT NULL,
    war_id       bigint,
    target_name  text,
    state        text NOT NULL,
    until        bigint,          -- Torn's status.until (seconds since the epoch) or NULL
    description  text NOT NULL DEFAULT '',
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (faction_id, target_id)
);

-- Torn API keys for the poll: the operator's (`torncat_sse.py torn-key add`) and those
-- members lend at sign-in. Stored in clear because the poll must send them; no role but
-- the owner (and BYPASSRLS roles) may read them, and the server never logs or returns them.
CREATE TABLE IF NOT EXISTS torncat_torn_keys (
    id           bigserial PRIMARY KEY,
    faction_id   bigint NOT NULL CHECK (faction_id > 0),
    api_key      text NOT NULL UNIQUE CHECK (api_key ~ '^[A-Za-z0-9]{16}$'),
    source       text NOT NULL CHECK (source IN ('operator', 'lent')),
    player_id    bigint,
    player_name  text,
    created_at   timestamptz NOT NULL DEFAULT now(),
    disabled_at  timestamptz,
    disabled_reason text
);

CREATE OR REPLACE FUNCTION target_status_json(s torncat_target_status) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'target_id', s.target_id, 'faction_id', s.faction_id, 'war_id', s.war_id,
        'target_name', s.target_name, 'state', s.state, 'until', s.until,
        'description', s.description, 'updated_at', torncat_iso(s.updated_at))
$$;

-- The poll read enemy statuses: p_statuses is a JSON array of {target_id, target_name,
-- state, until, description}. Each that differs from the stored one is stored and appended
-- as a `target_status` event; a call on a target that was hospitalised since (state turns
-- Hospital, or its hospital `until` moves later: hit again) or jailed ends with reason
-- 'hospitalized' or 'jailed' (TornCat's calls only, see torncat_end_call), announced
-- just before the statuses. A target first seen in hospital keeps its call: players
-- call targets about to come out.
-- Returns (statuses changed, calls ended).
CREATE OR REPLACE FUNCTION torncat_target_statuses(p_faction bigint, p_war bigint,
                                                   p_statuses json)
RETURNS TABLE (changed bigint, ended bigint)
LANGUAGE plpgsql AS $$
DECLARE
    item    json;
    prev    torncat_target_status;
    seen    boolean;
    cur     torncat_target_status;
    todo    torncat_target_status[] := '{}';
    ids     bigint[] := '{}';
    ended_ids bigint[];
    reasons text[];
    why     text[] := '{}';
    n_ended bigint := 0;
BEGIN
    -- First decide, reading and locking the stored statuses...
    FOR item IN SELECT * FROM json_array_elements(p_statuses) LOOP
        cur.faction_id := p_faction;
        cur.target_id := (item->>'target_id')::bigint;
        cur.war_id := p_war;
        cur.target_name := item->>'target_name';
        cur.state := coalesce(item->>'state', '');
        cur.until := nullif((item->>'until')::bigint, 0);
        cur.description := coalesce(item->>'description', '');
        cur.updated_at := now();
        SELECT * INTO prev FROM torncat_target_status s
            WHERE s.faction_id = p_faction AND s.target_id = cur.target_id FOR UPDATE;
        seen := FOUND;
        IF seen AND (prev.state, prev.until, prev.description, prev.war_id)
                     IS NOT DISTINCT FROM (cur.state, cur.until, cur.description, cur.war_id) THEN
            CONTINUE;  -- another poller wrote this very status first
        END IF;
        todo := todo || cur;
        ids := ids || cur.target_id;
        why := why || CASE
            WHEN NOT seen THEN NULL
            WHEN cur.state = 'Hospital' AND (prev.state <> 'Hospital'
                 OR coalesce(cur.until, 0) > coalesce(prev.until, 0)) THEN 'hospitalized'
            WHEN cur.state = 'Jail' AND prev.state <> 'Jail' THEN 'jailed' END;
    END LOOP;
    -- ...then end TornCat's calls on the targets hospitalised or jailed, in one UPDATE
    -- whose rows are locked before its trigger takes the event lock (see "Lock order";
    -- so their uncalls come just before the statuses that caused them)...
    SELECT array_agg(c.id ORDER BY c.id), array_agg(d.w ORDER BY c.id) INTO ended_ids, reasons
    FROM torncat_calls c JOIN unnest(ids, why) AS d(t, w) ON c.target_id = d.t
    WHERE d.w IS NOT NULL AND coalesce(c.faction_id, 0) = coalesce(p_faction, 0)
      AND c.active AND c.torncat_made;
    n_ended := torncat_end_rows(coalesce(ended_ids, '{}'), coalesce(reasons, '{}'), NULL, NULL);
    -- ...then store and announce the statuses.
    FOR i IN 1..cardinality(todo) LOOP
        cur := todo[i];
        INSERT INTO torncat_target_status VALUES (cur.*)
        ON CONFLICT (faction_id, target_id) DO UPDATE SET war_id = excluded.war_id,
            target_name = excluded.target_name, state = excluded.state, until = excluded.until,
            description = excluded.description, updated_at = excluded.updated_at;
        PERFORM torncat_append('target_status', NULL, p_faction, target_status_json(cur));
    END LOOP;
    RETURN QUERY SELECT cardinality(todo)::bigint, n_ended;
END
$$;

CREATE OR REPLACE FUNCTION poll_health_json(h torncat_poll_health) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'faction_id', h.faction_id, 'state', h.state, 'reason', h.reason,
        'since', torncat_iso(h.since), 'last_success', torncat_iso(h.last_success),
        'failures', h.failures, 'disabled_keys', h.disabled_keys, 'error_code', h.error_code,
        'updated_at', torncat_iso(h.updated_at))
$$;

-- The poll's health of a faction changed (as the poller sees it): store it, and append a
-- `poll_health` event unless the stored state and reason are the same already (another
-- poller, or this one before a restart, said it first). Returns whether it appended.
CREATE OR REPLACE FUNCTION torncat_set_poll_health(p_faction bigint, p_state text,
    p_reason text, p_since timestamptz, p_last_success timestamptz, p_failures integer,
    p_disabled_keys integer, p_error_code integer)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    prev torncat_poll_health;
    cur  torncat_poll_health;
BEGIN
    SELECT * INTO prev FROM torncat_poll_health WHERE faction_id = p_faction FOR UPDATE;
    IF FOUND AND (prev.state, prev.reason) IS NOT DISTINCT FROM (p_state, p_reason) THEN
        RETURN false;
    END IF;
    IF NOT FOUND AND p_state = 'ok' THEN
        RETURN false;  -- never unhealthy: nothing to clear, and a quiet wire
    END IF;
    cur := ROW(p_faction, p_state, p_reason, p_since, p_last_success, p_failures,
               p_disabled_keys, p_error_code, now());
    INSERT INTO torncat_poll_health VALUES (cur.*)
    ON CONFLICT (faction_id) DO UPDATE SET state = excluded.state, reason = excluded.reason,
        since = excluded.since, last_success = excluded.last_success,
        failures = excluded.failures, disabled_keys = excluded.disabled_keys,
        error_code = excluded.error_code, updated_at = excluded.updated_at;
    PERFORM torncat_append('poll_health', NULL, p_faction, poll_health_json(cur));
    RETURN true;
END
$$;

-- ---------------------------------------------------------------------------
-- Today's state: the wars the old tool's table knows, and who holds what
-- ---------------------------------------------------------------------------

DO $$
BEGIN
    IF current_setting('torncat.first_run', true) = 'yes' THEN
        -- The first run: nothing was shown yet, so nothing is announced. Rows TornCat's
        -- earlier versions saw (they are in its log) were made under TornCat's rules:
        -- they are TornCat's, and its expiry applies to them.
        UPDATE target_calls SET torncat_made = true
        WHERE torncat_made IS NULL AND id IN (SELECT call_id FROM target_call_events);
        PERFORM set_config('torncat.quiet', 'yes', true);
        PERFORM torncat_sync_wars(false);
        PERFORM torncat_reconcile_all();
        PERFORM set_config('torncat.quiet', 'no', true);
    ELSE
        -- Again: announce whatever changed since (normally nothing).
        PERFORM torncat_sync_wars();
        PERFORM torncat_reconcile_all();
    END IF;
END
$$;

-- ---------------------------------------------------------------------------
-- Privileges and row level security
-- ---------------------------------------------------------------------------
--
-- Supabase's Data API serves every table, view and function in `public` to the roles
-- `anon` and `authenticated` (the project's public keys), and its default privileges
-- grant them everything on what `postgres` creates, TRUNCATE, TRIGGER and REFERENCES
-- included, which row level security does not govern. So every object TornCat creates
-- loses every privilege of PUBLIC, anon and authenticated, and its tables get RLS (on,
-- no policy). Who still reaches them: their owner, the role that ran this file, as which
-- the server connects (RLS binds an owner only under FORCE ROW LEVEL SECURITY, never set
-- here); superusers; roles with BYPASSRLS and privileges of their own (Supabase's
-- `service_role`, the secret key's role, which must stay on servers).
SET LOCAL client_min_messages = notice;
DO $$
DECLARE
    grantees  text;
    obj       text;
    users     text;
BEGIN
    SELECT string_agg(quote_ident(rolname), ', ') INTO grantees FROM pg_roles
    WHERE rolname IN ('anon', 'authenticated');
    grantees := 'PUBLIC' || coalesce(', ' || grantees, '');

    -- target_calls counts as TornCat's when this file created it, or when row level
    -- security is on with no policy (an earlier version of this file did that): no role
    -- but its owner and BYPASSRLS roles can use its rows anyway, and TRUNCATE, TRIGGER and
    -- REFERENCES are not governed by RLS.
    IF current_setting('torncat.created_target_calls', true) IS DISTINCT FROM 'yes'
            AND (SELECT relrowsecurity FROM pg_class WHERE oid = 'target_calls'::regclass)
            AND NOT EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = 'target_calls'::regclass) THEN
        PERFORM set_config('torncat.created_target_calls', 'yes', true);
    END IF;
    FOREACH obj IN ARRAY ARRAY['target_call_events', 'torncat_tokens', 'torncat_poll_health',
            'torncat_wars', 'torncat_target_status', 'torncat_torn_keys', 'torncat_holders']
            || CASE WHEN current_setting('torncat.created_target_calls', true) = 'yes'
                    THEN ARRAY['target_calls'] ELSE '{}' END LOOP
        EXECUTE format('ALTER TABLE %I ENABLE ROW LEVEL SECURITY', obj);
        EXECUTE format('REVOKE ALL ON TABLE %I FROM %s', obj, grantees);
    END LOOP;
    FOREACH obj IN ARRAY ARRAY['torncat_calls', 'torncat_live_calls', 'torncat_leftovers'] LOOP
        EXECUTE format('REVOKE ALL ON TABLE %I FROM %s', obj, grantees);
    END LOOP;
    FOR obj IN SELECT s.oid::regclass::text FROM pg_class s
               JOIN pg_depend d ON d.objid = s.oid AND d.deptype IN ('a', 'i')
               JOIN pg_class t ON t.oid = d.refobjid
               WHERE s.relkind = 'S' AND t.relname IN ('target_call_events', 'torncat_tokens',
                   'torncat_torn_keys', 'target_calls')
                 AND (t.relname <> 'target_calls'
                      OR current_setting('torncat.created_target_calls', true) = 'yes')
                 AND t.relnamespace = current_schema()::regnamespace LOOP
        EXECUTE format('REVOKE ALL ON SEQUENCE %s FROM %s', obj, grantees);
    END LOOP;
    -- Functions: the Data API would offer each as an RPC (PUBLIC may EXECUTE any new
    -- function by default). The seed's notify_target_call is a trigger function, which
    -- no one can call, and keeps whatever it had.
    FOR obj IN SELECT p.oid::regprocedure::text FROM pg_proc p
               WHERE p.pronamespace = current_schema()::regnamespace
                 AND (p.proname LIKE 'torncat\_%' OR p.proname IN (
                      'prune_target_call_events', 'target_status_json', 'poll_health_json')) LOOP
        EXECUTE format('REVOKE ALL ON FUNCTION %s FROM %s', obj, grantees);
    END LOOP;

    -- target_calls itself, when it is not TornCat's: other programs read and write it
    -- with their own roles, which row level security with no policy would lock out.
    IF current_setting('torncat.created_target_calls', true) IS DISTINCT FROM 'yes'
            AND NOT (SELECT relrowsecurity FROM pg_class WHERE oid = 'target_calls'::regclass) THEN
        SELECT string_agg(DISTINCT r.rolname, ', ') INTO users
        FROM pg_class c CROSS JOIN LATERAL aclexplode(c.relacl) a
        JOIN pg_roles r ON r.oid = a.grantee
        WHERE c.oid = 'target_calls'::regclass AND a.grantee <> c.relowner
          AND NOT r.rolbypassrls AND NOT r.rolsuper;
        IF users IS NULL AND NOT EXISTS (
                SELECT 1 FROM pg_class c, aclexplode(c.relacl) a
                WHERE c.oid = 'target_calls'::regclass AND a.grantee = 0) THEN
            ALTER TABLE target_calls ENABLE ROW LEVEL SECURITY;  -- nobody else uses it
        ELSE
            RAISE NOTICE 'row level security stays OFF on target_calls: % may use it today, and '
                'with RLS on and no policy they would read no call and write none. Once every '
                'program reads and writes target_calls as the owner or a BYPASSRLS role (on '
                'Supabase: the service_role key), turn it on: ALTER TABLE target_calls ENABLE '
                'ROW LEVEL SECURITY (docs/operations.md, "Row level security")',
                coalesce(users, 'PUBLIC');
        END IF;
    END IF;
END
$$;

COMMIT;
