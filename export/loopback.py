"""A loopback TF-Serving stand-in: test a client without a TF-Serving binary.

The `tensorflow/serving` binary does not install with pip, so the tests, `bench/serving.py` and
a developer who wants to try `export.client` or a REST request on their own machine serve an
export with this server instead: the official PredictionService protos over gRPC, TensorFlow's
own SavedModel loader. It follows TF-Serving's request handling where the client can see it
(`tensorflow_serving/servables/tensorflow/predict_util.cc` and TensorFlow's
`saved_model/util.cc` `GetInputValues`), as a build that does NOT fill SignatureDef `defaults`:

- the model is looked up by name (NOT_FOUND otherwise) and its highest version is served;
- `signature_name` defaults to `serving_default`; an unknown one is FAILED_PRECONDITION;
- the request's inputs must be exactly the signature's inputs: an input left out is
  INVALID_ARGUMENT even if the SignatureDef has a default for it, with TF-Serving's wording
  ("input size does not match signature ... Missing but required: {...}", or "Signature input
  alias: ... not found in request and no default value provided" when the count matches);
- each input's dtype must match ("Expects arg[i] to be uint8 but float is provided");
- errors raised by the graph keep their gRPC status code and message;
- `output_filter` selects outputs; the response names the model, version and signature.

`serve_rest` adds TF-Serving's REST predict API on the same service (`POST
/v1/models/NAME[/versions/V]:predict` with a columnar `{"signature_name", "inputs"}` body; the
answer is `{"outputs": ...}`, or `{"error": message}` with an HTTP error status).

    from export import loopback
    server, port = loopback.serve("runs/demo/export/vdm", "vdm")    # gRPC on 127.0.0.1:port
    client = export.client.Client(f"127.0.0.1:{port}", "vdm")
    ...
    server.stop(grace=None)

Both servers bind port 0 in this process, so the OS hands out a free port that nobody else can
take between choosing and binding it. It is a development tool, not a server to deploy: one
process, no batching, no model reloading.
"""

import concurrent.futures
import http.server
import json
import os
import re
import threading

import grpc
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

# tf.errors.OpError.error_code is an absl status code; gRPC uses the same numbering.
STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}
# TensorFlow's DataTypeString names where they differ from tf.DType.name.
TF_TYPE_NAMES = {"float32": "float", "float64": "double", "float16": "half"}
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.NOT_FOUND: 404,
}


class RequestError(Exception):
    """A request the server refuses: a gRPC status code and TF-Serving's message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


def _joined(names):
    return ",".join(sorted(names))


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Serves the highest version of one model from a TF-Serving model base path."""

    def __init__(self, model_base_path, model_name, loaded=None):
        """`loaded`: that version already loaded by `tf.saved_model.load` (tests share it)."""
        versions = [int(name) for name in os.listdir(model_base_path) if name.isdigit()]
        if not versions:
            raise FileNotFoundError(f"No numbered version directory in {model_base_path}.")
        self.model_name = model_name
        self.version = max(versions)
        path = os.path.join(model_base_path, str(self.version))
        self.loaded = loaded if loaded is not None else tf.saved_model.load(path)
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        (meta_graph,) = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
        self.signature_defs = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}

    def check_model(self, model_spec):
        if model_spec.name != self.model_name:
            raise RequestError(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({model_spec.name})")
        if model_spec.HasField("version") and model_spec.version.value != self.version:
            raise RequestError(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({model_spec.name}, {model_spec.version.value})",
            )

    def signature_inputs(self, signature, request):
        """The request's inputs as tensors, checked against the signature; defaults are never used."""
        sent, expected = set(request.inputs), set(signature.inputs)
        if len(sent) != len(expected):
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} len({{{_joined(sent)}}}) "
                f"!= len({{{_joined(expected)}}}). Sent extra: {{{_joined(sent - expected)}}}. "
                f"Missing but required: {{{_joined(expected - sent)}}}.",
            )
        inputs = {}
        for index, key in enumerate(sorted(expected)):
            if key not in sent:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Signature input alias: {key}(feed name: {signature.inputs[key].name}) not found in request "
                    f"and no default value provided. Inputs expected to be in the request {{{_joined(sent)}}}, "
                    "or default input alias set: ",
                )
            want = tf.dtypes.as_dtype(signature.inputs[key].dtype).name
            got = tf.dtypes.as_dtype(request.inputs[key].dtype).name
            if got != want:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{index}] to be {TF_TYPE_NAMES.get(want, want)} but "
                    f"{TF_TYPE_NAMES.get(got, got)} is provided",
                )
            inputs[key] = tf.constant(tf.make_ndarray(request.inputs[key]))
        return inputs

    def predict(self, request):
        """A PredictResponse for `request`; raises RequestError as TF-Serving would answer."""
        self.check_model(request.model_spec)
        signature_name = request.model_spec.signature_name or "serving_default"
        if signature_name not in self.signature_defs:
            raise RequestError(
                grpc.StatusCode.FAILED_PRECONDITION, f'Serving signature key "{signature_name}" not found.'
            )
        signature = self.signature_defs[signature_name]
        inputs = self.signature_inputs(signature, request)
        for alias in request.output_filter:
            if alias not in signature.outputs:
                raise RequestError(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"output tensor alias not found in signature: {alias} Outputs expected to be in the set "
                    f"{{{_joined(signature.outputs)}}}.",
                )
        try:
            outputs = self.loaded.signatures[signature_name](**inputs)
        except tf.errors.OpError as error:
            raise RequestError(STATUS_BY_CODE.get(error.error_code, grpc.StatusCode.UNKNOWN), error.message) from None
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for key in request.output_filter or outputs:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
        return response

    def model_metadata(self, request):
        self.check_model(request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            raise RequestError(
                grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported."
            )
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in self.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signature_map)
        return response

    def Predict(self, request, context):
        try:
            return self.predict(request)
        except RequestError as error:
            context.abort(error.code, error.message)

    def GetModelMetadata(self, request, context):
        try:
            return self.model_metadata(request)
        except RequestError as error:
            context.abort(error.code, error.message)


def serve_grpc(servicer, port=0, max_workers=16):
    """Starts a PredictionService servicer on 127.0.0.1; returns (grpc server, port)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port(f"127.0.0.1:{port}")  # port 0: bound to a free port here
    server.start()
    return server, port


def serve(model_base_path, model_name, port=0, max_workers=16):
    """Serves the export at `model_base_path` over gRPC on 127.0.0.1; returns (grpc server, port)."""
    return serve_grpc(PredictionService(model_base_path, model_name), port, max_workers)


REST_PREDICT = re.compile(r"/v1/models/(?P<name>[^/:]+)(?:/versions/(?P<version>\d+))?:predict")


def rest_request(service, path, body):
    """The PredictRequest of a REST predict call (columnar format), as TF-Serving builds it.

    JSON numbers take the dtype of the signature's input, as in TF-Serving's JSON converter.
    """
    match = REST_PREDICT.fullmatch(path)
    if match is None:
        raise RequestError(grpc.StatusCode.NOT_FOUND, f"Malformed request: POST {path}")
    request = predict_pb2.PredictRequest()
    request.model_spec.name = match["name"]
    if match["version"]:
        request.model_spec.version.value = int(match["version"])
    request.model_spec.signature_name = body.get("signature_name", "")
    if not isinstance(body.get("inputs"), dict):
        raise RequestError(
            grpc.StatusCode.INVALID_ARGUMENT, 'the loopback REST API reads the columnar format: {"inputs": {...}}'
        )
    service.check_model(request.model_spec)
    signature = service.signature_defs.get(request.model_spec.signature_name or "serving_default")
    for key, value in body["inputs"].items():
        known = signature is not None and key in signature.inputs
        dtype = tf.dtypes.as_dtype(signature.inputs[key].dtype).as_numpy_dtype if known else None
        try:
            request.inputs[key].CopyFrom(tf.make_tensor_proto(np.asarray(value, dtype)))
        except (ValueError, TypeError, OverflowError) as error:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"input {key}: {error}") from None
    return request


def rest_outputs(response):
    """TF-Serving's columnar answer: {"outputs": value} for one output, {"outputs": {name: value}} else."""
    outputs = {key: tf.make_ndarray(proto).tolist() for key, proto in response.outputs.items()}
    return {"outputs": next(iter(outputs.values())) if len(outputs) == 1 else outputs}


def serve_rest(service, port=0):
    """TF-Serving's REST predict API for a `PredictionService` on 127.0.0.1; returns (server, port).

    Stop it with `server.shutdown()`.
    """

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                answer = rest_outputs(service.predict(rest_request(service, self.path, body)))
                status = 200
            except json.JSONDecodeError as error:
                answer, status = {"error": f"JSON Parse error: {error}"}, 400
            except RequestError as error:
                answer, status = {"error": error.message}, HTTP_STATUS.get(error.code, 500)
            data = (json.dumps(answer) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet: the tests read the answers
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]
