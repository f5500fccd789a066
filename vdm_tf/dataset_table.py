"""The known data sets' names, shapes, splits and sizes: a static table, no TensorFlow.

A command line checks `--dataset=NAME` (and what depends on the shape, such as the Haar levels
of a multi-scale model) against this table before it starts TensorFlow; `vdm_tf.datasets`
builds its input pipelines from the same entries. The data sets themselves are described in
`vdm_tf.datasets`.
"""

import dataclasses

DIGITS_SPLIT_SEED = 0
DIGITS_NUM_TRAIN = 1500
DIGITS_NUM_TEST = 297
# The photos data set: scikit-image's bundled photographs (the names of its PNG files), split by photograph.
PHOTOS_TRAIN = ("astronaut", "ihc", "motorcycle_left", "motorcycle_right")
PHOTOS_TEST = ("chelsea", "coffee")
PHOTOS_PATCH = 32
PHOTOS_STRIDES = {"train": 16, "test": 32}
PHOTOS_NUM_TRAIN = 4622
PHOTOS_NUM_TEST = 342


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the pipelines know about one data set.

    Attributes:
        name: the name `load` accepts, e.g. "imagenet32".
        tfds_name: the TensorFlow Datasets builder name, or None for the embedded `digits`.
        image_shape: (height, width, channels) of every image.
        train_split: name of the training split.
        test_split: name of the split used for evaluation ("test" or "validation").
        num_train_examples: number of images in `train_split`.
        num_test_examples: number of images in `test_split`.
        num_classes: number of label classes, or None when the data set has no labels.
        pixel_values: the values its pixels take, when they are fewer than 256 (the digits:
            17), for a decoder that puts its mass on them (`Config.decoder_alphabet`); None: all.
    """

    name: str
    tfds_name: str | None
    image_shape: tuple[int, int, int]
    train_split: str
    test_split: str
    num_train_examples: int
    num_test_examples: int
    num_classes: int | None
    pixel_values: tuple[int, ...] | None = None


_DATASETS = {
    info.name: info
    for info in [
        DatasetInfo(
            "digits",
            None,
            (8, 8, 1),
            "train",
            "test",
            DIGITS_NUM_TRAIN,
            DIGITS_NUM_TEST,
            10,
            pixel_values=tuple(round(k * 255 / 16) for k in range(17)),  # the 0..16 of scikit-learn, scaled
        ),
        DatasetInfo(
            "photos", None, (PHOTOS_PATCH, PHOTOS_PATCH, 3), "train", "test", PHOTOS_NUM_TRAIN, PHOTOS_NUM_TEST, None
        ),
        DatasetInfo(
            "photos_grey",
            None,
            (PHOTOS_PATCH, PHOTOS_PATCH, 1),
            "train",
            "test",
            PHOTOS_NUM_TRAIN,
            PHOTOS_NUM_TEST,
            None,
        ),
        DatasetInfo("mnist", "mnist", (28, 28, 1), "train", "test", 60_000, 10_000, 10),
        DatasetInfo("cifar10", "cifar10", (32, 32, 3), "train", "test", 50_000, 10_000, 10),
        DatasetInfo(
            "imagenet32", "downsampled_imagenet/32x32", (32, 32, 3), "train", "validation", 1_281_149, 49_999, None
        ),
        DatasetInfo(
            "imagenet64", "downsampled_imagenet/64x64", (64, 64, 3), "train", "validation", 1_281_149, 49_999, None
        ),
    ]
}

NAMES = tuple(_DATASETS)


def info(name):
    """Returns the `DatasetInfo` of a known data set.

    Args:
        name: one of `NAMES`: "digits", "photos", "photos_grey", "mnist", "cifar10", "imagenet32", "imagenet64".

    Returns:
        The data set's `DatasetInfo`.

    Raises:
        ValueError: for an unknown name; the message lists the known names.

    Example:
        >>> info("imagenet64").image_shape
        (64, 64, 3)
    """
    if name not in _DATASETS:
        raise ValueError(f"Unknown data set {name!r}; known data sets: {', '.join(NAMES)}.")
    return _DATASETS[name]
