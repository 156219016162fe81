"""Phases 1-2 of the grouped Triton sparsify (``sparsify/triton.py`` runs them): norms, scores, moments.

Every kernel's grid is over (matrix, block) or (matrix, tile) programs from the host block tables
(``triton_utils.block_table``), or over matrices; inputs are read in place through per-matrix
pointer tables (int64 addresses cast to pointers).
"""

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- phase 1: norms
@triton.jit
def norm_partials_kernel(src_ptrs, src_rows, src_cols, kinds, tile_matrix, tile_start, partials,
                         DTYPE: tl.constexpr, R_PAD: tl.constexpr, W: tl.constexpr):
    """Sum of squares of the r norm vectors of one tile (W rows or columns of the source)."""
    t = tl.program_id(0)
    m = tl.load(tile_matrix + t)
    s = tl.load(tile_start + t).to(tl.int32)
    src = tl.load(src_ptrs + m).to(tl.pointer_type(DTYPE))
    rows = tl.load(src_rows + m).to(tl.int32)
    cols = tl.load(src_cols + m).to(tl.int32)
    lane = tl.arange(0, R_PAD)
    span = s + tl.arange(0, W)
    # The branches name their tiles apart: Triton wants one type per name across an if (W != R_PAD).
    if tl.load(kinds + m) == 0:  # _KIND_A: columns of B_new (d_out x r); tile = W rows x r
        in_a = (span[:, None] < rows) & (lane[None, :] < cols)
        x_a = tl.load(src + span[:, None] * cols + lane[None, :], mask=in_a, other=0.0).to(tl.float64)
        ss = tl.sum(x_a * x_a, axis=0)
    else:  # _KIND_B: rows of A_prev (r x d_in); tile = r rows x W columns
        in_b = (lane[:, None] < rows) & (span[None, :] < cols)
        x_b = tl.load(src + lane[:, None] * cols + span[None, :], mask=in_b, other=0.0).to(tl.float64)
        ss = tl.sum(x_b * x_b, axis=1)
    tl.store(partials + t * R_PAD + lane, ss)


@triton.jit
def norm_finish_kernel(tile_first, tile_count, partials, norms, R_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """norms[m] = sqrt(sum of the matrix's tile partials), in tile order (deterministic)."""
    m = tl.program_id(0)
    first = tl.load(tile_first + m)
    count = tl.load(tile_count + m).to(tl.int32)
    lane = tl.arange(0, R_PAD)
    acc = tl.zeros([R_PAD], dtype=tl.float64)
    for c in range(0, count, CHUNK):
        i = c + tl.arange(0, CHUNK)
        p = tl.load(partials + (first + i)[:, None] * R_PAD + lane[None, :], mask=(i < count)[:, None], other=0.0)
        acc += tl.sum(p, axis=0)
    # tl.sqrt on float64 is IEEE (sqrt.rn.f64); the fp32 rounding is then correct but for double rounding.
    tl.store(norms + m * R_PAD + lane, tl.sqrt(acc).to(tl.float32))


# ----------------------------------------------------------------------------- phase 2: scores, moments
@triton.jit
def scores_kernel(prev_ptrs, new_ptrs, kinds, numels, ncols, blk_matrix, blk_start, norms, scores_bits,
                  part_sum, part_m2, part_m3, part_m4, part_l1, part_bad, hist0,
                  DTYPE: tl.constexpr, R_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """One block of one matrix: delta, scores, block moments and L1, non-finite count, radix pass 0."""
    b = tl.program_id(0)
    m = tl.load(blk_matrix + b)
    start = tl.load(blk_start + b).to(tl.int32)
    n = tl.load(numels + m).to(tl.int32)
    cols = tl.load(ncols + m).to(tl.int32)
    offs = start + tl.arange(0, BLOCK)
    mask = offs < n
    prev = tl.load(tl.load(prev_ptrs + m).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    new = tl.load(tl.load(new_ptrs + m).to(tl.pointer_type(DTYPE)) + offs, mask=mask, other=0.0).to(tl.float32)
    delta = new - prev
    norm_idx = tl.where(tl.load(kinds + m) == 0, offs // cols, offs % cols)
    norm = tl.load(norms + m * R_PAD + norm_idx, mask=mask, other=0.0)
    score = tl.abs(delta) * norm
    bits = score.to(tl.int32, bitcast=True)
    # Block b owns scores_bits[b * BLOCK : (b + 1) * BLOCK]; lanes past the matrix hold -1, below every score,
    # so the later passes read whole blocks unmasked (aligned, vectorised loads).
    tl.store(scores_bits + b * BLOCK + tl.arange(0, BLOCK), tl.where(mask, bits, -1))

    # Block moments in float64, centred on the block mean (merged exactly in moments_kernel).
    x = tl.where(mask, score.to(tl.float64), 0.0)
    total = tl.sum(x, axis=0)
    mean = total / tl.minimum(n - start, BLOCK).to(tl.float64)
    c = tl.where(mask, x - mean, 0.0)
    c2 = c * c
    tl.store(part_sum + b, total)
    tl.store(part_m2 + b, tl.sum(c2, axis=0))
    tl.store(part_m3 + b, tl.sum(c2 * c, axis=0))
    tl.store(part_m4 + b, tl.sum(c2 * c2, axis=0))
    tl.store(part_l1 + b, tl.sum(tl.abs(delta).to(tl.float64), axis=0))
    nonfinite = mask & ((bits & 0x7F800000) == 0x7F800000)
    tl.store(part_bad + b, tl.sum(nonfinite.to(tl.int32), axis=0))

    # Radix pass 0: histogram of the top byte (sign bit 0: digits 0..127).
    bins = tl.arange(0, 256)
    h = tl.histogram((bits >> 24) & 255, 256, mask=mask)
    tl.atomic_add(hist0 + m * 256 + bins, h, mask=h > 0)


@triton.jit
def moments_kernel(numels, blk_first, blk_count, blk_start, part_sum, part_m2, part_m3, part_m4, part_l1, part_bad,
                   kurt, l1, bad, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """Per matrix: kurtosis n*M4/M2^2 from the blocks' central moments, L1, non-finite count.

    Shifting block b's moments from its mean to the matrix mean by d = mean_b - mean is exact
    algebra: M2 = sum(M2_b + n_b d^2), M4 = sum(M4_b + 4 d M3_b + 6 d^2 M2_b + n_b d^4).
    """
    m = tl.program_id(0)
    n = tl.load(numels + m).to(tl.int32)
    first = tl.load(blk_first + m)
    count = tl.load(blk_count + m).to(tl.int32)
    acc_sum = tl.zeros([CHUNK], dtype=tl.float64)
    acc_l1 = tl.zeros([CHUNK], dtype=tl.float64)
    acc_bad = tl.zeros([CHUNK], dtype=tl.int32)
    for c in range(0, count, CHUNK):
        i = c + tl.arange(0, CHUNK)
        valid = i < count
        acc_sum += tl.load(part_sum + first + i, mask=valid, other=0.0)
        acc_l1 += tl.load(part_l1 + first + i, mask=valid, other=0.0)
        acc_bad += tl.load(part_bad + first + i, mask=valid, other=0)
    nf = tl.maximum(n, 1).to(tl.float64)
    mean = tl.sum(acc_sum, axis=0) / nf
    acc_m2 = tl.zeros([CHUNK], dtype=tl.float64)
    acc_m4 = tl.zeros([CHUNK], dtype=tl.float64)
    for c in range(0, count, CHUNK):
        i = c + tl.arange(0, CHUNK)
        valid = i < count
        cnt = tl.minimum(n - tl.load(blk_start + first + i, mask=valid, other=0).to(tl.int32), BLOCK)
        cnt = tl.where(valid, cnt, 1).to(tl.float64)
        d = tl.load(part_sum + first + i, mask=valid, other=0.0) / cnt - mean
        m2 = tl.load(part_m2 + first + i, mask=valid, other=0.0)
        m3 = tl.load(part_m3 + first + i, mask=valid, other=0.0)
        m4 = tl.load(part_m4 + first + i, mask=valid, other=0.0)
        d2 = d * d
        acc_m2 += tl.where(valid, m2 + cnt * d2, 0.0)
        acc_m4 += tl.where(valid, m4 + 4.0 * d * m3 + 6.0 * d2 * m2 + cnt * d2 * d2, 0.0)
    big_m2 = tl.sum(acc_m2, axis=0)
    big_m4 = tl.sum(acc_m4, axis=0)
    safe_m2 = tl.where(big_m2 > 0.0, big_m2, 1.0)
    tl.store(kurt + m, tl.where(big_m2 > 0.0, nf * big_m4 / (safe_m2 * safe_m2), 1.0))
    tl.store(l1 + m, tl.sum(acc_l1, axis=0))
    tl.store(bad + m, tl.sum(acc_bad, axis=0))
