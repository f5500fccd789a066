"""Checks of a trainer's command line that need no TensorFlow: arguments, paths, writability.

`trainers.main` and `trainers.classifier` make them before `vdm_tf.cli.start()`, so a mistake
is a one-line `cli.Failure` within a fraction of a second. Remote paths (`gs://...`) are left
to the object store: they are checked through `tf.io.gfile` once TensorFlow runs.
"""

from vdm_tf import cli, files, run_config


def no_extra_arguments(argv):
    """absl leaves the program name and whatever is not a flag in `argv`: there must be nothing else."""
    if len(argv) > 1:
        raise cli.Failure(f"unexpected arguments {' '.join(argv[1:])}; flags take the form --name=value.")


def path_flag(name, value, expected="a directory"):
    """`value` of flag `--name`, refused if empty."""
    if value is None or not value.strip():
        raise cli.Failure(f"--{name} is empty; expected {expected}.")
    return value


def writable_directory(path, flag, expected="a directory"):
    """Fails unless the directory `path` exists and takes new files, or can be created.

    The test is the real one (`vdm_tf.files.unwritable`): nothing is left behind.
    """
    if run_config.is_remote(path):
        return
    problem = files.unwritable(path)
    if problem is None:
        return
    existing, reason = problem
    if reason == "a file":
        raise cli.Failure(f"{flag}={path}: {existing} is a file; expected {expected}.")
    raise cli.Failure(
        f"{flag}={path}: cannot write in {existing} ({reason}); expected {expected} this process can write to."
    )
