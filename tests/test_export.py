"""SavedModel export: layout, signatures equal to the in-process model, validation inside the graph."""

import os
import subprocess
import sys
from concurrent import futures

import exported_model
import numpy as np
import pytest
import tensorflow as tf
from exported_model import (
    IMAGE_SHAPE,
    ODE_TOLERANCE,
    SIGNATURE_INPUTS,
    TIME_SAMPLES,
    assert_outputs_equal,
    expected_outputs,
    random_images,
)
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from export import saved_model
from vdm_tf import conditional, likelihood, samplers

SCORE_SDE_SIGNATURES = {"sample_pc", "sample_ode", "exact_likelihood", "inpaint"}
# Session fixtures (conftest imports `exported` only).
small_exports, served = exported_model.small_exports, exported_model.served


def signature_defs(path):
    """The SignatureDefs of the `serve` MetaGraph, as TF-Serving reads them from saved_model.pb."""
    saved = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        saved.ParseFromString(f.read())
    (meta_graph,) = [m for m in saved.meta_graphs if "serve" in m.meta_info_def.tags]
    return {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}


def test_tf_serving_layout_with_versions(exported, tmp_path):
    model, export_dir, path, loaded = exported
    assert path == os.path.join(export_dir, "vdm", "1")
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    assert os.path.exists(os.path.join(path, "variables", "variables.index"))
    assert set(loaded.signatures) == {"serving_default", "likelihood", "sample"} | SCORE_SDE_SIGNATURES
    # Without score_sde: the three core signatures; each export adds a version.
    export_dir = str(tmp_path)
    first = saved_model.export_model(model, export_dir, warmup=False)
    assert set(tf.saved_model.load(first).signatures) == {"serving_default", "likelihood", "sample"}
    second = saved_model.export_model(model, export_dir, warmup=False)
    assert second == os.path.join(export_dir, "vdm", "2")
    assert sorted(os.listdir(os.path.join(export_dir, "vdm"))) == ["1", "2"]  # no temporary directory left
    with pytest.raises(FileExistsError, match="vdm/2 exists"):
        saved_model.export_model(model, export_dir, version=2)


def test_every_input_is_required_and_documented(exported, small_exports):
    """No SignatureDef has `defaults`, and each signature's inputs are the documented ones."""
    _, _, path, loaded = exported
    paths = [path] + [os.path.join(small_exports[1], name, "1") for name in small_exports[0]]
    for export_path in paths:
        for name, signature in signature_defs(export_path).items():
            assert not signature.defaults, (export_path, name, sorted(signature.defaults))
            assert set(signature.inputs) == SIGNATURE_INPUTS[name], (export_path, name)
    # TF's own loader runs `sample` with exactly the three documented inputs.
    inputs = {"num_samples": tf.constant(1), "num_steps": tf.constant(2), "seed": tf.constant(0, tf.int64)}
    assert loaded.signatures["sample"](**inputs)["images"].shape == (1, *IMAGE_SHAPE)


def test_warmup_records_are_complete_requests_that_give_the_models_numbers(exported, served):
    """Each PredictionLog record of the warm-up file, run by the strict loopback server, answers
    what the in-process model computes; every signature of bounded cost is warmed."""
    model, _, path, _ = exported
    warmed = []
    for record in tf.data.TFRecordDataset(os.path.join(path, saved_model.WARMUP_FILE)).as_numpy_iterator():
        request = prediction_log_pb2.PredictionLog.FromString(record).predict_log.request
        assert request.model_spec.name == "vdm"
        signature = request.model_spec.signature_name
        warmed.append(signature)
        response = served.service.predict(request)
        got = {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}
        inputs = {key: tf.make_ndarray(proto) for key, proto in request.inputs.items()}
        assert_outputs_equal(got, expected_outputs(model, signature, inputs))
    assert sorted(warmed) == ["inpaint", "likelihood", "sample", "sample_pc"]


def test_likelihood_signature_equals_model_elbo(exported):
    model, _, _, loaded = exported
    images = random_images(5)
    expected = model.elbo(images, seed=11, num_time_samples=TIME_SAMPLES)
    for name in ("likelihood", "serving_default"):
        got = loaded.signatures[name](images=tf.constant(images), seed=tf.constant(11, tf.int64))
        for term in ("bpd", "diffusion", "prior", "reconstruction"):
            key = "bpd" if term == "bpd" else f"{term}_bpd"
            np.testing.assert_allclose(got[key].numpy(), expected[term].numpy(), rtol=1e-6, atol=0)
    other_seed = loaded.signatures["likelihood"](images=tf.constant(images), seed=tf.constant(12, tf.int64))
    assert not np.allclose(other_seed["diffusion_bpd"].numpy(), expected["diffusion"].numpy())


def test_averaging_time_samples_narrows_the_estimate(exported):
    """K stratified time samples per image: the spread across seeds shrinks with K."""
    model, _, _, _ = exported
    images = random_images(1)
    spread = {
        k: np.std([model.elbo(images, seed=s, num_time_samples=k)["bpd"].numpy()[0] for s in range(12)]) for k in (1, 8)
    }
    assert spread[8] < 0.6 * spread[1], spread


def test_sample_signatures_equal_the_library_samplers(exported):
    """`sample` is the ancestral sampler; `sample_pc` and `sample_ode` are their own signatures."""
    model, _, _, loaded = exported
    count = {"num_samples": tf.constant(3), "seed": tf.constant(7, tf.int64)}
    got = loaded.signatures["sample"](num_steps=tf.constant(4), **count)["images"].numpy()
    assert got.dtype == np.uint8 and got.shape == (3, *IMAGE_SHAPE)
    np.testing.assert_array_equal(got, model.sample(3, num_steps=4, seed=7).numpy())
    got = loaded.signatures["sample_pc"](num_steps=tf.constant(4), **count)["images"]
    np.testing.assert_array_equal(got, samplers.sample(model, 3, "pc", num_steps=4, seed=7).numpy())
    tolerance = {"rtol": ODE_TOLERANCE, "atol": ODE_TOLERANCE}
    got = loaded.signatures["sample_ode"](**count)["images"]
    np.testing.assert_array_equal(got, samplers.sample(model, 3, "ode", seed=7, **tolerance).numpy())


def test_exact_likelihood_signature_equals_the_ode_bpd(exported):
    model, _, _, loaded = exported
    images = random_images(2, seed=3)
    got = loaded.signatures["exact_likelihood"](images=tf.constant(images), seed=tf.constant(4, tf.int64))
    tolerance = {"rtol": ODE_TOLERANCE, "atol": ODE_TOLERANCE}
    expected = likelihood.ode_bpd(model, images, seed=4, dequantization="variational", **tolerance)
    np.testing.assert_allclose(got["bpd"].numpy(), expected["bpd"].numpy(), rtol=1e-5)
    assert int(got["nfe"]) == int(expected["nfe"]) > 0


def test_inpaint_signature_keeps_known_pixels_and_equals_conditional_inpaint(exported):
    model, _, _, loaded = exported
    images = random_images(2, seed=5)
    mask = (np.random.default_rng(6).random(images.shape) < 0.5).astype(np.uint8)
    inputs = {"seed": tf.constant(8, tf.int64), "num_steps": tf.constant(5), "resample": tf.constant(2)}
    got = loaded.signatures["inpaint"](images=tf.constant(images), mask=tf.constant(mask), **inputs)["images"]
    np.testing.assert_array_equal(got.numpy()[mask > 0], images[mask > 0])
    expected = conditional.inpaint(model, images, mask, num_steps=5, seed=8, resample=2)
    np.testing.assert_array_equal(got.numpy(), expected.numpy())
    with pytest.raises(tf.errors.InvalidArgumentError, match="mask: expected uint8 with the shape of the images"):
        loaded.signatures["inpaint"](images=tf.constant(images), mask=tf.constant(mask[:1]), **inputs)


BAD_LIKELIHOOD = {
    "rank 3": np.zeros((8, 8, 1), np.uint8),
    "wrong size": np.zeros((2, 9, 9, 1), np.uint8),
    "rgb": np.zeros((2, 8, 8, 3), np.uint8),
    "empty batch": np.zeros((0, 8, 8, 1), np.uint8),
}


@pytest.mark.parametrize("case", sorted(BAD_LIKELIHOOD))
def test_bad_images_fail_inside_the_graph_with_the_expected_form(exported, case):
    _, _, _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"expected uint8 images of shape \[N, 8, 8, 1\]"):
        loaded.signatures["likelihood"](images=tf.constant(BAD_LIKELIHOOD[case]), seed=tf.constant(0, tf.int64))


@pytest.mark.parametrize(
    "inputs, message",
    [
        ({"num_samples": 65, "num_steps": 4}, r"num_samples: expected a int32 scalar in 1..64; got\] \[65"),
        ({"num_samples": 0, "num_steps": 4}, r"num_samples: expected a int32 scalar in 1..64"),
        ({"num_samples": 2, "num_steps": 0}, r"num_steps: expected a int32 scalar in 1..4096"),
        ({"num_samples": 2, "num_steps": 5000}, r"num_steps: expected a int32 scalar in 1..4096"),
        ({"num_samples": [2], "num_steps": 4}, r"num_samples: expected a int32 scalar; got shape"),
    ],
)
def test_bad_sample_requests_fail_with_the_expected_range(exported, inputs, message):
    _, _, _, loaded = exported
    tensors = {key: tf.constant(value, tf.int32) for key, value in inputs.items()}
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        loaded.signatures["sample"](seed=tf.constant(0, tf.int64), **tensors)


def test_seed_must_be_a_scalar(exported):
    _, _, _, loaded = exported
    with pytest.raises(tf.errors.InvalidArgumentError, match="seed: expected a int64 scalar"):
        loaded.signatures["likelihood"](images=tf.constant(random_images(1)), seed=tf.constant([1, 2], tf.int64))


def saved_model_cli(*args):
    command = [os.path.join(os.path.dirname(sys.executable), "saved_model_cli"), *args]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return completed.stdout


def run_signature_with_saved_model_cli(path, signature, out_dir, **inputs):
    """`saved_model_cli run` on .npy inputs; returns its outputs (one .npy file each)."""
    out_dir.mkdir()
    for name, value in inputs.items():
        np.save(out_dir / f"input_{name}.npy", value)
    arguments = ";".join(f"{name}={out_dir}/input_{name}.npy" for name in inputs)
    saved_model_cli(
        "run", "--dir", path, "--tag_set", "serve", "--signature_def", signature,
        "--inputs", arguments, "--outdir", str(out_dir),
    )  # fmt: skip
    return {f.stem: np.load(f) for f in out_dir.glob("*.npy") if not f.stem.startswith("input_")}


def test_saved_model_cli_shows_and_runs_both_signatures(exported, tmp_path):
    """The three saved_model_cli commands (independent processes, each starting TensorFlow) run
    side by side, while this process computes what they must answer."""
    model, _, path, _ = exported
    images = np.full((3, 8, 8, 1), 200, np.uint8)
    likelihood_inputs = {"images": images, "seed": np.int64(5)}
    sample_inputs = {"num_samples": np.int32(2), "num_steps": np.int32(3), "seed": np.int64(9)}
    with futures.ThreadPoolExecutor(3) as pool:
        shown = pool.submit(
            saved_model_cli, "show", "--dir", path, "--tag_set", "serve", "--signature_def", "likelihood"
        )
        likelihood = pool.submit(
            run_signature_with_saved_model_cli, path, "likelihood", tmp_path / "likelihood", **likelihood_inputs
        )
        sampled = pool.submit(run_signature_with_saved_model_cli, path, "sample", tmp_path / "sample", **sample_inputs)
        expected = model.elbo(images, seed=5, num_time_samples=TIME_SAMPLES)
        expected_samples = model.sample(2, 3, seed=9).numpy()
    assert "inputs['images'] tensor_info" in shown.result() and "outputs['bpd'] tensor_info" in shown.result()
    got = likelihood.result()
    np.testing.assert_allclose(got["bpd"], expected["bpd"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(got["reconstruction_bpd"], expected["reconstruction"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(sampled.result()["images"], expected_samples)


def test_a_score_sde_model_exports_and_its_score_sde_graphs_use_its_own_sde(small_exports):
    """A `ScoreSDEModel` (VE SDE) export serves its own ELBO and ancestral samples; the Score-SDE
    graphs (built in-process here: saving the ODE ones takes minutes) sample in the SDE's own
    coordinates and dequantize uniformly (its SDE starts at t_min > 0)."""
    models, export_dir = small_exports
    model = models["sde"]
    loaded = tf.saved_model.load(os.path.join(export_dir, "sde", "1"))
    assert set(loaded.signatures) == {"serving_default", "likelihood", "sample"}
    images = random_images(3, seed=4)
    inputs = {"images": images, "seed": np.int64(2)}
    got = loaded.signatures["likelihood"](**{k: tf.constant(v) for k, v in inputs.items()})
    assert_outputs_equal(got, expected_outputs(model, "likelihood", inputs))
    inputs = {"num_samples": np.int32(2), "num_steps": np.int32(3), "seed": np.int64(5)}
    got = loaded.signatures["sample"](**{k: tf.constant(v) for k, v in inputs.items()})
    assert_outputs_equal(got, expected_outputs(model, "sample", inputs))
    module = saved_model.ServingModule(model, time_samples=TIME_SAMPLES, score_sde=True)
    assert module.dequantization == "uniform"
    got = module.sample_pc(tf.constant(2), tf.constant(3), tf.constant(5, tf.int64))
    assert_outputs_equal(got, expected_outputs(model, "sample_pc", inputs))
    mask = (np.random.default_rng(1).random(images.shape) < 0.5).astype(np.uint8)
    inputs = {"images": images, "mask": mask, "seed": np.int64(6), "num_steps": np.int32(3), "resample": np.int32(2)}
    got = module.inpaint(*[tf.constant(inputs[k]) for k in ("images", "mask", "seed", "num_steps", "resample")])
    assert_outputs_equal(got, expected_outputs(model, "inpaint", inputs))
    np.testing.assert_array_equal(got["images"].numpy()[mask > 0], images[mask > 0])


def test_a_failed_export_leaves_no_version_and_a_whole_one_is_readable(exported, tmp_path, monkeypatch):
    """A full disk while an export is written: an OSError naming the version, and nothing in the
    model directory that TF-Serving polls; a complete version is readable by others (0755)."""
    model = exported[0]

    def full_disk(*args, **kwargs):
        raise tf.errors.ResourceExhaustedError(None, None, "tf_serving_warmup_requests; No space left on device")

    monkeypatch.setattr(saved_model, "write_warmup_requests", full_disk)
    with pytest.raises(OSError, match=r"writing .*vdm/1 failed: No space left on device; nothing was written"):
        saved_model.export_model(model, str(tmp_path))
    assert os.listdir(tmp_path / "vdm") == []
    monkeypatch.undo()
    path = saved_model.export_model(model, str(tmp_path), warmup=False)
    assert os.listdir(tmp_path / "vdm") == ["1"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
