"""gRPC client for a vdm_tf model behind TF-Serving (official `tensorflow-serving-api` stubs).

Command line:

    python -m export.client --server=localhost:8500 --model=vdm likelihood a.png b.png
    python -m export.client --server=localhost:8500 --model=vdm sample --num=16 --out=grid.png
    python -m export.client --server=localhost:8500 --model=vdm metadata

Python:

    client = export.client.Client("localhost:8500", "vdm")
    client.likelihood(images_uint8, seed=0)     # {"bpd": [N], "diffusion_bpd": [N], ...}
    client.sample(16, num_steps=256, seed=0)    # uint8 [16, H, W, C]

Requests that fail because the server cannot be reached (UNAVAILABLE) or is slow
(DEADLINE_EXCEEDED) are retried with exponential back-off; after the last try a `ServingError`
says what happened and how to start a server. A request the server rejects (INVALID_ARGUMENT,
NOT_FOUND) is not retried: `ServingError` carries the server's message.
"""

import sys
import time

import grpc
import numpy as np
import tensorflow as tf
from absl import app, flags
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.RESOURCE_EXHAUSTED)
START_SERVER_HINT = (
    "Is TF-Serving running there? For example: docker run -p 8500:8500 -p 8501:8501 "
    "--mount type=bind,source=$PWD/runs/demo/export/vdm,target=/models/vdm -e MODEL_NAME=vdm tensorflow/serving"
)


class ServingError(RuntimeError):
    """A request failed; `code` is the gRPC status code."""

    def __init__(self, message, code=None):
        super().__init__(message)
        self.code = code


class Client:
    """Calls the signatures of an exported vdm_tf model (see `export.saved_model`).

    Args:
        server: `HOST:PORT` of TF-Serving's gRPC endpoint (8500 by default in its container).
        model: the model name (the server's `MODEL_NAME`).
        version: a specific model version; default: the latest the server has.
        timeout: seconds per attempt.
        retries: further attempts after the first, for UNAVAILABLE / DEADLINE_EXCEEDED.
        backoff: seconds before the first retry; doubled for each further one.
    """

    def __init__(self, server, model, version=None, timeout=60.0, retries=3, backoff=0.5):
        self.server = server
        self.model = model
        self.version = version
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
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
                code = error.code()
                if code not in RETRIED:
                    message = f"{self.server} rejected the request ({code.name}): {error.details()}"
                    raise ServingError(message, code) from None
                if attempt == self.retries:
                    raise ServingError(
                        f"No answer from {self.server} after {attempt + 1} attempts of {self.timeout:g} s "
                        f"({code.name}: {error.details()}). {START_SERVER_HINT}",
                        code,
                    ) from None
                time.sleep(delay)
                delay *= 2

    def predict(self, signature, **inputs):
        """Calls one signature with numpy inputs; returns its outputs as numpy arrays."""
        request = predict_pb2.PredictRequest()
        self._model_spec(request, signature)
        for key, value in inputs.items():
            request.inputs[key].CopyFrom(tf.make_tensor_proto(value))
        response = self._call(self.stub.Predict, request)
        return {key: tf.make_ndarray(proto) for key, proto in response.outputs.items()}

    def likelihood(self, images, seed=0):
        """Per-image negative ELBO in bits per dimension and its terms.

        Args:
            images: uint8 [N, H, W, C].
            seed: the same seed gives the same numbers.

        Returns:
            dict of float32 [N]: `bpd`, `diffusion_bpd`, `prior_bpd`, `reconstruction_bpd`.
        """
        return self.predict("likelihood", images=_uint8_images(images), seed=np.int64(seed))

    def exact_likelihood(self, images, seed=0):
        """-log p(x) in bpd through the probability-flow ODE: {"bpd": [N], "nfe": scalar}."""
        return self.predict("exact_likelihood", images=_uint8_images(images), seed=np.int64(seed))

    def one_step_likelihood(self, images, seed=0):
        """A CDM's one-step -log p(x) in bpd (a density, not a bound): {"bpd": [N]}."""
        return self.predict("one_step_likelihood", images=_uint8_images(images), seed=np.int64(seed))

    def sample(self, num_samples, num_steps=256, seed=0, sampler="ancestral"):
        """`num_samples` new images (uint8 [num_samples, H, W, C]).

        `sampler`: `"ancestral"` (`num_steps` steps), `"pc"` (predictor-corrector) or `"ode"`
        (adaptive probability-flow ODE; `num_steps` is ignored).
        """
        outputs = self.predict(
            "sample",
            num_samples=np.int32(num_samples),
            num_steps=np.int32(num_steps),
            seed=np.int64(seed),
            sampler=sampler,
        )
        return outputs["images"]

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
        outputs = self.predict(
            "inpaint",
            images=images,
            mask=mask,
            seed=np.int64(seed),
            num_steps=np.int32(num_steps),
            resample=np.int32(resample),
        )
        return outputs["images"]

    def metadata(self):
        """The served model's version and SignatureDefs: (version, {name: SignatureDef})."""
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


def define_flags():
    flags.DEFINE_string("server", "localhost:8500", "TF-Serving gRPC address, HOST:PORT.")
    flags.DEFINE_string("model", "vdm", "Model name on the server.")
    flags.DEFINE_integer("version", None, "Model version (default: the latest).")
    flags.DEFINE_float("timeout", 60.0, "Seconds per attempt.")
    flags.DEFINE_integer("retries", 3, "Retries when the server is unreachable or times out.")
    flags.DEFINE_integer("seed", 0, "Seed of the request.")
    flags.DEFINE_integer("num", 16, "sample: number of images.")
    flags.DEFINE_integer("steps", 256, "sample: number of ancestral steps.")
    flags.DEFINE_string("out", "samples.png", "sample / inpaint: output PNG grid (and an .npz beside it).")
    flags.DEFINE_enum("sampler", "ancestral", ["ancestral", "pc", "ode"], "sample: the sampler.")
    flags.DEFINE_string("mask", None, "inpaint: PNG of the images' size, non-zero where a pixel is known.")
    flags.DEFINE_integer("resample", 1, "inpaint: RePaint's tries per step.")


COMMANDS = ("likelihood", "exact_likelihood", "one_step_likelihood", "sample", "inpaint", "metadata")
USAGE = (
    "usage: python -m export.client [flags] likelihood IMAGE.png ... | exact_likelihood IMAGE.png ... "
    "| one_step_likelihood IMAGE.png ... | sample | inpaint --mask=MASK.png IMAGE.png ... | metadata"
)


def read_images(paths):
    """uint8 [N, H, W, C] from image files of one size (grey images get C = 1)."""
    from PIL import Image

    arrays = []
    for path in paths:
        with Image.open(path) as image:
            array = np.asarray(image if image.mode in ("L", "RGB") else image.convert("RGB"))
        arrays.append(array[..., None] if array.ndim == 2 else array)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise app.UsageError(f"All images must have one size; got {sorted(shapes)}.")
    return np.stack(arrays)


def write_images(batch, path):
    """A grid PNG at `path` and the images in an .npz beside it."""
    from vdm_tf import images as image_utils

    image_utils.save_grid(batch, path)
    npz = path.rsplit(".", 1)[0] + ".npz"
    np.savez_compressed(npz, images=batch)
    print(f"wrote {path} and {npz}: {batch.shape[0]} images of {batch.shape[1:]}")


def main(argv):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        raise app.UsageError(USAGE)
    if argv[1] in ("likelihood", "exact_likelihood", "one_step_likelihood", "inpaint") and len(argv) < 3:
        raise app.UsageError(f"{argv[1]} needs at least one image file.")
    command, paths = argv[1], argv[2:]
    with Client(FLAGS.server, FLAGS.model, FLAGS.version, FLAGS.timeout, FLAGS.retries) as client:
        try:
            if command == "likelihood":
                result = client.likelihood(read_images(paths), seed=FLAGS.seed)
                width = max(len(p) for p in paths)
                print(f"{'image':<{width}}  {'bpd':>7}  {'diffusion':>9}  {'prior':>7}  {'recon':>7}")
                for i, path in enumerate(paths):
                    print(
                        f"{path:<{width}}  {result['bpd'][i]:7.3f}  {result['diffusion_bpd'][i]:9.3f}  "
                        f"{result['prior_bpd'][i]:7.4f}  {result['reconstruction_bpd'][i]:7.3f}"
                    )
                print(f"{'mean':<{width}}  {result['bpd'].mean():7.3f}")
            elif command in ("exact_likelihood", "one_step_likelihood"):
                result = getattr(client, command)(read_images(paths), seed=FLAGS.seed)
                width = max(len(p) for p in paths)
                for path, bpd in zip(paths, result["bpd"]):
                    print(f"{path:<{width}}  {bpd:7.3f}")
                evaluations = f"  ({int(result['nfe'])} ODE evaluations)" if "nfe" in result else ""
                print(f"{'mean':<{width}}  {result['bpd'].mean():7.3f}{evaluations}")
            elif command == "sample":
                samples = client.sample(FLAGS.num, num_steps=FLAGS.steps, seed=FLAGS.seed, sampler=FLAGS.sampler)
                write_images(samples, FLAGS.out)
            elif command == "inpaint":
                if not FLAGS.mask:
                    raise app.UsageError("inpaint needs --mask=MASK.png (non-zero where a pixel is known).")
                images = read_images(paths)
                mask = read_images([FLAGS.mask])[0]
                filled = client.inpaint(images, mask, FLAGS.seed, FLAGS.steps, FLAGS.resample)
                write_images(filled, FLAGS.out)
            else:
                version, signatures = client.metadata()
                print(f"model {FLAGS.model}, version {version}")
                for name, signature in sorted(signatures.items()):
                    inputs = ", ".join(_describe(k, v) for k, v in sorted(signature.inputs.items()))
                    outputs = ", ".join(_describe(k, v) for k, v in sorted(signature.outputs.items()))
                    print(f"  {name}({inputs}) -> {outputs}")
        except ServingError as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
    return 0


def _describe(name, tensor_info):
    dtype = tf.dtypes.as_dtype(tensor_info.dtype).name
    if tensor_info.tensor_shape.unknown_rank:
        return f"{name}: {dtype}"
    dims = ",".join("?" if d.size < 0 else str(d.size) for d in tensor_info.tensor_shape.dim)
    return f"{name}: {dtype}[{dims}]"


if __name__ == "__main__":
    define_flags()
    app.run(main)
