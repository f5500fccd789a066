"""Test-set likelihood: bits per dimension over a whole data set, with a standard error."""

import numpy as np

from vdm_tf import seeding


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
