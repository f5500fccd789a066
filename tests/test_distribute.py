"""tf.distribute: MirroredStrategy and MultiWorkerMirroredStrategy train like one device."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_run.py")


def run(strategy, tmp_path, name, env=None):
    """Starts tests/distributed_run.py; returns (process, path of the weights it will write)."""
    out = tmp_path / f"{name}.npz"
    process = subprocess.Popen(
        [sys.executable, SCRIPT, strategy, str(tmp_path / name), str(out)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, out


def finish(process, out):
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    weights = np.load(out)
    assert weights["moved"] > 1e-3  # training did change the weights
    return int(weights["replicas"]), [weights[k] for k in weights.files if k.startswith("arr_")]


def test_mirrored_two_replicas_match_one_device(tmp_path):
    # Same global batch, same per-example randomness, plain SGD: the weights after five steps
    # agree to float rounding. Gradients summed over the replicas instead of averaged would
    # double every update (about 0.02 here).
    replicas_one, one = finish(*run("default", tmp_path, "default"))
    replicas_two, two = finish(*run("mirrored", tmp_path, "mirrored"))
    assert (replicas_one, replicas_two) == (1, 2)
    assert max(np.abs(a - b).max() for a, b in zip(one, two)) < 1e-5


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_workers_end_with_identical_weights(tmp_path):
    workers = [f"localhost:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        processes.append(run("multi_worker", tmp_path, f"worker{index}", env={"TF_CONFIG": json.dumps(tf_config)}))
    (replicas_0, weights_0), (replicas_1, weights_1) = [finish(*p) for p in processes]
    assert replicas_0 == replicas_1 == 2
    for a, b in zip(weights_0, weights_1):
        np.testing.assert_array_equal(a, b)
