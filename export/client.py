"""gRPC client for a vdm_tf model behind TF-Serving (official `tensorflow-serving-api` stubs).

Command line:

    python -m export.client --server=localhost:8500 --model=vdm likelihood a.png b.png
    python -m export.client --server=localhost:8500 --model=vdm sample --num=16 --out=grid.png
    python -m export.client --server=localhost:8500 --model=vdm metadata

Python:

    client = export.client.Client("localhost:8500", "vdm")
    client.likelihood(images_uint8, seed=0)     # {"bpd": [N], "diffusion_bpd": [N], ...}
    client.sample(16, num_steps=256, seed=0)    # uint8 [16, H, W, C]

Every request carries every input of its signature: the export has no optional inputs
(`export.saved_model`), so a request works on any TF-Serving build. The sampler picks the
signature (`sample`, `sample_pc`, `sample_ode`).

An export takes at most `MAX_IMAGES_PER_REQUEST` images and `MAX_SAMPLES_PER_REQUEST` samples
per request (its defaults; `Client(max_batch_size=..., max_num_samples=...)` for an export with
other limits). The client splits a larger batch into requests of at most that size and joins
the answers; request k of a split call uses the seed `request_seed(seed, k)` (the caller's seed
for the first one), so each request draws its own noise.

Requests that fail because the server cannot be reached (UNAVAILABLE) or is slow
(DEADLINE_EXCEEDED) are retried with exponential back-off; after the last try a `ServingError`
says what happened and how to start a server. A request the server rejects (INVALID_ARGUMENT,
NOT_FOUND) is not retried: `ServingError` carries the server's message.

The command line checks its flags, its files (present, non-empty, single grey or RGB images of
one size, a mask of their size; `vdm_tf.image_files.read_image`) and its outputs' places before
it connects and before TensorFlow starts. The serving protos live in the `tensorflow` package,
so any request imports TensorFlow: it is imported on first use, through
`vdm_tf._startup.import_tensorflow` (without TensorFlow's start-up banners). The command line
ends in one line (`vdm_tf.cli.run`: an error, exit 1; Ctrl-C, exit 130), and writes its PNG and
`.npz` whole or not at all (`vdm_tf.files`).
"""

import math
import os
import re
import time

import grpc
import numpy as np
from absl import app, flags

from vdm_tf import _startup, cli, files, image_files

# The export's default limits per request (`export.saved_model.ServingModule` uses these).
MAX_IMAGES_PER_REQUEST = 1024
MAX_SAMPLES_PER_REQUEST = 256
SAMPLE_SIGNATURES = {"ancestral": "sample", "pc": "sample_pc", "ode": "sample_ode"}
RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
START_SERVER_HINT = (
    "Is TF-Serving running there? For example: docker run -p 8500:8500 -p 8501:8501 "
    "--mount type=bind,source=$PWD/runs/demo/export/vdm,target=/models/vdm -e MODEL_NAME=vdm tensorflow/serving"
)


class ServingError(RuntimeError):
    """A request failed; `code` is the gRPC status code, `details` the server's whole message."""

    def __init__(self, message, code=None, details=""):
        super().__init__(message)
        self.code = code
        self.details = details


def summary(details):
    """The line of a server's error message that says what is wrong.

    A check inside the graph fails with TensorFlow's `assertion failed: [what was expected; got]
    [value]` among lines that name graph nodes; any other message gives its first line.
    """
    lines = [line.strip() for line in details.splitlines() if line.strip()]
    failed = [line for line in lines if line.startswith("assertion failed:")]
    return (failed or lines or [""])[0]


def request_seed(seed, index):
    """The seed of request `index` of a split call: `seed + index * 2**32`, wrapped to int64.

    Request 0 keeps the caller's seed, so a call within the limits sends exactly its seed; the
    others draw noise of their own (they coincide with another call's seed only if the two seeds
    differ by a multiple of 2**32).
    """
    return np.int64((int(seed) + (int(index) << 32) + 2**63) % 2**64 - 2**63)


def request_slices(total, limit):
    """[start, stop) ranges of at most `limit` items that cover 0..total.

    A `total` below 1 gives the one range (0, total): the server rejects it with its own message.
    """
    if total < 1:
        return [(0, total)]
    return [(start, min(start + limit, total)) for start in range(0, total, limit)]


def join_answers(answers):
    """One answer from those of a split call: per-item outputs concatenated, scalars (`nfe`) summed."""
    return {
        key: np.concatenate([a[key] for a in answers]) if answers[0][key].ndim else sum(a[key] for a in answers)
        for key in answers[0]
    }


class Client:
    """Calls the signatures of an exported vdm_tf model (see `export.saved_model`).

    Args:
        server: `HOST:PORT` of TF-Serving's gRPC endpoint (8500 by default in its container).
        model: the model name (the server's `MODEL_NAME`).
        version: a specific model version; default: the latest the server has.
        timeout: seconds per attempt.
        retries: further attempts after the first, for UNAVAILABLE / DEADLINE_EXCEEDED.
        backoff: seconds before the first retry; doubled for each further one.
        max_batch_size: the most images the export takes per request; larger batches are split.
        max_num_samples: the most samples the export draws per request; more are split.
    """

    def __init__(
        self,
        server,
        model,
        version=None,
        timeout=60.0,
        retries=3,
        backoff=0.5,
        max_batch_size=MAX_IMAGES_PER_REQUEST,
        max_num_samples=MAX_SAMPLES_PER_REQUEST,
    ):
        _startup.import_tensorflow()  # the serving protos import TensorFlow: without its banners
        from tensorflow_serving.apis import prediction_service_pb2_grpc

        self.server = server
        self.model = model
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_batch_size = int(max_batch_size)
        self.max_num_samples = int(max_num_samples)
        max_message = 512 * 1024 * 1024  # large batches of images exceed gRPC's 4 MB default
        self.channel = grpc.insecure_channel(
            server,
            options=[("grpc.max_send_message_length", max_message), ("grpc.max_receive_message_length", max_message)],
        )
        self.stub = prediction_service_pb2_grpc.PredictionServiceStub(self.channel)

    def close(self):
        self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _model_spec(self, message, signature=None):
        message.model_spec.name = self.model
        if signature:
            message.model_spec.signature_name = signature
        if self.version is not None:
            message.model_spec.version.value = int(self.version)

    def _call(self, method, request):
        delay = self.backoff
        for attempt in range(self.retries + 1):
            try:
                return method(request, timeout=self.timeout)
            except grpc.RpcError as error:
                code, details = error.code(), error.details() or ""
                if code not in RETRIED:
                    message = f"{self.server} rejected the request ({code.name}): {summary(details)}"
                    raise ServingError(message, code, details) from None
                if attempt == self.retries:
                    raise ServingError(
                        f"No answer from {self.server} after {attempt + 1} attempts of {self.timeout:g} s "
                        f"({code.name}: {summary(details)}). {START_SERVER_HINT}",
                        code,
                        details,
                    ) from None
                time.sleep(delay)
                delay *= 2

    def predict(self, signature, **inputs):
        """One request to one signature with numpy inputs; returns its outputs as numpy arrays."""
        import tensorflow as tf
        from tensorflow_serving.apis import predict_pb2

        request = predict_pb2.PredictRequest()
        self._model_spec(request, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self.stub.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def _predict_images(self, signature, seed, images, **inputs):
        """`signature` on `images` (and per-image `inputs`, e.g. `mask`) in requests of at most
        `max_batch_size` images; scalar `num_steps` / `resample` are passed on as given."""
        images = _uint8_images(images)
        answers = []
        for k, (start, stop) in enumerate(request_slices(len(images), self.max_batch_size)):
            sliced = {key: value[start:stop] if np.ndim(value) else value for key, value in inputs.items()}
            answers.append(self.predict(signature, images=images[start:stop], seed=request_seed(seed, k), **sliced))
        return join_answers(answers)

    def likelihood(self, images, seed=0):
        """Per-image negative ELBO in bits per dimension and its terms.

        Args:
            images: uint8 [N, H, W, C] (split into requests of at most `max_batch_size`).
            seed: the same seed gives the same numbers.

        Returns:
            dict of float32 [N]: `bpd`, `diffusion_bpd`, `prior_bpd`, `reconstruction_bpd`.
        """
        return self._predict_images("likelihood", seed, images)

    def exact_likelihood(self, images, seed=0):
        """-log p(x) in bpd through the probability-flow ODE: {"bpd": [N], "nfe": ODE evaluations}."""
        return self._predict_images("exact_likelihood", seed, images)

    def one_step_likelihood(self, images, seed=0):
        """A CDM's one-step -log p(x) in bpd (a density, not a bound): {"bpd": [N]}."""
        return self._predict_images("one_step_likelihood", seed, images)

    def sample(self, num_samples, num_steps=256, seed=0, sampler="ancestral"):
        """`num_samples` new images (uint8 [num_samples, H, W, C]).

        `sampler`: `"ancestral"` (signature `sample`, `num_steps` steps), `"pc"`
        (predictor-corrector, `sample_pc`) or `"ode"` (adaptive probability-flow ODE,
        `sample_ode`; `num_steps` is not sent). More than `max_num_samples` are split.
        """
        if sampler not in SAMPLE_SIGNATURES:
            raise ValueError(f"sampler: expected one of {', '.join(SAMPLE_SIGNATURES)}; got {sampler!r}.")
        steps = {} if sampler == "ode" else {"num_steps": np.int32(num_steps)}
        answers = [
            self.predict(
                SAMPLE_SIGNATURES[sampler], num_samples=np.int32(stop - start), seed=request_seed(seed, k), **steps
            )
            for k, (start, stop) in enumerate(request_slices(int(num_samples), self.max_num_samples))
        ]
        return join_answers(answers)["images"]

    def inpaint(self, images, mask, seed=0, num_steps=250, resample=1):
        """Fills the pixels where `mask` is 0; known pixels (mask non-zero) come back unchanged.

        Args:
            images: uint8 [N, H, W, C].
            mask: anything that broadcasts to the images' shape ([H, W, C], [N, H, W, 1], ...).
            seed, num_steps: as for `sample`.
            resample: RePaint's tries per step (1: plain replacement).
        """
        images = _uint8_images(images)
        mask = np.broadcast_to(np.asarray(mask) != 0, images.shape).astype(np.uint8)
        inputs = {"mask": mask, "num_steps": np.int32(num_steps), "resample": np.int32(resample)}
        return self._predict_images("inpaint", seed, images, **inputs)["images"]

    def metadata(self):
        """The served model's version and SignatureDefs: (version, {name: SignatureDef})."""
        from tensorflow_serving.apis import get_model_metadata_pb2

        request = get_model_metadata_pb2.GetModelMetadataRequest(metadata_field=["signature_def"])
        self._model_spec(request)
        response = self._call(self.stub.GetModelMetadata, request)
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        response.metadata["signature_def"].Unpack(signature_map)
        return response.model_spec.version.value, dict(signature_map.signature_def)


def _uint8_images(images):
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"images: expected uint8 pixels [N, H, W, C]; got dtype {images.dtype}.")
    return images


# ---------------------------------------------------------------------------------------------
# Command line (its flags are defined only when run as a program, so importing the client
# library adds no flags to the importer's).

FLAGS = flags.FLAGS
COMMANDS = ("likelihood", "exact_likelihood", "one_step_likelihood", "sample", "inpaint", "metadata")
IMAGE_COMMANDS = ("likelihood", "exact_likelihood", "one_step_likelihood", "inpaint")
USAGE = (
    "usage: python -m export.client [flags] likelihood IMAGE.png ... | exact_likelihood IMAGE.png ... "
    "| one_step_likelihood IMAGE.png ... | sample | inpaint --mask=MASK.png IMAGE.png ... | metadata"
)


PROG = "python -m export.client"
IMAGE_FILE = "expected a grey (mode L) or RGB image file"
MASK_FILE = "expected a mask: a bilevel (mode 1), grey (mode L) or RGB image file"
# HOST:PORT of a gRPC server: a host name, an IPv4 address or a bracketed IPv6 address.
ADDRESS = re.compile(r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?):(?P<port>[0-9]{1,5})")


def define_flags():
    flags.DEFINE_string("server", "localhost:8500", "TF-Serving gRPC address, HOST:PORT.")
    flags.DEFINE_string("model", "vdm", "Model name on the server.")
    flags.DEFINE_integer("version", None, "Model version (default: the latest).", lower_bound=0)
    flags.DEFINE_float("timeout", 60.0, "Seconds per attempt (> 0).")
    flags.register_validator(
        "timeout", lambda value: math.isfinite(value) and value > 0, "--timeout must be a number of seconds > 0"
    )
    flags.DEFINE_integer("retries", 3, "Retries when the server is unreachable or times out.", lower_bound=0)
    flags.DEFINE_integer("seed", 0, "Seed of the request.")
    flags.DEFINE_integer("num", 16, "sample: number of images.", lower_bound=1)
    flags.DEFINE_integer("steps", 256, "sample (ancestral, pc) and inpaint: number of steps.", lower_bound=1)
    flags.DEFINE_string("out", "samples.png", "sample / inpaint: output PNG grid (and an .npz beside it).")
    flags.DEFINE_enum("sampler", "ancestral", list(SAMPLE_SIGNATURES), "sample: the sampler.")
    flags.DEFINE_string("mask", None, "inpaint: PNG of the images' size, non-zero where a pixel is known.")
    flags.DEFINE_integer("resample", 1, "inpaint: RePaint's tries per step.", lower_bound=1)


def read_image(path, modes=("L", "RGB"), expected=IMAGE_FILE):
    """One image file as uint8 [H, W, C] (`vdm_tf.image_files.read_image`); cli.Failure if refused."""
    try:
        return image_files.read_image(path, modes, expected)[0]
    except image_files.ImageFileError as error:
        raise cli.Failure(str(error)) from None


def read_images(paths):
    """uint8 [N, H, W, C] from image files of one size (see `read_image`)."""
    arrays = [read_image(path) for path in paths]
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise cli.Failure(f"expected images of one size; got shapes {shapes}.")
    return np.stack(arrays)


def read_mask(path, images):
    """The inpainting mask [H, W, 1 or C] of `images`: a grey, RGB or 1-bit image of their size."""
    mask = read_image(path, ("1", "L", "RGB"), MASK_FILE)
    height, width, channels = images.shape[1:]
    if mask.shape[:2] != (height, width) or mask.shape[2] not in (1, channels):
        layers = "1 channel" if channels == 1 else f"1 or {channels} channels"
        raise cli.Failure(
            f"{path}: expected a mask of the images' size {height}x{width} with {layers}; "
            f"got {mask.shape[0]}x{mask.shape[1]} with {mask.shape[2]}."
        )
    return mask


def npz_path(path):
    """The .npz written beside the PNG `path` (grid.png -> grid.npz)."""
    return os.path.splitext(path)[0] + ".npz"


def check_output_path(path):
    """--out: a .png path in an existing, writable directory; neither it nor its .npz is a directory."""
    if not path.lower().endswith(".png"):
        raise cli.Failure(f"--out: expected a .png file path; got {path!r}.")
    for output in (path, npz_path(path)):
        if os.path.isdir(output):
            raise cli.Failure(f"--out: {output} is a directory; the command writes {path} and {npz_path(path)}.")
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory) or not os.access(directory, os.W_OK | os.X_OK):
        raise cli.Failure(f"--out: the directory {directory!r} does not exist or is not writable.")


def check_flags():
    """The flags absl cannot check by itself: the server's address and the model's name."""
    address = ADDRESS.fullmatch(FLAGS.server)
    if not address or not 1 <= int(address["port"]) <= 65535:
        raise cli.Failure(
            f"--server: expected HOST:PORT of TF-Serving's gRPC endpoint (e.g. localhost:8500, [::1]:8500), "
            f"port 1..65535; got {FLAGS.server!r}."
        )
    if not FLAGS.model.strip():
        raise cli.Failure("--model: expected the model's name on the server (its MODEL_NAME); got ''.")


def parse_command(args):
    """(command, paths, images, mask) from the positional arguments, every flag, file and output checked."""
    check_flags()
    if not args or args[0] not in COMMANDS:
        raise cli.Failure(f"expected a command; got {' '.join(args) or 'none'}. {USAGE}")
    command, paths = args[0], args[1:]
    if command in IMAGE_COMMANDS and not paths:
        raise cli.Failure(f"{command} needs at least one image file.")
    if command not in IMAGE_COMMANDS and paths:
        raise cli.Failure(f"{command} takes no files; got {' '.join(paths)}.")
    if command == "inpaint" and not FLAGS.mask:
        raise cli.Failure("inpaint needs --mask=MASK.png (non-zero where a pixel is known).")
    if command in ("sample", "inpaint"):
        check_output_path(FLAGS.out)
    images = read_images(paths) if paths else None
    mask = read_mask(FLAGS.mask, images) if command == "inpaint" else None
    return command, paths, images, mask


def write_images(batch, path):
    """A grid PNG at `path` and the images in an .npz beside it, each whole or not at all."""
    from vdm_tf import images as image_utils

    npz = npz_path(path)
    with files.atomic_path(path) as grid_file, files.atomic_path(npz) as npz_file:
        image_utils.save_grid(batch, grid_file)  # PNG: the temporary keeps the .png extension
        np.savez_compressed(npz_file, images=batch)
    print(f"wrote {path} and {npz}: {batch.shape[0]} images of {batch.shape[1:]}")


def run_command(client, command, paths, images, mask):
    """Runs one checked command against the server and prints (or writes) its answer."""
    width = max((len(p) for p in paths), default=0)
    if command == "likelihood":
        result = client.likelihood(images, seed=FLAGS.seed)
        print(f"{'image':<{width}}  {'bpd':>7}  {'diffusion':>9}  {'prior':>7}  {'recon':>7}")
        for i, path in enumerate(paths):
            print(
                f"{path:<{width}}  {result['bpd'][i]:7.3f}  {result['diffusion_bpd'][i]:9.3f}  "
                f"{result['prior_bpd'][i]:7.4f}  {result['reconstruction_bpd'][i]:7.3f}"
            )
        print(f"{'mean':<{width}}  {result['bpd'].mean():7.3f}")
    elif command in ("exact_likelihood", "one_step_likelihood"):
        result = getattr(client, command)(images, seed=FLAGS.seed)
        for path, bpd in zip(paths, result["bpd"]):
            print(f"{path:<{width}}  {bpd:7.3f}")
        evaluations = f"  ({int(result['nfe'])} ODE evaluations)" if "nfe" in result else ""
        print(f"{'mean':<{width}}  {result['bpd'].mean():7.3f}{evaluations}")
    elif command == "sample":
        write_images(client.sample(FLAGS.num, num_steps=FLAGS.steps, seed=FLAGS.seed, sampler=FLAGS.sampler), FLAGS.out)
    elif command == "inpaint":
        write_images(client.inpaint(images, mask, FLAGS.seed, FLAGS.steps, FLAGS.resample), FLAGS.out)
    else:
        version, signatures = client.metadata()
        print(f"model {FLAGS.model}, version {version}")
        for name, signature in sorted(signatures.items()):
            inputs = ", ".join(_describe(k, v) for k, v in sorted(signature.inputs.items()))
            outputs = ", ".join(_describe(k, v) for k, v in sorted(signature.outputs.items()))
            print(f"  {name}({inputs}) -> {outputs}")


def main(argv):
    """absl's main: the command line `argv`, ended through `vdm_tf.cli.run` (exit 0, 1 or 130).

    Every flag, file and output path is checked before TensorFlow starts and before the client
    connects; a refused command line or a failed request is one line on stderr and exit 1. It
    calls `cli.run` itself, so that it ends the same way under any caller's `app.run` (the
    tests run many command lines in one process so), not only as `python -m export.client`.
    """
    cli.run(_main, argv, prog=PROG)


def _main(argv):
    checked = parse_command(argv[1:])
    cli.start()
    with Client(FLAGS.server, FLAGS.model, FLAGS.version, FLAGS.timeout, FLAGS.retries) as client:
        try:
            run_command(client, *checked)
        except ServingError as error:
            raise cli.Failure(str(error)) from None
    return 0


def _describe(name, tensor_info):
    import tensorflow as tf  # imported already, by the request

    dtype = tf.dtypes.as_dtype(tensor_info.dtype).name
    if tensor_info.tensor_shape.unknown_rank:
        return f"{name}: {dtype}"
    dims = ",".join("?" if d.size < 0 else str(d.size) for d in tensor_info.tensor_shape.dim)
    return f"{name}: {dtype}[{dims}]"


if __name__ == "__main__":
    define_flags()
    cli.run(app.run, main, prog=PROG)
