"""Non-uniform, multi-scale diffusion with an exact variational bound (Batzolis et al. 2022).

The orthonormal Haar transform (`vdm_tf.haar`) splits an encoded image f into L + 1 groups of
coefficients: the low-pass `a_L` and the details `d_1` (finest) .. `d_L`. Every group diffuses on
its own schedule, a time-rescaled copy of one base schedule `gamma(.)` (any schedule of
`vdm_tf.schedules`, fixed or learned):

    d_k:  gamma_k(t) = gamma(t / t_k)  on [0, t_k],   0 < t_1 <= t_2 <= ... <= t_L <= 1,
    a_L:  gamma_a(t) = gamma(t)        on [0, 1].

So all groups start at the same gamma_0 (z_0 = alpha_0 f + sigma_0 eps holds in pixel space, and
VDM's discretized decoder p(x | z_0) is unchanged) and reach the same gamma_1 at their end times.
The finest details reach noise first; the generative model then draws them from N(0, I) and
they take no further part. In stage s, the times (t_s, t_{s+1}] (t_0 = 0, t_{L+1} = 1), only
`a_L, d_L, .., d_{s+1}` are alive; the partial inverse Haar transform reassembles them into an
image of H / 2^s x W / 2^s, on which one denoiser runs: most reverse-time steps run at a low
resolution.

Negative ELBO per example, in nats (the forward process is Gaussian with a diagonal, per-group
schedule, so VDM's derivation, eq. 11-17, holds coefficient by coefficient):

- reconstruction `-log p(x | z_0)`: VDM's, since every group starts at gamma_0;
- prior `sum_k KL(q(z_k(t_k) | x) || N(0, I))`, group k's term entering at its end time t_k;
  every group ends at gamma_1 and the Haar transform preserves norms, so the sum is exactly
  VDM's prior term `KL(q(z_1 | x) || N(0, I))` of f;
- diffusion `0.5 E_{t ~ U[0, 1]}[sum over alive groups k of gamma_k'(t) ||eps_k - eps_hat_k(z_t; t)||^2]`.

The diffusion term is estimated stratified over the stages: each example draws one antithetic
u in [0, 1) (VDM's time sampler) and one noise image, and every non-empty stage s contributes
its term at t = t_s + (t_{s+1} - t_s) u, weighted by the stage's length. The estimate is
unbiased, every tensor shape is static (XLA, TPUs), and a training example costs
1 + 1/4 + 1/16 + ... <= 4/3 full-resolution denoiser passes.

With all end times equal to 1 there is a single stage and the model is VDM, expressed in the
Haar basis: same time samples, same noise, same numbers (up to float rounding).

Reference: Batzolis, Stanczuk, Schonlieb, Etmann (2022), "Non-Uniform Diffusion Models",
arXiv:2207.09786, section 4 (multi-scale diffusion; the paper reports sample quality, the VLB here
is this library's); Kingma et al. (2021), "Variational Diffusion Models", eq. 11-17 and 32-34.
"""

import keras
import tensorflow as tf

from vdm_tf import haar, images, samplers, seeding
from vdm_tf.models.vdm import VDM


def default_end_times(levels):
    """Stages of equal length: t_k = k / (L + 1) for the detail group d_k."""
    return tuple(k / (levels + 1) for k in range(1, levels + 1))


@keras.saving.register_keras_serializable(package="vdm_tf")
class StageDenoisers(keras.layers.Layer):
    """One denoiser per stage of a `MultiScaleVDM`, picked by the resolution of `z_t`.

    `MultiScaleVDM` builds it when given a list of networks. It obeys the denoiser protocol at
    every stage resolution: images of H / 2^s x W / 2^s go to `networks[s]`.

    Args:
        networks: L + 1 layers `eps_hat = network(z_t, gamma_t, training=...)`.
        image_shape: (H, W, C) of the model's images (stage 0's resolution).
        **kwargs: forwarded to `keras.layers.Layer`.
    """

    def __init__(self, networks, image_shape, **kwargs):
        super().__init__(**kwargs)
        self.networks = list(networks)
        self.image_shape = tuple(int(d) for d in image_shape)
        haar.check_levels(self.image_shape, len(self.networks) - 1)
        conditioning_dims = {getattr(network, "conditioning_dim", 0) for network in self.networks}
        if len(conditioning_dims) != 1:
            raise ValueError(f"The stage networks must share one conditioning_dim; got {sorted(conditioning_dims)}.")
        self.conditioning_dim = conditioning_dims.pop()

    def build(self, z_t_shape=None, gamma_t_shape=None):
        """Creates every network's weights at its stage's resolution."""
        height, width, channels = self.image_shape
        for stage, network in enumerate(self.networks):
            if not network.built:
                network(tf.zeros((1, height >> stage, width >> stage, channels)), tf.zeros((1,)), training=False)
        self.built = True

    def call(self, z_t, gamma_t, training=None, conditioning=None):
        stage = (self.image_shape[0] // z_t.shape[1]).bit_length() - 1
        condition = {} if conditioning is None else {"conditioning": conditioning}
        return self.networks[stage](z_t, gamma_t, training=training, **condition)

    def compute_output_shape(self, z_t_shape, gamma_t_shape=None):
        return z_t_shape

    def get_config(self):
        config = super().get_config()
        config.update(
            networks=[keras.saving.serialize_keras_object(network) for network in self.networks],
            image_shape=self.image_shape,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["networks"] = [keras.saving.deserialize_keras_object(network) for network in config["networks"]]
        return cls(**config)


@keras.saving.register_keras_serializable(package="vdm_tf")
class MultiScaleVDM(VDM):
    """Multi-scale VDM: Haar groups on their own schedules, coarse-to-fine sampling, exact VLB.

    A `vdm_tf.VDM` in every respect that the trainer and the export use (`elbo`, `elbo_graph`,
    `sample`, `sample_graph`, `train_step`, `compute_gradients`, metrics `bpd`, `diffusion`,
    `prior`, `reconstruction`, `schedule.gamma_0 / gamma_1`), with the diffusion term and the
    sampler of the module docstring. Continuous time only.

    Args:
        denoiser: either one layer obeying the denoiser protocol at every stage resolution (a
            `ScoreUNet` does: it is fully convolutional, so one set of weights serves every
            stage and the parameter count is that of the uniform VDM), or a list of L + 1 such
            layers, one per stage (`networks[s]` runs at H / 2^s x W / 2^s). The denoiser of
            stage s gets the reassembled image of the alive groups and `gamma_t = gamma(t)`,
            the base schedule at t (the low-pass group's), and predicts their noise.
        schedule: the base `vdm_tf.schedules.NoiseSchedule` gamma(.).
        image_shape: (H, W, C), H and W divisible by 2^levels.
        levels: L >= 1 Haar levels (detail groups).
        end_times: (t_1, .., t_L), the times at which d_1 (finest) .. d_L reach gamma_1;
            0 < t_1 <= .. <= t_L <= 1. Default: stages of equal length, t_k = k / (L + 1).
        seed: base seed of the training randomness.
        augmentation: as for `VDM`.
        **kwargs: forwarded to `keras.Model`.

    Example:
    >>> model = vdm_tf.multiscale.MultiScaleVDM(
    ...     vdm_tf.networks.ScoreUNet(n_layers=4, n_embd=64), vdm_tf.schedules.LearnedLinear(),
    ...     image_shape=(32, 32, 3), levels=2)       # stages at 32x32, 16x16, 8x8
    >>> model.compile(optimizer=vdm_tf.optimizers.AdamW(2e-4))
    >>> terms = model.elbo(x_uint8, seed=0)          # {"bpd": [N], "diffusion": [N], ...}
    >>> x_new = model.sample(16, num_steps=256, seed=0)

    Reference: Batzolis et al. (2022), "Non-Uniform Diffusion Models", arXiv:2207.09786.
    """

    def __init__(self, denoiser, schedule, image_shape, levels=1, end_times=None, seed=0, augmentation=None, **kwargs):
        image_shape = tuple(int(d) for d in image_shape)
        levels = int(levels)
        if levels < 1:
            raise ValueError(f"levels must be >= 1; got {levels}.")
        haar.check_levels(image_shape, levels)
        end_times = default_end_times(levels) if end_times is None else tuple(float(t) for t in end_times)
        ordered = all(a <= b for a, b in zip((0.0,) + end_times, end_times + (1.0,)))
        if len(end_times) != levels or not ordered or end_times[0] <= 0.0:
            raise ValueError(
                f"end_times must be L = {levels} times 0 < t_1 <= ... <= t_L <= 1 (finest details first); "
                f"got {end_times}."
            )
        if isinstance(denoiser, (list, tuple)):
            if len(denoiser) != levels + 1:
                raise ValueError(
                    f"Give one denoiser for all stages or a list of L + 1 = {levels + 1}; got {len(denoiser)}."
                )
            denoiser = StageDenoisers(denoiser, image_shape, name="stage_denoisers")
        super().__init__(denoiser, schedule, image_shape, timesteps=0, seed=seed, augmentation=augmentation, **kwargs)
        self.levels = levels
        self.end_times = end_times
        boundaries = (0.0,) + end_times + (1.0,)
        # (stage s, its start time t_s, its end time t_{s+1}) of the non-empty stages, finest first.
        self.stages = [
            (s, boundaries[s], boundaries[s + 1]) for s in range(levels + 1) if boundaries[s + 1] > boundaries[s]
        ]

    def group_end_times(self, stage):
        """End times of the groups alive in `stage`, in `haar` order: (1 for a_L, t_{s+1}, .., t_L)."""
        return (1.0,) + self.end_times[stage:]

    def _stage_shape(self, num_samples, stage):
        height, width, channels = self.image_shape
        return tf.concat([[num_samples], [height >> stage, width >> stage, channels]], axis=0)

    # ----------------------------------------------------------------------------------------
    # The negative ELBO: only the diffusion term differs from VDM.

    def _diffusion_loss(self, f, seed, training, example_index, num_examples, conditioning=None):
        """Per-example diffusion loss in nats, and the base schedule's (gamma, gamma') it used.

        Those are [M, N]: one row per (stage, alive group) pair, at that group's clock t / t_k,
        so `VDM.compute_gradients` can train a schedule's shape on the loss variance.
        """
        t_seed, eps_seed = seeding.split_seed(seed, 2)
        u = self._time_samples(example_index, num_examples, t_seed)
        eps = seeding.per_example_normal(eps_seed, example_index, self.image_shape)
        f_low, f_details = haar.haar(f, self.levels)
        eps_low, eps_details = haar.haar(eps, self.levels)
        clocks = []
        for stage, start, end in self.stages:
            t = start + (end - start) * u
            clocks += [t / end_time for end_time in self.group_end_times(stage)]
        gamma, dgamma = self.schedule.gamma_and_derivative(tf.stack(clocks))
        condition = {} if conditioning is None else {"conditioning": conditioning}
        loss, row = 0.0, 0
        for stage, start, end in self.stages:
            end_times = self.group_end_times(stage)
            f_groups, eps_groups = [f_low] + f_details[stage:], [eps_low] + eps_details[stage:]
            gammas = [images.per_example(gamma[row + k], 4) for k in range(len(end_times))]
            z = [
                tf.sqrt(tf.sigmoid(-g)) * f_k + tf.sqrt(tf.sigmoid(g)) * e_k
                for g, f_k, e_k in zip(gammas, f_groups, eps_groups)
            ]
            eps_hat = self.denoiser(haar.inverse_haar(z[0], z[1:]), gamma[row], training=training, **condition)
            eps_hat_low, eps_hat_details = haar.haar(eps_hat, self.levels - stage)
            for k, (e_k, e_hat_k) in enumerate(zip(eps_groups, [eps_hat_low] + eps_hat_details)):
                squared_error = tf.reduce_sum(tf.square(e_k - e_hat_k), axis=[1, 2, 3])
                dgamma_dt = dgamma[row + k] / end_times[k]  # d/dt gamma(t / t_k)
                loss += (end - start) * 0.5 * dgamma_dt * squared_error  # VDM eq. (17), per group
            row += len(end_times)
        return loss, (gamma, dgamma)

    # ----------------------------------------------------------------------------------------
    # Sampling, coarse to fine.

    def _sample(self, num_samples, num_steps, seed, argmax):
        """Ancestral sampling in `num_steps` steps (at least one per stage), coarse to fine.

        Stage m of the n non-empty ones (finest first, starting at time t_s) gets the steps
        b_m + 1 .. b_{m+1} with b_m = m + round((num_steps - n) t_s), b_n = num_steps, equally
        spaced in its time interval: about its share of the time, at least one step. At its
        end time a detail group is drawn from N(0, I) and joins the image.
        """
        prior_seed, loop_seed, decoder_seed = seeding.split_seed(seed, 3)
        num_stages = len(self.stages)
        num_steps = tf.maximum(num_steps, num_stages)
        spare = tf.cast(num_steps - num_stages, tf.float32)
        boundaries = [m + tf.cast(tf.round(spare * start), tf.int32) for m, (_, start, _) in enumerate(self.stages)]
        boundaries.append(num_steps)
        coarsest = self.stages[-1][0]
        z = tf.random.stateless_normal(self._stage_shape(num_samples, coarsest), prior_seed)
        for m in reversed(range(num_stages)):
            stage = self.stages[m][0]
            if stage < coarsest:  # the details that end at this stage's end time join from N(0, I)
                noise = tf.random.stateless_normal(
                    self._stage_shape(num_samples, stage), seeding.fold_in(prior_seed, m)
                )
                _, born = haar.haar(noise, self.stages[m + 1][0] - stage)
                z = haar.inverse_haar(z, born)
            z = self._run_stage(z, self.stages[m], boundaries[m], boundaries[m + 1], loop_seed)
        return self.decode(z, decoder_seed, argmax)

    def _run_stage(self, z, stage_times, first, last, loop_seed):
        """Steps last .. first + 1 of one stage, equally spaced in its time interval."""
        stage, start, end = stage_times
        length = (end - start) / tf.cast(last - first, tf.float32)

        def times(i):
            return start + length * tf.cast(i - 1 - first, tf.float32), start + length * tf.cast(i - first, tf.float32)

        def step(z, s, t, seed):
            return self._ancestral_step(z, stage, s, t, seed)

        return samplers.ancestral_loop(step, z, first, last, times, loop_seed)

    def _ancestral_step(self, z_t, stage, s, t, seed):
        """One step z_t -> z_s of `stage` on its reassembled image: VDM eq. 32-34 per group."""
        end_times = tf.constant(self.group_end_times(stage))
        gamma_t, gamma_s = tf.unstack(self.schedule(tf.stack([t / end_times, s / end_times])))
        eps_hat = self.denoiser(z_t, tf.fill(tf.shape(z_t)[:1], gamma_t[0]), training=False)
        noise = tf.random.stateless_normal(tf.shape(z_t), seed)
        levels = self.levels - stage
        z_groups, eps_hat_groups, noise_groups = (
            [low] + details for low, details in (haar.haar(v, levels) for v in (z_t, eps_hat, noise))
        )
        z_s = [
            samplers.ancestral_update(z_k, eps_hat_k, gamma_s[k], gamma_t[k], noise_k)
            for k, (z_k, eps_hat_k, noise_k) in enumerate(zip(z_groups, eps_hat_groups, noise_groups))
        ]
        return haar.inverse_haar(z_s[0], z_s[1:])

    # ----------------------------------------------------------------------------------------
    # What a multi-scale model does not have.

    @property
    def sde(self):
        raise AttributeError(
            "MultiScaleVDM has one schedule per Haar group, not one scalar SDE, so vdm_tf.samplers and "
            "vdm_tf.likelihood do not apply; use its sample() and elbo()."
        )

    def score(self, z, t):
        raise NotImplementedError("MultiScaleVDM has no single-resolution score; use its sample() and elbo().")

    def ancestral_step(self, z_t, s, t, seed):
        raise NotImplementedError("MultiScaleVDM steps stage by stage inside sample(); there is no full-image step.")

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = super().get_config()
        del config["timesteps"]
        config.update(levels=self.levels, end_times=self.end_times)
        return config
