"""Run directories and the configurations that describe their models.

A *run directory* is what `python -m trainers.main --model_dir=DIR` writes (and
`python -m vdm_tf.convert --model_dir=DIR` too):

    config.json      the `Config` of the run, by section: model, schedule, network, optimizer,
                     data, trainer (older runs' flat form also loads: `vdm_tf.run_config`)
    checkpoints/     model, optimizer (with the EMA weights) and step, `tf.train.Checkpoint`

This module is the library's side of that format: the `Config` dataclass (defined, with the
reading and writing of `config.json`, in the TensorFlow-free `vdm_tf.run_config`), the model and
optimiser a configuration builds, and `load(path)` (`vdm_tf.load`), which gives back the trained
model of a run directory (EMA weights) or of a `.keras` file. The trainer (`trainers/`) adds
presets, flags and the training loop on top; the library imports nothing from it.
"""

import contextlib
import math
import os

import keras
import tensorflow as tf

from vdm_tf import augmentation as augmentation_lib
from vdm_tf import cdm, multiscale, networks, optimizers, schedules, score_model, sde
from vdm_tf.dataset_table import info as dataset_info
from vdm_tf.models import VDM, DiffusionModel, mulan
from vdm_tf.run_config import (  # noqa: F401  (the configuration side of a run directory, TensorFlow-free)
    DTYPE_POLICIES,
    Config,
    DataConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainerConfig,
    checkpoint_dir,
    config_path,
    save_config,
    saved_config,
)


def build_model(config):
    """The model a configuration describes.

    A `vdm_tf.VDM` (trained the i-DODE way with `model.parameterization`, `time_sampling`,
    `flow_matching_weight`); a `vdm_tf.score_model.ScoreSDEModel` when `schedule.sde` names a fixed SDE;
    a `multiscale.MultiScaleVDM` when `model.multiscale_levels` > 0; a `cdm.CDM` for
    `model.kind=cdm`; a `vdm_tf.MuLAN` for `model.kind=mulan` (`build_mulan`) (`Config` has
    refused the combinations that exclude each other).
    `network.mixed_precision` sets the dtype policy of the ScoreUNet denoisers
    (`DTYPE_POLICIES`), which their saved configuration keeps; the model around them stays float32.
    """
    m, net, seed = config.model, config.network, config.trainer.seed
    info = dataset_info(config.data.dataset)
    image_shape = info.image_shape
    augmentation = augmentation_lib.Augmentation(channel_swaps=image_shape[-1] == 3) if m.augment else None
    process = build_sde(config)
    gamma_min, gamma_max = (
        score_model.gamma_range(process) if process else (config.schedule.gamma_min, config.schedule.gamma_max)
    )

    def network():
        return score_unet(net, gamma_min, gamma_max, augmentation.conditioning_dim if augmentation else 0)

    pixel_values = info.pixel_values if m.decoder_alphabet else None
    if m.kind == "cdm":
        classifier = networks.NoiseLevelClassifier(
            m.num_levels,
            net.n_layers,
            net.n_embd,
            net.fourier_features,
            net.fourier_exponents,
            net.attention,
            net.dropout,
            net.head_channels or None,
        )
        schedule = schedules.FixedLinear(config.schedule.gamma_min, config.schedule.gamma_max)
        return cdm.CDM(classifier, schedule, image_shape, m.num_levels, m.cross_entropy_weight, seed=seed)
    if m.multiscale_levels:
        stages = m.multiscale_levels + 1
        return multiscale.MultiScaleVDM(
            [network() for _ in range(stages)] if m.multiscale_stage_networks else network(),
            build_schedule(config),
            image_shape,
            levels=m.multiscale_levels,
            end_times=m.multiscale_end_times or None,
            seed=seed,
            augmentation=augmentation,
            pixel_values=pixel_values,
        )
    if m.kind == "mulan":
        return build_mulan(config, image_shape, pixel_values)
    common = dict(timesteps=m.timesteps, seed=seed, augmentation=augmentation, pixel_values=pixel_values)
    if process:
        return score_model.ScoreSDEModel(network(), process, image_shape, **common)
    idode = dict(
        parameterization=m.parameterization, time_sampling=m.time_sampling, flow_matching_weight=m.flow_matching_weight
    )
    return VDM(network(), build_schedule(config), image_shape, **common, **idode)


def score_unet(net, gamma_min, gamma_max, conditioning_dim=0):
    """The ScoreUNet of a configuration's network section (`net`), for gammas in [gamma_min, gamma_max]."""
    return networks.ScoreUNet(
        n_layers=net.n_layers,
        n_embd=net.n_embd,
        fourier_features=net.fourier_features,
        fourier_exponents=net.fourier_exponents,
        attention=net.attention,
        dropout=net.dropout,
        gamma_min=gamma_min,
        gamma_max=gamma_max,
        conditioning_dim=conditioning_dim,
        dtype=DTYPE_POLICIES[net.mixed_precision],
    )


def build_mulan(config, image_shape, pixel_values):
    """A `vdm_tf.MuLAN` (`model.kind=mulan`): the network section's ScoreUNet conditioned on the latent,
    an encoder of the network's width and dropout with `model.encoder_layers` blocks, the per-pixel
    schedule on [schedule.gamma_min, schedule.gamma_max]."""
    m, net, s = config.model, config.network, config.schedule
    denoiser = score_unet(net, s.gamma_min, s.gamma_max, conditioning_dim=m.latent_size)
    encoder = mulan.LatentEncoder(
        latent_size=m.latent_size,
        n_layers=m.encoder_layers,
        n_embd=net.n_embd,
        fourier_features=net.fourier_features,
        fourier_exponents=net.fourier_exponents,
        attention=net.attention,
        dropout=net.dropout,
    )
    schedule = mulan.PolynomialSchedule(
        math.prod(image_shape), s.gamma_min, s.gamma_max, n_features=m.schedule_features or None
    )
    return mulan.MuLAN(
        denoiser,
        schedule,
        encoder,
        image_shape,
        latent_k=m.latent_k,
        parameterization=m.parameterization,
        seed=config.trainer.seed,
        pixel_values=pixel_values,
    )


def build_sde(config):
    """The fixed SDE of a score model (`--config.sde=vp|subvp|ve`), or None for a VDM."""
    s = config.schedule
    parameters = {
        "vp": dict(beta_min=s.beta_min, beta_max=s.beta_max),
        "subvp": dict(beta_min=s.beta_min, beta_max=s.beta_max),
        "ve": dict(sigma_min=s.sigma_min, sigma_max=s.sigma_max),
    }
    return None if s.sde == "vdm" else sde.from_config(s.sde, parameters[s.sde])


def build_schedule(config):
    """The VDM noise schedule of `config.schedule` (its `kind`, gamma range and objective)."""
    s = config.schedule
    if s.kind == "fixed_linear":
        return schedules.FixedLinear(s.gamma_min, s.gamma_max)
    if s.kind == "idode_vp":
        return schedules.VariancePreserving(s.gamma_min, s.gamma_max)
    if s.kind == "idode_sp":
        return schedules.StraightPath(s.gamma_min, s.gamma_max)
    if s.kind == "learned_linear":
        return schedules.LearnedLinear(s.gamma_min, s.gamma_max)
    return schedules.LearnedMonotonic(s.gamma_min, s.gamma_max, minimize_variance=s.minimize_variance)


def build_optimizer(config, model):
    """AdamW (or SGD) with linear warm-up, optional cosine decay, optional EMA and clipping.

    Weight decay applies to the kernels only: not to biases, normalisation scales and offsets,
    or the schedule's parameters (VDM's decay mask). The cosine decays over the steps after the
    warm-up up to `trainer.train_steps`.
    """
    o = config.optimizer
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(config.trainer.train_steps - o.warmup_steps, 1),
        alpha=o.final_learning_rate_fraction,
        warmup_target=o.learning_rate,
        warmup_steps=o.warmup_steps,
    )
    common = dict(
        learning_rate=learning_rate,
        global_clipnorm=o.clip_norm or None,
        use_ema=o.ema_momentum > 0,
        ema_momentum=o.ema_momentum or 0.99,
    )
    if o.kind == "sgd":
        return keras.optimizers.SGD(**common)
    optimizer = optimizers.AdamW(  # Keras's AdamW in fused kernels: a smaller graph, a faster first step
        weight_decay=o.weight_decay, beta_1=o.adam_beta1, beta_2=o.adam_beta2, **common
    )
    schedule_ids = {id(v) for v in model.schedule.variables}
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) <= 1 or id(v) in schedule_ids]
    )
    return optimizer


# --------------------------------------------------------------------------------------------
# Reading and writing run directories.


def compiled_model(config, seed=None, **compile_kwargs):
    """The model of `config`, compiled with its optimiser and `jit_compile`, the optimiser's variables built.

    Building the optimiser creates its slots and EMA copies, so that a checkpoint of
    `tf.train.Checkpoint(model=model, optimizer=model.optimizer)` restores into it.

    Args:
        config: a `Config`.
        seed: if given, Python, NumPy and TensorFlow are seeded with it first
            (`keras.utils.set_random_seed`), so that the same seed builds the same initial
            weights; trainers pass `config.trainer.seed`. By default the global random state is left alone.
        **compile_kwargs: further arguments of `model.compile`, e.g. `steps_per_execution`.

    Example:
    >>> model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
    >>> model.fit(vdm_tf.datasets.load(config.data.dataset, "train", config.data.batch_size), steps_per_epoch=100)
    """
    if seed is not None:
        keras.utils.set_random_seed(seed)
    model = build_model(config)
    model.compile(optimizer=build_optimizer(config, model), jit_compile=config.trainer.jit_compile, **compile_kwargs)
    model.optimizer.build(model.trainable_variables)
    return model


@contextlib.contextmanager
def ema_weights(model):
    """Temporarily puts the optimizer's EMA weights into `model` (no-op without EMA).

    Example:
    >>> with vdm_tf.runs.ema_weights(model):
    ...     bpd = model.elbo(test_images)
    """
    optimizer, variables = model.optimizer, model.trainable_variables
    if not optimizer.use_ema:
        yield
        return
    raw = [tf.identity(v.value) for v in variables]
    optimizer.finalize_variable_values(variables)
    try:
        yield
    finally:
        for variable, value in zip(variables, raw):
            variable.assign(value)


def model_checkpoint(model):
    """The `tf.train.Checkpoint` of a run directory: the model and its optimiser (EMA included)."""
    return tf.train.Checkpoint(model=model, optimizer=model.optimizer)


def restore_for_inference(model_dir, config=None):
    """The trained model of a run directory, with its EMA weights (for eval, sample, export).

    Args:
        model_dir: a run directory (`config.json`, `checkpoints/`).
        config: its `Config`; by default the one saved in `config.json`.
    """
    config = config or saved_config(model_dir)
    if config is None:
        raise FileNotFoundError(f"{model_dir} is not a run directory: it has no config.json.")
    latest = tf.train.latest_checkpoint(checkpoint_dir(model_dir))
    if latest is None:
        raise FileNotFoundError(f"No checkpoint in {checkpoint_dir(model_dir)}; train first.")
    model = compiled_model(config)
    status = model_checkpoint(model).restore(latest)
    status.assert_existing_objects_matched()
    status.expect_partial()  # the trainer's checkpoints also hold its metrics window, of no use here
    if model.optimizer.use_ema:
        model.optimizer.finalize_variable_values(model.trainable_variables)
    return model


def save_run(model_dir, config, model):
    """Writes `model`'s weights as a run directory that `load` and `trainers.main` read.

    The weights become both the raw and the EMA weights of a fresh optimiser at step 0, so a
    training run started on the directory continues from them. Used by `vdm_tf.convert`.

    Args:
        model_dir: the directory to write (`config.json`, `checkpoints/ckpt-0`); must not hold
            a run already.
        config: the `Config` that builds a model of `model`'s architecture.
        model: a built model whose weights to save.
    """
    if os.path.exists(config_path(model_dir)):
        raise FileExistsError(f"{model_dir} already holds a run (config.json); choose a new directory.")
    target = compiled_model(config)
    if len(target.weights) != len(model.weights):
        raise ValueError(f"The configuration builds {len(target.weights)} weights; the model has {len(model.weights)}.")
    for destination, source in zip(target.weights, model.weights):
        if tuple(destination.shape) != tuple(source.shape):
            raise ValueError(f"{destination.path}: the configuration builds {destination.shape}; got {source.shape}.")
        destination.assign(source)
    optimizer = target.optimizer
    if optimizer.use_ema:
        for variable in target.trainable_variables:
            optimizer._model_variables_moving_average[optimizer._get_variable_index(variable)].assign(variable)
    save_config(model_dir, config)
    tf.train.CheckpointManager(model_checkpoint(target), checkpoint_dir(model_dir), max_to_keep=None).save(
        checkpoint_number=0
    )


def load(path):
    """A trained model from a `.keras` file (`model.save`) or a run directory (EMA weights).

    Example:
        model = vdm_tf.load("runs/demo")
        model.elbo(x_uint8, seed=0)["bpd"]
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.exists(config_path(path)):
            raise ValueError(f"{path} is not a run directory: it has no config.json.")
        return restore_for_inference(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        model = keras.saving.load_model(path, compile=False)
        if not isinstance(model, DiffusionModel):
            raise ValueError(f"{path} holds a {type(model).__name__}, not a vdm_tf model.")
        return model
    raise ValueError(
        f"expected a .keras file written by model.save or a run directory (config.json, checkpoints/); got {path!r}."
    )
