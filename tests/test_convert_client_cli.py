"""The error matrices of `python -m vdm_tf.convert` and `python -m export.client`.

Each case runs the real command line (a subprocess of its own, all of them in parallel, no
network) and must exit non-zero with at most three lines, no Python traceback, the message it is
about, and nothing left behind: each case writes into a directory of its own, which must still
be empty afterwards, and no `-partial-` temporary may be left anywhere in the workspace.

Cases marked `NO_TF` run with TensorFlow (and Keras, TFDS, TFP) made unimportable: those mistakes
must be found before TensorFlow starts. The client's cases that connect go to a port where
nothing listens. Ctrl-C (SIGINT) is sent to a conversion in progress and to a client waiting on a
server that accepts and never answers; full disks are small tmpfs mounts (`small_disk`).
"""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from concurrent import futures

import numpy as np
import pytest
from PIL import Image

from export import client as client_lib
from vdm_tf import files

CONVERT, CLIENT = "vdm_tf.convert", "export.client"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "official_vdm")
SCALAR = os.path.join(FIXTURES, "dev_scalar")
CHECKPOINT = os.path.join(SCALAR, "checkpoint", "checkpoints-0.flax")
SCALAR_CONFIG = os.path.join(SCALAR, "official_config.json")

# Runs a module with TensorFlow and the libraries built on it unimportable.
WITHOUT_TENSORFLOW = textwrap.dedent(
    """
    import importlib.abc, runpy, sys
    FORBIDDEN = ("tensorflow", "keras", "tensorflow_datasets", "tensorflow_probability", "tensorflow_serving")
    class NoTensorFlow(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in FORBIDDEN:
                raise ImportError(f"{name} imported before the command line's checks were done")
    sys.meta_path.insert(0, NoTensorFlow())
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    """
)
NO_TF, WITH_TF = True, False

# In the arguments: {w} is the workspace, {o} the case's own output directory (empty, and empty
# afterwards), {ro} a read-only directory, {port} a local port where nothing listens.
CHECKPOINT_ARGS = [f"--checkpoint={CHECKPOINT}", f"--official_config={SCALAR_CONFIG}"]
KERAS = "--output={o}/m.keras"


def convert_case(*arguments, checkpoint=CHECKPOINT, config=SCALAR_CONFIG, output=KERAS):
    """The arguments of a conversion: the fixture checkpoint and config unless replaced."""
    given = [f"--checkpoint={checkpoint}"] if checkpoint else []
    given += [f"--official_config={config}"] if config else []
    return [*given, *([output] if output else []), *arguments]


def config_case(name):
    return convert_case(config=f"{{w}}/configs/{name}.json")


CONVERT_CASES = {  # name: (arguments, the message (a regular expression), TensorFlow allowed?)
    "missing checkpoint": (
        convert_case(checkpoint="{w}/missing.flax"),
        r"missing.flax: no such file, clu checkpoint prefix",
        NO_TF,
    ),
    "empty checkpoint": (
        convert_case(checkpoint="{w}/empty.flax"),
        r"empty.flax: an empty file, not a flax checkpoint",
        NO_TF,
    ),
    "garbage checkpoint": (
        convert_case(checkpoint="{w}/notes.flax"),
        r"notes.flax: not a flax checkpoint",
        NO_TF,
    ),
    "truncated checkpoint": (
        convert_case(checkpoint="{w}/half.flax"),
        r"half.flax: a truncated flax checkpoint \(it ends inside 'params'\)",
        NO_TF,
    ),
    "random bytes as checkpoint": (
        convert_case(checkpoint="{w}/random.flax"),
        r"random.flax: not a flax checkpoint",
        NO_TF,
    ),
    "directory without a checkpoint": (
        convert_case(checkpoint="{w}/no_checkpoint"),
        r"no_checkpoint: a directory without a .flax checkpoint file",
        NO_TF,
    ),
    "checkpoint of another architecture": (
        convert_case("--preset=cifar10", config=None),
        r"sm_n_embd=128 in the config, but score_model/conv_in/kernel has shape \(3, 3, 15, 32\)",
        NO_TF,
    ),
    "checkpoint of 3 channels for grey images": (
        convert_case("--dataset=mnist"),
        r"the checkpoint models 3-channel images .*; the data set has 1",
        NO_TF,
    ),
    "output not .keras": (convert_case(output="--output={o}/m.h5"), r"--output must name a .keras file", NO_TF),
    "output without a name": (convert_case(output="--output="), r"--output must name a .keras file; got ''", NO_TF),
    "output in a missing directory": (
        convert_case(output="--output={o}/missing/m.keras"),
        r"--output=.*/missing/m.keras: no directory .*missing to write it in",
        NO_TF,
    ),
    "output is a directory": (
        convert_case(output="--output={w}/a_dir.keras"),
        r"--output=.*a_dir.keras is a directory",
        NO_TF,
    ),
    "output in a read-only directory": (
        convert_case(output="--output={ro}/m.keras"),
        r"writing .*/m.keras failed: (Read-only file system|Permission denied); nothing was written there",
        NO_TF,
    ),
    "model_dir holds a run": (
        convert_case("--model_dir={w}/run"),
        r"--model_dir=.*/run already holds a run \(config.json\); expected a new or empty directory",
        NO_TF,
    ),
    "model_dir not empty": (convert_case("--model_dir={w}/no_checkpoint"), r"no_checkpoint is not empty", NO_TF),
    "model_dir is a file": (convert_case("--model_dir={w}/empty.flax"), r"empty.flax is a file; expected", NO_TF),
    "official config missing": (config_case("missing"), r"official config .*missing.json: No such file", NO_TF),
    "official config a directory": (
        convert_case(config="{w}/configs"),
        r"official config .*configs: Is a directory",
        NO_TF,
    ),
    "official config empty": (config_case("empty"), r"empty.json: the file is empty; expected a JSON object", NO_TF),
    "official config not JSON": (
        config_case("not_json"),
        r"not_json.json: not valid JSON: Expecting property name enclosed in double quotes at line 3, column 1",
        NO_TF,
    ),
    "official config Latin-1": (
        config_case("latin1"),
        r"latin1.json: not UTF-8 text \(byte 0xe9 at line 7, column 20\); expected a JSON file .* saved as UTF-8",
        NO_TF,
    ),
    "official config an array": (
        config_case("array"),
        r"array.json: expected a JSON object of VDMConfig fields; got an array",
        NO_TF,
    ),
    "official config a string": (
        config_case("string"),
        r"string.json: expected a JSON object of VDMConfig fields; got a string",
        NO_TF,
    ),
    "unknown field": (config_case("unknown_field"), r"unknown fields sm_n_heads; the VDM VDMConfig fields are", NO_TF),
    "missing field": (config_case("missing_field"), r"missing fields gamma_type; the VDM VDMConfig fields are", NO_TF),
    "gamma_min a string": (
        config_case("gamma_min_low"),
        r"gamma_min: expected a number; got 'low' \(a string\)",
        NO_TF,
    ),
    "gamma_min null": (config_case("gamma_min_null"), r"gamma_min: expected a number; got null\.", NO_TF),
    "gamma_min a list": (
        config_case("gamma_min_list"),
        r"gamma_min: expected a number; got \[1, 2\] \(an array\)",
        NO_TF,
    ),
    "gamma_min true": (config_case("gamma_min_true"), r"gamma_min: expected a number; got true \(a boolean\)", NO_TF),
    "gamma_max NaN": (config_case("gamma_max_nan"), r"gamma_max: expected a finite number; got nan", NO_TF),
    "gamma_max below gamma_min": (
        config_case("gamma_max_low"),
        r"gamma_max must exceed gamma_min; got -20.0 <= -13.3",
        NO_TF,
    ),
    "sm_n_timesteps a word": (
        config_case("timesteps_ten"),
        r"sm_n_timesteps: expected an integer; got 'ten' \(a string\)",
        NO_TF,
    ),
    "sm_n_embd a numeral string": (
        config_case("embd_string"),
        r"sm_n_embd: expected an integer; got '32' \(a string\)",
        NO_TF,
    ),
    "sm_n_layer a fraction": (
        config_case("layer_fraction"),
        r"sm_n_layer: expected an integer; got 1.5 \(a number\)",
        NO_TF,
    ),
    "sm_n_layer true": (config_case("layer_true"), r"sm_n_layer: expected an integer; got true \(a boolean\)", NO_TF),
    "with_attention 1": (
        config_case("attention_one"),
        r"with_attention: expected true or false; got 1 \(an integer\)",
        NO_TF,
    ),
    "gamma_type a number": (
        config_case("gamma_type_number"),
        r"gamma_type: expected a string; got 3 \(an integer\)",
        NO_TF,
    ),
    "unknown gamma_type": (config_case("gamma_type_cosine"), r"unknown gamma_type 'cosine'; expected", NO_TF),
    "sm_pdrop out of range": (
        config_case("pdrop_high"),
        r"sm_pdrop: expected a dropout rate in \[0, 1\); got 1.5",
        NO_TF,
    ),
    "sm_n_embd zero": (config_case("embd_zero"), r"sm_n_embd: expected an integer >= 1; got 0", NO_TF),
    "vocab_size 16": (config_case("vocab_16"), r"vocab_size=16; vdm_tf models 8-bit images \(256\)", NO_TF),
    "both preset and official config": (
        convert_case("--preset=cifar10"),
        r"argument --preset: not allowed with argument --official_config \(see --help\)",
        NO_TF,
    ),
    "neither preset nor official config": (
        convert_case(config=None),
        r"one of the arguments --preset --official_config is required",
        NO_TF,
    ),
    "unknown preset": (convert_case("--preset=imagenet", config=None), r"argument --preset: invalid choice", NO_TF),
    "unknown dataset": (
        convert_case("--dataset=cifar100"),
        r"--dataset must be one of digits, .*; got 'cifar100'",
        NO_TF,
    ),
    "unknown weights": (convert_case("--weights=opt_state"), r"argument --weights: invalid choice: 'opt_state'", NO_TF),
    "no checkpoint argument": (
        convert_case(checkpoint=None),
        r"the following arguments are required: --checkpoint",
        NO_TF,
    ),
    "unknown flag": (convert_case("--epochs=3"), r"unrecognized arguments: --epochs=3", NO_TF),
}

CLIENT_FLAGS = ["--server=127.0.0.1:{port}", "--retries=0", "--timeout=2"]


def client_case(*arguments, flags=CLIENT_FLAGS):
    return [*flags, *arguments]


def flag_case(flag, command="sample"):
    """A client command line with one bad flag (the others valid), output in {o}."""
    return client_case(flag, command, "--out={o}/g.png")


CLIENT_CASES = {
    "num not a number": (flag_case("--num=abc"), r"flag --num=abc: invalid literal for int\(\)", NO_TF),
    "num empty": (flag_case("--num="), r"flag --num=: invalid literal for int\(\)", NO_TF),
    "num zero": (flag_case("--num=0"), r"flag --num=0: 0 is not a positive integer", NO_TF),
    "num negative": (flag_case("--num=-3"), r"flag --num=-3: -3 is not a positive integer", NO_TF),
    "steps zero": (flag_case("--steps=0"), r"flag --steps=0: 0 is not a positive integer", NO_TF),
    "steps a fraction": (flag_case("--steps=2.5"), r"flag --steps=2.5: invalid literal for int\(\)", NO_TF),
    "resample zero": (flag_case("--resample=0"), r"flag --resample=0: 0 is not a positive integer", NO_TF),
    "retries negative": (flag_case("--retries=-1"), r"flag --retries=-1: -1 is not a non-negative integer", NO_TF),
    "retries a word": (flag_case("--retries=many"), r"flag --retries=many: invalid literal for int\(\)", NO_TF),
    "timeout negative": (
        flag_case("--timeout=-1"),
        r"flag --timeout=-1.0: --timeout must be a number of seconds > 0",
        NO_TF,
    ),
    "timeout zero": (flag_case("--timeout=0"), r"--timeout must be a number of seconds > 0", NO_TF),
    "timeout NaN": (flag_case("--timeout=nan"), r"--timeout must be a number of seconds > 0", NO_TF),
    "timeout infinite": (flag_case("--timeout=inf"), r"--timeout must be a number of seconds > 0", NO_TF),
    "timeout a word": (flag_case("--timeout=soon"), r"flag --timeout=soon: could not convert string to float", NO_TF),
    "version negative": (flag_case("--version=-1"), r"flag --version=-1: -1 is not a non-negative integer", NO_TF),
    "version a word": (flag_case("--version=latest"), r"flag --version=latest: invalid literal for int\(\)", NO_TF),
    "seed a word": (flag_case("--seed=abc"), r"flag --seed=abc: invalid literal for int\(\)", NO_TF),
    "unknown sampler": (flag_case("--sampler=ddim"), r"flag --sampler=ddim: value should be one of", NO_TF),
    "unknown flag": (flag_case("--samples=3"), r"Unknown command line flag 'samples'", NO_TF),
    "empty model": (flag_case("--model="), r"--model: expected the model's name on the server", NO_TF),
    **{
        f"server {given!r}": (
            client_case("metadata", flags=[f"--server={given}"]),
            rf"--server: expected HOST:PORT of TF-Serving's gRPC endpoint .*; got {re.escape(repr(given))}",
            NO_TF,
        )
        for given in (
            "",
            "localhost",
            ":8500",
            "localhost:",
            "localhost:port",
            "localhost:0",
            "localhost:70000",
            "http://localhost:8500",
            "local host:8500",
            "localhost:8500/vdm",
            "::1:8500",
        )
    },
    "no command": (client_case(), r"expected a command; got none. usage: python -m export.client", NO_TF),
    "unknown command": (client_case("predict"), r"expected a command; got predict. usage:", NO_TF),
    "likelihood without files": (client_case("likelihood"), r"likelihood needs at least one image file", NO_TF),
    "metadata with files": (client_case("metadata", "{w}/grey.png"), r"metadata takes no files", NO_TF),
    "inpaint without a mask": (
        client_case("inpaint", "{w}/grey.png", "--out={o}/g.png"),
        r"inpaint needs --mask=MASK.png",
        NO_TF,
    ),
    "inpaint with an empty mask flag": (
        client_case("inpaint", "--mask=", "{w}/grey.png", "--out={o}/g.png"),
        r"inpaint needs --mask=MASK.png",
        NO_TF,
    ),
    "missing image": (
        client_case("likelihood", "{w}/missing.png"),
        r"missing.png: no such file; expected a grey \(mode L\) or RGB image file",
        NO_TF,
    ),
    "image is a directory": (client_case("likelihood", "{w}/a_dir.keras"), r"a_dir.keras: is a directory", NO_TF),
    "empty image": (client_case("likelihood", "{w}/empty.png"), r"empty.png: the file is empty", NO_TF),
    "text as image": (
        client_case("exact_likelihood", "{w}/notes.png"),
        r"notes.png: not a readable image file \(Pillow cannot identify it\)",
        NO_TF,
    ),
    "truncated PNG": (
        client_case("likelihood", "{w}/truncated.png"),
        r"truncated.png: (not a readable|a broken)",
        NO_TF,
    ),
    "animated GIF": (
        client_case("likelihood", "{w}/animated.gif"),
        r"animated.gif: holds 3 images \(GIF frames",
        NO_TF,
    ),
    "multi-page TIFF": (
        client_case("likelihood", "{w}/pages.tiff"),
        r"pages.tiff: holds 2 images \(TIFF frames",
        NO_TF,
    ),
    "palette image": (client_case("likelihood", "{w}/palette.png"), r"palette.png: got mode P; expected a grey", NO_TF),
    "grey and alpha": (client_case("one_step_likelihood", "{w}/grey_alpha.png"), r"got mode LA", NO_TF),
    "RGBA image": (client_case("likelihood", "{w}/rgba.png"), r"rgba.png: got mode RGBA", NO_TF),
    "16-bit image": (client_case("likelihood", "{w}/deep.png"), r"deep.png: got mode I;16", NO_TF),
    "CMYK JPEG": (client_case("likelihood", "{w}/cmyk.jpg"), r"cmyk.jpg: got mode CMYK", NO_TF),
    "images of two sizes": (
        client_case("likelihood", "{w}/grey.png", "{w}/big.png"),
        r"expected images of one size; got shapes \[\(8, 8, 1\), \(16, 16, 1\)\]",
        NO_TF,
    ),
    "grey and RGB images": (
        client_case("likelihood", "{w}/grey.png", "{w}/rgb.png"),
        r"expected images of one size; got shapes \[\(8, 8, 1\), \(8, 8, 3\)\]",
        NO_TF,
    ),
    "mask of another size": (
        client_case("inpaint", "--mask={w}/mask_4x4.png", "{w}/grey.png", "--out={o}/g.png"),
        r"mask_4x4.png: expected a mask of the images' size 8x8 with 1 channel; got 4x4 with 1",
        NO_TF,
    ),
    "RGB mask of grey images": (
        client_case("inpaint", "--mask={w}/rgb.png", "{w}/grey.png", "--out={o}/g.png"),
        r"rgb.png: expected a mask of the images' size 8x8 with 1 channel; got 8x8 with 3",
        NO_TF,
    ),
    "palette mask": (
        client_case("inpaint", "--mask={w}/palette.png", "{w}/grey.png", "--out={o}/g.png"),
        r"palette.png: got mode P; expected a mask",
        NO_TF,
    ),
    "missing mask": (
        client_case("inpaint", "--mask={w}/missing_mask.png", "{w}/grey.png", "--out={o}/g.png"),
        r"missing_mask.png: no such file; expected a mask",
        NO_TF,
    ),
    "out not a PNG": (client_case("sample", "--out={o}/g.jpg"), r"--out: expected a .png file path; got", NO_TF),
    "out empty": (client_case("sample", "--out="), r"--out: expected a .png file path; got ''", NO_TF),
    "out is a directory": (client_case("sample", "--out={w}/dir.png"), r"--out: .*dir.png is a directory", NO_TF),
    "out's npz is a directory": (
        client_case("sample", "--out={w}/g.png"),
        r"--out: .*/g.npz is a directory; the command writes .*g.png and .*g.npz",
        NO_TF,
    ),
    "out in a missing directory": (
        client_case("sample", "--out={o}/missing/g.png"),
        r"--out: the directory '.*missing' does not exist or is not writable",
        NO_TF,
    ),
    "out in a read-only directory": (
        client_case("inpaint", "--mask={w}/grey.png", "{w}/grey.png", "--out={ro}/g.png"),
        r"--out: the directory '.*' does not exist or is not writable",
        NO_TF,
    ),
    "unreachable server": (
        client_case("sample", "--num=2", "--out={o}/g.png"),
        r"^python -m export.client: error: No answer from 127.0.0.1:\d+ after 1 attempts of 2 s \(UNAVAILABLE",
        WITH_TF,
    ),
    "unreachable server, likelihood": (
        client_case("likelihood", "{w}/grey.png", "{w}/grey.png"),
        r"No answer from 127.0.0.1:\d+ after 1 attempts",
        WITH_TF,
    ),
}

CASES = {f"convert: {k}": (CONVERT, *v) for k, v in CONVERT_CASES.items()}
CASES |= {f"client: {k}": (CLIENT, *v) for k, v in CLIENT_CASES.items()}


def write_json(path, value):
    path.write_text(json.dumps(value))


@contextlib.contextmanager
def read_only_directory(path):
    """A directory no one can write in: a read-only tmpfs (root writes in any mode 0555 directory)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=16k", "tmpfs", str(path)], capture_output=True)
    yield path if mounted.returncode == 0 else None
    if mounted.returncode == 0:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Checkpoints, configs, images and directories for the cases; {ro} is None where it cannot be made."""
    w = tmp_path_factory.mktemp("convert_client_cli")
    with open(CHECKPOINT, "rb") as f:
        checkpoint = f.read()
    (w / "empty.flax").write_bytes(b"")
    (w / "notes.flax").write_text("these are not the weights you are looking for\n")
    (w / "half.flax").write_bytes(checkpoint[:5000])
    (w / "random.flax").write_bytes(np.random.default_rng(0).bytes(4096))
    (w / "no_checkpoint").mkdir()
    (w / "no_checkpoint" / "checkpoint").write_text('model_checkpoint_path: "ckpt-3"\n')
    (w / "run").mkdir()
    (w / "run" / "config.json").write_text("{}")
    (w / "a_dir.keras").mkdir()
    (w / "dir.png").mkdir()
    (w / "g.npz").mkdir()  # beside {w}/g.png
    configs = w / "configs"
    configs.mkdir()
    fields = json.loads(open(SCALAR_CONFIG).read())
    (configs / "empty.json").write_text("\n")
    (configs / "not_json.json").write_text('{\n "vocab_size": 256,\n}\n')
    latin1 = json.dumps(fields | {"gamma_type": "café"}, indent=1, ensure_ascii=False).encode("latin-1")
    (configs / "latin1.json").write_bytes(latin1)
    write_json(configs / "array.json", [fields])
    write_json(configs / "string.json", "cifar10")
    write_json(configs / "unknown_field.json", fields | {"sm_n_heads": 4})
    write_json(configs / "missing_field.json", {k: v for k, v in fields.items() if k != "gamma_type"})
    changed = {
        "gamma_min_low": {"gamma_min": "low"},
        "gamma_min_null": {"gamma_min": None},
        "gamma_min_list": {"gamma_min": [1, 2]},
        "gamma_min_true": {"gamma_min": True},
        "gamma_max_low": {"gamma_max": -20.0},
        "timesteps_ten": {"sm_n_timesteps": "ten"},
        "embd_string": {"sm_n_embd": "32"},
        "layer_fraction": {"sm_n_layer": 1.5},
        "layer_true": {"sm_n_layer": True},
        "attention_one": {"with_attention": 1},
        "gamma_type_number": {"gamma_type": 3},
        "gamma_type_cosine": {"gamma_type": "cosine"},
        "pdrop_high": {"sm_pdrop": 1.5},
        "embd_zero": {"sm_n_embd": 0},
        "vocab_16": {"vocab_size": 16},
    }
    for name, change in changed.items():
        write_json(configs / f"{name}.json", fields | change)
    (configs / "gamma_max_nan.json").write_text(json.dumps(fields).replace('"gamma_max": 5.0', '"gamma_max": NaN'))
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(grey).save(w / "grey.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(w / "big.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(w / "rgb.png")
    Image.fromarray(grey).convert("P").save(w / "palette.png")
    Image.fromarray(grey).convert("LA").save(w / "grey_alpha.png")
    Image.fromarray(grey).convert("RGBA").save(w / "rgba.png")
    Image.fromarray(grey.astype(np.uint16) * 1000).save(w / "deep.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("CMYK").save(w / "cmyk.jpg")
    Image.fromarray(np.full((4, 4), 255, np.uint8)).save(w / "mask_4x4.png")
    frames = [Image.fromarray(grey + k) for k in range(3)]
    frames[0].save(w / "animated.gif", save_all=True, append_images=frames[1:])
    frames[0].save(w / "pages.tiff", save_all=True, append_images=frames[1:2])
    (w / "empty.png").write_bytes(b"")
    (w / "notes.png").write_text("not an image\n")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32), np.uint8)).save(w / "noise.png")
    (w / "truncated.png").write_bytes((w / "noise.png").read_bytes()[:600])  # of about 1100 bytes
    with read_only_directory(w / "read_only") as read_only:
        yield w, read_only


def case_directory(w, case):
    return w / ("out_" + "".join(c if c.isalnum() else "_" for c in case))


def partial_files(directory):
    return [
        os.path.join(d, name) for d, dirs, names in os.walk(directory) for name in dirs + names if "-partial-" in name
    ]


@pytest.fixture(scope="module")
def results(workspace):
    """Every case's completed process, run in parallel; the client's server port is never listened on."""
    w, read_only = workspace
    with socket.socket() as reserved:
        reserved.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused

        def run(case):
            module, arguments, _, without_tf = CASES[case]
            if "{ro}" in " ".join(arguments) and read_only is None:
                return None
            output = case_directory(w, case)
            output.mkdir()
            values = {"w": w, "o": output, "ro": read_only, "port": reserved.getsockname()[1]}
            arguments = [a.format(**values) for a in arguments]
            prefix = ["-c", WITHOUT_TENSORFLOW, module] if without_tf else ["-m", module]
            return subprocess.run(
                [sys.executable, *prefix, *arguments], capture_output=True, text=True, timeout=600, cwd=w
            )

        with futures.ThreadPoolExecutor(4) as pool:
            completed = dict(zip(CASES, pool.map(run, CASES)))
    counts = {module: sum(1 for m, *_ in CASES.values() if m == module) for module in (CONVERT, CLIENT)}
    tracebacks = sum("Traceback" in (c.stdout + c.stderr) for c in completed.values() if c is not None)
    print(f"\ncases: {counts}; tracebacks: {tracebacks}; partial files: {len(partial_files(w))}")
    return completed


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_short_message_and_leaves_nothing(case, results, workspace):
    completed = results[case]
    if completed is None:
        pytest.skip("no read-only directory can be made here")
    output = completed.stdout + completed.stderr
    lines = [line for line in output.splitlines() if line.strip()]
    assert completed.returncode == 1, output
    assert "Traceback" not in output, output
    assert 1 <= len(lines) <= 3, output
    assert re.search(CASES[case][2], completed.stderr, re.MULTILINE), output
    w = workspace[0]
    assert os.listdir(case_directory(w, case)) == [], "a failed command left files behind"
    assert partial_files(w) == [], "a temporary was left behind"


def test_a_connecting_client_prints_no_tensorflow_banner(results):
    """The serving protos import TensorFlow; its start-up lines (cuInit, oneDNN, CPU features) stay hidden."""
    completed = results["client: unreachable server"]
    assert completed.stderr.splitlines() == [line for line in completed.stderr.splitlines() if "error:" in line]
    assert len(completed.stderr.splitlines()) == 1, completed.stderr


# --------------------------------------------------------------------------------------------
# Full disks, Ctrl-C.


def run_module(module, *arguments, cwd):
    return subprocess.run([sys.executable, "-m", module, *arguments], capture_output=True, text=True, cwd=cwd)


def test_conversion_onto_a_full_disk_leaves_nothing(small_disk, tmp_path):
    """The .keras file, then the run directory, on a 64 KiB disk: one line naming the path, nothing left."""
    disk = small_disk(64)
    commands = {
        "keras": [*CHECKPOINT_ARGS, f"--output={disk}/m.keras"],
        "run directory": [*CHECKPOINT_ARGS, f"--output={tmp_path}/m.keras", f"--model_dir={disk}/runs/scalar"],
    }
    with futures.ThreadPoolExecutor(2) as pool:
        completed = dict(
            zip(commands, pool.map(lambda args: run_module(CONVERT, *args, cwd=tmp_path), commands.values()))
        )
    for name, path in (("keras", f"{disk}/m.keras"), ("run directory", f"{disk}/runs/scalar")):
        result = completed[name]
        assert result.returncode == 1, result.stderr
        message = f"writing {path} failed: No space left on device; nothing was written there"
        assert result.stderr.splitlines()[-1] == f"python -m vdm_tf.convert: error: {message}", result.stderr
        assert "Traceback" not in result.stderr
    assert os.listdir(disk) == [] and os.listdir(tmp_path) == []  # not even runs/, made for the run directory


def interrupted(process, timeout=120):
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout, stderr


def test_ctrl_c_while_the_conversion_starts_leaves_nothing(tmp_path):
    """SIGINT once the outputs' temporaries exist (TensorFlow is starting): exit 130, one line, nothing left."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            CONVERT,
            *CHECKPOINT_ARGS,
            f"--output={tmp_path}/m.keras",
            f"--model_dir={tmp_path}/run",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    deadline = time.monotonic() + 120
    while len(partial_files(tmp_path)) < 2 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    code, _, stderr = interrupted(process)
    assert code == 130 and stderr.splitlines()[-1] == "python -m vdm_tf.convert: interrupted", stderr
    assert "Traceback" not in stderr
    assert os.listdir(tmp_path) == []


# Converts with `vdm_tf.runs.save_run` made to stop when it has written the run directory, so that
# Ctrl-C comes when both outputs are complete under their temporary names.
STOPS_AFTER_SAVE_RUN = textwrap.dedent(
    """
    import runpy, sys, time
    from vdm_tf import runs
    save_run = runs.save_run
    def save_run_and_wait(*args, **kwargs):
        save_run(*args, **kwargs)
        print("saved", flush=True)
        time.sleep(600)
    runs.save_run = save_run_and_wait
    sys.argv = sys.argv[1:]
    runpy.run_module("vdm_tf.convert", run_name="__main__", alter_sys=True)
    """
)


def test_ctrl_c_with_both_outputs_written_but_not_in_place_leaves_nothing(tmp_path):
    arguments = [*CHECKPOINT_ARGS, f"--output={tmp_path}/m.keras", f"--model_dir={tmp_path}/runs/scalar"]
    process = subprocess.Popen(
        [sys.executable, "-c", STOPS_AFTER_SAVE_RUN, CONVERT, *arguments],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert process.stdout.readline() == "saved\n", process.communicate()
    assert len(partial_files(tmp_path)) == 2  # the .keras file and the run directory, complete
    code, _, stderr = interrupted(process)
    assert code == 130 and stderr.splitlines()[-1] == "python -m vdm_tf.convert: interrupted", stderr
    assert os.listdir(tmp_path) == []  # runs/ too: it was made for the run directory


def test_ctrl_c_while_the_client_waits_for_a_silent_server(tmp_path):
    """A server that accepts the connection and never answers; Ctrl-C ends the wait in one line."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        silent.settimeout(300)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        process = subprocess.Popen(
            [sys.executable, "-m", CLIENT, f"--server={address}", "--timeout=600", "sample", f"--out={tmp_path}/g.png"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        connection, _ = silent.accept()
        with connection:
            time.sleep(0.5)  # the request is on its way
            code, stdout, stderr = interrupted(process, timeout=60)
    assert code == 130, (stdout, stderr)
    assert stderr.splitlines() == ["python -m export.client: interrupted"], stderr
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------
# The client's outputs.


def test_sample_grid_and_npz_are_written_whole_or_not_at_all(small_disk, tmp_path, capsys):
    """Noise images too large for a 64 KiB disk: an OSError naming the path, neither file left."""
    batch = np.random.default_rng(0).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)
    disk = small_disk(64)
    with pytest.raises(files.OutputError, match=r"writing .*/g.(png|npz) failed: No space left on device"):
        client_lib.write_images(batch, os.path.join(disk, "g.png"))
    assert os.listdir(disk) == []
    client_lib.write_images(batch, str(tmp_path / "g.png"))
    assert sorted(os.listdir(tmp_path)) == ["g.npz", "g.png"]
    np.testing.assert_array_equal(np.load(tmp_path / "g.npz")["images"], batch)
    assert Image.open(tmp_path / "g.png").format == "PNG"
