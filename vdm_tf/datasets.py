"""Input pipelines: batches of uint8 images, NHWC, for training and evaluation.

Known data sets (see `info(name)` for each one's shape and split names):

- `digits`: scikit-learn's bundled 8x8 handwritten digits, shipped with scikit-learn so it
  works offline. The pixel values 0..16 become 0..255 via `np.round(v * 255 / 16)`.
  The 1797 images are split ONCE, by a fixed-seed permutation
  (`np.random.default_rng(0).permutation(1797)`): its first 1500 indices are the
  `train` split, the remaining 297 the `test` split. The split is the same on every machine.
- `photos`: 32x32 RGB patches of the photographs bundled with scikit-image (`skimage.data`, a
  pinned dependency, so it works offline), read from its PNG files with Pillow. The split is by
  photograph, so no test pixel is ever trained on: `train` = astronaut, immunohistochemistry,
  motorcycle_left, motorcycle_right (`PHOTOS_TRAIN`), patches at stride 16 (overlapping, 4622);
  `test` = chelsea, coffee (`PHOTOS_TEST`), the non-overlapping patches at stride 32 (342).
  `photos_images(split)` gives the full-size photographs (the compression benchmark's images).
- `photos_grey`: the same patches (same photographs, split, strides and counts) in grey: the
  luminance Pillow's `convert("L")` gives, L = (299 R + 587 G + 114 B) / 1000 (ITU-R 601-2),
  32x32x1; `photos_images(split, grey=True)` gives the full-size grey photographs.
- `mnist` (28x28x1), `cifar10` (32x32x3): the TensorFlow Datasets builders of those names,
  splits `train` / `test`.
- `imagenet32`, `imagenet64`: the TensorFlow Datasets builders `downsampled_imagenet/32x32`
  and `downsampled_imagenet/64x64` (van den Oord et al. 2016), splits `train` / `validation`.
  Their original download URLs are gone; the data must already be prepared in `data_dir`.

Every data set goes through the same steps once it is a `tf.data.Dataset` of uint8 images
(`_batched`): shuffle with a seed, repeat, batch, prefetch.

Preparing a TensorFlow Datasets data set (its download) imports modules that reading a prepared
one does not (`importlib_resources`, a pinned dependency of ours since tfds itself declares it
only for Python < 3.9). If one is missing, `load` raises `IncompleteInstallError`, whose one-line
message names the module and the reinstall command, rather than tfds's long traceback.

Multi-device training: pass the `tf.distribute.InputContext` that
`strategy.distribute_datasets_from_function` hands to its function. Each input pipeline then
reads its own contiguous part of the split (`tfds.even_splits` semantics, so the parts
together hold every example exactly once) and batches with the per-replica batch size.
"""

import functools
import os

import numpy as np
import sklearn.datasets
import tensorflow as tf
import tensorflow_datasets as tfds

from vdm_tf import cli
from vdm_tf.dataset_table import (  # noqa: F401  (the table, without TensorFlow; its names are this module's too)
    DIGITS_NUM_TEST,
    DIGITS_NUM_TRAIN,
    DIGITS_SPLIT_SEED,
    NAMES,
    PHOTOS_NUM_TEST,
    PHOTOS_NUM_TRAIN,
    PHOTOS_PATCH,
    PHOTOS_STRIDES,
    PHOTOS_TEST,
    PHOTOS_TRAIN,
    DatasetInfo,
    info,
)

# What installs the pinned dependencies again (the Makefile's install step, or pip itself).
REINSTALL = "make / pip install -c constraints.txt -e ."


class IncompleteInstallError(cli.Failure, ImportError):
    """A module the TensorFlow Datasets code needs is not installed: the install is incomplete.

    No download and no data directory mends that; reinstalling with the pinned versions does, so
    the message is that one line. It is a `cli.Failure` (the user's to fix, said in one line by
    every command line) and an `ImportError` (what it is to a program).

    Args:
        module: the name of the missing module.
    """

    def __init__(self, module):
        super().__init__(
            f"the module {module!r}, which TensorFlow Datasets needs, is not installed; reinstall: {REINSTALL}",
            name=module,
        )


@functools.lru_cache(maxsize=1)
def _all_digits():
    """All 1797 digits in scikit-learn's order: uint8 images [1797, 8, 8, 1], int64 labels [1797]."""
    digits = sklearn.datasets.load_digits()
    images = np.round(digits.images * 255 / 16).astype(np.uint8)[..., np.newaxis]
    labels = digits.target.astype(np.int64)
    images.flags.writeable = False  # The cached arrays are shared between calls.
    labels.flags.writeable = False
    return images, labels


def digits_indices(split):
    """Indices into scikit-learn's `load_digits()` arrays of the images in a digits split.

    Args:
        split: "train" (1500 indices) or "test" (297 indices).

    Returns:
        int64 array; the two splits are disjoint and together cover 0..1796.

    Example:
        >>> digits_indices("test").shape
        (297,)
    """
    permutation = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(DIGITS_NUM_TRAIN + DIGITS_NUM_TEST)
    if split == "train":
        return permutation[:DIGITS_NUM_TRAIN]
    if split == "test":
        return permutation[DIGITS_NUM_TRAIN:]
    raise ValueError(f"The digits data set has the splits 'train' and 'test'; got {split!r}.")


def digits_arrays(split, *, with_labels=False):
    """The images (and optionally labels) of a digits split, as NumPy arrays.

    Args:
        split: "train" or "test".
        with_labels: also return the digit classes 0..9.

    Returns:
        uint8 array [N, 8, 8, 1] with values 0..255 (N = 1500 for "train", 297 for "test"),
        or the tuple (images, int64 labels [N]) when `with_labels` is True.

    Example:
        >>> images, labels = digits_arrays("train", with_labels=True)
        >>> images.shape, images.dtype, labels.shape
        ((1500, 8, 8, 1), dtype('uint8'), (1500,))
    """
    indices = digits_indices(split)
    images, labels = _all_digits()
    if with_labels:
        return images[indices], labels[indices]
    return images[indices]


def photos_images(split, *, grey=False):
    """The full-size photographs of a photos split: {name: uint8 array [H, W, 3]} ([H, W, 1] if grey).

    Args:
        split: "train" (`PHOTOS_TRAIN`) or "test" (`PHOTOS_TEST`).
        grey: the luminance of each photograph, Pillow's `convert("L")` of its RGB pixels.

    Example:
        >>> {name: image.shape for name, image in photos_images("test").items()}
        {'chelsea': (300, 451, 3), 'coffee': (400, 600, 3)}
    """
    if split not in PHOTOS_STRIDES:
        raise ValueError(f"The photos data set has the splits 'train' and 'test'; got {split!r}.")
    import skimage.data
    from PIL import Image

    photos = {}
    for name in PHOTOS_TRAIN if split == "train" else PHOTOS_TEST:
        with Image.open(os.path.join(skimage.data.data_dir, f"{name}.png")) as picture:
            rgb = picture.convert("RGB")
            photos[name] = np.asarray(rgb.convert("L"))[..., np.newaxis] if grey else np.asarray(rgb)
    return photos


@functools.lru_cache(maxsize=4)
def photos_arrays(split, *, grey=False):
    """The 32x32 patches of a photos split: uint8 [N, 32, 32, 3] ([N, 32, 32, 1] if grey), photograph by
    photograph, rows first.

    Patches start every `PHOTOS_STRIDES[split]` pixels (16 for train: overlapping; 32 for test)
    and lie inside the photograph; N = 4622 for "train", 342 for "test".
    """
    stride, patches = PHOTOS_STRIDES.get(split), []
    for image in photos_images(split, grey=grey).values():
        for top in range(0, image.shape[0] - PHOTOS_PATCH + 1, stride):
            for left in range(0, image.shape[1] - PHOTOS_PATCH + 1, stride):
                patches.append(image[top : top + PHOTOS_PATCH, left : left + PHOTOS_PATCH])
    patches = np.stack(patches)
    patches.flags.writeable = False  # the cached array is shared between calls
    return patches


def load(
    name,
    split,
    batch_size,
    *,
    shuffle=True,
    repeat=True,
    seed=0,
    data_dir=None,
    drop_remainder=True,
    shuffle_buffer=10_000,
    with_labels=False,
    input_context=None,
):
    """Builds a `tf.data.Dataset` of batches of uint8 images for one of the known data sets.

    Args:
        name: one of `NAMES` (see `info`).
        split: split name: "train"/"test" for digits, photos, photos_grey, mnist and cifar10, "train"/"validation" for
            imagenet32/64 (`info(name).test_split` is the evaluation split). TensorFlow Datasets
            slicing such as "train[:90%]" works for all but digits.
        batch_size: global batch size; with `input_context`, each pipeline batches
            `input_context.get_per_replica_batch_size(batch_size)` images.
        shuffle: shuffle the examples (and, for TensorFlow Datasets, the order of the files).
        repeat: repeat forever; otherwise one pass over the split.
        seed: int seed for the shuffling, so the same seed gives the same batches; None for an
            unseeded shuffle, which also lets tf.data produce elements out of order.
        data_dir: TensorFlow Datasets data directory (None: its default); unused for digits and photos.
        drop_remainder: drop a last, smaller batch; evaluation wants False.
        shuffle_buffer: number of examples the shuffle draws from.
        with_labels: yield (images, int64 labels) pairs instead of images; imagenet32/64 have no
            labels.
        input_context: a `tf.distribute.InputContext`: read only this input pipeline's part of
            the split, in per-replica batches.

    Returns:
        A `tf.data.Dataset` of uint8 tensors [batch, height, width, channels] (or
        (images, labels) pairs), prefetched.

    Raises:
        ValueError: for an unknown name, an unknown digits split, or `with_labels` on a data set
            without labels.
        IncompleteInstallError: TensorFlow Datasets needs a module that is not installed.

    Example:
        Training (random batches forever) and evaluation (every test image exactly once):

        >>> train = load("digits", "train", 128, seed=1)
        >>> test = load("digits", "test", 128, shuffle=False, repeat=False, drop_remainder=False)
        >>> sum(batch.shape[0] for batch in test)
        297

        With several devices:

        >>> strategy = tf.distribute.MirroredStrategy()
        >>> train = strategy.distribute_datasets_from_function(
        ...     lambda context: load("cifar10", "train", 256, input_context=context))
    """
    dataset_info = info(name)
    if with_labels and dataset_info.num_classes is None:
        raise ValueError(f"The {name} data set has no labels; call load with with_labels=False.")
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(batch_size)
    if name in ("photos", "photos_grey"):
        examples = _array_examples((photos_arrays(split, grey=name == "photos_grey"),), False, input_context)
    elif dataset_info.tfds_name is None:
        examples = _array_examples(digits_arrays(split, with_labels=True), with_labels, input_context)
    else:
        examples = _tfds_examples(dataset_info, split, with_labels, shuffle, seed, data_dir, input_context)
    return _batched(examples, batch_size, shuffle, repeat, seed, drop_remainder, shuffle_buffer)


def _array_examples(arrays, with_labels, input_context):
    """A split held in arrays (images, and labels if any; this input pipeline's part) as a dataset of examples."""
    if input_context is not None:
        # Contiguous, near-equal parts, like tfds.even_splits.
        arrays = tuple(
            np.array_split(array, input_context.num_input_pipelines)[input_context.input_pipeline_id]
            for array in arrays
        )
    return tf.data.Dataset.from_tensor_slices(arrays if with_labels else arrays[0])


def _tfds_examples(dataset_info, split, with_labels, shuffle, seed, data_dir, input_context):
    """A TensorFlow Datasets split (this input pipeline's part of it) as a dataset of examples."""
    if input_context is not None:
        split = tfds.even_splits(split, input_context.num_input_pipelines)[input_context.input_pipeline_id]
    try:
        examples = tfds.load(
            dataset_info.tfds_name,
            split=split,
            data_dir=data_dir,
            shuffle_files=shuffle,
            read_config=tfds.ReadConfig(shuffle_seed=seed),
        )
    except ModuleNotFoundError as error:  # tfds imports some modules only when it prepares the data
        raise IncompleteInstallError(error.name) from error

    def convert(example):
        # The downsampled_imagenet builders declare images of shape [None, None, 3].
        image = tf.ensure_shape(example["image"], dataset_info.image_shape)
        return (image, example["label"]) if with_labels else image

    return examples.map(convert, num_parallel_calls=tf.data.AUTOTUNE)


def _batched(examples, batch_size, shuffle, repeat, seed, drop_remainder, shuffle_buffer):
    """The steps every data set shares: shuffle, repeat, batch, prefetch."""
    if shuffle:
        examples = examples.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        examples = examples.repeat()
    batches = examples.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = seed is not None  # Same seed, same batches in the same order.
    return batches.with_options(options)
