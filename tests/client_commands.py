"""Runs several `python -m export.client` command lines in one process (one TensorFlow start-up instead of one each).

The serving tests call the client's command line many times against the loopback server
(`export.loopback`); each command runs as `python -m export.client` runs it.
"""

import json
import os
import subprocess
import sys

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs each command line as `python -m export.client` does (`define_flags(); app.run(main)`),
# the flags reset in between; an exception that escapes is written to stderr as a traceback.
CLIENT_DRIVER = r"""
import contextlib, io, json, sys, traceback
from absl import app
from export import client
client.define_flags()
results = []
for argv in json.loads(sys.argv[1]):
    client.FLAGS.unparse_flags()
    out, err, code = io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            app.run(client.main, argv=["export/client.py", *argv])
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = "exception"
    results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
print(json.dumps(results))
"""


def run_client_commands(commands, cwd, timeout=900):
    """Runs `export.client` command lines (argument lists after `python -m export.client`) in `cwd`.

    Returns one dict per command: `code` (the exit code), `stdout`, `stderr`.
    """
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([PROJECT_ROOT, os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "-c", CLIENT_DRIVER, json.dumps(commands)],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.splitlines()[-1])
