"""`vdm_tf.score_model`, score models of fixed SDEs: its import path (defined in `vdm_tf.models.score_sde`)."""

from vdm_tf.models.score_sde import ScoreSDEModel, gamma_range

__all__ = ["ScoreSDEModel", "gamma_range"]
