// ==UserScript==
// @name         TornCat War Caller
// @namespace    torncat
// @version      2.3.0
// @description  Who calls which enemy target in a Torn war, live for the whole faction: one Server-Sent Events stream per browser instead of polling every second.
// @author       TornCat
// @match        https://www.torn.com/*
// @run-at       document-end
// @noframes
// @grant        GM_xmlhttpRequest
// @grant        GM_getValue
// @grant        GM_setValue
// @grant        GM_addStyle
// @connect      torncat-sse.onrender.com
// @updateURL    https://torncat-sse.onrender.com/torn-war-caller.user.js
// @downloadURL  https://torncat-sse.onrender.com/torn-war-caller.user.js
// ==/UserScript==
//
// Install it from your faction's server instead (`https://<server>/torn-war-caller.user.js`):
// that copy has the server's address filled in, and your manager keeps it up to date.
// Pasting this file by hand and running your own server? Add a `// @connect <your host>`
// line above (Tampermonkey lets GM_xmlhttpRequest reach only the hosts listed there and
// asks about any other; ScriptCat refuses them), then put its URL in the panel's settings.

/*
 * TornCat War Caller: the faction's calls, pushed by the TornCat SSE server
 * (torncat_sse.py, docs/userscript.md).
 *
 * Transports, best first. Each one proves itself before it is trusted, and the panel
 * says which one is live ("live · stream", "live · long-poll"):
 *   1. `GET /events` through GM_xmlhttpRequest, read as it arrives, in one of two ways
 *      (what the real managers were measured to do: ../shared/managers/README.md):
 *      - `responseType: "stream"`: the ReadableStream that onloadstart hands over
 *        (ScriptCat, Tampermonkey), never `responseText`, which stays undefined until a
 *        request ends. ScriptCat never closes that stream when the server goes away: the
 *        end callbacks (onload, onloadend, readyState 4, onerror) are the only sign, so
 *        every one of them ends the stream here.
 *      - no `responseType`: the growing `responseText` (Violentmonkey, which has no
 *        stream type and hands a string instead), parsing only what is new, and starting
 *        a fresh request (with Last-Event-ID) before the text grows past a bound.
 *      ScriptCat has no `GM_xmlhttpRequest.RESPONSE_TYPE_STREAM`, so the stream is asked
 *      for rather than detected; bytes arriving with no stream to read switch to the text
 *      way. Trusted once the server's first line (its `retry:`, sent at once) arrives
 *      within FIRST_BYTE_MS. The manager makes the request outside the page, so Torn's
 *      Content-Security-Policy and CORS do not apply; the token goes in the Authorization
 *      header and the resume point in Last-Event-ID.
 *   2. Otherwise, at once: long-poll, `GET /calls?since=N&wait=S` through
 *      GM_xmlhttpRequest (complete responses only). The server holds the request until
 *      an event for the faction arrives or S seconds pass, so a call shows the moment
 *      it is made with one request per event or per S seconds.
 *   3. TornPDA: the same long-poll through `PDA_httpGet(url, headers)`, every URL made
 *      unique by a cache-busting parameter (TornPDA answers `undefined` to a GET of
 *      the same URL within 2 s), the token in a header.
 *   4. The page's own EventSource, only where there is no userscript API at all and the
 *      page's CSP allows it (Torn's `connect-src` does not: the panel then says so).
 * What worked is remembered per browser (GM_setValue), so the next page load and the
 * next leader tab start with it. A better transport is tried again only alongside the
 * one that works, which keeps delivering until the new one has proven itself. A 401 or
 * 403 is an answer about the token, never about the transport: it is not remembered.
 * Reconnects wait for the server's `retry:` after a stream ends (the server spreads it
 * out on shutdown), otherwise back off exponentially with jitter. A live stream silent
 * for STALL_KEEPALIVES keep-alive intervals (a link that died without any end) is given
 * up. A snapshot replaces the local state; an event whose id is not above the last one
 * applied is dropped, so nothing is ever applied twice, whichever transport brought it.
 *
 * One stream per browser: the tabs elect a leader with a Web Lock (a
 * BroadcastChannel heartbeat where Web Locks are missing); only the leader talks
 * to the server, and it relays every snapshot and event to the other tabs over a
 * BroadcastChannel. When the leader tab closes, its lock is released and the
 * next tab takes over, resuming from the last event id it was relayed.
 *
 * Nothing the server sends is ever parsed as HTML: every name goes through
 * textContent, and the only attributes built from server data are links made of
 * validated integers.
 *
 * What this relies on (from public sources; none of it is an official Torn API):
 *   - Torn pages carry a hidden `<input id="torn-user">` whose value is JSON with
 *     the logged-in player's `id` and `playername` (read by many public Torn
 *     userscripts: Racing+, Execute+, buy-mug helpers...).
 *   - Ranked-war pages list the enemy in `.enemy-faction .members-list > li`
 *     (`li.enemy`; newer builds use hashed class names, `[class*='membersWrap___'] > li`),
 *     each row with a profile link `profiles.php?XID=<id>` (FF Scouter, TornTools
 *     and war-helper scripts use these selectors); faction profile pages list
 *     members in `.members-list > li` / `.table-body > li`. Rows are rendered
 *     late by Torn's own code, so a MutationObserver finds them.
 *   - Torn's attack page is `page.php?sid=attack&user2ID=<id>` (April 2026;
 *     `loader.php?sid=attack&user2ID=<id>` before); both get the panel.
 *   - TornPDA: `PDA_httpGet(url, headers)` and `PDA_httpPost(url, headers, body)`
 *     resolve to `{status, statusText, responseText, responseHeaders}` when the
 *     response is complete (Manuito83/torn-pda userscripts/TornPDA_API.js), and to
 *     `undefined` for a GET of the same URL within 2 s (remote_snippets.dart). Its
 *     GMforPDA shim (`GM_info.scriptHandler` "GMforPDA") never streams and times out
 *     after 30 s, so a long-poll waits less than that. Uncalls use
 *     `POST /calls/<id>/uncall`, because TornPDA has no DELETE.
 */

(function torncat() {
  'use strict';

  // ---------------------------------------------------------------------------
  // Settings and limits
  // ---------------------------------------------------------------------------

  const VERSION = '2.3.0';
  const DEFAULT_SERVER = 'https://torncat-sse.onrender.com';
  const KEY = 'torncat.';                 // storage prefix: localStorage is shared with Torn's own code
  const CHANNEL = 'torncat-sse';          // BroadcastChannel between this browser's Torn tabs
  const LOCK = 'torncat-sse-leader';      // Web Lock held by the one tab that talks to the server
  const DEFAULT_RETRY_MS = 10000;         // the server's RETRY_MS default, until a `retry:` says otherwise
  const BACKOFF_MIN_MS = 1000;            // first delay after a failed connection
  const BACKOFF_MAX_MS = 60000;           // longest delay between attempts
  const FIRST_BYTE_MS = 3000;             // the server sends `retry:` at once (34-48 ms measured in
                                          // ScriptCat): a stream silent this long is not trusted, and
                                          // the long-poll starts beside it
  const STREAM_PATIENCE_MS = 15000;       // a stream still silent by then is given up: the manager or a
                                          // proxy buffers it
  const STREAM_PROBE_MS = 5 * 60000;      // where streams failed, try one again (beside the long-poll)
                                          // this often, per browser, across page loads
  const DEFAULT_KEEPALIVE_MS = 10000;     // the server's KEEPALIVE_SECONDS default, until the server
                                          // says (`: keepalive N` on the stream) or pings show otherwise
  const KEEPALIVE_MIN_MS = 1000;          // what a measured or announced interval is held to
  const KEEPALIVE_MAX_MS = 120000;
  const STALL_KEEPALIVES = 2.5;           // a live stream silent this many keep-alive intervals is dead
                                          // (a half-open link: no end callback ever comes)
  const TEXT_STREAM_MAX_CHARS = 1 << 20;  // read from responseText (Violentmonkey), which grows for the
                                          // life of the request: past this, a fresh request takes over
  const LONG_POLL_WAIT_S = 25;            // `wait=` of a long-poll: under TornPDA's 30 s GM timeout and
                                          // common 30-60 s proxy idle timeouts (the server allows 1..30)
  const LONG_POLL_GRACE_MS = 10000;       // beyond `wait`, how late a held answer may be before we give up
  const LONG_POLL_MIN_CYCLE_MS = 1000;    // an empty answer sooner than this was not held (a server
                                          // without long-poll, or one shutting down): never faster
  const REQUEST_TIMEOUT_MS = 15000;       // one call or uncall
  const HEARTBEAT_MS = 1000;              // leader heartbeat, only where Web Locks are missing
  const LEADER_LOST_MS = 3500;            // no heartbeat for this long: take over
  const TOAST_MS = 5000;
  const MAX_TOASTS = 3;
  const NOTICE_MS = 15000;                // a notice whose cause is a moment (a failed call) clears itself
  const AGE_REFRESH_MS = 5000;
  const COUNTDOWN_REFRESH_MS = 1000;      // hospital countdowns tick by the second
  const NAME_MAX = 64;                    // the server refuses longer names
  // Sign-in with a Torn API key (POST /auth/torn): the key is sent once and never kept;
  // only the member token the server answers is stored. A Public key is enough; this
  // link opens Torn's "new key" form with the title and the Public type filled in.
  const KEY_LINK = 'https://www.torn.com/preferences.php#tab=api?step=addNewKey&title=TornCat&type=1';
  const KEY_RE = /^[A-Za-z0-9]{16}$/;     // Torn API keys: 16 letters and digits
  const PDA_KEY = '###PDA-APIKEY###';     // TornPDA puts the player's key here; untouched: none
  // Torn's API key usage table, which Torn requires of every tool that takes a key, shown
  // before the key is typed. Each cell is what the server does at sign-in (torncat_sse.py,
  // POST /auth/torn and "The Torn API client"): it asks Torn's /user/profile who owns the
  // key (Public access), keeps the owner's id, name and faction with a member token in its
  // database (the rows stay after the token expires) and in its log, and keeps no copy of
  // the key, only an HMAC of it under a per-process secret, in memory, for 5 minutes. This
  // script never asks the server to lend the key to the faction's Torn poll.
  const KEY_USAGE = [
    ['Data Storage', 'Your Torn id, name and faction (from your profile, read once at sign-in) '
      + 'are stored on this TornCat server with your sign-in, and kept after it expires; '
      + 'each call you make is stored with your name.'],
    ['Data Sharing', 'Members of your faction on this server see your name on the calls you make. '
      + 'No one else.'],
    ['Purpose of Use', 'Signing you in, so that your calls carry your name and you see your '
      + "faction's calls during wars."],
    ['Key Storage & Sharing', 'Not stored, not shared: sent once to this server, which asks Torn '
      + 'who owns it and forgets it. Your browser does not keep it either.'],
    ['Key Access Level', 'Public Only'],
  ];
  const ENEMY_ROWS = [                    // rows of players one may call; never the member's own faction
    '.enemy-faction .members-list > li',
    'li.enemy',
    "[class*='membersWrap___'] > li",
    '.faction-info-wrap.another-faction .members-list > li',
    '.faction-info-wrap.another-faction .table-body > li',
  ].join(', ');

  const gmRequest = typeof GM_xmlhttpRequest === 'function' ? GM_xmlhttpRequest : null;
  const gmGet = typeof GM_getValue === 'function' ? GM_getValue : null;
  const gmSet = typeof GM_setValue === 'function' ? GM_setValue : null;
  const gmAddStyle = typeof GM_addStyle === 'function' ? GM_addStyle : null;
  const pda = typeof PDA_httpGet === 'function' && typeof PDA_httpPost === 'function';
  // TornPDA's GM shim sits on PDA_http*: complete responses only, and the same 2 s deduplication.
  const gmHandler = safeHandler();
  const completeOnly = pda || gmHandler === 'GMforPDA';
  const pageOnly = !gmRequest && !pda; // every request is the page's own, under its CSP
  const tabId = Date.now().toString(36) + Math.random().toString(36).slice(2, 10);

  function safeHandler() {
    try { return typeof GM_info === 'object' && GM_info ? String(GM_info.scriptHandler || '') : ''; } catch (e) { return ''; }
  }

  function warn(...args) { try { console.warn('[TornCat]', ...args); } catch (e) { /* no console */ } }

  /** Run fn, never letting an exception reach Torn's page. */
  function safe(fn, ...args) {
    try { return fn(...args); } catch (e) { warn(e && e.message ? e.message : e); return undefined; }
  }

  // ---------------------------------------------------------------------------
  // Storage and settings
  // ---------------------------------------------------------------------------

  function load(name, fallback) {
    try {
      if (gmGet) {
        const value = gmGet(KEY + name, fallback);
        return value === undefined || value === null ? fallback : value;
      }
      const raw = localStorage.getItem(KEY + name);
      return raw === null ? fallback : JSON.parse(raw);
    } catch (e) {
      return fallback;
    }
  }

  function save(name, value) {
    try {
      if (gmSet) gmSet(KEY + name, value);
      else localStorage.setItem(KEY + name, JSON.stringify(value));
    } catch (e) { /* storage full or blocked: the setting lasts for this page only */ }
  }

  function cleanName(value) {
    if (typeof value !== 'string') return '';
    return value.replace(/[\u0000-\u001f\u007f-\u009f]/g, '').trim().slice(0, NAME_MAX);
  }

  function positiveInt(value) {
    const n = typeof value === 'number' ? value
      : typeof value === 'string' && /^\s*\d{1,16}\s*$/.test(value) ? Number(value) : NaN;
    return Number.isSafeInteger(n) && n > 0 ? n : null;
  }

  /** An event id (0 is valid: the snapshot of an empty log). */
  function eventId(value) {
    const n = typeof value === 'number' ? value
      : typeof value === 'string' && /^\s*\d{1,16}\s*$/.test(value) ? Number(value) : NaN;
    return Number.isSafeInteger(n) && n >= 0 ? n : null;
  }

  function normaliseServer(value) {
    try {
      const url = new URL(String(value).trim());
      if (url.protocol !== 'https:' && url.protocol !== 'http:') return null;
      if (url.username || url.password || url.search || url.hash) return null;
      return url.origin + url.pathname.replace(/\/+$/, '');
    } catch (e) {
      return null;
    }
  }

  /** The logged-in player as Torn's page shows it: `<input id="torn-user" value='{"id":..}'>`. */
  function pageUser() {
    try {
      const input = document.getElementById('torn-user');
      if (!input || !input.value) return null;
      const user = JSON.parse(input.value);
      const id = positiveInt(user && user.id);
      return id ? { id, name: cleanName(user.playername) } : null;
    } catch (e) {
      return null;
    }
  }

  /** Who the stored member token is for, as the sign-in answered; null if none. */
  function signedIn(value) {
    if (!value || typeof value !== 'object') return null;
    const id = positiveInt(value.id);
    const expires = Date.parse(value.expires_at);
    return id && Number.isFinite(expires)
      ? { id, name: cleanName(value.name), factionId: positiveInt(value.faction_id), expires } : null;
  }

  /** TornPDA's copy of the player's key, when TornPDA filled it in. */
  function pdaKey() { return KEY_RE.test(PDA_KEY) ? PDA_KEY : null; }
  /**
   * The player pressed "Sign in with my TornPDA key" for this server, after Torn's key usage
   * table: only then may the script send TornPDA's key, and it may again (an expired
   * sign-in) without asking. Remembered per server: the table is about what that server
   * does. Signing out withdraws it.
   */
  function pdaConsented() { return !!pdaKey() && load('pdaConsent', '') === settings.server; }

  function readSettings() {
    const s = {
      server: normaliseServer(load('server', DEFAULT_SERVER)) || DEFAULT_SERVER,
      token: String(load('token', '') || '').trim(),
      memberId: positiveInt(load('memberId', null)),
      memberName: cleanName(load('memberName', '')),
      fromPage: false,
      configured: load('configured', false) === true,
      member: signedIn(load('member', null)),
      signInExpired: false,
    };
    if (s.member && s.member.expires <= Date.now()) {
      // An expired sign-in: back to the sign-in form rather than a stream the server refuses.
      s.member = null;
      s.token = '';
      s.configured = false;
      s.signInExpired = true;
    }
    const user = pageUser();
    if (user) {
      // The page knows best (an account switch); remember it for pages that do not say.
      if (user.id !== s.memberId) save('memberId', user.id);
      if (user.name && user.name !== s.memberName) save('memberName', user.name);
      s.memberId = user.id;
      s.memberName = user.name || s.memberName;
      s.fromPage = true;
    }
    if (s.member) { // the server writes in the signed-in player's name, whatever the page says
      s.memberId = s.member.id;
      s.memberName = s.member.name || s.memberName;
    }
    return s;
  }

  let settings = null;

  // ---------------------------------------------------------------------------
  // HTTP: GM_xmlhttpRequest, TornPDA, or the page's fetch
  // ---------------------------------------------------------------------------

  function authHeaders(extra) {
    const headers = Object.assign({ Accept: 'application/json' }, extra);
    if (settings.token) headers.Authorization = 'Bearer ' + settings.token;
    return headers;
  }

  function response(status, text, rawHeaders) {
    let json = null;
    try { json = text ? JSON.parse(text) : null; } catch (e) { json = null; }
    const m = /(?:^|\n)\s*retry-after:\s*(\d+)/i.exec(rawHeaders || '');
    return { status: Number(status) || 0, json, retryAfterMs: m ? Number(m[1]) * 1000 : null };
  }

  /**
   * One request to the server; resolves to {status, json, retryAfterMs}, status 0 when
   * unreachable. `opts.timeoutMs` overrides REQUEST_TIMEOUT_MS; `opts.cancel`, if given,
   * gets an `abort()` that ends the request (TornPDA's cannot be ended: it is ignored).
   */
  function request(method, path, body, opts) {
    const timeoutMs = (opts && opts.timeoutMs) || REQUEST_TIMEOUT_MS;
    const cancel = (opts && opts.cancel) || {};
    const url = settings.server + path;
    const data = body === undefined ? undefined : JSON.stringify(body);
    const headers = authHeaders(data === undefined ? {} : { 'Content-Type': 'application/json' });
    return new Promise((resolve) => {
      let settled = false;
      const done = (status, text, rawHeaders) => {
        if (!settled) { settled = true; resolve(response(status, text, rawHeaders)); }
      };
      try {
        if (pda) {
          const pending = method === 'GET' ? PDA_httpGet(url, headers) : PDA_httpPost(url, headers, data || '');
          Promise.resolve(pending).then(
            (r) => done(r && r.status, r && r.responseText, r && r.responseHeaders), () => done(0));
          const timer = setTimeout(() => done(0), timeoutMs);
          cancel.abort = () => { clearTimeout(timer); done(0); };
        } else if (gmRequest) {
          const handle = gmRequest({
            method, url, headers, data, timeout: timeoutMs, nocache: true,
            onload: (r) => done(r.status, r.responseText, r.responseHeaders),
            onerror: () => done(0), ontimeout: () => done(0), onabort: () => done(0),
          });
          cancel.abort = () => { done(0); if (handle && typeof handle.abort === 'function') handle.abort(); };
        } else {
          const abort = typeof AbortController === 'function' ? new AbortController() : null;
          const timer = setTimeout(() => { if (abort) abort.abort(); done(0); }, timeoutMs);
          cancel.abort = () => { clearTimeout(timer); if (abort) abort.abort(); done(0); };
          fetch(url, {
            method, headers, body: data, mode: 'cors', credentials: 'omit', cache: 'no-store',
            signal: abort ? abort.signal : undefined,
          }).then((r) => r.text().then((text) => {
            clearTimeout(timer);
            done(r.status, text, 'Retry-After: ' + (r.headers.get('Retry-After') || ''));
          })).catch(() => { clearTimeout(timer); done(0); });
        }
      } catch (e) {
        done(0);
      }
    });
  }

  function describe(r) {
    const error = r.json && typeof r.json.error === 'string' ? r.json.error : '';
    switch (r.status) {
      case 0: return 'cannot reach the server';
      case 401: return 'the server refused the token: check the settings';
      case 429: return 'too many calls: slow down';
      case 503: return 'the server is busy or starting';
      default: return error || 'the server answered ' + r.status;
    }
  }

  // ---------------------------------------------------------------------------
  // Server-Sent Events parsing (WHATWG HTML, "Parsing an event stream")
  // ---------------------------------------------------------------------------

  class SseParser {
    /** Fed text in pieces of any size; calls onEvent({type, data, id}), onRetry(ms), onComment(text). */
    constructor(onEvent, onRetry, onComment) {
      this.onEvent = onEvent;
      this.onRetry = onRetry;
      this.onComment = onComment;
      this.buf = '';
      this.data = null;     // data lines of the event being read, joined by \n
      this.type = '';
      this.id = null;       // the last event ID buffer: it carries over between events
      this.first = true;
    }

    feed(text) {
      if (!text) return;
      if (this.first) {
        this.first = false;
        if (text.charCodeAt(0) === 0xfeff) text = text.slice(1);
      }
      this.buf += text;
      let start = 0;
      for (;;) {
        const cr = this.buf.indexOf('\r', start);
        const lf = this.buf.indexOf('\n', start);
        const end = cr === -1 ? lf : lf === -1 ? cr : Math.min(cr, lf);
        if (end === -1) break;
        let next = end + 1;
        if (this.buf[end] === '\r') {
          if (next === this.buf.length) break; // a CRLF cut in two: wait for the rest
          if (this.buf[next] === '\n') next += 1;
        }
        this.line(this.buf.slice(start, end));
        start = next;
      }
      this.buf = this.buf.slice(start);
    }

    line(line) {
      if (line === '') { this.dispatch(); return; }
      if (line[0] === ':') { this.onComment(line.slice(1).trim()); return; }
      const colon = line.indexOf(':');
      const field = colon === -1 ? line : line.slice(0, colon);
      let value = colon === -1 ? '' : line.slice(colon + 1);
      if (value[0] === ' ') value = value.slice(1);
      if (field === 'data') this.data = this.data === null ? value : this.data + '\n' + value;
      else if (field === 'event') this.type = value;
      else if (field === 'id') { if (value.indexOf('\u0000') === -1) this.id = value; }
      else if (field === 'retry') { if (/^\d+$/.test(value)) this.onRetry(Number(value)); }
    }

    dispatch() {
      const data = this.data;
      const type = this.type || 'message';
      this.data = null;
      this.type = '';
      if (data !== null) this.onEvent({ type, data, id: this.id });
    }
  }

  // ---------------------------------------------------------------------------
  // The calls, as the server last told us
  // ---------------------------------------------------------------------------

  function validCall(c) {
    return !!c && typeof c === 'object' && positiveInt(c.id) !== null && positiveInt(c.target_id) !== null;
  }

  /** An enemy's status from the server's Torn API poll (a target_status event). */
  function validStatus(s) {
    return !!s && typeof s === 'object' && positiveInt(s.target_id) !== null && typeof s.state === 'string';
  }

  /** The server's Torn API poll's health for the faction (a poll_health event). */
  function validHealth(x) {
    return !!x && typeof x === 'object' && typeof x.state === 'string';
  }

  /** The faction's ranked war as the server's poll sees it (a `war` event): {war_id} or {war_id: null}. */
  function validWar(x) {
    if (!x || typeof x !== 'object') return null;
    const id = x.war_id === null || x.war_id === undefined ? null : positiveInt(x.war_id);
    if (id === null && x.war_id !== null && x.war_id !== undefined) return null;
    return { war_id: id, ended_war_id: positiveInt(x.ended_war_id), calls_ended: Number(x.calls_ended) || 0 };
  }

  /** The first unhealthy poll health of a list (a snapshot's `poll_health`), or null. */
  function unhealthy(list) {
    return (Array.isArray(list) ? list : []).find((x) => validHealth(x) && x.state !== 'ok') || null;
  }

  class CallState {
    constructor(onChange) {
      this.calls = new Map();    // target_id -> active call
      this.statuses = new Map(); // target_id -> the enemy's last status (the server's poll)
      this.names = new Map();    // target_id -> name, from the statuses: for calls made without one
      this.health = null;        // the poll's health when it is not ok (stale, key refused)
      this.war = null;           // null: unknown (no Torn poll for us); {war_id} at war; {war_id: null} none
      this.warCleared = 0;       // calls ended with the last war, as their events came
      this.endedWar = null;      // the war this browser saw end (remembered): for a server that
                                 // says nothing of wars, its statuses are stale
      this.lastEventId = null;   // null until a snapshot: events mean nothing before one
      this.onChange = onChange;
    }

    reset() {
      this.calls.clear();
      this.statuses.clear();
      this.names.clear();
      this.health = null;
      this.war = null;
      this.warCleared = 0;
      this.lastEventId = null;
      this.onChange({ kind: 'reset' });
    }

    /** Whether the server's poll says our faction is not at war (then nothing is called). */
    atPeace() { return !!this.war && this.war.war_id === null; }

    /** The enemy's status to show: none from a war that is over (stale countdowns). */
    status(targetId) {
      const st = this.statuses.get(targetId);
      if (!st || !this.war) return st || null;
      if (this.war.war_id === null) return null;
      return st.war_id === undefined || st.war_id === null || st.war_id === this.war.war_id ? st : null;
    }

    /**
     * Replace everything: the server's word on what is active as of event `id`. `war` is
     * undefined where the server says nothing of wars, null when it knows of none.
     */
    snapshot(calls, id, statuses, health, war) {
      const last = eventId(id);
      if (last === null) return false;
      this.health = unhealthy(health);
      this.war = war === undefined ? null : war === null ? { war_id: null } : validWar(war);
      this.calls.clear();
      for (const c of Array.isArray(calls) ? calls : []) {
        if (validCall(c) && !c.uncalled_at) this.calls.set(c.target_id, c);
      }
      this.statuses.clear();
      for (const st of Array.isArray(statuses) ? statuses : []) {
        if (validStatus(st)) this.learn(st);
      }
      // A server that says nothing of wars, whose statuses are all of the war this browser saw
      // end: that war is over still (its countdowns are stale).
      const wars = new Set(Array.from(this.statuses.values(), (st) => positiveInt(st.war_id)));
      if (!this.war && this.endedWar && wars.size === 1 && wars.has(this.endedWar)) {
        this.war = { war_id: null, ended_war_id: this.endedWar, calls_ended: 0 };
      }
      this.lastEventId = last;
      this.onChange({ kind: 'snapshot' });
      return true;
    }

    learn(st) {
      this.statuses.set(st.target_id, st);
      const name = cleanName(st.target_name);
      if (name) this.names.set(st.target_id, name);
    }

    /** Apply one event in id order; false if it is not newer than the last one applied. */
    event(id, name, data) {
      const n = eventId(id);
      if (n === null || this.lastEventId === null || n <= this.lastEventId) return false;
      if (name === 'poll_health') {
        if (!validHealth(data)) return false;
        this.lastEventId = n;
        this.health = data.state === 'ok' ? null : data;
        this.onChange({ kind: name, id: n });
        return true;
      }
      if (name === 'war') {
        if (data && data.known === false) { // no one says which war is current any more
          this.lastEventId = n;
          this.war = null;
          this.onChange({ kind: name, war: null, id: n });
          return true;
        }
        const war = validWar(data);
        if (!war) return false;
        this.lastEventId = n;
        this.setWar(war);
        this.onChange({ kind: name, war, id: n });
        return true;
      }
      if (name === 'target_status') {
        if (!validStatus(data)) return false;
        this.lastEventId = n;
        this.learn(data);
        // A server without `war` events: a status from another war means the next one began.
        const wid = positiveInt(data.war_id);
        if (this.atPeace() && wid && wid !== this.war.ended_war_id) this.setWar({ war_id: wid });
        this.onChange({ kind: name, status: data, id: n });
        return true;
      }
      if ((name !== 'target_call' && name !== 'target_uncall') || !validCall(data)) return false;
      this.lastEventId = n;
      this.put(name, data);
      if (name === 'target_uncall' && data.uncall_reason === 'war_ended') {
        this.warCleared += 1;
        if (!this.atPeace()) this.setWar({ war_id: null, ended_war_id: positiveInt(data.war_id) });
      }
      this.onChange({ kind: name, call: data, id: n });
      return true;
    }

    setWar(war) {
      const before = this.war;
      this.war = war;
      if (war.war_id === null) {
        this.statuses.clear(); // its countdowns are over with it
        if (war.ended_war_id) this.endedWar = war.ended_war_id;
        if (war.calls_ended > this.warCleared) this.warCleared = war.calls_ended;
      } else if (!before || before.war_id !== war.war_id) {
        this.warCleared = 0;
        this.endedWar = null;
      }
    }

    /** The server says nothing else for us happened up to `id` (a poll's last_event_id). */
    advance(id) {
      const n = eventId(id);
      if (n !== null && this.lastEventId !== null && n > this.lastEventId) this.lastEventId = n;
    }

    /** Our own write's answer, shown before its event arrives (and only then). */
    local(name, call, id) {
      const n = eventId(id);
      if (!validCall(call) || this.lastEventId === null || n === null || n <= this.lastEventId) return;
      this.put(name, call);
      this.onChange({ kind: 'local' });
    }

    put(name, call) {
      if (name === 'target_call' && !call.uncalled_at) {
        this.calls.set(call.target_id, call);
      } else {
        const current = this.calls.get(call.target_id);
        if (current && current.id === call.id) this.calls.delete(call.target_id);
      }
    }

    /** What a tab relays to the others for them to start from. */
    relay() {
      return {
        calls: Array.from(this.calls.values()), last_event_id: this.lastEventId,
        statuses: Array.from(this.statuses.values()), poll_health: this.health ? [this.health] : [],
        war: this.war, war_cleared: this.warCleared,
      };
    }

    /** Start from what another tab relayed. */
    adopt(m) {
      if (m.last_event_id === null || m.last_event_id === undefined) return;
      if (this.snapshot(m.calls, m.last_event_id, m.statuses, m.poll_health, m.war === null ? undefined : m.war)) {
        this.warCleared = Number(m.war_cleared) || 0;
      }
    }
  }

  // ---------------------------------------------------------------------------
  // Transports: a stream attempt, and the long-poll
  // ---------------------------------------------------------------------------

  function jitter(ms) { return ms / 2 + Math.random() * ms / 2; }
  function seconds(ms) { return Math.max(1, Math.round(ms / 1000)) + ' s'; }
  function backoff(errors) { return jitter(Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.max(0, errors - 1))); }

  // Transports, as the panel names them.
  const STREAM = 'stream';            // GET /events through GM_xmlhttpRequest
  const EVENTSOURCE = 'EventSource';  // GET /events through the page's own EventSource
  const LONG_POLL = 'long-poll';      // GET /calls?since=N&wait=S, complete answers
  // How a GM stream is read: the ReadableStream of `responseType: "stream"` (ScriptCat,
  // Tampermonkey), or the growing responseText of a request without one (Violentmonkey).
  const READ_STREAM = 'stream';
  const READ_TEXT = 'text';

  let cspBlocked = false;             // the page's CSP refused a connection to our server
  let pageMayConnect = false;         // the page's CSP let a token-free request through

  /**
   * One `GET /events`. It reads, parses and reports to its owner (the Link), and never
   * reconnects by itself:
   *   owner.attemptLine(a)             a line of the server's arrived (proof; feeds the watchdog)
   *   owner.attemptEvent(a, ev)        an SSE event
   *   owner.attemptRetry(a, ms)        the server's `retry:`
   *   owner.attemptComment(a, text)    a comment (`: ping`, `: keepalive 10`)
   *   owner.attemptNoStream(a, next)   bytes came, but not as asked: try READ_TEXT, or nothing (null)
   *   owner.attemptFull(a)             responseText grew past TEXT_STREAM_MAX_CHARS
   *   owner.attemptEnded(a, outcome)   it is over: {status (0: never answered), retryAfterMs,
   *                                    stalled, unusable}
   */
  class StreamAttempt {
    constructor(how, lastEventId, owner) {
      this.how = how;                 // READ_STREAM, READ_TEXT or EVENTSOURCE
      this.lastEventId = lastEventId;
      this.owner = owner;
      this.proven = false;            // the server's first line arrived
      this.ended = false;
      this.status = 0;                // the answer's status, once known
      this.hooks = [];                // what close() undoes
      this.timers = [];
      this.watchdog = null;
      this.lastPing = 0;
      this.parser = new SseParser(
        (ev) => { this.tell('attemptLine'); this.tell('attemptEvent', ev); },
        (ms) => { this.tell('attemptLine'); this.tell('attemptRetry', ms); },
        (text) => { this.tell('attemptLine'); this.tell('attemptComment', text); });
    }

    tell(name, ...args) { if (!this.ended) safe(() => this.owner[name](this, ...args)); }

    later(ms, fn) { this.timers.push(setTimeout(() => safe(fn), ms)); }

    clearTimers() {
      for (const t of this.timers) clearTimeout(t);
      this.timers = [];
    }

    /** (Re)arm the silence watchdog. */
    watch(ms, fn) {
      clearTimeout(this.watchdog);
      this.watchdog = setTimeout(() => safe(fn), ms);
    }

    /** Over, for good, without a word to the owner. */
    close() {
      if (this.ended) return;
      this.ended = true;
      this.clearTimers();
      clearTimeout(this.watchdog);
      for (const hook of this.hooks) safe(hook);
    }

    /** Over: tell the owner how. */
    end(outcome) {
      if (this.ended) return;
      this.close();
      safe(() => this.owner.attemptEnded(this, Object.assign({ status: this.status }, outcome)));
    }

    feed(text) { if (!this.ended && text) this.parser.feed(text); }

    open() {
      if (this.how === EVENTSOURCE) this.openEventSource(); else this.openGm();
    }

    /** Through GM_xmlhttpRequest, from the ReadableStream or from the growing responseText. */
    openGm() {
      const asText = this.how === READ_TEXT;
      const headers = authHeaders({ Accept: 'text/event-stream', 'Cache-Control': 'no-cache' });
      if (this.lastEventId !== null) headers['Last-Event-ID'] = String(this.lastEventId);
      const decoder = new TextDecoder();
      let reader = null;  // READ_STREAM: the handed-over stream's reader
      let seen = 0;       // READ_TEXT: how much of responseText is parsed

      // The status, once the manager says it: anything but 2xx ends the attempt.
      const refused = (r) => {
        const status = Number(r && r.status) || 0;
        if (status) this.status = status;
        if (!this.status || (this.status >= 200 && this.status < 300)) return false;
        this.end({ retryAfterMs: response(this.status, '', r && r.responseHeaders).retryAfterMs });
        return true;
      };
      const readStream = (r) => {
        const body = r.response;
        if (reader || !body || typeof body.getReader !== 'function') return;
        reader = body.getReader();
        this.hooks.push(() => reader.cancel().catch(() => {}));
        const pump = () => reader.read().then(({ done, value }) => {
          if (this.ended) return;
          if (done) {
            this.feed(decoder.decode());
            this.end({});
            return;
          }
          this.feed(typeof value === 'string' ? value : decoder.decode(value, { stream: true }));
          pump();
        }, () => this.end({}));
        pump();
      };
      const readText = (r) => {
        const text = r.responseText;
        if (typeof text !== 'string') return false;
        if (text.length > seen) {  // only what is new
          const fresh = text.slice(seen);
          seen = text.length;
          this.feed(fresh);
        }
        if (seen > TEXT_STREAM_MAX_CHARS) this.tell('attemptFull');
        return true;
      };
      const progress = (r, bytes) => {
        if (this.ended || !r || refused(r)) return;
        if (asText) {
          if (!readText(r) && bytes) this.tell('attemptNoStream', null);
          return;
        }
        readStream(r);
        // Bytes arrive, but not as a stream: this manager falls back to text (Violentmonkey
        // hands the latest chunk as a string). Read its responseText instead.
        if (!reader && bytes) this.tell('attemptNoStream', READ_TEXT);
      };
      // The request is over: onload, onloadend, readyState 4, onerror, ontimeout. ScriptCat
      // never closes or errors the ReadableStream it handed over (managers/README.md), so
      // these are the only sign that the server closed or died. What is queued in the
      // stream is read first: the server's last `retry:` comes just before the end.
      const over = (r) => {
        if (this.ended || refused(r)) return;
        if (asText && r) readText(r);
        if (!this.status) { this.end({}); return; }  // never answered: unreachable
        setTimeout(() => this.end({}), 0);
      };

      let handle = null;
      try {
        handle = gmRequest({
          method: 'GET',
          url: settings.server + '/events',
          headers,
          nocache: true,
          responseType: asText ? undefined : 'stream',
          onloadstart: (r) => progress(r, false),
          onreadystatechange: (r) => {
            if (r && r.readyState === 4) over(r); else progress(r, !!r && r.readyState === 3);
          },
          onprogress: (r) => progress(r, true),
          onload: over,
          onloadend: over,
          onerror: over,
          ontimeout: over,
          onabort: over,
        });
      } catch (e) {
        this.later(0, () => this.end({ unusable: true }));
      }
      this.hooks.push(() => { if (handle && typeof handle.abort === 'function') handle.abort(); });
    }

    /** The page's own EventSource (no userscript API): the token has to go in the URL. */
    openEventSource() {
      if (!pageMayConnect) {
        // A page whose CSP refuses the server reports the refused URL (CSP 3, "report-uri"):
        // learn whether it may connect with a request that carries nothing secret, and put
        // the token in a URL only then. A violation calls blocked() through main's listener.
        fetch(settings.server + '/healthz', { mode: 'no-cors', credentials: 'omit', cache: 'no-store' })
          .then(() => {
            pageMayConnect = true;
            if (!this.ended) this.openEventSource();
          }, () => this.end({}));
        return;
      }
      const query = [];
      if (settings.token) query.push('token=' + encodeURIComponent(settings.token));
      if (this.lastEventId !== null) query.push('last_event_id=' + this.lastEventId);
      let source;
      try {
        source = new EventSource(settings.server + '/events' + (query.length ? '?' + query.join('&') : ''));
      } catch (e) {
        this.later(0, () => this.end({ unusable: true }));
        return;
      }
      this.hooks.push(() => source.close());
      const onMessage = (e) => {
        this.tell('attemptLine');
        this.tell('attemptEvent', { type: e.type, data: e.data, id: e.lastEventId });
      };
      for (const type of ['snapshot', 'target_call', 'target_uncall', 'target_status', 'poll_health', 'war']) {
        source.addEventListener(type, onMessage);
      }
      source.onopen = () => { this.status = 200; this.tell('attemptLine'); };
      // We reconnect ourselves (with backoff and jitter, and ?last_event_id=) rather than let
      // the browser retry at a fixed interval. CLOSED means the connection was refused for
      // good (the page's CSP, a wrong status or type), not just dropped.
      source.onerror = () => this.end({ unusable: source.readyState === 2 && !this.proven });
    }
  }

  /**
   * The long-poll: `GET /calls?since=N&wait=S` in a loop. The server answers when something
   * happens (or after S seconds), and the next request goes out at once. No fixed interval:
   * an empty answer that came sooner than LONG_POLL_MIN_CYCLE_MS waits out the rest of it,
   * and an error backs off with jitter, so the loop never spins. It reports to its owner:
   *   owner.pollAnswer(json, since) -> whether it brought news
   *   owner.pollRefused(answer)     a 401 or 403: the loop has stopped
   *   owner.pollFailed(answer, ms)  anything else; the next try is in `ms`
   */
  class LongPoll {
    constructor(state, owner) {
      this.state = state;
      this.owner = owner;
      this.stopped = false;
      this.errors = 0;
      this.timer = null;
      this.cancel = {};
      this.n = 0;
    }

    start() { safe(() => this.cycle()); }

    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      if (this.cancel.abort) safe(this.cancel.abort);
    }

    again(ms) { if (!this.stopped) this.timer = setTimeout(() => safe(() => this.cycle()), ms); }

    cycle() {
      if (this.stopped) return;
      const since = this.state.lastEventId;
      const query = since === null ? [] : ['since=' + since, 'wait=' + LONG_POLL_WAIT_S];
      // TornPDA answers `undefined` to a GET of the same URL within 2 s: make each one unique.
      if (completeOnly) query.push('_=' + Date.now().toString(36) + (this.n++).toString(36));
      const started = Date.now();
      this.cancel = {};
      request('GET', '/calls' + (query.length ? '?' + query.join('&') : ''), undefined, {
        timeoutMs: LONG_POLL_WAIT_S * 1000 + LONG_POLL_GRACE_MS, cancel: this.cancel,
      }).then((r) => {
        if (this.stopped) return;
        if (r.status === 200 && r.json && typeof r.json === 'object') {
          this.errors = 0;
          const news = this.owner.pollAnswer(r.json, since);
          this.again(news ? 0 : Math.max(0, LONG_POLL_MIN_CYCLE_MS - (Date.now() - started)));
          return;
        }
        if (r.status === 401 || r.status === 403) {
          this.stopped = true;
          this.owner.pollRefused(r);
          return;
        }
        this.errors += 1;
        const delay = r.retryAfterMs ? r.retryAfterMs + Math.random() * 1000 : backoff(this.errors + 1);
        this.owner.pollFailed(r, delay);
        this.again(delay);
      });
    }
  }

  // ---------------------------------------------------------------------------
  // The link to the server (only the leader tab has one)
  // ---------------------------------------------------------------------------

  class Link {
    /**
     * sink: {snapshot(calls, id, statuses, health, war), event(id, name, data), advance(id),
     * status(status, detail, transport), refused(answer)}
     */
    constructor(state, sink) {
      this.state = state;
      this.sink = sink;
      // The best this browser offers; the long-poll is what every one of them can do.
      this.best = completeOnly ? LONG_POLL : gmRequest ? STREAM
        : typeof EventSource === 'function' ? EVENTSOURCE : LONG_POLL;
      const memory = load('transport', null);
      this.memory = memory && typeof memory === 'object' ? memory : {};
      this.read = this.memory.read === READ_TEXT ? READ_TEXT : READ_STREAM;  // how a GM stream is read
      this.keepaliveMs = keepalive(this.memory.keepaliveMs) || DEFAULT_KEEPALIVE_MS;
      this.retryMs = DEFAULT_RETRY_MS;  // the server's last `retry:`
      this.errors = 0;                  // stream attempts in a row that failed on the server's side
      this.stream = null;               // the stream attempt under way (proven or not)
      this.poller = null;               // the long-poll, when it runs
      this.live = '';                   // the transport delivering now, '' when none
      this.timer = null;                // the next stream attempt
      this.probeTimer = null;           // the next try of the stream beside the long-poll
      this.stopped = false;
      this.wasLive = false;             // something worked before: say "reconnecting", not "connecting"
    }

    start() {
      if (this.best === LONG_POLL) { this.longPoll(); return; }
      // The stream failed in this browser lately: deliver by long-poll at once, and try the
      // stream beside it only when STREAM_PROBE_MS have passed since it last failed.
      const m = this.memory;
      const failedAt = m.best === this.best && m.works === LONG_POLL ? Number(m.at) || 0 : 0;
      if (failedAt) {
        this.longPoll();
        this.probeLater(Math.max(0, failedAt + STREAM_PROBE_MS - Date.now()));
      } else {
        this.openStream();
      }
    }

    stop() {
      this.stopped = true;
      clearTimeout(this.timer);
      clearTimeout(this.probeTimer);
      if (this.stream) this.stream.close();
      this.stream = null;
      this.stopLongPoll();
    }

    status(status, detail, transport) { if (!this.stopped) this.sink.status(status, detail, transport || ''); }

    /** What worked in this browser (a transport failure only: never an answer about the token). */
    remember(works) {
      this.memory = { best: this.best, read: this.read, works, at: Date.now(), keepaliveMs: this.keepaliveMs };
      save('transport', this.memory);
    }

    /** Delivering by `transport`: say so once. */
    isLive(transport, detail) {
      this.wasLive = true;
      if (this.live === transport) return;
      this.live = transport;
      this.status('live', detail, transport);
    }

    /** Not delivering any more: say so at once, whatever comes next. */
    gone(why, transport) {
      this.live = '';
      this.status('reconnecting', why, transport || this.best);
    }

    probeLater(ms) {
      clearTimeout(this.probeTimer);
      this.probeTimer = setTimeout(() => { if (!this.stopped && !this.stream) this.openStream(); }, ms);
    }

    /** The page's CSP blocked us: nothing this page does can reach the server, so stop trying. */
    blocked() {
      if (this.stopped || !pageOnly) return; // GM and TornPDA requests are exempt from the page's CSP
      this.status('blocked', "Torn's Content-Security-Policy blocks this page from reaching the server: "
        + 'run the script in a userscript manager (Tampermonkey, ScriptCat, Violentmonkey) or TornPDA', '');
      this.stop();
    }

    /**
     * A 401 or 403, on the stream or the long-poll: an answer about the token, not about the
     * transport. Stop, learn the server's reason (a refused stream has no body to read: one
     * complete request asks), and let the page say it.
     */
    refused(answer) {
      if (this.stopped) return;
      this.stop();
      const ask = answer && answer.json ? Promise.resolve(answer) : request('GET', '/calls');
      ask.then((r) => {
        if (link !== this) return;
        if (r.status === 401 || r.status === 403) this.sink.refused(r); else startLink();
      });
    }

    // -- the stream ---------------------------------------------------------------

    /** A stream attempt: the primary way in, or a try beside a running long-poll. */
    openStream(quiet) {
      if (this.stopped) return;
      clearTimeout(this.timer);
      if (this.stream) this.stream.close();
      const a = new StreamAttempt(this.best === STREAM ? this.read : EVENTSOURCE, this.state.lastEventId, this);
      this.stream = a;
      if (!this.poller && !quiet) {
        this.status(this.wasLive ? 'reconnecting' : 'connecting', 'opening a stream…', this.best);
      }
      // Silent for FIRST_BYTE_MS: deliver by long-poll now, and start with it on the next page
      // load too; the stream may still prove itself (then it takes over and is remembered
      // instead). Silent for STREAM_PATIENCE_MS: given up.
      a.later(FIRST_BYTE_MS, () => {
        if (a.proven) return;
        this.remember(LONG_POLL);
        this.longPoll();
        a.later(STREAM_PATIENCE_MS - FIRST_BYTE_MS, () => a.end({ unusable: true }));
      });
      a.open();
    }

    stallMs() { return STALL_KEEPALIVES * this.keepaliveMs; }

    /** A line of the server's: the stream is proven, and the watchdog starts over. */
    attemptLine(a) {
      if (a !== this.stream || this.stopped) return;
      if (!a.proven) {
        a.proven = true;
        a.clearTimers();
        clearTimeout(this.probeTimer);
        this.errors = 0;
        this.stopLongPoll();
        this.remember(this.best);
        this.isLive(this.best, this.best === EVENTSOURCE ? 'streaming (EventSource)'
          : this.read === READ_TEXT ? 'streaming (from responseText)' : 'streaming');
      }
      // EventSource hides the pings: no watchdog there.
      if (a.how !== EVENTSOURCE) a.watch(this.stallMs(), () => a.end({ stalled: true }));
    }

    attemptEvent(a, ev) {
      if (a !== this.stream) return;
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      if (ev.type === 'snapshot') {
        this.sink.snapshot(data && data.calls, data && data.last_event_id !== undefined ? data.last_event_id : ev.id,
          data && data.statuses, data && data.poll_health, data ? data.war : undefined);
      } else if (['target_call', 'target_uncall', 'target_status', 'poll_health', 'war'].includes(ev.type)) {
        this.sink.event(ev.id, ev.type, data);
      }
    }

    attemptRetry(a, ms) { if (a === this.stream) this.retryMs = ms; }

    /** `: keepalive N` (the server's interval, in seconds), or a ping: learn the interval. */
    attemptComment(a, text) {
      if (a !== this.stream) return;
      const said = /^keepalive\s+(\d+(?:\.\d+)?)$/.exec(text);
      let ms = null;
      if (said) {
        a.announced = true;
        ms = keepalive(Number(said[1]) * 1000);
      } else if (!a.announced) {
        const now = Date.now();
        if (a.lastPing) ms = keepalive(now - a.lastPing);
        a.lastPing = now;
      }
      if (ms && Math.abs(ms - this.keepaliveMs) > 500) {
        this.keepaliveMs = ms;
        this.remember(this.best);
        this.attemptLine(a);  // the watchdog, at the new interval
      }
    }

    /** Bytes with no stream to read: read the text instead, or give the stream up. */
    attemptNoStream(a, next) {
      if (a !== this.stream) return;
      a.close();
      this.stream = null;
      if (next === READ_TEXT && this.read !== READ_TEXT) {
        this.read = READ_TEXT;
        this.openStream();
        return;
      }
      this.read = READ_STREAM;  // next time, the stream type again
      this.remember(LONG_POLL);
      this.longPoll();
      this.probeLater(STREAM_PROBE_MS);
    }

    /** responseText past its bound: a fresh request takes over where this one is. */
    attemptFull(a) {
      if (a !== this.stream) return;
      this.openStream(true);
    }

    /**
     * A stream attempt is over. A 401/403 is about the token. A proven stream comes back
     * after the server's `retry:` (a silent one at once); one that never streamed hands over
     * to the long-poll (and is remembered); one the server could not answer is tried again
     * with backoff, unless the long-poll is delivering.
     */
    attemptEnded(a, o) {
      if (this.stream === a) this.stream = null; else return;
      if (this.stopped) return;
      if (pageOnly && cspBlocked) { this.blocked(); return; }
      if (o.status === 401 || o.status === 403) { this.refused(null); return; }
      if (a.proven) {
        // On shutdown the server sends each client a different `retry:`, so they do not all
        // come back at once.
        const delay = o.stalled ? jitter(BACKOFF_MIN_MS) : this.retryMs;
        this.gone((o.stalled ? 'the stream went silent' : 'the server closed the stream')
          + ': back in ' + seconds(delay), this.best);
        this.timer = setTimeout(() => this.openStream(), delay);
        return;
      }
      if (o.unusable || (o.status >= 200 && o.status < 300)) {
        // Answered, but nothing came through (a manager or proxy that buffers).
        this.remember(LONG_POLL);
        this.longPoll();
        this.probeLater(STREAM_PROBE_MS);
        return;
      }
      if (this.poller) { this.probeLater(STREAM_PROBE_MS); return; }
      this.errors += 1;
      const delay = o.retryAfterMs ? o.retryAfterMs + Math.random() * 1000 : backoff(this.errors);
      this.gone((o.status ? 'the server answered ' + o.status : 'cannot reach the server')
        + ': retrying in ' + seconds(delay), this.best);
      this.timer = setTimeout(() => this.openStream(), delay);
    }

    // -- the long-poll ------------------------------------------------------------

    longPoll() {
      if (this.poller || this.stopped) return;
      this.poller = new LongPoll(this.state, this);
      this.poller.start();
    }

    pollAnswer(j, since) {
      let news = true;
      if (Array.isArray(j.events) && since !== null) {
        for (const ev of j.events) if (ev) this.sink.event(ev.id, ev.event, ev.data);
        this.sink.advance(j.last_event_id);
        news = j.events.length > 0;
      } else {  // the first answer, or {"reset": true}
        this.sink.snapshot(j.calls, j.last_event_id, j.statuses, j.poll_health, j.war);
      }
      this.isLive(LONG_POLL, (this.best === LONG_POLL ? '' : 'the stream did not work here; ')
        + 'each answer comes when something happens');
      return news;
    }

    pollRefused(r) {
      this.poller = null;
      this.refused(r);
    }

    pollFailed(r, delay) {
      if (pageOnly && cspBlocked) { this.blocked(); return; }
      if (this.live === LONG_POLL || !this.live) this.gone(describe(r) + ': retrying in ' + seconds(delay), LONG_POLL);
    }

    stopLongPoll() {
      if (!this.poller) return;
      this.poller.stop();
      this.poller = null;
      if (this.live === LONG_POLL) this.live = '';
    }
  }

  /** A keep-alive interval, held to KEEPALIVE_MIN_MS..KEEPALIVE_MAX_MS; null if none. */
  function keepalive(ms) {
    const n = Number(ms);
    return Number.isFinite(n) && n > 0 ? Math.min(KEEPALIVE_MAX_MS, Math.max(KEEPALIVE_MIN_MS, n)) : null;
  }

  // ---------------------------------------------------------------------------
  // Tabs: one leader talks to the server and relays to the others
  // ---------------------------------------------------------------------------

  let state = null;
  let link = null;
  let role = 'starting';        // 'leader' or 'follower'
  let linkStatus = { status: 'connecting', detail: '', transport: '' };
  let channel = null;
  let lastHeartbeat = 0;
  let lockLeader = false;       // leader by Web Lock: exclusive, so never two of them

  function post(message) {
    if (!channel) return;
    try { channel.postMessage(Object.assign({ from: tabId }, message)); } catch (e) { /* closing */ }
  }

  /** What the leader's link reports: applied here, relayed to the other tabs. */
  const sink = {
    snapshot(calls, id, statuses, health, war) {
      if (state.snapshot(calls, id, statuses, health, war)) post(Object.assign({ t: 'snapshot' }, state.relay()));
    },
    event(id, name, call) {
      if (state.event(id, name, call)) post({ t: 'event', id: state.lastEventId, name, call });
    },
    advance(id) {
      state.advance(id);
      post({ t: 'advance', id: state.lastEventId });
    },
    status(status, detail, transport) {
      linkStatus = { status, detail, transport };
      showStatus(linkStatus);
      post({ t: 'status', status: linkStatus });
    },
    refused(answer) { refusedByServer(answer, true); },
  };

  function startLink() {
    if (link) link.stop();
    link = null;
    if (!settings.configured) {
      sink.status('off', 'sign in to connect', '');
      return;
    }
    link = new Link(state, sink);
    link.start();
  }

  function becomeLeader() {
    if (role === 'leader') return;
    role = 'leader';
    startLink();
    post({ t: 'leader' });
  }

  function stepDown() {
    if (role !== 'leader') return;
    role = 'follower';
    if (link) link.stop();
    link = null;
    post({ t: 'hello' });
    showStatus(linkStatus);
  }

  function elect() {
    try {
      channel = typeof BroadcastChannel === 'function' ? new BroadcastChannel(CHANNEL) : null;
    } catch (e) {
      channel = null;
    }
    if (!channel) { becomeLeader(); return; } // nobody to share a stream with
    channel.onmessage = (e) => safe(onMessage, e.data);
    role = 'follower';
    showStatus(linkStatus);
    post({ t: 'hello' });
    const locks = navigator.locks;
    if (locks && typeof locks.request === 'function') {
      // Held until this tab goes away: then the browser hands it to the next tab waiting.
      locks.request(LOCK, () => new Promise(() => {
        lockLeader = true;
        safe(becomeLeader);
      })).catch(() => heartbeatElection());
    } else {
      heartbeatElection();
    }
  }

  /** Where Web Locks are missing: the leader says so every HEARTBEAT_MS; silence means take over. */
  function heartbeatElection() {
    // Each tab waits a little longer than the others, so that they rarely take over together.
    const patience = LEADER_LOST_MS + Math.random() * HEARTBEAT_MS;
    lastHeartbeat = Date.now();
    setInterval(() => safe(() => {
      if (role === 'leader') post({ t: 'heartbeat' });
      else if (Date.now() - lastHeartbeat > patience) becomeLeader();
    }), HEARTBEAT_MS);
  }

  function onMessage(m) {
    if (!m || typeof m !== 'object' || m.from === tabId) return;
    switch (m.t) {
      case 'hello':
        if (role === 'leader') {
          post(Object.assign({ t: 'state', to: m.from, status: linkStatus }, state.relay()));
        }
        break;
      case 'state':
        if (m.to === tabId && role !== 'leader') {
          state.adopt(m);
          if (m.status) { linkStatus = m.status; showStatus(linkStatus); }
        }
        break;
      case 'snapshot':
        if (role !== 'leader') state.adopt(m);
        break;
      case 'event':
        if (role !== 'leader') state.event(m.id, m.name, m.call);
        break;
      case 'advance':
        if (role !== 'leader') state.advance(m.id);
        break;
      case 'status':
        if (role !== 'leader' && m.status) { linkStatus = m.status; showStatus(linkStatus); }
        break;
      case 'leader':
      case 'heartbeat':
        lastHeartbeat = Date.now();
        // Two leaders (heartbeat election only): the one with the smaller id stays.
        if (role === 'leader' && !lockLeader && String(m.from) < tabId) stepDown();
        break;
      case 'bye': // the leader is leaving: take over now, not after LEADER_LOST_MS
        lastHeartbeat = Date.now() - LEADER_LOST_MS;
        break;
      case 'settings':
        applySettings();
        showWho();
        break;
      default:
        break;
    }
  }

  function applySettings() {
    settings = readSettings();
    state.reset();
    if (role === 'leader') startLink();
    renderAll();
  }

  // ---------------------------------------------------------------------------
  // Calling and uncalling
  // ---------------------------------------------------------------------------

  function callerName(c) {
    return cleanName(c && c.caller_name) || ('#' + (c && c.caller_id));
  }

  /** A target's name: the call's, the one given, Torn's row, the server's status; else its id. */
  function targetLabel(c, fallbackName) {
    const id = c ? c.target_id : '';
    return cleanName(c && c.target_name) || cleanName(fallbackName) || cleanName(rowNames.get(id))
      || cleanName(state.names.get(id)) || ('#' + id);
  }

  /** Why a call cannot be made now, in the player's words; '' when it can. */
  function whyNotNow() {
    if (!settings.configured) return 'Sign in first: open the settings (⚙) and sign in with your Torn API key.';
    if (linkStatus.status === 'refused') return 'The server refused your token: check the settings (⚙).';
    if (state.atPeace()) return 'Your faction is not at war: calls open when the next war starts.';
    if (linkStatus.status !== 'live') {
      return 'Not connected to the server (' + (linkStatus.status || 'connecting')
        + '): nothing was sent. Try again once the panel says live.';
    }
    if (!settings.memberId || !settings.memberName) return 'Set your Torn id and name in the settings first.';
    return '';
  }

  async function callTarget(targetId, targetName) {
    const why = whyNotNow();
    if (why) { notice(why, 'error', !settings.configured ? 'sign-in' : linkStatus.status !== 'live' ? 'link' : 'action'); return; }
    const body = { target_id: targetId, caller_id: settings.memberId, caller_name: settings.memberName };
    const name = cleanName(targetName) || cleanName(rowNames.get(targetId)) || cleanName(state.names.get(targetId));
    if (name) body.target_name = name;
    const r = await request('POST', '/calls', body);
    if (r.status === 201 && r.json) {
      state.local('target_call', r.json.call, r.json.event_id);
      clearNotice('action');
    } else if (r.status === 409) {
      const holder = r.json && r.json.call;
      notice(targetLabel(holder || { target_id: targetId }, targetName) + ' is already called by '
        + (holder ? callerName(holder) : 'someone else'), 'error');
    } else if (!refusedByServer(r)) {
      notice('Call failed: ' + describe(r), 'error');
    }
  }

  async function uncallTarget(targetId) {
    if (linkStatus.status !== 'live') { notice(whyNotNow() || 'Not connected to the server.', 'error', 'link'); return; }
    const r = await request('POST', '/calls/' + targetId + '/uncall',
      { caller_id: settings.memberId, caller_name: settings.memberName || undefined });
    if (r.status === 200 && r.json) {
      state.local('target_uncall', r.json.call, r.json.event_id);
      clearNotice('action');
    } else if (r.status === 403 && r.json && r.json.call) {
      notice('Only ' + callerName(r.json.call) + ' can uncall ' + targetLabel(r.json.call), 'error');
    } else if (r.status === 404) {
      notice('That target is not called any more.', 'info');
    } else if (!refusedByServer(r)) {
      notice('Uncall failed: ' + describe(r), 'error');
    }
  }

  /** A button that runs an async action once at a time. */
  function actionButton(label, cls, action) {
    const button = h('button', { type: 'button', class: 'tc-btn ' + cls, text: label });
    button.addEventListener('click', (e) => {
      e.preventDefault();
      e.stopPropagation();
      if (button.disabled) return;
      button.disabled = true;
      Promise.resolve(safe(action)).catch(() => {}).then(() => { button.disabled = false; });
    });
    return button;
  }

  // ---------------------------------------------------------------------------
  // Signing in with a Torn API key
  // ---------------------------------------------------------------------------

  function whoText(member) {
    return 'Signed in as ' + (member.name || 'player') + ' [' + member.id + ']';
  }

  /** Ask the server for a member token; the key lives only in this call. True on success. */
  async function signIn(key) {
    if (!KEY_RE.test(key)) {
      notice('A Torn API key is 16 letters and digits.', 'error', 'sign-in');
      return false;
    }
    notice('Signing in…', 'info', 'sign-in');
    const r = await request('POST', '/auth/torn', { key });
    const a = r.json || {};
    const id = positiveInt(a.player_id);
    if (r.status !== 200 || typeof a.token !== 'string' || !id) {
      notice(typeof a.error === 'string' && a.error ? 'Sign-in refused: ' + a.error
        : 'Sign-in failed: ' + describe(r), 'error', 'sign-in');
      return false;
    }
    save('token', a.token);
    save('member', { id, name: cleanName(a.name), faction_id: a.faction_id, expires_at: a.expires_at });
    save('memberId', id);
    save('memberName', cleanName(a.name));
    save('configured', true);
    clearNotice('sign-in');
    clearNotice('auth');
    applySettings();
    post({ t: 'settings' });
    showWho();
    return true;
  }

  async function signInFromSettings() {
    const server = normaliseServer(ui.fServer.value || DEFAULT_SERVER);
    if (!server) { notice('The server URL must start with https:// (or http://).', 'error', 'sign-in'); return; }
    const key = ui.fKey.value.trim();
    if (server !== settings.server) {
      save('server', server);
      settings = readSettings();
    }
    if (await signIn(key)) {
      ui.fKey.value = '';
      closeSettings();
    }
  }

  /** Drop the member token, here and in every tab. */
  function forgetSignIn() {
    save('token', '');
    save('member', null);
    save('configured', false);
    applySettings();
    post({ t: 'settings' });
    showWho();
  }

  function signOut() {
    save('pdaConsent', '');  // on TornPDA: no sign-in with its key until the button again
    forgetSignIn();
    notice('Signed out.', 'info');
    openSettings();
  }

  /**
   * The server refused the token: a 401 (or, on the stream or the long-poll, a 403). For a
   * member token (expired, revoked, or no longer in the faction) the token is dropped and
   * the sign-in form comes back with the server's reason. For a faction token the link
   * stops and every tab says why, once, with the settings open. False for any other answer.
   */
  function refusedByServer(r, reading) {
    if (!r || !(r.status === 401 || (reading && r.status === 403))) return false;
    const error = r.json && typeof r.json.error === 'string' && r.json.error ? r.json.error : '';
    if (settings.member && r.status === 401) {
      forgetSignIn();
      if (ui.settings) openSettings();
      notice('Signed out: ' + (error || 'the server no longer accepts your sign-in') + '.', 'error', 'auth');
      return true;
    }
    const why = 'The server refused ' + (settings.member ? 'your sign-in' : 'the faction token') + ': '
      + (error || 'status ' + r.status) + '. Check the settings, or sign in with your Torn API key.';
    if (role === 'leader') {
      if (link) link.stop();
      sink.status('refused', why, '');
    } else {
      notice(why, 'error', 'auth');
    }
    if (ui.settings) openSettings();
    return true;
  }

  /**
   * TornPDA hands scripts the player's key. Torn asks every tool that takes a key to show
   * its key usage table first, so the key is sent only once the player has read it and
   * pressed "Sign in with my TornPDA key" (signInWithPdaKey); after that, on each page
   * load where no one is signed in, without asking again.
   */
  async function signInOnPda() {
    const key = pdaKey();
    if (!key || settings.member || (settings.token && settings.configured) || !pdaConsented()) return;
    if (await signIn(key) && ui.settings) closeSettings();
  }

  /** The button under the key usage table on TornPDA: consent, then sign in. */
  async function signInWithPdaKey() {
    const key = pdaKey();
    if (!key) return;
    const server = normaliseServer(ui.fServer.value || DEFAULT_SERVER);
    if (!server) { notice('The server URL must start with https:// (or http://).', 'error', 'sign-in'); return; }
    if (server !== settings.server) {
      save('server', server);
      settings = readSettings();
    }
    save('pdaConsent', server);
    if (await signIn(key)) closeSettings();
  }

  // ---------------------------------------------------------------------------
  // The panel, the badges on Torn's rows, and toasts
  // ---------------------------------------------------------------------------

  /** createElement with text children only: nothing here ever parses HTML. */
  function h(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(props || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') node.className = v;
      else if (k === 'text') node.textContent = String(v);
      else node.setAttribute(k, v === true ? '' : String(v));
    }
    for (const child of children) {
      if (child !== null && child !== undefined && child !== false) node.append(child);
    }
    return node;
  }

  const ui = {};
  const cellKeys = new WeakMap(); // row cell -> what it shows, to skip needless DOM writes
  const rowNames = new Map();     // target id -> name, from Torn's rows: for calls made without one
  let noticeCause = '';           // what the notice shown is about ('' when none)
  let noticeTimer = null;

  const CSS = `
#torncat-panel, #torncat-panel *, #torncat-toasts, #torncat-toasts *, .tc-cell, .tc-cell * {
  box-sizing: border-box; font-family: Arial, Helvetica, sans-serif; letter-spacing: normal;
}
#torncat-panel {
  position: fixed; top: 80px; right: 8px; z-index: 2147483000;
  width: min(300px, calc(100vw - 16px)); max-height: calc(100vh - 16px);
  display: flex; flex-direction: column; background: #1f1f1f; color: #ddd;
  border: 1px solid #444; border-radius: 6px; box-shadow: 0 2px 10px rgba(0,0,0,.5);
  font-size: 12px; line-height: 1.35; text-align: left;
}
#torncat-panel .tc-head {
  display: flex; flex-wrap: wrap; align-items: center; gap: 2px 6px; padding: 6px 8px; cursor: move;
  touch-action: none; user-select: none; border-bottom: 1px solid #333; background: #2a2a2a;
  border-radius: 6px 6px 0 0;
}
#torncat-panel.tc-collapsed .tc-head { border-bottom: 0; border-radius: 6px; }
#torncat-panel .tc-title { font-weight: bold; color: #fff; }
#torncat-panel .tc-dot { width: 9px; height: 9px; border-radius: 50%; background: #777; flex: none; }
#torncat-panel[data-status="live"] .tc-dot { background: #5c5; }
#torncat-panel[data-status="connecting"] .tc-dot { background: #db3; }
#torncat-panel[data-status="blocked"] .tc-dot,
#torncat-panel[data-status="refused"] .tc-dot,
#torncat-panel[data-status="reconnecting"] .tc-dot { background: #d55; }
#torncat-panel .tc-status { flex: 1 1 90px; min-width: 0; color: #aaa; overflow-wrap: anywhere; }
#torncat-panel .tc-count { color: #fff; background: #444; border-radius: 8px; padding: 0 6px; }
#torncat-panel .tc-icon {
  background: none; border: 0; color: #bbb; cursor: pointer; font-size: 14px; padding: 2px 4px; margin: 0;
  min-width: 24px; min-height: 24px; line-height: 1;
}
#torncat-panel .tc-body { overflow-y: auto; padding: 6px 8px; }
#torncat-panel .tc-notice { margin: 0 0 6px; color: #f99; overflow-wrap: anywhere; }
#torncat-panel .tc-notice.tc-info { color: #9cf; }
#torncat-panel .tc-notice:empty { display: none; }
#torncat-panel .tc-poll-health { margin: 0 0 6px; color: #fc6; overflow-wrap: anywhere; }
#torncat-panel ul.tc-list { list-style: none; margin: 0; padding: 0; }
#torncat-panel li.tc-call {
  display: flex; align-items: center; gap: 6px; padding: 4px 0; border-bottom: 1px solid #2f2f2f;
  margin: 0; background: none; min-height: 33px;
}
#torncat-panel li.tc-call .tc-target { color: #8bf; text-decoration: none; font-weight: bold; overflow-wrap: anywhere; }
#torncat-panel li.tc-call .tc-by { flex: 1; min-width: 0; color: #ccc; overflow-wrap: anywhere; }
#torncat-panel li.tc-call.tc-mine .tc-by { color: #8d8; }
#torncat-panel li.tc-call .tc-age { color: #888; flex: none; }
#torncat-panel li.tc-call .tc-attack { color: #f96; text-decoration: none; flex: none; font-size: 14px; padding: 0 2px; }
#torncat-panel li.tc-empty { color: #888; padding: 4px 0; margin: 0; }
#torncat-panel .tc-form { display: flex; gap: 6px; margin-top: 8px; }
#torncat-panel input {
  flex: 1; min-width: 0; background: #111; color: #eee; border: 1px solid #555; border-radius: 4px;
  padding: 4px 6px; font-size: 12px; margin: 0; height: auto;
}
#torncat-panel input[readonly] { color: #999; }
#torncat-panel .tc-settings label { display: block; margin: 0 0 6px; color: #bbb; }
#torncat-panel .tc-settings label input { display: block; width: 100%; margin-top: 2px; }
#torncat-panel .tc-settings .tc-row { display: flex; gap: 6px; justify-content: flex-end; margin: 0 0 6px; }
#torncat-panel .tc-version { color: #666; margin-right: auto; align-self: center; }
#torncat-panel .tc-who { margin: 0 0 6px; color: #8d8; }
#torncat-panel .tc-key-link { color: #8bf; margin-right: auto; align-self: center; }
#torncat-panel .tc-signed-in-as { color: #8d8; margin-right: auto; align-self: center; }
#torncat-panel .tc-sign-in-box, #torncat-panel .tc-member-box { margin: 0 0 8px; }
#torncat-panel .tc-lead { margin: 0 0 6px; color: #fff; font-weight: bold; }
#torncat-panel table.tc-tos { width: 100%; border-collapse: collapse; margin: 0 0 6px; font-size: 11px; }
#torncat-panel table.tc-tos caption { text-align: left; color: #bbb; padding: 0 0 2px; }
#torncat-panel table.tc-tos th, #torncat-panel table.tc-tos td {
  border: 1px solid #3a3a3a; padding: 2px 4px; vertical-align: top; text-align: left; background: none;
}
#torncat-panel table.tc-tos th { color: #bbb; font-weight: bold; width: 34%; }
#torncat-panel table.tc-tos td { color: #ddd; }
#torncat-panel details.tc-advanced { margin: 0 0 6px; color: #bbb; }
#torncat-panel details.tc-advanced summary { cursor: pointer; margin: 0 0 6px; }
#torncat-panel [hidden] { display: none !important; }
.tc-btn {
  background: #3a5f3a; color: #fff; border: 1px solid #4c7a4c; border-radius: 4px; cursor: pointer;
  padding: 3px 8px; font-size: 11px; line-height: 1.3; min-height: 24px; margin: 0; flex: none;
}
.tc-btn.tc-uncall, .tc-btn.tc-cancel { background: #5f3a3a; border-color: #7a4c4c; }
.tc-btn:disabled { opacity: .5; cursor: default; }
.tc-cell {
  display: inline-flex; align-items: center; gap: 4px; margin-left: 6px; vertical-align: middle; font-size: 11px;
  min-height: 24px;
}
.tc-state { margin-right: 4px; font-size: 11px; opacity: .85; white-space: nowrap; }
.tc-state.tc-hospital, .tc-state.tc-jail { color: #e57373; opacity: 1; }
.tc-cell .tc-badge {
  background: #7a3; color: #fff; border-radius: 3px; padding: 1px 5px; white-space: nowrap; max-width: 160px;
  overflow: hidden; text-overflow: ellipsis; line-height: 20px;
}
.tc-cell .tc-badge.tc-theirs { background: #a53; }
#torncat-toasts {
  position: fixed; right: 12px; bottom: 12px; z-index: 2147483001; display: flex; flex-direction: column;
  gap: 6px; align-items: flex-end; max-width: calc(100vw - 24px); pointer-events: none;
}
#torncat-toasts .tc-toast {
  background: #222; color: #fff; padding: 8px 12px; border-radius: 8px; font-size: 13px;
  box-shadow: 0 2px 6px rgba(0,0,0,.4); overflow-wrap: anywhere; pointer-events: auto;
}
#torncat-toasts .tc-toast.tc-error { background: #7a2a2a; }
`;

  function onFactionPage() { return /\/factions\.php$/i.test(location.pathname); }

  /** The target of Torn's attack page (`page.php?sid=attack&user2ID=`, formerly loader.php), or null. */
  function attackTarget() {
    if (!/\/(?:page|loader)\.php$/i.test(location.pathname)) return null;
    const q = new URLSearchParams(location.search);
    return q.get('sid') === 'attack' ? positiveInt(q.get('user2ID')) : null;
  }

  function attackUrl(targetId) { return '/page.php?sid=attack&user2ID=' + targetId; }

  /**
   * The panel's CSS. Torn's CSP has no style-src, so default-src 'self' blocks a page's
   * inline <style> (and reports a violation); the manager's GM_addStyle is not blocked.
   * Without GM_addStyle (TornPDA, no manager) a constructed stylesheet
   * (`document.adoptedStyleSheets`, which CSP does not govern: Chromium applies it under
   * Torn's policy) comes next, and a <style> element last, for browsers without it.
   */
  function injectStyle() {
    if (document.getElementById('torncat-style') || window.__torncatStyled) return;
    if (gmAddStyle) {
      try {
        Promise.resolve(gmAddStyle(CSS)).catch(() => {}); // some managers return a Promise
        window.__torncatStyled = 'GM_addStyle';
        return;
      } catch (e) { /* fall back */ }
    }
    if (typeof CSSStyleSheet === 'function' && 'adoptedStyleSheets' in document) {
      try {
        const sheet = new CSSStyleSheet();
        sheet.replaceSync(CSS);
        document.adoptedStyleSheets = [...document.adoptedStyleSheets, sheet];
        window.__torncatStyled = 'adoptedStyleSheets';
        return;
      } catch (e) { /* fall back */ }
    }
    const style = h('style', { id: 'torncat-style' });
    style.textContent = CSS;
    (document.head || document.documentElement).append(style);
  }

  function buildPanel() {
    ui.status = h('span', { class: 'tc-status', text: 'connecting…' });
    ui.count = h('span', { class: 'tc-count', text: '0', title: 'active calls' });
    ui.toggle = h('button', { type: 'button', class: 'tc-icon tc-toggle', title: 'Collapse', text: '▾' });
    ui.gear = h('button', { type: 'button', class: 'tc-icon tc-gear', title: 'Settings', text: '⚙' });
    ui.head = h('div', { class: 'tc-head' },
      h('span', { class: 'tc-dot' }), h('span', { class: 'tc-title', text: 'TornCat' }), ui.status, ui.count,
      ui.gear, ui.toggle);
    ui.notice = h('p', { class: 'tc-notice', role: 'status' });
    ui.pollHealth = h('p', { class: 'tc-poll-health' });
    ui.pollHealth.hidden = true;
    ui.list = h('ul', { class: 'tc-list' });
    ui.callInput = h('input', {
      class: 'tc-call-input', type: 'text', inputmode: 'numeric', placeholder: 'Target id or profile link',
      'aria-label': 'Target to call',
    });
    ui.form = h('form', { class: 'tc-form' }, ui.callInput,
      h('button', { type: 'submit', class: 'tc-btn tc-call-btn', text: 'Call' }));
    ui.form.addEventListener('submit', (e) => {
      e.preventDefault();
      const m = /(?:XID=|user2ID=)?(\d{1,16})\s*$/.exec(ui.callInput.value.trim());
      const id = m ? positiveInt(m[1]) : null;
      if (!id && !whyNotNow()) { notice('Give a target id or a profile link.', 'error'); return; }
      if (!whyNotNow()) ui.callInput.value = '';
      safe(callTarget, id, '');
    });
    ui.settings = buildSettings();
    ui.who = h('p', { class: 'tc-who' });
    ui.body = h('div', { class: 'tc-body' }, ui.notice, ui.pollHealth, ui.who, ui.settings, ui.list, ui.form);
    ui.panel = h('div', { id: 'torncat-panel', 'data-status': 'connecting', 'data-role': role },
      ui.head, ui.body);

    ui.toggle.addEventListener('click', () => setCollapsed(!ui.panel.classList.contains('tc-collapsed')));
    ui.gear.addEventListener('click', () => (ui.settings.hidden ? openSettings() : closeSettings()));
    makeMovable(ui.panel, ui.head);
    document.body.append(ui.panel);
    setCollapsed(load('collapsed', false) === true);
    const pos = load('position', null);
    if (pos && typeof pos.x === 'number' && typeof pos.y === 'number') place(pos.x, pos.y);
    window.addEventListener('resize', () => safe(() => {
      if (ui.panel.style.left) place(parseFloat(ui.panel.style.left), parseFloat(ui.panel.style.top));
    }));
    if (!settings.configured) openSettings();
    if (settings.signInExpired) notice('Your sign-in has expired: sign in again.', 'error', 'auth');
    showWho();
  }

  /** Torn's key usage table, as Torn asks tools to show it before a key is typed. */
  function keyUsageTable() {
    return h('table', { class: 'tc-tos' },
      h('caption', { text: 'What TornCat does with your key' }),
      h('tbody', {}, ...KEY_USAGE.map(([what, how]) => h('tr', {}, h('th', { scope: 'row', text: what }),
        h('td', { text: how })))));
  }

  /**
   * The settings. First run is one path: the server (filled in when the script came from
   * it), Torn's key usage table, the key, Sign in. A faction token (and the id and name it
   * needs) is the advanced way, folded away.
   */
  function buildSettings() {
    const field = (label, input) => h('label', {}, label, input);
    ui.fServer = h('input', { type: 'url', class: 'tc-f-server', placeholder: DEFAULT_SERVER, autocomplete: 'off' });
    ui.fToken = h('input', { type: 'password', class: 'tc-f-token', autocomplete: 'off', placeholder: 'from your faction' });
    ui.fId = h('input', { type: 'text', class: 'tc-f-id', inputmode: 'numeric' });
    ui.fName = h('input', { type: 'text', class: 'tc-f-name', maxlength: NAME_MAX });
    const saveButton = h('button', { type: 'submit', class: 'tc-btn tc-save', text: 'Save' });
    const cancel = h('button', { type: 'button', class: 'tc-btn tc-cancel', text: 'Close' });
    cancel.addEventListener('click', () => closeSettings());
    ui.fKey = h('input', { type: 'password', class: 'tc-f-key', autocomplete: 'off', placeholder: '16 letters and digits' });
    const signInButton = h('button', { type: 'button', class: 'tc-btn tc-sign-in', text: 'Sign in' });
    signInButton.addEventListener('click', () => safe(signInFromSettings));
    ui.fKey.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); safe(signInFromSettings); }
    });
    const keyLink = h('a', { class: 'tc-key-link', href: KEY_LINK, target: '_blank', rel: 'noopener noreferrer',
      text: 'Create a Public key' });
    if (pdaKey()) {
      // TornPDA has the key: the table, then one button; no key to type.
      const pdaButton = h('button', { type: 'button', class: 'tc-btn tc-pda-sign-in', text: 'Sign in with my TornPDA key' });
      pdaButton.addEventListener('click', () => safe(signInWithPdaKey));
      ui.signInBox = h('div', { class: 'tc-sign-in-box' },
        h('p', { class: 'tc-lead', text: 'Sign in with the API key TornPDA gives this script' }),
        keyUsageTable(),
        h('div', { class: 'tc-row' }, pdaButton));
    } else {
      ui.signInBox = h('div', { class: 'tc-sign-in-box' },
        h('p', { class: 'tc-lead', text: 'Sign in with your Torn API key' }),
        keyUsageTable(),
        field('Your Torn API key (Public access is enough)', ui.fKey),
        h('div', { class: 'tc-row' }, keyLink, signInButton));
    }
    ui.signedInAs = h('span', { class: 'tc-signed-in-as' });
    const signOutButton = h('button', { type: 'button', class: 'tc-btn tc-sign-out', text: 'Sign out' });
    signOutButton.addEventListener('click', () => safe(signOut));
    ui.memberBox = h('div', { class: 'tc-member-box tc-row' }, ui.signedInAs, signOutButton);
    ui.advanced = h('details', { class: 'tc-advanced' },
      h('summary', { text: 'Advanced: a faction token instead' }),
      field('Faction token', ui.fToken), field('Your Torn id', ui.fId), field('Your name', ui.fName),
      h('div', { class: 'tc-row' }, saveButton));
    const form = h('form', { class: 'tc-settings' },
      field('TornCat server', ui.fServer), ui.memberBox, ui.signInBox, ui.advanced,
      h('div', { class: 'tc-row' }, h('span', { class: 'tc-version', text: 'v' + VERSION }), cancel));
    form.hidden = true;
    form.addEventListener('submit', (e) => { e.preventDefault(); safe(saveSettings); });
    return form;
  }

  function openSettings() {
    ui.fServer.value = settings.server;
    ui.fToken.value = settings.member ? '' : settings.token;
    ui.fKey.value = '';
    ui.signInBox.hidden = !!settings.member;
    ui.memberBox.hidden = !settings.member;
    ui.advanced.hidden = !!settings.member;
    ui.advanced.open = !settings.member && !!settings.token;  // a faction token in use: show it
    if (settings.member) ui.signedInAs.textContent = whoText(settings.member);
    ui.fId.value = settings.memberId ? String(settings.memberId) : '';
    ui.fName.value = settings.memberName;
    ui.fId.readOnly = ui.fName.readOnly = settings.fromPage; // Torn's page says who you are
    ui.fId.title = ui.fName.title = settings.fromPage ? 'read from the page' : '';
    ui.settings.hidden = false;
    setCollapsed(false);
    showWho();
  }

  function closeSettings() {
    ui.settings.hidden = true;
    showWho();
  }

  function saveSettings() {
    const server = normaliseServer(ui.fServer.value || DEFAULT_SERVER);
    if (!server) { notice('The server URL must start with https:// (or http://).', 'error', 'sign-in'); return; }
    save('server', server);
    if (!settings.member) save('token', ui.fToken.value.trim());
    if (!settings.fromPage && !settings.member) {
      save('memberId', positiveInt(ui.fId.value.trim()));
      save('memberName', cleanName(ui.fName.value));
    }
    save('configured', true);
    closeSettings();
    clearNotice('auth');
    clearNotice('sign-in');
    notice('Saved.', 'info');
    applySettings();
    post({ t: 'settings' });
  }

  /** "Signed in as …" under the title; while the settings are open they say it instead. */
  function showWho() {
    if (!ui.who) return;
    ui.who.textContent = settings.member ? whoText(settings.member) : '';
    ui.who.hidden = !settings.member || !ui.settings.hidden;
  }

  function setCollapsed(collapsed) {
    ui.panel.classList.toggle('tc-collapsed', collapsed);
    ui.body.hidden = collapsed;
    ui.toggle.textContent = collapsed ? '▸' : '▾';
    ui.toggle.title = collapsed ? 'Expand' : 'Collapse';
    save('collapsed', collapsed);
  }

  function place(x, y) {
    const p = ui.panel;
    const maxX = Math.max(0, window.innerWidth - p.offsetWidth);
    const maxY = Math.max(0, window.innerHeight - ui.head.offsetHeight);
    p.style.left = Math.round(Math.min(Math.max(0, x), maxX)) + 'px';
    p.style.top = Math.round(Math.min(Math.max(0, y), maxY)) + 'px';
    p.style.right = 'auto';
  }

  function makeMovable(panel, handle) {
    let drag = null;
    handle.addEventListener('pointerdown', (e) => {
      if (e.button !== 0 || e.target.closest('button')) return;
      const rect = panel.getBoundingClientRect();
      drag = { dx: e.clientX - rect.left, dy: e.clientY - rect.top };
      safe(() => handle.setPointerCapture(e.pointerId));
    });
    handle.addEventListener('pointermove', (e) => { if (drag) place(e.clientX - drag.dx, e.clientY - drag.dy); });
    const drop = () => {
      if (!drag) return;
      drag = null;
      save('position', { x: parseFloat(panel.style.left) || 0, y: parseFloat(panel.style.top) || 0 });
    };
    handle.addEventListener('pointerup', drop);
    handle.addEventListener('pointercancel', drop);
  }

  /**
   * The notice under the title. `cause` says what it is about, and so when it goes: 'auth'
   * (the token) and 'sign-in' when a sign-in or Save succeeds or the link is live, 'link'
   * when the link is live, 'war' when the next war starts; any other ('action': a call,
   * an uncall, a Save) after NOTICE_MS. An error about a call is also a toast, for a
   * collapsed panel; the token's and the sign-in's show in the settings, once.
   */
  function notice(text, kind, cause) {
    cause = cause || 'action';
    if (text && kind === 'error' && (cause === 'action' || cause === 'link')) toast(text, 'error');
    if (!ui.notice) return;
    clearTimeout(noticeTimer);
    ui.notice.textContent = text || '';
    ui.notice.className = 'tc-notice' + (kind === 'info' ? ' tc-info' : '');
    noticeCause = text ? cause : '';
    if (text && cause === 'action') noticeTimer = setTimeout(() => clearNotice('action'), NOTICE_MS);
  }

  /** Clear the notice if it is about `cause`. */
  function clearNotice(cause) {
    if (!ui.notice || noticeCause !== cause) return;
    clearTimeout(noticeTimer);
    ui.notice.textContent = '';
    noticeCause = '';
  }

  function toast(text, kind) {
    let box = document.getElementById('torncat-toasts');
    if (!box) {
      box = h('div', { id: 'torncat-toasts', 'aria-live': 'polite' });
      document.body.append(box);
    }
    const item = h('div', { class: 'tc-toast' + (kind === 'error' ? ' tc-error' : ''), text });
    box.append(item);
    while (box.children.length > MAX_TOASTS) box.firstElementChild.remove();
    setTimeout(() => item.remove(), TOAST_MS);
  }

  function showStatus(s) {
    if (!ui.panel || !s) return;
    ui.panel.dataset.status = s.status || 'connecting';
    ui.panel.dataset.transport = s.transport || '';
    ui.panel.dataset.role = role;
    const via = role === 'leader' ? '' : ' (via another tab)';
    const what = s.status === 'live' && s.transport ? 'live · ' + s.transport
      : s.status === 'off' ? 'not signed in' : s.status || 'connecting';
    ui.status.textContent = what + via;
    ui.status.title = (s.detail || '') + via;
    if (s.status === 'live') {
      clearNotice('link');
      clearNotice('auth');
      clearNotice('sign-in');
    } else if (s.status === 'refused' && s.detail) {
      notice(s.detail, 'error', 'auth');
    }
  }

  function age(createdAt) {
    const t = Date.parse(createdAt);
    if (!Number.isFinite(t)) return '';
    const s = Math.max(0, Math.floor((Date.now() - t) / 1000));
    if (s < 60) return s + 's';
    if (s < 3600) return Math.floor(s / 60) + 'm';
    return Math.floor(s / 3600) + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0');
  }

  /** "Hospital 4:59" (a countdown to Torn's status.until), or the state as Torn says it. */
  function statusText(st) {
    if (!st) return '';
    const until = Number(st.until);
    if ((st.state === 'Hospital' || st.state === 'Jail') && Number.isFinite(until) && until > 0) {
      const left = Math.max(0, Math.round(until - Date.now() / 1000));
      const hms = left >= 3600
        ? Math.floor(left / 3600) + ':' + String(Math.floor((left % 3600) / 60)).padStart(2, '0')
        : String(Math.floor(left / 60));
      return st.state + ' ' + hms + ':' + String(left % 60).padStart(2, '0');
    }
    return st.state;
  }

  function statusSpan(st) {
    if (!st) return null;
    return h('span', {
      class: 'tc-state tc-' + st.state.toLowerCase().replace(/[^a-z]/g, ''),
      'data-until': st.until ? String(st.until) : '', 'data-state': st.state,
      title: st.description || st.state, text: statusText(st),
    });
  }

  function refreshCountdowns() {
    for (const span of document.querySelectorAll('.tc-state[data-until]:not([data-until=""])')) {
      span.textContent = statusText({ state: span.dataset.state, until: span.dataset.until });
    }
  }

  /**
   * Calls in the order that helps: yours first, then targets that are Okay (hittable now),
   * then those in hospital by time left, then the rest; newest first within each.
   */
  function callOrder(a, b) {
    const rank = (c) => {
      const st = state.status(c.target_id);
      const kind = !st ? 3 : st.state === 'Okay' ? 1 : st.state === 'Hospital' ? 2 : 3;
      return [c.caller_id === settings.memberId ? 0 : 1, kind, kind === 2 ? Number(st.until) || 0 : 0];
    };
    const x = rank(a);
    const y = rank(b);
    for (let i = 0; i < x.length; i++) if (x[i] !== y[i]) return x[i] - y[i];
    return String(b.created_at).localeCompare(String(a.created_at));
  }

  function renderCalls() {
    if (!ui.list) return;
    const calls = Array.from(state.calls.values()).sort(callOrder);
    ui.count.textContent = String(calls.length);
    ui.form.hidden = state.atPeace();
    if (!calls.length) {
      ui.list.replaceChildren(h('li', {
        class: 'tc-empty', text: state.lastEventId === null ? 'Waiting for the server…'
          : state.atPeace() ? 'No war on: no calls' : 'No active calls',
      }));
      return;
    }
    ui.list.replaceChildren(...calls.map((c) => {
      const mine = c.caller_id === settings.memberId;
      const label = targetLabel(c);
      return h('li', { class: 'tc-call' + (mine ? ' tc-mine' : ''), 'data-target-id': c.target_id },
        h('a', { class: 'tc-target', href: '/profiles.php?XID=' + c.target_id, text: label }),
        statusSpan(state.status(c.target_id)),
        h('span', { class: 'tc-by', text: mine ? 'by you' : 'by ' + callerName(c) }),
        h('span', { class: 'tc-age', 'data-created': String(c.created_at || ''), text: age(c.created_at) }),
        h('a', { class: 'tc-attack', href: attackUrl(c.target_id), title: 'Attack ' + label, text: '⚔' }),
        mine ? actionButton('Uncall', 'tc-uncall', () => uncallTarget(c.target_id)) : null);
    }));
  }

  function refreshAges() {
    if (!ui.list || ui.body.hidden) return;
    for (const span of ui.list.querySelectorAll('.tc-age')) span.textContent = age(span.dataset.created);
  }

  /** The Call button or "called by X" badge on each enemy row Torn has rendered. */
  function decorateRows() {
    let learnt = false;
    for (const row of document.querySelectorAll(ENEMY_ROWS)) {
      const link = row.querySelector('a[href*="profiles.php?XID="]');
      const m = link && /XID=(\d+)/.exec(link.getAttribute('href') || '');
      const id = m ? positiveInt(m[1]) : null;
      if (!id) continue;
      let cell = row.querySelector('.tc-cell');
      if (!cell || cell.dataset.targetId !== String(id)) {
        if (cell) cell.remove();
        cell = h('span', { class: 'tc-cell', 'data-target-id': id });
        // Appended at the end of the name cell: Torn's own nodes keep their order.
        (row.querySelector('.member') || row).append(cell);
      }
      const name = cleanName((link.textContent || '').replace(/\s*\[\d+\]\s*$/, '')
        || (link.getAttribute('data-placeholder') || '').replace(/\s*\[\d+\]\s*$/, ''));
      if (name && rowNames.get(id) !== name) {
        rowNames.set(id, name);
        learnt = learnt || state.calls.has(id);
      }
      renderCell(cell, id, name);
    }
    if (learnt) renderCalls();
  }

  /**
   * One row's cell: the enemy's status, then the call. No Call button before sign-in or
   * when the faction is not at war (the war's countdowns go with it).
   */
  function renderCell(cell, id, name) {
    const c = state.calls.get(id);
    const mine = !!c && c.caller_id === settings.memberId;
    const st = state.status(id);
    const canCall = settings.configured && !state.atPeace();
    const key = (c ? c.id + (mine ? ':mine' : ':' + callerName(c)) : canCall ? 'free' : 'none')
      + (st ? '|' + st.state + ':' + st.until : '');
    if (cellKeys.get(cell) === key) return;
    cellKeys.set(cell, key);
    const parts = [statusSpan(st)];
    if (!c) {
      if (canCall) parts.push(actionButton('Call', 'tc-call-btn', () => callTarget(id, name)));
    } else if (mine) {
      parts.push(h('span', { class: 'tc-badge tc-mine', text: 'called by you' }),
        actionButton('Uncall', 'tc-uncall', () => uncallTarget(id)));
    } else {
      const by = 'called by ' + callerName(c);
      parts.push(h('span', { class: 'tc-badge tc-theirs', text: by, title: by }));
    }
    cell.replaceChildren(...parts.filter(Boolean));
  }

  function renderAll() {
    safe(renderCalls);
    safe(decorateRows);
    safe(renderPollHealth);
    showStatus(linkStatus);
  }

  /** hh:mm of an ISO time, in the browser's time zone; '?' if it is not a time. */
  function clock(iso) {
    const d = new Date(typeof iso === 'string' ? iso : NaN);
    if (!Number.isFinite(d.getTime())) return '?';
    return String(d.getHours()).padStart(2, '0') + ':' + String(d.getMinutes()).padStart(2, '0');
  }

  /**
   * The server's Torn API poll, when it is unwell: Torn down or slow for POLL_STALE_ROUNDS
   * polls (the server counts them), or the faction's key refused. Cleared when it polls again.
   */
  function renderPollHealth() {
    if (!ui.pollHealth) return;
    const x = state.health;
    const reason = x && typeof x.reason === 'string' && x.reason ? x.reason : 'no answer';
    let text = '';
    if (x && x.state === 'stale') text = 'enemy status stale (Torn API: ' + reason + ') since ' + clock(x.since);
    else if (x && x.state === 'key_refused') text = "the faction's Torn API key was refused: " + reason;
    ui.pollHealth.textContent = text;  // text, never HTML
    ui.pollHealth.hidden = !text;
  }

  function watchRows() {
    let queued = false;
    const ours = (node) => !!node && node.nodeType === 1 && !!node.closest('.tc-cell, #torncat-panel, #torncat-toasts');
    // Our own writes (a badge, the panel, a toast) must not wake us up again.
    const byUs = (m) => ours(m.target) || (Array.from(m.addedNodes).every(ours)
      && Array.from(m.removedNodes).every((n) => n.nodeType !== 1 || n.classList.contains('tc-cell')));
    new MutationObserver((mutations) => {
      if (queued || mutations.every(byUs)) return;
      queued = true;
      setTimeout(() => { queued = false; safe(decorateRows); }, 50);
    }).observe(document.body, { childList: true, subtree: true });
  }

  function warOverText() {
    const n = state.warCleared;
    return n ? 'War over: ' + n + (n === 1 ? ' call' : ' calls') + ' cleared' : 'War over';
  }

  function onStateChange(change) {
    safe(renderCalls);
    safe(decorateRows);
    safe(renderPollHealth);
    if (change.kind === 'target_call' && change.call.caller_id !== settings.memberId) {
      safe(toast, callerName(change.call) + ' called ' + targetLabel(change.call));
    }
    // The server's poll ended our call: its target landed in hospital (or jail).
    const why = change.kind === 'target_uncall' && change.call.caller_id === settings.memberId
      && { hospitalized: 'in hospital', jailed: 'in jail' }[change.call.uncall_reason];
    if (why) safe(toast, targetLabel(change.call) + ' is ' + why + ': your call is cleared');
    // The war: over (the poll's word, or its calls ended), or on again.
    const warEnded = (change.kind === 'war' && change.war && change.war.war_id === null)
      || (change.kind === 'target_uncall' && change.call.uncall_reason === 'war_ended');
    if (warEnded) {
      notice(warOverText(), 'info', 'war');
      if (state.war.ended_war_id && role === 'leader') save('warEnded', state.war.ended_war_id);
    } else if ((state.war && state.war.war_id !== null) || (change.kind === 'war' && !state.war)) {
      clearNotice('war');
      if (role === 'leader' && load('warEnded', null) !== null) save('warEnded', null);
    }
  }

  // ---------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------

  function main() {
    if (window.__torncatLoaded) return; // installed twice (a manager and TornPDA both inject it)
    window.__torncatLoaded = VERSION;
    settings = readSettings();
    state = new CallState((change) => safe(onStateChange, change));
    state.endedWar = positiveInt(load('warEnded', null));
    injectStyle();
    if (onFactionPage() || attackTarget()) {
      buildPanel();
      if (attackTarget()) ui.callInput.value = String(attackTarget());
      renderAll();
      watchRows();
      setInterval(() => safe(refreshAges), AGE_REFRESH_MS);
      setInterval(() => safe(refreshCountdowns), COUNTDOWN_REFRESH_MS);
    }
    // Where the page makes the requests itself, its CSP may refuse them (Torn's connect-src
    // does): then say so once instead of retrying in vain.
    document.addEventListener('securitypolicyviolation', (e) => safe(() => {
      const blocked = String(e.blockedURI || '');
      if (!pageOnly || !blocked || blocked.indexOf(new URL(settings.server).origin) !== 0) return;
      cspBlocked = true;
      if (link) link.blocked();
    }));
    elect();
    safe(signInOnPda);
    window.addEventListener('pagehide', () => safe(() => {
      if (role === 'leader' && link) { link.stop(); link = null; post({ t: 'bye' }); }
    }));
    window.addEventListener('pageshow', (e) => safe(() => {
      if (e.persisted && role === 'leader' && !link) startLink(); // back from the back-forward cache
    }));
  }

  if (document.readyState === 'loading') {
    document.addEventListener('DOMContentLoaded', () => safe(main), { once: true });
  } else {
    safe(main);
  }
})();
