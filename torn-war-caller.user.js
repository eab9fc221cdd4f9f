// ==UserScript==
// @name         TornCat War Caller
// @namespace    torncat
// @version      2.1.0
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
// ==/UserScript==
//
// Running your own server? Add a `// @connect <your host>` line above (Tampermonkey
// lets GM_xmlhttpRequest reach only the hosts listed there, and asks you about any
// other), then put its URL in the settings panel (the gear of the TornCat panel on a
// faction page).

/*
 * TornCat War Caller: the faction's calls, pushed by the TornCat SSE server
 * (torncat_sse.py, docs/userscript.md).
 *
 * Transports, best first. Each one proves itself before it is trusted, and the panel
 * says which one is live ("live · stream", "live · long-poll"):
 *   1. `GET /events` through GM_xmlhttpRequest with `responseType: "stream"`, read from
 *      the ReadableStream (`response.getReader()`) the moment onloadstart or
 *      onreadystatechange hands it over, never from `responseText`: ScriptCat and
 *      Tampermonkey leave `responseText` undefined until a request ends, which an
 *      endless stream never does. ScriptCat has no `GM_xmlhttpRequest.RESPONSE_TYPE_STREAM`,
 *      so the stream is always asked for rather than detected. Trusted once the
 *      server's first bytes (its `retry:` line, sent at once) arrive within
 *      FIRST_BYTE_MS. The manager makes the request outside the page, so Torn's
 *      Content-Security-Policy and CORS do not apply to it; the token goes in the
 *      Authorization header and the resume point in Last-Event-ID.
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
 * one that works, which keeps delivering until the new one has proven itself.
 * Reconnects wait for the server's `retry:` after a clean end (the server spreads
 * it out on shutdown), otherwise back off exponentially with jitter. A snapshot
 * replaces the local state; an event whose id is not above the last one applied
 * is dropped, so nothing is ever applied twice, whichever transport brought it.
 *
 * One stream per browser: the tabs elect a leader with a Web Lock (a
 * BroadcastChannel heartbeat where Web Locks are missing); only the leader talks
 * to the server, and it relays every snapshot and event to the other tabs over a
 * BroadcastChannel. When the leader tab closes, its lock is released and the
 * next tab takes over, resuming from the last event id it was relayed.
 *
 * Nothing the server sends is ever parsed as HTML: every name goes through
 * textContent, and the only attributes built from server data are profile links
 * made of validated integers.
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
 *   - GM_xmlhttpRequest `responseType: "stream"` gives the body as a ReadableStream in
 *     Tampermonkey and ScriptCat (measured in ScriptCat MV3: onloadstart after ~20 ms,
 *     each event 8-25 ms after the server wrote it). Managers that do not stream
 *     (Violentmonkey, issue #1328; TornPDA's GMforPDA shim) are found out by silence
 *     and long-polled instead.
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

  const VERSION = '2.1.0';
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
                                          // proxy buffers it (Violentmonkey, GMforPDA)
  const STREAM_PROBE_MS = 5 * 60000;      // where streams failed, try one again (beside the long-poll)
                                          // this often, per browser, across page loads
  const STALL_MS = 65000;                 // silence on a live stream (pings come every 20 s): dead link
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
  const AGE_REFRESH_MS = 5000;
  const COUNTDOWN_REFRESH_MS = 1000; // hospital countdowns tick by the second
  const NAME_MAX = 64;                    // the server refuses longer names
  // Sign-in with a Torn API key (POST /auth/torn): the key is sent once and never kept;
  // only the member token the server answers is stored. A Public key is enough; this
  // link opens Torn's "new key" form with the title and the Public type filled in.
  const KEY_LINK = 'https://www.torn.com/preferences.php#tab=api?step=addNewKey&title=TornCat&type=1';
  const KEY_RE = /^[A-Za-z0-9]{16}$/;     // Torn API keys: 16 letters and digits
  const PDA_KEY = '###PDA-APIKEY###';     // TornPDA puts the player's key here; untouched: none
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
    /** Fed text in pieces of any size; calls onEvent({type, data, id}), onRetry(ms), onComment(). */
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
      if (line[0] === ':') { this.onComment(); return; }
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

  /** The first unhealthy poll health of a list (a snapshot's `poll_health`), or null. */
  function unhealthy(list) {
    return (Array.isArray(list) ? list : []).find((x) => validHealth(x) && x.state !== 'ok') || null;
  }

  class CallState {
    constructor(onChange) {
      this.calls = new Map();   // target_id -> active call
      this.statuses = new Map(); // target_id -> the enemy's last status (the server's poll)
      this.health = null;        // the poll's health when it is not ok (stale, key refused)
      this.lastEventId = null;  // null until a snapshot: events mean nothing before one
      this.onChange = onChange;
    }

    reset() {
      this.calls.clear();
      this.statuses.clear();
      this.health = null;
      this.lastEventId = null;
      this.onChange({ kind: 'reset' });
    }

    /** Replace everything: the server's word on what is active as of event `id`. */
    snapshot(calls, id, statuses, health) {
      const last = eventId(id);
      if (last === null) return false;
      this.health = unhealthy(health);
      this.calls.clear();
      for (const c of Array.isArray(calls) ? calls : []) {
        if (validCall(c) && !c.uncalled_at) this.calls.set(c.target_id, c);
      }
      this.statuses.clear();
      for (const st of Array.isArray(statuses) ? statuses : []) {
        if (validStatus(st)) this.statuses.set(st.target_id, st);
      }
      this.lastEventId = last;
      this.onChange({ kind: 'snapshot' });
      return true;
    }

    /** Apply one event in id order; false if it is not newer than the last one applied. */
    event(id, name, call) {
      const n = eventId(id);
      if (n === null || this.lastEventId === null || n <= this.lastEventId) return false;
      if (name === 'poll_health') {
        if (!validHealth(call)) return false;
        this.lastEventId = n;
        this.health = call.state === 'ok' ? null : call;
        this.onChange({ kind: name, id: n });
        return true;
      }
      if (name === 'target_status') {
        if (!validStatus(call)) return false;
        this.lastEventId = n;
        this.statuses.set(call.target_id, call);
        this.onChange({ kind: name, status: call, id: n });
        return true;
      }
      if ((name !== 'target_call' && name !== 'target_uncall') || !validCall(call)) return false;
      this.lastEventId = n;
      this.put(name, call);
      this.onChange({ kind: name, call, id: n });
      return true;
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
  }

  // ---------------------------------------------------------------------------
  // The link to the server (only the leader tab has one)
  // ---------------------------------------------------------------------------

  function jitter(ms) { return ms / 2 + Math.random() * ms / 2; }
  function seconds(ms) { return Math.max(1, Math.round(ms / 1000)) + ' s'; }

  // Transports, as the panel names them.
  const STREAM = 'stream';            // GET /events through GM_xmlhttpRequest
  const EVENTSOURCE = 'EventSource';  // GET /events through the page's own EventSource
  const LONG_POLL = 'long-poll';      // GET /calls?since=N&wait=S, complete answers

  let cspBlocked = false;             // the page's CSP refused a connection to our server

  class Link {
    /** sink: {snapshot(calls, id), event(id, name, call), advance(id), status(status, detail, transport)} */
    constructor(state, sink) {
      this.state = state;
      this.sink = sink;
      // The best this browser offers; the long-poll is what every one of them can do.
      this.best = completeOnly ? LONG_POLL : gmRequest ? STREAM
        : typeof EventSource === 'function' ? EVENTSOURCE : LONG_POLL;
      this.retryMs = DEFAULT_RETRY_MS;  // the server's last `retry:`
      this.errors = 0;                  // stream attempts in a row that failed on the server's side
      this.stream = null;               // the stream attempt under way (proven or not)
      this.poller = null;               // the long-poll loop, when it runs
      this.live = '';                   // the transport delivering now, '' when none
      this.timer = null;                // the next stream attempt
      this.probeTimer = null;           // the next try of the stream beside the long-poll
      this.stopped = false;
      this.wasLive = false;             // something worked before: say "reconnecting", not "connecting"
      this.pageMayConnect = false;      // the page's CSP let a token-free request through
    }

    start() {
      if (this.best === LONG_POLL) { this.longPoll(); return; }
      // The stream failed in this browser lately: deliver by long-poll at once, and try the
      // stream beside it only when STREAM_PROBE_MS have passed since it last failed.
      const memory = load('transport', null);
      const failedAt = memory && memory.best === this.best && memory.works === LONG_POLL ? Number(memory.at) || 0 : 0;
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

    remember(works) { save('transport', { best: this.best, works, at: Date.now() }); }

    /** Delivering by `transport`: say so once. */
    isLive(transport, detail) {
      this.wasLive = true;
      if (this.live === transport) return;
      this.live = transport;
      this.status('live', detail, transport);
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

    // -- streams ----------------------------------------------------------------

    /**
     * A stream attempt: the primary way in, or a try beside a running long-poll. It is
     * proven by the server's first SSE line; silent for FIRST_BYTE_MS, the long-poll starts
     * beside it; silent for STREAM_PATIENCE_MS, it is given up.
     */
    openStream() {
      if (this.stopped) return;
      clearTimeout(this.timer);
      const a = { proven: false, ended: false, status: 0, hooks: [], timers: [] };
      a.close = () => {
        if (a.ended) return;
        a.ended = true;
        for (const t of a.timers) clearTimeout(t);
        for (const hook of a.hooks) safe(hook);
      };
      a.later = (ms, fn) => a.timers.push(setTimeout(() => safe(fn), ms));
      this.stream = a;
      if (!this.poller) {
        this.status(this.wasLive ? 'reconnecting' : 'connecting', 'opening a stream…', this.best);
      }
      a.later(FIRST_BYTE_MS, () => {
        if (a.ended || a.proven || this.stopped) return;
        // Deliver now, and start with the long-poll on the next page load too; the stream may
        // still prove itself (then it takes over and is remembered instead).
        this.remember(LONG_POLL);
        this.longPoll();
        a.later(STREAM_PATIENCE_MS - FIRST_BYTE_MS, () => this.streamEnded(a, {
          why: 'the stream sent nothing', silent: true,
        }));
      });
      if (this.best === STREAM) this.openGm(a); else this.openEventSource(a);
    }

    /** The server's first line arrived: this stream is trusted, the long-poll can stop. */
    proven(a) {
      if (a.ended || this.stopped) return;
      if (!a.proven) {
        a.proven = true;
        for (const t of a.timers) clearTimeout(t);
        a.timers = [];
        clearTimeout(this.probeTimer);
        this.errors = 0;
        this.stopLongPoll();
        this.remember(this.best);
        this.isLive(this.best, this.best === STREAM ? 'streaming' : 'streaming (EventSource)');
      }
      if (a.watchSilence) {
        for (const t of a.timers) clearTimeout(t);
        a.timers = [];
        a.later(STALL_MS, () => this.streamEnded(a, { why: 'the stream went silent' }));
      }
    }

    dispatch(a, ev) {
      if (a.ended || this.stopped) return;
      this.proven(a);
      let data;
      try { data = JSON.parse(ev.data); } catch (e) { return; }
      if (ev.type === 'snapshot') {
        this.sink.snapshot(data && data.calls, data && data.last_event_id !== undefined ? data.last_event_id : ev.id,
          data && data.statuses, data && data.poll_health);
      } else if (ev.type === 'target_call' || ev.type === 'target_uncall' || ev.type === 'target_status'
        || ev.type === 'poll_health') {
        this.sink.event(ev.id, ev.type, data);
      }
    }

    /**
     * A stream attempt is over. A proven one comes back when the server said; one that never
     * streamed hands over to the long-poll (and is remembered); one the server refused or
     * could not answer is tried again with backoff, unless the long-poll is delivering.
     */
    streamEnded(a, { why, clean = false, silent = false, status = 0, retryAfterMs = null }) {
      if (a.ended) return;
      a.close();
      if (this.stream === a) this.stream = null;
      if (this.stopped) return;
      if (pageOnly && cspBlocked) { this.blocked(); return; }
      if (a.proven) {
        // On shutdown the server sends each client a different `retry:`, so they do not all
        // come back at once.
        if (this.live === this.best) this.live = '';
        const delay = clean ? this.retryMs : jitter(this.retryMs);
        this.status('reconnecting', why + ': back in ' + seconds(delay), this.best);
        this.timer = setTimeout(() => this.openStream(), delay);
        return;
      }
      if (silent) {
        this.remember(LONG_POLL);
        this.longPoll();
        this.probeLater(STREAM_PROBE_MS);
        return;
      }
      if (this.poller) { this.probeLater(STREAM_PROBE_MS); return; }
      this.errors += 1;
      if (status === 401 && settings.member) { this.memberRefused(null); return; }
      let delay;
      if (status === 401 || status === 403) {
        why = 'the server refused the token: check the settings';
        delay = BACKOFF_MAX_MS;
      } else if (retryAfterMs) {
        delay = retryAfterMs + Math.random() * 1000;
      } else {
        delay = jitter(Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.errors - 1)));
      }
      this.status('reconnecting', why + ': retrying in ' + seconds(delay), this.best);
      this.timer = setTimeout(() => this.openStream(), delay);
    }

    /** `GET /events` through GM_xmlhttpRequest, read from the ReadableStream as it arrives. */
    openGm(a) {
      a.watchSilence = true;
      const parser = new SseParser(
        (ev) => this.dispatch(a, ev),
        (ms) => { this.retryMs = ms; this.proven(a); },
        () => this.proven(a));
      const headers = authHeaders({ Accept: 'text/event-stream', 'Cache-Control': 'no-cache' });
      if (this.state.lastEventId !== null) headers['Last-Event-ID'] = String(this.state.lastEventId);
      const decoder = new TextDecoder();
      let reading = false;

      const refused = (r) => {
        if (r && r.status) a.status = r.status;
        if (!a.status || a.status === 200) return false;
        const answer = response(a.status, '', r && r.responseHeaders);
        this.streamEnded(a, { why: 'the server answered ' + a.status, status: a.status, retryAfterMs: answer.retryAfterMs });
        return true;
      };
      // The body is a ReadableStream from onloadstart on (ScriptCat, Tampermonkey); start
      // reading the first time any handler sees it. responseText is never looked at.
      const read = (r) => {
        if (reading || a.ended || !r || refused(r)) return;
        const body = r.response;
        if (!body || typeof body.getReader !== 'function') return;
        reading = true;
        const reader = body.getReader();
        a.hooks.push(() => reader.cancel().catch(() => {}));
        const pump = () => reader.read().then(({ done, value }) => {
          if (a.ended) return;
          if (done) {
            parser.feed(decoder.decode());
            this.streamEnded(a, { why: 'the server closed the stream', clean: true, silent: !a.proven });
            return;
          }
          parser.feed(typeof value === 'string' ? value : decoder.decode(value, { stream: true }));
          pump();
        }, () => this.streamEnded(a, { why: 'the stream broke' }));
        pump();
      };
      // The request is over (onload, onloadend, readyState 4, onerror, ontimeout). ScriptCat
      // never closes or errors the ReadableStream it handed over (managers/README.md): these
      // callbacks are the only sign that the server closed or died. What is already queued
      // in the stream is read first (the server's last `retry:` comes just before the end).
      const over = (r, why) => {
        if (a.ended || refused(r)) return;
        if (!a.status && !(r && r.status)) { this.streamEnded(a, { why: 'cannot reach the server' }); return; }
        if (!reading) { this.streamEnded(a, { why: 'the stream did not stream', silent: true }); return; }
        setTimeout(() => this.streamEnded(a, { why, clean: true, silent: !a.proven }), 0);
      };

      let handle = null;
      try {
        handle = gmRequest({
          method: 'GET',
          url: settings.server + '/events',
          headers,
          nocache: true,
          responseType: 'stream',
          onloadstart: read,
          onreadystatechange: (r) => { read(r); if (r && r.readyState === 4) over(r, 'the server closed the stream'); },
          onprogress: (r) => {
            read(r);
            // Bytes are arriving but there is no stream to read them from: this manager
            // buffers (Violentmonkey, GMforPDA). Deliver by long-poll now, not after
            // FIRST_BYTE_MS; the stream attempt stays, in case it proves itself after all.
            if (!reading && !a.ended && !a.proven && !this.poller) {
              this.remember(LONG_POLL);
              this.longPoll();
            }
          },
          // The whole body at once, without a stream to read: this manager buffered it.
          onload: (r) => { read(r); over(r, 'the server closed the stream'); },
          onloadend: (r) => over(r, 'the server closed the stream'),
          onerror: (r) => over(r, 'the stream broke'),
          ontimeout: () => this.streamEnded(a, { why: 'the request timed out' }),
          onabort: () => this.streamEnded(a, { why: 'the request was aborted' }),
        });
      } catch (e) {
        a.later(0, () => this.streamEnded(a, { why: 'GM_xmlhttpRequest failed', silent: true }));
      }
      a.hooks.push(() => { if (handle && typeof handle.abort === 'function') handle.abort(); });
    }

    /** The page's own EventSource (no userscript API): the token has to go in the URL. */
    openEventSource(a) {
      a.watchSilence = false; // EventSource hides the pings: no silence watchdog once open
      if (!this.pageMayConnect) {
        // A page whose CSP refuses the server reports the refused URL (CSP 3, "report-uri"):
        // learn whether it may connect with a request that carries nothing secret, and put
        // the token in a URL only then. A violation calls blocked() through main's listener.
        fetch(settings.server + '/healthz', { mode: 'no-cors', credentials: 'omit', cache: 'no-store' })
          .then(() => {
            this.pageMayConnect = true;
            if (!a.ended && !this.stopped) this.openEventSource(a);
          }, () => this.streamEnded(a, { why: 'cannot reach the server' }));
        return;
      }
      const query = [];
      if (settings.token) query.push('token=' + encodeURIComponent(settings.token));
      if (this.state.lastEventId !== null) query.push('last_event_id=' + this.state.lastEventId);
      let source;
      try {
        source = new EventSource(settings.server + '/events' + (query.length ? '?' + query.join('&') : ''));
      } catch (e) {
        a.later(0, () => this.streamEnded(a, { why: 'the browser refused EventSource', silent: true }));
        return;
      }
      a.hooks.push(() => source.close());
      const onMessage = (e) => this.dispatch(a, { type: e.type, data: e.data, id: e.lastEventId });
      for (const type of ['snapshot', 'target_call', 'target_uncall', 'target_status']) source.addEventListener(type, onMessage);
      source.onopen = () => this.proven(a);
      // We reconnect ourselves (with backoff and jitter, and ?last_event_id=) rather than let
      // the browser retry at a fixed interval. CLOSED means the connection was refused for
      // good (the page's CSP, a wrong status or type), not just dropped.
      source.onerror = () => this.streamEnded(a, {
        why: source.readyState === 2 ? 'the browser or the server refused the stream' : 'the stream broke',
        silent: source.readyState === 2 && !a.proven,
      });
    }

    // -- long-poll --------------------------------------------------------------

    /**
     * `GET /calls?since=N&wait=S` in a loop: the server answers when something happens (or
     * after S seconds), and the next request goes out at once. No fixed interval: an empty
     * answer that came sooner than LONG_POLL_MIN_CYCLE_MS waits out the rest of it, and an
     * error backs off with jitter, so the loop never spins.
     */
    longPoll() {
      if (this.poller || this.stopped) return;
      const lp = { stopped: false, errors: 0, timer: null, cancel: {}, n: 0 };
      this.poller = lp;
      const again = (ms) => { if (!lp.stopped) lp.timer = setTimeout(() => safe(cycle), ms); };
      const cycle = () => {
        if (lp.stopped || this.stopped) return;
        const since = this.state.lastEventId;
        const query = since === null ? [] : ['since=' + since, 'wait=' + LONG_POLL_WAIT_S];
        // TornPDA answers `undefined` to a GET of the same URL within 2 s: make each one unique.
        if (completeOnly) query.push('_=' + Date.now().toString(36) + (lp.n++).toString(36));
        const started = Date.now();
        lp.cancel = {};
        request('GET', '/calls' + (query.length ? '?' + query.join('&') : ''), undefined, {
          timeoutMs: LONG_POLL_WAIT_S * 1000 + LONG_POLL_GRACE_MS, cancel: lp.cancel,
        }).then((r) => {
          if (lp.stopped || this.stopped) return;
          const j = r.json;
          if (r.status === 200 && j && typeof j === 'object') {
            let news = true;
            if (Array.isArray(j.events) && since !== null) {
              for (const ev of j.events) if (ev) this.sink.event(ev.id, ev.event, ev.data);
              this.sink.advance(j.last_event_id);
              news = j.events.length > 0;
            } else {
              this.sink.snapshot(j.calls, j.last_event_id, j.statuses, j.poll_health); // the first answer, or {"reset": true}
            }
            lp.errors = 0;
            this.isLive(LONG_POLL, (this.best === LONG_POLL ? '' : 'the stream did not work here; ')
              + 'each answer comes when something happens');
            again(news ? 0 : Math.max(0, LONG_POLL_MIN_CYCLE_MS - (Date.now() - started)));
            return;
          }
          if (pageOnly && cspBlocked) { this.blocked(); return; }
          if (r.status === 401 && settings.member) { this.memberRefused(r); return; }
          lp.errors += 1;
          let delay = r.retryAfterMs ? r.retryAfterMs + Math.random() * 1000
            : jitter(Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** lp.errors));
          if (r.status === 401 || r.status === 403) delay = BACKOFF_MAX_MS;
          if (this.live === LONG_POLL) this.live = '';
          if (!this.live) this.status('reconnecting', describe(r) + ': retrying in ' + seconds(delay), LONG_POLL);
          again(delay);
        });
      };
      cycle();
    }

    /**
     * The server refused the member token (it expired, the operator revoked it, or the
     * player left the faction): sign out with the server's reason. A refused stream has no
     * body to read (`responseType: "stream"`), so one complete request asks for the reason.
     */
    memberRefused(r) {
      if (this.stopped) return;
      this.stop();
      const ask = r ? Promise.resolve(r) : request('GET', '/calls');
      ask.then((answer) => { if (answer.status === 401) signedOutByServer(answer); else if (link === this) startLink(); });
    }

    stopLongPoll() {
      const lp = this.poller;
      if (!lp) return;
      this.poller = null;
      lp.stopped = true;
      clearTimeout(lp.timer);
      if (lp.cancel.abort) safe(lp.cancel.abort);
      if (this.live === LONG_POLL) this.live = '';
    }
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
    snapshot(calls, id, statuses, health) {
      if (state.snapshot(calls, id, statuses, health)) {
        post({ t: 'snapshot', calls: Array.from(state.calls.values()), last_event_id: state.lastEventId,
          statuses: Array.from(state.statuses.values()), poll_health: state.health ? [state.health] : [] });
      }
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
  };

  function startLink() {
    if (link) link.stop();
    link = null;
    if (!settings.configured) {
      sink.status('off', 'open the settings to connect', '');
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
          post({
            t: 'state', to: m.from, calls: Array.from(state.calls.values()),
            statuses: Array.from(state.statuses.values()), poll_health: state.health ? [state.health] : [],
            last_event_id: state.lastEventId, status: linkStatus,
          });
        }
        break;
      case 'state':
        if (m.to === tabId && role !== 'leader') {
          if (m.last_event_id !== null) state.snapshot(m.calls, m.last_event_id, m.statuses, m.poll_health);
          showStatus(m.status);
        }
        break;
      case 'snapshot':
        if (role !== 'leader') state.snapshot(m.calls, m.last_event_id, m.statuses, m.poll_health);
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

  function targetLabel(c, fallbackName) {
    return cleanName(c && c.target_name) || cleanName(fallbackName)
      || cleanName(c && rowNames.get(c.target_id)) || ('#' + (c ? c.target_id : ''));
  }

  async function callTarget(targetId, targetName) {
    if (!settings.memberId || !settings.memberName) {
      notice('Set your Torn id and name in the settings first.', 'error');
      return;
    }
    const body = { target_id: targetId, caller_id: settings.memberId, caller_name: settings.memberName };
    if (cleanName(targetName)) body.target_name = cleanName(targetName);
    const r = await request('POST', '/calls', body);
    if (r.status === 201 && r.json) {
      state.local('target_call', r.json.call, r.json.event_id);
      notice('');
    } else if (r.status === 409) {
      const holder = r.json && r.json.call;
      notice(targetLabel(holder || { target_id: targetId }, targetName) + ' is already called by '
        + (holder ? callerName(holder) : 'someone else'), 'error');
    } else if (!signedOutByServer(r)) {
      notice('Call failed: ' + describe(r), 'error');
    }
  }

  async function uncallTarget(targetId) {
    const r = await request('POST', '/calls/' + targetId + '/uncall',
      { caller_id: settings.memberId, caller_name: settings.memberName || undefined });
    if (r.status === 200 && r.json) {
      state.local('target_uncall', r.json.call, r.json.event_id);
      notice('');
    } else if (r.status === 403 && r.json && r.json.call) {
      notice('Only ' + callerName(r.json.call) + ' can uncall ' + targetLabel(r.json.call), 'error');
    } else if (r.status === 404) {
      notice('That target is not called any more.');
    } else if (!signedOutByServer(r)) {
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
  // The page: panel, badges on Torn's rows, toasts
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
  display: flex; align-items: center; gap: 6px; padding: 6px 8px; cursor: move;
  touch-action: none; user-select: none; border-bottom: 1px solid #333; background: #2a2a2a;
  border-radius: 6px 6px 0 0;
}
#torncat-panel.tc-collapsed .tc-head { border-bottom: 0; border-radius: 6px; }
#torncat-panel .tc-title { font-weight: bold; color: #fff; }
#torncat-panel .tc-dot { width: 9px; height: 9px; border-radius: 50%; background: #777; flex: none; }
#torncat-panel[data-status="live"] .tc-dot { background: #5c5; }
#torncat-panel[data-status="connecting"] .tc-dot { background: #db3; }
#torncat-panel[data-status="blocked"] .tc-dot { background: #d55; }
#torncat-panel[data-status="reconnecting"] .tc-dot { background: #d55; }
#torncat-panel .tc-status { flex: 1; min-width: 0; color: #aaa; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
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
  margin: 0; background: none;
}
#torncat-panel li.tc-call .tc-target { color: #8bf; text-decoration: none; font-weight: bold; overflow-wrap: anywhere; }
#torncat-panel li.tc-call .tc-by { flex: 1; min-width: 0; color: #ccc; overflow-wrap: anywhere; }
#torncat-panel li.tc-call.tc-mine .tc-by { color: #8d8; }
#torncat-panel li.tc-call .tc-age { color: #888; flex: none; }
#torncat-panel li.tc-empty { color: #888; padding: 4px 0; margin: 0; }
#torncat-panel .tc-form { display: flex; gap: 6px; margin-top: 8px; }
#torncat-panel input {
  flex: 1; min-width: 0; background: #111; color: #eee; border: 1px solid #555; border-radius: 4px;
  padding: 4px 6px; font-size: 12px; margin: 0; height: auto;
}
#torncat-panel input[readonly] { color: #999; }
#torncat-panel .tc-settings label { display: block; margin: 0 0 6px; color: #bbb; }
#torncat-panel .tc-settings label input { display: block; width: 100%; margin-top: 2px; }
#torncat-panel .tc-settings .tc-row { display: flex; gap: 6px; justify-content: flex-end; }
#torncat-panel .tc-version { color: #666; margin-right: auto; align-self: center; }
#torncat-panel .tc-who { margin: 0 0 6px; color: #8d8; }
#torncat-panel .tc-key-link { color: #8bf; margin-right: auto; align-self: center; }
#torncat-panel .tc-signed-in-as { color: #8d8; margin-right: auto; align-self: center; }
#torncat-panel .tc-sign-in-box, #torncat-panel .tc-member-box { margin: 0 0 8px; }
#torncat-panel .tc-settings [hidden] { display: none; }
.tc-btn {
  background: #3a5f3a; color: #fff; border: 1px solid #4c7a4c; border-radius: 4px; cursor: pointer;
  padding: 3px 8px; font-size: 11px; line-height: 1.3; min-height: 24px; margin: 0; flex: none;
}
.tc-btn.tc-uncall, .tc-btn.tc-cancel { background: #5f3a3a; border-color: #7a4c4c; }
.tc-btn:disabled { opacity: .5; cursor: default; }
.tc-cell { display: inline-flex; align-items: center; gap: 4px; margin-left: 6px; vertical-align: middle; font-size: 11px; }
.tc-state { margin-right: 4px; font-size: 11px; opacity: .85; white-space: nowrap; }
.tc-state.tc-hospital, .tc-state.tc-jail { color: #e57373; opacity: 1; }
.tc-cell .tc-badge { background: #7a3; color: #fff; border-radius: 3px; padding: 1px 5px; white-space: nowrap; max-width: 160px; overflow: hidden; text-overflow: ellipsis; }
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
      const m = /(?:XID=)?(\d{1,16})\s*$/.exec(ui.callInput.value.trim());
      const id = m ? positiveInt(m[1]) : null;
      if (!id) { notice('Give a target id or a profile link.', 'error'); return; }
      ui.callInput.value = '';
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
    if (settings.signInExpired) notice('Your sign-in has expired: sign in again.', 'error');
    showWho();
  }

  function buildSettings() {
    const field = (label, input) => h('label', {}, label, input);
    ui.fServer = h('input', { type: 'url', class: 'tc-f-server', placeholder: DEFAULT_SERVER, autocomplete: 'off' });
    ui.fToken = h('input', { type: 'password', class: 'tc-f-token', autocomplete: 'off', placeholder: 'from your faction' });
    ui.fId = h('input', { type: 'text', class: 'tc-f-id', inputmode: 'numeric' });
    ui.fName = h('input', { type: 'text', class: 'tc-f-name', maxlength: NAME_MAX });
    const saveButton = h('button', { type: 'submit', class: 'tc-btn tc-save', text: 'Save' });
    const cancel = h('button', { type: 'button', class: 'tc-btn tc-cancel', text: 'Cancel' });
    cancel.addEventListener('click', () => closeSettings());
    ui.fKey = h('input', { type: 'password', class: 'tc-f-key', autocomplete: 'off', placeholder: '16 letters and digits' });
    const signInButton = h('button', { type: 'button', class: 'tc-btn tc-sign-in', text: 'Sign in' });
    signInButton.addEventListener('click', () => safe(signInFromSettings));
    ui.fKey.addEventListener('keydown', (e) => {
      if (e.key === 'Enter') { e.preventDefault(); safe(signInFromSettings); }
    });
    const keyLink = h('a', { class: 'tc-key-link', href: KEY_LINK, target: '_blank', rel: 'noopener noreferrer',
      text: 'Create a Public key' });
    ui.signInBox = h('div', { class: 'tc-sign-in-box' },
      field('Your Torn API key (Public access is enough; it is not kept)', ui.fKey),
      h('div', { class: 'tc-row' }, keyLink, signInButton));
    ui.signedInAs = h('span', { class: 'tc-signed-in-as' });
    const signOutButton = h('button', { type: 'button', class: 'tc-btn tc-sign-out', text: 'Sign out' });
    signOutButton.addEventListener('click', () => safe(signOut));
    ui.memberBox = h('div', { class: 'tc-member-box tc-row' }, ui.signedInAs, signOutButton);
    const form = h('form', { class: 'tc-settings' },
      field('Server URL', ui.fServer), ui.signInBox, ui.memberBox, field('Or a faction token', ui.fToken),
      field('Your Torn id', ui.fId), field('Your name', ui.fName),
      h('div', { class: 'tc-row' }, h('span', { class: 'tc-version', text: 'v' + VERSION }), cancel, saveButton));
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
    ui.fToken.parentNode.hidden = !!settings.member;
    if (settings.member) ui.signedInAs.textContent = whoText(settings.member);
    ui.fId.value = settings.memberId ? String(settings.memberId) : '';
    ui.fName.value = settings.memberName;
    ui.fId.readOnly = ui.fName.readOnly = settings.fromPage; // Torn's page says who you are
    ui.fId.title = ui.fName.title = settings.fromPage ? 'read from the page' : '';
    ui.settings.hidden = false;
    setCollapsed(false);
  }

  function closeSettings() { ui.settings.hidden = true; }

  function saveSettings() {
    const server = normaliseServer(ui.fServer.value || DEFAULT_SERVER);
    if (!server) { notice('The server URL must start with https:// (or http://).', 'error'); return; }
    save('server', server);
    if (!settings.member) save('token', ui.fToken.value.trim());
    if (!settings.fromPage && !settings.member) {
      save('memberId', positiveInt(ui.fId.value.trim()));
      save('memberName', cleanName(ui.fName.value));
    }
    save('configured', true);
    closeSettings();
    notice('Saved.', 'info');
    applySettings();
    post({ t: 'settings' });
  }

  // ---------------------------------------------------------------------------
  // Signing in with a Torn API key
  // ---------------------------------------------------------------------------

  function whoText(member) {
    return 'Signed in as ' + (member.name || 'player') + ' [' + member.id + ']';
  }

  function showWho() {
    if (!ui.who) return;
    ui.who.textContent = settings.member ? whoText(settings.member) : '';
    ui.who.hidden = !settings.member;
  }

  /** Ask the server for a member token; the key lives only in this call. True on success. */
  async function signIn(key) {
    if (!KEY_RE.test(key)) {
      notice('A Torn API key is 16 letters and digits.', 'error');
      return false;
    }
    notice('Signing in…', 'info');
    const r = await request('POST', '/auth/torn', { key });
    const a = r.json || {};
    const id = positiveInt(a.player_id);
    if (r.status !== 200 || typeof a.token !== 'string' || !id) {
      notice(typeof a.error === 'string' && a.error ? 'Sign-in refused: ' + a.error
        : 'Sign-in failed: ' + describe(r), 'error');
      return false;
    }
    save('token', a.token);
    save('member', { id, name: cleanName(a.name), faction_id: a.faction_id, expires_at: a.expires_at });
    save('memberId', id);
    save('memberName', cleanName(a.name));
    save('configured', true);
    applySettings();
    post({ t: 'settings' });
    showWho();
    notice(whoText(settings.member) + '.', 'info');
    return true;
  }

  async function signInFromSettings() {
    const server = normaliseServer(ui.fServer.value || DEFAULT_SERVER);
    if (!server) { notice('The server URL must start with https:// (or http://).', 'error'); return; }
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
    forgetSignIn();
    notice('Signed out.', 'info');
    openSettings();
  }

  /**
   * A 401 for the member token (expired, revoked, or no longer in the faction): the token
   * is dropped and the sign-in form comes back with the server's reason. False for any
   * other answer, or for a faction token (its 401 keeps pointing at the settings).
   */
  function signedOutByServer(r) {
    if (!r || r.status !== 401 || !settings.member) return false;
    const why = r.json && typeof r.json.error === 'string' && r.json.error ? r.json.error
      : 'the server no longer accepts your sign-in';
    forgetSignIn();
    if (ui.settings) openSettings();
    notice('Signed out: ' + why + '.', 'error');  // text, never HTML
    return true;
  }

  /** TornPDA hands scripts the player's key: sign in with it, no setup at all. */
  async function signInOnPda() {
    const key = pdaKey();
    if (!key || settings.member || (settings.token && settings.configured)) return;
    if (await signIn(key) && ui.settings) closeSettings();
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

  function notice(text, kind) {
    if (text && kind === 'error') toast(text, 'error');
    if (!ui.notice) return;
    ui.notice.textContent = text || '';
    ui.notice.className = 'tc-notice' + (kind === 'info' ? ' tc-info' : '');
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
    const what = s.status === 'live' && s.transport ? 'live · ' + s.transport : s.status || 'connecting';
    ui.status.textContent = what + via;
    ui.status.title = (s.detail || '') + via;
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

  function renderCalls() {
    if (!ui.list) return;
    const calls = Array.from(state.calls.values())
      .sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
    ui.count.textContent = String(calls.length);
    if (!calls.length) {
      ui.list.replaceChildren(h('li', {
        class: 'tc-empty', text: state.lastEventId === null ? 'Waiting for the server…' : 'No active calls',
      }));
      return;
    }
    ui.list.replaceChildren(...calls.map((c) => {
      const mine = c.caller_id === settings.memberId;
      return h('li', { class: 'tc-call' + (mine ? ' tc-mine' : ''), 'data-target-id': c.target_id },
        h('a', { class: 'tc-target', href: '/profiles.php?XID=' + c.target_id, text: targetLabel(c) }),
        statusSpan(state.statuses.get(c.target_id)),
        h('span', { class: 'tc-by', text: mine ? 'by you' : 'by ' + callerName(c) }),
        h('span', { class: 'tc-age', 'data-created': String(c.created_at || ''), text: age(c.created_at) }),
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

  function renderCell(cell, id, name) {
    const c = state.calls.get(id);
    const mine = !!c && c.caller_id === settings.memberId;
    const st = state.statuses.get(id);
    const key = (c ? c.id + (mine ? ':mine' : ':' + callerName(c)) : 'free')
      + (st ? '|' + st.state + ':' + st.until : '');
    if (cellKeys.get(cell) === key) return;
    cellKeys.set(cell, key);
    if (!c) {
      cell.replaceChildren(...[statusSpan(st), actionButton('Call', 'tc-call-btn', () => callTarget(id, name))]
        .filter(Boolean));
    } else if (mine) {
      cell.replaceChildren(...[statusSpan(st), h('span', { class: 'tc-badge tc-mine', text: 'called by you' }),
        actionButton('Uncall', 'tc-uncall', () => uncallTarget(id))].filter(Boolean));
    } else {
      const by = 'called by ' + callerName(c);
      cell.replaceChildren(...[statusSpan(st), h('span', { class: 'tc-badge tc-theirs', text: by, title: by })]
        .filter(Boolean));
    }
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
  }

  // ---------------------------------------------------------------------------
  // Start
  // ---------------------------------------------------------------------------

  function main() {
    if (window.__torncatLoaded) return; // installed twice (a manager and TornPDA both inject it)
    window.__torncatLoaded = VERSION;
    settings = readSettings();
    state = new CallState((change) => safe(onStateChange, change));
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
