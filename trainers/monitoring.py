"""What a training run reports: TensorBoard scalars and images, a metrics log, sample grids.

Nothing it writes is ever half-written. `metrics.jsonl` gets whole lines (`files.append_line`:
a failed append cuts the file back) and sample grids are written beside their name and renamed
(`vdm_tf.images.save_grid`). TensorBoard's event files are append-only streams of records,
each with its own length and checksums, which TensorBoard reads up to the last whole one: the
writer is flushed after every logged step, and a failed write (a full disk) stops the run with
one line (`files.OutputError`); the events before it are intact, and the rerun resumes from the
last checkpoint (TensorBoard shows the steps a resumed run logs again in place of the old ones).
"""

import contextlib
import errno
import io
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image  # noqa: E402

import vdm_tf  # noqa: E402
from vdm_tf import files  # noqa: E402


def snr_curve(schedule):
    """A picture of log SNR(t) = -gamma(t) over t in [0, 1]: uint8 [1, H, W, 4]."""
    t = np.linspace(0.0, 1.0, 201, dtype=np.float32)
    log_snr = -schedule(tf.constant(t)).numpy()
    figure, axes = plt.subplots(figsize=(4, 3), dpi=80)
    axes.plot(t, log_snr)
    axes.set_xlabel("t")
    axes.set_ylabel("log SNR(t) = -gamma(t)")
    axes.set_title(f"gamma_0 = {-log_snr[0]:.2f}, gamma_1 = {-log_snr[-1]:.2f}")
    axes.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())))[None]


def _logged_step(line):
    """The step of a metrics.jsonl line, or None if the line is not a complete record."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class RunLog:
    """TensorBoard event files and `metrics.jsonl` of one run directory (chief only).

    `metrics.jsonl` has one JSON object per logged step: the step, the training bpd terms
    averaged since the previous line, the learning rate, the schedule endpoints and the
    throughput; and one per evaluation (`trainer.eval_every`): the step and the `eval/...`
    figures of `trainers.train.Trainer.evaluate`. A resumed run first drops the lines after its
    checkpoint (`drop_after`), then appends, so every step's lines appear once.
    """

    def __init__(self, model_dir):
        self.tensorboard_dir = os.path.join(model_dir, "tensorboard")
        self.writer = tf.summary.create_file_writer(self.tensorboard_dir)
        self.metrics_path = os.path.join(model_dir, "metrics.jsonl")
        self.samples_dir = os.path.join(model_dir, "samples")

    def drop_after(self, step):
        """Removes the lines of steps after `step` from metrics.jsonl (a resumed run logs them again).

        A line cut short by a kill is removed too.
        """
        if not os.path.exists(self.metrics_path):
            return
        with open(self.metrics_path) as f:
            lines = f.read().splitlines()
        kept = [line for line in lines if _logged_step(line) is not None and _logged_step(line) <= step]
        if len(kept) < len(lines):
            files.write_bytes(self.metrics_path, "".join(line + "\n" for line in kept).encode("utf-8"))

    def scalars(self, step, values):
        """One line of metrics.jsonl and the same scalars in TensorBoard."""
        with self._events():
            with self.writer.as_default(step=step):
                for name, value in values.items():
                    tf.summary.scalar(name, value)
            self.writer.flush()
        line = {"step": int(step), **{name: float(value) for name, value in values.items()}}
        files.append_line(self.metrics_path, json.dumps(line))

    def pictures(self, step, schedule, samples):
        vdm_tf.images.save_grid(samples, os.path.join(self.samples_dir, f"step_{step:08d}.png"))
        with self._events():
            with self.writer.as_default(step=step):
                tf.summary.image("snr_curve", snr_curve(schedule))
                tf.summary.image("samples", vdm_tf.images.grid(samples)[None])
            self.writer.flush()

    @contextlib.contextmanager
    def _events(self):
        """Turns a failed TensorBoard write into a one-line `files.OutputError`."""
        try:
            yield
        except (tf.errors.OpError, OSError) as error:
            if isinstance(error, files.OutputError):
                raise
            reason = getattr(error, "message", None) or getattr(error, "strerror", None) or str(error)
            reason = next((os.strerror(c) for c in (errno.ENOSPC, errno.EDQUOT) if os.strerror(c) in reason), reason)
            raise files.OutputError(
                errno.EIO,
                f"writing TensorBoard events in {self.tensorboard_dir} failed: {vdm_tf.cli.one_line(reason)[:200]}; "
                "the events before it are intact, and the checkpoints too: rerun to resume",
            ) from None
