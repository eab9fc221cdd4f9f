-- TornCat SSE: the schema, event log and trigger behind the real-time stream.
--
-- Apply with `psql "$DATABASE_URL" -f trigger.sql`, or let the server do it
-- (`INIT_DB=1` / `--init-db`, and always for the embedded development database).
-- Idempotent: running it again changes nothing, and on a `target_calls` table
-- that has only the seed's columns it adds the new ones without touching rows.
--
-- What it builds:
--   target_calls        who calls whom. The seed's columns plus faction, war,
--                       names and `uncalled_at` (NULL = the call is active).
--   target_call_events  an append-only log of every change that matters to a
--                       client: `target_call` (a call appeared or changed) and
--                       `target_uncall` (UPDATE set uncalled_at, or DELETE).
--                       `event_id` is the SSE stream's event id.
--   notify_target_call  the trigger function (the seed's name, so it replaces
--                       the seed's trigger in place): appends the event, then
--                       NOTIFYs channel `target_calls` with it as JSON.
--   torncat_call, torncat_uncall, torncat_expire_calls
--                       what the server's calls API runs: each decides in one
--                       statement, so two racing callers cannot both win.
--   torncat_target_status, torncat_wars, torncat_torn_keys, torncat_poll_health
--                       the central Torn API poll (issue 14): each enemy's last known
--                       status per watching faction, each faction's current ranked war,
--                       the Torn API keys the poll uses (operator's and lent ones), and
--                       the poll's health per faction (`poll_health` events).
--   torncat_tokens      tokens (SHA-256 digests only): faction tokens, managed with
--                       `python torncat_sse.py token create|list|revoke`, and member
--                       tokens, issued by POST /auth/torn to one verified player.
--
-- Ordering under concurrency. A sequence hands out ids in call order, but two
-- transactions can commit in the other order: a client that had seen id 11
-- would then never be sent id 10. So every event is appended while holding one
-- transaction-scoped advisory lock (key TORNCAT_EVENT_LOCK below): the second
-- writer waits for the first to commit or roll back before it draws its id.
-- Commit order therefore equals id order, and "everything after id N" is a
-- stable question. The cost: writes to target_calls are serialised from the
-- trigger to the end of their transaction, so keep those transactions short.
-- (Ids can still have gaps, from rolled-back transactions; gaps are harmless.)
--
-- The server reads every event from the log: a notification only tells it when to
-- look (any role may NOTIFY, so a payload proves nothing). The payload still carries
-- the event for other listeners; one over NOTIFY's 8000-byte limit (names can hold
-- anything) carries only its id and `"truncated": true`.
--
-- Retention. `SELECT prune_target_call_events(interval '3 days')` deletes
-- older events but always keeps the newest one, so the last event id never
-- goes backwards. The server runs it hourly (EVENT_RETENTION_HOURS). A client
-- that resumes from a pruned id gets a fresh snapshot instead of a replay.
--
-- Not covered: TRUNCATE fires no row trigger; after truncating target_calls,
-- restart the server so it reloads its snapshot.

BEGIN;

CREATE TABLE IF NOT EXISTS target_calls (
    id          bigserial PRIMARY KEY,
    caller_id   bigint NOT NULL,
    target_id   bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE target_calls
    ADD COLUMN IF NOT EXISTS faction_id  bigint,
    ADD COLUMN IF NOT EXISTS war_id      bigint,
    ADD COLUMN IF NOT EXISTS caller_name text,
    ADD COLUMN IF NOT EXISTS target_name text,
    ADD COLUMN IF NOT EXISTS uncalled_at timestamptz,
    ADD COLUMN IF NOT EXISTS uncalled_by bigint,
    ADD COLUMN IF NOT EXISTS uncalled_by_name text,
    ADD COLUMN IF NOT EXISTS uncall_reason text;  -- uncalled, forced, expired, deleted,
                                                  -- hospitalized, jailed, war_ended

-- One active caller per target and faction (calls without a faction count as one
-- faction). The database decides, so racing callers cannot both win. A table that
-- already holds duplicate active calls (the seed never uncalled) keeps them, and
-- the index waits until they are cleared: trigger.sql never rewrites rows.
DO $$
BEGIN
    IF to_regclass('target_calls_one_active_caller') IS NULL THEN
        IF EXISTS (SELECT 1 FROM target_calls WHERE uncalled_at IS NULL
                   GROUP BY coalesce(faction_id, 0), target_id HAVING count(*) > 1) THEN
            RAISE WARNING 'target_calls has targets with several active calls, so one caller '
                'per target is NOT enforced yet: set uncalled_at on the extra rows (the server '
                'expires calls older than CALL_TTL_SECONDS by itself), then run trigger.sql again';
        ELSE
            CREATE UNIQUE INDEX target_calls_one_active_caller
                ON target_calls (coalesce(faction_id, 0), target_id) WHERE uncalled_at IS NULL;
        END IF;
    END IF;
END
$$;

-- The server loads active calls at start-up and after a long outage.
CREATE INDEX IF NOT EXISTS target_calls_active_idx
    ON target_calls (faction_id) WHERE uncalled_at IS NULL;

CREATE TABLE IF NOT EXISTS target_call_events (
    event_id    bigserial PRIMARY KEY,
    event       text NOT NULL CHECK (event IN ('target_call', 'target_uncall')),
    call_id     bigint NOT NULL,
    faction_id  bigint,
    data        json NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The poll's `target_status` events (an enemy's status changed) share the log, so they
-- are ordered with the calls and replayed the same way; they belong to no call.
ALTER TABLE target_call_events ALTER COLUMN call_id DROP NOT NULL;
ALTER TABLE target_call_events DROP CONSTRAINT IF EXISTS target_call_events_event_check;
ALTER TABLE target_call_events ADD CONSTRAINT target_call_events_event_check
    CHECK (event IN ('target_call', 'target_uncall', 'target_status', 'poll_health'));

CREATE INDEX IF NOT EXISTS target_call_events_created_at_idx
    ON target_call_events (created_at);

-- Row-level security, on with no policy. Supabase exposes every table in `public`
-- through its Data API to the roles `anon` and `authenticated` (the project's public
-- keys), and grants them access to those tables: with RLS on and no policy they read
-- zero rows and write none. Roles that bypass RLS, and still see everything:
--   * the table owner, i.e. the role that ran this file, which the server connects
--     as: RLS applies to the owner only under FORCE ROW LEVEL SECURITY (PostgreSQL
--     docs, "Row Security Policies"), which this file never sets;
--   * superusers and roles with BYPASSRLS (on Supabase: `service_role`, the secret
--     key's role, which must stay on servers).
-- Enabling it again is a no-op, so this stays idempotent. No other role could make
-- a call before either: the trigger's insert into the log (RLS on) was refused.
-- How to check it: README, "Supabase".
ALTER TABLE target_calls ENABLE ROW LEVEL SECURITY;
ALTER TABLE target_call_events ENABLE ROW LEVEL SECURITY;

-- ISO-8601 in UTC with milliseconds, e.g. 2026-11-24T18:41:07.123Z.
CREATE OR REPLACE FUNCTION torncat_iso(ts timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')
$$;

-- A call as clients see it: the seed's fields first, then the new ones.
CREATE OR REPLACE FUNCTION target_call_json(c target_calls) RETURNS json
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

-- Append one event to the log and notify listeners: from the trigger, and from the
-- poll's torncat_target_statuses below.
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
    PERFORM pg_notify('target_calls', payload);
    RETURN new_id;
END
$$;

-- Append one call event. Call only from the trigger.
CREATE OR REPLACE FUNCTION torncat_emit(kind text, c target_calls) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM torncat_append(kind, c.id, c.faction_id, target_call_json(c));
END
$$;

CREATE OR REPLACE FUNCTION notify_target_call() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    gone target_calls;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.uncalled_at IS NULL THEN
            PERFORM torncat_emit('target_call', NEW);
        END IF;
    ELSIF TG_OP = 'UPDATE' THEN
        IF OLD.uncalled_at IS NULL AND NEW.uncalled_at IS NOT NULL THEN
            PERFORM torncat_emit('target_uncall', NEW);
        ELSIF NEW.uncalled_at IS NULL AND NEW IS DISTINCT FROM OLD THEN
            IF OLD.uncalled_at IS NULL AND NEW.faction_id IS DISTINCT FROM OLD.faction_id THEN
                -- Moved to another faction: the old one must see it leave.
                gone := OLD;
                gone.uncalled_at := now();
                PERFORM torncat_emit('target_uncall', gone);
            END IF;
            PERFORM torncat_emit('target_call', NEW);
        END IF;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.uncalled_at IS NULL THEN
            gone := OLD;
            gone.uncalled_at := now();
            gone.uncall_reason := 'deleted';
            PERFORM torncat_emit('target_uncall', gone);
        END IF;
    END IF;
    RETURN NULL;  -- AFTER trigger: the return value is ignored
END
$$;

DROP TRIGGER IF EXISTS trg_notify_target_call ON target_calls;
CREATE TRIGGER trg_notify_target_call
    AFTER INSERT OR UPDATE OR DELETE ON target_calls
    FOR EACH ROW EXECUTE FUNCTION notify_target_call();

-- The calls API. Each returns (status, event_id, call): `call` is the call as
-- clients see it, `event_id` the event this write produced (NULL if none).

-- The active call of a faction's target, if any (calls without a faction count as one
-- faction, as in the unique index above).
CREATE OR REPLACE FUNCTION torncat_active_call(p_faction bigint, p_target bigint)
RETURNS SETOF target_calls LANGUAGE sql STABLE AS $$
    SELECT * FROM target_calls t
    WHERE coalesce(t.faction_id, 0) = coalesce(p_faction, 0)
      AND t.target_id = p_target AND t.uncalled_at IS NULL
$$;

-- Call a target: status 'called'; 'yours' when the same caller holds it already (a
-- retry of a call whose answer was lost, so retrying is safe); or 'taken' with the call
-- that holds it.
CREATE OR REPLACE FUNCTION torncat_call(p_faction bigint, p_war bigint, p_target bigint,
                                        p_target_name text, p_caller bigint, p_caller_name text)
RETURNS TABLE (status text, event_id bigint, call json)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c target_calls;
BEGIN
    FOR attempt IN 1..3 LOOP
        BEGIN
            -- A call without a war belongs to the faction's current war, as the poll sees it.
            INSERT INTO target_calls (faction_id, war_id, target_id, target_name,
                                      caller_id, caller_name)
                VALUES (p_faction, coalesce(p_war, (SELECT w.war_id FROM torncat_wars w
                                                     WHERE w.faction_id = p_faction)),
                        p_target, p_target_name, p_caller, p_caller_name)
                RETURNING * INTO c;
            RETURN QUERY SELECT 'called'::text,
                currval(pg_get_serial_sequence('target_call_events', 'event_id')),
                target_call_json(c);
            RETURN;
        EXCEPTION WHEN unique_violation THEN
            SELECT * INTO c FROM torncat_active_call(p_faction, p_target);
            IF FOUND THEN
                RETURN QUERY SELECT CASE WHEN c.caller_id = p_caller THEN 'yours' ELSE 'taken'
                    END, NULL::bigint, target_call_json(c);
                RETURN;
            END IF;
            -- The holder uncalled in between: try again.
        END;
    END LOOP;
    RAISE EXCEPTION 'target % keeps changing hands', p_target;
END
$$;

-- Uncall a target: 'uncalled'; 'not_yours' (with the holder's call) when another
-- member holds it and p_force is false; 'not_called' when nobody holds it.
CREATE OR REPLACE FUNCTION torncat_uncall(p_faction bigint, p_target bigint, p_by bigint,
                                          p_by_name text, p_force boolean)
RETURNS TABLE (status text, event_id bigint, call json)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    c target_calls;
BEGIN
    UPDATE target_calls t
    SET uncalled_at = now(), uncalled_by = p_by, uncalled_by_name = p_by_name,
        uncall_reason = CASE WHEN t.caller_id = p_by THEN 'uncalled' ELSE 'forced' END
    WHERE coalesce(t.faction_id, 0) = coalesce(p_faction, 0)
      AND t.target_id = p_target AND t.uncalled_at IS NULL
      AND (t.caller_id = p_by OR p_force)
    RETURNING * INTO c;
    IF FOUND THEN
        RETURN QUERY SELECT 'uncalled'::text,
            currval(pg_get_serial_sequence('target_call_events', 'event_id')),
            target_call_json(c);
        RETURN;
    END IF;
    SELECT * INTO c FROM torncat_active_call(p_faction, p_target);
    IF FOUND THEN
        RETURN QUERY SELECT 'not_yours'::text, NULL::bigint, target_call_json(c);
    ELSE
        RETURN QUERY SELECT 'not_called'::text, NULL::bigint, NULL::json;
    END IF;
END
$$;

-- Uncall every call older than `ttl`, with reason 'expired'. Row locks make this
-- exactly-once when several servers run it at the same moment: the second UPDATE
-- re-checks `uncalled_at IS NULL` after the first commits and skips the row.
CREATE OR REPLACE FUNCTION torncat_expire_calls(ttl interval) RETURNS bigint
LANGUAGE sql AS $$
    WITH gone AS (
        UPDATE target_calls SET uncalled_at = now(), uncall_reason = 'expired'
        WHERE uncalled_at IS NULL AND created_at < now() - ttl
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

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
ALTER TABLE torncat_tokens ENABLE ROW LEVEL SECURITY;

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
ALTER TABLE torncat_poll_health ENABLE ROW LEVEL SECURITY;

-- Each faction's current ranked war as the poll last saw it (no row: none). New calls
-- without a war_id take this one (torncat_call).
CREATE TABLE IF NOT EXISTS torncat_wars (
    faction_id   bigint PRIMARY KEY,
    war_id       bigint NOT NULL,
    opponent_id  bigint NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE torncat_wars ENABLE ROW LEVEL SECURITY;

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
ALTER TABLE torncat_target_status ENABLE ROW LEVEL SECURITY;

-- Torn API keys for the poll: the operator's (`torncat_sse.py torn-key add`) and those
-- members lend at sign-in. Stored in clear because the poll must send them; RLS keeps
-- Supabase's public roles out, and the server never logs or returns them.
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
ALTER TABLE torncat_torn_keys ENABLE ROW LEVEL SECURITY;

CREATE OR REPLACE FUNCTION target_status_json(s torncat_target_status) RETURNS json
LANGUAGE sql STABLE AS $$
    SELECT json_build_object(
        'target_id', s.target_id, 'faction_id', s.faction_id, 'war_id', s.war_id,
        'target_name', s.target_name, 'state', s.state, 'until', s.until,
        'description', s.description, 'updated_at', torncat_iso(s.updated_at))
$$;

-- End a faction's active call on a target for a reason of the poll's (uncalled_by NULL).
-- Row locks make it exactly-once: a second poller's UPDATE re-checks `uncalled_at IS NULL`
-- after the first commits and finds nothing (as torncat_expire_calls).
CREATE OR REPLACE FUNCTION torncat_end_call(p_faction bigint, p_target bigint, p_reason text)
RETURNS bigint LANGUAGE sql AS $$
    WITH gone AS (
        UPDATE target_calls SET uncalled_at = now(), uncall_reason = p_reason
        WHERE coalesce(faction_id, 0) = coalesce(p_faction, 0) AND target_id = p_target
          AND uncalled_at IS NULL
        RETURNING 1)
    SELECT count(*) FROM gone
$$;

-- The poll saw the faction's war: p_war (NULL: no current war). Calls of any other war
-- end with reason 'war_ended', and so, once the war stored here has ended (none now, or
-- another), do calls made before the poll knew of it (war_id NULL): a call belongs to the
-- war it was made in, whatever the poll knew then. Returns how many ended.
CREATE OR REPLACE FUNCTION torncat_set_war(p_faction bigint, p_war bigint, p_opponent bigint)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    ended bigint;
    had   bigint;  -- the war stored before this call (NULL: none)
BEGIN
    SELECT w.war_id INTO had FROM torncat_wars w WHERE w.faction_id = p_faction FOR UPDATE;
    IF p_war IS NULL THEN
        DELETE FROM torncat_wars WHERE faction_id = p_faction;
    ELSE
        INSERT INTO torncat_wars (faction_id, war_id, opponent_id) VALUES (p_faction, p_war, p_opponent)
        ON CONFLICT (faction_id) DO UPDATE SET war_id = excluded.war_id,
            opponent_id = excluded.opponent_id, updated_at = now()
        WHERE (torncat_wars.war_id, torncat_wars.opponent_id)
              IS DISTINCT FROM (excluded.war_id, excluded.opponent_id);
    END IF;
    WITH gone AS (
        UPDATE target_calls SET uncalled_at = now(), uncall_reason = 'war_ended'
        WHERE faction_id = p_faction AND uncalled_at IS NULL
          AND CASE WHEN war_id IS NULL THEN had IS DISTINCT FROM p_war AND had IS NOT NULL
                   ELSE war_id IS DISTINCT FROM p_war END
        RETURNING 1)
    SELECT count(*) INTO ended FROM gone;
    RETURN ended;
END
$$;

-- The poll read enemy statuses: p_statuses is a JSON array of {target_id, target_name,
-- state, until, description}. Each that differs from the stored one is stored and appended
-- as a `target_status` event; a call on a target that was hospitalised since (state turns
-- Hospital, or its hospital `until` moves later: hit again) or jailed ends with reason
-- 'hospitalized' or 'jailed'. A target first seen in hospital keeps its call: players
-- call targets about to come out. Returns (statuses changed, calls ended).
CREATE OR REPLACE FUNCTION torncat_target_statuses(p_faction bigint, p_war bigint,
                                                   p_statuses json)
RETURNS TABLE (changed bigint, ended bigint)
LANGUAGE plpgsql AS $$
DECLARE
    item   json;
    prev   torncat_target_status;
    seen   boolean;
    cur    torncat_target_status;
    n_changed bigint := 0;
    n_ended   bigint := 0;
BEGIN
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
        INSERT INTO torncat_target_status VALUES (cur.*)
        ON CONFLICT (faction_id, target_id) DO UPDATE SET war_id = excluded.war_id,
            target_name = excluded.target_name, state = excluded.state, until = excluded.until,
            description = excluded.description, updated_at = excluded.updated_at;
        PERFORM torncat_append('target_status', NULL, p_faction, target_status_json(cur));
        n_changed := n_changed + 1;
        IF seen THEN
            IF cur.state = 'Hospital' AND (prev.state <> 'Hospital'
                    OR coalesce(cur.until, 0) > coalesce(prev.until, 0)) THEN
                n_ended := n_ended + torncat_end_call(p_faction, cur.target_id, 'hospitalized');
            ELSIF cur.state = 'Jail' AND prev.state <> 'Jail' THEN
                n_ended := n_ended + torncat_end_call(p_faction, cur.target_id, 'jailed');
            END IF;
        END IF;
    END LOOP;
    RETURN QUERY SELECT n_changed, n_ended;
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

COMMIT;
