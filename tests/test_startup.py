"""TensorFlow's start-up banners are filtered; every other message is kept."""

import os
import subprocess
import sys

from vdm_tf import _startup

CAPTURED = """WARNING: All log messages before absl::InitializeLog() is called are written to STDERR
I0000 00:00:1795994705.005034    5770 port.cc:153] oneDNN custom operations are on. You may see slightly different
I0000 00:00:1795994705.005034    5770 cudart_stub.cc:31] Could not find cuda drivers on your machine, GPU will
I0000 00:00:1795994688.971720    5691 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use available CPU
To enable the following instructions: FMA, in other operations, rebuild TensorFlow with the appropriate compiler flags.
W0000 00:00:1795994688.971720    5691 something.cc:1] a real warning
E0000 00:00:1795994706.209648    5770 cuda_platform.cc:52] failed call to cuInit: INTERNAL: CUDA error
"""


def test_banners_are_dropped_and_real_messages_kept():
    assert _startup.kept_lines(CAPTURED) == ["W0000 00:00:1795994688.971720    5691 something.cc:1] a real warning"]


def test_a_failed_cuinit_is_kept_where_a_cuda_driver_exists():
    with_driver = "\n".join(line for line in CAPTURED.splitlines() if "cudart_stub" not in line)
    assert any("cuInit" in line for line in _startup.kept_lines(with_driver))


def test_importing_vdm_tf_prints_no_banner():
    env = {k: v for k, v in os.environ.items() if k not in ("VDM_TF_STARTUP_LOGS", "TF_CPP_MIN_LOG_LEVEL")}
    code = "import vdm_tf, tensorflow as tf; tf.constant(1) + 1"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env | {"VDM_TF_STARTUP_LOGS": "1"}
    )
    assert "oneDNN custom operations" in shown.stderr
