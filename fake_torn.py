"""A fake Torn API v2 on loopback, for tests and development. Never calls Torn.

It speaks the shapes of the five endpoints TornCat uses, with the key in
`Authorization: ApiKey <key>` (or `?key=`), Torn's error envelope, Torn's rate
limit, and knobs for latency and outages. Everything it answers comes from the
players, keys and factions a test (or, run by hand, a small demo) gives it.

Where the shapes come from (Torn's OpenAPI document, "Torn API" v2.0.2):
  - Manuito83/torn-pda `lib/models/api_v2/swagger/torn_v2.json` (commit 60b5c260, 2026-05):
    schemas FactionMembersResponse, FactionMember, UserStatus, UserLastAction,
    FactionWarsResponse, FactionWars, FactionRankedWar, FactionRankedWarParticipant,
    FactionId, UserId (both `integer`, `int32`), ApiKeyAccessTypeEnum; paths /key/info,
    /faction/wars ("Get your faction's wars & pacts details": the key owner's faction),
    /faction/{id}/wars ("Get a faction's wars & pacts details": any faction, Public
    access, the same FactionWarsResponse), /faction/{id}/members.
  - Tornium/torngen_python_client (generated from the current document, commit 5678312,
    2026-08), `torngen/schema/`: KeyInfoResponse (which adds `info.user` {id, faction_id,
    company_id} and `access.log` to the torn-pda copy), UserBasicResponse/UserBasic,
    UserProfileResponse, UserGenderEnum, UserStatusStateEnum, ReviveSetting, and the
    error codes of ApiError (error_*.py: 2 incorrect key, 5 too many requests, 8 IP
    blocked, 9 API disabled, 13 key disabled for owner inactivity, 14 daily read limit,
    16 access level too low, 17 backend error, 18 key paused by its owner...);
    `torngen/path/user.py` for /user/basic and /user/profile ("Requires public access key").
  The messages are Torn's documented error texts.

Errors are HTTP 200 with `{"error": {"code": N, "error": "..."}}`, as Torn answers
them. The rate limit is Torn's: 100 requests per rolling minute per player, counted
across all of that player's keys (a key nobody owns counts on its own).

Knobs (attributes, set by a test at any time):
  latency        seconds to wait before answering any request
  hold           an asyncio.Event: while it is not set, every request waits for it
  error_code     answer every request with this Torn error (e.g. 9 or 17): an outage
  http_status    answer every request with this bare HTTP status (a proxy's 502 page)
  requests       Counter of (key, path) -> requests received, for cost assertions
  arrivals       an asyncio.Queue that gets (key, path) as each request arrives
  answered       Counter of (path, faction) -> answers about that faction (None: none)
  drip_seconds   seconds between two bytes of a "drip" answer (see HOSTILE)

Hostile answers: `misbehave(mode, route=..., faction=..., times=...)` makes the matching
requests get a broken answer instead of the right one, one mode per way of breaking it
(HOSTILE lists them with the part of the document each breaks); `behave()` ends them.

By hand:

    python fake_torn.py --port 8099            # two factions, three players: prints their keys
    curl -H 'Authorization: ApiKey <key>' localhost:8099/v2/user/profile
    TORN_API_URL=http://127.0.0.1:8099/v2 python torncat_sse.py
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import copy
import json
import random
import string
import time
import urllib.parse
from dataclasses import dataclass, field

RATE_LIMIT = 100            # requests per player per rolling minute: Torn's documented limit
RATE_WINDOW = 60.0          # seconds
MAX_HEAD_BYTES = 16 * 1024  # the fake reads request heads up to this size
HEAD_TIMEOUT = 10.0         # seconds a client has to send its request head

ERRORS = {  # Torn's error texts (API documentation, "Error codes")
    0: "Unknown error", 1: "Key is empty", 2: "Incorrect Key", 3: "Wrong type",
    4: "Wrong fields", 5: "Too many requests", 6: "Incorrect ID",
    7: "Incorrect ID-entity relation", 8: "IP block", 9: "API disabled",
    10: "Key owner is in federal jail", 11: "Key change error", 12: "Key read error",
    13: "The key is temporarily disabled due to owner inactivity", 14: "Daily read limit reached",
    15: "Temporary error", 16: "Access level of this key is not high enough",
    17: "Backend error occurred, please try again", 18: "API key has been paused by the owner",
}

# ApiKeyAccessTypeEnum by access level (KeyInfoResponse.info.access.level)
ACCESS_TYPES = {0: "Custom", 1: "Public Only", 2: "Minimal Access", 3: "Limited Access",
                4: "Full Access"}
PUBLIC = 1

# path -> (category, selection, minimum access level), for access checks and key/info
ROUTES = {
    "/key/info": ("key", "info", 0),
    "/user/basic": ("user", "basic", PUBLIC),
    "/user/profile": ("user", "profile", PUBLIC),
    "/faction/wars": ("faction", "wars", PUBLIC),
    "/faction/{id}/wars": ("faction", "wars", PUBLIC),
    "/faction/{id}/members": ("faction", "members", PUBLIC),
}

DEEP = 100_000  # nesting of the "deep_json" answer: far past CPython's recursion limit
DRIP_SECONDS = 2.0  # a "drip" answer's pause between two bytes
FORGED_LOG_LINE = "2026-01-01 00:00:00,000 WARNING torncat: forged by a player's name"

# Ways to break an answer: mode -> what the v2 document says, and what the answer does
# instead. Ids are `integer` `int32` there (FactionId, UserId, FactionRankedWar.war_id),
# names `string`, FactionMembersResponse.members an array of FactionMember objects,
# FactionRankedWar.factions an array of FactionRankedWarParticipant, FactionWars.ranked a
# FactionRankedWar or null.
HOSTILE = {
    "member_not_object": "members[]: a FactionMember object; one is a string instead",
    "member_id_string": "FactionMember.id: an integer; a string instead",
    "status_not_object": "FactionMember.status: a UserStatus object; null instead",
    "factions_not_array": "FactionRankedWar.factions: an array; the integer 2 instead",
    "deep_json": f"any answer: JSON arrays nested {DEEP:,} deep (json.loads: RecursionError)",
    "not_json": "any answer: an HTML page, as a proxy or Cloudflare sends",
    "not_object": "any answer: a JSON array instead of the response object",
    "id_past_bigint": "every id: 2**63 + id, past Postgres' bigint (and int32)",
    "id_past_2_53": "every id: 2**53 + id, past JavaScript's exact integers (and int32)",
    "id_zero": "every id: 0 (ids are positive)",
    "war_id_negative": "FactionRankedWar.war_id: -1",
    "name_nul": "every name: a NUL inside",
    "name_newline": "every name: a newline and a forged log line after it",
    "name_control": "every name: ANSI escapes and a right-to-left override",
    "name_long": "every name: 10,000 characters",
    "members_empty": "members: [] (a faction always lists at least its leader)",
    "members_partial": "members: the first one only",
    "members_many": "members: 1,000 (a Torn faction has at most 100)",
    "ranked_null": "FactionWars.ranked: null (between wars: legal, but one answer is no end)",
    "drip": "the right answer, one byte every drip_seconds (urllib's timeout is per read)",
}
PUBLIC_SELECTIONS = {"user": ["basic", "profile"], "faction": ["members", "wars"],
                     "key": ["info"]}
SELECTION_CATEGORIES = ("company", "faction", "market", "property", "torn", "user", "racing",
                        "forum", "key")


@dataclass
class Player:
    id: int
    name: str
    faction_id: int | None = None
    level: int = 50
    state: str = "Okay"                # UserStatusStateEnum
    until: int | None = None           # when the state ends (Hospital, Jail, Traveling)
    description: str = "Okay"


@dataclass
class Key:
    player_id: int
    level: int = PUBLIC                # 1 Public ... 4 Full; 0 Custom (see `selections`)
    selections: dict[str, list[str]] | None = None  # a Custom key's selections
    status: int | None = None          # a Torn error this key always gets: 13, 18, 10


@dataclass
class Misbehaviour:
    mode: str                          # a key of HOSTILE
    route: str | None = None           # a key of ROUTES; None: every route
    faction: int | None = None         # only answers about this faction; None: any
    times: int | None = None           # how many answers more; None: until behave()


@dataclass
class Faction:
    id: int
    name: str
    ranked_war: dict | None = None     # FactionRankedWar, or None outside a war
    members: list[int] = field(default_factory=list)


def error_body(code: int) -> dict:
    return {"error": {"code": code, "error": ERRORS.get(code, "Unknown error")}}


def _names(obj: dict, change) -> None:
    """Apply `change` to every player and faction name in an answer, in place."""
    for member in obj.get("members") or ():
        if isinstance(member, dict) and isinstance(member.get("name"), str):
            member["name"] = change(member["name"])
    profile = obj.get("profile")
    if isinstance(profile, dict) and isinstance(profile.get("name"), str):
        profile["name"] = change(profile["name"])
    ranked = (obj.get("wars") or {}).get("ranked") if isinstance(obj.get("wars"), dict) else None
    for faction in (ranked or {}).get("factions") or ():
        if isinstance(faction, dict) and isinstance(faction.get("name"), str):
            faction["name"] = change(faction["name"])


def _ids(obj: dict, change) -> None:
    """Apply `change` to every id (player, faction, war) in an answer, in place."""
    for member in obj.get("members") or ():
        if isinstance(member, dict) and isinstance(member.get("id"), int):
            member["id"] = change(member["id"])
    profile = obj.get("profile")
    if isinstance(profile, dict):
        for name in ("id", "faction_id"):
            if isinstance(profile.get(name), int):
                profile[name] = change(profile[name])
    user = (obj.get("info") or {}).get("user") if isinstance(obj.get("info"), dict) else None
    if isinstance(user, dict) and isinstance(user.get("id"), int):
        user["id"] = change(user["id"])
    ranked = (obj.get("wars") or {}).get("ranked") if isinstance(obj.get("wars"), dict) else None
    if isinstance(ranked, dict):
        ranked["war_id"] = change(ranked["war_id"])
        for faction in ranked.get("factions") or ():
            if isinstance(faction, dict) and isinstance(faction.get("id"), int):
                faction["id"] = change(faction["id"])


def tamper(mode: str, body: dict) -> dict | bytes:
    """The answer `body` broken the way `mode` (a key of HOSTILE) says."""
    if mode == "deep_json":
        return b'{"deep":' + b"[" * DEEP + b"]" * DEEP + b"}"
    if mode == "not_json":
        return b"<html><body><h1>502 Bad Gateway</h1>cloudflare</body></html>"
    if mode == "not_object":
        return b"[]"
    body = copy.deepcopy(body)
    members = body.get("members")
    ranked = (body.get("wars") or {}).get("ranked") if isinstance(body.get("wars"), dict) \
        else None
    if mode == "member_not_object" and members:
        members.insert(len(members) // 2, "2001")
    elif mode == "member_id_string" and members:
        members[0]["id"] = str(members[0]["id"])
    elif mode == "status_not_object" and members:
        members[0]["status"] = None
    elif mode == "factions_not_array" and ranked:
        ranked["factions"] = 2
    elif mode == "id_past_bigint":
        _ids(body, lambda i: 2**63 + i)
    elif mode == "id_past_2_53":
        _ids(body, lambda i: 2**53 + i)
    elif mode == "id_zero":
        _ids(body, lambda i: 0)
    elif mode == "war_id_negative" and ranked:
        ranked["war_id"] = -1
    elif mode == "name_nul":
        _names(body, lambda n: n[:1] + "\x00" + n[1:])
    elif mode == "name_newline":
        _names(body, lambda n: f"{n}\n{FORGED_LOG_LINE}")
    elif mode == "name_control":
        _names(body, lambda n: f"\x1b[31m{n}\u202e\x07")
    elif mode == "name_long":
        _names(body, lambda n: n * (10_000 // len(n) + 1))
    elif mode == "members_empty" and members is not None:
        members.clear()
    elif mode == "members_partial" and members:
        del members[1:]
    elif mode == "members_many" and members:
        template = members[0]
        members[:] = [{**template, "id": 5_000_000 + n, "name": f"Extra{n}"}
                      for n in range(1_000)]
    elif mode == "ranked_null" and isinstance(body.get("wars"), dict):
        body["wars"]["ranked"] = None
    return body


class FakeTorn:
    """The fake API. `await start()`, then point TORN_API_URL at `base_url`."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0):
        self.host, self.port = host, port
        self.players: dict[int, Player] = {}
        self.keys: dict[str, Key] = {}
        self.factions: dict[int, Faction] = {}
        self.latency = 0.0
        self.rate_limit = RATE_LIMIT  # requests per player per rolling minute
        self.hold: asyncio.Event | None = None
        self.arrivals: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.error_code: int | None = None
        self.http_status: int | None = None
        self.requests: collections.Counter[tuple[str, str]] = collections.Counter()
        self.answered: collections.Counter[tuple[str, int | None]] = collections.Counter()
        self.drip_seconds = DRIP_SECONDS
        self.misbehaviours: list[Misbehaviour] = []
        self._recent: dict[object, collections.deque[float]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task] = set()

    # -- data -------------------------------------------------------------

    def add_faction(self, faction_id: int, name: str, ranked_war: dict | None = None) -> Faction:
        faction = self.factions[faction_id] = Faction(faction_id, name, ranked_war)
        return faction

    def add_player(self, player_id: int, name: str, faction_id: int | None = None,
                   key: str | None = None, **key_fields) -> str:
        """Add a player (and their faction membership); returns a key of theirs."""
        self.players[player_id] = Player(player_id, name, faction_id)
        if faction_id is not None:
            self.factions.setdefault(faction_id, Faction(faction_id, f"Faction {faction_id}"))
            self.factions[faction_id].members.append(player_id)
        return self.add_key(player_id, key, **key_fields)

    def add_key(self, player_id: int, key: str | None = None, **key_fields) -> str:
        key = key or "".join(random.choices(string.ascii_letters + string.digits, k=16))
        self.keys[key] = Key(player_id, **key_fields)
        return key

    def leave_faction(self, player_id: int) -> None:
        player = self.players[player_id]
        if player.faction_id is not None:
            self.factions[player.faction_id].members.remove(player_id)
        player.faction_id = None

    def join_faction(self, player_id: int, faction_id: int) -> None:
        """Move a player to another faction (leaving theirs), as Torn does."""
        self.leave_faction(player_id)
        self.factions.setdefault(faction_id, Faction(faction_id, f"Faction {faction_id}"))
        self.factions[faction_id].members.append(player_id)
        self.players[player_id].faction_id = faction_id

    def misbehave(self, mode: str, route: str | None = None, faction: int | None = None,
                  times: int | None = None) -> None:
        """From now on, answer `route` (every route: None) about `faction` (any: None) the
        hostile way `mode` (a key of HOSTILE), `times` times or until behave()."""
        if mode not in HOSTILE:
            raise ValueError(f"unknown mode {mode!r}: one of {', '.join(HOSTILE)}")
        if route is not None and route not in ROUTES:
            raise ValueError(f"unknown route {route!r}: one of {', '.join(ROUTES)}")
        self.misbehaviours.append(Misbehaviour(mode, route, faction, times))

    def behave(self) -> None:
        """Every answer right again."""
        self.misbehaviours.clear()

    def count(self, path: str | None = None) -> int:
        """Requests received (to `path`, or to any path), every key included."""
        return sum(n for (_, p), n in self.requests.items() if path is None or p == path)

    # -- server -----------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v2"

    async def start(self) -> FakeTorn:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and drop connections: from now on, Torn is unreachable."""
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            async with asyncio.timeout(HEAD_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD_BYTES:
                return
            status, body, drip = await self.answer(head.decode("latin-1"))
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                         "Content-Type: application/json\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + (b"" if drip else data))
            await writer.drain()
            for i in range(len(data) if drip else 0):  # a byte at a time, each well within
                await asyncio.sleep(self.drip_seconds)  # any per-read timeout
                writer.write(data[i:i + 1])
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
                TimeoutError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def answer(self, head: str) -> tuple[int, dict | bytes, bool]:
        """HTTP status, body (JSON, or bytes sent as they are) and whether to drip it, for
        one request head: the right answer, or the hostile one a misbehaviour asks for."""
        status, body, route, about = await self._right_answer(head)
        self.answered[(route, about)] += 1
        for m in list(self.misbehaviours):
            if (m.route is None or m.route == route) and (m.faction is None
                                                          or m.faction == about):
                if m.times is not None:
                    m.times -= 1
                    if m.times <= 0:
                        self.misbehaviours.remove(m)
                if m.mode == "drip":
                    return status, body, True
                return status, tamper(m.mode, body), False
        return status, body, False

    async def _right_answer(self, head: str) -> tuple[int, dict, str, int | None]:
        """HTTP status and JSON body for one request head, its route, and the faction the
        answer is about (None: none)."""
        lines = head.split("\r\n")
        method, target, _ = [*lines[0].split(" "), "", ""][:3]
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query))
        path = parts.path.removeprefix("/v2")
        scheme, _, auth_key = headers.get("authorization", "").partition(" ")
        key = auth_key.strip() if scheme.lower() == "apikey" else query.get("key", "")
        route, faction_id = path, None
        if path.startswith("/faction/") and path.count("/") == 3 and \
                path.rsplit("/", 1)[1] in ("members", "wars"):
            route, faction_id = f"/faction/{{id}}/{path.rsplit('/', 1)[1]}", path.split("/")[2]
        self.requests[(key, route)] += 1
        self.arrivals.put_nowait((key, route))
        about = int(faction_id) if faction_id is not None and faction_id.isdigit() else None
        owner = self.keys.get(key)
        if about is None and owner is not None and owner.player_id in self.players:
            about = self.players[owner.player_id].faction_id  # /faction/wars, /user/...

        def reply(status: int, obj: dict) -> tuple[int, dict, str, int | None]:
            return status, obj, route, about

        if self.hold is not None:
            await self.hold.wait()
        if self.latency:
            await asyncio.sleep(self.latency)
        if self.http_status is not None:
            return reply(self.http_status, {"message": "fake outage"})
        if self.error_code is not None:
            return reply(200, error_body(self.error_code))
        if method != "GET" or route not in ROUTES:
            return reply(200, error_body(4))
        if not key:
            return reply(200, error_body(1))
        if not self._take(owner.player_id if owner else key):
            return reply(200, error_body(5))
        if owner is None:
            return reply(200, error_body(2))
        if owner.status is not None:
            return reply(200, error_body(owner.status))
        category, selection, level = ROUTES[route]
        if level and owner.level == 0:  # level 0: "Available for any key" (/key/info)
            if selection not in (owner.selections or {}).get(category, []):
                return reply(200, error_body(16))
        elif owner.level < level:
            return reply(200, error_body(16))
        player = self.players[owner.player_id]
        if route == "/key/info":
            return reply(200, self.key_info(owner, player))
        if route == "/user/basic":
            return reply(200, {"profile": self.user_basic(player)})
        if route == "/user/profile":
            return reply(200, {"profile": self.user_profile(player)})
        if route == "/faction/wars":  # the key owner's faction
            faction = self.factions.get(player.faction_id)
            if faction is None:
                return reply(200, error_body(7))
            return reply(200, self.faction_wars(faction))
        faction = self.factions.get(int(faction_id)) if faction_id.isdigit() else None
        if faction is None:
            return reply(200, error_body(6))
        if route == "/faction/{id}/wars":
            return reply(200, self.faction_wars(faction))
        return reply(200, {"members": [self.faction_member(self.players[m])
                                       for m in faction.members]})

    def _take(self, who: object) -> bool:
        """One request against the rolling-minute limit; False when over it."""
        now = time.monotonic()
        recent = self._recent.setdefault(who, collections.deque())
        while recent and recent[0] <= now - RATE_WINDOW:
            recent.popleft()
        if len(recent) >= self.rate_limit:
            return False
        recent.append(now)
        return True

    # -- shapes -----------------------------------------------------------

    @staticmethod
    def faction_wars(faction: Faction) -> dict:
        """FactionWarsResponse."""
        return {"pacts": [], "wars": {"ranked": faction.ranked_war, "raids": [],
                                      "territory": []}}

    @staticmethod
    def key_info(key: Key, player: Player) -> dict:
        """KeyInfoResponse."""
        if key.level == 0:
            selections = {c: list((key.selections or {}).get(c, [])) for c in SELECTION_CATEGORIES}
        else:
            selections = {c: list(PUBLIC_SELECTIONS.get(c, [])) for c in SELECTION_CATEGORIES}
        return {"info": {
            "selections": selections,
            "access": {"level": key.level, "type": ACCESS_TYPES[key.level],
                       "faction": False, "company": False,
                       "log": {"custom_permissions": False, "available": []}},
            "user": {"id": player.id, "faction_id": player.faction_id, "company_id": None},
        }}

    @staticmethod
    def status(player: Player) -> dict:
        """UserStatus."""
        return {"description": player.description, "details": None, "state": player.state,
                "color": "green" if player.state == "Okay" else "red", "until": player.until}

    @staticmethod
    def last_action() -> dict:
        """UserLastAction."""
        return {"status": "Online", "timestamp": int(time.time()), "relative": "0 minutes ago"}

    def user_basic(self, player: Player) -> dict:
        """UserBasic."""
        return {"id": player.id, "name": player.name, "level": player.level, "gender": "Enby",
                "status": self.status(player)}

    def user_profile(self, player: Player) -> dict:
        """UserProfileResponse.profile."""
        return {
            "id": player.id, "name": player.name, "level": player.level, "rank": "Average",
            "title": "Hitman", "age": 1000, "signed_up": 1_600_000_000,
            "faction_id": player.faction_id, "honor_id": 0,
            "property": {"id": 1, "name": "Shack"}, "image": None, "gender": "Enby",
            "revivable": False, "role": "Civilian", "status": self.status(player),
            "spouse": None, "awards": 0, "friends": 0, "enemies": 0, "forum_posts": 0,
            "karma": 0, "last_action": self.last_action(),
            "life": {"current": 100, "maximum": 100}, "donator_status": None,
            "revive_setting": "No one",
        }

    def faction_member(self, player: Player) -> dict:
        """FactionMember."""
        return {"id": player.id, "name": player.name, "position": "Member",
                "level": player.level, "days_in_faction": 100, "is_revivable": False,
                "is_on_wall": False, "is_in_oc": False, "has_early_discharge": False,
                "last_action": self.last_action(), "status": self.status(player),
                "revive_setting": "Unknown"}


def demo(fake: FakeTorn) -> list[str]:
    """Two factions at war, a few players; returns a line per key for the console."""
    now = int(time.time())
    war = {"war_id": 9001, "start": now - 3600, "end": None, "target": 10000, "winner": None,
           "factions": [{"id": 111, "name": "Red", "score": 120, "chain": 30},
                        {"id": 222, "name": "Blue", "score": 80, "chain": 12}]}
    fake.add_faction(111, "Red", war)
    fake.add_faction(222, "Blue", war)
    lines = []
    for pid, name, faction in ((1001, "Ann", 111), (1002, "Bob", 111), (2001, "Zed", 222)):
        key = fake.add_player(pid, name, faction)
        lines.append(f"  {key}  {name} [{pid}], faction {faction}")
    return lines


async def _main(port: int, latency: float) -> None:
    fake = FakeTorn(port=port)
    fake.latency = latency
    lines = demo(fake)
    await fake.start()
    print(f"fake Torn API on {fake.base_url}", flush=True)
    for line in lines:
        print(line, flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description="A fake Torn API v2 on loopback.")
    parser.add_argument("--port", type=int, default=8099)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds per request")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(args.port, args.latency))


if __name__ == "__main__":
    main()
