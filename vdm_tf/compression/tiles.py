"""The tile planner: images of any size cut into the model's tiles, in batches the stack can pay for.

## Any size: tiles

The model's image shape is the tile size. Each image is cut, rows first, into tiles at
multiples of it; at the right and bottom borders the crops are smaller and run through the
network at their own size (the ScoreUNet is fully convolutional: no padding pixel is coded,
and a border crop costs what its pixels cost under a model that sees less context). Crops of
one shape, from every image of the message, are coded in batches together (`_tile_plan`), one
traced network per (batch size, crop shape). The container stores each image's H x W.

## The budgeted ramp (format version 4)

A batch's first pops read about h(q(z_0 | x)) + h(q(z_1 | z_0)) bits per dimension (8-9 on
the grid of `latent_bins` = 4) before it pushes anything, while a seed (the first image's top
rows, coded conventionally at the bottom of the stack) holds its own conventional rate (2-5
bits per dimension of its rows). So each batch takes as many crops as the bits then on the
stack pay for: the seed's, plus what the batches before left (assumed to be the seed's rate per
dimension, at most half the first pops': the decoder must compute the same plan). When not
even one tile fits, the next tile is cut into quarters (16x16, then 8x8, 4x4 for the 32x32
models), coded first: a message of 32x32 patches starts with crops of its second patch, and
batches grow from there. The ramp of version 3 (and of a message without seed), 1, 2, 4, ...
whole tiles, makes its first tile read 2-3 KB from the pseudo-random words, which the file
then has to carry.
"""

import dataclasses


@dataclasses.dataclass(frozen=True)
class _Batch:
    """Tiles coded together: crops of one shape (h, w), run through the network `padded` at a time."""

    shape: tuple
    tiles: tuple  # (image, top, left) of each crop
    padded: int  # the traced batch size: len(tiles) rounded up to a power of two (the batch size at most)


@dataclasses.dataclass(frozen=True)
class _Budget:
    """The budgeted ramp of format version 4 (`_tile_plan`), all in bits; encoder and decoder
    compute it from the file's header (`BitsBackCodec._budget`).

    seed: the bits above the pseudo-random words before the first batch (the seed's bytes).
    first_pops: bits per dimension the first pops of a batch read before it pushes anything,
        h(q(z_0 | x)) + h(q(z_1 | z_0)) on the grid (`_Grid.q_bits[0] + q_bits[1]`).
    net: bits per dimension a coded batch is assumed to leave on the stack (its -ELBO): the
        seed's own conventional rate, at most `first_pops` / 2 (batches then grow by a factor
        of at most 1.5); a model that codes better than that digs into the pseudo-random words.
    """

    seed: float
    first_pops: float
    net: float


_MIN_CROP = 4  # the budgeted ramp splits crops into quarters down to this side


def _tile_plan(sizes, tile, seed_rows, batch_size, ramp=True, budget=None):
    """The batches of a message: every image cut into tiles of the model's shape, in coding order.

    Image i of size H x W is cut, rows first, into crops at (top, left) = multiples of the tile
    size: full tiles, and at the right and bottom borders smaller crops that the (fully
    convolutional) network runs at their own size, so no padding pixel is coded. The first image
    starts below its `seed_rows` conventionally coded rows. Crops of one shape, from all images,
    are batched together in order of first appearance.

    The ramp: the first pops of a message have no bits below them but the seed's. With a `budget`
    (format version 4, a seed) each batch is as large as the bits then on the stack pay for:
    budget.first_pops bits per dimension, the stack holding the seed's bits plus budget.net per
    dimension coded so far. When not even one crop fits, the next crop is cut into quarters
    (down to sides of `_MIN_CROP`), coded first. With `ramp` alone (version 3, or no seed), batch
    k holds at most 2^k crops (1, 2, 4, ... up to `batch_size`). Without either (versions 1 and
    2) every batch holds `batch_size` and runs padded to it.
    """
    groups = {}
    for image, (height, width) in enumerate(sizes):
        for top in range(seed_rows if image == 0 else 0, height, tile[0]):
            for left in range(0, width, tile[1]):
                shape = (min(tile[0], height - top), min(tile[1], width - left))
                groups.setdefault(shape, []).append((image, top, left))
    plan = []
    if budget is not None:
        available = budget.seed
        for shape, tiles in groups.items():
            available = _budgeted_batches(plan, shape, tiles, tile[2], batch_size, budget, available)
        return plan
    for shape, tiles in groups.items():
        start = 0
        while start < len(tiles):
            size = min(batch_size, 1 << min(len(plan), 30)) if ramp else batch_size
            chunk = tuple(tiles[start : start + size])
            padded = min(batch_size, 1 << (len(chunk) - 1).bit_length()) if ramp else batch_size
            plan.append(_Batch(shape, chunk, padded))
            start += size
    return plan


def _budgeted_batches(plan, shape, crops, channels, batch_size, budget, available):
    """Appends the budgeted batches of `crops` (all of `shape`) to `plan`; returns the bits then available."""
    height, width = shape
    dims = height * width * channels
    queue = list(crops)
    while queue:
        fits = int(available // (budget.first_pops * dims))
        if fits == 0 and min(height, width) >= 2 * _MIN_CROP:
            image, top, left = queue.pop(0)
            quarters = {}  # shape -> crops: for odd sides the top / left quarters are one pixel larger
            for down, rows in ((0, (height + 1) // 2), ((height + 1) // 2, height // 2)):
                for right, cols in ((0, (width + 1) // 2), ((width + 1) // 2, width // 2)):
                    quarters.setdefault((rows, cols), []).append((image, top + down, left + right))
            for quarter, quarter_crops in quarters.items():
                available = _budgeted_batches(plan, quarter, quarter_crops, channels, batch_size, budget, available)
            continue
        chunk = tuple(queue[: min(max(fits, 1), batch_size)])
        del queue[: len(chunk)]
        plan.append(_Batch(shape, chunk, min(batch_size, 1 << (len(chunk) - 1).bit_length())))
        available += budget.net * dims * len(chunk)
    return available
