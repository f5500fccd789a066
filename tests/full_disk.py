"""A full disk for tests: a small tmpfs mounted in a temporary directory.

    def test_x(small_disk):
        directory = small_disk(64)      # a directory on a 64 KiB file system

Mounting needs root (CI and the project's machines run as root); where it is refused, the tests
that need a real full disk are skipped and the library-level tests, which fail their writes by
injection, still run.
"""

import contextlib
import os
import subprocess
import tempfile

import pytest


@contextlib.contextmanager
def mounted_tmpfs(kib):
    directory = tempfile.mkdtemp(prefix="vdm_tf-full-disk-")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", directory], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        os.rmdir(directory)
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", directory], capture_output=True)
        os.rmdir(directory)  # the empty mount point


@pytest.fixture
def small_disk():
    """A function kib -> a directory on a new tmpfs of that size (unmounted after the test)."""
    with contextlib.ExitStack() as stack:
        yield lambda kib: stack.enter_context(mounted_tmpfs(kib))
