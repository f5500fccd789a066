"""`BitsBackCodec`: lossless bits-back ANS coding of uint8 images over a VDM's discrete-time chain.

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
discrete-time negative ELBO with T steps (`VDM(..., timesteps=T).elbo`). Batches of tiles
(`tiles._tile_plan`) run through the chain together (one denoiser call per step, vectorised ANS
calls, `ans`); the steps are a Python loop because each one alternates ANS calls with the network.

## Few images: the seed, the initial bits and the choice of code

The first pops of a message read bits that nothing has pushed yet: with nothing below them they
would cost n_1 D (h(q(z_0 | x)) + h(q(z_1 | z_0)) - h(x | z_0)) bits (5-10 bits per dimension
of the first batch, `Header.initial_bits`). The top rows of the first image (whole tile rows,
until their PNG holds about half a full batch's first pops) are coded as PNG or WebP-lossless
and those bytes are the bottom of the stack (the seed); batches are budgeted by the bits on the
stack (`tiles`). The rest of the stack starts as fixed pseudo-random words; the file keeps only
the words the message changed.

With `fallback`, the encoder keeps the smaller of the bits-back file and one PNG/WebP-lossless
file per image, so a message is never larger than the images' PNG files plus the container. It
does not pay for the whole bits-back code to find that out: once the batches coded cover 1/16
of the dimensions, their net codelength per dimension projects the file's size, and a
projection more than 10% above the conventional files stops the code there (`Choice` says so).
Otherwise the code goes on from where it is, nothing recomputed.

## Determinism

Encoder and decoder must compute bit-identical distributions. Everything that depends on the
latents is either exact float64 arithmetic in NumPy (+, -, *, / and rounding, which IEEE-754
fixes) or one traced `tf.function` per batch size (the denoiser and the decoder's softmax at a
fixed batch shape [batch_size, H, W, C], float32; the last batch is padded with zeros, and rows
of a batch do not interact), so decoding runs the same graph on the same inputs as encoding.
TensorFlow's CPU kernels then give the same bits run after run and process after process on the
same kind of machine: same TensorFlow build, CPU instruction set, oneDNN setting
(TF_ENABLE_ONEDNN_OPTS, which `vdm_tf.prepare_process` turns on) and intra-op thread count (on
this project's 2-core CPU the demo model's outputs differ between 1 and 2 threads: reductions
split otherwise add in another order). The header records the encoder's thread count and the
command line sets it before TensorFlow starts. The command line also turns on
`tf.config.experimental.enable_op_determinism()` (it does not change these CPU kernels' bits but
forbids nondeterministic ones); the library leaves that global switch to its caller. Nothing is
assumed unchecked: the header carries a SHA-256 of the model's weights and a SHA-256 of the
grid constants and of the network's outputs on a fixed probe batch, so a different model, or a
process that computes different bits, fails with `ModelMismatchError` before decoding; a CRC-32
covers the whole file; and the decoder checks that the stack ends exactly where the encoder
started it.

Reference: Townsend, Bird, Barber (2019), "Practical lossless compression with latent variables
using bits back coding" (BB-ANS); Kingma, Abbeel, Ho (2019), "Bit-Swap"; Kingma et al. (2021),
"Variational Diffusion Models" (its bits-back compression experiment); Bamler (2022), `constriction`.
"""

import dataclasses
import hashlib
import math
import os

import constriction
import keras
import numpy as np
import tensorflow as tf

from vdm_tf import cli, images, traced
from vdm_tf.compression import container
from vdm_tf.compression.ans import (
    _INITIAL_SEED,
    _PIXELS,
    _PRECISION_BITS,
    _Grid,
    _initial_words,
    _pop,
    _pop_escaped,
    _push,
    _push_escaped,
    _seed_stack_words,
    _whiten,
)
from vdm_tf.compression.container import (
    BITS_BACK,
    CONVENTIONAL,
    CompressionError,
    ModelMismatchError,
    _check_names,
    read_header,
)
from vdm_tf.compression.conventional import FORMAT_NAMES, decode_lossless, lossless_bytes
from vdm_tf.compression.tiles import _Budget, _tile_plan
from vdm_tf.models.vdm import VDM


def intra_op_threads():
    """TensorFlow's intra-op thread count in this process (its default: the CPUs this process may use)."""
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    return threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())


@dataclasses.dataclass(frozen=True)
class Choice:
    """Which code `BitsBackCodec.encode` stored and why (`reason`: one line for a summary).

    `bits_back_bpd`: the bits-back file's size in bits per dimension, coded or estimated (None
    where bits-back was not considered).
    """

    mode: int
    reason: str
    bits_back_bpd: float = None


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
        fallback: store the conventional code of every image instead when it is smaller, or
            when the first 1/16 of the bits-back code projects it will be (the module
            docstring, "Few images"). False: every message bits-back coded (if its first image is all seed, the
            seed is cut to its top half so that some tile is bits-back coded).

    After `encode`, `codec.choice` (a `Choice`) says which code the file holds and why.

    `decode` reads T, the batch size, the sizes and the grid from the file, so any codec with the
    right model decodes it.

    Example:
    >>> codec = BitsBackCodec(model, num_steps=100)
    >>> data = codec.encode(x)                       # uint8 [N, H, W, C] or a list of [H_i, W_i, C] -> bytes
    >>> assert (codec.decode(data) == x).all()
    >>> read_header(data).net_bits / x.size          # about the -ELBO in bits per dimension

    Reference: Townsend et al. 2019 (BB-ANS); Kingma et al. 2019 (Bit-Swap); Kingma et al. 2021 (VDM).
    """

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
        self.choice = None

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
                lambda z, gamma: model._denoise(z, tf.fill([batch_size], gamma)),  # eps_hat, any parameterisation
                input_signature=signature,
            )
            probabilities = tf.function(
                lambda z_0, gamma_0: tf.nn.softmax(images.decoder_logits(z_0, gamma_0, model.pixel_values)),
                input_signature=signature,
            )
            return eps_hat, probabilities, shape

        key = ("bits_back", batch_size) if shape[1:] == self.image_shape else ("bits_back", shape)
        return traced.compiled(model, key, build)

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

        With `fallback` the file is the smaller of the bits-back code (a conventionally coded
        seed, then the tiles) and the conventional code of every image (PNG or WebP-lossless
        each): never more than the images' own PNG files plus the container's header, size
        table and names. The bits-back code stops early where its first batches project a loss.
        `self.choice` then says which code the file holds and why.
        """
        xs = self._check_images(x)
        names = tuple(names or ())
        _check_names(names, len(xs))
        sizes = [image.shape[:2] for image in xs]
        grid = self._grid(self.num_steps, self.latent_bins, self.window)
        coded = [lossless_bytes(image) for image in xs]
        conventional = [data for data, _ in coded]
        kinds = sorted({FORMAT_NAMES[kind] for _, kind in coded})
        conventional_bits = 8 * sum(map(len, conventional))
        dims = sum(image.size for image in xs)
        seed_rows = self._seed_rows(xs[0], grid) if self.seed else 0
        if not self.fallback and seed_rows == sizes[0][0] and len(xs) == 1:
            seed_rows //= 2  # all seed would leave nothing to bits-back code: keep the bottom half
        seed = lossless_bytes(xs[0][:seed_rows])[0] if seed_rows else b""
        plan = self._encode_plan(sizes, seed_rows, self._budget(grid, len(seed), seed_rows, sizes[0][1]))
        stored_as = f"stored as {'/'.join(kinds)}"
        if not plan:
            self.choice = Choice(CONVENTIONAL, f"{stored_as}: the image is all seed, no tile is left for bits-back")
            return self._conventional_file(xs, conventional, names)
        # With the fallback, bits-back gives up once its first tiles project a file larger than this.
        give_up_above = 1.1 * conventional_bits if self.fallback else None
        data, progress = self._bits_back_file(xs, names, grid, plan, seed_rows, seed, verbose, give_up_above)
        if data is None:
            self.choice = Choice(
                CONVENTIONAL,
                f"{stored_as}: bits-back estimated {progress['bits'] / dims:.3f} bpd (its first {progress['tiles']} of "
                f"{progress['total']} crops) > {'/'.join(kinds)} {conventional_bits / dims:.3f} bpd; "
                "--no-fallback forces bits-back",
                progress["bits"] / dims,
            )
            return self._conventional_file(xs, conventional, names)
        if self.fallback and len(data) > len(conventional_file := self._conventional_file(xs, conventional, names)):
            self.choice = Choice(
                CONVENTIONAL,
                f"{stored_as}: {'/'.join(kinds)} {conventional_bits / dims:.3f} bpd < bits-back "
                f"{8 * len(data) / dims:.3f} bpd (coded); --no-fallback keeps bits-back",
                8 * len(data) / dims,
            )
            return conventional_file
        reason = "--no-fallback" if not self.fallback else f"< {'/'.join(kinds)} {conventional_bits / dims:.3f} bpd"
        self.choice = Choice(BITS_BACK, f"bits-back {reason}", 8 * len(data) / dims)
        return data

    def _encode_plan(self, sizes, seed_rows, budget):
        """The batches `encode` codes (`_tile_plan`); the decoder computes the same from the header (`plan`)."""
        return _tile_plan(sizes, self.image_shape, seed_rows, self.batch_size, budget=budget)

    def _budget(self, grid, seed_bytes, seed_rows, width):
        """The `_Budget` of a message whose seed is `seed_bytes` bytes for its first `seed_rows` rows
        of `width` pixels (None without seed: the 1, 2, 4, ... ramp)."""
        if not seed_rows:
            return None
        first_pops = float(grid.q_bits[0] + grid.q_bits[1])
        seed_bits = 8.0 * seed_bytes
        return _Budget(seed_bits, first_pops, min(seed_bits / (seed_rows * width * self.channels), first_pops / 2))

    def _pack(self, mode, count, sizes, lengths, names, payload, **fields):
        """A file of this codec's model and grid settings (`container.pack`)."""
        return container.pack(
            self.image_shape, mode, count, sizes, lengths, names, payload, latent_bins=self.latent_bins,
            window=self.window, threads=intra_op_threads(), weights_sha256=self.weights_sha256(), **fields,
        )  # fmt: skip

    def _conventional_file(self, xs, conventional, names):
        sizes, lengths = [image.shape[:2] for image in xs], [len(data) for data in conventional]
        return self._pack(CONVENTIONAL, len(xs), sizes, lengths, names, b"".join(conventional))

    def _bits_back_file(self, xs, names, grid, plan, seed_rows, seed, verbose, give_up_above=None):
        """The bits-back file of `plan`, or (with `give_up_above`) None once the batches coded cover
        1/16 of the dimensions and project a file of more than `give_up_above` bits.

        The projection: the seed's bits plus, for every coded dimension, the stack's growth per
        dimension so far (the net codelength of the first crops). Returns (data or None, the
        projection {"bits", "tiles" coded, "total" crops}).
        """
        networks, distinct = self._networks(plan)
        # Enough initial words for two layers of worst-case pops of a full batch, and more.
        random_words = _initial_words(math.ceil(3 * _PRECISION_BITS * self.batch_size * self.num_dims / 32) + 4)
        coder = constriction.stream.stack.AnsCoder(np.concatenate([random_words, _seed_stack_words(seed)]))
        progress = cli.progress_bar(len(plan) * (self.num_steps + 1), verbose, unit_name="step")
        start_bits, coded_dims = coder.num_bits(), 0
        total_dims = sum(math.prod(batch.shape) * len(batch.tiles) for batch in plan) * self.channels
        projection = {"bits": None, "tiles": 0, "total": sum(len(batch.tiles) for batch in plan)}
        for number, (batch, network) in enumerate(zip(plan, networks)):
            height, width = batch.shape
            tiles = np.stack([xs[i][top : top + height, left : left + width] for i, top, left in batch.tiles])
            self._encode_batch(coder, tiles, number, grid, network, progress)
            coded_dims += tiles.size
            projection["tiles"] += len(batch.tiles)
            if give_up_above is not None and 16 * coded_dims >= total_dims and projection["bits"] is None:
                rate = (coder.num_bits() - start_bits) / coded_dims
                projection["bits"] = 8 * len(seed) + rate * total_dims
                if projection["bits"] > give_up_above:
                    if verbose:
                        print()  # end the progress bar's line
                    return None, projection
        words = coder.get_compressed()
        common = min(len(words), len(random_words))
        differs = np.flatnonzero(words[:common] != random_words[:common])
        shared = int(differs[0]) if len(differs) else common
        lengths = [len(seed)] + [0] * (len(xs) - 1)
        return self._pack(
            BITS_BACK, len(xs), [image.shape[:2] for image in xs], lengths, names,
            words[shared:].astype("<u4").tobytes(), num_steps=self.num_steps, batch_size=self.batch_size,
            initial=len(random_words), shared=shared, seed_rows=seed_rows,
            probe_sha256=self._probe_sha256(grid, distinct),
        ), projection  # fmt: skip

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
        progress = cli.progress_bar(len(plan) * (header.num_steps + 1), verbose, unit_name="step")
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
