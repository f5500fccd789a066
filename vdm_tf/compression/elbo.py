"""The discrete-time negative ELBO that bits-back coding approaches, for images of any size (its tiles)."""

import math

import numpy as np

from vdm_tf import evaluation
from vdm_tf.compression.tiles import _tile_plan
from vdm_tf.models.vdm import VDM


def _sharing_vdm(model, image_shape, timesteps):
    """A VDM of `image_shape` and `timesteps` with `model`'s denoiser, schedule and decoder alphabet."""
    return VDM(model.denoiser, model.schedule, image_shape, timesteps=timesteps, pixel_values=model.pixel_values)


def discrete_elbo_bpd(model, x, num_steps, num_time_samples=8, seed=0, batch_size=64):
    """The model's discrete-time negative ELBO with T = num_steps (what the codec approaches;
    num_steps = 0: the continuous-time -ELBO, the limit of large T).

    Returns `vdm_tf.evaluation.dataset_bpd`'s dict (`bpd`, `stderr`, `per_image`, ...) for a
    VDM that shares the model's denoiser and schedule, with `timesteps=num_steps`.
    """
    discrete = model if model.timesteps == num_steps else _sharing_vdm(model, model.image_shape, num_steps)
    batches = [x[start : start + batch_size] for start in range(0, len(x), batch_size)]
    return evaluation.dataset_bpd(discrete, batches, num_time_samples=num_time_samples, seed=seed)


def tiles_elbo_bpd(model, x, num_steps, num_time_samples=8, seed=0, batch_size=64):
    """The discrete-time -ELBO (T = num_steps; 0: continuous time) of images of any size, cut into the codec's tiles.

    Every crop shape runs through a VDM of that image shape sharing the model's denoiser and
    schedule (`discrete_elbo_bpd`). Returns {"bpd": bits per dimension over all pixels, "stderr":
    its standard error over the tiles' time samples, "count": the number of tiles}.
    """
    shape, groups = tuple(model.image_shape), {}
    for image in x:
        for batch in _tile_plan([image.shape[:2]], shape, 0, 1, ramp=False):
            (_, top, left) = batch.tiles[0]
            crop = image[top : top + batch.shape[0], left : left + batch.shape[1]]
            groups.setdefault(batch.shape, []).append(crop)
    total_bits, variance, dims, count = 0.0, 0.0, 0, 0
    for crop_shape, crops in groups.items():
        crop_model = model
        if crop_shape != shape[:2]:
            crop_model = _sharing_vdm(model, (*crop_shape, shape[-1]), model.timesteps)
        result = discrete_elbo_bpd(crop_model, np.stack(crops), num_steps, num_time_samples, seed, batch_size)
        bits = np.asarray(result["per_image"], np.float64) * crops[0].size
        total_bits, dims, count = total_bits + bits.sum(), dims + bits.size * crops[0].size, count + bits.size
        variance += bits.size * bits.var(ddof=1) if bits.size > 1 else 0.0
    return {"bpd": total_bits / dims, "stderr": math.sqrt(variance) / dims, "count": count}


# --------------------------------------------------------------------------------------------
# Command line.
