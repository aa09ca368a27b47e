"""Launcher of the CUDA (Hopper wgmma) main kernel of KV-block-major sparse prefill.

The kernel (sparse_prefill_main.cu) computes exactly what _block_major_kernel in
sparse_prefill_triton.py computes, for the shapes M3 serves: bf16, head_dim 128, block = page =
128 tokens, 64-row tiles (64 / GP queries × GP heads, GP = next power of two of the GQA group,
≤ 64), ITEM_Q a multiple of the queries per tile. It is compiled with NVRTC at first use
(cuda_rtc.py) for sm_90a; other cards, shapes or devices raise ValueError naming the
constraint (SparsePrefillWrapper(main_kernel="cuda") does not fall back to Triton).

With ``fused`` (FusedCombine) the same grid also merges the partials (the combine of
sparse_prefill_triton._combine_kernel, in units of ~128 (query, head) rows of one KV head): a CTA
that finished its item takes combine units of KV heads whose items have all finished, so the
memory-bound merge overlaps the main work; launch_combine_cuda() then merges what is left (the
last KV head's units). ``sync`` [2 · H_kv] int32 (a ticket per KV head, then its finished
main items) must be zero before the main kernel.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from . import cuda_rtc

SOURCE = Path(__file__).with_name("sparse_prefill_main.cu")
HEAD_DIM, BLOCK, BLOCK_M = 128, 128, 64
THREADS = 128
MAX_FUSED_TOPK = 16  # the fused combine holds every slot of a row in registers
COMBINE_ROWS = 128  # (query, head) rows per combine unit


class _CombineArgs(ctypes.Structure):
    """CombineArgs of sparse_prefill_main.cu, passed by value (same field order and types)."""

    _fields_ = [
        ("topk_ids", ctypes.c_void_p),
        ("q_pos", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("lse_out", ctypes.c_void_p),
        ("stride_tg", ctypes.c_int64),
        ("stride_tt", ctypes.c_int64),
        ("stride_ot", ctypes.c_int64),
        ("stride_oh", ctypes.c_int64),
        ("T", ctypes.c_int32),
        ("uq", ctypes.c_int32),
        ("n_qunits", ctypes.c_int32),
        ("num_q_heads", ctypes.c_int32),
        ("main_units", ctypes.c_int32),
        ("trace", ctypes.c_void_p),
    ]


@dataclass
class FusedCombine:
    """What the fused combine needs besides the main kernel's arguments."""

    sync: torch.Tensor  # [2 * H_kv] int32 (tickets, finished items), zero before the main kernel
    topk_ids: torch.Tensor  # [H_kv, T, k] int32
    out: torch.Tensor  # [T, Hq, D] bf16, last dim contiguous
    lse_out: torch.Tensor | None  # [T, Hq] float32 natural-log LSE, or None
    main_units: int = 1  # combine units a main-grid CTA may take after its item
    trace: torch.Tensor | None = None  # diagnostics only (kernel built with -DM3_TRACE)

    def units(self, group: int) -> tuple[int, int]:
        """(queries per unit, units per KV head)."""
        uq = max(1, COMBINE_ROWS // group)
        return uq, -(-self.out.shape[0] // uq)

    def args(self, q_pos: torch.Tensor, group: int) -> _CombineArgs:
        t, hq, _ = self.out.shape
        ids, out = self.topk_ids, self.out
        if ids.shape[-1] > MAX_FUSED_TOPK:
            raise ValueError(f"the fused combine needs k ≤ {MAX_FUSED_TOPK}, got {ids.shape[-1]}")
        if out.dtype != torch.bfloat16 or out.stride(-1) != 1 or out.stride(1) % 8:
            raise ValueError("fused combine: out must be bf16 with 16-byte aligned rows")
        if self.lse_out is not None and not (
            self.lse_out.shape == (t, hq) and self.lse_out.is_contiguous()
        ):
            raise ValueError("lse_out must be a contiguous [T, Hq] float32")
        if self.sync.numel() != 2 * ids.shape[0] or self.sync.dtype != torch.int32:
            raise ValueError("sync must be int32 [2 * H_kv]")
        uq, n = self.units(group)
        lse = self.lse_out.data_ptr() if self.lse_out is not None else None
        return _CombineArgs(ids.data_ptr(), q_pos.data_ptr(), out.data_ptr(), lse,
                            ids.stride(0), ids.stride(1), out.stride(0), out.stride(1),
                            t, uq, n, hq, self.main_units,
                            self.trace.data_ptr() if self.trace is not None else None)  # fmt: skip


def smem_bytes(item_q: int) -> int:
    """K + V tiles, three query-row tiles, the item's entry and position arrays."""
    return 2 * BLOCK * HEAD_DIM * 2 + 3 * BLOCK_M * HEAD_DIM * 2 + 2 * item_q * 4


def check_supported(q: torch.Tensor, k_cache: torch.Tensor, group: int, block_m: int,
                    item_q: int) -> int:  # fmt: skip
    """GP for this call, or ValueError saying which constraint fails."""
    d, block = q.shape[-1], k_cache.shape[2]
    if q.dtype != torch.bfloat16 or k_cache.dtype != torch.bfloat16:
        raise ValueError(f"CUDA sparse prefill needs bf16 q and caches, got {q.dtype}")
    if d != HEAD_DIM or block != BLOCK:
        raise ValueError(
            f"CUDA sparse prefill needs head_dim {HEAD_DIM} and block {BLOCK}, got {d} / {block}"
        )
    gp = 1 << (group - 1).bit_length()
    if block_m != BLOCK_M or gp > BLOCK_M:
        raise ValueError(
            f"CUDA sparse prefill needs BLOCK_M {BLOCK_M} and a GQA group ≤ {BLOCK_M} "
            f"(got BLOCK_M {block_m}, group {group})"
        )
    qpt = BLOCK_M // gp
    if item_q % qpt or item_q > 256:
        raise ValueError(
            f"CUDA sparse prefill needs ITEM_Q ≤ 256, a multiple of {qpt} queries per tile "
            f"(got {item_q})"
        )
    if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] != 9:
        raise ValueError("CUDA sparse prefill's kernel uses wgmma: Hopper (sm_90) only")
    return gp


@lru_cache(maxsize=1)
def source() -> str:
    return SOURCE.read_text()


def kernel_name(gp: int, item_q: int, fused: bool = False) -> str:
    return f"msa_prefill_main<{gp}, {item_q}, {'true' if fused else 'false'}>"


COMBINE_KERNEL = "msa_prefill_combine"


def launch_block_major_cuda(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    entries: torch.Tensor,
    row_ptr: torch.Tensor,
    item_ptr: torch.Tensor,
    work_row: torch.Tensor,
    work_start: torch.Tensor,
    q_pos: torch.Tensor,
    gb_page: torch.Tensor,
    gb_start: torch.Tensor,
    gb_len: torch.Tensor,
    num_blocks: int,
    topk: int,
    sm_scale: float,
    block_m: int,
    item_q: int,
    fused: FusedCombine | None = None,
) -> None:
    """Main kernel, CUDA form: the arguments of sparse_prefill_triton.launch_block_major, plus
    the fused combine's (then launch_combine_cuda must follow)."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    group = hq // hkv
    gp = check_supported(q, k_cache, group, block_m, item_q)
    if topk > 32:
        raise ValueError(f"CUDA sparse prefill keeps a slot in 5 bits: k ≤ 32, got {topk}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache), ("q", q)):
        if c.stride(-1) != 1 or c.data_ptr() % 16 or any(s % 8 for s in c.stride()[:-1]):
            raise ValueError(f"{name}: rows must be 16-byte aligned and contiguous in head_dim")
    if o_part.dtype != torch.bfloat16 or o_part.stride(-1) != 1 or o_part.stride(1) % 2:
        raise ValueError("o_part must be bf16, contiguous in head_dim")
    grid = work_row.numel()
    if grid == 0:
        return
    tensors = (q, k_cache, v_cache, o_part, lse_part, entries, row_ptr, item_ptr, work_row,
               work_start, q_pos, gb_page, gb_start, gb_len)  # fmt: skip
    if fused is not None:
        tensors += (fused.sync, fused.topk_ids, fused.out) + (
            (fused.lse_out,) if fused.lse_out is not None else ()
        )
    if not all(t.is_cuda and t.device == q.device for t in tensors):
        raise ValueError("CUDA sparse prefill needs every tensor on one CUDA device (q's)")
    smem = smem_bytes(item_q)
    args = [
        q, k_cache, v_cache, o_part, lse_part, entries, row_ptr, item_ptr, work_row, work_start,
        q_pos, gb_page, gb_start, gb_len, num_blocks, hkv * num_blocks, group, topk,
        sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), o_part.stride(0), o_part.stride(1), lse_part.stride(0),
        fused.sync if fused else None, fused.args(q_pos, group) if fused else _CombineArgs(),
    ]  # fmt: skip
    with torch.cuda.device(q.device):  # module, arch and stream of q's device
        k = cuda_rtc.get_kernel(
            source(), kernel_name(gp, item_q, fused is not None), cuda_rtc.device_arch(), smem
        )
        k.launch(grid, THREADS, smem, args, "p" * 14 + "iiiif" + "l" * 11 + "ps")


def launch_combine_cuda(
    o_part: torch.Tensor, lse_part: torch.Tensor, q_pos: torch.Tensor, fused: FusedCombine
) -> None:
    """Merge the combine units the fused main kernel left open (all of them if sync was zero and
    the main kernel ran unfused): CTAs take each KV head's units by its ticket in fused.sync."""
    hkv = fused.topk_ids.shape[0]
    group = fused.out.shape[1] // hkv
    comb = fused.args(q_pos, group)
    total = hkv * comb.n_qunits
    if total == 0:
        return
    with torch.cuda.device(o_part.device):
        k = cuda_rtc.get_kernel(source(), COMBINE_KERNEL, cuda_rtc.device_arch(), 0)
        grid = min(total, 4 * torch.cuda.get_device_properties(o_part.device).multi_processor_count)
        args = [o_part, lse_part, fused.sync, comb, hkv, group, fused.topk_ids.shape[-1],
                o_part.stride(0), o_part.stride(1), lse_part.stride(0)]  # fmt: skip
        k.launch(grid, THREADS, 0, args, "ppps" + "iii" + "lll")


POLL_KERNEL = "msa_prefill_combine_poll"


def launch_combine_poll(
    o_part: torch.Tensor,
    lse_part: torch.Tensor,
    q_pos: torch.Tensor,
    item_ptr: torch.Tensor,
    num_blocks: int,
    fused: FusedCombine,
    deadline_ms: float = 50.0,
) -> None:
    """The combine beside the main kernel (launch it on a second stream right after the main
    kernel, with fused.main_units 0 or more): one CTA of two warps per SM, in the room two main
    CTAs leave; its warps merge the units of finished KV heads while the main grid runs and stop
    when the main grid is done (or after deadline_ms). launch_combine_cuda, ordered after both,
    merges the rest."""
    hkv = fused.topk_ids.shape[0]
    group = fused.out.shape[1] // hkv
    comb = fused.args(q_pos, group)
    if hkv * comb.n_qunits == 0:
        return
    with torch.cuda.device(o_part.device):
        k = cuda_rtc.get_kernel(source(), POLL_KERNEL, cuda_rtc.device_arch(), 0)
        grid = torch.cuda.get_device_properties(o_part.device).multi_processor_count
        args = [o_part, lse_part, fused.sync, comb, item_ptr, num_blocks, hkv, group,
                fused.topk_ids.shape[-1], o_part.stride(0), o_part.stride(1), lse_part.stride(0),
                int(deadline_ms * 1e6)]  # fmt: skip
        k.launch(grid, 64, 0, args, "ppps" + "p" + "iiii" + "llll")
