/**
 * The protocol's tables (docs/protocol.md, read by tools/gen_tables.mjs into protocol_tables.js) and a
 * small evaluator for their formulas: Python integer expressions with `//`, `%`, `cdiv`, `block`, `max`.
 * Round kinds, layouts and frame counts are all taken from these tables, never hard-coded.
 * @module spec
 */
import { TABLES } from './protocol_tables.js';

export { TABLES };
export const PROTOCOL = TABLES.version;

/** @param {number} a @param {number} b */
export const cdiv = (a, b) => -Math.floor(-a / b);
/** @param {number} n */
export function block(n) {
  for (const size of TABLES.tokenBlocks) if (n <= size) return size;
  throw new Error(`${n} tokens exceed ${TABLES.tokenBlocks.at(-1)}`);
}
const FUNCS = { cdiv, block, max: Math.max };

/** @typedef {(env: Record<string, number>) => number} Formula */

/**
 * Compile one formula of the doc into a function of its named quantities.
 * @param {string} text
 * @returns {Formula}
 */
export function compile(text) {
  const tokens = text.match(/\d+|[A-Za-z_]\w*|\/\/|[-+*%(),]/g) || [];
  if (tokens.join('') !== text.replace(/\s+/g, '')) throw new Error(`cannot read formula ${text}`);
  let i = 0;
  const peek = () => tokens[i];
  const take = (/** @type {string} */ t) => {
    if (tokens[i] !== t) throw new Error(`formula ${text}: expected ${t} at ${tokens[i]}`);
    i++;
  };
  /** @returns {Formula} */
  const atom = () => {
    const t = tokens[i++];
    if (t === '(') {
      const e = expr();
      take(')');
      return e;
    }
    if (t === '-') {
      const a = atom();
      return (env) => -a(env);
    }
    if (/^\d+$/.test(t)) return () => Number(t);
    if (peek() === '(') {
      const fn = FUNCS[/** @type {keyof typeof FUNCS} */ (t)];
      if (!fn) throw new Error(`formula ${text}: unknown function ${t}`);
      take('(');
      const args = [expr()];
      while (peek() === ',') { i++; args.push(expr()); }
      take(')');
      return (env) => fn(...args.map((a) => a(env)));
    }
    return (env) => {
      const v = env[t];
      if (v === undefined) throw new Error(`formula ${text}: ${t} is not defined`);
      return v;
    };
  };
  /** @returns {Formula} */
  const term = () => {
    let left = atom();
    while (['*', '//', '%'].includes(peek())) {
      const op = tokens[i++];
      const a = left, b = atom();
      left = op === '*' ? (env) => a(env) * b(env)
        : op === '//' ? (env) => Math.floor(a(env) / b(env))
          : (env) => ((a(env) % b(env)) + b(env)) % b(env);
    }
    return left;
  };
  /** @returns {Formula} */
  const expr = () => {
    let left = term();
    while (peek() === '+' || peek() === '-') {
      const op = tokens[i++];
      const a = left, b = term();
      left = op === '+' ? (env) => a(env) + b(env) : (env) => a(env) - b(env);
    }
    return left;
  };
  const out = expr();
  if (i !== tokens.length) throw new Error(`formula ${text}: unexpected ${tokens[i]}`);
  return out;
}

const compiled = new Map();
/** @param {string} text @param {Record<string, number>} env */
export function evaluate(text, env) {
  if (!compiled.has(text)) compiled.set(text, compile(text));
  return compiled.get(text)(env);
}

/**
 * The named quantities for a sentence of n tokens (the doc's quantities table, in order).
 * @param {number} n
 * @param {{hidden_size: number, num_heads: number, intermediate_size: number, poly_modulus_degree: number}} bundleDims
 */
export function quantities(n, bundleDims) {
  /** @type {Record<string, number>} */
  const env = { n, num_labels: 2, ...bundleDims }; // num_labels: 2 unless the bundle says (as the Python spec)
  for (const q of TABLES.quantities) if (q.formula !== 'input') env[q.name] = evaluate(q.formula, env);
  return env;
}

/** The quantities for a round meta's geometry {n, n_p, hidden, heads, intermediate, slots}. @param {any} g */
export function envOfGeometry(g, numLabels = 2) {
  return quantities(Number(g.n), {
    num_labels: Number(numLabels),
    hidden_size: Number(g.hidden), num_heads: Number(g.heads),
    intermediate_size: Number(g.intermediate), poly_modulus_degree: 2 * Number(g.slots),
  });
}

/**
 * A message's tensors, as meta.tensors describes them: [{tensor, layout, features, frames}].
 * @param {string} kind @param {'server'|'client'} direction @param {Record<string, number>} env
 */
export function describe(kind, direction, env) {
  return TABLES.tensors.filter((t) => t.kind === kind && t.direction === direction)
    .sort((a, b) => a.position - b.position)
    .map((t) => {
      const features = t.features === '-' ? null : env[t.features];
      const frames = evaluate(TABLES.layouts[t.layout].frames, { ...env, F: features ?? 0 });
      return { tensor: t.name, layout: t.layout, features, frames };
    });
}

/** meta.tensors for a round of this kind: {send, reply}. @param {string} kind @param {Record<string, number>} env */
export function roundTensors(kind, env) {
  return { send: describe(kind, 'server', env), reply: describe(kind, 'client', env) };
}

/** Round kinds the tables know how to answer (the client's half of each). */
export function replyKinds() {
  return [...new Set(TABLES.tensors.filter((t) => t.direction === 'client' && t.kind !== 'start').map((t) => t.kind))];
}
