// The fogmesh chat page: a client of the daemon's local API, served by the
// daemon itself. Everything a peer controls (names, texts, ids) is put in
// the page with textContent, never parsed as HTML.

let csrf = null;
let me = '';
let view = 'groups';
const state = {
  groups: [],
  group: null, // the selected group id
  groupMsgIds: new Set(),
  dmPeer: null, // the selected conversation's peer id
  filesTimer: null,
};

const $ = (id) => document.getElementById(id);

// el('li', {class: 'x', title: 't'}, child, 'text', ...): a new element;
// string children become text nodes.
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function clear(e) {
  while (e.firstChild) e.removeChild(e.firstChild);
  return e;
}

// A peer id as people read it: "you" for this node, else its last 8
// characters (every ed25519 id starts alike).
function who(peer) {
  if (peer === me) return 'you';
  return '…' + String(peer).slice(-8);
}

function localTime(ms) {
  const d = new Date(Number(ms));
  const today = new Date();
  const time = d.toLocaleTimeString([], { hour: '2-digit', minute: '2-digit' });
  if (d.toDateString() === today.toDateString()) return time;
  return d.toLocaleDateString() + ' ' + time;
}

function bytes(n) {
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  n = Number(n) || 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

let toastTimer = null;
function toast(msg, bad = false) {
  const t = $('toast');
  t.textContent = msg;
  t.className = bad ? 'toast bad' : 'toast';
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, 5000);
}

class ApiError extends Error {
  constructor(status, msg) { super(msg); this.status = status; }
}

// One call to the API with the session cookie; changes carry the CSRF token.
async function api(method, path, body) {
  const opts = { method, headers: {}, credentials: 'same-origin', cache: 'no-store' };
  if (method !== 'GET' && csrf) opts.headers['X-CSRF-Token'] = csrf;
  if (body instanceof Blob) {
    opts.body = body;
    opts.headers['Content-Type'] = 'application/octet-stream';
  } else if (body !== undefined) {
    opts.headers['Content-Type'] = 'application/json';
    opts.body = JSON.stringify(body);
  }
  const r = await fetch(path, opts);
  const text = await r.text();
  let v = null;
  try { v = text ? JSON.parse(text) : null; } catch { v = null; }
  if (!r.ok) {
    if (r.status === 401 && path !== '/v1/web/session') showLogin('The session ended.');
    throw new ApiError(r.status, (v && v.error) || `HTTP ${r.status}`);
  }
  return v;
}

// Runs an action from a form or button, reporting its error.
async function act(f, okMsg) {
  try {
    const r = await f();
    if (okMsg) toast(okMsg);
    return r;
  } catch (e) {
    toast(e.message, true);
    return undefined;
  }
}

function showLogin(msg) {
  for (const v of document.querySelectorAll('.view')) v.hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = msg || '';
  document.body.dataset.ready = '';
}

function show(name) {
  view = name;
  for (const v of document.querySelectorAll('.view')) v.hidden = v.id !== 'view-' + name;
  for (const b of document.querySelectorAll('nav button')) b.classList.toggle('active', b.dataset.view === name);
  if (name === 'groups') loadGroups();
  if (name === 'messages') loadDms();
  if (name === 'files') loadFiles();
  if (name === 'peers') loadPeers();
}

// ---- groups ----

async function loadGroups() {
  const [groups, invites] = await Promise.all([
    api('GET', '/v1/groups').catch(() => []),
    api('GET', '/v1/groups/invites').catch(() => []),
  ]);
  state.groups = groups || [];
  const list = clear($('group-list'));
  for (const g of state.groups) {
    list.append(el('li', {
      class: 'group-item' + (g.group_id === state.group ? ' selected' : ''),
      'data-id': g.group_id,
      onclick: () => openGroup(g.group_id),
    }, el('span', { class: 'name' }, g.name),
    el('span', { class: 'sub' }, g.is_member ? `${g.members.length} members` : 'left')));
  }
  if (!state.groups.length) list.append(el('li', { class: 'sub' }, 'No groups yet.'));
  const inv = clear($('invite-list'));
  for (const i of invites || []) {
    const li = el('li', { class: 'invite', 'data-id': i.group_id },
      el('span', {}, el('span', { class: 'name' }, i.name), ' ',
        el('span', { class: 'sub', title: i.inviter }, 'from ' + who(i.inviter))));
    if (i.accepted) {
      li.append(el('span', { class: 'sub' }, 'joining…'));
    } else {
      li.append(el('span', { class: 'row' },
        el('button', { class: 'small accept', type: 'button', onclick: () => act(async () => {
          await api('POST', `/v1/groups/${i.group_id}/accept`);
          await loadGroups();
        }, 'Accepted: waiting for a member to send the history') }, 'Accept'),
        el('button', { class: 'small secondary decline', type: 'button', onclick: () => act(async () => {
          await api('POST', `/v1/groups/${i.group_id}/decline`);
          await loadGroups();
        }) }, 'Decline')));
    }
    inv.append(li);
  }
  if (!(invites || []).length) inv.append(el('li', { class: 'sub' }, 'None.'));
  if (state.group) renderGroupHead();
}

function renderGroupHead() {
  const g = state.groups.find((x) => x.group_id === state.group);
  if (!g) return;
  $('group-title').textContent = g.name;
  $('group-desc').textContent = g.description || '';
  const admin = g.admin === me;
  const members = clear($('group-members'));
  for (const m of g.members) {
    const li = el('li', { class: m === g.admin ? 'admin' : '', title: m },
      who(m) + (m === g.admin ? ' (admin)' : ''));
    if (admin && m !== me && g.is_member) {
      li.append(el('button', { class: 'small danger', type: 'button', title: 'remove', onclick: () => act(async () => {
        await api('DELETE', `/v1/groups/${g.group_id}/members/${encodeURIComponent(m)}`);
        await loadGroups();
      }, 'Removed') }, '×'));
    }
    members.append(li);
  }
  $('add-member').hidden = !(admin && g.is_member);
  $('group-compose').hidden = !g.is_member;
}

async function openGroup(id) {
  state.group = id;
  state.groupMsgIds = new Set();
  clear($('group-messages'));
  for (const li of document.querySelectorAll('#group-list li')) li.classList.toggle('selected', li.dataset.id === id);
  renderGroupHead();
  const msgs = await api('GET', `/v1/groups/${id}/messages?limit=200`).catch(() => []);
  if (state.group !== id) return;
  for (const m of msgs || []) appendGroupMessage(m);
}

function appendGroupMessage(m) {
  if (state.groupMsgIds.has(m.id)) return;
  state.groupMsgIds.add(m.id);
  const box = $('group-messages');
  const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 8;
  box.append(el('li', { class: 'msg' + (m.sender === me ? ' mine' : ''), 'data-id': m.id },
    el('div', { class: 'meta' },
      el('span', { class: 'who', title: m.sender }, who(m.sender)),
      el('time', { title: new Date(Number(m.timestamp)).toString() }, localTime(m.timestamp))),
    el('div', { class: 'text' }, m.text)));
  if (atEnd) box.scrollTop = box.scrollHeight;
}

// ---- direct messages ----

async function loadDms() {
  const all = await api('GET', '/v1/messages?limit=1000').catch(() => []);
  const convs = new Map();
  for (const m of all || []) {
    const peer = m.direction === 'out' ? m.to : m.from;
    convs.set(peer, m); // oldest first: the last one stays
  }
  if (state.dmPeer && !convs.has(state.dmPeer)) convs.set(state.dmPeer, null);
  const list = clear($('dm-list'));
  const sorted = [...convs.entries()].sort((a, b) => ((b[1] && b[1].timestamp) || 0) - ((a[1] && a[1].timestamp) || 0));
  for (const [peer, last] of sorted) {
    list.append(el('li', {
      class: 'dm-item' + (peer === state.dmPeer ? ' selected' : ''),
      'data-peer': peer,
      title: peer,
      onclick: () => openDm(peer),
    }, el('span', { class: 'name' }, who(peer)),
    el('span', { class: 'sub' }, last ? localTime(last.timestamp) : 'new')));
  }
  if (!sorted.length) list.append(el('li', { class: 'sub' }, 'No conversations yet.'));
  if (state.dmPeer) await renderDm();
}

async function openDm(peer) {
  state.dmPeer = peer;
  $('dm-title').textContent = who(peer);
  $('dm-peer').textContent = peer;
  $('dm-compose').hidden = false;
  clear($('dm-messages'));
  await loadDms();
}

async function renderDm() {
  const peer = state.dmPeer;
  const msgs = await api('GET', `/v1/messages?peer=${encodeURIComponent(peer)}&limit=500`).catch(() => []);
  if (state.dmPeer !== peer) return;
  const box = clear($('dm-messages'));
  for (const m of msgs || []) {
    const out = m.direction === 'out';
    const meta = el('div', { class: 'meta' },
      el('span', { class: 'who', title: m.from }, who(m.from)),
      el('time', {}, localTime(m.timestamp)));
    if (out) {
      meta.append(el('span', { class: 'state state-' + (m.state || '') }, m.state || ''));
      const route = m.route ? 'via ' + m.route
        : (m.route_plan && m.route_plan.length ? 'plan: ' + m.route_plan.join(' → ') : '');
      if (route) meta.append(el('span', { class: 'route' }, route));
      if (m.waiting && m.state !== 'delivered') meta.append(el('span', { class: 'waiting', title: m.waiting }, '(' + m.waiting + ')'));
    }
    box.append(el('li', { class: 'msg ' + (out ? 'mine out' : 'in'), 'data-id': m.id },
      meta, el('div', { class: 'text' }, m.text)));
  }
  box.scrollTop = box.scrollHeight;
}

// ---- files ----

function fileId(s) {
  s = s.trim();
  if (s.startsWith('fogmesh-file:')) return { id: s.slice(13).split('#')[0], link: s };
  return { id: s, link: undefined };
}

async function loadFiles() {
  const files = await api('GET', '/v1/files').catch(() => []);
  const body = clear($('file-list'));
  let active = false;
  for (const f of files || []) {
    const busy = f.state === 'searching' || f.state === 'downloading';
    active = active || busy;
    let progress;
    if (f.state === 'searching') {
      progress = el('span', { class: 'sub' }, 'searching for providers…');
    } else {
      progress = el('span', {},
        el('progress', { max: Math.max(1, f.bytes_total), value: f.bytes_have }),
        ' ', `${bytes(f.bytes_have)} / ${bytes(f.bytes_total)}`);
    }
    const cancel = el('button', { class: 'small danger', type: 'button', onclick: () => act(async () => {
      await api('DELETE', `/v1/files/${f.file_id}`);
      await loadFiles();
    }),
      title: busy ? 'stop the download and remove its partial data' : 'remove it from this list; the file stays where it is',
    }, busy ? 'Cancel' : (f.state === 'sharing' || f.state === 'stale' ? 'Stop sharing' : 'Forget'));
    body.append(el('tr', { 'data-id': f.file_id },
      el('td', { title: f.path || '' }, f.name || ''),
      el('td', { class: 'mono', title: f.file_id }, f.file_id.slice(0, 12) + '…'),
      el('td', { class: 'state' }, f.state + (f.error ? ': ' + f.error : '')),
      el('td', {}, progress),
      el('td', {}, f.sources === 1 ? '1 source' : `${f.sources} sources`),
      el('td', {}, busy ? bytes(f.rate_bps) + '/s' : ''),
      el('td', {}, (f.state === 'complete' || f.state === 'sharing')
        ? el('a', { class: 'small', href: `/v1/files/${encodeURIComponent(f.file_id)}/content`, download: f.name || f.file_id,
          title: 'save a copy from the node to this browser' }, 'Download ')
        : '', cancel)));
  }
  if (!(files || []).length) body.append(el('tr', {}, el('td', { colspan: 7, class: 'sub' }, 'Nothing shared or fetched yet.')));
  clearTimeout(state.filesTimer);
  if (view === 'files') state.filesTimer = setTimeout(loadFiles, active ? 700 : 3000);
}

// ---- peers and status ----

async function loadPeers() {
  const [status, peers] = await Promise.all([
    api('GET', '/v1/status').catch(() => null),
    api('GET', '/v1/peers').catch(() => []),
  ]);
  if (status) {
    me = status.peer_id;
    $('me').textContent = '…' + me.slice(-8);
    $('me').title = me;
    const dl = clear($('status'));
    const row = (k, v) => dl.append(el('dt', {}, k), el('dd', {}, v));
    row('peer id', status.peer_id);
    row('version', status.version);
    row('uptime', `${status.uptime_secs} s`);
    row('peers', `${status.connected_peers} connected, ${status.routing_table_peers} in the routing table`);
    row('routes', (status.routes || []).join(', ') || 'none');
    row('reachability', `${status.reachability} (kademlia ${status.kad_mode}${status.relay_server ? ', relaying for others' : ''})`);
    for (const a of status.listen_addrs || []) row('listening', a);
    for (const a of status.external_addrs || []) row('external', a);
    for (const a of status.relayed_addrs || []) row('relayed', a);
    if (status.ble) row('ble', `device ${status.ble.device}, ${status.ble.neighbours} heard, ${status.ble.links} links`);
    row('api', status.api_addr);
  }
  const body = clear($('peer-list'));
  for (const p of peers || []) {
    body.append(el('tr', { 'data-peer': p.peer_id },
      el('td', { class: 'mono', title: p.peer_id }, who(p.peer_id)),
      el('td', {}, p.transport),
      el('td', {}, p.relayed ? 'relayed' : 'direct'),
      el('td', {}, p.rtt_ms == null ? '–' : `${p.rtt_ms.toFixed(1)} ms`),
      el('td', {}, p.agent || ''),
      el('td', { class: 'mono' }, (p.addrs || []).join(' '))));
  }
  if (!(peers || []).length) body.append(el('tr', {}, el('td', { colspan: 6, class: 'sub' }, 'No peers connected.')));
}

// ---- live updates ----

let refreshTimer = null;
function refreshSoon(f) {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(f, 150);
}

function onEvent(ev) {
  switch (ev.type) {
    case 'group_message':
      if (ev.group_id === state.group) appendGroupMessage(ev);
      if (view === 'groups') refreshSoon(loadGroups);
      break;
    case 'group_updated':
    case 'group_invite':
      if (view === 'groups') refreshSoon(loadGroups);
      else toast(ev.type === 'group_invite' ? `Invited to group ${ev.name}` : 'A group changed');
      break;
    case 'direct_message':
    case 'direct_message_state':
      if (view === 'messages') refreshSoon(loadDms);
      else if (ev.type === 'direct_message') toast(`Message from ${who(ev.from)}`);
      break;
    case 'peer_connected':
    case 'peer_disconnected':
      if (view === 'peers') refreshSoon(loadPeers);
      break;
    case 'lagged':
      show(view);
      break;
    default:
      break;
  }
}

function follow() {
  const es = new EventSource('/v1/events');
  es.onopen = () => {
    $('live').textContent = 'live';
    $('live').classList.add('on');
    show(view); // catch up on what happened while disconnected
  };
  es.onmessage = (m) => {
    let ev;
    try { ev = JSON.parse(m.data); } catch { return; }
    onEvent(ev);
  };
  es.onerror = () => {
    $('live').textContent = 'offline';
    $('live').classList.remove('on');
  };
}

// ---- forms ----

function wire() {
  for (const b of document.querySelectorAll('nav button')) b.addEventListener('click', () => show(b.dataset.view));
  const onSubmit = (id, f) => $(id).addEventListener('submit', (e) => { e.preventDefault(); f(); });

  onSubmit('new-group', () => act(async () => {
    const members = $('new-group-members').value.split(/[\s,]+/).filter(Boolean);
    const r = await api('POST', '/v1/groups', { name: $('new-group-name').value, members });
    $('new-group-name').value = '';
    $('new-group-members').value = '';
    await loadGroups();
    await openGroup(r.group_id);
  }, 'Group created'));
  onSubmit('add-member', () => act(async () => {
    await api('POST', `/v1/groups/${state.group}/members`, { peer_id: $('add-member-peer').value.trim() });
    $('add-member-peer').value = '';
    await loadGroups();
  }, 'Member added'));
  onSubmit('group-compose', () => act(async () => {
    const text = $('group-text').value;
    if (!text || !state.group) return;
    await api('POST', `/v1/groups/${state.group}/messages`, { text });
    $('group-text').value = '';
  }));

  onSubmit('dm-new', () => act(async () => {
    const peer = $('dm-new-peer').value.trim();
    $('dm-new-peer').value = '';
    await openDm(peer);
  }));
  onSubmit('dm-compose', () => act(async () => {
    const text = $('dm-text').value;
    if (!text || !state.dmPeer) return;
    await api('POST', '/v1/messages', {
      to: state.dmPeer,
      text,
      route: $('dm-route').value,
      private: $('dm-private').checked,
    });
    $('dm-text').value = '';
    await loadDms();
  }));

  onSubmit('share', () => act(async () => {
    await api('POST', '/v1/files', { path: $('share-path').value.trim() });
    $('share-path').value = '';
    await loadFiles();
  }, 'Shared'));
  onSubmit('upload', () => act(async () => {
    const f = $('upload-file').files[0];
    if (!f) return;
    await api('POST', `/v1/files/upload?name=${encodeURIComponent(f.name)}`, f);
    $('upload-file').value = '';
    await loadFiles();
  }, 'Uploaded and shared'));
  onSubmit('fetch', () => act(async () => {
    const { id, link } = fileId($('fetch-id').value);
    await api('POST', `/v1/files/${encodeURIComponent(id)}/get`, { output: $('fetch-output').value.trim(), link });
    $('fetch-id').value = '';
    await loadFiles();
  }, 'Fetching'));
  onSubmit('connect', () => act(async () => {
    const r = await api('POST', '/v1/connect', { addr: $('connect-addr').value.trim() });
    $('connect-addr').value = '';
    await loadPeers();
    return r;
  }, 'Connected'));

  $('logout').addEventListener('click', () => act(async () => {
    await api('DELETE', '/v1/web/session');
    csrf = null;
    showLogin('Logged out.');
  }));
}

// ---- start ----

async function login() {
  const m = location.hash.match(/^#login=([0-9a-f]{64})$/);
  if (m) {
    // The token works once: drop it from the address bar and history.
    history.replaceState(null, '', '/');
    try {
      csrf = (await api('POST', '/v1/web/session', { token: m[1] })).csrf;
      return true;
    } catch (e) {
      showLogin(e.message);
      return false;
    }
  }
  try {
    csrf = (await api('GET', '/v1/web/session')).csrf;
    return true;
  } catch {
    showLogin('');
    return false;
  }
}

async function main() {
  wire();
  if (!(await login())) return;
  await loadPeers(); // learns this node's id first
  show('groups');
  follow();
  document.body.dataset.ready = '1';
}

main();
