"""vdm_tf: likelihood-based diffusion models (Variational Diffusion Models and friends) in TensorFlow / Keras."""

import os

# oneDNN's convolution kernels train several times faster on CPUs where TensorFlow does not
# turn them on by itself (AMD among them). Effective only if TensorFlow is not imported yet.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from vdm_tf import _startup  # noqa: E402

_startup.keep_freed_memory()  # no page faults for memory each training step frees and takes again
_startup.import_tensorflow()  # without the CPU machine's start-up banners (VDM_TF_STARTUP_LOGS=1 shows them)

from vdm_tf import (  # noqa: E402
    augmentation,
    cdm,
    conditional,
    datasets,
    evaluation,
    haar,
    images,
    likelihood,
    multiscale,
    networks,
    optimizers,
    runs,
    samplers,
    schedules,
    score_model,
    sde,
    seeding,
)
from vdm_tf.runs import load  # noqa: E402
from vdm_tf.vdm import VDM  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # vdm_tf.compression loads constriction; import it on first use, which also keeps
    # `python -m vdm_tf.compression` from finding the module already imported.
    if name == "compression":
        import importlib

        return importlib.import_module("vdm_tf.compression")
    raise AttributeError(f"module 'vdm_tf' has no attribute {name!r}")


__all__ = [
    "VDM",
    "load",
    "augmentation",
    "cdm",
    "compression",
    "conditional",
    "datasets",
    "evaluation",
    "haar",
    "images",
    "likelihood",
    "multiscale",
    "networks",
    "optimizers",
    "runs",
    "samplers",
    "schedules",
    "score_model",
    "sde",
    "seeding",
]
