/**
 * cipherbert JavaScript client (ES module). See client.js; docs/protocol.md is the wire it speaks.
 * @module cipherbert-client
 */
export { Client, CipherbertError, memoryKeyStore, ROUND_TOKEN_HEADER, FRAMES_MEDIA_TYPE } from './client.js';
export { Keys, loadSeal } from './crypto.js';
export { Embedder, parseSafetensors } from './embed.js';
export { packFrames, unpackFrames, FrameError } from './cbf1.js';
export { PROTOCOL, TABLES, quantities, roundTensors } from './spec.js';
export { TrustError, RoundGuard, checkSecurity } from './trust.js';
export { ROUND_HANDLERS, answerRound } from './rounds.js';
export { toTenseal, fromTenseal } from './sealwire.js';
export { indexedDbKeyStore } from './idbstore.js';
