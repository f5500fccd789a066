"""vdm_tf.metrics: FID, KID, IS and precision / recall against their reference implementations' formulas.

Each reference below is a direct transcription of the published code (pytorch-fid's
`calculate_frechet_distance`, Binkowski et al.'s `polynomial_mmd_averages` / `_mmd2_and_variance`,
Salimans et al.'s split formula of the Inception Score, Kynkaanniemi et al.'s k-NN manifolds),
written the naive way (whole matrices, scikit-learn's polynomial kernel); the closed forms
(Gaussians with exact moments, one-hot predictions, identical and far-apart sets) check both.
"""

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.spatial
from sklearn.metrics.pairwise import polynomial_kernel

from vdm_tf import cli, metrics

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


# --------------------------------------------------------------------------------------------
# The references, transcribed.


def reference_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """pytorch-fid's `calculate_frechet_distance` (`disp=False` aside, deprecated in SciPy)."""
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"Imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


def reference_mmd2(codes_g, codes_r):
    """`polynomial_mmd` + `_mmd2_and_variance(mmd_est="unbiased")` of Binkowski et al.'s code."""
    K_XX = polynomial_kernel(codes_g, degree=3, gamma=None, coef0=1)  # noqa: N806  (their names)
    K_YY = polynomial_kernel(codes_r, degree=3, gamma=None, coef0=1)  # noqa: N806
    K_XY = polynomial_kernel(codes_g, codes_r, degree=3, gamma=None, coef0=1)  # noqa: N806
    m = K_XX.shape[0]
    Kt_XX_sum = (K_XX.sum(axis=1) - np.diagonal(K_XX)).sum()  # noqa: N806
    Kt_YY_sum = (K_YY.sum(axis=1) - np.diagonal(K_YY)).sum()  # noqa: N806
    K_XY_sum = K_XY.sum(axis=0).sum()  # noqa: N806
    return (Kt_XX_sum + Kt_YY_sum) / (m * (m - 1)) - 2 * K_XY_sum / (m * m)


def reference_polynomial_mmd_averages(codes_g, codes_r, n_subsets, subset_size, choice):
    """`polynomial_mmd_averages` with its `np.random.choice` passed in; KID = (mean, std) of the result."""
    mmds = np.zeros(n_subsets)
    for i in range(n_subsets):
        g = codes_g[choice(len(codes_g), subset_size, replace=False)]
        r = codes_r[choice(len(codes_r), subset_size, replace=False)]
        mmds[i] = reference_mmd2(g, r)
    return mmds


def reference_inception_score(preds, splits):
    """Salimans et al.'s `get_inception_score` after the network: the split formula."""
    scores = []
    for i in range(splits):
        part = preds[(i * preds.shape[0] // splits) : ((i + 1) * preds.shape[0] // splits), :]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return np.mean(scores), np.std(scores)


def reference_precision_recall(real, fake, k):
    """Kynkaanniemi et al.: radius = distance to the k-th nearest neighbour (the point itself excluded)."""
    real_radii = np.sort(scipy.spatial.distance.cdist(real, real), axis=1)[:, k]
    fake_radii = np.sort(scipy.spatial.distance.cdist(fake, fake), axis=1)[:, k]
    precision = np.mean(np.any(scipy.spatial.distance.cdist(fake, real) <= real_radii[None, :], axis=1))
    recall = np.mean(np.any(scipy.spatial.distance.cdist(real, fake) <= fake_radii[None, :], axis=1))
    return precision, recall


def correlated(rng, n, d, shift=0.0):
    """n rows of a d-dimensional Gaussian with a random full covariance, its mean `shift` per coordinate."""
    mixing = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mixing + shift


def with_moments(rng, n, mean, cov):
    """n rows whose sample mean and covariance (1/(n - 1)) are exactly `mean` and `cov`."""
    z = rng.normal(size=(n, len(mean)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z, rowvar=False))).T
    return z @ np.linalg.cholesky(cov).T + mean


# --------------------------------------------------------------------------------------------
# The four measures on features.


def test_frechet_distance_is_pytorch_fids_and_the_closed_form_of_gaussians():
    rng = np.random.default_rng(0)
    a, b = correlated(rng, 500, 16), correlated(rng, 400, 16, shift=0.3)
    reference = reference_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert metrics.frechet_distance(a, b) == pytest.approx(reference, rel=1e-10)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    # Two Gaussians' exact moments, covariances with a shared (non-axis) eigenbasis:
    # FID = |mu_a - mu_b|^2 + sum_i (sqrt(s_a,i) - sqrt(s_b,i))^2.
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    s_a, s_b = rng.uniform(0.5, 2.0, 6), rng.uniform(0.1, 3.0, 6)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    x = with_moments(rng, 50, mu_a, (q * s_a) @ q.T)
    y = with_moments(rng, 70, mu_b, (q * s_b) @ q.T)
    exact = np.sum((mu_a - mu_b) ** 2) + np.sum((np.sqrt(s_a) - np.sqrt(s_b)) ** 2)
    assert metrics.frechet_distance(x, y) == pytest.approx(exact, rel=1e-9)


def test_the_eigenvalue_trace_equals_sqrtms_and_serves_where_pytorch_fid_raises():
    rng = np.random.default_rng(1)
    cov_a, cov_b = np.cov(correlated(rng, 300, 12), rowvar=False), np.cov(correlated(rng, 200, 12), rowvar=False)
    direct = np.trace(scipy.linalg.sqrtm(cov_a @ cov_b).real)
    assert metrics.trace_sqrt_product(cov_a, cov_b) == pytest.approx(direct, rel=1e-10)
    # Fewer samples than dimensions: singular covariances. Where pytorch-fid gives a value it is
    # ours; where it raises (a large imaginary part) ours is the eigenvalue form, finite, >= 0.
    for seed in range(6):
        rng = np.random.default_rng(seed)
        a, b = correlated(rng, 10, 24), correlated(rng, 12, 24, shift=0.1)
        moments = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
        ours = metrics.frechet_distance(a, b)
        eigen = np.sum((moments[0] - moments[2]) ** 2) + np.trace(moments[1]) + np.trace(moments[3])
        eigen -= 2 * metrics.trace_sqrt_product(moments[1], moments[3])
        assert np.isfinite(ours) and ours == pytest.approx(eigen, rel=1e-6)
        try:
            assert ours == pytest.approx(reference_frechet_distance(*moments), rel=1e-6)
        except ValueError:
            pass


def test_kid_is_the_reference_polynomial_mmd_averages():
    rng = np.random.default_rng(2)
    a, b = correlated(rng, 80, 10), correlated(rng, 120, 10, shift=0.2)
    draws = np.random.default_rng(7)
    mmds = reference_polynomial_mmd_averages(a, b, n_subsets=9, subset_size=50, choice=draws.choice)
    mean, std = metrics.kernel_inception_distance(a, b, subset_size=50, num_subsets=9, seed=7)
    assert (mean, std) == pytest.approx((mmds.mean(), mmds.std()), rel=1e-10)
    # subset_size above the smaller set: capped at it (80), every subset of a is all of a.
    draws = np.random.default_rng(3)
    mmds = reference_polynomial_mmd_averages(a, b, n_subsets=4, subset_size=80, choice=draws.choice)
    assert metrics.kernel_inception_distance(a, b, num_subsets=4, seed=3) == pytest.approx(
        (mmds.mean(), mmds.std()), rel=1e-10
    )
    # Sets of more than 4096 rows together: each subset's kernel matrices of its own.
    a, b = correlated(rng, 2100, 3), correlated(rng, 2000, 3, shift=0.5)
    mmds = reference_polynomial_mmd_averages(a, b, n_subsets=3, subset_size=20, choice=np.random.default_rng(5).choice)
    assert metrics.kernel_inception_distance(a, b, subset_size=20, num_subsets=3, seed=5) == pytest.approx(
        (mmds.mean(), mmds.std()), rel=1e-10
    )


def test_kid_is_unbiased_for_two_samples_of_one_distribution():
    """The mean over 400 pairs of independent sets (m = 20) is 0 within 4 standard errors; the
    biased estimator (diagonals included) would be 2 (E k(x, x) - E k(x, x')) / m, far above."""
    rng = np.random.default_rng(4)
    mixing = rng.normal(size=(4, 4))
    estimates = [
        metrics.kernel_inception_distance(
            rng.normal(size=(20, 4)) @ mixing, rng.normal(size=(20, 4)) @ mixing, num_subsets=1
        )[0]
        for _ in range(400)
    ]
    standard_error = np.std(estimates) / np.sqrt(len(estimates))
    assert abs(np.mean(estimates)) < 4 * standard_error


def test_inception_score_is_the_split_formula_and_the_number_of_classes_for_one_hot_predictions():
    rng = np.random.default_rng(5)
    logits = 3.0 * rng.normal(size=(503, 10)) + np.linspace(0, 2, 503)[:, None] * np.arange(10) / 10
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    assert metrics.inception_score(probabilities, splits=10) == pytest.approx(
        reference_inception_score(probabilities, 10), rel=1e-10
    )
    one_hot = np.eye(10)[np.tile(np.arange(10), 30)]  # each of 3 splits holds every class 10 times
    assert metrics.inception_score(one_hot, splits=3) == pytest.approx((10.0, 0.0), abs=1e-12)
    assert metrics.inception_score(np.full((40, 10), 0.1), splits=4) == pytest.approx((1.0, 0.0), abs=1e-12)


def test_precision_recall_are_the_knn_manifolds_computed_in_batches():
    rng = np.random.default_rng(6)
    real, fake = correlated(rng, 130, 5), correlated(rng, 90, 5, shift=0.7)
    expected = reference_precision_recall(real, fake, k=3)
    assert metrics.precision_recall(real, fake, k=3, batch_size=7) == pytest.approx(expected, abs=1e-12)
    assert 0.1 < expected[0] < 0.9 and 0.1 < expected[1] < 0.9  # a fixture that tells k and radii apart
    assert metrics.precision_recall(real, real, k=3) == (1.0, 1.0)
    assert metrics.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="more than 3 samples"):
        metrics.precision_recall(real, fake[:3], k=3)


# --------------------------------------------------------------------------------------------
# Streaming.


def test_streamed_moments_are_those_of_all_features_and_the_reservoir_is_uniform():
    rng = np.random.default_rng(8)
    features = correlated(rng, 1000, 8) + 1e6  # a large mean: a plain sum of squares would cancel
    stats = metrics.FeatureStatistics(max_kept=2000)
    for start, stop in ((0, 1), (1, 300), (300, 301), (301, 1000)):
        stats.update(features[start:stop])
    assert stats.count == 1000
    np.testing.assert_allclose(stats.mean, features.mean(0), rtol=1e-14)
    np.testing.assert_allclose(stats.covariance, np.cov(features, rowvar=False), rtol=1e-7, atol=1e-9)
    np.testing.assert_array_equal(stats.kept, features)  # all of them: N <= max_kept
    # At most max_kept rows, each row kept with probability max_kept / N, the same rows for a seed.
    rows, counts = np.arange(20.0)[:, None], np.zeros(20)
    for seed in range(1500):
        stats = metrics.FeatureStatistics(max_kept=5, seed=seed)
        for start, stop in ((0, 3), (3, 10), (10, 20)):
            stats.update(rows[start:stop])
        kept = stats.kept[:, 0].astype(int)
        assert len(set(kept)) == 5
        counts[kept] += 1
    np.testing.assert_allclose(counts / 1500, 0.25, atol=0.05)
    again = metrics.FeatureStatistics(max_kept=5, seed=1499).update(rows[:3]).update(rows[3:10]).update(rows[10:])
    np.testing.assert_array_equal(again.kept[:, 0].astype(int), kept)


# --------------------------------------------------------------------------------------------
# Feature networks.


@pytest.fixture(scope="module")
def digits_network():
    return metrics.digits_network()


def test_the_bundled_digits_network_classifies_the_test_split(digits_network):
    from vdm_tf import datasets

    images, labels = datasets.digits_arrays("test", with_labels=True)
    features, logits = digits_network(images)
    assert features.shape == (297, 64) and logits.shape == (297, 10)
    accuracy = np.mean(np.argmax(logits, 1) == labels)
    assert accuracy >= 0.95, accuracy  # bench/results/digits_features.json: 0.993
    train_features, _ = digits_network(datasets.digits_arrays("train"))
    assert np.mean(train_features**2) == pytest.approx(1.0, rel=1e-4)  # the shipped scale


@pytest.fixture(scope="module")
def photos_network():
    return metrics.photos_network()


def test_the_bundled_photos_network_tells_held_out_patches_photographs(photos_network):
    """The held-out patches (the photographs' bottom quarters, as bench/photos_features.py splits
    them): an untrained network would score about 1/15."""
    from bench import photos_features
    from vdm_tf import datasets

    images, labels = photos_features.split_patches("heldout")
    features, logits = photos_network(images)
    assert features.shape == (len(images), 128) and logits.shape == (len(images), len(photos_features.CLASSES))
    correct = np.argmax(logits, 1) == labels
    per_photograph = np.mean([np.mean(correct[labels == c]) for c in range(len(photos_features.CLASSES))])
    # bench/results/photos_features.json: 0.897 of the patches, 0.80 per photograph.
    assert np.mean(correct) >= 0.85 and per_photograph >= 0.75, (np.mean(correct), per_photograph)
    train_features, _ = photos_network(datasets.photos_arrays("train"))
    assert np.mean(train_features**2) == pytest.approx(1.0, rel=1e-4)  # the shipped scale
    assert metrics.network_for("photos").name == "photos"


@pytest.fixture(scope="module")
def inception_stand_in(tmp_path_factory):
    """A SavedModel with the TF-GAN Inception's interface: images [N, H, W, 3] in [-1, 1] ->
    {"pool_3": [N, 5], "logits": [N, 4]}; pool_3 reports the height, the channel means and the range."""
    import tensorflow as tf

    class StandIn(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
        def __call__(self, images):
            height = tf.cast(tf.shape(images)[1], tf.float32) * tf.ones_like(images[:, 0, 0, :1])
            means = tf.reduce_mean(images, axis=[1, 2])
            pool_3 = tf.concat([height, means[:, :1], tf.reduce_min(images, [1, 2, 3])[:, None], means[:, 1:3]], 1)
            return {"pool_3": pool_3, "logits": tf.concat([means, -tf.reduce_sum(means, 1, keepdims=True)], 1)}

    callable_path = str(tmp_path_factory.mktemp("inception") / "callable")
    tf.saved_model.save(StandIn(), callable_path)
    signature_path = str(tmp_path_factory.mktemp("inception") / "signature")
    module = StandIn()
    tf.saved_model.save(tf.Module(), signature_path, signatures={"serving_default": module.__call__})
    return callable_path, signature_path


@pytest.mark.parametrize("kind", ["callable", "signature"])
def test_an_inception_savedmodel_sees_299x299_images_in_minus_one_to_one(inception_stand_in, kind):
    import tensorflow as tf

    path = inception_stand_in[0 if kind == "callable" else 1]
    network = metrics.inception_network(path)
    images = np.random.default_rng(9).integers(0, 256, (3, 8, 8, 1)).astype(np.uint8)
    images[:, 0, 0, 0] = 0  # the minimum is exactly -1 after scaling
    features, logits = network(images)
    assert features.shape == (3, 5) and logits.shape == (3, 4)
    expected = tf.image.resize(tf.repeat(tf.cast(images, tf.float32), 3, -1), (299, 299), method="bilinear")
    expected = (expected.numpy() - 127.5) / 127.5
    np.testing.assert_array_equal(features[:, 0], 299.0)
    np.testing.assert_allclose(features[:, 1], expected.mean((1, 2, 3)), atol=2e-5)  # float32 sums
    np.testing.assert_allclose(features[:, 2], -1.0)
    np.testing.assert_allclose(features[:, 3], features[:, 1], rtol=1e-6)  # the grey channel, repeated


# --------------------------------------------------------------------------------------------
# The command line.


def run_metrics(*args):
    return subprocess.run(
        [sys.executable, "-m", "vdm_tf.metrics", *args], capture_output=True, text=True, timeout=600, cwd=ROOT
    )


def test_the_command_scores_an_npz_of_samples_as_python_does(tmp_path, digits_network):
    from vdm_tf import datasets

    fake = datasets.digits_arrays("train")[:120]
    np.savez(tmp_path / "samples.npz", images=fake)
    completed = run_metrics(f"--fake={tmp_path / 'samples.npz'}", "--kid_subsets=20", "--bootstrap=5")
    assert completed.returncode == 0, completed.stderr[-3000:]
    real = metrics.statistics(digits_network, datasets.digits_arrays("test"))
    result = metrics.compare(real, metrics.statistics(digits_network, fake), kid_subsets=20, bootstrap=5)
    last = completed.stdout.strip().splitlines()[-1]
    assert last == metrics.summary_line(result, "_digits")
    assert re.fullmatch(r"FID_digits \d+\.\d+ \+- \d+\.\d+, KID_digits -?\d\.\d+ \+- \d\.\d+, precision .*", last)
    assert last.endswith("(120 samples, 297 real images)")
    # Noise scores worse than training images on every measure.
    noise = metrics.statistics(digits_network, np.random.default_rng(0).integers(0, 256, (120, 8, 8, 1)))
    worse = metrics.compare(real, noise, kid_subsets=20, bootstrap=0)
    assert worse["fid"] > 5 * result["fid"] and worse["kid"] > 5 * result["kid"]
    assert worse["precision"] < result["precision"] and worse["recall"] < result["recall"]


def test_the_command_scores_photos_patches_under_the_photos_network(tmp_path, photos_network, capsys):
    """--real=photos: the photos test split (342 patches) and, by default, the bundled photos network."""
    from vdm_tf import datasets

    fake = datasets.photos_arrays("train")[::23]  # 201 patches of the training photographs
    np.savez(tmp_path / "samples.npz", images=fake)
    metrics.main([f"--fake={tmp_path / 'samples.npz'}", "--real=photos", "--kid_subsets=20", "--bootstrap=5"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("network: photos; real: photos;")
    real = metrics.statistics(photos_network, datasets.photos_arrays("test"))
    result = metrics.compare(real, metrics.statistics(photos_network, fake), kid_subsets=20, bootstrap=5)
    assert lines[-1] == metrics.summary_line(result, "_photos")
    assert re.fullmatch(r"FID_photos \d+\.\d+ \+- \d+\.\d+, KID_photos -?\d\.\d+ \+- \d\.\d+, .*", lines[-1])
    assert lines[-1].endswith("(201 samples, 342 real images)")
    # Two halves of the test split are near each other; uniform noise is far from it.
    test = datasets.photos_arrays("test")
    halves = metrics.compare(
        metrics.statistics(photos_network, test[::2]), metrics.statistics(photos_network, test[1::2]), bootstrap=0
    )
    noise = metrics.statistics(photos_network, np.random.default_rng(0).integers(0, 256, (201, 32, 32, 3)))
    worse = metrics.compare(real, noise, kid_subsets=20, bootstrap=0)
    assert worse["kid"] > 20 * abs(halves["kid"]) and worse["fid"] > 5 * halves["fid"], (worse, halves)


BAD_INPUT = {
    "no --fake": ([], r"the following arguments are required: --fake"),
    "missing file": (["--fake={tmp}/none.npz"], r"--fake=.*/none.npz: no such file; expected an .npz file with uint8"),
    "a directory": (["--fake={tmp}"], r"--fake=.*: no such file; expected an .npz file"),
    "not an npz": (["--fake={tmp}/text.npz"], r"--fake=.*/text.npz: not readable as .npz \(.*\); expected an .npz"),
    "empty file": (["--fake={tmp}/empty.npz"], r"--fake=.*/empty.npz: not readable as .npz"),
    "a broken zip": (["--fake={tmp}/broken.npz"], r"--fake=.*/broken.npz: not readable as .npz"),
    "a .npy array": (["--fake={tmp}/array.npy"], r"--fake=.*/array.npy: a single array \(.npy\); expected an .npz"),
    "no images array": (["--fake={tmp}/other.npz"], r"--fake=.*/other.npz: it holds \['x'\]; expected an .npz"),
    "float images": (["--fake={tmp}/float.npz"], r"`images` is float64 of shape \(2, 8, 8, 1\); expected an .npz"),
    "wrong shape": (["--fake={tmp}/big.npz"], r"--fake images are \(16, 16, 1\), --real images \(8, 8, 1\)"),
    "unknown data set": (["--fake={tmp}/ok.npz", "--real=digitz"], r"--real=digitz: .*digits"),
    "no network for photos_grey": (
        ["--fake={tmp}/grey.npz", "--real=photos_grey"],
        r"--network: give the path of an Inception SavedModel \(only digits or photos have bundled ones\)",
    ),
    "photos network, digits": (["--fake={tmp}/ok.npz", "--network=photos"], r"--network=photos judges photos images"),
    "digits network, photos": (
        ["--fake={tmp}/rgb.npz", "--real=photos", "--network=digits"],
        r"--network=digits judges digits images \(8, 8, 1\); the images are \(32, 32, 3\)\.",
    ),
    "network not a directory": (["--fake={tmp}/ok.npz", "--network=/nonexistent"], r"--network=/nonexistent: expected"),
    "zero subsets": (["--fake={tmp}/ok.npz", "--kid_subsets=0"], r"--kid_subsets must be >= 1; got 0\."),
}


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "whole.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    (tmp_path / "broken.npz").write_bytes((tmp_path / "whole.npz").read_bytes()[:60])
    np.save(tmp_path / "array.npy", np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 1)))
    np.savez(tmp_path / "big.npz", images=np.zeros((2, 16, 16, 1), np.uint8))
    np.savez(tmp_path / "ok.npz", images=np.zeros((2, 8, 8, 1), np.uint8))
    np.savez(tmp_path / "rgb.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "grey.npz", images=np.zeros((2, 32, 32, 1), np.uint8))
    return tmp_path


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_before_tensorflow(case, bad_files):
    argv, pattern = BAD_INPUT[case]
    with pytest.raises(cli.Failure, match=pattern):
        metrics.check_arguments([arg.format(tmp=bad_files) for arg in argv])


def test_bad_input_ends_the_command_with_one_line_and_exit_1_without_tensorflow(bad_files):
    code = (
        "import sys; from vdm_tf import cli, metrics\n"
        "try:\n    cli.run(metrics.main, sys.argv[1:], prog='python -m vdm_tf.metrics')\n"
        "finally:\n    print('tensorflow' in sys.modules)"
    )
    completed = subprocess.run(
        [sys.executable, "-c", code, f"--fake={bad_files}/float.npz"], capture_output=True, text=True, cwd=ROOT
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        f"python -m vdm_tf.metrics: error: --fake={bad_files}/float.npz: `images` is float64 of shape (2, 8, 8, 1); "
        "expected an .npz file with uint8 `images` [N, H, W, C] (np.savez)."
    ]
    assert completed.stdout.strip() == "False"


# --------------------------------------------------------------------------------------------
# Where users look: trainers.main's evaluation, the README.


class StubModel:
    """What `trainers.main.evaluate` calls of a model: `sample` (fixed digits, the call recorded) and `elbo`."""

    def __init__(self, images):
        self.images, self.sample_calls = images, []

    def sample(self, num_samples, num_steps, seed):
        import tensorflow as tf

        self.sample_calls.append((num_samples, num_steps, seed))
        return tf.constant(self.images[:num_samples])

    def elbo(self, x, seed, num_time_samples):
        import tensorflow as tf

        return {"bpd": tf.fill([len(x)], 1.5)}


def test_eval_of_a_digits_run_reports_kid_and_fid_of_its_samples_before_the_bpd(capsys, digits_network):
    import vdm_tf
    from trainers import configs, main

    config = configs.PRESETS["digits"].replace(eval_time_samples=1, num_samples=40, sample_steps=3, seed=3)
    model = StubModel(vdm_tf.datasets.digits_arrays("train")[::7])
    main.evaluate(config, model)
    lines = capsys.readouterr().out.strip().splitlines()
    assert model.sample_calls == [(40, 3, 3)]  # trainer.num_samples, trainer.sample_steps, trainer.seed
    assert lines[0].startswith("sample quality: FID_digits ") and lines[-1].startswith("test bpd: 1.500")
    real = metrics.statistics(digits_network, vdm_tf.datasets.digits_arrays("test"), seed=3)
    result = metrics.compare(real, metrics.statistics(digits_network, model.images[:40], seed=3), seed=3)
    assert lines[0] == f"sample quality: {metrics.summary_line(result, '_digits')}; 3 steps"
    assert lines[0].endswith("(40 samples, 297 real images); 3 steps")
    # --mode=train hands evaluate the samples it has drawn: none drawn again.
    main.evaluate(config, model, samples=model.images[:40])
    assert model.sample_calls == [(40, 3, 3)] and capsys.readouterr().out.splitlines()[0] == lines[0]
    # No feature network for photos_grey: the bpd alone.
    assert main.sample_quality(config.replace(dataset="photos_grey"), model) is None


def test_eval_of_a_photos_run_reports_kid_and_fid_photos(photos_network):
    import vdm_tf
    from trainers import configs, main

    config = configs.PRESETS["photos"].replace(eval_time_samples=1, num_samples=30, sample_steps=2, seed=1)
    model = StubModel(vdm_tf.datasets.photos_arrays("train")[::50])
    line = main.sample_quality(config, model)
    assert model.sample_calls == [(30, 2, 1)]
    real = metrics.statistics(photos_network, vdm_tf.datasets.photos_arrays("test"), seed=1)
    result = metrics.compare(real, metrics.statistics(photos_network, model.images[:30], seed=1), seed=1)
    assert line == f"sample quality: {metrics.summary_line(result, '_photos')}; 2 steps"
    assert line.startswith("sample quality: FID_photos ") and line.endswith("(30 samples, 342 real images); 2 steps")


def test_the_readme_section_runs_as_written():
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    start = text.index("\n### Sample quality\n")
    section = text[start : text.index("\n#", start + 1)]
    (block,) = re.findall(r"^```python\n(.*?)^```", section, flags=re.S | re.M)
    namespace = {}
    exec(block, namespace)
    assert namespace["result"]["num_real"] == 297 and namespace["result"]["fid"] > 0
    (command,) = re.findall(r"^python -m vdm_tf\.metrics .*$", section, flags=re.M)
    args = shlex.split(command, comments=True)[3:]
    assert any(arg.startswith("--fake=") for arg in args)
    assert metrics._parser().parse_args(args).real == "digits"
