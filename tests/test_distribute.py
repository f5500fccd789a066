"""tf.distribute: MirroredStrategy and MultiWorkerMirroredStrategy train like one device."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed_run.py")


def run(strategy, tmp_path, name, env=None):
    """Starts tests/distributed_run.py; returns (process, path of the weights it will write, its log)."""
    out, log = tmp_path / f"{name}.npz", tmp_path / f"{name}.log"
    with open(log, "w") as log_file:
        process = subprocess.Popen(
            [sys.executable, SCRIPT, strategy, str(tmp_path / name), str(out)],
            env={**os.environ, **(env or {})},
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    return process, out, log


def finish(process, out, log):
    process.wait(timeout=600)
    assert process.returncode == 0, log.read_text()[-3000:]
    weights = np.load(out)
    assert weights["moved"] > 1e-3  # training did change the weights
    return int(weights["replicas"]), [weights[k] for k in weights.files if k.startswith("arr_")]


def test_mirrored_two_replicas_match_one_device(tmp_path):
    # Same global batch, same per-example randomness, plain SGD: the weights after five steps
    # agree to float rounding. Gradients summed over the replicas instead of averaged would
    # double every update (about 0.02 here). The two runs are independent processes, started
    # together: most of each one's time is single-threaded start-up and tracing.
    default, mirrored = run("default", tmp_path, "default"), run("mirrored", tmp_path, "mirrored")
    (replicas_one, one), (replicas_two, two) = finish(*default), finish(*mirrored)
    assert (replicas_one, replicas_two) == (1, 2)
    assert max(np.abs(a - b).max() for a, b in zip(one, two)) < 1e-5


def free_ports(count):
    """Ports free a moment ago. Another process may take one before a worker binds it: see below."""
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


PORT_TAKEN = "Could not start gRPC server"  # a worker's port was taken in the meantime


def start_workers(tmp_path, attempt):
    """Two workers of one cluster on fresh ports; a worker that cannot bind its port ends at once."""
    workers = [f"localhost:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        name = f"worker{index}_attempt{attempt}"
        processes.append(run("multi_worker", tmp_path, name, env={"TF_CONFIG": json.dumps(tf_config)}))
    return processes


def port_was_taken(processes):
    """Waits until both workers end or one of them could not bind its port (then stops the other)."""
    while any(process.poll() is None for process, _, _ in processes):
        if any(process.poll() and PORT_TAKEN in log.read_text() for process, _, log in processes):
            for process, _, _ in processes:
                process.kill()
                process.wait()
            return True
        time.sleep(0.5)
    return any(process.returncode and PORT_TAKEN in log.read_text() for process, _, log in processes)


def test_multi_worker_mirrored_workers_end_with_identical_weights(tmp_path):
    # Ports are chosen here and bound by the workers, so one can be taken in between; the
    # cluster is then started again on other ports (up to three times).
    for attempt in range(3):
        processes = start_workers(tmp_path, attempt)
        if not port_was_taken(processes):
            break
    (replicas_0, weights_0), (replicas_1, weights_1) = [finish(*p) for p in processes]
    assert replicas_0 == replicas_1 == 2
    for a, b in zip(weights_0, weights_1):
        np.testing.assert_array_equal(a, b)
