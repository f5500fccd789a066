"""Process start-up: TensorFlow imported without its banners; freed memory kept for the next step.

`prepare_process()` (public as `vdm_tf.prepare_process`) does all of it, once, before
TensorFlow is imported: every command line of the project calls it after checking its
arguments (`vdm_tf.cli.start`), and a script of one's own (a `model.fit` loop) can call it
first thing. `import vdm_tf` itself changes nothing in the process.

oneDNN. TensorFlow turns its oneDNN kernels on by itself on Intel CPUs but not on others (AMD
among them), where they train several times faster too: `prepare_process` sets
`TF_ENABLE_ONEDNN_OPTS=1` unless the environment says otherwise.

Banners (`import_tensorflow`). TensorFlow prints, at import and at its first device query, lines
that say nothing to a user of a CPU machine: the oneDNN notice, "Could not find cuda drivers",
the CPU-feature advice, and (with no CUDA driver) a failed `cuInit`. They are written by C++
code before its log level is read, so `TF_CPP_MIN_LOG_LEVEL` cannot hide them. This module
captures the process's stderr (file descriptor 2) around those two steps and writes back every
line that is not one of those banners: warnings and errors still show. `VDM_TF_STARTUP_LOGS=1`
shows everything.

The device query only lists devices: intra-op threads and logical devices can still be set.

Memory (`keep_freed_memory`). glibc's malloc returns freed memory to the system eagerly: a
thread arena other than the main one unmaps each of its extra 64 MiB heaps as soon as it is
empty. A training step frees all its activations at its end, so when the input pipeline's
threads run beside it (tf.data, as in every real training run) the next step faults the same
memory in again, page by page: 77,000 page faults and 0.13-0.17 s of system CPU time per step of
the paper network (about 3.8 CPU s) here. Keeping freed memory in the process, as tcmalloc and
jemalloc do, leaves about 2,000 (bench/results/train_throughput.json, `page_faults_per_step`).
`VDM_TF_KEEP_FREED_MEMORY=0` leaves malloc as it is; compare with
`python -m bench.train_throughput --configs=paper --paths=trainer` (column `faults/step`).
"""

import ctypes
import os
import platform
import re
import sys
import tempfile

# Banners of a normal start on a machine without a GPU; anything else is written back.
_BANNERS = (
    re.compile(r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$"),
    re.compile(r"^I\d{4} .*port\.cc:\d+\] oneDNN custom operations are on"),
    re.compile(r"^I\d{4} .*cudart_stub\.cc:\d+\] Could not find cuda drivers"),
    re.compile(r"^I\d{4} .*cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"),
    re.compile(r"^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\.$"),
)
# A failed cuInit is a banner only where TensorFlow found no CUDA driver at all.
_NO_DRIVER = re.compile(r"Could not find cuda drivers")
_CUINIT = re.compile(r"^E\d{4} .*failed call to cuInit")


# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MIB = 1 << 20
# Values: no trimming of the main heap below 1 GiB free; a top pad above the 64 MiB heap size of a
# thread arena, which also stops glibc from deleting or shrinking those heaps; blocks up to 32 MiB
# (glibc's maximum) from the heaps rather than from fresh mmaps. Setting any of these fixes
# glibc's otherwise adaptive mmap threshold, so all three are set.
MALLOC_SETTINGS = {_M_TRIM_THRESHOLD: 1024 * _MIB, _M_TOP_PAD: 128 * _MIB, _M_MMAP_THRESHOLD: 32 * _MIB}


def keep_freed_memory():
    """Makes glibc's malloc keep freed memory for reuse instead of returning it to the system.

    Returns True if the settings were applied; False where the C library is not glibc (macOS,
    musl: nothing to do) or `VDM_TF_KEEP_FREED_MEMORY=0`. The process's resident memory then
    stays at its peak rather than shrinking between steps. See the module docstring for why.
    """
    if os.environ.get("VDM_TF_KEEP_FREED_MEMORY") == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(parameter, value) == 1 for parameter, value in MALLOC_SETTINGS.items()])


def prepare_process():
    """Prepares this process for training or inference with vdm_tf; call it before importing TensorFlow.

    Turns oneDNN on where TensorFlow would not (`TF_ENABLE_ONEDNN_OPTS=1` unless set), keeps
    freed heap memory in the process (`keep_freed_memory`) and imports TensorFlow without its
    start-up banners (`import_tensorflow`). Each part is documented in this module's docstring;
    called again, or after TensorFlow was imported, it does what still can be done.

    Example:

        import vdm_tf
        vdm_tf.prepare_process()   # first: before keras or tensorflow are imported
        import keras
    """
    if "tensorflow" not in sys.modules:
        os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
    keep_freed_memory()
    import_tensorflow()


def kept_lines(text):
    """The lines of captured start-up output that are not banners."""
    lines = text.splitlines()
    no_driver = any(_NO_DRIVER.search(line) for line in lines)
    return [
        line
        for line in lines
        if not any(banner.search(line) for banner in _BANNERS) and not (no_driver and _CUINIT.search(line))
    ]


def import_tensorflow():
    """Imports TensorFlow (and lists its devices) with the start-up banners filtered out."""
    if "tensorflow" in sys.modules or os.environ.get("VDM_TF_STARTUP_LOGS") == "1":
        import tensorflow  # noqa: F401

        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no file descriptor 2 (some embedded interpreters)
        import tensorflow  # noqa: F401

        return
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            kept = kept_lines(captured.read().decode("utf-8", "replace"))
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()
