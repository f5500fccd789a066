"""What every vdm_tf command line does around its own work: check, then start, then end in one line.

Every command line (`python -m vdm_tf.compression`, `vdm_tf.convert`, `trainers.main`,
`trainers.classifier`, `export.client`) is written the same way:

    def main(argv):
        args = parse_and_check(argv)   # no TensorFlow yet: a mistake costs a fraction of a second
        cli.start()                    # prepares the process, imports TensorFlow
        ...the work...

    if __name__ == "__main__":
        cli.run(main, prog="python -m vdm_tf.compression")

`run` turns whatever ends the command into one line on stderr and an exit code:

| what ended it                                   | exit | line                                  |
|-------------------------------------------------|------|---------------------------------------|
| `main` returned (None or an int)                | that | (main's own output)                   |
| `Failure` (a user's mistake, found by a check)  | 1    | `PROG: error: MESSAGE`                |
| `OSError` (full disk, permission, a lost file)  | 1    | `PROG: error: MESSAGE` (names the path) |
| `MemoryError`                                   | 1    | `PROG: error: out of memory ...`      |
| Ctrl-C (`KeyboardInterrupt`)                    | 130  | `PROG: interrupted`                   |
| a closed pipe (`... | head`)                    | 0    | nothing                               |

Any other exception is a bug in vdm_tf and keeps its traceback. Outputs are written through
`vdm_tf.files`, so a command that ends early leaves no file half-written.
"""

import argparse
import os
import signal
import sys
import threading
import time

from vdm_tf import _startup


class Failure(Exception):
    """A command line's input is wrong; the message (one line) says what was expected."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (a `Failure`: exit 1 through `run`), not usage + message, exit 2.

    The line ends with the usage where it is short, else with "(see --help)".
    """

    def error(self, message):
        usage = one_line(self.format_usage()).removeprefix("usage: ")
        raise Failure(f"{message} ({'usage: ' + usage if len(usage) <= 100 else 'see --help'})")


def start():
    """Prepares the process (`vdm_tf.prepare_process`) and imports TensorFlow: call it after the checks.

    A Ctrl-C while TensorFlow imports is held until the import ends and then raised: arriving inside
    Python's import machinery, it can be swallowed ("Exception ignored in ... _get_module_lock"),
    and the command would go on as if nothing had been pressed.
    """
    if threading.current_thread() is not threading.main_thread():
        _startup.prepare_process()
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda *_: pressed.append(True))
    try:
        _startup.prepare_process()
    finally:
        signal.signal(signal.SIGINT, previous)
    if pressed:
        raise KeyboardInterrupt


def progress_bar(target, verbose=True, **kwargs):
    """A `keras.utils.Progbar` on a terminal; elsewhere (a log file, a pipe) plain lines, one each tenth.

    Keras takes every POSIX stdout for a terminal, so a log file or a pipe would otherwise fill
    with its carriage returns and ANSI styles. `kwargs` are Progbar's (`unit_name`, ...); the
    plain lines read `900/9009 steps, 12 s`.
    """
    if verbose and not sys.stdout.isatty():
        return _ProgressLines(target, kwargs.get("unit_name", "step"))
    import keras

    return keras.utils.Progbar(target, verbose=int(bool(verbose)), **kwargs)


class _ProgressLines:
    """Progress as plain lines: one each time a further tenth of `target` is done (`update`, `add`)."""

    def __init__(self, target, unit_name):
        self.target, self.unit_name = target, unit_name
        self.current, self.tenths, self.start = 0, 0, time.monotonic()

    def update(self, current, values=None, finalize=None):
        self.current = current
        tenths = min(10, int(10 * current / self.target)) if self.target else 10
        if tenths > self.tenths:
            self.tenths = tenths
            print(f"{current}/{self.target} {self.unit_name}s, {time.monotonic() - self.start:.0f} s", flush=True)

    def add(self, n, values=None):
        self.update(self.current + n, values)


def one_line(message):
    """`message` with its whitespace (newlines included) collapsed to single spaces."""
    return " ".join(str(message).split())


def run(main, *args, prog=None):
    """Calls `main(*args)` and exits the process as the module docstring's table says."""
    prog = prog or os.path.basename(sys.argv[0])
    try:
        status = main(*args)
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        status = 130
    except BrokenPipeError:
        # The reader went away (`... | head`): nothing more to say, and nothing to say it on.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        status = 0
    except (Failure, OSError) as error:
        _say(f"{prog}: error: {one_line(_message(error))}")
        status = 1
    except MemoryError:
        _say(f"{prog}: error: out of memory (a smaller batch size or fewer images at once may fit)")
        status = 1
    sys.exit(status)


def _message(error):
    """An exception's text; an OSError of the system as `PATH: reason` (no `[Errno N]`)."""
    if isinstance(error, OSError) and error.strerror and type(error).__str__ is OSError.__str__:
        return f"{error.filename}: {error.strerror}" if error.filename else error.strerror
    return str(error)


def _say(line):
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    print(line, file=sys.stderr, flush=True)
