"""The official VDM's evaluation bound and ancestral sampler (google-research/vdm, JAX/Flax) under `jax.jit`, timed.

Run by `bench/inference_throughput.py` in the JAX virtual environment of
`bench/train_throughput.py`, never imported by vdm_tf.

    JAX_PYTHON official_jax_inference.py --official_repo=DIR --task=elbo --n_layers=2 --n_embd=32 \
        --batch_size=8 --num_time_samples=8 --num_steps=256 --repeats=3

- `elbo`: `Experiment_VDM.loss_fn` with `is_train=False` (the model's own `VDM.__call__`,
  deterministic, antithetic times) on the batch repeated K = `--num_time_samples` times, each
  image's bpd the mean of its K copies' (the official eval averages the same terms over the
  batch; vdm_tf's `model.elbo(x, num_time_samples=K)` tiles the batch the same way).
- `sample`: `Experiment_VDM.sample_fn`: `lax.fori_loop` over T = `--num_steps` calls of
  `VDM.sample`, then `VDM.generate_x` (argmax decoding, `sample_softmax=False` as in the
  official CIFAR-10 config), under plain `jax.jit` (the official `utils.dist` / `pmap` wrapper
  only splits the batch over devices; one device here).

Both take the rng as an argument, so later calls (new seeds) reuse the compiled function.
Prints one JSON line: {"first_call_seconds" (compilation and one call), "seconds" (median of
the later calls), "call_seconds", "time_to_first_result" (from `BENCH_LAUNCHED`, the driver's
launch time, or this process's start), "params", "bpd" (elbo: mean over the images)}.
"""

import argparse
import json
import os
import sys
import time

START = time.time()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--official_repo", required=True)
    parser.add_argument("--task", choices=["elbo", "sample"], required=True)
    parser.add_argument("--n_layers", type=int, required=True)
    parser.add_argument("--n_embd", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--num_time_samples", type=int, default=8)
    parser.add_argument("--num_steps", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

    import jax
    import jax.numpy as jnp
    import numpy as np
    from official_jax_step import official_model, random_images

    model, params = official_model(args.official_repo, args.n_layers, args.n_embd)
    images = jnp.asarray(random_images(args.batch_size))
    k, n = args.num_time_samples, args.batch_size

    @jax.jit
    def elbo(params, rng):  # experiment_vdm.Experiment_VDM.loss_fn, is_train=False, per image
        copies = jnp.tile(images, (k, 1, 1, 1))  # copy j of image i at index j n + i
        outputs = model.apply(
            {"params": params}, images=copies, conditioning=jnp.zeros((k * n,)), rngs={"sample": rng},
            deterministic=True,
        )  # fmt: skip
        nats = outputs.loss_klz + outputs.loss_recon + outputs.loss_diff
        return jnp.mean(jnp.reshape(nats, (k, n)), axis=0) / (np.prod(images.shape[1:]) * np.log(2.0))

    @jax.jit
    def sample(params, rng):  # experiment_vdm.Experiment_VDM.sample_fn, one device
        conditioning = jnp.zeros((n,), dtype="uint8")
        rng, sample_rng = jax.random.split(rng)
        z_init = jax.random.normal(sample_rng, images.shape)

        def body_fn(i, z_t):
            return model.apply(
                {"params": params}, i=i, T=args.num_steps, z_t=z_t, conditioning=conditioning, rng=rng,
                method=model.sample,
            )  # fmt: skip

        z_0 = jax.lax.fori_loop(lower=0, upper=args.num_steps, body_fun=body_fn, init_val=z_init)
        return model.apply({"params": params}, z_0=z_0, method=model.generate_x)

    function = {"elbo": elbo, "sample": sample}[args.task]
    durations, outputs, first_done = [], None, None
    for call in range(args.repeats + 1):
        start = time.perf_counter()
        outputs = jax.block_until_ready(function(params, jax.random.PRNGKey(call)))
        durations.append(time.perf_counter() - start)
        first_done = first_done or time.time()
    result = {
        "first_call_seconds": durations[0],
        "seconds": float(np.median(durations[1:])),
        "call_seconds": durations[1:],
        "time_to_first_result": first_done - float(os.environ.get("BENCH_LAUNCHED", START)),
        "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        "jax": jax.__version__,
    }
    if args.task == "elbo":
        result["bpd"] = float(jnp.mean(outputs))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
