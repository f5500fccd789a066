"""The official VDM train step (google-research/vdm, JAX/Flax) under plain `jax.jit`, timed.

Run by `bench/train_throughput.py` in its own virtual environment (jax, flax, optax, chex,
ml_collections), never imported by vdm_tf: JAX is a benchmark dependency only.

    JAX_PYTHON official_jax_step.py --official_repo=DIR --n_layers=2 --n_embd=32 --batch_size=8 --steps=6

`DIR` holds a checkout of google-research/vdm (the package `vdm` is `DIR` itself, as in its own
README: `PYTHONPATH=<parent of DIR>`). The step is the official one: `experiment_vdm.loss_fn`'s
lines (the model's own `VDM.__call__`: continuous time, antithetic times, Fourier features,
learnable scalar schedule), `jax.value_and_grad`, the official AdamW (b1 0.9, b2 0.99, weight
decay 0.01 with its decay mask) and the EMA update of `train_state.TrainState.apply_gradients`
(written with `jax.tree.map`: `jax.tree_multimap` is gone from current JAX). The official
`pmap` + `lax.scan` wrapper is left out: on a CPU it is 10-17x slower than plain `jit`.

Prints one JSON line: {"first_step_seconds", "seconds_per_step" (median), "step_seconds",
"time_to_first_step" (from `BENCH_LAUNCHED`, the driver's launch time, or this process's start), "params"}.
"""

import argparse
import json
import os
import resource
import sys
import time

START = time.time()


def official_model(official_repo, n_layers, n_embd):
    """The official `VDM` of the CIFAR-10 setup with a `n_layers` x `n_embd` U-Net, and its initial params.

    `official_repo` is a google-research/vdm checkout, imported as the package of its own name
    (its modules import `vdm.*`). Continuous time, antithetic times, Fourier features, no
    attention in the layers, learnable scalar schedule from -13.3 to 5, dropout 0.1, argmax decoding.
    """
    import importlib

    import jax
    import jax.numpy as jnp

    repo = os.path.abspath(official_repo)
    sys.path.insert(0, os.path.dirname(repo))
    model_vdm = importlib.import_module(f"{os.path.basename(repo)}.model_vdm")
    config = model_vdm.VDMConfig(
        vocab_size=256, sample_softmax=False, antithetic_time_sampling=True, with_fourier_features=True,
        with_attention=False, gamma_type="learnable_scalar", gamma_min=-13.3, gamma_max=5.0,
        sm_n_timesteps=0, sm_n_embd=n_embd, sm_n_layer=n_layers, sm_pdrop=0.1,
    )  # fmt: skip
    model = model_vdm.VDM(config)
    rng = jax.random.PRNGKey(0)
    images, conditioning = jnp.zeros((2, 32, 32, 3), "uint8"), jnp.zeros((2,))
    return model, model.init({"params": rng, "sample": rng}, images=images, conditioning=conditioning)["params"]


def random_images(batch_size):
    """The benches' images: uint8 [batch_size, 32, 32, 3], uniform, seed 0 (NumPy, as vdm_tf's side draws them)."""
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, (batch_size, 32, 32, 3), dtype=np.uint8)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--official_repo", required=True)
    parser.add_argument("--n_layers", type=int, required=True)
    parser.add_argument("--n_embd", type=int, required=True)
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    import flax
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    model, params = official_model(args.official_repo, args.n_layers, args.n_embd)
    images = jnp.asarray(random_images(args.batch_size))
    conditioning = jnp.zeros((args.batch_size,))

    def decay_mask(params):  # experiment.Experiment.get_optimizer
        flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
        mask = {
            p: p[-1] != "bias" and p[-2:] not in [("layer_norm", "scale"), ("final_layer_norm", "scale")] for p in flat
        }
        return flax.traverse_util.unflatten_dict(mask)

    tx = optax.adamw(learning_rate=2e-4, b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.01, mask=decay_mask)
    opt_state = tx.init(params)
    ema_params = params

    def loss_fn(params, rng):  # experiment_vdm.Experiment_VDM.loss_fn, is_train=True
        rng, sample_rng = jax.random.split(rng)
        _, dropout_rng = jax.random.split(rng)
        outputs = model.apply(
            {"params": params},
            images=images,
            conditioning=conditioning,
            rngs={"sample": sample_rng, "dropout": dropout_rng},
            deterministic=False,
        )
        rescale_to_bpd = 1.0 / (np.prod(images.shape[1:]) * np.log(2.0))
        nats = jnp.mean(outputs.loss_klz) + jnp.mean(outputs.loss_recon) + jnp.mean(outputs.loss_diff)
        return nats * rescale_to_bpd

    @jax.jit
    def train_step(params, ema_params, opt_state, step):
        rng = jax.random.fold_in(jax.random.PRNGKey(1), step)
        loss, grads = jax.value_and_grad(loss_fn)(params, rng)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        ema_params = jax.tree.map(lambda e, p: e + (1.0 - 0.9999) * (p - e), ema_params, params)
        return params, ema_params, opt_state, loss

    durations, page_faults, first_done = [], [], None
    for step in range(args.steps + 1):
        start, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        params, ema_params, opt_state, loss = train_step(params, ema_params, opt_state, step)
        jax.block_until_ready((params, ema_params, opt_state, loss))
        durations.append(time.perf_counter() - start)
        page_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
        first_done = first_done or time.time()
    print(
        json.dumps(
            {
                "first_step_seconds": durations[0],
                "seconds_per_step": float(np.median(durations[1:])),
                "step_seconds": durations[1:],
                "page_faults_per_step": float(np.median(page_faults[1:])),
                "time_to_first_step": first_done - float(os.environ.get("BENCH_LAUNCHED", START)),
                "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
                "jax": jax.__version__,
                "flax": flax.__version__,
                "loss": float(loss),
            }
        )
    )


if __name__ == "__main__":
    main()
