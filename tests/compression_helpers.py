"""Models, images and helpers for the compression tests (tests/test_compression*.py)."""

import math

import numpy as np
from gaussian import BIN_CENTRES, GaussianData, GaussianDenoiser

from vdm_tf import VDM, datasets, networks, schedules
from vdm_tf import cli as vdm_cli
from vdm_tf.compression import BitsBackCodec
from vdm_tf.compression import cli as compression_cli
from vdm_tf.compression.tiles import _tile_plan

IMAGE_SHAPE = (8, 8, 1)
GAMMA_0, GAMMA_1 = -10.0, 8.0


def random_denoiser_model(seed, channels=1):
    """A tiny untrained ScoreUNet VDM of 8x8 images with `channels` channels whose weights
    (zero-initialised ones too) are random, so its outputs depend on every input bit and differ
    from another seed's."""
    model = VDM(
        networks.ScoreUNet(n_layers=1, n_embd=16, fourier_exponents=(3,), dropout=0.0),
        schedules.LearnedLinear(GAMMA_0, GAMMA_1),
        (*IMAGE_SHAPE[:2], channels),
    )
    rng = np.random.default_rng(seed)
    for weight in model.denoiser.weights:
        weight.assign(weight.numpy() + 0.1 * rng.standard_normal(weight.shape).astype(np.float32))
    return model


def gaussian_model_and_data():
    """Discretized Gaussian data and the VDM with its analytic denoiser (tests/gaussian.py)."""
    mean = np.linspace(-0.5, 0.5, 64).reshape(IMAGE_SHAPE)
    std = np.linspace(0.1, 0.4, 64).reshape(IMAGE_SHAPE)
    model = VDM(GaussianDenoiser(mean, std), schedules.FixedLinear(GAMMA_0, GAMMA_1), IMAGE_SHAPE)
    return model, GaussianData(mean, std)


def discrete_elbo_per_image(model, data, x, num_steps):
    """Each image's discrete-time -ELBO with T = num_steps steps in bpd, float64 [N]: its expectation
    over the noise (not over images), in closed form for `gaussian_model_and_data`.

    Prior and reconstruction terms per image (tests/gaussian.py) plus VDM eq. (16) summed over the
    T steps, 0.5 expm1(gamma_i - gamma_{i-1}) E ||eps - eps_hat(z_{t_i})||^2 given the image.
    Compared with an estimate on the same images it removes their sampling spread.
    """
    t = np.arange(num_steps + 1, dtype=np.float32) / num_steps
    gammas = model.schedule(t).numpy().astype(np.float64)
    f = BIN_CENTRES[np.asarray(x)]
    steps = np.expm1(gammas[1:] - gammas[:-1])[:, None] * data.expected_squared_error(gammas[1:], f)
    nats = 0.5 * steps.sum(0) + data.prior_nats(GAMMA_1, f) + data.reconstruction_nats(GAMMA_0, x)
    return nats / (data.num_dims * math.log(2.0))


def edge_and_digit_images():
    """uint8 [15, 8, 8, 1]: 4 uniform-random, all 0, all 255, two checkerboards (0/255, 127/128),
    stripes, and 6 digits of the test split."""
    rng = np.random.default_rng(0)
    rows, cols = np.indices(IMAGE_SHAPE[:2])
    checker = ((rows + cols) % 2)[..., None]
    edges = [
        np.zeros(IMAGE_SHAPE),
        np.full(IMAGE_SHAPE, 255),
        255 * checker,
        127 + checker,
        255 * (rows % 2)[..., None],
    ]
    return np.concatenate(
        [
            rng.integers(0, 256, (4, *IMAGE_SHAPE)),
            np.stack(edges),
            datasets.digits_arrays("test")[:6],
        ]
    ).astype(np.uint8)


class FixedBatchesCodec(BitsBackCodec):
    """A codec that codes `batch_size` tiles per batch from the first, as format versions 1 and 2
    did (no ramp, no budget): the tests relabel its files as those versions, and its initial bits
    are those of one full batch."""

    def _encode_plan(self, sizes, seed_rows, budget):
        return _tile_plan(sizes, self.image_shape, seed_rows, self.batch_size, ramp=False)


def run_command_line(argv):
    """`python -m vdm_tf.compression ARGV` in this process; its exit status (`vdm_tf.cli.run`)."""
    try:
        vdm_cli.run(compression_cli.main, argv, prog=compression_cli.PROG)
    except SystemExit as status:
        return status.code
    raise AssertionError("vdm_tf.cli.run returned without exiting")
