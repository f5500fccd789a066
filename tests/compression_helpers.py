"""Models and images for tests/test_compression.py."""

import numpy as np
from gaussian import GaussianData, GaussianDenoiser

from vdm_tf import VDM, datasets, networks, schedules

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
