"""Lossless compression of images with a trained VDM: bits-back ANS over the discrete-time chain.

    codec = vdm_tf.compression.BitsBackCodec(model, num_steps=250)
    data = codec.encode(x_uint8)                 # bytes; x: [N, H, W, C] or a list of [H_i, W_i, C]
    x_uint8 = codec.decode(data)                 # bit-exact
    python -m vdm_tf.compression encode photo.png -o photo.vdmz      # grey or RGB: a bundled model
    python -m vdm_tf.compression decode photo.vdmz -o DIR            # DIR/photo.png
    python -m vdm_tf.compression encode --model=model.keras a.png b.png -o out.vdmz   # your own model

Images of any size H x W >= 1 x 1 with the model's channel count (L or RGB; palette and alpha
are refused) are coded; without --model grey images use the bundled
`vdm_tf/models/photos_grey.keras` and RGB images `vdm_tf/models/photos.keras`. The command line
checks every input (files, modes, the output paths, the model's path and channels) before it
loads the model. `decode` always writes PNG files, `<stem>.png` for
each stored name (`decoded_file_names`), holding exactly the encoded pixels: for an input in a
lossy format (JPEG) that is the pixels Pillow decoded from it, not the original file's bytes.

## The code

With T steps on the grid t_i = i / T, a VDM is a latent-variable model with latents z_0 .. z_T
(gamma_i = gamma(t_i), alpha_i^2 = sigmoid(-gamma_i), sigma_i^2 = sigmoid(gamma_i), f the pixels
in [-1, 1]):

    generative  p(x, z_0..z_T) = N(z_T; 0, I) prod_i p(z_{i-1} | z_i) p(x | z_0),
    inference   q(z_0..z_T | x) = N(z_0; alpha_0 f, sigma_0^2) prod_i q(z_i | z_{i-1}),

- q(z_i | z_{i-1}) = N((alpha_i / alpha_{i-1}) z_{i-1}, sigma_i^2 c_i), the forward transition,
  with c_i = -expm1(gamma_{i-1} - gamma_i) = 1 - SNR_i / SNR_{i-1};
- p(z_{i-1} | z_i) = N((alpha_{i-1} / alpha_i) (z_i - sigma_i c_i eps_hat(z_i, gamma_i)),
  sigma_{i-1}^2 c_i), VDM's ancestral step (eq. 32-34, `VDM.ancestral_step`);
- p(x | z_0): the discretized decoder of `vdm_tf.images`, a 256-way categorical per pixel.

Bits-back coding (BB-ANS, Townsend et al. 2019) on an ANS stack, in the Bit-Swap order
(Kingma et al. 2019) so that each latent is pushed back right after the next one is popped:

    encode:  pop z_0 ~ q(z_0 | x);  push x with p(x | z_0);
             for i = 1..T: pop z_i ~ q(z_i | z_{i-1}); push z_{i-1} with p(z_{i-1} | z_i);
             push z_T with N(0, I).
    decode:  the exact reverse: pop z_T; for i = T..1: pop z_{i-1} with p(z_{i-1} | z_i),
             push z_i with q(z_i | z_{i-1}); pop x with p(x | z_0); push z_0 with q(z_0 | x).

A pop from q costs -log q bits of the stack (they are "got back"), a push with p adds -log p,
so the stack grows by log q(z | x) - log p(x, z) for the sampled z: in expectation the
discrete-time negative ELBO with T steps (`VDM(..., timesteps=T).elbo`), the sum of the
reconstruction, prior and T diffusion KL terms. Batches of `batch_size` images run through the
chain together (one denoiser call per step, vectorised ANS calls over all their latents); the
steps are a Python loop because each one alternates ANS calls with the network.

## Clean bits

A pop is an exact sample of q only if the bits it reads are uniformly random. Here it reads the
code of the latent pushed just before, and VDM's p(z_{i-1} | z_i) has the variance of the true
posterior q(z_{i-1} | z_i, x), not the larger spread of z_{i-1} around p's own guess: that code
is slightly redundant, the pops draw over-dispersed latents, and the excess compounds along the
chain (measured on Gaussian data: +7% over the -ELBO at T = 50, +2% at T = 200, not shrinking
with T). So before every pop from q the top of the stack, as many bits as the pop will read on
average, is XORed with a pseudo-random mask keyed by (batch, level) (`_whiten`, an involution
that the decoder applies again at the mirror point); the popped latents are then distributed as
q, and the codelength matches the -ELBO to about 0.2% (tests/test_compression.py).

## Any size: tiles

The model's image shape is the tile size. Each image is cut, rows first, into tiles at
multiples of it; at the right and bottom borders the crops are smaller and run through the
network at their own size (the ScoreUNet is fully convolutional: no padding pixel is coded,
and a border crop costs what its pixels cost under a model that sees less context). Crops of
one shape, from every image of the message, are coded in batches together (`_tile_plan`), one
traced network per (batch size, crop shape). The container stores each image's H x W.

## Few images: the seed and the fallback

The first pops of a message read bits that nothing has pushed yet (the initial bits below,
5-10 bits per dimension of the first batch). Two things keep a short message cheap:

- the seed: the top rows of the first image (whole tile rows, until their PNG holds about half
  a full batch's initial bits, or the whole image if it is shorter) are coded as PNG or
  WebP-lossless (the smaller), and those bytes are the bottom of the ANS stack: the first pops
  read them, and the decoder, which pops everything back, finds them there at the end. Bits the
  message carries anyway pay for the first pops.
- the budgeted ramp (format version 4, `_Budget`): a batch's first pops read about
  h(q(z_0 | x)) + h(q(z_1 | z_0)) bits per dimension (8-9 on the grid of `latent_bins` = 4)
  before it pushes anything, while a seed holds the first image's conventional rate (2-5 bits
  per dimension of its own rows). So each batch takes as many crops as the bits then on the
  stack pay for: the seed's, plus what the batches before left (assumed to be the seed's rate
  per dimension, at most half the first pops': the decoder must compute the same plan). When
  not even one tile fits, the next tile is cut into quarters (16x16, then 8x8, 4x4 for the
  32x32 models), coded first: a message of 32x32 patches starts with crops of its second patch,
  and batches grow from there instead of 1, 2, 4, ... whole tiles (version 3), whose first tile
  dug 2-3 KB into the pseudo-random words.
- the fallback: the encoder also writes every image as PNG or WebP-lossless and keeps the
  smaller file; a message is never larger than the images' PNG files plus the container's header,
  size table and names (a one-image message smaller than a tile row is always the fallback).

## What a file holds besides the -ELBO

- the discretisation of the latents (below): no error measurable above the Monte-Carlo noise
  (about 0.1%) from latent_bins = 2 up on Gaussian data;
- the initial bits: the first pops of a message (z_0 and z_1 of the first batch, about
  `n_1 D (h(q(z_0 | x)) + h(q(z_1 | z_0)) - h(x | z_0))` bits, with n_1 the tiles of a batch and h
  the entropies on the grid; 5 to 10 bits per dimension of the first batch) come from a stack
  that holds nothing yet; with a seed the budgeted ramp keeps them near zero. The stack starts
  with fixed pseudo-random words and the file keeps
  only the words the message changed, so this is paid once per message: batches are chained on
  one stack and later batches pop the bits earlier ones pushed, and the seed's bytes lie below
  them (above). Smaller batches cost less here.
  `read_header(data).initial_bits` reports it, `.net_bits` the growth of the stack;
- the header (134 bytes), the size table (deflated), the file names (front-coded and deflated,
  `_pack_names`: 92 bytes for the 297 names digit0000.png .. digit0296.png, 0.04 bpd of those
  8x8 images) and a CRC-32.

## The latent grid

Each latent z_i lives on its own grid z_i = k delta_i, k an integer, with
delta_i = min(std of q(z_i | .), std of p(z_i | .)) / latent_bins (the narrowest Gaussian that codes
z_i, so each covers at least `latent_bins` grid points per standard deviation). A Gaussian
N(m, s^2) over z_i codes the integer k - round(m / delta_i) with constriction's QuantizedGaussian
of mean m / delta_i - round(m / delta_i) and std s / delta_i, restricted to a window of
+-ceil(window * s / delta_i) symbols (a finite alphabet keeps the cost of constriction's
probability floor, 2^-24 per symbol, negligible). Pops come from the window. A value outside the
window of a push (a p that misses, e.g. an untrained model) is coded as an escape symbol followed
by its offset in 32 raw bits, so any model codes losslessly, only less compactly.

## Determinism

Encoder and decoder must compute bit-identical distributions. Everything that depends on the
latents is either exact float64 arithmetic in NumPy (+, -, *, / and rounding, which IEEE-754
fixes) or one traced `tf.function` per batch size (the denoiser and the decoder's softmax at a
fixed batch shape [batch_size, H, W, C], float32; the last batch is padded with zeros, and rows
of a batch do not interact), so decoding runs the same graph on the same inputs as encoding.
TensorFlow's CPU kernels then give the same bits run after run and process after process on the
same kind of machine: same TensorFlow build, CPU instruction set, oneDNN setting
(TF_ENABLE_ONEDNN_OPTS, which vdm_tf turns on when imported before TensorFlow) and intra-op
thread count (on this project's 2-core CPU the demo model's outputs differ between 1 and 2
threads: reductions split otherwise add in another order). The header records the encoder's
thread count and the command line sets it before TensorFlow starts. The command line also turns
on `tf.config.experimental.enable_op_determinism()` (it does not change these CPU kernels' bits
but forbids nondeterministic ones); the library leaves that global switch to its caller.
Nothing is assumed unchecked: the header carries a SHA-256 of the model's weights and a SHA-256
of the grid constants and of the network's outputs on a fixed probe batch, so a different
model, or a process that computes different bits, fails with `ModelMismatchError` before
decoding; a CRC-32 covers the whole file; and the decoder checks that the stack ends exactly
where the encoder started it.

Reference: Townsend, Bird, Barber (2019), "Practical lossless compression with latent variables
using bits back coding" (BB-ANS); Kingma, Abbeel, Ho (2019), "Bit-Swap"; Kingma et al. (2021),
"Variational Diffusion Models" (its bits-back compression experiment); Bamler (2022), `constriction`.
"""

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib

import constriction
import keras
import numpy as np
import tensorflow as tf

from vdm_tf import evaluation, images, samplers
from vdm_tf.vdm import VDM

MAGIC = b"VDMZ"
# Version 4: as version 3, batches ramp up as the bits on the stack pay for their first pops (`_Budget`).
# Version 3: images of any size (tiles of the model's shape, a size table), a conventionally coded
# seed region whose bytes are the stack's initial bits, or the conventional code alone. Version 2:
# one image shape, names front-coded and deflated (`_pack_names`); version 1: names raw. 1 and 2 decode.
FORMAT_VERSION = 4
# magic, version, tile H, W, C, count, num_steps, batch_size, latent_bins, window, intra-op threads,
# random initial words, shared words, names bytes, payload bytes, sizes bytes, seed rows, mode,
# SHA-256 of the weights and of the probe.
_HEADER = struct.Struct("<4sH16I32s32s")
# Versions 1 and 2: ... threads, initial words, shared words, names bytes, payload words, SHA-256s.
_HEADER_V2 = struct.Struct("<4sH13I32s32s")
_CRC = struct.Struct("<I")
_INITIAL_SEED = 0x5644_4D5A  # the pseudo-random words the stack starts with (PCG64 raw stream)
_PRECISION_BITS = 24  # constriction's ANS precision: one symbol costs at most 24 bits
_MAX_ALPHABET = 1 << 20
_RAW_HALF = constriction.stream.model.Uniform(1 << 16)  # an escaped offset: two 16-bit halves
_PIXELS = constriction.stream.model.Categorical(perfect=False)
BITS_BACK, CONVENTIONAL = 0, 1  # the modes of a version-3 file (`Header.mode`)
_CONVENTIONAL_FORMATS = ("PNG", "WEBP")  # the lossless codes of seeds and conventional files (Pillow)


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


def intra_op_threads():
    """TensorFlow's intra-op thread count in this process (its default: the CPUs this process may use)."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


def _initial_words(num_words):
    """The fixed pseudo-random words the ANS stack starts with (last word non-zero, as ANS needs)."""
    words = np.random.PCG64(_INITIAL_SEED).random_raw((num_words + 1) // 2).view("<u4")[:num_words].astype(np.uint32)
    words[-1] |= 1
    return words


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Tiles coded together: crops of one shape (h, w), run through the network `padded` at a time."""

    shape: tuple
    tiles: tuple  # (image, top, left) of each crop
    padded: int  # the traced batch size: len(tiles) rounded up to a power of two (the batch size at most)


@dataclasses.dataclass(frozen=True)
class _Budget:
    """The budgeted ramp of format version 4 (`_tile_plan`), all in bits; encoder and decoder
    compute it from the file's header (`BitsBackCodec._budget`).

    seed: the bits above the pseudo-random words before the first batch (the seed's bytes).
    first_pops: bits per dimension the first pops of a batch read before it pushes anything,
        h(q(z_0 | x)) + h(q(z_1 | z_0)) on the grid (`_Grid.q_bits[0] + q_bits[1]`).
    net: bits per dimension a coded batch is assumed to leave on the stack (its -ELBO): the
        seed's own conventional rate, at most `first_pops` / 2 (batches then grow by a factor
        of at most 1.5); a model that codes better than that digs into the pseudo-random words.
    """

    seed: float
    first_pops: float
    net: float


_MIN_CROP = 4  # the budgeted ramp splits crops into quarters down to this side


def _tile_plan(sizes, tile, seed_rows, batch_size, ramp=True, budget=None):
    """The batches of a message: every image cut into tiles of the model's shape, in coding order.

    Image i of size H x W is cut, rows first, into crops at (top, left) = multiples of the tile
    size: full tiles, and at the right and bottom borders smaller crops that the (fully
    convolutional) network runs at their own size, so no padding pixel is coded. The first image
    starts below its `seed_rows` conventionally coded rows. Crops of one shape, from all images,
    are batched together in order of first appearance.

    The ramp: the first pops of a message have no bits below them but the seed's. With a `budget`
    (format version 4, a seed) each batch is as large as the bits then on the stack pay for:
    budget.first_pops bits per dimension, the stack holding the seed's bits plus budget.net per
    dimension coded so far. When not even one crop fits, the next crop is cut into quarters
    (down to sides of `_MIN_CROP`), coded first. With `ramp` alone (version 3, or no seed), batch
    k holds at most 2^k crops (1, 2, 4, ... up to `batch_size`). Without either (versions 1 and
    2) every batch holds `batch_size` and runs padded to it.
    """
    groups = {}
    for image, (height, width) in enumerate(sizes):
        for top in range(seed_rows if image == 0 else 0, height, tile[0]):
            for left in range(0, width, tile[1]):
                shape = (min(tile[0], height - top), min(tile[1], width - left))
                groups.setdefault(shape, []).append((image, top, left))
    plan = []
    if budget is not None:
        available = budget.seed
        for shape, tiles in groups.items():
            available = _budgeted_batches(plan, shape, tiles, tile[2], batch_size, budget, available)
        return plan
    for shape, tiles in groups.items():
        start = 0
        while start < len(tiles):
            size = min(batch_size, 1 << min(len(plan), 30)) if ramp else batch_size
            chunk = tuple(tiles[start : start + size])
            padded = min(batch_size, 1 << (len(chunk) - 1).bit_length()) if ramp else batch_size
            plan.append(_Batch(shape, chunk, padded))
            start += size
    return plan


def _budgeted_batches(plan, shape, crops, channels, batch_size, budget, available):
    """Appends the budgeted batches of `crops` (all of `shape`) to `plan`; returns the bits then available."""
    height, width = shape
    dims = height * width * channels
    queue = list(crops)
    while queue:
        fits = int(available // (budget.first_pops * dims))
        if fits == 0 and min(height, width) >= 2 * _MIN_CROP:
            image, top, left = queue.pop(0)
            quarters = {}  # shape -> crops: for odd sides the top / left quarters are one pixel larger
            for down, rows in ((0, (height + 1) // 2), ((height + 1) // 2, height // 2)):
                for right, cols in ((0, (width + 1) // 2), ((width + 1) // 2, width // 2)):
                    quarters.setdefault((rows, cols), []).append((image, top + down, left + right))
            for quarter, quarter_crops in quarters.items():
                available = _budgeted_batches(plan, quarter, quarter_crops, channels, batch_size, budget, available)
            continue
        chunk = tuple(queue[: min(max(fits, 1), batch_size)])
        del queue[: len(chunk)]
        plan.append(_Batch(shape, chunk, min(batch_size, 1 << (len(chunk) - 1).bit_length())))
        available += budget.net * dims * len(chunk)
    return available


def _image_mode(channels):
    return "L" if channels == 1 else "RGB"


def lossless_bytes(image, formats=_CONVENTIONAL_FORMATS):
    """The smallest conventional lossless file of a uint8 image [H, W, C]: (bytes, format name).

    PNG (Pillow, optimize=True) or WebP-lossless (Pillow, method 6), whichever is smaller and
    decodes back to exactly these pixels (`decode_lossless`).
    """
    from PIL import Image

    picture = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image, _image_mode(image.shape[-1]))
    best = None
    for kind in formats:
        buffer = io.BytesIO()
        webp = {"lossless": True, "quality": 100, "method": 6, "exact": True}
        picture.save(buffer, format=kind, **({"optimize": True} if kind == "PNG" else webp))
        data = buffer.getvalue()
        if (best is None or len(data) < len(best[0])) and np.array_equal(decode_lossless(data, image.shape), image):
            best = data, kind
    return best


def decode_lossless(data, shape):
    """The uint8 image [H, W, C] of a PNG or WebP file from `lossless_bytes`; CompressionError if it is not."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(bytes(data))) as picture:
            picture.load()
            array = np.asarray(picture.convert(_image_mode(shape[-1])))
    except Exception as error:  # Pillow reports broken files with many exception types
        raise CompressionError(f"Corrupted data: a conventionally coded image does not decode ({error}).") from None
    array = array.reshape(array.shape[0], array.shape[1], -1)
    if array.shape != tuple(shape):
        raise CompressionError(f"Corrupted data: a conventionally coded image of {array.shape}, expected {shape}.")
    return array


@dataclasses.dataclass(frozen=True)
class _Grid:
    """Constants of the T + 1 latent levels (float64 arrays indexed by level i = 0..T).

    q_std[i], p_std[i]: stds of the Gaussians that pop (q) and push (p) z_i; delta[i] its grid
    step; q_radius[i], p_radius[i] their windows in grid steps. Level T is pushed with N(0, 1),
    level 0 popped with q(z_0 | x) = N(alpha_0 f, sigma_0^2).
    """

    gamma: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    c: np.ndarray  # c[i] = 1 - SNR_i / SNR_{i-1} for i >= 1 (c[0] unused)
    q_std: np.ndarray
    p_std: np.ndarray
    delta: np.ndarray
    q_radius: np.ndarray
    p_radius: np.ndarray
    q_bits: np.ndarray  # entropy of a pop from q in bits: what `_whiten` covers

    @classmethod
    def build(cls, gamma, latent_bins, window):
        gamma = np.asarray(gamma, np.float64)
        if not (np.all(np.isfinite(gamma)) and np.all(np.diff(gamma) > 0)):
            raise ValueError(f"The schedule must be finite and strictly increasing on the grid; got gamma = {gamma}.")
        alpha, sigma = np.sqrt(1.0 / (1.0 + np.exp(gamma))), np.sqrt(1.0 / (1.0 + np.exp(-gamma)))
        c = np.concatenate([[np.nan], -np.expm1(gamma[:-1] - gamma[1:])])
        q_std = np.concatenate([sigma[:1], sigma[1:] * np.sqrt(c[1:])])
        p_std = np.concatenate([sigma[:-1] * np.sqrt(c[1:]), [1.0]])
        delta = np.minimum(q_std, p_std) / latent_bins
        q_radius, p_radius = np.ceil(window * q_std / delta), np.ceil(window * p_std / delta)
        if max(q_radius.max(), p_radius.max()) >= _MAX_ALPHABET // 2:
            raise ValueError(
                f"Windows of {int(max(q_radius.max(), p_radius.max()))} grid steps exceed constriction's alphabet: "
                f"use fewer steps, fewer latent_bins or a smaller window."
            )
        q_bits = np.log2(q_std / delta * math.sqrt(2 * math.pi * math.e))
        return cls(gamma, alpha, sigma, c, q_std, p_std, delta, q_radius.astype(int), p_radius.astype(int), q_bits)

    def sha256(self):
        digest = hashlib.sha256()
        for field in dataclasses.fields(self):
            digest.update(np.ascontiguousarray(getattr(self, field.name)).tobytes())
        return digest


def _window(mean, std, delta, radius):
    """A Gaussian over z = k delta as (centre, the coding model, its offset means): k - centre is coded."""
    scaled = np.nan_to_num(mean / delta)
    centre = np.clip(np.round(scaled), -(1 << 30), 1 << 30)
    model = constriction.stream.model.QuantizedGaussian(-int(radius), int(radius), std=std / delta)
    return centre.astype(np.int64), model, scaled - centre


def _whiten(coder, num_bits, key):
    """XORs the top `num_bits` (rounded up to 16) of the stack with a pseudo-random mask keyed by `key`.

    An involution: the decoder undoes it by calling it again at the mirror point. Makes the bits
    the next pop reads look uniformly random (see "Clean bits" in the module docstring).
    """
    num_halves = int(math.ceil(num_bits / 16))
    halves = coder.decode(_RAW_HALF, num_halves)
    mask = np.random.PCG64([_INITIAL_SEED, *key]).random_raw(num_halves) & 0xFFFF
    coder.encode_reverse(halves ^ mask.astype(np.int32), _RAW_HALF)


def _pop(coder, mean, std, delta, radius):
    """Pops grid indices k ~ N(mean, std^2) restricted to the window (any sample fits)."""
    centre, model, offset = _window(mean, std, delta, radius)
    return centre + coder.decode(model, offset)


def _push(coder, k, mean, std, delta, radius):
    """Pushes grid indices popped from the same Gaussian (they lie in its window)."""
    centre, model, offset = _window(mean, std, delta, radius)
    coder.encode_reverse((k - centre).astype(np.int32), model, offset)


def _push_escaped(coder, k, mean, std, delta, radius):
    """Pushes any grid indices: symbol radius + 1 escapes to the offset in 32 raw bits."""
    centre, _, offset = _window(mean, std, delta, radius)
    symbols = k - centre
    escaped = np.abs(symbols) > radius
    if escaped.any():
        raw = symbols[escaped] & 0xFFFF_FFFF  # two's complement
        coder.encode_reverse(np.stack([raw >> 16, raw & 0xFFFF], -1).reshape(-1).astype(np.int32), _RAW_HALF)
    model = constriction.stream.model.QuantizedGaussian(-int(radius), int(radius) + 1, std=std / delta)
    coder.encode_reverse(np.where(escaped, radius + 1, symbols).astype(np.int32), model, offset)


def _pop_escaped(coder, mean, std, delta, radius):
    """The inverse of `_push_escaped`."""
    centre, _, offset = _window(mean, std, delta, radius)
    model = constriction.stream.model.QuantizedGaussian(-int(radius), int(radius) + 1, std=std / delta)
    symbols = coder.decode(model, offset).astype(np.int64)
    escaped = symbols == radius + 1
    if escaped.any():
        halves = coder.decode(_RAW_HALF, 2 * int(escaped.sum())).astype(np.int64).reshape(-1, 2)
        raw = (halves[:, 0] << 16) | halves[:, 1]
        symbols[escaped] = raw - ((raw >> 31) << 32)
    return centre + symbols


class BitsBackCodec:
    """Lossless bits-back ANS coder of uint8 images of any size with a VDM (see the module docstring).

    Args:
        model: a `vdm_tf.VDM` (any timesteps: the codec uses its denoiser and schedule on its own
            grid of `num_steps` steps). Its image shape is the tile size; images of any size with
            its channel count are coded, cut into tiles (`_tile_plan`).
        num_steps: T, the number of diffusion steps (denoiser calls per batch, each way);
            default: the model's `timesteps`, or 250 for a continuous-time model.
        batch_size: tiles coded together (one denoiser call per step for all of them); batches
            ramp up 1, 2, 4, ... to it. On a CPU the time per tile hardly drops beyond 16 for
            small tiles.
        latent_bins: grid points per standard deviation of the narrowest Gaussian over a latent
            (2 is already as good as finer grids on Gaussian data; each doubling adds about 2 bits
            per dimension to the first pops, the initial bits).
        window: half-width of the coding windows, in standard deviations.
        seed: code the top rows of the first image conventionally (PNG or WebP-lossless) as the
            stack's initial bits (module docstring, "Few images"); False starts on pseudo-random
            words only (the initial bits are then paid in full: the closed-form tests use it).
        fallback: store the conventional code of every image instead when it is smaller (False:
            always bits-back, as the tests of the bits-back code need).

    `decode` reads T, the batch size, the sizes and the grid from the file, so any codec with the
    right model decodes it.

    Example:
    >>> codec = BitsBackCodec(model, num_steps=100)
    >>> data = codec.encode(x)                       # uint8 [N, H, W, C] or a list of [H_i, W_i, C] -> bytes
    >>> assert (codec.decode(data) == x).all()
    >>> read_header(data).net_bits / x.size          # about the -ELBO in bits per dimension

    Reference: Townsend et al. 2019 (BB-ANS); Kingma et al. 2019 (Bit-Swap); Kingma et al. 2021 (VDM).
    """

    _ramp = True  # False: batches as in format versions 1 and 2 (the tests make such files)

    def __init__(self, model, num_steps=None, batch_size=16, latent_bins=4, window=8, seed=True, fallback=True):
        if not isinstance(model, VDM):
            raise TypeError(f"model must be a vdm_tf.VDM; got {type(model).__name__}.")
        self.model = model
        self.num_steps = int(num_steps if num_steps is not None else model.timesteps or 250)
        self.batch_size = int(batch_size)
        self.latent_bins = int(latent_bins)
        self.window = int(window)
        self.seed, self.fallback = bool(seed), bool(fallback)
        for name in ("num_steps", "batch_size", "latent_bins", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer; got {getattr(self, name)}.")
        self.image_shape = tuple(model.image_shape)
        self.channels = self.image_shape[-1]
        self.num_dims = math.prod(self.image_shape)

    # ----------------------------------------------------------------------------------------
    # Model side: the grid, the traced network, the fingerprints.

    def _grid(self, num_steps, latent_bins, window):
        t = tf.range(num_steps + 1, dtype=tf.float32) / num_steps
        return _Grid.build(self.model.schedule(t).numpy(), latent_bins, window)

    def _network(self, batch_size, shape):
        """(eps_hat(z, gamma), pixel probabilities(z_0, gamma_0)) on [batch_size, h, w, C], traced once each."""
        model, shape = self.model, (batch_size, *shape, self.channels)
        signature = [tf.TensorSpec(shape, tf.float32), tf.TensorSpec([], tf.float32)]

        def build():
            eps_hat = tf.function(
                lambda z, gamma: model.denoiser(z, tf.fill([batch_size], gamma), training=False),
                input_signature=signature,
            )
            probabilities = tf.function(
                lambda z_0, gamma_0: tf.nn.softmax(images.decoder_logits(z_0, gamma_0, model.pixel_values)),
                input_signature=signature,
            )
            return eps_hat, probabilities, shape

        key = ("bits_back", batch_size) if shape[1:] == self.image_shape else ("bits_back", shape)
        return samplers.compiled(model, key, build)

    def weights_sha256(self):
        """SHA-256 of the model: class names, image shape and every weight's shape and bytes."""
        digest = hashlib.sha256(repr((type(self.model.denoiser).__name__, type(self.model.schedule).__name__)).encode())
        digest.update(repr(self.image_shape).encode())
        if self.model.pixel_values is not None:  # the decoder's alphabet (older files: none, same digest)
            digest.update(repr(self.model.pixel_values).encode())
        for weight in self.model.weights:
            value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
            digest.update(repr((value.shape, value.dtype.str)).encode() + value.tobytes())
        return digest.digest()

    def _probe_sha256(self, grid, networks):
        """SHA-256 of the grid and of the network's outputs on fixed inputs, for every traced shape
        of a message: equal only where this machine computes the same bits as the encoder's."""
        digest = grid.sha256()
        for eps_hat, probabilities, shape in networks:
            raw = np.random.PCG64(_INITIAL_SEED + 1).random_raw(math.prod(shape))
            z = ((raw >> 11) * 2.0**-53 * 4.0 - 2.0).astype(np.float32).reshape(shape)
            for level in (1, len(grid.gamma) - 1):
                digest.update(eps_hat(z, np.float32(grid.gamma[level])).numpy().tobytes())
            digest.update(probabilities(z, np.float32(grid.gamma[0])).numpy().tobytes())
        return digest.digest()

    def _networks(self, plan):
        """The traced network of each batch of `plan`, and the distinct ones in order (for the probe)."""
        networks = [self._network(batch.padded, batch.shape) for batch in plan]
        distinct = list({id(network): network for network in networks}.values())
        return networks, distinct

    # ----------------------------------------------------------------------------------------
    # One batch each way.

    @staticmethod
    def _padded(z, network):
        """Flat latents of n tiles as the float32 network input [padded, h, w, C], zeros below."""
        shape = network[2]
        padded = np.zeros(math.prod(shape), np.float32)
        padded[: len(z)] = z
        return padded.reshape(shape)

    def _prior_mean(self, z, level, grid, network):
        """Mean of p(z_{level-1} | z_level) (VDM eq. 32-34), flat float64 [n D]."""
        eps_hat = network[0](self._padded(z, network), np.float32(grid.gamma[level])).numpy()
        eps_hat = eps_hat.reshape(-1)[: len(z)].astype(np.float64)
        ratio = grid.alpha[level - 1] / grid.alpha[level]
        return ratio * (z - grid.sigma[level] * grid.c[level] * eps_hat)

    def _pixel_probabilities(self, z_0, grid, network):
        probabilities = network[1](self._padded(z_0, network), np.float32(grid.gamma[0])).numpy()
        return probabilities.reshape(-1, images.NUM_VALUES)[: len(z_0)]

    def _encode_batch(self, coder, x, batch, grid, network, progress):
        """Pushes batch number `batch`, tiles x (uint8 [n, h, w, C]), onto the stack."""
        g = grid
        f = images.encode(x).numpy().astype(np.float64).reshape(-1)
        _whiten(coder, len(f) * g.q_bits[0], (batch, 0))
        k = _pop(coder, g.alpha[0] * f, g.q_std[0], g.delta[0], g.q_radius[0])
        z = k * g.delta[0]
        probabilities = self._pixel_probabilities(z, g, network)
        coder.encode_reverse(x.reshape(-1).astype(np.int32), _PIXELS, probabilities)
        for i in range(1, len(g.gamma)):
            _whiten(coder, len(k) * g.q_bits[i], (batch, i))
            k_next = _pop(coder, g.alpha[i] / g.alpha[i - 1] * z, g.q_std[i], g.delta[i], g.q_radius[i])
            z_next = k_next * g.delta[i]
            mean = self._prior_mean(z_next, i, g, network)
            _push_escaped(coder, k, mean, g.p_std[i - 1], g.delta[i - 1], g.p_radius[i - 1])
            k, z = k_next, z_next
            progress.add(1)
        _push_escaped(coder, k, np.zeros_like(z), 1.0, g.delta[-1], g.p_radius[-1])
        progress.add(1)

    def _decode_batch(self, coder, shape, batch, grid, network, progress):
        """Pops batch number `batch`, tiles of `shape` [n, h, w, C], off the stack: the reverse of `_encode_batch`."""
        g = grid
        k = _pop_escaped(coder, np.zeros(math.prod(shape)), 1.0, g.delta[-1], g.p_radius[-1])
        z = k * g.delta[-1]
        progress.add(1)
        for i in range(len(g.gamma) - 1, 0, -1):
            mean = self._prior_mean(z, i, g, network)
            k_prev = _pop_escaped(coder, mean, g.p_std[i - 1], g.delta[i - 1], g.p_radius[i - 1])
            z_prev = k_prev * g.delta[i - 1]
            _push(coder, k, g.alpha[i] / g.alpha[i - 1] * z_prev, g.q_std[i], g.delta[i], g.q_radius[i])
            _whiten(coder, len(k) * g.q_bits[i], (batch, i))
            k, z = k_prev, z_prev
            progress.add(1)
        x = coder.decode(_PIXELS, self._pixel_probabilities(z, g, network)).astype(np.uint8).reshape(shape)
        f = images.encode(x).numpy().astype(np.float64).reshape(-1)
        _push(coder, k, g.alpha[0] * f, g.q_std[0], g.delta[0], g.q_radius[0])
        _whiten(coder, len(k) * g.q_bits[0], (batch, 0))
        return x

    # ----------------------------------------------------------------------------------------
    # Public API.

    def _check_images(self, x):
        """uint8 images as a list of [H, W, C] arrays with the model's channel count."""
        if isinstance(x, (list, tuple)):
            arrays = [np.asarray(image) for image in x]
        else:
            x = x.numpy() if tf.is_tensor(x) else np.asarray(x)
            if x.ndim != 4:
                raise ValueError(f"images must be [N, H, W, C] or a list of [H, W, C] arrays; got shape {x.shape}.")
            arrays = list(x)
        if not arrays:
            raise ValueError("images must hold at least one image; got an empty batch.")
        checked = []
        for image in arrays:
            expected = f"images must be uint8 [H, W, {self.channels}] (H, W >= 1) with values in 0..255"
            if not np.issubdtype(image.dtype, np.integer):
                raise TypeError(f"{expected}; got dtype {image.dtype}.")
            if image.ndim != 3 or image.shape[-1] != self.channels or min(image.shape) < 1:
                raise ValueError(f"{expected}; got shape {list(image.shape)}.")
            if image.min() < 0 or image.max() > images.NUM_VALUES - 1:
                raise ValueError(f"{expected}; got values in {image.min()}..{image.max()}.")
            checked.append(np.ascontiguousarray(image, np.uint8))
        return checked

    def _seed_rows(self, image, grid):
        """How many top rows of the first image to code conventionally as the stack's initial bits.

        Whole tile rows until their PNG holds the bits the first pops of a full batch need,
        about D (h(q(z_0 | x)) + h(q(z_1 | z_0))) bits per tile, half a batch's worth (the ramp
        and the bits the first batches push cover the rest); the whole image if it is shorter.
        """
        target = 0.5 * self.batch_size * self.num_dims * (grid.q_bits[0] + grid.q_bits[1])
        rows = self.image_shape[0]
        while rows < image.shape[0] and 8 * lossless_bytes(image[:rows], ("PNG",))[0].__len__() < target:
            rows += self.image_shape[0]
        return min(rows, image.shape[0])

    def encode(self, x, names=None, verbose=False):
        """Compresses uint8 images losslessly; returns the bytes of the container.

        Args:
            x: uint8 images [N, H, W, C] (tensor or array) or a list of N arrays [H_i, W_i, C] of
                any sizes, C the model's channel count, N >= 1.
            names: optional N file names without newlines, stored in the container (front-coded
                and deflated; the command line stores the input files' names).
            verbose: show a progress bar.

        The file is the smaller of the bits-back code (a conventionally coded seed, then the
        tiles) and the conventional code of every image (PNG or WebP-lossless each): never more
        than the images' own PNG files plus the container's header, size table and names.
        """
        xs = self._check_images(x)
        names = tuple(names or ())
        _check_names(names, len(xs))
        sizes = [image.shape[:2] for image in xs]
        grid = self._grid(self.num_steps, self.latent_bins, self.window)
        conventional = [lossless_bytes(image)[0] for image in xs]
        seed_rows = self._seed_rows(xs[0], grid) if self.seed else 0
        seed = lossless_bytes(xs[0][:seed_rows])[0] if seed_rows else b""
        budget = self._budget(grid, len(seed), seed_rows, sizes[0][1]) if self._ramp else None
        plan = _tile_plan(sizes, self.image_shape, seed_rows, self.batch_size, ramp=self._ramp, budget=budget)
        candidates = [self._conventional_file(xs, conventional, names)] if self.fallback or not plan else []
        if plan:
            candidates.append(self._bits_back_file(xs, names, grid, plan, seed_rows, seed, verbose))
        return min(candidates, key=len)

    def _budget(self, grid, seed_bytes, seed_rows, width):
        """The `_Budget` of a message whose seed is `seed_bytes` bytes for its first `seed_rows` rows
        of `width` pixels (None without seed: the 1, 2, 4, ... ramp)."""
        if not seed_rows:
            return None
        first_pops = float(grid.q_bits[0] + grid.q_bits[1])
        seed_bits = 8.0 * seed_bytes
        return _Budget(seed_bits, first_pops, min(seed_bits / (seed_rows * width * self.channels), first_pops / 2))

    def _pack(self, mode, count, sizes, lengths, names, payload, *, num_steps=1, batch_size=1, initial=0, shared=0,
              seed_rows=0, probe=bytes(32)):  # fmt: skip
        sizes_block, names_block = _pack_sizes(sizes, lengths), _pack_names(names)
        header = _HEADER.pack(
            MAGIC, FORMAT_VERSION, *self.image_shape, count, num_steps, batch_size, self.latent_bins, self.window,
            intra_op_threads(), initial, shared, len(names_block), len(payload), len(sizes_block), seed_rows, mode,
            self.weights_sha256(), probe,
        )  # fmt: skip
        body = header + sizes_block + names_block + payload
        return body + _CRC.pack(zlib.crc32(body))

    def _conventional_file(self, xs, conventional, names):
        sizes, lengths = [image.shape[:2] for image in xs], [len(data) for data in conventional]
        return self._pack(CONVENTIONAL, len(xs), sizes, lengths, names, b"".join(conventional))

    def _bits_back_file(self, xs, names, grid, plan, seed_rows, seed, verbose):
        networks, distinct = self._networks(plan)
        # Enough initial words for two layers of worst-case pops of a full batch, and more.
        random_words = _initial_words(math.ceil(3 * _PRECISION_BITS * self.batch_size * self.num_dims / 32) + 4)
        coder = constriction.stream.stack.AnsCoder(np.concatenate([random_words, _seed_stack_words(seed)]))
        progress = keras.utils.Progbar(len(plan) * (self.num_steps + 1), verbose=int(verbose), unit_name="step")
        for number, (batch, network) in enumerate(zip(plan, networks)):
            height, width = batch.shape
            tiles = np.stack([xs[i][top : top + height, left : left + width] for i, top, left in batch.tiles])
            self._encode_batch(coder, tiles, number, grid, network, progress)
        words = coder.get_compressed()
        common = min(len(words), len(random_words))
        differs = np.flatnonzero(words[:common] != random_words[:common])
        shared = int(differs[0]) if len(differs) else common
        lengths = [len(seed)] + [0] * (len(xs) - 1)
        return self._pack(
            BITS_BACK, len(xs), [image.shape[:2] for image in xs], lengths, names,
            words[shared:].astype("<u4").tobytes(), num_steps=self.num_steps, batch_size=self.batch_size,
            initial=len(random_words), shared=shared, seed_rows=seed_rows, probe=self._probe_sha256(grid, distinct),
        )  # fmt: skip

    def decode(self, data, verbose=False):
        """Decompresses `encode`'s output.

        Returns:
            uint8 images [N, H, W, C] when they all have one size, else a list of N arrays [H_i, W_i, C].

        Raises:
            CompressionError: not a vdm_tf file, truncated or corrupted data.
            ModelMismatchError: encoded with another model or image shape, or this machine
                computes the network's outputs differently from the encoder's.
        """
        header = read_header(data)
        if header.image_shape != self.image_shape:
            raise ModelMismatchError(
                f"The data was coded with a model of {header.image_shape} images; this model codes {self.image_shape}."
            )
        if header.weights_sha256 != self.weights_sha256():
            raise ModelMismatchError("The data was encoded with a different model (the weights' SHA-256 differs).")
        shapes = [(height, width, self.channels) for height, width in header.sizes]
        if header.mode == CONVENTIONAL:
            ends = np.cumsum((0,) + header.lengths)
            xs = [decode_lossless(header.payload[a:b].tobytes(), shape) for a, b, shape in zip(ends, ends[1:], shapes)]
        else:
            xs = self._decode_bits_back(header, shapes, verbose)
        return np.stack(xs) if len(set(shapes)) == 1 else xs

    def plan(self, header, grid=None):
        """The batches (`_tile_plan`) of a bits-back file, from its `Header`."""
        grid = grid or self._grid(header.num_steps, header.latent_bins, header.window)
        budget = None
        if header.version >= 4:  # version 3: the 1, 2, 4, ... ramp; 1 and 2: fixed batches
            budget = self._budget(grid, header.seed_bytes, header.seed_rows, header.sizes[0][1])
        return _tile_plan(
            header.sizes, self.image_shape, header.seed_rows, header.batch_size, header.version >= 3, budget
        )

    def _decode_bits_back(self, header, shapes, verbose):
        grid = self._grid(header.num_steps, header.latent_bins, header.window)
        plan = self.plan(header, grid)
        networks, distinct = self._networks(plan)
        if header.probe_sha256 != self._probe_sha256(grid, distinct):
            raise ModelMismatchError(
                f"This process computes the model's grid or outputs differently from the encoder's (same weights, "
                f"different bits): decoding would fail. The encoder ran {header.threads} intra-op threads, this "
                f"process {intra_op_threads()} (set tf.config.threading.set_intra_op_parallelism_threads before "
                f"TensorFlow starts; the command line does). TensorFlow version, CPU kind and oneDNN "
                f"(TF_ENABLE_ONEDNN_OPTS, on when vdm_tf is imported before TensorFlow) must match too."
            )
        random_words = _initial_words(header.initial_words)
        words = np.concatenate([random_words[: header.shared_words], header.payload])
        if words[-1] == 0:
            raise CompressionError("Corrupted data: an ANS stack never ends in a zero word.")
        coder = constriction.stream.stack.AnsCoder(words)
        progress = keras.utils.Progbar(len(plan) * (header.num_steps + 1), verbose=int(verbose), unit_name="step")
        xs = [np.zeros(shape, np.uint8) for shape in shapes]
        try:
            for number in reversed(range(len(plan))):
                batch = plan[number]
                shape = (len(batch.tiles), *batch.shape, self.channels)
                tiles = self._decode_batch(coder, shape, number, grid, networks[number], progress)
                for tile, (i, top, left) in zip(tiles, batch.tiles):
                    xs[i][top : top + batch.shape[0], left : left + batch.shape[1]] = tile
        except KeyError as error:  # constriction: a symbol outside a model's alphabet
            raise CompressionError(f"Corrupted data: decoding reached an impossible symbol ({error}).") from None
        rest = coder.get_compressed()
        seed_words = rest[len(random_words) :]
        if len(seed_words) != header.seed_words or not np.array_equal(rest[: len(random_words)], random_words):
            raise CompressionError("Corrupted data: decoding did not end on the initial stack.")
        if header.seed_rows:
            if seed_words[-1] != 1:
                raise CompressionError("Corrupted data: decoding did not end on the initial stack.")
            seed = seed_words[:-1].astype("<u4").tobytes()[: header.seed_bytes]
            xs[0][: header.seed_rows] = decode_lossless(seed, (header.seed_rows, *shapes[0][1:]))
        return xs


def _seed_stack_words(seed):
    """The bottom of the stack above the pseudo-random words: the seed's bytes as words, then a word 1."""
    if not seed:
        return np.zeros(0, np.uint32)
    padded = seed + bytes(-len(seed) % 4)
    return np.concatenate([np.frombuffer(padded, "<u4"), [1]]).astype(np.uint32)


def _sharing_vdm(model, image_shape, timesteps):
    """A VDM of `image_shape` and `timesteps` with `model`'s denoiser, schedule and decoder alphabet."""
    return VDM(model.denoiser, model.schedule, image_shape, timesteps=timesteps, pixel_values=model.pixel_values)


def discrete_elbo_bpd(model, x, num_steps, num_time_samples=8, seed=0, batch_size=64):
    """The model's discrete-time negative ELBO with T = num_steps (what the codec approaches;
    num_steps = 0: the continuous-time -ELBO, the limit of large T).

    Returns `vdm_tf.evaluation.dataset_bpd`'s dict (`bpd`, `stderr`, `per_image`, ...) for a
    VDM that shares the model's denoiser and schedule, with `timesteps=num_steps`.
    """
    discrete = model if model.timesteps == num_steps else _sharing_vdm(model, model.image_shape, num_steps)
    batches = [x[start : start + batch_size] for start in range(0, len(x), batch_size)]
    return evaluation.dataset_bpd(discrete, batches, num_time_samples=num_time_samples, seed=seed)


def tiles_elbo_bpd(model, x, num_steps, num_time_samples=8, seed=0, batch_size=64):
    """The discrete-time -ELBO (T = num_steps; 0: continuous time) of images of any size, cut into the codec's tiles.

    Every crop shape runs through a VDM of that image shape sharing the model's denoiser and
    schedule (`discrete_elbo_bpd`). Returns {"bpd": bits per dimension over all pixels, "stderr":
    its standard error over the tiles' time samples, "count": the number of tiles}.
    """
    shape, groups = tuple(model.image_shape), {}
    for image in x:
        for batch in _tile_plan([image.shape[:2]], shape, 0, 1, ramp=False):
            (_, top, left) = batch.tiles[0]
            crop = image[top : top + batch.shape[0], left : left + batch.shape[1]]
            groups.setdefault(batch.shape, []).append(crop)
    total_bits, variance, dims, count = 0.0, 0.0, 0, 0
    for crop_shape, crops in groups.items():
        crop_model = model
        if crop_shape != shape[:2]:
            crop_model = _sharing_vdm(model, (*crop_shape, shape[-1]), model.timesteps)
        result = discrete_elbo_bpd(crop_model, np.stack(crops), num_steps, num_time_samples, seed, batch_size)
        bits = np.asarray(result["per_image"], np.float64) * crops[0].size
        total_bits, dims, count = total_bits + bits.sum(), dims + bits.size * crops[0].size, count + bits.size
        variance += bits.size * bits.var(ddof=1) if bits.size > 1 else 0.0
    return {"bpd": total_bits / dims, "stderr": math.sqrt(variance) / dims, "count": count}


# --------------------------------------------------------------------------------------------
# Command line.


def load_model(path):
    """A VDM from a `.keras` file (`model.save`) or a trainer run directory: `vdm_tf.load`."""
    from vdm_tf.runs import load

    return load(path)


_MODES = {1: "L", 3: "RGB"}  # what the command line reads and writes for C channels


def _shape_text(shape):
    return "x".join(map(str, shape))


def _model_image_shape(path):
    """The image shape of the model at `path`, read from its configuration without loading it.

    A `.keras` file holds its model's `get_config` in `config.json` (VDM's has `image_shape`);
    a run directory's `config.json` names its data set. Lets the command line check every input
    before it loads the model (seconds) and starts TensorFlow's runtime.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                shape = json.loads(archive.read("config.json"))["config"]["image_shape"]
            return tuple(int(size) for size in shape)
        except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"--model={path}: not a .keras file of a vdm_tf model (model.save): {error}") from None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json")):
        from vdm_tf import datasets, runs

        try:
            return tuple(datasets.info(runs.saved_config(path).dataset).image_shape)
        except (OSError, TypeError, ValueError) as error:
            raise ValueError(f"--model={path}: unreadable run configuration config.json: {error}") from None
    raise ValueError(
        f"--model must be a .keras file written by model.save or a trainer run directory (with config.json); "
        f"got {path!r}."
    )


_BUNDLED_MODELS = {1: "photos_grey.keras", 3: "photos.keras"}  # channels -> file in vdm_tf/models/
# The command line's T for a continuous-time model (the bundled ones) without --steps: file size
# against speed on the held-out photographs (README, "Lossless compression"; the library's
# default stays 250).
COMMAND_LINE_STEPS = 50


def default_model_path(channels):
    """The bundled model the command line uses for images of `channels` channels (package data).

    Grey: `vdm_tf/models/photos_grey.keras`, the `photos_grey` preset; RGB:
    `vdm_tf/models/photos.keras`, the `photos` preset (README, "Lossless compression"). None
    for another channel count.
    """
    if channels not in _BUNDLED_MODELS:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "models", _BUNDLED_MODELS[channels])


def read_image(path, channels=None):
    """An image file as uint8 [H, W, C] (any size) and its format (Pillow's name: PNG, JPEG, ...).

    Mode L (C = 1) or RGB (C = 3), nothing converted: palette, alpha or 16-bit images are
    refused; with `channels` given, only that mode. Raises ValueError with a one-line message
    naming what was expected.
    """
    from PIL import Image, UnidentifiedImageError

    if channels is not None and channels not in _MODES:
        raise ValueError(f"The command line reads L or RGB images; the model codes {channels} channels.")
    modes = [_MODES[channels]] if channels else list(_MODES.values())
    expected = f"expected an {' or '.join(modes)} image" + (" (the model's channels)" if channels else "")
    try:
        with Image.open(path) as picture:
            picture.load()
            found = picture.mode, picture.format
            array = np.asarray(picture).reshape(picture.height, picture.width, -1) if found[0] in modes else None
    except UnidentifiedImageError:
        reason = "an empty file" if os.path.getsize(path) == 0 else "not an image file Pillow can read"
        raise ValueError(f"{path}: {reason}; {expected}.") from None
    except OSError as error:
        raise ValueError(f"{path}: {error.strerror or error}; {expected}.") from None
    except Exception as error:  # Pillow reports broken files with many exception types
        raise ValueError(f"{path}: a broken image file ({type(error).__name__}: {error}); {expected}.") from None
    if found[0] not in modes:
        raise ValueError(
            f"{path}: got mode {found[0]}; {expected} (nothing is converted: palette and alpha are refused)."
        )
    return array, found[1]


def image_file_bytes(image, **options):
    """The size of one uint8 image [H, W, C] as a file written by Pillow (`Image.save` options; PNG by default)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buffer, **({"format": "PNG"} | options))
    return len(buffer.getvalue())


def decoded_file_names(names, count):
    """The PNG file names `decode` writes for the stored `names` of `count` images.

    Each image goes to `<stem>.png` whatever its stored extension (digit4.jpg -> digit4.png,
    noext -> noext.png). Of several names with one stem (compared ignoring case), the first keeps
    `<stem>.png` and the later ones get `<stem>-1.png`, `<stem>-2.png`, ... (the first number no
    other name takes): a.png, a.jpg -> a.png, a-1.png. Stems that are no usable file name
    (empty, ".", "..", a NUL byte, over 200 bytes) and files without names get the image's index,
    00000.png, 00001.png, ...
    """
    stems = []
    for i in range(count):
        stem = os.path.splitext(os.path.basename(names[i]) if names else "")[0]
        if stem in ("", ".", "..") or "\0" in stem or len(stem.encode("utf-8", "surrogateescape")) > 200:
            stem = f"{i:05d}"
        stems.append(stem)
    wanted = {f"{stem}.png".casefold() for stem in stems}
    written, used = [], set()
    for stem in stems:
        name, number = f"{stem}.png", 0
        while name.casefold() in used or (number and name.casefold() in wanted):
            number += 1
            name = f"{stem}-{number}.png"
        used.add(name.casefold())
        written.append(name)
    return written


def _check_can_create(path, what):
    """Raises ValueError unless `path` is a directory this process may write in, or can be made one."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{what}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: no permission to write in {existing}.")


def _save_png(path, image):
    from PIL import Image

    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path, format="PNG")


def write_pngs(x, names, directory):
    """Writes uint8 images [N, H, W, C] as PNG files `directory/names[i]`, each complete or absent.

    The files are written in a hidden staging directory inside `directory`, then renamed into
    place. If any of this fails, the images not yet in place are written under the same names to
    a new directory in the system's temporary directory, and the OSError raised names it: a
    finished decode is not thrown away.
    """
    placed = 0
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".vdmz-", dir=directory)
        try:
            for name, image in zip(names, x):
                _save_png(os.path.join(staging, name), image)
            for name in names:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
                placed += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        rescue = tempfile.mkdtemp(prefix="vdmz-decoded-")
        for name, image in zip(names[placed:], x[placed:]):
            _save_png(os.path.join(rescue, name), image)
        raise OSError(
            f"writing the images to {directory} failed ({error}); the {len(names) - placed} images not written "
            f"there are in {rescue}"
        ) from None


def _load_checked_model(path):
    """`load_model` for the command line: any failure becomes a one-line ValueError naming the path."""
    try:
        return load_model(path)
    except Exception as error:  # Keras reports unloadable files with many exception types
        raise ValueError(f"--model={path}: could not load the model ({type(error).__name__}: {error})") from None


def _use_threads(threads):
    """Sets TensorFlow's intra-op thread count (possible only before TensorFlow runs its first op)."""
    if threads and threads != intra_op_threads():
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # already running: the probe check of `decode` tells if the bits differ
            print(f"warning: could not switch TensorFlow to {threads} intra-op threads", file=sys.stderr)


def _model_for(model, channels, what):
    """The --model path, or the bundled default for `channels` channels; its image shape (read, not loaded)."""
    if model is None:
        model = default_model_path(channels)
        if model is None or not os.path.isfile(model):
            raise ValueError(
                f"{what} {'grey' if channels == 1 else f'{channels}-channel'} images: no bundled model; pass --model."
            )
    image_shape = _model_image_shape(model)
    return model, image_shape


def _encode_command(args):
    # Every check that can fail comes first: no model is loaded, TensorFlow's runtime not started.
    channels = _model_image_shape(args.model)[-1] if args.model else None
    names = [os.path.basename(path) for path in args.images]
    _check_names(names, len(names))
    x, formats = zip(*(read_image(path, channels) for path in args.images))
    found = {image.shape[-1] for image in x}
    if len(found) > 1:
        raise ValueError("The inputs mix grey (L) and RGB images; one message holds one kind (encode them separately).")
    args.model, image_shape = _model_for(args.model, found.pop(), "encode:")
    if os.path.isdir(args.output):
        raise ValueError(f"-o {args.output} is a directory; expected the name of the file to write (out.vdmz).")
    _check_can_create(os.path.dirname(args.output) or ".", f"-o {args.output}")
    _use_threads(args.threads)
    model = _load_checked_model(args.model)
    steps = args.steps or model.timesteps or COMMAND_LINE_STEPS
    codec = BitsBackCodec(model, steps, args.batch_size, args.latent_bins, args.window, fallback=args.fallback)
    start = time.perf_counter()
    data = codec.encode(list(x), names=names, verbose=True)
    seconds = time.perf_counter() - start
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "wb") as f:
        f.write(data)
    header = read_header(data)
    dims, pixels = header.num_dims, header.num_dims // image_shape[-1]
    sizes = sorted({_shape_text(image.shape) for image in x})
    print(
        f"{len(x)} images {', '.join(sizes[:3])}{' ...' if len(sizes) > 3 else ''} (tiles {_shape_text(image_shape)}), "
        f"T={codec.num_steps}: {len(data)} bytes in {seconds:.1f} s ({pixels / seconds:.0f} pixels/s) -> {args.output}"
    )
    print(f"  file        {8 * len(data) / dims:8.3f} bpd", end="")
    if header.mode == CONVENTIONAL:
        print(" (every image PNG/WebP-lossless: smaller than bits-back here)")
    else:
        print(f" (seed {8 * header.seed_bytes / dims:.3f} bpd, initial bits {header.initial_bits / dims:.3f} bpd)")
        print(f"  net         {header.net_bits / dims:8.3f} bpd (bits-back codelength of the tiles)")
    print(f"  names       {8 * header.names_bytes / dims:8.3f} bpd ({header.names_bytes} bytes for {len(names)} names)")
    if args.elbo_samples:
        elbo = tiles_elbo_bpd(model, x, codec.num_steps, num_time_samples=args.elbo_samples)
        spread = f" +- {elbo['stderr']:.3f}" if elbo["count"] > 1 else ""  # no standard error from one tile
        print(f"  -ELBO(T)    {elbo['bpd']:8.3f} bpd{spread} ({args.elbo_samples} time samples/tile)")
    png = sum(image_file_bytes(image, optimize=True) for image in x)
    print(f"  PNG         {8 * png / dims:8.3f} bpd (Pillow, one file per image, optimize=True)")
    other = sorted({str(kind) for kind in formats} - {"PNG"})
    if other:
        print(
            f"note: {sum(kind != 'PNG' for kind in formats)} inputs are {'/'.join(other)} files, not PNG: decode "
            f"writes PNG files holding the decoded pixels, not the original file bytes."
        )


def _decode_command(args):
    # Every check that can fail comes first: no model is loaded, TensorFlow's runtime not started.
    try:
        with open(args.input, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"{args.input}: {error.strerror or error}; expected a file written by encode.") from None
    header = read_header(data)
    given = args.model is not None
    args.model, image_shape = _model_for(args.model, header.image_shape[-1], f"decode: {args.input} holds")
    if header.image_shape != image_shape:
        model, hint = (f"--model={args.model}", "") if given else ("the bundled model", ": pass the encoder's --model")
        raise ModelMismatchError(
            f"{args.input} was coded with a model of {_shape_text(header.image_shape)} images; {model} "
            f"codes {_shape_text(image_shape)} images{hint}."
        )
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"-o {args.output} is a file; expected a directory for the PNG files.")
    _check_can_create(args.output, f"-o {args.output}")
    names = decoded_file_names(header.names, header.count)
    for name in names:
        if os.path.isdir(os.path.join(args.output, name)):
            raise ValueError(f"{os.path.join(args.output, name)} is a directory; decode writes a PNG file there.")
    _use_threads(header.threads)  # the encoder's: reductions split over threads add in another order
    model = _load_checked_model(args.model)
    start = time.perf_counter()
    x = BitsBackCodec(model).decode(data, verbose=True)
    seconds = time.perf_counter() - start
    write_pngs(x, names, args.output)
    print(
        f"{len(x)} images in {seconds:.1f} s ({header.num_dims // image_shape[-1] / seconds:.0f} pixels/s, "
        f"{intra_op_threads()} intra-op threads as the encoder) -> {args.output} (PNG)"
    )


def _integer_at_least(minimum):
    """An argparse type: an integer >= minimum."""

    def integer(text):
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}; got {text}")
        return value

    return integer


def main(argv=None):
    """`python -m vdm_tf.compression encode|decode ...`; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m vdm_tf.compression", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    # Short usage lines: an argparse error stays two lines.
    encode = commands.add_parser(
        "encode",
        help="compress image files (PNG, or any format Pillow reads) into one file",
        usage=f"{parser.prog} encode IMAGE [IMAGE ...] -o FILE.vdmz [--model=MODEL] [options]",
    )
    encode.add_argument("images", nargs="+", help="image files of any size (L or RGB; PNG or any format Pillow reads)")
    encode.add_argument("-o", "--output", required=True, help="the compressed file")
    positive, non_negative = _integer_at_least(1), _integer_at_least(0)
    encode.add_argument(
        "--steps", type=positive, default=None, help=f"T (default: the model's timesteps, or {COMMAND_LINE_STEPS})"
    )
    encode.add_argument("--batch_size", type=positive, default=16)
    encode.add_argument("--latent_bins", type=positive, default=4)
    encode.add_argument("--window", type=positive, default=8)
    encode.add_argument("--elbo_samples", type=non_negative, default=8, help="time samples per image, -ELBO (0: skip)")
    encode.add_argument(
        "--fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store PNG/WebP-lossless files instead when smaller (--no-fallback: always bits-back)",
    )
    encode.add_argument("--threads", type=non_negative, default=0, help="TensorFlow intra-op threads (0: its default)")
    decode = commands.add_parser(
        "decode",
        help="decompress a .vdmz file into a directory of PNG files",
        usage=f"{parser.prog} decode FILE.vdmz -o DIRECTORY [--model=MODEL]",
    )
    decode.add_argument("input", help="the compressed file")
    decode.add_argument("-o", "--output", required=True, help="directory for the PNG files (<stem>.png per image)")
    for command in (encode, decode):
        command.add_argument(
            "--model",
            default=None,
            help="a .keras file (model.save) or a trainer run directory (default: the bundled grey or RGB model)",
        )
    args = parser.parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # one traced function per tile shape: not a retracing problem
    try:
        (_encode_command if args.command == "encode" else _decode_command)(args)
    except (ValueError, OSError) as error:  # CompressionError is a ValueError
        message = " ".join(str(error).split())  # one line, whatever the error text holds
        print(f"{parser.prog} {args.command}: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    tf.config.experimental.enable_op_determinism()  # a program's global switch; `main` leaves it alone
    sys.exit(main())
