"""SavedModels for TF-Serving: the `likelihood` and `sample` signatures of a trained model.

    path = export.export_model(model, "runs/demo/export", name="vdm")   # -> runs/demo/export/vdm/1

The layout is TF-Serving's: `EXPORT_DIR/NAME/VERSION/` with a `saved_model.pb` (tag `serve`),
the variables and `assets.extra/tf_serving_warmup_requests`. Point the server's
`--model_base_path` at `EXPORT_DIR/NAME`; it serves the highest version and picks up new ones.

Signatures (all batch-first, see ARCHITECTURE.md, "SavedModel contract"). Every input is required: no
signature relies on SignatureDef `defaults`, which some TF-Serving builds do not fill, so a
request works when the server passes exactly the inputs the client sent. A variant that needs
another input is another signature.

- `likelihood` (also `serving_default`): `images` uint8 [N, H, W, C], `seed` int64 scalar
  -> `bpd`, `diffusion_bpd`, `prior_bpd`, `reconstruction_bpd` (every term of the model: a MuLAN's
  also `latent_kl_bpd`), float32 [N]. The mean of
  `time_samples` antithetic estimates per image, the numbers of
  `model.elbo(images, seed, num_time_samples=time_samples)`.
- `sample`: `num_samples`, `num_steps` int32 scalars, `seed` int64 scalar -> `images` uint8
  [num_samples, H, W, C]: the ancestral sampler, `model.sample`.

With `score_sde=True` (`--export_score_sde`) also, on the samplers and likelihood of
`vdm_tf.samplers` and `vdm_tf.likelihood`:

- `sample_pc`: `num_samples`, `num_steps`, `seed` -> `images`: the predictor-corrector sampler.
- `sample_ode`: `num_samples`, `seed` -> `images`: the adaptive probability-flow ODE sampler
  (no step count: the solver picks its steps for the export's `ode_tolerance`).
- `exact_likelihood`: `images`, `seed` -> `bpd` float32 [N] and `nfe` int32 scalar:
  `vdm_tf.likelihood.ode_bpd` (probability-flow ODE, Hutchinson trace; the dequantization and
  the solver tolerance are export-time settings). For a `vdm_tf.MuLAN` it is `model.ode_bpd`
  (the official exact likelihood; its `num_importance` is the export-time `importance_samples`)
  and the only Score-SDE signature: a MuLAN's per-pixel process given its latent has no
  per-example SDE for the other three.
- `inpaint`: `images`, `mask` uint8 of the same shape (non-zero: known), `seed` int64,
  `num_steps` and `resample` int32 scalars -> `images` uint8: `vdm_tf.conditional.inpaint`,
  known pixels unchanged.

For a `vdm_tf.cdm.CDM`, `likelihood` returns only `bpd` (the one-step density averaged over
`time_samples` dequantisations), and `one_step_likelihood` (`images`, `seed` -> `bpd` float32
[N]) is its single-draw `one_step_bpd`: densities at the dequantised pixels, not bounds.

Limits per request (defaults, `ServingModule` arguments): 1..1024 images, 1..256 samples,
1..4096 steps, 1..50 RePaint resamplings; `export.client` splits larger batches into several
requests.

Every input is validated inside the graph, so TF-Serving answers a bad request with
INVALID_ARGUMENT and a message naming the expected form, and keeps serving. The input specs are
deliberately loose (any shape): a tight spec would make TensorFlow's loader refuse a wrong rank
with a Python TypeError before the graph runs, and TF-Serving does not check shapes at all.
"""

import errno
import os
import subprocess
import sys

import numpy as np
import tensorflow as tf

from vdm_tf import cdm, conditional, files, likelihood, samplers, seeding
from vdm_tf.models.mulan import MuLAN

LIKELIHOOD_OUTPUTS = ("bpd", "diffusion_bpd", "prior_bpd", "reconstruction_bpd")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
IMAGES = tf.TensorSpec(None, tf.uint8, name="images")
MASK = tf.TensorSpec(None, tf.uint8, name="mask")
SEED = tf.TensorSpec(None, tf.int64, name="seed")
NUM_SAMPLES = tf.TensorSpec(None, tf.int32, name="num_samples")
NUM_STEPS = tf.TensorSpec(None, tf.int32, name="num_steps")
RESAMPLE = tf.TensorSpec(None, tf.int32, name="resample")


def _shape_of_rank_4(tensor):
    """tf.shape(tensor) cut or padded with zeros to 4 entries: comparable whatever the rank."""
    return tf.concat([tf.shape(tensor), tf.zeros([4], tf.int32)], axis=0)[:4]


class ServingModule(tf.Module):
    """The exported graphs of one trained model.

    Args:
        model: a trained `vdm_tf.VDM` (EMA weights already in place).
        time_samples: antithetic time samples per image in `likelihood`.
        max_batch_size: largest N of `images` accepted by every signature that takes images;
            None: `export.client.MAX_IMAGES_PER_REQUEST` (1024), the limit the client assumes.
        max_num_samples: largest `num_samples` accepted by the `sample*` signatures; None:
            `export.client.MAX_SAMPLES_PER_REQUEST` (256).
        max_num_steps: largest `num_steps` accepted by `sample`, `sample_pc` and `inpaint`.
        max_resample: largest `resample` accepted by `inpaint`.
        dequantization: `"variational"` or `"uniform"`, for `exact_likelihood`; None picks
            `"variational"` when the model's SDE starts at its decoder's z_0 (a VDM) and
            `"uniform"` otherwise (a `ScoreSDEModel`).
        ode_tolerance: rtol = atol of the ODE solver in `exact_likelihood` and `sample_ode`.
        importance_samples: a MuLAN's `exact_likelihood` is `model.ode_bpd(...,
            num_importance=importance_samples)` (1: the official `--n_is=1`; other models ignore it).
        score_sde: also export the Score-SDE tools: `sample_pc`, `sample_ode`,
            `exact_likelihood` and `inpaint`. Off by default: their graphs (the adaptive ODE
            solver above all) take a minute or two to trace and save even for a small model.
    """

    def __init__(
        self,
        model,
        time_samples=8,
        max_batch_size=None,
        max_num_samples=None,
        max_num_steps=4096,
        max_resample=50,
        dequantization=None,
        ode_tolerance=1e-5,
        score_sde=False,
        importance_samples=1,
    ):
        # Imported here, not at the top: `python -m export.client` imports this package first,
        # and runpy warns when the module it runs is already imported.
        from export.client import MAX_IMAGES_PER_REQUEST, MAX_SAMPLES_PER_REQUEST

        super().__init__(name="vdm_serving")
        self._keep_untracked(model)
        # The SavedModel stores the model's raw tf.Variables, the ones the graphs read (as
        # keras.export.ExportArchive does). Tracking the Keras model itself would also export
        # Keras's wrapper variables, and TF-Serving's graph-mode loader (like saved_model_cli)
        # would restore those and leave the variables the graphs read uninitialised.
        self.served_variables = [variable.value for variable in model.variables]
        self.image_shape = tuple(int(d) for d in model.image_shape)
        self.time_samples = int(time_samples)
        self.max_batch_size = int(MAX_IMAGES_PER_REQUEST if max_batch_size is None else max_batch_size)
        self.max_num_samples = int(MAX_SAMPLES_PER_REQUEST if max_num_samples is None else max_num_samples)
        self.max_num_steps = int(max_num_steps)
        self.max_resample = int(max_resample)
        if dequantization is None:
            process = getattr(model, "sde", None)  # a multi-scale model has none
            dequantization = "variational" if process is not None and process.t_min == 0.0 else "uniform"
        self.dequantization = dequantization
        self.ode_tolerance = float(ode_tolerance)
        self.score_sde = bool(score_sde)
        self.importance_samples = int(importance_samples)
        # The optional signatures become tf.functions only when exported: saving traces every
        # tf.function of the module, and the ODE solver's graph alone takes a minute to trace.
        self.optional_signatures = {}
        if self.score_sde and isinstance(model, MuLAN):
            self.exact_likelihood = tf.function(self._exact_likelihood, input_signature=[IMAGES, SEED])
            self.optional_signatures["exact_likelihood"] = self.exact_likelihood
        elif self.score_sde:
            self.sample_pc = tf.function(self._sample_pc, input_signature=[NUM_SAMPLES, NUM_STEPS, SEED])
            self.sample_ode = tf.function(self._sample_ode, input_signature=[NUM_SAMPLES, SEED])
            self.exact_likelihood = tf.function(self._exact_likelihood, input_signature=[IMAGES, SEED])
            self.inpaint = tf.function(self._inpaint, input_signature=[IMAGES, MASK, SEED, NUM_STEPS, RESAMPLE])
            self.optional_signatures.update(
                sample_pc=self.sample_pc,
                sample_ode=self.sample_ode,
                exact_likelihood=self.exact_likelihood,
                inpaint=self.inpaint,
            )
        if isinstance(model, cdm.CDM):
            self.one_step_likelihood = tf.function(self._one_step_likelihood, input_signature=[IMAGES, SEED])
            self.optional_signatures["one_step_likelihood"] = self.one_step_likelihood

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def _keep_untracked(self, model):
        self.model = model

    def _valid_images(self, images):
        height, width, channels = self.image_shape
        expected = f"uint8 images of shape [N, {height}, {width}, {channels}] with 1 <= N <= {self.max_batch_size}"
        shape = tf.shape(images)
        padded = _shape_of_rank_4(images)
        good_shape = (
            tf.equal(tf.rank(images), 4)
            & tf.reduce_all(tf.equal(padded[1:], self.image_shape))
            & (padded[0] >= 1)
            & (padded[0] <= self.max_batch_size)
        )
        check = tf.debugging.Assert(good_shape, [f"images: expected {expected}; got shape", shape], summarize=8)
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(images), (None,) + self.image_shape)

    def _valid_mask(self, mask, images):
        expected = "mask: expected uint8 with the shape of the images, [N, H, W, C] (non-zero: known pixel)"
        same_shape = tf.equal(tf.rank(mask), 4) & tf.reduce_all(tf.equal(_shape_of_rank_4(mask), tf.shape(images)))
        check = tf.debugging.Assert(same_shape, [f"{expected}; got shape", tf.shape(mask)], summarize=8)
        with tf.control_dependencies([check]):
            return tf.ensure_shape(tf.identity(mask), (None,) + self.image_shape) > 0

    def _valid_scalar(self, value, name, low=None, high=None):
        """`value` as a scalar, after checking its rank and (for counts) its range [low, high]."""
        expected = f"{name}: expected a {value.dtype.name} scalar"
        checks = [tf.debugging.Assert(tf.equal(tf.rank(value), 0), [f"{expected}; got shape", tf.shape(value)])]
        with tf.control_dependencies(checks):
            value = tf.reshape(value, [])
        if low is not None:
            in_range = (value >= low) & (value <= high)
            checks = [tf.debugging.Assert(in_range, [f"{expected} in {low}..{high}; got", value])]
            with tf.control_dependencies(checks):
                value = tf.identity(value)
        return value

    def _valid_seed(self, seed):
        return seeding.as_seed(self._valid_scalar(seed, "seed"))

    def _valid_num_samples(self, num_samples):
        return self._valid_scalar(num_samples, "num_samples", 1, self.max_num_samples)

    def _valid_num_steps(self, num_steps):
        return self._valid_scalar(num_steps, "num_steps", 1, self.max_num_steps)

    def _images_out(self, images):
        return {"images": tf.ensure_shape(images, (None,) + self.image_shape)}

    @tf.function(input_signature=[IMAGES, SEED])
    def likelihood(self, images, seed):
        terms = self.model.elbo_graph(
            self._valid_images(images), self._valid_seed(seed), tf.constant(self.time_samples, tf.int32)
        )
        # Every term the model reports, as `NAME_bpd`: a VDM's are LIKELIHOOD_OUTPUTS, a MuLAN's add
        # `latent_kl_bpd`, a CDM's `elbo_graph` gives its one-step `bpd` only.
        return {name if name == "bpd" else f"{name}_bpd": value for name, value in terms.items()}

    def _one_step_likelihood(self, images, seed):
        return {"bpd": self.model.one_step_bpd_graph(self._valid_images(images), self._valid_seed(seed))}

    @tf.function(input_signature=[NUM_SAMPLES, NUM_STEPS, SEED])
    def sample(self, num_samples, num_steps, seed):
        num_samples, num_steps = self._valid_num_samples(num_samples), self._valid_num_steps(num_steps)
        samples = self.model.sample_graph(num_samples, num_steps, self._valid_seed(seed), tf.constant(False))
        return self._images_out(samples)

    def _sample_pc(self, num_samples, num_steps, seed):
        num_samples, num_steps = self._valid_num_samples(num_samples), self._valid_num_steps(num_steps)
        return self._images_out(samplers.sample(self.model, num_samples, "pc", num_steps, self._valid_seed(seed)))

    def _sample_ode(self, num_samples, seed):
        num_samples, seed = self._valid_num_samples(num_samples), self._valid_seed(seed)
        tolerance = {"rtol": self.ode_tolerance, "atol": self.ode_tolerance}
        return self._images_out(samplers.sample(self.model, num_samples, "ode", seed=seed, **tolerance))

    def _exact_likelihood(self, images, seed):
        images, seed = self._valid_images(images), self._valid_seed(seed)
        tolerance = {"rtol": self.ode_tolerance, "atol": self.ode_tolerance}
        if isinstance(self.model, MuLAN):
            out = self.model.ode_bpd(images, seed, num_importance=self.importance_samples, **tolerance)
        else:
            out = likelihood.ode_bpd(self.model, images, seed, self.dequantization, **tolerance)
        return {"bpd": out["bpd"], "nfe": out["nfe"]}

    def _inpaint(self, images, mask, seed, num_steps, resample):
        images = self._valid_images(images)
        mask = self._valid_mask(mask, images)
        seed, num_steps = self._valid_seed(seed), self._valid_num_steps(num_steps)
        resample = self._valid_scalar(resample, "resample", 1, self.max_resample)
        return self._images_out(conditional.inpaint(self.model, images, mask, num_steps, seed, resample))


def next_version(base_path):
    """1 + the highest integer version under `base_path` (1 for a new model)."""
    if not tf.io.gfile.exists(base_path):
        return 1
    names = [name.strip("/") for name in tf.io.gfile.listdir(base_path)]
    return max((int(name) for name in names if name.isdigit()), default=0) + 1


def export_model(model, export_dir, name="vdm", version=None, warmup=True, **serving_options):
    """Writes `model` as a TF-Serving SavedModel in `export_dir/name/version/`.

    The version is written under a temporary name and renamed when complete, so a server that
    polls `export_dir/name` never loads a half-written model.

    Args:
        model: a trained `vdm_tf.VDM`, with the weights to serve (the EMA weights: see
            `trainers.train.restore_for_inference`).
        export_dir: the directory of exported models (`--model_base_path` is `export_dir/name`).
        name: the model name clients ask for.
        version: integer version; default: one more than the highest one present.
        warmup: also write `assets.extra/tf_serving_warmup_requests` (one small request per
            signature of bounded cost: all but the adaptive ODE ones), which TF-Serving replays
            before it reports the model ready, so the first client does not pay for graph
            optimisation.
        **serving_options: `time_samples`, `max_batch_size`, `max_num_samples`, `max_num_steps`,
            `max_resample`, `dequantization`, `ode_tolerance`, `score_sde`, `importance_samples` of
            `ServingModule`.

    Returns:
        The path of the written version directory.
    """
    base_path = os.path.join(export_dir, name)
    version = next_version(base_path) if version is None else int(version)
    final_path = os.path.join(base_path, str(version))
    if tf.io.gfile.exists(final_path):
        raise FileExistsError(f"{final_path} exists; choose another version or delete it.")
    module = ServingModule(model, **serving_options)
    signatures = {"serving_default": module.likelihood, "likelihood": module.likelihood, "sample": module.sample}
    signatures.update(module.optional_signatures)

    def write(path):
        # Serving needs no gradients; saving the ODE solver's custom (adjoint) gradient would cost
        # minutes and gigabytes.
        options = tf.saved_model.SaveOptions(experimental_custom_gradients=False)
        try:
            tf.saved_model.save(module, path, signatures=signatures, options=options)
            if warmup:
                write_warmup_requests(path, name, module.image_shape, signatures)
        except tf.errors.OpError as error:  # a full disk, a permission: an OSError, one line
            raise files.io_error(error) or OSError(errno.EIO, " ".join(error.message.split())[:200]) from None

    if "://" not in final_path:
        # A hidden temporary beside the version (`.1-partial-k2j3`: not a version number, so
        # TF-Serving skips it), renamed when complete and removed on any failure.
        with files.atomic_path(final_path, directory=True) as temporary:
            write(temporary)
        return final_path
    # An object store (gs://): written under a temporary name, then renamed.
    temporary_path = os.path.join(base_path, f".tmp-{version}")
    if tf.io.gfile.exists(temporary_path):
        tf.io.gfile.rmtree(temporary_path)
    write(temporary_path)
    tf.io.gfile.rename(temporary_path, final_path)
    return final_path


def warmup_inputs(image_shape):
    """One small request per warmed signature: {signature: {input: numpy value}}.

    The ODE signatures (`sample_ode`, `exact_likelihood`) are left out: their solver picks its
    own number of steps, so a warm-up request could hold the model's loading for minutes.
    """
    image = np.zeros((1,) + tuple(image_shape), np.uint8)
    seed = np.int64(0)
    few_samples = {"num_samples": np.int32(1), "num_steps": np.int32(2), "seed": seed}
    return {
        "likelihood": {"images": image, "seed": seed},
        "one_step_likelihood": {"images": image, "seed": seed},
        "sample": few_samples,
        "sample_pc": few_samples,
        "inpaint": {"images": image, "mask": image, "seed": seed, "num_steps": np.int32(2), "resample": np.int32(1)},
    }


def write_warmup_requests(saved_model_path, name, image_shape, signatures):
    """TF-Serving's warm-up file: PredictionLog records replayed when the model loads.

    One record per signature of `warmup_inputs` that is among `signatures` (names).
    """
    from tensorflow_serving.apis import model_pb2, predict_pb2, prediction_log_pb2

    path = os.path.join(saved_model_path, WARMUP_FILE)
    tf.io.gfile.makedirs(os.path.dirname(path))
    with tf.io.TFRecordWriter(path) as writer:
        for signature, inputs in warmup_inputs(image_shape).items():
            if signature not in signatures:
                continue
            spec = model_pb2.ModelSpec(name=name, signature_name=signature)
            request = predict_pb2.PredictRequest(model_spec=spec)
            for key, value in inputs.items():
                request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
            record = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(record.SerializeToString())


def signature_summary(path):
    """What `saved_model_cli show --dir PATH --all` says about the signatures of an export."""
    command = [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli", "show", "--dir", path, "--all"]
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    shown = subprocess.run(command, capture_output=True, text=True, check=True, env=environment).stdout
    signatures = shown.split("\nConcrete Functions:")[0]
    return signatures.split("\nThe MetaGraph with tag set")[0].strip()  # drop the list of ops
