/**
 * A KeyStore in IndexedDB (browsers and Web Workers): the secret key, the key id and the bundle pin
 * stay in this origin's storage and are never sent anywhere.
 * @module idbstore
 */

/**
 * @param {string} [dbName]
 * @returns {import('./client.js').KeyStore}
 */
export function indexedDbKeyStore(dbName = 'cipherbert') {
  /** @type {Promise<IDBDatabase>|null} */
  let opened = null;
  const db = () => (opened ??= new Promise((resolve, reject) => {
    const req = indexedDB.open(dbName, 1);
    req.onupgradeneeded = () => req.result.createObjectStore('keys');
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  }));
  /** @param {IDBTransactionMode} mode @param {(s: IDBObjectStore) => IDBRequest} op */
  const run = async (mode, op) => {
    const store = (await db()).transaction('keys', mode).objectStore('keys');
    return new Promise((resolve, reject) => {
      const req = op(store);
      req.onsuccess = () => resolve(req.result);
      req.onerror = () => reject(req.error);
    });
  };
  return {
    get: (k) => run('readonly', (s) => s.get(k)),
    put: async (k, v) => { await run('readwrite', (s) => s.put(v, k)); },
    delete: async (k) => { await run('readwrite', (s) => s.delete(k)); },
  };
}
