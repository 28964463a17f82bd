// Generated from docs/protocol.md by tools/gen_tables.mjs; test/spec.test.js checks it is current.
export const TABLES = {
 "version": "cipherbert-rounds/4",
 "quantities": [
  {
   "name": "n",
   "formula": "input"
  },
  {
   "name": "S",
   "formula": "poly_modulus_degree // 2"
  },
  {
   "name": "H",
   "formula": "hidden_size"
  },
  {
   "name": "I",
   "formula": "intermediate_size"
  },
  {
   "name": "heads",
   "formula": "num_heads"
  },
  {
   "name": "dh",
   "formula": "H // heads"
  },
  {
   "name": "n_p",
   "formula": "block(n)"
  },
  {
   "name": "B",
   "formula": "max(n_p, dh)"
  },
  {
   "name": "C",
   "formula": "cdiv(n, 32)"
  },
  {
   "name": "L",
   "formula": "num_labels"
  }
 ],
 "layouts": {
  "FM": {
   "slot": "(t // 32) * cdiv(32 * F, S) * S + f * 32 + t % 32",
   "frames": "C * cdiv(32 * F, S)",
   "indices": "t in 0..n-1, f in 0..F-1",
   "holds": "X[t, f]"
  },
  "SL": {
   "slot": "(h * n + k) * B + i",
   "frames": "cdiv(heads * n * B, S)",
   "indices": "h in 0..heads-1, k in 0..n-1, i in 0..n-1",
   "holds": "M[h, k, i] (key k, query i)"
  },
  "TM": {
   "slot": "(h * n + k) * B + d",
   "frames": "cdiv(heads * n * B, S)",
   "indices": "h in 0..heads-1, k in 0..n-1, d in 0..dh-1",
   "holds": "X[k, h * dh + d]"
  }
 },
 "tensors": [
  {
   "kind": "start",
   "direction": "client",
   "position": 1,
   "name": "E",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "scores",
   "direction": "server",
   "position": 1,
   "name": "Q~",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "scores",
   "direction": "server",
   "position": 2,
   "name": "K~",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "scores",
   "direction": "client",
   "position": 1,
   "name": "R",
   "layout": "SL",
   "features": "-"
  },
  {
   "kind": "scores",
   "direction": "client",
   "position": 2,
   "name": "K~",
   "layout": "TM",
   "features": "-"
  },
  {
   "kind": "context",
   "direction": "server",
   "position": 1,
   "name": "A~",
   "layout": "SL",
   "features": "-"
  },
  {
   "kind": "context",
   "direction": "server",
   "position": 2,
   "name": "V~",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "context",
   "direction": "client",
   "position": 1,
   "name": "P",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "context",
   "direction": "client",
   "position": 2,
   "name": "A~",
   "layout": "SL",
   "features": "-"
  },
  {
   "kind": "refresh",
   "direction": "server",
   "position": 1,
   "name": "X~",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "refresh",
   "direction": "client",
   "position": 1,
   "name": "X~",
   "layout": "FM",
   "features": "H"
  },
  {
   "kind": "logits",
   "direction": "server",
   "position": 1,
   "name": "L",
   "layout": "slot 0",
   "features": "-"
  },
  {
   "kind": "token_logits",
   "direction": "server",
   "position": 1,
   "name": "T",
   "layout": "FM",
   "features": "L"
  }
 ],
 "maxBits128": {
  "1024": 27,
  "2048": 54,
  "4096": 109,
  "8192": 218,
  "16384": 438,
  "32768": 881
 },
 "tokenBlocks": [
  32,
  64,
  128
 ],
 "roundCycle": [
  "scores",
  "context",
  "refresh",
  "refresh"
 ]
};
