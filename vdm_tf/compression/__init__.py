"""Lossless compression of images with a trained VDM: bits-back ANS over the discrete-time chain.

    codec = vdm_tf.compression.BitsBackCodec(model, num_steps=250)
    data = codec.encode(x_uint8)                 # bytes; x: [N, H, W, C] or a list of [H_i, W_i, C]
    x_uint8 = codec.decode(data)                 # bit-exact: an array, or a list for mixed sizes
    python -m vdm_tf.compression encode photo.png -o photo.vdmz      # grey or RGB: a bundled model
    python -m vdm_tf.compression decode photo.vdmz -o DIR            # DIR/photo.png
    python -m vdm_tf.compression encode --model=model.keras a.png b.png -o out.vdmz   # your own model

Images of any size H x W >= 1 x 1 with the model's channel count (L or RGB; palette and alpha
are refused) are coded, cut into tiles of the model's image shape. Without --model grey images
use the bundled `vdm_tf/models/photos_grey.keras` and RGB images `vdm_tf/models/photos.keras`.
The codelength is about the model's discrete-time -ELBO at T steps; a message that bits-back
would code larger than PNG/WebP-lossless is stored as those instead (`--no-fallback`: never).
`decode` always writes PNG files, `<stem>.png` for each stored name (`decoded_file_names`),
holding exactly the encoded pixels: for an input in a lossy format (JPEG) that is the pixels
Pillow decoded from it, not the original file's bytes.

The package, one concern per module:

    container      the .vdmz format (versions 1-4): header, size table, names, CRC-32
    ans            the latent grid and the ANS pushes, pops and whitening (constriction)
    tiles          images of any size cut into tiles; batches budgeted by the bits on the stack
    conventional   PNG / WebP-lossless: the seed and the fallback
    codec          `BitsBackCodec` (TensorFlow)
    elbo           the discrete-time -ELBO the code approaches, per tile
    cli            the command line (no TensorFlow until its arguments are checked)

Every public name is importable from here, `from vdm_tf.compression import BitsBackCodec`; the
modules load on first use (PEP 562), so the command line starts without TensorFlow.
"""

from vdm_tf import _lazy

# name -> the module that defines it
_NAMES = {
    **dict.fromkeys(
        "MAGIC FORMAT_VERSION BITS_BACK CONVENTIONAL CompressionError ModelMismatchError Header read_header "
        "_HEADER _HEADER_V2 _CRC _pack_names _unpack_names _pack_sizes _unpack_sizes _check_names".split(),
        "container",
    ),
    **dict.fromkeys("_Batch _Budget _MIN_CROP _tile_plan".split(), "tiles"),
    **dict.fromkeys("lossless_bytes decode_lossless image_file_bytes".split(), "conventional"),
    **dict.fromkeys("BitsBackCodec Choice intra_op_threads".split(), "codec"),
    **dict.fromkeys("discrete_elbo_bpd tiles_elbo_bpd".split(), "elbo"),
    **dict.fromkeys(
        "main load_model default_model_path decoded_file_names write_pngs COMMAND_LINE_STEPS "
        "_model_image_shape".split(),
        "cli",
    ),
}
_MODULES = ("container", "ans", "tiles", "conventional", "codec", "elbo", "cli")


__getattr__, __dir__ = _lazy.attributes(__name__, globals(), _MODULES, _NAMES)

__all__ = [name for name in _NAMES if not name.startswith("_")]
