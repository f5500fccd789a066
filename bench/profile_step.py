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
inter-op threads here). Where the time of a small step goes that is not convolution, each
result says in `not_convolution`: the other groups' op time and share, the ops per step and
their mean duration (a small step is thousands of ops of a few microseconds: per-op overhead,
not arithmetic), and `idle_core_seconds`, the CPU time of the step's wall-clock (CPUs x
seconds) in which no op of the step ran (the executor between ops, Keras's Python around the
step, threads waiting for each other; on a busy machine also other processes).

Prints a table; writes bench/results/profile_step.json per CPU kind (as
bench/train_throughput.py: {"kinds": {kind: {"machine", "steps", "results"}}}, keeping the other
kinds and this kind's configurations not profiled now). Run it on an otherwise idle machine
(see `other CPUs` in bench/train_throughput.py).
"""

import collections
import glob
import os
import statistics
import tempfile
import time

from bench import common  # noqa: E402

common.prepare()  # before TensorFlow is imported

from bench.train_throughput import CONFIGS, fit_model_and_data  # noqa: E402
from vdm_tf import cli  # noqa: E402

CONVOLUTION = ("convolution, forward", "convolution, backward")

BOOKKEEPING = {
    "Start",
    "Done",
    "FunctionRun",
    "PartitionedCallOp",
    "ExecutorDoneCallback",
    "ReadVariableOp",
    "ParallelFor",
    "Identity",
    "IdentityN",
    "NoOp",
    "Const",
    "_Retval",
    "_Arg",
}
REDUCTIONS = {"Sum", "Mean", "Max", "Min", "Prod", "BiasAddGrad", "AddN"}
COPIES = {
    "Tile",
    "Slice",
    "StridedSlice",
    "StridedSliceGrad",
    "ConcatV2",
    "Transpose",
    "Pack",
    "Unpack",
    "Reshape",
    "Fill",
    "Pad",
    "GatherV2",
    "Split",
    "SplitV",
    "BroadcastTo",
    "TensorListStack",
    "TensorListFromTensor",
}
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
    by_kind, by_group = collections.Counter(), collections.Counter()
    counts, group_counts = collections.Counter(), collections.Counter()
    for kind, name, seconds in events:
        by_kind[kind] += seconds / steps
        counts[kind] += 1 / steps
        group = next(group for group, test in GROUPS if test(kind, name))
        by_group[group] += seconds / steps
        group_counts[group] += 1 / steps
    total = sum(by_kind.values())
    groups = {
        group: {"seconds": seconds, "share": seconds / total, "ops_per_step": round(group_counts[group]),
                "mean_op_microseconds": seconds / group_counts[group] * 1e6}
        for group, seconds in by_group.most_common()
    }  # fmt: skip
    other = {group: figure for group, figure in groups.items() if group not in CONVOLUTION}
    other_seconds = sum(figure["seconds"] for figure in other.values())
    other_ops = sum(figure["ops_per_step"] for figure in other.values())
    return {
        "config": config,
        "n_layers": n_layers,
        "n_embd": n_embd,
        "batch_size": batch_size,
        "steps": steps,
        "seconds_per_step": seconds_per_step,
        "op_seconds_per_step": total,
        "ops_per_step": round(sum(group_counts.values())),
        "idle_core_seconds": os.cpu_count() * seconds_per_step - total,
        "not_convolution": {
            "seconds": other_seconds,
            "share": other_seconds / total,
            "ops_per_step": other_ops,
            "mean_op_microseconds": other_seconds / max(other_ops, 1) * 1e6,
            "groups": {group: figure["share"] for group, figure in other.items()},
        },
        "groups": groups,
        "op_types": [
            {"op": kind, "seconds": seconds, "share": seconds / total, "per_step": round(counts[kind])}
            for kind, seconds in by_kind.most_common(25)
        ],
    }


def main(argv=None):
    parser = cli.ArgumentParser(prog="python -m bench.profile_step", description=__doc__.split("\n")[0])
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
        print(
            f"\n{name}: {result['seconds_per_step']:.3f} s/step wall-clock, "
            f"{result['op_seconds_per_step']:.3f} s of op time per step (summed over threads)"
        )
        for group, figure in result["groups"].items():
            print(
                f"  {group:<36}{figure['seconds'] * 1000:>9.1f} ms {figure['share']:>7.1%}"
                f"  {figure['ops_per_step']:>6} ops, {figure['mean_op_microseconds']:>7.1f} us each"
            )
        other = result["not_convolution"]
        print(
            f"  not convolution: {other['seconds'] * 1000:.1f} ms ({other['share']:.0%} of op time) in "
            f"{other['ops_per_step']} ops per step of {other['mean_op_microseconds']:.1f} us on average; "
            f"CPU time of the step without any op: {result['idle_core_seconds'] * 1000:.1f} ms "
            f"({os.cpu_count()} CPUs x {result['seconds_per_step'] * 1000:.1f} ms wall-clock)"
        )
        print("  top op types:")
        for row in result["op_types"][:12]:
            print(f"    {row['op']:<40}{row['seconds'] * 1000:>9.1f} ms {row['share']:>7.1%}  x{row['per_step']}")
    machine = common.machine()
    section = {"machine": machine, "steps": args.steps, "results": results}
    common.write_json(
        args.out,
        {"kinds": common.merge_kind(common.read_kinds(args.out), common.cpu_kind(machine["cpu"]), section, CONFIGS)},
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    cli.run(main, prog="python -m bench.profile_step")
