// The JS client against a real uvicorn server with the real engine (started by
// tests/test_js_client.py, which passes CIPHERBERT_URL and CIPHERBERT_API_KEY): logits equal the
// Python SDK's, the key upload carries no secret key, and the errors a user meets read clearly.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Client, CipherbertError, memoryKeyStore } from '../src/index.js';
import { toTenseal } from '../src/sealwire.js';
import { pyside } from './helpers.js';

const URL = process.env.CIPHERBERT_URL;
const KEY = process.env.CIPHERBERT_API_KEY ?? '';
const skip = !URL && 'CIPHERBERT_URL is not set (tests/test_js_client.py starts a server and sets it)';
const TEXTS = [
  'a gripping, beautifully acted film',
  'the plot wanders for an hour before anything happens, and then the ending arrives far too quickly to make sense of the first two acts, which is a shame',
];

/** @param {Uint8Array} hay @param {Uint8Array} needle */
function contains(hay, needle) {
  outer: for (let i = 0; i + needle.length <= hay.length; i++) {
    for (let j = 0; j < needle.length; j++) if (hay[i + j] !== needle[j]) continue outer;
    return true;
  }
  return false;
}

test('classify equals the Python SDK (max |logit diff| <= 2e-3), two FM chunks, no secret key uploaded', { skip }, async () => {
  const stages = new Set();
  const client = new Client(/** @type {string} */ (URL), KEY, { progress: (p) => stages.add(p.stage) });
  const keyId = await client.registerKeys();
  assert.match(keyId, /^k_/);
  const session = await client.session();
  const upload = session.keys.publicKeyUpload();
  // The secret key's coefficient data (a 4 KiB window from its middle) in either serialization.
  for (const sk of [session.keys.secretKeyBytes(), toTenseal(session.keys.secretKeyBytes(), 'secret_key')]) {
    assert.equal(contains(upload, sk.subarray(sk.length >> 1, (sk.length >> 1) + 4096)), false);
  }
  const mine = [];
  for (const t of TEXTS) mine.push(await client.classify(t));
  assert.ok(mine[1].nTokens > 32, 'the second text spans two feature-major chunks');
  const theirs = JSON.parse(pyside('sdk', /** @type {string} */ (URL), KEY, ...TEXTS));
  mine.forEach((r, i) => {
    const diff = Math.max(...r.logits.map((x, c) => Math.abs(x - theirs[i][c])));
    console.log(`n=${r.nTokens}: max |JS - Python SDK| = ${diff.toExponential(2)}, ${r.latency.toFixed(2)} s, up ${r.bytes.up} down ${r.bytes.down}`);
    assert.ok(diff <= 2e-3, `${r.logits} vs ${theirs[i]}`);
    assert.equal(r.probabilities.length, 2);
    assert.ok(Math.abs(r.probabilities.reduce((a, b) => a + b, 0) - 1) < 1e-9);
    assert.equal(r.rounds, session.bundle.rounds);
  });
  for (const s of ['bundle', 'keygen', 'upload', 'encrypt', 'round', 'decrypt']) assert.ok(stages.has(s), `no ${s} progress`);
  // An expired or deleted key: the client registers again and still classifies.
  await client.deleteKey(keyId);
  const again = await client.classify(TEXTS[0]);
  assert.ok(Math.abs(again.logits[0] - mine[0].logits[0]) < 2e-3);
  assert.notEqual(await client.registerKeys(), keyId);
});

test('a wrong API key and a server that is down give clear errors', { skip }, async () => {
  await assert.rejects(new Client(/** @type {string} */ (URL), 'not-the-key').classify('fine'), (exc) => {
    assert.ok(exc instanceof CipherbertError);
    assert.equal(exc.status, 401);
    assert.match(exc.message, /API key/);
    return true;
  });
  await assert.rejects(new Client('http://127.0.0.1:9', KEY).classify('fine'), (exc) => {
    assert.equal(/** @type {CipherbertError} */ (exc).code, 'unreachable');
    assert.match(/** @type {Error} */ (exc).message, /cannot reach the cipherbert server/);
    return true;
  });
});

test('a changed bundle is refused (pinning), and a wrong protocol version in the bundle too', { skip }, async () => {
  const store = memoryKeyStore();
  const client = new Client(/** @type {string} */ (URL), KEY, { keyStore: store });
  await client.bundle();
  await store.put(`pin:${client.url}|${await client.modelId()}`, '{"model_hash":"something else"}');
  await assert.rejects(client.bundle(), /changed since it was pinned/);
  await client.forgetBundle();
  await client.bundle();
});
