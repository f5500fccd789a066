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

    python -m bench.compression --photos --steps=10,50           # the bundled RGB model
    python -m bench.compression --photos --grey --steps=50       # the bundled grey model

`--photos` benchmarks the bundled RGB model (vdm_tf/models/photos.keras, or `--model_dir`) on the
held-out photographs of the `photos` data set (chelsea 300x451, coffee 400x600) at full size (with
`--grey`: the grey model, vdm_tf/models/photos_grey.keras, on their luminance, data set
`photos_grey`), for each T of `--steps` (default 10 and 50), each as a one-image message
(`vdm_tf.compression` as the command line runs it: seed + fallback) and as
bits-back alone (no fallback: what the model itself achieves), against PNG (Pillow, optimize),
WebP-lossless (Pillow) and JPEG-XL lossless (`imagecodecs`, a benchmark-only dependency:
`pip install imagecodecs==2026.3.6`; skipped if missing), and the model's -ELBO at the same T on
the same pixels (`tiles_elbo_bpd`); then messages of 1, 2, 5 and 10 test patches (32x32) against
their PNG files, and the continuous-time -ELBO of each photograph (the limit of large T). Each
row is merged into bench/results/compression_photos.json as soon as it is measured (keys `photos`,
`messages_of_test_patches`, `photos_elbo_continuous`; `photos_grey`, ... with --grey), so runs for
the two models and several T add up in one file.
"""

import argparse
import json
import os
import time

from bench import common

common.prepare()  # before TensorFlow, as the command lines start

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
    parser.add_argument("--photos", action="store_true", help="the photographs benchmark (module docstring)")
    parser.add_argument("--grey", action="store_true", help="with --photos: the grey model on grey photographs")
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
        "machine": common.machine(),
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


def _merge(out, updates, drop=()):
    """Writes `updates` into the JSON file `out`, keeping its other keys but `drop` (a run adds its part)."""
    result = {}
    if os.path.exists(out):
        with open(out) as f:
            result = json.load(f)
    result = {key: value for key, value in result.items() if key not in drop} | updates
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


def _replace_row(rows, row, keys):
    """`rows` without the rows that match `row` on `keys`, then `row`."""
    return [old for old in rows if any(old.get(key) != row[key] for key in keys)] + [row]


def photo_row(model, image, name, num_steps, args):
    """One held-out photograph as a one-image message at T = num_steps: the command line's file
    (bits-back or the PNG/WebP fallback), bits-back alone, its -ELBO and the conventional codes."""
    codec = compression.BitsBackCodec(model, num_steps, args.batch_size, args.latent_bins, args.window)
    bits_back = compression.BitsBackCodec(
        model, num_steps, args.batch_size, args.latent_bins, args.window, fallback=False
    )
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
    return {
        "photo": name,
        "num_steps": num_steps,
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


def message_row(model, x, num_steps, args):
    """A message of the test patches `x` at T = num_steps: the command line's file and bits-back alone."""
    codec = compression.BitsBackCodec(model, num_steps, args.batch_size, args.latent_bins, args.window)
    bits_back = compression.BitsBackCodec(
        model, num_steps, args.batch_size, args.latent_bins, args.window, fallback=False
    )
    data, forced = codec.encode(x), bits_back.encode(x)
    assert np.array_equal(bits_back.decode(forced), x)
    header = compression.read_header(forced)
    return {
        "images": len(x),
        "num_steps": num_steps,
        "file_bytes": len(data),
        "file_mode": "bits-back" if compression.read_header(data).mode == compression.BITS_BACK else "PNG/WebP",
        "bits_back_file_bytes": len(forced),
        "bits_back_net_bytes": header.net_bits / 8,
        "bits_back_seed_bytes": header.seed_bytes,
        "bits_back_initial_bytes": header.initial_bits / 8,
        "bits_back_batches": len(bits_back.plan(header)) if header.mode == compression.BITS_BACK else 0,
        "png_files_bytes": sum(compression.image_file_bytes(image, **PNG) for image in x),
    }


def photos(args):
    """The held-out photographs at full size, and messages of a few 32x32 test patches, for each T;
    with --grey the grey model on the photographs' luminance. Merges into the JSON file."""
    grey = args.grey
    channels = 1 if grey else 3
    model_path = args.model_dir
    if model_path == "runs/demo":  # the default of the digits benchmark: the bundled model instead
        model_path = os.path.relpath(compression.default_model_path(channels))
    model = compression.load_model(model_path)
    steps = [int(value) for value in args.steps.split(",")] if args.steps != "10,50,250,1000" else [10, 50]
    out = args.out or "bench/results/compression_photos.json"
    key = "photos_grey" if grey else "photos"
    messages_key = "messages_of_grey_test_patches" if grey else "messages_of_test_patches"
    previous = {}
    if os.path.exists(out):
        with open(out) as f:
            previous = json.load(f)
    # Rows without num_steps are of an older benchmark (format version 3, one T for the whole file).
    rows = [row for row in previous.get(key, []) if "num_steps" in row]
    messages = [row for row in previous.get(messages_key, []) if "num_steps" in row]
    elbo_continuous = previous.get(f"{key}_elbo_continuous", {})
    command = "python -m bench.compression --photos" + (" --grey" if grey else "")
    # num_steps: the T of a whole older file, before each row had its own.
    _merge(out, {
        "grey_model" if grey else "model": f"{model_path} ({key} preset, {'x'.join(map(str, model.image_shape))})",
        "grey_command" if grey else "command": f"{command} --steps={','.join(map(str, steps))} "
        f"--elbo_samples={args.elbo_samples}",
        "batch_size": args.batch_size,
        "latent_bins": args.latent_bins,
        "window": args.window,
        "elbo_time_samples": args.elbo_samples,
        "machine": common.machine(),
        "intra_op_threads": compression.intra_op_threads(),
        "tensorflow": tf.__version__,
    }, drop=("num_steps",))  # fmt: skip
    photographs = datasets.photos_images("test", grey=grey)
    for name, image in photographs.items():
        # The continuous-time -ELBO: what bits-back approaches as T grows (Monte Carlo over t, cheap at any T).
        elbo = compression.tiles_elbo_bpd(model, [image], 0, num_time_samples=4 * args.elbo_samples)
        elbo_continuous[name] = {"bpd": elbo["bpd"], "stderr": elbo["stderr"]}
        print(f"{name}: continuous-time -ELBO {elbo['bpd']:.3f} +- {elbo['stderr']:.3f} bpd", flush=True)
    _merge(out, {f"{key}_elbo_continuous": elbo_continuous})
    print(f"{'photo':>10}{'T':>5}{'file':>8}{'bits-back':>10}{'net':>7}{'-ELBO':>7}{'PNG':>7}{'WebP':>7}{'JXL':>7}"
          f"{'enc px/s':>9}{'dec px/s':>9}")  # fmt: skip
    patches = datasets.photos_arrays("test", grey=grey)
    for num_steps in steps:
        for name, image in photographs.items():
            row = photo_row(model, image, name, num_steps, args)
            rows = _replace_row(rows, row, ("photo", "num_steps"))
            _merge(out, {key: rows})
            jxl_text = f"{row['jpegxl_bpd']:7.3f}" if row["jpegxl_bpd"] else f"{'-':>7}"
            print(
                f"{name:>10}{num_steps:>5}{row['file_bpd']:8.3f}{row['bits_back_file_bpd']:10.3f}{row['net_bpd']:7.3f}"
                f"{row['elbo_bpd']:7.3f}{row['png_bpd']:7.3f}{row['webp_bpd']:7.3f}{jxl_text}"
                f"{row['encode_pixels_per_second']:9.0f}{row['decode_pixels_per_second']:9.0f}"
                + ("" if row["lossless"] else "  NOT LOSSLESS"),
                flush=True,
            )
        for count in (1, 2, 5, 10):
            x = patches[np.linspace(0, len(patches) - 1, count).astype(int)]
            row = message_row(model, x, num_steps, args)
            messages = _replace_row(messages, row, ("images", "num_steps"))
            _merge(out, {messages_key: messages})
            print(
                f"T={num_steps} {count:>3} patches 32x32: file {row['file_bytes']} B ({row['file_mode']}), bits-back "
                f"alone {row['bits_back_file_bytes']} B (seed {row['bits_back_seed_bytes']}, initial "
                f"{row['bits_back_initial_bytes']:.0f}, net {row['bits_back_net_bytes']:.0f}, "
                f"{row['bits_back_batches']} batches), PNG files {row['png_files_bytes']} B",
                flush=True,
            )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
