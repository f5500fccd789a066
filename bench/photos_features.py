"""Trains the photos feature network of `vdm_tf.metrics` (FID_photos, KID_photos) and ships it.

    python -m bench.photos_features        # 3-4 minutes on a shared 2-core CPU

Inception cannot judge 32x32 patches offline (no weights here), so `vdm_tf.metrics.photos_network()`
uses a small CNN trained here to tell which photograph a 32x32 patch comes from. The classes
(`CLASSES`) are photographs bundled inside scikit-image (read from its own files, nothing
downloaded), without the photos data set's test photographs (chelsea, coffee: the network never
sees them). Each photograph is split by rows (`split_patches`): patches at stride 16 from its top
3/4 train, those at stride 32 inside its bottom 1/4 are held out for the reported accuracy.

    uint8 [N, 32, 32, 3] -> /255 -> 3 x (Conv 3x3 stride 2, BatchNorm, ReLU) with 32, 64, 128 channels
      -> global average pool -> Dense 128 ReLU
      -> Dense len(CLASSES) ("logits": the Inception Score's p(y | x) is their softmax)
    the Dense 128's output times a fixed scale: the "features" FID / KID / precision-recall compare

As in `bench/digits_features.py`, the scale makes the features' mean square 1, here over the
photos training split (`vdm_tf.datasets.photos_arrays("train")`, the patches the metric's real
and generated images resemble). Classes are balanced: at most `MAX_PER_CLASS` training patches
of a photograph (a seeded subset), and a class-weighted loss for those with fewer. Random
left-right and top-bottom flips; Adam, its learning rate 2e-3 decayed to 0 on a cosine over 40
epochs, batch 64, seed 0 with TensorFlow's deterministic ops, so a rerun on the same machine
writes the same weights. The accuracy on the training patches used, on the held-out patches
(all, and averaged per photograph) and the timing go to bench/results/photos_features.json;
tests/test_metrics.py checks the shipped file's held-out accuracy.
"""

import os
import time

from bench import common

common.prepare()  # before TensorFlow is imported

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.digits_features import accuracy, arguments, ship  # noqa: E402
from vdm_tf import datasets  # noqa: E402

# The classes: {name: file in skimage.data.data_dir}, natural and scientific photographs large
# enough for held-out patches. Left out: chelsea and coffee (the photos test split),
# motorcycle_right (a near-duplicate of motorcycle_left), the drawings and synthetic images
# (chessboard, phantom, logo, color: a colour wheel, horse: a silhouette), microaneurysms
# (102x102: no 32x32 patch in its bottom quarter) and clock_motion (motion-blurred: 96% of its
# held-out patches are flat, pixel standard deviation < 3).
CLASSES = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "cell": "cell.png",
    "coins": "coins.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "hubble_deep_field": "hubble_deep_field.jpg",
    "immunohistochemistry": "ihc.png",
    "moon": "moon.png",
    "motorcycle_left": "motorcycle_left.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}
PATCH = 32
TRAIN_STRIDE, HELDOUT_STRIDE = 16, 32
MAX_PER_CLASS = 700


def photograph(name):
    """Photograph `name` of `CLASSES` as uint8 [H, W, 3]: grey repeated to three channels, RGBA -> RGB (Pillow)."""
    import skimage.data
    from PIL import Image

    with Image.open(os.path.join(skimage.data.data_dir, CLASSES[name])) as picture:
        return np.asarray(picture.convert("RGB"))


def patches(image, stride):
    """The PATCHxPATCH patches of `image` [H, W, C] starting every `stride` pixels, inside it, rows first."""
    windows = np.lib.stride_tricks.sliding_window_view(image, (PATCH, PATCH), axis=(0, 1))[::stride, ::stride]
    return np.ascontiguousarray(np.moveaxis(windows, 2, -1).reshape(-1, PATCH, PATCH, image.shape[2]))


def split_patches(split):
    """(uint8 patches [N, 32, 32, 3], int64 labels [N]: indices into `CLASSES`) of "train" or "heldout".

    "train": patches at stride 16 inside the top 3/4 of each photograph's rows; "heldout": at
    stride 32 inside the bottom 1/4. No pixel is in both.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout'; got {split!r}.")
    images, labels = [], []
    for label, name in enumerate(CLASSES):
        image = photograph(name)
        cut = image.shape[0] * 3 // 4
        part = patches(image[:cut], TRAIN_STRIDE) if split == "train" else patches(image[cut:], HELDOUT_STRIDE)
        images.append(part)
        labels.append(np.full(len(part), label, np.int64))
    return np.concatenate(images), np.concatenate(labels)


def balanced(images, labels, max_per_class, seed):
    """At most `max_per_class` patches of each class (a seeded subset), and class weights {label: w} that
    give every class the same total weight."""
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:max_per_class] for c in range(len(CLASSES))])
    keep.sort()
    counts = np.bincount(labels[keep], minlength=len(CLASSES))
    weights = {c: float(len(keep) / (len(CLASSES) * counts[c])) for c in range(len(CLASSES))}
    return images[keep], labels[keep], weights


def flip(image, seed):
    """`image` flipped left-right and top-bottom, each with probability 1/2: the same photograph."""
    return tf.image.random_flip_up_down(tf.image.random_flip_left_right(image, seed=seed), seed=seed + 1)


def build(feature_scale=1.0):
    """(the classifier it trains: images -> logits, the network it ships: images -> {"features", "logits"}).

    The two share their layers (`bench/digits_features.py`'s `build`): the shipped "features" are
    the 128 hidden units times `feature_scale`.
    """
    images = keras.Input((PATCH, PATCH, 3), name="images")
    x = keras.layers.Rescaling(1.0 / 255.0)(images)
    for channels in (32, 64, 128):
        x = keras.layers.Conv2D(channels, 3, strides=2, padding="same", use_bias=False)(x)
        x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    x = keras.layers.GlobalAveragePooling2D()(x)
    hidden = keras.layers.Dense(128, activation="relu", name="hidden")(x)
    logits = keras.layers.Dense(len(CLASSES), name="logits")(hidden)
    features = keras.layers.Rescaling(feature_scale, name="features")(hidden)
    return (
        keras.Model(images, logits, name="photos_classifier"),
        keras.Model(images, {"features": features, "logits": logits}, name="photos_features"),
    )


def main():
    args = arguments(__doc__, "photos", epochs=40)
    all_x, all_y = split_patches("train")
    train_x, train_y, class_weight = balanced(all_x, all_y, MAX_PER_CLASS, args.seed)
    heldout_x, heldout_y = split_patches("heldout")
    data = (
        tf.data.Dataset.from_tensor_slices((train_x, train_y))
        .shuffle(len(train_x), seed=args.seed, reshuffle_each_iteration=True)
        .map(lambda x, y: (flip(tf.cast(x, tf.float32), args.seed), y))
        .batch(64)
    )
    model, unscaled = build()
    steps = args.epochs * -(-len(train_x) // 64)
    model.compile(
        optimizer=keras.optimizers.Adam(keras.optimizers.schedules.CosineDecay(2e-3, steps)),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(data, epochs=args.epochs, class_weight=class_weight, shuffle=False, verbose=0)  # `data` shuffles
    seconds = time.perf_counter() - start
    scores = {"train": accuracy(model, train_x, train_y), "heldout": accuracy(model, heldout_x, heldout_y)}
    per_class = {
        name: accuracy(model, heldout_x[heldout_y == c], heldout_y[heldout_y == c]) for c, name in enumerate(CLASSES)
    }
    # The held-out accuracy is dominated by retina's many patches; each photograph counts once here.
    scores["heldout_balanced"] = float(np.mean(list(per_class.values())))
    feature_scale = ship(build, model, unscaled, datasets.photos_arrays("train"), args.out)
    print(
        f"wrote {args.out}: accuracy train {scores['train']:.4f}, held out {scores['heldout']:.4f} "
        f"(per photograph {scores['heldout_balanced']:.4f}), {seconds:.0f} s"
    )
    common.write_json(
        args.results,
        {
            "machine": common.machine(),
            "network": os.path.relpath(args.out),
            "classes": CLASSES,
            "parameters": model.count_params(),
            "feature_scale": feature_scale,
            "epochs": args.epochs,
            "seed": args.seed,
            "max_per_class": MAX_PER_CLASS,
            "train_seconds": seconds,
            "accuracy": scores,
            "heldout_accuracy_per_class": per_class,
            "num_train_patches": len(train_x),
            "num_heldout_patches": len(heldout_x),
        },
    )


if __name__ == "__main__":
    main()
