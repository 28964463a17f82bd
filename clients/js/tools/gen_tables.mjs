// Reads docs/protocol.md's tables into src/protocol_tables.js (run: node tools/gen_tables.mjs [--check]).
import fs from 'node:fs';
import { fileURLToPath } from 'node:url';
import { parseProtocolDoc } from '../src/docparse.js';

const here = fileURLToPath(new URL('.', import.meta.url));
const doc = fs.readFileSync(`${here}/../../../docs/protocol.md`, 'utf8');
const out = `${here}/../src/protocol_tables.js`;
const text = '// Generated from docs/protocol.md by tools/gen_tables.mjs; test/spec.test.js checks it is current.\n'
  + `export const TABLES = ${JSON.stringify(parseProtocolDoc(doc), null, 1)};\n`;
if (process.argv.includes('--check')) {
  if (fs.readFileSync(out, 'utf8') !== text) { console.error('src/protocol_tables.js is stale'); process.exit(1); }
} else fs.writeFileSync(out, text);
