"""MSA sparse prefill on Hopper: KV-block-major (ours) vs query-major (ours) vs SGLang 0.5.23 vs dense.

Shapes: the last 8K-query chunk of one long prompt (prefix = context − 8192) at 16K / 32K / 128K
context (and 1M for the full-prefill comparison), head_dim 128, bf16, block = page = 128,
top-k 16; heads 64 q / 4 KV (M3 at TP=1) and 16 / 1 (TP=4 split). Random inputs (never zeros),
pages shuffled over the pool. Selections: our Triton select_blocks_prefill (index_select.py) on
random index q/k (4 index heads × 128), the same topk_ids for every main-branch contender.

Timed in one process on one card on identical inputs (triton.testing.do_bench, median; it
clears L2 before every repetition):
- ours block-major: SparsePrefillWrapper.run (inverse index + main + combine; plan() is per step
  and timed apart);
- ours query-major: SparsePrefillWrapper(variant="query_major").run;
- sglang main: flash_prefill_with_gqa_share_sparse (block_size_q 1, as its CUDA backend calls it)
  on the same K/V in its token-major layout (slot = page·128 + offset, req_to_token), same ids;
- sglang full: minimax_sparse_prefill (its index scoring + top-k + sparse attention), init_blocks
  0, local_blocks 1, page_size 1, no index value, no sink — vs ours full: select_blocks_prefill
  + run;
- dense: causal GQA attention of the chunk over the whole context with torch SDPA's fused
  kernels (cuDNN, else flash), as two calls merged by their LSE: chunk × prefix (no mask) and
  chunk × chunk (causal); K/V expanded to the query heads beforehand (untimed).

FLOPs (useful, per the issue): sparse = 4 · D · Σ_heads Σ_queries |selected ∩ causal|
  = 4 · D · group · Σ_(g, t) Σ_slots |block ∩ {j ≤ pos_t}|;  dense = 4 · D · H_q · Σ_t (pos_t + 1).
  Index scoring (full prefill only) = 2 · d_index · G · Σ_t (pos_t + 1).
roofline_fraction of a main-branch case = our TFLOP/s ÷ the dense kernel's TFLOP/s on that card.

1M whole-prompt estimate: a 1M prompt is 128 chunks of 8K at contexts 8K, 16K, …, 1M. Every
per-chunk time (ours full, dense) is fitted as a + b · context over the measured chunks (least
squares) and summed over the 128 chunks; the same for 128K (16 chunks). Stated as estimates.

Writes benchmarks/results/sparse_prefill.{json,md} (+ .png with matplotlib; --plot-only redraws).
Usage: PYTHONPATH=python:<sglang site> python benchmarks/bench_sparse_prefill.py
       [--contexts 16384,32768,131072] [--full-contexts 32768,131072,1048576] [--sweep] [--check]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

D, BLOCK, TOPK, DIDX, CHUNK = 128, 128, 16, 128, 8192
RESULTS = Path(__file__).parent / "results"
HEADS = [(64, 4), (16, 1)]
DEV = "cuda"  # a CPU dry run of the plumbing sets "cpu" (with TRITON_INTERPRET=1)
SWEEP_CTX = 131072


def bench(fn, rep: int = 100) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


# ----------------------------------------------------------------------------- inputs
def make_inputs(ctx: int, chunk: int, hq: int, hkv: int, seed: int = 0) -> dict[str, Any]:
    """One request: prefix ctx − chunk, chunk queries; shuffled pages; random q/K/V/index."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    nblk = math.ceil(ctx / BLOCK)
    num_pages = nblk + 8
    dev = DEV
    perm = torch.randperm(num_pages, device=dev, generator=g)[:nblk].to(torch.int32)
    page_table = perm[None, :].contiguous()

    def rnd(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=g)

    x = dict(
        ctx=ctx,
        chunk=chunk,
        hq=hq,
        hkv=hkv,
        q=rnd(chunk, hq, D),
        k=rnd(num_pages, hkv, BLOCK, D),
        v=rnd(num_pages, hkv, BLOCK, D),
        idx_q=rnd(chunk, hkv, DIDX),
        idx_k=rnd(num_pages, BLOCK, DIDX),
        page_table=page_table,
        cu_q=torch.tensor([0, chunk], dtype=torch.int32, device=dev),
        prefix=torch.tensor([ctx - chunk], dtype=torch.int32, device=dev),
        seq=torch.tensor([ctx], dtype=torch.int32, device=dev),
    )
    return x


def select(x: dict[str, Any], out: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor:
    """Our selection; ``fp8``: e4m3 index keys (per-token scale) and e4m3 queries (q_fp8)."""
    from m3serve.kernels.msa.index_select import select_blocks_prefill

    keys, scale = (x["idx_k8"], x["idx_s8"]) if fp8 else (x["idx_k"], None)
    return select_blocks_prefill(
        x["idx_q"], keys, scale, x["page_table"], x["cu_q"], x["prefix"], x["seq"], TOPK,
        max_q_len=x["chunk"], max_seq_len=x["ctx"], out=out, q_fp8=fp8,
    )  # fmt: skip


def add_fp8_index(x: dict[str, Any]) -> None:
    """An FP8 e4m3 + per-token-scale copy of the index-K cache, written by our store kernel."""
    from m3serve.kernels.msa.index_cache import store_index_k

    pages = x["idx_k"].shape[0]
    x["idx_k8"] = torch.empty(pages, BLOCK, DIDX, dtype=torch.float8_e4m3fn, device=DEV)
    x["idx_s8"] = torch.empty(pages, BLOCK, dtype=torch.float32, device=DEV)
    slots = torch.arange(pages * BLOCK, device=DEV)
    store_index_k(x["idx_k8"], x["idx_s8"], x["idx_k"].view(-1, DIDX), slots)


def flops(x: dict[str, Any], ids: torch.Tensor) -> tuple[float, float, float]:
    """(sparse useful, dense causal, index scoring) FLOPs of the chunk."""
    pos = x["ctx"] - x["chunk"] + torch.arange(x["chunk"], device=DEV, dtype=torch.int64)
    idl = ids.long()
    keys = (pos[None, :, None] - idl * BLOCK + 1).clamp(0, BLOCK)
    keys = torch.where((idl >= 0) & (idl <= (pos // BLOCK)[None, :, None]), keys, 0)
    group = x["hq"] // x["hkv"]
    sparse = 4.0 * D * group * float(keys.sum())
    visible = float((pos + 1).sum())
    return sparse, 4.0 * D * x["hq"] * visible, 2.0 * DIDX * x["hkv"] * visible


def sglang_layout(x: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Token-major copies (slot = page·128 + offset) and req_to_token for SGLang's kernels."""
    k_nhd = x["k"].transpose(1, 2).reshape(-1, x["hkv"], D).contiguous()
    v_nhd = x["v"].transpose(1, 2).reshape(-1, x["hkv"], D).contiguous()
    idx_k_nhd = x["idx_k"].reshape(-1, 1, DIDX).contiguous()
    off = torch.arange(BLOCK, device=DEV, dtype=torch.int32)
    r2t = (x["page_table"][:, :, None] * BLOCK + off).reshape(1, -1)[:, : x["ctx"]].contiguous()
    return dict(k=k_nhd, v=v_nhd, idx_k=idx_k_nhd, r2t=r2t,
                slot_ids=torch.zeros(1, dtype=torch.int32, device=DEV))  # fmt: skip


def load_sglang():
    try:
        from sglang.kernels.ops.attention.minimax_sparse.prefill.topk_sparse import (
            flash_prefill_with_gqa_share_sparse,
        )
        from sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse import (
            minimax_sparse_prefill,
        )
    except Exception as err:  # the baseline is optional: say why it is missing
        print(f"[sglang baseline unavailable: {type(err).__name__}: {err}]")
        return None
    return flash_prefill_with_gqa_share_sparse, minimax_sparse_prefill


def sglang_main(fns, x, s, ids):
    return fns[0](
        x["q"], s["k"], s["v"], None, s["r2t"], s["slot_ids"], ids, 1, BLOCK, x["cu_q"],
        x["seq"], x["prefix"], x["chunk"], sm_scale=1 / math.sqrt(D),
    )  # fmt: skip


def sglang_full(fns, x, s):
    _, o = fns[1](
        x["q"], s["k"], s["v"], None, x["idx_q"], s["idx_k"], None, None, s["r2t"],
        s["slot_ids"], x["cu_q"], x["seq"], x["prefix"], x["chunk"], x["ctx"], 1, BLOCK, TOPK,
        0, 1, sm_scale=1 / math.sqrt(D), idx_sm_scale=1 / math.sqrt(DIDX), score_type="max",
        disable_index_value=True, page_size=1, seqlens_cpu=[x["chunk"]],
    )  # fmt: skip
    return o


# ----------------------------------------------------------------------------- dense
_DENSE_BACKEND: list[str] = []


def _sdpa_lse(q, k, v, causal: bool):
    """Fused SDPA returning (out, lse [B, H, L]); cuDNN first, flash if cuDNN is refused."""
    scale = 1 / math.sqrt(D)
    order = _DENSE_BACKEND or ["cudnn", "flash"]
    for name in order:
        try:
            if name == "cudnn":
                r = torch.ops.aten._scaled_dot_product_cudnn_attention(
                    q, k, v, None, True, 0.0, causal, False, scale=scale
                )
            else:
                r = torch.ops.aten._scaled_dot_product_flash_attention(
                    q, k, v, 0.0, causal, False, scale=scale
                )
        except Exception as err:
            print(f"[dense {name} refused: {type(err).__name__}: {str(err)[:120]}]")
            continue
        if not _DENSE_BACKEND:
            _DENSE_BACKEND.append(name)
        return r[0], r[1].reshape(q.shape[0], q.shape[1], q.shape[2])
    raise RuntimeError("no fused SDPA backend")


def dense_setup(x: dict[str, Any]) -> dict[str, torch.Tensor]:
    """[1, H_q, L, D] query and expanded K/V of the request (untimed)."""
    ctx, group = x["ctx"], x["hq"] // x["hkv"]
    pages = x["page_table"][0].long()
    k = x["k"][pages].transpose(1, 2).reshape(-1, x["hkv"], D)[:ctx]  # [ctx, Hkv, D]
    v = x["v"][pages].transpose(1, 2).reshape(-1, x["hkv"], D)[:ctx]
    kx = k.transpose(0, 1).repeat_interleave(group, 0)[None]  # [1, Hq, ctx, D]
    vx = v.transpose(0, 1).repeat_interleave(group, 0)[None]
    del k, v
    return dict(q=x["q"].transpose(0, 1)[None].contiguous(), k=kx, v=vx)


def dense_run(x: dict[str, Any], dn: dict[str, torch.Tensor]) -> torch.Tensor:
    p = x["ctx"] - x["chunk"]
    o2, l2 = _sdpa_lse(dn["q"], dn["k"][:, :, p:], dn["v"][:, :, p:], True)
    if p == 0:
        return o2
    o1, l1 = _sdpa_lse(dn["q"], dn["k"][:, :, :p], dn["v"][:, :, :p], False)
    m = torch.maximum(l1, l2)
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(o1.dtype)


# ----------------------------------------------------------------------------- cases
def wrapper(x: dict[str, Any], **kw):
    from m3serve.kernels.msa.sparse_prefill import SparsePrefillWrapper

    w = SparsePrefillWrapper(**kw)
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    w.plan(x["cu_q"], x["prefix"], x["seq"], x["page_table"], x["hq"], x["hkv"], D, BLOCK, TOPK)
    sync()
    return w, (time.perf_counter() - t0) * 1e3


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def main_case(x, ids, fns, tile: dict[str, Any], with_dense: bool = True) -> dict[str, Any]:
    sm = 1 / math.sqrt(D)
    r: dict[str, Any] = dict(context=x["ctx"], hq=x["hq"], hkv=x["hkv"], chunk=x["chunk"])
    r["flops_sparse"], r["flops_dense"], r["flops_index"] = flops(x, ids)
    w, r["plan_ms"] = wrapper(x, **tile)
    out = w.run(x["q"], x["k"], x["v"], ids, sm)
    r["ours_ms"] = bench(lambda: w.run(x["q"], x["k"], x["v"], ids, sm, out=out))
    r["tile"] = (
        f"BLOCK_M={w.p.block_m} ITEM_Q={w.p.item_q} hoist={w.p.hoist_kv} "
        f"prefetch={w.p.prefetch} unroll={w.p.combine_unroll} main={w.p.main_kernel}"
    )
    r["phases"] = phase_times(w, x, ids, out, sm)  # the main kernel's own TFLOP/s from these
    w = None
    wq, _ = wrapper(x, variant="query_major")
    out_q = wq.run(x["q"], x["k"], x["v"], ids, sm)
    r["err_vs_query_major"] = max_err(out, out_q)
    r["query_major_ms"] = bench(lambda: wq.run(x["q"], x["k"], x["v"], ids, sm, out=out_q))
    wq = out_q = None
    if fns is not None:
        try:
            s = sglang_layout(x)
            o_sg = sglang_main(fns, x, s, ids)
            r["err_vs_sglang"] = max_err(out, o_sg)
            r["sglang_main_ms"] = bench(lambda: sglang_main(fns, x, s, ids))
        except Exception:
            traceback.print_exc()
        s = o_sg = None
    if with_dense:
        dn = dense_setup(x)
        dense_run(x, dn)
        r["dense_backend"] = _DENSE_BACKEND[0]
        r["dense_ms"] = bench(lambda: dense_run(x, dn), rep=300)
        dn = None
    torch.cuda.empty_cache()
    return r


def full_case(x, fns, tile: dict[str, Any], with_sglang: bool) -> dict[str, Any]:
    sm = 1 / math.sqrt(D)
    r: dict[str, Any] = dict(context=x["ctx"], hq=x["hq"], hkv=x["hkv"], chunk=x["chunk"])
    ids = select(x)
    r["flops_sparse"], r["flops_dense"], r["flops_index"] = flops(x, ids)
    w, r["plan_ms"] = wrapper(x, **tile)
    out = w.run(x["q"], x["k"], x["v"], ids, sm)

    def ours_full():
        select(x, out=ids)
        w.run(x["q"], x["k"], x["v"], ids, sm, out=out)

    r["select_ms"] = bench(lambda: select(x, out=ids))
    r["ours_main_ms"] = bench(lambda: w.run(x["q"], x["k"], x["v"], ids, sm, out=out))
    r["ours_full_ms"] = bench(ours_full)
    try:  # FP8 index keys + FP8 queries (the opt-in M3SERVE_INDEX_Q_FP8 path)
        add_fp8_index(x)
        ids8 = select(x, fp8=True)
        r["fp8_select_agree"] = float((ids8 == ids).all(-1).float().mean())

        def ours_full_fp8():
            select(x, out=ids8, fp8=True)
            w.run(x["q"], x["k"], x["v"], ids8, sm, out=out)

        r["fp8_select_ms"] = bench(lambda: select(x, out=ids8, fp8=True))
        r["ours_full_fp8_ms"] = bench(ours_full_fp8)
    except Exception:
        traceback.print_exc()
    x.pop("idx_k8", None)
    x.pop("idx_s8", None)
    w = None
    torch.cuda.empty_cache()
    if fns is not None and with_sglang:
        try:
            s = sglang_layout(x)
            o_sg = sglang_full(fns, x, s)
            # different selection kernels may break near-ties differently: report, don't assert
            r["err_full_vs_sglang"] = max_err(out, o_sg)
            r["sglang_full_ms"] = bench(lambda: sglang_full(fns, x, s))
        except Exception:
            traceback.print_exc()
        s = o_sg = None
        torch.cuda.empty_cache()
    dn = dense_setup(x)
    dense_run(x, dn)
    r["dense_backend"] = _DENSE_BACKEND[0]
    r["dense_ms"] = bench(lambda: dense_run(x, dn), rep=300)
    dn = None
    torch.cuda.empty_cache()
    return r


SWEEP = [  # (BLOCK_M, ITEM_Q, hoist K/V, prefetch, unrolled combine, main kernel)
    (64, 64, True, True, False, "triton"),
    (64, 128, True, True, False, "triton"),
    (64, 64, True, True, False, "cuda"),
]
# ITEM_Q 128 does not fit two CUDA CTAs per SM (3 query-row buffers): 3.46 ms in session 14.


def sweep(fns) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, float]]:
    """Tile variants at 128K, 64/4: the fastest becomes the tile of every other case.

    Each variant is also checked against the query-major output (itself checked against the
    reference by --check); the winner's phases are timed apart (index build, main, combine).
    """

    x = make_inputs(SWEEP_CTX, CHUNK, *HEADS[0])
    ids = select(x)
    sm = 1 / math.sqrt(D)
    wq, _ = wrapper(x, variant="query_major")
    ref_out = wq.run(x["q"], x["k"], x["v"], ids, sm)
    rows = []
    best, best_ms = {}, float("inf")
    for bm, iq, hoist, pf, un, mk in SWEEP:
        tile = dict(block_m=bm, item_q=iq, hoist_kv=hoist, prefetch=pf, combine_unroll=un,
                    main_kernel=mk)  # fmt: skip
        try:
            w, _ = wrapper(x, **tile)
            out = w.run(x["q"], x["k"], x["v"], ids, sm)
            err = max_err(out, ref_out)
            ms = bench(lambda w=w, out=out: w.run(x["q"], x["k"], x["v"], ids, sm, out=out))
        except Exception as err:
            print(f"[sweep {tile} failed: {type(err).__name__}: {str(err)[:300]}]")
            continue
        rows.append({**tile, "ms": ms, "err_vs_query_major": err})
        print(f"sweep {tile}: {ms:.3f} ms, err vs query-major {err:.4f}", flush=True)
        if ms < best_ms and err < 0.05:
            best, best_ms = tile, ms
        w = out = None
        torch.cuda.empty_cache()
    phases: dict[str, float] = {}
    try:
        w, _ = wrapper(x, **best)
        phases = phase_times(w, x, ids, w.run(x["q"], x["k"], x["v"], ids, sm), sm)
        print("phases (128K, 64/4):", phases, flush=True)
    except Exception:
        traceback.print_exc()
    return best, rows, phases


def phase_times(w, x, ids, out, sm: float) -> dict[str, float]:
    """run()'s three steps timed apart on ``w``'s plan (after one run() with ``ids``): the
    inverse-index build, the main kernel alone, the combine."""
    from m3serve.kernels.msa.sparse_prefill_plan import build_inverse_index
    from m3serve.kernels.msa.sparse_prefill_triton import launch_combine

    p, m = w.p, w.p.meta

    def build():
        build_inverse_index(ids, m, p.block, p.item_q, p.counts, p.row_ptr, p.item_ptr,
                            p.entries, p.work_row, p.work_start)  # fmt: skip

    def main_k():
        w.launch_main(x["q"], x["k"], x["v"], sm)

    def combine():
        launch_combine(p.o_part, p.lse_part, ids, m.q_pos, out, None, p.num_kv_heads,
                       p.block, p.combine_unroll)  # fmt: skip

    return {"index_build_ms": bench(build), "main_kernel_ms": bench(main_k),
            "combine_ms": bench(combine), "work_items": int(p.item_ptr[-1]),
            "partials_GB": p.o_part.numel() * p.o_part.element_size() / 1e9}  # fmt: skip


def check_small(fns) -> dict[str, float]:
    """Correctness on the card vs the float32 reference (small: the reference is dense)."""
    from m3serve.kernels.msa import reference as ref

    x = make_inputs(4096 + 333, 1111, 64, 4, seed=3)
    ids = select(x)
    sm = 1 / math.sqrt(D)
    expect = ref.ref_sparse_attention(
        x["q"], x["k"], x["v"], x["page_table"], x["cu_q"], x["prefix"], x["seq"], ids, sm
    )
    w, _ = wrapper(x)
    res = {"block_major": max_err(w.run(x["q"], x["k"], x["v"], ids, sm), expect)}
    wq, _ = wrapper(x, variant="query_major")
    res["query_major"] = max_err(wq.run(x["q"], x["k"], x["v"], ids, sm), expect)
    if fns is not None:
        s = sglang_layout(x)
        res["sglang_main"] = max_err(sglang_main(fns, x, s, ids), expect)
    dense_expect = ref.ref_dense_causal_attention(
        x["q"], x["k"], x["v"], x["page_table"], x["cu_q"], x["prefix"], x["seq"], sm
    )
    res["dense_sdpa"] = max_err(dense_run(x, dense_setup(x)).transpose(1, 2)[0], dense_expect)
    ref_ids = ref.ref_select_blocks(
        x["idx_q"], x["idx_k"], None, x["page_table"], x["cu_q"], x["prefix"], x["seq"], TOPK
    )
    res["select_mismatch_frac"] = float((ref_ids != ids).float().mean())
    print("check (max abs err vs float32 reference):", res, flush=True)
    return res


# ----------------------------------------------------------------------------- estimate
def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((a - mx) ** 2 for a in xs)
    b = sum((a - mx) * (c - my) for a, c in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


def whole_prompt_estimate(full_rows: list[dict[str, Any]], total: int) -> dict[str, float]:
    xs = [float(r["context"]) for r in full_rows]
    est = {"prompt": total, "chunks": total // CHUNK}
    for key in ("ours_full_ms", "dense_ms"):
        a, b = fit_line(xs, [r[key] for r in full_rows])
        est[key] = sum(a + b * CHUNK * (i + 1) for i in range(total // CHUNK))
    est["speedup"] = est["dense_ms"] / est["ours_full_ms"]
    return est


# ----------------------------------------------------------------------------- output
def tflops(f: float, ms: float) -> float:
    return f / (ms * 1e-3) / 1e12


def to_cases(main_rows, full_rows, estimates) -> list[dict[str, Any]]:
    cases = []

    def add(case, ours, baseline, base_val, unit="ms", roof=None):
        ratio = base_val / ours if unit == "ms" else ours / base_val
        cases.append(dict(case=case, ours=round(ours, 4), baseline=baseline,
                          baseline_value=round(base_val, 4), unit=unit, ratio=round(ratio, 3),
                          roofline_fraction=None if roof is None else round(roof, 3)))  # fmt: skip

    for r in main_rows:
        tag = f"main {r['context'] // 1024}K ctx, 8K chunk, {r['hq']}q/{r['hkv']}kv"
        ours_tf = tflops(r["flops_sparse"], r["ours_ms"])
        roof = ours_tf / tflops(r["flops_dense"], r["dense_ms"]) if "dense_ms" in r else None
        if "sglang_main_ms" in r:
            add(tag, r["ours_ms"], "sglang 0.5.23 flash_prefill_with_gqa_share_sparse",
                r["sglang_main_ms"], roof=roof)  # fmt: skip
        add(tag, r["ours_ms"], "ours query-major", r["query_major_ms"], roof=roof)
        if "dense_ms" in r:
            add(tag, r["ours_ms"], f"dense causal SDPA ({r['dense_backend']})", r["dense_ms"],
                roof=roof)  # fmt: skip
            add(tag + " TFLOP/s", ours_tf, f"dense causal SDPA ({r['dense_backend']}) TFLOP/s",
                tflops(r["flops_dense"], r["dense_ms"]), unit="TFLOP/s", roof=roof)  # fmt: skip
    for r in full_rows:
        tag = f"full MSA prefill {r['context'] // 1024}K ctx, 8K chunk, {r['hq']}q/{r['hkv']}kv"
        if "sglang_full_ms" in r:
            add(tag, r["ours_full_ms"], "sglang 0.5.23 minimax_sparse_prefill", r["sglang_full_ms"])
        add(tag, r["ours_full_ms"], f"dense causal SDPA ({r['dense_backend']})", r["dense_ms"])
        if "ours_full_fp8_ms" in r:  # FP8 index keys + queries: the selection rounds differently
            tag8 = tag + ", FP8 index keys + q"
            if "sglang_full_ms" in r:
                add(tag8, r["ours_full_fp8_ms"], "sglang 0.5.23 minimax_sparse_prefill (bf16)",
                    r["sglang_full_ms"])  # fmt: skip
            add(tag8, r["ours_full_fp8_ms"], f"dense causal SDPA ({r['dense_backend']})",
                r["dense_ms"])  # fmt: skip
    for e in estimates:
        add(f"full MSA prefill, whole {e['prompt'] // 1024}K prompt (ESTIMATE: {e['chunks']} "
            "chunks, per-chunk times fitted linear in context)", e["ours_full_ms"],
            "dense causal SDPA (same estimate)", e["dense_ms"])  # fmt: skip
    return cases


def _f(v: float | None, spec: str, suffix: str = "") -> str:
    return "—" if v is None else format(v, spec) + suffix


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    lines = [
        f"# sparse_prefill — {doc['card']} — {doc['date']}",
        "",
        f"versions: {json.dumps(doc['versions'])}; tile: {doc.get('tile')}",
        "",
        "Main branch only (8K-query chunk at the end of one prompt; ms, median):",
        "",
        "| context | heads q/kv | ours block-major | query-major | SGLang main | dense | ours TFLOP/s | dense TFLOP/s | vs SGLang | vs QM | vs dense | plan ms | main kernel ms | kernel TFLOP/s | kernel / dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["raw_main"]:
        sg, dn, ours = r.get("sglang_main_ms"), r.get("dense_ms"), r["ours_ms"]
        cells = [
            f"{r['context'] // 1024}K", f"{r['hq']}/{r['hkv']}", f"{ours:.3f}",
            f"{r['query_major_ms']:.3f}", _f(sg, ".3f"), _f(dn, ".3f"),
            f"{tflops(r['flops_sparse'], ours):.0f}",
            _f(None if dn is None else tflops(r["flops_dense"], dn), ".0f"),
            _f(None if sg is None else sg / ours, ".2f", "×"),
            f"{r['query_major_ms'] / ours:.2f}×", _f(None if dn is None else dn / ours, ".1f", "×"),
            f"{r['plan_ms']:.1f}",
        ]  # fmt: skip
        km = r.get("phases", {}).get("main_kernel_ms")
        ktf = None if km is None else tflops(r["flops_sparse"], km)
        dtf = None if dn is None else tflops(r["flops_dense"], dn)
        cells += [_f(km, ".3f"), _f(ktf, ".0f"),
                  _f(None if ktf is None or dtf is None else 100 * ktf / dtf, ".0f", " %")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Full MSA prefill (index scoring + top-k + main), same chunk:",
        "",
        "| context | heads | ours select | ours main | ours full | SGLang full | dense | vs SGLang | vs dense |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["raw_full"]:
        sg, ours = r.get("sglang_full_ms"), r["ours_full_ms"]
        cells = [
            f"{r['context'] // 1024}K", f"{r['hq']}/{r['hkv']}", f"{r['select_ms']:.3f}",
            f"{r['ours_main_ms']:.3f}", f"{ours:.3f}", _f(sg, ".3f"), f"{r['dense_ms']:.3f}",
            _f(None if sg is None else sg / ours, ".2f", "×"), f"{r['dense_ms'] / ours:.1f}×",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    fp8 = [r for r in doc["raw_full"] if "ours_full_fp8_ms" in r]
    if fp8:
        lines += [
            "",
            "Same, FP8 e4m3 index keys (per-token scale) and FP8 queries (q_fp8); main branch bf16:",
            "",
            "| context | select fp8 | full fp8 | vs SGLang (bf16) | vs dense | rows with the bf16 selection |",
            "|---|---|---|---|---|---|",
        ]
        for r in fp8:
            sg, ours = r.get("sglang_full_ms"), r["ours_full_fp8_ms"]
            cells = [
                f"{r['context'] // 1024}K", f"{r['fp8_select_ms']:.3f}", f"{ours:.3f}",
                _f(None if sg is None else sg / ours, ".2f", "×"), f"{r['dense_ms'] / ours:.1f}×",
                f"{r['fp8_select_agree']:.3f}",
            ]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
    for e in doc.get("estimates", []):
        lines.append(
            f"\nESTIMATE whole {e['prompt'] // 1024}K prompt ({e['chunks']} chunks of 8K, per-chunk "
            f"times fitted a + b·context): ours {e['ours_full_ms']:.1f} ms, dense {e['dense_ms']:.1f} ms, "
            f"{e['speedup']:.1f}× faster."
        )  # fmt: skip
    if doc.get("sweep"):
        lines += ["", "Tile sweep (128K, 64/4, main branch ms): " + ", ".join(
            f"BLOCK_M={s['block_m']} ITEM_Q={s['item_q']} hoist={s['hoist_kv']} "
            f"prefetch={s['prefetch']} unroll={s['combine_unroll']}: {s['ms']:.3f}"
            for s in doc["sweep"])]  # fmt: skip
    if doc.get("phases"):
        lines += ["", f"Phases of the chosen tile (128K, 64/4): {json.dumps(doc['phases'])}"]
    if doc.get("check"):
        lines += [
            "",
            f"Correctness on the card (max abs err vs float32 reference): {json.dumps(doc['check'])}",
        ]
    lines += [
        "",
        "FLOP formulas and method: see the docstring of benchmarks/bench_sparse_prefill.py.",
    ]
    path.write_text("\n".join(lines) + "\n")


def plot(doc: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[no matplotlib: PNG not written]")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for hq, hkv in HEADS:
        rs = sorted((r for r in doc["raw_main"] if r["hq"] == hq and r["hkv"] == hkv),
                    key=lambda r: r["context"])  # fmt: skip
        x = [r["context"] for r in rs]
        axes[0].plot(x, [r["dense_ms"] / r["ours_ms"] for r in rs if "dense_ms" in r], "o-",
                     label=f"{hq}/{hkv} vs dense")  # fmt: skip
        sg = [r for r in rs if "sglang_main_ms" in r]
        axes[0].plot([r["context"] for r in sg], [r["sglang_main_ms"] / r["ours_ms"] for r in sg],
                     "s--", label=f"{hq}/{hkv} vs SGLang main")  # fmt: skip
        axes[0].plot(x, [r["query_major_ms"] / r["ours_ms"] for r in rs], "^:",
                     label=f"{hq}/{hkv} vs query-major")  # fmt: skip
    rs = sorted(doc["raw_full"], key=lambda r: r["context"])
    axes[1].plot([r["context"] for r in rs], [r["dense_ms"] / r["ours_full_ms"] for r in rs], "o-",
                 label="chunk: vs dense")  # fmt: skip
    sg = [r for r in rs if "sglang_full_ms" in r]
    axes[1].plot([r["context"] for r in sg], [r["sglang_full_ms"] / r["ours_full_ms"] for r in sg],
                 "s--", label="chunk: vs SGLang full")  # fmt: skip
    es = doc.get("estimates", [])
    if es:
        axes[1].plot([e["prompt"] for e in es], [e["speedup"] for e in es], "x:",
                     label="whole prompt vs dense (estimate)")  # fmt: skip
    titles = ("main branch speedup (last 8K chunk)", "full MSA prefill speedup")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("×")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_all(out: Path, doc: dict[str, Any]) -> None:
    doc["cases"] = to_cases(doc["raw_main"], doc["raw_full"], doc.get("estimates", []))
    (out / "sparse_prefill.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, out / "sparse_prefill.md")
    plot(doc, out / "sparse_prefill.png")


def main() -> None:
    ap = argparse.ArgumentParser(description="MSA sparse prefill benchmark")
    ap.add_argument("--contexts", default="16384,32768,131072")
    ap.add_argument("--full-contexts", default="32768,131072,1048576")
    ap.add_argument(
        "--sglang-full-max", type=int, default=131072, help="largest context for SGLang full"
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--sweep", action="store_true", help="time tile variants first, keep the best")
    ap.add_argument("--check", action="store_true", help="correctness vs the reference first")
    ap.add_argument(
        "--tile",
        default=None,
        help="block_m,item_q,hoist,prefetch,unroll[,triton|cuda] (64,64,1,1,0,cuda)",
    )
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        doc = json.loads((args.out / "sparse_prefill.json").read_text())
        plot(doc, args.out / "sparse_prefill.png")
        return
    import triton

    fns = load_sglang()
    card = torch.cuda.get_device_name()
    print(f"device {card}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    doc: dict[str, Any] = dict(
        benchmark="sparse_prefill",
        card=card,
        date=datetime.date.today().isoformat(),
        versions={"torch": torch.__version__, "triton": triton.__version__, "flashinfer": None,
                  "sglang": "0.5.23 (minimax_sparse ops, copied unmodified)" if fns else None},
        raw_main=[],
        raw_full=[],
    )  # fmt: skip
    if args.check:
        try:
            doc["check"] = check_small(fns)
        except Exception:
            traceback.print_exc()
    tile: dict[str, Any] = {}
    if args.tile:
        f = args.tile.split(",")
        bm, iq, h, pf, un = (int(v) for v in f[:5])
        tile = dict(
            block_m=bm, item_q=iq, hoist_kv=bool(h), prefetch=bool(pf), combine_unroll=bool(un),
            main_kernel=f[5] if len(f) > 5 else "triton",
        )  # fmt: skip
    if args.sweep:
        tile, doc["sweep"], doc["phases"] = sweep(fns)
    doc["tile"] = tile or "default"
    for ctx in [int(c) for c in args.contexts.split(",") if c]:
        for hq, hkv in HEADS:
            try:
                x = make_inputs(ctx, CHUNK, hq, hkv)
                r = main_case(x, select(x), fns, tile)
            except Exception:
                traceback.print_exc()
                continue
            finally:
                x = None
                torch.cuda.empty_cache()
            doc["raw_main"].append(r)
            print(
                json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                flush=True,
            )
            write_all(args.out, doc)
    for ctx in [int(c) for c in args.full_contexts.split(",") if c]:
        try:
            x = make_inputs(ctx, CHUNK, 64, 4)
            r = full_case(x, fns, tile, with_sglang=ctx <= args.sglang_full_max)
        except Exception:
            traceback.print_exc()
            continue
        finally:
            x = None
            torch.cuda.empty_cache()
        doc["raw_full"].append(r)
        print(
            json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
            flush=True,
        )
        write_all(args.out, doc)
    if len(doc["raw_full"]) >= 2:
        doc["estimates"] = [whole_prompt_estimate(doc["raw_full"], n) for n in (131072, 1048576)]
    write_all(args.out, doc)
    for c in doc["cases"]:
        print(
            f"{c['case']:<70} {c['baseline']:<55} base {c['baseline_value']:>9.3f} ours {c['ours']:>9.3f} {c['unit']:<7} ratio {c['ratio']:.2f}"
        )


if __name__ == "__main__":
    sys.exit(main())
