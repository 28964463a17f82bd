/**
 * Translation between node-seal's SEAL 4.1 serializations and TenSEAL's (SEAL 4.3, zstd).
 *
 * Both builds write the same object layouts; they differ in two ways that each refuses:
 * - every SEAL header (the outer one and the nested ones of arrays, ciphertexts inside keys) carries
 *   the writer's version, and SEAL loads only its own major.minor;
 * - TenSEAL compresses every object with zstd, and node-seal's build has no zstd reader we can
 *   reach for the nested headers.
 * So outgoing objects are saved uncompressed and their headers stamped 4.3; incoming ones are
 * zstd-decoded and stamped 4.1. The walk follows each object's layout (SEAL's save_members) and
 * checks every length, so a header is only ever rewritten where the layout puts one: never in
 * random polynomial data. The server keeps validating everything with SEAL's own loaders.
 *
 * @module sealwire
 */
import { decompress as zstdDecompress } from 'fzstd';

export const SEAL_MAGIC = 0xa15e;
export const HEADER_SIZE = 16;
export const COMPR_NONE = 0;
export const COMPR_ZLIB = 1;
export const COMPR_ZSTD = 2;
/** Minor versions: what node-seal 6.0.3 (SEAL 4.1.2) and TenSEAL 0.3.18 (SEAL 4.3) write and accept. */
export const NODE_SEAL_VERSION = { major: 4, minor: 1 };
export const TENSEAL_VERSION = { major: 4, minor: 3 };

// Ciphertext members before its coefficient array: parms_id (4 x u64), is_ntt_form (1 byte),
// size, poly_modulus_degree, coeff_modulus_size (u64 each), scale (f64), correction_factor (u64).
const CIPHERTEXT_FIXED = 32 + 1 + 8 * 3 + 8 + 8;
// A seeded ciphertext stores its second polynomial as the PRNG that makes it: a SEAL object of its
// own (UniformRandomGeneratorInfo) holding the PRNG type (1 byte) and a 512-bit seed.
const SEED_INFO = HEADER_SIZE + 1 + 64;
// Plaintext (a secret key) members before its array: parms_id, coeff_count (u64), scale (f64).
const PLAINTEXT_FIXED = 32 + 8 + 8;

export class SealWireError extends Error {}

/**
 * @typedef {{magic: number, headerSize: number, major: number, minor: number, compr: number, size: number}} SealHeader
 */

/**
 * @param {Uint8Array} buf
 * @param {number} off
 * @returns {SealHeader}
 */
export function readHeader(buf, off = 0) {
  if (off + HEADER_SIZE > buf.length) throw new SealWireError(`truncated SEAL header at byte ${off}`);
  const view = new DataView(buf.buffer, buf.byteOffset + off, HEADER_SIZE);
  const header = {
    magic: view.getUint16(0, true),
    headerSize: view.getUint8(2),
    major: view.getUint8(3),
    minor: view.getUint8(4),
    compr: view.getUint8(5),
    size: Number(view.getBigUint64(8, true)),
  };
  if (header.magic !== SEAL_MAGIC || header.headerSize !== HEADER_SIZE) {
    throw new SealWireError(`no SEAL header at byte ${off}`);
  }
  if (header.size < HEADER_SIZE || off + header.size > buf.length) {
    throw new SealWireError(`SEAL object at byte ${off} declares ${header.size} bytes, ${buf.length - off} remain`);
  }
  return header;
}

/** @param {Uint8Array} buf @param {number} off */
function u64(buf, off) {
  if (off + 8 > buf.length) throw new SealWireError(`truncated field at byte ${off}`);
  return Number(new DataView(buf.buffer, buf.byteOffset + off, 8).getBigUint64(0, true));
}

/**
 * Walks one object's nested headers, calling `visit(offset)` on each header it contains.
 * @typedef {(buf: Uint8Array, off: number, visit: (off: number) => void, nested: boolean) => number} Walker
 */

/** @type {Walker} */
function walkDynArray(buf, off, visit, nested) {
  const h = enter(buf, off, visit, nested);
  const count = u64(buf, off + HEADER_SIZE);
  if (HEADER_SIZE + 8 + count * 8 !== h.size) throw new SealWireError(`array at byte ${off}: length mismatch`);
  return off + h.size;
}

/** @type {Walker} */
export function walkCiphertext(buf, off, visit, nested = false) {
  const h = enter(buf, off, visit, nested);
  const end = off + h.size;
  const after = walkDynArray(buf, off + HEADER_SIZE + CIPHERTEXT_FIXED, visit, true);
  if (after === end) return end;
  if (after + SEED_INFO !== end || enter(buf, after, visit, true).size !== SEED_INFO) {
    throw new SealWireError(`ciphertext at byte ${off}: ${end - after} unexpected trailing bytes`);
  }
  return end;
}

/** @type {Walker} */
export function walkPlaintext(buf, off, visit, nested = false) {
  const h = enter(buf, off, visit, nested);
  if (walkDynArray(buf, off + HEADER_SIZE + PLAINTEXT_FIXED, visit, true) !== off + h.size) {
    throw new SealWireError(`plaintext at byte ${off}: length mismatch`);
  }
  return off + h.size;
}

/** RelinKeys and GaloisKeys (SEAL's KSwitchKeys): parms_id, then a ragged array of public keys. @type {Walker} */
export function walkKSwitchKeys(buf, off, visit, nested = false) {
  const h = enter(buf, off, visit, nested);
  const end = off + h.size;
  let p = off + HEADER_SIZE + 32;
  const rows = u64(buf, p);
  p += 8;
  for (let i = 0; i < rows; i++) {
    const cols = u64(buf, p);
    p += 8;
    for (let j = 0; j < cols; j++) p = walkCiphertext(buf, p, visit, true);
    if (p > end) throw new SealWireError(`keys at byte ${off}: row ${i} overruns the object`);
  }
  if (p !== end) throw new SealWireError(`keys at byte ${off}: ${end - p} unexpected trailing bytes`);
  return end;
}

/**
 * @param {Uint8Array} buf @param {number} off @param {(off: number) => void} visit @param {boolean} nested
 * @returns {SealHeader}
 */
function enter(buf, off, visit, nested) {
  const h = readHeader(buf, off);
  if (h.compr !== COMPR_NONE) {
    throw new SealWireError(`SEAL object at byte ${off} is compressed (mode ${h.compr}); ${nested ? 'nested objects must not be' : 'decompress it first'}`);
  }
  visit(off);
  return h;
}

/** @type {Record<string, Walker>} */
export const WALKERS = {
  ciphertext: walkCiphertext,
  secret_key: walkPlaintext,
  relin_keys: walkKSwitchKeys,
  galois_keys: walkKSwitchKeys,
};

/**
 * An uncompressed copy of a SEAL object: zstd bodies are decoded, the outer header says "none".
 * @param {Uint8Array} bytes
 * @returns {Uint8Array}
 */
export function decompressed(bytes) {
  const h = readHeader(bytes, 0);
  if (h.size !== bytes.length) throw new SealWireError(`SEAL object declares ${h.size} bytes but has ${bytes.length}`);
  if (h.compr === COMPR_NONE) return bytes;
  if (h.compr !== COMPR_ZSTD) throw new SealWireError(`unsupported SEAL compression mode ${h.compr} (only none and zstd)`);
  const body = zstdDecompress(bytes.subarray(HEADER_SIZE));
  const out = new Uint8Array(HEADER_SIZE + body.length);
  out.set(bytes.subarray(0, HEADER_SIZE));
  out[5] = COMPR_NONE;
  new DataView(out.buffer).setBigUint64(8, BigInt(out.length), true);
  out.set(body, HEADER_SIZE);
  return out;
}

/**
 * Stamp every header of an uncompressed object with `version`, in place.
 * @param {Uint8Array} bytes uncompressed serialization
 * @param {keyof typeof WALKERS} kind
 * @param {{major: number, minor: number}} version
 * @returns {number} headers rewritten
 */
export function restamp(bytes, kind, version) {
  const walk = WALKERS[kind];
  if (!walk) throw new SealWireError(`unknown SEAL object kind ${kind}`);
  let count = 0;
  const end = walk(bytes, 0, (off) => {
    bytes[off + 3] = version.major;
    bytes[off + 4] = version.minor;
    count++;
  }, false);
  if (end !== bytes.length) throw new SealWireError(`${bytes.length - end} trailing bytes after the ${kind}`);
  return count;
}

/**
 * node-seal bytes (saved with compression "none") -> bytes TenSEAL loads.
 * @param {Uint8Array} bytes @param {keyof typeof WALKERS} kind
 */
export function toTenseal(bytes, kind) {
  const out = decompressed(bytes).slice();
  restamp(out, kind, TENSEAL_VERSION);
  return out;
}

/**
 * TenSEAL bytes (zstd, 4.3 headers) -> bytes node-seal loads.
 * @param {Uint8Array} bytes @param {keyof typeof WALKERS} kind
 */
export function fromTenseal(bytes, kind) {
  const plain = decompressed(bytes);
  const out = plain === bytes ? bytes.slice() : plain;
  restamp(out, kind, NODE_SEAL_VERSION);
  return out;
}
