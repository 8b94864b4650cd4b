// The tally dashboard: vanilla JS, no build step, no dependency, nothing loaded from
// elsewhere. It talks to the node's JSON API with the token the user typed, which is kept
// in this tab's sessionStorage only and sent as `Authorization: Bearer`, never in a URL.
//
// Rules this file keeps:
// - Every value that came from a user (ids, scopes, attributes, entity names, node ids,
//   error messages) reaches the DOM as text: `h()` builds elements with createElement,
//   text nodes and setAttribute. No string is ever handed to the HTML parser (the page's
//   Content-Security-Policy requires Trusted Types, so the browser would refuse it; a
//   test greps this file for the HTML sinks).
// - Every URL is relative to the page (`../v1/...`), so the node can sit behind a proxy
//   path prefix.
// - Lists render one page at a time, so 10 000 limits cost one fetch and one sort.
'use strict';

(() => {
  const TOKEN_KEY = 'tally.token';
  const POLL_MS = 2000; // the update interval when fetches are cheap
  const POLL_MAX_MS = 60000;
  const PAGE_SIZE = 50;
  const RELATED_MAX = 10;
  const PARENT_DEPTH_MAX = 8; // entity chains are bounded like scopes
  const SAMPLES_MAX = 300; // live samples kept for a limit's sparkline
  const API = new URL('../v1/', document.baseURI);
  const READYZ = new URL('../readyz', document.baseURI);

  // ----- DOM helpers -----------------------------------------------------------------

  // h('a', {href: '#/x', class: 'c', onclick: f}, 'text', child, ...): text children
  // become text nodes, attributes go through setAttribute, `on*` become listeners.
  function h(tag, attrs, ...children) {
    const svg = tag.startsWith('svg:');
    const el = svg
      ? document.createElementNS('http://www.w3.org/2000/svg', tag.slice(4))
      : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
      else if (k === 'text') el.textContent = String(v);
      else el.setAttribute(k, v === true ? '' : String(v));
    }
    append(el, children);
    return el;
  }

  function append(el, children) {
    for (const c of children.flat(Infinity)) {
      if (c === null || c === undefined || c === false) continue;
      el.append(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }

  const $ = (id) => document.getElementById(id);

  // Replaces el's children (null and false children are skipped, as in h()).
  function fill(el, ...children) {
    el.replaceChildren();
    return append(el, children);
  }

  function banner(message) {
    const b = $('banner');
    b.hidden = !message;
    b.textContent = message || '';
  }

  // ----- formatting ------------------------------------------------------------------

  const usdFmt = new Intl.NumberFormat('en-US', {
    minimumFractionDigits: 2,
    maximumFractionDigits: 6,
  });
  const intFmt = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });
  const pctFmt = new Intl.NumberFormat('en-US', { maximumFractionDigits: 1 });

  function amount(metric, v) {
    if (v === null || v === undefined || !Number.isFinite(Number(v))) return '—';
    return metric === 'cost' ? '$' + usdFmt.format(v) : intFmt.format(v);
  }

  // How close a limit is to its max: used / max (a limit with max 0 is full once used).
  function ratio(v) {
    if (v.max > 0) return v.used / v.max;
    return v.used > 0 ? Infinity : 0;
  }

  function pct(r) {
    return Number.isFinite(r) ? pctFmt.format(r * 100) + '%' : '∞';
  }

  const tzFormats = new Map();
  function tzFormat(tz) {
    if (!tzFormats.has(tz)) {
      let f;
      try {
        f = new Intl.DateTimeFormat('en-CA', {
          timeZone: tz, year: 'numeric', month: '2-digit', day: '2-digit',
          hour: '2-digit', minute: '2-digit', second: '2-digit', hourCycle: 'h23',
          timeZoneName: 'short',
        });
      } catch (_) {
        f = null; // a zone this browser does not know
      }
      tzFormats.set(tz, f);
    }
    return tzFormats.get(tz);
  }

  // '2026-12-01 00:00:00 GMT+1' in the limit's zone (UTC if the browser lacks the zone).
  function inZone(iso, tz) {
    if (!iso) return 'never';
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) return String(iso);
    const f = tzFormat(tz || 'UTC') || tzFormat('UTC');
    const p = Object.fromEntries(f.formatToParts(d).map((x) => [x.type, x.value]));
    return `${p.year}-${p.month}-${p.day} ${p.hour}:${p.minute}:${p.second} ${p.timeZoneName || ''}`.trim();
  }

  function localTime(iso) {
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toLocaleString();
  }

  function relative(iso) {
    if (!iso) return '';
    const ms = new Date(iso).getTime() - Date.now();
    const s = Math.round(Math.abs(ms) / 1000);
    let t;
    if (s < 60) t = `${s} s`;
    else if (s < 3600) t = `${Math.floor(s / 60)} min`;
    else if (s < 86400) t = `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
    else t = `${Math.floor(s / 86400)} d ${Math.floor((s % 86400) / 3600)} h`;
    return ms >= 0 ? `in ${t}` : `${t} ago`;
  }

  function periodText(v) {
    if (v.period === 'never') return 'never resets';
    return `${v.period} ${v.calendar_aligned ? 'calendar' : 'rolling'}`;
  }

  function modeOf(v) {
    return typeof v.mode === 'string' && v.mode ? v.mode : 'soft';
  }

  // Per-node usage of a limit view. A node's entry is a number (soft mode) or, where
  // the node reports free rights (hard mode), an object with them.
  function nodeRows(v) {
    const rows = [];
    for (const [node, x] of Object.entries(v.nodes || {})) {
      let used = x;
      let free;
      if (x && typeof x === 'object') {
        used = x.used ?? x.usage;
        free = x.free ?? x.free_rights ?? x.rights;
      }
      if (free === undefined && v.rights && typeof v.rights === 'object') free = v.rights[node];
      rows.push({ node, used: Number(used), free: free === undefined ? undefined : Number(free) });
    }
    rows.sort((a, b) => b.used - a.used || a.node.localeCompare(b.node));
    return rows;
  }

  function scopePairs(scope) {
    return Object.entries(scope || {}).sort(([a], [b]) => a.localeCompare(b));
  }

  function chips(scope, empty) {
    const pairs = scopePairs(scope);
    if (!pairs.length) return h('span', { class: 'chip global' }, empty || 'global');
    return pairs.map(([k, v]) => h('span', { class: 'chip' }, h('b', null, k), '=', v));
  }

  function bar(r) {
    const fill = h('div', { class: 'fill' });
    // CSSOM, not a style attribute: allowed under the page's style-src 'self'.
    fill.style.width = Math.min(100, Number.isFinite(r) ? r * 100 : 100) + '%';
    const level = r >= 1 ? 'over' : r >= 0.8 ? 'warn' : 'ok';
    return h('div', { class: `bar ${level}`, role: 'img', 'aria-label': pct(r) }, fill);
  }

  // A path segment for a limit id or entity part. The API's ids allow '.' and '..',
  // which every URL parser (and so fetch) would treat as directory steps.
  function seg(s) {
    if (s === '.' || s === '..') {
      throw new ApiError(0, 'unaddressable', `"${s}" cannot be used in a URL path; use the tally CLI for it`);
    }
    return encodeURIComponent(s);
  }

  function limitHref(id) {
    return '#/limit/' + encodeURIComponent(id);
  }

  // ----- the API ---------------------------------------------------------------------

  class ApiError extends Error {
    constructor(status, code, message) {
      super(message);
      this.status = status;
      this.code = code;
    }
  }

  const session = {
    token: sessionStorage.getItem(TOKEN_KEY) || '',
    role: null, // 'admin' | 'client'
    tokensRequired: true,
    nodeId: '',
  };
  const isAdmin = () => session.role === 'admin';

  async function api(method, path, body, token) {
    const headers = { Accept: 'application/json' };
    const t = token === undefined ? session.token : token;
    if (t) headers.Authorization = 'Bearer ' + t;
    const init = { method, headers, cache: 'no-store', credentials: 'omit' };
    if (body !== undefined) {
      headers['Content-Type'] = 'application/json';
      init.body = JSON.stringify(body);
    }
    let res;
    try {
      res = await fetch(new URL(path, API), init);
    } catch (e) {
      throw new ApiError(0, 'unreachable', 'the node did not answer: ' + e.message);
    }
    let data = null;
    const text = await res.text();
    try {
      data = text ? JSON.parse(text) : null;
    } catch (_) {
      data = null;
    }
    if (!res.ok) {
      const err = (data && data.error) || {};
      const e = new ApiError(res.status, err.code || 'http_' + res.status, err.message || `${method} ${path}: HTTP ${res.status}`);
      if (res.status === 401 && token === undefined) loggedOut(e.message);
      throw e;
    }
    return data;
  }

  // ----- live updates ----------------------------------------------------------------

  // One timer for the whole page: the mounted view's refresh() runs every interval. The
  // interval stretches to 10× the last refresh's duration when fetches are slow (10 000
  // limits are a few MB to build), so an open dashboard keeps the node busy at most about
  // a tenth of the time; polling stops while the tab is hidden or paused.
  const poll = { timer: 0, interval: POLL_MS, paused: false, last: null, error: '', running: false };

  function showLive() {
    const el = $('live');
    el.hidden = false;
    el.replaceChildren();
    const state = poll.paused ? 'paused' : poll.error ? 'error' : 'on';
    el.className = 'live ' + state;
    const secs = pctFmt.format(poll.interval / 1000);
    const text = poll.paused
      ? 'Paused'
      : poll.error
        ? `Retrying every ${secs} s: ${poll.error}`
        : `Live · updates every ${secs} s`;
    append(el, [h('span', { class: 'dot' }), text]);
    if (poll.last) append(el, [' · last ', h('time', { id: 'last-update' }, poll.last.toLocaleTimeString())]);
    $('pause').hidden = false;
    $('pause').textContent = poll.paused ? 'Resume' : 'Pause';
  }

  function schedule() {
    clearTimeout(poll.timer);
    if (poll.paused || document.hidden || !current || !current.refresh) return;
    poll.timer = setTimeout(tick, poll.interval);
  }

  async function tick() {
    if (poll.running || !current || !current.refresh) return;
    const view = current;
    poll.running = true;
    const t0 = performance.now();
    try {
      await view.refresh();
      poll.error = '';
      poll.last = new Date();
    } catch (e) {
      poll.error = e.message;
    } finally {
      poll.running = false;
    }
    const took = performance.now() - t0;
    poll.interval = Math.min(POLL_MAX_MS, Math.max(POLL_MS, Math.ceil((took * 10) / 1000) * 1000));
    if (view === current) {
      showLive();
      schedule();
    } else if (current && current.refresh) {
      tick(); // the route changed during this refresh: start the new view's at once
    }
  }

  document.addEventListener('visibilitychange', () => {
    if (document.hidden) clearTimeout(poll.timer);
    else tick();
  });

  // ----- confirmation dialog ---------------------------------------------------------

  // Resolves to the input's value (or true) when confirmed, null when cancelled.
  function confirmDialog({ title, body, action, danger, input }) {
    return new Promise((resolve) => {
      const field = input ? h('input', { id: 'confirm-input', type: input.type || 'text', step: 'any', required: true, value: input.value ?? '' }) : null;
      const dlg = h('dialog', { id: 'confirm', class: 'confirm' },
        h('form', { method: 'dialog' },
          h('h2', null, title),
          h('p', null, body),
          field ? h('label', null, input.label, field) : null,
          h('div', { class: 'actions' },
            h('button', { type: 'button', value: 'cancel', id: 'confirm-cancel', onclick: () => dlg.close('cancel') }, 'Cancel'),
            h('button', { type: 'submit', value: 'ok', id: 'confirm-ok', class: danger ? 'danger' : 'primary' }, action))));
      dlg.addEventListener('close', () => {
        dlg.remove();
        if (dlg.returnValue !== 'ok') resolve(null);
        else resolve(field ? field.value : true);
      });
      document.body.append(dlg);
      dlg.showModal();
      (field || dlg.querySelector('#confirm-cancel')).focus();
    });
  }

  // ----- views -----------------------------------------------------------------------

  const cache = { limits: null, limitsAt: 0 };

  async function fetchLimits() {
    const data = await api('GET', 'limits');
    const list = data.limits || [];
    for (const v of list) {
      v._ratio = ratio(v);
      v._text = (v.id + ' ' + scopePairs(v.scope).map(([k, x]) => `${k}=${x}`).join(' ') + ' ' + v.metric + ' ' + modeOf(v)).toLowerCase();
    }
    // Closest to max first; ties by id, so the order is stable between updates.
    list.sort((a, b) => (b._ratio - a._ratio) || (a.id < b.id ? -1 : a.id > b.id ? 1 : 0));
    cache.limits = list;
    cache.limitsAt = Date.now();
    return list;
  }

  // The limits list: filter, search, paging, live.
  function limitsView() {
    const st = { query: '', metric: '', level: '', page: 0 };
    const tbody = h('tbody', { id: 'limits-body' });
    const count = h('span', { id: 'limits-count', class: 'muted' });
    const pager = h('div', { class: 'pager', id: 'pager' });
    let firstRender = true;

    const search = h('input', {
      id: 'search', type: 'search', placeholder: 'Search id, scope (team=eng), metric…',
      'aria-label': 'Search limits', autocomplete: 'off',
      oninput: () => { st.query = search.value.trim().toLowerCase(); st.page = 0; render(); },
    });
    const metric = h('select', { id: 'metric-filter', 'aria-label': 'Metric', onchange: () => { st.metric = metric.value; st.page = 0; render(); } },
      h('option', { value: '' }, 'All metrics'), h('option', { value: 'cost' }, 'cost'),
      h('option', { value: 'tokens' }, 'tokens'), h('option', { value: 'requests' }, 'requests'));
    const level = h('select', { id: 'level-filter', 'aria-label': 'Usage', onchange: () => { st.level = level.value; st.page = 0; render(); } },
      h('option', { value: '' }, 'Any usage'), h('option', { value: '0.8' }, '≥ 80% used'),
      h('option', { value: '1' }, 'Exhausted'), h('option', { value: 'used' }, 'Any usage > 0'));

    function filtered() {
      const words = st.query.split(/\s+/).filter(Boolean);
      return (cache.limits || []).filter((v) =>
        (!st.metric || v.metric === st.metric) &&
        (!st.level || (st.level === 'used' ? v.used > 0 : v._ratio >= Number(st.level))) &&
        words.every((w) => v._text.includes(w)));
    }

    function row(v) {
      const nodes = nodeRows(v);
      const shown = nodes.slice(0, 3).map((n) => h('span', { class: 'chip node' }, n.node, ' ', amount(v.metric, n.used),
        n.free !== undefined ? h('span', { class: 'muted' }, ' free ', amount(v.metric, n.free)) : null));
      if (nodes.length > 3) shown.push(h('span', { class: 'muted' }, `+${nodes.length - 3} more`));
      return h('tr', { 'data-id': v.id },
        h('td', { class: 'id' }, h('a', { href: limitHref(v.id) }, v.id)),
        h('td', { class: 'scope' }, chips(v.scope)),
        h('td', { class: 'usage' }, bar(v._ratio), h('span', { class: 'pct' }, pct(v._ratio))),
        h('td', { class: 'num used' }, amount(v.metric, v.used)),
        h('td', { class: 'num max' }, amount(v.metric, v.max)),
        h('td', { class: 'num remaining' }, amount(v.metric, v.remaining)),
        h('td', { class: 'metric' }, v.metric),
        h('td', { class: 'period' }, periodText(v)),
        h('td', { class: 'resets', title: v.resets_at || '' },
          v.resets_at ? [inZone(v.resets_at, v.timezone), h('br'), h('span', { class: 'muted' }, relative(v.resets_at))] : 'never'),
        h('td', { class: 'mode' }, h('span', { class: 'badge ' + modeOf(v) }, modeOf(v))),
        h('td', { class: 'nodes' }, shown.length ? shown : h('span', { class: 'muted' }, '—')));
    }

    function render() {
      if (!cache.limits) return;
      const list = filtered();
      const pages = Math.max(1, Math.ceil(list.length / PAGE_SIZE));
      st.page = Math.min(st.page, pages - 1);
      const slice = list.slice(st.page * PAGE_SIZE, (st.page + 1) * PAGE_SIZE);
      fill(tbody, ...slice.map(row));
      if (!slice.length) {
        tbody.append(h('tr', null, h('td', { colspan: 11, class: 'empty' },
          cache.limits.length ? 'No limit matches.' : 'No limits yet.')));
      }
      count.textContent = `${intFmt.format(list.length)} of ${intFmt.format(cache.limits.length)} limits, closest to max first`;
      fill(pager,
        h('button', { type: 'button', id: 'prev', class: 'small', disabled: st.page === 0, onclick: () => { st.page--; render(); } }, '‹ Prev'),
        h('span', { id: 'page-info' }, `Page ${st.page + 1} of ${pages}`),
        h('button', { type: 'button', id: 'next', class: 'small', disabled: st.page >= pages - 1, onclick: () => { st.page++; render(); } }, 'Next ›'));
      if (firstRender) {
        firstRender = false;
        // Read by the browser test (first render of the list, from navigation start).
        if (!performance.getEntriesByName('tally:limits-rendered').length) performance.mark('tally:limits-rendered');
      }
    }

    return {
      name: 'limits',
      mount(main) {
        fill(main,
          h('div', { class: 'toolbar' }, search, metric, level, count,
            isAdmin() ? h('a', { href: '#/new', class: 'button primary', id: 'new-limit' }, 'New limit') : null),
          h('div', { class: 'table-wrap' },
            h('table', { class: 'limits', id: 'limits' },
              h('thead', null, h('tr', null,
                ['Limit', 'Scope', 'Usage', 'Used', 'Max', 'Remaining', 'Metric', 'Period', 'Resets at (limit’s zone)', 'Mode', 'Per node']
                  .map((t) => h('th', null, t)))),
              tbody)),
          pager);
        if (cache.limits) render();
        else tbody.append(h('tr', null, h('td', { colspan: 11, class: 'empty' }, 'Loading…')));
        search.focus();
      },
      async refresh() {
        await fetchLimits();
        render();
      },
    };
  }

  // The parent chain of one entity, `dim=value → dim=value …`, bounded.
  async function parentChain(dim, value) {
    const chain = [];
    const seen = new Set();
    let frontier = [[dim, value]];
    for (let depth = 0; depth < PARENT_DEPTH_MAX && frontier.length; depth++) {
      const next = [];
      for (const [d, v] of frontier) {
        const key = d + '\u0000' + v;
        if (seen.has(key)) continue;
        seen.add(key);
        let parents = {};
        try {
          parents = (await api('GET', `entities/${seg(d)}/${seg(v)}`)).parents || {};
        } catch (e) {
          if (e.status !== 404) throw e;
        }
        for (const p of scopePairs(parents)) {
          chain.push({ child: [d, v], parent: p });
          next.push(p);
        }
      }
      frontier = next;
    }
    return chain;
  }

  // A usage chart: one bar per period (history, then the current one), the max as a line.
  function periodChart(points, v) {
    const W = 640, H = 180, P = 28;
    const top = Math.max(v.max, ...points.map((p) => p.used), 1);
    const n = points.length;
    const bw = Math.max(4, Math.min(60, (W - 2 * P) / n - 6));
    const svg = h('svg:svg', { viewBox: `0 0 ${W} ${H}`, class: 'chart', id: 'history-chart', role: 'img', 'aria-label': 'usage per period' });
    const y = (x) => H - P - (x / top) * (H - 2 * P);
    svg.append(h('svg:line', { x1: P, x2: W - P, y1: H - P, y2: H - P, class: 'axis' }));
    points.forEach((p, i) => {
      const x = P + i * ((W - 2 * P) / n) + 3;
      const r = v.max > 0 ? p.used / v.max : p.used > 0 ? Infinity : 0;
      const rect = h('svg:rect', {
        x, y: y(p.used), width: bw, height: Math.max(0, H - P - y(p.used)),
        class: `col ${r >= 1 ? 'over' : r >= 0.8 ? 'warn' : 'ok'}${p.current ? ' current' : ''}`,
      }, h('svg:title', null, `${inZone(p.start, v.timezone)}: ${amount(v.metric, p.used)}${p.current ? ' (current period)' : ''}`));
      svg.append(rect);
      svg.append(h('svg:text', { x: x + bw / 2, y: H - 8, class: 'label' }, shortDate(p.start, v.timezone)));
    });
    const ym = y(v.max);
    svg.append(h('svg:line', { x1: P, x2: W - P, y1: ym, y2: ym, class: 'maxline' }));
    svg.append(h('svg:text', { x: W - P, y: ym - 4, class: 'label end' }, 'max ' + amount(v.metric, v.max)));
    return svg;
  }

  function shortDate(iso, tz) {
    if (!iso) return '';
    const s = inZone(iso, tz);
    return s.slice(5, 16); // 'MM-DD hh:mm'
  }

  // A line of `used` samples taken while the page is open.
  function sparkline(samples, v) {
    const W = 640, H = 80, P = 6;
    const svg = h('svg:svg', { viewBox: `0 0 ${W} ${H}`, class: 'spark', id: 'live-chart', role: 'img', 'aria-label': 'usage since this page opened' });
    if (samples.length < 2) return svg;
    const t0 = samples[0].t, t1 = samples[samples.length - 1].t;
    const top = Math.max(v.max, ...samples.map((s) => s.used), 1);
    const pts = samples.map((s) => `${P + ((s.t - t0) / Math.max(1, t1 - t0)) * (W - 2 * P)},${H - P - (s.used / top) * (H - 2 * P)}`);
    svg.append(h('svg:polyline', { points: pts.join(' '), class: 'line' }));
    return svg;
  }

  // History from GET /v1/limits/{id}/history, read tolerantly (the endpoint is newer than
  // this page may be); null when the node does not have it.
  async function fetchHistory(id) {
    let body;
    try {
      body = await api('GET', `limits/${seg(id)}/history`);
    } catch (e) {
      if (e.status === 404 || e.status === 405) return null;
      throw e;
    }
    const arr = Array.isArray(body) ? body : (body && (body.history || body.periods || body.epochs)) || [];
    return arr
      .map((p) => ({ start: p.period_start ?? p.start, end: p.resets_at ?? p.period_end ?? p.end, used: Number(p.used ?? p.usage ?? p.total) }))
      .filter((p) => p.start && Number.isFinite(p.used))
      .sort((a, b) => new Date(a.start) - new Date(b.start)); // oldest first, whatever the order sent
  }

  function limitView(id) {
    const samples = [];
    let history = null; // null: not fetched or not available
    let historyState = 'loading';
    let historyFor = null; // the period_start the history was fetched for
    let view = null;
    const body = h('div', { id: 'limit-body' });
    const around = h('section', { id: 'around', class: 'card' }, h('h2', null, 'Scope, parents and limits around it'), h('p', { class: 'muted' }, 'Loading…'));

    async function loadAround(v) {
      const parts = [h('h2', null, 'Scope, parents and limits around it')];
      const pairs = scopePairs(v.scope);
      const expanded = new Map(pairs.map(([k, x]) => [k + '\u0000' + x, [k, x]]));
      if (!pairs.length) parts.push(h('p', null, 'Global: this limit applies to every request.'));
      const list = h('ul', { class: 'tree', id: 'parents' });
      for (const [k, x] of pairs) {
        const chain = await parentChain(k, x);
        for (const c of chain) expanded.set(c.parent[0] + '\u0000' + c.parent[1], c.parent);
        list.append(h('li', null, h('span', { class: 'chip' }, h('b', null, k), '=', x),
          chain.length ? [' → parents: ', chain.map((c) => h('span', { class: 'chip parent' }, h('b', null, c.parent[0]), '=', c.parent[1]))]
            : h('span', { class: 'muted' }, ' (no parents recorded)')));
      }
      if (pairs.length) parts.push(list);
      // Limits that also apply to this limit's traffic (scope within this scope and its
      // parents), and narrower ones (scope containing this one).
      const all = cache.limits && Date.now() - cache.limitsAt < 60000 ? cache.limits : await fetchLimits();
      const broader = [], narrower = [];
      for (const o of all) {
        if (o.id === v.id) continue;
        const op = scopePairs(o.scope);
        if (op.every(([k, x]) => expanded.has(k + '\u0000' + x))) broader.push(o);
        else if (pairs.every(([k, x]) => o.scope && o.scope[k] === x) && op.length > pairs.length) narrower.push(o);
      }
      const table = (title, rows, id) => [h('h3', null, `${title} (${rows.length})`),
        rows.length ? h('table', { class: 'mini', id },
          h('tbody', null, rows.slice(0, RELATED_MAX).map((o) => h('tr', { 'data-id': o.id },
            h('td', null, h('a', { href: limitHref(o.id) }, o.id)), h('td', null, chips(o.scope)),
            h('td', { class: 'usage' }, bar(o._ratio), h('span', { class: 'pct' }, pct(o._ratio))),
            h('td', { class: 'num' }, `${amount(o.metric, o.used)} of ${amount(o.metric, o.max)}`)))))
          : h('p', { class: 'muted' }, 'None.'),
        rows.length > RELATED_MAX ? h('p', { class: 'muted' }, `and ${rows.length - RELATED_MAX} more`) : null];
      parts.push(table('Limits that also apply to its requests', broader, 'broader'));
      parts.push(table('Narrower limits inside its scope', narrower, 'narrower'));
      fill(around, parts);
    }

    function render() {
      const v = view;
      const r = ratio(v);
      const nodes = nodeRows(v);
      const nodeSum = nodes.reduce((s, n) => s + (Number.isFinite(n.used) ? n.used : 0), 0);
      const baseline = v.used - nodeSum;
      const hasFree = nodes.some((n) => n.free !== undefined);
      const points = (history || []).filter((p) => p.start !== v.period_start).slice(-11);
      points.push({ start: v.period_start, end: v.resets_at, used: v.used, current: true });
      const dl = [
        ['Scope', chips(v.scope)],
        ['Metric', v.metric],
        ['Mode', h('span', { class: 'badge ' + modeOf(v) }, modeOf(v))],
        ['Period', periodText(v)],
        ['Time zone', v.timezone],
        ['Period start', v.period_start ? [inZone(v.period_start, v.timezone), h('span', { class: 'muted' }, ' · ' + relative(v.period_start))] : '—'],
        ['Resets at', v.resets_at ? [h('span', { id: 'resets-at' }, inZone(v.resets_at, v.timezone)), h('span', { class: 'muted' }, ' · ' + relative(v.resets_at))] : 'never'],
      ];
      if (Math.abs(baseline) > 1e-9) dl.push(['Set usage baseline', amount(v.metric, baseline)]);
      fill(body,
        h('section', { class: 'card' },
          h('div', { class: 'big-numbers' },
            h('div', null, h('span', { class: 'label' }, 'Used'), h('span', { id: 'used', class: 'value' }, amount(v.metric, v.used))),
            h('div', null, h('span', { class: 'label' }, 'Max'), h('span', { id: 'max', class: 'value' }, amount(v.metric, v.max))),
            h('div', null, h('span', { class: 'label' }, 'Remaining'), h('span', { id: 'remaining', class: 'value' }, amount(v.metric, v.remaining))),
            h('div', null, h('span', { class: 'label' }, 'Used %'), h('span', { id: 'pct', class: 'value' }, pct(r)))),
          bar(r),
          h('dl', { class: 'facts' }, dl.map(([k, x]) => [h('dt', null, k), h('dd', null, x)]))),
        h('section', { class: 'card' },
          h('h2', null, 'Usage per period'),
          historyState === 'missing'
            ? h('p', { class: 'muted', id: 'history-note' }, 'This node does not serve usage history; showing the current period only.')
            : historyState === 'error' ? h('p', { class: 'muted', id: 'history-note' }, 'History could not be loaded; showing the current period only.') : null,
          periodChart(points, v),
          h('h3', null, 'Live, since this page opened'),
          samples.length < 2 ? h('p', { class: 'muted' }, 'Collecting samples…') : sparkline(samples, v)),
        h('section', { class: 'card' },
          h('h2', null, 'Per node'),
          nodes.length
            ? h('table', { class: 'mini', id: 'nodes' },
              h('thead', null, h('tr', null, h('th', null, 'Node'), h('th', null, 'Used'), h('th', null, 'Share of used'), hasFree ? h('th', null, 'Free rights') : null)),
              h('tbody', null, nodes.map((n) => h('tr', { 'data-node': n.node },
                h('td', null, n.node), h('td', { class: 'num' }, amount(v.metric, n.used)),
                h('td', { class: 'num' }, v.used > 0 ? pct(n.used / v.used) : '—'),
                hasFree ? h('td', { class: 'num' }, amount(v.metric, n.free)) : null))))
            : h('p', { class: 'muted' }, 'No node has counted usage in this period yet.')),
        around);
    }

    let first = true;

    async function load() {
      try {
        view = await api('GET', `limits/${seg(id)}`);
      } catch (e) {
        if (e.status === 404) {
          fill(body, h('p', { class: 'empty', id: 'not-found' }, `No limit with id ${id} (deleted?).`), h('a', { href: '#/limits' }, '‹ All limits'));
          return;
        }
        throw e;
      }
      samples.push({ t: Date.now(), used: view.used });
      if (samples.length > SAMPLES_MAX) samples.shift();
      if (historyFor !== view.period_start) {
        historyFor = view.period_start;
        try {
          history = await fetchHistory(id);
          historyState = history === null ? 'missing' : 'ok';
        } catch (_) {
          history = null;
          historyState = 'error';
        }
      }
      render();
      if (first) {
        first = false;
        loadAround(view).catch((e) => fill(around, h('h2', null, 'Scope, parents and limits around it'), h('p', { class: 'muted' }, e.message)));
      }
    }

    async function act(what) {
      const v = view;
      if (!v) return;
      try {
        if (what === 'reset') {
          const ok = await confirmDialog({ title: `Reset ${v.id}?`, body: `Usage of the current period starts again from 0 (now ${amount(v.metric, v.used)}). This cannot be undone.`, action: 'Reset', danger: true });
          if (!ok) return;
          view = await api('POST', `limits/${seg(v.id)}/reset`, {});
        } else if (what === 'set') {
          const x = await confirmDialog({ title: `Set the usage of ${v.id}`, body: 'The current period starts again with this usage already counted. This cannot be undone.', action: 'Set usage', danger: true, input: { label: v.metric === 'cost' ? 'Used (USD)' : `Used (${v.metric})`, type: 'number', value: v.used } });
          if (x === null) return;
          view = await api('POST', `limits/${seg(v.id)}/reset`, { used: Number(x) });
        } else if (what === 'delete') {
          const ok = await confirmDialog({ title: `Delete ${v.id}?`, body: 'The limit stops applying to requests on every node. This cannot be undone.', action: 'Delete', danger: true });
          if (!ok) return;
          await api('DELETE', `limits/${seg(v.id)}`);
          cache.limits = null;
          location.hash = '#/limits';
          return;
        }
        banner('');
        cache.limits = null;
        samples.push({ t: Date.now(), used: view.used });
        render();
      } catch (e) {
        banner(e.message);
      }
    }

    return {
      name: 'limits',
      async mount(main) {
        fill(main,
          h('div', { class: 'title-row' },
            h('a', { href: '#/limits', class: 'back' }, '‹ All limits'),
            h('h1', { id: 'limit-id' }, id),
            isAdmin() ? h('div', { class: 'actions', id: 'admin-actions' },
              h('a', { href: '#/edit/' + encodeURIComponent(id), class: 'button', id: 'edit' }, 'Edit'),
              h('button', { type: 'button', id: 'reset', onclick: () => act('reset') }, 'Reset'),
              h('button', { type: 'button', id: 'set-usage', onclick: () => act('set') }, 'Set usage'),
              h('button', { type: 'button', id: 'delete', class: 'danger', onclick: () => act('delete') }, 'Delete')) : null),
          body);
      },
      refresh: load,
    };
  }

  // Create (id null) or edit a limit.
  function limitForm(id) {
    const err = h('p', { class: 'form-error', id: 'form-error', role: 'alert', hidden: true });
    const f = {
      id: h('input', { id: 'f-id', name: 'id', required: true, pattern: '[A-Za-z0-9._:\\-]{1,128}', maxlength: 128, placeholder: 'team-eng-monthly', readonly: !!id, value: id || '' }),
      metric: h('select', { id: 'f-metric', name: 'metric' }, ['cost', 'tokens', 'requests'].map((m) => h('option', { value: m }, m))),
      max: h('input', { id: 'f-max', name: 'max', type: 'number', min: 0, step: 'any', required: true, placeholder: '100' }),
      period: h('input', { id: 'f-period', name: 'period', required: true, placeholder: '1M, 1d, 1h, 30m or never', value: '1M' }),
      aligned: h('input', { id: 'f-aligned', name: 'calendar_aligned', type: 'checkbox', checked: true }),
      timezone: h('input', { id: 'f-timezone', name: 'timezone', list: 'zones', value: 'UTC' }),
      mode: h('select', { id: 'f-mode', name: 'mode' }, h('option', { value: 'soft' }, 'soft'), h('option', { value: 'hard' }, 'hard')),
      scope: h('textarea', { id: 'f-scope', name: 'scope', rows: 4, placeholder: 'team=eng\nmodel=gpt-4o' }),
    };
    const zones = h('datalist', { id: 'zones' }, (Intl.supportedValuesOf ? Intl.supportedValuesOf('timeZone') : ['UTC']).map((z) => h('option', { value: z })));
    let hadMode = false;

    function parseScope(text) {
      const scope = {};
      for (const line of text.split('\n')) {
        const t = line.trim();
        if (!t) continue;
        const i = t.indexOf('=');
        if (i <= 0) throw new Error(`scope line "${t}" must be dimension=value`);
        scope[t.slice(0, i).trim()] = t.slice(i + 1).trim();
      }
      return scope;
    }

    async function submit(ev) {
      ev.preventDefault();
      err.hidden = true;
      try {
        const body = {
          scope: parseScope(f.scope.value),
          metric: f.metric.value,
          max: Number(f.max.value),
          period: f.period.value.trim(),
          calendar_aligned: f.aligned.checked,
          timezone: f.timezone.value.trim() || 'UTC',
        };
        // Only a node that knows modes takes the field (older ones refuse unknown fields).
        if (f.mode.value !== 'soft' || hadMode) body.mode = f.mode.value;
        const lid = f.id.value.trim();
        await api('PUT', `limits/${seg(lid)}`, body);
        cache.limits = null;
        location.hash = limitHref(lid);
      } catch (e) {
        err.hidden = false;
        err.textContent = e.message;
      }
    }

    const row = (label, el, hint) => h('label', null, h('span', null, label), el, hint ? h('small', { class: 'muted' }, hint) : null);
    return {
      name: 'limits',
      async mount(main) {
        if (!isAdmin()) {
          fill(main, h('p', { class: 'empty' }, 'Changing limits needs an admin token.'));
          return;
        }
        if (id) {
          const v = await api('GET', `limits/${seg(id)}`);
          f.metric.value = v.metric;
          f.max.value = v.max;
          f.period.value = v.period;
          f.aligned.checked = !!v.calendar_aligned;
          f.timezone.value = v.timezone;
          hadMode = typeof v.mode === 'string';
          f.mode.value = modeOf(v);
          f.scope.value = scopePairs(v.scope).map(([k, x]) => `${k}=${x}`).join('\n');
        }
        fill(main,
          h('div', { class: 'title-row' }, h('a', { href: id ? limitHref(id) : '#/limits', class: 'back' }, '‹ Back'), h('h1', null, id ? `Edit ${id}` : 'New limit')),
          h('form', { class: 'card form', id: 'limit-form', onsubmit: submit, novalidate: true },
            row('Id', f.id, 'letters, digits and . _ : -'),
            row('Scope', f.scope, 'one dimension=value per line; empty = every request'),
            row('Metric', f.metric),
            row('Max', f.max, 'USD for cost, a whole number otherwise'),
            row('Period', f.period),
            h('label', { class: 'check' }, f.aligned, h('span', null, 'Calendar aligned (periods start on the unit’s boundary in the time zone)')),
            row('Time zone', f.timezone), zones,
            row('Mode', f.mode, 'hard: never overspends, where the node supports it'),
            err,
            h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'save' }, id ? 'Save' : 'Create'))));
        (id ? f.max : f.id).focus();
      },
    };
  }

  function denialsView() {
    const tbody = h('tbody', { id: 'denials-body' });
    const summary = h('p', { class: 'muted', id: 'denials-summary' });
    const filter = h('input', { id: 'denials-search', type: 'search', placeholder: 'Filter by attribute or limit…', 'aria-label': 'Filter denials', oninput: () => render() });
    let data = null;

    function render() {
      if (!data) return;
      const q = filter.value.trim().toLowerCase();
      const rows = data.denials.filter((d) => !q ||
        (Object.entries(d.attributes).map(([k, v]) => `${k}=${v}`).join(' ') + ' ' + d.denied_by.join(' ')).toLowerCase().includes(q));
      summary.textContent = `${intFmt.format(data.denied_total)} checks denied on node ${data.node_id} since it started; the latest ${data.denials.length} are shown (the node keeps at most ${data.capacity}, in memory only${data.skipped ? `; ${data.skipped} not kept because the list was busy` : ''}).`;
      fill(tbody, ...rows.map((d) => h('tr', { 'data-seq': d.seq },
        h('td', { title: d.at }, localTime(d.at), h('br'), h('span', { class: 'muted' }, relative(d.at))),
        h('td', { class: 'attrs' }, chips(d.attributes, 'no attributes')),
        h('td', { class: 'denied-by' }, d.denied_by.map((id) => h('a', { href: limitHref(id), class: 'chip deny' }, id)),
          d.denied_by_more ? h('span', { class: 'muted' }, ` +${d.denied_by_more} more`) : null),
        h('td', { class: 'num' }, d.cost ? amount('cost', d.cost) : '', d.cost && d.tokens ? h('br') : null, d.tokens ? intFmt.format(d.tokens) + ' tokens' : ''))));
      if (!rows.length) tbody.append(h('tr', null, h('td', { colspan: 4, class: 'empty' }, data.denials.length ? 'No denial matches.' : 'No check has been denied on this node since it started.')));
    }

    return {
      name: 'denials',
      mount(main) {
        fill(main,
          h('h1', null, 'Denied checks'),
          h('div', { class: 'toolbar' }, filter),
          summary,
          h('div', { class: 'table-wrap' }, h('table', { id: 'denials' },
            h('thead', null, h('tr', null, ['When', 'Attributes', 'Denied by', 'Estimate'].map((t) => h('th', null, t)))), tbody)));
      },
      async refresh() {
        data = await api('GET', 'denials?limit=100');
        render();
      },
    };
  }

  function clusterView() {
    const body = h('div', { id: 'cluster-body' });
    return {
      name: 'cluster',
      mount(main) {
        fill(main, h('h1', null, 'Cluster'), body);
      },
      async refresh() {
        const [c, ready] = await Promise.all([
          api('GET', 'cluster'),
          fetch(READYZ, { cache: 'no-store', credentials: 'omit' }).then((r) => r.ok, () => null),
        ]);
        const nodes = c.nodes || [];
        const live = nodes.filter((n) => n.live).length;
        fill(body,
          h('div', { class: 'cards' },
            h('div', { class: 'card stat' }, h('span', { class: 'label' }, 'This node'), h('span', { class: 'value', id: 'this-node' }, c.node_id)),
            h('div', { class: 'card stat' }, h('span', { class: 'label' }, 'Readiness (/readyz)'),
              h('span', { class: 'value ' + (ready ? 'good' : 'bad'), id: 'ready' }, ready === null ? 'unreachable' : ready ? 'ready' : 'catching up')),
            h('div', { class: 'card stat' }, h('span', { class: 'label' }, 'Nodes live'), h('span', { class: 'value', id: 'live-count' }, `${live} of ${nodes.length}`))),
          h('table', { id: 'nodes-table' },
            h('thead', null, h('tr', null, ['Node', 'Gossip address', 'Liveness', 'Generation (start)', 'Newest value (gossip lag)'].map((t) => h('th', null, t)))),
            h('tbody', null, nodes.map((n) => h('tr', { 'data-node': n.node_id },
              h('td', null, n.node_id, n.node_id === c.node_id ? h('span', { class: 'badge soft' }, 'this node') : null),
              h('td', null, n.gossip_addr || '—'),
              h('td', null, h('span', { class: 'badge ' + (n.live ? 'good' : 'bad') }, n.live ? 'live' : 'down')),
              h('td', null, String(n.generation), h('br'), h('span', { class: 'muted' }, generationTime(n.generation))),
              h('td', { class: 'num' }, n.node_id === c.node_id ? '—' : n.newest_value_age_ms == null ? 'unknown' : `${intFmt.format(n.newest_value_age_ms)} ms ago`))))),
          nodes.length === 1 && !nodes[0].gossip_addr ? h('p', { class: 'muted' }, 'This node runs alone (no gossip).') : null);
      },
    };
  }

  // A generation is the node's start time in ms.
  function generationTime(g) {
    const d = new Date(Number(g));
    return Number.isFinite(d.getTime()) && Number(g) > 1e12 ? 'started ' + d.toLocaleString() : '';
  }

  function loginView(message) {
    const input = h('input', { id: 'token', type: 'password', autocomplete: 'current-password', required: true, 'aria-label': 'Token' });
    const err = h('p', { class: 'form-error', id: 'login-error', role: 'alert', hidden: !message }, message || '');
    async function submit(ev) {
      ev.preventDefault();
      const token = input.value.trim();
      try {
        const who = await api('GET', 'whoami', undefined, token);
        session.token = token;
        sessionStorage.setItem(TOKEN_KEY, token);
        signedIn(who);
      } catch (e) {
        err.hidden = false;
        err.textContent = e.status === 401 ? 'That token is not known to this node.' : e.message;
      }
    }
    return {
      name: 'login',
      mount(main) {
        fill(main, h('form', { class: 'card form login', id: 'login', onsubmit: submit },
          h('h1', null, 'Sign in'),
          h('p', null, 'This node asks for a token. An admin token can change limits; a client token sees everything read-only. The token stays in this browser tab (session storage) and is sent only to this node.'),
          h('label', null, h('span', null, 'Token'), input), err,
          h('div', { class: 'actions' }, h('button', { type: 'submit', class: 'primary', id: 'sign-in' }, 'Sign in'))));
        input.focus();
      },
    };
  }

  // ----- routing and session ---------------------------------------------------------

  let current = null;

  function viewFor(hash) {
    const [, name, arg] = /^#\/([a-z]*)\/?(.*)$/.exec(hash || '') || [];
    const id = arg ? decodeURIComponent(arg) : '';
    switch (name) {
      case 'limit': return id ? limitView(id) : limitsView();
      case 'new': return limitForm(null);
      case 'edit': return limitForm(id);
      case 'denials': return denialsView();
      case 'cluster': return clusterView();
      default: return limitsView();
    }
  }

  async function route() {
    if (!session.role) return;
    clearTimeout(poll.timer);
    banner('');
    const view = viewFor(location.hash);
    current = view;
    for (const a of $('nav').querySelectorAll('a')) a.classList.toggle('active', a.dataset.view === view.name);
    try {
      await view.mount($('main'));
      if (view === current && view.refresh) await tick();
    } catch (e) {
      if (view === current) banner(e.message);
      schedule();
    }
    if (!view.refresh) $('live').hidden = $('pause').hidden = true;
  }

  function signedIn(who) {
    session.role = who.role;
    session.tokensRequired = who.tokens_required;
    session.nodeId = who.node_id;
    $('nav').hidden = false;
    fill($('who'), h('span', { class: 'badge ' + (who.role === 'admin' ? 'admin' : 'client'), id: 'role' }, who.role === 'admin' ? 'admin' : 'read-only'),
      ' node ', h('b', { id: 'node-id' }, who.node_id),
      who.tokens_required ? null : h('span', { class: 'muted' }, ' (no tokens: loopback only)'));
    $('logout').hidden = !who.tokens_required;
    route();
  }

  function loggedOut(message) {
    session.token = '';
    session.role = null;
    sessionStorage.removeItem(TOKEN_KEY);
    clearTimeout(poll.timer);
    current = null;
    $('nav').hidden = true;
    $('live').hidden = $('pause').hidden = $('logout').hidden = true;
    fill($('who'));
    const v = loginView(message);
    v.mount($('main'));
  }

  async function boot() {
    try {
      signedIn(await api('GET', 'whoami', undefined, session.token));
    } catch (e) {
      if (e.status === 401) loggedOut(session.token ? 'The saved token is no longer valid.' : '');
      else {
        banner(`Cannot reach the node: ${e.message}. Retrying…`);
        setTimeout(boot, POLL_MS);
      }
    }
  }

  window.addEventListener('hashchange', route);
  $('logout').addEventListener('click', () => loggedOut(''));
  $('pause').addEventListener('click', () => {
    poll.paused = !poll.paused;
    showLive();
    if (poll.paused) clearTimeout(poll.timer);
    else tick();
  });
  window.addEventListener('securitypolicyviolation', (e) => {
    // Recorded for the browser test, which requires none.
    (window.__tallyCspViolations = window.__tallyCspViolations || []).push(e.violatedDirective + ' ' + e.blockedURI);
  });
  boot();
})();
