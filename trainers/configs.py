"""Training configurations: one dataclass defines every field, presets fill them per data set.

On the command line, `--config=PRESET` picks a preset and `--config.FIELD=VALUE` overrides one
field (one flag is defined per field, from the dataclass, so there is one place to add a field).
"""

import dataclasses
import json
import os

import keras

import vdm_tf


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs to know.

    Fields are grouped: data, denoiser (`vdm_tf.networks.ScoreUNet`), schedule and loss,
    optimisation, evaluation and sampling.
    """

    dataset: str = "digits"
    # Denoiser.
    n_layers: int = 4
    n_embd: int = 64
    dropout: float = 0.1
    fourier_features: bool = True
    fourier_exponents: tuple = (7, 8)
    attention: bool = False
    # Schedule and loss. `sde=vdm` trains `schedule` (a VDM); vp | subvp | ve train a score model
    # of that fixed SDE by likelihood-weighted denoising score matching (vdm_tf.score_model),
    # which replaces schedule, gamma_min and gamma_max by the SDE's.
    sde: str = "vdm"
    beta_min: float = 0.1  # vp, subvp (Song et al.)
    beta_max: float = 20.0
    sigma_min: float = 0.01  # ve
    sigma_max: float = 50.0  # ve; Song et al.: about the largest distance between two training images
    schedule: str = "learned_monotonic"  # fixed_linear | learned_linear | learned_monotonic
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    minimize_variance: bool = True
    timesteps: int = 0  # 0: continuous-time VLB
    # Classification Diffusion Model (vdm_tf.cdm): `model=cdm` trains a noise-level classifier
    # (NoiseLevelClassifier, the network fields above) on num_levels + 2 levels of the schedule
    # FixedLinear(gamma_min, gamma_max); its eval reports the one-step bpd.
    model: str = "vdm"  # vdm | cdm
    num_levels: int = 1000
    cross_entropy_weight: float = 1e-3
    head_channels: int = 0  # 0: 2 * n_embd
    # Multi-scale diffusion (vdm_tf.multiscale): L Haar levels, detail group d_k reaching noise at
    # end time t_k (() = stages of equal length), one shared denoiser or one per stage.
    multiscale_levels: int = 0  # 0: a uniform VDM
    multiscale_end_times: tuple = ()
    multiscale_stage_networks: bool = False
    augment: bool = False  # flips, rotations (and channel swaps for RGB), denoiser conditioned on them
    # Optimisation (VDM: AdamW, b1 0.9, b2 0.99, weight decay 0.01, EMA 0.9999).
    optimizer: str = "adamw"  # or "sgd": same schedule, EMA and clipping; scale-sensitive (tests use it)
    batch_size: int = 128
    train_steps: int = 10_000
    learning_rate: float = 2e-4
    warmup_steps: int = 100
    final_learning_rate_fraction: float = 1.0  # < 1: cosine decay to this fraction of the rate
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    ema_momentum: float = 0.9999  # 0: no EMA
    clip_norm: float = 0.0  # 0: no gradient clipping
    steps_per_execution: int = 1  # train steps per call into the compiled step function
    jit_compile: bool = True  # XLA; on 2-core CPUs the train step is faster without it
    seed: int = 0
    # Checkpoints and monitoring (intervals in steps; rounded up to steps_per_execution).
    checkpoint_every: int = 1000
    keep_checkpoints: int = 3
    log_every: int = 100  # TensorBoard scalars and metrics.jsonl
    sample_every: int = 10_000  # sample grid and SNR curve in TensorBoard
    # Evaluation and sampling.
    eval_time_samples: int = 8
    export_time_samples: int = 8  # antithetic time samples per image in the exported `likelihood`
    sample_steps: int = 256
    num_samples: int = 64


PRESETS = {
    # Small enough to train on a 2-core CPU in about five minutes (`make demo`). The digits
    # take only 17 of the 256 values (0, 16, 32, ...: 0.125 apart in [-1, 1]), so the Fourier
    # features use the periods of that grid, 2^4 pi and 2^3 pi, instead of the one- and two-bin
    # periods (exponents 8 and 7) that suit 8-bit photographs: 1.98 bpd instead of 4.4 after
    # the same 1200 steps.
    "digits": Config(
        dataset="digits",
        n_layers=2,
        n_embd=64,
        dropout=0.1,
        fourier_exponents=(3, 4),
        batch_size=64,
        train_steps=1200,
        learning_rate=2e-3,
        warmup_steps=100,
        final_learning_rate_fraction=0.05,
        ema_momentum=0.995,
        jit_compile=False,
        checkpoint_every=200,
        log_every=50,
        sample_every=600,
    ),
    # No paper setting: a mid-size network; MNIST pixels take all 256 values.
    "mnist": Config(
        dataset="mnist",
        n_layers=8,
        n_embd=64,
        dropout=0.1,
        batch_size=128,
        train_steps=200_000,
        learning_rate=5e-4,
        warmup_steps=1000,
        ema_momentum=0.9999,
    ),
    # VDM paper, CIFAR-10 (configs/cifar10.py of google-research/vdm).
    "cifar10": Config(
        dataset="cifar10",
        n_layers=32,
        n_embd=128,
        dropout=0.1,
        batch_size=128,
        train_steps=10_000_000,
        learning_rate=2e-4,
        warmup_steps=100,
        ema_momentum=0.9999,
    ),
    # VDM paper, downsampled ImageNet (section 6, appendix B): 256 channels, no dropout.
    "imagenet32": Config(
        dataset="imagenet32",
        n_layers=32,
        n_embd=256,
        dropout=0.0,
        batch_size=512,
        train_steps=2_000_000,
        learning_rate=2e-4,
        warmup_steps=100,
        ema_momentum=0.9999,
    ),
    "imagenet64": Config(
        dataset="imagenet64",
        n_layers=64,
        n_embd=256,
        dropout=0.0,
        batch_size=512,
        train_steps=2_000_000,
        learning_rate=2e-4,
        warmup_steps=100,
        ema_momentum=0.9999,
    ),
}
# Non-uniform (multi-scale) diffusion, Batzolis et al. 2022: the coarsest stage runs at 8x8
# (digits: 4x4), so most sampling steps are cheap.
PRESETS["digits_multiscale"] = dataclasses.replace(PRESETS["digits"], multiscale_levels=1)
PRESETS["cifar10_multiscale"] = dataclasses.replace(PRESETS["cifar10"], multiscale_levels=2)
PRESETS["imagenet64_multiscale"] = dataclasses.replace(PRESETS["imagenet64"], multiscale_levels=3)
# Classification Diffusion Models, Yadin et al. 2024. Digits: a CPU-sized run (600 steps give
# 4.1 bpd one-step, bench/results/cdm.json: far from converged); sampling with T steps stays on
# the classifier's levels. CIFAR-10: the paper's T = 1000 and cross-entropy weight 0.001.
PRESETS["digits_cdm"] = dataclasses.replace(
    PRESETS["digits"], model="cdm", n_layers=1, n_embd=32, head_channels=256, dropout=0.0, train_steps=600,
    jit_compile=True, sample_steps=1000, num_levels=1000,
)
PRESETS["cifar10_cdm"] = dataclasses.replace(
    PRESETS["cifar10"], model="cdm", head_channels=512, warmup_steps=5000, sample_steps=1000, num_levels=1000
)


def config_path(model_dir):
    return os.path.join(model_dir, "config.json")


def saved_config(model_dir):
    """The `Config` saved in a run directory (`config.json`), or None."""
    if not os.path.exists(config_path(model_dir)):
        return None
    with open(config_path(model_dir)) as f:
        fields = json.load(f)
    for name in ("fourier_exponents", "multiscale_end_times"):
        if name in fields:
            fields[name] = tuple(fields[name])
    return Config(**fields)


def build_model(config):
    """The model a configuration describes.

    A `vdm_tf.VDM`; a `vdm_tf.score_model.ScoreSDEModel` when `sde` names a fixed SDE; a
    `vdm_tf.multiscale.MultiScaleVDM` when `multiscale_levels` > 0; a `vdm_tf.cdm.CDM` for `model=cdm`.
    """
    image_shape = vdm_tf.datasets.info(config.dataset).image_shape
    augmentation = vdm_tf.augmentation.Augmentation(channel_swaps=image_shape[-1] == 3) if config.augment else None
    process = build_sde(config)
    gamma_min, gamma_max = (
        vdm_tf.score_model.gamma_range(process) if process else (config.gamma_min, config.gamma_max)
    )

    def network():
        return vdm_tf.networks.ScoreUNet(
            n_layers=config.n_layers,
            n_embd=config.n_embd,
            fourier_features=config.fourier_features,
            fourier_exponents=config.fourier_exponents,
            attention=config.attention,
            dropout=config.dropout,
            gamma_min=gamma_min,
            gamma_max=gamma_max,
            conditioning_dim=augmentation.conditioning_dim if augmentation else 0,
        )

    if config.model == "cdm":
        if process or config.multiscale_levels:
            raise ValueError("A CDM uses its own noise levels: set sde=vdm and multiscale_levels=0.")
        classifier = vdm_tf.networks.NoiseLevelClassifier(
            config.num_levels, config.n_layers, config.n_embd, config.fourier_features, config.fourier_exponents,
            config.attention, config.dropout, config.head_channels or None,
        )
        schedule = vdm_tf.schedules.FixedLinear(config.gamma_min, config.gamma_max)
        return vdm_tf.cdm.CDM(
            classifier, schedule, image_shape, config.num_levels, config.cross_entropy_weight, seed=config.seed
        )
    if config.model != "vdm":
        raise ValueError(f"Unknown model {config.model!r}; expected vdm or cdm.")
    if config.multiscale_levels:
        if config.timesteps or process:
            raise ValueError("Multi-scale diffusion is a continuous-time VDM: set timesteps=0 and sde=vdm.")
        stages = config.multiscale_levels + 1
        return vdm_tf.multiscale.MultiScaleVDM(
            [network() for _ in range(stages)] if config.multiscale_stage_networks else network(),
            build_schedule(config),
            image_shape,
            levels=config.multiscale_levels,
            end_times=config.multiscale_end_times or None,
            seed=config.seed,
            augmentation=augmentation,
        )
    common = dict(timesteps=config.timesteps, seed=config.seed, augmentation=augmentation)
    if process:
        return vdm_tf.score_model.ScoreSDEModel(network(), process, image_shape, **common)
    return vdm_tf.VDM(network(), build_schedule(config), image_shape, **common)


def build_sde(config):
    """The fixed SDE of a score model (`--config.sde=vp|subvp|ve`), or None for a VDM."""
    parameters = {
        "vp": dict(beta_min=config.beta_min, beta_max=config.beta_max),
        "subvp": dict(beta_min=config.beta_min, beta_max=config.beta_max),
        "ve": dict(sigma_min=config.sigma_min, sigma_max=config.sigma_max),
    }
    if config.sde == "vdm":
        return None
    if config.sde not in parameters:
        raise ValueError(f"Unknown sde {config.sde!r}; expected vdm, vp, subvp or ve.")
    return vdm_tf.sde.from_config(config.sde, parameters[config.sde])


def build_schedule(config):
    if config.schedule == "fixed_linear":
        return vdm_tf.schedules.FixedLinear(config.gamma_min, config.gamma_max)
    if config.schedule == "learned_linear":
        return vdm_tf.schedules.LearnedLinear(config.gamma_min, config.gamma_max)
    if config.schedule == "learned_monotonic":
        return vdm_tf.schedules.LearnedMonotonic(
            config.gamma_min, config.gamma_max, minimize_variance=config.minimize_variance
        )
    raise ValueError(
        f"Unknown schedule {config.schedule!r}; expected fixed_linear, learned_linear or learned_monotonic."
    )


def build_optimizer(config, model):
    """AdamW (or SGD) with linear warm-up, optional cosine decay, optional EMA and clipping.

    Weight decay applies to the kernels only: not to biases, normalisation scales and offsets,
    or the schedule's parameters (VDM's decay mask).
    """
    learning_rate = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(config.train_steps - config.warmup_steps, 1),
        alpha=config.final_learning_rate_fraction,
        warmup_target=config.learning_rate,
        warmup_steps=config.warmup_steps,
    )
    common = dict(
        learning_rate=learning_rate,
        global_clipnorm=config.clip_norm or None,
        use_ema=config.ema_momentum > 0,
        ema_momentum=config.ema_momentum or 0.99,
    )
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(**common)
    if config.optimizer != "adamw":
        raise ValueError(f"Unknown optimizer {config.optimizer!r}; expected adamw or sgd.")
    optimizer = keras.optimizers.AdamW(
        weight_decay=config.weight_decay, beta_1=config.adam_beta1, beta_2=config.adam_beta2, **common
    )
    schedule_ids = {id(v) for v in model.schedule.variables}
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if len(v.shape) <= 1 or id(v) in schedule_ids]
    )
    return optimizer
