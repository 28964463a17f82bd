import SEAL from 'node-seal/throws_wasm_node_umd.js';
import fs from 'fs';
import { fromTenseal, toTenseal } from './src/sealwire.js';
const D = '/tmp/s13/';
const seal = await SEAL();
const parms = seal.EncryptionParameters(seal.SchemeType.ckks);
parms.setPolyModulusDegree(8192);
parms.setCoeffModulus(seal.CoeffModulus.Create(8192, Int32Array.from([55,36,36,36,55])));
const ctx = seal.Context(parms, true, seal.SecurityLevel.tc128);
const encoder = seal.CKKSEncoder(ctx);
const expect = Float64Array.from({length: 4096}, (_, i) => Math.sin(i) * 3);
const none = seal.ComprModeType.none;
const mode = process.argv[2];
function decryptWith(sk, bytes) {
  const ct = seal.CipherText(); ct.loadArray(ctx, bytes);
  const dec = seal.Decryptor(ctx, sk);
  return encoder.decode(dec.decrypt(ct));
}
const maxdiff = (a, b) => { let m = 0; for (let i = 0; i < b.length; i++) m = Math.max(m, Math.abs(a[i] - b[i])); return m; };
if (mode === 'py2js') {
  const sk = seal.SecretKey(); sk.loadArray(ctx, fromTenseal(fs.readFileSync(D+'py_sk.bin'), 'secret_key'));
  console.log('py sk loaded');
  console.log('py seeded ct -> js decrypt maxdiff', maxdiff(decryptWith(sk, fromTenseal(fs.readFileSync(D+'py_ct_seeded.bin'), 'ciphertext')), expect));
  console.log('py full ct (level 1 down) -> js decrypt maxdiff', maxdiff(decryptWith(sk, fromTenseal(fs.readFileSync(D+'py_ct_full.bin'), 'ciphertext')), expect));
} else if (mode === 'js2py') {
  const kg = seal.KeyGenerator(ctx);
  const sk = kg.secretKey();
  const steps = Int32Array.from([-1024,-512,-256,-8,1,2,4,8,16,32,64,128,256,512,1024,2048]);
  const t = Date.now();
  const relin = toTenseal(kg.createRelinKeysSerializable().saveArray(none), 'relin_keys');
  const gal = toTenseal(kg.createGaloisKeysSerializable(steps).saveArray(none), 'galois_keys');
  console.log('keygen+translate ms', Date.now() - t, 'relin', relin.length, 'galois', gal.length);
  fs.writeFileSync(D+'js_relin_ts.bin', relin); fs.writeFileSync(D+'js_galois_ts.bin', gal);
  fs.writeFileSync(D+'js_sk_ts.bin', toTenseal(sk.saveArray(none), 'secret_key'));
  fs.writeFileSync(D+'js_sk_native.bin', sk.saveArray(none));
  const enc = seal.Encryptor(ctx, kg.createPublicKey(), sk);
  const ct = toTenseal(enc.encryptSymmetricSerializable(encoder.encode(expect, 2**36)).saveArray(none), 'ciphertext');
  fs.writeFileSync(D+'js_ct_ts.bin', ct);
  console.log('js seeded ct', ct.length);
} else if (mode === 'check') {
  // Python evaluated with the JS keys; decrypt its results with the JS secret key
  const sk = seal.SecretKey(); sk.loadArray(ctx, fs.readFileSync(D+'js_sk_native.bin'));
  const steps = [-1024,-512,-256,-8,1,2,4,8,16,32,64,128,256,512,1024,2048];
  let worst = 0;
  for (const s of steps) {
    const got = decryptWith(sk, fromTenseal(fs.readFileSync(D+`py_rot_${s}.bin`), 'ciphertext'));
    const k = ((s % 4096) + 4096) % 4096;
    const want = Float64Array.from({length: 4096}, (_, i) => expect[(i + k) % 4096]);
    worst = Math.max(worst, maxdiff(got, want));
  }
  console.log('16 rotations with JS galois keys, decrypted in JS: maxdiff', worst);
  const sq = decryptWith(sk, fromTenseal(fs.readFileSync(D+'py_square.bin'), 'ciphertext'));
  console.log('square with JS relin keys: maxdiff', maxdiff(sq, expect.map((x) => x * x)));
}
