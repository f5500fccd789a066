"""Networks: the noise-prediction U-Net (`ScoreUNet`), its blocks, the classifiers of guidance and CDM."""

from vdm_tf.networks.blocks import AttentionBlock, ResnetBlock
from vdm_tf.networks.embeddings import TimestepEmbedding
from vdm_tf.networks.fourier_features import FourierFeatures
from vdm_tf.networks.noise_conditional_classifier import NoiseConditionalClassifier
from vdm_tf.networks.noise_level_classifier import NoiseLevelClassifier
from vdm_tf.networks.normalization import GroupNorm
from vdm_tf.networks.score_unet import ScoreUNet

__all__ = [
    "AttentionBlock",
    "FourierFeatures",
    "GroupNorm",
    "NoiseConditionalClassifier",
    "NoiseLevelClassifier",
    "ResnetBlock",
    "ScoreUNet",
    "TimestepEmbedding",
]
