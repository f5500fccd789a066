"""`vdm_tf.vdm.VDM`, the Variational Diffusion Model: its import path (defined in `vdm_tf.models.vdm`)."""

from vdm_tf.models.base import DROPOUT_STREAM
from vdm_tf.models.vdm import VDM
from vdm_tf.samplers import ancestral_update, check_count

TERMS = VDM.TERMS

__all__ = ["DROPOUT_STREAM", "TERMS", "VDM", "ancestral_update", "check_count"]
