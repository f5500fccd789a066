"""`python -m vdm_tf.compression encode|decode`: image files to a `.vdmz` and back.

Every argument is checked before TensorFlow starts (`parse_and_check` imports none of it): the
image files and their modes, the output path, `--model` and its image shape (read from the
`.keras` file's configuration, not loaded). Only then does `main` start TensorFlow
(`vdm_tf.cli.start`), load the model and code. A `.vdmz` is written whole or not at all
(`vdm_tf.files`); decoded PNGs go through a staging directory and a finished decode is never
thrown away (`write_pngs`). Every failure ends in one line (`vdm_tf.cli.run`), Ctrl-C with exit 130.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile

from vdm_tf import cli as vdm_cli
from vdm_tf import dataset_table, files, image_files, run_config
from vdm_tf.compression.container import CONVENTIONAL, CompressionError, ModelMismatchError, _check_names, read_header

PROG = "python -m vdm_tf.compression"
_BUNDLED_MODELS = {1: "photos_grey.keras", 3: "photos.keras"}  # channels -> file in vdm_tf/models/
# The command line's T for a continuous-time model (the bundled ones) without --steps: file size
# against speed on the held-out photographs (README, "Lossless compression"; the library's
# default stays 250).
COMMAND_LINE_STEPS = 50
MAX_BATCH_SIZE = 1024  # tiles per batch; the stack's initial words grow with it
_MODE_NAMES = {1: "L", 3: "RGB"}


def load_model(path):
    """A VDM from a `.keras` file (`model.save`) or a trainer run directory: `vdm_tf.load`."""
    from vdm_tf.runs import load

    return load(path)


def default_model_path(channels):
    """The bundled model the command line uses for images of `channels` channels (package data).

    Grey: `vdm_tf/models/photos_grey.keras`, the `photos_grey` preset; RGB:
    `vdm_tf/models/photos.keras`, the `photos` preset (README, "Lossless compression"). None
    for another channel count.
    """
    if channels not in _BUNDLED_MODELS:
        return None
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(package, "models", _BUNDLED_MODELS[channels])


def _model_image_shape(path):
    """The image shape of the model at `path`, read without TensorFlow.

    A `.keras` file holds its model's `get_config` in `config.json` (VDM's has `image_shape`).
    A run directory's `config.json` names its data set, whose shape `vdm_tf.dataset_table`
    knows. Raises ValueError for anything else.
    """
    path = os.fspath(path)
    if os.path.isfile(path) and path.endswith(".keras"):
        try:
            with zipfile.ZipFile(path) as archive:
                saved = json.loads(archive.read("config.json"))
            kind, shape = saved["class_name"], tuple(int(size) for size in saved["config"]["image_shape"])
        except (OSError, zipfile.BadZipFile, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"--model={path}: not a .keras file of a vdm_tf model (model.save): {error}") from None
        _check_codable(path, kind)
        return shape
    config = os.path.join(path, "config.json")
    if os.path.isdir(path) and os.path.isfile(config):
        try:
            saved = run_config.saved_config(path)
            shape = tuple(dataset_table.info(saved.data.dataset).image_shape)
        except (OSError, ValueError) as error:
            raise ValueError(f"--model={path}: unreadable run configuration config.json: {error}") from None
        _check_codable(path, {"cdm": "CDM", "mulan": "MuLAN"}.get(saved.model.kind, "VDM"))
        return shape
    raise ValueError(
        f"--model must be a .keras file written by model.save or a trainer run directory (with config.json); "
        f"got {path!r}."
    )


# The model classes (`config.json`'s class_name) that are not a `vdm_tf.VDM`, whose discrete-time
# chain with one scalar schedule per image `BitsBackCodec` codes, and why the codec cannot code them.
_NOT_CODABLE = {
    "MuLAN": "its noise schedule is per pixel given a latent w, and q(w | x) (the top k of "
    "gamma-perturbed logits) has no tractable probability to get bits back with",
    "CDM": "its likelihood is one step of a noise-level classifier, not a chain of Gaussian steps",
}


def _check_codable(path, kind):
    """A one-line ValueError for a model class the codec cannot code (`_NOT_CODABLE`)."""
    if kind in _NOT_CODABLE:
        raise ValueError(
            f"--model={path} is a {kind}, which the bits-back codec cannot code: {_NOT_CODABLE[kind]}; expected a VDM."
        )


def _shape_text(shape):
    return "x".join(map(str, shape))


def _shown(path):
    """`path` printable on any stdout (a POSIX name that is not UTF-8 keeps its bytes as escapes)."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def decoded_file_names(names, count):
    """The PNG file names `decode` writes for the stored `names` of `count` images.

    Each image goes to `<stem>.png` whatever its stored extension (digit4.jpg -> digit4.png,
    noext -> noext.png). Of several names with one stem (compared ignoring case), the first keeps
    `<stem>.png` and the later ones get `<stem>-1.png`, `<stem>-2.png`, ... (the first number no
    other name takes): a.png, a.jpg -> a.png, a-1.png. Stems that are no usable file name
    (empty, ".", "..", a NUL byte, over 200 bytes) and files without names get the image's index,
    00000.png, 00001.png, ...
    """
    stems = []
    for i in range(count):
        stem = os.path.splitext(os.path.basename(names[i]) if names else "")[0]
        if stem in ("", ".", "..") or "\0" in stem or len(stem.encode("utf-8", "surrogateescape")) > 200:
            stem = f"{i:05d}"
        stems.append(stem)
    wanted = {f"{stem}.png".casefold() for stem in stems}
    written, used = [], set()
    for stem in stems:
        name, number = f"{stem}.png", 0
        while name.casefold() in used or (number and name.casefold() in wanted):
            number += 1
            name = f"{stem}-{number}.png"
        used.add(name.casefold())
        written.append(name)
    return written


def _check_can_create(path, what):
    """Raises ValueError unless `path` is a directory this process may write in, or can be made one."""
    problem = files.unwritable(path)
    if problem is None:
        return
    existing, reason = problem
    if reason == "a file":
        raise ValueError(f"{what}: {existing} is a file, not a directory.")
    raise ValueError(f"{what}: no permission to write in {existing} ({reason}).")


def write_pngs(x, names, directory):
    """Writes uint8 images [N, H, W, C] as PNG files `directory/names[i]`, each complete or absent.

    The files are written in a hidden staging directory inside `directory`, then renamed into
    place. If any of this fails, the images not yet in place are written under the same names to
    a new directory in the system's temporary directory, and the OSError raised names it: a
    finished decode is not thrown away.
    """
    placed = 0
    try:
        os.makedirs(directory, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".vdmz-", dir=directory)
        try:
            for name, image in zip(names, x):
                image_files.write_image(os.path.join(staging, name), image)
            for name in names:
                os.replace(os.path.join(staging, name), os.path.join(directory, name))
                placed += 1
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as error:
        rescue = tempfile.mkdtemp(prefix="vdmz-decoded-")
        for name, image in zip(names[placed:], x[placed:]):
            image_files.write_image(os.path.join(rescue, name), image)
        raise OSError(
            f"writing the images to {directory} failed ({vdm_cli.one_line(error)}); the {len(names) - placed} "
            f"images not written there are in {rescue}"
        ) from None


# --------------------------------------------------------------------------------------------
# Arguments, checked without TensorFlow.


def _integer_in(minimum, maximum=None):
    """An argparse type: an integer in minimum..maximum."""
    expected = f"an integer >= {minimum}" if maximum is None else f"an integer in {minimum}..{maximum}"

    def integer(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"expected {expected}; got {text}")
        return value

    return integer


def _parser():
    parser = vdm_cli.ArgumentParser(prog=PROG, description="Lossless compression of images with a VDM (bits-back ANS).")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=vdm_cli.ArgumentParser)
    # Short usage lines: the one-line errors end with them.
    encode = commands.add_parser(
        "encode",
        help="compress image files (PNG, or any format Pillow reads) into one file",
        usage=f"{PROG} encode IMAGE [IMAGE ...] -o FILE.vdmz [--model=MODEL] [options]",
    )
    encode.add_argument("images", nargs="+", help="image files of any size (L or RGB; PNG or any format Pillow reads)")
    encode.add_argument("-o", "--output", required=True, help="the compressed file")
    positive, non_negative = _integer_in(1), _integer_in(0)
    encode.add_argument(
        "--steps", type=positive, default=None, help=f"T (default: the model's timesteps, or {COMMAND_LINE_STEPS})"
    )
    encode.add_argument("--batch_size", type=_integer_in(1, MAX_BATCH_SIZE), default=16)
    encode.add_argument("--latent_bins", type=positive, default=4)
    encode.add_argument("--window", type=positive, default=8)
    encode.add_argument("--elbo_samples", type=non_negative, default=8, help="time samples per image, -ELBO (0: skip)")
    encode.add_argument(
        "--fallback",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="store PNG/WebP-lossless files instead when smaller, or when the model's -ELBO on a sample of tiles "
        "says they will be (--no-fallback: every image bits-back coded)",
    )
    encode.add_argument("--threads", type=non_negative, default=0, help="TensorFlow intra-op threads (0: its default)")
    decode = commands.add_parser(
        "decode",
        help="decompress a .vdmz file into a directory of PNG files",
        usage=f"{PROG} decode FILE.vdmz -o DIRECTORY [--model=MODEL]",
    )
    decode.add_argument("input", help="the compressed file")
    decode.add_argument("-o", "--output", required=True, help="directory for the PNG files (<stem>.png per image)")
    for command in (encode, decode):
        command.add_argument(
            "--model",
            default=None,
            help="a .keras file (model.save) or a trainer run directory (default: the bundled grey or RGB model)",
        )
    return parser


def _model_for(model, channels, what):
    """The --model path, or the bundled default for `channels` channels, and its image shape (None: a run)."""
    if model is None:
        model = default_model_path(channels)
        if model is None or not os.path.isfile(model):
            raise ValueError(
                f"{what} {'grey' if channels == 1 else f'{channels}-channel'} images: no bundled model; pass --model."
            )
    return model, _model_image_shape(model)


def _channels_expected(channels, known):
    return f"expected an {_MODE_NAMES.get(channels, channels)} image" + (" (the model's channels)" if known else "")


def _check_encode(args):
    shape = _model_image_shape(args.model) if args.model else None
    channels = shape[-1] if shape else None
    if channels is not None and channels not in _MODE_NAMES:
        raise ValueError(f"--model={args.model} codes {channels}-channel images; the command line reads L or RGB.")
    names = [os.path.basename(path) for path in args.images]
    _check_names(names, len(names))
    if channels:
        modes, expected = (_MODE_NAMES[channels],), _channels_expected(channels, True)
    else:
        modes, expected = ("L", "RGB"), "expected an L or RGB image"
    read = [image_files.read_image(path, modes, expected) for path in args.images]
    args.x, args.formats, args.names = [image for image, _ in read], [kind for _, kind in read], names
    found = {image.shape[-1] for image in args.x}
    if len(found) > 1:
        raise ValueError("The inputs mix grey (L) and RGB images; one message holds one kind (encode them separately).")
    args.model, args.image_shape = _model_for(args.model, found.pop(), "encode:")
    if os.path.isdir(args.output):
        raise ValueError(f"-o {args.output} is a directory; expected the name of the file to write (out.vdmz).")
    _check_can_create(os.path.dirname(args.output) or ".", f"-o {args.output}")


def _check_decode(args):
    try:
        with open(args.input, "rb") as f:
            data = f.read()
    except OSError as error:
        raise ValueError(f"{args.input}: {error.strerror or error}; expected a file written by encode.") from None
    if not data:
        raise ValueError(f"{args.input}: the file is empty; expected a file written by encode.")
    try:
        args.header = read_header(data)
    except CompressionError as error:
        raise ValueError(f"{args.input}: {error}") from None
    args.data, header, given = data, args.header, args.model is not None
    if header.image_shape[-1] not in _MODE_NAMES:
        raise ValueError(f"{args.input} holds {header.image_shape[-1]}-channel images; decode writes L or RGB PNGs.")
    args.model, args.image_shape = _model_for(args.model, header.image_shape[-1], f"decode: {args.input} holds")
    args.given_model = given
    _check_decode_shape(args)
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise ValueError(f"-o {args.output} is a file; expected a directory for the PNG files.")
    _check_can_create(args.output, f"-o {args.output}")
    args.names = decoded_file_names(header.names, header.count)
    for name in args.names:
        if os.path.isdir(os.path.join(args.output, name)):
            raise ValueError(f"{os.path.join(args.output, name)} is a directory; decode writes a PNG file there.")


def _check_decode_shape(args):
    """ValueError unless the model codes the file's tile shape (nothing to check yet for a run directory)."""
    if args.image_shape is not None and args.header.image_shape != args.image_shape:
        model, hint = f"--model={args.model}", ""
        if not args.given_model:
            model, hint = "the bundled model", ": pass the encoder's --model"
        raise ModelMismatchError(
            f"{args.input} was coded with a model of {_shape_text(args.header.image_shape)} images; {model} "
            f"codes {_shape_text(args.image_shape)} images{hint}."
        )


def parse_and_check(argv):
    """The parsed arguments, every input checked and read; imports no TensorFlow.

    Raises:
        vdm_tf.cli.Failure: a one-line message naming what was expected.
    """
    args = _parser().parse_args(argv)
    try:
        (_check_encode if args.command == "encode" else _check_decode)(args)
    except ValueError as error:  # ImageFileError and CompressionError are ValueErrors
        raise vdm_cli.Failure(f"{args.command}: {vdm_cli.one_line(error)}") from None
    return args


# --------------------------------------------------------------------------------------------
# The work, after TensorFlow starts.


def _load_checked_model(path):
    """`load_model` for the command line: any failure becomes a one-line Failure naming the path."""
    try:
        return load_model(path)
    except Exception as error:  # Keras reports unloadable files with many exception types
        raise vdm_cli.Failure(f"--model={path}: could not load the model ({type(error).__name__}: {error})") from None


def _use_threads(threads):
    """Sets TensorFlow's intra-op thread count (possible only before TensorFlow runs its first op)."""
    import tensorflow as tf

    from vdm_tf.compression.codec import intra_op_threads

    if threads and threads != intra_op_threads():
        try:
            tf.config.threading.set_intra_op_parallelism_threads(threads)
        except RuntimeError:  # already running: the probe check of `decode` tells if the bits differ
            print(f"warning: could not switch TensorFlow to {threads} intra-op threads", file=sys.stderr)


def _encode(args):
    from vdm_tf.compression import elbo
    from vdm_tf.compression.codec import BitsBackCodec
    from vdm_tf.compression.conventional import image_file_bytes

    model = _load_checked_model(args.model)
    steps = args.steps or model.timesteps or COMMAND_LINE_STEPS
    try:
        codec = BitsBackCodec(model, steps, args.batch_size, args.latent_bins, args.window, fallback=args.fallback)
        codec._grid(codec.num_steps, codec.latent_bins, codec.window)  # too fine a grid: said before coding
    except ValueError as error:
        raise vdm_cli.Failure(f"encode: {vdm_cli.one_line(error)}") from None
    x, image_shape = args.x, args.image_shape
    start = time.perf_counter()
    data = codec.encode(list(x), names=args.names, verbose=True)
    seconds = time.perf_counter() - start
    files.write_bytes(args.output, data)
    header = read_header(data)
    dims, pixels = header.num_dims, header.num_dims // image_shape[-1]
    sizes = sorted({_shape_text(image.shape) for image in x})
    print(
        f"{len(x)} images {', '.join(sizes[:3])}{' ...' if len(sizes) > 3 else ''} (tiles {_shape_text(image_shape)}), "
        f"T={codec.num_steps}: {len(data)} bytes in {seconds:.1f} s ({pixels / seconds:.0f} pixels/s) "
        f"-> {_shown(args.output)}"
    )
    print(f"  file        {8 * len(data) / dims:8.3f} bpd ({codec.choice.reason})")
    if header.mode != CONVENTIONAL:
        initial = header.initial_bits / dims
        print(f"  seed        {8 * header.seed_bytes / dims:8.3f} bpd (initial bits {initial:.3f} bpd)")
        print(f"  net         {header.net_bits / dims:8.3f} bpd (bits-back codelength of the tiles)")
    print(f"  names       {8 * header.names_bytes / dims:8.3f} bpd ({header.names_bytes} bytes for {len(x)} names)")
    if args.elbo_samples:
        measured = elbo.tiles_elbo_bpd(model, x, codec.num_steps, num_time_samples=args.elbo_samples)
        spread = f" +- {measured['stderr']:.3f}" if measured["count"] > 1 else ""  # no standard error from one tile
        print(f"  -ELBO(T)    {measured['bpd']:8.3f} bpd{spread} ({args.elbo_samples} time samples/tile)")
    png = sum(image_file_bytes(image, optimize=True) for image in x)
    print(f"  PNG         {8 * png / dims:8.3f} bpd (Pillow, one file per image, optimize=True)")
    other = sorted({str(kind) for kind in args.formats} - {"PNG"})
    if other:
        print(
            f"note: {sum(kind != 'PNG' for kind in args.formats)} inputs are {'/'.join(other)} files, not PNG: decode "
            f"writes PNG files holding the decoded pixels, not the original file bytes."
        )


def _decode(args):
    from vdm_tf.compression.codec import BitsBackCodec, intra_op_threads

    model = _load_checked_model(args.model)
    start = time.perf_counter()
    try:
        x = BitsBackCodec(model).decode(args.data, verbose=True)
    except CompressionError as error:  # a corrupted payload, another model's weights, other bits
        raise vdm_cli.Failure(f"decode: {args.input}: {vdm_cli.one_line(error)}") from None
    seconds = time.perf_counter() - start
    write_pngs(x, args.names, args.output)
    print(
        f"{len(x)} images in {seconds:.1f} s ({args.header.num_dims // args.image_shape[-1] / seconds:.0f} pixels/s, "
        f"{intra_op_threads()} intra-op threads as the encoder) -> {_shown(args.output)} (PNG)"
    )


def main(argv=None, op_determinism=False):
    """`python -m vdm_tf.compression encode|decode ...`: checks, starts TensorFlow, codes; returns 0.

    Raises `vdm_tf.cli.Failure` or `OSError` (one line) for what a user can fix; `run` turns them
    into the exit status. `op_determinism` turns on `tf.config.experimental.enable_op_determinism`
    (a program's global switch: the command line sets it, a caller in-process decides for itself).
    """
    args = parse_and_check(sys.argv[1:] if argv is None else argv)
    vdm_cli.start()
    import tensorflow as tf

    _use_threads(args.threads if args.command == "encode" else args.header.threads)
    if op_determinism:
        tf.config.experimental.enable_op_determinism()
    tf.get_logger().setLevel("ERROR")  # one traced function per tile shape: not a retracing problem
    (_encode if args.command == "encode" else _decode)(args)
    return 0


def run(argv=None):
    """The program: `main` with one-line errors and exit codes (`vdm_tf.cli.run`)."""
    vdm_cli.run(main, argv, True, prog=PROG)
