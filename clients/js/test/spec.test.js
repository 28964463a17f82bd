// The JS protocol tables are docs/protocol.md's, current, and give the doc's worked frame counts.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { parseProtocolDoc } from '../src/docparse.js';
import { TABLES, describe, quantities, roundTensors } from '../src/spec.js';
import { frameCount, pack, unpack, zeros } from '../src/layout.js';
import { packFrames, unpackFrames } from '../src/cbf1.js';
import { REPO_ROOT } from './helpers.js';

const doc = fs.readFileSync(path.join(REPO_ROOT, 'docs', 'protocol.md'), 'utf8');
const DIMS = { hidden_size: 128, num_heads: 2, intermediate_size: 512, poly_modulus_degree: 8192 };

test('src/protocol_tables.js is current with docs/protocol.md (node tools/gen_tables.mjs)', () => {
  assert.deepEqual(TABLES, parseProtocolDoc(doc));
});

test("the tables give the doc's frame counts for every worked length", () => {
  const section = doc.slice(doc.indexOf('<!-- generated:frame_counts'), doc.indexOf('<!-- end generated:frame_counts'));
  const rows = section.split('\n').filter((l) => /^\| \d/.test(l)).map((l) => l.slice(1, -1).split('|').map((c) => Number(c.trim())));
  assert.ok(rows.length >= 5);
  for (const [n, np, B, C, start, scoresSent, scoresReply, contextSent, contextReply, refresh] of rows) {
    const env = quantities(n, DIMS);
    assert.deepEqual([env.n_p, env.B, env.C], [np, B, C]);
    const count = (/** @type {string} */ kind, /** @type {'server'|'client'} */ dir) => describe(kind, dir, env).reduce((s, t) => s + t.frames, 0);
    assert.deepEqual(
      [count('start', 'client'), count('scores', 'server'), count('scores', 'client'), count('context', 'server'), count('context', 'client'), count('refresh', 'server'), count('refresh', 'client')],
      [start, scoresSent, scoresReply, contextSent, contextReply, refresh, refresh], `n=${n}`);
  }
});

test('layouts round-trip, address distinct slots, and leave every other slot 0', () => {
  for (const n of [1, 5, 33, 70]) {
    const env = quantities(n, DIMS);
    for (const [layout, features] of [['FM', 128], ['FM', 512], ['SL', null], ['TM', null]]) {
      const shape = layout === 'SL' ? [env.heads, n, n] : [n, features ?? env.H];
      const t = zeros(shape);
      t.data.forEach((_, i) => { t.data[i] = i + 1; });
      const vectors = pack(/** @type {string} */ (layout), t, env, /** @type {number|null} */ (features));
      assert.equal(vectors.length, frameCount(/** @type {string} */ (layout), env, /** @type {number|null} */ (features)));
      const nonzero = vectors.reduce((s, v) => s + v.filter((x) => x !== 0).length, 0);
      assert.equal(nonzero, t.data.length, `${layout} n=${n}: every element in its own slot`);
      assert.deepEqual(unpack(/** @type {string} */ (layout), vectors, env, /** @type {number|null} */ (features)).data, t.data);
    }
  }
  assert.equal(roundTensors('scores', quantities(5, DIMS)).reply[0].tensor, 'R');
});

test('CBF1 matches the doc example byte for byte', () => {
  const bytes = packFrames([new TextEncoder().encode('ab'), new TextEncoder().encode('c')]);
  assert.equal(Buffer.from(bytes).toString('hex'), '43424631' + '02000000' + '0200000000000000' + '6162' + '0100000000000000' + '63');
  assert.deepEqual(unpackFrames(bytes).map((f) => Buffer.from(f).toString()), ['ab', 'c']);
  assert.throws(() => unpackFrames(bytes.subarray(0, bytes.length - 1)), /truncated/);
});
