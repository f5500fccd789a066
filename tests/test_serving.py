"""gRPC serving: the client against the strict loopback PredictionService that serves the export."""

import concurrent.futures
import re
import socket
import subprocess
import sys

import exported_model
import grpc
import numpy as np
import pytest
import tensorflow as tf
from exported_model import IMAGE_SHAPE, SIGNATURE_INPUTS, TIME_SAMPLES, expected_outputs, random_images
from PIL import Image
from tensorflow_serving.apis import prediction_service_pb2_grpc

from export import client as client_lib
from export import loopback
from tests.client_commands import run_client_commands

# Session fixtures (conftest imports `exported` only).
served, served_cdm, small_exports = exported_model.served, exported_model.served_cdm, exported_model.small_exports


def test_likelihood_and_sample_round_trip(served):
    images = random_images(4, seed=1)
    result = served.client.likelihood(images, seed=3)
    expected = served.model.elbo(images, seed=3, num_time_samples=TIME_SAMPLES)
    np.testing.assert_allclose(result["bpd"], expected["bpd"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(result["prior_bpd"], expected["prior"].numpy(), rtol=1e-6)
    samples = served.client.sample(3, num_steps=4, seed=5)
    np.testing.assert_array_equal(samples, served.model.sample(3, num_steps=4, seed=5).numpy())


def test_score_sde_signatures_through_the_client(served, exported):
    """exact_likelihood, inpaint and each sampler reach their own signature with every input."""
    loaded, client = exported[3], served.client
    images = random_images(2, seed=9)

    def signature(name, **inputs):
        return {key: value.numpy() for key, value in loaded.signatures[name](**inputs).items()}

    result = client.exact_likelihood(images, seed=2)
    expected = signature("exact_likelihood", images=tf.constant(images), seed=tf.constant(2, tf.int64))
    np.testing.assert_allclose(result["bpd"], expected["bpd"], rtol=1e-6)
    assert int(result["nfe"]) == int(expected["nfe"]) > 0
    mask = np.zeros(IMAGE_SHAPE, np.uint8)
    mask[:4] = 1  # top half known
    filled = client.inpaint(images, mask, seed=3, num_steps=4, resample=2)
    np.testing.assert_array_equal(filled[:, :4], images[:, :4])
    inputs = {"images": images, "mask": np.broadcast_to(mask, images.shape), "seed": np.int64(3)}
    inputs.update(num_steps=np.int32(4), resample=np.int32(2))
    np.testing.assert_array_equal(filled, expected_outputs(served.model, "inpaint", inputs)["images"])
    count = {"num_samples": tf.constant(2), "seed": tf.constant(1, tf.int64)}
    pc = signature("sample_pc", num_steps=tf.constant(3), **count)["images"]
    np.testing.assert_array_equal(client.sample(2, num_steps=3, seed=1, sampler="pc"), pc)
    np.testing.assert_array_equal(client.sample(2, seed=1, sampler="ode"), signature("sample_ode", **count)["images"])
    with pytest.raises(ValueError, match="sampler: expected one of ancestral, pc, ode; got 'ddim'"):
        client.sample(2, sampler="ddim")


def test_one_step_likelihood_of_a_cdm_export_through_the_client(served_cdm):
    images = random_images(3, seed=6)
    result = served_cdm.client.one_step_likelihood(images, seed=4)
    np.testing.assert_allclose(result["bpd"], served_cdm.model.one_step_bpd(images, seed=4).numpy(), rtol=1e-5)
    assert set(served_cdm.client.likelihood(images, seed=4)) == {"bpd"}  # a CDM's likelihood: the bpd only


def test_metadata_names_every_signature_with_its_required_inputs(served):
    version, signatures = served.client.metadata()
    assert version == 1
    assert set(signatures) == set(SIGNATURE_INPUTS) - {"one_step_likelihood"}
    for name, signature in signatures.items():
        assert set(signature.inputs) == SIGNATURE_INPUTS[name], name
        assert not signature.defaults, name


@pytest.mark.parametrize("signature", sorted(set(SIGNATURE_INPUTS) - {"one_step_likelihood"}))
def test_every_input_left_out_is_invalid_argument(served, signature):
    """TF-Serving's wording (predict_util.cc): the strict server fills nothing in."""
    inputs = {"images": random_images(1), "mask": random_images(1), "seed": np.int64(0)}
    inputs.update(num_samples=np.int32(1), num_steps=np.int32(1), resample=np.int32(1))
    for left_out in sorted(SIGNATURE_INPUTS[signature]):
        sent = {key: inputs[key] for key in SIGNATURE_INPUTS[signature] - {left_out}}
        with pytest.raises(client_lib.ServingError, match=rf"Missing but required: \{{{left_out}\}}") as raised:
            served.client.predict(signature, **sent)
        assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_the_loopback_server_never_fills_signature_defaults(tmp_path):
    """A SignatureDef with `defaults` (here `y`): the strict server still wants every input."""

    one = tf.constant(1)

    class WithDefault(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec(None, tf.int32, name="x"), tf.TensorSpec(None, tf.int32, name="y")])
        def add(self, x, y=one):
            return {"sum": x + y}

    module = WithDefault()
    tf.saved_model.save(module, str(tmp_path / "m" / "1"), signatures={"serving_default": module.add})
    service = loopback.PredictionService(str(tmp_path / "m"), "m")
    assert set(service.signature_defs["serving_default"].defaults) == {"y"}
    server, port = loopback.serve_grpc(service)
    with client_lib.Client(f"127.0.0.1:{port}", "m", retries=0) as client:
        assert int(client.predict("serving_default", x=np.int32(2), y=np.int32(3))["sum"]) == 5
        with pytest.raises(client_lib.ServingError, match=r"Missing but required: \{y\}"):
            client.predict("serving_default", x=np.int32(2))
    server.stop(grace=None)


def test_32_concurrent_requests_all_return_their_own_answer(served):
    batches = [random_images(1 + i % 3, seed=100 + i) for i in range(32)]
    model = served.model
    expected = [model.elbo(b, seed=i, num_time_samples=TIME_SAMPLES)["bpd"].numpy() for i, b in enumerate(batches)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(served.client.likelihood, b, i) for i, b in enumerate(batches)]
        results = [f.result()["bpd"] for f in futures]
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)


# Requests the SavedModel's own in-graph checks refuse (`export.saved_model`): a real TF-Serving
# returns these messages too. Each is also raised by TF's loader in-process, without any server.
SEED = np.int64(0)
STEPS = {"num_steps": np.int32(2), "resample": np.int32(1)}
IMAGES_FORM = r"images: expected uint8 images of shape \[N, 8, 8, 1\] with 1 <= N <= 1024; got shape\] "
GRAPH_CHECKED = {  # case: (signature, inputs, the graph's message)
    "wrong size": (
        "likelihood",
        {"images": np.zeros((1, 16, 16, 1), np.uint8), "seed": SEED},
        IMAGES_FORM + r"\[1 16 16 1\]",
    ),
    "empty batch": (
        "likelihood",
        {"images": np.zeros((0, *IMAGE_SHAPE), np.uint8), "seed": SEED},
        IMAGES_FORM + r"\[0 8 8 1\]",
    ),
    "rank 3 images": (
        "exact_likelihood",
        {"images": np.zeros(IMAGE_SHAPE, np.uint8), "seed": SEED},
        IMAGES_FORM + r"\[8 8 1\]",
    ),
    "seed of shape [2]": (
        "likelihood",
        {"images": random_images(1), "seed": np.array([1, 2], np.int64)},
        r"seed: expected a int64 scalar; got shape\] \[2\]",
    ),
    "huge num_samples": (
        "sample",
        {"num_samples": np.int32(10**6), "num_steps": np.int32(10), "seed": SEED},
        r"num_samples: expected a int32 scalar in 1..64; got\] \[1000000\]",
    ),
    "zero num_steps": (
        "sample_pc",
        {"num_samples": np.int32(1), "num_steps": np.int32(0), "seed": SEED},
        r"num_steps: expected a int32 scalar in 1..4096; got\] \[0\]",
    ),
    "num_samples of shape [1]": (
        "sample_ode",
        {"num_samples": np.array([1], np.int32), "seed": SEED},
        r"num_samples: expected a int32 scalar; got shape\] \[1\]",
    ),
    "mask of another shape": (
        "inpaint",
        {"images": random_images(2), "mask": np.ones((2, 8, 8, 3), np.uint8), "seed": SEED, **STEPS},
        r"mask: expected uint8 with the shape of the images, .*; got shape\] \[2 8 8 3\]",
    ),
    "resample out of range": (
        "inpaint",
        {"images": random_images(1), "mask": random_images(1), "seed": SEED, **STEPS, "resample": np.int32(51)},
        r"resample: expected a int32 scalar in 1..50; got\] \[51\]",
    ),
}


@pytest.mark.parametrize("case", sorted(GRAPH_CHECKED))
def test_malformed_requests_fail_in_the_graph_and_the_server_keeps_serving(served, exported, case):
    signature, inputs, message = GRAPH_CHECKED[case]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):  # the SavedModel's own check
        exported[3].signatures[signature](**{key: tf.constant(value) for key, value in inputs.items()})
    with pytest.raises(client_lib.ServingError, match=message) as raised:
        served.client.predict(signature, **inputs)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\n" not in str(raised.value)  # the line of the message that says what is wrong
    assert served.client.likelihood(random_images(1), seed=0)["bpd"].shape == (1,)


# Requests refused before the graph runs, with TF-Serving's own wording (predict_util.cc,
# saved_model/util.cc and the executor's argument check).
PROTOCOL = {
    "float images": (
        "likelihood",
        {"images": np.zeros((1, *IMAGE_SHAPE), np.float32), "seed": SEED},
        grpc.StatusCode.INVALID_ARGUMENT,
        r"Expects arg\[0\] to be uint8 but float is provided",
    ),
    "unknown input in place of seed": (
        "likelihood",
        {"images": random_images(1), "labels": np.int64(0)},
        grpc.StatusCode.INVALID_ARGUMENT,
        r"Signature input alias: seed\(feed name: .*\) not found in request and no default value provided",
    ),
    "extra input": (
        "sample",
        {"num_samples": np.int32(1), "num_steps": np.int32(2), "seed": SEED, "sampler": "pc"},
        grpc.StatusCode.INVALID_ARGUMENT,
        r"input size does not match signature: 4!=3 .* Sent extra: \{sampler\}. Missing but required: \{\}.",
    ),
    "unknown signature": (
        "sample_ddim",
        {"num_samples": np.int32(1), "seed": SEED},
        grpc.StatusCode.FAILED_PRECONDITION,
        r'Serving signature key "sample_ddim" not found.',
    ),
}


@pytest.mark.parametrize("case", sorted(PROTOCOL))
def test_requests_that_do_not_fit_the_signature_are_refused_as_tf_serving_does(served, case):
    signature, inputs, code, message = PROTOCOL[case]
    with pytest.raises(client_lib.ServingError, match=message) as raised:
        served.client.predict(signature, **inputs)
    assert raised.value.code == code


def test_unknown_model_and_unknown_version_are_not_found_and_a_version_can_be_pinned(served):
    images = random_images(1, seed=3)
    with client_lib.Client(f"127.0.0.1:{served.port}", "other", retries=0) as other:
        with pytest.raises(client_lib.ServingError, match=r"Servable not found for request: Latest\(other\)") as raised:
            other.sample(1, 1)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with client_lib.Client(f"127.0.0.1:{served.port}", "vdm", version=2, retries=0) as pinned:
        with pytest.raises(client_lib.ServingError, match=r"Specific\(vdm, 2\)") as raised:
            pinned.likelihood(images)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    with client_lib.Client(f"127.0.0.1:{served.port}", "vdm", version=1, retries=0) as pinned:
        np.testing.assert_array_equal(pinned.likelihood(images)["bpd"], served.client.likelihood(images)["bpd"])


class FailsFirst(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Answers UNAVAILABLE to the first `failures` Predict calls, then passes them to `service`."""

    def __init__(self, service, failures):
        self.service, self.failures, self.calls = service, failures, 0

    def Predict(self, request, context):
        self.calls += 1
        if self.calls <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "loading the model")
        return self.service.Predict(request, context)


def test_unavailable_is_retried_until_the_server_answers(served):
    servicer = FailsFirst(served.service, failures=2)
    server, port = loopback.serve_grpc(servicer)
    images = random_images(2, seed=8)
    with client_lib.Client(f"127.0.0.1:{port}", "vdm", retries=2, backoff=0.01) as client:
        np.testing.assert_array_equal(client.likelihood(images)["bpd"], served.client.likelihood(images)["bpd"])
    assert servicer.calls == 3
    server.stop(grace=None)


def unreachable_address(reserved):
    """HOST:PORT of a socket bound but never listening: connections are refused, and no other
    process can take the port while `reserved` stays open."""
    reserved.bind(("127.0.0.1", 0))
    return f"127.0.0.1:{reserved.getsockname()[1]}"


def test_server_down_is_retried_then_explained():
    with socket.socket() as reserved:
        address = unreachable_address(reserved)
        with client_lib.Client(address, "vdm", timeout=2, retries=2, backoff=0.01) as client:
            with pytest.raises(client_lib.ServingError, match=rf"No answer from {address} after 3 attempts") as raised:
                client.sample(1, 1)
    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "docker run" in str(raised.value)


def test_batches_beyond_the_exports_limits_are_split_with_a_seed_per_request(served):
    """1025 images (the export takes 1024) go as two requests, request k with `request_seed(seed, k)`."""
    model, seeds = served.model, [7 + k * 2**32 for k in range(3)]  # the seeds README.md documents
    images = random_images(1025, seed=2)
    got = served.client.likelihood(images, seed=7)["bpd"]
    parts = np.split(images, [1024])
    expected = [model.elbo(part, seeds[k], num_time_samples=TIME_SAMPLES)["bpd"] for k, part in enumerate(parts)]
    np.testing.assert_allclose(got, np.concatenate(expected), rtol=1e-6)
    address = f"127.0.0.1:{served.port}"
    with client_lib.Client(address, "vdm", retries=0, max_batch_size=2, max_num_samples=3) as client:
        samples = client.sample(7, num_steps=2, seed=7)  # 3 + 3 + 1
        expected = [model.sample(n, 2, seed=seeds[k]).numpy() for k, n in enumerate((3, 3, 1))]
        np.testing.assert_array_equal(samples, np.concatenate(expected))
        images = random_images(3, seed=4)
        mask = (np.random.default_rng(5).random(images.shape) < 0.5).astype(np.uint8)
        filled = client.inpaint(images, mask, seed=7, num_steps=2, resample=1)
    steps = {"num_steps": np.int32(2), "resample": np.int32(1)}
    for k, rows in enumerate((slice(0, 2), slice(2, 3))):
        inputs = {"images": images[rows], "mask": mask[rows], "seed": seeds[k], **steps}
        np.testing.assert_array_equal(filled[rows], expected_outputs(model, "inpaint", inputs)["images"])


def test_request_seeds_keep_the_first_and_wrap_to_int64():
    assert client_lib.request_seed(5, 0) == 5 and client_lib.request_seed(5, 2) == 5 + 2**33
    assert client_lib.request_seed(2**63 - 1, 1) == -(2**63) + 2**32 - 1
    assert client_lib.request_slices(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert client_lib.request_slices(0, 2) == [(0, 0)]  # sent as is: the server names the expected form


def write_grey_pngs(directory, images, prefix="digit"):
    paths = []
    for i, image in enumerate(images):
        paths.append(str(directory / f"{prefix}{i}.png"))
        Image.fromarray(image[..., 0]).save(paths[-1])
    return paths


def test_command_line_prints_a_bpd_table(served, tmp_path):
    """`python -m export.client` itself (its other commands run in tests/test_readme_requests.py).

    Its stderr stays empty: the serving protos import TensorFlow, without its start-up banners
    (oneDNN, CUDA drivers, CPU features, cuInit)."""
    images = random_images(2, seed=4)
    paths = write_grey_pngs(tmp_path, images)
    command = [sys.executable, "-m", "export.client", f"--server=127.0.0.1:{served.port}", "--seed=6"]
    completed = subprocess.run([*command, "likelihood", *paths], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == "", completed.stderr
    expected = served.model.elbo(images, seed=6, num_time_samples=TIME_SAMPLES)["bpd"].numpy()
    rows = [line.split() for line in completed.stdout.splitlines() if line.startswith(str(tmp_path))]
    np.testing.assert_allclose([float(row[1]) for row in rows], expected, atol=6e-4)


def test_command_line_errors_are_one_line_and_found_before_connecting(served, tmp_path):
    """Bad files and flags: exit != 0, one or two lines naming what was expected, no traceback. The
    file checks run before the client connects: their server is unreachable, so a check made
    after connecting would report "No answer" instead."""
    write_grey_pngs(tmp_path, random_images(1), prefix="a")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "small_mask.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).convert("LA").save(tmp_path / "grey_alpha.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "a_directory").mkdir()
    cases = {
        "likelihood missing.png": r"missing.png: no such file; expected a grey \(mode L\) or RGB image file",
        "likelihood a_directory": r"a_directory: is a directory",
        "likelihood empty.png": r"empty.png: the file is empty",
        "likelihood notes.png": r"notes.png: not a readable image file \(Pillow cannot identify it\)",
        "likelihood palette.png": r"palette.png: got mode P; expected a grey \(mode L\) or RGB image file",
        "one_step_likelihood grey_alpha.png": r"grey_alpha.png: got mode LA; expected",
        "likelihood a0.png big.png": r"expected images of one size; got shapes \[\(8, 8, 1\), \(16, 16, 1\)\]",
        "inpaint --mask=small_mask.png a0.png": r"small_mask.png: expected a mask of the images' size 8x8 .*; got 4x4",
        "inpaint --mask=palette.png a0.png": r"palette.png: got mode P; expected a mask",
        "inpaint a0.png": r"inpaint needs --mask=MASK.png",
        "exact_likelihood": r"exact_likelihood needs at least one image file",
        "metadata a0.png": r"metadata takes no files",
        "frobnicate": r"expected a command; got frobnicate. usage: python -m export.client",
        "sample --out=no_such_directory/grid.png": r"--out: the directory 'no_such_directory' does not exist",
        "sample --out=grid.jpg": r"--out: expected a .png file path",
        "sample --num=0": r"flag --num=0: 0 is not a positive integer",
        "sample --sampler=ddim": r"flag --sampler=ddim",
    }
    with socket.socket() as reserved:
        unreachable = ["--retries=0", "--timeout=1", f"--server={unreachable_address(reserved)}"]
        commands = [[*unreachable, *case.split()] for case in cases]
        # And a request the server refuses: more samples than this export draws per request.
        commands.append([f"--server=127.0.0.1:{served.port}", "sample", "--num=65", "--steps=1"])
        cases["the server's limit"] = r"\(INVALID_ARGUMENT\): assertion failed: \[num_samples: .* in 1..64"
        commands.append([*unreachable, "metadata"])
        cases["no server"] = r"No answer from 127.0.0.1:\d+ after 1 attempts"
        results = run_client_commands(commands, cwd=tmp_path)
    for (case, message), result in zip(cases.items(), results):
        output = result["stdout"] + result["stderr"]
        assert result["code"] not in (0, None), (case, result)
        assert "Traceback" not in output, (case, output)
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        assert 1 <= len(lines) <= 2, (case, lines)
        assert re.search(message, result["stderr"]), (case, result["stderr"])
