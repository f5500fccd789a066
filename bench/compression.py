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

    python -m bench.compression --photos                         # the bundled RGB model

`--photos` benchmarks the bundled RGB model (vdm_tf/models/photos.keras, or `--model_dir`) on the
held-out photographs of the `photos` data set (chelsea 300x451, coffee 400x600) at full size, each
as a one-image message (`vdm_tf.compression` as the command line runs it: seed + fallback) and as
bits-back alone (no fallback: what the model itself achieves), against PNG (Pillow, optimize),
WebP-lossless (Pillow) and JPEG-XL lossless (`imagecodecs`, a benchmark-only dependency:
`pip install imagecodecs==2026.3.6`; skipped if missing), and the model's -ELBO at the same T on
the same pixels (`tiles_elbo_bpd`); then messages of 1, 2, 5 and 10 test patches (32x32) against
their PNG files. Writes bench/results/compression_photos.json.
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
    codec = compression.BitsBackCodec(model, num_steps, args.batch_size, args.latent_bins, args.window, fallback=False)
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
    parser.add_argument("--out", default=None, help="default: bench/results/compression.json (_photos.json)")
    parser.add_argument("--photos", action="store_true", help="the RGB photographs benchmark (module docstring)")
    args = parser.parse_args()
    if args.photos:
        return photos(args)
    args.out = args.out or "bench/results/compression.json"
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


def jpegxl_bytes(image):
    """JPEG-XL lossless (imagecodecs, effort 9) of one image, or None without imagecodecs' JPEG-XL."""
    try:
        import imagecodecs
    except ImportError:
        return None
    if not imagecodecs.JPEGXL.available:
        return None
    data = imagecodecs.jpegxl_encode(image[..., 0] if image.shape[-1] == 1 else image, lossless=True, effort=9)
    assert np.array_equal(imagecodecs.jpegxl_decode(data).reshape(image.shape), image)
    return len(data)


def photos(args):
    """The held-out photographs at full size, and messages of a few 32x32 test patches."""
    model_path = args.model_dir if args.model_dir != "runs/demo" else compression.default_model_path(3)
    model = compression.load_model(model_path)
    num_steps = int(args.steps) if args.steps.isdigit() else 50
    codec = compression.BitsBackCodec(model, num_steps, args.batch_size, args.latent_bins, args.window)
    bits_back = compression.BitsBackCodec(
        model, num_steps, args.batch_size, args.latent_bins, args.window, fallback=False
    )
    rows = []
    print(f"{'photo':>10}{'size':>9}{'file':>8}{'bits-back':>10}{'net':>7}{'-ELBO':>7}{'PNG':>7}{'WebP':>7}{'JXL':>7}"
          f"{'enc px/s':>9}{'dec px/s':>9}")  # fmt: skip
    for name, image in datasets.photos_images("test").items():
        dims = image.size
        start = time.perf_counter()
        forced = bits_back.encode(image[None], names=[f"{name}.png"])
        encode_seconds = time.perf_counter() - start
        start = time.perf_counter()
        decoded = bits_back.decode(forced)
        decode_seconds = time.perf_counter() - start
        header = compression.read_header(forced)
        # What the command line writes: the smaller of bits-back and the PNG/WebP fallback.
        conventional = codec._conventional_file([image], [compression.lossless_bytes(image)[0]], [f"{name}.png"])
        data = min(forced, conventional, key=len)
        elbo = compression.tiles_elbo_bpd(model, [image], num_steps, num_time_samples=args.elbo_samples)
        jxl = jpegxl_bytes(image)
        row = {
            "photo": name,
            "size": list(image.shape),
            "lossless": bool(
                np.array_equal(decoded, image[None]) and np.array_equal(codec.decode(conventional), image[None])
            ),
            "file_bpd": bpd(len(data), dims),
            "file_mode": "bits-back" if compression.read_header(data).mode == compression.BITS_BACK else "PNG/WebP",
            "bits_back_file_bpd": bpd(len(forced), dims),
            "bits_back_seed_bpd": 8 * header.seed_bytes / dims,
            "bits_back_initial_bpd": header.initial_bits / dims,
            "net_bpd": header.net_bits / dims,
            "net_tiles_bpd": header.net_bits / (dims - header.seed_rows * image.shape[1] * image.shape[2]),
            "elbo_bpd": elbo["bpd"],
            "elbo_stderr": elbo["stderr"],
            "png_bpd": bpd(compression.image_file_bytes(image, **PNG), dims),
            "webp_bpd": bpd(compression.image_file_bytes(image, **WEBP), dims),
            "jpegxl_bpd": None if jxl is None else bpd(jxl, dims),
            "encode_pixels_per_second": image.shape[0] * image.shape[1] / encode_seconds,
            "decode_pixels_per_second": image.shape[0] * image.shape[1] / decode_seconds,
        }
        rows.append(row)
        jxl_text = f"{row['jpegxl_bpd']:7.3f}" if jxl else f"{'-':>7}"
        print(
            f"{name:>10}{'x'.join(map(str, image.shape[:2])):>9}{row['file_bpd']:8.3f}{row['bits_back_file_bpd']:10.3f}"
            f"{row['net_bpd']:7.3f}{row['elbo_bpd']:7.3f}{row['png_bpd']:7.3f}{row['webp_bpd']:7.3f}{jxl_text}"
            f"{row['encode_pixels_per_second']:9.0f}{row['decode_pixels_per_second']:9.0f}"
            + ("" if row["lossless"] else "  NOT LOSSLESS")
        )
    patches = datasets.photos_arrays("test")
    messages = []
    for count in (1, 2, 5, 10):
        x = patches[np.linspace(0, len(patches) - 1, count).astype(int)]
        data, forced = codec.encode(x), bits_back.encode(x)
        header = compression.read_header(forced)
        png = sum(compression.image_file_bytes(image, **PNG) for image in x)
        messages.append({
            "images": count,
            "file_bytes": len(data),
            "file_mode": "bits-back" if compression.read_header(data).mode == compression.BITS_BACK else "PNG/WebP",
            "bits_back_file_bytes": len(forced),
            "bits_back_net_bytes": header.net_bits / 8,
            "bits_back_seed_bytes": header.seed_bytes,
            "bits_back_initial_bytes": header.initial_bits / 8,
            "png_files_bytes": png,
        })  # fmt: skip
        print(
            f"{count:>3} patches 32x32: file {len(data)} B ({messages[-1]['file_mode']}), bits-back alone "
            f"{len(forced)} B (seed {header.seed_bytes}, initial {header.initial_bits // 8}, net "
            f"{header.net_bits // 8}), PNG files {png} B"
        )
    result = {
        "model": f"{model_path} (photos preset, 32x32x3)",
        "command": "python -m bench.compression --photos" + (f" --steps={num_steps}" if args.steps.isdigit() else ""),
        "num_steps": num_steps,
        "batch_size": args.batch_size,
        "latent_bins": args.latent_bins,
        "window": args.window,
        "elbo_time_samples": args.elbo_samples,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "intra_op_threads": compression.intra_op_threads(),
        "tensorflow": tf.__version__,
        "photos": rows,
        "messages_of_test_patches": messages,
    }
    out = args.out or "bench/results/compression_photos.json"
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
