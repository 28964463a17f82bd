/**
 * The cipherbert JavaScript client: the whole client side of encrypted classification (tokenize,
 * embed, keygen, encrypt, answer the refresh rounds, decrypt) in Node or a browser (a Web Worker),
 * mirroring the Python SDK (clients/sdk.py). Depends only on the wire format (docs/protocol.md).
 *
 *     const client = new Client('http://127.0.0.1:8000', apiKey, { progress: (p) => console.log(p) });
 *     const r = await client.classify('a gripping, beautifully acted film');
 *     // r.label, r.probabilities, r.logits, r.latency, r.bytes
 *
 * The secret key is kept by a `keyStore` (memory by default; IndexedDB in the page) and is never sent.
 * @module client
 */
import { packFrames, unpackFrames } from './cbf1.js';
import { Keys, loadSeal } from './crypto.js';
import { Embedder } from './embed.js';
import { pack } from './layout.js';
import { answerRound } from './rounds.js';
import { PROTOCOL, quantities } from './spec.js';
import { RoundGuard, TrustError, checkHeadroom, checkProtocol, checkSecurity, geometryOf, headroomBits, pinOf } from './trust.js';

export const ROUND_TOKEN_HEADER = 'X-Cipherbert-Round-Token';
export const FRAMES_MEDIA_TYPE = 'application/vnd.cipherbert.frames';
const RESTARTABLE = ['unknown_inference', 'wrong_round'];

/**
 * @typedef {{stage: string, message: string, round?: number, rounds?: number}} Progress
 * @typedef {{get(key: string): Promise<any>, put(key: string, value: any): Promise<void>, delete(key: string): Promise<void>}} KeyStore
 * @typedef {{label: string, labels: string[], probabilities: number[], logits: number[], latency: number,
 *   bytes: {up: number, down: number, keys: number}, rounds: number, nTokens: number, inferenceId: string,
 *   modelId: string, timings: Record<string, number>, restarts: number}} Result
 */

export class CipherbertError extends Error {
  /** @param {string} message @param {{status?: number, code?: string}} [info] */
  constructor(message, { status, code } = {}) {
    super(message);
    this.status = status;
    this.code = code;
    /** @type {string|null} */
    this.inferenceId = null;
  }
}

/** @returns {KeyStore} */
export function memoryKeyStore() {
  const m = new Map();
  return { get: async (k) => m.get(k), put: async (k, v) => { m.set(k, v); }, delete: async (k) => { m.delete(k); } };
}

/** @param {Uint8Array} bytes */
async function sha256Hex(bytes) {
  const digest = await globalThis.crypto.subtle.digest('SHA-256', bytes);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

/** @param {number[]} x */
function softmax(x) {
  const m = Math.max(...x);
  const e = x.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

const sleep = (/** @type {number} */ ms) => new Promise((r) => setTimeout(r, ms));

export class Client {
  /**
   * @param {string} url the server, e.g. http://127.0.0.1:8000
   * @param {string} apiKey
   * @param {{model?: string, progress?: (p: Progress) => void, keyStore?: KeyStore, seal?: any, retries?: number}} [options]
   */
  constructor(url, apiKey, { model, progress, keyStore, seal, retries = 10 } = {}) {
    this.url = url.replace(/\/+$/, '');
    this.apiKey = apiKey;
    this.model = model ?? null;
    this.progress = progress ?? (() => {});
    this.keyStore = keyStore ?? memoryKeyStore();
    this._seal = seal ?? null;
    this.retries = retries;
    /** @type {Map<string, any>} */
    this._sessions = new Map();
    this.keyUploadBytes = 0;
  }

  /** One API call; retries 429/503 after Retry-After. @param {string} method @param {string} path @param {RequestInit} [init] */
  async request(method, path, init = {}) {
    for (let attempt = 0; ; attempt++) {
      let resp;
      try {
        resp = await fetch(this.url + path, { ...init, method, headers: { Authorization: `Bearer ${this.apiKey}`, ...(init.headers ?? {}) } });
      } catch (exc) {
        // A kept-alive connection the server closed meanwhile fails the request without it being
        // processed: retry a few times (a replayed round would be refused 409 and restarted anyway).
        if (attempt < 3) {
          await sleep(300);
          continue;
        }
        const cause = /** @type {any} */ (exc).cause?.code ?? /** @type {Error} */ (exc).message;
        throw new CipherbertError(`cannot reach the cipherbert server at ${this.url} (${cause}); is it running?`, { code: 'unreachable' });
      }
      if ((resp.status === 429 || resp.status === 503) && attempt < this.retries) {
        const wait = Number(resp.headers.get('Retry-After') ?? '1');
        await sleep(1000 * Math.min(Number.isFinite(wait) ? wait : 1, 10));
        continue;
      }
      if (resp.status >= 400) throw await errorOf(resp);
      return resp;
    }
  }

  async models() {
    return (await (await this.request('GET', '/v1/models')).json()).models;
  }

  async modelId() {
    if (!this.model) {
      const models = await this.models();
      if (!models.length) throw new CipherbertError('the server has no model loaded');
      this.model = models[0].model_id;
    }
    return /** @type {string} */ (this.model);
  }

  /** The bundle and its files, checked: protocol, 128-bit parameters, pin, sha256 of every file. */
  async bundle() {
    const model = await this.modelId();
    this.progress({ stage: 'bundle', message: `fetching the bundle of ${model}` });
    const bundle = await (await this.request('GET', `/v1/models/${encodeURIComponent(model)}/bundle`)).json();
    try {
      if (bundle.protocol !== PROTOCOL) throw new TrustError(`the server speaks ${bundle.protocol}; this client speaks ${PROTOCOL}: upgrade the client (or the server)`, 'protocol');
      checkSecurity(bundle.ckks);
      const pinKey = `pin:${this.url}|${model}`;
      const pinned = await this.keyStore.get(pinKey);
      const mine = pinOf(bundle);
      if (pinned === undefined) await this.keyStore.put(pinKey, mine);
      else if (pinned !== mine) throw new TrustError(`the bundle of model ${model} at ${this.url} changed since it was pinned; if the operator deployed a new model, call forgetBundle(); otherwise do not trust this server`, 'bundle_changed');
    } catch (exc) {
      if (exc instanceof TrustError) throw new CipherbertError(exc.message, { code: exc.code });
      throw exc;
    }
    /** @type {Record<string, Uint8Array>} */
    const files = {};
    for (const f of bundle.files) {
      this.progress({ stage: 'bundle', message: `downloading ${f.name} (${(f.bytes / 1e6).toFixed(1)} MB)` });
      const data = new Uint8Array(await (await this.request('GET', `/v1/models/${encodeURIComponent(model)}/bundle/files/${encodeURIComponent(f.name)}`)).arrayBuffer());
      if ((await sha256Hex(data)) !== f.sha256) throw new CipherbertError(`bundle file ${f.name} failed its sha256 check`, { code: 'bad_bundle' });
      files[f.name] = data;
    }
    return { bundle, files };
  }

  /** Accept a changed bundle: drop its pin. @param {string} [model] */
  async forgetBundle(model) {
    const m = model ?? (await this.modelId());
    await this.keyStore.delete(`pin:${this.url}|${m}`);
    this._sessions.delete(m);
  }

  async seal() {
    if (!this._seal) this._seal = await loadSeal();
    return this._seal;
  }

  /** @param {any} bundle */
  storeKey(bundle) {
    return `${this.url}|${this.apiKey.slice(0, 4)}|${bundle.model_id}|${bundle.model_hash}`;
  }

  /** Keys (from the key store, or generated once), registered with the server; the session per model. */
  async session() {
    const model = await this.modelId();
    if (this._sessions.has(model)) return this._sessions.get(model);
    const { bundle, files } = await this.bundle();
    const seal = await this.seal();
    const name = this.storeKey(bundle);
    const stored = await this.keyStore.get(`sk:${name}`);
    let keys;
    const t0 = performance.now();
    if (stored) {
      keys = new Keys(seal, bundle.ckks, bundle.galois_steps, stored.secretKey);
    } else {
      this.progress({ stage: 'keygen', message: 'generating CKKS keys (once per server and model)' });
      keys = new Keys(seal, bundle.ckks, bundle.galois_steps);
      keys.publicKeyUpload((m) => this.progress({ stage: 'keygen', message: `generating ${m}` }));
      await this.keyStore.put(`sk:${name}`, { params: bundle.ckks, galoisSteps: keys.galoisSteps, secretKey: keys.secretKeyBytes() });
    }
    const keygenSeconds = (performance.now() - t0) / 1000;
    let keyId = await this.keyStore.get(`kid:${name}`);
    if (keyId && !(await this.keyAlive(keyId))) keyId = undefined;
    if (!keyId) keyId = await this.register(keys, bundle, name);
    const embedder = new Embedder(JSON.parse(new TextDecoder().decode(files['tokenizer.json'])), files['embeddings.safetensors'], bundle.max_tokens, bundle.embedding?.layernorm_eps ?? 1e-12);
    const session = { keys, keyId, bundle, embedder, keygenSeconds };
    this._sessions.set(model, session);
    return session;
  }

  /** @param {string} keyId */
  async keyAlive(keyId) {
    try {
      await this.request('GET', `/v1/keys/${encodeURIComponent(keyId)}`);
      return true;
    } catch (exc) {
      if (exc instanceof CipherbertError && exc.status === 404) return false;
      throw exc;
    }
  }

  /** @param {Keys} keys @param {any} bundle @param {string} name */
  async register(keys, bundle, name) {
    const upload = keys.publicKeyUpload();
    this.progress({ stage: 'upload', message: `uploading evaluation keys (${(upload.length / 1e6).toFixed(1)} MB)` });
    const info = await (await this.request('POST', `/v1/keys?model=${encodeURIComponent(bundle.model_id)}`, { body: upload, headers: { 'Content-Type': 'application/octet-stream' } })).json();
    await this.keyStore.put(`kid:${name}`, info.key_id);
    this.keyUploadBytes = upload.length;
    return info.key_id;
  }

  /** Make sure keys exist and are registered; returns the key id. */
  async registerKeys() {
    return (await this.session()).keyId;
  }

  async listKeys() {
    return (await (await this.request('GET', '/v1/keys')).json()).keys;
  }

  /** @param {string} keyId */
  async deleteKey(keyId) {
    await this.request('DELETE', `/v1/keys/${encodeURIComponent(keyId)}`);
    for (const [m, s] of this._sessions) if (s.keyId === keyId) this._sessions.delete(m);
  }

  /** @param {string} path @param {Uint8Array[]} frames @param {Record<string, string>} [headers] */
  async postFrames(path, frames, headers = {}) {
    const body = packFrames(frames);
    const resp = await this.request('POST', path, { body, headers: { 'Content-Type': FRAMES_MEDIA_TYPE, ...headers } });
    const raw = new Uint8Array(await resp.arrayBuffer());
    let got;
    try {
      got = unpackFrames(raw);
    } catch (exc) {
      throw new CipherbertError(`malformed response from the server: ${/** @type {Error} */ (exc).message}`);
    }
    return { header: JSON.parse(new TextDecoder().decode(got[0])), frames: got.slice(1), up: body.length, down: raw.length };
  }

  /**
   * Classify one text end to end. An inference the server can no longer resume is started again once;
   * an expired or deleted key is registered again once; a misbehaving server is never retried.
   * @param {string} text
   * @returns {Promise<Result>}
   */
  async classify(text) {
    try {
      return await this.classifyOnce(text);
    } catch (exc) {
      if (!(exc instanceof CipherbertError)) throw exc;
      if (exc.code === 'unknown_key') {
        this.progress({ stage: 'upload', message: 'the registered key expired or was deleted: registering again' });
        const s = this._sessions.get(await this.modelId());
        if (s) await this.keyStore.delete(`kid:${this.storeKey(s.bundle)}`);
        this._sessions.delete(await this.modelId());
        return this.classifyOnce(text);
      }
      if (exc.inferenceId && exc.code && RESTARTABLE.includes(exc.code)) {
        const r = await this.classifyOnce(text);
        r.restarts = 1;
        return r;
      }
      throw exc;
    }
  }

  /** @param {string} text @returns {Promise<Result>} */
  async classifyOnce(text) {
    try {
      return await this._classify(text);
    } catch (exc) {
      if (exc instanceof TrustError) throw new CipherbertError(`the server misbehaved: ${exc.message}`, { code: exc.code });
      throw exc;
    }
  }

  /** @param {string} text @returns {Promise<Result>} */
  async _classify(text) {
    if (typeof text !== 'string' || !text.trim()) throw new CipherbertError('cannot classify an empty text');
    const { keys, keyId, bundle, embedder } = await this.session();
    const t0 = performance.now();
    const emb = embedder.embed(text);
    const n = emb.shape[0];
    const env = quantities(n, { num_labels: bundle.num_labels, hidden_size: bundle.hidden_size, num_heads: bundle.num_heads, intermediate_size: bundle.intermediate_size, poly_modulus_degree: bundle.ckks.poly_modulus_degree });
    const geometry = geometryOf(bundle, n);
    const headroom = headroomBits(bundle.ckks);
    this.progress({ stage: 'encrypt', message: `encrypting ${n} tokens` });
    const start = keys.encrypt(pack('FM', emb, env, env.H));
    const tEnc = (performance.now() - t0) / 1000;
    const guard = new RoundGuard(bundle);
    let msg = await this.postFrames(`/v1/inferences?model=${encodeURIComponent(bundle.model_id)}&key_id=${encodeURIComponent(keyId)}&n_tokens=${n}`, start);
    let up = msg.up, down = msg.down, rounds = 0, tClient = 0;
    guard.step(msg.header, msg.frames.length);
    while (!msg.header.done) {
      const { header } = msg;
      rounds += 1;
      this.progress({ stage: 'round', message: `round ${header.round} of ${bundle.rounds} (${header.kind})`, round: header.round, rounds: bundle.rounds });
      const tc = performance.now();
      const replies = answerRound(keys, header.kind, header.meta ?? {}, msg.frames, geometry, env, headroom);
      tClient += (performance.now() - tc) / 1000;
      try {
        msg = await this.postFrames(`/v1/inferences/${encodeURIComponent(header.inference_id)}/rounds/${header.round}`, replies, { [ROUND_TOKEN_HEADER]: header.round_token });
      } catch (exc) {
        if (exc instanceof CipherbertError) exc.inferenceId = header.inference_id;
        throw exc;
      }
      guard.step(msg.header, msg.frames.length);
      up += msg.up;
      down += msg.down;
    }
    this.progress({ stage: 'decrypt', message: 'decrypting the logits' });
    checkProtocol(msg.header.meta);
    const values = keys.decrypt(msg.frames);
    checkHeadroom(values, headroom, 'logits');
    const logits = values.map((v) => v[0]);
    const probabilities = softmax(logits);
    const labels = bundle.labels ?? logits.map((_, i) => String(i));
    const idx = logits.indexOf(Math.max(...logits));
    return {
      label: String(labels[idx] ?? idx), labels, probabilities, logits,
      latency: (performance.now() - t0) / 1000,
      bytes: { up, down, keys: this.keyUploadBytes },
      rounds, nTokens: n, inferenceId: msg.header.inference_id, modelId: bundle.model_id,
      timings: { encrypt_s: tEnc, client_rounds_s: tClient }, restarts: 0,
    };
  }
}

/** @param {Response} resp */
async function errorOf(resp) {
  let code, detail;
  try {
    const body = await resp.json();
    code = body.error;
    detail = body.detail;
  } catch {
    detail = `HTTP ${resp.status}`;
  }
  /** @type {Record<number, string>} */
  const hints = { 401: 'the server refused the API key: check it', 429: 'rate limited', 503: 'the server is busy or not ready' };
  const hint = code === 'unknown_key' ? 'the registered key expired or was deleted' : hints[resp.status];
  return new CipherbertError(`server answered ${resp.status} ${code ?? ''}: ${detail}${hint ? ` (${hint})` : ''}`, { status: resp.status, code });
}
