"""A few training steps under one tf.distribute strategy; writes the final weights to an .npz.

Run as a separate process by tests/test_distribute.py, because devices (two logical CPUs) and
the multi-worker cluster (TF_CONFIG) must be set before TensorFlow initialises:

    python tests/distributed_run.py STRATEGY MODEL_DIR OUT_NPZ
"""

import os
import sys

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from trainers import configs, distribute, train  # noqa: E402

# Dropout off: its masks are drawn per replica (from the step's seed), the rest of the randomness per example.
# SGD, not Adam: Adam's update does not change when the gradient is scaled, so it would hide
# gradients summed over replicas instead of averaged.
CONFIG = configs.Config().replace(
    optimizer="sgd",
    dataset="digits",
    n_layers=1,
    n_embd=64,
    dropout=0.0,
    batch_size=8,
    train_steps=5,
    learning_rate=1e-3,
    warmup_steps=1,
    ema_momentum=0.9,
    jit_compile=False,
    checkpoint_every=2,
    log_every=2,
    sample_every=1000,
)


def main(strategy_name, model_dir, out):
    if strategy_name == "mirrored":
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    strategy = distribute.make_strategy(strategy_name)
    trainer = train.Trainer(CONFIG, model_dir, strategy, verbose=False)
    initial = [v.numpy() for v in trainer.model.trainable_variables]
    trainer.train()
    final = [v.numpy() for v in trainer.model.trainable_variables]
    moved = max(np.abs(a - b).max() for a, b in zip(initial, final))
    np.savez(out, *final, replicas=strategy.num_replicas_in_sync, moved=moved)


if __name__ == "__main__":
    main(*sys.argv[1:])
