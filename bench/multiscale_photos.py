"""Multi-scale (Haar) vs uniform diffusion at 32x32 on photographs, at equal training CPU time.

    python -m bench.multiscale_photos                              # 600 CPU s per model, 3 models
    python -m bench.multiscale_photos --cpu_seconds=30 --evals=2 --quality_samples=16 --quality_steps=4  # quick
    python -m bench.multiscale_photos --cpu_seconds=300 --evals=4 --end_times=0.75 \
        --stage_networks_end_times=0.75                          # shared network or one per stage

1. Training. The `photos` preset (32x32x3 patches of scikit-image's photographs, 2 x 32 ScoreUNet,
   AdamW with warm-up, cosine decay and EMA) as a uniform VDM, and one multi-scale model per
   `--end_times` value: `PRESETS["photos"].replace(multiscale_levels=L,
   multiscale_end_times=value)`, L the number of times in the value (one denoiser shared by every
   stage, so the parameter count is the uniform model's), and one per `--stage_networks_end_times`
   value with one network per stage (`multiscale_stage_networks`). Same data order, seed, optimizer.
   Every model trains for `--cpu_seconds` of this process's CPU time (`time.process_time()`,
   all threads, tf.data included; the first step's tracing counts; evaluations do not). So that
   each run ends with its learning rate decayed, a throw-away copy of the model first measures
   its CPU seconds per step (after its first, tracing step) and the run's `train_steps`, which
   sets the cosine decay, is the budget divided by that; training stops when the budget is spent.
2. Learning curves. At `--evals` evenly spaced points of the budget, the EMA weights' test bpd:
   the photos test split (342 patches of two photographs not in the training split), the
   preset's `eval_time_samples` (4) time samples per image, with its standard error. Every
   model is evaluated with the same seed on the same batches, so the multi-scale minus uniform
   gap at the end has a paired standard error (from the per-image differences).
3. Sample quality. After training, the EMA weights draw `--quality_samples` images in
   `--quality_steps` ancestral steps (seed 0), scored with the bundled photos feature network
   (`vdm_tf.metrics.network_for("photos")`, `bench/photos_features.py`) against the test split
   (342 patches of photographs no model trained on) and against the training split (4622
   patches, the distribution the models learn): KID_photos +- jackknife standard error, FID_photos
   +- bootstrap std, precision / recall (`bench.sampler_quality.quality`). At N = 256 FID is
   biased upwards; KID is the figure to compare.
4. Sampling speed. After training, every model draws `--num_samples` images in `--sample_steps`
   ancestral steps, the fastest of `--repeats` calls after one untimed (tracing) call, the models
   taking turns (`bench.multiscale.sampling_seconds`; the flags are bench.multiscale's); "pixel ratio" is
   the speed-up if a step cost were proportional to its pixels (`bench.multiscale.pixel_ratio`).

Prints the curves and a table of the final figures; writes bench/results/multiscale_photos.json
after every model (the sampling figures at the end).

Caveats: the CPU clock is robust to other processes taking turns on a shared CPU (and to the
process being paused), not to them slowing each step down (caches, memory bandwidth, TensorFlow's
spinning threads), so the step counts of one run carry some noise; the two bpd figures differ in
their optimisation, not their bound: both are exact VLBs of their model. The preset is sized for a
20-minute run; 600 CPU seconds is about 1000 steps, far from converged. Autograph reads the source
files when it traces, so editing vdm_tf/ during a run can break the later traces (each model's
sampler is traced before its training for that reason).
"""

import os
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from bench import sampler_quality  # noqa: E402
from bench.multiscale import pixel_ratio, sampling_seconds  # noqa: E402  (defines the sampling and quality flags)
from trainers import configs  # noqa: E402
from vdm_tf import metrics  # noqa: E402

PRESET = "photos"
SPLITS = ("test", "train")  # the references of the sample quality


def parse_end_times(value):
    """'0.5,0.75' -> (0.5, 0.75): the end times of the detail groups, finest first (ValueError if not)."""
    times = tuple(float(t) for t in value.split(","))
    if not all(0.0 < a <= b <= 1.0 for a, b in zip(times, times[1:] + (1.0,))):
        raise ValueError(value)
    return times


def valid_end_times(values):
    try:
        for value in values:
            parse_end_times(value)
    except ValueError:
        return False
    return True


flags.DEFINE_float("cpu_seconds", 600.0, "Training budget of every model, in CPU seconds of this process.")
flags.DEFINE_integer("evals", 5, "Test-set evaluations per model, evenly spaced in the budget.")
flags.DEFINE_multi_string(
    "end_times",
    ["0.75", "0.5,0.75"],
    "One multi-scale model per value: its detail groups' end times, finest first (as many Haar levels as times).",
)
flags.DEFINE_multi_string(
    "stage_networks_end_times", [], "The same, with one network per stage (multiscale_stage_networks, 2x parameters)."
)
flags.DEFINE_integer("eval_batch_size", 64, "Test images per ELBO call.")
flags.register_validator("cpu_seconds", lambda v: v > 0, "--cpu_seconds must be > 0.")
flags.register_validator("evals", lambda v: v >= 1, "--evals must be >= 1.")
flags.register_validator("eval_batch_size", lambda v: v >= 1, "--eval_batch_size must be >= 1.")
for _name in ("end_times", "stage_networks_end_times"):
    flags.register_validator(
        _name, valid_end_times, f"--{_name} takes times 0 < t_1 <= t_2 <= ... <= 1 separated by commas, e.g. 0.5,0.75."
    )
FLAGS = flags.FLAGS
FLAGS.set_default("out", "bench/results/multiscale_photos.json")  # bench.multiscale's --out
FLAGS.set_default("num_samples", 4)
# bench.multiscale's flags that this bench does not use.
FOREIGN_FLAGS = ("resolutions", "n_layers", "n_embd", "train_steps")
flags.register_multi_flags_validator(
    FOREIGN_FLAGS,
    lambda values: all(values[name] == FLAGS[name].default for name in FOREIGN_FLAGS),
    f"--{', --'.join(FOREIGN_FLAGS)} belong to bench.multiscale; this bench does not use them.",
)


class CpuBudget(keras.callbacks.Callback):
    """Stops training after `budget` CPU seconds; evaluates the model at `marks` (its clocks pause meanwhile).

    `evaluate(model)` returns a dict that becomes one point of `points`, with the training CPU
    seconds, wall seconds and steps at which it was taken.
    """

    def __init__(self, budget, marks, evaluate):
        super().__init__()
        self.budget, self.marks, self.evaluate = budget, list(marks), evaluate
        self.points, self.steps = [], 0

    def on_train_begin(self, logs=None):
        self.cpu_start, self.wall_start = time.process_time(), time.perf_counter()

    def clocks(self):
        return time.process_time() - self.cpu_start, time.perf_counter() - self.wall_start

    def on_train_batch_end(self, batch, logs=None):
        self.steps += 1
        cpu, wall = self.clocks()
        if self.steps == 1:
            self.first_step = {"cpu_seconds": cpu, "wall_seconds": wall}
        if cpu < self.marks[len(self.points)]:
            return
        point = {"cpu_seconds": cpu, "wall_seconds": wall, "step": self.steps, **self.evaluate(self.model)}
        self.points.append(point)
        print(
            f"  step {self.steps:>5}  {cpu:7.1f} cpu s  {wall:7.1f} s  "
            f"test bpd {point['bpd']:.3f} +- {point['stderr']:.3f}",
            flush=True,
        )
        if len(self.points) == len(self.marks):
            self.model.stop_training = True
        # The evaluation's time is not training time: shift the starts by it.
        cpu_after, wall_after = self.clocks()
        self.cpu_start += cpu_after - cpu
        self.wall_start += wall_after - wall


def training_data(config):
    return vdm_tf.datasets.load(PRESET, "train", config.data.batch_size, seed=config.trainer.seed)


def cpu_per_step(config, steps=10):
    """(CPU seconds of the first step, CPU seconds per later step) of a throw-away copy of the model."""
    ends = []
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(time.process_time()))
    model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
    start = time.process_time()
    model.fit(training_data(config), steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[clock])
    return ends[0] - start, (ends[-1] - ends[0]) / (len(ends) - 1)


def ema_test_bpd(test, config):
    """evaluate(model) for `CpuBudget`: the EMA weights' test bpd (`vdm_tf.runs.ema_weights`)."""

    def evaluate(model):
        with vdm_tf.runs.ema_weights(model):
            result = vdm_tf.evaluation.dataset_bpd(
                model, test, config.trainer.eval_time_samples, seed=config.trainer.seed
            )
        terms = {name: result[name] for name in ("bpd", "stderr", "diffusion", "prior", "reconstruction")}
        return {**terms, "per_image": result["per_image"]}

    return evaluate


def sample_quality(model, references):
    """{reference name: quality} of --quality_samples samples of the EMA weights (module docstring, 3)."""
    with vdm_tf.runs.ema_weights(model):
        samples = model.sample(FLAGS.quality_samples, FLAGS.quality_steps, seed=0).numpy()
    network, real = references
    return {name: sampler_quality.quality(network, statistics, samples)[0] for name, statistics in real.items()}


def train(name, config, test, references):
    """Trains `config` for --cpu_seconds of CPU; returns the model and its results."""
    first_step, per_step = cpu_per_step(config)
    train_steps = max(int((FLAGS.cpu_seconds - first_step) / per_step), config.optimizer.warmup_steps + 1)
    config = config.replace(train_steps=train_steps)
    print(
        f"{name}: first step {first_step:.1f} cpu s, then {per_step:.3f} cpu s/step -> train_steps {train_steps}",
        flush=True,
    )
    model = vdm_tf.runs.compiled_model(config, seed=config.trainer.seed)
    # Trace the sampler now: autograph reads the source files when it traces, and a long run
    # should not depend on them staying unchanged until its end.
    model.sample(FLAGS.num_samples, FLAGS.sample_steps, seed=0)
    marks = [FLAGS.cpu_seconds * (k + 1) / FLAGS.evals for k in range(FLAGS.evals)]
    budget = CpuBudget(FLAGS.cpu_seconds, marks, ema_test_bpd(test, config))
    # The step ceiling is never reached: the budget stops the run (the learning rate stays at its floor beyond).
    model.fit(training_data(config), steps_per_epoch=10 * train_steps + 100, epochs=1, verbose=0, callbacks=[budget])
    final = budget.points[-1]
    quality = sample_quality(model, references)
    return model, {
        "multiscale_levels": config.model.multiscale_levels,
        "multiscale_end_times": list(config.model.multiscale_end_times),
        "train_steps_of_the_schedule": train_steps,
        "calibration": {"first_step_cpu_seconds": first_step, "cpu_seconds_per_step": per_step},
        "first_step": budget.first_step,
        "parameters": model.count_params(),
        "curve": [{k: v for k, v in p.items() if k != "per_image"} for p in budget.points],
        "final": {k: v for k, v in final.items() if k != "per_image"},
        "per_image": final["per_image"],
        "load_average_after": os.getloadavg(),
        "quality": quality,
    }


def write(results):
    """Writes --out (after every model, so a late failure keeps the curves trained so far)."""
    common.write_json(
        FLAGS.out,
        {
            "machine": common.machine(),
            "preset": PRESET,
            "cpu_seconds": FLAGS.cpu_seconds,
            "evals": FLAGS.evals,
            "eval_time_samples": configs.PRESETS[PRESET].trainer.eval_time_samples,
            "sampling": {"steps": FLAGS.sample_steps, "num_samples": FLAGS.num_samples, "repeats": FLAGS.repeats},
            "quality": {"num_samples": FLAGS.quality_samples, "steps": FLAGS.quality_steps, "seed": 0},
            "models": {name: {k: v for k, v in r.items() if k != "per_image"} for name, r in results.items()},
        },
    )


def variants():
    """{name: Config}: the uniform preset, then one multi-scale model per --end_times / --stage_networks_end_times."""
    base = configs.PRESETS[PRESET]
    models = {"uniform": base}
    for flag, stage_networks, suffix in (("end_times", False, ""), ("stage_networks_end_times", True, " stage nets")):
        for value in FLAGS[flag].value:
            times = parse_end_times(value)
            models[f"multiscale L={len(times)} t={value}{suffix}"] = base.replace(
                multiscale_levels=len(times), multiscale_end_times=times, multiscale_stage_networks=stage_networks
            )
    return models


def main(argv):
    del argv
    test = vdm_tf.datasets.load(
        PRESET, "test", FLAGS.eval_batch_size, shuffle=False, repeat=False, drop_remainder=False
    )
    network = metrics.network_for(PRESET)
    references = network, {split: metrics.statistics(network, vdm_tf.datasets.photos_arrays(split)) for split in SPLITS}
    models, results = {}, {}
    for name, config in variants().items():
        models[name], results[name] = train(name, config, test, references)
        reference = results["uniform"]["per_image"]
        results[name]["gap_to_uniform"], results[name]["gap_stderr"] = common.paired_gap(
            results[name]["per_image"], reference
        )
        write(results)

    print(f"\nsampling, {FLAGS.sample_steps} steps, {FLAGS.num_samples} images per call, fastest of {FLAGS.repeats}")
    timings = sampling_seconds(list(models.values()), FLAGS.num_samples, FLAGS.sample_steps, FLAGS.repeats)
    seconds = [timing["best"] / FLAGS.num_samples for timing in timings]
    for (name, model), s in zip(models.items(), seconds):
        results[name]["seconds_per_sample"] = s
        results[name]["sampling_speedup"] = seconds[0] / s
        results[name]["pixel_ratio"] = pixel_ratio(model, FLAGS.sample_steps) if name != "uniform" else 1.0

    print(f"\nphotos 32x32x3, {FLAGS.cpu_seconds:.0f} CPU s of training each, test split (342 patches)")
    print(
        f"{'model':>36}{'steps':>7}{'wall s':>8}{'test bpd':>10}{'+-':>7}{'gap':>8}{'+-':>7}"
        f"{'s/sample':>10}{'speed-up':>10}{'pixels':>8}"
    )
    for name, r in results.items():
        final = r["final"]
        print(
            f"{name:>36}{final['step']:>7}{final['wall_seconds']:>8.0f}{final['bpd']:>10.3f}{final['stderr']:>7.3f}"
            f"{r['gap_to_uniform']:>+8.3f}{r['gap_stderr']:>7.3f}{r['seconds_per_sample']:>10.3f}"
            f"{r['sampling_speedup']:>9.2f}x{r['pixel_ratio']:>7.2f}x"
        )
    print(f"\nKID_photos / FID_photos of {FLAGS.quality_samples} samples ({FLAGS.quality_steps} steps), EMA weights")
    print(f"{'model':>36}" + "".join(f"{'KID ' + split:>12}{'+-':>8}{'FID ' + split:>12}{'+-':>6}" for split in SPLITS))
    for name, r in results.items():
        row = "".join(
            f"{q['kid']:>12.4f}{q['kid_se']:>8.4f}{q['fid']:>12.2f}{q['fid_bootstrap_std']:>6.2f}"
            for q in (r["quality"][split] for split in SPLITS)
        )
        print(f"{name:>36}{row}")
    write(results)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
    app.run(main)
