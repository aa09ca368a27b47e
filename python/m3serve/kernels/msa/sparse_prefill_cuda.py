"""Launcher of the CUDA (Hopper wgmma) main kernel of KV-block-major sparse prefill.

The kernel (sparse_prefill_main.cu) computes exactly what _block_major_kernel in
sparse_prefill_triton.py computes, for the shapes M3 serves: bf16, head_dim 128, block = page =
128 tokens, 64-row tiles (64 / GP queries × GP heads, GP = next power of two of the GQA group,
≤ 64), ITEM_Q a multiple of the queries per tile. It is compiled with NVRTC at first use
(cuda_rtc.py) for sm_90a; other cards, shapes or devices raise ValueError naming the
constraint (SparsePrefillWrapper(main_kernel="cuda") does not fall back to Triton; the default
"auto" does).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from . import cuda_rtc

SOURCE = Path(__file__).with_name("sparse_prefill_main.cu")
HEAD_DIM, BLOCK, BLOCK_M = 128, 128, 64
THREADS = 128


def smem_bytes(item_q: int) -> int:
    """K + V tiles, three query-row tiles, the item's entry / query / position arrays."""
    return 2 * BLOCK * HEAD_DIM * 2 + 3 * BLOCK_M * HEAD_DIM * 2 + 3 * item_q * 4


def cuda_tile_ok(block_m: int, gp: int, item_q: int) -> bool:
    """The tile the CUDA kernel runs well: 64-row tiles, ITEM_Q a multiple of the queries per
    tile and small enough that two CTAs share an SM (ITEM_Q ≤ 64; at 128 one CTA: 3.46 ms vs
    2.44, session 14)."""
    return (
        block_m == BLOCK_M and gp <= BLOCK_M and item_q % (BLOCK_M // gp) == 0
        and 2 * (smem_bytes(item_q) + 1024) <= 228 * 1024
    )  # fmt: skip


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
    if q.is_cuda and not cuda_rtc.device_arch(q.device.index).startswith("sm_9"):
        raise ValueError("CUDA sparse prefill's kernel uses wgmma: Hopper (sm_90) only")
    return gp


@lru_cache(maxsize=1)
def source() -> str:
    return SOURCE.read_text()


def kernel_name(gp: int, item_q: int) -> str:
    return f"msa_prefill_main<{gp}, {item_q}>"


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
) -> None:
    """Main kernel, CUDA form: the arguments of sparse_prefill_triton.launch_block_major."""
    hq, hkv = q.shape[1], k_cache.shape[1]
    group = hq // hkv
    gp = check_supported(q, k_cache, group, block_m, item_q)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache), ("q", q)):
        if c.stride(-1) != 1 or c.data_ptr() % 16 or any(s % 8 for s in c.stride()[:-1]):
            raise ValueError(f"{name}: rows must be 16-byte aligned and contiguous in head_dim")
    if o_part.dtype != torch.bfloat16 or o_part.stride(-1) != 1 or o_part.stride(1) % 2:
        raise ValueError("o_part must be bf16, contiguous in head_dim")
    if lse_part.dim() != 3 or lse_part.shape[-1] != 2 or lse_part.stride(-1) != 1 or (
        lse_part.data_ptr() % 8 or lse_part.stride(0) % 2 or lse_part.stride(1) % 2
    ):
        raise ValueError("lse_part must be float32 [T*k, Hq, 2] with 8-byte aligned (lse, m) pairs")
    grid = work_row.numel()
    if grid == 0:
        return
    tensors = (q, k_cache, v_cache, o_part, lse_part, entries, row_ptr, item_ptr, work_row,
               work_start, q_pos, gb_page, gb_start, gb_len)  # fmt: skip
    if not all(t.is_cuda and t.device == q.device for t in tensors):
        raise ValueError("CUDA sparse prefill needs every tensor on one CUDA device (q's)")
    smem = smem_bytes(item_q)
    args = [
        q, k_cache, v_cache, o_part, lse_part, entries, row_ptr, item_ptr, work_row, work_start,
        q_pos, gb_page, gb_start, gb_len, num_blocks, hkv * num_blocks, group, topk,
        sm_scale * 1.4426950408889634, q.stride(0), q.stride(1), k_cache.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(0), v_cache.stride(1),
        v_cache.stride(2), o_part.stride(0), o_part.stride(1), lse_part.stride(0),
        lse_part.stride(1),
    ]  # fmt: skip
    dev = q.device.index
    if dev == torch.cuda.current_device():  # the usual case: no device switch per launch
        k = cuda_rtc.get_kernel(source(), kernel_name(gp, item_q), cuda_rtc.device_arch(dev), smem)
        k.launch(grid, THREADS, smem, args, _TYPES)
        return
    with torch.cuda.device(q.device):  # module, arch and stream of q's device
        k = cuda_rtc.get_kernel(source(), kernel_name(gp, item_q), cuda_rtc.device_arch(dev), smem)
        k.launch(grid, THREADS, smem, args, _TYPES)


_TYPES = "p" * 14 + "iiiif" + "l" * 12
