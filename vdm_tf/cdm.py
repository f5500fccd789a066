"""`vdm_tf.cdm`, Classification Diffusion Models: their import path (defined in `vdm_tf.models.cdm`)."""

from vdm_tf.models.cdm import CDM, ClassifierDenoiser, dequantize, per_example_uniform

TERMS = CDM.TERMS

__all__ = ["CDM", "TERMS", "ClassifierDenoiser", "dequantize", "per_example_uniform"]
