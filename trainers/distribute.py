"""Choosing a tf.distribute strategy, and where this process sits in the cluster.

TensorFlow is imported by the functions, not at the top: the command line names `STRATEGIES`
in its flags before TensorFlow starts.
"""

import dataclasses
import json
import os

STRATEGIES = ("auto", "default", "mirrored", "multi_worker", "tpu")


def make_strategy(name="auto", tpu=None):
    """The tf.distribute strategy for `--strategy` / `--tpu`.

    Args:
        name: `auto` (TPU if `tpu` is given, multi-worker if `TF_CONFIG` names a cluster,
            mirrored over the local GPUs if there are several, else the default strategy),
            `default`, `mirrored` (all local GPUs, or all logical CPU devices if there is no GPU),
            `multi_worker` (workers from `TF_CONFIG`) or `tpu`.
        tpu: TPU name or address for `TPUClusterResolver` ("local" on a TPU VM).
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        if tpu:
            name = "tpu"
        elif json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster"):
            name = "multi_worker"
        elif len(tf.config.list_logical_devices("GPU")) > 1:
            name = "mirrored"
        else:
            name = "default"
    if name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if name == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if name == "mirrored":
        devices = tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("CPU")
        return tf.distribute.MirroredStrategy([device.name for device in devices])
    return tf.distribute.get_strategy()


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """This process's place among the workers of a strategy."""

    num_workers: int
    worker_index: int
    replicas_per_worker: int

    @property
    def is_chief(self):
        return self.worker_index == 0


def cluster_info(strategy):
    """Workers, this worker's index and its replicas, for any strategy."""
    import tensorflow as tf

    resolver = getattr(strategy, "cluster_resolver", None)
    num_workers, worker_index = 1, 0
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and resolver.cluster_spec().as_dict():
        task_type, task_id = resolver.task_type, resolver.task_id
        workers = resolver.cluster_spec().as_dict()
        num_workers = len(workers.get("chief", [])) + len(workers.get("worker", []))
        has_chief = "chief" in workers
        worker_index = 0 if task_type == "chief" else task_id + (1 if has_chief else 0)
    return ClusterInfo(num_workers, worker_index, strategy.num_replicas_in_sync // num_workers)
