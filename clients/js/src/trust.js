/**
 * What the JS client refuses to take on trust from a server (docs/protocol.md section 12), the same
 * checks as the Python SDK's clients/trust.py: 128-bit parameters, a pinned bundle, rounds in order
 * with the announced kinds and count, per-round geometry and tensor descriptors, frame counts, headroom.
 * @module trust
 */
import { PROTOCOL, TABLES, block, roundTensors } from './spec.js';

export class TrustError extends Error {
  /** @param {string} message @param {string} code */
  constructor(message, code) {
    super(message);
    this.code = code;
  }
}

/** @param {any} ckks */
export function checkSecurity(ckks) {
  const degree = Number(ckks?.poly_modulus_degree);
  const bits = (ckks?.coeff_mod_bit_sizes ?? []).map(Number);
  const scale = Number(ckks?.scale_bits);
  const bound = TABLES.maxBits128[String(degree)];
  if (bound === undefined) throw new TrustError(`the server asks for ring degree ${degree}; 128-bit security is tabulated for ${Object.keys(TABLES.maxBits128)} only`, 'weak_parameters');
  const total = bits.reduce((a, b) => a + b, 0);
  if (total > bound) throw new TrustError(`the server asks for a ${total}-bit modulus at N=${degree}: above ${bound} bits that is below 128-bit security; refusing to make keys`, 'weak_parameters');
  if (bits.length < 3 || !(scale > 0 && scale < bits[0])) throw new TrustError(`the server's CKKS chain ${bits} with scale 2^${scale} is not usable`, 'weak_parameters');
}

/** The pinned identity of a bundle (like ssh's known_hosts). @param {any} bundle */
export function pinOf(bundle) {
  const files = Object.fromEntries((bundle.files ?? []).map((/** @type {any} */ f) => [f.name, f.sha256]));
  return JSON.stringify({ model_hash: bundle.model_hash, protocol: bundle.protocol, ckks: bundle.ckks, files });
}

/** |value| must stay below 2^(base prime - scale - 1). @param {any} ckks */
export const headroomBits = (ckks) => Number(ckks.coeff_mod_bit_sizes[0]) - Number(ckks.scale_bits) - 1;

/** @param {Float64Array[]} values @param {number} bits @param {string} what */
export function checkHeadroom(values, bits, what) {
  const limit = 2 ** bits;
  values.forEach((v, i) => {
    let peak = 0;
    for (const x of v) { const a = Math.abs(x); if (!(a < limit)) { peak = a; break; } }
    if (!(peak < limit)) throw new TrustError(`${what}: ciphertext ${i} decrypts to values at or past the headroom of 2^${bits}: the server's computation overflowed (or the server is misbehaving); the result would be wrong, so this inference is stopped`, 'headroom');
  });
}

/** @param {any} meta */
export function checkProtocol(meta) {
  if (meta?.protocol !== PROTOCOL) throw new TrustError(`server speaks protocol ${JSON.stringify(meta?.protocol)}; this client speaks ${PROTOCOL}: upgrade the client (or the server)`, 'protocol');
}

/**
 * The client's own geometry for n tokens, as meta.geometry writes it.
 * @param {any} bundle @param {number} n
 */
export function geometryOf(bundle, n) {
  return { n, n_p: block(n), hidden: bundle.hidden_size, heads: bundle.num_heads, intermediate: bundle.intermediate_size, slots: bundle.ckks.poly_modulus_degree / 2 };
}

const sameJson = (/** @type {any} */ a, /** @type {any} */ b) => JSON.stringify(a) === JSON.stringify(b);

/**
 * A round's meta against the tables: version, geometry, tensors; returns the expected descriptors.
 * @param {string} kind @param {any} meta @param {Record<string, any>} geometry @param {Record<string, number>} env
 */
export function checkRoundMeta(kind, meta, geometry, env) {
  checkProtocol(meta);
  const theirs = meta.geometry ?? {};
  const keys = Object.keys(geometry);
  if (keys.some((k) => Number(theirs[k]) !== geometry[k]) || Object.keys(theirs).length !== keys.length) {
    throw new TrustError(`${kind} round: the server packs for ${JSON.stringify(theirs)}, this sentence is ${JSON.stringify(geometry)}`, 'geometry');
  }
  const want = roundTensors(kind, env);
  if (!sameJson(meta.tensors, want)) throw new TrustError(`${kind} round: the server describes its tensors as ${JSON.stringify(meta.tensors)}; the protocol says ${JSON.stringify(want)}`, 'tensors');
  return want;
}

/** The round sequence of one inference, as the bundle announces it. */
export class RoundGuard {
  /** @param {any} bundle */
  constructor(bundle) {
    this.rounds = Number(bundle.rounds ?? 0);
    const cycle = TABLES.roundCycle;
    this.kinds = bundle.round_kinds ?? Array.from({ length: this.rounds }, (_, r) => cycle[r % cycle.length]);
    if (this.kinds.length !== this.rounds) throw new TrustError(`the bundle announces ${this.rounds} rounds but ${this.kinds.length} kinds`, 'bad_bundle');
    this.numLabels = Number(bundle.num_labels);
    /** @type {string|null} */
    this.inferenceId = null;
    this.expected = 1;
    this.finished = false;
  }

  /** @param {any} header @param {number} frames */
  step(header, frames) {
    if (this.finished) throw new TrustError('the server kept talking after the logits', 'round_order');
    if (this.inferenceId === null) this.inferenceId = header.inference_id;
    else if (header.inference_id !== this.inferenceId) throw new TrustError(`round for inference ${header.inference_id} inside inference ${this.inferenceId}`, 'round_order');
    const { round, kind, done } = header;
    if (round !== this.expected) throw new TrustError(`the server sent round ${round}; round ${this.expected} was due`, 'round_order');
    if (round > this.rounds + 1) throw new TrustError(`the server asks for round ${round}, beyond the bundle's ${this.rounds} rounds`, 'too_many_rounds');
    if (done) {
      if (round !== this.rounds + 1) throw new TrustError(`logits after ${round - 1} rounds; the bundle announces ${this.rounds}`, 'round_order');
      if (kind !== 'logits') throw new TrustError(`the final envelope has kind ${kind}, not logits`, 'round_kind');
      if (frames !== this.numLabels) throw new TrustError(`${frames} logit ciphertexts for ${this.numLabels} labels`, 'frame_count');
      this.finished = true;
      return;
    }
    if (round > this.rounds) throw new TrustError(`the server asks for round ${round}, beyond the bundle's ${this.rounds} rounds`, 'too_many_rounds');
    if (kind !== this.kinds[round - 1]) throw new TrustError(`round ${round} has kind ${kind}; the bundle's round ${round} is ${this.kinds[round - 1]}`, 'round_kind');
    if (!header.round_token) throw new TrustError(`round ${round} comes without a round token`, 'round_order');
    this.expected += 1;
  }
}
