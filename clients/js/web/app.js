// The page's main thread: UI only. Everything cryptographic happens in worker.js.
const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const worker = new Worker('/ui/worker.js', { type: 'module' });
const apiKey = /** @type {HTMLInputElement} */ ($('apikey'));
apiKey.value = sessionStorage.getItem('cipherbert-api-key') ?? new URLSearchParams(location.hash.slice(1)).get('key') ?? '';
let nextId = 0;
/** @type {Map<number, {resolve: (v: any) => void, reject: (e: any) => void}>} */
const pending = new Map();

const mb = (/** @type {number} */ b) => `${(b / 1e6).toFixed(2)} MB`;
const STAGES = { bundle: 0.05, keygen: 0.15, upload: 0.3, encrypt: 0.35 };

worker.onmessage = (event) => {
  const msg = event.data;
  const p = pending.get(msg.id);
  if (msg.type === 'progress') {
    $('status').textContent = msg.message;
    const bar = /** @type {HTMLProgressElement} */ ($('bar'));
    bar.hidden = false;
    bar.value = msg.stage === 'round' ? 0.35 + 0.6 * (msg.round / msg.rounds) : msg.stage === 'decrypt' ? 0.98 : (STAGES[/** @type {keyof typeof STAGES} */ (msg.stage)] ?? bar.value);
    return;
  }
  if (!p) return;
  pending.delete(msg.id);
  if (msg.type === 'error') p.reject(msg);
  else p.resolve(msg);
};

/** @param {any} msg */
function ask(msg) {
  const id = nextId++;
  return new Promise((resolve, reject) => {
    pending.set(id, { resolve, reject });
    worker.postMessage({ id, apiKey: apiKey.value.trim(), ...msg });
  });
}

/** A message a person can act on. @param {{message: string, code?: string, status?: number}} e */
function explain(e) {
  if (e.code === 'unreachable') return `The cipherbert server does not answer (${location.origin}). Is it running? Details: ${e.message}`;
  if (e.status === 401) return 'The server refused this API key. Check it (the operator sets them with CIPHERBERT_API_KEYS).';
  if (e.code === 'unknown_key') return 'Your registered evaluation key expired or was deleted on the server, and registering a new one failed. Try again.';
  if (e.status === 429) return 'The server is rate limiting this API key; wait a moment and try again.';
  return e.message;
}

$('go').addEventListener('click', async () => {
  const button = /** @type {HTMLButtonElement} */ ($('go'));
  button.disabled = true;
  $('error').hidden = true;
  sessionStorage.setItem('cipherbert-api-key', apiKey.value.trim());
  try {
    if (!apiKey.value.trim()) throw { message: 'Enter the API key first.' };
    const keys = await ask({ type: 'keys' });
    document.body.dataset.keygenSeconds = String(keys.keygenSeconds);
    const { result } = await ask({ type: 'classify', text: /** @type {HTMLTextAreaElement} */ ($('text')).value });
    show(result);
    $('status').textContent = `done: ${result.rounds} encrypted rounds`;
  } catch (e) {
    $('error').textContent = explain(/** @type {any} */ (e));
    $('error').hidden = false;
    $('status').textContent = '';
  } finally {
    button.disabled = false;
    /** @type {HTMLProgressElement} */ ($('bar')).hidden = true;
  }
});

/** @param {any} r */
function show(r) {
  $('label').textContent = r.label;
  const labels = r.labels;
  $('probs').innerHTML = '';
  r.probabilities.forEach((/** @type {number} */ p, /** @type {number} */ i) => {
    const row = document.createElement('tr');
    row.innerHTML = `<td>${labels[i]}</td><td>${(100 * p).toFixed(1)}%</td><td class="barcell"><div style="width:${(100 * p).toFixed(1)}%"></div></td>`;
    $('probs').append(row);
  });
  $('latency').textContent = `${r.latency.toFixed(2)} s`;
  $('up').textContent = mb(r.bytes.up);
  $('down').textContent = mb(r.bytes.down);
  $('keys').textContent = r.bytes.keys ? `${mb(r.bytes.keys)} (once)` : 'registered earlier';
  $('rounds').textContent = String(r.rounds);
  $('logits').textContent = r.logits.map((/** @type {number} */ x) => x.toFixed(4)).join(', ');
  $('result').hidden = false;
  document.body.dataset.result = JSON.stringify(r);
}
