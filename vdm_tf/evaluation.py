"""A model judged on a data set's test split: its likelihood (bpd) and the quality of its samples.

`dataset_bpd` scores any batches; `heldout_bpd` the test split of a known data set (its
`info(name).test_split`: imagenet's validation split). `SampleQuality`
compares a model's samples with the test split under the data set's bundled feature network
(`vdm_tf.metrics`). `trainers.main --mode=eval` and the trainer's periodic evaluation
(`trainer.eval_every`) both report through these, so their figures agree.
"""

import numpy as np

from vdm_tf import metrics, seeding


def dataset_bpd(model, dataset, num_time_samples=8, seed=0):
    """Negative ELBO in bits per dimension over every image of a data set.

    Each image's bound is `model.elbo(..., num_time_samples=K)`: the mean of K estimates at
    stratified times; the result is the mean over images with the standard error of that mean.
    The examples of one batch share antithetic time samples, which makes their errors
    negatively correlated, so the standard error computed as if they were independent is a
    slight over-estimate.

    Args:
        model: anything with `elbo(x, seed, num_time_samples) -> {"bpd": [N], ...}` (a `vdm_tf.VDM`).
        dataset: iterable of uint8 image batches [N, H, W, C] (or (images, labels) pairs), one
            pass over the data (e.g. `vdm_tf.datasets.load(..., shuffle=False, repeat=False,
            drop_remainder=False)`).
        num_time_samples: estimates per image.
        seed: base seed; batch b uses `fold_in(seed, b)`.

    Returns:
        dict: `bpd` and `stderr` (floats), the mean of every term (`diffusion`, `prior`,
        `reconstruction`), `num_images`, `num_time_samples`, and `per_image` (float64 [N], the
        per-image bpd).
    """
    per_image = {}
    for batch_index, batch in enumerate(dataset):
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        terms = model.elbo(images, seed=seeding.fold_in(seed, batch_index), num_time_samples=num_time_samples)
        for name, values in terms.items():
            per_image.setdefault(name, []).append(values.numpy())
    per_image = {name: np.concatenate(values).astype(np.float64) for name, values in per_image.items()}
    bpd = per_image["bpd"]
    result = {name: float(values.mean()) for name, values in per_image.items()}
    result.update(
        stderr=float(bpd.std(ddof=1) / np.sqrt(bpd.size)) if bpd.size > 1 else float("nan"),
        num_images=int(bpd.size),
        num_time_samples=int(num_time_samples),
        per_image=bpd,
    )
    return result


def summary_line(result):
    """`test bpd: 1.234 +- 0.005 (N images, K time samples each)`, the line scripts read."""
    return (
        f"test bpd: {result['bpd']:.3f} +- {result['stderr']:.3f} "
        f"({result['num_images']} images, {result['num_time_samples']} time samples each)"
    )


def heldout_batches(dataset, batch_size, data_dir=None):
    """The test split of data set `dataset` in one ordered pass: uint8 batches, the last one smaller.

    (Not called `test_...`: pytest would collect it wherever a test module imports it.)
    """
    from vdm_tf import datasets

    return datasets.load(
        dataset,
        datasets.info(dataset).test_split,
        batch_size,
        shuffle=False,
        repeat=False,
        drop_remainder=False,
        data_dir=data_dir,
    )


def heldout_bpd(model, dataset, num_time_samples=8, seed=0, data_dir=None):
    """`dataset_bpd` over the whole test split of data set `dataset`.

    Batches of 256 // K images, since `elbo` scores K copies of each image at once.
    """
    batches = heldout_batches(dataset, max(1, 256 // num_time_samples), data_dir)
    return dataset_bpd(model, batches, num_time_samples, seed=seed)


class SampleQuality:
    """FID / KID / precision / recall / IS of a model's samples against the test split of a data set.

    The figures are those of `vdm_tf.metrics.compare` under the data set's bundled feature
    network (`metrics.BUNDLED_NETWORKS`: digits, photos; `available(dataset)` says whether there is one).
    The network and the test split's statistics are made on the first call and kept, so a
    training run that evaluates every few thousand steps computes them once.

    Every draw comes from `seed`: the samples (`model.sample(num_samples, num_steps, seed)`,
    ancestral), the kept features and KID's subsets. Evaluations of different weights with
    the same seed start from the same noise, so their figures differ by the weights, not by the
    draws. KID is the figure to read at small N (unbiased); FID is biased upwards at small N
    and compares only evaluations with the same number of samples.

    Example:
    >>> quality = SampleQuality("digits", num_samples=64, num_steps=256)
    >>> print(quality_line(quality(model)))
    """

    def __init__(self, dataset, num_samples=64, num_steps=256, seed=0, data_dir=None):
        if not self.available(dataset):
            judged = ", ".join(metrics.BUNDLED_NETWORKS)
            raise ValueError(f"no bundled feature network judges {dataset!r} images; one judges {judged}.")
        self.dataset, self.num_samples, self.num_steps, self.seed = dataset, num_samples, num_steps, seed
        self.data_dir = data_dir
        self._network = self._reference = None

    @staticmethod
    def available(dataset):
        """Whether data set `dataset` has a bundled feature network."""
        return dataset in metrics.BUNDLED_NETWORKS

    def __call__(self, model, samples=None):
        """`metrics.compare`'s dict of `model`'s samples (or of the uint8 `samples` given) against the test split.

        Also holds `network` (its name: the figures are FID_<network>, ...) and `num_steps`.
        """
        if self._network is None:
            self._network = metrics.network_for(self.dataset)
            self._reference = metrics.statistics(
                self._network, heldout_batches(self.dataset, 256, self.data_dir), seed=self.seed
            )
        if samples is None:
            samples = model.sample(self.num_samples, num_steps=self.num_steps, seed=self.seed).numpy()
        fake = metrics.statistics(self._network, samples, seed=self.seed)
        result = metrics.compare(self._reference, fake, seed=self.seed)
        return {**result, "network": self._network.name, "num_steps": self.num_steps}


def quality_line(result):
    """`sample quality: FID_digits 1.234 +- ..., KID_digits ... (64 samples, 297 real images); 256 steps`."""
    return f"sample quality: {metrics.summary_line(result, '_' + result['network'])}; {result['num_steps']} steps"
