// node-seal (SEAL 4.1.2) <-> TenSEAL (SEAL 4.3 + zstd) through src/sealwire.js, both ways, with the
// bundle's parameters and all 16 Galois steps: keys made in JS are used by TenSEAL, ciphertexts of each
// side decrypt on the other, and what TenSEAL computes with the JS keys decrypts in JS.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Keys, loadSeal } from '../src/crypto.js';
import { fromTenseal, readHeader, toTenseal } from '../src/sealwire.js';
import { unpackFrames } from '../src/cbf1.js';
import { pyside } from './helpers.js';

const PARAMS = { poly_modulus_degree: 8192, coeff_mod_bit_sizes: [55, 36, 36, 36, 55], scale_bits: 36 };
const STEPS = [-1024, -512, -256, -8, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048];
const SLOTS = 4096;
const VALUES = Float64Array.from({ length: SLOTS }, (_, i) => 3 * Math.sin(i));
const maxDiff = (/** @type {ArrayLike<number>} */ a, /** @type {ArrayLike<number>} */ b) => {
  let m = 0;
  for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[i] - b[i]));
  return m;
};

const seal = await loadSeal();
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'cb-interop-'));
const read = (/** @type {string} */ name) => new Uint8Array(fs.readFileSync(path.join(dir, name)));

test('TenSEAL ciphertexts (seeded and mod-switched) and secret key load and decrypt in node-seal', () => {
  pyside('make', dir);
  const sk = fromTenseal(read('py_sk.bin'), 'secret_key');
  const keys = new Keys(seal, PARAMS, STEPS, sk);
  const [seeded, full] = keys.decrypt([read('py_ct_seeded.bin'), read('py_ct_full.bin')]);
  assert.ok(maxDiff(seeded, VALUES) < 1e-4, `seeded: ${maxDiff(seeded, VALUES)}`);
  assert.ok(maxDiff(full, VALUES) < 1e-4, `mod-switched: ${maxDiff(full, VALUES)}`);
  keys.delete();
});

test('JS keys and a JS seeded ciphertext work in TenSEAL: 16 rotations and a relinearized square', () => {
  const keys = new Keys(seal, PARAMS, STEPS);
  const upload = keys.publicKeyUpload();
  const frames = unpackFrames(upload);
  assert.equal(frames.length, 3);
  assert.deepEqual(JSON.parse(new TextDecoder().decode(frames[0])), { params: PARAMS, galois_steps: STEPS });
  for (const f of frames.slice(1)) assert.deepEqual([readHeader(f).major, readHeader(f).minor], [4, 3]);
  fs.writeFileSync(path.join(dir, 'js_keys.cbf1'), upload);
  // Only for this test: TenSEAL needs the secret key to prove the JS ciphertext decrypts there.
  fs.writeFileSync(path.join(dir, 'js_sk.bin'), toTenseal(keys.secretKeyBytes(), 'secret_key'));
  const [ct] = keys.encrypt([VALUES]);
  fs.writeFileSync(path.join(dir, 'js_ct.bin'), ct);
  const report = JSON.parse(pyside('eval', dir).trim().split('\n').at(-1) ?? '{}');
  assert.ok(report.js_ct_decrypt_max_err < 1e-4, JSON.stringify(report));
  assert.equal(report.steps, 16);
  let worst = 0;
  for (const step of STEPS) {
    const [got] = keys.decrypt([read(`py_rot_${step}.bin`)]);
    const k = ((step % SLOTS) + SLOTS) % SLOTS;
    worst = Math.max(worst, maxDiff(got, VALUES.map((_, i) => VALUES[(i + k) % SLOTS])));
  }
  assert.ok(worst < 1e-3, `rotations: ${worst}`);
  const [sq] = keys.decrypt([read('py_square.bin')]);
  assert.ok(maxDiff(sq, VALUES.map((x) => x * x)) < 1e-3, `square: ${maxDiff(sq, VALUES.map((x) => x * x))}`);
  keys.delete();
});
