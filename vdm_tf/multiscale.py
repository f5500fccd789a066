"""`vdm_tf.multiscale`, multi-scale diffusion: its import path (defined in `vdm_tf.models.multiscale`)."""

from vdm_tf.models.multiscale import MultiScaleVDM, StageDenoisers, default_end_times

__all__ = ["MultiScaleVDM", "StageDenoisers", "default_end_times"]
