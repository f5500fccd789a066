"""Stateless random seeds.

Everything in vdm_tf that draws random numbers takes an explicit seed and uses TensorFlow's
stateless random ops, so the same seed gives the same numbers (in eager mode, inside a
`tf.function`, in an exported SavedModel and on another machine of the same kind).

A seed is anything `as_seed` accepts: a Python int, an integer scalar tensor, or a shape-[2]
integer tensor (TensorFlow's native stateless seed).
"""

import tensorflow as tf


def as_seed(seed):
    """Converts a user seed to TensorFlow's stateless form: an int64 tensor of shape [2].

    Args:
        seed: Python int, integer scalar tensor, or integer tensor of shape [2].

    Returns:
        int64 tensor of shape [2].
    """
    seed = tf.convert_to_tensor(seed)
    if not seed.dtype.is_integer:
        raise TypeError(f"A seed must be an integer (scalar or shape [2]); got dtype {seed.dtype.name}.")
    seed = tf.cast(seed, tf.int64)
    if seed.shape.rank == 0:
        return tf.stack([seed, tf.constant(0, tf.int64)])
    if seed.shape.as_list() != [2]:
        raise ValueError(f"A seed must be a scalar or have shape [2]; got shape {seed.shape}.")
    return seed


def split_seed(seed, num):
    """Derives `num` independent seeds from one; returns a list of shape-[2] int64 tensors."""
    return tf.unstack(tf.random.experimental.stateless_split(as_seed(seed), num))


def fold_in(seed, data):
    """Derives a new seed from `seed` and an integer (a step or replica index)."""
    return tf.random.experimental.stateless_fold_in(as_seed(seed), tf.cast(data, tf.int64))


def per_example_normal(seed, example_index, shape):
    """Standard normal noise [N, *shape] whose row i depends only on (seed, example_index[i]).

    So an example draws the same noise whether it is processed alone, in a batch, or on one of
    several replicas, as long as it keeps its (global) index.
    """
    seed = as_seed(seed)
    return tf.map_fn(
        lambda index: tf.random.stateless_normal(shape, fold_in(seed, index)),
        tf.cast(example_index, tf.int64),
        fn_output_signature=tf.float32,
        parallel_iterations=32,
    )
