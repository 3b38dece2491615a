"""The cpp backend of the contrastive family: the torch entry's arithmetic in C++
(csrc/contrastive_cpu.cpp) through fastssl._C."""
from __future__ import annotations

from fastssl import _C
from fastssl.backends.torch.contrastive import TorchContrastive, check_cross


class CppContrastive(TorchContrastive):
    """The torch entry's arithmetic in C++ (csrc/contrastive_cpu.cpp): the row blocks spread
    over the threads in one parallel region per call instead of a Python loop of parallel ATen
    calls (whose barriers stall when other processes share the cores). SCE's recompute pair
    (sce_forward / sce_backward, used only without a gradient) stays the torch entry's."""

    @staticmethod
    def lse_forward(a, b, self_col, pos_col, scale, split, exclude_pos, weighted, col_stats):
        return tuple(_C.contrastive_lse_forward_cpu(a, b, self_col, pos_col, float(scale),
                                                    int(split), bool(exclude_pos),
                                                    bool(weighted), bool(col_stats)))

    @staticmethod
    def lse_backward(a, b, self_col, pos_col, scale, split, exclude_pos, lse0, lse1, col_lse,
                     g0, g1, g_col, need_da=True, need_db=True):
        da, db = _C.contrastive_lse_backward_cpu(a, b, self_col, pos_col, float(scale),
                                                 int(split), bool(exclude_pos), lse0, lse1,
                                                 col_lse, g0, g1, g_col, bool(need_da),
                                                 bool(need_db))
        return (da.to(a.dtype) if need_da else None), (db.to(b.dtype) if need_db else None)

    @staticmethod
    def lse_sum_forward(a, b, self_col, pos_col, scale, exclude_pos, subtract_pos, need_da,
                        need_db):
        out = tuple(_C.contrastive_lse_sum_cpu(a, b, self_col, pos_col, float(scale),
                                               bool(exclude_pos), bool(subtract_pos),
                                               bool(need_da), bool(need_db)))
        # an extension built before the per-row cross-entropy output: lse - pos instead
        return out if len(out) == 5 else out + (out[0].new_empty(0),)

    @staticmethod
    def gram_lse_forward(z, self_col, pos_col, scale, exclude_pos, weighted, cross=0):
        return tuple(_C.contrastive_gram_lse_forward_cpu(
            z, self_col, pos_col, float(scale), bool(exclude_pos), bool(weighted),
            check_cross(cross, z.shape[0])))

    @staticmethod
    def gram_lse_backward(z, self_col, pos_col, scale, exclude_pos, lse, g, cross=0):
        return _C.contrastive_gram_lse_backward_cpu(
            z, self_col, pos_col, float(scale), bool(exclude_pos), lse, g,
            check_cross(cross, z.shape[0])).to(z.dtype)

    @staticmethod
    def sce_grad_forward(q, k, cols, self_col, scale_s, scale_t):
        return tuple(_C.sce_grad_cpu(q, k, cols, self_col, float(scale_s), float(scale_t)))


def block_config() -> dict:
    """The block sizes of the C++ contrastive kernels (the bench records them).

    gram_tile: the edge T of the symmetric schedule's square tiles (gram_lse_forward /
    backward): a T x T float32 tile of E plus the two T x D panels of Z sit in a core's L2
    (512 KiB per core on the development machine). row_block_elements: the row-block path's
    logits per block (rows = this / columns; the measured choice is in csrc/contrastive_cpu.cpp).

    Measured (bench.contrastive_profile --n 2048 --d 128 --threads 1 --reps 5 --blocks ...,
    taskset -c 1, candidates interleaved in one process, median; the machine under a load of
    about 7 from other processes, so the absolute figures are low; its roofline sgemm gave
    17.1 GFLOP/s in that run), forward+backward of 2N = 4096, D = 128, in ms (counted GFLOP/s):

        T = 128: 766 (11.2)   T = 192: 586 (14.7)   T = 256: 479 (17.9)
        T = 320: 474 (18.1)   T = 384: 569 (15.1)   T = 512: 652 (13.2)

    Again at 2N = 8192 (--n 4096, load 0.6-0.8, roofline sgemm 61.5 GFLOP/s in the run):
    T = 192: 656 ms, T = 256: 648 ms, T = 320: 608 ms (52.4, 53.0, 56.6 GFLOP/s counted).
    256 and 320 are within the run-to-run noise (the same 256 call measured 771 ms in another
    row of that run); 256 keeps the forward's tile and both panels in L2. To be settled on a
    quiet machine (the C++ default g_gram_block, csrc/contrastive_cpu.cpp).

    sce_rows, sce_tile: the column-tiled SCE kernel (sce_grad_forward) takes blocks of at most
    sce_rows rows (fewer when the batch is small, so every thread gets blocks) through the
    columns in tiles of sce_tile; the measurement is beside kSceRows / kSceTile in
    csrc/contrastive_cpu.cpp (constants there: keep the two in step).
    """
    return {"gram_tile": int(_C.contrastive_gram_block()), "row_block_elements": 1 << 21,
            "sce_rows": 256, "sce_tile": 512}
