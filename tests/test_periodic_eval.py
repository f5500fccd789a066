"""The trainer's periodic evaluation (`trainer.eval_every`): what it logs, and that it leaves training alone.

Two tiny digits runs of 6 steps, 2 per call, serve every test (`runs`): one with eval_every=3,
rounded up to 4, so evaluations at step 4 and at the last step, 6; it is stopped (Ctrl-C) right
after the evaluation of step 4 is logged, before checkpoint 4, and resumed. The other has no
evaluations. (The resume reuses the stopped Trainer, which restores the checkpoint, the data
position and the metrics window as a new process would: `test_trainer.py` covers resuming in a
new process; one traced train step per run keeps these tests to seconds.)
"""

import contextlib
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import flags
from test_trainer import event_tags, metrics_lines, tiny_config

import vdm_tf
from trainers import main, monitoring, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_STEPS = [4, 6]
QUALITY = ("fid_digits", "fid_digits_std", "kid_digits", "kid_digits_std", "precision_digits", "recall_digits")


def run_config(**overrides):
    """EMA momentum 0.5 and a large learning rate: the EMA weights differ clearly from the raw ones.

    A fixed schedule: its train step traces in half the time of the learned one's.
    """
    fields = dict(
        schedule="fixed_linear",
        train_steps=6,
        steps_per_execution=2,
        eval_every=3,
        checkpoint_every=2,
        keep_checkpoints=5,
        sample_every=1000,
        ema_momentum=0.5,
        learning_rate=1e-2,
        eval_time_samples=1,
        num_samples=8,
    )
    return tiny_config(**{**fields, **overrides})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{evaluated, plain: run directories; trainer: the evaluated run's; printed: its output;
    stopped: (steps of its evaluation lines, latest checkpoint) when it was stopped}."""
    evaluated, plain = tmp_path_factory.mktemp("evaluated"), tmp_path_factory.mktemp("plain")
    trainer = train.Trainer(run_config(), str(evaluated), tf.distribute.get_strategy(), verbose=True)
    scalars = monitoring.RunLog.scalars

    def scalars_then_ctrl_c(self, step, values):
        scalars(self, step, values)
        if step == 4 and "eval/bpd" in values:
            raise KeyboardInterrupt

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
            patch.setattr(monitoring.RunLog, "scalars", scalars_then_ctrl_c)
            trainer.train()
        stopped = (
            [line["step"] for line in eval_lines(evaluated)],
            tf.train.latest_checkpoint(str(evaluated / "checkpoints")),
        )
        trainer.train()
    train.Trainer(run_config(eval_every=0), str(plain), tf.distribute.get_strategy(), verbose=False).train()
    return dict(evaluated=evaluated, plain=plain, trainer=trainer, printed=printed.getvalue(), stopped=stopped)


def eval_lines(model_dir):
    return [line for line in metrics_lines(model_dir) if "eval/bpd" in line]


def event_values(directory, tag):
    """{step: value} of a TensorBoard scalar (a step logged again: its last value, as TensorBoard shows)."""
    values = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.tag == tag:
                    values[event.step] = float(tf.make_ndarray(value.tensor))
    return values


def checkpoint_values(model_dir, step):
    """{name: value} of the model and optimiser (EMA included) in checkpoint `step` of a run."""
    path = str(model_dir / "checkpoints" / f"ckpt-{step}")
    reader = tf.train.load_checkpoint(path)
    return {n: reader.get_tensor(n) for n, _ in tf.train.list_variables(path) if n.startswith(("model/", "optimizer/"))}


def ema_model_at(model, model_dir, step):
    """`model` with the EMA weights of checkpoint `step` of a run (what --mode=eval of that checkpoint scores)."""
    vdm_tf.runs.model_checkpoint(model).restore(str(model_dir / "checkpoints" / f"ckpt-{step}")).expect_partial()
    model.optimizer.finalize_variable_values(model.trainable_variables)
    return model


def test_evaluations_log_the_test_bpd_and_sample_quality_of_the_ema_weights(runs):
    model_dir, trainer, printed = runs["evaluated"], runs["trainer"], runs["printed"]
    tags = event_tags(model_dir / "tensorboard")
    for name in ("bpd", "bpd_stderr", "diffusion", "prior", "reconstruction", *QUALITY):
        assert tags[f"eval/{name}"] == [4, 4, 6], (name, tags)  # step 4 again after the resume
    assert sorted(tags["bpd"]) == [2, 4, 4, 6]  # the training scalars as before
    lines = eval_lines(model_dir)
    assert [line["step"] for line in lines] == EVAL_STEPS
    assert set(lines[0]) == {"step"} | {name for name in tags if name.startswith("eval/")}
    for line in lines:
        for name, value in line.items():
            if name != "step":
                assert event_values(model_dir / "tensorboard", name)[line["step"]] == pytest.approx(value, rel=1e-6)
    raw_bpd = vdm_tf.evaluation.heldout_bpd(trainer.model, "digits", 1, seed=0)["bpd"]  # the raw weights of step 6
    model = vdm_tf.runs.compiled_model(trainer.config)
    for line in lines:
        ema_model_at(model, model_dir, line["step"])
        expected = vdm_tf.evaluation.dataset_bpd(
            model, vdm_tf.evaluation.heldout_batches("digits", 256), num_time_samples=1, seed=0
        )
        assert line["eval/bpd"] == expected["bpd"] and line["eval/bpd_stderr"] == expected["stderr"], line
        printed_line = [p for p in printed.splitlines() if p.startswith(f"step {line['step']} eval: ")][-1]
        assert vdm_tf.evaluation.summary_line(expected) in printed_line
    assert abs(lines[-1]["eval/bpd"] - raw_bpd) > 1e-3, "the EMA weights were evaluated, not the raw ones"
    # The sample quality of the last step is the line --mode=eval prints for that checkpoint.
    quality = main.sample_quality(trainer.config, model)
    assert printed_line.endswith(f"; {quality}"), (printed_line, quality)
    assert f"KID_digits {lines[-1]['eval/kid_digits']:.5f} +- {lines[-1]['eval/kid_digits_std']:.5f}" in quality


def test_evaluation_does_not_change_training(runs):
    """The run with evaluations (stopped and resumed) and the run without: the same checkpoints
    (weights, EMA, optimiser) bit for bit, the same training lines."""
    evaluated, plain = runs["evaluated"], runs["plain"]
    assert not eval_lines(plain) and "eval/bpd" not in event_tags(plain / "tensorboard")
    for step in EVAL_STEPS:  # the weights each evaluation saw, and the end
        with_eval, without = checkpoint_values(evaluated, step), checkpoint_values(plain, step)
        assert with_eval.keys() == without.keys() and len(with_eval) > 20
        for name, value in without.items():
            np.testing.assert_array_equal(with_eval[name], value, err_msg=f"{name} at step {step}")
    assert [line for line in metrics_lines(evaluated) if "eval/bpd" not in line] == metrics_lines(plain)


def test_a_run_stopped_right_after_an_evaluation_evaluates_that_step_again(runs):
    """Stopped after the evaluation of step 4, before checkpoint 4: the rerun resumes from
    checkpoint 2, drops the lines after it and evaluates step 4 again; each evaluation once."""
    assert runs["stopped"][0] == [4] and runs["stopped"][1].endswith("ckpt-2")
    assert [line["step"] for line in eval_lines(runs["evaluated"])] == EVAL_STEPS
    assert [line["step"] for line in metrics_lines(runs["evaluated"])] == [2, 4, 4, 6, 6]


def test_a_negative_eval_every_is_a_one_line_error(tmp_path):
    completed = subprocess.run(
        [sys.executable, "-m", "trainers.main", "--config.eval_every=-1", f"--model_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines() == [
        "python -m trainers.main: error: trainer.eval_every must be >= 0; got -1."
    ], completed.stderr
    assert not (tmp_path / "run").exists()


def test_train_mode_prints_the_evaluation_of_the_last_step_instead_of_repeating_it(tmp_path, capsys, monkeypatch):
    """With eval_every > 0 the trainer evaluates the last step; `--mode=train`'s closing summary
    prints those figures: one pass over the test split and one sample-quality evaluation, the
    summary line still last."""
    calls = {"heldout_bpd": 0, "sample_quality": 0}
    heldout_bpd, quality = vdm_tf.evaluation.heldout_bpd, vdm_tf.evaluation.SampleQuality.__call__

    def counted_bpd(*args, **kwargs):
        calls["heldout_bpd"] += 1
        return heldout_bpd(*args, **kwargs)

    def counted_quality(*args, **kwargs):
        calls["sample_quality"] += 1
        return quality(*args, **kwargs)

    monkeypatch.setattr(vdm_tf.evaluation, "heldout_bpd", counted_bpd)
    monkeypatch.setattr(vdm_tf.evaluation.SampleQuality, "__call__", counted_quality)
    argv = ["main", f"--model_dir={tmp_path / 'run'}", "--train_steps=2", "--steps_per_execution=2", "--batch_size=8"]
    argv += ["--config.n_layers=1", "--config.n_embd=32", "--config.jit_compile=false", "--config.sample_every=1000"]
    argv += ["--config.schedule=fixed_linear", "--config.eval_every=2", "--config.eval_time_samples=1"]
    argv += ["--config.num_samples=8", "--config.sample_steps=2"]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        main.main(["main"])
    finally:
        flags.FLAGS.unparse_flags()
    printed = capsys.readouterr().out.strip().splitlines()
    assert calls == {"heldout_bpd": 1, "sample_quality": 1}, calls
    evaluation = next(line for line in printed if line.startswith("step 2 eval: "))
    assert printed[-1].startswith("test bpd: ") and printed[-1] in evaluation, printed
    assert printed[-3].startswith("sample quality: ") and evaluation.endswith(printed[-3]), printed
