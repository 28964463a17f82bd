// The page's Web Worker: the whole client side runs here (keygen, encryption, rounds, decryption);
// keys are kept in IndexedDB. The page sends {type: 'classify', text, apiKey} and gets progress,
// a result or an error back; it never sees a key.
import { Client, indexedDbKeyStore } from '/ui/src/index.js';

/** @type {Map<string, Client>} */
const clients = new Map();
const keyStore = indexedDbKeyStore();

self.onmessage = async (event) => {
  const { id, type, text, apiKey } = event.data;
  const post = (/** @type {any} */ msg) => self.postMessage({ id, ...msg });
  try {
    if (!clients.has(apiKey)) {
      clients.set(apiKey, new Client(self.location.origin, apiKey, { keyStore, progress: (p) => post({ type: 'progress', ...p }) }));
    }
    const client = /** @type {Client} */ (clients.get(apiKey));
    if (type === 'keys') {
      const t0 = performance.now();
      const keyId = await client.registerKeys();
      const session = await client.session();
      post({ type: 'keys', keyId, keygenSeconds: session.keygenSeconds, seconds: (performance.now() - t0) / 1000, keyBytes: client.keyUploadBytes });
    } else {
      post({ type: 'result', result: await client.classify(text) });
    }
  } catch (exc) {
    const e = /** @type {any} */ (exc);
    if (e?.status === 401) clients.delete(apiKey);
    post({ type: 'error', message: e?.message ?? String(exc), code: e?.code ?? null, status: e?.status ?? null });
  }
};
