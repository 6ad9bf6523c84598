// Drives the demo page of the projects service in Chromium.
//
//   KES_BASE_URL=http://127.0.0.1:8080 node demo.test.mjs
//
// Environment: KES_BASE_URL (the running service), CHROMIUM (default
// /usr/bin/chromium), KES_SCREENSHOTS (where failure screenshots go; a new
// temporary folder by default), KES_DEMO_SCREENSHOT (a file: a screenshot
// of the page with data, taken at the end), KES_REQUIRE_FEEDS=1 (the live
// check may not be skipped). Every wait is for a condition, with a timeout.

import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const base = (process.env.KES_BASE_URL ?? 'http://127.0.0.1:8080').replace(/\/$/, '');
const executablePath = process.env.CHROMIUM ?? '/usr/bin/chromium';
const demoShot = process.env.KES_DEMO_SCREENSHOT;
const requireFeeds = ['1', 'true'].includes(process.env.KES_REQUIRE_FEEDS ?? '');
/** How long a change made elsewhere may take to show (live check). */
const LIVE_MS = 1000;

// A word no other project holds, so the test runs on a store with data too.
const tag = `kes${Date.now().toString(36)}${Math.random().toString(36).slice(2, 7)}`.replace(/[0-9]/g, (d) => 'qrstuvwxyz'[d]);

/** The REST API, from Node (another client than the pages). */
async function api(method, route, body, principal = 'zoe') {
  const headers = { 'x-principal': principal };
  if (body !== undefined) headers['content-type'] = 'application/json';
  const res = await fetch(base + route, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`${method} ${route}: ${res.status} ${text}`);
  return { data: text ? JSON.parse(text) : null, etag: res.headers.get('etag') };
}

/** Whether `route` answers an event stream (not a 404 or another error). */
async function feedAnswers(route) {
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 5000);
  try {
    const res = await fetch(base + route, { headers: { accept: 'text/event-stream' }, signal: abort.signal });
    return res.ok && (res.headers.get('content-type') ?? '').startsWith('text/event-stream');
  } catch {
    return false;
  } finally {
    clearTimeout(timer);
    abort.abort();
  }
}

const see = (page, selector, text, timeout) => page.locator(selector, { hasText: text }).first().waitFor({ timeout });
const seeValue = (page, selector, value) =>
  page.waitForFunction(([s, v]) => document.querySelector(s)?.value === v, [selector, value]);
/** Waits until the list shows exactly these names, in this order. */
const seeRows = (page, names) =>
  page.waitForFunction(
    (want) => JSON.stringify([...document.querySelectorAll('#rows tr td:first-child')].map((td) => td.textContent)) === want,
    JSON.stringify(names),
  );
/** A user works in one tab at a time: the one in front (a background tab's
 * animation frames, which clicks wait for, are throttled). */
let front = null;
async function use(page) {
  if (front !== page) await page.bringToFront();
  front = page;
  return page;
}

const pages = [];
const pageErrors = [];
const steps = [];

async function step(name, body) {
  const started = Date.now();
  await body();
  steps.push(name);
  console.log(`ok ${steps.length} - ${name} (${Date.now() - started} ms)`);
}

async function openPage(context, principal, hash = '') {
  const page = await context.newPage();
  page.setDefaultTimeout(10_000);
  page.on('pageerror', (e) => pageErrors.push(`${principal}: ${e.message}`));
  pages.push({ page, principal });
  await use(page);
  const res = await page.goto(`${base}/${hash}`);
  assert.equal(res.status(), 200, 'GET / answers the page');
  assert.equal(await page.title(), 'KES projects', 'the demo page is served at /');
  await page.fill('#principal', principal);
  await page.waitForFunction(() => document.querySelector('#list-caption').textContent !== 'Loading…');
  return page;
}

async function main() {
  const browser = await chromium.launch({ executablePath });
  let failed = null;
  try {
    const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, locale: 'en-GB' });
    const ann = await openPage(context, 'ann');
    let id;

    await step('create a project', async () => {
      await ann.click('#create-box summary');
      await ann.fill('#new-name', `Apollo ${tag}`);
      await ann.fill('#new-budget', '500');
      await ann.fill('#new-owner', 'ann');
      await ann.fill('#new-tags', `space, ${tag}`);
      await ann.fill('#new-due', '2027-03-01');
      await ann.fill('#new-description', 'To the moon and back.');
      await ann.click('#create-form button[type=submit]');
      await see(ann, '#status', `Created “Apollo ${tag}”.`);
      await see(ann, '#detail-title', `Apollo ${tag}`);
      await see(ann, '#history', 'created');
      id = decodeURIComponent(new URL(ann.url()).hash.slice(1));
      assert.match(id, /^[0-9a-f-]{36}$/, 'the open project is in the address');
    });

    await step('rename it', async () => {
      await ann.fill('#edit-name', `Apollo II ${tag}`);
      await ann.click('#edit-form button[type=submit]');
      await see(ann, '#status', 'Saved.');
      await see(ann, '#detail-title', `Apollo II ${tag}`);
      await see(ann, '#detail-version', '2');
      await see(ann, '#history li', 'renamed');
    });

    await step('add members', async () => {
      await ann.fill('#new-member', 'bob');
      await ann.click('#member-form button[type=submit]');
      await see(ann, '#status', 'bob added.');
      await ann.fill('#new-member', 'carol');
      await ann.click('#member-form button[type=submit]');
      await see(ann, '#status', 'carol added.');
      await see(ann, '#members li', 'carol');
      await see(ann, '#history li', 'member added');
      await ann.fill('#new-member', 'carol');
      await ann.click('#member-form button[type=submit]');
      await see(ann, '#status', 'already a member');
    });

    const bob = await openPage(context, 'bob', `#${id}`);
    await step('see the 412 when another tab changed it first', async () => {
      await see(bob, '#detail-title', `Apollo II ${tag}`);
      await use(ann);
      await ann.fill('#edit-description', 'Ann was here.'); // unsaved edits, on version 2
      await use(bob);
      await bob.fill('#edit-name', `Artemis ${tag}`);
      await bob.click('#edit-form button[type=submit]');
      await see(bob, '#status', 'Saved.');
      await use(ann);
      await ann.click('#edit-form button[type=submit]');
      const conflict = ann.locator('#conflict');
      await conflict.waitFor({ state: 'visible' });
      await see(ann, '#conflict', 'someone else changed this project first');
      await see(ann, '#conflict li', 'bob');
      await see(ann, '#conflict li', 'renamed');
      await see(ann, '#conflict li', `Artemis ${tag}`);
      assert.doesNotMatch(await conflict.innerText(), /\b(null|undefined|NaN)\b|\[object /);
      await see(ann, '#status', 'Not saved');
      await ann.click('#conflict button');
      await seeValue(ann, '#edit-name', `Artemis ${tag}`);
      await seeValue(ann, '#edit-description', 'To the moon and back.');
      await conflict.waitFor({ state: 'hidden' });
    });

    await step('see why a member may not archive the project', async () => {
      await use(bob);
      await bob.click('[data-command=archive]');
      await see(bob, '#status', 'only the project\'s owner or an admin may do this');
      await see(bob, '#detail-status', 'draft');
      await use(ann);
    });

    await step('activate it, add a task and complete it', async () => {
      await ann.click('[data-command=activate]');
      await see(ann, '#detail-status', 'active');
      await ann.fill('#new-task', 'Write the plan');
      await ann.fill('#new-assignee', 'carol');
      await ann.click('#task-form button[type=submit]');
      await see(ann, '#tasks li', 'Write the plan (carol)');
      await ann.click('#tasks button[aria-label="Mark done: Write the plan"]');
      await ann.locator('#tasks li.done', { hasText: 'Write the plan' }).waitFor();
    });

    await step('search, filter, sort and page the list', async () => {
      // Five more projects with the tag, one without it (made by another client).
      for (const [name, budget] of [['Gemini', 50], ['Mercury', 900], ['Skylab', 300], ['Vostok', 10], ['Soyuz', 70]]) {
        await api('POST', '/projects', { name: `${name} ${tag}`, budget, tags: [tag] });
      }
      await api('POST', '/projects', { name: `Zephyr unrelated`, budget: 1 });
      await ann.fill('#q', tag);
      await ann.selectOption('#sort', '-budget,name');
      await ann.selectOption('#page-size', '5');
      await see(ann, '#list-caption', '6 projects, page 1');
      await seeRows(ann, [`Mercury ${tag}`, `Artemis ${tag}`, `Skylab ${tag}`, `Soyuz ${tag}`, `Gemini ${tag}`]);
      await ann.click('#next');
      await see(ann, '#list-caption', '6 projects, page 2');
      await seeRows(ann, [`Vostok ${tag}`]);
      await ann.click('#prev');
      await see(ann, '#list-caption', '6 projects, page 1');
      await ann.selectOption('#filter-status', 'active');
      await see(ann, '#list-caption', '1 project, page 1');
      await seeRows(ann, [`Artemis ${tag}`]);
      assert.equal(await ann.getAttribute('#rows tr', 'aria-current'), 'true', 'the open project is marked');
      await ann.selectOption('#filter-status', 'archived');
      await see(ann, '#list-caption', 'No projects match.');
      await ann.selectOption('#filter-status', '');
      await ann.selectOption('#sort', 'name');
      await see(ann, '#rows tr:first-child td:first-child', `Artemis ${tag}`);
    });

    await step('keyboard: open a project from the list without a mouse', async () => {
      await ann.locator('#rows button', { hasText: `Gemini ${tag}` }).focus();
      await ann.keyboard.press('Enter');
      await see(ann, '#detail-title', `Gemini ${tag}`);
      assert.equal(await ann.evaluate(() => document.activeElement.id), 'detail-title', 'focus moves to the project');
      await ann.locator('#rows button', { hasText: `Artemis ${tag}` }).click();
      await see(ann, '#detail-title', `Artemis ${tag}`);
    });

    await step('every field has a label, every control is a button or a field, no stray null', async () => {
      const unlabelled = await ann.evaluate(() =>
        [...document.querySelectorAll('input, select, textarea')]
          .filter((e) => e.labels.length === 0 && !e.getAttribute('aria-label'))
          .map((e) => e.id || e.name || e.outerHTML));
      assert.deepEqual(unlabelled, []);
      const clickable = await ann.evaluate(() =>
        [...document.querySelectorAll('[onclick], a:not([href]), [tabindex]:not([tabindex="-1"])')].map((e) => e.outerHTML));
      assert.deepEqual(clickable, []);
      assert.doesNotMatch(await ann.locator('body').innerText(), /\b(null|undefined|NaN)\b|\[object /);
    });

    const feeds = (await feedAnswers('/projects/changes')) && (await feedAnswers(`/projects/${id}/changes`));
    if (!feeds) {
      if (requireFeeds) throw new Error('the live feeds do not answer (KES_REQUIRE_FEEDS is set)');
      console.log('feeds absent: live check skipped');
      await see(ann, '#live', 'unavailable');
    } else {
      await step(`see a change made through the API in another page within ${LIVE_MS} ms`, async () => {
        await use(bob);
        await bob.fill('#q', tag);
        await bob.press('#q', 'Enter');
        await seeRows(bob, ['Artemis', 'Gemini', 'Mercury', 'Skylab', 'Soyuz', 'Vostok'].map((n) => `${n} ${tag}`));
        await bob.locator('#live[data-state=on]').waitFor();
        await see(bob, '#detail-title', `Artemis ${tag}`);
        const { etag } = await api('PATCH', `/projects/${id}`, { name: `Artemis live ${tag}`, budget: 4242 }, 'ann');
        const written = Date.now();
        await see(bob, '#rows td', `Artemis live ${tag}`, LIVE_MS);
        const inList = Date.now() - written;
        await see(bob, '#detail-title', `Artemis live ${tag}`, Math.max(1, LIVE_MS - (Date.now() - written)));
        console.log(`  the change showed in the list after ${inList} ms, in the open project after ${Date.now() - written} ms`);
        await see(bob, '#detail-version', etag.replaceAll('"', ''));
        await seeValue(bob, '#edit-budget', '4242');
        // A project made elsewhere joins the visible page; one archived leaves a filtered one.
        await api('POST', '/projects', { name: `Aardvark ${tag}`, tags: [tag] });
        await see(bob, '#rows td', `Aardvark ${tag}`, LIVE_MS);
        await bob.selectOption('#filter-status', 'active');
        await see(bob, '#list-caption', '1 project');
        await bob.locator('#live[data-state=on]').waitFor();
        await api('POST', `/projects/${id}/archive`, {}, 'ann');
        await see(bob, '#list-caption', 'No projects match.', LIVE_MS);
        await see(bob, '#detail-status', 'archived', LIVE_MS);
        await api('POST', `/projects/${id}/restore`, {}, 'ann');
        await see(bob, '#detail-status', 'active', LIVE_MS);
      });
    }

    assert.deepEqual(pageErrors, [], 'no script errors in the pages');

    if (demoShot) {
      await use(ann);
      await ann.selectOption('#filter-status', '');
      await ann.locator('#rows button', { hasText: 'Artemis' }).click();
      await see(ann, '#history li', 'member added');
      await ann.screenshot({ path: demoShot, fullPage: true });
      console.log(`demo screenshot: ${demoShot}`);
    }
  } catch (err) {
    failed = err;
  }
  if (failed) {
    const dir = process.env.KES_SCREENSHOTS || fs.mkdtempSync(path.join(os.tmpdir(), 'kes-browser-'));
    fs.mkdirSync(dir, { recursive: true });
    for (const { page, principal } of pages) {
      const file = path.join(dir, `${principal}.png`);
      await page.screenshot({ path: file, fullPage: true }).catch(() => {});
    }
    console.error(`not ok ${steps.length + 1} - ${failed.stack ?? failed}`);
    if (pageErrors.length) console.error(`script errors in the pages:\n  ${pageErrors.join('\n  ')}`);
    console.error(`screenshots of the pages: ${dir}`);
  }
  await browser.close();
  if (failed) process.exit(1);
  console.log(`all ${steps.length} steps passed`);
}

main().catch((err) => {
  console.error(err);
  process.exit(1);
});
