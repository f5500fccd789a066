"""Tests for vdm_tf.datasets: the embedded digits data set and the TensorFlow Datasets pipelines.

No data is downloaded: the TensorFlow Datasets builders are exercised through
`tfds.testing.mock_data`, which runs the real `tfds.load` code with the real builder classes
and configs but replaces the reading of the prepared files by generated examples of the
builder's own feature spec.
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import sklearn.datasets
import tensorflow as tf
import tensorflow_datasets as tfds
from tfds_mocks import FakeDownsampledImagenet
from tfds_mocks import mock_tfds as _mock_tfds

from vdm_tf import datasets

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture
def fake_imagenet():
    fake = FakeDownsampledImagenet()
    # mock_data calls as_dataset_fn as an unbound method: (builder, split, ...).
    with _mock_tfds(as_dataset_fn=lambda builder, split, **kwargs: fake(builder, split, **kwargs)):
        yield fake


def _take(dataset, num_batches):
    return [batch.numpy() for batch in dataset.take(num_batches)]


# ----------------------------------------------------------------------------------- digits


def test_digits_arrays_shapes_dtype_and_values():
    for split, size in [("train", 1500), ("test", 297)]:
        images = datasets.digits_arrays(split)
        assert images.shape == (size, 8, 8, 1)
        assert images.dtype == np.uint8
        assert images.max() == 255


def test_digits_mapping_is_rounded_rescaling_of_sklearn_data():
    raw = sklearn.datasets.load_digits()
    for split in ["train", "test"]:
        indices = datasets.digits_indices(split)
        images, labels = datasets.digits_arrays(split, with_labels=True)
        expected = np.round(raw.images[indices] * 255 / 16)[..., np.newaxis]
        np.testing.assert_array_equal(images, expected)
        np.testing.assert_array_equal(labels, raw.target[indices])
        assert labels.dtype == np.int64


def test_digits_split_is_fixed_and_disjoint():
    train, test = datasets.digits_indices("train"), datasets.digits_indices("test")
    assert len(train) == 1500 and len(test) == 297
    np.testing.assert_array_equal(np.sort(np.concatenate([train, test])), np.arange(1797))
    # The split must be the same everywhere: pin the start of the seeded permutation.
    np.testing.assert_array_equal(train[:5], [360, 1773, 1482, 600, 850])
    np.testing.assert_array_equal(test[:5], [1555, 1022, 1512, 955, 1397])
    np.testing.assert_array_equal(datasets.digits_arrays("test"), datasets.digits_arrays("test"))


def test_digits_unknown_split():
    with pytest.raises(ValueError, match="'train' and 'test'"):
        datasets.digits_arrays("validation")


def test_digits_evaluation_pipeline_yields_every_test_image_once_in_order():
    dataset = datasets.load("digits", "test", 64, shuffle=False, repeat=False, drop_remainder=False)
    batches = _take(dataset, -1)
    assert [len(batch) for batch in batches] == [64, 64, 64, 64, 41]
    np.testing.assert_array_equal(np.concatenate(batches), datasets.digits_arrays("test"))


def test_digits_training_pipeline_repeats_forever_in_full_batches():
    dataset = datasets.load("digits", "test", 64)
    assert dataset.cardinality() == tf.data.INFINITE_CARDINALITY
    assert dataset.element_spec == tf.TensorSpec([64, 8, 8, 1], tf.uint8)
    batches = _take(dataset, 10)  # 640 images: more than two passes over the 297.
    assert all(batch.shape == (64, 8, 8, 1) for batch in batches)
    # Shuffled: the first batch is not the first 64 test images.
    assert not np.array_equal(batches[0], datasets.digits_arrays("test")[:64])


def test_digits_same_seed_same_batches():
    first = _take(datasets.load("digits", "train", 32, seed=3), 5)
    again = _take(datasets.load("digits", "train", 32, seed=3), 5)
    other = _take(datasets.load("digits", "train", 32, seed=4), 5)
    np.testing.assert_array_equal(np.stack(first), np.stack(again))
    assert not np.array_equal(np.stack(first), np.stack(other))


def test_digits_with_labels():
    dataset = datasets.load("digits", "test", 297, shuffle=False, repeat=False)
    images, labels = next(iter(datasets.load("digits", "test", 297, shuffle=False, repeat=False, with_labels=True)))
    np.testing.assert_array_equal(images, next(iter(dataset)))
    np.testing.assert_array_equal(labels, datasets.digits_arrays("test", with_labels=True)[1])


def test_digits_input_context_shards_and_uses_per_replica_batch_size():
    parts = []
    for pipeline_id in range(2):
        context = tf.distribute.InputContext(
            num_input_pipelines=2, input_pipeline_id=pipeline_id, num_replicas_in_sync=4
        )
        training = datasets.load("digits", "train", 32, input_context=context)
        assert training.element_spec.shape == (8, 8, 8, 1)  # 32 images over 4 replicas.
        evaluation = datasets.load(
            "digits", "test", 32, shuffle=False, repeat=False, drop_remainder=False, input_context=context
        )
        parts.append(np.concatenate(_take(evaluation, -1)))
    assert [len(part) for part in parts] == [149, 148]
    np.testing.assert_array_equal(np.concatenate(parts), datasets.digits_arrays("test"))


# ----------------------------------------------------------------------- info and errors


def test_info():
    assert datasets.NAMES == ("digits", "photos", "photos_grey", "mnist", "cifar10", "imagenet32", "imagenet64")
    assert datasets.info("digits").image_shape == (8, 8, 1)
    assert datasets.info("digits").num_test_examples == 297
    assert datasets.info("mnist").image_shape == (28, 28, 1)
    assert datasets.info("cifar10").image_shape == (32, 32, 3)
    assert datasets.info("imagenet32").tfds_name == "downsampled_imagenet/32x32"
    assert datasets.info("imagenet64").image_shape == (64, 64, 3)
    assert datasets.info("imagenet64").test_split == "validation"


def test_photos_are_patches_of_the_bundled_photographs_split_by_photograph():
    """photos: 32x32 RGB patches of scikit-image's PNG photographs; train and test share no photograph."""
    import skimage.data

    train, test = datasets.photos_arrays("train"), datasets.photos_arrays("test")
    info = datasets.info("photos")
    assert train.shape == (info.num_train_examples, 32, 32, 3) and test.shape == (info.num_test_examples, 32, 32, 3)
    assert train.dtype == test.dtype == np.uint8
    assert not set(datasets.PHOTOS_TRAIN) & set(datasets.PHOTOS_TEST)
    chelsea = skimage.data.chelsea()  # scikit-image's own loader gives the same pixels
    np.testing.assert_array_equal(datasets.photos_images("test")["chelsea"], chelsea)
    np.testing.assert_array_equal(test[1], chelsea[:32, 32:64])  # rows first, stride 32
    np.testing.assert_array_equal(train[1], skimage.data.astronaut()[:32, 16:48])  # stride 16
    batch = next(iter(datasets.load("photos", "test", 400, shuffle=False, repeat=False, drop_remainder=False)))
    np.testing.assert_array_equal(batch.numpy(), test)
    with pytest.raises(ValueError, match="no labels"):
        datasets.load("photos", "train", 8, with_labels=True)
    with pytest.raises(ValueError, match="splits 'train' and 'test'"):
        datasets.photos_images("validation")


def test_photos_grey_is_the_luminance_of_the_same_patches():
    """photos_grey: Pillow's convert("L") of the photos patches (same photographs, split and order), 32x32x1."""
    from PIL import Image

    info = datasets.info("photos_grey")
    assert info.image_shape == (32, 32, 1) and info.num_classes is None
    for split, count in [("train", info.num_train_examples), ("test", info.num_test_examples)]:
        grey, rgb = datasets.photos_arrays(split, grey=True), datasets.photos_arrays(split)
        assert grey.shape == (count, 32, 32, 1) and grey.dtype == np.uint8
        for index in (0, count // 2, count - 1):
            expected = np.asarray(Image.fromarray(rgb[index]).convert("L"))
            np.testing.assert_array_equal(grey[index, ..., 0], expected)
    coffee = datasets.photos_images("test", grey=True)["coffee"]
    assert coffee.shape == (400, 600, 1)
    np.testing.assert_array_equal(
        coffee[..., 0], np.asarray(Image.fromarray(datasets.photos_images("test")["coffee"]).convert("L"))
    )
    batch = next(iter(datasets.load("photos_grey", "test", 400, shuffle=False, repeat=False, drop_remainder=False)))
    np.testing.assert_array_equal(batch.numpy(), datasets.photos_arrays("test", grey=True))


def test_info_names_are_real_tfds_builders_and_configs():
    for name in datasets.NAMES:
        tfds_name = datasets.info(name).tfds_name
        if tfds_name is None:
            continue
        builder_name, _, config = tfds_name.partition("/")
        builder_cls = tfds.builder_cls(builder_name)
        if config:
            assert config in [c.name for c in builder_cls.BUILDER_CONFIGS]


@pytest.mark.parametrize("call", [lambda: datasets.info("svhn"), lambda: datasets.load("svhn", "train", 8)])
def test_unknown_name_lists_known_names(call):
    with pytest.raises(ValueError, match="digits, photos, photos_grey, mnist, cifar10, imagenet32, imagenet64"):
        call()


# -------------------------------------------------------------- TensorFlow Datasets builders


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_training_batches(name):
    with _mock_tfds():
        dataset = datasets.load(name, "train", 4)
        batches = _take(dataset, 5)  # 20 images from 10 examples: repeats.
    expected_shape = (4,) + datasets.info(name).image_shape
    assert dataset.element_spec == tf.TensorSpec(expected_shape, tf.uint8)
    assert all(batch.shape == expected_shape and batch.dtype == np.uint8 for batch in batches)


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_tfds_evaluation_and_labels(name):
    with _mock_tfds():
        batches = _take(datasets.load(name, "test", 4, shuffle=False, repeat=False, drop_remainder=False), -1)
        images, labels = next(iter(datasets.load(name, "test", 4, shuffle=False, repeat=False, with_labels=True)))
    assert [len(batch) for batch in batches] == [4, 4, 2]
    assert images.shape == (4,) + datasets.info(name).image_shape
    assert labels.dtype == tf.int64 and labels.shape == (4,)


@pytest.mark.parametrize("name", ["imagenet32", "imagenet64"])
def test_imagenet_training_batches(name, fake_imagenet):
    dataset = datasets.load(name, "train", 4, seed=7)
    batches = _take(dataset, 5)
    expected_shape = (4,) + datasets.info(name).image_shape
    assert dataset.element_spec == tf.TensorSpec(expected_shape, tf.uint8)
    assert all(batch.shape == expected_shape and batch.dtype == np.uint8 for batch in batches)
    [call] = fake_imagenet.calls
    assert call["config"] == datasets.info(name).tfds_name.split("/")[1]
    assert call["split"] == "train"
    assert call["shuffle_files"] is True
    assert call["read_config"].shuffle_seed == 7


@pytest.mark.parametrize("name", ["imagenet32", "imagenet64"])
def test_imagenet_evaluation(name, fake_imagenet):
    batches = _take(datasets.load(name, "validation", 4, shuffle=False, repeat=False, drop_remainder=False), -1)
    assert [batch.shape for batch in batches] == [(n,) + datasets.info(name).image_shape for n in (4, 4, 2)]
    assert fake_imagenet.calls[0]["split"] == "validation"
    assert fake_imagenet.calls[0]["shuffle_files"] is False


def test_imagenet_input_context_reads_its_even_split(fake_imagenet):
    context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4)
    dataset = datasets.load("imagenet32", "train", 16, input_context=context)
    assert next(iter(dataset)).shape == (4, 32, 32, 3)
    assert fake_imagenet.calls[0]["split"] == tfds.even_splits("train", 2)[1]


def test_imagenet_has_no_labels():
    with pytest.raises(ValueError, match="no labels"):
        datasets.load("imagenet32", "train", 8, with_labels=True)


def test_imagenet_rejects_images_of_the_wrong_size():
    # mock_data's default generator gives the [None, None, 3] images random sizes.
    with _mock_tfds():
        dataset = datasets.load("imagenet32", "train", 4)
        with pytest.raises(tf.errors.InvalidArgumentError):
            _take(dataset, 1)


# ------------------------------------------------------- what the install brings for the data


def _tfds_data_sets_of_the_presets():
    """The data sets of every preset (trainers.main's and trainers.classifier's) that TFDS builds."""
    from trainers import classifier, configs

    names = {config.data.dataset for config in configs.PRESETS.values()}
    names |= {config.dataset for config in classifier.PRESETS.values()}
    return sorted(name for name in names if datasets.info(name).tfds_name is not None)


# Run in a fresh interpreter of the test environment (the project's .venv, installed from
# constraints.txt): the modules come from the install alone, not from what other tests imported.
PREPARE_AND_READ = """
import sys, tempfile
import tensorflow_datasets as tfds
from tfds_mocks import DownloadReached, mock_any, stopped_at_the_download
from vdm_tf import datasets

for name in sys.argv[1:]:
    info = datasets.info(name)
    tfds.builder(info.tfds_name)  # the builder's module
    with tempfile.TemporaryDirectory() as data_dir, stopped_at_the_download():
        try:
            datasets.load(name, "train", 2, data_dir=data_dir)  # not prepared: tfds.load prepares it
        except DownloadReached:
            pass
        else:
            raise AssertionError(f"{name}: an empty data_dir was read without preparing it")
    with mock_any(name):  # reading, as from prepared files
        batch = next(iter(datasets.load(name, info.test_split, 2)))
    assert batch.shape == (2, *info.image_shape), (name, batch.shape)
    print("prepared up to the download and read:", name)
"""


def test_the_install_prepares_and_reads_every_tfds_data_set_of_the_presets():
    """tfds imports `importlib_resources` only to prepare a data set (its checksums file), not to
    read one, so `mock_data` alone never needed it: the preparation runs here up to its download."""
    names = _tfds_data_sets_of_the_presets()
    assert {"mnist", "cifar10", "imagenet32", "imagenet64"} <= set(names)
    completed = subprocess.run(
        [sys.executable, "-c", PREPARE_AND_READ, *names], cwd=TESTS_DIR, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    done = [line.split(": ")[1] for line in completed.stdout.splitlines() if line.startswith("prepared up to")]
    assert done == names


MISSING_MODULE = """
import runpy, sys, tempfile
sys.modules["importlib_resources"] = None  # as in an install without it: importing it fails
from vdm_tf import datasets

with tempfile.TemporaryDirectory() as data_dir:
    try:
        datasets.load("cifar10", "train", 2, data_dir=data_dir)
    except datasets.IncompleteInstallError as error:
        print(error)
    sys.argv = ["trainers.main", "--config=cifar10", f"--model_dir={data_dir}/run", f"--data_dir={data_dir}"]
    runpy.run_module("trainers.main", run_name="__main__", alter_sys=True)
"""


def test_a_module_missing_from_the_install_is_named_in_one_line_not_as_a_failed_download():
    completed = subprocess.run(
        [sys.executable, "-c", MISSING_MODULE], cwd=TESTS_DIR, capture_output=True, text=True, timeout=600
    )
    message = (
        "the module 'importlib_resources', which TensorFlow Datasets needs, is not installed; "
        "reinstall: make / pip install -c constraints.txt -e ."
    )
    assert message in completed.stdout.splitlines()  # the library's IncompleteInstallError
    assert completed.returncode == 1, completed.stderr[-3000:]
    assert completed.stderr.strip().splitlines()[-1] == f"python -m trainers.main: error: {message}"
    assert "Traceback" not in completed.stderr and "could not be downloaded" not in completed.stderr
