"""The training loop: resume position, NaN guard, kill-and-resume, EMA, optimiser, every configuration."""

import errno
import json
import math
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import PIL.Image
import pytest
import tensorflow as tf
from absl import flags
from tfds_mocks import mock_any

import export
import vdm_tf
from trainers import configs, main, monitoring, train
from vdm_tf import files

TINY = dict(n_layers=1, n_embd=32, batch_size=8, jit_compile=False, learning_rate=1e-3, warmup_steps=1)


def tiny_config(**overrides):
    """A tiny run; its sample grids (every 4 steps) are 2 images of 2 steps: the loop's code, not the sampler's work."""
    every = {"checkpoint_every": 2, "log_every": 2, "sample_every": 4, "num_samples": 2, "sample_steps": 2}
    return configs.Config().replace(**{**TINY, **every, **overrides})


def weights(variables):
    return [v.numpy() for v in variables]


def test_resume_continues_from_the_saved_data_position(tmp_path):
    config = tiny_config(train_steps=4)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    trainer.train()
    next_batch = next(trainer.data).numpy()
    resumed = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    assert resumed.restore() == 4
    np.testing.assert_array_equal(next(resumed.data).numpy(), next_batch)
    for a, b in zip(resumed.model.trainable_variables, trainer.model.trainable_variables):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # A fresh pipeline (the one a new Trainer reads) would start elsewhere: the test can tell the difference.
    assert not np.array_equal(next(iter(trainer._worker_dataset(None))).numpy(), next_batch)


@pytest.mark.parametrize(
    "checkpoint_every, kept", [(4, r"the last good checkpoint \(.*ckpt-4\) is intact"), (8, "no checkpoint had been")]
)
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, checkpoint_every, kept):
    original = vdm_tf.VDM._loss_terms

    def poisoned(self, x, seed, training, *args):
        terms, gammas = original(self, x, seed, training, *args)
        broken = tf.logical_and(training, self.optimizer.iterations >= 5)  # the sixth step
        return {k: tf.where(broken, float("nan"), v) for k, v in terms.items()}, gammas

    monkeypatch.setattr(vdm_tf.VDM, "_loss_terms", poisoned)
    config = tiny_config(train_steps=10, checkpoint_every=checkpoint_every)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    with pytest.raises(train.NonFiniteLossError, match="Training stopped at step 6: the loss is not finite") as error:
        trainer.train()
    assert re.search(kept, str(error.value)), str(error.value)
    checkpoints = tmp_path / "checkpoints"
    assert not list(checkpoints.glob("ckpt-6*")) and not list(checkpoints.glob("ckpt-8*"))
    if checkpoint_every == 4:
        assert tf.train.latest_checkpoint(str(checkpoints)).endswith("ckpt-4")
        # The good checkpoint restores to finite weights.
        model = train.restore_for_inference(str(tmp_path), trainer.config)
        assert all(np.isfinite(v.numpy()).all() for v in model.trainable_variables)


# Runs trainers.main and SIGKILLs the process right after it logged step KILL_AT (the last
# checkpoint is the one before): a kill at a known step, with metrics logged after the checkpoint.
KILL_AFTER_LOGGING = textwrap.dedent(
    """
    import os, runpy, signal, sys
    from trainers import monitoring
    kill_at, sys.argv = int(sys.argv[1]), ["trainers.main", *sys.argv[2:]]
    scalars = monitoring.RunLog.scalars
    def scalars_then_die(self, step, values):
        scalars(self, step, values)
        if step == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    monitoring.RunLog.scalars = scalars_then_die
    runpy.run_module("trainers.main", run_name="__main__")
    """
)


def checkpoint_values(model_dir):
    """{name: value} of the model and optimiser (EMA included) in a run's latest checkpoint."""
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints"))
    names = [name for name, _ in tf.train.list_variables(str(model_dir / "checkpoints"))]
    return {n: reader.get_tensor(n) for n in names if n.startswith(("model/", "optimizer/"))}


def test_killed_run_resumes_bit_for_bit_and_logs_each_step_once(tmp_path, capsys):
    """Kill after step 6 (checkpoint 4), resume to 8: the same weights as 8 steps without a kill.

    The killed run is a process of its own (SIGKILL); the rerun is `trainers.main`'s `main` in
    this process: it starts a new Trainer that knows only what the killed run left on disk."""
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    flags_ = [
        "--train_steps=8",
        "--batch_size=8",
        "--config.n_layers=1",
        "--config.n_embd=32",
        "--config.dropout=0.3",
        "--config.checkpoint_every=4",
        "--config.log_every=2",
        "--config.sample_every=1000",
        "--config.eval_time_samples=1",
        "--config.sample_steps=2",
        "--config.num_samples=2",
    ]
    first = subprocess.Popen(
        [sys.executable, "-c", KILL_AFTER_LOGGING, "6", f"--model_dir={killed}", *flags_],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    # Meanwhile, the uninterrupted run in this process, from the configuration the flags make.
    flags.FLAGS.unparse_flags()
    flags.FLAGS(["main", *flags_])
    try:
        config = main.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()
    train.Trainer(config, str(whole), tf.distribute.get_strategy(), verbose=False).train()
    output, _ = first.communicate(timeout=600)
    assert first.returncode == -9, output[-3000:]
    assert configs.saved_config(str(killed)) == config
    assert re.search(r"ckpt-4\b", (killed / "checkpoints" / "checkpoint").read_text())
    assert [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()] == [2, 4, 6]
    # The rerun names no flag but the run directory: it resumes with the saved config.
    capsys.readouterr()
    flags.FLAGS(["main", f"--model_dir={killed}"])
    try:
        main.main(["main"])
    finally:
        flags.FLAGS.unparse_flags()
    second = capsys.readouterr().out
    assert "resumed from step 4" in second and "test bpd:" in second, second
    resumed, uninterrupted = checkpoint_values(killed), checkpoint_values(whole)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 20
    for name, value in uninterrupted.items():
        np.testing.assert_array_equal(resumed[name], value, err_msg=name)
    # metrics.jsonl: step 6 once (the killed run's line was dropped), the same numbers as without a kill.
    lines = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(line) for line in (whole / "metrics.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 6, 8]
    for line, expected in zip(lines, reference):
        assert {k: v for k, v in line.items() if k != "images_per_second"} == {
            k: v for k, v in expected.items() if k != "images_per_second"
        }


def event_tags(directory):
    """{tag: [steps]} of the TensorBoard event files in `directory`."""
    tags = {}
    for path in directory.glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                tags.setdefault(value.tag, []).append(event.step)
    return tags


@pytest.mark.parametrize("preset", ["mnist", "cifar10", "imagenet32", "imagenet64"])
def test_every_preset_trains_samples_and_evaluates_on_mocked_data(preset, tmp_path, capsys):
    argv = [
        "main",
        f"--config={preset}",
        f"--model_dir={tmp_path}",
        "--train_steps=2",
        "--batch_size=4",
        "--config.n_layers=1",
        "--config.n_embd=32",
        "--config.jit_compile=false",
        "--config.checkpoint_every=2",
        "--config.log_every=1",
        "--config.sample_every=2",
        "--config.eval_time_samples=1",
        "--config.sample_steps=2",
        "--config.num_samples=2",
    ]
    flags.FLAGS.unparse_flags()
    flags.FLAGS(argv)
    try:
        with mock_any(configs.PRESETS[preset].data.dataset):
            main.main(["main"])
    finally:
        flags.FLAGS.unparse_flags()
    out = capsys.readouterr().out
    assert re.search(r"test bpd: \d+\.\d+ \+- \d+\.\d+ \(10 images, 1 time samples each\)", out), out
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data"] == {"dataset": configs.PRESETS[preset].data.dataset, "batch_size": 4}
    assert os.path.exists(tmp_path / "samples" / "step_00000002.png")
    tags = event_tags(tmp_path / "tensorboard")
    for tag in ("bpd", "diffusion", "prior", "reconstruction", "learning_rate", "gamma_0", "gamma_1"):
        assert tags[tag] == [1, 2], (tag, tags)
    assert tags["samples"] == tags["snr_curve"] == [2]


# ----------------------------------------------------------------------------------------------
# The EMA weights: which ones each consumer holds.

EMA = 0.5


def ema_of(trajectory, momentum=EMA):
    """Keras's EMA of per-step weights: e_1 = w_1, e_k = m e_(k-1) + (1 - m) w_k."""
    average = trajectory[0]
    for step_weights in trajectory[1:]:
        average = [np.float32(momentum) * a + np.float32(1 - momentum) * w for a, w in zip(average, step_weights)]
    return average


def assert_holds(actual, expected, other, name):
    """`actual` equals `expected` (to float rounding) and clearly differs from `other`."""
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-6, err_msg=name)
    assert max(np.abs(a - o).max() for a, o in zip(actual, other)) > 1e-3, name


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
    """Six steps with EMA momentum 0.5: the initial, raw and EMA weights all differ."""
    model_dir = tmp_path_factory.mktemp("ema")
    config = tiny_config(
        train_steps=6,
        checkpoint_every=6,
        log_every=2,
        sample_every=1000,
        ema_momentum=EMA,
        learning_rate=1e-2,
        dropout=0.1,
    )
    trainer = train.Trainer(config, str(model_dir), tf.distribute.get_strategy(), verbose=False)
    initial, trajectory = weights(trainer.model.trainable_variables), []
    step_function = trainer._train_function

    def recording(chunk):
        step_function(chunk)
        trajectory.append(weights(trainer.model.trainable_variables))

    trainer._train_function = recording
    trainer.train()
    return model_dir, trainer, initial, trajectory


def test_trainer_keeps_raw_weights_and_restore_for_inference_gives_the_ema(ema_run):
    model_dir, trainer, initial, trajectory = ema_run
    raw, ema = trajectory[-1], ema_of(trajectory)
    assert len(trajectory) == 6
    assert_holds(weights(trainer.model.trainable_variables), raw, ema, "the trainer trains on the raw weights")
    assert max(np.abs(e - i).max() for e, i in zip(ema, initial)) > 1e-3, "the EMA moved from the initial weights"
    with trainer.ema_weights():
        assert_holds(weights(trainer.model.trainable_variables), ema, raw, "Trainer.ema_weights")
    assert_holds(weights(trainer.model.trainable_variables), raw, ema, "after Trainer.ema_weights")
    restored = train.restore_for_inference(str(model_dir), trainer.config)
    assert_holds(weights(restored.trainable_variables), ema, raw, "restore_for_inference")


def test_export_holds_the_ema_weights(ema_run, tmp_path):
    model_dir, trainer, _, trajectory = ema_run
    raw, ema = trajectory[-1], ema_of(trajectory)
    model = train.restore_for_inference(str(model_dir), trainer.config)
    path = export.saved_model.export_model(model, str(tmp_path), warmup=False)
    served = tf.saved_model.load(path).served_variables
    index = {id(v): i for i, v in enumerate(model.variables)}
    exported = [served[index[id(v)]].numpy() for v in model.trainable_variables]
    assert_holds(exported, ema, raw, "the export")


# ----------------------------------------------------------------------------------------------
# The optimiser of a configuration, against its definition.


@pytest.fixture(scope="module")
def built():
    config = tiny_config(
        train_steps=110,
        warmup_steps=10,
        learning_rate=1e-2,
        final_learning_rate_fraction=0.1,
        weight_decay=0.1,
        ema_momentum=0.0,
    )
    return config, configs.build_model(config)


def test_weight_decay_skips_biases_normalisation_and_the_schedule(built):
    """AdamW with zero gradients moves only by its decay: w <- w (1 - lr * wd) for decayed weights."""
    config, model = built
    optimizer = configs.build_optimizer(config, model)
    optimizer.build(model.trainable_variables)
    optimizer.iterations.assign(config.optimizer.warmup_steps)  # past the warm-up: lr = learning_rate
    before = weights(model.trainable_variables)
    optimizer.apply_gradients([(tf.zeros_like(v), v) for v in model.trainable_variables])
    schedule_ids = {id(v) for v in model.schedule.variables}
    decayed = 0
    for variable, old in zip(model.trainable_variables, before):
        excluded = len(variable.shape) <= 1 or id(variable) in schedule_ids
        expected = (
            old if excluded else old * np.float32(1 - config.optimizer.learning_rate * config.optimizer.weight_decay)
        )
        np.testing.assert_allclose(variable.numpy(), expected, rtol=1e-6, atol=0, err_msg=variable.path)
        decayed += not excluded
    kernels = [v for v in model.trainable_variables if len(v.shape) > 1 and id(v) not in schedule_ids]
    assert decayed == len(kernels) > 5
    for variable, old in zip(model.trainable_variables, before):
        variable.assign(old)


def test_learning_rate_warms_up_linearly_then_decays_on_a_cosine(built):
    config, model = built
    optimizer = configs.build_optimizer(config, model)
    warmup, peak, floor = config.optimizer.warmup_steps, config.optimizer.learning_rate, 0.1
    total = config.trainer.train_steps
    decay_steps = total - warmup

    def definition(step):
        if step < warmup:
            return peak * step / warmup
        progress = min(step - warmup, decay_steps) / decay_steps
        return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))

    for step in (0, 3, 5, 10, 30, 60, 85, 110, 200):
        optimizer.iterations.assign(step)
        assert float(optimizer.learning_rate) == pytest.approx(definition(step), rel=1e-5, abs=1e-9), step


@pytest.mark.parametrize("norm", [0.5, 3.0])
def test_clip_norm_rescales_the_global_gradient_norm(built, norm):
    """SGD with clip_norm c: the step is -lr g min(1, c / ||g||), ||g|| over all variables together."""
    config, model = built
    config = config.replace(optimizer="sgd", clip_norm=1.0, warmup_steps=0, learning_rate=1.0)
    optimizer = configs.build_optimizer(config, model)
    optimizer.build(model.trainable_variables)
    variables = model.trainable_variables
    rng = np.random.default_rng(0)
    gradients = [rng.standard_normal(v.shape) for v in variables]
    scale = norm / math.sqrt(sum(np.sum(g**2) for g in gradients))  # the global norm is `norm`
    gradients = [(scale * g).astype(np.float32) for g in gradients]
    before = weights(variables)
    optimizer.apply_gradients(zip([tf.constant(g) for g in gradients], variables))
    factor = config.optimizer.learning_rate * min(1.0, config.optimizer.clip_norm / norm)
    for variable, old, g in zip(variables, before, gradients):
        np.testing.assert_allclose(variable.numpy() - old, -factor * g, rtol=1e-3, atol=1e-7)
        variable.assign(old)


def test_several_steps_per_execution_train_like_one_step_per_call(ema_run, tmp_path):
    """k = 2 steps per call: the same batches, updates, EMA and logged steps as one step per call."""
    _, single, _, trajectory = ema_run
    config = single.config.replace(steps_per_execution=2)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    trainer.train()
    assert trainer.step == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [2, 4, 6]
    raw, ema = trajectory[-1], ema_of(trajectory)
    for two, one in zip(weights(trainer.model.trainable_variables), raw):
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    with trainer.ema_weights():
        assert_holds(weights(trainer.model.trainable_variables), ema, raw, "EMA with steps_per_execution=2")


# ----------------------------------------------------------------------------------------------
# Configurations built and trained (two steps) through the trainer.

CONFIGURATIONS = {
    "multiscale_fields": dict(preset="digits_multiscale", multiscale_end_times=(0.6,)),
    "augment_discrete_time": dict(preset="digits", augment=True, timesteps=10, weight_decay=0.0),
    "vp": dict(preset="digits", sde="vp"),
    "subvp": dict(preset="digits", sde="subvp"),
    "cifar10_cdm": dict(preset="cifar10_cdm", batch_size=4, head_channels=32),
}


def check_model(name, model):
    """What each configuration must have built."""
    if name == "multiscale_fields":
        assert isinstance(model, vdm_tf.multiscale.MultiScaleVDM) and model.levels == 1
        np.testing.assert_allclose(model.end_times, [0.6])
    elif name in ("vp", "subvp"):
        assert type(model.sde) is vdm_tf.sde.SDES[name]
    elif name == "cifar10_cdm":
        assert isinstance(model, vdm_tf.cdm.CDM) and model.num_levels == 1000
    elif name == "augment_discrete_time":
        assert type(model) is vdm_tf.VDM and model.timesteps == 10
        assert model.augmentation is not None and model.denoiser.conditioning_dim > 0


@pytest.mark.parametrize("name", list(CONFIGURATIONS))
def test_configuration_builds_and_trains_two_steps(name, tmp_path):
    fields = dict(CONFIGURATIONS[name])
    preset = configs.PRESETS[fields.pop("preset")]
    small = dict(
        n_layers=1,
        n_embd=16,
        batch_size=8,
        jit_compile=False,
        train_steps=2,
        checkpoint_every=2,
        log_every=1,
        sample_every=1000,
        learning_rate=1e-3,
        warmup_steps=1,
    )
    config = preset.replace(**{**small, **fields})
    with mock_any(config.data.dataset):
        trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
        check_model(name, trainer.model)
        if name == "augment_discrete_time":
            # Off the zero-initialised layers (output, conv2, conditioning projections), which
            # pass no gradient to the conditioning layer in the first steps.
            for variable in trainer.model.denoiser.trainable_variables:
                variable.assign_add(tf.random.stateless_normal(variable.shape, [0, 0]) * 0.05)
        initial = weights(trainer.model.trainable_variables)
        values = trainer.train()
    assert trainer.step == config.trainer.train_steps and all(math.isfinite(v) for v in values.values()), values
    moved = [np.abs(a - b).max() for a, b in zip(weights(trainer.model.trainable_variables), initial)]
    assert max(moved) > 0
    if name == "augment_discrete_time":
        # Conditioning rows of the first conditioning layer get gradients only from augmented
        # examples: if train_step never augmented, the conditioning would be zero and they would
        # stay at their initial values (no weight decay here).
        kernel = trainer.model.denoiser.cond_dense0.kernel
        index = next(i for i, v in enumerate(trainer.model.trainable_variables) if v is kernel)
        rows = slice(trainer.model.denoiser.n_embd, None)
        assert np.abs(kernel.numpy()[rows] - initial[index][rows]).max() > 0


def test_keras_fit_ends_with_the_ema_weights():
    """`model.fit` with use_ema=True writes the averaged weights into the model at its end."""
    keras.utils.set_random_seed(0)
    model = vdm_tf.VDM(
        vdm_tf.networks.ScoreUNet(n_layers=1, n_embd=16, dropout=0.0), vdm_tf.schedules.LearnedLinear(), (8, 8, 1)
    )
    model.compile(optimizer=keras.optimizers.SGD(0.05, use_ema=True, ema_momentum=EMA))
    initial, trajectory = weights(model.trainable_variables), []
    record = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: trajectory.append(weights(model.trainable_variables))
    )
    model.fit(
        vdm_tf.datasets.load("digits", "train", 16, seed=0), steps_per_epoch=5, epochs=1, verbose=0, callbacks=[record]
    )
    raw, ema = trajectory[-1], ema_of(trajectory)
    assert max(np.abs(e - i).max() for e, i in zip(ema, initial)) > 1e-3
    assert_holds(weights(model.trainable_variables), ema, raw, "model.fit's end state")


@pytest.mark.parametrize("preset, levels", [("cifar10_multiscale", 2), ("imagenet64_multiscale", 3)])
def test_multiscale_presets_build_their_levels_and_stage_networks(preset, levels):
    config = configs.PRESETS[preset].replace(n_layers=1, n_embd=16)
    model = configs.build_model(config)
    assert isinstance(model, vdm_tf.multiscale.MultiScaleVDM) and model.levels == levels
    assert model.image_shape == vdm_tf.datasets.info(config.data.dataset).image_shape
    staged = configs.build_model(config.replace(multiscale_stage_networks=True))
    assert len(staged.denoiser.networks) == levels + 1  # one denoiser per stage
    assert len(staged.trainable_variables) > len(model.trainable_variables)


def metrics_lines(model_dir):
    """metrics.jsonl without the throughput (which depends on the machine's load)."""
    lines = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in line.items() if k != "images_per_second"} for line in lines]


def test_a_resumed_run_logs_the_averages_of_an_uninterrupted_one(ema_run, tmp_path, monkeypatch):
    """Checkpoints every 3 steps, logs every 2: the window of the line at step 4 (steps 3 and 4)
    spans the resume point 3. Ctrl-C right after step 4 is logged, then a rerun: every line as
    without the interruption (`ema_run`: the same configuration, with dropout, checkpointed only
    at its end). A `ckpt-N_temp/` a killed checkpoint write left is removed."""
    whole, uninterrupted, _, _ = ema_run
    config = uninterrupted.config.replace(checkpoint_every=3)
    interrupted = tmp_path / "interrupted"

    scalars = monitoring.RunLog.scalars

    def scalars_then_ctrl_c(self, step, values):
        scalars(self, step, values)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(monitoring.RunLog, "scalars", scalars_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train.Trainer(config, str(interrupted), tf.distribute.get_strategy(), verbose=False).train()
    monkeypatch.undo()
    assert [line["step"] for line in metrics_lines(interrupted)] == [2, 4]
    stale = interrupted / "checkpoints" / "ckpt-6_temp"
    stale.mkdir()
    (stale / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"half a checkpoint")
    resumed = train.Trainer(config, str(interrupted), tf.distribute.get_strategy(), verbose=False)
    assert not stale.exists()
    resumed.train()
    assert metrics_lines(interrupted) == metrics_lines(whole)
    assert [line["step"] for line in metrics_lines(whole)] == [2, 4, 6]


def test_a_failed_checkpoint_write_says_which_checkpoints_are_intact(tmp_path, monkeypatch):
    """A full disk while checkpoint 4 is written: one line that names it and the intact step 2;
    what the failed write left (`ckpt-4_temp/`) is removed and ckpt-2 stays the latest."""
    config = tiny_config(train_steps=6, checkpoint_every=2, log_every=2, sample_every=1000)
    trainer = train.Trainer(config, str(tmp_path), tf.distribute.get_strategy(), verbose=False)
    save = trainer.checkpoints.save

    def save_on_a_full_disk(checkpoint_number=None, **kwargs):
        if checkpoint_number == 4:
            (tmp_path / "checkpoints" / "ckpt-4_temp").mkdir()
            message = f"{tmp_path}/checkpoints/ckpt-4_temp/part-00000-of-00001.data; No space left on device"
            raise tf.errors.ResourceExhaustedError(None, None, message)
        return save(checkpoint_number=checkpoint_number, **kwargs)

    monkeypatch.setattr(trainer.checkpoints, "save", save_on_a_full_disk)
    with pytest.raises(files.OutputError) as error:
        trainer.train()
    assert str(error.value) == (
        "writing checkpoint 4 failed: No space left on device; checkpoints up to step 2 are intact, rerun to resume"
    )
    assert isinstance(error.value, OSError)  # what vdm_tf.cli.run says in one line
    assert not (tmp_path / "checkpoints" / "ckpt-4_temp").exists()
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-2")


def test_sample_grids_and_metrics_are_written_whole(tmp_path, monkeypatch):
    """A failed write of a sample grid leaves the grid that was there; a failed metrics line
    leaves the lines before it, each whole."""
    log = monitoring.RunLog(str(tmp_path))
    log.scalars(2, {"bpd": 1.5})
    grid = tmp_path / "grid.png"
    images = np.zeros((4, 8, 8, 1), np.uint8)
    vdm_tf.images.save_grid(images, str(grid))
    before = grid.read_bytes()

    def full_disk(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(PIL.Image.Image, "save", full_disk)
    with pytest.raises(OSError, match="No space left on device"):
        vdm_tf.images.save_grid(images + 255, str(grid))
    assert grid.read_bytes() == before and sorted(os.listdir(tmp_path)) == ["grid.png", "metrics.jsonl", "tensorboard"]

    monkeypatch.setattr(os, "write", lambda fd, data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    with pytest.raises(OSError, match="nothing was written there|is unchanged"):
        log.scalars(4, {"bpd": 1.25})
    monkeypatch.undo()
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
