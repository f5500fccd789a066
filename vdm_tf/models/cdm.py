"""Classification Diffusion Models (Yadin, Elata, Michaeli 2024): a noise-level classifier as denoiser.

    classifier = vdm_tf.networks.NoiseLevelClassifier(num_levels=1000, n_layers=2, n_embd=64)
    cdm = vdm_tf.cdm.CDM(classifier, vdm_tf.schedules.FixedLinear(-13.3, 10.0), (32, 32, 3), num_levels=1000)
    cdm.compile(optimizer=vdm_tf.optimizers.AdamW(2e-4)); cdm.fit(uint8_batches, ...)
    bpd = cdm.one_step_bpd(x_uint8, seed=0)     # one classifier evaluation per image
    x = cdm.sample(16, num_steps=256, seed=0)   # or any sampler of vdm_tf.samplers

Noise levels t = 0 .. T + 1 on a vdm_tf schedule gamma (ARCHITECTURE.md, math conventions: z = alpha f + sigma eps):

- t = 0: clean data, z = f (alpha = 1, sigma = 0);
- t = 1 .. T: z = alpha_t f + sigma_t eps with gamma_t = gamma(t / T), sigma_t^2 = sigmoid(gamma_t);
- t = T + 1: pure noise, z = eps ~ N(0, I) (alpha = 0, sigma = 1).

Make level T nearly pure noise, as the paper's grid does (DDPM's betas 1e-4 .. 0.02 end at
alpha_T^2 = 4e-5, gamma_T = 10; the CDM presets' schedules end at gamma(1) = 10). The denoiser
is least accurate at the last few levels: there F is the log ratio of level T against pure
noise, a jump as big as ~100 grid steps, which `NoiseLevelClassifier`'s cumulative-sum head
learns like its neighbours' small ratios and leaves too small (on digits, 1/3.4 of the
best-fitting input gradient at level T). The excess noise-prediction error there scales with
alpha_T^2, so a small alpha_T (gamma_T = 10) confines it to levels that hardly matter
(bench/cdm.py measures it against a VDM's, level by level).

A classifier `logits = classifier(z)` [N, T + 2] predicts the level of z; with levels drawn
uniformly, its optimum is logit_t = log p(t | z) + c(z). Bayes' rule (paper eq. 13) gives the
density of every level from the classifier and the N(0, I) density of the last one:

    log p_t(z) = log N(z; 0, I) + logit_t(z) - logit_{T+1}(z).

- Theorem 3.1 (denoiser). Tweedie's formula E[eps | z_t] = -sigma_t grad log p_t(z_t), with
  F = logit_{T+1} - logit_t, gives `eps_hat = sigma_t (grad_z F(z, t) + z)` (eq. 8; the paper's
  sqrt(1 - alpha_bar_t) is our sigma_t). `ClassifierDenoiser` computes it with a GradientTape,
  as a layer of the denoiser protocol `eps_hat = denoiser(z_t, gamma_t, training=...)`.
- Theorem 3.2 (likelihood in one step). At t = 0: `log p(f) = log N(f; 0, I) + logit_0 - logit_{T+1}`.
- Training (Algorithm 1): `w * cross_entropy(t, logits) + MSE(eps, eps_hat)` (w = 0.001, the MSE
  a mean over pixels), t uniform on 0 .. T + 1. The cross entropy fixes the per-level constants
  that the gradient cannot see; the MSE makes the logits right far from the true level too
  (paper, section 4.1). The MSE is the gradient of a gradient: nested GradientTapes.

Continuous noise levels. Samplers ask for the denoiser at any gamma. Between two neighbouring
levels i and i + 1 the denoiser interpolates the classifier's log-densities linearly in sigma^2:
F = logit_{T+1} - ((1 - w) logit_i + w logit_{i+1}), w = (sigma^2 - sigma_i^2) /
(sigma_{i+1}^2 - sigma_i^2), so eps_hat = -sigma (interpolated score). On the grid gamma(i / T)
it is exactly Theorem 3.1; in between, the error falls with the square of the level spacing
(Gaussian data, levels 0.37 apart in gamma: within 1% of the exact denoiser). `VDM`-style
ancestral sampling with `num_steps = T` stays on the grid.

Data are uniformly dequantised, f = 2 (x + u) / 256 - 1 with u ~ U[0, 1)^D, in training and in
the likelihood, so the classifier models a continuous density and the one-step bpd has the
convention of `vdm_tf.likelihood.ode_bpd(dequantization="uniform")`: -log p(f) / (D ln 2) + 7.
That number is the model's density at the (dequantised) pixel values. For the Bayes-optimal
classifier it would be, in expectation over u, an upper bound on the discrete negative
log-likelihood; for a trained classifier `logit_0 - logit_{T+1}` is an estimate whose
normalisation nothing enforces, so unlike the VLB of a VDM it is neither a bound nor
guaranteed to be a normalised density.

Reference: Yadin, Elata, Michaeli 2024, "Classification Diffusion Models: Revitalizing Density
Ratio Estimation", NeurIPS, https://arxiv.org/abs/2402.10095; github.com/shaharYadin/CDM.
"""

import math

import keras
import tensorflow as tf

from vdm_tf import images, seeding
from vdm_tf.models.base import DiffusionModel, deserialized, serialized


def dequantize(x, u):
    """uint8 pixels x and uniform noise u in [0, 1) -> f = 2 (x + u) / 256 - 1, a point of x's bin."""
    return 2.0 * (tf.cast(x, tf.float32) + u) / images.NUM_VALUES - 1.0


def per_example_uniform(seed, example_index, shape):
    """U[0, 1) noise [N, *shape] whose row i depends only on (seed, example_index[i]).

    Phi(n) of `seeding.per_example_normal` (Phi the standard normal CDF), which is uniform.
    """
    return 0.5 * tf.math.erfc(-seeding.per_example_normal(seed, example_index, shape) / math.sqrt(2.0))


@keras.saving.register_keras_serializable(package="vdm_tf")
class ClassifierDenoiser(keras.layers.Layer):
    """`eps_hat = ClassifierDenoiser(classifier, schedule, T)(z_t, gamma_t)`: Theorem 3.1 of CDM.

    `eps_hat = sigma_t (grad_z F + z)`, F = logit_{T+1} - logit_t, with the classifier's logits
    interpolated linearly in sigma^2 between the two levels around gamma_t (module docstring).

    Call arguments:
        z_t: float32 [N, H, W, C].
        gamma_t: float32 [N] or scalar; any value (-inf: clean data, +inf: pure noise).
        training: forwarded to the classifier (dropout).

    Returns float32 [N, H, W, C], the predicted noise.

    Args:
        classifier: a layer `logits = classifier(z, training=...)`, logits [N, T + 2] for the
            levels 0 (clean) .. T + 1 (pure noise), e.g. `vdm_tf.networks.NoiseLevelClassifier`.
        schedule: a `vdm_tf.schedules.NoiseSchedule`; level t = 1 .. T is at gamma(t / T).
        num_levels: T.
        **kwargs: standard `keras.layers.Layer` arguments.

    Example:
    >>> denoiser = ClassifierDenoiser(NoiseLevelClassifier(100), FixedLinear(-13.3, 10.0), 100)
    >>> eps_hat = denoiser(z_t, tf.fill([N], -2.0))

    Reference: Yadin et al. 2024, "Classification Diffusion Models", Theorem 3.1, eq. (8).
    """

    def __init__(self, classifier, schedule, num_levels, **kwargs):
        super().__init__(**kwargs)
        self.classifier = classifier
        self.schedule = schedule
        self.num_levels = int(num_levels)

    def build(self, z_t_shape, gamma_t_shape=None):
        if not self.classifier.built:
            self.classifier.build(z_t_shape)

    def level_variances(self):
        """(alpha_t^2, sigma_t^2) of the levels t = 0 .. T + 1, float32 [T + 2] each."""
        gamma = self.schedule(tf.range(1, self.num_levels + 1, dtype=tf.float32) / self.num_levels)
        alpha2 = tf.concat([[1.0], tf.sigmoid(-gamma), [0.0]], axis=0)
        sigma2 = tf.concat([[0.0], tf.sigmoid(gamma), [1.0]], axis=0)
        return alpha2, sigma2

    def predict_noise(self, z, sigma, level_logit, training=None):
        """(eps_hat, logits) with eps_hat = sigma (grad_z F + z), F = logit_{T+1} - level_logit(logits).

        Args:
            z: float32 [N, H, W, C].
            sigma: float32 [N, 1, 1, 1], the noise std of z's level.
            level_logit: logits [N, T + 2] -> [N], the logit of z's level.
            training: forwarded to the classifier.
        """
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(z)
            logits = self.classifier(z, training=training)
            F = logits[:, -1] - level_logit(logits)  # the paper's F(z, t)
        return sigma * (tape.gradient(F, z) + z), logits  # examples are independent: grad of the sum

    def call(self, z_t, gamma_t, training=None):
        sigma2 = tf.sigmoid(tf.broadcast_to(tf.cast(gamma_t, tf.float32), tf.shape(z_t)[:1]))
        _, grid = self.level_variances()
        lower = tf.clip_by_value(tf.searchsorted(grid, sigma2, side="right") - 1, 0, self.num_levels)
        below, above = tf.gather(grid, lower), tf.gather(grid, lower + 1)
        w = tf.clip_by_value(tf.math.divide_no_nan(sigma2 - below, above - below), 0.0, 1.0)

        def level_logit(logits):
            return (1.0 - w) * tf.gather(logits, lower, batch_dims=1) + w * tf.gather(logits, lower + 1, batch_dims=1)

        eps_hat, _ = self.predict_noise(z_t, images.per_example(tf.sqrt(sigma2), 4), level_logit, training)
        return eps_hat

    def compute_output_shape(self, z_t_shape, gamma_t_shape=None):
        return z_t_shape

    def get_config(self):
        config = super().get_config()
        config.update(serialized(classifier=self.classifier, schedule=self.schedule), num_levels=self.num_levels)
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialized(config, "classifier", "schedule"))


@keras.saving.register_keras_serializable(package="vdm_tf")
class CDM(DiffusionModel):
    """Classification Diffusion Model: training, one-step likelihood, sampling.

    A `DiffusionModel` whose denoiser is `ClassifierDenoiser(classifier, schedule, num_levels)`:
    the base's ancestral sampler (`sample`), `sde`, `score` and per-example step randomness
    apply unchanged, so every sampler and likelihood of vdm_tf runs on it; the loss and the
    likelihood are CDM's own (module docstring).

    The schedule is fixed (it is set to `trainable = False`): the cross entropy would otherwise
    learn to push the levels apart. Training reports, per example, `bpd` (the one-step bpd of
    the batch's dequantised images, classifier in inference mode), `loss`
    (`cross_entropy_weight * cross_entropy + mse`), `cross_entropy` (nats) and `mse` (mean over
    pixels of (eps - eps_hat)^2 on the levels 1 .. T, 0 on levels 0 and T + 1, whose noise
    prediction is trivially 0 resp. exact).

    Args:
        classifier: a layer `logits = classifier(z, training=...)` with logits [N, T + 2],
            e.g. `vdm_tf.networks.NoiseLevelClassifier(num_levels=T)`.
        schedule: a `vdm_tf.schedules.NoiseSchedule`; level t = 1 .. T sits at gamma(t / T).
        image_shape: (H, W, C) of the uint8 images.
        num_levels: T (the paper: 1000).
        cross_entropy_weight: w of the loss `w * cross_entropy + mse` (the paper: 0.001).
        seed: base seed of the training randomness (levels, noise, dequantisation).
        **kwargs: forwarded to `keras.Model`.

    Example:
    >>> classifier = vdm_tf.networks.NoiseLevelClassifier(num_levels=1000, n_layers=1, n_embd=32)
    >>> cdm = CDM(classifier, vdm_tf.schedules.FixedLinear(-13.3, 10.0), (8, 8, 1), num_levels=1000)
    >>> cdm.compile(optimizer=vdm_tf.optimizers.AdamW(1e-3))
    >>> cdm.fit(vdm_tf.datasets.load("digits", "train", batch_size=64), steps_per_epoch=100)
    >>> cdm.one_step_bpd(test_images)        # float32 [N], one classifier evaluation each
    >>> cdm.sample(16, num_steps=1000)       # uint8 [16, 8, 8, 1]

    Reference: Yadin, Elata, Michaeli 2024, "Classification Diffusion Models: Revitalizing
    Density Ratio Estimation", NeurIPS, Theorems 3.1-3.2 and Algorithms 1-2.
    """

    TERMS = ("bpd", "loss", "cross_entropy", "mse")
    LOSS_TERM = "loss"

    def __init__(self, classifier, schedule, image_shape, num_levels=1000, cross_entropy_weight=1e-3, seed=0, **kwargs):
        if int(num_levels) < 1:
            raise ValueError(f"num_levels must be a positive number of diffusion levels; got {num_levels}.")
        image_shape = tuple(int(d) for d in image_shape)
        logits = classifier(tf.zeros((1,) + image_shape), training=False)
        if logits.shape.rank != 2 or logits.shape[-1] != int(num_levels) + 2:
            raise ValueError(
                f"The classifier must return logits of shape [N, num_levels + 2] = [N, {int(num_levels) + 2}] "
                f"(levels 0 .. T + 1); got shape {logits.shape}."
            )
        schedule.trainable = False
        denoiser = ClassifierDenoiser(classifier, schedule, num_levels, name="classifier_denoiser")
        super().__init__(denoiser, schedule, image_shape, seed=seed, **kwargs)
        self.cross_entropy_weight = float(cross_entropy_weight)

    @property
    def classifier(self):
        return self.denoiser.classifier

    @property
    def num_levels(self):
        return self.denoiser.num_levels

    # ----------------------------------------------------------------------------------------
    # The one-step likelihood (Theorem 3.2).

    def _log_likelihood(self, z0):
        logits = self.classifier(z0, training=False)
        return self.sde.prior_log_prob(z0) + logits[:, 0] - logits[:, -1]

    def _bpd(self, f):
        """-log p(f) / (D ln 2) + 7: bits per dimension at dequantised pixel values f."""
        nats = -self._log_likelihood(f) - self.num_dims * math.log(2.0 / images.NUM_VALUES)
        return nats / (self.num_dims * math.log(2.0))

    def one_step_log_likelihood(self, z0):
        """log p(z0) of the clean-data level in nats, from one classifier evaluation (Theorem 3.2).

        `log N(z0; 0, I) + logit_0(z0) - logit_{T+1}(z0)`: exact for the Bayes-optimal
        classifier; for a trained one an estimate (nothing makes it normalised).

        Args:
            z0: float32 [N, H, W, C], points in data space (f units, [-1, 1] for images).

        Returns:
            float32 [N].
        """
        z0 = tf.convert_to_tensor(z0)
        if not z0.dtype.is_floating or z0.shape.rank != 4 or not z0.shape[1:].is_compatible_with(self.image_shape):
            expected = ", ".join(map(str, self.image_shape))
            raise ValueError(
                f"z0 must be float with shape [N, {expected}] (data in f units); got {z0.dtype.name} "
                f"with shape {z0.shape}."
            )
        return self.one_step_log_likelihood_graph(tf.cast(z0, tf.float32))

    def one_step_bpd(self, x, seed=0):
        """Bits per dimension of uint8 images from one classifier evaluation each.

        `-log p(f) / (D ln 2) + 7` at f = 2 (x + u) / 256 - 1, u ~ U[0, 1)^D drawn from `seed`
        (the convention of `vdm_tf.likelihood.ode_bpd(dequantization="uniform")`). A density at
        the pixel values, not a bound (module docstring).

        Args:
            x: uint8 images [N, H, W, C].
            seed: int or shape-[2] seed of the dequantisation noise.

        Returns:
            float32 [N].
        """
        x = images.check_images(x, self.image_shape)
        return self.one_step_bpd_graph(x, seeding.as_seed(seed))

    def _one_step_bpd(self, x, seed):
        return self._bpd(dequantize(x, tf.random.stateless_uniform(tf.shape(x), seed)))

    def _bpd_terms(self, x, seed):
        return {"bpd": self._one_step_bpd(x, seed)}

    def elbo(self, x, seed=0, num_time_samples=1):
        """The one-step bpd averaged over `num_time_samples` dequantisation draws: {"bpd": [N]}.

        A CDM has no ELBO: this is the `elbo` interface of every model (so
        `vdm_tf.evaluation.dataset_bpd`, the trainer and the export score a CDM unchanged) with
        the one-step bpd inside, a density estimate, not a bound. With one draw it equals
        `one_step_bpd(x, seed)`; `bpd(x, seed, num_time_samples)` is the same figure.
        """
        return super().elbo(x, seed, num_time_samples)

    def _make_graphs(self):
        """The base's `elbo_graph` and `sample_graph`, plus the traced one-step likelihoods.

        `one_step_bpd_graph(x uint8 [N, H, W, C], seed int64 [2]) -> float32 [N]` and
        `one_step_log_likelihood_graph(z0 float32 [N, H, W, C]) -> float32 [N]`.
        """
        super()._make_graphs()
        self.one_step_bpd_graph = tf.function(
            self._one_step_bpd,
            input_signature=[tf.TensorSpec((None,) + self.image_shape, tf.uint8), tf.TensorSpec([2], tf.int64)],
        )
        self.one_step_log_likelihood_graph = tf.function(
            self._log_likelihood, input_signature=[tf.TensorSpec((None,) + self.image_shape, tf.float32)]
        )

    # ----------------------------------------------------------------------------------------
    # Training (Algorithm 1).

    def _loss_terms(self, x, seed, training, example_index=None, num_examples=None):
        """(Per-example terms, a dict over `TERMS`; None): CDM's training loss, Algorithm 1.

        Example i draws its level, noise and dequantisation from `seed` and its global index
        `example_index[i]` among the `num_examples` of the global batch (defaults: this batch).
        Levels are stratified over the batch: t_i = floor((T + 2) ((u + i / N) mod 1)). The loss
        (`LOSS_TERM`) differentiates the classifier's input gradient: the inner tape (in
        `ClassifierDenoiser.predict_noise`) runs inside the training step's.
        """
        x = images.check_images(x, self.image_shape)
        if example_index is None:
            example_index = tf.range(tf.shape(x)[0])
            num_examples = tf.shape(x)[0]
        level_seed, noise_seed, dequantization_seed = seeding.split_seed(seed, 3)
        last = self.num_levels + 1
        uniform = self._time_samples(example_index, num_examples, level_seed)
        level = tf.minimum(tf.cast(tf.floor(uniform * (last + 1)), tf.int32), last)
        f = dequantize(x, per_example_uniform(dequantization_seed, example_index, self.image_shape))
        eps = seeding.per_example_normal(noise_seed, example_index, self.image_shape)
        alpha2, sigma2 = self.denoiser.level_variances()
        sigma = images.per_example(tf.sqrt(tf.gather(sigma2, level)), 4)
        z = images.per_example(tf.sqrt(tf.gather(alpha2, level)), 4) * f + sigma * eps
        eps_hat, logits = self.denoiser.predict_noise(
            z, sigma, lambda logits: tf.gather(logits, level, batch_dims=1), training
        )
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=level, logits=logits)
        squared_error = tf.reduce_mean(tf.square(eps - eps_hat), axis=[1, 2, 3])
        mse = tf.where((level > 0) & (level < last), squared_error, 0.0)
        terms = {
            "bpd": tf.stop_gradient(self._bpd(f)),
            "loss": self.cross_entropy_weight * cross_entropy + mse,
            "cross_entropy": cross_entropy,
            "mse": mse,
        }
        return terms, None

    # ----------------------------------------------------------------------------------------
    # Serialisation.

    def get_config(self):
        config = keras.Model.get_config(self)  # the classifier, not the denoiser built from it
        config.update(serialized(classifier=self.classifier, schedule=self.schedule))
        config.update(
            image_shape=self.image_shape,
            num_levels=self.num_levels,
            cross_entropy_weight=self.cross_entropy_weight,
            seed=self.seed,
        )
        return config

    @classmethod
    def from_config(cls, config):
        return cls(**deserialized(config, "classifier", "schedule"))
