"""The model family of vdm_tf: one base class, one file per model (ARCHITECTURE.md, "The model family").

- `DiffusionModel` (`base.py`): what every model shares: training step, per-example
  randomness, traced `elbo` / `sample`, the `.sde` / `.score` protocol of the samplers.
- `VDM` (`vdm.py`): Variational Diffusion Models, the continuous- and discrete-time VLB.
- `CDM` (`cdm.py`): Classification Diffusion Models, a noise-level classifier as denoiser.
- `MultiScaleVDM` (`multiscale.py`): a VDM whose Haar groups diffuse on their own schedules.
- `ScoreSDEModel` (`score_sde.py`): a VDM of a fixed VP / sub-VP / VE SDE.
- `MuLAN` (`mulan.py`): a per-pixel schedule conditioned on an auxiliary latent (learned adaptive noise).

The folder also holds the bundled models of `python -m vdm_tf.compression` (`*.keras`).
"""

from vdm_tf.models.base import DiffusionModel
from vdm_tf.models.cdm import CDM
from vdm_tf.models.mulan import MuLAN
from vdm_tf.models.multiscale import MultiScaleVDM
from vdm_tf.models.score_sde import ScoreSDEModel
from vdm_tf.models.vdm import VDM

__all__ = ["CDM", "DiffusionModel", "MuLAN", "MultiScaleVDM", "ScoreSDEModel", "VDM"]
