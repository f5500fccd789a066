"""bench/sampler_quality.py's arithmetic: KID over all pairs with its jackknife, and the equal-compute pairs."""

import numpy as np
import pytest

from bench import sampler_quality
from vdm_tf import metrics


@pytest.fixture(scope="module")
def features():
    rng = np.random.default_rng(0)
    return rng.normal(size=(13, 5)), rng.normal(0.3, 1.2, size=(11, 5))


def test_kid_is_the_metrics_estimator_on_the_whole_sets(features):
    """With equal set sizes and subsets of the whole sets, metrics' KID is the same U-statistic."""
    real, fake = features
    real = real[: len(fake)]
    kid, _ = sampler_quality.kid_jackknife(real, fake)
    expected, std = metrics.kernel_inception_distance(real, fake, subset_size=len(fake), num_subsets=3)
    assert std == pytest.approx(0.0, abs=1e-12)
    assert kid == pytest.approx(expected, rel=1e-12)


def test_kid_of_unequal_sets_is_the_unbiased_mmd2(features):
    """The estimator written out pair by pair, m != n."""
    real, fake = features
    m, n = len(real), len(fake)

    def k(a, b):
        return (a @ b / a.shape[0] + 1.0) ** 3

    within_real = sum(k(real[i], real[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    within_fake = sum(k(fake[i], fake[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    cross = sum(k(x, y) for x in real for y in fake) / (m * n)
    kid, _ = sampler_quality.kid_jackknife(real, fake)
    assert kid == pytest.approx(within_real + within_fake - 2 * cross, rel=1e-12)


def test_leave_one_out_values_and_standard_error(features):
    real, fake = features
    kid, left_out = sampler_quality.kid_jackknife(real, fake)
    naive = [sampler_quality.kid_jackknife(real, np.delete(fake, i, axis=0))[0] for i in range(len(fake))]
    np.testing.assert_allclose(left_out, naive, rtol=1e-12)
    n = len(fake)
    expected_se = np.sqrt((n - 1) / n * np.sum((np.asarray(naive) - np.mean(naive)) ** 2))
    assert sampler_quality.jackknife_se(left_out) == pytest.approx(expected_se, rel=1e-12)
    # The jackknife of the mean is the usual standard error of a mean.
    values = np.arange(10.0) ** 2
    loo = (values.sum() - values) / 9
    assert sampler_quality.jackknife_se(loo) == pytest.approx(values.std(ddof=1) / np.sqrt(10), rel=1e-12)


def test_claim_pairs_match_s_corrected_steps_with_2s_predictor_steps():
    def row(sampler, corrector, steps):
        return {"sampler": sampler, "corrector": corrector, "steps": steps}

    rows = [
        {"family": "data", "sampler": "data"},
        row("ancestral", None, 32),
        row("reverse_diffusion", "none", 10),
        row("reverse_diffusion", "none", 32),
        row("reverse_diffusion", "langevin", 16),
        row("reverse_diffusion", "langevin", 5),
        row("reverse_diffusion", "langevin", 50),  # no 100-step predictor-only row
        row("euler_maruyama", "none", 32),
        row("euler_maruyama", "langevin", 16),
        row("euler_maruyama", "none", 16),
    ]
    pairs = [(pc["sampler"], pc["steps"], alone["steps"]) for pc, alone in sampler_quality.claim_pairs(rows)]
    assert pairs == [("euler_maruyama", 16, 32), ("reverse_diffusion", 5, 10), ("reverse_diffusion", 16, 32)]


def test_bad_flags_are_one_line_errors():
    from vdm_tf import cli

    for argv in (["--num_samples=2"], ["--tolerances=0.1,2"], ["--pc_steps=0"], ["--snr=0"]):
        with pytest.raises(cli.Failure):
            sampler_quality.parse_args(argv)


def test_a_run_keeps_the_rows_and_claims_it_did_not_measure(tmp_path):
    import json
    import types

    def row(family, steps, **extra):
        return {"family": family, "sampler": "ancestral", "steps": steps, "group": "ancestral", **extra}

    out = tmp_path / "results.json"
    previous = {
        "settings": {"num_samples": 64, "seed": 0},
        "runs": [{"settings": {"num_samples": 64, "seed": 0, "groups": ["ancestral"]}}],
        "rows": [{"family": "data", "sampler": "data"}, row("ancestral", 10, kid=1.0), row("ancestral", 32, kid=2.0)],
        "predictor_corrector_claim": [
            {"predictor": "euler_maruyama", "nfe": 11},
            {"predictor": "euler_maruyama", "nfe": 33},
        ],
    }
    out.write_text(json.dumps(previous))
    args = types.SimpleNamespace(out=str(out), num_samples=64, seed=0)
    measured = [{"family": "data", "sampler": "data"}, row("ancestral", 10, kid=3.0)]
    rows, claim, runs = sampler_quality.kept_rows(args, measured, [{"predictor": "euler_maruyama", "nfe": 33}])
    assert rows == [previous["rows"][2]]
    assert claim == [{"predictor": "euler_maruyama", "nfe": 11}]
    assert runs == previous["runs"]
    args.num_samples = 128  # another N: nothing compares
    assert sampler_quality.kept_rows(args, measured, []) == ([], [], [])
