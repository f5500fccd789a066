"""The official VDM CIFAR-10 model in vdm_tf: likelihood and sampling throughput, and its test-set bpd.

    python -m bench.official                                     # paper-size network, random weights
    python -m bench.official --checkpoint=checkpoints-0 --preset=cifar10 --data_dir=~/tensorflow_datasets

The network is the official `--preset` configuration (`vdm_tf.convert.PRESETS`; `cifar10`: 32
ResNet blocks of 128 channels, 30.6 M weights), converted from `--checkpoint` (an official
checkpoint, see `python -m vdm_tf.convert`) or randomly initialised without one: the timings do
not depend on the weights.

- likelihood throughput: images per second of `model.elbo` on batches of `--batch_size`
  CIFAR-sized images with K = each of `--time_samples` time samples per image (K network
  evaluations per image), after a one-image warm-up call that traces the graph (its input
  signature leaves the batch size open, so the timed calls do not trace again);
- sampling throughput: images per second of `model.sample(--num_samples, num_steps=256)`
  (one network evaluation per step for the whole batch). `--sample_timing_steps=S` times an
  S-step chain instead and scales it to 256 steps (every step costs the same), for short runs;
- with `--checkpoint` and the tfds `cifar10` test split prepared (`--data_dir`): the negative
  ELBO over the test set (`--eval_images`, 0 = all 10,000) with `--eval_time_samples` time
  samples per image, and its standard error: the figure the official code reports as 2.637
  (`cifar10`) or 2.522 (`cifar10_aug`). `--eval_only` skips the timings.

Prints a summary and writes bench/results/official.json. Cost on a 2-core CPU shared with other
jobs: one network evaluation of the paper-size network takes about 0.3-0.7 s per image, so the
defaults (2 batches of 64 with K = 1 and 8, 4 samples of 256 steps) take 20-40 minutes; the
recorded run used `--batch_size=8 --num_samples=2 --sample_timing_steps=8` (a few minutes).
The full test-set evaluation takes days on such a CPU (10,000 images x K evaluations).
"""

import argparse
import os
import sys
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

import numpy as np  # noqa: E402

from vdm_tf import convert, datasets, evaluation, runs  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(convert.PRESETS), default="cifar10", help="Official configuration.")
    parser.add_argument("--official_config", help="JSON file of official VDMConfig fields instead of --preset.")
    parser.add_argument("--checkpoint", help="Official checkpoint (.flax file, clu prefix or directory).")
    parser.add_argument("--batch_size", type=int, default=64, help="Images per elbo call.")
    parser.add_argument("--time_samples", default="1,8", help="Values of K to time, comma-separated.")
    parser.add_argument("--batches", type=int, default=2, help="Timed elbo calls per K.")
    parser.add_argument("--num_samples", type=int, default=4, help="Images per sampling call.")
    parser.add_argument("--sample_steps", type=int, default=256, help="Steps of the sampler.")
    parser.add_argument("--sample_timing_steps", type=int, default=0, help="Time this many steps and scale (0: all).")
    parser.add_argument("--data_dir", help="TensorFlow Datasets directory with cifar10 prepared.")
    parser.add_argument("--eval_images", type=int, default=0, help="Test images to evaluate (0: all).")
    parser.add_argument("--eval_time_samples", type=int, default=8, help="Time samples per test image.")
    parser.add_argument("--eval_only", action="store_true", help="With --checkpoint: skip the throughput timings.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/official.json", help="Where to write the JSON results.")
    return parser.parse_args(argv)


def elbo_throughput(model, batch_size, num_time_samples, batches, seed):
    """Images per second of `model.elbo` on random uint8 images."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (batch_size, *model.image_shape), dtype=np.uint8)
    bpd = lambda seed, images=x: model.elbo(images, seed=seed, num_time_samples=num_time_samples)["bpd"].numpy()
    _, warmup = common.timed(bpd, seed, x[:1])  # traces the graph, which serves every batch size
    seconds = sum(common.timed(bpd, seed + 1 + batch)[1] for batch in range(batches))
    return {
        "time_samples": num_time_samples,
        "batch_size": batch_size,
        "batches": batches,
        "images_per_second": batch_size * batches / seconds,
        "network_evaluations_per_second": batch_size * batches * num_time_samples / seconds,
        "warmup_seconds": warmup,
    }


def sampling_throughput(model, num_samples, num_steps, timing_steps, seed):
    """Images per second of `num_steps`-step ancestral sampling (timed on `timing_steps` steps)."""
    timing_steps = timing_steps or num_steps
    _, warmup = common.timed(lambda: model.sample(1, num_steps=1, seed=seed).numpy())  # traces the graph
    _, seconds = common.timed(lambda: model.sample(num_samples, num_steps=timing_steps, seed=seed).numpy())
    seconds_per_step = seconds / timing_steps
    return {
        "num_samples": num_samples,
        "num_steps": num_steps,
        "timed_steps": timing_steps,
        "seconds_per_step": seconds_per_step,
        "images_per_second": num_samples / (seconds_per_step * num_steps),
        "warmup_seconds": warmup,
    }


def evaluate_test_set(model, args):
    """The negative ELBO over the cifar10 test split (or its first --eval_images images)."""
    split = "test" if not args.eval_images else f"test[:{args.eval_images}]"
    batches = datasets.load(
        "cifar10", split, args.batch_size, shuffle=False, repeat=False, drop_remainder=False, data_dir=args.data_dir
    )
    result, seconds = common.timed(
        evaluation.dataset_bpd, model, batches, num_time_samples=args.eval_time_samples, seed=args.seed
    )
    result.pop("per_image")
    result["seconds"] = seconds
    return result


def main(argv=None):
    args = parse_args(argv)
    try:
        time_samples = [int(k) for k in args.time_samples.split(",")]
        config = convert.official_config(args.official_config or args.preset)
        if args.checkpoint:
            convert.checkpoint_file(args.checkpoint)
        elif args.eval_only:
            raise ValueError("--eval_only evaluates a --checkpoint; none was given.")
    except ValueError as error:  # ConversionError included
        print(f"python -m bench.official: error: {error}", file=sys.stderr)
        return 1
    load_before = common.machine()
    start = time.perf_counter()
    if args.checkpoint:
        model = convert.from_checkpoint(args.checkpoint, config)
    else:
        model = runs.build_model(convert.run_config(config))
    results = {
        "machine": load_before,
        "arguments": vars(args),
        "official_config": config,
        "checkpoint": args.checkpoint,
        "weights": sum(int(np.prod(v.shape)) for v in model.weights),
    }
    if not args.eval_only:
        results["elbo"] = [elbo_throughput(model, args.batch_size, k, args.batches, args.seed) for k in time_samples]
        results["sampling"] = sampling_throughput(
            model, args.num_samples, args.sample_steps, args.sample_timing_steps, args.seed
        )
    if args.checkpoint:
        results["test_set"] = evaluate_test_set(model, args)
    results["total_seconds"] = time.perf_counter() - start
    results["load_average_1min_after"] = os.getloadavg()[0]

    print(f"official {args.official_config or args.preset}: {results['weights']:,} weights")
    for row in results.get("elbo", []):
        print(
            f"  elbo K={row['time_samples']:<2} batch {row['batch_size']}: {row['images_per_second']:.3f} images/s "
            f"({row['network_evaluations_per_second']:.2f} network evaluations/s)"
        )
    if "sampling" in results:
        sampling = results["sampling"]
        print(
            f"  sampling {sampling['num_steps']} steps, {sampling['num_samples']} images: "
            f"{sampling['images_per_second']:.4f} images/s ({sampling['seconds_per_step']:.2f} s per step, "
            f"{sampling['timed_steps']} steps timed)"
        )
    if "test_set" in results:
        print(f"  {evaluation.summary_line(results['test_set'])}")
    common.write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
