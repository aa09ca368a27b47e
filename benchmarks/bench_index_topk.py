"""Benchmark MSA index selection: decode scoring + top-k, top-k alone, prefill scoring + top-k.

Every case times ours and a baseline in this process, on this card, on identical random inputs
(triton.testing.do_bench, median, after warm-up, L2 flushed before each sample; small working sets
also rotate over several copies inside the timed call so the keys come from HBM, not L2).
Decode and top-k are timed as CUDA-graph replays (both sides): serving captures decode, and
eager launch overhead would otherwise dominate a 10–50 µs selection; prefill is timed eagerly.
  (a) decode, contexts 8K / 32K / 128K / 1M × batch 1 / 8 / 32, Q = 1, G = 4, d = 128, k = 16:
      ours (bf16 keys, FP8 keys) vs the torch reference path (page gather + matmul + block max +
      torch.topk) and vs SGLang 0.5.23's own M3 decode selection (flash_decode_with_topk_idx,
      page_size 128, init 0 / local 1 block, its Triton two-stage top-k).
      Bytes formula (the floor any exact selection must read): B · N · 256 B (bf16 keys, 1 × 128
      dims × 2 B) or B · N · 132 B (FP8 keys 128 B + float32 scale); GB/s = bytes / time.
  (b) top-k alone over [32768 rows × 1024 blocks] (an 8K chunk × 4 groups at 128K), [256 × 8192],
      [32 × 1024], and [4096 × 1024] / [8192 × 2048] (the edges of the "auto" dispatch) vs
      torch.topk: every variant (auto, slots, rounds, filter) and a sweep of slot-list launch
      shapes, each with its ratio; "ours" is the default variant (M3SERVE_TOPK, else "auto").
      Exactness: each result must equal the reference order (stable descending sort, ties to the
      lower id) bit for bit; torch.topk may order equal scores either way, so rows that differ
      from it are counted and must all be rows with a tie among its top k scores.
  (c) prefill, the last 8K-query chunk at 32K and 128K context: ours (bf16 keys; FP8 keys; FP8
      keys + FP8 queries, q_fp8=True: e4m3 × e4m3 tensor-core scoring, the M3SERVE_INDEX_Q_FP8
      option) vs SGLang 0.5.23's flash_prefill_with_topk_index (block_size_q 1,
      disable_index_value), all in one run. FLOP formula: 2 · G · d · Σ_t (pos_t + 1) (the
      causal token scores); TFLOP/s = FLOPs / time. The FP8-query case also reports how often its
      selections agree with ours bf16 (it may differ at near-ties).
Results: benchmarks/results/index_topk.{json,md} (DESIGN.md format; ratio > 1: ours faster).

Usage: PYTHONPATH=python:.dev-index/index_topk_sglang python benchmarks/bench_index_topk.py
       [--out DIR] [--quick] [--only topk] [--skip decode,prefill]
  M3SERVE_TOPK=auto|slots|rounds|filter picks the variant the select_* paths and "ours" use.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import triton

from m3serve.kernels.msa import reference as ref
from m3serve.kernels.msa import topk as topk_mod
from m3serve.kernels.msa.index_cache import store_index_k
from m3serve.kernels.msa.index_select import (
    DecodeSelectWorkspace,
    fuse_topk_default,
    select_blocks_decode,
    select_blocks_prefill,
)
from m3serve.kernels.msa.topk import launch_topk_rows
from m3serve.kernels.msa.topk_slots import SlotsConfig

BLOCK, G, D, TOPK = 128, 4, 128, 16
L2_ROTATE_BYTES = 256 << 20  # working set per timed call ≥ 256 MB: several copies for small cases

try:
    from sglang.kernels.ops.attention.minimax_sparse.common.utils import get_cu_seqblocks
    from sglang.kernels.ops.attention.minimax_sparse.decode.flash_with_topk_idx import (
        flash_decode_with_topk_idx,
    )
    from sglang.kernels.ops.attention.minimax_sparse.prefill.flash_with_topk_idx import (
        flash_prefill_with_topk_index,
    )

    HAVE_SGLANG = True
except Exception as e:  # the baseline site is optional: ours still runs
    print(f"[warn] SGLang baseline unavailable: {e!r}", file=sys.stderr)
    HAVE_SGLANG = False


def bench(fn, warmup: int = 20, rep: int = 80) -> float:
    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def bench_graph(fn, copies: int, calls: int = 8) -> float:
    """ms per call of fn(i) replayed from one CUDA graph of max(calls, copies) calls cycling the
    copies: decode runs under CUDA graphs in serving, and this keeps host launch overhead
    (larger than the GPU time of a small decode selection) out of both sides."""
    n = max(calls, copies)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # compile / autotune / allocate outside the capture
        for i in range(min(copies, 2)):
            fn(i)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(n):
            fn(j % copies)
    ms = bench(graph.replay) / n
    del graph
    return ms


def copy_bandwidth() -> float:
    """Device copy ceiling in GB/s (read + write bytes), 1 GiB buffers."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = bench(lambda: b.copy_(a))
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def fp8_copy(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FP8 e4m3 + per-token scale copy of a bf16 index cache, written by our store kernel."""
    num_pages = cache.shape[0]
    cache8 = torch.empty(num_pages, BLOCK, D, dtype=torch.float8_e4m3fn, device="cuda")
    scale8 = torch.empty(num_pages, BLOCK, dtype=torch.float32, device="cuda")
    slots = torch.arange(num_pages * BLOCK, device="cuda")
    store_index_k(cache8, scale8, cache.view(-1, D), slots)
    return cache8, scale8


def decode_inputs(batch: int, ctx: int, gen: torch.Generator):
    """Paged bf16 + FP8 index caches holding `copies` independent batches (L2 rotation)."""
    pages_per = ctx // BLOCK
    bytes_one = batch * ctx * D * 2
    copies = max(1, min(64, math.ceil(L2_ROTATE_BYTES / bytes_one)))
    num_pages = copies * batch * pages_per
    perm = torch.randperm(num_pages, device="cuda", generator=gen).to(torch.int32)
    page_tables = perm.view(copies, batch, pages_per)
    cache = torch.randn(num_pages, BLOCK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    cache8, scale8 = fp8_copy(cache)
    iq = torch.randn(copies, batch, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    seq = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    return copies, page_tables, cache, cache8, scale8, iq, seq


def torch_decode_path(iq, cache, page_table, seq_len: int):
    """Plain torch selection: gather pages, matmul, block max-pool, torch.topk, local last."""
    batch, pages = page_table.shape
    keys = cache[page_table.long()].view(batch, pages * BLOCK, D)  # [B, N, d]
    s = torch.einsum("bgd,bnd->bgn", iq, keys).float()
    blk = s.view(batch, G, pages, BLOCK).amax(-1)  # [B, G, nb]
    local = (seq_len - 1) // BLOCK
    ranked = blk[..., :local].topk(TOPK - 1, dim=-1).indices.to(torch.int32)
    loc = torch.full_like(ranked[..., :1], local)
    return torch.cat([ranked, loc], -1)


def sglang_decode(iq, cache, req_to_token, seq, slot_ids, max_seqlen: int):
    _, topk_idx, _ = flash_decode_with_topk_idx(
        q=iq,
        sink=None,
        k_cache=cache.view(-1, 1, D),
        v_cache=None,
        req_to_token=req_to_token,
        seq_lens=seq,
        max_seqlen=max_seqlen,
        slot_ids=slot_ids,
        block_size=BLOCK,
        topk=TOPK,
        init_blocks=0,
        local_blocks=1,
        disable_index_value=True,
        page_size=BLOCK,
    )
    return topk_idx


def req_to_token_of(page_table: torch.Tensor) -> torch.Tensor:
    """SGLang's token-granular slot map of a page table (slot = page · 128 + offset)."""
    tok = torch.arange(page_table.shape[1] * BLOCK, device=page_table.device)
    return (page_table.long()[:, tok // BLOCK] * BLOCK + tok % BLOCK).to(torch.int32)


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of (group, row) selections whose id sets agree (order-free)."""
    return float((a.sort(-1).values == b.sort(-1).values).all(-1).float().mean())


_RESULTS_WRITER = None  # set by main(): rewrite the results after every case (partial runs count)
_CASES: list[dict] = []


def case(name, ours, baseline, base_ms, unit="ms", roofline=None, **extra):
    c = {
        "case": name,
        "ours": round(ours, 5),
        "baseline": baseline,
        "baseline_value": round(base_ms, 5),
        "unit": unit,
        "ratio": round(base_ms / ours, 3) if unit == "ms" else round(ours / base_ms, 3),
        "roofline_fraction": None if roofline is None else round(roofline, 3),
    }
    c.update(extra)
    if _RESULTS_WRITER is not None:
        _RESULTS_WRITER([*_CASES, c])
    print(
        f"{name:44s} ours {ours:9.4f} {unit}  {baseline:26s} {base_ms:9.4f}  ratio {c['ratio']:6.2f}"
        + "".join(f"  {k}={v}" for k, v in extra.items()),
        flush=True,
    )
    return c


def decode_case(cases, ceiling, gen, batch: int, ctx: int) -> None:
    copies, pts, cache, cache8, scale8, iq, seq = decode_inputs(batch, ctx, gen)
    rows = batch * G
    ws = DecodeSelectWorkspace(rows, ctx // BLOCK, "cuda")
    out = torch.empty(G, batch, TOPK, dtype=torch.int32, device="cuda")

    def ours(i, c=cache, s=None, fuse=None):
        return select_blocks_decode(
            iq[i], c, s, pts[i], seq, 1, TOPK, out=out, workspace=ws, fuse_topk=fuse
        )

    t_bf16 = bench_graph(ours, copies)
    t_fp8 = bench_graph(lambda i: ours(i, cache8, scale8), copies)
    # the top-k inside the scoring launch (each request's last program ranks its rows) vs the
    # separate top-k launch, both forced, bf16 and FP8 keys; the default picks by row length
    ids = {}
    fused_vs = {}
    for fuse in (True, False):
        fused_vs[f"{'fused' if fuse else 'two_launch'}_bf16_ms"] = bench_graph(
            lambda i, f=fuse: ours(i, fuse=f), copies
        )
        fused_vs[f"{'fused' if fuse else 'two_launch'}_fp8_ms"] = bench_graph(
            lambda i, f=fuse: ours(i, cache8, scale8, fuse=f), copies
        )
        ids[fuse] = ours(0, fuse=fuse).clone()
    cases.append(
        case(
            f"decode B{batch} ctx{ctx // 1024}K fused top-k vs two launches",
            fused_vs["fused_bf16_ms"],
            "same kernels, top-k as a 2nd launch",
            fused_vs["two_launch_bf16_ms"],
            same_ids=bool(torch.equal(ids[True], ids[False])),
            fp8_fused_ms=round(fused_vs["fused_fp8_ms"], 5),
            fp8_two_launch_ms=round(fused_vs["two_launch_fp8_ms"], 5),
            fp8_ratio=round(fused_vs["two_launch_fp8_ms"] / fused_vs["fused_fp8_ms"], 3),
            default_fused=fuse_topk_default(ctx // BLOCK),
        )
    )
    t_fp8_ka = None
    if (batch, ctx) in ((8, 131072), (32, 1 << 20), (1, 1 << 20)):  # FP8 MMA orientation check
        t_fp8_ka = bench_graph(
            lambda i: select_blocks_decode(
                iq[i], cache8, scale8, pts[i], seq, 1, TOPK, out=out, workspace=ws, k_major=True
            ),
            copies,
        )
    gb = batch * ctx * 256 / 1e9
    gb8 = batch * ctx * 132 / 1e9
    tag = f"decode B{batch} ctx{ctx // 1024}K"
    mine = ours(0).clone()
    if batch * ctx <= 8 << 20:  # the torch path copies every key: skip at 8M+ tokens
        ref_ids = torch_decode_path(iq[0], cache, pts[0], ctx).transpose(0, 1)
        t_ref = bench_graph(lambda i: torch_decode_path(iq[i], cache, pts[i], ctx), copies)
        cases.append(
            case(
                f"{tag} bf16 vs torch",
                t_bf16,
                "torch matmul+maxpool+topk",
                t_ref,
                roofline=gb / (t_bf16 * 1e-3) / ceiling,
                ours_GBps=round(gb / (t_bf16 * 1e-3)),
                agree=round(agreement(mine, ref_ids), 4),
            )
        )
    if HAVE_SGLANG:
        try:
            r2ts = [req_to_token_of(pts[i]) for i in range(copies)]
            slot_ids = torch.arange(batch, device="cuda", dtype=torch.int64)
            theirs = sglang_decode(iq[0], cache, r2ts[0], seq, slot_ids, ctx)
            t_sgl = bench_graph(
                lambda i: sglang_decode(iq[i], cache, r2ts[i], seq, slot_ids, ctx), copies
            )
            cases.append(
                case(
                    f"{tag} bf16 vs sglang",
                    t_bf16,
                    "sglang-0.5.23 decode select",
                    t_sgl,
                    roofline=gb / (t_bf16 * 1e-3) / ceiling,
                    ours_GBps=round(gb / (t_bf16 * 1e-3)),
                    sglang_GBps=round(gb / (t_sgl * 1e-3)),
                    agree=round(agreement(mine, theirs), 4),
                )
            )
            cases.append(
                case(
                    f"{tag} fp8 vs sglang bf16",
                    t_fp8,
                    "sglang-0.5.23 decode select",
                    t_sgl,
                    roofline=gb8 / (t_fp8 * 1e-3) / ceiling,
                    ours_GBps=round(gb8 / (t_fp8 * 1e-3)),
                    **(
                        {"fp8_keys_as_A_ms": round(t_fp8_ka, 5)}  # the other MMA orientation
                        if t_fp8_ka is not None
                        else {}
                    ),
                )
            )
            del r2ts
        except Exception:
            traceback.print_exc()
    print(
        f"  {tag}: bf16 {gb / (t_bf16 * 1e-3):.0f} GB/s, fp8 {gb8 / (t_fp8 * 1e-3):.0f} GB/s"
        f" (ceiling {ceiling:.0f})",
        flush=True,
    )


def run_decode(cases, ceiling, gen, quick: bool):
    contexts = [8192, 32768, 131072, 1 << 20]
    batches = [1, 8, 32]
    if quick:
        contexts, batches = [32768, 131072], [1, 8]
    for ctx in contexts:
        for batch in batches:
            decode_case(cases, ceiling, gen, batch, ctx)
            torch.cuda.empty_cache()


# slot-list launch shapes timed beside the shipped choice (seven keep topk_check.sh near 90 s)
TOPK_SLOT_SWEEP = list(topk_mod.SLOTS_SWEEP)


def _cfg_tag(c: SlotsConfig) -> str:
    return f"slots_W{c.slots}_C{c.depth}_U{c.unroll}_NW{c.num_warps}"


def reference_ids(scores: torch.Tensor, local: int, check_rows: int = 4) -> torch.Tensor:
    """The reference order for rows that all share one local block ≥ k, vectorised: a stable
    descending sort of blocks 0 .. local − 1 (ties to the lower id, NaN first), the k − 1 first.
    Spot-checked against reference.ref_topk_from_scores (a loop over rows) on a few rows."""
    ids = torch.sort(scores[:, :local], dim=-1, descending=True, stable=True).indices
    ids = ids[:, : TOPK - 1].to(torch.int32)
    head = scores[:check_rows].cpu()
    loc = torch.full((head.shape[0],), local)
    assert torch.equal(
        ref.ref_topk_from_scores(head, loc, TOPK)[:, : TOPK - 1], ids[:check_rows].cpu()
    )
    return ids


def topk_case(cases, gen, rows: int, nb: int, copies: int, tag: str) -> None:
    """Every top-k variant and slot-list shape vs torch.topk on one [rows × nb] shape, same run.

    Bytes formula: rows · nb · 4 (each float32 score read once); GB/s = bytes / time."""
    scores = torch.randn(copies, rows, nb, device="cuda", generator=gen)
    local = torch.full((rows,), nb - 1, dtype=torch.int32, device="cuda")
    out = torch.empty(1, rows, TOPK, dtype=torch.int32, device="cuda")
    t_torch = bench_graph(lambda i: scores[i].topk(TOPK, dim=-1), copies)
    # -- exactness: the reference order; torch.topk agrees except where scores tie --
    visible = scores[0, :, : nb - 1]
    expect = reference_ids(scores[0], nb - 1)
    tvals, tids = visible.topk(TOPK, dim=-1)  # one past k − 1: a tie at the cut shows too
    tie_rows = (tvals[:, 1:] == tvals[:, :-1]).any(-1)
    tids = tids[:, : TOPK - 1].to(torch.int32)
    runs = {f"variant_{v}": dict(variant=v) for v in topk_mod.VARIANTS}
    runs.update({_cfg_tag(c): dict(variant="slots", slots_cfg=c) for c in TOPK_SLOT_SWEEP})
    times, exact_all, differ_rows = {}, True, 0
    for name, kw in runs.items():
        try:
            out.fill_(-7)
            launch_topk_rows(scores[0], local, out, TOPK, 1, **kw)
            got = out[0, :, : TOPK - 1]
            exact = bool(torch.equal(got, expect)) and bool((out[0, :, -1] == nb - 1).all())
            differ = (got != tids).any(-1)
            n_differ = int(differ.sum())
            only_ties = not bool((differ & ~tie_rows).any())
            exact_all &= exact and only_ties
            differ_rows = max(differ_rows, n_differ)
            ms = bench_graph(
                lambda i, kw=kw: launch_topk_rows(scores[i], local, out, TOPK, 1, **kw), copies
            )
            times[name] = ms
            print(
                f"  {tag} {name:34s} {ms:8.4f} ms  {t_torch / ms:6.2f}x torch.topk"
                f"  exact={exact}  rows_differing_from_torch={n_differ}"
                f" (all tied: {only_ties})",
                flush=True,
            )
        except Exception:
            traceback.print_exc()
    print(
        f"  {tag} rows with a tie among torch.topk's top {TOPK}: {int(tie_rows.sum())} of {rows}",
        flush=True,
    )
    if topk_mod._SLOTS_BROKEN:
        print(f"  slots kernel fell back to rounds: {topk_mod._SLOTS_BROKEN}", flush=True)
    ours = f"variant_{topk_mod.DEFAULT_VARIANT}"
    if ours not in times:
        return
    gb = rows * nb * 4 / 1e9
    best = min(times, key=times.get)
    cases.append(
        case(
            f"topk [{rows} x {nb}] k16{tag and ' ' + tag}",
            times[ours],
            "torch.topk",
            t_torch,
            default_variant=topk_mod.DEFAULT_VARIANT,
            auto_picks=topk_mod.pick_variant(rows, nb),
            ours_GBps=round(gb / (times[ours] * 1e-3)),
            best=best,
            best_ms=round(times[best], 5),
            best_ratio=round(t_torch / times[best], 3),
            exact=exact_all,
            tie_rows=int(tie_rows.sum()),
            rows_differing_from_torch=differ_rows,
            **{f"{k}_ms": round(v, 5) for k, v in times.items() if k != ours},
        )
    )


def run_topk_alone(cases, gen):
    # an 8K-query prefill chunk × 4 groups at 128K context; one decode batch at 1M context
    topk_case(cases, gen, 32768, 1024, 4, "")
    topk_case(cases, gen, 256, 8192, 64, "(1M ctx)")
    topk_case(cases, gen, 32, 1024, 512, "(decode B8 128K)")
    # the edges of "auto": fewer rows (a 1K chunk × 4 groups) and wider rows (2K chunk at 256K)
    topk_case(cases, gen, 4096, 1024, 16, "(1K chunk 128K)")
    topk_case(cases, gen, 8192, 2048, 4, "(2K chunk 256K)")


def prefill_inputs(gen: torch.Generator, chunk: int, ctx: int):
    """The last ``chunk`` queries of one ``ctx``-token prompt: page table (shuffled pages), bf16
    index cache and its FP8 copy, index queries, ragged metadata, an output buffer."""
    pages = ctx // BLOCK
    pt = torch.randperm(pages, device="cuda", generator=gen).to(torch.int32).view(1, pages)
    cache = torch.randn(pages, BLOCK, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    cache8, scale8 = fp8_copy(cache)
    iq = torch.randn(chunk, G, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    cu = torch.tensor([0, chunk], dtype=torch.int32, device="cuda")
    seq = torch.tensor([ctx], dtype=torch.int32, device="cuda")
    out = torch.empty(G, chunk, TOPK, dtype=torch.int32, device="cuda")
    return pt, cache, cache8, scale8, iq, cu, seq, seq - chunk, out


def prefill_case(cases, gen, chunk: int, ctx: int) -> None:
    pt, cache, cache8, scale8, iq, cu, seq, pre, out = prefill_inputs(gen, chunk, ctx)

    def ours(c=cache, s=None, k_major=False, q_fp8=False):
        return select_blocks_prefill(
            iq,
            c,
            s,
            pt,
            cu,
            pre,
            seq,
            TOPK,
            max_q_len=chunk,
            max_seq_len=ctx,
            out=out,
            k_major=k_major,
            q_fp8=q_fp8,
        )

    mine = ours().clone()
    mine_q8 = ours(cache8, scale8, q_fp8=True).clone()
    t_bf16 = bench(ours, warmup=5, rep=40)
    t_fp8 = bench(lambda: ours(cache8, scale8), warmup=5, rep=40)
    t_fp8_ka = bench(lambda: ours(cache8, scale8, True), warmup=5, rep=40)
    t_q8 = bench(lambda: ours(cache8, scale8, q_fp8=True), warmup=5, rep=40)
    print(f"  fp8 keys-as-A orientation {t_fp8_ka:.3f} ms", flush=True)
    pos = torch.arange(ctx - chunk, ctx, dtype=torch.float64)
    flops = 2 * G * D * float((pos + 1).sum())
    tag = f"prefill 8K chunk ctx{ctx // 1024}K"
    print(
        f"  {tag}: ours bf16 {t_bf16:.3f} ms ({flops / t_bf16 / 1e9:.0f} TFLOP/s), "
        f"fp8 {t_fp8:.3f} ms, fp8 keys + fp8 q {t_q8:.3f} ms "
        f"({flops / t_q8 / 1e9:.0f} TFLOP/s, {t_bf16 / t_q8:.2f}x ours bf16, "
        f"agree with ours bf16 {agreement(mine_q8, mine):.4f})",
        flush=True,
    )
    if HAVE_SGLANG:
        try:
            r2t = req_to_token_of(pt)
            slot_ids = torch.zeros(1, dtype=torch.int64, device="cuda")
            meta = get_cu_seqblocks(cu, chunk, 1, BLOCK)

            def theirs():
                _, idx = flash_prefill_with_topk_index(
                    q=iq,
                    k_cache=cache.view(-1, 1, D),
                    v_cache=None,
                    sink=None,
                    req_to_token=r2t,
                    slot_ids=slot_ids,
                    cu_seqlens=cu,
                    seq_lens=seq,
                    prefix_lens=pre,
                    max_seqlen_q=chunk,
                    max_seqlen_k=ctx,
                    block_size_q=1,
                    block_size_k=BLOCK,
                    topk=TOPK,
                    init_blocks=0,
                    local_blocks=1,
                    disable_index_value=True,
                    cu_seqblocks_q=meta[0],
                    max_seqblock_q=meta[1],
                    all_seqblock_q=meta[2],
                    page_size=BLOCK,
                )
                return idx

            idx = theirs()  # [G, T, k] ascending ids
            t_sgl = bench(theirs, warmup=5, rep=40)
            cases.append(
                case(
                    f"{tag} bf16 vs sglang",
                    t_bf16,
                    "sglang-0.5.23 prefill select",
                    t_sgl,
                    ours_TFLOPs=round(flops / t_bf16 / 1e9, 1),
                    sglang_TFLOPs=round(flops / t_sgl / 1e9, 1),
                    agree=round(agreement(mine, idx), 4),
                )
            )
            cases.append(
                case(
                    f"{tag} fp8 vs sglang bf16",
                    t_fp8,
                    "sglang-0.5.23 prefill select",
                    t_sgl,
                    fp8_keys_as_A_ms=round(t_fp8_ka, 5),
                )
            )
            cases.append(
                case(
                    f"{tag} fp8 q+k vs sglang bf16",
                    t_q8,
                    "sglang-0.5.23 prefill select",
                    t_sgl,
                    ours_TFLOPs=round(flops / t_q8 / 1e9, 1),
                    ours_bf16_ms=round(t_bf16, 5),
                    vs_ours_bf16=round(t_bf16 / t_q8, 3),
                    agree_ours_bf16=round(agreement(mine_q8, mine), 4),
                    agree_sglang=round(agreement(mine_q8, idx), 4),
                )
            )
        except Exception:
            traceback.print_exc()


def run_prefill(cases, gen, quick: bool):
    chunk = 8192
    for ctx in [32768, 131072]:
        prefill_case(cases, gen, chunk, ctx)
        torch.cuda.empty_cache()


def write_results(cases, out_dir: Path, ceiling: float, quiet: bool = False):
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {
        "benchmark": "index_topk",
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "flashinfer": None,
            "sglang": "0.5.23 (minimax_sparse Triton ops)" if HAVE_SGLANG else None,
        },
        "copy_ceiling_GBps": round(ceiling),
        "kernel_fallbacks": {
            "topk_filter": list(topk_mod._FILTER_BROKEN),
            "topk_slots": list(topk_mod._SLOTS_BROKEN),
        },
        "cases": cases,
    }
    (out_dir / "index_topk.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        f"# index_topk — {res['card']}, {res['date']}",
        "",
        f"torch {torch.__version__}, triton {triton.__version__}; device copy ceiling "
        f"{ceiling:.0f} GB/s (read+write). ratio > 1: ours faster. roofline = ours GB/s / ceiling.",
        "",
        "| case | ours | baseline | baseline value | unit | ratio | roofline | extra |",
        "|---|---|---|---|---|---|---|---|",
    ]
    core = {"case", "ours", "baseline", "baseline_value", "unit", "ratio", "roofline_fraction"}
    for c in cases:
        extra = ", ".join(f"{k} {v}" for k, v in c.items() if k not in core)
        lines.append(
            f"| {c['case']} | {c['ours']} | {c['baseline']} | {c['baseline_value']} | "
            f"{c['unit']} | {c['ratio']} | {c['roofline_fraction']} | {extra} |"
        )
    (out_dir / "index_topk.md").write_text("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--quick", action="store_true", help="a few decode cases only")
    ap.add_argument("--skip", default="", help="comma list of: decode,topk,prefill")
    ap.add_argument("--only", default="", help="comma list of: decode,topk,prefill (the rest skip)")
    a = ap.parse_args()
    skip = set(a.skip.split(",")) if a.skip else set()
    if a.only:
        skip |= {"decode", "topk", "prefill"} - set(a.only.split(","))
    gen = torch.Generator(device="cuda").manual_seed(0)
    ceiling = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling:.0f} GB/s", flush=True)
    cases = _CASES
    global _RESULTS_WRITER
    _RESULTS_WRITER = lambda cs: write_results(cs, Path(a.out), ceiling, quiet=True)  # noqa: E731
    for name, fn in [
        ("topk", lambda: run_topk_alone(cases, gen)),
        ("prefill", lambda: run_prefill(cases, gen, a.quick)),
        ("decode", lambda: run_decode(cases, ceiling, gen, a.quick)),
    ]:
        if name in skip:
            continue
        try:
            fn()
        except Exception:
            traceback.print_exc()
        write_results(cases, Path(a.out), ceiling)


if __name__ == "__main__":
    main()
