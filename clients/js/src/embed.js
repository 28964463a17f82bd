/**
 * Client-side plaintext embedding (docs/protocol.md section 10): tokenize with tokenizer.json
 * (@huggingface/tokenizers, the pure-JS port of Hugging Face tokenizers), look up word + position
 * rows from embeddings.safetensors, LayerNorm (biased variance, the bundle's epsilon) in float64.
 * @module embed
 */
import { Tokenizer } from '@huggingface/tokenizers';

export const EMBEDDING_TENSORS = ['embeddings.word.weight', 'embeddings.position.weight', 'embeddings.norm.weight', 'embeddings.norm.bias'];

/**
 * Float32 tensors of a safetensors file.
 * @param {Uint8Array} bytes
 * @returns {Record<string, {shape: number[], data: Float32Array}>}
 */
export function parseSafetensors(bytes) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(view.getBigUint64(0, true));
  if (8 + headerLen > bytes.length) throw new Error('safetensors header overruns the file');
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLen)));
  /** @type {Record<string, {shape: number[], data: Float32Array}>} */
  const out = {};
  for (const [name, info] of Object.entries(header)) {
    if (name === '__metadata__') continue;
    if (info.dtype !== 'F32') throw new Error(`${name}: dtype ${info.dtype}, expected F32`);
    const [begin, end] = info.data_offsets;
    const raw = bytes.slice(8 + headerLen + begin, 8 + headerLen + end);
    out[name] = { shape: info.shape, data: new Float32Array(raw.buffer, raw.byteOffset, (end - begin) / 4) };
  }
  return out;
}

export class Embedder {
  /**
   * @param {object} tokenizerJson parsed tokenizer.json
   * @param {Uint8Array} safetensorsBytes embeddings.safetensors
   * @param {number} maxTokens
   * @param {number} [eps]
   */
  constructor(tokenizerJson, safetensorsBytes, maxTokens, eps = 1e-12) {
    this.tokenizer = new Tokenizer(tokenizerJson, {});
    this.maxTokens = maxTokens;
    this.eps = eps;
    const tables = parseSafetensors(safetensorsBytes);
    const missing = EMBEDDING_TENSORS.filter((k) => !tables[k]);
    if (missing.length) throw new Error(`embedding tables missing ${missing.join(', ')}`);
    [this.word, this.position, this.normWeight, this.normBias] = EMBEDDING_TENSORS.map((k) => tables[k]);
    this.hidden = this.word.shape[1];
  }

  /**
   * Token ids as Hugging Face tokenizers gives them with truncation to maxTokens: [CLS] ... [SEP],
   * the words cut so the whole fits (a single sentence's template: first and last id are special).
   * @param {string} text
   * @returns {number[]}
   */
  tokenIds(text) {
    if (!text || !text.trim()) throw new Error('text is empty');
    const ids = this.tokenizer.encode(text).ids.map(Number);
    if (ids.length <= this.maxTokens) return ids;
    return [...ids.slice(0, this.maxTokens - 1), ids[ids.length - 1]];
  }

  /**
   * (n, H) float64 embeddings, row-major.
   * @param {number[]} ids
   * @returns {{data: Float64Array, shape: number[]}}
   */
  embedIds(ids) {
    const H = this.hidden, n = ids.length, vocab = this.word.shape[0];
    const out = new Float64Array(n * H);
    const x = new Float64Array(H);
    for (let t = 0; t < n; t++) {
      if (ids[t] < 0 || ids[t] >= vocab) throw new Error('token id outside the vocabulary');
      let mean = 0;
      for (let f = 0; f < H; f++) { x[f] = this.word.data[ids[t] * H + f] + this.position.data[t * H + f]; mean += x[f]; }
      mean /= H;
      let v = 0;
      for (let f = 0; f < H; f++) v += (x[f] - mean) ** 2;
      const inv = 1 / Math.sqrt(v / H + this.eps);
      for (let f = 0; f < H; f++) out[t * H + f] = (x[f] - mean) * inv * this.normWeight.data[f] + this.normBias.data[f];
    }
    return { data: out, shape: [n, H] };
  }

  /** @param {string} text */
  embed(text) {
    return this.embedIds(this.tokenIds(text));
  }
}
