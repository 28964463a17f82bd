"""Binary framing for ciphertexts and keys on the wire: no base64, no JSON around megabytes.

A message is b"CBF1", a u32 frame count, then for each frame a u64 length and its bytes. Both the
service and the client SDK use this module; it depends on nothing but the standard library.
"""

from __future__ import annotations

import struct

from he_models.errors import ClientInputError

MAGIC = b"CBF1"
DEFAULT_MAX_FRAMES = 64
DEFAULT_MAX_BYTES = 256 * 1024 * 1024


class WireError(ClientInputError):
    """Malformed, truncated or oversized framed data from a client."""


def pack_frames(frames: list[bytes]) -> bytes:
    parts = [MAGIC, struct.pack("<I", len(frames))]
    for frame in frames:
        parts.append(struct.pack("<Q", len(frame)))
        parts.append(bytes(frame))
    return b"".join(parts)


def unpack_frames(data: bytes, max_frames: int = DEFAULT_MAX_FRAMES, max_bytes: int = DEFAULT_MAX_BYTES) -> list[bytes]:
    if len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < 8 or data[:4] != MAGIC:
        raise WireError("not a framed message (expected magic b'CBF1')")
    (count,) = struct.unpack_from("<I", data, 4)
    if count > max_frames:
        raise WireError(f"{count} frames exceed the limit of {max_frames}")
    frames: list[bytes] = []
    offset = 8
    view = memoryview(data)
    for index in range(count):
        if offset + 8 > len(data):
            raise WireError(f"truncated message: frame {index} header missing")
        (length,) = struct.unpack_from("<Q", data, offset)
        offset += 8
        if offset + length > len(data):
            raise WireError(f"truncated message: frame {index} declares {length} bytes, {len(data) - offset} remain")
        frames.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise WireError(f"{len(data) - offset} trailing bytes after {count} frames")
    return frames
