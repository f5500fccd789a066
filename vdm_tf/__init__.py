"""vdm_tf: likelihood-based diffusion models (Variational Diffusion Models and friends) in TensorFlow / Keras.

`import vdm_tf` changes nothing in the process and imports no TensorFlow: each submodule
(`vdm_tf.samplers`, `vdm_tf.likelihood`, ...) and the names below are imported on first use
(PEP 562), so that a command line can check its arguments before TensorFlow starts.
`vdm_tf.prepare_process()` is the one call that does change the process (oneDNN on, freed memory
kept, TensorFlow's start-up banners filtered): the command lines make it, and so can a script of
one's own, before it imports TensorFlow.
"""

from vdm_tf import _lazy

__version__ = "0.1.0"

# Public submodules, imported on first attribute access.
_SUBMODULES = (
    "augmentation",
    "cdm",
    "cli",
    "compression",
    "conditional",
    "datasets",
    "evaluation",
    "files",
    "haar",
    "image_files",
    "images",
    "likelihood",
    "metrics",
    "models",
    "multiscale",
    "networks",
    "optimizers",
    "runs",
    "samplers",
    "schedules",
    "score_model",
    "sde",
    "seeding",
    "traced",
    "vdm",
)
# Names defined in a submodule: name -> module.
_NAMES = {"VDM": "models", "MuLAN": "models", "load": "runs", "prepare_process": "_startup"}


__getattr__, __dir__ = _lazy.attributes(__name__, globals(), _SUBMODULES, _NAMES)

__all__ = ["VDM", "MuLAN", "load", "prepare_process", *_SUBMODULES]
