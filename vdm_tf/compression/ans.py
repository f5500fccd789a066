"""The ANS side of bits-back coding: latent grids, windows, pushes, pops and whitening (constriction, NumPy).

## The latent grid

Each latent z_i lives on its own grid z_i = k delta_i, k an integer, with
delta_i = min(std of q(z_i | .), std of p(z_i | .)) / latent_bins (the narrowest Gaussian that codes
z_i, so each covers at least `latent_bins` grid points per standard deviation). A Gaussian
N(m, s^2) over z_i codes the integer k - round(m / delta_i) with constriction's QuantizedGaussian
of mean m / delta_i - round(m / delta_i) and std s / delta_i, restricted to a window of
+-ceil(window * s / delta_i) symbols (a finite alphabet keeps the cost of constriction's
probability floor, 2^-24 per symbol, negligible). Pops come from the window. A value outside the
window of a push (a p that misses, e.g. an untrained model) is coded as an escape symbol followed
by its offset in 32 raw bits, so any model codes losslessly, only less compactly. No error
measurable above the Monte-Carlo noise (about 0.1%) from latent_bins = 2 up on Gaussian data.

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

## The stack's bottom

The stack starts with fixed pseudo-random words (`_initial_words`), and above them the seed's
bytes (`_seed_stack_words`): the first pops of a message read those. The file keeps only the
words the message changed.
"""

import dataclasses
import hashlib
import math

import constriction
import numpy as np

_INITIAL_SEED = 0x5644_4D5A  # the pseudo-random words the stack starts with (PCG64 raw stream)
_PRECISION_BITS = 24  # constriction's ANS precision: one symbol costs at most 24 bits
_MAX_ALPHABET = 1 << 20
_RAW_HALF = constriction.stream.model.Uniform(1 << 16)  # an escaped offset: two 16-bit halves
_PIXELS = constriction.stream.model.Categorical(perfect=False)


def _initial_words(num_words):
    """The fixed pseudo-random words the ANS stack starts with (last word non-zero, as ANS needs)."""
    words = np.random.PCG64(_INITIAL_SEED).random_raw((num_words + 1) // 2).view("<u4")[:num_words].astype(np.uint32)
    words[-1] |= 1
    return words


def _seed_stack_words(seed):
    """The bottom of the stack above the pseudo-random words: the seed's bytes as words, then a word 1."""
    if not seed:
        return np.zeros(0, np.uint32)
    padded = seed + bytes(-len(seed) % 4)
    return np.concatenate([np.frombuffer(padded, "<u4"), [1]]).astype(np.uint32)


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
