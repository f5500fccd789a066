"""Official i-DODE checkpoints (thu-ml/i-DODE): the converted model computes what the official code does.

The fixtures in tests/fixtures/official_idode/ were written by the official JAX/Flax code
(make_fixtures.py and README.md there): one checkpoint (EMA weights differ from the raw ones),
its config with `schedule` "VP" and "SP", and the official outputs under the EMA weights,
computed with the official functions and the official code's own random draws (recorded).

vdm_tf's latents are always the variance-preserving z = alpha_vp f + sigma_vp eps; on the
straight path (SP) the official code works on z_sp = alpha_sp f + sigma_sp eps with the same eps
and gamma, i.e. z_sp = z / c, c = alpha_vp + sigma_vp (`StraightPath.to_path`; c = 1 on VP).
"""

import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import vdm_tf
from vdm_tf import cli, convert, likelihood

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_idode")
CHECKPOINT = os.path.join(FIXTURES, "checkpoints-0")
SCHEDULES = ("vp", "sp")
NUM_DIMS = 32 * 32 * 3
NATS_PER_BPD = NUM_DIMS * math.log(2.0)


def config_of(schedule):
    return os.path.join(FIXTURES, schedule, "official_config.json")


@pytest.fixture(scope="module")
def inputs():
    return dict(np.load(os.path.join(FIXTURES, "inputs.npz")))


@pytest.fixture(scope="module")
def converted():
    """{schedule: (converted model, oracle)}: the checkpoint converted once per official config."""
    out = {}
    for schedule in SCHEDULES:
        model = convert.from_checkpoint(CHECKPOINT, config_of(schedule), source="idode")
        oracle = dict(np.load(os.path.join(FIXTURES, schedule, "oracle.npz")), case=schedule)
        out[schedule] = model, oracle
    return out


@pytest.fixture(params=SCHEDULES)
def case(request, converted):
    return converted[request.param]


def per_example(values):
    return np.asarray(values, np.float32).reshape(-1, 1, 1, 1)


def to_vdm_tf_latent(model, z_official, gamma):
    """z = c z_official: vdm_tf's latent of the official path's latent at gamma (c = 1 on VP)."""
    alpha, sigma = (value.numpy() for value in vdm_tf.schedules.NoiseSchedule.path_coefficients(model.schedule, gamma))
    scale = alpha + sigma if isinstance(model.schedule, vdm_tf.schedules.StraightPath) else np.ones_like(alpha)
    return z_official * per_example(scale), scale


def relative_error(value, official, scale):
    return np.abs(value - official).max() / scale


# --------------------------------------------------------------------------------------------
# The converted model.


def test_converted_model_has_the_official_schedule_and_parameterization(case):
    model, oracle = case
    kind = {"VP": vdm_tf.schedules.VariancePreserving, "SP": vdm_tf.schedules.StraightPath}
    with open(config_of(oracle["case"])) as f:
        official = json.load(f)
    assert type(model.schedule) is kind[official["schedule"]]
    assert (model.parameterization, model.time_sampling, model.timesteps) == ("velocity", "importance", 0)
    gamma = model.schedule(tf.constant(oracle["t_grid"])).numpy()
    np.testing.assert_allclose(gamma, oracle["gamma_grid"], rtol=0, atol=1e-5)
    alpha, sigma = model.schedule.path_coefficients(tf.constant(oracle["gamma_grid"]))
    np.testing.assert_allclose(alpha.numpy(), oracle["alpha_grid"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sigma.numpy(), oracle["sigma_grid"], rtol=1e-5, atol=1e-7)


def test_network_output_equals_the_official_velocity(case, inputs):
    """The ScoreUNet's raw output F_hat on the official path latent, within 1e-4 of its scale."""
    model, oracle = case
    F_hat = model.denoiser(tf.constant(oracle["net_z"]), tf.constant(inputs["net_gamma"]), training=False).numpy()
    assert relative_error(F_hat, oracle["net_F_hat"], np.std(oracle["net_F_hat"] - oracle["net_z"])) < 1e-4


def test_eps_hat_and_score_equal_the_official_ones(case, inputs):
    """eps_hat from the velocity (official `noise_fn`) and the score -eps_hat / sigma, in vdm_tf's latent.

    The official score is d log p / d z_official = -eps_hat / sigma_official; in z = c z_official
    it is that divided by c, which is -eps_hat / sigma_vp on both paths (sigma_sp c = sigma_vp).
    """
    model, oracle = case
    gamma = inputs["net_gamma"]
    z, c = to_vdm_tf_latent(model, oracle["net_z"], gamma)
    eps_hat = model._denoise(tf.constant(z), tf.constant(gamma)).numpy()
    scale = np.std(oracle["net_eps_hat"])
    assert relative_error(eps_hat, oracle["net_eps_hat"], scale) < 1e-4
    t = (gamma - model.schedule.gamma_min) / (model.schedule.gamma_max - model.schedule.gamma_min)
    score = np.stack([model.score(tf.constant(z[i : i + 1]), float(t[i])).numpy()[0] for i in range(len(t))])
    official = -oracle["net_eps_hat"] / per_example(oracle["net_sigma"]) / per_example(c)
    assert relative_error(score, official, np.std(official)) < 1e-4


def test_importance_sampled_gammas_and_weights_equal_the_official_ones(case):
    """The official inverse CDF (closed form on VP, bisection on SP) and its normaliser Z."""
    model, oracle = case
    gamma, inverse_density = model.schedule.importance_sample(tf.constant(oracle["icdf_u"]))
    # i-DODE's VP inverse CDF cancels in float32 near u = 1 (spec: ~1e-5 relative in exp(-gamma)).
    np.testing.assert_allclose(gamma.numpy(), oracle["icdf_gamma"], rtol=0, atol=2e-4)
    alpha, _ = model.schedule.path_coefficients(gamma)
    np.testing.assert_allclose((inverse_density * tf.square(alpha)).numpy(), oracle["is_Z"], rtol=1e-5)
    if "icdf_sp_gamma_fine" in oracle:
        fine, _ = model.schedule.importance_sample(tf.constant(oracle["icdf_sp_u_fine"], tf.float32))
        np.testing.assert_allclose(fine.numpy(), oracle["icdf_sp_gamma_fine"], rtol=0, atol=1e-5)


def loss_terms(model, inputs, monkeypatch, **options):
    """VDM's loss code (eval mode) fed the official u_i (loss_t), eps_0 and eps, with `options` set on the model."""
    # _diffusion_terms draws eps, then (flow matching) the probe as the signs of a second normal.
    noise = {
        "_diffusion_terms": [inputs["loss_eps"], inputs["loss_probe"]],
        "_reconstruction_loss": [inputs["loss_eps0"]],
    }
    drawn = {name: 0 for name in noise}

    def given_noise(seed, example_index, shape):
        caller = sys._getframe(1).f_code.co_name  # which loss term asks
        drawn[caller] += 1
        return tf.constant(noise[caller][drawn[caller] - 1], tf.float32)

    with monkeypatch.context() as patch:
        patch.setattr(vdm_tf.seeding, "per_example_normal", given_noise)
        patch.setattr(model, "_time_samples", lambda *args: tf.constant(inputs["loss_t"]))
        for name, value in options.items():
            patch.setattr(model, name, value)
        drawn.update(dict.fromkeys(drawn, 0))
        terms, (gamma, _) = model._loss_terms(tf.constant(inputs["images"]), vdm_tf.seeding.as_seed(0), False)
        assert drawn == {"_diffusion_terms": 1 + (model.flow_matching_weight > 0), "_reconstruction_loss": 1}
    return {name: value.numpy() * NATS_PER_BPD for name, value in terms.items()}, gamma.numpy()


VARIANTS = {  # the official config's velocity / importance -> what the converted model does
    "is": ({}, {}),
    "uniform": (dict(importance=False), dict(time_sampling="antithetic")),
    "eps": (dict(velocity=False, importance=False), dict(time_sampling="antithetic", parameterization="eps")),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_diffusion_loss_at_the_official_noise_equals_the_official_one(case, inputs, monkeypatch, variant):
    """Per-example weighted squared errors at the official draws: importance-sampled gammas (the
    configs' default), uniform antithetic times, and the eps parameterisation (velocity=False)."""
    model, oracle = case
    config_change, model_change = VARIANTS[variant]
    fields = convert.official_config(config_of(oracle["case"]), "idode") | config_change
    model_config = convert.run_config(fields).model
    assert {name: getattr(model_config, name) for name in model_change} == model_change
    terms, gamma = loss_terms(model, dict(inputs, loss_t=oracle["loss_t"]), monkeypatch, **model_change)
    np.testing.assert_allclose(gamma, oracle[f"loss_{variant}_gamma"], rtol=0, atol=2e-5)
    np.testing.assert_allclose(terms["diffusion"], oracle[f"loss_diff_{variant}"], rtol=2e-4)


def test_second_order_term_at_the_official_noise_and_probe_equals_the_official_one(case, inputs, monkeypatch):
    """second_order=True converts to flow_matching_weight=0.1: i-DODE's loss_diff2 at its draws."""
    model, oracle = case
    fields = convert.official_config(config_of(oracle["case"]), "idode") | dict(second_order=True)
    weight = convert.run_config(fields).model.flow_matching_weight
    assert weight == 0.1
    for sampling, variant in (("importance", "is_2nd"), ("antithetic", "uniform_2nd")):
        terms, _ = loss_terms(
            model,
            dict(inputs, loss_t=oracle["loss_t"]),
            monkeypatch,
            flow_matching_weight=weight,
            time_sampling=sampling,
            TERMS=vdm_tf.VDM.TERMS + ("flow_matching", "loss"),
        )
        np.testing.assert_allclose(terms["diffusion"], oracle[f"loss_diff_{variant}"], rtol=2e-4)
        np.testing.assert_allclose(terms["flow_matching"], oracle[f"loss_diff2_{variant}"], rtol=2e-3, atol=1e-3)


def test_reconstruction_and_prior_terms_equal_the_official_ones_on_vp(converted, inputs, monkeypatch):
    """On VP the whole bound's terms at the official draws equal the official ones.

    (On SP the official prior term is KL(N(alpha_sp f, sigma_sp^2) || N(0, 1)) and its decoder
    divides by alpha_0 twice (the spec's section 10.1): other terms than vdm_tf's, which keeps
    VDM's prior N(0, I) and decoder on its own latent; the diffusion term is the same.)
    """
    model, oracle = converted["vp"]
    terms, _ = loss_terms(model, dict(inputs, loss_t=oracle["loss_t"]), monkeypatch)
    np.testing.assert_allclose(terms["reconstruction"], oracle["loss_recon_is"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(terms["prior"], oracle["loss_klz_is"], rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------------------------
# i-DODE's likelihood ("tn": truncated-normal dequantization).


def test_ode_function_at_the_official_points_equals_the_official_one(converted, inputs):
    """The function `likelihood._solve` integrates (dz/dgamma and the Hutchinson divergence per unit
    gamma, with the official probe) at the official z_0 of the first draw, scaled, at gammas from
    gamma_0 to near gamma_1: the official likelihood's own `ode_func` there (`flow_points.npz`).

    The integral itself is not compared: on this checkpoint the divergence swings by ~1% when z
    moves by 1e-4 (the Fourier features' periods in z are 1/64 and 1/128), so at rtol = atol =
    1e-5 the integral is the solver's: scipy's RK45 (the official code) gives 4545 / 4494 nats,
    TFP's DormandPrince 4581 / 4544, fixed-step RK4 4562 / 4506 at 200 steps and 4571 / 4500 at 400.
    """
    model, oracle = converted["vp"]
    with np.load(os.path.join(FIXTURES, "vp", "flow_points.npz")) as points:
        points = dict(points)
    f = (2.0 * inputs["lik_images"].astype(np.float32) + 1.0) / 256.0 - 1.0
    alpha_0, sigma_0 = float(oracle["alpha_grid"][0]), float(oracle["sigma_grid"][0])
    z_0 = np.float32(alpha_0) * f + np.float32(sigma_0) * oracle["tn_eps"][0]
    probe = tf.constant(inputs["lik_probe"].astype(np.float32))
    ode = captured_ode(model, probe)
    for gamma, scale, drift, divergence in zip(
        *(points[k] for k in ("flow_gamma", "flow_scale", "flow_drift", "flow_div"))
    ):
        flow, div = ode(tf.constant(gamma, tf.float32), (tf.constant(z_0 * np.float32(scale)), tf.zeros([2])))
        assert relative_error(flow.numpy(), drift, np.abs(drift).max()) < 1e-5, gamma
        np.testing.assert_allclose(div.numpy(), divergence, rtol=1e-5, atol=1e-4, err_msg=f"gamma {gamma}")


def captured_ode(model, probe):
    """The per-evaluation function that `likelihood._solve` integrates in gamma: (gamma, (z, logp)) -> (dz, dlogp)."""
    return tf.function(likelihood.with_divergence(likelihood._model_flow(model, 5.0, in_gamma=True), probe))


# --------------------------------------------------------------------------------------------
# The command line: --source=idode, and a --source that does not match the checkpoint or config.


def run_cli(capsys, *args):
    """(exit status, its line) of `convert.main` as `cli.run` ends it: a Failure is status 1."""
    try:
        convert.main(list(args))
    except cli.Failure as failure:
        return 1, str(failure)
    return 0, capsys.readouterr().err.strip()


def test_readme_command_writes_the_converted_model(converted, tmp_path):
    """README.md's i-DODE conversion command, as written (run from the repository's root)."""
    with open(os.path.join(ROOT, "README.md")) as f:
        (command,) = re.findall(r"`(python -m vdm_tf\.convert --source=idode [^`]*)`", f.read())
    output = re.search(r"--output=(\S+)", command).group(1)
    argv = command.split()[3:]
    argv[argv.index(f"--output={output}")] = f"--output={tmp_path / output}"
    argv = [re.sub(r"=(tests/\S+)", lambda m: "=" + os.path.join(ROOT, m.group(1)), arg) for arg in argv]
    convert.main(argv)
    model, oracle = converted["vp"]
    loaded = vdm_tf.load(str(tmp_path / output))
    assert type(loaded.schedule) is type(model.schedule) and loaded.parameterization == "velocity"
    z, gamma = tf.constant(oracle["net_z"]), tf.constant(oracle["loss_is_gamma"][: len(oracle["net_z"])])
    np.testing.assert_array_equal(loaded._denoise(z, gamma).numpy(), model._denoise(z, gamma).numpy())


def test_a_source_that_does_not_match_is_one_line(tmp_path, capsys):
    vdm_case = os.path.join(ROOT, "tests", "fixtures", "official_vdm", "dev_scalar")
    vdm_config, vdm_checkpoint = os.path.join(vdm_case, "official_config.json"), os.path.join(vdm_case, "checkpoint")
    fields = convert.official_config(config_of("vp"), "idode")
    learned = tmp_path / "learned.json"  # an i-DODE config with VDM's architecture of dev_scalar
    learned.write_text(json.dumps(fields | dict(sm_n_embd=32, sm_n_layer=1)))
    output = f"--output={tmp_path / 'm.keras'}"
    cases = {
        "an i-DODE config (it has second_order, velocity, importance, dequantization, num_importance, schedule), "
        "not a VDM one: convert it with --source=idode.": (
            f"--checkpoint={CHECKPOINT}",
            f"--official_config={config_of('vp')}",
        ),
        "a VDM config (it has none of i-DODE's fields": (
            "--source=idode",
            f"--checkpoint={CHECKPOINT}",
            f"--official_config={vdm_config}",
        ),
        "the checkpoint does not match --source=idode": (
            "--source=idode",
            f"--checkpoint={vdm_checkpoint}",
            f"--official_config={learned}",
        ),
        "--preset names a released VDM configuration; with --source=idode give --official_config.": (
            "--source=idode",
            f"--checkpoint={CHECKPOINT}",
            "--preset=cifar10",
        ),
    }
    for expected, args in cases.items():
        status, err = run_cli(capsys, *args, output)
        assert status == 1 and expected in err and "\n" not in err, (expected, err)
    assert not (tmp_path / "m.keras").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        (dict(gamma_type="learnable_scalar"), "gamma_type='learnable_scalar'; i-DODE's schedules are fixed"),
        (dict(schedule="cosine"), "unknown schedule 'cosine'; expected VP, SP"),
        (dict(velocity=False), "importance=true needs velocity=true"),
        (dict(dequantization="gaussian"), "unknown dequantization 'gaussian'"),
        (dict(velocity="yes"), "velocity: expected true or false; got 'yes' (a string)"),
    ],
)
def test_configs_the_official_code_refuses_are_refused(change, expected):
    fields = convert.official_config(config_of("vp"), "idode") | change
    with pytest.raises(convert.ConversionError, match=re.escape(expected)):
        convert.official_config(fields, "idode")


def test_mismatch_fails_before_tensorflow_in_one_line(tmp_path):
    """The command line, as a process: one line, exit 1, TensorFlow never imported."""
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\nfrom vdm_tf import cli, convert\n"
            "try:\n    cli.run(convert.main, prog=convert.PROG)\n"
            "finally:\n    print('tensorflow' in sys.modules, file=sys.stderr)",
            "--source=idode",
            f"--checkpoint={CHECKPOINT}",
            "--official_config="
            + os.path.join(ROOT, "tests", "fixtures", "official_vdm", "dev_scalar", "official_config.json"),
            f"--output={tmp_path / 'm.keras'}",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 2 and lines[1] == "False", result.stderr
    assert lines[0].startswith("python -m vdm_tf.convert: error: official config ") and "--source=vdm" in lines[0]
