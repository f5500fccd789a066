"""i-DODE's truncated-normal ODE likelihood: the official code against vdm_tf, side by side.

    python -m bench.idode_likelihood --official_repo=PATH/i-DODE --jax_python=/tmp/jaxenv/bin/python
    python -m bench.idode_likelihood --official_repo=PATH/i-DODE --jax_python=... --quick   # end to end, minutes

`PATH/i-DODE` is a checkout of github thu-ml/i-DODE (the figures used 8cb8092), or a bare git
copy of it (exported to a temporary directory). The official side runs in a JAX environment
(`--jax_python`: jax, flax, optax, chex, ml_collections, scipy; e.g. `train_throughput`'s
`--jax_venv`), unmodified: `VDM.likelihood` with `dequantization="tn"` and `num_importance=1`,
i.e. 5 truncated-normal draws per image averaged in log space, each a scipy `solve_ivp` RK45
solve on the host (float64 state, one pmapped JAX drift + vector-Jacobian product per function
evaluation, a device round trip each), from gamma(0) to gamma(1). Its `utils.py` imports clu and
TensorFlow for metric writers; `model_vdm.py` takes only `batch_mul` from it, so the worker puts
a `utils.py` holding the official `batch_mul` source (read from the checkout) first on the path.

vdm_tf's side is `vdm_tf.likelihood.ode_bpd(model, x, seed=k, dequantization="truncated_normal")`
for k = 0..4, averaged per image (`ours`: one draw per solve, as the official code), and
`ode_bpd(..., draws=5)` (`ours_batched`: the 5 draws of every image in one solve of 5 N examples;
called twice, seeds 0 and 1, the first call being the process's first 5 draws), on the model
`python -m vdm_tf.convert --source=idode` makes of the same checkpoint: the same ODE in gamma, in
one TensorFlow graph (`vdm_tf.ode_solver`: the same Dormand-Prince pair with scipy's RK45 step control,
float32).

The network (`--network`): `fixture` is tests/fixtures/official_idode's checkpoint (a 1-layer,
32-channel ScoreUNet whose weights were moved far off their initialisation: its ODE is stiff,
3,000-5,000 function evaluations per solve at 1e-5, too slow here); `init` (default) is a
checkpoint this bench writes with the official code: `VDM.init` of the CIFAR-10 VP config with
`--n_layers` x `--n_embd` (1 x 32), every weight moved by N(0, 1) times `--perturb` (0.1) times
(its tensor's standard deviation + 0.01), the zero-initialised output convolutions included, so
the network is not the identity; EMA weights = weights. Images: `--images` 32x32x3 patches of
scikit-image's bundled photographs (every 4th pixel), the same uint8 arrays for both sides.

Each side is a fresh process (its first solve includes tracing and compilation; the later ones
are the steady state), bracketed official / ours / ours_batched / official so all see the same load, with
`other_cpus` (the CPUs other processes kept busy meanwhile, `bench.train_throughput.measure`).
Reported per side: bpd per image (mean of its 5 draws), the mean over images and its standard
error, NFE per solve, seconds per function evaluation, wall seconds, images per second (an image
= its 5 draws) in the steady state and over the process's first 5 draws; ours / official; the difference of
the means in standard errors (unpaired, and paired over the same images). Writes
bench/results/idode_likelihood.json (`--quick`: bench/results/idode_likelihood_quick.json).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

START = time.time()
PROG = "python -m bench.idode_likelihood"
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "official_idode")
SIDES = ("official", "ours", "ours_batched")
DRAWS = 5  # i-DODE's num_importance=1: 5 draws averaged in log space (model_vdm.py:395-400)
# The CIFAR-10 VP config of i-DODE (configs/cifar10.py's model fields), network size apart.
CONFIG = dict(
    vocab_size=256, sample_softmax=False, antithetic_time_sampling=True, with_fourier_features=True,
    with_attention=False, second_order=False, velocity=True, importance=True, dequantization="tn",
    num_importance=1, gamma_type="fixed", gamma_min=-13.3, gamma_max=5.0, schedule="VP",
    sm_n_timesteps=0, sm_n_embd=32, sm_n_layer=1, sm_pdrop=0.1,
)  # fmt: skip
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket")


# ----------------------------------------------------------------------------------------------
# Official workers (JAX environment): nothing here imports vdm_tf or TensorFlow.


def _official_path(repo):
    """Puts a `utils.py` with the official `batch_mul` (its source, read from `repo`) and `repo` on sys.path."""
    import ast

    with open(os.path.join(repo, "utils.py")) as f:
        source = f.read()
    (function,) = [node for node in ast.parse(source).body if getattr(node, "name", None) == "batch_mul"]
    shim = tempfile.mkdtemp(prefix="idode_shim_")
    with open(os.path.join(shim, "utils.py"), "w") as f:
        f.write("import jax\n\n\n" + ast.get_source_segment(source, function) + "\n")
    sys.path[:0] = [shim, repo]


def worker_make_checkpoint(args):
    """An official `TrainState` of the official `VDM.init`, weights perturbed, as clu writes it."""
    _official_path(args.official_repo)
    import jax
    import model_vdm
    import optax
    import train_state
    from flax import serialization

    config = json.loads(args.config)
    model = model_vdm.VDM(model_vdm.VDMConfig(**config))
    key, perturb_key = jax.random.split(jax.random.PRNGKey(args.seed))
    variables = model.init(
        {"params": key, "sample": key},
        images=jax.numpy.zeros((2, 32, 32, 3), "uint8"),
        conditioning=jax.numpy.zeros((2,)),
    )
    leaves, tree = jax.tree_util.tree_flatten(variables["params"])
    keys = jax.random.split(perturb_key, len(leaves))
    params = jax.tree_util.tree_unflatten(
        tree,
        [
            p + args.perturb * jax.random.normal(k, p.shape) * (jax.numpy.std(p) + args.perturb_floor)
            for k, p in zip(keys, leaves)
        ],
    )
    state = train_state.TrainState.create(
        apply_fn=model.apply, variables={"params": params}, optax_optimizer=lambda lr: optax.sgd(lr)
    )
    os.makedirs(os.path.dirname(args.checkpoint), exist_ok=True)
    with open(args.checkpoint, "wb") as f:
        f.write(serialization.to_bytes(state))
    print(json.dumps({"params": int(sum(p.size for p in leaves))}))


def worker_official(args):
    """The official `VDM.likelihood` on the images, each solve timed (a timing wrapper of solve_ivp)."""
    _official_path(args.official_repo)
    import flax
    import jax
    import jax.numpy as jnp
    import model_vdm
    import numpy as np

    with open(args.checkpoint, "rb") as f:
        ema = flax.serialization.msgpack_restore(f.read())["ema_params"]
    config = json.loads(args.config)
    model = model_vdm.VDM(model_vdm.VDMConfig(**config))
    images = jnp.asarray(np.load(args.images)["images"])[None]  # [devices = 1, B, 32, 32, 3]
    solves, solve_ivp = [], model_vdm.integrate.solve_ivp

    def timed_solve_ivp(fun, t_span, y0, **options):
        clock = {"seconds": 0.0}

        def timed_fun(t, y):
            started = time.perf_counter()
            value = fun(t, y)
            clock["seconds"] += time.perf_counter() - started
            return value

        started = time.perf_counter()
        solution = solve_ivp(timed_fun, t_span, y0, **options)
        solves.append(
            {
                "seconds": time.perf_counter() - started,
                "function_seconds": clock["seconds"],
                "nfe": int(solution.nfev),
                "options": {key: str(value) for key, value in options.items()},
            }
        )
        return solution

    model_vdm.integrate.solve_ivp = timed_solve_ivp
    started = time.perf_counter()
    bpd = model.apply(
        {"params": ema},
        images=images,
        conditioning=jnp.zeros(images.shape[:2]),
        rng=jax.random.split(jax.random.PRNGKey(args.seed), 1),
        rtol=args.tol,
        atol=args.tol,
        method=model.likelihood,
    )
    bpd = np.asarray(bpd).reshape(-1)
    seconds = time.perf_counter() - started
    print(json.dumps({"bpd": bpd.tolist(), "seconds": seconds, "solves": solves, "jax": jax.__version__}))


# ----------------------------------------------------------------------------------------------
# vdm_tf worker.


def worker_ours(args):
    """`ode_bpd(..., dequantization="truncated_normal")`, each call timed: with `--batched`, two
    calls of `draws=DRAWS` (seeds 0 and 1: every image's draws in one solve; the first call is the
    process's first DRAWS draws, the second the steady state); else DRAWS calls of one draw each."""
    from bench import common

    common.prepare()
    import numpy as np

    import vdm_tf

    model = vdm_tf.load(args.model)
    images = np.load(args.images)["images"]
    per_solve = DRAWS if args.batched else 1
    draws, solves = [], []
    for seed in range(2 if args.batched else DRAWS):
        started = time.perf_counter()
        out = vdm_tf.likelihood.ode_bpd(
            model, images, seed=seed, dequantization="truncated_normal", draws=per_solve, rtol=args.tol, atol=args.tol
        )
        draws.append(out["bpd"].numpy())
        solves.append({"seconds": time.perf_counter() - started, "nfe": int(out["nfe"]), "draws": per_solve})
    seconds = sum(solve["seconds"] for solve in solves[: DRAWS // per_solve])  # the first DRAWS draws
    bpd = np.mean(draws, axis=0)  # i-DODE's mean of the draws' log-likelihoods
    print(json.dumps({"bpd": bpd.tolist(), "seconds": seconds, "solves": solves}))


# ----------------------------------------------------------------------------------------------
# The driver (vdm_tf's environment).


def photo_patches(count, size=32, seed=0):
    """`count` uint8 [size, size, 3] patches of scikit-image's photographs, every 4th pixel."""
    import numpy as np
    import skimage.data

    rng = np.random.default_rng(seed)
    patches = []
    for i in range(count):
        photo = getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()[::4, ::4, :3]
        row = rng.integers(0, photo.shape[0] - size + 1)
        column = rng.integers(0, photo.shape[1] - size + 1)
        patches.append(photo[row : row + size, column : column + size])
    return np.stack(patches).astype(np.uint8)


def is_official_repo(repo):
    """Whether `repo` is a checkout of i-DODE, or a bare git copy whose HEAD holds its model_vdm.py."""
    if os.path.exists(os.path.join(repo, "model_vdm.py")):
        return True
    listing = subprocess.run(
        ["git", "--git-dir", repo, "ls-tree", "--name-only", "HEAD"], capture_output=True, text=True
    )
    return not listing.returncode and "model_vdm.py" in listing.stdout.split()


def official_checkout(repo, workdir):
    """A directory holding the i-DODE sources: `repo` itself, or `repo`'s HEAD exported if it is a bare git copy."""
    if os.path.exists(os.path.join(repo, "model_vdm.py")):
        return os.path.abspath(repo)
    out = os.path.join(workdir, "i-DODE")
    os.makedirs(out)
    archive = subprocess.run(["git", "--git-dir", repo, "archive", "HEAD"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", out], input=archive.stdout, check=True)
    return out


def side_summary(runs):
    """Figures of one side from its runs (each: per-image bpd, the wall seconds of its first
    DRAWS draws, per-solve seconds, NFE and draws per image)."""
    import numpy as np

    solves = [solve for run in runs for solve in run["solves"]]
    first = [run["solves"][0] for run in runs]
    steady = [solve for run in runs for solve in run["solves"][1:]]
    bpd = np.mean([run["bpd"] for run in runs], axis=0)  # runs of one side use the same seed
    images = len(bpd)

    def per_image_seconds(group):  # wall seconds per image of one draw
        return float(np.median([solve["seconds"] / solve.get("draws", 1) for solve in group])) / images

    summary = {
        "bpd_per_image": bpd.tolist(),
        "bpd_mean": float(bpd.mean()),
        "bpd_standard_error": float(bpd.std(ddof=1) / np.sqrt(images)),
        "draws_per_solve": solves[0].get("draws", 1),
        "nfe_per_solve": [solve["nfe"] for solve in runs[0]["solves"]],
        "nfe_median": float(np.median([solve["nfe"] for solve in solves])),
        "seconds_per_nfe_steady": float(np.median([solve["seconds"] / solve["nfe"] for solve in steady])),
        "first_solve_seconds": float(np.median([solve["seconds"] for solve in first])),
        "steady_draw_seconds": images * per_image_seconds(steady),
        "wall_seconds": float(np.median([run["seconds"] for run in runs])),
        "images_per_second_steady": 1.0 / (DRAWS * per_image_seconds(steady)),
        "images_per_second_with_first": images / float(np.median([run["seconds"] for run in runs])),
        "other_cpus": [run["other_cpus"] for run in runs],
    }
    if "function_seconds" in solves[0]:
        summary["function_share_steady"] = float(
            np.median([solve["function_seconds"] / solve["seconds"] for solve in steady])
        )
    return summary


def ratios(ours, official):
    """One vdm_tf side against the official one: throughput, NFE, seconds per NFE, agreement."""
    return {
        "throughput": ours["images_per_second_steady"] / official["images_per_second_steady"],
        "throughput_with_first_solve": ours["images_per_second_with_first"] / official["images_per_second_with_first"],
        "nfe": ours["nfe_median"] / official["nfe_median"],
        "seconds_per_nfe": ours["seconds_per_nfe_steady"] / official["seconds_per_nfe_steady"],
        "agreement": agreement(ours, official),
    }


def agreement(ours, official):
    """Difference of the means, in standard errors: unpaired, and paired over the same images."""
    import numpy as np

    difference = ours["bpd_mean"] - official["bpd_mean"]
    unpaired = np.hypot(ours["bpd_standard_error"], official["bpd_standard_error"])
    per_image = np.asarray(ours["bpd_per_image"]) - np.asarray(official["bpd_per_image"])
    paired = per_image.std(ddof=1) / np.sqrt(len(per_image))
    return {
        "difference": float(difference),
        "unpaired_standard_errors": float(difference / unpaired),
        "paired_standard_error": float(paired),
        "paired_standard_errors": float(difference / paired),
    }


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if any(arg.startswith("--worker") for arg in argv):
        parser = argparse.ArgumentParser()  # a worker: the JAX environment has no vdm_tf
    else:
        from vdm_tf import cli  # one-line errors, exit code 1 (no TensorFlow import)

        parser = cli.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    parser.add_argument("--official_repo", help="a checkout (or bare git copy) of thu-ml/i-DODE")
    parser.add_argument("--jax_python", help="a Python with jax, flax, optax, chex, ml_collections, scipy")
    parser.add_argument("--network", choices=("init", "fixture"), default="init")
    parser.add_argument("--n_layers", type=int, default=1, help="--network=init: ScoreUNet layers")
    parser.add_argument("--n_embd", type=int, default=32, help="--network=init: ScoreUNet channels")
    parser.add_argument("--perturb", type=float, default=0.1, help="--network=init: weight perturbation")
    parser.add_argument("--perturb_floor", type=float, default=0.01, help=argparse.SUPPRESS)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--tol", type=float, default=1e-5, help="rtol = atol of both solvers")
    parser.add_argument("--rounds", type=int, default=1, help="bracketed rounds official / ours / official")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 images, tol 1e-3, a 1x32 network")
    parser.add_argument("--out", default=None)
    parser.add_argument("--worker", choices=("make_checkpoint", "official", "ours"), help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--images_file", dest="images_file", help=argparse.SUPPRESS)
    parser.add_argument("--batched", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.images = args.images_file
        return {"make_checkpoint": worker_make_checkpoint, "official": worker_official, "ours": worker_ours}[
            args.worker
        ](args)
    if not args.official_repo or not args.jax_python:
        parser.error("expected --official_repo=PATH (thu-ml/i-DODE) and --jax_python=PYTHON (a JAX environment)")
    if not os.path.exists(args.jax_python):
        parser.error(f"--jax_python={args.jax_python} does not exist")
    if not is_official_repo(args.official_repo):
        parser.error(f"--official_repo={args.official_repo}: expected a checkout (or bare git copy) of thu-ml/i-DODE")
    if args.images < 2 or args.tol <= 0 or args.rounds < 1 or args.n_layers < 1 or args.n_embd < 32 or args.n_embd % 32:
        parser.error(
            "expected --images >= 2, --tol > 0, --rounds >= 1, --n_layers >= 1 and --n_embd a multiple of 32 "
            "(the ScoreUNet's GroupNorm has 32 groups)"
        )
    if args.quick:
        args.images, args.tol, args.n_layers, args.n_embd = 2, 1e-3, 1, 32
    out = args.out or os.path.join(HERE, "results", "idode_likelihood" + "_quick" * args.quick + ".json")
    return drive(args, out)


def drive(args, out):
    import numpy as np

    from bench import common
    from bench.train_throughput import measure

    workdir = tempfile.mkdtemp(prefix="idode_likelihood_")
    repo = official_checkout(args.official_repo, workdir)
    myself = [sys.executable, "-m", "bench.idode_likelihood"]
    official_python = [args.jax_python, os.path.abspath(__file__)]
    if args.network == "fixture":
        checkpoint = os.path.join(FIXTURE, "checkpoints-0", "ckpt-1.flax")
        with open(os.path.join(FIXTURE, "vp", "official_config.json")) as f:
            config = json.load(f)
        made = {}
    else:
        config = dict(CONFIG, sm_n_layer=args.n_layers, sm_n_embd=args.n_embd)
        checkpoint = os.path.join(workdir, "checkpoints-0", "ckpt-1.flax")
        made = measure(
            official_python
            + [
                "--worker=make_checkpoint",
                f"--official_repo={repo}",
                f"--checkpoint={checkpoint}",
                f"--config={json.dumps(config)}",
                f"--perturb={args.perturb}",
                f"--perturb_floor={args.perturb_floor}",
                f"--seed={args.seed}",
            ]
        )
    config_file = os.path.join(workdir, "official_config.json")
    with open(config_file, "w") as f:
        json.dump(config, f)
    model = os.path.join(workdir, "model.keras")
    converted = subprocess.run(
        [
            sys.executable, "-m", "vdm_tf.convert", "--source=idode", f"--checkpoint={checkpoint}",
            f"--official_config={config_file}", f"--output={model}",
        ],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    if converted.returncode:
        raise RuntimeError(f"python -m vdm_tf.convert failed:\n{converted.stderr[-3000:]}")
    images_file = os.path.join(workdir, "images.npz")
    np.savez(images_file, images=photo_patches(args.images, seed=args.seed))

    common_args = [f"--images_file={images_file}", f"--tol={args.tol}", f"--seed={args.seed}"]
    official_command = official_python + [
        "--worker=official", f"--official_repo={repo}", f"--checkpoint={checkpoint}", f"--config={json.dumps(config)}",
    ] + common_args  # fmt: skip
    ours_command = myself + ["--worker=ours", f"--model={model}"] + common_args
    commands = {"official": official_command, "ours": ours_command, "ours_batched": ours_command + ["--batched"]}
    runs = {side: [] for side in SIDES}
    for _ in range(args.rounds):
        for side in ("official", "ours", "ours_batched", "official"):
            command = commands[side]
            print(f"running {side} ...", flush=True)
            runs[side].append(measure(command))
            print(f"  {side}: {runs[side][-1]['seconds']:.1f} s, other CPUs {runs[side][-1]['other_cpus']}", flush=True)
    sides = {side: side_summary(measured) for side, measured in runs.items()}
    official = sides["official"]
    result = {
        "machine": common.machine(),
        "command": " ".join([PROG] + sys.argv[1:]),
        "network": args.network,
        "official_config": config,
        "params": made.get("params"),
        "images": args.images,
        "draws_per_image": DRAWS,
        "rtol": args.tol,
        "atol": args.tol,
        **sides,
        **{f"{side}_over_official": ratios(sides[side], official) for side in ("ours", "ours_batched")},
        "runs": runs,
    }
    print_table(result)
    common.write_json(out, result)
    print(f"wrote {out}")


def print_table(result):
    print(
        f"{'side':<14}{'bpd mean':>10}{'s.e.':>8}{'NFE':>8}{'ms/NFE':>9}{'1st solve s':>13}{'draw s':>9}"
        f"{'img/s':>9}{'img/s w/ 1st':>14}{'other CPUs':>12}"
    )
    for side in SIDES:
        s = result[side]
        print(
            f"{side:<14}{s['bpd_mean']:>10.4f}{s['bpd_standard_error']:>8.4f}{s['nfe_median']:>8.0f}"
            f"{1000 * s['seconds_per_nfe_steady']:>9.1f}{s['first_solve_seconds']:>13.1f}"
            f"{s['steady_draw_seconds']:>9.1f}"
            f"{s['images_per_second_steady']:>9.4f}{s['images_per_second_with_first']:>14.4f}"
            f"{max(s['other_cpus']):>12.2f}"
        )
    for side in ("ours", "ours_batched"):
        r = result[f"{side}_over_official"]
        a = r["agreement"]
        print(
            f"{side}/official: throughput {r['throughput']:.2f}x "
            f"(with the first solve {r['throughput_with_first_solve']:.2f}x), "
            f"NFE {r['nfe']:.2f}x, s/NFE {r['seconds_per_nfe']:.2f}x; "
            f"bpd difference {a['difference']:+.4f} = {a['unpaired_standard_errors']:+.2f} s.e. "
            f"(paired: {a['paired_standard_errors']:+.2f})"
        )


if __name__ == "__main__":
    if any(arg.startswith("--worker") for arg in sys.argv[1:]):
        sys.exit(main())
    from vdm_tf import cli

    cli.run(main, prog=PROG)
