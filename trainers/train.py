"""The training loop: tf.distribute, checkpoints that resume mid-run, a NaN guard, monitoring.

The step itself is `VDM.train_step` (the same one `model.fit` runs). The loop around it is
ours rather than `model.fit` for one reason: a resumed run must continue from the data-iterator
position of its checkpoint, and tf.distribute's distributed iterators cannot be checkpointed
(tensorflow/tensorflow#56372). So each worker reads its own shard through a plain tf.data
iterator, which `tf.train.Checkpoint` can save (shuffle buffer and file positions included),
and hands each local replica its slice of the worker batch with
`strategy.experimental_distribute_values_from_function`. Replica r of R gets examples
r * b .. (r + 1) * b - 1 of the global batch, as `VDM._step_randomness` assumes.

Files in the run directory:
    config.json              the configuration (a rerun resumes with it)
    checkpoints/             model, optimizer (with the EMA weights) and step; written by the chief
    data/worker_<i>/         each worker's data-iterator position, saved with the same step number
    metrics.jsonl, tensorboard/, samples/   monitoring (chief)
"""

import logging
import math
import os
import shutil
import sys
import time

import keras
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from absl import logging as absl_logging

import vdm_tf
from trainers import distribute, monitoring


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; nothing from that state was saved."""


class DataNotPreparedError(RuntimeError):
    """A TensorFlow Datasets data set is not on disk and could not be downloaded."""


def fail(message):
    """Ends a trainer command with `error: MESSAGE` on stderr and exit code 1, no traceback."""
    raise SystemExit(f"error: {message}")


def quiet_info_logs():
    """Hides the INFO lines of TensorFlow's and absl's Python loggers; warnings still show.

    Saving a checkpoint or a SavedModel logs lines such as "Sharding callback duration",
    "Function `likelihood` contains input name(s) ... with unsupported characters" and "Assets
    written to"; they say nothing to a user of the command lines. `--verbosity=0` (absl's flag)
    shows them again. TensorFlow's C++ start-up banners are filtered by `import vdm_tf`.
    """
    if flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
        return
    tf.get_logger().setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)


def prepare_data(name, data_dir=None):
    """Makes sure the files of data set `name` are ready, downloading them if TFDS can.

    Raises:
        DataNotPreparedError: they are missing and the download failed (no network, a data
            set whose download URLs are gone); the message says how to prepare them.
    """
    info = vdm_tf.datasets.info(name)
    if info.tfds_name is None:  # digits: bundled with scikit-learn
        return
    verbosity = absl_logging.get_verbosity()
    absl_logging.set_verbosity(absl_logging.ERROR)  # "Variant folder ... has no dataset_info.json"
    try:
        builder = tfds.builder(info.tfds_name, data_dir=data_dir)
        prepared = builder.is_prepared()
    finally:
        absl_logging.set_verbosity(verbosity)
    if prepared:
        return
    try:
        builder.download_and_prepare()
    except Exception as error:  # whatever stopped the download, the user's remedy is the same
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
        raise DataNotPreparedError(
            f"the {name} data set is not prepared in {data_dir or '~/tensorflow_datasets'} and could not be "
            f"downloaded ({reason}).\nPrepare it on a machine with network access: tfds build {info.tfds_name} "
            "--data_dir=DIR, then pass --data_dir=DIR."
        ) from None


def check_batch_size(batch_size, strategy):
    """The global batch must split evenly over the replicas of `strategy`."""
    if batch_size % strategy.num_replicas_in_sync:
        raise ValueError(f"batch_size {batch_size} must be a multiple of the {strategy.num_replicas_in_sync} replicas.")


def _round_up(steps, multiple):
    return max(multiple, -(-steps // multiple) * multiple)


class Trainer:
    """Trains the model of a `Config` under a tf.distribute strategy, resuming from `model_dir`.

    Args:
        config: a `trainers.configs.Config`.
        model_dir: the run directory.
        strategy: a tf.distribute strategy (see `trainers.distribute.make_strategy`).
        data_dir: TensorFlow Datasets data directory.
        verbose: show a Keras progress bar.
    """

    def __init__(self, config, model_dir, strategy, data_dir=None, verbose=True):
        self.config = config
        self.model_dir = model_dir
        self.strategy = strategy
        self.cluster = distribute.cluster_info(strategy)
        self.verbose = verbose and self.cluster.is_chief
        self.steps_per_execution = config.steps_per_execution
        check_batch_size(config.batch_size, strategy)
        with strategy.scope():  # seeded: the same initial weights on every run and worker
            self.model = vdm_tf.runs.compiled_model(config, seed=config.seed)
        self.data = iter(self._worker_dataset(data_dir))
        self.data_checkpointable = True
        self._train_function = self._make_train_function()

        self.checkpoints = tf.train.CheckpointManager(
            vdm_tf.runs.model_checkpoint(self.model),
            self._write_dir("checkpoints"),
            max_to_keep=config.keep_checkpoints,
        )
        data_checkpoint = tf.train.Checkpoint(iterator=self.data)
        self.data_checkpoints = tf.train.CheckpointManager(
            data_checkpoint,
            os.path.join(model_dir, "data", f"worker_{self.cluster.worker_index}"),
            max_to_keep=config.keep_checkpoints,
        )
        self.log = monitoring.RunLog(model_dir) if self.cluster.is_chief else None

    # ------------------------------------------------------------------------------------------

    def _write_dir(self, name):
        """Chief: model_dir/name. Other workers take part in saving but write to a scratch dir."""
        if self.cluster.is_chief:
            return os.path.join(self.model_dir, name)
        return os.path.join(self.model_dir, name, f".worker_{self.cluster.worker_index}")

    def _worker_dataset(self, data_dir):
        """This worker's shard, in chunks of `steps_per_execution` worker batches."""
        workers = self.cluster.num_workers
        # An input context with one "replica" per worker makes `load` read this worker's shard
        # and batch the worker's share of the global batch.
        context = tf.distribute.InputContext(workers, self.cluster.worker_index, workers)
        batches = vdm_tf.datasets.load(
            self.config.dataset, "train", self.config.batch_size, seed=self.config.seed, data_dir=data_dir,
            input_context=context,
        )
        return batches.batch(self.steps_per_execution, drop_remainder=True).prefetch(1)

    def _distribute(self, chunk):
        """[k, worker_batch, ...] on this worker -> per-replica [k, replica_batch, ...]."""
        per_replica = chunk.shape[1] // self.cluster.replicas_per_worker
        first_replica = self.cluster.worker_index * self.cluster.replicas_per_worker

        def replica_slice(context):
            local = context.replica_id_in_sync_group - first_replica
            return chunk[:, local * per_replica : (local + 1) * per_replica]

        return self.strategy.experimental_distribute_values_from_function(replica_slice)

    def _make_train_function(self):
        """One call: `steps_per_execution` optimizer steps, each a `strategy.run` of train_step."""
        model, strategy, steps = self.model, self.strategy, self.steps_per_execution

        def run_steps(chunk):
            def body(i, _):
                strategy.run(lambda batches: model.train_step(batches[i]), args=(chunk,))
                return i + 1, 0

            tf.while_loop(lambda i, _: i < steps, body, (tf.constant(0), 0))

        return tf.function(run_steps, jit_compile=self.config.jit_compile)

    # ------------------------------------------------------------------------------------------

    @property
    def step(self):
        return int(self.model.optimizer.iterations.numpy())

    def restore(self):
        """Restores the latest checkpoint (if any); returns its step, or 0."""
        latest = tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
        if latest is None:
            return 0
        self.checkpoints.checkpoint.restore(latest).assert_existing_objects_matched()
        step = self.step
        data = os.path.join(self.data_checkpoints.directory, f"ckpt-{step}")
        if tf.io.gfile.exists(data + ".index"):
            self.data_checkpoints.checkpoint.restore(data).assert_consumed()
        else:
            print(f"warning: no data-iterator position for step {step}; the input pipeline starts afresh")
        return step

    def save(self):
        """Saves data position and then the model (the model checkpoint marks the step as done)."""
        step = self.step
        if self.data_checkpointable:
            try:
                self.data_checkpoints.save(checkpoint_number=step)
            except tf.errors.FailedPreconditionError as error:  # e.g. a pipeline with a Python generator
                self.data_checkpointable = False
                print(f"warning: the input pipeline cannot be checkpointed ({error.message.strip()}); "
                      "a resumed run will restart it", file=sys.stderr)
        self.checkpoints.save(checkpoint_number=step)
        if not self.cluster.is_chief:
            shutil.rmtree(self.checkpoints.directory, ignore_errors=True)

    def ema_weights(self):
        """Temporarily puts the EMA weights into the model (`vdm_tf.runs.ema_weights`)."""
        return vdm_tf.runs.ema_weights(self.model)

    def _reset_metrics(self):
        for tracker in self.model.metrics:
            tracker.reset_state()

    def _metric_values(self):
        return {name: float(tracker.result()) for name, tracker in self.model.term_trackers.items()}

    def train(self):
        """Runs until `config.train_steps`; returns the final metrics (window means)."""
        config, k = self.config, self.steps_per_execution
        checkpoint_every = _round_up(config.checkpoint_every, k)
        log_every = _round_up(config.log_every, k)
        sample_every = _round_up(config.sample_every, k)
        start = self.restore()
        if start:
            print(f"resumed from step {start} ({self.checkpoints.latest_checkpoint or 'checkpoint'})")
        if self.log:
            self.log.drop_after(start)  # lines a killed run logged after its last checkpoint
        progress = keras.utils.Progbar(
            config.train_steps, verbose=1 if self.verbose else 0, stateful_metrics=list(self.model.term_trackers)
        )
        self._reset_metrics()
        window_start, window_steps, values = time.perf_counter(), 0, {}
        step = start
        while step < config.train_steps:
            self._train_function(self._distribute(next(self.data)))
            step += k
            window_steps += k
            values = self._metric_values()
            if not all(math.isfinite(v) for v in values.values()):
                latest = self.checkpoints.latest_checkpoint
                kept = (
                    f"the last good checkpoint ({latest}) is intact" if latest
                    else "no checkpoint had been written yet"
                )
                raise NonFiniteLossError(
                    f"Training stopped at step {step}: the loss is not finite ({values}). Nothing was saved "
                    f"from this state; {kept}. Lower the learning rate, set --config.clip_norm, or look for bad data."
                )
            progress.update(step, values=list(values.items()))
            # Every worker takes part in the same metric, checkpoint and EMA operations (on
            # multi-worker strategies they are collective); only the chief writes logs.
            if step % log_every == 0 or step >= config.train_steps:
                if self.log:
                    seconds = time.perf_counter() - window_start
                    self.log.scalars(step, self._scalars(values, window_steps * config.batch_size / seconds))
                self._reset_metrics()
                window_start, window_steps = time.perf_counter(), 0
            if step % checkpoint_every == 0 or step >= config.train_steps:
                self.save()
            if step % sample_every == 0:
                self._pictures(step)
        return values

    def _scalars(self, values, images_per_second):
        optimizer, schedule = self.model.optimizer, self.model.schedule
        return {
            **values,
            "learning_rate": float(optimizer.learning_rate),
            "gamma_0": float(schedule.gamma_0),
            "gamma_1": float(schedule.gamma_1),
            "images_per_second": images_per_second,
        }

    def _pictures(self, step):
        with self.ema_weights():
            if self.log:
                samples = self.model.sample(self.config.num_samples, self.config.sample_steps, seed=self.config.seed)
                self.log.pictures(step, self.model.schedule, samples.numpy())


# The trained model of a run directory, EMA weights in (eval, sample, export): one helper in the library.
restore_for_inference = vdm_tf.runs.restore_for_inference
