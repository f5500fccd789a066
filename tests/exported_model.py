"""Small exported models shared by the export and serving tests (exporting takes a while).

Session fixtures:
- `exported`: a VDM with every signature (`score_sde=True`: the ODE graphs make it the slow one);
- `small_exports`: a `ScoreSDEModel` (VE SDE) and a CDM without the Score-SDE signatures, a few
  seconds each;
- `served`, `served_cdm`: the VDM and the CDM export behind the strict loopback server.

conftest.py registers `exported`; a test module that uses another one binds it by name
(`served = exported_model.served`).
"""

import os
import types

import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from export import client as client_lib
from export import loopback, saved_model
from vdm_tf import cdm, conditional, likelihood, samplers, score_model
from vdm_tf import sde as sdes

IMAGE_SHAPE = (8, 8, 1)
TIME_SAMPLES = 4
ODE_TOLERANCE = 1e-3  # an untrained network's ODE is stiff; keep the tests' solves short
SMALL_NETWORK = {"n_layers": 1, "n_embd": 32, "fourier_exponents": (3, 4)}
# The documented inputs of every signature (README, ARCHITECTURE.md "SavedModel contract"): all required, no defaults.
SIGNATURE_INPUTS = {
    "likelihood": {"images", "seed"},
    "serving_default": {"images", "seed"},
    "one_step_likelihood": {"images", "seed"},
    "exact_likelihood": {"images", "seed"},
    "sample": {"num_samples", "num_steps", "seed"},
    "sample_pc": {"num_samples", "num_steps", "seed"},
    "sample_ode": {"num_samples", "seed"},
    "inpaint": {"images", "mask", "seed", "num_steps", "resample"},
}


def tiny_model():
    denoiser = vdm_tf.networks.ScoreUNet(dropout=0.0, **SMALL_NETWORK)
    model = vdm_tf.VDM(denoiser, vdm_tf.schedules.LearnedLinear(), IMAGE_SHAPE)
    model.build()
    return model


def tiny_score_sde_model():
    """A `ScoreSDEModel` of the VE SDE: its `.sde` is not the VP SDE of its schedule."""
    process = sdes.VESDE()
    gamma_min, gamma_max = score_model.gamma_range(process)
    denoiser = vdm_tf.networks.ScoreUNet(dropout=0.0, gamma_min=gamma_min, gamma_max=gamma_max, **SMALL_NETWORK)
    model = score_model.ScoreSDEModel(denoiser, process, IMAGE_SHAPE)
    model.build()
    return model


def tiny_cdm():
    classifier = vdm_tf.networks.NoiseLevelClassifier(num_levels=7, **SMALL_NETWORK)
    model = cdm.CDM(classifier, vdm_tf.schedules.FixedLinear(-13.3, 5.0), IMAGE_SHAPE, num_levels=7)
    model.build()
    return model


def random_images(n, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def expected_outputs(model, signature, inputs):
    """What `signature` of an export of `model` (made with the settings above) answers to
    `inputs` (numpy values), computed in-process with the library's own functions."""
    seed = int(inputs["seed"])
    if signature in ("likelihood", "serving_default"):
        terms = model.elbo(inputs["images"], seed, num_time_samples=TIME_SAMPLES)
        names = {output: output.removesuffix("_bpd") for output in saved_model.LIKELIHOOD_OUTPUTS}
        return {output: terms[name] for output, name in names.items() if name in terms}
    if signature == "one_step_likelihood":
        return {"bpd": model.one_step_bpd(inputs["images"], seed)}
    if signature == "exact_likelihood":
        tolerance = {"rtol": ODE_TOLERANCE, "atol": ODE_TOLERANCE}
        out = likelihood.ode_bpd(model, inputs["images"], seed, "variational", **tolerance)
        return {"bpd": out["bpd"], "nfe": out["nfe"]}
    if signature == "inpaint":
        images, mask, steps = inputs["images"], inputs["mask"], int(inputs["num_steps"])
        return {"images": conditional.inpaint(model, images, mask, steps, seed, int(inputs["resample"]))}
    num_samples = int(inputs["num_samples"])
    if signature == "sample":
        return {"images": model.sample(num_samples, int(inputs["num_steps"]), seed=seed)}
    if signature == "sample_pc":
        return {"images": samplers.sample(model, num_samples, "pc", int(inputs["num_steps"]), seed)}
    assert signature == "sample_ode", signature
    return {"images": samplers.sample(model, num_samples, "ode", seed=seed, rtol=ODE_TOLERANCE, atol=ODE_TOLERANCE)}


def assert_outputs_equal(got, expected):
    """Images bit for bit, numbers to float32 round-off; the same output names."""
    assert set(got) == set(expected), (sorted(got), sorted(expected))
    for key, want in expected.items():
        want = np.asarray(want)
        if want.dtype == np.uint8 or want.dtype.kind == "i":
            np.testing.assert_array_equal(np.asarray(got[key]), want, err_msg=key)
        else:
            np.testing.assert_allclose(np.asarray(got[key], np.float32), want, rtol=1e-5, err_msg=key)


@pytest.fixture(scope="session")
def exported(tmp_path_factory):
    """(model, export_dir, version path, loaded SavedModel), with every signature (score_sde)."""
    export_dir = str(tmp_path_factory.mktemp("export"))
    model = tiny_model()
    path = saved_model.export_model(
        model,
        export_dir,
        time_samples=TIME_SAMPLES,
        max_num_samples=64,
        ode_tolerance=ODE_TOLERANCE,
        score_sde=True,
    )
    return model, export_dir, path, tf.saved_model.load(path)


@pytest.fixture(scope="session")
def small_exports(tmp_path_factory):
    """({"sde": ScoreSDEModel, "cdm": CDM}, export_dir): each exported as `export_dir/NAME/1`."""
    export_dir = str(tmp_path_factory.mktemp("small_exports"))
    models = {"sde": tiny_score_sde_model(), "cdm": tiny_cdm()}
    for name, model in models.items():
        saved_model.export_model(model, export_dir, name=name, time_samples=TIME_SAMPLES)
    return models, export_dir


def _serve(model, model_base_path, loaded=None):
    """A namespace: `model`, `service`, `port` (gRPC), `rest_port`, `client` (no retries), `servers`."""
    service = loopback.PredictionService(model_base_path, "vdm", loaded)
    grpc_server, port = loopback.serve_grpc(service)
    rest_server, rest_port = loopback.serve_rest(service)
    client = client_lib.Client(f"127.0.0.1:{port}", "vdm", timeout=300, retries=0)
    return types.SimpleNamespace(
        model=model, service=service, port=port, rest_port=rest_port, client=client, servers=(grpc_server, rest_server)
    )


def _stop(served):
    served.client.close()
    served.servers[0].stop(grace=None)
    served.servers[1].shutdown()


@pytest.fixture(scope="session")
def served(exported):
    """`exported` served as model "vdm" by the strict loopback server over gRPC and REST."""
    model, export_dir, _, loaded = exported
    # The server runs the graphs the export tests run: each is optimised once per session.
    namespace = _serve(model, os.path.join(export_dir, "vdm"), loaded)
    yield namespace
    _stop(namespace)


@pytest.fixture(scope="session")
def served_cdm(small_exports):
    """The CDM of `small_exports` served as model "vdm" (as a CDM run's export is named)."""
    models, export_dir = small_exports
    namespace = _serve(models["cdm"], os.path.join(export_dir, "cdm"))
    yield namespace
    _stop(namespace)
