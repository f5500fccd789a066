"""A loopback TF-Serving stand-in: the official PredictionService protos over gRPC, TF's loader.

The `tensorflow/serving` binary cannot be installed here, so tests and `bench/serving.py` serve
exports with this server instead. It follows TF-Serving's request handling where the client can
see it:

- the model is looked up by name (NOT_FOUND otherwise) and its highest version is served;
- `signature_name` defaults to `serving_default`; an unknown one is INVALID_ARGUMENT;
- the request's inputs must be the signature's inputs, except those with a default in the
  SignatureDef (`defaults`), which may be omitted; extra or missing ones are INVALID_ARGUMENT
  with TF-Serving's wording ("input size does not match signature ... Missing but required");
- each input's dtype must match ("Expects arg[...] to be uint8 but float is provided");
- errors raised by the graph keep their gRPC status code and message;
- `output_filter` selects outputs; the response names the model, version and signature.

    server, port = loopback_serving.serve("runs/demo/export/vdm", "vdm")
    ...
    server.stop(grace=None)
"""

import concurrent.futures
import os

import grpc
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_metadata_pb2, predict_pb2, prediction_service_pb2_grpc

# tf.errors.OpError.error_code is an absl status code; gRPC uses the same numbering.
STATUS_BY_CODE = {code.value[0]: code for code in grpc.StatusCode}


class PredictionService(prediction_service_pb2_grpc.PredictionServiceServicer):
    """Serves the highest version of one model from a TF-Serving model base path."""

    def __init__(self, model_base_path, model_name):
        versions = [int(name) for name in os.listdir(model_base_path) if name.isdigit()]
        if not versions:
            raise FileNotFoundError(f"No numbered version directory in {model_base_path}.")
        self.model_name = model_name
        self.version = max(versions)
        path = os.path.join(model_base_path, str(self.version))
        self.loaded = tf.saved_model.load(path)
        saved_model = saved_model_pb2.SavedModel()
        with open(os.path.join(path, "saved_model.pb"), "rb") as f:
            saved_model.ParseFromString(f.read())
        (meta_graph,) = [m for m in saved_model.meta_graphs if "serve" in m.meta_info_def.tags]
        self.signature_defs = {k: v for k, v in meta_graph.signature_def.items() if not k.startswith("__")}

    def _check_model(self, model_spec, context):
        if model_spec.name != self.model_name:
            context.abort(grpc.StatusCode.NOT_FOUND, f"Servable not found for request: Latest({model_spec.name})")
        if model_spec.HasField("version") and model_spec.version.value != self.version:
            context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"Servable not found for request: Specific({model_spec.name}, {model_spec.version.value})",
            )

    def Predict(self, request, context):
        self._check_model(request.model_spec, context)
        signature_name = request.model_spec.signature_name or "serving_default"
        if signature_name not in self.signature_defs:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f'Serving signature key "{signature_name}" not found.')
        signature = self.signature_defs[signature_name]
        sent, expected = set(request.inputs), set(signature.inputs)
        required = expected - set(signature.defaults)
        if not sent <= expected or not required <= sent:
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"input size does not match signature: {len(sent)}!={len(expected)} "
                f"len({sorted(sent)}) != len({sorted(expected)}). Sent extra: {sorted(sent - expected)}. "
                f"Missing but required: {sorted(required - sent)}.",
            )
        inputs = {}
        for key in expected:
            proto = request.inputs[key] if key in sent else signature.defaults[key]
            want = tf.dtypes.as_dtype(signature.inputs[key].dtype)
            got = tf.dtypes.as_dtype(proto.dtype)
            if got != want:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"Expects arg[{key}] to be {want.name} but {got.name} is provided",
                )
            inputs[key] = tf.constant(tf.make_ndarray(proto))
        try:
            outputs = self.loaded.signatures[signature_name](**inputs)
        except tf.errors.OpError as error:
            context.abort(STATUS_BY_CODE.get(error.error_code, grpc.StatusCode.UNKNOWN), error.message)
        wanted = set(request.output_filter) or set(outputs)
        unknown = wanted - set(outputs)
        if unknown:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"output tensor alias not found in signature: {unknown}")
        response = predict_pb2.PredictResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        response.model_spec.signature_name = signature_name
        for key in wanted:
            response.outputs[key].CopyFrom(tf.make_tensor_proto(outputs[key].numpy()))
        return response

    def GetModelMetadata(self, request, context):
        self._check_model(request.model_spec, context)
        if list(request.metadata_field) != ["signature_def"]:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "Metadata field signature_def is the only one supported.")
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.model_name
        response.model_spec.version.value = self.version
        signature_map = get_model_metadata_pb2.SignatureDefMap()
        for key, value in self.signature_defs.items():
            signature_map.signature_def[key].CopyFrom(value)
        response.metadata["signature_def"].Pack(signature_map)
        return response


def serve(model_base_path, model_name, port=0, max_workers=16):
    """Starts a PredictionService on 127.0.0.1; returns (grpc server, port)."""
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=max_workers))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(model_base_path, model_name), server
    )
    port = server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    return server, port
