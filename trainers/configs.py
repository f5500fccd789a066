"""Training configurations: one dataclass defines every field, presets fill them per data set.

On the command line, `--config=PRESET` picks a preset and `--config.FIELD=VALUE` overrides one
field (one flag is defined per field, from the dataclass, so there is one place to add a field).

This module imports no TensorFlow: the command line checks a configuration before TensorFlow
starts. The builders (`build_model`, `build_optimizer`, ...) are `vdm_tf.runs`'s, loaded on
first use.
"""

import dataclasses
import importlib

# The configuration dataclass and the model / optimiser it builds live in the library
# (vdm_tf.run_config, vdm_tf.runs), so that `vdm_tf.load` reads run directories without importing trainers/.
from vdm_tf.run_config import (  # noqa: F401  (re-exported for the trainer's modules)
    Config,
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
    # Small enough to train on a 2-core CPU in about four minutes (`make demo`). The digits
    # take only 17 of the 256 values (0, 16, 32, ...: 0.125 apart in [-1, 1]), so the Fourier
    # features use the periods of that grid, 2^4 pi and 2^3 pi, instead of the one- and two-bin
    # periods (exponents 8 and 7) that suit 8-bit photographs: 1.98 bpd instead of 4.4 after
    # the same 1200 steps. A short run is under-fitted (train bpd = test bpd), so: no dropout,
    # a high learning rate (8e-3; at 400 steps 2e-3 / 4e-3 / 8e-3 give train bpd 2.58 / 2.40 /
    # 2.30) and a short EMA (0.98: 0.995 averages in the weights of the steep part of the curve,
    # 3.13 test bpd at 400 steps against 2.58); no sample grid during training. 1.92 test bpd
    # after 1200 steps (2.04 before). XLA is off: on 2 cores its compilation outlasts the run.
    # The decoder knows the digits' 17 values (`decoder_alphabet`, as the classical peers do),
    # so z_0 may be far noisier: gamma_min -7.5 instead of -13.3 removes the low-noise end of
    # the diffusion, where the model spent about 0.45 bpd. 1500 steps: 1.765 +- 0.017 test bpd
    # (gamma_min -8.5: 1.780, -6.5: 1.766).
    "digits": Config(
        dataset="digits",
        decoder_alphabet=True,
        gamma_min=-7.5,
        n_layers=2,
        n_embd=64,
        dropout=0.0,
        fourier_exponents=(3, 4),
        batch_size=64,
        train_steps=1500,
        learning_rate=8e-3,
        warmup_steps=100,
        final_learning_rate_fraction=0.05,
        ema_momentum=0.98,
        jit_compile=False,
        checkpoint_every=200,
        log_every=50,
        sample_every=100_000,
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
# Digits: the details end at t = 0.75, not 0.5 (1500 steps: 1.82 test bpd against 1.85; 1.77 uniform).
PRESETS["digits_multiscale"] = dataclasses.replace(PRESETS["digits"], multiscale_levels=1, multiscale_end_times=(0.75,))
PRESETS["cifar10_multiscale"] = dataclasses.replace(PRESETS["cifar10"], multiscale_levels=2)
PRESETS["imagenet64_multiscale"] = dataclasses.replace(PRESETS["imagenet64"], multiscale_levels=3)
# Classification Diffusion Models, Yadin et al. 2024. Digits: a CPU-sized run of the paper's
# recipe (T = 1000, cross-entropy weight 0.001, uniform dequantisation, gamma_min -13.3 so that
# level 1 overlaps the dequantised data) with the digits preset's optimiser (lr 8e-3, EMA 0.98:
# 4.08 one-step bpd at 600 steps against 4.13 with lr 2e-3, EMA 0.995; T = 100: 4.82; weight 0.1:
# 4.71). XLA off: its nested-gradient step took 4.7 s of CPU against 0.14 s without. 3000 steps
# (7-11 min on a shared 2-core CPU): 2.22 one-step test bpd, bench/results/cdm.json, once GroupNorm
# has exact second derivatives (4.73 without). Sampling with T steps stays on the levels.
# gamma_max 10, the paper's last level (DDPM betas 1e-4 .. 0.02: alpha_bar_T = 4e-5), not 5: the
# classifier's denoiser is poor at its top few levels (the cumulative-sum head spreads the big
# last log ratio, level T against pure noise, over the rows below it; at level T its input
# gradient is 1/3.4 of the best-fitting one). Its excess MSE scales with alpha_T^2: with gamma_max 5 it
# made the eps-MSE at gamma 5 1.70x the VDM's (1.06-1.21x for gamma -6 .. 4.9; 2.18 bpd), with 10
# it is 1.01x (1.04-1.22x below; 2.22 bpd), and 1.5e-5 above the linear denoiser's at gamma 10.
# CIFAR-10: the paper's T = 1000, cross-entropy weight 0.001 and last level.
PRESETS["digits_cdm"] = dataclasses.replace(
    PRESETS["digits"],
    model="cdm",
    n_layers=1,
    n_embd=32,
    head_channels=256,
    dropout=0.0,
    train_steps=3000,
    jit_compile=False,
    sample_steps=1000,
    num_levels=1000,
    decoder_alphabet=False,
    gamma_min=-13.3,
    gamma_max=10.0,
)
PRESETS["cifar10_cdm"] = dataclasses.replace(
    PRESETS["cifar10"],
    model="cdm",
    head_channels=512,
    warmup_steps=5000,
    sample_steps=1000,
    num_levels=1000,
    gamma_max=10.0,
)
# The default RGB model of `python -m vdm_tf.compression` (vdm_tf/models/photos.keras): 32x32
# patches of scikit-image's photographs, sized to train in about 20 minutes on a shared 2-core
# CPU (README, "Lossless compression"). Pixels take all 256 values: Fourier exponents 7 and 8.
PRESETS["photos"] = Config(
    dataset="photos",
    n_layers=2,
    n_embd=32,
    dropout=0.0,
    batch_size=32,
    train_steps=700,
    learning_rate=2e-3,
    warmup_steps=50,
    final_learning_rate_fraction=0.05,
    ema_momentum=0.99,
    jit_compile=False,
    checkpoint_every=100,
    log_every=50,
    sample_every=100_000,
    eval_time_samples=4,
    sample_steps=100,
    num_samples=16,
)
# The default grey model of `python -m vdm_tf.compression` (vdm_tf/models/photos_grey.keras): the
# photos preset's network on the luminance of the same patches (data set photos_grey); 1000 steps
# (0.5-1.3 s each) took 20 minutes of a shared 2-core CPU, nice -n 19.
PRESETS["photos_grey"] = dataclasses.replace(PRESETS["photos"], dataset="photos_grey", train_steps=1000)
