"""The userscript (torn-war-caller.user.js) in a real headless Chromium.

Each test serves an imitation of Torn's ranked-war page from its own origin (a
small HTTP server below, with Torn's hidden `#torn-user` input and enemy rows
that the page's own script renders late, as Torn's does), loads the userscript
into it the way a userscript manager would, and points it at the real server
(`python torncat_sse.py`) on a real PostgreSQL.

No userscript manager is shipped or fetched: none is published where CI can reach it,
and a build of one may not be shipped with the project. What stands in for them behaves
as the real ones were MEASURED to (../shared/managers/README.md: ScriptCat 1.5 in
Chromium, Violentmonkey 2.47 in Firefox ESR), each rule citing its line (GM_SHIM below),
or as TornPDA is known to from its source (PDA_SHIM). `GM_xmlhttpRequest` runs outside
the page, as the managers' does, so the page's CSP and CORS do not apply to it: a
Playwright binding makes the real HTTP request from Python and hands the body to the page
as it arrives. The war pages send Torn's CSP (or `connect-src 'self'`), so a request the
page made itself would be blocked and reported: the tests prove the script goes through GM.

The cases that were run in the real ScriptCat (on https://www.torn.com, under Torn's CSP
as a real header) run against the ScriptCat-like stand-in there; with
TORNCAT_REAL_MANAGER naming an unpacked ScriptCat a developer built locally, they run once
more in it (docs/testing.md).

Chromium is Debian's (`apt-get install chromium`; `.ci/run` does it). Without it
these tests fail: they never skip.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import html
import itertools
import json
import os
import re
import shutil
import signal
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from playwright.async_api import BrowserContext, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError
from playwright.async_api import TimeoutError as PlaywrightTimeoutError

from fake_torn import FakeTorn
from testkit import (
    HERE,
    STEP_TIMEOUT,
    free_port,
    healthz,
    http,
    make_tls_files,
    pg_execute,
    read_chunk,
    run_cli,
    wait_until,
)

pytestmark = [pytest.mark.browser, pytest.mark.asyncio(loop_scope="module")]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # Without these Chromium keeps calling home, and this machine has no network.
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
USERSCRIPT = (HERE / "torn-war-caller.user.js").read_text()
ARTIFACTS = HERE / "artifacts"
FACTION = 123
TOKEN = "faction-123-browser-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
STEP_MS = STEP_TIMEOUT * 1000
# "Within a second" (the issue's bar) is measured, not asserted: a timed assertion flakes on a
# busy 2-core machine. Each run records how long a call and an uncall took to cross from one
# browser to the other in artifacts/propagation.json; the tests themselves wait STEP_TIMEOUT.
PROPAGATION = ARTIFACTS / "propagation.json"


def record_propagation(transport: str, what: str, seconds: float) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    seen = json.loads(PROPAGATION.read_text()) if PROPAGATION.exists() else {}
    seen[f"{transport} {what}"] = round(seconds, 3)
    PROPAGATION.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    print(f"{transport}: {what} crossed browsers in {seconds * 1000:.0f} ms")
STRICT_CSP = "connect-src 'self'"
# Per case: seconds from navigation start to "live" (a fresh browser, then a reload that starts
# with what it remembered), and from a POST /calls elsewhere to the call shown on the page.
TIMINGS = ARTIFACTS / "transports.json"


def record_timing(case: str, what: str, value) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    seen = json.loads(TIMINGS.read_text()) if TIMINGS.exists() else {}
    seen.setdefault(case, {})[what] = value
    TIMINGS.write_text(json.dumps(seen, indent=1, sort_keys=True) + "\n")
    print(f"{case}: {what} = {value}")

expect.set_options(timeout=STEP_MS)


@dataclass(frozen=True)
class Member:
    id: int
    name: str


ALICE, BOB, CY, DEE = Member(1001, "Alice"), Member(1002, "Bob"), Member(1003, "Cy"), Member(1004, "Dee")
MEMBERS = {m.id: m for m in (ALICE, BOB, CY, DEE)}
ENEMIES = {2001: "Xena", 2002: "Yuri", 2003: "Zed"}


# ---------------------------------------------------------------------------
# The imitation of Torn's war page
# ---------------------------------------------------------------------------

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Faction War | TORN</title>
<link rel="stylesheet" href="/torn.css">
</head>
<body>
<input type="hidden" id="torn-user" value="{user}">
<div class="header">TORN</div>
<div class="content-wrapper"><div id="factions"><div class="faction-war">
  <div class="your-faction tab-menu-cont"><div class="white-grad">Your faction</div>
    <div class="members-cont"><ul class="members-list">{own}</ul></div></div>
  <div class="enemy-faction tab-menu-cont"><div class="white-grad">Enemy faction</div>
    <div class="members-cont"><ul class="{enemy_list}" data-row-class="{row_class}"></ul></div></div>
</div></div></div>
<script src="/war.js" nonce="{nonce}"></script>
</body></html>
"""

# An external sheet: Torn's CSP has no style-src, so default-src 'self' would block a <style>.
TORN_CSS = """
body { margin: 0; background: #191919; color: #ddd; font: 12px Arial, sans-serif; }
.header { background: #333; padding: 10px; font-weight: bold; }
.content-wrapper { max-width: 640px; padding: 8px; }
.white-grad { background: #444; padding: 6px 8px; font-weight: bold; }
.members-list { list-style: none; margin: 0 0 12px; padding: 0; }
.members-list > li { display: flex; gap: 8px; align-items: center; padding: 6px 8px;
  border-bottom: 1px solid #333; }
.members-list .member { flex: 1; }
a { color: #8bf; }
"""

# Torn's Content-Security-Policy as Tampermonkey issue #1919 quotes it (../shared/USERS.md),
# with a default-src 'self' and a fixed nonce. Our server (127.0.0.1) is in no list of it.
TORN_CSP = ("default-src 'self'; connect-src 'self' wss://*.torn.com wss://*.torncity.com *.torncity.com "
            "*.torn.com api.torn.com www.google-analytics.com www.facebook.com *.sendbird.com; "
            "script-src 'nonce-t0rn' 'self' *.torn.com; frame-src 'self'; child-src 'self'; "
            "worker-src 'self' blob:")
NONCE = "t0rn"
TORN_ORIGIN = "https://www.torn.com"

ROW = ('<li><div class="member icons"><a class="user name" href="/profiles.php?XID={id}" '
       'data-placeholder="{name} [{id}]"><span>{name}</span></a></div><div class="level">{level}</div>'
       '<div class="status">Okay</div><div class="attack">'
       '<a href="/loader.php?sid=attack&amp;user2ID={id}">Attack</a></div></li>')

# Torn's own code renders the enemy list after the page has loaded (it is a React app).
WAR_JS = """
const ENEMIES = ENEMIES_JSON, ROW = ROW_JSON;
setTimeout(() => {
  const list = document.querySelector('.enemy-faction ul');
  for (const [id, name] of ENEMIES) {
    const li = document.createElement('li');
    li.className = list.dataset.rowClass;
    li.innerHTML = ROW.replaceAll('{id}', id).replaceAll('{name}', name).replaceAll('{level}', 40 + id % 9);
    list.append(li);
  }
  document.body.dataset.warRendered = 'yes';
}, 150);
""".replace("ENEMIES_JSON", json.dumps(list(ENEMIES.items()))).replace(
    "ROW_JSON", json.dumps(ROW.removeprefix("<li>").removesuffix("</li>")))


# The markups Torn has used for the enemy list: (class of the list, class of each row).
LAYOUTS = {
    "classic": ("members-list", ""),          # .enemy-faction .members-list > li
    "hashed": ("membersWrap___Xy12", ""),     # React builds with hashed class names
    "li-enemy": ("table-body", "enemy"),      # rows marked li.enemy
}

ATTACK_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Attack | TORN</title>
<link rel="stylesheet" href="/torn.css"></head>
<body><input type="hidden" id="torn-user" value="{user}">
<div class="header">TORN</div><div class="content-wrapper" id="react-root">Attacking [{target}]</div>
</body></html>
"""


class TornSite:
    """The imitation war page on its own origin, with an optional Content-Security-Policy.

    With `ssl` it is `https://www.torn.com` for a browser started with
    `--host-resolver-rules` (the real-manager pass); it then also serves the userscript,
    for the manager to install from a URL. With `served_as` set, it is that origin for a
    browser context whose requests to it Playwright routes here (`Harness.context`).
    """

    def __init__(self, ssl_context=None, userscript: str = ""):
        self.csp: str | None = None
        self.served_as: str | None = None
        self.layout = "classic"
        self.port = 0
        self.ssl = ssl_context
        self.userscript = userscript
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TornSite:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    @property
    def origin(self) -> str:
        return TORN_ORIGIN if self.ssl else self.served_as or self.local

    @property
    def local(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, member: Member) -> str:
        return f"{self.origin}/factions.php?step=your&as={member.id}#/war/rank"

    def page(self, query: dict[str, list[str]]) -> bytes:
        member = MEMBERS[int(query["as"][0])]
        user = json.dumps({"id": member.id, "playername": member.name, "factionID": FACTION})
        own = "".join(ROW.format(id=m.id, name=m.name, level=10) for m in MEMBERS.values())
        enemy_list, row_class = LAYOUTS[self.layout]
        return PAGE.format(user=html.escape(user), own=own, nonce=NONCE, enemy_list=enemy_list,
                           row_class=row_class).encode()

    def attack_page(self, query: dict[str, list[str]]) -> bytes:
        member = MEMBERS[int(query["as"][0])]
        user = json.dumps({"id": member.id, "playername": member.name, "factionID": FACTION})
        return ATTACK_PAGE.format(user=html.escape(user), target=int(query["user2ID"][0])).encode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP_TIMEOUT)
            url = urllib.parse.urlsplit(head.split(b" ", 2)[1].decode())
            headers = [("Cache-Control", "no-store"), ("Connection", "close")]
            if url.path in ("/factions.php", "/page.php", "/loader.php"):
                query = urllib.parse.parse_qs(url.query)
                page = self.page if url.path == "/factions.php" else self.attack_page
                status, body = "200 OK", page(query)
                headers.append(("Content-Type", "text/html; charset=utf-8"))
                if self.csp:
                    headers.append(("Content-Security-Policy", self.csp))
            elif url.path == "/war.js":
                status, body = "200 OK", WAR_JS.encode()
                headers.append(("Content-Type", "text/javascript"))
            elif url.path == "/torn.css":
                status, body = "200 OK", TORN_CSS.encode()
                headers.append(("Content-Type", "text/css"))
            elif url.path == "/torn-war-caller.user.js" and self.userscript:
                status, body = "200 OK", self.userscript.encode()
                headers.append(("Content-Type", "text/javascript"))
            else:
                status, body = "404 Not Found", b"not found"
                headers.append(("Content-Type", "text/plain"))
            headers.append(("Content-Length", str(len(body))))
            writer.write(f"HTTP/1.1 {status}\r\n".encode()
                         + "".join(f"{k}: {v}\r\n" for k, v in headers).encode() + b"\r\n" + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, TimeoutError,
                ssl.SSLError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def close(self) -> None:
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()


# ---------------------------------------------------------------------------
# The userscript manager: GM_xmlhttpRequest (and TornPDA's PDA_http*) from Python
# ---------------------------------------------------------------------------

class Upstream:
    """One request a page asked the manager to make, its body read on demand."""

    def __init__(self, page: Page, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 headers: dict[str, str]):
        self.page, self.reader, self.writer = page, reader, writer
        self.chunked = headers.get("transfer-encoding") == "chunked"
        length = headers.get("content-length")
        self.remaining = int(length) if length is not None else None
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.done = False
        self.aborted = False
        self.doc: str | None = None  # the document that asked for it
        self.path = ""
        self.silenced: asyncio.Event | None = None  # set: a link that died without an end

    async def read(self) -> str | None:
        """The next piece of the body as text; None at its end."""
        if self.silenced is not None:
            await self.silenced.wait()  # nothing more, ever, until the page gives up on it
            return None
        while not self.done:
            try:
                if self.chunked:
                    data = await read_chunk(self.reader)
                elif self.remaining is not None:
                    data = await self.reader.read(min(self.remaining, 65536)) if self.remaining else b""
                    if self.remaining and not data:
                        raise ConnectionError("the body ended early")
                    self.remaining -= len(data)
                else:
                    data = await self.reader.read(65536)
            except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
                self.close()
                if self.aborted:
                    return None
                raise ConnectionError("network error: the connection broke") from e
            if not data:
                self.done = True
                self.close()
                return self.decoder.decode(b"", final=True) or None
            text = self.decoder.decode(data)
            if text:
                return text
        return None

    def close(self) -> None:
        self.done = True
        if self.silenced is not None:
            self.silenced.set()
        self.writer.close()


# A held long-poll answers within the server's MAX_WAIT_SECONDS (30 s); a little more for a busy machine.
HELD_ANSWER_TIMEOUT = 40.0


def parse_response_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


class Manager:
    """What Tampermonkey's background page does for GM_xmlhttpRequest: real requests, outside the page."""

    def __init__(self):
        self.upstreams: dict[int, Upstream] = {}
        self.ids = itertools.count(1)
        self.requests: list[dict] = []  # every request made: method, url, headers
        self.cut_streams = False  # like a buffering proxy: /events answers 200, then ends at once
        self.hold_streams: asyncio.Event | None = None  # /events waits for this before it connects
        self.connecting: dict[asyncio.StreamWriter, tuple[Page, str | None, str | None]] = {}  # no head yet
        self.drop_wait = False  # like a server from before long-poll: `?wait=` is not passed on

    async def install(self, context: BrowserContext) -> None:
        await context.expose_binding("__tcOpen", self.open)
        await context.expose_binding("__tcRead", self.read)
        await context.expose_binding("__tcAbort", self.abort)
        await context.expose_binding("__tcFetch", self.fetch)
        await context.expose_binding("__tcDocument", self.document)
        context.on("page", lambda page: page.on("close", self.page_closed))

    async def open(self, source, req: dict) -> dict:
        url = urllib.parse.urlsplit(req["url"])
        assert url.hostname == "127.0.0.1", req["url"]
        self.requests.append({"method": req["method"], "url": req["url"], "headers": dict(req["headers"])})
        if self.hold_streams and url.path == "/events":
            await self.hold_streams.wait()
        body = req["data"].encode() if req.get("data") is not None else b""
        headers = {"Host": url.netloc, "Connection": "close", **req["headers"]}
        if body or req["method"] in ("POST", "PUT"):
            headers["Content-Length"] = str(len(body))
        query = url.query
        if self.drop_wait:
            query = urllib.parse.urlencode([(k, v) for k, v in urllib.parse.parse_qsl(query) if k != "wait"])
        target = (url.path or "/") + (f"?{query}" if query else "")
        try:
            reader, writer = await asyncio.open_connection(url.hostname, url.port)
        except OSError as e:
            raise ConnectionError("network error: cannot connect") from e
        # A held long-poll has no head yet: it can still be aborted, and ends with its page.
        self.connecting[writer] = (source["page"], req.get("key"), req.get("doc"))
        try:
            writer.write(f"{req['method']} {target} HTTP/1.1\r\n".encode()
                         + "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode() + b"\r\n" + body)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HELD_ANSWER_TIMEOUT)
            status, response_headers = parse_response_head(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError,
                TimeoutError) as e:
            writer.close()
            raise ConnectionError("network error: no response") from e
        finally:
            self.connecting.pop(writer, None)
        upstream_id = next(self.ids)
        self.upstreams[upstream_id] = upstream = Upstream(source["page"], reader, writer, response_headers)
        upstream.doc, upstream.path = req.get("doc"), url.path
        if self.cut_streams and url.path == "/events":
            upstream.close()
        return {"id": upstream_id, "status": status, "statusText": "",
                "headers": "".join(f"{k}: {v}\r\n" for k, v in response_headers.items())}

    async def read(self, source, upstream_id: int) -> str | None:
        upstream = self.upstreams.get(upstream_id)
        if upstream is None:
            return None
        text = await upstream.read()
        if text is None:
            self.upstreams.pop(upstream_id, None)
        return text

    def abort(self, source, upstream_id: int | str) -> None:
        """End a request: by its id once it has a head, by the page's key before."""
        for writer, (_, key, _) in list(self.connecting.items()):
            if key is not None and key == upstream_id:
                writer.close()
        upstream = self.upstreams.pop(upstream_id, None)
        if upstream is not None:
            upstream.aborted = True
            upstream.close()

    async def fetch(self, source, req: dict) -> dict:
        """A whole request at once (TornPDA's PDA_httpGet / PDA_httpPost)."""
        head = await self.open(source, req)
        text = ""
        while (piece := await self.read(source, head["id"])) is not None:
            text += piece
        return {"status": head["status"], "statusText": "", "responseHeaders": head["headers"],
                "responseText": text}

    def silence_streams(self) -> None:
        """Every open stream goes silent with no end (a half-open TCP link: the server's bytes
        never arrive and nothing says so), until the page aborts it."""
        for upstream in self.upstreams.values():
            if upstream.path == "/events":
                upstream.silenced = asyncio.Event()

    def document(self, source, doc: str) -> None:
        """A new document in a tab (a reload, a link followed): the requests of the one before
        end with it, as a manager's do (ScriptCat: RM-7). The page's own `pagehide` cannot
        tell us: a binding called while a document unloads never arrives."""
        page = source["page"]
        for upstream_id, upstream in list(self.upstreams.items()):
            if upstream.page is page and upstream.doc != doc:
                self.abort(None, upstream_id)
        for writer, (its_page, _, its_doc) in list(self.connecting.items()):
            if its_page is page and its_doc != doc:
                writer.close()

    def page_closed(self, page: Page) -> None:
        """A closed tab's requests end with it, as the real managers do."""
        for upstream_id, upstream in list(self.upstreams.items()):
            if upstream.page is page:
                self.abort(None, upstream_id)
        for writer, (its_page, _, _) in list(self.connecting.items()):
            if its_page is page:
                writer.close()

    def close(self) -> None:
        for upstream_id in list(self.upstreams):
            self.abort(None, upstream_id)
        for writer in list(self.connecting):
            writer.close()


# GM_xmlhttpRequest stand-ins. Each behaves as a real manager was MEASURED to, in a real
# browser on a page served as https://www.torn.com with Torn's CSP
# (../shared/managers/README.md, quoted as "managers/README.md:LINE"), or as it was
# reported from the field (../shared/USERS.md). What no measurement says is marked
# "(not measured)", with where the choice comes from. Common to both measured managers:
# `GM_xmlhttpRequest.RESPONSE_TYPE_STREAM` is undefined (managers/README.md:18, :38), the
# request is made outside the page (so the page's CSP and CORS do not apply), and a
# server that dies mid-body ends the request the way a clean end does (:23-26, :48-49).
#   "scriptcat": ScriptCat 1.5 (MV3) in Chromium, managers/README.md:14-33.
#     - `responseType: "stream"`: onloadstart hands over a ReadableStream in `response`
#       (:20-21), before the answer's status is known (:27-28: a 401 still gets a stream);
#       onreadystatechange 2 then carries the status (:28); each chunk is enqueued as it
#       arrives (:21-22).
#     - the server closes or dies: onreadystatechange (readyState 4), onload and onloadend
#       fire, and the ReadableStream is NEVER closed or errored (:23-26). Cancelling it does
#       not end the request (ScriptCat's source gives it no cancel(); not measured).
#     - without a `responseType`: onreadystatechange 1, 2, 3 and onprogress per chunk, but
#       `responseText` stays undefined until the request completes (:29-30). ScriptCat drops
#       an onreadystatechange whose readyState and status did not change (its gm_xhr.ts),
#       so 3 fires once.
#   Measured again in a local build of ScriptCat 1.5.0-beta.2 (docs/testing.md, "What the
#   real-manager pass measured", RM below):
#     - onreadystatechange 1 comes before onloadstart without a `responseType`, and never
#       with `responseType: "stream"` (RM-1).
#     - a refused answer's body goes into the stream like any other, then readyState 4,
#       onload, onloadend (RM-2); a refused connection: onloadstart (with a stream), then
#       onerror (readyState 4, status 0), onloadend (RM-3).
#     - cancelling the handed-over stream ends the script's read but not the request: the
#       manager goes on receiving, and onprogress goes on firing (RM-4).
#     - abort(): onabort (readyState 0, status 0), then onloadend; without an onabort
#       handler, neither fires (RM-5). A `timeout` ends with ontimeout, then onloadend (RM-6).
#   "violentmonkey": Violentmonkey 2.47 (MV2) in Firefox ESR, managers/README.md:35-53.
#     - `responseType: "stream"` is unknown and falls back to text (:38-39): `response` is a
#       string holding only the latest chunk, never a ReadableStream, and `responseText`
#       stays empty (:40-42).
#     - without a `responseType`: onloadstart, onreadystatechange 2, 3 per chunk, 4, and
#       onprogress per chunk; `responseText` grows with every chunk while the request is
#       open (:43-47).
#     - the server killed: readyState 4 with status 200, onload, onloadend, no onerror
#       (:48-49). A refused connection: readyState 4, status 0, onerror (status 0, no text),
#       onloadend (:49-50).
#   "no-loadstart": reported from the field, not measured (../shared/USERS.md, a public
#     war tool's ADR): with `responseType: "stream"`, nothing reaches the script until the
#     request ends. Otherwise as "scriptcat".
# In all of them `timeout` ends a request with ontimeout and onloadend (RM-6; Violentmonkey
# as its API documents it, not measured), and abort() with onabort then onloadend (RM-5;
# Violentmonkey: not measured).
GM_SHIM = """
(() => {
  const MODE = %s;
  const STORE = 'gmshim:';
  window.GM_getValue = (k, d) => {
    const v = localStorage.getItem(STORE + k);
    return v === null ? d : JSON.parse(v);
  };
  window.GM_setValue = (k, v) => localStorage.setItem(STORE + k, JSON.stringify(v));
  window.GM_info = { scriptHandler: 'TornCat test stand-in (' + MODE + ')', version: '0' };
  window.__gmRequests = [];
  let requestKeys = 0;
  const encoder = new TextEncoder();
  function GM_xmlhttpRequest(d) {
    let id = null, aborted = false, finished = false, timer = null;
    const key = 'gm' + (++requestKeys) + ':' + Math.random();
    const asStream = d.responseType === 'stream';
    window.__gmRequests.push({ url: String(d.url), responseType: d.responseType || '' });
    const r = { readyState: 0, status: 0, statusText: '', responseHeaders: '', responseText: undefined,
                response: undefined, finalUrl: d.url, context: d.context };
    const fire = (name, extra) => {
      if (typeof d[name] !== 'function') return;
      try {
        d[name](Object.assign({}, r, extra));
      } catch (e) {
        console.error('handler ' + name + ' threw', e);
      }
    };
    let lastChange = '';
    const changed = (readyState) => {
      r.readyState = readyState;
      // ScriptCat drops a readystatechange whose readyState and status did not change.
      const now = readyState + ':' + r.status;
      if (MODE !== 'violentmonkey' && now === lastChange) return;
      lastChange = now;
      fire('onreadystatechange');
    };
    const scStream = MODE === 'scriptcat' && asStream;
    const silent = MODE === 'no-loadstart' && asStream;
    let controller = null;
    if (scStream) r.response = new ReadableStream({ start(c) { controller = c; } }); // no cancel()
    if (MODE === 'violentmonkey') r.responseText = '';
    const end = () => {
      finished = true;
      clearTimeout(timer);
    };
    if (d.timeout > 0) {
      timer = setTimeout(() => {
        if (finished || aborted) return;
        aborted = true;
        end();
        window.__tcAbort(id !== null ? id : key);
        fire('ontimeout');
        fire('onloadend');
      }, d.timeout);
    }
    (async () => {
      await Promise.resolve(); // handlers run after GM_xmlhttpRequest has returned
      if (aborted) return;
      if (!silent) {
        // ScriptCat: readyState 1 before onloadstart without a responseType, none with a stream (RM-1).
        if (MODE !== 'violentmonkey' && !scStream) changed(1);
        r.readyState = 1;
        fire('onloadstart');
      }
      let head;
      try {
        head = await window.__tcOpen({ method: d.method || 'GET', url: String(d.url),
                                       headers: d.headers || {}, key, doc: window.__tcDoc,
                                       data: d.data == null ? null : String(d.data) });
      } catch (e) {
        if (aborted) return;
        end();
        r.readyState = 4;
        if (MODE === 'violentmonkey') fire('onreadystatechange');
        fire('onerror', { error: 'network error' });
        fire('onloadend');
        return;
      }
      id = head.id;
      if (aborted) { window.__tcAbort(id); return; }
      Object.assign(r, { status: head.status, statusText: head.statusText, responseHeaders: head.headers });
      if (!silent) changed(2);
      let text = '';
      for (;;) {
        let piece;
        try {
          piece = await window.__tcRead(id);
        } catch (e) {
          piece = null; // the server died mid-body: it ends like a clean end
        }
        if (aborted) return;
        if (piece === null) break;
        text += piece;
        if (scStream) {
          try {
            controller.enqueue(encoder.encode(piece));
          } catch (e) {
            // the script cancelled the stream: the request goes on all the same (RM-4)
          }
        }
        if (silent) continue;
        if (MODE === 'violentmonkey') {
          r.response = piece;
          r.responseText = asStream ? '' : text;
          if (!asStream) r.response = text;
        }
        changed(3);
        fire('onprogress', { loaded: text.length, lengthComputable: false, total: 0 });
      }
      end();
      if (!scStream) {
        r.responseText = MODE === 'violentmonkey' && asStream ? '' : text;
        if (!(MODE === 'violentmonkey' && asStream)) r.response = text;
      }
      changed(4);  // the ReadableStream, if any, is left as it is: never closed, never errored
      fire('onload');
      fire('onloadend');
    })();
    return { abort() {
      if (aborted || finished) return;
      aborted = true;
      end();
      window.__tcAbort(id !== null ? id : key);
      if (typeof d.onabort !== 'function') return;  // then nothing fires at all (RM-5)
      Object.assign(r, { readyState: 0, status: 0 });
      fire('onabort');
      Promise.resolve().then(() => fire('onloadend'));
    } };
  }
  window.GM_xmlhttpRequest = GM_xmlhttpRequest;
})();
"""

# TornPDA: PDA_httpGet/PDA_httpPost resolve only with the complete response, and a GET of
# the same URL within 2 s of the last one resolves to `undefined` without a request
# (remote_snippets.dart). Its GMforPDA shim puts a GM_xmlhttpRequest on top that never
# streams. No EventSource.
PDA_SHIM = """
(() => {
  const SAME_URL_MS = 2000;
  window.__pdaRequests = [];
  window.__pdaDeduplicated = [];
  const lastGet = new Map();
  const call = (method, url, headers, data) => {
    if (method === 'GET') {
      const last = lastGet.get(url);
      lastGet.set(url, Date.now());
      if (last !== undefined && Date.now() - last < SAME_URL_MS) {
        window.__pdaDeduplicated.push(url);
        return Promise.resolve(undefined);
      }
    }
    window.__pdaRequests.push({ method, url, headers: Object.assign({}, headers) });
    return window.__tcFetch({ method, url, headers: headers || {}, doc: window.__tcDoc,
                              data: data == null ? null : String(data) });
  };
  window.PDA_httpGet = (url, headers = {}) => call('GET', url, headers, null);
  window.PDA_httpPost = (url, headers, body) => call('POST', url, headers, body);
  window.GM_info = { scriptHandler: 'GMforPDA', version: '0' };
  window.GM_xmlhttpRequest = (d) => {
    const r = { readyState: 4, finalUrl: d.url };
    const pending = (d.method || 'GET') === 'GET' ? window.PDA_httpGet(d.url, d.headers)
      : window.PDA_httpPost(d.url, d.headers, d.data);
    Promise.resolve(pending).then((x) => {
      if (!x) { if (d.onerror) d.onerror(r); return; }
      Object.assign(r, x, { response: x.responseText });
      if (d.onload) d.onload(r);
    }, () => { if (d.onerror) d.onerror(r); });
    return { abort() {} };
  };
  delete window.EventSource;
})();
"""

# Records what a test needs to see afterwards: every status the panel showed (and when it
# first said "live", in ms since navigation started), CSP violations, dialogs.
WATCH = """
(() => {
  // changes: [wall-clock ms, status, transport, the status line's title] of each change
  window.__tc = { statuses: [], shown: [], changes: [], violations: [], liveAt: null, liveBy: null };
  document.addEventListener('securitypolicyviolation',
    (e) => window.__tc.violations.push(e.violatedDirective + ' ' + e.blockedURI));
  new MutationObserver((ms) => {
    for (const m of ms) {
      if (m.target.id !== 'torncat-panel') continue;
      window.__tc.statuses.push(m.target.dataset.status);
      window.__tc.shown.push(m.target.dataset.status + ' ' + m.target.dataset.transport);
      const line = m.target.querySelector('.tc-status');
      window.__tc.changes.push([performance.timeOrigin + performance.now(), m.target.dataset.status,
                                m.target.dataset.transport, line ? line.title : '']);
      if (m.target.dataset.status === 'live' && window.__tc.liveAt === null) {
        window.__tc.liveAt = performance.now();
        window.__tc.liveBy = m.target.dataset.transport;
      }
    }
  }).observe(document, { subtree: true, attributes: true, attributeFilter: ['data-status'] });
})();
"""

# Each document names itself to the manager stand-in, which ends the requests of the
# document before it in the same tab (Manager.document).
DOCUMENT = """
window.__tcDoc = Math.random().toString(36).slice(2);
window.__tcDocument(window.__tcDoc);
"""

SEED = """
(() => {
  const prefix = %s, settings = %s;
  if (localStorage.getItem(prefix + 'torncat.configured') === null) {
    for (const [k, v] of Object.entries(settings)) {
      localStorage.setItem(prefix + 'torncat.' + k, JSON.stringify(v));
    }
  }
})();
"""

# case -> (shim, storage prefix of the settings, the transport the panel shows once live)
TRANSPORTS = {
    "scriptcat": (GM_SHIM % json.dumps("scriptcat"), "gmshim:", "stream"),
    "violentmonkey": (GM_SHIM % json.dumps("violentmonkey"), "gmshim:", "stream"),  # from responseText
    "no-loadstart": (GM_SHIM % json.dumps("no-loadstart"), "gmshim:", "long-poll"),
    "eventsource": ("", "", "EventSource"),
    "pda": (PDA_SHIM, "", "long-poll"),
    "no-gm": ("", "", None),  # under Torn's CSP: nothing the page does may reach the server
}
GM_CASES = ("scriptcat", "violentmonkey", "no-loadstart")


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def chromium() -> str:
    """Debian's Chromium; missing is a failure, never a skip."""
    assert os.path.isfile(CHROMIUM), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium), "
        "as .ci/run does, or point $CHROMIUM at a Chromium binary")
    return CHROMIUM


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser():
    executable = chromium()
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield b
        await b.close()


class Harness:
    """One test's war page site, userscript manager, servers and browser contexts."""

    def __init__(self, browser, db: str, start_server):
        self.browser, self.db, self._start_server = browser, db, start_server
        self.site = TornSite()
        self.manager = Manager()
        self.server = None
        self.contexts: list[BrowserContext] = []
        self.errors: list[str] = []
        self.dialogs: list[str] = []

    async def start(self, **env):
        """The real server (in a thread: starting it blocks until it listens). `script`: the
        server file to run, another copy of it (testkit.ServerProcess)."""
        env = {"DATABASE_URL": self.db, "FACTION_TOKENS": f"{FACTION}:{TOKEN}",
               "ALLOWED_ORIGINS": self.site.origin, "RETRY_MS": "1000",
               "RECONNECT_SPREAD_SECONDS": "1", **env}
        self.server = await asyncio.to_thread(self._start_server, **env)
        return self.server

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    async def context(self, transport: str, *, phone: bool = False, configured: bool = True,
                      before: str = "", script: str = USERSCRIPT) -> BrowserContext:
        shim, prefix, _ = TRANSPORTS[transport]
        viewport = {"width": 390, "height": 760} if phone else {"width": 1280, "height": 800}
        context = await self.browser.new_context(viewport=viewport, is_mobile=phone, has_touch=phone)
        self.contexts.append(context)
        await self.manager.install(context)
        seed = SEED % (json.dumps(prefix), json.dumps(
            {"server": self.base, "token": TOKEN, "configured": True} if configured else {}))
        await context.add_init_script(script="\n".join((WATCH, DOCUMENT, seed, shim, before, script)))
        if self.site.served_as:  # the war page at Torn's origin, its CSP a real response header
            await context.route(f"{self.site.served_as}/**", self._serve_site)
        return context

    async def _serve_site(self, route) -> None:
        url = self.site.local + route.request.url.removeprefix(self.site.served_as)
        with contextlib.suppress(PlaywrightError):  # the page closed meanwhile
            await route.fulfill(response=await route.fetch(url=url))

    async def page(self, context: BrowserContext, member: Member) -> Page:
        page = await context.new_page()
        page.on("pageerror", lambda e: self.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.errors.append(m.text) if "[TornCat]" in m.text else None)
        page.on("dialog", lambda d: (self.dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
        await page.goto(self.site.url(member))
        await expect(page.locator("#torncat-panel")).to_be_visible()
        return page

    async def open(self, member: Member, transport: str, **kw) -> Page:
        """A browser of its own (a context) with one war page, for one member."""
        return await self.page(await self.context(transport, **kw), member)

    async def describe(self) -> str:
        """What each page showed and went through, the manager's last requests and the
        server's last log lines: for a test that failed, what a flake leaves to go on."""
        out = []
        for i, context in enumerate(self.contexts):
            for j, page in enumerate(context.pages):
                try:
                    text = await page.locator("#torncat-panel").inner_text(timeout=2000)
                    changes = await page.evaluate("window.__tc && window.__tc.changes")
                except Exception as e:  # a page that closed, or never had a panel
                    text, changes = f"({type(e).__name__}: {e})", None
                out.append(f"--- context {i} page {j} {page.url}\n{text}\nstatus changes: {changes}")
        out.append(f"--- manager's last requests: {self.manager.requests[-10:]}")
        out.append(f"--- page errors: {self.errors}  dialogs: {self.dialogs}")
        if self.server is not None:
            out.append(f"--- server log:\n{self.server.log_tail(60)}")
        return "\n".join(out)

    async def close(self) -> None:
        for context in self.contexts:
            with contextlib.suppress(Exception):
                await context.close()
        self.manager.close()
        await self.site.close()

    async def assert_clean(self, *pages: Page) -> None:
        """The script never threw into the page, opened no dialog, and the page is Torn's still."""
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs
        for page in pages:
            assert await page.locator(".your-faction .tc-cell").count() == 0  # never on our own side
            await expect(page.locator(".enemy-faction .attack a")).to_have_count(len(ENEMIES))


@pytest_asyncio.fixture(loop_scope="module")
async def h(browser, db, start_server, request):
    harness = Harness(browser, db, start_server)
    await harness.site.start()
    yield harness
    report = getattr(request.node, "report_call", None)
    if report is not None and report.failed:
        print(await harness.describe())  # shown under the failure, as "Captured stdout teardown"
    await harness.close()


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------

def panel(page: Page):
    return page.locator("#torncat-panel")


def panel_call(page: Page, target: int):
    return page.locator(f'#torncat-panel li.tc-call[data-target-id="{target}"]')


def row_cell(page: Page, target: int):
    return page.locator(f'.enemy-faction .tc-cell[data-target-id="{target}"]')


async def api_call(port: int, member: Member, target: int, target_name: str | None = None):
    body = {"target_id": target, "caller_id": member.id, "caller_name": member.name}
    if target_name is not None:
        body["target_name"] = target_name
    r = await http(port, "POST", "/calls", headers=AUTH, body=body)
    assert r.status == 201, r
    return r.json()


async def active_calls(port: int) -> dict[int, str]:
    r = await http(port, "GET", "/calls", headers=AUTH)
    assert r.status == 200, r
    return {c["target_id"]: c["caller_name"] for c in r.json()["calls"]}


def streams_opened(server) -> list[str]:
    return [line for line in server.lines if "stream opened" in line]


async def seconds_to_live(page: Page, transport: str | None) -> float:
    """Wait for "live" by `transport`; seconds from the page's navigation start to it."""
    await expect(panel(page)).to_have_attribute("data-status", "live")
    await expect(panel(page)).to_have_attribute("data-transport", transport)
    await expect(panel(page).locator(".tc-status")).to_have_text(f"live · {transport}")
    tc = await page.evaluate("window.__tc")
    assert tc["liveBy"] == transport, tc
    return round(tc["liveAt"] / 1000, 3)


# Resolves with the wall-clock time (ms) at which the page first shows the call on a target.
SHOWN = """(target) => { window.__tcShown = new Promise((done) => {
  const sel = '#torncat-panel li.tc-call[data-target-id="' + target + '"]';
  const now = () => performance.timeOrigin + performance.now();
  if (document.querySelector(sel)) { done(now()); return; }
  const seen = new MutationObserver(() => {
    if (document.querySelector(sel)) { seen.disconnect(); done(now()); }
  });
  seen.observe(document, { subtree: true, childList: true });
}); }"""


async def seconds_to_show(page: Page, port: int, member: Member, target: int, name: str | None) -> float:
    """POST /calls as another browser would; seconds until this page shows the call."""
    await page.evaluate(SHOWN, target)
    sent = time.time()
    await api_call(port, member, target, name)
    shown = await asyncio.wait_for(page.evaluate("window.__tcShown"), STEP_TIMEOUT)
    return round(shown / 1000 - sent, 3)


async def seconds_from_leader_close_to_call(leader: Page, other: Page, port: int) -> float:
    """Close the leader tab and at once POST a call (Bob on 2001) as another browser would:
    seconds from the close until the other tab, now the leader, shows it."""
    await other.evaluate(SHOWN, 2001)
    closed = time.time()
    await leader.close()
    await api_call(port, BOB, 2001, "Xena")
    shown_at = await asyncio.wait_for(other.evaluate("window.__tcShown"), STEP_TIMEOUT)
    return round(shown_at / 1000 - closed, 3)


# ---------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("transport", ["scriptcat", "violentmonkey", "eventsource"])
async def test_a_call_in_one_browser_shows_in_another_and_an_uncall_removes_it(h, transport):
    server = await h.start()
    if transport != "eventsource":
        h.site.csp = STRICT_CSP  # the page itself may not connect anywhere: only GM can
    alice = await h.open(ALICE, transport)
    bob = await h.open(BOB, transport, phone=True)
    for page in (alice, bob):
        await expect(panel(page)).to_have_attribute("data-status", "live")
        await expect(panel(page)).to_have_attribute("data-transport", TRANSPORTS[transport][2])
        await expect(panel(page).locator(".tc-status")).to_have_text(f"live · {TRANSPORTS[transport][2]}")
        await expect(panel(page).locator(".tc-empty")).to_have_text("No active calls")

    # The enemy rows come from Torn's own script after load; each gets a Call button.
    call_button = row_cell(alice, 2001).locator(".tc-call-btn")
    await expect(call_button).to_be_visible()
    started = time.monotonic()
    await call_button.click()
    await expect(panel_call(bob, 2001)).to_contain_text("Xena")
    record_propagation(transport, "call", time.monotonic() - started)
    await expect(panel_call(bob, 2001).locator(".tc-by")).to_have_text("by Alice")
    await expect(panel_call(bob, 2001).locator(".tc-target")).to_have_attribute(
        "href", "/profiles.php?XID=2001")
    await expect(panel_call(bob, 2001).locator(".tc-age")).to_have_text(re.compile(r"^\d+s$"))
    await expect(row_cell(bob, 2001)).to_have_text("called by Alice")
    await expect(row_cell(alice, 2001)).to_contain_text("called by you")
    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by you")
    await expect(bob.locator("#torncat-toasts")).to_contain_text("Alice called Xena")
    await expect(alice.locator("#torncat-toasts .tc-toast")).to_have_count(0)  # not for your own call

    # The server decides: Bob calling the same target by id is told who holds it.
    await bob.locator(".tc-call-input").fill("https://www.torn.com/profiles.php?XID=2001")
    await bob.locator(".tc-form .tc-call-btn").click()
    await expect(bob.locator("#torncat-toasts .tc-error")).to_have_text("Xena is already called by Alice")
    assert await active_calls(server.port) == {2001: "Alice"}

    # Two more calls from elsewhere, for the screenshot and the count.
    await api_call(server.port, CY, 2002, "Yuri")
    await api_call(server.port, DEE, 2003, "Zed")
    for page in (alice, bob):
        await expect(panel(page).locator("li.tc-call")).to_have_count(3)
        await expect(panel(page).locator(".tc-count")).to_have_text("3")
    if transport == "scriptcat":
        ARTIFACTS.mkdir(exist_ok=True)
        await panel(alice).screenshot(path=ARTIFACTS / "panel.png")
        await bob.screenshot(path=ARTIFACTS / "war-page-phone.png")
        docs_copy = HERE / "docs" / "panel.png"
        if not docs_copy.exists() or os.environ.get("UPDATE_SCREENSHOTS"):
            docs_copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(ARTIFACTS / "panel.png", docs_copy)

    # Uncall from Alice's panel: gone from Bob's page too.
    started = time.monotonic()
    await panel_call(alice, 2001).locator(".tc-uncall").click()
    await expect(panel_call(bob, 2001)).to_have_count(0)
    record_propagation(transport, "uncall", time.monotonic() - started)
    await expect(row_cell(bob, 2001).locator(".tc-call-btn")).to_be_visible()
    assert await active_calls(server.port) == {2002: "Cy", 2003: "Dee"}

    # Readable on a phone: the panel fits the 390 px screen.
    box = await panel(bob).bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390, box
    await h.assert_clean(alice, bob)
    if transport != "eventsource":
        # Every request went through GM: the page never tried to connect by itself.
        for page in (alice, bob):
            assert await page.evaluate("window.__tc.violations") == []
        assert any(r["url"].endswith("/events") and r["headers"]["Authorization"] == f"Bearer {TOKEN}"
                   for r in h.manager.requests)
        assert not any("token=" in r["url"] for r in h.manager.requests)


@pytest.mark.parametrize("resume", ["replay", "snapshot"])
async def test_pages_reconnect_after_a_server_restart_and_miss_no_call(h, resume):
    """The new server replays what the pages missed or, when their last id is too old for its
    memory (REPLAY_EVENTS=0 here), sends a snapshot that must replace what they show."""
    port = free_port()
    server = await h.start(PORT=str(port))
    h.site.csp = STRICT_CSP
    alice = await h.open(ALICE, "scriptcat")
    bob = await h.open(BOB, "pda")  # long-polls: TornPDA cannot stream
    await expect(panel(alice)).to_have_attribute("data-transport", "stream")
    await expect(panel(bob)).to_have_attribute("data-transport", "long-poll")
    for page in (alice, bob):
        await expect(panel(page)).to_have_attribute("data-status", "live")
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(bob, 2001)).to_contain_text("Alice")
    last_seen = (await healthz(port))["last_event_id"]

    # SIGTERM ends every stream cleanly with a `retry:`; the pages say they are reconnecting.
    before_restart = len(h.manager.requests)
    await asyncio.to_thread(server.stop)
    for page in (alice, bob):
        await page.wait_for_function("window.__tc.statuses.includes('reconnecting')")
    # While no server runs, the faction goes on: Alice's call ends, Cy calls another target.
    await pg_execute(h.db, "UPDATE target_calls SET uncalled_at = now() WHERE target_id = 2001")
    await pg_execute(h.db, "INSERT INTO target_calls (caller_id, caller_name, target_id, target_name, "
                           f"faction_id) VALUES ({CY.id}, 'Cy', 2002, 'Yuri', {FACTION})")

    server = await h.start(PORT=str(port), REPLAY_EVENTS="10000" if resume == "replay" else "0")
    for page in (alice, bob):
        await expect(panel_call(page, 2002)).to_contain_text("Cy", timeout=20_000)
        await expect(panel_call(page, 2001)).to_have_count(0)
        await expect(panel(page)).to_have_attribute("data-status", "live")
    # Both asked to resume from the last event they had; the server answered as expected.
    opened = streams_opened(server)
    assert len(opened) == 1 and f"last_event_id={last_seen}" in opened[0], opened
    metrics = (await http(port, "GET", "/metrics")).body.decode()
    assert f"torncat_{resume}s_total 1" in metrics
    polls = [r["url"] for r in h.manager.requests[before_restart:] if "/calls?" in r["url"]]
    assert any(f"since={last_seen}&" in u for u in polls), polls

    # And the new streams carry live calls.
    await api_call(port, DEE, 2003, "Zed")
    for page in (alice, bob):
        await expect(panel_call(page, 2003)).to_contain_text("Dee")
    await h.assert_clean(alice, bob)


# Browsers without Web Locks (Safari before 15.4) elect by BroadcastChannel heartbeats.
NO_WEB_LOCKS = "Object.defineProperty(Navigator.prototype, 'locks', { get: () => undefined });"


@pytest.mark.parametrize("election", ["web-locks", "heartbeat"])
async def test_three_tabs_of_one_browser_share_one_stream(h, election):
    server = await h.start()
    h.site.csp = STRICT_CSP
    context = await h.context("scriptcat", before=NO_WEB_LOCKS if election == "heartbeat" else "")
    tabs = [await h.page(context, ALICE) for _ in range(3)]
    for tab in tabs:
        await expect(panel(tab)).to_have_attribute("data-status", "live")
    await wait_until(lambda: _roles_are(tabs, ["follower", "follower", "leader"]), what="one leader")
    roles = [await panel(tab).get_attribute("data-role") for tab in tabs]
    await wait_until(lambda: _clients_are(server.port, 1), what="exactly one stream")
    if election == "web-locks":  # a lock is exclusive: there never was a second stream
        assert len(streams_opened(server)) == 1
    opened_before = len(streams_opened(server))

    # A follower's call reaches every tab, through the leader's stream.
    leader = tabs[roles.index("leader")]
    follower = tabs[roles.index("follower")]
    await row_cell(follower, 2001).locator(".tc-call-btn").click()
    for tab in tabs:
        await expect(panel_call(tab, 2001).locator(".tc-by")).to_have_text("by you")
    await api_call(server.port, BOB, 2002, "Yuri")
    for tab in tabs:
        await expect(panel_call(tab, 2002)).to_contain_text("Bob")
    assert len(streams_opened(server)) == opened_before
    last_seen = (await healthz(server.port))["last_event_id"]

    # Bob's call ends; a second relay (another tab, a late message) repeats the old call event.
    # It must not bring the call back: an event id is never applied twice.
    first = (await http(server.port, "GET", f"/calls?since={last_seen - 1}", headers=AUTH)).json()
    r = await http(server.port, "DELETE", "/calls/2002", headers=AUTH, body={"caller_id": BOB.id})
    assert r.status == 200, r
    for tab in tabs:
        await expect(panel_call(tab, 2002)).to_have_count(0)
    (old,) = first["events"]
    # Channels get a message in the order they were made: once `seen` has it, the script has too.
    await follower.evaluate("""(ev) => new Promise((done) => {
      const seen = new BroadcastChannel('torncat-sse');
      seen.onmessage = () => { seen.close(); done(); };
      new BroadcastChannel('torncat-sse').postMessage(
        { from: 'another-tab', t: 'event', id: ev.id, name: ev.event, call: ev.data });
    })""", old)
    assert await panel_call(follower, 2002).count() == 0
    last_seen = (await healthz(server.port))["last_event_id"]

    # The leader tab closes: another tab takes the stream over, resuming where it was.
    mark = server.mark()
    await leader.close()
    rest = [tab for tab in tabs if tab is not leader]
    await server.await_log(r"stream closed", start=mark)
    await server.await_log(r"stream opened", start=mark)
    await wait_until(lambda: _roles_are(rest, ["follower", "leader"]), what="a new leader")
    await wait_until(lambda: _clients_are(server.port, 1), what="exactly one stream")
    handed_over = streams_opened(server)[opened_before:]
    assert handed_over and all(f"last_event_id={last_seen}" in line for line in handed_over), handed_over
    if election == "web-locks":
        assert len(handed_over) == 1

    await api_call(server.port, CY, 2003, "Zed")
    for tab in rest:
        await expect(panel_call(tab, 2003)).to_contain_text("Cy")
        await expect(panel(tab)).to_have_attribute("data-status", "live")
    assert len(streams_opened(server)) == opened_before + len(handed_over)
    assert (await healthz(server.port))["clients"] == 1
    await h.assert_clean(*rest)


async def _roles_are(tabs: list[Page], roles: list[str]) -> bool:
    return sorted([await panel(t).get_attribute("data-role") for t in tabs]) == roles


async def _clients_are(port: int, n: int) -> bool:
    return (await healthz(port))["clients"] == n


async def test_tornpda_long_polls_with_unique_urls_and_stays_current(h):
    server = await h.start()
    h.site.csp = STRICT_CSP
    bob = await h.open(BOB, "pda", phone=True, configured=False)
    assert await bob.evaluate("typeof EventSource") == "undefined"

    # First run: the settings open by themselves; who you are comes from Torn's page.
    settings = panel(bob).locator(".tc-settings")
    await expect(settings).to_be_visible()
    await expect(panel(bob)).to_have_attribute("data-status", "off")
    await expect(settings.locator(".tc-f-id")).to_have_value(str(BOB.id))
    await expect(settings.locator(".tc-f-name")).to_have_value(BOB.name)
    await settings.locator(".tc-f-server").fill(h.base + "/")
    await settings.locator(".tc-advanced summary").click()  # the faction token is the advanced way
    await settings.locator(".tc-f-token").fill(TOKEN)
    await settings.locator(".tc-save").click()
    await expect(settings).to_be_hidden()
    await expect(panel(bob)).to_have_attribute("data-status", "live")
    await expect(panel(bob)).to_have_attribute("data-transport", "long-poll")
    assert await bob.evaluate("JSON.parse(localStorage.getItem('torncat.token'))") == TOKEN

    # Someone else calls and uncalls: the long-poll shows it.
    await api_call(server.port, CY, 2001, "Xena")
    await expect(panel_call(bob, 2001)).to_contain_text("Cy")
    await expect(row_cell(bob, 2001)).to_have_text("called by Cy")
    r = await http(server.port, "DELETE", "/calls/2001", headers=AUTH, body={"caller_id": CY.id})
    assert r.status == 200, r
    await expect(panel_call(bob, 2001)).to_have_count(0)

    # Bob calls and uncalls through PDA_httpPost.
    await row_cell(bob, 2002).locator(".tc-call-btn").click()
    await expect(panel_call(bob, 2002).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2002: "Bob"}
    await panel_call(bob, 2002).locator(".tc-uncall").click()
    await expect(panel_call(bob, 2002)).to_have_count(0)
    assert await active_calls(server.port) == {}
    await expect(panel(bob)).to_have_attribute("data-status", "live")

    # Only the long-poll, never a stream (TornPDA's GM shim cannot stream), every URL unique
    # (TornPDA answers a repeated one with `undefined`), the token in a header, never the URL.
    requests = await bob.evaluate("window.__pdaRequests")
    urls = [r["url"] for r in requests]
    gets = [r["url"] for r in requests if r["method"] == "GET"]
    assert any("/calls?since=" in u and "&wait=" in u for u in urls), urls
    assert len(set(gets)) == len(gets), gets
    assert await bob.evaluate("window.__pdaDeduplicated") == []
    assert not any("/events" in u or "token=" in u for u in urls), urls
    assert all(r["headers"].get("Authorization") == f"Bearer {TOKEN}" for r in requests)
    assert {r["method"] for r in requests} == {"GET", "POST"}
    assert await bob.evaluate("window.__tc.violations") == []
    await h.assert_clean(bob)


async def test_a_stream_that_ends_before_a_byte_hands_over_to_long_poll_at_once_and_is_remembered(h):
    server = await h.start()
    h.site.csp = STRICT_CSP
    h.manager.cut_streams = True  # like a buffering proxy: /events answers 200, then ends at once
    alice = await h.open(ALICE, "scriptcat")
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await expect(panel(alice)).to_have_attribute("data-transport", "long-poll")
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · long-poll")
    await expect(panel(alice).locator(".tc-status")).to_have_attribute(
        "title", re.compile("the stream did not work here"))
    streams = [r for r in h.manager.requests if urllib.parse.urlsplit(r["url"]).path == "/events"]
    assert len(streams) == 1  # no second try in a row: it waits STREAM_PROBE_MS, beside the long-poll
    changes = await alice.evaluate("window.__tc.changes")
    assert "reconnecting" not in [c[1] for c in changes], changes

    await api_call(server.port, BOB, 2001, "Xena")
    await expect(row_cell(alice, 2001)).to_have_text("called by Bob")
    await row_cell(alice, 2002).locator(".tc-call-btn").click()
    await expect(panel_call(alice, 2002).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2001: "Bob", 2002: "Alice"}
    polls = [r["url"] for r in h.manager.requests if "/calls?since=" in r["url"]]
    assert polls and all("&wait=" in u for u in polls) and not any("token=" in u for u in polls)

    # The next page load remembers: long-poll at once, no stream tried (the last one failed
    # less than STREAM_PROBE_MS ago).
    asked = len(h.manager.requests)
    await alice.reload()
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await expect(panel(alice)).to_have_attribute("data-transport", "long-poll")
    await expect(panel_call(alice, 2001)).to_contain_text("Bob")
    assert not [r for r in h.manager.requests[asked:] if "/events" in r["url"]]
    await h.assert_clean(alice)


async def test_names_from_the_server_are_shown_as_text_never_as_html(h):
    server = await h.start()
    h.site.csp = STRICT_CSP
    alice = await h.open(ALICE, "scriptcat")
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await expect(row_cell(alice, 2001)).to_be_visible()
    evil = Member(1666, "<img src=x onerror=alert(1)>")
    await api_call(server.port, evil, 2001, "<b>Xena</b><script>alert(2)</script>")

    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by <img src=x onerror=alert(1)>")
    await expect(panel_call(alice, 2001).locator(".tc-target")).to_have_text(
        "<b>Xena</b><script>alert(2)</script>")
    await expect(row_cell(alice, 2001)).to_have_text("called by <img src=x onerror=alert(1)>")
    await expect(alice.locator("#torncat-toasts")).to_contain_text(
        "<img src=x onerror=alert(1)> called <b>Xena")
    created = "img, b, #torncat-panel script, .tc-cell script, #torncat-toasts script"
    assert await alice.locator(created).count() == 0
    assert h.dialogs == []
    await h.assert_clean(alice)


async def test_the_panel_moves_collapses_and_remembers(h):
    await h.start()
    alice = await h.open(ALICE, "scriptcat")
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    before = await panel(alice).bounding_box()
    head = await panel(alice).locator(".tc-head .tc-title").bounding_box()
    await alice.mouse.move(head["x"] + 5, head["y"] + 5)
    await alice.mouse.down()
    await alice.mouse.move(head["x"] - 300, head["y"] + 200, steps=5)
    await alice.mouse.up()
    moved = await panel(alice).bounding_box()
    assert (moved["x"], moved["y"]) == pytest.approx((before["x"] - 305, before["y"] + 195), abs=2)

    await panel(alice).locator(".tc-toggle").click()
    await expect(panel(alice).locator(".tc-body")).to_be_hidden()
    await alice.reload()
    await expect(panel(alice).locator(".tc-body")).to_be_hidden()
    again = await panel(alice).bounding_box()
    assert (again["x"], again["y"]) == pytest.approx((moved["x"], moved["y"]), abs=1)
    await panel(alice).locator(".tc-toggle").click()
    await expect(panel(alice).locator(".tc-list")).to_be_visible()
    await h.assert_clean(alice)


# ---------------------------------------------------------------------------
# Each way in, under Torn's CSP: how soon it is live, how soon a call shows
# ---------------------------------------------------------------------------

# The stream requests a first page load makes, by their responseType.
STREAM_REQUESTS = {"scriptcat": ["stream"], "violentmonkey": ["stream", ""], "no-loadstart": ["stream"],
                   "pda": [], "eventsource": []}


@pytest.mark.parametrize("case", ["scriptcat", "no-loadstart", "violentmonkey", "pda", "eventsource"])
async def test_each_way_in_goes_live_and_shows_calls_from_another_browser(h, case):
    """Measured, never asserted by time: artifacts/transports.json has the numbers."""
    server = await h.start()
    # The page's own EventSource needs a page whose CSP allows it; everything else runs under Torn's.
    h.site.csp = None if case == "eventsource" else TORN_CSP
    transport = TRANSPORTS[case][2]
    page = await h.open(ALICE, case)
    record_timing(case, "load_to_live_s", await seconds_to_live(page, transport))
    # The stream is always asked for first, whatever the manager says it can do; where it
    # hands over text instead (Violentmonkey), the growing responseText is read.
    first_load = STREAM_REQUESTS[case]
    if case in GM_CASES:
        streams = [r for r in await page.evaluate("window.__gmRequests") if r["url"].endswith("/events")]
        assert [r["responseType"] for r in streams] == first_load, streams

    # A reload starts with what this browser remembered (for a manager that cannot stream:
    # the long-poll at once, without waiting FIRST_BYTE_MS for a stream again).
    await page.reload()
    record_timing(case, "reload_to_live_s", await seconds_to_live(page, transport))
    if case in GM_CASES:
        streams = [r for r in await page.evaluate("window.__gmRequests") if r["url"].endswith("/events")]
        again = first_load[-1:] if transport == "stream" else []  # what was remembered
        assert [r["responseType"] for r in streams] == again, streams
    await expect(panel(page).locator(".tc-empty")).to_have_text("No active calls")

    shown = [await seconds_to_show(page, server.port, member, target, name)
             for member, target, name in ((BOB, 2001, "Xena"), (CY, 2002, "Yuri"), (DEE, 2003, None))]
    record_timing(case, "call_shown_s", shown)
    # Dee's call has no target name: the panel takes it from Torn's row.
    await expect(panel_call(page, 2003).locator(".tc-target")).to_have_text("Zed")
    await expect(row_cell(page, 2003)).to_have_text("called by Dee")
    # Styled under Torn's CSP (no style-src, so a <style> would be blocked), and the page
    # never tried to connect anywhere by itself.
    assert await panel(page).evaluate("(e) => getComputedStyle(e).position") == "fixed"
    assert await page.evaluate("window.__tc.violations") == []
    await h.assert_clean(page)


async def test_without_a_userscript_manager_under_torns_csp_it_says_so_and_stops_trying(h):
    await h.start()
    h.site.csp = TORN_CSP
    page = await h.open(ALICE, "no-gm")
    await expect(panel(page)).to_have_attribute("data-status", "blocked")
    await expect(panel(page).locator(".tc-status")).to_have_attribute(
        "title", re.compile("userscript manager"))
    blocked = await page.evaluate("window.__tc.violations")
    assert blocked and all(v.startswith("connect-src http://127.0.0.1") for v in blocked), blocked
    # What the CSP refused (and a report-uri would be sent) never carried the token.
    assert not any(TOKEN in v or "token=" in v for v in blocked), blocked
    # It gave up: nothing more is tried (a retry would come within BACKOFF_MIN_MS).
    with pytest.raises(PlaywrightTimeoutError):
        await page.wait_for_function("(n) => window.__tc.violations.length > n", arg=len(blocked),
                                     timeout=2500)
    assert await panel(page).evaluate("(e) => getComputedStyle(e).position") == "fixed"
    record_timing("no-gm", "load_to_live_s", None)
    await h.assert_clean(page)


# ---------------------------------------------------------------------------
# As the real ScriptCat was run: on https://www.torn.com, under Torn's CSP
# ---------------------------------------------------------------------------

# The real-manager pass, by hand: the path of an unpacked ScriptCat (Manifest V3) that a
# developer built locally from its public source (docs/testing.md says how; never
# committed). Without it, the cases below run against the ScriptCat-like stand-in only, and
# their real-manager variants are not collected.
REAL_MANAGER = os.environ.get("TORNCAT_REAL_MANAGER", "")
MANAGERS = ["scriptcat", "violentmonkey", *(["scriptcat-real"] if REAL_MANAGER else [])]
# As the userscript's header says to when running your own server: one more @connect line.
USERSCRIPT_FOR_LOCALHOST = USERSCRIPT.replace(
    "// @connect      torncat-sse.onrender.com\n",
    "// @connect      torncat-sse.onrender.com\n// @connect      127.0.0.1\n")
assert USERSCRIPT_FOR_LOCALHOST != USERSCRIPT


class OnTorn:
    """A browser on the war page at https://www.torn.com, under Torn's CSP (a real header),
    with the userscript in a manager: a stand-in ("scriptcat", "violentmonkey"), or the real
    ScriptCat. Players fill in the settings themselves: nothing is seeded."""

    real = False

    def __init__(self, h: Harness, manager: str = "scriptcat"):
        self.h = h
        self.manager = manager
        self.csp_reports: list[str] = []  # what Chromium logged as refused by a CSP
        self.context: BrowserContext | None = None

    @property
    def name(self) -> str:
        return f"{self.manager}-like"

    async def start(self) -> OnTorn:
        self.context = await self.h.context(self.manager, configured=False, script=USERSCRIPT_FOR_LOCALHOST)
        return self

    async def remembered(self, page: Page) -> dict | None:
        """What the script remembered about transports (a stand-in's storage; None in a real
        manager, whose storage a test cannot read)."""
        raw = await page.evaluate("localStorage.getItem('gmshim:torncat.transport')")
        return json.loads(raw) if raw else None

    @property
    def site(self) -> TornSite:
        return self.h.site

    async def tab(self, member: Member) -> Page:
        page = await self.context.new_page()
        h = self.h
        page.on("pageerror", lambda e: h.errors.append(f"page error: {e}"))
        page.on("console", lambda m: self.csp_reports.append(m.text) if "Content Security Policy" in m.text
                else h.errors.append(m.text) if "[TornCat]" in m.text else None)
        page.on("dialog", lambda d: (h.dialogs.append(d.message), asyncio.ensure_future(d.dismiss())))
        await page.goto(self.site.url(member))
        await expect(page.locator("#torncat-panel")).to_be_visible()
        return page

    async def close(self) -> None:
        pass  # the harness closes its contexts


class ScriptCat(OnTorn):
    """Chromium with the real ScriptCat extension (TORNCAT_REAL_MANAGER), as
    managers/README.md:14-17 says to run it; the script installed through ScriptCat's own
    install page from the test site's URL."""

    real = True

    def __init__(self, h: Harness, extension: Path, profile: Path, tls: dict[str, Path]):
        super().__init__(h, "scriptcat")
        self.extension, self.profile = extension, profile
        site_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        site_tls.load_cert_chain(tls["server"], tls["key"])
        self.torn = TornSite(site_tls, USERSCRIPT_FOR_LOCALHOST)
        self.id = ""
        self.confirmed: list[str] = []
        self._tasks: set[asyncio.Task] = set()

    @property
    def site(self) -> TornSite:
        return self.torn

    @property
    def name(self) -> str:
        return "scriptcat-real"

    async def remembered(self, page: Page) -> dict | None:
        return None

    async def _launch(self) -> None:
        args = [
            # Extensions need a persistent context and the "new" headless mode.
            "--headless=new", f"--disable-extensions-except={self.extension}",
            f"--load-extension={self.extension}",
            f"--host-resolver-rules=MAP www.torn.com 127.0.0.1:{self.torn.port}",
            "--ignore-certificate-errors",
            *(a for a in CHROMIUM_ARGS if a != "--headless")]
        self.context = await self.h.browser.browser_type.launch_persistent_context(
            str(self.profile), executable_path=chromium(), headless=False, args=args,
            viewport={"width": 1280, "height": 800})
        workers = self.context.service_workers
        worker = workers[0] if workers else await self.context.wait_for_event(
            "serviceworker", timeout=STEP_MS)
        self.id = urllib.parse.urlsplit(worker.url).hostname

    async def start(self, install_from: str | None = None) -> ScriptCat:
        """Launch it, and install the userscript from `install_from` (the test site's copy,
        with one more @connect line, when None)."""
        self.torn.csp = self.h.site.csp
        await self.torn.start()
        await self._launch()
        # chrome.userScripts works only once "Allow User Scripts" is on (Chrome 138+); it is
        # kept in the profile, and takes effect after a relaunch.
        page = await self.context.new_page()
        await page.goto("chrome://extensions/")
        error = await page.evaluate("""(id) => new Promise((done) =>
          chrome.developerPrivate.updateExtensionConfiguration({ extensionId: id, userScriptsAccess: true },
            () => done(chrome.runtime.lastError ? chrome.runtime.lastError.message : '')))""", self.id)
        assert not error, error
        await self.context.close()
        await self._launch()
        self.context.on("page", lambda page: self._track(self._confirm(page)))
        await self.context.add_init_script(script=WATCH)
        await self.install(install_from or f"{self.torn.origin}/torn-war-caller.user.js")
        return self

    def _track(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm(self, page: Page) -> None:
        """Allow, for good, what a permission prompt (an @connect host) asks."""
        with contextlib.suppress(Exception):
            await page.wait_for_load_state()
            if "/src/confirm.html" not in page.url:
                return
            await page.get_by_test_id("confirm-duration-permanent").click(timeout=STEP_MS)
            await page.get_by_test_id("confirm-allow").click(timeout=STEP_MS)
            self.confirmed.append(page.url)

    async def install(self, url: str) -> None:
        page = await self.context.new_page()
        # The URL goes in as it is: ScriptCat 1.5 does not decode a percent-encoded one.
        await page.goto(f"chrome-extension://{self.id}/src/install.html?url={url}")
        await page.get_by_test_id("install-primary").click()
        with contextlib.suppress(PlaywrightTimeoutError, PlaywrightError):
            await page.wait_for_event("close", timeout=STEP_MS)  # ScriptCat closes it when done

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self.context:
            with contextlib.suppress(Exception):
                await self.context.close()
        await self.torn.close()


@pytest_asyncio.fixture(params=MANAGERS, loop_scope="module")
async def on_torn(request, h, tmp_path):
    """The war page at https://www.torn.com under Torn's CSP, in the ScriptCat-like or the
    Violentmonkey-like stand-in, or (TORNCAT_REAL_MANAGER) the real ScriptCat. Call `start()`
    before or after `h.start()` (it needs only the war page's site)."""
    h.site.csp = TORN_CSP
    if request.param == "scriptcat-real":
        extension = Path(REAL_MANAGER)
        assert (extension / "manifest.json").is_file(), f"TORNCAT_REAL_MANAGER={REAL_MANAGER}: no manifest"
        browser = ScriptCat(h, extension, tmp_path / "profile", make_tls_files(tmp_path, None))
    else:
        h.site.served_as = TORN_ORIGIN
        browser = OnTorn(h, request.param)
    yield browser
    await browser.close()


async def fill_in_settings(page: Page, server: str, token: str) -> None:
    """What a player does on first run with a faction token."""
    settings = panel(page).locator(".tc-settings")
    await expect(settings).to_be_visible()
    await settings.locator(".tc-f-server").fill(server)
    await settings.locator(".tc-advanced summary").click()  # the faction token is the advanced way
    await settings.locator(".tc-f-token").fill(token)
    await settings.locator(".tc-save").click()


async def test_on_torn_it_streams_at_once_styled_and_one_stream_serves_every_tab(h, on_torn):
    server = await h.start()
    await on_torn.start()
    case = on_torn.name

    # First run: the settings, filled in as a player would.
    first = await on_torn.tab(ALICE)
    await fill_in_settings(first, h.base, TOKEN)
    await expect(panel(first)).to_have_attribute("data-transport", "stream")
    await expect(panel(first)).to_have_attribute("data-status", "live")
    # Styled through GM_addStyle, not an inline <style> that Torn's CSP blocks.
    assert await panel(first).evaluate("(e) => getComputedStyle(e).position") == "fixed"
    assert await first.locator("style#torncat-style").count() == 0

    # The next page load: live by stream; calls POSTed elsewhere show.
    await first.reload()
    record_timing(case, "reload_to_live_s", await seconds_to_live(first, "stream"))
    shown = [await seconds_to_show(first, server.port, member, target, name)
             for member, target, name in ((BOB, 2001, "Xena"), (CY, 2002, "Yuri"), (DEE, 2003, None))]
    record_timing(case, "call_shown_s", shown)
    await expect(panel_call(first, 2003).locator(".tc-target")).to_have_text("Zed")  # from the row
    await expect(row_cell(first, 2001)).to_have_text("called by Bob")
    ARTIFACTS.mkdir(exist_ok=True)
    await first.screenshot(path=ARTIFACTS / f"{case.replace(' ', '-')}-torn.png")  # to look at, not compared

    # A second tab: one connection for both, the second one relayed.
    opened = len(streams_opened(server))
    second = await on_torn.tab(ALICE)
    await expect(panel(second).locator(".tc-status")).to_have_text("live · stream (via another tab)")
    status_line = panel(second).locator(".tc-status")
    assert await status_line.evaluate("(e) => e.scrollWidth <= e.clientWidth")  # wraps, never cut off
    await expect(panel_call(second, 2002)).to_contain_text("Cy")
    await wait_until(lambda: _clients_are(server.port, 1), what="exactly one stream")
    assert len(streams_opened(server)) == opened

    # The leader tab closes: the other one takes the stream over, by stream, at once. A call
    # made right after the close shows in the other tab; measured from the close.
    r = await http(server.port, "DELETE", "/calls/2001", headers=AUTH, body={"caller_id": BOB.id})
    assert r.status == 200, r
    await expect(panel_call(second, 2001)).to_have_count(0)
    last_seen = (await healthz(server.port))["last_event_id"]
    mark = server.mark()
    record_timing(case, "leader_closed_to_call_shown_s",
                  await seconds_from_leader_close_to_call(first, second, server.port))
    await server.await_log(r"stream opened", start=mark)
    await expect(panel(second).locator(".tc-status")).to_have_text("live · stream")
    handed_over = [line for line in server.lines[mark:] if "stream opened" in line]
    assert len(handed_over) == 1 and f"last_event_id={last_seen}" in handed_over[0], handed_over
    await wait_until(lambda: _clients_are(server.port, 1), what="exactly one stream")

    # Nothing the script did broke Torn's CSP, and nothing was asked of the player.
    assert await second.evaluate("window.__tc.violations") == []
    assert on_torn.csp_reports == [], on_torn.csp_reports
    await h.assert_clean(second)


@pytest.mark.parametrize("layout", ["hashed", "li-enemy"])
async def test_enemy_rows_in_torns_other_markups_and_both_attack_pages(h, layout):
    server = await h.start()
    h.site.csp = TORN_CSP
    h.site.layout = layout
    context = await h.context("scriptcat")
    alice = await h.page(context, ALICE)
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by you")
    # A call made without a target name (by id, from elsewhere) is named from Torn's row.
    await api_call(server.port, BOB, 2002)
    await expect(panel_call(alice, 2002).locator(".tc-target")).to_have_text("Yuri")
    await expect(row_cell(alice, 2002)).to_have_text("called by Bob")
    await h.assert_clean(alice)

    # Torn's attack page, at its address since April 2026 and the one before: the panel, with
    # the target of the attack ready to call.
    for i, path in enumerate(("page.php", "loader.php")):
        target = 2003 if i == 0 else 2002
        attack = await context.new_page()
        await attack.goto(f"{h.site.origin}/{path}?sid=attack&user2ID={target}&as={ALICE.id}")
        await expect(panel(attack)).to_be_visible()
        await expect(panel(attack).locator(".tc-call-input")).to_have_value(str(target))
        await expect(panel_call(attack, 2001).locator(".tc-by")).to_have_text("by you")
        await attack.close()
    attack = await context.new_page()
    await attack.goto(f"{h.site.origin}/page.php?sid=attack&user2ID=2003&as={ALICE.id}")
    await panel(attack).locator(".tc-form .tc-call-btn").click()
    await expect(panel_call(attack, 2003).locator(".tc-by")).to_have_text("by you")
    await expect(panel_call(alice, 2003).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2001: "Alice", 2002: "Bob", 2003: "Alice"}
    assert not h.errors, h.errors


async def test_a_stream_tried_again_beside_the_long_poll_takes_over_without_a_silent_moment(h):
    server = await h.start()
    h.site.csp = TORN_CSP
    # This browser remembers that the stream failed, STREAM_PROBE_MS ago or more: it starts with
    # the long-poll and tries the stream beside it. The stream is slow to answer this time.
    remembered = ("localStorage.setItem('gmshim:torncat.transport', "
                  "JSON.stringify({ best: 'stream', works: 'long-poll', at: 1 }));")
    h.manager.hold_streams = asyncio.Event()
    context = await h.context("scriptcat", before=remembered)
    alice = await h.page(context, ALICE)
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · long-poll")
    await wait_until(lambda: _asked(h.manager, "/events"), what="a stream tried beside the long-poll")
    await api_call(server.port, BOB, 2001, "Xena")
    await expect(panel_call(alice, 2001)).to_contain_text("Bob")  # the long-poll keeps delivering

    h.manager.hold_streams.set()
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · stream")
    # The long-poll has stopped: its held request was aborted, and no other one goes out, not
    # even after an event (which a running long-poll answers with its next request at once).
    await wait_until(lambda: _long_polls_are(server.port, 0), what="no long-poll held")
    polls = len([r for r in h.manager.requests if "/calls?" in r["url"]])
    await api_call(server.port, CY, 2002, "Yuri")
    await expect(panel_call(alice, 2002)).to_contain_text("Cy")
    assert len([r for r in h.manager.requests if "/calls?" in r["url"]]) == polls
    assert (await healthz(server.port))["long_polls"] == 0
    # Live all along: from the first "live" on, it never said anything else.
    shown = await alice.evaluate("window.__tc.shown")
    after = shown[shown.index("live long-poll"):]
    assert set(after) == {"live long-poll", "live stream"}, shown
    assert after[-1] == "live stream", shown
    # The stream is remembered for the next page load.
    memory = json.loads(await alice.evaluate("localStorage.getItem('gmshim:torncat.transport')"))
    assert memory["works"] == "stream", memory
    await h.assert_clean(alice)


async def test_a_new_leader_starts_with_the_transport_that_worked_not_with_a_failing_stream(h):
    """The issue's "every leader change costs a minute": with a manager whose stream never
    starts, the tab that takes over must long-poll at once, not wait for a stream again."""
    server = await h.start()
    h.site.csp = TORN_CSP
    context = await h.context("no-loadstart")
    first = await h.page(context, ALICE)
    await expect(panel(first).locator(".tc-status")).to_have_text("live · long-poll")
    second = await h.page(context, ALICE)
    await expect(panel(second).locator(".tc-status")).to_have_text("live · long-poll (via another tab)")
    record_timing("no-loadstart", "leader_closed_to_call_shown_s",
                  await seconds_from_leader_close_to_call(first, second, server.port))
    await expect(panel(second).locator(".tc-status")).to_have_text("live · long-poll")
    assert [r for r in await second.evaluate("window.__gmRequests") if r["url"].endswith("/events")] == []
    await h.assert_clean(second)


async def _long_polls_are(port: int, n: int) -> bool:
    return (await healthz(port))["long_polls"] == n


async def _asked(manager: Manager, path: str) -> bool:
    return any(urllib.parse.urlsplit(r["url"]).path == path for r in manager.requests)


# How long to watch a loop to prove it does not spin: a few of its slowest cycles.
SPIN_WINDOW = 3.0  # seconds


LONG_POLL_REMEMBERED = ("localStorage.setItem('gmshim:torncat.transport', "
                        "JSON.stringify({ best: 'stream', works: 'long-poll', at: Date.now() }));")


async def test_the_long_poll_never_spins_when_the_server_does_not_hold_or_is_gone(h):
    server = await h.start()
    h.site.csp = TORN_CSP
    h.manager.drop_wait = True  # every answer comes at once, empty or not, as before long-poll existed
    # A manager whose stream never starts, and this browser remembers it: the long-poll at once.
    alice = await h.open(ALICE, "no-loadstart", before=LONG_POLL_REMEMBERED)
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · long-poll")
    await api_call(server.port, BOB, 2001, "Xena")
    await expect(panel_call(alice, 2001)).to_contain_text("Bob")

    def polls() -> int:
        return len([r for r in h.manager.requests if urllib.parse.urlsplit(r["url"]).path == "/calls"])

    # Empty answers that were not held: at most one request a second (LONG_POLL_MIN_CYCLE_MS).
    before, started = polls(), time.monotonic()
    await asyncio.sleep(SPIN_WINDOW)  # a window to count in, not a wait for something to settle
    assert polls() - before <= (time.monotonic() - started) + 1, polls() - before
    # The server gone: every request fails at once; the retries back off (1-2 s, 2-4 s, ...).
    await asyncio.to_thread(server.stop)
    await expect(panel(alice)).to_have_attribute("data-status", "reconnecting")
    before = polls()
    await asyncio.sleep(SPIN_WINDOW)
    assert polls() - before <= 3, polls() - before
    await expect(panel(alice).locator(".tc-status")).to_have_attribute(
        "title", re.compile("cannot reach the server: retrying in"))
    await h.assert_clean(alice)


# ---------------------------------------------------------------------------
# Signing in with a Torn API key (issue 13), against fake_torn.py
# ---------------------------------------------------------------------------

KEY_LINK = "https://www.torn.com/preferences.php#tab=api?step=addNewKey&title=TornCat&type=1"


@pytest_asyncio.fixture(loop_scope="module")
async def torn_api():
    fake = await FakeTorn().start()
    yield fake
    await fake.stop()


async def storage_text(page: Page) -> str:
    return await page.evaluate("JSON.stringify(Object.assign({}, localStorage))")


async def test_a_member_signs_in_with_a_key_calls_in_their_name_and_signs_out(h, torn_api):
    server = await h.start(TORN_API_URL=torn_api.base_url)  # faction 123 has a token: it may sign in
    alice_key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    h.site.csp = STRICT_CSP
    alice = await h.open(ALICE, "scriptcat", configured=False)
    settings = panel(alice).locator(".tc-settings")
    await expect(settings).to_be_visible()
    await expect(settings.locator(".tc-key-link")).to_have_attribute("href", KEY_LINK)
    await settings.locator(".tc-f-server").fill(h.base)
    await settings.locator(".tc-f-key").fill("WrongWrongWrong1")
    await settings.locator(".tc-sign-in").click()
    await expect(panel(alice).locator(".tc-notice")).to_contain_text("this API key is incorrect")
    await settings.locator(".tc-f-key").fill(alice_key)
    await settings.locator(".tc-sign-in").click()
    await expect(settings).to_be_hidden()
    await expect(panel(alice).locator(".tc-who")).to_have_text("Signed in as Alice [1001]")
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    stored = await storage_text(alice)
    assert alice_key not in stored and "tm_" in stored  # the member token is kept, never the key
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2001: "Alice"}
    sign_in = next(r for r in h.manager.requests if r["url"].endswith("/auth/torn"))
    assert alice_key not in sign_in["url"]
    # Sign out: back to the sign-in form; the token is gone.
    await panel(alice).locator(".tc-gear").click()
    await expect(settings.locator(".tc-signed-in-as")).to_have_text("Signed in as Alice [1001]")
    await settings.locator(".tc-sign-out").click()
    await expect(settings.locator(".tc-f-key")).to_be_visible()
    await expect(panel(alice).locator(".tc-who")).to_be_hidden()
    await expect(panel(alice)).to_have_attribute("data-status", "off")
    assert "tm_" not in await storage_text(alice)
    # Signed in again, then the operator revokes the token: the stream ends, the sign-in
    # form comes back with the server's reason, and the token is dropped.
    await settings.locator(".tc-f-key").fill(alice_key)
    await settings.locator(".tc-sign-in").click()
    await expect(settings).to_be_hidden()
    await expect(panel(alice)).to_have_attribute("data-transport", "stream")
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await revoke_member(h, ALICE)
    await expect_signed_out(alice, "your sign-in was revoked by this server's operator")
    h.errors.clear()  # the wrong key's refusal and the sign-out were reported on purpose
    await h.assert_clean(alice)


async def revoke_member(h, member: Member) -> None:
    done = await asyncio.to_thread(run_cli, "token", "revoke", "--player", str(member.id),
                                   DATABASE_URL=h.db)
    assert done.returncode == 0, done


async def expect_signed_out(page: Page, reason: str, sign_in: str = ".tc-f-key") -> None:
    """The sign-in form is back (its key field, or `sign_in`), saying why, and no member
    token is kept."""
    await expect(panel(page).locator(".tc-notice")).to_have_text(f"Signed out: {reason}: sign in "
                                                                 "again with your Torn API key.")
    await expect(panel(page).locator(f".tc-settings {sign_in}")).to_be_visible()
    await expect(panel(page).locator(".tc-who")).to_be_hidden()
    await expect(panel(page)).to_have_attribute("data-status", "off")
    assert "tm_" not in await storage_text(page)


async def test_an_expired_sign_in_leads_back_to_the_sign_in_form(h):
    await h.start()
    expired = {"id": ALICE.id, "name": ALICE.name, "faction_id": FACTION,
               "expires_at": "2020-01-01T00:00:00Z"}
    seed = SEED % (json.dumps("gmshim:"), json.dumps(
        {"server": h.base, "token": "tm_expired", "configured": True, "member": expired}))
    alice = await h.page(await h.context("scriptcat", configured=False, before=seed), ALICE)
    await expect(panel(alice).locator(".tc-notice")).to_have_text("Your sign-in has expired: sign in again.")
    await expect(panel(alice).locator(".tc-settings .tc-f-key")).to_be_visible()
    await expect(panel(alice)).to_have_attribute("data-status", "off")
    h.errors.clear()


async def test_tornpda_shows_torns_key_table_and_signs_in_with_its_key_only_after_the_tap(h, torn_api):
    """TornPDA fills the player's key into the script. Torn's rule (../shared/USERS.md): a
    tool that takes a key shows its key usage table before the key is used. So the first
    run shows the table and one button; the key goes to the server only after the tap, and
    the consent is remembered (for this server) until the player signs out."""
    server = await h.start(TORN_API_URL=torn_api.base_url)
    bob_key = torn_api.add_player(BOB.id, BOB.name, FACTION)
    h.site.csp = STRICT_CSP
    # TornPDA replaces the placeholder in the script's text with the player's key.
    script = USERSCRIPT.replace("###PDA-APIKEY###", bob_key)
    assert script != USERSCRIPT
    context = await h.browser.new_context(viewport={"width": 390, "height": 760}, is_mobile=True,
                                          has_touch=True)
    h.contexts.append(context)
    await h.manager.install(context)
    seed = SEED % (json.dumps(""), json.dumps({"server": h.base}))
    await context.add_init_script(script="\n".join((WATCH, DOCUMENT, seed, PDA_SHIM, script)))
    bob = await h.page(context, BOB)

    # First run: Torn's table, then one button; nothing typed, nothing sent yet.
    settings = panel(bob).locator(".tc-settings")
    button = settings.locator(".tc-pda-sign-in")
    await expect(button).to_have_text("Sign in with my TornPDA key")
    table = settings.locator("table.tc-tos")
    await expect(table.locator("th")).to_have_text(TOS_ROWS)
    await expect(table.locator("td").last).to_have_text("Public Only")
    assert await table.evaluate("(t) => !!(t.compareDocumentPosition(document.querySelector("
                                "'.tc-pda-sign-in')) & Node.DOCUMENT_POSITION_FOLLOWING)")
    await expect(settings.locator(".tc-f-key")).to_have_count(0)  # no key to type: TornPDA has it
    await expect(panel(bob).locator(".tc-status")).to_have_text("not signed in")
    await expect(bob.locator(".enemy-faction .tc-call-btn")).to_have_count(0)
    # Everything the script does on its own at start-up is over once a reload has run it
    # again: still no sign-in.
    await bob.reload()
    await expect(panel(bob).locator(".tc-settings .tc-pda-sign-in")).to_be_visible()
    assert torn_api.requests == {}
    assert not await _signed_in_here(bob)

    # The tap: signed in, live by long-poll, calling in Bob's name.
    await panel(bob).locator(".tc-pda-sign-in").tap()
    await expect(panel(bob).locator(".tc-who")).to_have_text("Signed in as Bob [1002]")
    await expect(panel(bob)).to_have_attribute("data-status", "live")
    await expect(panel(bob)).to_have_attribute("data-transport", "long-poll")
    await expect(panel(bob).locator(".tc-settings")).to_be_hidden()
    await row_cell(bob, 2002).locator(".tc-call-btn").click()
    await expect(panel_call(bob, 2002).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2002: "Bob"}
    # Who Bob is, and (the faction has no poll key) whether his faction lists him.
    assert torn_api.requests == {(bob_key, "/user/profile"): 1,
                                 (bob_key, "/faction/{id}/members"): 1}
    requests = await bob.evaluate("window.__pdaRequests")
    assert any(r["url"].endswith("/auth/torn") for r in requests)
    assert not any(bob_key in r["url"] for r in requests)
    assert bob_key not in await storage_text(bob)

    # Revoked while long-polling: the next answer is a 401 that signs Bob out, saying why.
    # The consent stays: the next page load signs in again with TornPDA's key, untouched.
    await revoke_member(h, BOB)
    await expect_signed_out(bob, "your sign-in was revoked by this server's operator", ".tc-pda-sign-in")
    await bob.reload()
    await expect(panel(bob).locator(".tc-who")).to_have_text("Signed in as Bob [1002]")
    await expect(panel(bob)).to_have_attribute("data-status", "live")
    assert await _signed_in_here(bob)

    # Signing out withdraws it: after a reload, the table and the button again, nothing sent.
    await panel(bob).locator(".tc-gear").click()
    await settings.locator(".tc-sign-out").click()
    await expect(settings.locator(".tc-pda-sign-in")).to_be_visible()
    await bob.reload()
    await expect(panel(bob).locator(".tc-settings .tc-pda-sign-in")).to_be_visible()
    await expect(panel(bob).locator(".tc-status")).to_have_text("not signed in")
    assert not await _signed_in_here(bob)
    h.errors.clear()  # the sign-out was reported on purpose
    await h.assert_clean(bob)


async def _signed_in_here(page: Page) -> bool:
    """Whether this document sent a sign-in (POST /auth/torn) through TornPDA."""
    return any(r["url"].endswith("/auth/torn") for r in await page.evaluate("window.__pdaRequests"))


# ---------------------------------------------------------------------------
# Enemy statuses from the central Torn API poll (issue 14), against fake_torn.py
# ---------------------------------------------------------------------------

def at_war(torn_api, war_id: int) -> None:
    """Our faction at war (a ranked war that started a minute ago) with faction 456,
    whose members are ENEMIES."""
    now, enemy = int(time.time()), 456
    war = {"war_id": war_id, "start": now - 60, "end": None, "target": 1000, "winner": None,
           "factions": [{"id": FACTION, "name": "Ours", "score": 0, "chain": 0},
                        {"id": enemy, "name": "Theirs", "score": 0, "chain": 0}]}
    torn_api.add_faction(FACTION, "Ours", war)
    torn_api.add_faction(enemy, "Theirs", war)
    for pid, name in ENEMIES.items():
        torn_api.add_player(pid, name, enemy)


async def test_enemy_states_and_hospital_countdowns_show_and_a_cleared_caller_is_told(h, torn_api):
    now = int(time.time())
    at_war(torn_api, 77)
    yuri = torn_api.players[2002]
    yuri.state, yuri.until, yuri.description = "Hospital", now + 3600, "In hospital for 60 mins"
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await h.start(TORN_API_URL=torn_api.base_url, TORN_API_KEYS=f"{FACTION}:{key}",
                  POLL_SECONDS="0.3", TORNCAT_TESTING="1")
    alice = await h.open(ALICE, "scriptcat")
    await expect(row_cell(alice, 2002).locator(".tc-state")).to_have_text(
        re.compile(r"^Hospital (59:[0-5]\d|1:00:00)$"))
    await expect(row_cell(alice, 2002).locator(".tc-state")).to_have_attribute(
        "title", "In hospital for 60 mins")
    await expect(row_cell(alice, 2001).locator(".tc-state")).to_have_text("Okay")
    # Alice calls Xena; the poll then sees Xena hospitalised: the call ends and Alice is told.
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by you")
    await expect(panel_call(alice, 2001).locator(".tc-state")).to_have_text("Okay")
    xena = torn_api.players[2001]
    xena.state, xena.until, xena.description = "Hospital", int(time.time()) + 125, "Hospitalized"
    await expect(alice.locator("#torncat-toasts .tc-toast", has_text="your call")).to_have_text(
        re.compile(r"^Xena.* is in hospital: your call is cleared$"))
    await expect(panel_call(alice, 2001)).to_have_count(0)
    await expect(row_cell(alice, 2001).locator(".tc-state")).to_have_text(re.compile(r"^Hospital 2:0[0-5]$"))
    await expect(row_cell(alice, 2001).locator(".tc-call-btn")).to_be_visible()
    await h.assert_clean(alice)


@pytest.mark.parametrize("transport", ["scriptcat", "violentmonkey"])
async def test_the_panel_says_when_enemy_statuses_are_stale_or_the_key_was_refused(h, torn_api,
                                                                                 transport):
    at_war(torn_api, 78)
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await h.start(TORN_API_URL=torn_api.base_url, TORN_API_KEYS=f"{FACTION}:{key}",
                  POLL_SECONDS="0.2", TORNCAT_TESTING="1")
    alice = await h.open(ALICE, transport)
    line = panel(alice).locator(".tc-poll-health")
    await expect(row_cell(alice, 2001).locator(".tc-state")).to_have_text("Okay")  # polled
    await expect(line).to_be_hidden()
    torn_api.error_code = 17  # Torn's backend fails, poll after poll
    await expect(line).to_have_text(re.compile(
        r"^enemy status stale \(Torn API: error 17: Backend error occurred, please try again\) "
        r"since \d\d:\d\d$"))
    # A page opened now learns it from its snapshot.
    bob = await h.open(BOB, transport)
    await expect(panel(bob).locator(".tc-poll-health")).to_contain_text("enemy status stale")
    torn_api.error_code = None
    await expect(line).to_be_hidden()
    torn_api.keys[key].status = 2  # the faction's only key is refused, and disabled
    await expect(line).to_have_text("the faction's Torn API key was refused: error 2: Incorrect Key")
    await expect(panel(bob).locator(".tc-poll-health")).to_have_text(
        "the faction's Torn API key was refused: error 2: Incorrect Key")
    fresh = torn_api.add_key(ALICE.id)  # the operator adds one: the poll works again
    await pg_execute(h.db, "INSERT INTO torncat_torn_keys (faction_id, api_key, source) "
                     "VALUES ($1, $2, 'operator')", FACTION, fresh)
    await expect(line).to_be_hidden()
    await h.assert_clean(alice, bob)


# ---------------------------------------------------------------------------
# Helpers of the flows players live through
# ---------------------------------------------------------------------------

# The userscript's STALL_KEEPALIVES: a live stream silent this many keep-alive intervals is dead.
STALL_KEEPALIVES = 2.5
SERVER_KEEPALIVE_SECONDS = 10.0  # the server's KEEPALIVE_SECONDS default (torncat_sse.py)
TOS_ROWS = ["Data Storage", "Data Sharing", "Purpose of Use", "Key Storage & Sharing", "Key Access Level"]


async def sign_in(page: Page, server: str, key: str) -> None:
    """What a player does on first run: the server, then their Torn API key."""
    settings = panel(page).locator(".tc-settings")
    await expect(settings).to_be_visible()
    await settings.locator(".tc-f-server").fill(server)
    await settings.locator(".tc-f-key").fill(key)
    await settings.locator(".tc-sign-in").click()
    await expect(settings).to_be_hidden()


async def status_changes(page: Page) -> list[tuple[float, str, str, str]]:
    """Every status the panel showed: (wall-clock seconds, status, transport, its title)."""
    return [(t / 1000, status, transport, title)
            for t, status, transport, title in await page.evaluate("window.__tc.changes")]


async def left_live(page: Page, after: float) -> tuple[float, str]:
    """When (wall clock) and why the panel first stopped saying "live" after `after`."""
    for t, status, _, title in await status_changes(page):
        if t >= after and status != "live":
            return t, title
    raise AssertionError(f"still live: {await status_changes(page)}")


async def live_again(page: Page, after: float) -> float:
    """When (wall clock) the panel said "live" again after `after`."""
    await expect(panel(page)).to_have_attribute("data-status", "live")
    return next(t for t, status, _, _ in await status_changes(page) if t >= after and status == "live")


async def seconds_to_show_in(pages: list[Page], port: int, member: Member, target: int,
                             name: str | None, timeout: float = STEP_TIMEOUT) -> list[float]:
    """POST /calls as another browser would; seconds until each page shows the call."""
    for page in pages:
        await page.evaluate(SHOWN, target)
    sent = time.time()
    await api_call(port, member, target, name)
    shown = [await asyncio.wait_for(page.evaluate("window.__tcShown"), timeout) for page in pages]
    return [round(t / 1000 - sent, 3) for t in shown]


def enemy_row(page: Page, target: int):
    return page.locator(".enemy-faction li", has=page.locator(f'a[href="/profiles.php?XID={target}"]'))


# ---------------------------------------------------------------------------
# Across a deploy: never "live" when not, and back within the retry spread
# ---------------------------------------------------------------------------

# How long to wait for the pages after a restart: far beyond what the issue allows (the
# retry spread + 2 s after SIGTERM, 30 s after SIGKILL). The times are recorded, not asserted.
DEPLOY_WAIT = 45.0


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
async def test_a_deploy_costs_at_most_the_retry_spread_and_the_panel_never_says_live_while_down(
        h, on_torn, torn_api, sig):
    """A Render deploy (SIGTERM) and a crash (SIGKILL) under a signed-in player with two tabs,
    the server back within 2 s, another member calling 3 s later. With the production
    RETRY_MS and RECONNECT_SPREAD_SECONDS (10 s each)."""
    port = free_port()
    env = {"PORT": str(port), "TORN_API_URL": torn_api.base_url, "RETRY_MS": "10000",
           "RECONNECT_SPREAD_SECONDS": "10"}
    server = await h.start(**env)
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await on_torn.start()
    leader = await on_torn.tab(ALICE)
    await sign_in(leader, h.base, key)
    await expect(panel(leader).locator(".tc-status")).to_have_text("live · stream")
    follower = await on_torn.tab(ALICE)
    await expect(panel(follower).locator(".tc-status")).to_have_text("live · stream (via another tab)")
    tabs = [leader, follower]
    await api_call(port, BOB, 2002, "Yuri")
    for tab in tabs:
        await expect(panel_call(tab, 2002)).to_contain_text("Bob")
    case = f"deploy {sig} {on_torn.name}"

    stopped = time.time()
    await asyncio.to_thread(server.stop, getattr(signal, sig))
    for tab in tabs:  # at once, from the request's end: never "live" while no server runs
        await expect(panel(tab)).to_have_attribute("data-status", "reconnecting")
    left = [await left_live(tab, stopped) for tab in tabs]
    record_timing(case, "left_live_after_stop_s", [round(t - stopped, 3) for t, _ in left])
    for t, why in left:
        assert "the server closed the stream" in why, left  # its end, not the silence watchdog
        assert t - stopped <= STALL_KEEPALIVES * SERVER_KEEPALIVE_SECONDS, left
    # While no server runs, Bob's call ends, and a Call says it cannot be made, sending nothing.
    await pg_execute(h.db, "UPDATE target_calls SET uncalled_at = now() WHERE target_id = 2002")
    await row_cell(follower, 2003).locator(".tc-call-btn").click()
    await expect(panel(follower).locator(".tc-notice")).to_contain_text("nothing was sent")

    server = await h.start(**env)
    listening = time.time()
    record_timing(case, "restart_s", round(listening - stopped, 3))
    await asyncio.sleep(3)  # the scenario: another member calls 3 s after the restart
    shown = await seconds_to_show_in(tabs, port, CY, 2001, "Xena", timeout=DEPLOY_WAIT)
    record_timing(case, "call_3s_after_restart_shown_s", shown)
    record_timing(case, "live_after_restart_s", [round(await live_again(tab, listening) - listening, 3)
                                                 for tab in tabs])
    for tab in tabs:
        await expect(panel_call(tab, 2002)).to_have_count(0)  # what ended meanwhile is gone
        await expect(panel(tab).locator(".tc-status")).to_contain_text("live · stream")
        await expect(panel(tab).locator(".tc-notice")).to_be_empty()  # its cause is gone
    assert await active_calls(port) == {2001: "Cy"}  # the Call pressed while down was never sent
    assert on_torn.csp_reports == [], on_torn.csp_reports
    await h.assert_clean(*tabs)


async def test_a_stream_that_goes_silent_without_an_end_is_given_up_after_the_keepalives(h):
    """A half-open link: no byte and no end callback ever comes. The watchdog gives the
    stream up after STALL_KEEPALIVES of the server's keep-alive intervals (1 s here, which
    the script learns from the pings), and it resumes where it was."""
    server = await h.start(KEEPALIVE_SECONDS="1")
    alice = await h.open(ALICE, "scriptcat")
    await expect(panel(alice)).to_have_attribute("data-status", "live")

    async def learnt() -> bool:
        memory = json.loads(await alice.evaluate("localStorage.getItem('gmshim:torncat.transport')") or "{}")
        return memory.get("keepaliveMs", 0) <= 1500
    await wait_until(learnt, what="the keep-alive interval learnt")
    await api_call(server.port, BOB, 2001, "Xena")
    await expect(panel_call(alice, 2001)).to_contain_text("Bob")
    last_seen = (await healthz(server.port))["last_event_id"]
    mark = server.mark()

    silenced = time.time()
    h.manager.silence_streams()
    await expect(panel(alice)).to_have_attribute("data-status", "reconnecting")
    t, why = await left_live(alice, silenced)
    assert "the stream went silent" in why, why
    record_timing("watchdog, keep-alive 1 s", "silent_to_reconnecting_s", round(t - silenced, 3))
    await server.await_log(r"stream opened", start=mark)
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · stream")
    opened = [line for line in server.lines[mark:] if "stream opened" in line]
    assert opened and f"last_event_id={last_seen}" in opened[0], opened
    await api_call(server.port, CY, 2002, "Yuri")
    await expect(panel_call(alice, 2002)).to_contain_text("Cy")
    await h.assert_clean(alice)


# ---------------------------------------------------------------------------
# Auth is not transport; first run is one path
# ---------------------------------------------------------------------------

async def test_a_refused_token_is_said_once_and_a_correct_sign_in_goes_live_by_stream_at_once(
        h, on_torn, torn_api):
    await h.start(TORN_API_URL=torn_api.base_url)
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await on_torn.start()
    page = await on_torn.tab(ALICE)
    await fill_in_settings(page, h.base, "not-the-faction-token")
    await expect(panel(page)).to_have_attribute("data-status", "refused")
    await expect(panel(page).locator(".tc-notice")).to_have_text(
        "The server refused the faction token: missing or invalid token. Check the settings, or "
        "sign in with your Torn API key.")
    assert await page.get_by_text("missing or invalid token").count() == 1  # said once, not hidden
    await expect(page.locator("#torncat-toasts .tc-toast")).to_have_count(0)
    memory = await on_torn.remembered(page)
    assert memory is None or memory.get("works") != "long-poll", memory  # a refusal is no transport's fault

    clicked = time.time()
    settings = panel(page).locator(".tc-settings")
    await expect(settings.locator(".tc-f-key")).to_be_visible()
    await settings.locator(".tc-f-key").fill(key)
    await settings.locator(".tc-sign-in").click()
    await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
    record_timing(f"refused then signed in {on_torn.name}", "sign_in_to_live_s",
                  round(await live_again(page, clicked) - clicked, 3))
    await expect(panel(page).locator(".tc-notice")).to_be_empty()
    await page.reload()
    await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
    h.errors.clear()  # the refusal was reported on purpose
    await h.assert_clean(page)


async def test_first_run_is_one_path_sign_in_with_a_key_after_torns_key_usage_table(h, on_torn, torn_api):
    server = await h.start(TORN_API_URL=torn_api.base_url)
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await on_torn.start()
    page = await on_torn.tab(ALICE)
    settings = panel(page).locator(".tc-settings")
    await expect(settings).to_be_visible()
    await expect(panel(page)).to_have_attribute("data-status", "off")
    await expect(panel(page).locator(".tc-status")).to_have_text("not signed in")
    # Torn's key usage table, before the key is typed; the faction token folded away.
    table = settings.locator("table.tc-tos")
    await expect(table.locator("th")).to_have_text(TOS_ROWS)
    await expect(table.locator("td").last).to_have_text("Public Only")
    assert await table.evaluate("(t) => !!(t.compareDocumentPosition(document.querySelector('.tc-f-key')) "
                                "& Node.DOCUMENT_POSITION_FOLLOWING)")
    await expect(settings.locator(".tc-f-key")).to_have_value("")
    await expect(settings.locator(".tc-f-token")).to_be_hidden()
    # No Call before sign-in: the rows offer none, and the panel's says what to do.
    await expect(page.locator(".enemy-faction .tc-cell")).to_have_count(len(ENEMIES))
    await expect(page.locator(".enemy-faction .tc-call-btn")).to_have_count(0)
    await panel(page).locator(".tc-call-input").fill("2001")
    await panel(page).locator(".tc-form .tc-call-btn").click()
    await expect(panel(page).locator(".tc-notice")).to_contain_text("Sign in first")
    assert await active_calls(server.port) == {}

    await sign_in(page, h.base, key)
    await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
    await expect(panel(page).get_by_text("Signed in as Alice [1001]")).to_have_count(1)  # once
    await expect(panel(page).locator(".tc-notice")).to_be_empty()
    await row_cell(page, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(page, 2001).locator(".tc-by")).to_have_text("by you")
    assert await active_calls(server.port) == {2001: "Alice"}
    await h.assert_clean(page)


# ---------------------------------------------------------------------------
# Violentmonkey's stream from a growing responseText
# ---------------------------------------------------------------------------

async def test_violentmonkey_reads_the_stream_from_responsetext_and_starts_afresh_before_a_bound(h):
    server = await h.start()
    h.site.csp = TORN_CSP
    bound = 3000  # characters, instead of TEXT_STREAM_MAX_CHARS, to cross it in a test
    script = USERSCRIPT.replace("const TEXT_STREAM_MAX_CHARS = 1 << 20;",
                                f"const TEXT_STREAM_MAX_CHARS = {bound};")
    assert script != USERSCRIPT
    alice = await h.page(await h.context("violentmonkey", script=script), ALICE)
    await expect(panel(alice).locator(".tc-status")).to_have_text("live · stream")
    await server.await_log(r"stream opened")  # the first stream's line is in before the mark
    mark = server.mark()
    targets = [3000 + i for i in range(12)]  # ~350 bytes of SSE each: past the bound
    for target in targets:
        await api_call(server.port, BOB, target, f"T{target}")
    for target in targets:
        await expect(panel_call(alice, target)).to_contain_text("Bob")
    await server.await_log(r"stream opened", start=mark)  # afresh after the last event read
    opened = [line for line in server.lines[mark:] if "stream opened" in line]
    assert opened and all("last_event_id=" in line for line in opened), opened
    requests = [r for r in await alice.evaluate("window.__gmRequests") if r["url"].endswith("/events")]
    assert {r["responseType"] for r in requests[1:]} == {""}, requests  # read from responseText
    shown = await alice.evaluate("window.__tc.shown")
    assert shown[shown.index("live stream"):] == ["live stream"], shown  # live all along
    await wait_until(lambda: _clients_are(server.port, 1), what="one stream, the fresh one")
    await h.assert_clean(alice)


# ---------------------------------------------------------------------------
# Rows that help
# ---------------------------------------------------------------------------

async def test_calls_list_yours_then_hittable_then_by_hospital_time_with_attack_links_and_names(
        h, torn_api):
    now = int(time.time())
    at_war(torn_api, 81)
    torn_api.add_player(2004, "Wu", 456)  # an enemy not on this page: its name comes from the server
    for target, until in ((2002, now + 3600), (2003, now + 120)):
        p = torn_api.players[target]
        p.state, p.until, p.description = "Hospital", until, "In hospital"
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    server = await h.start(TORN_API_URL=torn_api.base_url, TORN_API_KEYS=f"{FACTION}:{key}",
                           POLL_SECONDS="0.3", TORNCAT_TESTING="1")
    alice = await h.open(ALICE, "scriptcat")
    await expect(row_cell(alice, 2003).locator(".tc-state")).to_have_text(re.compile(r"^Hospital [12]:"))
    row = enemy_row(alice, 2001)
    before = (await row.bounding_box())["height"]
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(row_cell(alice, 2001)).to_contain_text("called by you")
    assert (await row.bounding_box())["height"] == before  # the row keeps its height
    await api_call(server.port, BOB, 2002, "Yuri")
    await api_call(server.port, CY, 2003, "Zed")
    await api_call(server.port, DEE, 2004)  # by id, without a name (as from elsewhere)
    order = panel(alice).locator("li.tc-call")
    await expect(order).to_have_count(4)
    # Yours, then the Okay target, then hospital by time left (2 min before 60 min).
    assert [await li.get_attribute("data-target-id") for li in await order.all()] == [
        "2001", "2004", "2003", "2002"]
    await expect(panel_call(alice, 2004).locator(".tc-target")).to_have_text("Wu")
    await expect(panel_call(alice, 2004).locator(".tc-attack")).to_have_attribute(
        "href", "/page.php?sid=attack&user2ID=2004")
    await h.assert_clean(alice)


# ---------------------------------------------------------------------------
# A war from start to end, and the next one
# ---------------------------------------------------------------------------

def next_war(torn_api, war_id: int) -> None:
    """Our faction and the enemy (456) in a new ranked war, begun a minute ago."""
    war = {"war_id": war_id, "start": int(time.time()) - 60, "end": None, "target": 1000, "winner": None,
           "factions": [{"id": FACTION, "name": "Ours", "score": 0, "chain": 0},
                        {"id": 456, "name": "Theirs", "score": 0, "chain": 0}]}
    torn_api.factions[FACTION].ranked_war = torn_api.factions[456].ranked_war = war


async def shows_no_war(page: Page) -> None:
    """The panel of a faction at peace: every row marked, none with a Call button or a
    countdown of the war that is over, no call box, and the empty list says why."""
    rows = page.locator(".enemy-faction")
    await expect(rows.locator(".tc-cell")).to_have_count(len(ENEMIES))
    await expect(rows.locator(".tc-call-btn")).to_have_count(0)  # nothing to call
    await expect(rows.locator(".tc-state")).to_have_count(0)     # no countdown of a war that is over
    await expect(panel(page).locator(".tc-form")).to_be_hidden()
    await expect(panel(page).locator(".tc-empty")).to_have_text("No war on: no calls")


async def test_a_war_ends_with_a_notice_and_no_calls_or_countdowns_and_the_next_one_brings_them_back(
        h, on_torn, torn_api):
    at_war(torn_api, 82)
    yuri = torn_api.players[2002]
    yuri.state, yuri.until, yuri.description = "Hospital", int(time.time()) + 600, "In hospital"
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    # The browser first: a real ScriptCat takes ~15 s to start, and a poll running meanwhile
    # would spend the key's budget (TORN_KEY_BUDGET, and Torn's 100 a minute: fake_torn.py).
    await on_torn.start()
    server = await h.start(TORN_API_URL=torn_api.base_url, TORN_API_KEYS=f"{FACTION}:{key}",
                           POLL_SECONDS="0.3", TORN_KEY_BUDGET="100", TORNCAT_TESTING="1")
    alice = await on_torn.tab(ALICE)
    await fill_in_settings(alice, h.base, TOKEN)
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await expect(row_cell(alice, 2002).locator(".tc-state")).to_have_text(re.compile(r"^Hospital \d+:"))
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await api_call(server.port, BOB, 2003, "Zed")
    await expect(panel(alice).locator("li.tc-call")).to_have_count(2)

    # Torn says the war is over: the server's poll ends its calls, and the panel says so.
    torn_api.factions[FACTION].ranked_war["end"] = int(time.time()) - 1
    await expect(panel(alice).locator(".tc-notice")).to_have_text("War over: 2 calls cleared")
    await expect(panel(alice).locator("li.tc-call")).to_have_count(0)
    await shows_no_war(alice)
    # A reload brings back neither a Call nor a stale countdown.
    await alice.reload()
    await expect(panel(alice)).to_have_attribute("data-status", "live")
    await shows_no_war(alice)
    rows = alice.locator(".enemy-faction")

    # The next war: Call buttons and statuses are back.
    next_war(torn_api, 83)
    await expect(rows.locator(".tc-call-btn")).to_have_count(len(ENEMIES))
    await expect(row_cell(alice, 2002).locator(".tc-state")).to_have_text(re.compile(r"^Hospital \d+:"))
    await expect(panel(alice).locator(".tc-form")).to_be_visible()
    await row_cell(alice, 2001).locator(".tc-call-btn").click()
    await expect(panel_call(alice, 2001).locator(".tc-by")).to_have_text("by you")
    assert on_torn.csp_reports == [], on_torn.csp_reports
    await h.assert_clean(alice)


async def test_a_war_that_ends_with_no_call_on_says_so_and_a_browser_opened_after_knows_it(
        h, torn_api):
    """The server's `war` event and its snapshot's `war`: no call has to end for the panel to
    say the war is over; a browser that never saw the end (another device, a new member)
    starts without Call or stale countdowns; the next war brings both back to each."""
    at_war(torn_api, 84)
    yuri = torn_api.players[2002]
    yuri.state, yuri.until, yuri.description = "Hospital", int(time.time()) + 600, "In hospital"
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    await h.start(TORN_API_URL=torn_api.base_url, TORN_API_KEYS=f"{FACTION}:{key}",
                  POLL_SECONDS="0.3", TORN_KEY_BUDGET="100", TORNCAT_TESTING="1")
    alice = await h.open(ALICE, "scriptcat")
    await expect(alice.locator(".enemy-faction .tc-call-btn")).to_have_count(len(ENEMIES))
    await expect(row_cell(alice, 2002).locator(".tc-state")).to_have_text(re.compile(r"^Hospital \d+:"))

    torn_api.factions[FACTION].ranked_war["end"] = int(time.time()) - 1  # no call was on
    await expect(panel(alice).locator(".tc-notice")).to_have_text("War over")
    await shows_no_war(alice)
    bob = await h.open(BOB, "violentmonkey")  # nothing remembered: the snapshot alone says it
    await expect(panel(bob)).to_have_attribute("data-status", "live")
    await shows_no_war(bob)

    next_war(torn_api, 85)
    for page in (alice, bob):
        await expect(page.locator(".enemy-faction .tc-call-btn")).to_have_count(len(ENEMIES))
        await expect(row_cell(page, 2002).locator(".tc-state")).to_have_text(
            re.compile(r"^Hospital \d+:"))
        await expect(panel(page).locator(".tc-notice")).to_have_text("")
    await h.assert_clean(alice, bob)


# ---------------------------------------------------------------------------
# Installed from the server's own link
# ---------------------------------------------------------------------------

def version_of(script: str) -> str:
    return re.search(r"^// @version +(\S+)$", script, re.MULTILINE)[1]


async def test_a_player_installs_from_the_servers_link_and_it_connects_there_at_once(h, torn_api):
    server = await h.start(TORN_API_URL=torn_api.base_url)
    key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
    r = await http(server.port, "GET", "/torn-war-caller.user.js")
    assert r.status == 200, r
    assert r.headers["content-type"] == "text/javascript; charset=utf-8"
    served = r.body.decode()
    metadata = served.split("// ==/UserScript==")[0]
    link = f"{h.base}/torn-war-caller.user.js"
    # The manager may reach this server, and keeps the script current from here.
    assert re.findall(r"^// @connect +(\S+)$", metadata, re.MULTILINE) == ["127.0.0.1"]
    assert f"// @updateURL    {link}\n" in metadata and f"// @downloadURL  {link}\n" in metadata
    assert version_of(served) == version_of(USERSCRIPT)
    # What a player installed from there runs with this server filled in: only the key to type.
    h.site.csp = TORN_CSP
    page = await h.page(await h.context("scriptcat", configured=False, script=served), ALICE)
    settings = panel(page).locator(".tc-settings")
    await expect(settings.locator(".tc-f-server")).to_have_value(h.base)
    await settings.locator(".tc-f-key").fill(key)
    await settings.locator(".tc-sign-in").click()
    await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
    await h.assert_clean(page)


def a_newer_version(script: str) -> str:
    """The same userscript with a higher @version (and VERSION, which its settings show)."""
    old = version_of(script)
    major, minor, patch = (int(n) for n in old.split("."))
    new = f"{major}.{minor}.{patch + 1}"
    out = script.replace(f"// @version      {old}\n", f"// @version      {new}\n").replace(
        f"const VERSION = '{old}';", f"const VERSION = '{new}';")
    assert version_of(out) == new and f"const VERSION = '{new}';" in out
    return out


if REAL_MANAGER:  # the real-manager pass only (docs/testing.md): collected only then
    async def test_in_the_real_scriptcat_it_installs_from_the_servers_link_and_is_offered_a_newer_version(
            h, torn_api, tmp_path):
        """ScriptCat installs the script from GET /torn-war-caller.user.js of a running
        server; after a deploy that serves a higher @version at the same address, its
        "Check Update" (the script list's, ScriptService.requestCheckUpdate: fetch the
        @updateURL, compare the versions) offers the update, and the updated script runs."""
        h.site.csp = TORN_CSP
        port = free_port()
        env = {"PORT": str(port), "TORN_API_URL": torn_api.base_url}
        server = await h.start(**env)
        key = torn_api.add_player(ALICE.id, ALICE.name, FACTION)
        link = f"{h.base}/torn-war-caller.user.js"
        scriptcat = ScriptCat(h, Path(REAL_MANAGER), tmp_path / "profile", make_tls_files(tmp_path, None))
        try:
            await scriptcat.start(install_from=link)
            page = await scriptcat.tab(ALICE)
            settings = panel(page).locator(".tc-settings")
            await expect(settings.locator(".tc-f-server")).to_have_value(h.base)  # filled in
            await settings.locator(".tc-f-key").fill(key)
            await settings.locator(".tc-sign-in").click()
            await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
            await panel(page).locator(".tc-gear").click()
            await expect(settings.locator(".tc-version")).to_have_text(f"v{version_of(USERSCRIPT)}")

            # A deploy of a newer version: the same address serves a higher @version.
            newer = a_newer_version(USERSCRIPT)
            deployed = tmp_path / "deploy"
            deployed.mkdir()
            shutil.copy(HERE / "torncat_sse.py", deployed / "torncat_sse.py")
            (deployed / "torn-war-caller.user.js").write_text(newer)
            await asyncio.to_thread(server.stop, signal.SIGTERM)
            await h.start(script=deployed / "torncat_sse.py", **env)
            r = await http(port, "GET", "/torn-war-caller.user.js")
            assert version_of(r.body.decode()) == version_of(newer)

            # ScriptCat's own "Check Update" on its script list: the update is offered.
            options = await scriptcat.context.new_page()
            await options.goto(f"chrome-extension://{scriptcat.id}/src/options.html")
            await expect(options.get_by_text("TornCat War Caller")).to_be_visible()
            await options.get_by_role("button", name="Maybe later").click()  # its welcome tour
            asked = time.time()
            async with scriptcat.context.expect_page(
                    lambda p: "/src/install.html?uuid=" in p.url) as offered:
                await options.get_by_label("Check Update").first.click()
            await expect(options.get_by_text("New Version Available")).to_be_visible()
            update = await offered.value
            record_timing("scriptcat-real install from the server", "check_update_to_offered_s",
                          round(time.time() - asked, 3))
            await expect(update.get_by_text(version_of(newer)).first).to_be_visible()
            await expect(update.get_by_test_id("install-primary")).to_have_text("Update Script")
            await update.get_by_test_id("install-primary").click()
            with contextlib.suppress(PlaywrightTimeoutError, PlaywrightError):
                await update.wait_for_event("close", timeout=STEP_MS)

            # The updated script runs, still signed in, live at once.
            await page.reload()
            await expect(panel(page).locator(".tc-status")).to_have_text("live · stream")
            await panel(page).locator(".tc-gear").click()
            await expect(settings.locator(".tc-version")).to_have_text(f"v{version_of(newer)}")
            assert scriptcat.csp_reports == [], scriptcat.csp_reports
            await h.assert_clean(page)
        finally:
            await scriptcat.close()
