"""Sample quality as the papers measure it: FID, KID, Inception Score, precision / recall.

    python -m vdm_tf.metrics --fake=runs/demo/samples.npz                 # against the digits test split
    python -m vdm_tf.metrics --real=photos --fake=samples.npz             # the photos test split, FID_photos
    python -m vdm_tf.metrics --real=cifar10 --fake=samples.npz --network=/path/to/inception_savedmodel

From Python, on features ([N, D] float arrays) or on uint8 images through a feature network:

    >>> from vdm_tf import datasets, metrics
    >>> network = metrics.digits_network()
    >>> real = metrics.statistics(network, datasets.digits_arrays("test"))
    >>> fake = metrics.statistics(network, samples)          # uint8 [N, 8, 8, 1], or batches of them
    >>> print(metrics.summary_line(metrics.compare(real, fake)))

The four measures, each as its reference implementation computes it:

- `frechet_distance`: the Frechet distance between Gaussians fitted to two feature sets (FID of
  Heusel et al. 2017 on Inception features), ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)),
  as pytorch-fid's `calculate_frechet_distance` computes it (TTUR's code is the same).
- `kernel_inception_distance`: KID of Binkowski et al. 2018, the unbiased estimator of the squared
  MMD with the kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets drawn without
  replacement (their `polynomial_mmd_averages`; torch-fidelity's `kid`).
- `inception_score`: exp(E_x KL(p(y | x) || p(y))) of Salimans et al. 2016 on each of `splits`
  consecutive parts of the predictions, the mean and standard deviation over the parts.
- `precision_recall`: Kynkaanniemi et al. 2019: each set's manifold is the union of balls around
  its points with the distance to their k-th nearest neighbour as radius; precision is the
  fraction of fake points in the real manifold, recall of real points in the fake manifold.

Small N: FID is biased upwards at small N (the bias falls roughly as 1/N, and its size depends on
the feature dimension and the data), so FIDs are comparable only at the same N and the same
reference set; `compare` reports N with every figure and a bootstrap standard deviation of the
FID. KID is unbiased at any N (its spread, not its mean, grows at small N), which makes it the
figure to read at the few hundred samples a CPU draws.

Feature networks (`FeatureNetwork`: uint8 images -> features and class logits, in batches):

- `inception_network(path)`: the Inception of FID / IS, loaded from a local SavedModel (TF-GAN's
  Inception of Score-SDE's evaluation, or an export of the FID Inception of TTUR / pytorch-fid
  with the same interface: float images in [-1, 1] -> {"pool_3": [N, 2048], "logits": [N, C]}).
  Images are resized bilinearly to 299x299 and scaled to [-1, 1] as those codes do (grey images
  are repeated to three channels). No weights are downloaded: the user gives the path.
- `digits_network()`: for the embedded 8x8 digits, which Inception cannot judge: a small CNN
  trained on the digits training split, shipped as `vdm_tf/models/digits_features.keras`
  (`bench/digits_features.py` trains it; 99% test accuracy). Its FID / KID are FID_digits /
  KID_digits: figures of this package, not comparable with Inception FIDs.
- `photos_network()`: for the photos data set's 32x32 patches, judged offline: a small CNN
  trained to tell which of 15 photographs bundled with scikit-image a patch comes from (not
  chelsea and coffee, the photos test split), shipped as `vdm_tf/models/photos_features.keras`
  (`bench/photos_features.py` trains it; 90% accuracy, 80% averaged per photograph, on patches of
  the photographs' bottom quarters, which it never saw). Its figures are FID_photos / KID_photos,
  likewise this package's.
  `bundled_network(name)` loads either; `network_for(name)` also takes an Inception path.

Streaming (`FeatureStatistics`): batches of images go through the network one at a time; FID's
mean and covariance are running float64 moments of every image. KID, precision / recall, the
Inception Score and the FID bootstrap need the features themselves: the statistics keep a
uniform random subset of at most `max_kept` of them (reservoir sampling, seeded), every feature
when N <= max_kept. Memory is bounded by `max_kept`, never by N.

No TensorFlow is imported until a feature network is built, so the command line checks its
input first (`vdm_tf.cli`).
"""

import os
import sys

import numpy as np

# The data sets whose images a bundled network judges (`bundled_network(name)`, `network_for(name)`);
# each network is models/<name>_features.keras, trained by bench/<name>_features.py.
BUNDLED_NETWORKS = ("digits", "photos")
MODELS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")


def bundled_network_path(name):
    """Where the bundled feature network of data set `name` lives: models/<name>_features.keras."""
    return os.path.join(MODELS_DIR, f"{name}_features.keras")


DIGITS_NETWORK_PATH = bundled_network_path("digits")
PHOTOS_NETWORK_PATH = bundled_network_path("photos")
INCEPTION_SIZE = 299


# --------------------------------------------------------------------------------------------
# The four measures on features.


def _features(array, name):
    """`array` as float64 [N, D], or a ValueError naming `name`."""
    array = np.asarray(array, dtype=np.float64)
    if array.ndim != 2 or not array.size:
        raise ValueError(f"{name}: expected a non-empty [N, D] array of features; got shape {array.shape}.")
    return array


def moments(features):
    """(mean [D], covariance [D, D]) of the rows of `features`, float64, the covariance with 1/(N - 1)."""
    features = _features(features, "features")
    return features.mean(0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance(features_a, features_b):
    """The Frechet distance between Gaussians fitted to two feature sets ([N, D] floats): FID on Inception features.

    The sample means and covariances (1/(N - 1)), then `gaussian_frechet_distance`.
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different dimensions: {a.shape[1]} and {b.shape[1]}.")
    return gaussian_frechet_distance(*moments(a), *moments(b))


def gaussian_frechet_distance(mean_a, cov_a, mean_b, cov_b, eps=1e-6):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), as pytorch-fid's `calculate_frechet_distance`.

    `scipy.linalg.sqrtm` of the product; if that is not finite (a singular product), again with
    `eps` added to both diagonals; a complex result's real part where its diagonal's imaginary
    part is below 1e-3. Where pytorch-fid would raise instead (a larger imaginary part: nearly
    singular covariances, N <= D), tr (S_a S_b)^(1/2) is computed as the sum of the square roots
    of the eigenvalues of S_a^(1/2) S_b S_a^(1/2), a symmetric PSD matrix with the same
    eigenvalues as S_a S_b: the same trace, exact for singular covariances.
    """
    import warnings

    import scipy.linalg

    mean_a, mean_b = np.atleast_1d(mean_a).astype(np.float64), np.atleast_1d(mean_b).astype(np.float64)
    cov_a, cov_b = np.atleast_2d(cov_a).astype(np.float64), np.atleast_2d(cov_b).astype(np.float64)
    diff = mean_a - mean_b
    with warnings.catch_warnings():  # "Matrix is singular": handled below
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        root = scipy.linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(root).all():
            offset = np.eye(cov_a.shape[0]) * eps
            root = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(root):
        root = root.real if np.allclose(np.diagonal(root).imag, 0, atol=1e-3) else None
    trace_root = np.trace(root) if root is not None else trace_sqrt_product(cov_a, cov_b)
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def trace_sqrt_product(cov_a, cov_b):
    """tr (S_a S_b)^(1/2) of two PSD matrices, from the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (float64)."""
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    return float(np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(root_a @ cov_b @ root_a), 0.0, None))))


def polynomial_kernel(x, y):
    """k(x_i, y_j) = (x_i . y_j / d + 1)^3 for the rows of x [m, d] and y [n, d]: [m, n]."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def _unbiased_mmd2(k_xx, k_yy, k_xy):
    """The unbiased estimator of MMD^2 from the kernel matrices of two sets of m points each.

    (sum_{i != j} k(x_i, x_j) + sum_{i != j} k(y_i, y_j)) / (m (m - 1)) - 2 sum_{i, j} k(x_i, y_j) / m^2:
    the reference's `mmd_est="unbiased"` (Binkowski et al. 2018, eq. 3 with the cross term over
    all pairs).
    """
    m = len(k_xx)
    within = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return within - 2.0 * k_xy.sum() / (m * m)


def kernel_inception_distance(features_a, features_b, subset_size=1000, num_subsets=100, seed=0):
    """KID: the unbiased MMD^2 with the cubic polynomial kernel, over random subsets; (mean, std) over subsets.

    Each of `num_subsets` subsets draws min(subset_size, N_a, N_b) rows of each set without
    replacement (`np.random.default_rng(seed)`, features_a's draw first); the standard deviation
    is over the subsets' estimates (1/n, as torch-fidelity's `kernel_inception_distance_std`).
    Sets of up to 4096 rows together have their kernel matrices computed once, the subsets'
    taken from them; larger sets, each subset's.
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"features of different dimensions: {a.shape[1]} and {b.shape[1]}.")
    m = min(int(subset_size), len(a), len(b))
    if m < 2:
        raise ValueError(f"KID needs at least 2 samples in each set; got {len(a)} and {len(b)}.")
    whole = len(a) + len(b) <= 4096
    if whole:
        k_aa, k_bb, k_ab = polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
    rng = np.random.default_rng(seed)
    estimates = []
    for _ in range(int(num_subsets)):
        i, j = rng.choice(len(a), m, replace=False), rng.choice(len(b), m, replace=False)
        if whole:
            kernels = k_aa[np.ix_(i, i)], k_bb[np.ix_(j, j)], k_ab[np.ix_(i, j)]
        else:
            kernels = polynomial_kernel(a[i], a[i]), polynomial_kernel(b[j], b[j]), polynomial_kernel(a[i], b[j])
        estimates.append(_unbiased_mmd2(*kernels))
    return float(np.mean(estimates)), float(np.std(estimates))


def inception_score(class_probabilities, splits=10):
    """exp(E_x KL(p(y | x) || p(y))) on each of `splits` consecutive parts; (mean, std) over the parts.

    As Salimans et al.'s code: part i holds rows [i N // splits, (i + 1) N // splits), p(y) is the
    part's mean prediction; 0 log 0 counts as 0. One-hot predictions spread evenly over C classes
    score C.
    """
    import scipy.special

    p = _features(class_probabilities, "class_probabilities")
    n = len(p)
    if not 1 <= splits <= n:
        raise ValueError(f"splits must be in 1..{n} (the number of predictions); got {splits}.")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        kl = scipy.special.rel_entr(part, part.mean(0, keepdims=True)).sum(1)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _squared_distances(x, y):
    """Squared Euclidean distances [len(x), len(y)], >= 0."""
    return np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T, 0.0)


def _radii(features, k, batch_size):
    """Squared distance of each row to its k-th nearest neighbour among the rows (itself excluded)."""
    return np.concatenate(
        [
            np.partition(_squared_distances(features[i : i + batch_size], features), k, axis=1)[:, k]
            for i in range(0, len(features), batch_size)
        ]
    )


def _fraction_inside(points, centres, radii, batch_size):
    """The fraction of `points` within the radius of at least one of `centres`."""
    inside = [
        np.any(_squared_distances(points[i : i + batch_size], centres) <= radii[None, :], axis=1)
        for i in range(0, len(points), batch_size)
    ]
    return float(np.mean(np.concatenate(inside)))


def precision_recall(real_features, fake_features, k=3, batch_size=1000):
    """Improved precision and recall (Kynkaanniemi et al. 2019) with k-nearest-neighbour manifolds.

    Precision: the fraction of fake rows within the k-NN radius of some real row; recall: of real
    rows within the k-NN radius of some fake row. Distances are computed `batch_size` rows at a
    time, so memory is batch_size x N, not N x N.
    """
    real, fake = _features(real_features, "real_features"), _features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"features of different dimensions: {real.shape[1]} and {fake.shape[1]}.")
    if min(len(real), len(fake)) <= k:
        raise ValueError(
            f"precision / recall with k={k} need more than {k} samples per set; got {len(real)}, {len(fake)}."
        )
    precision = _fraction_inside(fake, real, _radii(real, k, batch_size), batch_size)
    recall = _fraction_inside(real, fake, _radii(fake, k, batch_size), batch_size)
    return precision, recall


# --------------------------------------------------------------------------------------------
# Streaming over batches of images.


class FeatureStatistics:
    """Running float64 mean and covariance of a stream of feature batches, and a seeded reservoir of them.

    `update(features, logits=None)` adds a batch [n, D] (and its class logits [n, C], kept with
    the features for the Inception Score). The moments merge batch by batch (Chan et al.'s
    pairwise update, stable where a sum of squares is not); the reservoir keeps a uniform random
    subset of at most `max_kept` rows (Algorithm R: row t >= max_kept replaces a random slot
    with probability max_kept / (t + 1)), so the same stream and seed keep the same rows.

    Attributes:
        count: rows seen. mean, covariance: float64 [D], [D, D] (1/(count - 1)).
        kept: float64 [min(count, max_kept), D]; kept_logits likewise, or None.
    """

    def __init__(self, max_kept=10_000, seed=0):
        self.max_kept, self.count = int(max_kept), 0
        self.mean = self._m2 = None
        self._kept, self._kept_logits = [], []
        self._rng = np.random.default_rng(seed)

    def update(self, features, logits=None):
        features = _features(features, "features")
        n, batch_mean = len(features), features.mean(0)
        centred = features - batch_mean
        if self.count == 0:
            self.mean, self._m2 = batch_mean, centred.T @ centred
        else:
            delta, total = batch_mean - self.mean, self.count + n
            self._m2 = self._m2 + centred.T @ centred + np.outer(delta, delta) * (self.count * n / total)
            self.mean = self.mean + delta * (n / total)
        logits = None if logits is None else np.asarray(logits, np.float64)
        for j in range(n):
            t = self.count + j
            slot = t if t < self.max_kept else int(self._rng.integers(0, t + 1))
            if slot < self.max_kept:
                row_logits = None if logits is None else logits[j]
                if slot == len(self._kept):
                    self._kept.append(features[j])
                    self._kept_logits.append(row_logits)
                else:
                    self._kept[slot], self._kept_logits[slot] = features[j], row_logits
        self.count += n
        return self

    @property
    def covariance(self):
        return self._m2 / max(self.count - 1, 1)

    @property
    def kept(self):
        return np.stack(self._kept)

    @property
    def kept_logits(self):
        return None if not self._kept_logits or self._kept_logits[0] is None else np.stack(self._kept_logits)


def _batches(images, batch_size):
    """uint8 image batches from an array [N, H, W, C] or an iterable of batches (or (images, labels) pairs)."""
    if isinstance(images, np.ndarray):
        for i in range(0, len(images), batch_size):
            yield images[i : i + batch_size]
        return
    for batch in images:
        yield np.asarray(batch[0] if isinstance(batch, (tuple, list)) else batch)


def statistics(network, images, batch_size=256, max_kept=10_000, seed=0):
    """`FeatureStatistics` under `network` of uint8 images: an array, or batches (a tf.data set, say)."""
    result = FeatureStatistics(max_kept, seed)
    for batch in _batches(images, batch_size):
        features, logits = network(batch)
        result.update(features, logits)
    return result


def compare(real, fake, kid_subset_size=1000, kid_subsets=100, k=3, bootstrap=20, seed=0):
    """Every measure of `fake` against `real` (two `FeatureStatistics` of the same network), as a dict.

    `fid` from the running moments of every image; `fid_bootstrap_std`: the standard deviation of
    the FID over `bootstrap` resamplings (with replacement) of both sets' kept features (0: none);
    `kid`, `kid_std` (`kernel_inception_distance`), `precision`, `recall` (None where a set has
    k or fewer images) and `inception_score`, `inception_score_std` of the fakes from the kept
    features and logits: 10 splits as the reference where each then holds 100 images or more,
    else fewer (one below 200 images: IS falls with the size of a split). `num_real`, `num_fake`: N.
    """
    import scipy.special

    real_kept, fake_kept = real.kept, fake.kept
    result = {
        "num_real": real.count,
        "num_fake": fake.count,
        "fid": gaussian_frechet_distance(real.mean, real.covariance, fake.mean, fake.covariance),
    }
    rng = np.random.default_rng(seed)
    draws = [
        frechet_distance(
            real_kept[rng.integers(0, len(real_kept), len(real_kept))],
            fake_kept[rng.integers(0, len(fake_kept), len(fake_kept))],
        )
        for _ in range(bootstrap)
    ]
    result["fid_bootstrap_std"] = float(np.std(draws, ddof=1)) if bootstrap > 1 else None
    result["kid"], result["kid_std"] = kernel_inception_distance(
        real_kept, fake_kept, kid_subset_size, kid_subsets, seed
    )
    enough = min(len(real_kept), len(fake_kept)) > k
    result["precision"], result["recall"] = precision_recall(real_kept, fake_kept, k) if enough else (None, None)
    logits = fake.kept_logits
    if logits is not None:
        probabilities = scipy.special.softmax(logits, axis=1)
        splits = max(1, min(10, len(probabilities) // 100))
        result["inception_score"], result["inception_score_std"] = inception_score(probabilities, splits)
    return result


def summary_line(result, name=""):
    """`FID 12.3 +- 0.4, KID 0.0123 +- 0.0040, precision 0.81, recall 0.77, IS 8.91 +- 0.20 (64 samples, 297 real)`.

    `name` follows each measure's name (`_digits`: FID_digits). FID's +- is the bootstrap
    standard deviation, KID's the standard deviation over subsets.
    """
    parts = [f"FID{name} {result['fid']:.3f}" + _plus_minus(result.get("fid_bootstrap_std"), ".3f")]
    parts.append(f"KID{name} {result['kid']:.5f}" + _plus_minus(result.get("kid_std"), ".5f"))
    if result.get("precision") is not None:
        parts.append(f"precision {result['precision']:.3f}, recall {result['recall']:.3f}")
    if result.get("inception_score") is not None:
        parts.append(f"IS{name} {result['inception_score']:.3f}" + _plus_minus(result["inception_score_std"], ".3f"))
    return f"{', '.join(parts)} ({result['num_fake']} samples, {result['num_real']} real images)"


def _plus_minus(value, spec):
    return "" if value is None else f" +- {value:{spec}}"


# --------------------------------------------------------------------------------------------
# Feature networks.


class FeatureNetwork:
    """A network that maps uint8 images to (features [N, D], class logits [N, C]), float64, in batches.

    Args:
        name: what its figures are called after (`digits`: FID_digits).
        function: float32 images [n, H, W, C] (0..255) -> (features, logits) tensors.
        batch_size: images per call.
    """

    def __init__(self, name, function, batch_size=256):
        self.name, self.function, self.batch_size = name, function, batch_size

    def __call__(self, images):
        features, logits = [], []
        images = np.asarray(images)
        for i in range(0, len(images), self.batch_size):
            f, g = self.function(np.asarray(images[i : i + self.batch_size], np.float32))
            features.append(np.asarray(f, np.float64).reshape(len(f), -1))
            logits.append(np.asarray(g, np.float64).reshape(len(g), -1))
        return np.concatenate(features), np.concatenate(logits)


def bundled_network(name, path=None):
    """The bundled feature network of data set `name` (one of `BUNDLED_NETWORKS`), a `FeatureNetwork`.

    A Keras model uint8 images -> {"features", "logits"} read from `path` (default:
    models/<name>_features.keras); its figures are FID_<name>, KID_<name>, IS_<name>.
    """
    if name not in BUNDLED_NETWORKS:
        raise ValueError(f"no bundled feature network for {name!r}; there is one for {', '.join(BUNDLED_NETWORKS)}.")
    import keras

    model = keras.saving.load_model(path or bundled_network_path(name), compile=False)

    def function(images):
        outputs = model(images, training=False)
        return outputs["features"], outputs["logits"]

    return FeatureNetwork(name, function)


def digits_network(path=DIGITS_NETWORK_PATH):
    """The bundled digits feature network: 64 "features" and 10 "logits" (`bench/digits_features.py`)."""
    return bundled_network("digits", path)


def photos_network(path=PHOTOS_NETWORK_PATH):
    """The bundled photos feature network: 128 "features" and 15 "logits", the source photograph of a
    32x32 patch (`bench/photos_features.py`)."""
    return bundled_network("photos", path)


def inception_network(path, features_key="pool_3", logits_key="logits", image_size=INCEPTION_SIZE, batch_size=64):
    """An Inception SavedModel from a local path: float images in [-1, 1] -> {features_key: .., logits_key: ..}.

    The loaded object is called as it is (TF-GAN's Inception, `hub.load` style) or else through
    its `serving_default` signature. Images are resized to `image_size` squared with bilinear
    interpolation (`tf.image.resize`: half-pixel centres, as pytorch-fid's
    `F.interpolate(..., mode="bilinear", align_corners=False)`; TF-GAN's `preprocess_image` uses
    TF1's `resize_bilinear` without half-pixel centres, a small difference) and scaled to
    [-1, 1] as (x - 127.5) / 127.5 (Score-SDE's evaluation); grey images repeat to 3 channels.
    `image_size=None` passes the images at their own size (a network that resizes itself).
    """
    import tensorflow as tf

    loaded = tf.saved_model.load(path)
    if callable(loaded):
        call = loaded
    elif "serving_default" in getattr(loaded, "signatures", {}):
        signature = loaded.signatures["serving_default"]
        (input_name,) = signature.structured_input_signature[1]
        call = lambda images: signature(**{input_name: images})  # noqa: E731
    else:
        raise ValueError(f"{path}: the SavedModel is not callable and has no serving_default signature.")

    def function(images):
        images = tf.convert_to_tensor(images, tf.float32)
        if images.shape[-1] == 1:
            images = tf.repeat(images, 3, axis=-1)
        if image_size is not None:
            images = tf.image.resize(images, (image_size, image_size), method="bilinear")
        outputs = call((images - 127.5) / 127.5)
        return outputs[features_key], outputs[logits_key]

    return FeatureNetwork(f"inception:{os.path.basename(os.path.normpath(path))}", function, batch_size)


def network_for(name_or_path):
    """A name of `BUNDLED_NETWORKS` (its bundled network) or an Inception SavedModel's path -> a `FeatureNetwork`."""
    return bundled_network(name_or_path) if name_or_path in BUNDLED_NETWORKS else inception_network(name_or_path)


# --------------------------------------------------------------------------------------------
# Command line: python -m vdm_tf.metrics


def _parser():
    from vdm_tf import cli

    parser = cli.ArgumentParser(
        prog="python -m vdm_tf.metrics",
        description="FID, KID, precision / recall and Inception Score of samples against real images.",
    )
    parser.add_argument("--fake", required=True, help="The samples: a .npz file with uint8 `images` [N, H, W, C].")
    parser.add_argument(
        "--real",
        default="digits",
        help="A data set of vdm_tf.datasets as NAME or NAME:SPLIT (default split: its test split), "
        "or a .npz file like --fake. Default: digits (the 297 test images).",
    )
    parser.add_argument(
        "--network",
        default=None,
        help=f"{' or '.join(BUNDLED_NETWORKS)} (a bundled network; default: that of --real), "
        "or the path of an Inception SavedModel.",
    )
    parser.add_argument("--data_dir", default=None, help="TensorFlow Datasets data directory (for --real=NAME).")
    parser.add_argument("--kid_subset_size", type=int, default=1000)
    parser.add_argument("--kid_subsets", type=int, default=100)
    parser.add_argument("--k", type=int, default=3, help="Neighbours of the precision / recall manifolds.")
    parser.add_argument("--bootstrap", type=int, default=20, help="Resamplings for FID's standard deviation.")
    parser.add_argument("--max_kept", type=int, default=10_000, help="Features kept per set for KID, P/R, IS.")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _npz_images(path, flag):
    """The uint8 `images` [N, H, W, C] of an .npz file (as `trainers.main --mode=sample` writes), or a Failure."""
    import zipfile

    from vdm_tf import cli

    expected = "an .npz file with uint8 `images` [N, H, W, C] (np.savez)"
    if not os.path.isfile(path):
        raise cli.Failure(f"{flag}={path}: no such file; expected {expected}.")
    try:
        data = np.load(path)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise cli.Failure(f"{flag}={path}: a single array (.npy); expected {expected}.")
        with data:
            if "images" not in data:
                raise cli.Failure(f"{flag}={path}: it holds {sorted(data)}; expected {expected}.")
            images = data["images"]
    except (ValueError, EOFError, zipfile.BadZipFile) as error:
        raise cli.Failure(
            f"{flag}={path}: not readable as .npz ({cli.one_line(error)}); expected {expected}."
        ) from None
    if images.dtype != np.uint8 or images.ndim != 4 or not len(images):
        raise cli.Failure(f"{flag}={path}: `images` is {images.dtype} of shape {images.shape}; expected {expected}.")
    return images


def check_arguments(argv):
    """Parses and checks the command line without TensorFlow: (args, fake images, real spec)."""
    from vdm_tf import cli, dataset_table

    args = _parser().parse_args(argv)
    for name in ("kid_subset_size", "kid_subsets", "k", "max_kept"):
        if getattr(args, name) < 1:
            raise cli.Failure(f"--{name} must be >= 1; got {getattr(args, name)}.")
    if args.bootstrap < 0:
        raise cli.Failure(f"--bootstrap must be >= 0; got {args.bootstrap}.")
    fake = _npz_images(args.fake, "--fake")
    if args.real.endswith(".npz"):
        real, shape = _npz_images(args.real, "--real"), None
        shape = real.shape[1:]
    else:
        name, _, split = args.real.partition(":")
        try:
            info = dataset_table.info(name)
        except ValueError as error:
            raise cli.Failure(f"--real={args.real}: {cli.one_line(error)}") from None
        real, shape = (name, split or info.test_split), tuple(info.image_shape)
    if tuple(fake.shape[1:]) != tuple(shape):
        raise cli.Failure(f"--fake images are {fake.shape[1:]}, --real images {tuple(shape)}: expected the same shape.")
    bundled = " or ".join(BUNDLED_NETWORKS)
    if args.network is None:
        if not (isinstance(real, tuple) and real[0] in BUNDLED_NETWORKS):
            raise cli.Failure(
                f"--network: give the path of an Inception SavedModel (only {bundled} have bundled ones)."
            )
        args.network = real[0]
    elif args.network in BUNDLED_NETWORKS:
        judged = tuple(dataset_table.info(args.network).image_shape)
        if tuple(fake.shape[1:]) != judged:
            raise cli.Failure(
                f"--network={args.network} judges {args.network} images {judged}; the images are {fake.shape[1:]}."
            )
    elif not os.path.isdir(args.network):
        raise cli.Failure(f"--network={args.network}: expected {bundled} or the directory of a SavedModel.")
    return args, fake, real


def main(argv):
    from vdm_tf import cli

    args, fake, real = check_arguments(argv)
    cli.start()
    from vdm_tf import datasets

    network = network_for(args.network)
    if isinstance(real, tuple):
        name, split = real
        try:
            real = datasets.load(
                name, split, 256, shuffle=False, repeat=False, drop_remainder=False, data_dir=args.data_dir
            )
        except ValueError as error:
            raise cli.Failure(f"--real={args.real}: {cli.one_line(error)}") from None
    real_statistics = statistics(network, real, max_kept=args.max_kept, seed=args.seed)
    fake_statistics = statistics(network, fake, max_kept=args.max_kept, seed=args.seed)
    result = compare(
        real_statistics, fake_statistics, args.kid_subset_size, args.kid_subsets, args.k, args.bootstrap, args.seed
    )
    print(f"network: {network.name}; real: {args.real}; fake: {args.fake}")
    print(summary_line(result, "_" + network.name if network.name in BUNDLED_NETWORKS else ""))


if __name__ == "__main__":
    from vdm_tf import cli

    cli.run(main, sys.argv[1:], prog="python -m vdm_tf.metrics")
