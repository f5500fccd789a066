"""The `.vdmz` container: header, size table, file names, payload and CRC-32 (no TensorFlow).

A file is, in this order (little-endian):

- the header (`_HEADER`, 134 bytes): magic `VDMZ`, format version, the model's image shape
  (the tile shape), the number of images, T, the batch size, `latent_bins`, `window`, the
  encoder's intra-op thread count, the pseudo-random initial words of the ANS stack and how many
  of them the payload shares (leaves out), the sizes of the names block, the payload and the
  size table, the seed rows, the mode (`BITS_BACK` or `CONVENTIONAL`), and the SHA-256 of the
  model's weights and of its outputs on a fixed probe batch (`BitsBackCodec`);
- the size table (`_pack_sizes`): (H, W, conventional bytes) per image, uint32, deflated;
- the file names (`_pack_names`): front-coded and deflated, 92 bytes for the 297 names
  digit0000.png .. digit0296.png (0.04 bpd of those 8x8 images);
- the payload: in mode `BITS_BACK` the ANS stack above the shared initial words (uint32 words;
  the first image's top `seed_rows` rows, PNG or WebP-lossless, lie at its bottom); in mode
  `CONVENTIONAL` one PNG or WebP-lossless file per image;
- a CRC-32 of everything before it.

Versions: 4 (written) as 3, with batches budgeted by the bits on the stack (`tiles._Budget`);
3: images of any size (tiles, a size table), a seed, or the conventional code alone; 2: one
image shape, names front-coded and deflated; 1: names raw. All four decode bit for bit.
"""

import dataclasses
import os
import struct
import zlib

import numpy as np

MAGIC = b"VDMZ"
FORMAT_VERSION = 4
# magic, version, tile H, W, C, count, num_steps, batch_size, latent_bins, window, intra-op threads,
# random initial words, shared words, names bytes, payload bytes, sizes bytes, seed rows, mode,
# SHA-256 of the weights and of the probe.
_HEADER = struct.Struct("<4sH16I32s32s")
# Versions 1 and 2: ... threads, initial words, shared words, names bytes, payload words, SHA-256s.
_HEADER_V2 = struct.Struct("<4sH13I32s32s")
_CRC = struct.Struct("<I")
BITS_BACK, CONVENTIONAL = 0, 1  # the modes of a version-3 file (`Header.mode`)


class CompressionError(ValueError):
    """Compressed data that cannot be decoded: not a vdm_tf file, truncated, corrupted."""


class ModelMismatchError(CompressionError):
    """The data was encoded with another model (or on a machine that computes different bits)."""


@dataclasses.dataclass(frozen=True)
class Header:
    """What a compressed file says about itself (`read_header`).

    `image_shape` is the model's (the tile shape), `sizes` each image's (H, W). In mode
    `BITS_BACK` the payload is the ANS stack above the shared initial words (uint32 words); the
    top `seed_rows` pixel rows of the first image (`seed_bytes` bytes of PNG or WebP-lossless)
    are the bottom of the stack. `initial_bits` is the one-off cost of the first pops beyond the
    seed (pseudo-random initial words the message changed), `net_bits` the growth of the stack
    over the seed (the bits-back codelength of the tiles, about their discrete-time -ELBO). In
    mode `CONVENTIONAL` the payload is one PNG or WebP-lossless file per image, `lengths` bytes each.
    """

    image_shape: tuple
    count: int
    num_steps: int
    batch_size: int
    latent_bins: int
    window: int
    threads: int
    initial_words: int
    shared_words: int
    weights_sha256: bytes
    probe_sha256: bytes
    names: tuple
    names_bytes: int  # the size of the stored names block
    payload: np.ndarray  # uint32 words (BITS_BACK) or uint8 bytes (CONVENTIONAL)
    sizes: tuple = ()  # (H, W) per image
    lengths: tuple = ()  # conventional bytes per image: all of it (CONVENTIONAL), the seed (BITS_BACK)
    seed_rows: int = 0
    mode: int = BITS_BACK
    version: int = FORMAT_VERSION
    sizes_bytes: int = 0

    @property
    def num_dims(self):
        return sum(height * width for height, width in self.sizes) * self.image_shape[-1]

    @property
    def seed_bytes(self):
        return self.lengths[0] if self.mode == BITS_BACK and self.lengths else 0

    @property
    def seed_words(self):
        """The stack words the seed takes: its bytes, zero-padded to whole words, and a word 1 on top."""
        return -(-self.seed_bytes // 4) + 1 if self.seed_bytes else 0

    @property
    def initial_bits(self):
        return 32 * (self.initial_words - self.shared_words) if self.mode == BITS_BACK else 0

    @property
    def net_bits(self):
        if self.mode != BITS_BACK:
            return 0
        return 32 * (self.shared_words + len(self.payload) - self.initial_words - self.seed_words)


def pack(image_shape, mode, count, sizes, lengths, names, payload, *, num_steps=1, batch_size=1, latent_bins=1,
         window=1, threads=1, initial=0, shared=0, seed_rows=0, weights_sha256=bytes(32),
         probe_sha256=bytes(32)):  # fmt: skip
    """The bytes of a file of the current format version (the fields as `Header` names them)."""
    sizes_block, names_block = _pack_sizes(sizes, lengths), _pack_names(names)
    header = _HEADER.pack(
        MAGIC, FORMAT_VERSION, *image_shape, count, num_steps, batch_size, latent_bins, window, threads, initial,
        shared, len(names_block), len(payload), len(sizes_block), seed_rows, mode, weights_sha256, probe_sha256,
    )  # fmt: skip
    body = header + sizes_block + names_block + payload
    return body + _CRC.pack(zlib.crc32(body))


def read_header(data):
    """Parses and checks a compressed file (magic, version, length, CRC-32); returns a `Header`.

    Raises:
        CompressionError: not a vdm_tf compressed file, another format version, truncated or corrupted.
    """
    data = bytes(data)
    if len(data) < 4 or data[:4] != MAGIC:
        raise CompressionError(f"Not a vdm_tf compressed file: it does not start with {MAGIC!r}.")
    if len(data) < 6:
        raise CompressionError(f"Truncated file: {len(data)} bytes, shorter than the header.")
    (version,) = struct.unpack_from("<H", data, 4)
    if version not in (1, 2, 3, FORMAT_VERSION):
        raise CompressionError(f"Format version {version}; this vdm_tf reads versions 1 to {FORMAT_VERSION}.")
    layout = _HEADER if version >= 3 else _HEADER_V2
    if len(data) < layout.size + _CRC.size:
        raise CompressionError(f"Truncated file: {len(data)} bytes, shorter than the {layout.size}-byte header.")
    fields = layout.unpack_from(data)
    height, width, channels, count, num_steps, batch_size, bins, window, threads = fields[2:11]
    initial, shared, names_bytes, payload_bytes = fields[11:15]
    sizes_bytes, seed_rows, mode = fields[15:18] if version >= 3 else (0, 0, BITS_BACK)
    if version < 3:
        payload_bytes *= 4  # versions 1 and 2 count payload words
    weights_sha, probe_sha = fields[-2:]
    expected = layout.size + sizes_bytes + names_bytes + payload_bytes + _CRC.size
    if len(data) != expected:
        state = "Truncated" if len(data) < expected else "Corrupted"
        raise CompressionError(f"{state} file: {len(data)} bytes, the header announces {expected}.")
    (crc,) = _CRC.unpack_from(data, expected - _CRC.size)
    if zlib.crc32(data[: expected - _CRC.size]) != crc:
        raise CompressionError("Corrupted file: the CRC-32 checksum does not match its contents.")
    if not (1 <= batch_size and min(count, num_steps, bins, window, threads, height, width, channels) >= 1):
        raise CompressionError(f"Corrupted header: impossible fields {fields[2:11]}.")
    if mode not in (BITS_BACK, CONVENTIONAL) or (version < 3 and batch_size > count):
        raise CompressionError(f"Corrupted header: impossible fields {fields[2:18]}.")
    if mode == BITS_BACK and (not shared <= initial or shared * 4 + payload_bytes < 4 or payload_bytes % 4):
        raise CompressionError(
            f"Corrupted header: {shared} shared of {initial} initial words, {payload_bytes} more bytes."
        )
    position = layout.size
    if version >= 3:
        table = _unpack_sizes(data[position : position + sizes_bytes], count)
        sizes, lengths = tuple(table[:, :2].tolist()), tuple(table[:, 2].tolist())
        sizes = tuple(tuple(size) for size in sizes)
        if min(min(size) for size in sizes) < 1 or (mode == CONVENTIONAL and sum(lengths) != payload_bytes):
            raise CompressionError("Corrupted file: the size table does not match the payload.")
        if mode == BITS_BACK and (seed_rows > sizes[0][0] or (seed_rows == 0) != (lengths[0] == 0)):
            raise CompressionError("Corrupted file: the seed rows do not match the size table.")
    else:
        sizes, lengths = ((height, width),) * count, ()
    position += sizes_bytes
    block = data[position : position + names_bytes]
    if version == 1:
        names = tuple(block.decode("utf-8", "surrogateescape").split("\n")) if names_bytes else ()
    else:
        names = _unpack_names(block)
    if len(names) not in (0, count):
        raise CompressionError(f"Corrupted file: {len(names)} file names for {count} images.")
    position += names_bytes
    dtype = "<u4" if mode == BITS_BACK else "u1"
    payload = np.frombuffer(data, dtype, payload_bytes // np.dtype(dtype).itemsize, position)
    return Header(
        (height, width, channels), count, num_steps, batch_size, bins, window, threads, initial, shared,
        weights_sha, probe_sha, names, names_bytes, payload.astype(dtype[-2:]).copy(), sizes, lengths, seed_rows,
        mode, version, sizes_bytes,
    )  # fmt: skip


def _pack_sizes(sizes, lengths):
    """The size table of format version 3: (H, W, conventional bytes) per image, uint32, deflated."""
    table = np.column_stack([np.asarray(sizes, np.int64).reshape(-1, 2), lengths]).astype("<u4")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    return deflate.compress(table.tobytes()) + deflate.flush()


def _unpack_sizes(block, count):
    try:
        raw = zlib.decompress(block, -15)
    except zlib.error as error:
        raise CompressionError(f"Corrupted size table: {error}.") from None
    if len(raw) != 12 * count:
        raise CompressionError(f"Corrupted size table: {len(raw)} bytes for {count} images.")
    return np.frombuffer(raw, "<u4").reshape(count, 3).astype(np.int64)


def _check_names(names, count):
    """Raises ValueError unless `names` is empty or `count` strings without newlines."""
    if names and len(names) != count:
        raise ValueError(f"names must be {count} strings, one per image; got {len(names)}.")
    for name in names:
        if not isinstance(name, str) or "\n" in name:
            raise ValueError(f"names must be strings without newlines; got {name!r}.")


def _pack_names(names):
    """The names block of format version 2: the names front-coded, then deflated (zlib, raw).

    Front coding writes each name as the number of leading bytes it shares with the previous
    name (one byte, at most 255), its remaining UTF-8 bytes and a newline; deflate then finds
    what repeats. Sequential names cost a few bits each: the 297 names digit0000.png ..
    digit0296.png take 92 bytes instead of 4157. Names that are not valid UTF-8 (POSIX file
    names are bytes) keep their bytes (surrogateescape).
    """
    block, previous = bytearray(), b""
    for name in names:
        name = name.encode("utf-8", "surrogateescape")
        shared = min(len(os.path.commonprefix([previous, name])), 255)
        block += bytes([shared]) + name[shared:] + b"\n"
        previous = name
    if not block:
        return b""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    return deflate.compress(bytes(block)) + deflate.flush()


def _unpack_names(data):
    """The inverse of `_pack_names`."""
    try:
        block = zlib.decompress(data, -15) if data else b""
    except zlib.error as error:
        raise CompressionError(f"Corrupted file names: {error}.") from None
    names, previous, position = [], b"", 0
    while position < len(block):
        shared, end = block[position], block.find(b"\n", position + 1)
        if end < 0 or shared > len(previous):
            raise CompressionError("Corrupted file names: the names block does not parse.")
        previous = previous[:shared] + block[position + 1 : end]
        names.append(previous.decode("utf-8", "surrogateescape"))
        position = end + 1
    return tuple(names)
