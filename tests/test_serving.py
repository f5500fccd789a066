"""gRPC serving: the client against a loopback PredictionService that serves the export."""

import concurrent.futures
import socket
import subprocess
import sys

import grpc
import numpy as np
import pytest
from exported_model import IMAGE_SHAPE, ODE_TOLERANCE, TIME_SAMPLES, random_images
from PIL import Image

from export import client as client_lib
from tests import loopback_serving
from vdm_tf import conditional, likelihood


@pytest.fixture(scope="module")
def served(exported):
    model, export_dir, _, _ = exported
    server, port = loopback_serving.serve(f"{export_dir}/vdm", "vdm")
    client = client_lib.Client(f"127.0.0.1:{port}", "vdm", timeout=120, retries=0)
    yield model, client, port
    client.close()
    server.stop(grace=None)


def test_likelihood_and_sample_round_trip(served):
    model, client, _ = served
    images = random_images(4, seed=1)
    result = client.likelihood(images, seed=3)
    expected = model.elbo(images, seed=3, num_time_samples=TIME_SAMPLES)
    np.testing.assert_allclose(result["bpd"], expected["bpd"].numpy(), rtol=1e-6)
    np.testing.assert_allclose(result["prior_bpd"], expected["prior"].numpy(), rtol=1e-6)
    samples = client.sample(3, num_steps=4, seed=5)
    np.testing.assert_array_equal(samples, model.sample(3, num_steps=4, seed=5).numpy())


def test_exact_likelihood_inpaint_and_samplers_round_trip(served):
    model, client, _ = served
    images = random_images(2, seed=9)
    result = client.exact_likelihood(images, seed=2)
    tolerance = {"rtol": ODE_TOLERANCE, "atol": ODE_TOLERANCE}
    expected = likelihood.ode_bpd(model, images, seed=2, dequantization="variational", **tolerance)
    np.testing.assert_allclose(result["bpd"], expected["bpd"].numpy(), rtol=1e-5)
    assert int(result["nfe"]) > 0
    mask = np.zeros(IMAGE_SHAPE, np.uint8)
    mask[:4] = 1  # top half known
    filled = client.inpaint(images, mask, seed=3, num_steps=4, resample=2)
    np.testing.assert_array_equal(filled[:, :4], images[:, :4])
    expected = conditional.inpaint(model, images, np.broadcast_to(mask, images.shape), 4, seed=3, resample=2)
    np.testing.assert_array_equal(filled, expected.numpy())
    assert client.sample(2, num_steps=3, seed=1, sampler="pc").shape == (2, *IMAGE_SHAPE)


def test_metadata_names_every_signature(served):
    _, client, _ = served
    version, signatures = client.metadata()
    assert version == 1
    assert {"likelihood", "sample", "serving_default", "exact_likelihood", "inpaint"} <= set(signatures)
    assert set(signatures["sample"].inputs) == {"num_samples", "num_steps", "seed", "sampler"}
    assert set(signatures["inpaint"].defaults) == {"seed", "num_steps", "resample"}
    assert set(signatures["likelihood"].defaults) == {"seed"}


def test_omitted_seed_uses_the_signature_default(served):
    model, client, _ = served
    images = random_images(2, seed=2)
    result = client.predict("likelihood", images=images)
    np.testing.assert_allclose(result["bpd"], model.elbo(images, 0, num_time_samples=TIME_SAMPLES)["bpd"], rtol=1e-6)


def test_32_concurrent_requests_all_return_their_own_answer(served):
    model, client, _ = served
    batches = [random_images(1 + i % 3, seed=100 + i) for i in range(32)]
    expected = [model.elbo(b, seed=i, num_time_samples=TIME_SAMPLES)["bpd"].numpy() for i, b in enumerate(batches)]
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        futures = [pool.submit(client.likelihood, b, i) for i, b in enumerate(batches)]
        results = [f.result()["bpd"] for f in futures]
    for got, want in zip(results, expected):
        np.testing.assert_allclose(got, want, rtol=1e-6)


MALFORMED = {
    "float images": (
        {"images": np.zeros((1, *IMAGE_SHAPE), np.float32), "seed": np.int64(0)},
        "likelihood",
        r"Expects arg\[images\] to be uint8 but float32 is provided",
    ),
    "wrong size": (
        {"images": np.zeros((1, 16, 16, 1), np.uint8), "seed": np.int64(0)},
        "likelihood",
        r"expected uint8 images of shape \[N, 8, 8, 1\]",
    ),
    "huge num_samples": (
        {"num_samples": np.int32(10**6), "num_steps": np.int32(10), "seed": np.int64(0)},
        "sample",
        r"num_samples: expected a int32 scalar in 1..64",
    ),
    "missing images": ({"seed": np.int64(0)}, "likelihood", r"Missing but required: \['images'\]"),
    "missing num_steps": (
        {"num_samples": np.int32(1), "seed": np.int64(0)},
        "sample",
        r"Missing but required: \['num_steps'\]",
    ),
    "unknown sampler": (
        {"num_samples": np.int32(1), "num_steps": np.int32(2), "sampler": "ddim"},
        "sample",
        r"sampler: expected one of ancestral, pc, ode",
    ),
    "mask of another shape": (
        {"images": random_images(2), "mask": np.ones((2, 8, 8, 3), np.uint8)},
        "inpaint",
        r"mask: expected uint8 with the shape of the images",
    ),
    "unknown input": (
        {"images": random_images(1), "labels": np.int64(0)},
        "likelihood",
        r"Sent extra: \['labels'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_requests_are_invalid_argument_and_the_server_keeps_serving(served, case):
    _, client, _ = served
    inputs, signature, message = MALFORMED[case]
    with pytest.raises(client_lib.ServingError, match=message) as raised:
        client.predict(signature, **inputs)
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert client.likelihood(random_images(1), seed=0)["bpd"].shape == (1,)


def test_unknown_model_is_not_found(served):
    _, client, port = served
    with client_lib.Client(f"127.0.0.1:{port}", "other", retries=0) as other:
        with pytest.raises(client_lib.ServingError, match="Servable not found") as raised:
            other.sample(1, 1)
    assert raised.value.code == grpc.StatusCode.NOT_FOUND


def unused_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_down_is_retried_then_explained():
    address = f"127.0.0.1:{unused_port()}"
    with client_lib.Client(address, "vdm", timeout=2, retries=2, backoff=0.01) as client:
        with pytest.raises(client_lib.ServingError, match=rf"No answer from {address} after 3 attempts") as raised:
            client.sample(1, 1)
    assert raised.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    assert "docker run" in str(raised.value)


def run_client(port, *args):
    command = [sys.executable, "-m", "export.client", f"--server=127.0.0.1:{port}", "--model=vdm", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_command_line_prints_a_bpd_table_and_writes_a_sample_grid(served, tmp_path):
    model, _, port = served
    images = random_images(2, seed=4)
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"digit{i}.png"))
        Image.fromarray(image[..., 0]).save(paths[-1])
    completed = run_client(port, "--seed=6", "likelihood", *paths)
    assert completed.returncode == 0, completed.stderr[-3000:]
    expected = model.elbo(images, seed=6, num_time_samples=TIME_SAMPLES)["bpd"].numpy()
    rows = [line.split() for line in completed.stdout.splitlines() if line.startswith(str(tmp_path))]
    np.testing.assert_allclose([float(row[1]) for row in rows], expected, atol=6e-4)
    out = tmp_path / "grid.png"
    completed = run_client(port, "sample", "--num=4", "--steps=2", f"--out={out}")
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert out.exists() and np.load(tmp_path / "grid.npz")["images"].shape == (4, *IMAGE_SHAPE)
    completed = run_client(port, "sample", "--num=100000", f"--out={out}")
    assert completed.returncode == 1 and "INVALID_ARGUMENT" in completed.stderr and "1..64" in completed.stderr
