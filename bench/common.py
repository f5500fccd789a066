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
import re
import sys
import time

import numpy as np


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


# Results kept per CPU kind: figures of one kind compare, those of different kinds differ 2-3x.

GENERIC_WORDS = {"CPU", "Processor", "processor", "Core", "with", "Radeon", "Graphics"}


def cpu_kind(model):
    """A CPU's kind from its model string: vendor and family, without trademarks, numbers or clock.

    "Intel(R) Xeon(R) Processor @ 2.80GHz" -> "Intel Xeon", "AMD EPYC 7B13 64-Core Processor" ->
    "AMD EPYC": figures of one kind compare; those of different kinds differ 2-3x on the same code.
    """
    words = re.sub(r"\((R|TM)\)", " ", model.split("@")[0], flags=re.IGNORECASE).split()
    named = [word for word in words if word.isalpha() and word not in GENERIC_WORDS]
    return " ".join(named[:2]) or model.strip() or "unknown"


def read_kinds(path, shared_keys=()):
    """The per-CPU-kind sections {kind: section} of the results file `path` ({} if there is none).

    A file of the older layout (one machine: {"machine", "results", ...}) is one kind's section,
    named from its machine's CPU; `shared_keys` are top-level entries that belong to no kind.
    """
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        earlier = json.load(f)
    if "kinds" in earlier:
        return earlier["kinds"]
    section = {key: value for key, value in earlier.items() if key not in shared_keys}
    return {cpu_kind(earlier["machine"]["cpu"]): section}


def merge_kind(kinds, kind, section, configs_order):
    """`kinds` with `kind`'s section replaced by `section`, whose `results` keep the earlier rows of
    that kind for configurations `section` did not measure; other kinds are kept as they are."""
    measured = {row["config"] for row in section["results"]}
    kept = [row for row in kinds.get(kind, {}).get("results", []) if row["config"] not in measured]
    results = sorted(kept + section["results"], key=lambda row: list(configs_order).index(row["config"]))
    return {**kinds, kind: {**section, "results": results}}


def paired_gap(values, reference):
    """Mean and standard error of the per-image differences `values - reference` (the same images, times
    and noise on both sides)."""
    difference = np.asarray(values) - np.asarray(reference)
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(difference.size))
