/**
 * CKKS with node-seal (SEAL 4.1.2 in WebAssembly), speaking TenSEAL's serialization through sealwire.
 * The secret key lives in this object only; `publicKeyUpload` is the three-frame key upload of
 * docs/protocol.md section 5 (header, relin keys, Galois keys) and never contains it.
 * @module crypto
 */
import { packFrames } from './cbf1.js';
import { fromTenseal, toTenseal } from './sealwire.js';

/** @typedef {{poly_modulus_degree: number, coeff_mod_bit_sizes: number[], scale_bits: number}} CKKSParams */

/**
 * Load node-seal for this environment (Node, a Web Worker or a page).
 * @returns {Promise<any>}
 */
export async function loadSeal() {
  const isNode = typeof process !== 'undefined' && !!process.versions?.node;
  const isWorker = typeof WorkerGlobalScope !== 'undefined';
  const mod = isNode ? await import('node-seal/throws_wasm_node_es.js')
    : isWorker ? await import('node-seal/throws_wasm_worker_es.js') : await import('node-seal/throws_wasm_web_es.js');
  return (mod.default ?? mod)();
}

export class Keys {
  /**
   * @param {any} seal the loaded node-seal module
   * @param {CKKSParams} params
   * @param {number[]} galoisSteps
   * @param {Uint8Array} [secretKeyBytes] node-seal's own (uncompressed) secret key, to load; else generate
   */
  constructor(seal, params, galoisSteps, secretKeyBytes) {
    this.seal = seal;
    this.params = params;
    this.galoisSteps = [...galoisSteps].map(Number).sort((a, b) => a - b);
    const parms = seal.EncryptionParameters(seal.SchemeType.ckks);
    parms.setPolyModulusDegree(params.poly_modulus_degree);
    parms.setCoeffModulus(seal.CoeffModulus.Create(params.poly_modulus_degree, Int32Array.from(params.coeff_mod_bit_sizes)));
    this.context = seal.Context(parms, true, seal.SecurityLevel.tc128);
    if (!this.context.parametersSet()) throw new Error(`SEAL refuses these parameters: ${this.context.parametersErrorMessage()}`);
    parms.delete();
    this.scale = 2 ** params.scale_bits;
    this.slots = params.poly_modulus_degree / 2;
    if (secretKeyBytes) {
      this.secretKey = seal.SecretKey();
      this.secretKey.loadArray(this.context, secretKeyBytes);
      this.keygen = seal.KeyGenerator(this.context, this.secretKey);
    } else {
      this.keygen = seal.KeyGenerator(this.context);
      this.secretKey = this.keygen.secretKey();
    }
    this.encoder = seal.CKKSEncoder(this.context);
    // node-seal's Encryptor takes a public key first; only encryptSymmetric (the secret key) is used.
    this.publicKey = this.keygen.createPublicKey();
    this.encryptor = seal.Encryptor(this.context, this.publicKey, this.secretKey);
    this.decryptor = seal.Decryptor(this.context, this.secretKey);
    /** @type {Uint8Array|null} */
    this._upload = null;
  }

  /** The secret key as node-seal saves it (for IndexedDB or a 0600 file; never for the network). */
  secretKeyBytes() {
    return this.secretKey.saveArray(this.seal.ComprModeType.none);
  }

  /**
   * The key upload (docs/protocol.md section 5): CBF1[header, relin keys, Galois keys], TenSEAL format.
   * @param {(msg: string) => void} [progress]
   */
  publicKeyUpload(progress = () => {}) {
    if (this._upload) return this._upload;
    const none = this.seal.ComprModeType.none;
    progress('relinearization keys');
    const relinS = this.keygen.createRelinKeysSerializable();
    const relin = toTenseal(relinS.saveArray(none), 'relin_keys');
    relinS.delete();
    progress(`Galois keys for ${this.galoisSteps.length} rotation steps`);
    const galS = this.keygen.createGaloisKeysSerializable(Int32Array.from(this.galoisSteps));
    const galois = toTenseal(galS.saveArray(none), 'galois_keys');
    galS.delete();
    const header = new TextEncoder().encode(JSON.stringify({ params: this.params, galois_steps: this.galoisSteps }));
    this._upload = packFrames([header, relin, galois]);
    return this._upload;
  }

  /**
   * Fresh seeded symmetric encryptions at the top level, scale 2^scale_bits, in TenSEAL's format.
   * @param {ArrayLike<number>[]} vectors each of `slots` values
   * @returns {Uint8Array[]}
   */
  encrypt(vectors) {
    const none = this.seal.ComprModeType.none;
    return vectors.map((v) => {
      const pt = this.encoder.encode(Float64Array.from(v), this.scale);
      const ser = this.encryptor.encryptSymmetricSerializable(pt);
      const bytes = toTenseal(ser.saveArray(none), 'ciphertext');
      ser.delete();
      pt.delete();
      return bytes;
    });
  }

  /** Upper bound on one ciphertext's uncompressed bytes (a server ciphertext above it is refused). */
  maxCiphertextBytes() {
    return 2 * this.params.poly_modulus_degree * this.params.coeff_mod_bit_sizes.length * 8 + 4096;
  }

  /**
   * Decrypt TenSEAL ciphertexts (zstd, SEAL 4.3 headers); SEAL validates each against the parameters.
   * @param {Uint8Array[]} payloads
   * @returns {Float64Array[]}
   */
  decrypt(payloads) {
    const limit = this.maxCiphertextBytes();
    return payloads.map((bytes, i) => {
      if (bytes.length > limit) throw new Error(`server ciphertext ${i} has ${bytes.length} bytes; none of these parameters exceeds ${limit}`);
      const ct = this.seal.CipherText();
      try {
        ct.loadArray(this.context, fromTenseal(bytes, 'ciphertext'));
      } catch (exc) {
        ct.delete();
        throw new Error(`server ciphertext ${i} does not load under the bundle's parameters (${/** @type {Error} */ (exc).message ?? exc})`);
      }
      if (ct.size !== 2) { ct.delete(); throw new Error(`server ciphertext ${i} has ${ct.size} polynomials, not 2`); }
      const pt = this.decryptor.decrypt(ct);
      const values = Float64Array.from(this.encoder.decode(pt));
      pt.delete();
      ct.delete();
      return values;
    });
  }

  delete() {
    for (const o of [this.encoder, this.encryptor, this.decryptor, this.keygen, this.publicKey, this.secretKey, this.context]) o?.delete?.();
  }
}
