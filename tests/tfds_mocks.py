"""Mocks of TensorFlow Datasets for the tests: the real `tfds.load` code, no downloads."""

import contextlib
from unittest import mock

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

NUM_MOCK_EXAMPLES = 10


def mock_tfds(**kwargs):
    """`tfds.testing.mock_data` from the builder code alone (no metadata files exist here)."""
    return tfds.testing.mock_data(num_examples=NUM_MOCK_EXAMPLES, policy=tfds.testing.MockPolicy.USE_CODE, **kwargs)


class FakeDownsampledImagenet:
    """Stands in for `FileReaderBuilder._as_dataset` of the downsampled_imagenet builders.

    The builders declare images of shape [None, None, 3]; mock_data's default generator fills
    unknown sizes with random ones (5..49 pixels), unlike the real files, whose images are all
    32x32 or 64x64. This produces random images of the config's size ("32x32" -> 32) with the
    builder's real feature spec (so the static shape stays [None, None, 3]) and records the
    arguments the builder was read with.
    """

    def __init__(self):
        self.calls = []

    def __call__(self, builder, split, **kwargs):
        self.calls.append(dict(split=split, config=builder.builder_config.name, **kwargs))
        size = int(builder.builder_config.name.split("x")[0])
        spec = builder.info.features.get_tensor_info()
        signature = {key: tf.TensorSpec(tensor.shape, tensor.tf_dtype) for key, tensor in spec.items()}

        def generate():
            rng = np.random.default_rng(0)
            for _ in range(NUM_MOCK_EXAMPLES):
                yield {"image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8)}

        return tf.data.Dataset.from_generator(generate, output_signature=signature)


class DownloadReached(Exception):
    """Raised where a builder would start downloading, under `stopped_at_the_download`."""


@contextlib.contextmanager
def stopped_at_the_download():
    """Runs the real preparation of a data set (`download_and_prepare`) up to its first download.

    The builders of vdm_tf's data sets fetch their files with `DownloadManager.download` or
    `download_and_extract`; both raise `DownloadReached` instead. Everything before them (the
    builder's module, its configs, the download manager, which reads the builder's checksums
    file) runs for real, so a module the preparation needs and the install lacks shows up here.
    """

    def stop(manager, url_or_urls):
        raise DownloadReached(url_or_urls)

    with (
        mock.patch.object(tfds.download.DownloadManager, "download", stop),
        mock.patch.object(tfds.download.DownloadManager, "download_and_extract", stop),
    ):
        yield


@contextlib.contextmanager
def mock_any(name):
    """Mocks the builder behind a vdm_tf data set name (see `vdm_tf.datasets.info`)."""
    if name.startswith("imagenet"):
        fake = FakeDownsampledImagenet()
        with mock_tfds(as_dataset_fn=lambda builder, split, **kwargs: fake(builder, split, **kwargs)):
            yield
    else:
        with mock_tfds():
            yield
