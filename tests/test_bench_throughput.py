"""The throughput benches' bookkeeping: CPU kinds, rows kept per kind, the train-step FLOP count."""

import json

import pytest

from bench import common
from bench import train_throughput as bench


@pytest.mark.parametrize(
    "model, kind",
    [
        ("Intel(R) Xeon(R) Processor @ 2.80GHz", "Intel Xeon"),
        ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "Intel Xeon"),
        ("AMD EPYC 7B13 64-Core Processor", "AMD EPYC"),
        ("AMD EPYC", "AMD EPYC"),
        ("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz", "Intel"),
    ],
)
def test_cpu_kind_is_vendor_and_family(model, kind):
    assert common.cpu_kind(model) == kind


def rows(*configs, path="fit", seconds=1.0):
    return [{"config": config, "path": path, "seconds_per_step": seconds} for config in configs]


def test_a_run_keeps_other_kinds_and_its_kinds_unmeasured_configs(tmp_path):
    out = tmp_path / "train_throughput.json"
    # The layout before kinds: one machine's rows at the top level, shared estimates beside them.
    amd = {"machine": {"cpu": "AMD EPYC"}, "results": rows("tiny", "small", "paper")}
    out.write_text(json.dumps({**amd, "accelerator_estimates": {"batch_size": 128}}))
    kinds = common.read_kinds(str(out), shared_keys=bench.SHARED_KEYS)
    assert kinds == {"AMD EPYC": amd}

    intel = {"machine": {"cpu": "Intel(R) Xeon(R) Processor @ 2.80GHz"}, "kernels": [], "results": rows("paper")}
    kinds = common.merge_kind(kinds, "Intel Xeon", intel, bench.CONFIGS)
    assert kinds["AMD EPYC"] == amd  # another kind's rows are never touched
    assert [row["config"] for row in kinds["Intel Xeon"]["results"]] == ["paper"]

    out.write_text(json.dumps({"kinds": kinds}))
    again = {**intel, "results": rows("tiny", seconds=2.0)}
    kinds = common.merge_kind(common.read_kinds(str(out)), "Intel Xeon", again, bench.CONFIGS)
    assert kinds["AMD EPYC"] == amd
    # The configuration measured now replaces its rows; the one not measured keeps its own, in config order.
    assert kinds["Intel Xeon"]["results"] == rows("tiny", seconds=2.0) + rows("paper")
    assert common.read_kinds(str(tmp_path / "none.json")) == {}


def test_train_flops_of_the_tiny_configuration_by_hand():
    # tiny: 2 x 32 ScoreUNet at 32x32x3 (P = 1024 positions, c = 32), Fourier exponents (7, 8), batch 8.
    p, c = 1024, 32
    conv_in = 9 * p * (3 * (1 + 2 * 2)) * c  # z_t and its sin / cos features: 15 channels -> 32
    resnet = 2 * 9 * p * c * c  # two 3x3 convolutions c -> c
    down, middle = 2 * resnet, 2 * resnet + (4 * p * c * c + 2 * p * p * c)  # + q, k, v, out and the two products
    up = 3 * (9 * p * 2 * c * c + 9 * p * c * c + p * 2 * c * c)  # input 2c (skip): 3x3, 3x3 and a 1x1 shortcut
    conv_out = 9 * p * c * 3
    macs = conv_in + down + middle + up + conv_out
    assert macs == 243_335_168
    assert bench.train_flops_per_step("tiny") == 2 * 3 * macs * 8 == 11_680_088_064  # forward + 2x for backward
    # The figure for the paper network at batch 4: about 0.63 TFLOP.
    assert bench.train_flops_per_step("paper") == pytest.approx(0.63e12, rel=0.03)


def test_kernel_rate_is_the_median_over_the_bracket_at_that_batch():
    kernels = [
        {"kernel": "conv3x3 forward+backward", "batch_size": 4, "gflops_per_second": 90.0},
        {"kernel": "conv3x3 forward+backward", "batch_size": 128, "gflops_per_second": 110.0},
        {"kernel": "conv3x3 forward+backward", "batch_size": 4, "gflops_per_second": 100.0},
        {"kernel": "conv3x3 forward", "batch_size": 4, "gflops_per_second": 50.0},
    ]
    assert bench.kernel_rate(kernels, "conv3x3 forward+backward", 4) == 95.0
    assert bench.conv_macs(4) == 4 * 1024 * 9 * 128 * 128  # the paper block's 3x3 convolution, 128 -> 128


def test_bad_flags_are_one_line_errors(capsys):
    with pytest.raises(SystemExit) as exit_:
        from vdm_tf import cli

        cli.run(bench.main, ["--configs=huge"], prog=bench.PROG)
    assert exit_.value.code == 1
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "expected some of tiny, small, paper" in error
