"""The `Config` of a training run and its `config.json`, without TensorFlow.

A command line reads, builds and checks the configuration of a run (flags, presets and the
`config.json` of a run directory) before it starts TensorFlow, so a mistake costs a fraction of
a second. `vdm_tf.runs` builds the model a `Config` describes and re-exports these names.

A `Config` has six sections, each a small frozen dataclass that checks its own fields (types,
choices, ranges, the order of a pair such as `gamma_min` < `gamma_max`); `Config` checks what
involves more than one section (fields that exclude each other, the data set's image shape).
Code reads a field through its section: `config.network.n_layers`, `config.model.kind`.

    section    class            fields                                        read by
    ---------  ---------------  --------------------------------------------  -----------------------
    model      ModelConfig      kind (vdm | cdm), timesteps, num_levels,       runs.build_model
                                cross_entropy_weight, multiscale_levels,
                                multiscale_end_times, multiscale_stage_networks,
                                augment, decoder_alphabet, parameterization
                                (eps | velocity), time_sampling (antithetic |
                                importance), flow_matching_weight
    schedule   ScheduleConfig   kind (fixed_linear | learned_linear |          runs.build_schedule,
                                learned_monotonic | idode_vp | idode_sp),      runs.build_sde
                                gamma_min, gamma_max,
                                minimize_variance, sde (vdm | vp | subvp | ve),
                                beta_min, beta_max, sigma_min, sigma_max
    network    NetworkConfig    n_layers, n_embd, dropout, fourier_features,   ScoreUNet,
                                fourier_exponents, attention, head_channels,   NoiseLevelClassifier
                                mixed_precision
    optimizer  OptimizerConfig  kind (adamw | sgd), learning_rate,              runs.build_optimizer
                                warmup_steps, final_learning_rate_fraction,
                                weight_decay, adam_beta1, adam_beta2,
                                ema_momentum, clip_norm
    data       DataConfig       dataset, batch_size                            datasets.load
    trainer    TrainerConfig    train_steps, steps_per_execution, jit_compile, trainers/ (and the
                                seed, checkpoint_every, keep_checkpoints,      seed of build_model,
                                log_every, sample_every, eval_every,           jit_compile of
                                eval_time_samples, export_time_samples,        compiled_model)
                                sample_steps, num_samples

The schedule section is the noise process: a VDM's schedule, or with `sde` = vp | subvp | ve
the fixed SDE of a score model, which replaces the schedule. `augment` and `decoder_alphabet`
are in the model section because the model applies them (the augmentation conditions its
denoiser, the alphabet is its decoder's); the data pipeline is the same with or without them.

Every field also has a *flat name*, the name it had before there were sections and still has on
the command line (`--config.n_layers`) and in the flat `config.json` of older run directories:
the field's own name, except that each `kind` takes its section's name (`model`, `schedule`,
`optimizer`). `FLAT_NAMES` maps them; `Config.replace` and `Config.from_json` accept them.

`config.json` holds `{"format_version": 2, "model": {...}, "schedule": {...}, ...}`; a file
without `format_version` is the flat form (version 1: every field at the top level by its flat
name), which `saved_config` still reads.
"""

import dataclasses
import json
import math
import os
import re
import typing

from vdm_tf import dataset_table, files

# Config.network.mixed_precision -> the Keras dtype policy of the denoiser (`networks.ScoreUNet`).
DTYPE_POLICIES = {"float32": "float32", "bfloat16": "mixed_bfloat16"}
FORMAT_VERSION = 2  # of config.json; 1 is the flat form, without a marker


def _field(default, *, choices=None, at_least=None, at_most=None, interval=None):
    """A section field with its checks: a value in `choices`, >= `at_least`, <= `at_most`, or in
    `interval` = (low, high, high_included).

    `at_most` bounds sizes far beyond any published model of this family (the VDM paper: 64
    layers of 256 channels, a batch of 512): a larger value is a typo, refused at once rather
    than after minutes of building a network that cannot fit in memory.
    """
    checks = dict(choices=choices, at_least=at_least, at_most=at_most, interval=interval)
    return dataclasses.field(default=default, metadata={k: v for k, v in checks.items() if v is not None})


def _one_of(choices):
    """("a", "b", "c") -> "a, b or c"."""
    return ", ".join(choices[:-1]) + " or " + choices[-1]


_KIND_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", tuple: "a list of numbers"}


def _typed(path, kind, value):
    """`value` as a field of type `kind` (ints become floats, lists tuples), or a ValueError naming `path`."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind is tuple and isinstance(value, list):
        value = tuple(value)
    numbers = kind is tuple and isinstance(value, tuple)
    numbers = numbers and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ok = numbers if kind is tuple else isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ValueError(f"{path} must be {_KIND_NAMES[kind]}; got {value!r}.")
    finite = (value,) if kind is float else value if kind is tuple else ()
    if not all(math.isfinite(v) for v in finite):
        raise ValueError(f"{path} must be finite; got {value!r}.")
    return value


class _Section:
    """What every section does: it checks its fields when it is made (`_field`'s checks, then `check`).

    Messages name the field by its path (`network.n_layers must be >= 1; got 0.`). Integers are
    accepted for float fields (and stored as floats), lists for tuple fields.
    """

    section: typing.ClassVar[str]

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            path = f"{self.section}.{field.name}"
            value = _typed(path, hints[field.name], getattr(self, field.name))
            object.__setattr__(self, field.name, value)
            rules = field.metadata
            if "choices" in rules and value not in rules["choices"]:
                raise ValueError(f"Unknown {path} {value!r}; expected {_one_of(rules['choices'])}.")
            if "at_least" in rules and value < rules["at_least"]:
                raise ValueError(f"{path} must be >= {rules['at_least']}; got {value}.")
            if "at_most" in rules and value > rules["at_most"]:
                raise ValueError(f"{path} must be <= {rules['at_most']} (beyond any published model); got {value}")
            if "interval" in rules:
                low, high, high_included = rules["interval"]
                if not (low <= value <= high if high_included else low <= value < high):
                    raise ValueError(f"{path} must be in [{low}, {high}{']' if high_included else ')'}; got {value}.")
        self.check()

    def check(self):
        """Checks between the fields of this section (none by default)."""

    def _ordered(self, low, high):
        if not getattr(self, low) < getattr(self, high):
            raise ValueError(
                f"{self.section}.{low} must be below {high}; got {getattr(self, low)} and {getattr(self, high)}."
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig(_Section):
    """Which model is trained, and its parts beyond the network and the noise process."""

    section: typing.ClassVar[str] = "model"
    # vdm: a VDM (or, with schedule.sde = vp | subvp | ve, a score model of that SDE);
    # cdm: a Classification Diffusion Model (vdm_tf.cdm), a noise-level classifier
    # (NoiseLevelClassifier, the network section) on num_levels + 2 levels of the schedule
    # FixedLinear(gamma_min, gamma_max); its eval reports the one-step bpd.
    # mulan: MuLAN (vdm_tf.models.mulan; Sahoo et al. 2024): a per-pixel polynomial schedule with
    # ends schedule.gamma_min, gamma_max conditioned on a k-hot latent inferred from the image
    # (encoder: the network section's width, encoder_layers ResNet blocks); continuous time;
    # `parameterization` eps (mulan_epsilon) or velocity (mulan_velocity).
    kind: str = _field("vdm", choices=("vdm", "cdm", "mulan"))
    timesteps: int = _field(0, at_least=0, at_most=1 << 24)  # 0: continuous-time VLB
    num_levels: int = _field(1000, at_least=1, at_most=1_000_000)  # a CDM's noise levels
    cross_entropy_weight: float = _field(1e-3, at_least=0)  # a CDM's
    # Multi-scale diffusion (vdm_tf.multiscale): L Haar levels, detail group d_k reaching noise at
    # end time t_k (() = stages of equal length), one shared denoiser or one per stage.
    multiscale_levels: int = _field(0, at_least=0, at_most=16)  # 0: a uniform VDM
    multiscale_end_times: tuple = ()
    multiscale_stage_networks: bool = False
    augment: bool = False  # flips, rotations (and channel swaps for RGB), the denoiser conditioned on them
    # The decoder p(x | z_0) puts its mass on the data set's pixel values (`DatasetInfo.pixel_values`,
    # e.g. the digits' 17) instead of all 256, keeping a floor for the others (vdm_tf.images).
    decoder_alphabet: bool = False
    # Training the i-DODE way (Zheng et al. 2023; vdm_tf.VDM): what the network predicts, eps or the
    # velocity of the schedule's path; how the loss's noise levels are drawn, antithetic times or
    # gammas importance-sampled with density proportional to alpha^2 (continuous time, velocity);
    # the weight of the second-order flow-matching term (i-DODE fine-tunes with 0.1; 0: off).
    parameterization: str = _field("eps", choices=("eps", "velocity"))
    time_sampling: str = _field("antithetic", choices=("antithetic", "importance"))
    flow_matching_weight: float = _field(0.0, at_least=0)
    # MuLAN's latent: L units of which k are on (official cifar10: 50 and 15), the encoder's ResNet
    # blocks (`forward_n_layer`), the hidden width of the schedule network (0: H * W * C, official).
    latent_size: int = _field(50, at_least=2, at_most=1 << 16)
    latent_k: int = _field(15, at_least=1, at_most=1 << 16)
    encoder_layers: int = _field(4, at_least=0, at_most=1024)
    schedule_features: int = _field(0, at_least=0, at_most=1 << 20)

    def check(self):
        if self.latent_k >= self.latent_size:
            raise ValueError(
                f"model.latent_k must be below model.latent_size ({self.latent_size}); got {self.latent_k}."
            )
        if self.multiscale_levels and self.multiscale_end_times:
            if len(self.multiscale_end_times) != self.multiscale_levels:
                raise ValueError(
                    f"model.multiscale_end_times needs one time per level ({self.multiscale_levels}); "
                    f"got {self.multiscale_end_times}."
                )
        if self.parameterization != "velocity" and (self.time_sampling == "importance" or self.flow_matching_weight):
            raise ValueError(
                "model.time_sampling=importance and model.flow_matching_weight > 0 take "
                "model.parameterization=velocity."
            )
        if self.timesteps and (self.time_sampling == "importance" or self.flow_matching_weight):
            raise ValueError(
                "model.time_sampling=importance and model.flow_matching_weight > 0 are continuous-time: "
                "set model.timesteps=0."
            )

    @property
    def idode(self):
        """Whether any of the i-DODE training options is on."""
        return self.parameterization != "eps" or self.time_sampling != "antithetic" or self.flow_matching_weight > 0


@dataclasses.dataclass(frozen=True)
class ScheduleConfig(_Section):
    """The noise process: a VDM's noise schedule gamma(t), or the fixed SDE of a score model.

    `sde=vdm` trains `kind` (a VDM); vp | subvp | ve train a score model of that fixed SDE by
    likelihood-weighted denoising score matching (vdm_tf.score_model), which replaces kind,
    gamma_min and gamma_max by the SDE's. A CDM's levels are FixedLinear(gamma_min, gamma_max).

    i-DODE's two schedules (Zheng et al. 2023), both a fixed linear gamma(t) from gamma_min to
    gamma_max: `idode_vp`, its "VP" (`schedules.VariancePreserving`: the process of fixed_linear,
    alpha^2 = sigmoid(-gamma)), and `idode_sp`, its straight path "SP" (`schedules.StraightPath`:
    the network sees z = (1 - sigma) x + sigma eps, sigma = sigmoid(gamma / 2)).
    """

    section: typing.ClassVar[str] = "schedule"
    kind: str = _field(
        "learned_monotonic", choices=("fixed_linear", "learned_linear", "learned_monotonic", "idode_vp", "idode_sp")
    )
    gamma_min: float = -13.3
    gamma_max: float = 5.0
    minimize_variance: bool = True  # the schedule trains on the variance of the loss (VDM), not the VLB
    sde: str = _field("vdm", choices=("vdm", "vp", "subvp", "ve"))
    beta_min: float = 0.1  # vp, subvp (Song et al.)
    beta_max: float = 20.0
    sigma_min: float = 0.01  # ve
    sigma_max: float = 50.0  # ve; Song et al.: about the largest distance between two training images

    def check(self):
        for low, high in (("gamma_min", "gamma_max"), ("beta_min", "beta_max"), ("sigma_min", "sigma_max")):
            self._ordered(low, high)


@dataclasses.dataclass(frozen=True)
class NetworkConfig(_Section):
    """The denoiser (`vdm_tf.networks.ScoreUNet`) or a CDM's classifier (`NoiseLevelClassifier`)."""

    section: typing.ClassVar[str] = "network"
    n_layers: int = _field(4, at_least=1, at_most=1024)
    n_embd: int = _field(64, at_least=1, at_most=16_384)
    dropout: float = _field(0.1, interval=(0.0, 1.0, False))
    fourier_features: bool = True
    fourier_exponents: tuple = (7, 8)
    attention: bool = False
    head_channels: int = _field(0, at_least=0, at_most=65_536)  # a CDM's classifier head; 0: 2 * n_embd
    # bfloat16: the denoiser's trunk computes in bfloat16 (Keras "mixed_bfloat16" policy; weights,
    # schedule, z_t, Fourier features and the loss stay float32). For TPUs and bf16 GPUs.
    mixed_precision: str = _field("float32", choices=tuple(DTYPE_POLICIES))


@dataclasses.dataclass(frozen=True)
class OptimizerConfig(_Section):
    """The optimiser (VDM: AdamW, b1 0.9, b2 0.99, weight decay 0.01, EMA 0.9999) and its learning rate.

    The rate warms up linearly over `warmup_steps`, then stays (or decays by a cosine to
    `final_learning_rate_fraction` of itself at `trainer.train_steps`).
    """

    section: typing.ClassVar[str] = "optimizer"
    kind: str = _field("adamw", choices=("adamw", "sgd"))  # sgd: same schedule, EMA and clipping; scale-sensitive
    learning_rate: float = _field(2e-4, at_least=0)
    warmup_steps: int = _field(100, at_least=0)
    final_learning_rate_fraction: float = _field(1.0, interval=(0.0, 1.0, True))  # < 1: cosine decay
    weight_decay: float = _field(0.01, at_least=0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    ema_momentum: float = _field(0.9999, interval=(0.0, 1.0, False))  # 0: no EMA
    clip_norm: float = _field(0.0, at_least=0)  # 0: no gradient clipping


@dataclasses.dataclass(frozen=True)
class DataConfig(_Section):
    """The training data: a data set of `vdm_tf.dataset_table` and the global batch size."""

    section: typing.ClassVar[str] = "data"
    dataset: str = "digits"
    batch_size: int = _field(128, at_least=1, at_most=1 << 20)

    def check(self):
        dataset_table.info(self.dataset)  # an unknown name raises, listing the known ones


@dataclasses.dataclass(frozen=True)
class TrainerConfig(_Section):
    """The training loop's own fields: its length, speed, seed, intervals and what it reports.

    Intervals are in steps, rounded up to a multiple of `steps_per_execution`. The seed sets the
    initial weights, the data order and every step's random draws.
    """

    section: typing.ClassVar[str] = "trainer"
    train_steps: int = _field(10_000, at_least=0)
    steps_per_execution: int = _field(1, at_least=1, at_most=1 << 20)  # train steps per call into the compiled step
    jit_compile: bool = True  # XLA; on 2-core CPUs the train step is faster without it
    seed: int = 0
    checkpoint_every: int = _field(1000, at_least=1)
    keep_checkpoints: int = _field(3, at_least=1)
    log_every: int = _field(100, at_least=1)  # TensorBoard scalars and metrics.jsonl
    sample_every: int = _field(10_000, at_least=1)  # sample grid and SNR curve in TensorBoard
    # Test bpd and sample quality of the EMA weights in TensorBoard and metrics.jsonl (trainers/train.py);
    # 0: never. Off by default: each one is a pass over the test split (and num_samples samples),
    # and a --mode=train run evaluates its final weights anyway.
    eval_every: int = _field(0, at_least=0)
    eval_time_samples: int = _field(8, at_least=1, at_most=1 << 16)
    export_time_samples: int = _field(8, at_least=1, at_most=1 << 16)  # per image in the exported `likelihood`
    sample_steps: int = _field(256, at_least=1, at_most=1 << 24)
    num_samples: int = _field(64, at_least=1, at_most=1 << 20)


SECTIONS = {
    cls.section: cls for cls in (ModelConfig, ScheduleConfig, NetworkConfig, OptimizerConfig, DataConfig, TrainerConfig)
}
# flat name -> "section.field": a field's own name, except `kind`, which takes its section's.
FLAT_NAMES = {
    (name if field.name == "kind" else field.name): f"{name}.{field.name}"
    for name, cls in SECTIONS.items()
    for field in dataclasses.fields(cls)
}
# "section.field" -> the largest value it takes (`_field`'s at_most).
AT_MOST = {
    f"{name}.{field.name}": field.metadata["at_most"]
    for name, cls in SECTIONS.items()
    for field in dataclasses.fields(cls)
    if "at_most" in field.metadata
}


def field_path(name):
    """("network", "n_layers") for a flat name (`n_layers`) or a path (`network.n_layers`); KeyError otherwise."""
    section, _, field = FLAT_NAMES.get(name, name).partition(".")
    if section in SECTIONS and field in {f.name for f in dataclasses.fields(SECTIONS[section])}:
        return section, field
    raise KeyError(name)


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a training run needs to know, in six sections (the table of `vdm_tf.run_config`).

    Example:
    >>> config = Config(network=NetworkConfig(n_layers=2), data=DataConfig(batch_size=64))
    >>> config.replace(n_layers=1, model="cdm").network.n_layers
    1
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    trainer: TrainerConfig = dataclasses.field(default_factory=TrainerConfig)

    def __post_init__(self):
        """Rejects fields of different sections that exclude each other (build_model relies on it)."""
        for name, cls in SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"Config.{name} must be a {cls.__name__}; got {getattr(self, name)!r}.")
        model, schedule = self.model, self.schedule
        if model.kind == "cdm":
            if schedule.sde != "vdm" or model.multiscale_levels:
                raise ValueError("A CDM uses its own noise levels: set sde=vdm and multiscale_levels=0.")
            if self.network.mixed_precision != "float32":
                raise ValueError("mixed_precision=bfloat16 applies to the ScoreUNet denoiser: a CDM runs in float32.")
            if model.decoder_alphabet:
                raise ValueError("A CDM's one-step likelihood uses no decoder: set decoder_alphabet=false.")
        if model.multiscale_levels:
            if model.timesteps or schedule.sde != "vdm":
                raise ValueError("Multi-scale diffusion is a continuous-time VDM: set timesteps=0 and sde=vdm.")
            check_haar_levels(dataset_table.info(self.data.dataset).image_shape, model.multiscale_levels)
        if model.kind == "mulan":
            if (
                schedule.sde != "vdm"
                or model.multiscale_levels
                or model.timesteps
                or model.augment
                or model.time_sampling != "antithetic"
                or model.flow_matching_weight
            ):
                raise ValueError(
                    "MuLAN (model.kind=mulan) is a continuous-time model with its own per-pixel schedule: set "
                    "sde=vdm, multiscale_levels=0, timesteps=0, augment=false, time_sampling=antithetic and "
                    "flow_matching_weight=0."
                )
        elif model.idode or schedule.kind == "idode_sp":
            if model.kind != "vdm" or schedule.sde != "vdm" or model.multiscale_levels:
                raise ValueError(
                    "model.parameterization, time_sampling, flow_matching_weight and schedule.kind=idode_sp "
                    "train a VDM: set model.kind=vdm, schedule.sde=vdm and model.multiscale_levels=0."
                )
            if model.time_sampling == "importance" and schedule.kind == "learned_monotonic":
                raise ValueError(
                    "model.time_sampling=importance draws gamma directly, so a learned_monotonic shape would "
                    "not train: set schedule.kind to idode_vp, idode_sp, fixed_linear or learned_linear."
                )
            if model.flow_matching_weight and schedule.kind not in ("idode_vp", "idode_sp", "fixed_linear"):
                raise ValueError(
                    "model.flow_matching_weight > 0 fine-tunes the network of a fixed schedule: set "
                    "schedule.kind to idode_vp, idode_sp or fixed_linear."
                )

    def replace(self, **changes):
        """A copy with `changes`, checked as a whole (so fields that go together change together).

        Each key is a section's name with a section or a dict of its fields
        (`network={"n_layers": 2}`), a field's path (`**{"network.n_layers": 2}`) or a field's
        flat name (`n_layers=2`, `model="cdm"`: see `FLAT_NAMES`).

        Raises:
            TypeError: a key names no section or field, or two keys name the same field.
            ValueError: a value the sections or `Config` refuse.
        """
        sections = {name: {} for name in SECTIONS}
        given = {}  # (section, field) -> the key that set it
        replaced = {}
        for key, value in changes.items():
            if key in SECTIONS and isinstance(value, _Section):
                replaced[key] = value
                continue
            if key in SECTIONS and isinstance(value, dict):
                items = [(f"{key}.{field}", value) for field, value in value.items()]
            else:
                items = [(key, value)]
            for name, item in items:
                try:
                    path = field_path(name)
                except KeyError:
                    raise TypeError(f"Config has no field {name!r}.") from None
                if path in given:
                    raise TypeError(f"{given[path]} and {name} name the same field, {'.'.join(path)}.")
                given[path] = name
                sections[path[0]][path[1]] = item
        new = {}
        for name in SECTIONS:
            section = replaced.get(name, getattr(self, name))
            new[name] = dataclasses.replace(section, **sections[name]) if sections[name] else section
        return Config(**new)

    @classmethod
    def from_flat(cls, fields):
        """The `Config` of {flat name: value} (the flat `config.json`); fields not given keep their defaults."""
        return cls().replace(**fields)

    def flat(self):
        """{flat name: value} of every field."""
        return {name: getattr(getattr(self, field_path(name)[0]), field_path(name)[1]) for name in FLAT_NAMES}

    def to_json(self):
        """The JSON object of `config.json`: a format marker and one object per section."""
        return {"format_version": FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, fields):
        """The `Config` of a `config.json` object, nested (with `format_version`) or flat (without).

        Sections or fields left out keep their defaults.

        Raises:
            ValueError: a newer format, a section that is not an object, fields this version
                does not know, or a value the sections or `Config` refuse.
        """
        if "format_version" not in fields:
            unknown = sorted(set(fields) - set(FLAT_NAMES))
            if unknown:
                raise ValueError(f"unknown fields {', '.join(unknown)} (written by a newer vdm_tf?)")
            return cls.from_flat(fields)
        fields = dict(fields)
        version = fields.pop("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {version!r}: this vdm_tf reads version {FORMAT_VERSION} (and the flat form "
                "of version 1, without format_version); written by a newer vdm_tf?"
            )
        unknown = sorted(set(fields) - set(SECTIONS))
        for name in set(fields) & set(SECTIONS):
            if not isinstance(fields[name], dict):
                raise ValueError(f"{name}: expected a JSON object of the section's fields; got {fields[name]!r}.")
            known = {field.name for field in dataclasses.fields(SECTIONS[name])}
            unknown += sorted(f"{name}.{field}" for field in set(fields[name]) - known)
        if unknown:
            raise ValueError(f"unknown fields {', '.join(unknown)} (written by a newer vdm_tf?)")
        return cls(**{name: SECTIONS[name](**values) for name, values in fields.items()})


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
    """The `Config` saved in a run directory (`config.json`, nested or flat), or None if there is none.

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
    try:
        return Config.from_json(fields)
    except (ValueError, TypeError) as error:  # TypeError: a section's constructor given a field twice, ...
        raise ValueError(f"{path}: {error}") from None


def save_config(model_dir, config):
    """Writes `config` as the run directory's `config.json` (creating the directory), whole or not at all."""
    data = (json.dumps(config.to_json(), indent=2) + "\n").encode("utf-8")
    path = config_path(model_dir)
    if is_remote(path):  # an object store writes an object whole or not at all by itself
        _gfile().makedirs(model_dir)
        with _gfile().GFile(path, "wb") as f:
            f.write(data)
        return
    files.write_bytes(path, data)
