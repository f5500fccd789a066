"""Training configurations: the presets of `--config=PRESET`, each a sectioned `Config`.

`Config` and its sections (model, schedule, network, optimizer, data, trainer) are defined in
`vdm_tf.run_config` (the table of every field is there). On the command line, `--config=PRESET`
picks a preset and `--config.FIELD=VALUE` (a field's flat name) or `--config.SECTION.FIELD=VALUE`
overrides one field; one flag of each form is defined per field, from the dataclasses, so there is
one place to add a field.

This module imports no TensorFlow: the command line checks a configuration before TensorFlow
starts. The builders (`build_model`, `build_optimizer`, ...) are `vdm_tf.runs`'s, loaded on
first use.
"""

import importlib

# The configuration dataclasses and the model / optimiser they build live in the library
# (vdm_tf.run_config, vdm_tf.runs), so that `vdm_tf.load` reads run directories without importing trainers/.
from vdm_tf.run_config import (  # noqa: F401  (re-exported for the trainer's modules)
    Config,
    DataConfig,
    ModelConfig,
    NetworkConfig,
    OptimizerConfig,
    ScheduleConfig,
    TrainerConfig,
    config_path,
    latest_checkpoint,
    save_config,
    saved_config,
)

_BUILDERS = ("build_model", "build_optimizer", "build_schedule", "build_sde")


def __getattr__(name):
    if name in _BUILDERS:
        return getattr(importlib.import_module("vdm_tf.runs"), name)
    raise AttributeError(f"module 'trainers.configs' has no attribute {name!r}")


PRESETS = {
    # The demo (`make demo`): a VDM small enough to train on a 2-core CPU in about four minutes.
    # The digits take only 17 of the 256 pixel values, 0.125 apart in [-1, 1]: the Fourier
    # features use the periods of that grid (exponents 3 and 4, not the 7 and 8 of 8-bit
    # photographs), and the decoder puts its mass on those 17 values (`decoder_alphabet`), so
    # z_0 may be far noisier: gamma_min -7.5 leaves out the low-noise end of the diffusion,
    # where a decoder over all 256 values needs the model's effort. A short run is under-fitted
    # (train bpd = test bpd): no dropout, a high learning rate decayed to 5%, a short EMA (0.98)
    # that leaves out the weights of the steep start of the curve. XLA is off: on 2 cores its
    # compilation outlasts the run; no sample grid during training. 1.765 +- 0.017 test bpd
    # (bench/results/quality.json; README, "Digits").
    "digits": Config(
        data=DataConfig(dataset="digits", batch_size=64),
        model=ModelConfig(decoder_alphabet=True),
        schedule=ScheduleConfig(gamma_min=-7.5),
        network=NetworkConfig(n_layers=2, n_embd=64, dropout=0.0, fourier_exponents=(3, 4)),
        optimizer=OptimizerConfig(
            learning_rate=8e-3, warmup_steps=100, final_learning_rate_fraction=0.05, ema_momentum=0.98
        ),
        trainer=TrainerConfig(
            train_steps=1500, jit_compile=False, checkpoint_every=200, log_every=50, sample_every=100_000
        ),
    ),
    # No paper setting: a mid-size network; MNIST pixels take all 256 values (exponents 7 and 8).
    "mnist": Config(
        data=DataConfig(dataset="mnist", batch_size=128),
        network=NetworkConfig(n_layers=8, n_embd=64, dropout=0.1),
        optimizer=OptimizerConfig(learning_rate=5e-4, warmup_steps=1000, ema_momentum=0.9999),
        trainer=TrainerConfig(train_steps=200_000),
    ),
    # VDM paper, CIFAR-10 (configs/cifar10.py of google-research/vdm).
    "cifar10": Config(
        data=DataConfig(dataset="cifar10", batch_size=128),
        network=NetworkConfig(n_layers=32, n_embd=128, dropout=0.1),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=100, ema_momentum=0.9999),
        trainer=TrainerConfig(train_steps=10_000_000),
    ),
    # VDM paper, downsampled ImageNet (section 6, appendix B): 256 channels, no dropout.
    "imagenet32": Config(
        data=DataConfig(dataset="imagenet32", batch_size=512),
        network=NetworkConfig(n_layers=32, n_embd=256, dropout=0.0),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=100, ema_momentum=0.9999),
        trainer=TrainerConfig(train_steps=2_000_000),
    ),
    "imagenet64": Config(
        data=DataConfig(dataset="imagenet64", batch_size=512),
        network=NetworkConfig(n_layers=64, n_embd=256, dropout=0.0),
        optimizer=OptimizerConfig(learning_rate=2e-4, warmup_steps=100, ema_momentum=0.9999),
        trainer=TrainerConfig(train_steps=2_000_000),
    ),
}
# Non-uniform (multi-scale) diffusion, Batzolis et al. 2022: the coarsest stage runs at 8x8
# (digits: 4x4), so most sampling steps are cheap. Digits: the details reach noise at t = 0.75,
# which fits the digits better than stages of equal length; 1.82 test bpd against the uniform
# model's 1.77 (bench/results/quality.json).
PRESETS["digits_multiscale"] = PRESETS["digits"].replace(
    model={"multiscale_levels": 1, "multiscale_end_times": (0.75,)}
)
PRESETS["cifar10_multiscale"] = PRESETS["cifar10"].replace(model={"multiscale_levels": 2})
PRESETS["imagenet64_multiscale"] = PRESETS["imagenet64"].replace(model={"multiscale_levels": 3})
# Classification Diffusion Models, Yadin et al. 2024: the paper's recipe (T = 1000 levels,
# cross-entropy weight 0.001, uniform dequantisation, levels from gamma_min -13.3, so that level 1
# overlaps the dequantised data, to gamma_max 10, the last level of the paper's DDPM grid,
# alpha_bar_T = 4e-5). The last level matters: the classifier's denoiser is weakest at its top
# levels, and a lower gamma_max leaves that error in the likelihood. Digits: a CPU-sized network
# (1 layer of 32 channels, a 256-channel head) with the digits preset's optimiser, 3000 steps
# (7-11 minutes on a shared 2-core CPU), no decoder (the one-step likelihood has none); XLA off,
# as its nested-gradient step is far slower on a CPU. 2.22 one-step test bpd
# (bench/results/cdm.json). Sampling with T steps stays on the levels.
PRESETS["digits_cdm"] = PRESETS["digits"].replace(
    model=ModelConfig(kind="cdm", num_levels=1000),
    schedule={"gamma_min": -13.3, "gamma_max": 10.0},
    network={"n_layers": 1, "n_embd": 32, "head_channels": 256, "dropout": 0.0},
    trainer={"train_steps": 3000, "jit_compile": False, "sample_steps": 1000},
)
# CIFAR-10: the paper's T = 1000, cross-entropy weight 0.001 and last level.
PRESETS["cifar10_cdm"] = PRESETS["cifar10"].replace(
    model=ModelConfig(kind="cdm", num_levels=1000),
    schedule={"gamma_max": 10.0},
    network={"head_channels": 512},
    optimizer={"warmup_steps": 5000},
    trainer={"sample_steps": 1000},
)
# Trained the i-DODE way (Zheng et al. 2023, "Improved Techniques for Maximum Likelihood Estimation
# for Diffusion ODEs"; thu-ml/i-DODE configs/cifar10.py): the network predicts the velocity of
# i-DODE's fixed VP schedule, and the loss draws its noise levels by importance sampling
# (density proportional to alpha^2). Fine-tuning with the second-order flow-matching term is a
# second run on the same directory: --config.flow_matching_weight=0.1 and more train_steps
# (i-DODE: +200k steps on CIFAR-10). Digits: the digits preset's network, optimiser and gamma range.
_IDODE = {"parameterization": "velocity", "time_sampling": "importance"}
PRESETS["digits_idode"] = PRESETS["digits"].replace(model=_IDODE, schedule={"kind": "idode_vp"})
# CIFAR-10, the official configs/cifar10.py: VP on gamma in [-13.3, 5], velocity, importance
# sampling, 32 blocks of 128 channels, dropout 0.1, no attention, batch 128, AdamW 2e-4 (b1 0.9,
# b2 0.99, weight decay 0.01) after 100 warm-up steps, EMA 0.9999, 6M steps.
PRESETS["cifar10_idode"] = PRESETS["cifar10"].replace(
    model=_IDODE,
    schedule={"kind": "idode_vp", "gamma_min": -13.3, "gamma_max": 5.0},
    trainer={"train_steps": 6_000_000},
)
# The default RGB model of `python -m vdm_tf.compression` (vdm_tf/models/photos.keras): 32x32
# patches of scikit-image's photographs, sized to train in about 20 minutes on a shared 2-core
# CPU (README, "Lossless compression"). Pixels take all 256 values: Fourier exponents 7 and 8.
PRESETS["photos"] = Config(
    data=DataConfig(dataset="photos", batch_size=32),
    network=NetworkConfig(n_layers=2, n_embd=32, dropout=0.0),
    optimizer=OptimizerConfig(
        learning_rate=2e-3, warmup_steps=50, final_learning_rate_fraction=0.05, ema_momentum=0.99
    ),
    trainer=TrainerConfig(
        train_steps=700,
        jit_compile=False,
        checkpoint_every=100,
        log_every=50,
        sample_every=100_000,
        eval_time_samples=4,
        sample_steps=100,
        num_samples=16,
    ),
)
# The default grey model of `python -m vdm_tf.compression` (vdm_tf/models/photos_grey.keras): the
# photos preset's network on the luminance of the same patches; 1000 steps, about 20 minutes of a
# shared 2-core CPU.
PRESETS["photos_grey"] = PRESETS["photos"].replace(data={"dataset": "photos_grey"}, trainer={"train_steps": 1000})
# The photos preset trained the i-DODE way (i-DODE's VP schedule on gamma in [-13.3, 5]).
PRESETS["photos_idode"] = PRESETS["photos"].replace(model=_IDODE, schedule={"kind": "idode_vp"})
# MuLAN (Sahoo et al. 2024, "Diffusion Models With Learned Adaptive Noise"; s-sahoo/MuLAN
# ldm/configs/cifar10-conditioned.py): a per-pixel polynomial schedule with fixed ends (gamma in
# [-13.3, 5]) conditioned on a 15-of-50 latent inferred from the image by a U-Net encoder, the
# denoiser conditioned on the latent, the velocity parameterisation (vdm_type=mulan_velocity;
# model.parameterization=eps is mulan_epsilon). Digits and photos: their presets' networks and
# optimisers, an encoder of 2 blocks.
_MULAN = {"kind": "mulan", "parameterization": "velocity", "latent_size": 50, "latent_k": 15, "encoder_layers": 2}
PRESETS["digits_mulan"] = PRESETS["digits"].replace(model=_MULAN, schedule={"gamma_min": -13.3, "gamma_max": 5.0})
PRESETS["photos_mulan"] = PRESETS["photos"].replace(model=_MULAN, schedule={"gamma_min": -13.3, "gamma_max": 5.0})
# CIFAR-10, the official configuration: encoder of forward_n_layer = 4 blocks, the schedule's hidden
# width H * W * C = 3072, 32 blocks of 128 channels, dropout 0.1, Fourier features, no attention,
# batch 128, AdamW 2e-4 (b1 0.9, b2 0.99, weight decay 0.01) after 100 warm-up steps, EMA 0.9999,
# 10M steps (the cifar10 preset's network and optimiser are these).
PRESETS["cifar10_mulan"] = PRESETS["cifar10"].replace(
    model=dict(_MULAN, encoder_layers=4),
    schedule={"gamma_min": -13.3, "gamma_max": 5.0},
    trainer={"train_steps": 10_000_000},
)
