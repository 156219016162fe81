"""Client sparsify for all LoRA matrices of a model in one grouped Triton pipeline.

Same result as ``sparsify_grouped_torch`` (and so ``client.sparsify_matrix``
with selection "importance"): per matrix, Pearson kurtosis of the eq. 6 scores
-> ratio (eq. 7) -> the k largest scores kept exactly (eq. 8) -> positions in
ascending order, fp32 delta values, one L1 rescale factor.

Every phase is one launch over all matrices (grid over (matrix, block) from an
offsets table; matrices differ in shape), with no host sync until the end:

 1. norms    ``norm_partials_kernel`` + ``norm_finish_kernel``: float64 sums of
             squares of A_prev rows / B_new columns over tiles, summed in order, sqrt.
 2. scores   ``scores_kernel``: delta = new - prev, score = |delta| * norm
             (stored fp32, each block in its own BLOCK-sized slot), per-block float64 sum and central moments M2..M4,
             L1 of the delta, a non-finite count, and the top-byte histogram of
             the score bits (radix pass 0); ``moments_kernel`` merges the
             blocks of a matrix exactly (shifted moments), giving the kurtosis.
 3. ratio    torch over the per-matrix vectors: rho, k, output offsets.
 4. select   radix select of the k-th largest score on its float bits (scores
             are >= 0, so their int32 bits order as the values do): 4 passes of
             8-bit digits (``hist_kernel`` histograms with atomics, then
             ``select_kernel`` per matrix picks the digit); the last pass also
             stores each block's histogram for phase 5.
 5. compact  ``scan_kernel`` per matrix: from the block histograms, each block's
             count of kept elements and of threshold ties before it, scanned into
             output offsets; ``write_kernel``: keep score > T plus the first
             ties in index order, stream-compact (block cumsum) positions and
             values into the flat output, per-block kept L1; ``segment_sum_kernel``
             sums those, and torch divides for the scale.

Inputs are read in place through per-matrix pointer tables (int64 addresses
cast to pointers in the kernels), so no packing copy of the model is made.
Block sizes are not tuned on hardware yet (no GPU was at hand when this was
written; every kernel is checked to lower to an sm_90 cubin); the launch
parameters sit in one place (``triton_utils.launch_config``).

This file is the host side (``SparsifyPipeline``, one method per phase); the
kernels of phases 1-2 are in ``triton_score.py``, those of phases 4-5 in
``triton_select.py``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import torch

from ...errors import ConfigError, NonFiniteError, ShapeMismatchError
from .._backend import triton_interpreted
from ..triton_utils import TL_DTYPES, block_table, launch_config
from .grouped import FactorPair, GroupedSparse, check_pairs, pair_label
from .triton_score import moments_kernel, norm_finish_kernel, norm_partials_kernel, scores_kernel
from .triton_select import hist_kernel, scan_kernel, segment_sum_kernel, select_kernel, write_kernel

__all__ = ["DEFAULT_BLOCK", "SparsifyPipeline", "sparsify_grouped_triton"]

DEFAULT_BLOCK = 4096
_BINS = 256  # 8-bit radix digits
_KIND_A = 0  # dA (r x d_in): score row u uses ||B_new[:, u]||
_KIND_B = 1  # dB (d_out x r): score column v uses ||A_prev[v, :]||
_CHUNK = 64  # blocks (or norm tiles) a per-matrix kernel reads per loop step
_SCAN_CHUNK = 16  # blocks per step of scan_kernel: a 16 x 256 int32 tile of block histograms


# ----------------------------------------------------------------------------- host side
class SparsifyPipeline:
    """The grouped sparsify, one method per phase (for benchmarks and tests; use ``sparsify_grouped_triton``).

    Build it from the pairs (host tables, one upload), then call ``norms``,
    ``scores``, ``ratio``, ``select``, ``compact``, ``result`` in order. Only
    ``result`` waits for the device.
    """

    def __init__(self, pairs: Sequence[Sequence[torch.Tensor]], *, names: Sequence[str] | None = None,
                 block: int = DEFAULT_BLOCK) -> None:
        checked = check_pairs(pairs, names)
        if block < 16 or block & (block - 1):
            raise ConfigError(f"block must be a power of two >= 16, got {block}")
        self.device = checked[0].a_prev.device if checked else torch.device("cpu")
        if checked and self.device.type != "cuda" and not triton_interpreted():
            raise ConfigError("sparsify_grouped_triton on CPU tensors needs TRITON_INTERPRET=1 set before import")
        self.names, self.block = names, block
        dtypes = {t.dtype for fp in checked for t in fp}
        # One element type for the pointer tables: read the tensors in place when they share one, else copy to fp32.
        dtype = next(iter(dtypes)) if len(dtypes) == 1 and next(iter(dtypes)) in TL_DTYPES else torch.float32
        self.tl_dtype = TL_DTYPES[dtype]
        self._inputs = [FactorPair(*(t.to(dtype).contiguous() for t in fp)) for fp in checked]  # kept alive

        # Per matrix: pair i gives dA (kind A, r x d_in) then dB (kind B, d_out x r).
        rows, cols, kinds, prev, new, src = [], [], [], [], [], []
        for i, fp in enumerate(self._inputs):
            (r, d_in), d_out = fp.a_prev.shape, fp.b_prev.shape[0]
            if max(r * d_in, d_out * r) >= 2**31:
                raise ShapeMismatchError(f"pair {pair_label(names, i)}: a matrix has 2**31 elements or more")
            for kind, shape, p, q, s in ((_KIND_A, (r, d_in), fp.a_prev, fp.a_new, fp.b_new),
                                         (_KIND_B, (d_out, r), fp.b_prev, fp.b_new, fp.a_prev)):
                rows.append(shape[0])
                cols.append(shape[1])
                kinds.append(kind)
                prev.append(p)
                new.append(q)
                src.append(s)
        self.shapes = tuple(zip(rows, cols))
        self.num_matrices = len(rows)
        self.numels = [r * c for r, c in self.shapes]
        # Norm vectors have r entries: rows of dA, columns of dB.
        max_r = max([r if k == _KIND_A else c for r, c, k in zip(rows, cols, kinds)] + [1])
        self.r_pad = 1 << (max_r - 1).bit_length()
        self.tile_w = max(1, DEFAULT_BLOCK // self.r_pad)
        numel = np.asarray(self.numels, dtype=np.int64)
        blk_count = -(-numel // block)
        # Norm tiles run along the source's long side: B_new rows (kind A) or A_prev columns (kind B).
        long_side = np.asarray([s.shape[0] if k == _KIND_A else s.shape[1] for s, k in zip(src, kinds)], np.int64)
        tile_count = np.where(numel > 0, -(-long_side // self.tile_w), 0)
        self.num_blocks, self.num_tiles = int(blk_count.sum()), int(tile_count.sum())
        if self.num_blocks * block >= 2**31:  # block-padded scores are addressed with int32 in the kernels
            raise ShapeMismatchError(f"{self.num_blocks * block} block-padded scores: the kernels address < 2**31")
        blk_matrix, blk_start = block_table(blk_count, block)
        tile_matrix, tile_start = block_table(tile_count, self.tile_w)
        tables = {
            "kind": kinds, "numel": numel, "cols": cols,
            "blk_first": np.cumsum(blk_count) - blk_count, "blk_count": blk_count,
            "tile_first": np.cumsum(tile_count) - tile_count, "tile_count": tile_count,
            "src_rows": [s.shape[0] for s in src], "src_cols": [s.shape[1] for s in src],
            "prev_ptr": [t.data_ptr() for t in prev], "new_ptr": [t.data_ptr() for t in new],
            "src_ptr": [t.data_ptr() for t in src],
            "blk_matrix": blk_matrix, "blk_start": blk_start, "tile_matrix": tile_matrix, "tile_start": tile_start,
        }
        arrays = [np.asarray(v, dtype=np.int64).reshape(-1) for v in tables.values()]
        flat = torch.from_numpy(np.concatenate(arrays)).to(self.device)  # the one upload of the host tables
        self.meta = dict(zip(tables, flat.split([a.size for a in arrays])))

    # -- phases ----------------------------------------------------------------------------------
    def _grid_ok(self) -> bool:
        return self.num_blocks > 0

    def norms(self) -> None:
        """Phase 1: norms[m, :r] (float32) of the vectors each matrix's scores multiply by."""
        mt, dev = self.meta, self.device
        self.norm_buf = torch.zeros((max(self.num_matrices, 1), self.r_pad), dtype=torch.float32, device=dev)
        if self.num_tiles:
            partials = torch.empty((self.num_tiles, self.r_pad), dtype=torch.float64, device=dev)
            norm_partials_kernel[(self.num_tiles,)](
                mt["src_ptr"], mt["src_rows"], mt["src_cols"], mt["kind"], mt["tile_matrix"], mt["tile_start"],
                partials, DTYPE=self.tl_dtype, R_PAD=self.r_pad, W=self.tile_w, num_warps=4,
            )
            norm_finish_kernel[(self.num_matrices,)](
                mt["tile_first"], mt["tile_count"], partials, self.norm_buf, R_PAD=self.r_pad, CHUNK=_CHUNK,
            )

    def scores(self) -> None:
        """Phase 2: scores (fp32, flat), per-matrix kurtosis, L1 of the delta, non-finite count, top-byte histogram."""
        mt, dev, nb, nm = self.meta, self.device, self.num_blocks, self.num_matrices
        self.scores_buf = torch.empty(nb * self.block, dtype=torch.float32, device=dev)  # block b: [b*BLOCK, ...)
        self.hist = torch.zeros((4, max(nm, 1), _BINS), dtype=torch.int32, device=dev)
        self.kurt = torch.ones(nm, dtype=torch.float64, device=dev)
        self.l1 = torch.zeros(nm, dtype=torch.float64, device=dev)
        self.bad = torch.zeros(nm, dtype=torch.int32, device=dev)
        if not self._grid_ok():
            return
        part = torch.empty((5, nb), dtype=torch.float64, device=dev)
        part_bad = torch.empty(nb, dtype=torch.int32, device=dev)
        scores_kernel[(nb,)](
            mt["prev_ptr"], mt["new_ptr"], mt["kind"], mt["numel"], mt["cols"], mt["blk_matrix"], mt["blk_start"],
            self.norm_buf, self.scores_buf.view(torch.int32), part[0], part[1], part[2], part[3], part[4], part_bad,
            self.hist[0], DTYPE=self.tl_dtype, R_PAD=self.r_pad, BLOCK=self.block, **launch_config(self.block),
        )
        moments_kernel[(nm,)](
            mt["numel"], mt["blk_first"], mt["blk_count"], mt["blk_start"], part[0], part[1], part[2], part[3],
            part[4], part_bad, self.kurt, self.l1, self.bad, BLOCK=self.block, CHUNK=_CHUNK,
        )

    def matrix_scores(self, j: int) -> torch.Tensor:
        """Matrix j's float32 scores, in its shape (after ``scores``; a view of the block-padded buffer)."""
        first = sum(-(-n // self.block) for n in self.numels[:j])
        return self.scores_buf[first * self.block : first * self.block + self.numels[j]].view(self.shapes[j])

    def ratio(self, base: float, coeff: float, upper: float) -> None:
        """Phase 3 (torch, per-matrix vectors): rho = base + min(upper, coeff ln max(kappa, 1)), k, offsets."""
        n = self.meta["numel"]
        rho = base + torch.clamp(coeff * torch.log(torch.clamp(self.kurt, min=1.0)), max=upper)
        k = n - torch.ceil(rho * (n - 1).to(torch.float64)).to(torch.int64)
        live = (self.l1 > 0) & (self.bad == 0) & (n > 0)
        # k <= kmax = k at rho = base. The host sizes the output from the same IEEE float64 formula, so the
        # clamp (a no-op) makes the buffer bound hold by construction, without a host sync.
        kmax = n - torch.ceil(base * (n - 1).to(torch.float64)).to(torch.int64)
        self.capacity = sum(n - math.ceil(base * (n - 1)) if n else 0 for n in self.numels)
        self.keep = torch.where(live, torch.minimum(torch.clamp(k, min=0), kmax), 0)
        self.out_off = torch.cumsum(self.keep, 0) - self.keep

    def select(self) -> None:
        """Phase 4: prefix[m] = bits of the k-th largest score, remaining[m] = ties at it to keep."""
        mt, dev, nb, nm = self.meta, self.device, self.num_blocks, self.num_matrices
        self.prefix = torch.zeros(max(nm, 1), dtype=torch.int32, device=dev)
        self.remaining = self.keep.to(torch.int32)
        self.block_hist = torch.empty((max(nb, 1), _BINS), dtype=torch.int32, device=dev)
        self.block_gt = torch.empty(max(nb, 1), dtype=torch.int32, device=dev)
        if not self._grid_ok():
            return
        scores_bits = self.scores_buf.view(torch.int32)
        select_kernel[(nm,)](self.hist[0], self.prefix, self.remaining, SHIFT=24)
        for p, shift in ((1, 16), (2, 8), (3, 0)):
            hist_kernel[(nb,)](
                scores_bits, mt["blk_matrix"], self.keep, self.prefix, self.hist[p], self.block_hist, self.block_gt,
                SHIFT=shift, STORE_BLOCKS=p == 3, BLOCK=self.block, **launch_config(self.block),
            )
            select_kernel[(nm,)](self.hist[p], self.prefix, self.remaining, SHIFT=shift)

    def compact(self, rescale: bool) -> None:
        """Phase 5: kept positions and values into the flat output, kept L1, scale."""
        mt, dev, nb, nm = self.meta, self.device, self.num_blocks, self.num_matrices
        self.out_idx = torch.empty(self.capacity, dtype=torch.int64, device=dev)
        self.out_val = torch.empty(self.capacity, dtype=torch.float32, device=dev)
        self.kept_l1 = torch.zeros(nm, dtype=torch.float64, device=dev)
        if self._grid_ok():
            blk_out = torch.empty(nb, dtype=torch.int64, device=dev)
            blk_ties = torch.empty(nb, dtype=torch.int32, device=dev)
            part = torch.empty(nb, dtype=torch.float64, device=dev)
            scan_kernel[(nm,)](
                mt["blk_first"], mt["blk_count"], self.prefix, self.remaining, self.out_off, self.block_hist,
                self.block_gt, blk_out, blk_ties, CHUNK=_SCAN_CHUNK,
            )
            write_kernel[(nb,)](
                mt["prev_ptr"], mt["new_ptr"], self.scores_buf.view(torch.int32), mt["blk_matrix"], mt["blk_start"],
                self.keep, self.prefix, self.remaining, blk_out, blk_ties,
                self.out_idx, self.out_val, part, DTYPE=self.tl_dtype, BLOCK=self.block, **launch_config(self.block),
            )
            segment_sum_kernel[(nm,)](mt["blk_first"], mt["blk_count"], part, self.kept_l1, CHUNK=_CHUNK)
        scale = self.l1 / torch.where(self.kept_l1 > 0, self.kept_l1, 1.0) if rescale else torch.ones_like(self.l1)
        self.scale = scale.to(torch.float32)

    def result(self) -> GroupedSparse:
        """The one host sync: keep counts, scales, flags -> GroupedSparse (views of the flat buffers)."""
        nm = self.num_matrices
        summary = torch.stack([
            self.keep.to(torch.float64), self.scale.to(torch.float64), (self.kept_l1 > 0).to(torch.float64),
            self.bad.to(torch.float64), self.kurt,
        ]).cpu() if nm else torch.zeros((5, 0), dtype=torch.float64)
        keep, scale, live, bad, kurt = (summary[j].tolist() for j in range(5))
        for j in range(nm):
            if bad[j]:
                pair, factor = divmod(j, 2)
                raise NonFiniteError(
                    f"pair {pair_label(self.names, pair)}: d{'AB'[factor]} or the factors it is scored with "
                    f"hold NaN/Inf ({int(bad[j])} non-finite scores)"
                )
        counts = [int(c) for c in keep]
        offsets = _exclusive_cumsum(counts) + [sum(counts)]
        total = offsets[-1]
        return GroupedSparse(
            shapes=self.shapes,
            indices=self.out_idx[:total],
            values=self.out_val[:total],
            offsets=tuple(offsets),
            scales=tuple(s if c > 0 and ok else None for s, c, ok in zip(scale, counts, live)),
            kurtosis=tuple(kurt),
        )


def _exclusive_cumsum(values: list[int]) -> list[int]:
    out, acc = [], 0
    for v in values:
        out.append(acc)
        acc += v
    return out


def sparsify_grouped_triton(
    pairs: Sequence[Sequence[torch.Tensor]],
    *,
    base: float = 0.85,
    coeff: float = 0.1,
    upper: float = 0.11,
    rescale: bool = True,
    names: Sequence[str] | None = None,
    block: int = DEFAULT_BLOCK,
) -> GroupedSparse:
    """Sparsify every matrix of ``pairs`` = [(A_prev, B_prev, A_new, B_new), ...] with Triton.

    One launch per phase for the whole model and one host sync at the end.
    Raises NonFiniteError (naming the pair) when a score is NaN or Inf.
    """
    pipe = SparsifyPipeline(pairs, names=names, block=block)
    context = torch.cuda.device(pipe.device) if pipe.device.type == "cuda" else nullcontext()
    with context:
        pipe.norms()
        pipe.scores()
        pipe.ratio(base, coeff, upper)
        pipe.select()
        pipe.compact(rescale)
        return pipe.result()
