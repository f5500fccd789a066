"""Bits-back compression of the digits test split with the demo model, against PNG and WebP.

    python -m bench.compression                                  # T = 10, 50, 250, 1000
    python -m bench.compression --steps=10,50 --images=297,297

For each number of steps T, `vdm_tf.compression.BitsBackCodec` encodes the first `--images` test
digits (all 297 at small T; the network runs 2 T times per batch, so large T uses a subset) and
decodes them (checked bit-exact). It reports, in bits per dimension over those images:

- net: the bits-back codelength (growth of the ANS stack), which approaches the -ELBO;
- -ELBO: the model's discrete-time negative ELBO at the same T (`discrete_elbo_bpd`,
  `--elbo_samples` time samples per image, with its standard error over images);
- file: the whole compressed file, i.e. net + the one-off initial bits of the first batch +
  the header; initial: those initial bits alone;
- PNG and WebP (lossless, Pillow, best effort) of the same images, one file per image;
- encode / decode speed in images per second (graphs traced beforehand).

It also compresses the whole split as one grid picture with PNG and WebP (no per-file headers).
Prints a table and writes bench/results/compression.json.
"""

import argparse
import json
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from vdm_tf import compression, datasets, images  # noqa: E402

PNG = {"format": "PNG", "optimize": True}
WEBP = {"format": "WEBP", "lossless": True, "quality": 100, "method": 6}


def bpd(num_bytes, num_dims):
    return 8.0 * num_bytes / num_dims


def measure(model, x, num_steps, args):
    codec = compression.BitsBackCodec(model, num_steps, args.batch_size, args.latent_bins, args.window)
    warm_up = compression.BitsBackCodec(model, 1, args.batch_size)
    warm_up.decode(warm_up.encode(x[: args.batch_size]))  # traces the network at this batch size
    start = time.perf_counter()
    data = codec.encode(x)
    encode_seconds = time.perf_counter() - start
    start = time.perf_counter()
    decoded = codec.decode(data)
    decode_seconds = time.perf_counter() - start
    header = compression.read_header(data)
    elbo = compression.discrete_elbo_bpd(model, x, num_steps, num_time_samples=args.elbo_samples)
    dims = x.size
    return {
        "num_steps": num_steps,
        "images": len(x),
        "batch_size": header.batch_size,
        "lossless": bool(np.array_equal(decoded, x)),
        "net_bpd": header.net_bits / dims,
        "elbo_bpd": elbo["bpd"],
        "elbo_stderr": elbo["stderr"],
        "net_over_elbo": header.net_bits / dims / elbo["bpd"],
        "file_bpd": bpd(len(data), dims),
        "initial_bpd": header.initial_bits / dims,
        "png_bpd": bpd(sum(compression.image_file_bytes(image, **PNG) for image in x), dims),
        "webp_bpd": bpd(sum(compression.image_file_bytes(image, **WEBP) for image in x), dims),
        "encode_images_per_second": len(x) / encode_seconds,
        "decode_images_per_second": len(x) / decode_seconds,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model_dir", default="runs/demo", help="trainer run directory (or a .keras file)")
    parser.add_argument("--steps", default="10,50,250,1000", help="comma-separated T values")
    parser.add_argument("--images", default="297,297,32,16", help="test images per T (the first ones)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--latent_bins", type=int, default=4)
    parser.add_argument("--window", type=int, default=8)
    parser.add_argument("--elbo_samples", type=int, default=16)
    parser.add_argument("--out", default="bench/results/compression.json")
    args = parser.parse_args()
    steps = [int(value) for value in args.steps.split(",")]
    counts = [int(value) for value in args.images.split(",")]
    if len(counts) != len(steps):
        parser.error(f"--images needs one count per T; got {counts} for {steps}.")

    model = compression.load_model(args.model_dir)
    test = datasets.digits_arrays("test")
    rows = []
    header = (
        f"{'T':>5}{'images':>7}{'net':>8}{'-ELBO':>8}{'+-':>6}{'net/ELBO':>9}{'file':>8}{'initial':>8}"
        f"{'PNG':>7}{'WebP':>7}{'enc/s':>7}{'dec/s':>7}"
    )
    print(header)
    for num_steps, count in zip(steps, counts):
        row = measure(model, test[:count], num_steps, args)
        rows.append(row)
        print(
            f"{num_steps:>5}{count:>7}{row['net_bpd']:8.3f}{row['elbo_bpd']:8.3f}{row['elbo_stderr']:6.3f}"
            f"{row['net_over_elbo']:9.3f}{row['file_bpd']:8.3f}{row['initial_bpd']:8.3f}{row['png_bpd']:7.2f}"
            f"{row['webp_bpd']:7.2f}{row['encode_images_per_second']:7.2f}{row['decode_images_per_second']:7.2f}"
            + ("" if row["lossless"] else "  NOT LOSSLESS")
        )
    picture = images.grid(test, columns=27, padding=0)  # 11 x 27 digits, no padding pixels
    whole = {
        "images": len(test),
        "png_per_image_bpd": bpd(sum(compression.image_file_bytes(image, **PNG) for image in test), test.size),
        "webp_per_image_bpd": bpd(sum(compression.image_file_bytes(image, **WEBP) for image in test), test.size),
        "png_grid_bpd": bpd(compression.image_file_bytes(picture, **PNG), test.size),
        "webp_grid_bpd": bpd(compression.image_file_bytes(picture, **WEBP), test.size),
    }
    print(
        f"whole test split ({len(test)} images): PNG {whole['png_per_image_bpd']:.2f} / WebP "
        f"{whole['webp_per_image_bpd']:.2f} bpd as files, PNG {whole['png_grid_bpd']:.2f} / WebP "
        f"{whole['webp_grid_bpd']:.2f} bpd as one grid picture"
    )
    result = {
        "model": f"{args.model_dir} (digits 8x8x1)",
        "command": " ".join(["python -m bench.compression"] + [f"--{k}={v}" for k, v in vars(args).items()]),
        "latent_bins": args.latent_bins,
        "window": args.window,
        "elbo_time_samples": args.elbo_samples,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "intra_op_threads": compression.intra_op_threads(),
        "tensorflow": tf.__version__,
        "rows": rows,
        "baselines_whole_split": whole,
    }
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
