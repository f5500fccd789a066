"""Samplers for any model with `.sde`, `.score(z, t)` and `.image_shape` (Song et al. 2021).

    x = vdm_tf.samplers.sample(model, 16, sampler="pc", num_steps=500, seed=0)   # uint8 images
    x = vdm_tf.samplers.sample(model, 16, sampler="ode", seed=0, rtol=1e-5, atol=1e-5)
    z, nfe = vdm_tf.samplers.ode_sample_latents(model, 16, seed=0)

- `"pc"`: predictor-corrector sampling (Song et al., algorithms 2-3). Predictors:
  `euler_maruyama` (the reverse SDE, eq. 6, by Euler-Maruyama), `reverse_diffusion` (eq. 45-47:
  the forward discretisation run backwards), `ancestral` (exact draws from
  q(z_s | z_t, x = x_hat(z_t)); for a VDM this is VDM's own ancestral step, eq. 32-34), or
  `none`. Correctors: `langevin` (algorithm 4, step size from the signal-to-noise ratio `snr`),
  `annealed_langevin` (algorithm 5, step size from the marginal std), or `none`. Langevin's
  step size comes from the norms of the noise and the score averaged over the batch (Song et
  al.'s code): one step for the whole batch, so sample many images per call.
- Defaults follow the SDE, as in Song et al.'s configurations (yang-song/score_sde, `configs/`):
  a predictor or corrector left unspecified is `PC_DEFAULTS[pc_kind(model.sde)]`'s. Variance
  preserving SDEs (`VPSDE`, `SubVPSDE`, and a VDM's `ScheduleSDE`) sample with Euler-Maruyama and
  no corrector (their `vp/*_continuous.py` and `subvp/*` configs); `VESDE` with reverse diffusion
  and Langevin at `snr` 0.16 (`ve/cifar10_ncsnpp_continuous.py` with `default_cifar10_configs.py`).
  The Langevin corrector is unadjusted Langevin (no Metropolis test): its fixed step leaves an
  O(step) error that a few thousand samples show. On 16 discretised Gaussian pixels with their
  exact denoiser (`bench/pc_corrector.py`, 4000 samples, 500 and 1000 steps) it makes the
  narrowest pixel 3-5% too wide on the VP and VE models, and on the VE model and a VDM pulls in
  the pixels whose mass reaches the end of the pixel range (f = 1): their means by up to 6 (VE)
  and 10 (VDM) standard errors, their stds 1-4% too narrow. Without it, the VP and VDM samples
  are within 2.8 standard errors on every pixel.
- `"ancestral"`: `"pc"` with the ancestral predictor and no corrector.
- `"ode"`: the probability-flow ODE (eq. 13) from t = 1 to `sde.t_min`, solved by
  `vdm_tf.ode_solver.solve` (Dormand-Prince 5(4) with scipy's RK45 step control; `rtol`,
  `atol`); reports the number of score evaluations.

Every sampler ends with one denoising step (Tweedie's formula, `x_hat = (z + s_t^2 score) / m_t`)
and rounds to the nearest pixel value. Loops are `tf.while_loop`s inside one `tf.function`
(traced once per model and setting), and all randomness is stateless.
"""

import operator

import tensorflow as tf

from vdm_tf import images, ode_solver, seeding
from vdm_tf.sde import VESDE, per_example
from vdm_tf.traced import compiled

PREDICTORS = ("euler_maruyama", "reverse_diffusion", "ancestral", "none")
CORRECTORS = ("langevin", "annealed_langevin", "none")
SAMPLERS = ("pc", "ancestral", "ode")
# Song et al.'s predictor and corrector for each kind of SDE (see the module docstring).
PC_DEFAULTS = {
    "variance_preserving": {"predictor": "euler_maruyama", "corrector": "none"},
    "variance_exploding": {"predictor": "reverse_diffusion", "corrector": "langevin"},
}


def check_count(name, value, minimum=0):
    """A count argument (`num_samples`, `num_steps`) as a Python int >= `minimum`.

    Takes what `operator.index` takes (Python and NumPy integers, integer scalar tensors); not
    bools, floats or strings, so 2.5 images are an error rather than 2.

    Raises:
        ValueError: for anything else, naming the expected form ("expected an integer
            num_samples >= 0; got 2.5.").
    """
    try:
        count = None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        count = None
    if count is None or count < minimum:
        raise ValueError(f"expected an integer {name} >= {minimum}; got {value!r}.")
    return count


# ------------------------------------------------------------------------------------------------
# Ancestral sampling of a model's own discrete-time chain (VDM section 3.5, eq. 32-34).


def ancestral_update(z_t, eps_hat, gamma_s, gamma_t, noise):
    """z_s = mean + std * noise, a draw of q(z_s | z_t, x = x_hat(z_t)) for gamma_s <= gamma_t.

    VDM eq. 32-34. With c = -expm1(gamma_s - gamma_t) = 1 - SNR(t) / SNR(s):
    mean = alpha_s / alpha_t (z_t - sigma_t c eps_hat), variance = sigma_s^2 c.
    """
    c = -tf.math.expm1(gamma_s - gamma_t)
    mean = tf.sqrt(tf.sigmoid(-gamma_s) / tf.sigmoid(-gamma_t)) * (z_t - tf.sqrt(tf.sigmoid(gamma_t)) * c * eps_hat)
    return mean + tf.sqrt(tf.sigmoid(gamma_s) * c) * noise


def ancestral_loop(step, z, first, last, times, loop_seed):
    """Steps i = `last` .. `first` + 1 of a model's chain, one `tf.while_loop`.

    Step i moves z from time t to s, `(s, t) = times(i)`, by `step(z, s, t, fold_in(loop_seed, i))`
    (a model's `ancestral_step`), so every step draws its own noise, whatever the other steps are.
    """

    def body(i, z):
        s, t = times(i)
        return i - 1, step(z, s, t, seeding.fold_in(loop_seed, i))

    return tf.while_loop(lambda i, z: i > first, body, (last, z))[1]


def ancestral(model, num_samples, num_steps, seed, argmax):
    """uint8 images by ancestral sampling: z_1 ~ N(0, I), `num_steps` steps of the model's chain, decoding.

    The graph of `DiffusionModel.sample` (tensor arguments: int32 counts, int64 [2] seed, bool
    argmax): `model.ancestral_step(z_t, s, t, seed)` is the step hook, `model.decode(z_0, seed,
    argmax)` maps z_0 to pixels.
    """
    prior_seed, loop_seed, decoder_seed = seeding.split_seed(seed, 3)
    z = tf.random.stateless_normal(tf.concat([[num_samples], model.image_shape], 0), prior_seed)
    steps = tf.cast(num_steps, tf.float32)

    def times(i):  # equal steps from t = 1 to 0
        return tf.cast(i - 1, tf.float32) / steps, tf.cast(i, tf.float32) / steps

    z_0 = ancestral_loop(model.ancestral_step, z, 0, num_steps, times, loop_seed)
    return model.decode(z_0, decoder_seed, argmax)


# ------------------------------------------------------------------------------------------------
# Samplers of the SDE (Song et al. 2021).


def denoised_mean(model, z, t):
    """Tweedie's formula: E[x | z_t] = (z_t + s_t^2 grad log p_t(z_t)) / m_t."""
    mean, std = model.sde.marginal(t)
    return (z + per_example(tf.square(std), z) * model.score(z, t)) / per_example(mean, z)


def posterior_step(model, z, t, s, noise):
    """z_s ~ q(z_s | z_t, x = x_hat(z_t)) for s < t: the ancestral step of any linear SDE.

    With z_t | z_s ~ N(a z_s, v), z_s | x ~ N(m_s x, s_s^2):
    mean = (a s_s^2 z_t + m_s v x_hat) / s_t^2, variance = v s_s^2 / s_t^2.
    """
    a, v = model.sde.transition(t, s)
    mean_s, std_s = model.sde.marginal(s)
    _, std_t = model.sde.marginal(t)
    x_hat = denoised_mean(model, z, t)
    mean = (per_example(a * tf.square(std_s), z) * z + per_example(mean_s * v, z) * x_hat) / per_example(
        tf.square(std_t), z
    )
    return mean + per_example(tf.sqrt(v) * std_s / std_t, z) * noise, mean


def predictor_step(model, predictor, z, t, dt, noise):
    """One reverse-time step from t to t - dt; returns (z, its noise-free mean)."""
    sde = model.sde
    if predictor == "euler_maruyama":
        mean = z - sde.reverse_drift(z, t, model.score(z, t)) * dt
        return mean + per_example(sde.diffusion(t) * tf.sqrt(dt), z) * noise, mean
    if predictor == "reverse_diffusion":
        f, g = sde.discretize(z, t - dt, dt)
        mean = z - f + tf.square(g) * model.score(z, t)
        return mean + g * noise, mean
    if predictor == "ancestral":
        return posterior_step(model, z, t, t - dt, noise)
    return z, z


def corrector_step(model, corrector, z, t, dt, snr, noise):
    """One Langevin step at fixed t: z + step * score + sqrt(2 step) noise (Song et al. algorithms 4, 5).

    `langevin` (algorithm 4): step = 2 alpha (snr ||noise|| / ||score||)^2 with both norms
    averaged over the batch, one step for all examples, as in Song et al.'s code
    (`grad_norm = norm(grad.reshape(N, -1), dim=-1).mean()`). A step computed from each
    example's own norms depends on that example's state, which breaks detailed balance: on a
    16-dimensional standard Gaussian with its exact score, such chains settle at a standard
    deviation of 1.14 instead of 1.015 (unadjusted Langevin's own O(step) excess; tests/test_sde.py).
    The batch-mean step depends on the state only through the mean over the batch, so it wants
    a batch of many examples (with one image it is the per-example step again).
    `annealed_langevin` (algorithm 5): step = 2 alpha (snr s_t)^2 from the marginal std s_t.
    """
    score = model.score(z, t)
    a, _ = model.sde.transition(t, t - dt)
    alpha = tf.square(a)  # 1 - beta_i for VP SDEs, 1 for VE
    if corrector == "langevin":
        noise_norm = tf.reduce_mean(tf.norm(tf.reshape(noise, [tf.shape(z)[0], -1]), axis=-1))
        score_norm = tf.reduce_mean(tf.norm(tf.reshape(score, [tf.shape(z)[0], -1]), axis=-1))
        step = 2.0 * alpha * tf.square(snr * noise_norm / score_norm)
    else:
        _, std = model.sde.marginal(t)
        step = 2.0 * alpha * tf.square(snr * std)
    mean = z + per_example(step, z) * score
    return mean + per_example(tf.sqrt(2.0 * step), z) * noise


def pc_kind(process):
    """The `PC_DEFAULTS` key of an SDE: `"variance_exploding"` for a `VESDE`, else `"variance_preserving"`.

    Every other SDE of vdm_tf (`VPSDE`, `SubVPSDE`, `ScheduleSDE`) has m_t^2 + s_t^2 <= 1.
    """
    return "variance_exploding" if isinstance(process, VESDE) else "variance_preserving"


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")


def no_samples(num_samples):
    """True for a count of 0, which gets an empty batch (as NumPy gives) without running the network.

    A count given in Python is checked (`check_count`: an integer >= 0); a count inside a graph
    (the export's signatures) is its caller's to check.
    """
    return not tf.is_symbolic_tensor(num_samples) and check_count("num_samples", num_samples) == 0


def pc_sample_latents(
    model,
    num_samples,
    num_steps=500,
    seed=0,
    predictor=None,
    corrector=None,
    snr=0.16,
    corrector_steps=1,
):
    """Predictor-corrector sampling; returns the denoised mean at `sde.t_min`, float32 [N, H, W, C].

    Args:
        model: has `.sde`, `.score(z, t)` and `.image_shape`.
        num_samples: N.
        num_steps: predictor steps, equally spaced from t = 1 to `sde.t_min`.
        seed: int or shape-[2] seed.
        predictor: one of `PREDICTORS`; None: the SDE's default (`PC_DEFAULTS`).
        corrector: one of `CORRECTORS`; None: the SDE's default (`PC_DEFAULTS`).
        snr: the corrector's signal-to-noise ratio (Song et al.: 0.16 for VE CIFAR-10).
        corrector_steps: Langevin steps per predictor step.
    """
    defaults = PC_DEFAULTS[pc_kind(model.sde)]
    predictor = defaults["predictor"] if predictor is None else predictor
    corrector = defaults["corrector"] if corrector is None else corrector
    check_choice("predictor", predictor, PREDICTORS)
    check_choice("corrector", corrector, CORRECTORS)
    if no_samples(num_samples):
        return tf.zeros((0, *model.image_shape))

    def build():
        @tf.function(
            input_signature=[
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([], tf.int32),
                tf.TensorSpec([2], tf.int64),
                tf.TensorSpec([], tf.float32),
            ]
        )
        def run(num_samples, num_steps, seed, snr):
            shape = tf.concat([[num_samples], model.image_shape], 0)
            prior_seed, loop_seed = seeding.split_seed(seed, 2)
            t_min = model.sde.t_min
            dt = (1.0 - t_min) / tf.cast(num_steps, tf.float32)

            def step(i, z, mean):
                t = 1.0 - tf.cast(i, tf.float32) * dt
                step_seed = seeding.fold_in(loop_seed, i)
                for k in range(corrector_steps if corrector != "none" else 0):
                    noise = tf.random.stateless_normal(shape, seeding.fold_in(step_seed, k + 1))
                    z = corrector_step(model, corrector, z, t, dt, snr, noise)
                noise = tf.random.stateless_normal(shape, seeding.fold_in(step_seed, 0))
                z, mean = predictor_step(model, predictor, z, t, dt, noise)
                return i + 1, z, mean

            z = model.sde.prior_sample(shape, prior_seed)
            _, z, mean = tf.while_loop(lambda i, z, mean: i < num_steps, step, (0, z, z))
            return denoised_mean(model, mean, t_min)

        return run

    run = compiled(model, ("pc", predictor, corrector, int(corrector_steps)), build)
    return run(tf.cast(num_samples, tf.int32), tf.cast(num_steps, tf.int32), seeding.as_seed(seed), float(snr))


def ode_sample_latents(model, num_samples, seed=0, rtol=1e-5, atol=1e-5):
    """Probability-flow ODE sampling (`vdm_tf.ode_solver`); returns (x_hat [N, H, W, C], nfe).

    The ODE runs from t = 1 to `sde.t_min` (in the time variable tau = 1 - t, so the solver
    integrates forwards); nfe is the number of score evaluations (int32 scalar).
    """
    if no_samples(num_samples):
        return tf.zeros((0, *model.image_shape)), tf.constant(0)

    def build():
        @tf.function(input_signature=[tf.TensorSpec([], tf.int32), tf.TensorSpec([2], tf.int64)])
        def run(num_samples, seed):
            shape = tf.concat([[num_samples], model.image_shape], 0)
            z_1 = model.sde.prior_sample(shape, seed)
            t_min = model.sde.t_min

            def ode(tau, z):
                # Rounding may put the last stage a spacing past the end; t < t_min is outside the
                # SDE (a VP marginal variance would turn negative), so the flow is held at t_min there.
                t = tf.maximum(1.0 - tau, t_min)
                return -model.sde.reverse_drift(z, t, model.score(z, t), probability_flow=True)

            z, nfe = ode_solver.solve(ode, 0.0, 1.0 - t_min, z_1, rtol, atol)
            return denoised_mean(model, z, t_min), nfe

        return run

    run = compiled(model, ("ode", float(rtol), float(atol)), build)
    return run(tf.cast(num_samples, tf.int32), seeding.as_seed(seed))


def sample(model, num_samples, sampler="pc", num_steps=500, seed=0, **options):
    """uint8 images [num_samples, H, W, C] from one of `SAMPLERS`.

    Args:
        model: has `.sde`, `.score(z, t)` and `.image_shape` (a `vdm_tf.VDM`, ...).
        num_samples: how many images.
        sampler: `"pc"`, `"ancestral"` or `"ode"`.
        num_steps: steps of the `"pc"` / `"ancestral"` samplers (the ODE solver is adaptive).
        seed: int or shape-[2] seed.
        **options: `predictor`, `corrector`, `snr`, `corrector_steps` for `"pc"` (an unspecified
            predictor or corrector is the SDE's default, `PC_DEFAULTS`); `rtol`, `atol` for `"ode"`.
    """
    check_choice("sampler", sampler, SAMPLERS)
    if sampler == "ode":
        x_hat, _ = ode_sample_latents(model, num_samples, seed=seed, **options)
    else:
        if sampler == "ancestral":
            options = {**options, "predictor": "ancestral", "corrector": "none"}
        x_hat = pc_sample_latents(model, num_samples, num_steps=num_steps, seed=seed, **options)
    return images.decode(x_hat)
