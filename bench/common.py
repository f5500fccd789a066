"""What every benchmark does: start the process as the command lines do, describe the machine, write JSON.

    from bench import common

    common.prepare()                      # before TensorFlow is imported
    import tensorflow as tf
    ...
    common.write_json(args.out, {"machine": common.machine(), "results": rows})

A figure names its machine: the project's machines differ in kind from session to session (AMD
EPYC, Intel Xeon; 2-3x apart on the same code), so `machine()` records the CPU model, its
logical CPU count, the features that change TensorFlow's kernels (AVX-512, AVX512_BF16, AMX,
oneDNN) and the load of the rest of the machine when it was called.
"""

import json
import os
import platform
import sys
import time


def prepare():
    """Quiet TensorFlow logs and `vdm_tf.prepare_process()` (oneDNN, malloc, no banners): before TensorFlow."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import vdm_tf

    vdm_tf.prepare_process()


def _cpuinfo(key):
    """The first value of `key` in /proc/cpuinfo, or '' where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() == key), "")
    except OSError:
        return ""


def machine():
    """The machine a figure was measured on, and its load then (a dict for the results' JSON)."""
    flags = set(_cpuinfo("flags").split())
    description = {
        "cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "avx512": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1") == "1",
        "platform": platform.platform(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if "tensorflow" in sys.modules:
        description["tensorflow"] = sys.modules["tensorflow"].__version__
    return description


def write_json(path, result):
    """Writes `result` as indented JSON to `path` (whole or not at all: `vdm_tf.files`)."""
    from vdm_tf import files

    files.write_bytes(path, (json.dumps(result, indent=2) + "\n").encode("utf-8"))


def timed(function, *args, **kwargs):
    """(function(*args, **kwargs), its wall time in seconds)."""
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start
