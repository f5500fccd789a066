"""Base-2 Fourier features of the noisy latents (Kingma et al. 2021, appendix C)."""

import keras
import numpy as np
import tensorflow as tf


@keras.saving.register_keras_serializable(package="vdm_tf")
class FourierFeatures(keras.layers.Layer):
    """High-frequency Fourier features of every input value.

    For each channel value `z` and each exponent `n` in `exponents` this computes
    `sin(2^n * pi * z)` and `cos(2^n * pi * z)` (paper, eq. 34). With inputs in [-1, 1] and
    8-bit data, whose bins are 2 / 256 = 2^-7 wide, exponents 7 and 8 give periods of two bins
    and of one bin: the features resolve the fine-scale detail that a smooth function of the
    latents struggles to model at small noise levels.

    The official code writes the frequencies as `2^n * 2 * pi` with `n` in `(6, 7)`; those are
    the same frequencies as `2^n * pi` with `n` in `(7, 8)`, the paper's notation used here.

    The output has `2 * len(exponents)` features per input channel, laid out as in the
    official code: all sines, then all cosines; within each, channel-major
    (`[c0 n0, c0 n1, c1 n0, ...]`). The layer has no weights; the score network
    concatenates its output to the input.

    Args:
        exponents: the exponents `n` (integers).
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> z = tf.random.uniform([2, 8, 8, 3], -1.0, 1.0)
    >>> FourierFeatures(exponents=(7, 8))(z).shape  # 3 channels * 2 exponents * (sin, cos)
    TensorShape([2, 8, 8, 12])

    Reference:
        Kingma et al. 2021, "Variational Diffusion Models", appendix C ("Fourier features
        for improved fine scale prediction"), https://arxiv.org/abs/2107.00630;
        `Base2FourierFeatures` in https://github.com/google-research/vdm (model_vdm.py).
    """

    def __init__(self, exponents=(7, 8), **kwargs):
        super().__init__(**kwargs)
        self.exponents = tuple(int(n) for n in exponents)
        self._frequencies = (2.0 ** np.array(self.exponents, np.float64) * np.pi).astype(np.float32)

    def call(self, z):
        h = z[..., None] * tf.constant(self._frequencies, z.dtype)
        h = tf.reshape(h, tf.concat([tf.shape(z)[:-1], [z.shape[-1] * len(self.exponents)]], axis=0))
        return tf.concat([tf.sin(h), tf.cos(h)], axis=-1)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 2 * len(self.exponents) * input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"exponents": self.exponents})
        return config
