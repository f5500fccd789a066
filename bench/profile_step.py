"""Where a train step's time goes: per-op CPU time of the `model.fit` step, from `tf.profiler`.

    python -m bench.profile_step                     # tiny and small
    python -m bench.profile_step --configs=paper --steps=3

Builds the `fit` path of `bench/train_throughput.py` (same network, schedule, fused AdamW + EMA,
no XLA; random uint8 images), runs warm-up steps, times `--steps` steps, then records them again
under `tf.profiler.experimental` and sums the executor's op events (the `tf_Compute` threads of
the trace's XSpace) by op type and by group:

- convolution forward / backward (oneDNN's `_MklNative*Conv2D*` kernels),
- matrix products (attention and the dense layers),
- random numbers (dropout masks, the diffusion's noise and times),
- the optimizer (`ResourceApply*`),
- reductions (group norm's statistics, bias gradients, gradient sums), copies (tiles, slices,
  concatenations), the executor's bookkeeping (function calls, variable reads),
- the rest: element-wise ops of group norm, swish, the losses and their gradients.

Op time summed over threads exceeds the step's wall-clock time when ops run in parallel (two
inter-op threads here). Prints a table; writes bench/results/profile_step.json. Run it on an
otherwise idle machine (see `other CPUs` in bench/train_throughput.py).
"""

import argparse
import collections
import glob
import os
import statistics
import sys
import tempfile
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

from bench.train_throughput import CONFIGS, fit_model_and_data  # noqa: E402

BOOKKEEPING = {"Start", "Done", "FunctionRun", "PartitionedCallOp", "ExecutorDoneCallback", "ReadVariableOp",
               "ParallelFor", "Identity", "IdentityN", "NoOp", "Const", "_Retval", "_Arg"}
REDUCTIONS = {"Sum", "Mean", "Max", "Min", "Prod", "BiasAddGrad", "AddN"}
COPIES = {"Tile", "Slice", "StridedSlice", "StridedSliceGrad", "ConcatV2", "Transpose", "Pack", "Unpack", "Reshape",
          "Fill", "Pad", "GatherV2", "Split", "SplitV", "BroadcastTo", "TensorListStack", "TensorListFromTensor"}
GROUPS = (  # (group, test on the op type and name), first match wins
    ("convolution, forward", lambda kind, name: "Conv2D" in kind and "Backprop" not in kind),
    ("convolution, backward", lambda kind, name: "Conv2DBackprop" in kind),
    ("matrix products (attention, dense)", lambda kind, name: "MatMul" in kind),
    ("random numbers (dropout, noise)", lambda kind, name: kind.startswith("StatelessRandom")),
    ("optimizer", lambda kind, name: kind.startswith("ResourceApply")),
    ("reductions (norm statistics, sums)", lambda kind, name: kind in REDUCTIONS),
    ("copies, tiles, slices", lambda kind, name: kind in COPIES),
    ("executor bookkeeping", lambda kind, name: kind in BOOKKEEPING),
    ("element-wise (norm, swish, loss)", lambda kind, name: True),
)


def op_events(logdir):
    """(op type, op name, seconds) of every op the executor ran, from the profile in `logdir`."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True))[-1], "rb") as f:
        space.ParseFromString(f.read())
    for plane in space.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            for event in line.events:
                name = plane.event_metadata[event.metadata_id].name
                if ":" not in name or name.endswith(":Process"):  # executor spans, not ops
                    continue
                name, kind = name.rsplit(":", 1)
                yield kind, name, event.duration_ps * 1e-12


def profile(config, steps):
    import keras
    import tensorflow as tf

    n_layers, n_embd, batch_size = CONFIGS[config]
    model, data = fit_model_and_data(n_layers, n_embd, batch_size)
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0)  # tracing and warm-up
    durations = []
    timer = keras.callbacks.LambdaCallback(
        on_train_batch_begin=lambda batch, logs: durations.append(-time.perf_counter()),
        on_train_batch_end=lambda batch, logs: durations.append(durations.pop() + time.perf_counter()),
    )
    model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0, callbacks=[timer])
    seconds_per_step = statistics.median(durations)  # as bench/train_throughput.py times a step
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        events = list(op_events(logdir))
    by_kind, by_group, counts = collections.Counter(), collections.Counter(), collections.Counter()
    for kind, name, seconds in events:
        by_kind[kind] += seconds / steps
        counts[kind] += 1 / steps
        group = next(group for group, test in GROUPS if test(kind, name))
        by_group[group] += seconds / steps
    total = sum(by_kind.values())
    return {
        "config": config, "n_layers": n_layers, "n_embd": n_embd, "batch_size": batch_size,
        "seconds_per_step": seconds_per_step, "op_seconds_per_step": total,
        "groups": {group: {"seconds": seconds, "share": seconds / total} for group, seconds in by_group.most_common()},
        "op_types": [{"op": kind, "seconds": seconds, "share": seconds / total, "per_step": round(counts[kind])}
                     for kind, seconds in by_kind.most_common(25)],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,small")
    parser.add_argument("--steps", type=int, default=10, help="timed and profiled steps (after 3 warm-up steps)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "profile_step.json"))
    args = parser.parse_args(argv)
    names = args.configs.split(",")
    if set(names) - set(CONFIGS) or args.steps < 1:
        parser.error(f"--configs takes some of {', '.join(CONFIGS)} and --steps a positive number")
    results = []
    for name in names:
        result = profile(name, args.steps)
        results.append(result)
        print(f"\n{name}: {result['seconds_per_step']:.3f} s/step wall-clock, "
              f"{result['op_seconds_per_step']:.3f} s of op time per step (summed over threads)")
        for group, figure in result["groups"].items():
            print(f"  {group:<32}{figure['seconds'] * 1000:>9.1f} ms {figure['share']:>7.1%}")
        print("  top op types:")
        for row in result["op_types"][:12]:
            print(f"    {row['op']:<40}{row['seconds'] * 1000:>9.1f} ms {row['share']:>7.1%}  x{row['per_step']}")
    common.write_json(args.out, {"machine": common.machine(), "steps": args.steps, "results": results})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    sys.exit(main())
