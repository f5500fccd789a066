"""Official VDM and i-DODE checkpoints (google-research/vdm, thu-ml/i-DODE; JAX/Flax) as vdm_tf models.

    python -m vdm_tf.convert --checkpoint=checkpoints-0 --preset=cifar10 --output=cifar10.keras
    python -m vdm_tf.convert --checkpoint=ckpt-1.flax --official_config=model.json --output=m.keras \
        --model_dir=runs/official      # also a trainer run directory (trainers.main --mode=eval ...)
    python -m vdm_tf.convert --source=idode --checkpoint=checkpoints-0 --official_config=model.json \
        --output=idode.keras           # an i-DODE checkpoint (its config.model fields as JSON)

The official code (Kingma et al. 2021, https://github.com/google-research/vdm) saves its
`TrainState` (`step`, `params`, `ema_params`, `opt_state`) with clu's `Checkpoint`, i.e.
`flax.serialization.to_bytes(state)` in a file `<directory>/<name>-<number>.flax`. That is msgpack:
dicts of dicts, each array an ext value of type 1 holding `(shape, dtype name, bytes)` (numpy
scalars: type 3; arrays over 2 GB are split into a dict marked `__msgpack_chunked_array__`).
`read_checkpoint` reads it with the `msgpack` package alone (no JAX, no Flax).

The official `ScoreUNet` is the network of `vdm_tf.networks.ScoreUNet`, weight for weight
(`official_layout` lists the correspondence), with one exception: the official `dense0` takes the
time embedding *and* a `conditioning` scalar, so its kernel has one more input row. The official
evaluation and sampling always pass `conditioning = 0` (the un-augmented test set; `sample_fn`'s
zeros), and a zero input contributes nothing through that row, so the converter drops it: the
converted network equals the official one at `conditioning = 0`, which is every computation the
official code does with the released checkpoints. For `cifar10` (no augmentation) the row was
never used at all. For `cifar10_aug` it is the flag "this training image was flipped or rotated"
(`dataset._preprocess_cifar10_augment`): the converted model is the official model of the
*un-augmented* images, the one that scores 2.522 bpd, and cannot model the augmented ones.

Schedules (`gamma_type`) map exactly:
- `learnable_scalar`, `gamma(t) = b + |w| t` -> `LearnedLinear` with `gamma_0 = b`, range `|w|`;
- `learnable_nnet`, `gamma(t) = l1(t) + l3(2 (sigmoid(l2(2t - 1)) - 1/2)) / 1024` with absolute
  kernels -> `LearnedMonotonic` with the same network weights and endpoints `gamma(0)`, `gamma(1)`
  (VDM eq. 59 renormalises the network to its endpoints, so the unnormalised official network
  and its bias `l1.bias` give the same gamma(t));
- `fixed` -> `FixedLinear(gamma_min, gamma_max)`.

The official sampler decodes `z_0` with an argmax (`sample_softmax=False`): use
`model.sample(..., argmax=True)` for the same samples' distribution.

i-DODE (Zheng et al. 2023, github thu-ml/i-DODE at 8cb8092) trains the official VDM's
`ScoreUNet`, unchanged, in the same `TrainState` files; its `VDMConfig` adds six fields
(`I_DODE_FIELDS`), which tell its configs from VDM's (`--source` must name the right one). The
converted model is a `vdm_tf.VDM` with
- `schedule`: `VP` -> `schedules.VariancePreserving`, `SP` -> `schedules.StraightPath`, with
  `gamma_min`, `gamma_max` (i-DODE's gamma(t) is always the fixed linear one: `gamma_type`
  must be `fixed`, as its code asserts; no schedule parameters in the checkpoint);
- `velocity`: True -> `parameterization="velocity"` (eps_hat derived from the predicted
  velocity as i-DODE's `noise_fn` does), False -> `"eps"`;
- `importance`: True -> `time_sampling="importance"`, so `elbo` draws its gammas as i-DODE's
  evaluation VLB does (same bound, other estimator); `second_order`: True ->
  `flow_matching_weight=0.1` (i-DODE's `second_order_weight`): both only change training;
- continuous time: `sm_n_timesteps` is not used by i-DODE's code, whatever its value;
- `dequantization` and `num_importance` choose i-DODE's likelihood evaluation, not the model:
  `vdm_tf.likelihood.ode_bpd(model, x, dequantization="truncated_normal")` is its `"tn"`
  (one draw per call; i-DODE averages 5 when `num_importance=1`).
"""

import contextlib
import functools
import json
import math
import numbers
import os
import re
import shutil
from typing import NamedTuple

import msgpack
import numpy as np

from vdm_tf import cli, dataset_table, files
from vdm_tf.run_config import Config, DataConfig, ModelConfig, NetworkConfig, ScheduleConfig, config_path

# The fields of the official `VDMConfig` (model_vdm.py) and their types; float fields take
# integers too (JSON's 5 for 5.0), int fields take no booleans.
FIELD_TYPES = {
    "vocab_size": int,
    "sample_softmax": bool,
    "antithetic_time_sampling": bool,
    "with_fourier_features": bool,
    "with_attention": bool,
    "gamma_type": str,
    "gamma_min": float,
    "gamma_max": float,
    "sm_n_timesteps": int,
    "sm_n_embd": int,
    "sm_n_layer": int,
    "sm_pdrop": float,
}
OFFICIAL_FIELDS = tuple(FIELD_TYPES)
GAMMA_TYPES = {"learnable_scalar": "learned_linear", "learnable_nnet": "learned_monotonic", "fixed": "fixed_linear"}

# The fields i-DODE's `VDMConfig` (thu-ml/i-DODE model_vdm.py:30-56) adds to VDM's; a config with
# any of them is i-DODE's.
I_DODE_FIELDS = {
    "second_order": bool,
    "velocity": bool,
    "importance": bool,
    "dequantization": str,
    "num_importance": int,
    "schedule": str,
}
SOURCES = {"vdm": "VDM", "idode": "i-DODE", "mulan": "MuLAN"}  # mulan: vdm_tf.convert_mulan
I_DODE_SCHEDULES = {"VP": "idode_vp", "SP": "idode_sp"}  # config.model.schedule -> ScheduleConfig.kind
I_DODE_DEQUANTIZATIONS = ("tn", "u", "v")
SECOND_ORDER_WEIGHT = 0.1  # VDM.__call__'s second_order_weight (model_vdm.py), not a config field

_CIFAR10 = dict(
    vocab_size=256,
    sample_softmax=False,
    antithetic_time_sampling=True,
    with_fourier_features=True,
    with_attention=False,
    gamma_type="learnable_scalar",
    gamma_min=-13.3,
    gamma_max=5.0,
    sm_n_timesteps=0,
    sm_n_embd=128,
    sm_n_layer=32,
    sm_pdrop=0.1,
)
# The `model` part of the two released configurations (configs/cifar10.py and
# configs/cifar10_aug.py of google-research/vdm at dc27b98, the commit that added the checkpoints).
PRESETS = {
    "cifar10": _CIFAR10,
    "cifar10_aug": _CIFAR10 | dict(gamma_type="learnable_nnet", sm_n_embd=256, sm_pdrop=0.05),
}
# Where the released checkpoints are (clu checkpoint directories) and what the official code
# evaluates them to (README of google-research/vdm).
RELEASED = {
    "cifar10": ("gs://gresearch/vdm/cifar10/checkpoint-final/checkpoints-0", 2.637),
    "cifar10_aug": ("gs://gresearch/vdm/cifar10/aug-checkpoint-final/checkpoints-0", 2.522),
}
SCHEDULE_FEATURES = 1024  # NoiseSchedule_NNet.n_features
FOURIER_EXPONENTS = (7, 8)  # Base2FourierFeatures(start=6, stop=8): 2^n * 2 pi = 2^(n+1) pi


class ConversionError(ValueError):
    """A checkpoint or configuration that cannot be converted; the message says why in one line."""


# --------------------------------------------------------------------------------------------
# Reading flax checkpoints.


def checkpoint_file(path):
    """The `.flax` file of a checkpoint given as the file, a clu prefix or a clu directory.

    A clu directory (`checkpoints-0/` of the official runs) holds `ckpt-<n>.flax` files and a
    TensorFlow `checkpoint` index naming the latest; without the index, the highest number wins.
    """
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if os.path.isfile(path + ".flax"):
        return path + ".flax"
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such file, clu checkpoint prefix ({path}.flax) or directory.")
    index = os.path.join(path, "checkpoint")
    if os.path.isfile(index):
        with open(index, errors="replace") as f:
            latest = re.search(r'^model_checkpoint_path:\s*"([^"]+)"', f.read(), re.MULTILINE)
        if latest and os.path.isfile(os.path.join(path, os.path.basename(latest.group(1)) + ".flax")):
            return os.path.join(path, os.path.basename(latest.group(1)) + ".flax")
    candidates = [name for name in os.listdir(path) if name.endswith(".flax")]
    if not candidates:
        raise ConversionError(f"{path}: a directory without a .flax checkpoint file.")

    def number(name):
        found = re.search(r"-(\d+)\.flax$", name)
        return int(found.group(1)) if found else -1

    return os.path.join(path, max(candidates, key=lambda name: (number(name), name)))


def _ndarray(data):
    """Flax's array encoding: msgpack of (shape, dtype name, C-order bytes)."""
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    if dtype_name == b"bfloat16":
        import ml_dtypes  # a TensorFlow dependency

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(dtype_name.decode())
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ext_hook(code, data):
    if code == 1:  # ndarray
        return _ndarray(data)
    if code == 3:  # numpy scalar, stored as a 0-d array
        return _ndarray(data)[()]
    if code == 2:  # Python complex
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    return msgpack.ExtType(code, data)


def _unchunk(tree):
    """Arrays that flax split into chunks (over 2 GB each) joined back into arrays."""
    if not isinstance(tree, dict):
        return tree
    if "__msgpack_chunked_array__" in tree:
        shape = tuple(tree["shape"][str(i)] for i in range(len(tree["shape"])))
        chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
        return np.concatenate(chunks).reshape(shape)
    return {key: _unchunk(value) for key, value in tree.items()}


def read_checkpoint(path, keys=("step", "params", "ema_params")):
    """The top-level entries `keys` of a flax checkpoint's state dict (others are skipped unread).

    Args:
        path: a `.flax` file, a clu checkpoint prefix or a clu checkpoint directory.
        keys: which entries of the saved `TrainState` to decode (`opt_state` is the largest).

    Returns:
        dict: those of `keys` that the checkpoint holds; parameter trees are nested dicts of
        NumPy arrays.
    """
    filename = checkpoint_file(path)
    if os.path.getsize(filename) == 0:
        raise ConversionError(f"{filename}: an empty file, not a flax checkpoint.")
    found, seen = {}, []
    with open(filename, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, ext_hook=_ext_hook, max_buffer_size=2**31 - 1)
        try:
            for _ in range(unpacker.read_map_header()):
                key = unpacker.unpack()
                if not isinstance(key, str):
                    raise ValueError(f"a non-string key {key!r}")
                seen.append(key)
                if key in keys:
                    found[key] = _unchunk(unpacker.unpack())
                else:
                    unpacker.skip()
        except msgpack.OutOfData:
            # A TrainState's state dict starts with `step` (or `params`); anything else is not one.
            truncated = seen and seen[0] in ("step", "params")
            problem = f"a truncated flax checkpoint (it ends inside {seen[-1]!r})" if truncated else None
            raise ConversionError(f"{filename}: {problem or 'not a flax checkpoint (msgpack state dict)'}.") from None
        except (ValueError, TypeError, msgpack.UnpackException) as error:
            raise ConversionError(f"{filename}: not a flax checkpoint (msgpack state dict): {error}.") from None
        if unpacker.tell() != os.path.getsize(filename):
            raise ConversionError(f"{filename}: not a flax checkpoint (data after the msgpack state dict).")
    if not seen:
        raise ConversionError(f"{filename}: not a flax checkpoint (an empty state dict).")
    return found


def read_weights(path, weights="ema_params"):
    """The parameter tree `weights` (`ema_params`, which the official evaluation uses, or `params`)."""
    if weights not in ("ema_params", "params"):
        raise ConversionError(f"weights must be ema_params or params; got {weights!r}.")
    state = read_checkpoint(path, keys=(weights,))
    if weights not in state:
        raise ConversionError(f"{checkpoint_file(path)}: no {weights} in this checkpoint (not a VDM TrainState?).")
    tree = state[weights]
    if isinstance(tree, dict) and set(tree) == {"params"}:  # saved as flax variables
        tree = tree["params"]
    if not isinstance(tree, dict) or "score_model" not in tree:
        raise ConversionError(f"{checkpoint_file(path)}: {weights} has no score_model: not a VDM checkpoint.")
    return tree


def flatten(tree, prefix=""):
    """{"a/b/c": array} from a nested dict."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, path + "/"))
        else:
            flat[path] = np.asarray(value)
    return flat


# --------------------------------------------------------------------------------------------
# The official configuration and the parameters it implies.


def official_config(config, source="vdm"):
    """The official `VDMConfig` fields from a preset name, a dict or a JSON file, type-checked.

    A JSON file (UTF-8) may hold the fields themselves or a whole official config with them
    under `model`. Fields that only change how the official code *trains*
    (`antithetic_time_sampling`) or samples (`sample_softmax`) are optional and do not change
    the converted model; `sm_kernel_init` (an initializer) is ignored.

    Args:
        config: a preset name (`PRESETS`, VDM's), a dict of fields or the path of a JSON file.
        source: `"vdm"` (google-research/vdm) or `"idode"` (thu-ml/i-DODE, whose `VDMConfig`
            has VDM's fields and `I_DODE_FIELDS`); the config must be that code's.

    Raises:
        ConversionError: an unreadable file, not UTF-8, not JSON (with its line and column),
            not an object, the other code's config, unknown or missing fields, a field of the
            wrong type (a bool is not an integer) or an impossible value; one line naming the
            file and the field.
    """
    if source not in SOURCES:
        raise ConversionError(f"source must be one of {', '.join(SOURCES)}; got {source!r}.")
    where = "official config"
    if isinstance(config, str) and config in PRESETS:
        fields = dict(PRESETS[config])
    elif isinstance(config, dict):
        fields = dict(config)
    else:
        where = f"official config {config}"
        fields = _read_json(config)
        if isinstance(fields, dict) and isinstance(fields.get("model"), dict):
            fields = fields["model"]
        if not isinstance(fields, dict):
            raise ConversionError(f"{where}: expected a JSON object of VDMConfig fields; got {_json_kind(fields)}.")
    fields.pop("sm_kernel_init", None)  # an initializer: irrelevant to trained weights
    _check_source(fields, source, where)
    field_types = FIELD_TYPES | I_DODE_FIELDS if source == "idode" else FIELD_TYPES
    unknown = sorted(set(fields) - set(field_types))
    optional = ("sample_softmax", "antithetic_time_sampling")
    missing = [name for name in field_types if name not in fields and name not in optional]
    if unknown or missing:
        problem = f"unknown fields {', '.join(unknown)}" if unknown else f"missing fields {', '.join(missing)}"
        raise ConversionError(
            f"{where}: {problem}; the {SOURCES[source]} VDMConfig fields are {', '.join(field_types)}."
        )
    for name, value in fields.items():
        if not _is_of_type(value, field_types[name]):
            expected = _TYPE_NAMES[field_types[name]]
            raise ConversionError(f"{where}: {name}: expected {expected}; got {_described(value)}.")
    if fields["gamma_type"] not in GAMMA_TYPES:
        raise ConversionError(
            f"{where}: unknown gamma_type {fields['gamma_type']!r}; expected {', '.join(GAMMA_TYPES)}."
        )
    if fields["vocab_size"] != 256:
        raise ConversionError(f"{where}: vocab_size={fields['vocab_size']}; vdm_tf models 8-bit images (256).")
    for name in ("gamma_min", "gamma_max"):
        if not math.isfinite(fields[name]):
            raise ConversionError(f"{where}: {name}: expected a finite number; got {fields[name]}.")
    if not fields["gamma_max"] > fields["gamma_min"]:
        raise ConversionError(
            f"{where}: gamma_max must exceed gamma_min; got {fields['gamma_max']} <= {fields['gamma_min']}."
        )
    for name, lowest in (("sm_n_timesteps", 0), ("sm_n_embd", 1), ("sm_n_layer", 0)):
        if fields[name] < lowest:
            raise ConversionError(f"{where}: {name}: expected an integer >= {lowest}; got {fields[name]}.")
    if not 0 <= fields["sm_pdrop"] < 1:
        raise ConversionError(f"{where}: sm_pdrop: expected a dropout rate in [0, 1); got {fields['sm_pdrop']}.")
    if source == "idode":
        _check_idode_fields(fields, where)
    return fields


def _check_source(fields, source, where):
    """ConversionError unless the fields are a config of `source`'s code (i-DODE's have `I_DODE_FIELDS`,
    MuLAN's its `vdm_type` and latent fields)."""
    mulan = [name for name in ("vdm_type", "latent_size", "latent_k", "encoder") if name in fields]
    if mulan:
        raise ConversionError(
            f"{where}: a MuLAN config (it has {', '.join(mulan)}), not one of --source={source}: "
            "convert it with --source=mulan."
        )
    own = [name for name in I_DODE_FIELDS if name in fields]
    if source == "vdm" and own:
        raise ConversionError(
            f"{where}: an i-DODE config (it has {', '.join(own)}), not a VDM one: convert it with --source=idode."
        )
    if source == "idode" and not own:
        raise ConversionError(
            f"{where}: a VDM config (it has none of i-DODE's fields {', '.join(I_DODE_FIELDS)}), "
            "not an i-DODE one: convert it with --source=vdm."
        )


def _check_idode_fields(fields, where):
    """The values i-DODE's own code accepts (its asserts, model_vdm.py:85-96) and vdm_tf represents."""
    if fields["gamma_type"] != "fixed":
        raise ConversionError(
            f"{where}: gamma_type={fields['gamma_type']!r}; i-DODE's schedules are fixed (gamma_type 'fixed')."
        )
    if fields["schedule"] not in I_DODE_SCHEDULES:
        raise ConversionError(
            f"{where}: unknown schedule {fields['schedule']!r}; expected {', '.join(I_DODE_SCHEDULES)}."
        )
    if fields["dequantization"] not in I_DODE_DEQUANTIZATIONS:
        raise ConversionError(
            f"{where}: unknown dequantization {fields['dequantization']!r}; "
            f"expected {', '.join(I_DODE_DEQUANTIZATIONS)}."
        )
    if fields["num_importance"] < 1:
        raise ConversionError(f"{where}: num_importance: expected an integer >= 1; got {fields['num_importance']}.")
    for name in ("importance", "second_order"):
        if fields[name] and not fields["velocity"]:
            raise ConversionError(f"{where}: {name}=true needs velocity=true (as i-DODE's code asserts).")


_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _is_of_type(value, kind):
    """JSON's types as the official config uses them: bool is not a number, an int is a float."""
    if kind is bool:
        return isinstance(value, bool | np.bool_)
    if isinstance(value, bool | np.bool_):
        return False
    if kind is float:
        return isinstance(value, numbers.Real)
    if kind is int:
        return isinstance(value, numbers.Integral)
    return isinstance(value, kind)


def _json_kind(value):
    """What a decoded JSON value is, in JSON's words ("a string", "null", "an array", ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool | np.bool_):
        return "a boolean"
    kinds = {numbers.Integral: "an integer", numbers.Real: "a number", str: "a string", list | tuple: "an array"}
    for kind, name in (kinds | {dict: "an object"}).items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _described(value, limit=40):
    """A value as the user wrote it, and its JSON type: 'low' (a string), null, [1, 2] (an array)."""
    if value is None:
        return "null"
    if isinstance(value, str):
        text = repr(value)
    else:
        try:
            text = json.dumps(value)
        except (TypeError, ValueError):
            text = repr(value)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{text} ({_json_kind(value)})"


def _read_json(path):
    """The JSON value of a UTF-8 file; ConversionError (one line, with line and column) otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ConversionError(f"official config {path}: {error.strerror or error}.") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        column = error.start - (data.rfind(b"\n", 0, error.start) + 1) + 1
        raise ConversionError(
            f"official config {path}: not UTF-8 text (byte 0x{data[error.start]:02x} at line {line}, column {column}); "
            "expected a JSON file of VDMConfig fields saved as UTF-8."
        ) from None
    if not text.strip():
        raise ConversionError(f"official config {path}: the file is empty; expected a JSON object of VDMConfig fields.")
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ConversionError(
            f"official config {path}: not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None


class Weight(NamedTuple):
    """One official parameter: its path, its shape, and the vdm_tf ScoreUNet variable it becomes.

    `target` is a path of attributes (and list indices) from the ScoreUNet to a variable, or None
    for the schedule's parameters (see `_assign_schedule`); `row_slice` keeps part of the rows.
    """

    path: str
    shape: tuple
    target: tuple
    row_slice: slice = slice(None)


def official_layout(config, channels=3):
    """Every parameter of the official VDM with `config`, and where it goes in vdm_tf.

    The official `ScoreUNet` (model_vdm.py) names its modules `dense0`, `conv_in`,
    `down.block_<i>`, `down.attn_<i>`, `mid.block_1`, `mid.attn_1`, `mid.block_2`, `up.block_<i>`,
    `up.attn_<i>`, `GroupNorm_0` and `conv_out`; inside a ResNet block, `GroupNorm_0`, `conv1`,
    `cond_proj`, `GroupNorm_1`, `conv2` and `nin_shortcut`; inside attention, `GroupNorm_0`, `q`,
    `k`, `v`, `proj_out`. Kernels have the same layout in Flax and Keras ([in, out] and
    [3, 3, in, out]).
    """
    width, layers = config["sm_n_embd"], config["sm_n_layer"]
    inputs = channels * (1 + 2 * len(FOURIER_EXPONENTS)) if config["with_fourier_features"] else channels
    layout = []

    def dense(path, target, fan_in, fan_out, bias=True, row_slice=slice(None)):
        layout.append(Weight(f"score_model/{path}/kernel", (fan_in, fan_out), target + ("kernel",), row_slice))
        if bias:
            layout.append(Weight(f"score_model/{path}/bias", (fan_out,), target + ("bias",)))

    def conv(path, target, fan_in, fan_out):
        layout.append(Weight(f"score_model/{path}/kernel", (3, 3, fan_in, fan_out), target + ("kernel",)))
        layout.append(Weight(f"score_model/{path}/bias", (fan_out,), target + ("bias",)))

    def norm(path, target, channels):
        layout.append(Weight(f"score_model/{path}/scale", (channels,), target + ("scale",)))
        layout.append(Weight(f"score_model/{path}/bias", (channels,), target + ("bias",)))

    def resnet(path, target, fan_in):
        norm(f"{path}/GroupNorm_0", target + ("norm1",), fan_in)
        conv(f"{path}/conv1", target + ("conv1",), fan_in, width)
        dense(f"{path}/cond_proj", target + ("cond_proj",), 4 * width, width, bias=False)
        norm(f"{path}/GroupNorm_1", target + ("norm2",), width)
        conv(f"{path}/conv2", target + ("conv2",), width, width)
        if fan_in != width:
            dense(f"{path}/nin_shortcut", target + ("shortcut",), fan_in, width)

    def attention(path, target):
        norm(f"{path}/GroupNorm_0", target + ("norm",), width)
        for name in ("q", "k", "v", "proj_out"):
            dense(f"{path}/{name}", target + (name,), width, width)

    # dense0's last input row multiplies the conditioning scalar (0 in every official evaluation).
    dense("dense0", ("cond_dense0",), width + 1, 4 * width, row_slice=slice(0, width))
    dense("dense1", ("cond_dense1",), 4 * width, 4 * width)
    conv("conv_in", ("conv_in",), inputs, width)
    for i in range(layers):
        resnet(f"down.block_{i}", ("down_blocks", i), width)
        if config["with_attention"]:
            attention(f"down.attn_{i}", ("down_attention", i))
    resnet("mid.block_1", ("mid_block1",), width)
    attention("mid.attn_1", ("mid_attention",))
    resnet("mid.block_2", ("mid_block2",), width)
    for i in range(layers + 1):
        resnet(f"up.block_{i}", ("up_blocks", i), 2 * width)
        if config["with_attention"]:
            attention(f"up.attn_{i}", ("up_attention", i))
    norm("GroupNorm_0", ("norm_out",), width)
    conv("conv_out", ("conv_out",), width, channels)

    schedule = {
        "learnable_scalar": {"w": (1,), "b": (1,)},
        "learnable_nnet": {
            "l1/kernel": (1, 1),
            "l1/bias": (1,),
            "l2/kernel": (1, SCHEDULE_FEATURES),
            "l2/bias": (SCHEDULE_FEATURES,),
            "l3/kernel": (SCHEDULE_FEATURES, 1),
        },
        "fixed": {},
    }[config["gamma_type"]]
    layout += [Weight(f"gamma/{name}", shape, None) for name, shape in schedule.items()]
    return layout


def infer_architecture(params):
    """The official config fields that a parameter tree determines, each with its evidence.

    Returns {field: (value, "why")} for `sm_n_embd`, `sm_n_layer`, `with_attention`,
    `with_fourier_features` and `gamma_type`, plus `channels` (the image channels).
    """
    flat = flatten(params)

    def shape_of(path):
        if path not in flat:
            raise ConversionError(f"the checkpoint has no {path}: not an official VDM ScoreUNet.")
        return tuple(flat[path].shape)

    conv_in, conv_out = shape_of("score_model/conv_in/kernel"), shape_of("score_model/conv_out/kernel")
    if len(conv_in) != 4 or len(conv_out) != 4:
        raise ConversionError(f"score_model/conv_in/kernel has shape {conv_in}: not an official VDM ScoreUNet.")
    width, channels = conv_in[-1], conv_out[-1]
    blocks = {path.split("/")[1] for path in flat if re.match(r"score_model/down\.block_\d+/", path)}
    attention = sorted({path.split("/")[1] for path in flat if re.match(r"score_model/(down|up)\.attn_\d+/", path)})
    gamma = sorted({path.split("/")[1] for path in flat if path.startswith("gamma/")})
    gamma_type = "fixed" if not gamma else "learnable_scalar" if "w" in gamma else "learnable_nnet"
    with_fourier = conv_in[2] == channels * (1 + 2 * len(FOURIER_EXPONENTS))
    return {
        "sm_n_embd": (width, f"score_model/conv_in/kernel has shape {conv_in}"),
        "sm_n_layer": (len(blocks), f"the checkpoint has {len(blocks)} down blocks (score_model/down.block_<i>)"),
        "with_attention": (
            bool(attention),
            f"the checkpoint has attention blocks ({', '.join(attention[:2])}, ...)"
            if attention
            else "the checkpoint has no score_model/down.attn_<i> or up.attn_<i>",
        ),
        "with_fourier_features": (
            with_fourier,
            f"score_model/conv_in/kernel has shape {conv_in} for {channels}-channel images",
        ),
        "gamma_type": (gamma_type, f"the checkpoint's schedule parameters are {gamma or 'none'}"),
        "channels": (channels, f"score_model/conv_out/kernel has shape {conv_out}"),
    }


def check_layout(flat, layout):
    """ConversionError unless the flat checkpoint `flat` holds exactly the weights of `layout`, each of its shape."""
    for weight in layout:
        if weight.path not in flat:
            raise ConversionError(f"the checkpoint does not match the config: it has no {weight.path} {weight.shape}.")
        if tuple(flat[weight.path].shape) != weight.shape:
            raise ConversionError(
                f"the checkpoint does not match the config: {weight.path} has shape {tuple(flat[weight.path].shape)}; "
                f"the config needs {weight.shape}."
            )
    extra = sorted(set(flat) - {weight.path for weight in layout})
    if extra:
        raise ConversionError(
            f"the checkpoint does not match the config: parameters {', '.join(extra[:3])}"
            f"{' ...' if len(extra) > 3 else ''} are not in the official model of this config."
        )


def check_params(params, config, channels=3):
    """Raises ConversionError, naming the layer and the shapes, unless `params` fit `config`."""
    inferred = infer_architecture(params)
    if inferred["channels"][0] != channels:
        raise ConversionError(
            f"the checkpoint models {inferred['channels'][0]}-channel images ({inferred['channels'][1]}); "
            f"the data set has {channels}."
        )
    if "schedule" in config and inferred["gamma_type"][0] != "fixed":  # an i-DODE config
        raise ConversionError(
            f"the checkpoint does not match --source=idode: {inferred['gamma_type'][1]} (a learned schedule, "
            f"gamma_type={inferred['gamma_type'][0]!r}), so it is a VDM checkpoint: convert it with --source=vdm."
        )
    for field in ("sm_n_embd", "sm_n_layer", "with_attention", "with_fourier_features", "gamma_type"):
        value, evidence = inferred[field]
        if config[field] != value:
            raise ConversionError(
                f"the checkpoint does not match the config: {field}={config[field]!r} in the config, "
                f"but {evidence}, i.e. {field}={value!r}."
            )
    flat = flatten(params)
    check_layout(flat, official_layout(config, channels))


# --------------------------------------------------------------------------------------------
# The vdm_tf model.


def run_config(config, dataset="cifar10"):
    """The `vdm_tf.runs.Config` whose model has the official model's architecture and schedule.

    The optimiser fields keep their defaults, which are the official ones (AdamW, b1 0.9,
    b2 0.99, weight decay 0.01, EMA 0.9999, learning rate 2e-4). The schedule network trains on
    the VLB as in the official code (`minimize_variance=False`). An i-DODE config (it has a
    `schedule`) gives its schedule, parameterisation, time sampling and second-order weight in
    continuous time (module docstring).
    """
    if "schedule" in config:
        model = ModelConfig(
            timesteps=0,
            parameterization="velocity" if config["velocity"] else "eps",
            time_sampling="importance" if config["importance"] else "antithetic",
            flow_matching_weight=SECOND_ORDER_WEIGHT if config["second_order"] else 0.0,
        )
        kind = I_DODE_SCHEDULES[config["schedule"]]
    else:
        model, kind = ModelConfig(timesteps=config["sm_n_timesteps"]), GAMMA_TYPES[config["gamma_type"]]
    return Config(
        data=DataConfig(dataset=dataset),
        model=model,
        schedule=ScheduleConfig(
            kind=kind,
            gamma_min=config["gamma_min"],
            gamma_max=config["gamma_max"],
            minimize_variance=False,
        ),
        network=NetworkConfig(
            n_layers=config["sm_n_layer"],
            n_embd=config["sm_n_embd"],
            dropout=config["sm_pdrop"],
            fourier_features=config["with_fourier_features"],
            fourier_exponents=FOURIER_EXPONENTS,
            attention=config["with_attention"],
        ),
    )


def _assign_schedule(schedule, gamma_params, gamma_type):
    """Writes the official schedule's parameters into a vdm_tf schedule (see the module docstring).

    The endpoints are the schedule's own variables `_gamma_0` and `_gamma_range`
    (`gamma_1 = gamma_0 + |gamma_range|`, `vdm_tf.schedules.NoiseSchedule`).
    """
    g = {path: np.asarray(value, np.float32) for path, value in flatten(gamma_params).items()}
    if gamma_type == "learnable_scalar":  # gamma(t) = b + |w| t
        schedule._gamma_0.assign(g["b"][0])
        schedule._gamma_range.assign(abs(g["w"][0]))
    elif gamma_type == "learnable_nnet":
        schedule.linear_weight.assign(g["l1/kernel"][0, 0])
        schedule.hidden_weight.assign(g["l2/kernel"][0])
        schedule.hidden_bias.assign(g["l2/bias"])
        schedule.output_weight.assign(g["l3/kernel"][:, 0])
        # The official gamma(t) = g(t) + l1.bias, with g the network vdm_tf normalises.
        g_0, g_1 = schedule.unnormalised(np.array([0.0, 1.0], np.float32)).numpy()
        schedule._gamma_0.assign(g_0 + g["l1/bias"][0])
        schedule._gamma_range.assign(g_1 - g_0)


def convert(params, config, dataset="cifar10"):
    """A `vdm_tf.VDM` equal to the official VDM with parameters `params` and `config`.

    Args:
        params: the official parameter tree (`read_weights`): `score_model` and `gamma`.
        config: the official config fields (`official_config`).
        dataset: the vdm_tf data set whose images the model scores (its shape must fit).

    Returns:
        the model; its `runs.Config` is `run_config(config, dataset)`.
    """
    from vdm_tf import runs  # TensorFlow: after the command line's checks

    channels = dataset_table.info(dataset).image_shape[-1]
    check_params(params, config, channels)  # before building anything
    model = runs.build_model(run_config(config, dataset))
    flat = flatten(params)
    assigned = set()
    for weight in official_layout(config, channels):
        if weight.target is None:
            continue
        variable = model.denoiser
        for part in weight.target:
            variable = variable[part] if isinstance(part, int) else getattr(variable, part)
        variable.assign(flat[weight.path][weight.row_slice].astype(np.float32))
        assigned.add(id(variable))
    unassigned = [v.path for v in model.denoiser.weights if id(v) not in assigned]
    if unassigned:  # the layout and vdm_tf's ScoreUNet disagree: a bug, not a user error
        raise RuntimeError(f"official_layout leaves vdm_tf weights unassigned: {unassigned}")
    _assign_schedule(model.schedule, params.get("gamma", {}), config["gamma_type"])
    return model


def from_checkpoint(checkpoint, config, weights="ema_params", dataset="cifar10", source="vdm"):
    """Reads and converts an official checkpoint.

    Args:
        checkpoint: a `.flax` file, a clu prefix or a clu checkpoint directory.
        config: a preset name (`cifar10`, `cifar10_aug`), a dict of official config fields or
            the path of a JSON file with them.
        weights: `ema_params` (what the official evaluation uses) or `params`.
        dataset: the vdm_tf data set the model is for (`cifar10`; `imagenet32` for those models).
        source: `"vdm"` (google-research/vdm) or `"idode"` (thu-ml/i-DODE).

    Example:
    >>> model = vdm_tf.convert.from_checkpoint("checkpoints-0", "cifar10")
    >>> model.elbo(cifar10_test_images, num_time_samples=8)["bpd"]
    >>> idode = vdm_tf.convert.from_checkpoint("checkpoints-0", "model.json", source="idode")
    >>> vdm_tf.likelihood.ode_bpd(idode, cifar10_test_images, dequantization="truncated_normal")
    """
    return convert(read_weights(checkpoint, weights), official_config(config, source), dataset)


# --------------------------------------------------------------------------------------------
# Command line.


PROG = "python -m vdm_tf.convert"


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument(
        "--source",
        choices=tuple(SOURCES),
        default="vdm",
        help="whose checkpoint: google-research/vdm, thu-ml/i-DODE or s-sahoo/MuLAN",
    )
    parser.add_argument("--checkpoint", required=True, help="a .flax file, a clu prefix or a clu checkpoint directory")
    parser.add_argument("--output", required=True, help="the .keras file to write")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", choices=sorted(PRESETS), help="a released VDM configuration")
    source.add_argument(
        "--official_config", help="JSON file with the official VDMConfig fields (VDM, i-DODE; MuLAN's plus vdm_type)"
    )
    parser.add_argument("--weights", choices=("ema_params", "params"), default="ema_params")
    parser.add_argument("--dataset", default="cifar10", help="the vdm_tf data set the model is for (image shape)")
    parser.add_argument("--model_dir", help="also write a trainer run directory here (new or empty)")
    return parser.parse_args(argv)


def check_outputs(output, model_dir):
    """Refuses outputs that cannot be written, before any work: cli.Failure naming the flag."""
    if not output.endswith(".keras"):
        raise cli.Failure(f"--output must name a .keras file; got {output!r}.")
    directory = os.path.dirname(os.path.abspath(output))
    if os.path.isdir(output):
        raise cli.Failure(f"--output={output} is a directory; expected the path of a .keras file to write.")
    if not os.path.isdir(directory):
        raise cli.Failure(f"--output={output}: no directory {directory} to write it in.")
    if not model_dir:
        return
    if os.path.exists(model_dir) and not os.path.isdir(model_dir):
        raise cli.Failure(f"--model_dir={model_dir} is a file; expected a new or empty directory.")
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        holds = "already holds a run (config.json)" if os.path.exists(config_path(model_dir)) else "is not empty"
        raise cli.Failure(f"--model_dir={model_dir} {holds}; expected a new or empty directory.")
    if os.path.abspath(model_dir) == os.path.abspath(output):
        raise cli.Failure("--model_dir and --output name the same path.")


@contextlib.contextmanager
def written_together(output, model_dir):
    """Yields (temporary .keras path, temporary run directory or None); both appear or neither does.

    Each is written under a temporary name (`vdm_tf.files.atomic_path`; Keras chooses the format
    by the `.keras` extension, which the temporary keeps) and renamed into place when the block
    succeeds. If anything fails, Ctrl-C included, nothing is left: no temporary, no run
    directory renamed just before the `.keras` file failed, no parent directories made for it.
    """
    made = _missing_parents(model_dir) if model_dir else []
    renamed = False
    try:
        with files.atomic_path(output) as keras_file:
            if not model_dir:
                yield keras_file, None
            else:
                with files.atomic_path(model_dir, directory=True) as run_directory:
                    yield keras_file, run_directory
                renamed = True
    except BaseException:
        if renamed:
            shutil.rmtree(model_dir, ignore_errors=True)
        for directory in made:  # deepest first; only the ones made here, and only if empty
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise


def save_run(model_dir, config, model):
    """`vdm_tf.runs.save_run`, with TensorFlow's checkpoint-writer errors (a full disk, a
    permission) raised as the OSError they are, so the command line reports them in one line."""
    import tensorflow as tf

    from vdm_tf import runs

    try:
        runs.save_run(model_dir, config, model)
    except tf.errors.OpError as error:  # "{{function_node ...}} PATH; No space left on device [Op:SaveV2]"
        raise files.io_error(error) or OSError(
            re.sub(r"\s*\[Op:\w+\]$", "", error.message).rsplit("; ", 1)[-1]
        ) from None


def _missing_parents(path):
    """The directories above `path` that do not exist yet, deepest first."""
    missing, parent = [], os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    return missing


def main(argv=None):
    """`python -m vdm_tf.convert ...`: everything checked before TensorFlow starts, then converted.

    The arguments, the outputs' places, the official config and the whole checkpoint are read
    and checked first (msgpack and NumPy only); then TensorFlow starts (`vdm_tf.cli.start`),
    the model is built and the outputs are written whole or not at all (`written_together`).
    Raises `cli.Failure` or `OSError` (one line each) for `cli.run` to report.
    """
    args = parse_args(argv)
    check_outputs(args.output, args.model_dir)
    if args.dataset not in dataset_table.NAMES:
        raise cli.Failure(f"--dataset must be one of {', '.join(dataset_table.NAMES)}; got {args.dataset!r}.")
    if args.preset and args.source != "vdm":
        raise cli.Failure(
            f"--preset names a released VDM configuration; with --source={args.source} give --official_config."
        )
    try:
        if args.source == "mulan":
            from vdm_tf import convert_mulan  # it builds on this module's readers

            shape = tuple(dataset_table.info(args.dataset).image_shape)
            if shape != convert_mulan.IMAGE_SHAPE:
                raise ConversionError(f"the official MuLAN models 32x32x3 images; --dataset={args.dataset}: {shape}.")
            config = convert_mulan.official_config(args.official_config)
            params = convert_mulan.read_weights(args.checkpoint, args.weights)
            n_features = convert_mulan.check_params(flatten(params), config)
            run = convert_mulan.run_config(config, n_features, args.dataset)
            build = functools.partial(convert_mulan.mulan_from_official, params, config, args.dataset)
        else:
            config = official_config(args.preset or args.official_config, args.source)
            params = read_weights(args.checkpoint, args.weights)
            check_params(params, config, dataset_table.info(args.dataset).image_shape[-1])
            run = run_config(config, args.dataset)
            build = functools.partial(convert, params, config, args.dataset)
    except ValueError as error:  # ConversionError, or a value the run's Config refuses
        raise cli.Failure(str(error)) from None
    with written_together(args.output, args.model_dir) as (keras_file, run_directory):
        cli.start()
        model = build()
        model.save(keras_file)
        if run_directory:
            save_run(run_directory, run, model)
    count = sum(int(np.prod(v.shape)) for v in model.weights)
    print(f"{checkpoint_file(args.checkpoint)} ({args.weights}) -> {args.output}: {count:,} weights")
    if args.model_dir:
        print(f"run directory: {args.model_dir}")


if __name__ == "__main__":
    cli.run(main, prog=PROG)
