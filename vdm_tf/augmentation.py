"""Data augmentation with the denoiser conditioned on it (VDM's CIFAR-10 result with augmentation).

Kingma et al. 2021 (section 6, table 1) reach 2.49 bpd on CIFAR-10, instead of 2.65, by
training on randomly flipped, rotated and channel-permuted images while telling the denoiser
which transformation was applied ("distribution augmentation", Jun et al. 2020). The model then
learns the likelihood of every transformed distribution at once; evaluating and sampling with
the conditioning of the identity transformation gives the likelihood of the original data.

The conditioning vector is zero for the identity, so a denoiser called without conditioning
(zeros) models the un-augmented data:
    [horizontal flip (1)] + [one-hot of the rotation by 90, 180, 270 degrees (3)]
    + [one-hot of the 5 non-identity permutations of 3 channels (5)].
"""

import itertools

import keras
import tensorflow as tf

from vdm_tf import seeding

_CHANNEL_PERMUTATIONS = list(itertools.permutations(range(3)))  # identity first


@keras.saving.register_keras_serializable(package="vdm_tf")
class Augmentation:
    """Random flips, 90-degree rotations and channel permutations of square uint8 images.

    Each example draws its own transformation from `seed` and its global index (like all
    per-example randomness in vdm_tf). With probability `probability` an example is
    transformed: each enabled kind then picks uniformly among its options, identity included
    (flip or not; 0, 90, 180, 270 degrees; the 6 channel orders). Otherwise it stays as it is.

    Args:
        flips: random horizontal flips.
        rotations: random rotations by multiples of 90 degrees (square images).
        channel_swaps: random permutations of the 3 colour channels (RGB images only).
        probability: chance that an example is transformed at all.

    Example:
    >>> augmentation = Augmentation()
    >>> images, conditioning = augmentation(x_uint8, seed=0, example_index=tf.range(8))
    >>> conditioning.shape   # [8, augmentation.conditioning_dim]
    """

    conditioning_dim = 1 + 3 + len(_CHANNEL_PERMUTATIONS) - 1

    def __init__(self, flips=True, rotations=True, channel_swaps=True, probability=0.5):
        self.flips, self.rotations, self.channel_swaps = bool(flips), bool(rotations), bool(channel_swaps)
        self.probability = float(probability)

    def __call__(self, images, seed, example_index):
        """Returns (transformed uint8 images, float32 conditioning [N, conditioning_dim])."""
        draws = tf.map_fn(
            lambda index: tf.random.stateless_uniform([4], seeding.fold_in(seed, index)),
            tf.cast(example_index, tf.int64),
            fn_output_signature=tf.float32,
        )
        transform = draws[:, 0] < self.probability

        def choose(u, count, enabled):
            """Uniform among `count` options (0 = identity) for transformed examples, else 0."""
            chosen = tf.minimum(tf.cast(u * count, tf.int32), count - 1)
            return tf.where(tf.logical_and(transform, enabled), chosen, 0)

        flip = choose(draws[:, 1], 2, self.flips) > 0
        rotation = choose(draws[:, 2], 4, self.rotations)
        permutation = choose(draws[:, 3], len(_CHANNEL_PERMUTATIONS), self.channel_swaps)
        images = tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)
        images = tf.map_fn(
            lambda args: tf.image.rot90(args[0], args[1]), (images, rotation), fn_output_signature=images.dtype
        )
        if self.channel_swaps:
            images = tf.gather(images, tf.gather(tf.constant(_CHANNEL_PERMUTATIONS), permutation), axis=3, batch_dims=1)
        conditioning = tf.concat(
            [
                tf.cast(flip, tf.float32)[:, None],
                tf.one_hot(rotation - 1, 3),
                tf.one_hot(permutation - 1, len(_CHANNEL_PERMUTATIONS) - 1),
            ],
            axis=1,
        )
        return images, conditioning

    def get_config(self):
        return dict(
            flips=self.flips, rotations=self.rotations, channel_swaps=self.channel_swaps, probability=self.probability
        )

    @classmethod
    def from_config(cls, config):
        return cls(**config)
