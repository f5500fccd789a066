"""Test settings: CPU only, quiet TensorFlow logs."""

import os

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from exported_model import exported  # noqa: E402, F401  (a session fixture)
from full_disk import small_disk  # noqa: E402, F401  (a fixture: a directory on a small tmpfs)
