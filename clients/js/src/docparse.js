/**
 * Reads the machine-readable parts of docs/protocol.md: the version, the generated tables (quantities,
 * layouts, tensors) and the security bounds of section 12. Used by tools/gen_tables.mjs.
 * @module docparse
 */

/** @param {string} doc @param {string} name @returns {string[][]} */
function section(doc, name) {
  const begin = doc.indexOf(`<!-- generated:${name} `);
  const end = doc.indexOf(`<!-- end generated:${name} -->`);
  if (begin < 0 || end < begin) throw new Error(`docs/protocol.md lacks the table ${name}`);
  return doc.slice(begin, end).split('\n').filter((l) => l.startsWith('|')).slice(2)
    .map((l) => l.slice(1, -1).split(' | ').map((c) => c.trim().replace(/^`(.*)`$/, '$1')));
}

/** @param {string} doc */
export function parseProtocolDoc(doc) {
  const version = /Protocol version \*\*`([^`]+)`\*\*/.exec(doc)?.[1];
  if (!version) throw new Error('docs/protocol.md names no protocol version');
  const quantities = section(doc, 'quantities').map(([name, formula]) => ({ name, formula }));
  /** @type {Record<string, {slot: string, frames: string, indices: string, holds: string}>} */
  const layouts = {};
  for (const [name, , indices, holds, slot, frames] of section(doc, "layouts")) layouts[name] = { slot, frames, indices, holds };
  const tensors = section(doc, 'tensors').map(([kind, direction, position, name, layout, features]) => ({
    kind, direction, position: Number(position), name, layout, features,
  }));
  const sec = /`sum\(coeff_mod_bit_sizes\) <=`\s+([\d,\s]+?)\s+bits for N = (\d+) \.\.\. (\d+)/.exec(doc);
  if (!sec) throw new Error('docs/protocol.md lacks the security bounds');
  /** @type {Record<string, number>} */
  const maxBits128 = {};
  sec[1].split(',').map(Number).forEach((b, i) => { maxBits128[String(Number(sec[2]) << i)] = b; });
  const blocks = /`block\(n\)` = the smallest of ([\d, ]+) that/.exec(doc);
  const tokenBlocks = (blocks ? blocks[1] : '').split(',').map((s) => Number(s.trim())).filter(Boolean);
  const cycle = /kind\s+`\(([^)]+)\)\[\(r - 1\) % 4\]`/.exec(doc);
  const roundCycle = cycle ? cycle[1].split(',').map((s) => s.trim().replace(/"/g, '')).filter(Boolean) : [];
  return { version, quantities, layouts, tensors, maxBits128, tokenBlocks, roundCycle };
}
