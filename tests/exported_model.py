"""One small exported model shared by the export and serving tests (exporting takes a while)."""

import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from export import saved_model

IMAGE_SHAPE = (8, 8, 1)
TIME_SAMPLES = 4
ODE_TOLERANCE = 1e-3  # an untrained network's ODE is stiff; keep the tests' solves short


def tiny_model():
    denoiser = vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=32, fourier_exponents=(3, 4), dropout=0.0)
    model = vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE)
    model.build()
    return model


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(model, export_dir, version path, loaded SavedModel), with every signature (score_sde)."""
    export_dir = str(tmp_path_factory.mktemp("export"))
    model = tiny_model()
    path = saved_model.export_model(
        model,
        export_dir,
        time_samples=TIME_SAMPLES,
        max_num_samples=64,
        ode_tolerance=ODE_TOLERANCE,
        score_sde=True,
    )
    return model, export_dir, path, tf.saved_model.load(path)
