"""Every request example of README.md's "Serving with TF-Serving" section, run as written against
the strict loopback server (no SignatureDef defaults filled): the `export.client` commands, the
Python call and the REST (`curl`) requests.

The examples are read from README.md, so a README change that breaks one fails here. Only the
addresses change: localhost:8500 and localhost:8501 become the loopback server's gRPC and REST
ports. A command that needs a CDM's export (`one_step_likelihood`) goes to a served CDM.
"""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import exported_model
import numpy as np
import tensorflow as tf
from exported_model import IMAGE_SHAPE, assert_outputs_equal, expected_outputs, random_images
from PIL import Image

import export.client
from tests.client_commands import PROJECT_ROOT, run_client_commands

# Session fixtures (conftest imports `exported` only).
served, served_cdm, small_exports = exported_model.served, exported_model.served_cdm, exported_model.small_exports
README = os.path.join(PROJECT_ROOT, "README.md")
CLIENT = "python -m export.client "
CDM_COMMANDS = ("one_step_likelihood",)
# Used only where curl is not installed: POSTs `-d DATA` or `-d @FILE` to the URL, prints the answer.
CURL_STAND_IN = """#!{python}
import sys, urllib.error, urllib.request
args = sys.argv[1:]
i = args.index("-d")
data, others = args[i + 1], args[:i] + args[i + 2 :]
data = open(data[1:], "rb").read() if data.startswith("@") else data.encode()
url = next(a for a in others if not a.startswith("-"))
try:
    answer = urllib.request.urlopen("http://" + url.removeprefix("http://"), data).read()
except urllib.error.HTTPError as error:
    answer = error.read()
sys.stdout.write(answer.decode())
"""


def serving_section():
    with open(README) as f:
        text = f.read()
    start = text.index("\n## Serving with TF-Serving\n")
    return text[start : text.index("\n## ", start + 1)]


def code_blocks(section):
    return re.findall(r"^```[^\n]*\n(.*?)^```", section, flags=re.S | re.M)


def client_commands(section):
    """The argument lists of the section's `python -m export.client` lines, comments dropped."""
    lines = [line for block in code_blocks(section) for line in block.splitlines()]
    return [shlex.split(line, comments=True)[3:] for line in lines if line.startswith(CLIENT)]


def command_of(args):
    return next(arg for arg in args if not arg.startswith("--"))


def files_of(args):
    """The image files of a command line: its positional arguments after the command."""
    positional = [arg for arg in args if not arg.startswith("--")]
    return positional[1:]


def flag_value(args, name, default=None):
    values = [arg.split("=", 1)[1] for arg in args if arg.startswith(f"--{name}=")]
    return values[-1] if values else default


def test_every_client_command_of_the_readme_runs(served, served_cdm, tmp_path):
    commands = client_commands(serving_section())
    assert {command_of(args) for args in commands} == set(export.client.COMMANDS)  # each one documented
    rng = np.random.default_rng(0)
    inputs, runs = {}, []
    for args in commands:
        assert "--server=localhost:8500" in args, args
        command = command_of(args)
        port = (served_cdm if command in CDM_COMMANDS else served).port
        runs.append([arg.replace("localhost:8500", f"127.0.0.1:{port}") for arg in args])
        for path in files_of(args) + ([flag_value(args, "mask")] if flag_value(args, "mask") else []):
            if path not in inputs:  # grey images of the model's size; the mask: 0 or 255
                image = rng.integers(0, 256, IMAGE_SHAPE[:2], dtype=np.uint8)
                inputs[path] = np.where(image < 128, 0, 255).astype(np.uint8) if "mask" in path else image
                Image.fromarray(inputs[path]).save(tmp_path / path)
    results = run_client_commands(runs, cwd=tmp_path)
    for args, result in zip(commands, results):
        assert result["code"] == 0 and "error" not in result["stderr"], (args, result)
        command, seed = command_of(args), int(flag_value(args, "seed", 0))
        paths = files_of(args)
        if command in ("likelihood", "exact_likelihood", "one_step_likelihood"):
            client = (served_cdm if command in CDM_COMMANDS else served).client
            images = np.stack([inputs[path][..., None] for path in paths])
            expected = getattr(client, command)(images, seed=seed)["bpd"]
            rows = {line.split()[0]: line.split() for line in result["stdout"].splitlines()}
            np.testing.assert_allclose([float(rows[path][1]) for path in paths], expected, atol=6e-4)
        elif command in ("sample", "inpaint"):
            out = flag_value(args, "out", "samples.png")
            count = len(paths) if command == "inpaint" else int(flag_value(args, "num", 16))
            npz = out.rsplit(".", 1)[0] + ".npz"
            assert f"wrote {out} and {npz}: {count} images of {IMAGE_SHAPE}" in result["stdout"], result["stdout"]
        else:
            listed = {line.split("(")[0].strip() for line in result["stdout"].splitlines()[1:]}
            assert listed == set(served.service.signature_defs), result["stdout"]
    # The inpainting command's output: the known pixels (mask non-zero) are the input's.
    (args,) = [args for args in commands if command_of(args) == "inpaint"]
    filled = np.load(tmp_path / (flag_value(args, "out").rsplit(".", 1)[0] + ".npz"))["images"]
    known = inputs[flag_value(args, "mask")] > 0
    image = inputs[files_of(args)[0]]
    np.testing.assert_array_equal(filled[0, ..., 0][known], image[known])


def test_the_python_call_of_the_readme_runs(served):
    calls = re.findall(r"`(export\.client\.Client\([^`]*)`", serving_section())
    assert calls
    images_uint8 = random_images(3, seed=5)
    for call in calls:
        assert "localhost:8500" in call, call
        namespace = {"export": export, "images_uint8": images_uint8}
        answer = eval(call.replace("localhost:8500", f"127.0.0.1:{served.port}"), namespace)
        seed = re.search(r"seed=(-?\d+)", call)
        inputs = {"images": images_uint8, "seed": int(seed[1]) if seed else 0}
        assert_outputs_equal(answer, expected_outputs(served.model, "likelihood", inputs))


def curl_bodies(block):
    """The `-d` argument of each curl command of a shell block, in order."""
    lines = block.replace("\\\n", " ").splitlines()
    commands = [shlex.split(line) for line in lines if line.startswith("curl ")]
    return [command[command.index("-d") + 1] for command in commands]


def test_every_rest_request_of_the_readme_answers_what_the_model_computes(served, tmp_path):
    blocks = [block for block in code_blocks(serving_section()) if "curl " in block]
    assert blocks
    path = [os.path.dirname(sys.executable), os.environ["PATH"]]  # `python` is this interpreter
    if shutil.which("curl") is None:
        (tmp_path / "bin").mkdir()
        (tmp_path / "bin" / "curl").write_text(CURL_STAND_IN.format(python=sys.executable))
        (tmp_path / "bin" / "curl").chmod(0o755)
        path.insert(0, str(tmp_path / "bin"))
    environment = {**os.environ, "PATH": os.pathsep.join(path)}
    answered = 0
    for block in blocks:
        assert "localhost:8501" in block
        script = block.replace("localhost:8501", f"127.0.0.1:{served.rest_port}")
        completed = subprocess.run(
            ["bash", "-e", "-c", script], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300
        )
        assert completed.returncode == 0, completed.stderr[-3000:]
        decoder, text, answers = json.JSONDecoder(), completed.stdout.strip(), []
        while text:
            answer, end = decoder.raw_decode(text)
            answers.append(answer)
            text = text[end:].strip()
        bodies = curl_bodies(block)
        assert len(answers) == len(bodies), completed.stdout[:3000]
        for body, answer in zip(bodies, answers):
            assert "error" not in answer, answer
            if body.startswith("@"):
                body = (tmp_path / body[1:]).read_text()
            request = json.loads(body)
            signature = request.get("signature_name") or "serving_default"
            definition = served.service.signature_defs[signature]
            inputs = {
                key: np.asarray(value, tf.dtypes.as_dtype(definition.inputs[key].dtype).as_numpy_dtype)
                for key, value in request["inputs"].items()
            }
            outputs = answer["outputs"]
            if not isinstance(outputs, dict):  # TF-Serving's answer for a signature of one output
                (name,) = definition.outputs
                outputs = {name: outputs}
            assert_outputs_equal(outputs, expected_outputs(served.model, signature, inputs))
            answered += 1
    assert answered >= 2
