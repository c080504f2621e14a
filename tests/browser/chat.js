// Drives examples/chat in headless Chromium, as three people would: ann
// and bob join room A, cy room B (through a /?room=B link). Each sees the
// joins and lines of their own room and nothing of the other: the logs
// are compared whole after a line that comes later on the same socket.
// Binary data makes the round trip byte-exact, a refused name and a
// refused room are reported, closing bob's tab shows ann (not cy) a leave
// notice, and cy leaves B for A with the Leave button.
//
//   node tests/browser/chat.js http://127.0.0.1:PORT/
//
// Prints "ok: ..." per check and "PASS" at the end; on failure "FAIL: ..."
// on stderr and exit status 1 (2 on the overall deadline). Chromium is
// /usr/bin/chromium (or $ENJENT_CHROMIUM) with a fresh profile: the empty
// directory $ENJENT_BROWSER_PROFILE if set, else a new temporary one.
// Run by tests/browser.rs; install with `(cd tests/browser && npm ci)`.

'use strict';

const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const { chromium } = require('playwright-core');

const DEADLINE_MS = 60_000; // the whole run
const STEP_MS = 10_000; // any one wait
// Chromium's start, apart: on CI's loaded cores (tests and the nice'd
// background at once) it once took more than 10 s, before any WebSocket.
const LAUNCH_MS = 30_000;
const ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
];

const url = process.argv[2];
if (!url || !/^http:\/\/[^/]+\/$/.test(url)) {
  console.error('usage: node chat.js http://HOST:PORT/');
  process.exit(64);
}

let context = null;
let ownProfile = null;

function ok(what) {
  console.log(`ok: ${what}`);
}

// Close the browser (Playwright kills it if it will not close) and remove
// a profile we made. Safe to call twice.
async function cleanup() {
  const c = context;
  context = null;
  if (c) await c.close().catch(() => {});
  if (ownProfile) fs.rmSync(ownProfile, { recursive: true, force: true });
  ownProfile = null;
}

// End the run once: a failure's cleanup makes pending steps fail too,
// and those later errors are only echoes of the first.
let finishing = false;
async function finish(code, message) {
  if (finishing) return;
  finishing = true;
  clearTimeout(watchdog);
  if (message) console.error(message);
  // Should closing hang, exit anyway: Playwright kills the browser's
  // process group on exit.
  setTimeout(() => process.exit(code), 5_000);
  await cleanup();
  process.exit(code);
}

const watchdog = setTimeout(
  () => finish(2, `FAIL: not done within ${DEADLINE_MS} ms`),
  DEADLINE_MS,
);

// The lines a page's chat log shows.
function logLines(page) {
  return page.$$eval('#log li', (lis) => lis.map((li) => li.textContent));
}

// Wait until `page` shows `line` as a whole log entry.
async function shows(page, who, line) {
  try {
    await page.waitForFunction(
      (want) => [...document.querySelectorAll('#log li')].some((li) => li.textContent === want),
      line,
      { timeout: STEP_MS },
    );
  } catch (e) {
    const lines = await logLines(page).catch(() => '(page gone)');
    throw new Error(`${who}'s page never showed ${JSON.stringify(line)}; it shows ${JSON.stringify(lines)}`);
  }
  ok(`${who} sees ${JSON.stringify(line)}`);
}

// A new tab that loads the chat and joins as `name`: in `room` if given,
// else in the room the page fills in (`path` may carry ?room=ROOM).
async function join(name, room, path = '') {
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`page error (${name}): ${e.message}`));
  await page.goto(url + path);
  await page.fill('#name', name);
  if (room !== undefined) await page.fill('#room', room);
  await page.click('#join button');
  return page;
}

// The page has joined `room`: it shows the room, not the join form.
async function inRoom(page, who, room) {
  await page.waitForSelector('#where', { state: 'visible' });
  const shown = await page.textContent('#room-name');
  if (shown !== room) throw new Error(`${who}'s page says room ${JSON.stringify(shown)}, not ${room}`);
  if (await page.isVisible('#join')) throw new Error(`${who}'s page still shows the join form`);
  ok(`${who}'s page shows room ${room}`);
}

// `page`'s whole log is `want`, in order.
async function logIs(page, who, want) {
  const lines = await logLines(page);
  if (JSON.stringify(lines) !== JSON.stringify(want)) {
    throw new Error(`${who}'s log is ${JSON.stringify(lines)}, expected ${JSON.stringify(want)}`);
  }
  ok(`${who}'s log holds only its room: ${want.length} lines`);
}

async function say(page, text) {
  await page.waitForSelector('#say', { state: 'visible' });
  await page.fill('#text', text);
  await page.click('#say button');
}

// Bytes 0..=255, then 1000 more that no shift keeps equal.
function expectedBytes() {
  const out = [];
  for (let i = 0; i < 256; i++) out.push(i);
  for (let i = 0; i < 1000; i++) out.push((i * 131 + 7) & 0xff);
  return out;
}

async function main() {
  let profile = process.env.ENJENT_BROWSER_PROFILE;
  if (!profile) profile = ownProfile = fs.mkdtempSync(path.join(os.tmpdir(), 'enjent-chromium-'));
  if (fs.readdirSync(profile).length !== 0) throw new Error(`profile ${profile} is not empty`);
  context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.ENJENT_CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ARGS,
    timeout: LAUNCH_MS,
  });
  context.setDefaultTimeout(STEP_MS);
  ok('Chromium started');

  const ann = await join('ann', 'A');
  await shows(ann, 'ann', '* ann joined');
  await inRoom(ann, 'ann', 'A');
  const bob = await join('bob', 'A');
  await shows(bob, 'bob', '* bob joined');
  await shows(ann, 'ann', '* bob joined');
  // cy follows a link to room B: the page fills in the room.
  const cy = await join('cy', undefined, '?room=B');
  await shows(cy, 'cy', '* cy joined');
  await inRoom(cy, 'cy', 'B');

  // Markup in a message must show as text (the page uses textContent).
  const hello = 'hello <b>bob</b> & <script>x</script>';
  await say(ann, hello);
  await shows(bob, 'bob', `ann: ${hello}`);
  await shows(ann, 'ann', `ann: ${hello}`);
  await say(bob, 'hi ann');
  await shows(ann, 'ann', 'bob: hi ann');
  await shows(bob, 'bob', 'bob: hi ann');
  const tags = await bob.$$eval('#log b, #log script', (els) => els.length);
  if (tags !== 0) throw new Error(`a message became markup: ${tags} element(s) in bob's log`);
  ok('markup in messages stays text');

  // Rooms: A's lines were all delivered (their senders saw them) before
  // cy spoke, so had any been sent to cy, it would come before cy's own
  // line; the same for cy's join and line against ann's last line.
  await say(cy, 'anyone in B?');
  await shows(cy, 'cy', 'cy: anyone in B?');
  await say(ann, 'only A');
  await shows(ann, 'ann', 'ann: only A');
  await shows(bob, 'bob', 'ann: only A');
  await logIs(cy, 'cy', ['* cy joined', 'cy: anyone in B?']);
  const inA = ['* bob joined', `ann: ${hello}`, 'bob: hi ann', 'ann: only A'];
  await logIs(ann, 'ann', ['* ann joined', ...inA]);
  await logIs(bob, 'bob', inA);

  // Binary: the example echoes it to the sender only. A socket of the
  // page's own origin, opened in the page, with no room: in the lobby.
  const sent = expectedBytes();
  const { back, extensions } = await ann.evaluate(async (bytes) => {
    const ws = new WebSocket(`ws://${location.host}/chat?name=bytes`);
    ws.binaryType = 'arraybuffer';
    try {
      return await new Promise((resolve, reject) => {
        setTimeout(() => reject(new Error('no binary echo within 5 s')), 5_000);
        ws.onopen = () => ws.send(new Uint8Array(bytes).buffer);
        ws.onmessage = (e) => {
          if (e.data instanceof ArrayBuffer) {
            resolve({ back: [...new Uint8Array(e.data)], extensions: ws.extensions });
          }
        };
        ws.onclose = (e) => reject(new Error(`socket closed (${e.code}) before the echo`));
      });
    } finally {
      ws.close();
    }
  }, sent);
  if (back.length !== sent.length || back.some((b, i) => b !== sent[i])) {
    const at = back.findIndex((b, i) => b !== sent[i]);
    throw new Error(`binary echo differs: sent ${sent.length} bytes, got ${back.length}, first difference at ${at}`);
  }
  ok(`binary echo of ${sent.length} bytes is byte-exact`);
  // The Rust side checks this against the features the example was built
  // with: Chromium offers permessage-deflate on every socket.
  console.log(`extensions: ${extensions}`);

  // A name, then a room, the server refuses (403): the page says so.
  for (const [name, room] of [['no*stars', 'A'], ['dee', 'a/b']]) {
    const refused = await join(name, room);
    await refused.waitForFunction(
      () => document.getElementById('status').textContent.startsWith('Could not join'),
      null,
      { timeout: STEP_MS },
    );
    ok(`name ${JSON.stringify(name)} in room ${JSON.stringify(room)} is refused and reported`);
    await refused.close();
  }

  // bob's tab closes: ann sees him leave, cy (in B) does not.
  await bob.close();
  await shows(ann, 'ann', '* bob left');
  await say(cy, 'still here');
  await shows(cy, 'cy', 'cy: still here');
  await logIs(cy, 'cy', ['* cy joined', 'cy: anyone in B?', 'cy: still here']);

  // cy leaves B with the button and joins A: a fresh log, and ann sees her.
  await cy.click('#leave');
  await cy.waitForSelector('#join', { state: 'visible' });
  await cy.waitForFunction(
    () => document.getElementById('status').textContent === 'Left room B.',
    null,
    { timeout: STEP_MS },
  );
  ok('cy left room B');
  await cy.fill('#room', 'A');
  await cy.click('#join button');
  // (The old log still shows "* cy joined" until the new socket opens.)
  await inRoom(cy, 'cy', 'A');
  await shows(cy, 'cy', '* cy joined');
  await shows(ann, 'ann', '* cy joined');
  await say(ann, 'welcome cy');
  await shows(ann, 'ann', 'ann: welcome cy');
  await shows(cy, 'cy', 'ann: welcome cy');
  await logIs(cy, 'cy', ['* cy joined', 'ann: welcome cy']);
  // Nothing of B, nor of the binary socket in the default room, reached A.
  await logIs(ann, 'ann', ['* ann joined', ...inA, '* bob left', '* cy joined', 'ann: welcome cy']);

  console.log('PASS');
  await finish(0);
}

main().catch((e) => finish(1, `FAIL: ${e && e.stack ? e.stack : e}`));
