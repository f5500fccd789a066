"""Start-up: `import vdm_tf` changes nothing; `prepare_process` filters TensorFlow's banners (every other
message is kept), turns oneDNN on and keeps freed memory."""

import ctypes
import os
import platform
import resource
import subprocess
import sys
import textwrap
import threading

import pytest

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


def test_importing_vdm_tf_changes_nothing_in_the_process():
    """No TensorFlow, no environment variable, no malloc setting: a library import has no side effects."""
    env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "VDM_TF_KEEP_FREED_MEMORY")}
    code = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_startup import page_faults_per_round
        before = dict(os.environ)
        import vdm_tf
        assert vdm_tf.__version__ and "tensorflow" not in sys.modules, "import vdm_tf imported TensorFlow"
        assert dict(os.environ) == before, "import vdm_tf changed the environment"
        print(page_faults_per_round()[1])
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    if platform.libc_ver()[0] == "glibc":  # glibc's default: freed thread heaps unmapped, faulted in again
        assert float(result.stdout) > 0.5


def test_submodules_and_names_load_on_first_use():
    code = "import vdm_tf; from vdm_tf import VDM; print(VDM is vdm_tf.vdm.VDM, vdm_tf.load is vdm_tf.runs.load)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["True", "True"], result.stderr
    with pytest.raises(AttributeError, match="has no attribute 'nonexistent'"):
        vdm_tf_module().nonexistent  # noqa: B018


def vdm_tf_module():
    import vdm_tf

    return vdm_tf


def test_prepare_process_prints_no_banner_and_turns_onednn_on():
    env = {k: v for k, v in os.environ.items() if k not in ("VDM_TF_STARTUP_LOGS", "TF_CPP_MIN_LOG_LEVEL")}
    env.pop("TF_ENABLE_ONEDNN_OPTS", None)
    code = "import os, vdm_tf; vdm_tf.prepare_process(); import tensorflow as tf; tf.constant(1) + 1; "
    code += "print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip() == "1"
    shown = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env | {"VDM_TF_STARTUP_LOGS": "1"}
    )
    assert "oneDNN custom operations" in shown.stderr


# ------------------------------------------------------------------------------------------------
# keep_freed_memory


def page_faults_per_round(rounds=4, blocks=48, size=2 << 20):
    """Page faults of each round of: malloc 48 blocks of 2 MiB, write every page, free them all.

    Runs in a new thread, which glibc gives its own arena (as TensorFlow's threads get), like a
    training step's activations. With memory kept, rounds after the first fault (almost) nothing.
    """
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    faults = []

    def work():
        for _ in range(rounds):
            start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            blocks_ = [libc.malloc(size) for _ in range(blocks)]
            for block in blocks_:
                ctypes.memset(block, 1, size)
            for block in blocks_:
                libc.free(block)
            faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return [count / (blocks * size // resource.getpagesize()) for count in faults]  # as a fraction of the pages


glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")


def fault_fractions(code, **env):
    """Runs `code` after `vdm_tf.prepare_process()` in a fresh Python; the round-2 fault fractions it prints."""
    program = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import vdm_tf
        vdm_tf.prepare_process()
        from test_startup import page_faults_per_round
    """) + textwrap.dedent(code)
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, env=os.environ | env)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


# In a fresh process: in a long one (this test session, after hundreds of tests) a new thread
# may share an arena whose state makes glibc map fresh memory anyway.
@glibc
def test_prepare_process_keeps_freed_memory_for_the_next_step():
    (kept,) = fault_fractions("print(page_faults_per_round()[1])")
    assert float(kept) < 0.05


@glibc
def test_keeping_freed_memory_can_be_turned_off_and_is_what_removes_the_faults():
    code = """
        print(page_faults_per_round()[1])
        del os.environ["VDM_TF_KEEP_FREED_MEMORY"]
        print(vdm_tf._startup.keep_freed_memory(), page_faults_per_round()[1])
    """
    glibc_default, applied, kept = fault_fractions(code, VDM_TF_KEEP_FREED_MEMORY="0")
    assert float(glibc_default) > 0.5  # glibc's default: the freed heaps are unmapped and faulted in again
    assert applied == "True" and float(kept) < 0.05
