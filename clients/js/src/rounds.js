/**
 * Answering one refresh round: decrypt the server's tensors (as the tables of docs/protocol.md
 * section 7 list them for the round's kind), compute the client's part, re-encrypt fresh. The kinds
 * are dispatched through ROUND_HANDLERS; a kind the tables or the handlers lack (e.g. a future
 * token-classification round) is refused with a message naming it, never guessed.
 * @module rounds
 */
import { pack, unpack, zeros } from './layout.js';
import { TrustError, checkHeadroom, checkRoundMeta } from './trust.js';

/** @typedef {import('./layout.js').Tensor} Tensor */

/** @param {any} meta @param {string} name */
function number(meta, name) {
  const v = meta?.[name];
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new TrustError(`round meta lacks the number ${name}`, 'protocol_violation');
  return v;
}

/** R[h, k, i] = sigma * sum_d Q~[i, h*dh+d] K~[k, h*dh+d]. @param {Tensor} q @param {Tensor} k @param {number} sigma @param {Record<string, number>} env */
function scores(q, k, sigma, env) {
  const { n, heads, dh, H } = env;
  const out = zeros([heads, n, n]);
  for (let h = 0; h < heads; h++) for (let kk = 0; kk < n; kk++) for (let i = 0; i < n; i++) {
    let s = 0;
    for (let d = 0; d < dh; d++) s += q.data[i * H + h * dh + d] * k.data[kk * H + h * dh + d];
    out.data[(h * n + kk) * n + i] = sigma * s;
  }
  return out;
}

/** P[i, h*dh+e] = scale * sum_k A~[h, k, i] V~[k, h*dh+e]. @param {Tensor} a @param {Tensor} v @param {number} scale @param {Record<string, number>} env */
function context(a, v, scale, env) {
  const { n, heads, dh, H } = env;
  const out = zeros([n, H]);
  for (let h = 0; h < heads; h++) for (let i = 0; i < n; i++) for (let e = 0; e < dh; e++) {
    let s = 0;
    for (let kk = 0; kk < n; kk++) s += a.data[(h * n + kk) * n + i] * v.data[kk * H + h * dh + e];
    out.data[i * H + h * dh + e] = scale * s;
  }
  return out;
}

/**
 * Per kind: the reply tensors (by the tables' names) from the decrypted ones.
 * @type {Record<string, (t: Record<string, Tensor>, meta: any, env: Record<string, number>) => Record<string, Tensor>>}
 */
export const ROUND_HANDLERS = {
  scores: (t, meta, env) => ({ R: scores(t['Q~'], t['K~'], number(meta, 'sigma'), env), 'K~': t['K~'] }),
  context: (t, meta, env) => ({ P: context(t['A~'], t['V~'], number(meta, 'context_scale'), env), 'A~': t['A~'] }),
  refresh: (t) => ({ 'X~': t['X~'] }),
};

/**
 * @param {import('./crypto.js').Keys} keys
 * @param {string} kind @param {any} meta @param {Uint8Array[]} payloads
 * @param {Record<string, number>} geometry the client's own @param {Record<string, number>} env its quantities
 * @param {number} headroom bits
 * @returns {Uint8Array[]} the reply's ciphertexts, in frame order
 */
export function answerRound(keys, kind, meta, payloads, geometry, env, headroom) {
  const handler = ROUND_HANDLERS[kind];
  if (!handler) throw new TrustError(`round kind ${JSON.stringify(kind)} is not implemented by this JS client (it answers ${Object.keys(ROUND_HANDLERS).join(', ')})`, 'round_kind');
  const want = checkRoundMeta(kind, meta, geometry, env);
  const expect = want.send.reduce((s, t) => s + t.frames, 0);
  if (payloads.length !== expect) throw new TrustError(`${kind} round: the server sent ${payloads.length} ciphertexts; the protocol says ${expect} for ${env.n} tokens`, 'frame_count');
  const values = keys.decrypt(payloads);
  checkHeadroom(values, headroom, `${kind} round`);
  /** @type {Record<string, Tensor>} */
  const got = {};
  let at = 0;
  for (const t of want.send) {
    got[t.tensor] = unpack(t.layout, values.slice(at, at + t.frames), env, t.features);
    at += t.frames;
  }
  const reply = handler(got, meta, env);
  return want.reply.flatMap((t) => {
    const tensor = reply[t.tensor];
    if (!tensor) throw new Error(`${kind} handler produced no ${t.tensor}`);
    return keys.encrypt(pack(t.layout, tensor, env, t.features));
  });
}
