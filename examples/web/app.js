// The demo page of the projects service: plain DOM over the public REST API
// (described at /openapi.json) and its Server-Sent Events feeds. No
// framework, no build step. Every user value reaches the page as text
// (textContent), never as markup.
'use strict';

const $ = (id) => document.getElementById(id);
const enc = encodeURIComponent;

/** Makes an element: attributes (`on…` are listeners; null/false are left out), then children. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  el.append(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

/** The status line (an aria-live region). */
function say(text, error = false) {
  const status = $('status');
  status.textContent = text;
  status.classList.toggle('error', error);
}

function fail(err, what) {
  say(`${what}: ${err.message}`, true);
}

/** For reads that a later one of the same kind may overtake: `turn()`
 * before the request gives `fresh`, true while no later turn was taken. */
function turns() {
  let last = 0;
  return () => {
    const mine = ++last;
    return () => mine === last;
  };
}

// ---------------------------------------------------------------- HTTP

/** The latest `KES-Position` of our own writes, per log (`project`, `task`):
 * sent back on reads so that they show those writes (read-your-writes). */
const positions = {};

class Problem extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `the service answered ${status}`);
    this.status = status;
    this.problem = problem;
  }
}

const newKey = () =>
  globalThis.crypto?.randomUUID?.() ?? `${Date.now().toString(36)}-${Math.random().toString(36).slice(2)}`;

/** One request. `version` becomes `If-Match`, `key` `Idempotency-Key`,
 * `log` says which position token a read sends. */
async function call(method, path, { body, version, key, log } = {}) {
  const headers = { Accept: 'application/json' };
  const me = $('principal').value.trim();
  if (me && !/^[\x20-\x7e]+$/.test(me)) {
    throw new Problem(0, { detail: 'your name must be plain ASCII (an HTTP header carries it)' });
  }
  // A JWT (three dot-separated parts) signs in where the service requires
  // tokens; anything else is a name, trusted only where it does not.
  if (/^[\w-]+\.[\w-]+\.[\w-]*$/.test(me)) headers.Authorization = `Bearer ${me}`;
  else if (me) headers['X-Principal'] = me;
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  if (version) headers['If-Match'] = `"${version}"`;
  if (key) headers['Idempotency-Key'] = key;
  if (log && positions[log]) headers['KES-Position'] = positions[log];
  let res;
  try {
    res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  } catch {
    throw new Problem(0, { detail: 'the service cannot be reached' });
  }
  const token = res.headers.get('KES-Position');
  if (token) positions[token.split('@')[0]] = token;
  const text = res.status === 204 ? '' : await res.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!res.ok) throw new Problem(res.status, data);
  const etag = res.headers.get('ETag');
  return { data, version: etag ? Number(etag.replace(/\D/g, '')) : null, location: res.headers.get('Location') };
}

/** The editable fields of a project form, as the API takes them. */
function readFields(form) {
  const v = (name) => form.elements[name].value.trim();
  const body = {
    description: form.elements.description.value,
    owner: v('owner'),
    tags: v('tags').split(',').map((t) => t.trim()).filter(Boolean),
  };
  if (v('name')) body.name = v('name');
  if (v('budget') !== '') body.budget = Number(v('budget'));
  if (v('currency')) body.currency = v('currency').toUpperCase();
  if (v('due')) body.due = v('due');
  return body;
}

// ---------------------------------------------------------------- the list

const list = { after: null, back: [], next: null, timer: null, turn: turns() };

/** What narrows the list: its filters and search, which its feed takes too. */
function listFilters() {
  const p = new URLSearchParams();
  const status = $('filter-status').value;
  const q = $('q').value.trim();
  if (status) p.set('filter[status]', status);
  if (q) p.set('q', q);
  return p;
}

function listUrl() {
  const p = listFilters();
  const sort = $('sort').value;
  if (sort) p.set('sort', sort);
  p.set('page[size]', $('page-size').value);
  if (list.after) p.set('page[after]', list.after);
  return `/projects?${p}`;
}

async function loadList() {
  const fresh = list.turn();
  try {
    const { data } = await call('GET', listUrl(), { log: 'project' });
    if (fresh()) renderRows(data);
  } catch (err) {
    if (fresh()) fail(err, 'Could not load the projects');
  }
}

/** Re-reads the page soon, once for a burst of feed events. */
function refreshSoon() {
  if (list.timer) return;
  list.timer = setTimeout(() => {
    list.timer = null;
    loadList();
  }, 100);
}

const money = (n) => (typeof n === 'number' ? n.toLocaleString('en') : '');

function renderRows({ items, next, total }) {
  list.next = next;
  const focused = document.activeElement?.closest?.('#rows tr')?.dataset.id;
  $('rows').replaceChildren(
    ...items.map(({ id, version, row }) =>
      h('tr', { 'data-id': id, 'data-version': version, 'aria-current': current?.id === id ? 'true' : null },
        h('td', {}, h('button', { type: 'button', class: 'link', onclick: () => openProject(id, true) },
          row.name ?? '(unnamed draft)')),
        h('td', {}, row.status ?? ''),
        h('td', { class: 'num' }, money(row.budget)),
        h('td', {}, row.owner ?? ''),
        h('td', { class: 'num' }, String(row.members ?? 0)),
        h('td', {}, row.due ? row.due.slice(0, 10) : ''))),
  );
  if (focused) $('rows').querySelector(`tr[data-id="${CSS.escape(focused)}"] button`)?.focus();
  const page = list.back.length + 1;
  $('list-caption').textContent =
    total === 0 ? 'No projects match.' : `${total} project${total === 1 ? '' : 's'}, page ${page}`;
  $('prev').disabled = list.back.length === 0;
  $('next').disabled = !next;
}

function markCurrentRow() {
  for (const tr of $('rows').children) {
    if (tr.dataset.id === current?.id) tr.setAttribute('aria-current', 'true');
    else tr.removeAttribute('aria-current');
  }
}

// ---------------------------------------------------------------- live feeds

const feeds = { list: null, listKey: null, item: null };

function setLive(state, text) {
  $('live').dataset.state = state;
  $('live').textContent = `Live updates: ${text}`;
}

/** `GET /projects/changes?<filters and search>`: `change` and `remove`
 * re-read the visible page (whose sort and paging the feed does not know),
 * `reset` reloads it on a fresh feed. Without the feed (a
 * 404, an old server) the page works as before, without live updates. */
/** A feed's URL. EventSource sends no Authorization header: a JWT in the
 * name field travels as `access_token`, which the feed routes take. */
function feedUrl(path, query) {
  const params = new URLSearchParams(query);
  const me = $('principal').value.trim();
  if (/^[\w-]+\.[\w-]+\.[\w-]*$/.test(me)) params.set('access_token', me);
  const text = params.toString();
  return text ? `${path}?${text}` : path;
}

function openListFeed() {
  feeds.list?.close();
  feeds.list = null;
  if (!window.EventSource || document.hidden) return;
  const filters = listFilters().toString();
  const es = new EventSource(feedUrl('/projects/changes', filters));
  feeds.list = es;
  feeds.listKey = filters;
  setLive('reconnecting', 'connecting…');
  es.onopen = () => setLive('on', 'on');
  es.onerror = () => {
    if (feeds.list !== es) return;
    if (es.readyState === EventSource.CLOSED) {
      feeds.list = null;
      setLive('off', 'unavailable (the page works without them)');
    } else {
      setLive('reconnecting', 'reconnecting…');
    }
  };
  es.addEventListener('change', refreshSoon);
  es.addEventListener('remove', refreshSoon);
  es.addEventListener('reset', () => {
    openListFeed();
    loadList();
  });
}

/** `GET /projects/{id}/changes` of the open project. */
function openItemFeed() {
  feeds.item?.close();
  feeds.item = null;
  if (!current || !window.EventSource || document.hidden) return;
  const id = current.id;
  const es = new EventSource(feedUrl(`/projects/${enc(id)}/changes`, ''));
  feeds.item = es;
  es.addEventListener('state', (e) => {
    const d = JSON.parse(e.data);
    if (current?.id === id && d.version > current.version) {
      show(d.version, d.state);
      loadHistory();
    }
  });
  es.addEventListener('deleted', () => {
    if (current?.id !== id) return;
    closeDetail();
    say('The project you had open was deleted.');
  });
  es.addEventListener('reset', () => {
    if (current?.id !== id) return;
    openItemFeed();
    openProject(id);
  });
  es.onerror = () => {
    if (feeds.item === es && es.readyState === EventSource.CLOSED) feeds.item = null;
  };
}

// A browser opens at most six HTTP/1.1 connections per server: a hidden
// tab gives its feeds back and catches up when it is shown again.
document.addEventListener('visibilitychange', () => {
  if (document.hidden) {
    feeds.list?.close();
    feeds.item?.close();
    feeds.list = feeds.item = null;
    setLive('off', 'paused while the page is hidden');
  } else {
    openListFeed();
    loadList();
    if (current) {
      openItemFeed();
      openProject(current.id);
    }
  }
});

// ---------------------------------------------------------------- one project

/** The open project: its latest known version and state. */
let current = null;
/** The version the edit form was filled from, and whether it was edited since. */
const form = { version: 0, dirty: false };
const detailTurn = turns();

async function openProject(id, byUser = false) {
  const fresh = detailTurn();
  try {
    const { data, version } = await call('GET', `/projects/${enc(id)}`, { log: 'project' });
    if (!fresh()) return;
    const other = current?.id !== id;
    if (other) {
      current = { id, version, state: data };
      form.dirty = false;
      $('conflict').hidden = true;
      $('tasks').replaceChildren();
      $('history').replaceChildren();
    }
    if (version >= current.version) show(version, data); // a feed may have shown a newer one
    if (location.hash !== `#${id}`) history.replaceState(null, '', `#${enc(id)}`);
    if (other) openItemFeed();
    loadTasks();
    loadHistory();
    if (byUser) $('detail-title').focus();
  } catch (err) {
    if (fresh()) fail(err, 'Could not open the project');
  }
}

function closeDetail() {
  current = null;
  feeds.item?.close();
  feeds.item = null;
  $('detail-title').textContent = 'No project open';
  $('detail-empty').hidden = false;
  $('detail-body').hidden = true;
  history.replaceState(null, '', location.pathname + location.search);
  markCurrentRow();
}

/** Shows version `version` of the open project. The edit form is refilled
 * unless it holds edits; then a notice says the project moved on. */
function show(version, state) {
  current.version = version;
  current.state = state;
  const archived = state.status === 'archived';
  $('detail-title').textContent = state.name ?? '(unnamed draft)';
  $('detail-empty').hidden = true;
  $('detail-body').hidden = false;
  $('detail-status').textContent = state.status;
  $('detail-status').className = `badge ${state.status}`;
  $('detail-version').textContent = String(version);
  for (const b of document.querySelectorAll('[data-command]')) {
    const c = b.dataset.command;
    b.disabled = !(
      (c === 'activate' && state.status === 'draft') ||
      (c === 'archive' && !archived) ||
      (c === 'restore' && archived)
    );
  }
  $('edit-fields').disabled = archived;
  $('edit-fields').querySelector('legend').textContent = archived ? 'Details (archived: restore it to edit)' : 'Details';
  $('member-form').querySelector('button').disabled = archived;
  $('members').replaceChildren(
    ...(state.members.length
      ? state.members.map((m) => m === null
        // A member whose personal data was erased.
        ? h('li', {}, h('em', {}, 'erased'))
        : h('li', {}, m, ' ',
          h('button', { type: 'button', class: 'small', 'aria-label': `Remove ${m}`, disabled: archived,
            onclick: () => command('remove-member', { member: m }, `${m} removed.`) }, 'Remove')))
      : [h('li', {}, 'No members yet.')]),
  );
  if (!form.dirty) fillForm();
  $('stale').hidden = !(form.dirty && version > form.version);
  $('stale-text').textContent = `Someone changed this project while you were editing (now version ${version}).`;
  markCurrentRow();
}

function fillForm() {
  const f = $('edit-form').elements;
  const s = current.state;
  f.name.value = s.name ?? '';
  f.budget.value = String(s.budget ?? 0);
  f.currency.value = s.currency || 'EUR';
  f.owner.value = s.owner ?? '';
  f.tags.value = (s.tags ?? []).join(', ');
  f.due.value = s.due ?? '';
  f.description.value = s.description ?? '';
  form.version = current.version;
  form.dirty = false;
  $('stale').hidden = true;
  $('conflict').hidden = true;
}

async function save(event) {
  event.preventDefault();
  const body = readFields(event.target);
  // PATCH keeps what it is not given, so clearing the due date takes a PUT.
  const method = current.state.due && !body.due ? 'PUT' : 'PATCH';
  say('Saving…');
  try {
    const { data, version } = await call(method, `/projects/${enc(current.id)}`, { body, version: form.version });
    form.dirty = false;
    show(version, data);
    say('Saved.');
    refreshSoon();
    loadHistory();
  } catch (err) {
    if (err.status === 412) await conflict();
    else fail(err, 'Not saved');
  }
}

/** A 412: someone else wrote first. Shows who did what since the version
 * the form was filled from, and offers to load the current version. */
async function conflict() {
  const id = current.id;
  const since = form.version;
  try {
    const [now, events] = await Promise.all([
      call('GET', `/projects/${enc(id)}`, { log: 'project' }),
      call('GET', `/projects/${enc(id)}/events?${new URLSearchParams({ 'page[after]': since, 'page[size]': 20 })}`,
        { log: 'project' }),
    ]);
    if (current?.id !== id) return;
    show(now.version, now.data);
    $('stale').hidden = true;
    const box = $('conflict');
    const reload = h('button', { type: 'button', 'aria-describedby': 'conflict-text', onclick: () => {
      fillForm();
      $('edit-name').focus();
      say(`Loaded version ${current.version}.`);
    } }, 'Load the current version');
    box.replaceChildren(
      h('p', { id: 'conflict-text' }, h('strong', {}, 'Not saved: someone else changed this project first.'),
        ` You edited version ${since}; it is now at version ${now.version}. Since then:`),
      h('ul', {}, events.data.items.map(describeEvent)),
      ...(events.data.next ? [h('p', {}, 'And more: see the history below.')] : []),
      h('p', {}, reload, ' (your edits in the form are discarded)'),
    );
    box.hidden = false;
    say('Not saved: someone else changed the project first.', true);
    reload.focus();
  } catch (err) {
    fail(err, 'Not saved (someone else changed the project), and its current state could not be read');
  }
}

/** A named command (`activate`, `add-member`, …). It sends no `If-Match`:
 * the domain decides on the current state and refuses what no longer fits. */
async function command(name, body, done) {
  const id = current.id;
  const before = current.version;
  say('Sending…');
  try {
    const { data, version } = await call('POST', `/projects/${enc(id)}/${name}`, { body: body ?? {} });
    if (current?.id !== id) return false;
    // Edits in the form stay valid when nobody but us moved the project.
    if (form.dirty && form.version === before && version === before + 1) form.version = version;
    show(version, data);
    say(done);
    refreshSoon();
    loadHistory();
    return true;
  } catch (err) {
    fail(err, `Could not ${name.replace('-', ' ')}`);
    return false;
  }
}

// ---------------------------------------------------------------- history

const human = (type) => type.replace(/^(Project|Task)/, '').replace(/([a-z])([A-Z])/g, '$1 $2').toLowerCase();

/** One value of an event's payload as text: lists joined, a sum of money as `1,500 EUR`. */
function valueText(v) {
  if (Array.isArray(v)) return v.map(valueText).join(', ');
  if (v && typeof v === 'object') {
    if ('amount' in v && 'currency' in v) return `${money(v.amount)} ${v.currency}`;
    return Object.entries(v).map(([k, x]) => `${k} ${valueText(x)}`).join(', ');
  }
  return String(v);
}

/** The fields of an event's payload, as text (`{"Renamed":{"name":"x"}}` → `name: x`). */
function summarize(payload) {
  const inner = payload && typeof payload === 'object' ? Object.values(payload)[0] : null;
  if (!inner || typeof inner !== 'object') return '';
  return Object.entries(inner)
    .filter(([, v]) => v !== null && v !== '' && !(Array.isArray(v) && v.length === 0))
    .map(([k, v]) => `${k}: ${valueText(v)}`)
    .join('; ');
}

function describeEvent(ev) {
  const details = summarize(ev.payload);
  return h('li', {},
    h('span', { class: 'who' }, ev.metadata?.principal || 'someone without a name'), ' ',
    h('strong', {}, human(ev.type)),
    details ? [' ', h('code', {}, details)] : null, ' ',
    h('time', { datetime: ev.recorded_at }, new Date(ev.recorded_at).toLocaleString()),
    ` (version ${ev.version})`);
}

const HISTORY_PAGE = 20;
let historyOldest = 0;
const historyTurn = turns();

/** The newest changes first; `older` appends the page before the oldest shown. */
async function loadHistory(older = false) {
  if (!current) return;
  const id = current.id;
  const upTo = older ? historyOldest - 1 : current.version;
  const after = Math.max(0, upTo - HISTORY_PAGE);
  const fresh = historyTurn();
  try {
    const query = new URLSearchParams({ 'page[after]': after, 'page[size]': Math.max(1, upTo - after) });
    const { data } = await call('GET', `/projects/${enc(id)}/events?${query}`, { log: 'project' });
    if (!fresh() || current?.id !== id) return;
    const items = data.items.slice().reverse().map(describeEvent);
    if (older) $('history').append(...items);
    else $('history').replaceChildren(...items);
    historyOldest = after + 1;
    $('history-older').hidden = after === 0;
  } catch (err) {
    fail(err, 'Could not load the history');
  }
}

// ---------------------------------------------------------------- tasks

const tasksTurn = turns();

async function loadTasks() {
  if (!current) return;
  const id = current.id;
  const query = new URLSearchParams({ 'filter[project_id]': id, sort: 'title', 'page[size]': 100 });
  const fresh = tasksTurn();
  try {
    const { data } = await call('GET', `/tasks?${query}`, { log: 'task' });
    if (!fresh() || current?.id !== id) return;
    const items = data.items.map(({ id: taskId, row }) => {
      // A cancelled task (its project was archived) can be reopened too.
      const closed = row.status === 'done' || row.status === 'cancelled';
      const verb = closed ? 'reopen' : 'complete';
      return h('li', { class: closed ? row.status : null },
        h('span', { class: 'title' }, row.title), row.assignee ? ` (${row.assignee})` : '',
        row.status === 'cancelled' ? h('span', { class: 'note' }, ' (cancelled)') : '', ' ',
        h('button', { type: 'button', class: 'small', 'aria-label': `${closed ? 'Reopen' : 'Mark done'}: ${row.title}`,
          onclick: () => taskCommand(taskId, verb) }, closed ? 'Reopen' : 'Mark done'));
    });
    if (data.total > data.items.length) items.push(h('li', {}, `… and ${data.total - data.items.length} more`));
    $('tasks').replaceChildren(...(items.length ? items : [h('li', {}, 'No tasks yet.')]));
  } catch (err) {
    fail(err, 'Could not load the tasks');
  }
}

async function taskCommand(taskId, verb) {
  say('Sending…');
  try {
    await call('POST', `/tasks/${enc(taskId)}/${verb}`, { body: {} });
    say(verb === 'complete' ? 'Task done.' : 'Task reopened.');
    loadTasks();
  } catch (err) {
    fail(err, `Could not ${verb} the task`);
  }
}

// ---------------------------------------------------------------- wiring

/** An idempotency key per form: a retry of the same submission cannot
 * create twice; an edit of the form makes a new key. */
function keyed(formEl) {
  let key = null;
  formEl.addEventListener('input', () => (key = null));
  return () => (key ??= newKey());
}

function init() {
  const me = $('principal');
  me.value = sessionStorage.getItem('kes-principal') ?? '';
  me.addEventListener('change', () => sessionStorage.setItem('kes-principal', me.value.trim()));

  const filters = $('list-form');
  const applyFilters = (e) => {
    e?.preventDefault();
    list.after = null;
    list.back = [];
    if (listFilters().toString() !== feeds.listKey || !feeds.list) openListFeed();
    loadList();
  };
  filters.addEventListener('submit', applyFilters);
  for (const id of ['filter-status', 'sort', 'page-size']) $(id).addEventListener('change', applyFilters);
  $('q').addEventListener('search', applyFilters); // the clear button of a search field
  $('next').addEventListener('click', () => {
    if (!list.next) return;
    list.back.push(list.after);
    list.after = list.next;
    loadList();
  });
  $('prev').addEventListener('click', () => {
    list.after = list.back.pop() ?? null;
    loadList();
  });

  const create = $('create-form');
  const createKey = keyed(create);
  create.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = readFields(create);
    say('Creating…');
    try {
      const { location } = await call('POST', '/projects', { body, key: createKey() });
      create.reset();
      create.dispatchEvent(new Event('input')); // a new key for the next project
      say(`Created “${body.name}”.`);
      loadList();
      if (location) openProject(decodeURIComponent(location.split('/').pop()), true);
    } catch (err) {
      fail(err, 'Not created');
    }
  });

  const edit = $('edit-form');
  edit.addEventListener('input', () => {
    form.dirty = true;
  });
  edit.addEventListener('submit', save);
  $('stale-reload').addEventListener('click', () => {
    fillForm();
    say(`Loaded version ${current.version}.`);
  });
  for (const b of document.querySelectorAll('[data-command]')) {
    const name = b.dataset.command;
    b.addEventListener('click', () => command(name, {}, `Project ${name}d.`)); // activated, archived, restored
  }

  const member = $('member-form');
  member.addEventListener('submit', async (e) => {
    e.preventDefault();
    const name = member.elements.member.value.trim();
    if (await command('add-member', { member: name }, `${name} added.`)) member.reset();
  });

  const task = $('task-form');
  const taskKey = keyed(task);
  task.addEventListener('submit', async (e) => {
    e.preventDefault();
    const body = { project_id: current.id, title: task.elements.title.value.trim() };
    const assignee = task.elements.assignee.value.trim();
    if (assignee) body.assignee = assignee;
    say('Adding the task…');
    try {
      await call('POST', '/tasks', { body, key: taskKey() });
      task.reset();
      task.dispatchEvent(new Event('input'));
      say(`Task “${body.title}” added.`);
      loadTasks();
    } catch (err) {
      fail(err, 'Task not added');
    }
  });
  $('history-older').addEventListener('click', () => loadHistory(true));

  const fromHash = () => {
    let id = '';
    try {
      id = decodeURIComponent(location.hash.slice(1));
    } catch {
      return;
    }
    if (id && id !== current?.id) openProject(id);
  };
  window.addEventListener('hashchange', fromHash);

  openListFeed();
  loadList();
  fromHash();
}

init();
