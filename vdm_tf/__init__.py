"""vdm_tf: likelihood-based diffusion models (Variational Diffusion Models and friends) in TensorFlow / Keras."""

import os

# oneDNN's convolution kernels train several times faster on CPUs where TensorFlow does not
# turn them on by itself (AMD among them). Effective only if TensorFlow is not imported yet.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from vdm_tf import (  # noqa: E402
    augmentation,
    conditional,
    datasets,
    evaluation,
    images,
    likelihood,
    networks,
    samplers,
    schedules,
    score_model,
    sde,
    seeding,
)
from vdm_tf.vdm import VDM  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "VDM",
    "augmentation",
    "conditional",
    "datasets",
    "evaluation",
    "images",
    "likelihood",
    "networks",
    "samplers",
    "schedules",
    "score_model",
    "sde",
    "seeding",
]
