"""Phases 4-5 of the grouped Triton sparsify (``sparsify/triton.py`` runs them): radix select, compaction.

The scores arrive as int32 bits in block-padded slots (block b owns ``[b * BLOCK, (b + 1) * BLOCK)``,
padding lanes hold -1), written by phase 2 (``triton_score.py``).
"""

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- phase 4: radix select
@triton.jit
def hist_kernel(scores_bits, blk_matrix, keep, prefix, hist, block_hist, block_gt,
                SHIFT: tl.constexpr, STORE_BLOCKS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of digit (bits >> SHIFT) & 255 over the scores whose higher bits equal the prefix."""
    b = tl.program_id(0)
    m = tl.load(blk_matrix + b)
    bits = tl.load(scores_bits + b * BLOCK + tl.arange(0, BLOCK))  # padding lanes hold -1
    high = bits >> (SHIFT + 8)  # >= 0 for every score (a NaN in a k == 0 matrix may be negative)
    live = tl.load(keep + m) > 0
    high_prefix = tl.where(live, tl.load(prefix + m) >> (SHIFT + 8), -1)  # k == 0: no lane matches
    h = tl.histogram((bits >> SHIFT) & 255, 256, mask=(high == high_prefix) & (high >= 0))
    bins = tl.arange(0, 256)
    tl.atomic_add(hist + m * 256 + bins, h, mask=h > 0)
    if STORE_BLOCKS:
        tl.store(block_hist + b * 256 + bins, h)
        above = tl.sum((high > high_prefix).to(tl.int32), axis=0)
        tl.store(block_gt + b, tl.where(live, above, 0))


@triton.jit
def select_kernel(hist, prefix, remaining, SHIFT: tl.constexpr):
    """Per matrix: the digit of the remaining-th largest matched score; fix it into the prefix."""
    m = tl.program_id(0)
    bins = tl.arange(0, 256)
    h = tl.load(hist + m * 256 + bins)
    k = tl.load(remaining + m)
    pre = tl.load(prefix + m)
    at_least = tl.cumsum(h, axis=0, reverse=True)  # at_least[d]: matched scores with digit >= d
    digit = tl.sum((at_least >= k).to(tl.int32), axis=0) - 1  # largest d with at_least[d] >= k
    above = tl.sum(tl.where(bins == digit, at_least - h, 0), axis=0)  # matched scores with digit > d
    live = k > 0
    tl.store(prefix + m, tl.where(live, pre | (digit << SHIFT), pre))
    tl.store(remaining + m, tl.where(live, k - above, k))


# ----------------------------------------------------------------------------- phase 5: compaction
@triton.jit
def scan_kernel(blk_first, blk_count, prefix, remaining, out_off, block_hist, block_gt, blk_out, blk_ties_before,
                CHUNK: tl.constexpr):
    """Per matrix, per block: kept count (> T, plus its share of the == T ties), scanned into offsets."""
    m = tl.program_id(0)
    first = tl.load(blk_first + m)
    count = tl.load(blk_count + m).to(tl.int32)
    threshold = tl.load(prefix + m)
    ties_wanted = tl.load(remaining + m)
    base = tl.load(out_off + m)
    last_digit = threshold & 255
    bins = tl.arange(0, 256)
    ties_carry = 0
    kept_carry = 0
    for c in range(0, count, CHUNK):
        i = c + tl.arange(0, CHUNK)
        valid = i < count
        hb = tl.load(block_hist + (first + i)[:, None] * 256 + bins[None, :], mask=valid[:, None], other=0)
        ties = tl.sum(tl.where(bins[None, :] == last_digit, hb, 0), axis=1)
        above = tl.load(block_gt + first + i, mask=valid, other=0) + tl.sum(
            tl.where(bins[None, :] > last_digit, hb, 0), axis=1
        )
        ties_before = ties_carry + tl.cumsum(ties, axis=0) - ties
        kept = above + tl.minimum(tl.maximum(ties_wanted - ties_before, 0), ties)
        kept_before = kept_carry + tl.cumsum(kept, axis=0) - kept
        tl.store(blk_out + first + i, base + kept_before.to(tl.int64), mask=valid)
        tl.store(blk_ties_before + first + i, ties_before, mask=valid)
        ties_carry += tl.sum(ties, axis=0)
        kept_carry += tl.sum(kept, axis=0)


@triton.jit
def write_kernel(prev_ptrs, new_ptrs, scores_bits, blk_matrix, blk_start, keep, prefix, remaining, blk_out,
                 blk_ties_before, out_idx, out_val, part_kept_l1, DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """One block: keep score > T and the first ties == T; write (position, value) at the block's offset."""
    b = tl.program_id(0)
    m = tl.load(blk_matrix + b)
    offs = tl.load(blk_start + b).to(tl.int32) + tl.arange(0, BLOCK)
    bits = tl.load(scores_bits + b * BLOCK + tl.arange(0, BLOCK))  # padding lanes: -1, below any threshold
    # k == 0: a threshold above every float's bits (0x7FFFFFFF is a NaN, and no tie may be taken).
    threshold = tl.where(tl.load(keep + m) > 0, tl.load(prefix + m), 0x7FFFFFFF)
    tie = (bits == threshold).to(tl.int32)
    tie_rank = tl.load(blk_ties_before + b) + tl.cumsum(tie, axis=0) - tie  # ties before, in index order
    kept = (bits > threshold) | ((tie == 1) & (tie_rank < tl.load(remaining + m)))
    kept_i = kept.to(tl.int32)
    dst = tl.load(blk_out + b) + (tl.cumsum(kept_i, axis=0) - kept_i).to(tl.int64)
    # Masked loads: only the sectors holding kept elements are fetched (~5% of elements are kept).
    prev = tl.load(tl.load(prev_ptrs + m).to(tl.pointer_type(DTYPE)) + offs, mask=kept, other=0.0).to(tl.float32)
    new = tl.load(tl.load(new_ptrs + m).to(tl.pointer_type(DTYPE)) + offs, mask=kept, other=0.0).to(tl.float32)
    value = new - prev
    tl.store(out_idx + dst, offs.to(tl.int64), mask=kept)
    tl.store(out_val + dst, value, mask=kept)
    tl.store(part_kept_l1 + b, tl.sum(tl.where(kept, tl.abs(value).to(tl.float64), 0.0), axis=0))


@triton.jit
def segment_sum_kernel(blk_first, blk_count, part, out, CHUNK: tl.constexpr):
    """out[m] = sum of the matrix's block partials (float64), in block order (deterministic)."""
    m = tl.program_id(0)
    first = tl.load(blk_first + m)
    count = tl.load(blk_count + m).to(tl.int32)
    acc = tl.zeros([CHUNK], dtype=tl.float64)
    for c in range(0, count, CHUNK):
        i = c + tl.arange(0, CHUNK)
        acc += tl.load(part + first + i, mask=i < count, other=0.0)
    tl.store(out + m, tl.sum(acc, axis=0))
