"""Likelihood serving speed: loopback gRPC server vs the in-process call, at batch 1 and 64.

    python -m bench.serving                    # digits preset model, 8 time samples per image
    python -m bench.serving --requests=200

The model is the digits preset's (untrained: speed does not depend on the weights), exported
with `export.export_model` and served by `export.loopback` (official TF-Serving protos, TF's
SavedModel loader), which stands in for `tensorflow/serving` here.
For each batch size it measures, after warm-up:

- latency: `--requests` sequential requests, p50 and p99 in milliseconds;
- throughput: the same number of requests from `--concurrency` client threads, requests/s.

"in-process" calls the loaded SavedModel's signature directly, so the difference is the cost of
gRPC, protobuf conversion and the server's request checks. Prints a table and writes
bench/results/serving.json.
"""

import concurrent.futures
import os
import tempfile
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

from export import client as client_lib  # noqa: E402
from export import loopback, saved_model  # noqa: E402
from trainers import configs  # noqa: E402

flags.DEFINE_integer("requests", 100, "Requests per measurement.")
flags.DEFINE_integer("concurrency", 8, "Client threads in the throughput measurement.")
flags.DEFINE_integer("time_samples", 8, "Antithetic time samples per image in the exported likelihood.")
flags.DEFINE_string("out", "bench/results/serving.json", "Where to write the JSON results.")
FLAGS = flags.FLAGS


def measure(call, requests, concurrency):
    for _ in range(3):
        call()  # warm-up: graph optimisation, channel set-up
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - start)
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        start = time.perf_counter()
        list(pool.map(lambda _: call(), range(requests)))
        elapsed = time.perf_counter() - start
    return {
        "p50_ms": 1e3 * float(np.percentile(latencies, 50)),
        "p99_ms": 1e3 * float(np.percentile(latencies, 99)),
        "requests_per_second": requests / elapsed,
    }


def main(argv):
    del argv
    config = configs.PRESETS["digits"]
    model = configs.build_model(config)
    model.build()
    rows = []
    with tempfile.TemporaryDirectory() as export_dir:
        path = saved_model.export_model(model, export_dir, time_samples=FLAGS.time_samples)
        signature = tf.saved_model.load(path).signatures["likelihood"]
        server, port = loopback.serve(os.path.join(export_dir, "vdm"), "vdm")
        client = client_lib.Client(f"127.0.0.1:{port}", "vdm", retries=0)
        try:
            for batch in (1, 64):
                images = np.random.default_rng(0).integers(0, 256, (batch, *model.image_shape), dtype=np.uint8)
                request = {"images": tf.constant(images), "seed": tf.constant(0, tf.int64)}
                in_process = measure(
                    lambda request=request: signature(**request)["bpd"].numpy(), FLAGS.requests, FLAGS.concurrency
                )
                grpc = measure(
                    lambda images=images: client.likelihood(images, seed=0), FLAGS.requests, FLAGS.concurrency
                )
                for path_name, figures in (("in-process", in_process), ("grpc", grpc)):
                    rows.append({"path": path_name, "batch": batch, **figures})
                rows[-1]["p50_vs_in_process"] = grpc["p50_ms"] / in_process["p50_ms"]
        finally:
            client.close()
            server.stop(grace=None)

    print(f"{'path':<11}{'batch':>6}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'img/s':>9}{'p50 x':>7}")
    for row in rows:
        ratio = f"{row['p50_vs_in_process']:7.2f}" if "p50_vs_in_process" in row else f"{'':>7}"
        print(
            f"{row['path']:<11}{row['batch']:>6}{row['p50_ms']:9.1f}{row['p99_ms']:9.1f}"
            f"{row['requests_per_second']:9.1f}{row['requests_per_second'] * row['batch']:9.1f}{ratio}"
        )
    result = {
        "model": "digits preset (8x8x1, 2 x 64 ScoreUNet)",
        "time_samples": FLAGS.time_samples,
        "requests": FLAGS.requests,
        "concurrency": FLAGS.concurrency,
        "machine": common.machine(),
        "rows": rows,
    }
    common.write_json(FLAGS.out, result)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
