/**
 * CBF1 frame sets (docs/protocol.md, section 2): "CBF1", u32 LE count, then u64 LE length + bytes per frame.
 * @module cbf1
 */

export class FrameError extends Error {}

/**
 * @param {Uint8Array[]} frames
 * @returns {Uint8Array}
 */
export function packFrames(frames) {
  const total = 8 + frames.reduce((s, f) => s + 8 + f.length, 0);
  const out = new Uint8Array(total);
  const view = new DataView(out.buffer);
  out.set([0x43, 0x42, 0x46, 0x31], 0);
  view.setUint32(4, frames.length, true);
  let p = 8;
  for (const f of frames) {
    view.setBigUint64(p, BigInt(f.length), true);
    out.set(f, p + 8);
    p += 8 + f.length;
  }
  return out;
}

/**
 * @param {Uint8Array} buf
 * @param {{maxFrames?: number}} [opts]
 * @returns {Uint8Array[]}
 */
export function unpackFrames(buf, { maxFrames = 4096 } = {}) {
  if (buf.length < 8 || buf[0] !== 0x43 || buf[1] !== 0x42 || buf[2] !== 0x46 || buf[3] !== 0x31) {
    throw new FrameError('not a CBF1 frame set');
  }
  const view = new DataView(buf.buffer, buf.byteOffset, buf.byteLength);
  const count = view.getUint32(4, true);
  if (count > maxFrames) throw new FrameError(`${count} frames exceed the limit of ${maxFrames}`);
  const frames = [];
  let p = 8;
  for (let i = 0; i < count; i++) {
    if (p + 8 > buf.length) throw new FrameError(`truncated length of frame ${i}`);
    const len = Number(view.getBigUint64(p, true));
    p += 8;
    if (p + len > buf.length) throw new FrameError(`frame ${i} is truncated`);
    frames.push(buf.subarray(p, p + len));
    p += len;
  }
  if (p !== buf.length) throw new FrameError(`${buf.length - p} trailing bytes after the frames`);
  return frames;
}
