"""Trains the digits feature network of `vdm_tf.metrics` (FID_digits, KID_digits) and ships it.

    python -m bench.digits_features        # about half a minute on a 2-core CPU

Inception cannot judge 8x8 digits, so `vdm_tf.metrics.digits_network()` uses a small CNN
trained here to classify the digits training split (1500 images, `vdm_tf.datasets.digits_arrays`):

    uint8 [N, 8, 8, 1] -> /255 -> Conv 3x3 32 ReLU -> Conv 3x3 64 stride 2 ReLU -> Flatten
      -> Dropout 0.3 -> Dense 64 ReLU -> Dense 10 ("logits": the Inception Score's p(y | x) is their softmax)
    the Dense 64's output times a fixed scale: the "features" FID / KID / precision-recall compare

The role of Inception's pool_3 (2048 features after a ReLU) and logits is played by the 64
"features" and the 10 "logits". Adam (1e-3), batch 64, 60 epochs, seed 0 with TensorFlow's
deterministic ops, so a rerun on the same machine writes the same weights. The test split (297
images) is not seen in training; its accuracy is printed and written with the timing to
bench/results/digits_features.json; tests/test_metrics.py checks the shipped file's accuracy.
"""

import argparse
import os
import time

from bench import common

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from vdm_tf import datasets, metrics  # noqa: E402


def build(feature_scale=1.0):
    """(the classifier it trains: images -> logits, the network it ships: images -> {"features", "logits"}).

    The two share their layers. The shipped "features" are the 64 hidden units times
    `feature_scale`, chosen after training so that their mean square over the training split is
    1: KID's kernel (x.y / d + 1)^3 then sees inner products of order 1, as with Inception's.
    """
    images = keras.Input((8, 8, 1), name="images")
    x = keras.layers.Rescaling(1.0 / 255.0)(images)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Dropout(0.3)(keras.layers.Flatten()(x))
    hidden = keras.layers.Dense(64, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(10, name="logits")(hidden)
    features = keras.layers.Rescaling(feature_scale, name="features")(hidden)
    return (
        keras.Model(images, logits, name="digits_classifier"),
        keras.Model(images, {"features": features, "logits": logits}, name="digits_features"),
    )


def accuracy(model, images, labels):
    """The fraction of uint8 `images` whose largest logit under `model` is their label."""
    return float(np.mean(np.argmax(model.predict(images.astype(np.float32), verbose=0), -1) == labels))


def ship(build, model, unscaled, images, path):
    """Saves the trained `model`'s weights as `build(feature_scale)`'s network to `path`; returns the scale.

    `feature_scale` = 1 / sqrt(the mean square of the unscaled "features" of `images`), so the
    shipped features' mean square over them is 1. `unscaled` is `build()`'s network sharing
    `model`'s layers; the shipped one is a new model, so the file holds no optimizer state.
    """
    hidden = unscaled.predict(images.astype(np.float32), verbose=0)["features"]
    feature_scale = float(1.0 / np.sqrt(np.mean(np.square(hidden.astype(np.float64)))))
    _, shipped = build(feature_scale)
    shipped.set_weights(model.get_weights())
    shipped.save(path)
    return feature_scale


def arguments(description, name, epochs):
    """The command line of a feature-network trainer (--out, --results, --epochs, --seed) for the
    bundled network `name`, parsed; seeds Keras and turns on TensorFlow's deterministic ops."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=metrics.bundled_network_path(name), help="The .keras file.")
    parser.add_argument("--results", default=f"bench/results/{name}_features.json", help="Where to write the JSON.")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    return args


def main():
    args = arguments(__doc__, "digits", epochs=60)
    train_x, train_y = datasets.digits_arrays("train", with_labels=True)
    test_x, test_y = datasets.digits_arrays("test", with_labels=True)
    model, unscaled = build()
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(train_x.astype(np.float32), train_y, batch_size=64, epochs=args.epochs, shuffle=True, verbose=0)
    seconds = time.perf_counter() - start
    scores = {"train": accuracy(model, train_x, train_y), "test": accuracy(model, test_x, test_y)}
    feature_scale = ship(build, model, unscaled, train_x, args.out)
    print(f"wrote {args.out}: accuracy train {scores['train']:.4f}, test {scores['test']:.4f} ({seconds:.0f} s)")
    common.write_json(
        args.results,
        {
            "machine": common.machine(),
            "network": os.path.relpath(args.out),
            "parameters": model.count_params(),
            "feature_scale": feature_scale,
            "epochs": args.epochs,
            "seed": args.seed,
            "train_seconds": seconds,
            "accuracy": scores,
            "num_test_images": len(test_x),
        },
    )


if __name__ == "__main__":
    main()
