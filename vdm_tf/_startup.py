"""Imports TensorFlow without its start-up banners, keeping every other message.

TensorFlow prints, at import and at its first device query, lines that say nothing to a user of
a CPU machine: the oneDNN notice, "Could not find cuda drivers", the CPU-feature advice, and
(with no CUDA driver) a failed `cuInit`. They are written by C++ code before its log level is
read, so `TF_CPP_MIN_LOG_LEVEL` cannot hide them. This module captures the process's stderr
(file descriptor 2) around those two steps and writes back every line that is not one of those
banners: warnings and errors still show. `VDM_TF_STARTUP_LOGS=1` shows everything.

The device query only lists devices: intra-op threads and logical devices can still be set.
"""

import os
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
