/**
 * Packing tensors into CKKS slot vectors and back, by the layouts table of docs/protocol.md: each
 * layout's `global slot` formula maps logical indices to a slot g (ciphertext g // S, slot g % S), and
 * its `slot holds` column says which tensor element goes there. Every slot no formula addresses is 0.
 * @module layout
 */
import { TABLES, compile, evaluate } from './spec.js';

/**
 * @typedef {{data: Float64Array, shape: number[]}} Tensor  dense, row-major
 */

/** @param {number[]} shape @returns {Tensor} */
export const zeros = (shape) => ({ data: new Float64Array(shape.reduce((a, b) => a * b, 1)), shape });

const plans = new Map();

/**
 * The layout's compiled plan: index names and ranges, the slot formula, and how the held element is
 * addressed. X[...] is an (n, F) matrix (F = the tensor's features or H), M[...] a (heads, n, n) array.
 * @param {string} name
 */
function plan(name) {
  if (plans.has(name)) return plans.get(name);
  const layout = TABLES.layouts[name];
  if (!layout) throw new Error(`the protocol has no layout ${name}`);
  const indices = layout.indices.split(',').map((part) => {
    const m = /^\s*(\w+) in 0\.\.(.+)-1\s*$/.exec(part);
    if (!m) throw new Error(`layout ${name}: cannot read index range ${part}`);
    return { name: m[1], upper: compile(m[2]) };
  });
  const held = /^(\w)\[([^\]]+)\]/.exec(TABLES.layouts[name].holds ?? '');
  if (!held) throw new Error(`layout ${name}: cannot read what a slot holds`);
  const p = { indices, slot: compile(layout.slot), frames: layout.frames, tensor: held[1], subscripts: held[2].split(',').map((s) => compile(s.trim())) };
  plans.set(name, p);
  return p;
}

/** @param {string} layoutName @param {Record<string, number>} env @param {number|null} features */
export function tensorShape(layoutName, env, features) {
  const p = plan(layoutName);
  return p.tensor === 'M' ? [env.heads, env.n, env.n] : [env.n, features ?? env.H];
}

/**
 * Visit every (slot, element offset) pair of a layout.
 * @param {string} layoutName @param {Record<string, number>} env @param {number|null} features
 * @param {(slot: number, offset: number) => void} visit
 */
function forEachSlot(layoutName, env, features, visit) {
  const p = plan(layoutName);
  const shape = tensorShape(layoutName, env, features);
  const e = { ...env, F: features ?? env.H };
  const strides = shape.map((_, d) => shape.slice(d + 1).reduce((a, b) => a * b, 1));
  const rec = (/** @type {number} */ depth) => {
    if (depth === p.indices.length) {
      let off = 0;
      for (let d = 0; d < p.subscripts.length; d++) off += p.subscripts[d](e) * strides[d];
      visit(p.slot(e), off);
      return;
    }
    const ix = p.indices[depth];
    const upper = ix.upper(e); // "0..n-1": n values
    for (let v = 0; v < upper; v++) { e[ix.name] = v; rec(depth + 1); }
  };
  rec(0);
}

/** Number of ciphertexts of a layout. @param {string} layoutName @param {Record<string, number>} env @param {number|null} features */
export const frameCount = (layoutName, env, features) => evaluate(TABLES.layouts[layoutName].frames, { ...env, F: features ?? 0 });

/**
 * @param {string} layoutName @param {Tensor} tensor @param {Record<string, number>} env @param {number|null} features
 * @returns {Float64Array[]} one slot vector per ciphertext
 */
export function pack(layoutName, tensor, env, features) {
  const S = env.S;
  const count = frameCount(layoutName, env, features);
  const flat = new Float64Array(count * S);
  forEachSlot(layoutName, env, features, (slot, off) => { flat[slot] = tensor.data[off]; });
  return Array.from({ length: count }, (_, c) => flat.subarray(c * S, (c + 1) * S));
}

/**
 * @param {string} layoutName @param {ArrayLike<number>[]} vectors @param {Record<string, number>} env @param {number|null} features
 * @returns {Tensor}
 */
export function unpack(layoutName, vectors, env, features) {
  const S = env.S;
  const out = zeros(tensorShape(layoutName, env, features));
  forEachSlot(layoutName, env, features, (slot, off) => { out.data[off] = vectors[Math.floor(slot / S)][slot % S]; });
  return out;
}
