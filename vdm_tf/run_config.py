"""The `Config` of a training run and its `config.json`, without TensorFlow.

A command line reads, builds and checks the configuration of a run (flags, presets and the
`config.json` of a run directory) before it starts TensorFlow, so a mistake costs a fraction of
a second. `vdm_tf.runs` builds the model a `Config` describes and re-exports these names.

Every check a `Config` makes is in `Config.__post_init__`: field types (`n_layers` an int,
`fourier_exponents` a tuple of integers), choices (`sde`, `schedule`, ...), ranges, finite
numbers, fields that exclude each other and the data set's name and shape (`vdm_tf.dataset_table`).
"""

import dataclasses
import json
import math
import os
import re
import typing

from vdm_tf import dataset_table, files


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
    # The decoder p(x | z_0) puts its mass on the data set's pixel values (`DatasetInfo.pixel_values`,
    # e.g. the digits' 17) instead of all 256, keeping a floor for the others (vdm_tf.images).
    decoder_alphabet: bool = False
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
    # bfloat16: the denoiser's trunk computes in bfloat16 (Keras "mixed_bfloat16" policy; weights,
    # schedule, z_t, Fourier features and the loss stay float32). For TPUs and bf16 GPUs.
    mixed_precision: str = "float32"  # float32 | bfloat16
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

    def __post_init__(self):
        """Rejects a value no run can use, with a message naming the field and what it takes.

        So a bad flag of the trainer (`--batch_size=0`, `--dataset=foo`) or a damaged
        `config.json` fails before any work. Integers are accepted for float fields (and stored
        as floats), lists for tuple fields.
        """
        _check_types(self)
        info = dataset_table.info(self.dataset)  # an unknown name raises, listing the known ones
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"Unknown {name} {getattr(self, name)!r}; expected {_one_of(choices)}.")
        for name, lowest in _AT_LEAST.items():
            if getattr(self, name) < lowest:
                raise ValueError(f"{name} must be >= {lowest}; got {getattr(self, name)}.")
        for name, highest in AT_MOST.items():
            if getattr(self, name) > highest:
                raise ValueError(f"{name} must be <= {highest} (beyond any published model); got {getattr(self, name)}")
        for name, low, high in (("dropout", 0.0, 1.0), ("ema_momentum", 0.0, 1.0)):
            if not low <= getattr(self, name) < high:
                raise ValueError(f"{name} must be in [{low}, {high}); got {getattr(self, name)}.")
        if not 0.0 <= self.final_learning_rate_fraction <= 1.0:
            raise ValueError(f"final_learning_rate_fraction must be in [0, 1]; got {self.final_learning_rate_fraction}")
        for name in ("learning_rate", "weight_decay", "clip_norm", "cross_entropy_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}.")
        for low, high in (("gamma_min", "gamma_max"), ("beta_min", "beta_max"), ("sigma_min", "sigma_max")):
            if not getattr(self, low) < getattr(self, high):
                raise ValueError(f"{low} must be below {high}; got {getattr(self, low)} and {getattr(self, high)}.")
        # Fields that exclude each other (build_model relies on these checks).
        if self.model == "cdm" and (self.sde != "vdm" or self.multiscale_levels):
            raise ValueError("A CDM uses its own noise levels: set sde=vdm and multiscale_levels=0.")
        if self.model == "cdm" and self.mixed_precision != "float32":
            raise ValueError("mixed_precision=bfloat16 applies to the ScoreUNet denoiser: a CDM runs in float32.")
        if self.multiscale_levels:
            if self.timesteps or self.sde != "vdm":
                raise ValueError("Multi-scale diffusion is a continuous-time VDM: set timesteps=0 and sde=vdm.")
            check_haar_levels(info.image_shape, self.multiscale_levels)
            if self.multiscale_end_times and len(self.multiscale_end_times) != self.multiscale_levels:
                raise ValueError(
                    f"multiscale_end_times needs one time per level ({self.multiscale_levels}); "
                    f"got {self.multiscale_end_times}."
                )


# Config.mixed_precision -> the Keras dtype policy of the denoiser (`networks.ScoreUNet`).
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
_CHOICES = {
    "sde": ("vdm", "vp", "subvp", "ve"),
    "schedule": ("fixed_linear", "learned_linear", "learned_monotonic"),
    "model": ("vdm", "cdm"),
    "optimizer": ("adamw", "sgd"),
    "mixed_precision": tuple(DTYPE_POLICIES),
}
_AT_LEAST = dict(
    n_layers=1,
    n_embd=1,
    timesteps=0,
    num_levels=1,
    head_channels=0,
    multiscale_levels=0,
    batch_size=1,
    train_steps=0,
    warmup_steps=0,
    steps_per_execution=1,
    checkpoint_every=1,
    keep_checkpoints=1,
    log_every=1,
    sample_every=1,
    eval_time_samples=1,
    export_time_samples=1,
    sample_steps=1,
    num_samples=1,
)
# Sizes far beyond any published model of this family (the VDM paper: 64 layers of 256 channels,
# a batch of 512): a larger value is a typo, refused at once rather than after minutes of
# building a network that cannot fit in memory.
AT_MOST = dict(
    n_layers=1024,
    n_embd=16_384,
    head_channels=65_536,
    num_levels=1_000_000,
    multiscale_levels=16,
    batch_size=1 << 20,
    steps_per_execution=1 << 20,
    eval_time_samples=1 << 16,
    export_time_samples=1 << 16,
    num_samples=1 << 20,
    sample_steps=1 << 24,
    timesteps=1 << 24,
)


def _one_of(choices):
    """("a", "b", "c") -> "a, b or c"."""
    return ", ".join(choices[:-1]) + " or " + choices[-1]


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of numbers"}


def _check_types(config):
    """Every field holds a value of its annotated type; ints become floats, lists tuples, in place."""
    for name, kind in typing.get_type_hints(Config).items():
        value = getattr(config, name)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if kind is tuple and isinstance(value, list):
            value = tuple(value)
        numbers = kind is tuple and isinstance(value, tuple)
        numbers = numbers and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        ok = numbers if kind is tuple else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
        if not ok:
            raise ValueError(f"{name} must be {_KIND_NAMES[kind]}; got {value!r}.")
        finite = (value,) if kind is float else value if kind is tuple else ()
        if not all(math.isfinite(v) for v in finite):
            raise ValueError(f"{name} must be finite; got {value!r}.")
        object.__setattr__(config, name, value)


def check_haar_levels(image_shape, levels):
    """Raises a clear error unless `levels` >= 0 Haar levels fit images of shape (H, W, C)."""
    height, width = image_shape[:2]
    factor = 2 ** max(int(levels), 0)
    if int(levels) < 0 or height % factor or width % factor:
        raise ValueError(
            f"{levels} Haar levels need levels >= 0 and an image height and width divisible by 2^levels = "
            f"{factor}; got images of shape {tuple(image_shape)}."
        )


def config_path(model_dir):
    return os.path.join(model_dir, "config.json")


def checkpoint_dir(model_dir):
    return os.path.join(model_dir, "checkpoints")


def latest_checkpoint(model_dir):
    """The path of the run's latest checkpoint (`ckpt-N`), or None: `tf.train.latest_checkpoint`.

    For a local run directory it reads the `checkpoint` state file itself, without TensorFlow,
    and requires the checkpoint's `.index` file.
    """
    directory = checkpoint_dir(model_dir)
    if is_remote(directory):
        import tensorflow as tf

        return tf.train.latest_checkpoint(directory)
    try:
        with open(os.path.join(directory, "checkpoint"), encoding="utf-8", errors="replace") as f:
            state = f.read()
    except OSError:
        return None
    match = re.search(r'^model_checkpoint_path: "(.*)"$', state, re.MULTILINE)
    if match is None:
        return None
    path = os.path.join(directory, match.group(1))
    return path if os.path.exists(path + ".index") else None


def is_remote(path):
    """A path with a scheme (gs://...): read and written through `tf.io.gfile`."""
    return "://" in os.fspath(path)


def _gfile():
    import tensorflow as tf  # only for remote paths, after the command line's local checks

    return tf.io.gfile


def saved_config(model_dir):
    """The `Config` saved in a run directory (`config.json`), or None if there is none.

    Raises:
        ValueError: the file is not UTF-8 JSON, not an object, has fields this version does
            not know, or a value `Config` refuses; the message names the file.
        OSError: the file cannot be read (a directory, a permission).
    """
    path = config_path(model_dir)
    if is_remote(path):
        if not _gfile().exists(path):
            return None
        with _gfile().GFile(path, "rb") as f:
            data = f.read()
    else:
        if not os.path.lexists(path):
            return None
        with open(path, "rb") as f:
            data = f.read()
    try:
        fields = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file; expected the JSON object a training run writes.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error}); expected the JSON object a training run writes.") from None
    if not isinstance(fields, dict):
        raise ValueError(f"{path}: expected a JSON object of Config fields; got a {type(fields).__name__}.")
    unknown = sorted(set(fields) - {field.name for field in dataclasses.fields(Config)})
    if unknown:
        raise ValueError(f"{path}: unknown fields {', '.join(unknown)} (written by a newer vdm_tf?)")
    try:
        return Config(**fields)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def save_config(model_dir, config):
    """Writes `config` as the run directory's `config.json` (creating the directory), whole or not at all."""
    data = (json.dumps(dataclasses.asdict(config), indent=2) + "\n").encode("utf-8")
    path = config_path(model_dir)
    if is_remote(path):  # an object store writes an object whole or not at all by itself
        _gfile().makedirs(model_dir)
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    files.write_bytes(path, data)
