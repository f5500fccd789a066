"""Multi-scale (Haar) against uniform diffusion: sampling time up to 256x256, and digits at equal wall-clock.

    python -m bench.multiscale --quick         # smoke run: 32x32, 4 steps, 10 s of training each
    python -m bench.multiscale                 # 32, 64, 128, 256; digits 75 s each (26 min at load 8-10)

1. Sampling speed. At each resolution R (RGB), a uniform `vdm_tf.VDM` and a
   `vdm_tf.multiscale.MultiScaleVDM` with the same `ScoreUNet` (one network shared by every
   stage, so the parameter counts are equal; random weights: the speed does not depend on
   them) draw a batch of `--num_samples` images in `--sample_steps` ancestral steps. The
   multi-scale model has log2(R / 8) Haar levels (its coarsest stage runs at 8x8) and stages of
   equal length. Per model: the seconds of its first call (tracing included) and the fastest of
   `--repeats` later calls, the two models taking turns; the load average before each row.
   The ScoreUNet never downsamples and its mid-block self-attention is quadratic in the pixels
   (at 256x256 its matrix is 16 GiB per image): sizes up to `--attention_up_to` are timed with
   it, and with `--convolutions_only` every size also with that block replaced by the identity.
   "pixel ratio" is the speed-up if a step cost were proportional to its pixels: steps / sum
   over steps of 4^-stage.
2. Digits at equal training wall-clock. The `digits` preset's model, uniform, as the
   `digits_multiscale` preset builds it (one Haar level, its end time) and with one network per
   stage (twice the parameters), each trains `--train_seconds` after its first (tracing) step
   (same batches and seed; the learning rate decays over `--train_steps`, the step cap), then
   its test bpd (8 time samples per image, +- standard error) and KID_digits / FID_digits of
   `--quality_samples` samples of `--quality_steps` ancestral steps against the test split
   (`bench.sampler_quality.quality`: KID over all pairs +- jackknife SE, FID +- bootstrap std;
   the same N and seed for every model).

Prints two tables and writes bench/results/multiscale[_quick].json.
"""

import math
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
from absl import app, flags  # noqa: E402

import vdm_tf  # noqa: E402
from bench import sampler_quality  # noqa: E402
from trainers import configs  # noqa: E402
from vdm_tf import cli, metrics  # noqa: E402
from vdm_tf.multiscale import MultiScaleVDM  # noqa: E402

flags.DEFINE_list("resolutions", ["32", "64", "128", "256"], "Image sizes R (R x R x 3) of the sampling comparison.")
flags.DEFINE_integer("sample_steps", 20, "Ancestral steps per sample (the same for both models).")
flags.DEFINE_integer("num_samples", 1, "Images per sampling call (the batch).")
flags.DEFINE_integer("repeats", 2, "Timed sampling calls per model after the first (the fastest counts).")
flags.DEFINE_integer("n_layers", 2, "ScoreUNet blocks of the speed comparison.")
flags.DEFINE_integer("n_embd", 64, "ScoreUNet channels of the speed comparison.")
flags.DEFINE_integer(
    "attention_up_to", 128, "Largest R timed with the ScoreUNet's mid-block self-attention (its H W x H W matrix)."
)
flags.DEFINE_bool("convolutions_only", True, "Also time every R with the mid-block attention replaced by the identity.")
flags.DEFINE_integer("train_seconds", 75, "Training wall-clock of each digits model (after its first, tracing step).")
flags.DEFINE_integer("train_steps", 1500, "Step cap of each digits model, and the length of its learning-rate decay.")
flags.DEFINE_integer("quality_samples", 256, "N: samples of each digits model for KID_digits / FID_digits.")
flags.DEFINE_integer("quality_steps", 100, "Ancestral steps of those samples.")
flags.DEFINE_bool("quick", False, "A smoke run: 32x32 only, 4 steps, 10 training seconds, 32 samples of 10 steps.")
flags.DEFINE_string("out", None, "JSON results (default bench/results/multiscale[_quick].json).")
FLAGS = flags.FLAGS

COARSEST = 8  # resolution of the multi-scale model's last stage
# The attention matrix of one image at R = 256 is 65536^2 float32: 16 GiB.
QUICK = {
    "resolutions": ["32"],
    "sample_steps": 4,
    "train_seconds": 10,
    "train_steps": 200,
    "quality_samples": 32,
    "quality_steps": 10,
}


def sampling_seconds(models, num_samples, num_steps, repeats):
    """Per model: the seconds of its first `sample(num_samples, num_steps)` call (tracing
    included) and the fastest of `repeats` later calls, the models timed in turn.

    Taking turns and the fastest call keep other processes on a shared CPU from favouring one.
    """

    def draw(model, seed):
        return model.sample(num_samples, num_steps, seed=seed).numpy()

    first = [common.timed(draw, model, 0)[1] for model in models]
    durations = [[] for _ in models]
    for repeat in range(repeats):
        for model, times in zip(models, durations):
            times.append(common.timed(draw, model, repeat + 1)[1])
    return [{"first_call": f, "best": min(times), "calls": times} for f, times in zip(first, durations)]


def pixel_ratio(model, num_steps):
    """num_steps / sum over the sampler's steps of 4^-stage, on the grid MultiScaleVDM._sample uses."""
    num_stages = len(model.stages)
    num_steps = max(num_steps, num_stages)
    starts = [start for _, start, _ in model.stages]
    boundaries = [m + round((num_steps - num_stages) * start) for m, start in enumerate(starts)] + [num_steps]
    cost = sum((boundaries[m + 1] - boundaries[m]) * 4.0**-stage for m, (stage, _, _) in enumerate(model.stages))
    return num_steps / cost


def speed(resolution, attention):
    """Uniform against multi-scale sampling at R x R x 3, one ScoreUNet (random weights) shared by all stages.

    `attention=False` replaces the network's mid-block self-attention by the identity: at high R
    that block, quadratic in the pixels, would otherwise dominate both models' cost (and is
    beyond memory at 256x256); without it the cost is the convolutions', linear in the pixels.
    """

    def network():
        net = vdm_tf.networks.ScoreUNet(n_layers=FLAGS.n_layers, n_embd=FLAGS.n_embd, dropout=0.0)
        if not attention:
            net.mid_attention = keras.layers.Identity(name="mid_attention")
        return net

    image_shape = (resolution, resolution, 3)
    levels = int(math.log2(resolution // COARSEST))
    uniform = vdm_tf.VDM(network(), vdm_tf.schedules.FixedLinear(), image_shape)
    multiscale = MultiScaleVDM(network(), vdm_tf.schedules.FixedLinear(), image_shape, levels=levels)
    load = common.machine()["load_average_1min"]
    uniform_seconds, multiscale_seconds = sampling_seconds(
        [uniform, multiscale], FLAGS.num_samples, FLAGS.sample_steps, FLAGS.repeats
    )
    return {
        "resolution": resolution,
        "mid_attention": attention,
        "levels": levels,
        "end_times": list(multiscale.end_times),
        "parameters": {"uniform": uniform.count_params(), "multiscale": multiscale.count_params()},
        "seconds_per_batch": {"uniform": uniform_seconds, "multiscale": multiscale_seconds},
        "speedup": uniform_seconds["best"] / multiscale_seconds["best"],
        "pixel_ratio": pixel_ratio(multiscale, FLAGS.sample_steps),
        "load_average_1min_before": load,
    }


def train_and_evaluate(feature_network, real, model_fields=None):
    """Trains the digits preset's model, with `model_fields` changed, on digits with the preset's
    optimizer for --train_seconds after its first step (at most --train_steps, the length of the
    learning-rate decay); returns its test bpd, KID_digits / FID_digits of --quality_samples
    samples (`bench.sampler_quality.quality`: KID +- jackknife SE, FID +- bootstrap std), steps and times."""
    config = configs.PRESETS["digits"].replace(train_steps=FLAGS.train_steps, model=model_fields or {})
    trainer = config.trainer
    model = vdm_tf.runs.compiled_model(config, seed=trainer.seed)
    train = vdm_tf.datasets.load("digits", "train", config.data.batch_size, seed=trainer.seed)
    step_ends = []

    def on_batch_end(batch, logs):
        step_ends.append(time.perf_counter())
        if step_ends[-1] - step_ends[0] >= FLAGS.train_seconds:
            model.stop_training = True

    load = common.machine()["load_average_1min"]
    start = time.perf_counter()
    clock = keras.callbacks.LambdaCallback(on_train_batch_end=on_batch_end)
    model.fit(train, steps_per_epoch=trainer.train_steps, epochs=1, verbose=0, callbacks=[clock])
    seconds, first, steps = time.perf_counter() - start, step_ends[0] - start, len(step_ends)
    test = vdm_tf.datasets.load("digits", "test", 128, shuffle=False, repeat=False, drop_remainder=False)
    result = vdm_tf.evaluation.dataset_bpd(model, test, num_time_samples=8)
    samples = model.sample(FLAGS.quality_samples, FLAGS.quality_steps, seed=0).numpy()
    measured, _ = sampler_quality.quality(feature_network, real, samples)
    return {
        "bpd": result["bpd"],
        "stderr": result["stderr"],
        "terms": {name: result[name] for name in ("diffusion", "prior", "reconstruction")},
        **measured,
        "steps": steps,
        "train_seconds": seconds,
        "first_step_seconds": first,
        "seconds_per_step_after_the_first": (step_ends[-1] - step_ends[0]) / max(steps - 1, 1),
        "parameters": model.count_params(),
        "load_average_1min_before": load,
    }


def multiscale_fields(stage_networks=False):
    """The model fields that make the digits preset's model the `digits_multiscale` preset's (one
    Haar level: 8x8 and 4x4, the preset's end time): same network, schedule and decoder alphabet."""
    preset = configs.PRESETS["digits_multiscale"].model
    fields = ("multiscale_levels", "multiscale_end_times")
    return {"multiscale_stage_networks": stage_networks, **{name: getattr(preset, name) for name in fields}}


def check_flags():
    """Each resolution 8 * 2^L with L >= 1 (the Haar levels down to 8x8), positive counts; or a one-line error."""
    for text in FLAGS.resolutions:
        resolution = int(text) if text.strip().isdigit() else 0
        if resolution < 2 * COARSEST or resolution & (resolution - 1):
            raise cli.Failure(f"--resolutions: expected powers of two >= {2 * COARSEST}; got {text!r}.")
    for name in ("sample_steps", "num_samples", "repeats", "train_seconds", "train_steps", "quality_steps"):
        if FLAGS[name].value < 1:
            raise cli.Failure(f"--{name} must be >= 1; got {FLAGS[name].value}.")
    if FLAGS.quality_samples < 3:
        raise cli.Failure(f"--quality_samples must be >= 3 (KID's jackknife); got {FLAGS.quality_samples}.")


def main(argv):
    del argv
    if FLAGS.quick:
        for name, value in QUICK.items():
            setattr(FLAGS, name, value)
    check_flags()
    out = FLAGS.out or f"bench/results/multiscale{'_quick' if FLAGS.quick else ''}.json"
    keras.utils.set_random_seed(0)
    machine = common.machine()
    speeds = []
    print(f"sampling, {FLAGS.sample_steps} steps, {FLAGS.num_samples} images per call (batch), seconds per batch")
    print(
        f"{'size':>9}{'attention':>10}{'levels':>7}{'params':>9}{'uniform 1st':>12}{'multi 1st':>10}"
        f"{'uniform s':>10}{'multi s':>9}{'speedup':>9}{'pixel ratio':>12}{'load':>6}"
    )
    for resolution in map(int, FLAGS.resolutions):
        for attention in [True] * (resolution <= FLAGS.attention_up_to) + [False] * FLAGS.convolutions_only:
            r = speed(resolution, attention)
            speeds.append(r)
            uniform, multi = r["seconds_per_batch"]["uniform"], r["seconds_per_batch"]["multiscale"]
            print(
                f"{resolution:>6}x{resolution:<3}{'yes' if attention else 'no':>10}{r['levels']:>7}"
                f"{r['parameters']['uniform']:>9}{uniform['first_call']:>12.2f}{multi['first_call']:>10.2f}"
                f"{uniform['best']:>10.2f}{multi['best']:>9.2f}{r['speedup']:>8.2f}x{r['pixel_ratio']:>11.2f}x"
                f"{r['load_average_1min_before']:>6.1f}",
                flush=True,
            )
    feature_network = metrics.network_for("digits")
    real = metrics.statistics(feature_network, vdm_tf.datasets.digits_arrays("test"))
    likelihood = {
        "uniform": train_and_evaluate(feature_network, real),
        "multiscale": train_and_evaluate(feature_network, real, multiscale_fields()),
        "multiscale_stage_networks": train_and_evaluate(feature_network, real, multiscale_fields(stage_networks=True)),
    }
    print(
        f"\ndigits, {FLAGS.train_seconds} s of training each (digits preset), test bpd with 8 time samples per "
        f"image; KID_digits / FID_digits of {FLAGS.quality_samples} samples ({FLAGS.quality_steps} steps)"
    )
    print(
        f"{'model':>26}{'steps':>6}{'bpd':>7}{'+-':>6}{'KID':>8}{'+-':>7}{'FID':>6}{'+-':>6}"
        f"{'s/step':>7}{'params':>9}{'load':>6}"
    )
    for name, r in likelihood.items():
        print(
            f"{name:>26}{r['steps']:>6}{r['bpd']:>7.3f}{r['stderr']:>6.3f}{r['kid']:>8.4f}{r['kid_se']:>7.4f}"
            f"{r['fid']:>6.2f}{r['fid_bootstrap_std']:>6.2f}{r['seconds_per_step_after_the_first']:>7.3f}"
            f"{r['parameters']:>9}{r['load_average_1min_before']:>6.1f}"
        )
    common.write_json(
        out,
        {
            "machine": machine,
            "load_average_1min_after": common.machine()["load_average_1min"],
            "sampling": {
                "steps": FLAGS.sample_steps,
                "num_samples": FLAGS.num_samples,
                "repeats": FLAGS.repeats,
                "network": {"n_layers": FLAGS.n_layers, "n_embd": FLAGS.n_embd, "shared_by_all_stages": True},
                "results": speeds,
            },
            "digits": {
                "train_seconds": FLAGS.train_seconds,
                "train_steps_cap": FLAGS.train_steps,
                "preset": "digits",
                "levels": 1,
                "end_times": list(configs.PRESETS["digits_multiscale"].model.multiscale_end_times),
                "quality": {"num_samples": FLAGS.quality_samples, "steps": FLAGS.quality_steps, "seed": 0},
                **likelihood,
            },
        },
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    cli.run(app.run, main, prog="python -m bench.multiscale")
