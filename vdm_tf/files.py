"""Output files that are complete or absent, whatever goes wrong while they are written.

Every file and directory vdm_tf writes for a user (a `.vdmz`, decoded PNGs, a converted
`.keras`, sample grids and `.npz` files, SavedModel exports, metrics) goes through this module.
It is written under a temporary name beside its destination (same directory, so same file
system) and renamed into place only when it is complete: `os.replace` within one directory is
atomic on POSIX file systems. If writing fails (a full disk, a permission, Ctrl-C, any
exception), the temporary is removed and what had the destination's name before is untouched.

    with files.atomic_path("runs/demo/samples.npz") as temporary:
        np.savez_compressed(temporary, images=samples)     # renamed to samples.npz on success

    files.write_bytes("out.vdmz", data)

The temporary keeps the destination's extension (`.samples-partial-k2j3.npz`) because writers
such as `np.savez`, Pillow and `keras.Model.save` choose the format by it. Paths with a scheme
(`gs://...`) are written in place through `tf.io.gfile`-style writers by the caller: an object
store makes each object whole or absent by itself, so they are yielded unchanged.

A failure is raised as `OutputError` (an `OSError`), whose one-line message names the
destination and the cause ("writing out.vdmz failed: No space left on device; nothing was
written there").
"""

import contextlib
import errno
import functools
import os
import shutil
import tempfile


class OutputError(OSError):
    """Writing an output failed; the message names the path and says nothing half-written is left."""

    def __str__(self):
        return self.strerror or super().__str__()


def _is_url(path):
    return "://" in path


def _failure(path, error, existed):
    cause = error.strerror or str(error) if isinstance(error, OSError) else f"{type(error).__name__}: {error}"
    left = "the file that was there is unchanged" if existed else "nothing was written there"
    return OutputError(getattr(error, "errno", None), f"writing {path} failed: {cause}; {left}")


@contextlib.contextmanager
def atomic_path(path, directory=False):
    """Yields a temporary path beside `path` to write; renames it to `path` if the block succeeds.

    Args:
        path: the destination file (or directory, with `directory=True`). A file that exists is
            replaced only once the new one is complete; a directory must not exist or be empty.
        directory: yield an empty temporary directory instead of a file name.

    Raises:
        OutputError: for an OSError while writing or renaming (the temporary is removed). Any
            other exception (KeyboardInterrupt included) removes the temporary and propagates.
    """
    path = os.fspath(path)
    if _is_url(path):
        yield path
        return
    parent = os.path.dirname(os.path.abspath(path))
    stem, extension = os.path.splitext(os.path.basename(path))
    existed = os.path.exists(path)
    try:
        os.makedirs(parent, exist_ok=True)
        if directory:
            temporary = tempfile.mkdtemp(prefix=f".{stem}{extension}-partial-", dir=parent)
        else:
            handle, temporary = tempfile.mkstemp(prefix=f".{stem}-partial-", suffix=extension, dir=parent)
            os.close(handle)
    except OSError as error:
        raise _failure(path, error, existed) from None
    try:
        yield temporary
        # mkstemp's 0600 and mkdtemp's 0700 would make outputs private: give them open()'s modes.
        os.chmod(temporary, (0o777 if directory else 0o666) & ~_umask())
        os.replace(temporary, path)
    except BaseException as error:
        _remove(temporary)
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise _failure(path, error, existed) from None
        raise


# The file-system failures TensorFlow's writers report in their message text.
_IO_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EIO)


def io_error(error):
    """The OSError behind a failed TensorFlow write (`tf.errors.OpError`: a checkpoint, a SavedModel), or None.

    TensorFlow's C++ writers report a full disk or a permission only in their message text
    ("...; No space left on device [Op:SaveV2]"); this finds the system's reason there, so a
    command line can say it in one line like any other OSError. None where the message names
    none: the error is not the file system's.
    """
    message = getattr(error, "message", None) or str(error)
    for code in _IO_ERRNOS:
        if os.strerror(code) in message:
            return OSError(code, os.strerror(code))
    return None


def unwritable(directory):
    """Why no file could be created in `directory` (made first where it is missing), or None.

    Returns (the nearest existing ancestor, the reason): "a file" where that ancestor is not a
    directory, else the system's reason ("Read-only file system", "Permission denied"). The
    test is the real one: a temporary file is created there and removed at once, so a read-only
    mount, a permission or a full inode table show here, before any work, as they would later.
    """
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return existing, "a file"
    try:
        with tempfile.TemporaryFile(dir=existing):
            return None
    except OSError as error:
        return existing, error.strerror or str(error)


def write_bytes(path, data):
    """Writes `data` to `path` atomically (flushed to the disk before the rename)."""
    with atomic_path(path) as temporary, open(temporary, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def append_line(path, line):
    """Appends one text line to `path`; if the write fails, the file is cut back to what it was.

    For logs a run appends to (`metrics.jsonl`): every line in the file is whole.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    existed = os.path.exists(path)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise _failure(path, error, existed) from None
    try:
        size = os.lseek(descriptor, 0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(descriptor, view) :]
        except BaseException as error:
            with contextlib.suppress(OSError):
                os.ftruncate(descriptor, size)
            if isinstance(error, OSError):
                raise _failure(path, error, existed) from None
            raise
    finally:
        os.close(descriptor)


def _remove(path):
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            os.remove(path)


@functools.cache
def _umask():
    mask = os.umask(0o022)  # the only way to read it; set back at once
    os.umask(mask)
    return mask
