'use strict';
// The console talks to its own origin only: KORE's REST API (/omnicore/...)
// for registries, devices, configs and commands, and the emulator's admin API
// (/v1/...) for what KORE's API cannot say: live connections, attachments,
// telemetry and errors. Everything is polled; payloads are shown as text
// (textContent, never HTML).

const TOKEN_KEY = 'omnicore-emulator-token'; // sessionStorage: this tab only
const POLL_MS = 1000;
const TAIL_MAX = 200;      // messages the page keeps for the selected device
const TAIL_BACKLOG = 1000; // messages looked at when a device is selected
const PAGES_PER_POLL = 5;  // telemetry pages read per poll at most
const DEVICES_PAGE = 1000; // devices shown per registry

const state = { sub: '', registry: '', device: '', since: 0, tail: [], timer: 0 };

class AuthError extends Error {}

async function api(method, path, body) {
  const headers = {};
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) headers['x-api-key'] = token;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  if (res.status === 401) {
    showLogin();
    throw new AuthError('the API needs a token');
  }
  const data = await res.json();
  if (!res.ok) {
    // KORE's errors are {"error": {"message": ...}}, the admin API's {"error": "..."}.
    const e = data.error;
    throw new Error(res.status + ': ' + (e && e.message ? e.message : e));
  }
  return data;
}

const kore = (p) => '/omnicore/subscriptions/' + encodeURIComponent(state.sub) + p;
const inRegistry = (p) => kore('/registries/' + encodeURIComponent(state.registry) + p);
const inDevice = (p) => inRegistry('/devices/' + encodeURIComponent(state.device) + p);

// el builds an element; children are nodes or text.
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c instanceof Node ? c : String(c ?? ''));
  return e;
}

const yes = (b, text) => (b ? el('span', { class: 'yes' }, text || 'yes') : '');
const time = (t) => (t ? new Date(t).toLocaleTimeString() : '');

function setStatus(text, isError) {
  const s = document.getElementById('status');
  s.textContent = text;
  s.className = isError ? 'error' : '';
}

function showLogin() {
  document.getElementById('app').hidden = true;
  document.getElementById('login').hidden = false;
  clearTimeout(state.timer);
}

// --- registries, devices, connections, errors -----------------------------

function renderRegistries(regs) {
  if (!regs.some((r) => r.id === state.registry)) state.registry = regs.length ? regs[0].id : '';
  document.getElementById('registries').replaceChildren(...regs.map((r) => el('li', {
    class: r.id === state.registry ? 'selected' : '',
    'data-registry': r.id,
    onclick: () => { state.registry = r.id; selectDevice(''); poll(); },
  }, r.id, el('span', { class: 'hint' }, ` ${r.numberOfGateways} gw, ${r.numberOfDevices} dev`))));
}

function deviceRow(d, live, nested) {
  const l = live[state.registry + '/' + d.id] || {};
  const cfg = d.config ? `v${d.config.version}` + (d.config.acknowledged ? ' ✓' : '') : '';
  return el('tr', {
    'data-device': d.id,
    class: d.id === state.device ? 'selected' : '',
    onclick: () => { selectDevice(d.id); poll(); },
  },
  el('td', { class: nested ? 'bound' : '' }, d.id),
  el('td', {}, d.isGateway ? 'gateway ' + d.gatewayConfig.gatewayAuthMethod : 'device'),
  el('td', {}, d.isGateway ? '' : d.gateway.join(', ')),
  el('td', {}, yes(l.connected)),
  el('td', {}, (l.attached_to || []).join(', ')),
  el('td', {}, yes(d.blocked, 'blocked')),
  el('td', {}, cfg));
}

// renderDevices shows each gateway followed by the devices bound to it,
// then the devices bound to none.
function renderDevices(devices, live) {
  const rows = [];
  const placed = new Set();
  for (const gw of devices.filter((d) => d.isGateway)) {
    rows.push(deviceRow(gw, live, false));
    for (const d of devices.filter((x) => !x.isGateway && x.gateway.includes(gw.id))) {
      rows.push(deviceRow(d, live, true));
      placed.add(d.id);
    }
  }
  for (const d of devices.filter((x) => !x.isGateway && !placed.has(x.id))) rows.push(deviceRow(d, live, false));
  document.querySelector('#devices tbody').replaceChildren(...rows);
}

function renderSide(attachments, errors) {
  document.getElementById('attachments').replaceChildren(...attachments.map((a) => el('li', {},
    el('b', {}, a.registry + '/' + a.gateway), a.devices.length ? 'attached: ' + a.devices.join(', ') : 'nothing attached')));
  document.getElementById('errors').replaceChildren(...errors.slice().reverse().map((e) => el('li', {},
    el('b', {}, e.error.error_type + ' ' + (e.error.device_id || '')),
    `${time(e.time)} ${e.registry}/${e.gateway}: ${e.error.description}` + (e.delivered ? '' : ' (not delivered)'))));
}

// --- the selected device ----------------------------------------------------

async function selectDevice(id) {
  state.device = id;
  state.tail = [];
  document.getElementById('device').hidden = !id;
  document.getElementById('device-name').textContent = id;
  for (const o of document.querySelectorAll('#device output, #device textarea, #device input')) {
    if ('value' in o && o.tagName !== 'OUTPUT') o.value = '';
    else o.textContent = '';
  }
  if (id) {
    const stats = await api('GET', '/v1/stats');
    state.since = Math.max(0, stats.messages_accepted - TAIL_BACKLOG);
  }
}

// pollTelemetry reads the messages that arrived since the last poll (at most
// PAGES_PER_POLL pages) and keeps the selected device's last TAIL_MAX.
async function pollTelemetry() {
  const device = state.device;
  for (let i = 0; i < PAGES_PER_POLL; i++) {
    const page = await api('GET', `/v1/telemetry?since=${state.since}&limit=1000`);
    if (device !== state.device) return;
    for (const m of page.messages) {
      if (m.registry === state.registry && m.device === device) state.tail.push(m);
    }
    state.since = page.next;
    if (!page.more) break;
  }
  state.tail.splice(0, Math.max(0, state.tail.length - TAIL_MAX));
  document.querySelector('#tail tbody').replaceChildren(...state.tail.slice().reverse().map((m) => el('tr', {},
    el('td', {}, m.index), el('td', {}, time(m.time)), el('td', {}, m.kind), el('td', {}, m.subfolder || ''),
    el('td', {}, m.size), el('td', { class: 'payload' }, m.payload))));
}

async function pollConfigs() {
  const data = await api('GET', inDevice('/configVersions'));
  document.querySelector('#configs tbody').replaceChildren(...data.deviceConfigs.map((c) => el('tr', {},
    el('td', {}, c.version), el('td', {}, time(c.cloudUpdateTime)), el('td', {}, time(c.deviceAckTime)),
    el('td', { class: 'payload' }, fromBase64(c.binaryData)))));
}

function toBase64(text) {
  let bin = '';
  for (const b of new TextEncoder().encode(text)) bin += String.fromCharCode(b);
  return btoa(bin);
}

function fromBase64(b64) {
  const bin = atob(b64);
  return new TextDecoder().decode(Uint8Array.from(bin, (c) => c.charCodeAt(0)));
}

// send posts a form's payload and shows the answer in its output.
async function send(ev, out, path, body, done) {
  ev.preventDefault();
  const o = document.getElementById(out);
  o.className = '';
  o.textContent = 'sending…';
  try {
    o.textContent = done(await api('POST', inDevice(path), body));
    poll();
  } catch (err) {
    o.className = 'error';
    o.textContent = err.message;
  }
}

// --- the loop -------------------------------------------------------------

async function poll() {
  clearTimeout(state.timer);
  try {
    const regs = (await api('GET', kore(`/registries?pageSize=${DEVICES_PAGE}`))).deviceRegistries;
    renderRegistries(regs);
    const [list, live, attachments, errors] = await Promise.all([
      state.registry ? api('GET', inRegistry(`/devices?pageSize=${DEVICES_PAGE}`)) : { devices: [], totalCount: 0 },
      api('GET', '/v1/devices'),
      api('GET', '/v1/attachments'),
      api('GET', '/v1/errors?limit=50'),
    ]);
    const byKey = Object.fromEntries(live.map((d) => [d.registry + '/' + d.id, d]));
    renderDevices(list.devices, byKey);
    const more = document.getElementById('devices-more');
    more.hidden = list.totalCount <= list.devices.length;
    more.textContent = `showing ${list.devices.length} of ${list.totalCount} devices`;
    renderSide(attachments, errors);
    if (state.device && list.devices.some((d) => d.id === state.device)) {
      await Promise.all([pollTelemetry(), pollConfigs()]);
    } else if (state.device) {
      await selectDevice('');
    }
    setStatus('updated ' + new Date().toLocaleTimeString());
  } catch (err) {
    if (err instanceof AuthError) return;
    setStatus(err.message, true);
  }
  state.timer = setTimeout(poll, POLL_MS);
}

async function start() {
  document.getElementById('login').hidden = true;
  try {
    state.sub = (await api('GET', '/v1/info')).subscription;
  } catch (err) {
    if (!(err instanceof AuthError)) setStatus(err.message, true);
    return;
  }
  document.getElementById('sub').textContent = 'subscription ' + state.sub;
  document.getElementById('app').hidden = false;
  poll();
}

document.getElementById('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, document.getElementById('token').value);
  start();
});
document.getElementById('config-form').addEventListener('submit', (ev) => send(ev, 'config-result',
  '/updateConfigurationToDevice', { binaryData: toBase64(document.getElementById('config-payload').value) },
  (c) => `version ${c.version} stored and sent to the live subscribers`));
document.getElementById('command-form').addEventListener('submit', (ev) => send(ev, 'command-result',
  '/sendCommandToDevice', {
    binaryData: toBase64(document.getElementById('command-payload').value),
    subfolder: document.getElementById('command-subfolder').value,
  }, () => 'delivered'));
start();
