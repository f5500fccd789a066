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
    checkpoints/             model, optimizer (with the EMA weights), step and the running sums of
                             the logged metrics; written by the chief
    data/worker_<i>/         each worker's data-iterator position, saved with the same step number
    metrics.jsonl, tensorboard/, samples/   monitoring (chief)

Every `trainer.eval_every` steps (and at the last step), the run evaluates its EMA weights as
`trainers.main --mode=eval` does (`Trainer.evaluate`): the test bpd and, where the data set has a
bundled feature network, the sample quality. Evaluation draws from its own seeds and reads the
test split through a pipeline of its own, so a run trains to the same weights, bit for bit,
with or without it.

What a stopped run leaves (a kill, Ctrl-C, a full disk): `tf.train.CheckpointManager` writes a
checkpoint into `ckpt-N_temp/` and renames it into place, and its `checkpoint` state file is
replaced atomically, so every listed checkpoint is whole; a `ckpt-N_temp/` a killed write left
behind is never a valid checkpoint and is removed when the run starts again. The metrics
window (the running sums since the last logged step) is part of the checkpoint, so a resumed
run logs the same averages as an uninterrupted one, whatever its resume point.
"""

import contextlib
import errno
import glob
import logging
import math
import os
import re
import shutil
import sys
import time

import keras
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import flags
from absl import logging as absl_logging
from tensorflow_datasets.core.download import downloader as tfds_downloader

import vdm_tf
from trainers import distribute, monitoring
from vdm_tf import files


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; nothing from that state was saved."""


class DataNotPreparedError(RuntimeError):
    """A TensorFlow Datasets data set is not on disk and could not be downloaded."""


def quiet_info_logs():
    """Hides the INFO lines of TensorFlow's and absl's Python loggers; warnings still show.

    Saving a checkpoint or a SavedModel logs lines such as "Sharding callback duration",
    "Function `likelihood` contains input name(s) ... with unsupported characters" and "Assets
    written to"; they say nothing to a user of the command lines. `--verbosity=0` (absl's flag)
    shows them again. TensorFlow's C++ start-up banners are filtered by `vdm_tf.cli.start()`.
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
        vdm_tf.datasets.IncompleteInstallError: TFDS needs a module to prepare them that is not
            installed; the message names it and the reinstall command.
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
    root = os.path.expanduser(data_dir or "~/tensorflow_datasets")
    existing = set(os.listdir(root)) if os.path.isdir(root) else None
    try:
        with _quiet_download():
            builder.download_and_prepare()
    except BaseException as error:  # nothing half-downloaded stays behind: remove what this attempt made
        if existing is not None and os.path.isdir(root):
            for entry in set(os.listdir(root)) - existing:
                shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
        elif existing is None:
            shutil.rmtree(root, ignore_errors=True)
        _data_not_prepared(name, info, data_dir, error)


@contextlib.contextmanager
def _quiet_download():
    """A TFDS download that fails in seconds and in one line where there is no network.

    TFDS retries each file 10 times with exponential back-off (3.5 minutes before it gives up
    without network), logging every retry and drawing progress bars on stderr; here each file is
    tried 3 times, retries are not logged and the bars are off (TFDS still prints its one line
    "Downloading and preparing dataset ...").
    """
    urllib3_logger = logging.getLogger("urllib3")
    retries, level = tfds_downloader.MAX_RETRIES, urllib3_logger.level
    tfds_downloader.MAX_RETRIES = 2
    urllib3_logger.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        yield
    finally:
        tfds_downloader.MAX_RETRIES = retries
        tfds.display_progress_bar(True)
    # Only after a success: on a failure, the other files' download threads go on retrying (and
    # logging) after the first one has raised.
    urllib3_logger.setLevel(level)


def _data_not_prepared(name, info, data_dir, error):
    """Raises the one-line error of a data set that could not be prepared (KeyboardInterrupt passes)."""
    if isinstance(error, ModuleNotFoundError):  # an incomplete install, which no download mends
        raise vdm_tf.datasets.IncompleteInstallError(error.name) from None
    if not isinstance(error, Exception):
        raise error
    # Whatever stopped the download, the user's remedy is the same.
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


# The scalars of `Trainer.evaluate` from `vdm_tf.evaluation.SampleQuality`'s result; {} is the
# feature network's name (eval/kid_digits). The +- figures are standard deviations: FID's over
# bootstrap resamplings, KID's and IS's over subsets (`vdm_tf.metrics.compare`).
QUALITY_SCALARS = {
    "fid": "eval/fid_{}",
    "fid_bootstrap_std": "eval/fid_{}_std",
    "kid": "eval/kid_{}",
    "kid_std": "eval/kid_{}_std",
    "precision": "eval/precision_{}",
    "recall": "eval/recall_{}",
    "inception_score": "eval/is_{}",
    "inception_score_std": "eval/is_{}_std",
}


def _round_up(steps, multiple):
    return max(multiple, -(-steps // multiple) * multiple)


class Trainer:
    """Trains the model of a `Config` under a tf.distribute strategy, resuming from `model_dir`.

    Args:
        config: a `trainers.configs.Config`.
        model_dir: the run directory.
        strategy: a tf.distribute strategy (see `trainers.distribute.make_strategy`).
        data_dir: TensorFlow Datasets data directory.
        verbose: show the progress: a Keras progress bar on a terminal, a plain line per logged
            step when stdout is a file or a pipe (no cursor movements in a log).
    """

    def __init__(self, config, model_dir, strategy, data_dir=None, verbose=True):
        self.config = config
        self.model_dir = model_dir
        self.data_dir = data_dir
        self.strategy = strategy
        self.cluster = distribute.cluster_info(strategy)
        self.verbose = verbose and self.cluster.is_chief
        self.steps_per_execution = config.trainer.steps_per_execution
        check_batch_size(config.data.batch_size, strategy)
        with strategy.scope():  # seeded: the same initial weights on every run and worker
            self.model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
        self.data = iter(self._worker_dataset(data_dir))
        self.data_checkpointable = True
        self._train_function = self._make_train_function()

        # The model checkpoint of `vdm_tf.runs.model_checkpoint` plus the metrics window: the
        # running sums (total, count) of the logged terms since the last logged step.
        self._window = {
            f"{name}_{v.name}": v.value for name, t in self.model.term_trackers.items() for v in t.variables
        }
        self.checkpoints = tf.train.CheckpointManager(
            tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer, metrics_window=self._window),
            self._write_dir("checkpoints"),
            max_to_keep=config.trainer.keep_checkpoints,
        )
        data_checkpoint = tf.train.Checkpoint(iterator=self.data)
        self.data_checkpoints = tf.train.CheckpointManager(
            data_checkpoint,
            os.path.join(model_dir, "data", f"worker_{self.cluster.worker_index}"),
            max_to_keep=config.trainer.keep_checkpoints,
        )
        self.log = monitoring.RunLog(model_dir) if self.cluster.is_chief else None
        # Its feature network and the test split's statistics are made at the first evaluation.
        dataset, trainer = config.data.dataset, config.trainer
        self.sample_quality = None
        # The figures of the latest evaluation: {"step", "bpd": heldout_bpd's dict, "quality":
        # SampleQuality's dict or None}; `trainers.main` prints those of the final step rather
        # than evaluating the same weights again.
        self.last_evaluation = None
        if vdm_tf.evaluation.SampleQuality.available(dataset):
            self.sample_quality = vdm_tf.evaluation.SampleQuality(
                dataset, trainer.num_samples, trainer.sample_steps, trainer.seed, data_dir
            )
        self._remove_unfinished_checkpoints()

    # ------------------------------------------------------------------------------------------

    def _write_dir(self, name):
        """Chief: model_dir/name. Other workers take part in saving but write to a scratch dir."""
        if self.cluster.is_chief:
            return os.path.join(self.model_dir, name)
        return os.path.join(self.model_dir, name, f".worker_{self.cluster.worker_index}")

    def _remove_unfinished_checkpoints(self):
        """Removes the `ckpt-N_temp/` directories of checkpoint writes that never finished.

        `CheckpointManager.save` writes a checkpoint there and renames it into place; what a
        kill or a full disk left behind there is never a valid checkpoint, and nothing reads it.
        """
        directories = [self.data_checkpoints.directory]
        if self.cluster.is_chief:
            directories.append(self.checkpoints.directory)
        for directory in directories:
            if vdm_tf.run_config.is_remote(directory):
                continue
            for stale in glob.glob(os.path.join(glob.escape(directory), "ckpt-*_temp*")):
                shutil.rmtree(stale, ignore_errors=True)

    def _worker_dataset(self, data_dir):
        """This worker's shard, in chunks of `steps_per_execution` worker batches."""
        workers = self.cluster.num_workers
        # An input context with one "replica" per worker makes `load` read this worker's shard
        # and batch the worker's share of the global batch.
        context = tf.distribute.InputContext(workers, self.cluster.worker_index, workers)
        batches = vdm_tf.datasets.load(
            self.config.data.dataset,
            "train",
            self.config.data.batch_size,
            seed=self.config.trainer.seed,
            data_dir=data_dir,
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

        return tf.function(run_steps, jit_compile=self.config.trainer.jit_compile)

    # ------------------------------------------------------------------------------------------

    @property
    def step(self):
        return int(self.model.optimizer.iterations.numpy())

    def restore(self):
        """Restores the latest checkpoint (if any); returns its step, or 0."""
        latest = tf.train.latest_checkpoint(os.path.join(self.model_dir, "checkpoints"))
        if latest is None:
            return 0
        # A run resumed with a term its checkpoint lacks (fine-tuning with
        # --config.flow_matching_weight) starts that term's window at zero; everything else must match.
        saved = {name.split("/")[1] for name, _ in tf.train.list_variables(latest) if name.startswith("metrics_window")}
        window = {key: value for key, value in self._window.items() if key in saved}
        checkpoint = tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer, metrics_window=window)
        checkpoint.restore(latest).assert_existing_objects_matched()
        step = self.step
        data = os.path.join(self.data_checkpoints.directory, f"ckpt-{step}")
        if tf.io.gfile.exists(data + ".index"):
            self.data_checkpoints.checkpoint.restore(data).assert_consumed()
        else:
            print(f"warning: no data-iterator position for step {step}; the input pipeline starts afresh")
        return step

    def save(self):
        """Saves data position and then the model (the model checkpoint marks the step as done).

        Raises:
            files.OutputError: a write failed (a full disk, a permission); the message says up
                to which step the checkpoints are intact. What the failed write left is removed.
        """
        step = self.step
        intact = self.checkpoints.latest_checkpoint
        try:
            if self.data_checkpointable:
                try:
                    self.data_checkpoints.save(checkpoint_number=step)
                except tf.errors.FailedPreconditionError as error:  # e.g. a pipeline with a Python generator
                    if files.io_error(error):
                        raise
                    self.data_checkpointable = False
                    print(
                        f"warning: the input pipeline cannot be checkpointed ({error.message.strip()}); "
                        "a resumed run will restart it",
                        file=sys.stderr,
                    )
            self.checkpoints.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            self._remove_unfinished_checkpoints()
            kept = (
                f"checkpoints up to step {_checkpoint_step(intact)} are intact, rerun to resume"
                if intact
                else "no checkpoint had been written yet"
            )
            cause = files.io_error(error)
            reason = cause.strerror if cause else vdm_tf.cli.one_line(getattr(error, "message", None) or error)[:200]
            raise files.OutputError(errno.EIO, f"writing checkpoint {step} failed: {reason}; {kept}") from None
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
        """Runs until `config.trainer.train_steps`; returns the final metrics (window means)."""
        trainer, k = self.config.trainer, self.steps_per_execution
        checkpoint_every = _round_up(trainer.checkpoint_every, k)
        log_every = _round_up(trainer.log_every, k)
        sample_every = _round_up(trainer.sample_every, k)
        eval_every = _round_up(trainer.eval_every, k) if trainer.eval_every else 0
        batch_size = self.config.data.batch_size
        self._reset_metrics()
        start = self.restore()  # restores the metrics window of the checkpoint too
        if start:
            print(f"resumed from step {start} ({self.checkpoints.latest_checkpoint or 'checkpoint'})")
        if self.log:
            self.log.drop_after(start)  # lines a killed run logged after its last checkpoint
        terminal = self.verbose and sys.stdout.isatty()
        progress = keras.utils.Progbar(
            trainer.train_steps, verbose=1 if terminal else 0, stateful_metrics=list(self.model.term_trackers)
        )
        window_start, window_steps, values = time.perf_counter(), 0, {}
        step = start
        while step < trainer.train_steps:
            self._train_function(self._distribute(next(self.data)))
            step += k
            window_steps += k
            values = self._metric_values()
            if not all(math.isfinite(v) for v in values.values()):
                latest = self.checkpoints.latest_checkpoint
                kept = (
                    f"the last good checkpoint ({latest}) is intact" if latest else "no checkpoint had been written yet"
                )
                raise NonFiniteLossError(
                    f"Training stopped at step {step}: the loss is not finite ({values}). Nothing was saved "
                    f"from this state; {kept}. Lower the learning rate, set --config.clip_norm, or look for bad data."
                )
            progress.update(step, values=list(values.items()))
            # Every worker takes part in the same metric, checkpoint and EMA operations (on
            # multi-worker strategies they are collective); only the chief writes logs.
            if step % log_every == 0 or step >= trainer.train_steps:
                images_per_second = window_steps * batch_size / (time.perf_counter() - window_start)
                if self.log:
                    self.log.scalars(step, self._scalars(values, images_per_second))
                if self.verbose and not terminal:
                    terms = ", ".join(f"{name} {value:.4f}" for name, value in values.items())
                    print(f"step {step}/{trainer.train_steps}: {terms} ({images_per_second:.0f} images/s)", flush=True)
                self._reset_metrics()
                window_start, window_steps = time.perf_counter(), 0
            # Before the checkpoint of the same step: a run stopped in between resumes from an
            # earlier checkpoint, drops this evaluation's line and evaluates this step again.
            if eval_every and (step % eval_every == 0 or step >= trainer.train_steps):
                evaluation_start = time.perf_counter()
                self.evaluate(step, newline=terminal)
                window_start += time.perf_counter() - evaluation_start  # not training time
            if step % checkpoint_every == 0 or step >= trainer.train_steps:
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

    def evaluate(self, step, newline=False):
        """The test bpd and sample quality of the EMA weights, logged as `eval/...` scalars at `step`.

        The same figures as `trainers.main --mode=eval` of the checkpoint of `step` (same
        helpers, seeds and time samples): `eval/bpd`, `eval/bpd_stderr` and the bpd's terms;
        where the data set has a bundled feature network (digits), FID, KID, precision, recall
        and IS of `trainer.num_samples` samples (`QUALITY_SCALARS`: `eval/kid_digits`, ...).
        They go to TensorBoard, as one line of metrics.jsonl and as one printed line
        (`newline`: start it on a line of its own, below a progress bar).

        Every worker swaps the EMA weights in and out, as in every other EMA operation; the
        chief alone evaluates (a local computation) and writes, and keeps the figures in
        `last_evaluation`. Returns the scalars (None on the other workers).
        """
        trainer = self.config.trainer
        with self.ema_weights():
            if not self.cluster.is_chief:
                return None
            bpd = vdm_tf.evaluation.heldout_bpd(
                self.model, self.config.data.dataset, trainer.eval_time_samples, trainer.seed, self.data_dir
            )
            quality = self.sample_quality(self.model) if self.sample_quality else None
        self.last_evaluation = {"step": step, "bpd": bpd, "quality": quality}
        scalars = {f"eval/{name}": bpd[name] for name in ("bpd", "diffusion", "prior", "reconstruction") if name in bpd}
        scalars["eval/bpd_stderr"] = bpd["stderr"]
        line = f"step {step} eval: {vdm_tf.evaluation.summary_line(bpd)}"
        if quality:
            for key, name in QUALITY_SCALARS.items():
                if quality.get(key) is not None:  # precision / recall need more than k = 3 samples
                    scalars[name.format(quality["network"])] = quality[key]
            line += f"; {vdm_tf.evaluation.quality_line(quality)}"
        self.log.scalars(step, scalars)
        if self.verbose:
            print(("\n" if newline else "") + line, flush=True)
        return scalars

    def _pictures(self, step):
        trainer = self.config.trainer
        with self.ema_weights():
            if self.log:
                samples = self.model.sample(trainer.num_samples, trainer.sample_steps, seed=trainer.seed)
                self.log.pictures(step, self.model.schedule, samples.numpy())


def _checkpoint_step(path):
    """.../ckpt-200 -> 200."""
    return int(re.search(r"ckpt-(\d+)$", path).group(1))


# The trained model of a run directory, EMA weights in (eval, sample, export): one helper in the library.
restore_for_inference = vdm_tf.runs.restore_for_inference
