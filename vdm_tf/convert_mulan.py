"""Official MuLAN checkpoints (s-sahoo/MuLAN; JAX/Flax) as `vdm_tf.MuLAN` models.

    python -m vdm_tf.convert --source=mulan --checkpoint=checkpoints-0 --official_config=model.json \
        --output=mulan.keras

The official code (Sahoo et al. 2024, github s-sahoo/MuLAN at e49dcc1; /work/notes/mulan_spec.md
gives file:line for every piece) trains with the VDM experiment's `TrainState` and clu checkpoints
(`ldm/experiment.py`), so the file is read as VDM's (`vdm_tf.convert.read_checkpoint`). Its
parameters are three modules, each mapped weight for weight:

- `score_model`: the VDM `ScoreUNet` (`vdm_tf.convert.official_layout`) whose `dense0` takes the
  time embedding *and* the latent (`z_conditioning=True`): all its rows are kept, and the
  vdm_tf network is `ScoreUNet(conditioning_dim=latent_size)`;
- `encoder_model`: the `UnetEncoder` -> `vdm_tf.models.mulan.LatentEncoder` (the ScoreUNet's
  down path and middle with the same names; its `dense0` has one row more, multiplying a constant
  zero, which is dropped; `conv_out` to one channel; `dense_layer_final` -> `dense_out`);
- `gamma`: `NoiseSchedule_polynomial_fixedend` -> `PolynomialSchedule` (`dense_1`, `dense_2`,
  `dense_out_a`, `dense_out_b`, `dense_out_c`; the hidden width `n_features` is read from the
  checkpoint: the released code uses 3072).

The configuration is the official `config.model` fields plus the top-level `vdm_type` as one JSON
object (`official_config`). The official code hard-codes 32x32x3 images. What vdm_tf cannot
represent is refused in one line (`ConversionError`): discrete time (`sm_n_timesteps` > 0), other
encoders, latents, schedules or denoisers, the label-conditioned model (`reparam_type` other
than `true`), the unconditioned denoiser (`z_conditioning` false), gumbel top-k noise and
`velocity_from_epsilon`. Fields that only change how the official code trains or samples
(`antithetic_time_sampling`, `sample_softmax`, `importance_sampling`, `sigma_prior`, ...) do not
change the model and are accepted whatever their values.
"""

import math

import numpy as np

from vdm_tf import dataset_table
from vdm_tf.convert import (
    _TYPE_NAMES,
    ConversionError,
    Weight,
    _described,
    _is_of_type,
    _json_kind,
    _read_json,
    check_layout,
    flatten,
    read_checkpoint,
)
from vdm_tf.convert import (
    official_layout as score_unet_layout,
)
from vdm_tf.run_config import Config, DataConfig, ModelConfig, NetworkConfig, ScheduleConfig

VDM_TYPES = {"mulan_epsilon": "eps", "mulan_velocity": "velocity"}
IMAGE_SHAPE = (32, 32, 3)  # the official code's (model_mulan_epsilon.py:282, 483, 488)

# The official `VDMConfig` fields (MuLAN's ldm/model_vdm.py:34-84) that decide the model, and
# their types; `vdm_type` is the top-level config field choosing the VDM class.
MODEL_FIELDS = {
    "vdm_type": str,
    "unet_type": str,
    "encoder": str,
    "latent_type": str,
    "gamma_type": str,
    "reparam_type": str,
    "z_conditioning": bool,
    "topk_noise_type": str,
    "velocity_from_epsilon": bool,
    "vocab_size": int,
    "with_fourier_features": bool,
    "with_attention": bool,
    "gamma_min": float,
    "gamma_max": float,
    "sm_n_timesteps": int,
    "sm_n_embd": int,
    "sm_n_layer": int,
    "sm_pdrop": float,
    "forward_n_layer": int,
    "latent_size": int,
    "latent_k": int,
}
# The other `VDMConfig` fields: read nowhere on the converted model's path (training, sampling or
# other model types only); accepted if of the right type.
OTHER_FIELDS = {
    "sample_softmax": bool,
    "antithetic_time_sampling": bool,
    "forward_type": int,
    "sigma_type": str,
    "sigma_min": float,
    "sigma_max": float,
    "sm_mult": float,
    "sigma_prior": float,
    "blur_noise": bool,
    "sigma_recons_type": str,
    "loss_type": str,
    "nn_input": str,
    "condition": str,
    "epsilon": float,
    "model_time": bool,
    "monotone_layer": str,
    "importance_sampling": bool,
    "trace_matching": bool,
}
# What vdm_tf represents, per field (value -> why it is needed).
REQUIRED_VALUES = {
    "unet_type": ("vdm", "the denoiser is the VDM ScoreUNet (ldm_unet.UNet is not ported)"),
    "encoder": ("unet", "the latent's encoder is the UnetEncoder (LatentEncoder)"),
    "latent_type": ("topk", "the latent is the k-hot top-k latent"),
    "gamma_type": ("poly_fixedend", "the schedule is the fixed-end polynomial (PolynomialSchedule)"),
    "reparam_type": ("true", "the latent is inferred from the image (not the class label)"),
    "z_conditioning": (True, "the denoiser is conditioned on the latent"),
    "sm_n_timesteps": (0, "vdm_tf's MuLAN is the continuous-time model"),
    "vocab_size": (256, "vdm_tf models 8-bit images"),
}


def official_config(config):
    """The official config fields from a dict or a JSON file (`config.model`'s fields and `vdm_type`),
    type-checked and checked to be a model vdm_tf represents.

    A JSON file may hold the fields themselves or a whole official config with `model` and
    `vdm_type` at its top level.

    Raises:
        ConversionError: one line naming the file and the field.
    """
    where = "official config"
    if isinstance(config, dict):
        fields = dict(config)
    else:
        where = f"official config {config}"
        fields = _read_json(config)
        if isinstance(fields, dict) and isinstance(fields.get("model"), dict):
            fields = dict(fields["model"], **({"vdm_type": fields["vdm_type"]} if "vdm_type" in fields else {}))
        if not isinstance(fields, dict):
            raise ConversionError(f"{where}: expected a JSON object of MuLAN config fields; got {_json_kind(fields)}.")
    fields.pop("sm_kernel_init", None)  # an initializer: irrelevant to trained weights
    types = MODEL_FIELDS | OTHER_FIELDS
    unknown = sorted(set(fields) - set(types))
    missing = [name for name in MODEL_FIELDS if name not in fields]
    if unknown or missing:
        problem = f"unknown fields {', '.join(unknown)}" if unknown else f"missing fields {', '.join(missing)}"
        raise ConversionError(f"{where}: {problem}; a MuLAN config needs {', '.join(MODEL_FIELDS)}.")
    for name, value in fields.items():
        if not _is_of_type(value, types[name]):
            raise ConversionError(f"{where}: {name}: expected {_TYPE_NAMES[types[name]]}; got {_described(value)}.")
    if fields["vdm_type"] not in VDM_TYPES:
        raise ConversionError(
            f"{where}: vdm_type: expected one of {', '.join(VDM_TYPES)}; got {_described(fields['vdm_type'])}."
        )
    for name, (value, why) in REQUIRED_VALUES.items():
        if fields[name] != value:
            raise ConversionError(f"{where}: {name}={fields[name]!r} cannot be converted: {why} ({name}={value!r}).")
    if fields["vdm_type"] == "mulan_epsilon" and fields["topk_noise_type"] != "gamma":
        raise ConversionError(
            f"{where}: topk_noise_type={fields['topk_noise_type']!r} cannot be converted: vdm_tf perturbs the "
            "top-k logits with sum-of-gamma noise (topk_noise_type='gamma')."
        )
    if fields["vdm_type"] == "mulan_velocity" and fields["velocity_from_epsilon"]:
        raise ConversionError(
            f"{where}: velocity_from_epsilon=true cannot be converted: vdm_tf's velocity model predicts the "
            "velocity itself (velocity_from_epsilon=false)."
        )
    for name in ("gamma_min", "gamma_max"):
        if not math.isfinite(fields[name]):
            raise ConversionError(f"{where}: {name}: expected a finite number; got {fields[name]}.")
    if not fields["gamma_max"] > fields["gamma_min"]:
        raise ConversionError(
            f"{where}: gamma_max must exceed gamma_min; got {fields['gamma_max']} <= {fields['gamma_min']}."
        )
    for name, lowest in (("sm_n_embd", 1), ("sm_n_layer", 1), ("forward_n_layer", 0), ("latent_size", 2)):
        if fields[name] < lowest:
            raise ConversionError(f"{where}: {name}: expected an integer >= {lowest}; got {fields[name]}.")
    if not 1 <= fields["latent_k"] < fields["latent_size"]:
        raise ConversionError(
            f"{where}: latent_k: expected 1..latent_size - 1 = {fields['latent_size'] - 1}; got {fields['latent_k']}."
        )
    if not 0 <= fields["sm_pdrop"] < 1:
        raise ConversionError(f"{where}: sm_pdrop: expected a dropout rate in [0, 1); got {fields['sm_pdrop']}.")
    return fields


def read_weights(path, weights="ema_params"):
    """The parameter tree `weights` (`ema_params`, what the official evaluation uses, or `params`)."""
    if weights not in ("ema_params", "params"):
        raise ConversionError(f"weights must be ema_params or params; got {weights!r}.")
    tree = read_checkpoint(path, keys=(weights,)).get(weights)
    if isinstance(tree, dict) and set(tree) == {"params"}:  # saved as flax variables
        tree = tree["params"]
    if not isinstance(tree, dict) or not {"score_model", "encoder_model", "gamma"} <= set(tree):
        raise ConversionError(f"{path}: {weights} lacks score_model, encoder_model or gamma: not a MuLAN checkpoint.")
    return tree


def official_layout(config, n_features):
    """Every parameter of the official MuLAN with `config`, as `Weight`s whose `target` starts with
    the `vdm_tf.MuLAN` attribute holding it (`denoiser`, `encoder`, `schedule`)."""
    width, latent = config["sm_n_embd"], config["latent_size"]
    trunk = {**config, "gamma_type": "fixed"}  # the VDM ScoreUNet's weights only
    layout = []
    for weight in score_unet_layout(trunk, IMAGE_SHAPE[-1]):
        if weight.path == "score_model/dense0/kernel":  # time embedding and latent: every row
            weight = Weight(weight.path, (width + latent, 4 * width), weight.target)
        layout.append(weight._replace(target=("denoiser",) + weight.target))
    # The encoder: the ScoreUNet's down path and middle, with forward_n_layer blocks.
    for weight in score_unet_layout({**trunk, "sm_n_layer": config["forward_n_layer"]}, IMAGE_SHAPE[-1]):
        name = weight.path.split("/")[1]
        if name.startswith("up.") or name == "conv_out":
            continue
        layout.append(
            weight._replace(
                path="encoder_model/" + weight.path[len("score_model/") :], target=("encoder",) + weight.target
            )
        )
    pixels = IMAGE_SHAPE[0] * IMAGE_SHAPE[1]
    layout += [
        Weight("encoder_model/conv_out/kernel", (3, 3, width, 1), ("encoder", "conv_out", "kernel")),
        Weight("encoder_model/conv_out/bias", (1,), ("encoder", "conv_out", "bias")),
        Weight("encoder_model/dense_layer_final/kernel", (pixels, latent), ("encoder", "dense_out", "kernel")),
        Weight("encoder_model/dense_layer_final/bias", (latent,), ("encoder", "dense_out", "bias")),
    ]
    dims = math.prod(IMAGE_SHAPE)
    for name, fan_in, fan_out in (
        ("dense_1", latent, n_features),
        ("dense_2", n_features, n_features),
        ("dense_out_a", n_features, dims),
        ("dense_out_b", n_features, dims),
        ("dense_out_c", n_features, dims),
    ):
        layout.append(Weight(f"gamma/{name}/kernel", (fan_in, fan_out), ("schedule", name, "kernel")))
        layout.append(Weight(f"gamma/{name}/bias", (fan_out,), ("schedule", name, "bias")))
    return layout


def check_params(flat, config):
    """The schedule's hidden width; ConversionError naming the parameter unless `flat` fits `config`."""
    kernel = flat.get("gamma/dense_1/kernel")
    if kernel is None or kernel.ndim != 2:
        raise ConversionError(
            "the checkpoint has no gamma/dense_1/kernel [latent_size, n_features]: not poly_fixedend."
        )
    n_features = int(kernel.shape[1])
    check_layout(flat, official_layout(config, n_features))
    return n_features


def run_config(config, n_features, dataset="cifar10"):
    """The `vdm_tf.runs.Config` (`model.kind=mulan`) of the official model `config`."""
    return Config(
        data=DataConfig(dataset=dataset),
        model=ModelConfig(
            kind="mulan",
            timesteps=0,
            parameterization=VDM_TYPES[config["vdm_type"]],
            latent_size=config["latent_size"],
            latent_k=config["latent_k"],
            encoder_layers=config["forward_n_layer"],
            schedule_features=n_features,
        ),
        schedule=ScheduleConfig(gamma_min=config["gamma_min"], gamma_max=config["gamma_max"], minimize_variance=False),
        network=NetworkConfig(
            n_layers=config["sm_n_layer"],
            n_embd=config["sm_n_embd"],
            dropout=config["sm_pdrop"],
            fourier_features=config["with_fourier_features"],
            fourier_exponents=(7, 8),  # Base2FourierFeatures(start=6, stop=8)
            attention=config["with_attention"],
        ),
    )


def mulan_from_official(params, official_config_fields, dataset="cifar10"):
    """A `vdm_tf.MuLAN` equal to the official MuLAN with parameters `params` and config fields.

    Args:
        params: the official parameter tree (`read_weights`): `score_model`, `encoder_model`, `gamma`.
        official_config_fields: the official fields (`official_config`, or a dict it accepts).
        dataset: the vdm_tf data set whose images the model scores (32x32x3, as the official code).

    Returns:
        the model; its `runs.Config` is `run_config(config, n_features, dataset)`.
    """
    config = official_config(official_config_fields)
    shape = tuple(dataset_table.info(dataset).image_shape)
    if shape != IMAGE_SHAPE:
        raise ConversionError(f"the official MuLAN models 32x32x3 images; data set {dataset} has {shape}.")
    flat = flatten(params)
    n_features = check_params(flat, config)  # before building anything
    from vdm_tf import runs  # TensorFlow: after the checks

    model = runs.build_model(run_config(config, n_features, dataset))
    model.build()
    assigned = set()
    for weight in official_layout(config, n_features):
        variable = model
        for part in weight.target:
            variable = variable[part] if isinstance(part, int) else getattr(variable, part)
        variable.assign(flat[weight.path][weight.row_slice].astype(np.float32))
        assigned.add(id(variable))
    unassigned = [v.path for v in model.weights if id(v) not in assigned and v.trainable]
    if unassigned:  # the layout and vdm_tf's MuLAN disagree: a bug, not a user error
        raise RuntimeError(f"official_layout leaves vdm_tf weights unassigned: {unassigned}")
    return model


def from_checkpoint(checkpoint, config, weights="ema_params", dataset="cifar10"):
    """Reads and converts an official MuLAN checkpoint (`.flax` file, clu prefix or directory) with
    its config (a dict or the path of a JSON file, `official_config`).

    Example:
    >>> model = vdm_tf.convert_mulan.from_checkpoint("checkpoints-0", "mulan_velocity.json")
    >>> model.elbo(cifar10_test_images)["bpd"]
    """
    fields = official_config(config)
    return mulan_from_official(read_weights(checkpoint, weights), fields, dataset)
