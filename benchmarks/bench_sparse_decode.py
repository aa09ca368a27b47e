"""MSA decode step on Hopper: ours vs dense FlashInfer decode vs SGLang 0.5.23's M3 decode path.

M3 shapes at TP=1: 64 query heads, 4 KV heads (group 16), head_dim 128, bf16 KV, block = page
= 128, top-k 16, one index head per KV head (d_index 128), Q = 1, every request at the same
context N. Inputs are random (never zeros), pages shuffled over the pool.

Timed, same process, same card, same inputs (triton.testing.do_bench, median; it clears the
L2 with a 256 MB write before every repetition, so nothing stays cached between repetitions):
- dense: FlashInfer BatchDecodeWithPagedKVCacheWrapper (HND, tensor cores, fa2) over all N keys;
- sglang: minimax_sparse_decode (index scoring + top-k + sparse attention, one call, eager;
  SGLang 0.5.23 turns its MSA decode off under CUDA graphs) on the same values in its
  token-major layout, page_size 128 (1 was slower everywhere); its eager time includes its host
  launches and moves with the host's load (0.28-0.60 ms at B8 x 128K on H200 in one session),
  so where it captures, its replay from a CUDA graph (its GPU time alone) is shown beside it;
- ours step: as the backend runs it — score_blocks_decode + the split-KV attention ranking the
  top-k itself (sparse_decode_split(scores=), where the Triton backend wins and rows are ≤ 2048
  blocks; "step_rank"), else select_blocks_decode + SparseDecodeWrapper.run — eager and replayed
  from a CUDA graph, with bf16 and FP8 (+ per-token scale) index keys;
- per step inside one CUDA graph of 8 steps (ours bf16 / FP8 keys, SGLang's step, the dense
  decode): a decode iteration replays one graph over all layers, so this is a layer's step
  without a graph launch; the 8 steps cycle up to 4 layers' index-K caches and 8 query sets so
  no step reads the previous one's keys from L2;
- ours attention only, both backends (FlashInfer rows over rewritten kv_indices; split-KV Triton,
  every SPLIT_CONFIGS entry), replayed from CUDA graphs cycling 8 selections (graph_cycle_ms: the
  eager time of a µs-scale attention is mostly the host's launch cost), eager kept beside it.

Bytes (the roofline; HBM peak = this card's measured device-to-device copy bandwidth):
  sparse attention = B·Q·H_kv·min(16, ⌈N/128⌉)·128·D·2 (K and V)·2 B  +  q and out 2·B·Q·64·D·2 B
  index scoring    = B·N·d_index·2 B (bf16) or B·N·(d_index + 4) B (FP8 + fp32 scale)
  step             = index scoring + sparse attention (scores/top-k traffic ignored: < 0.1 %)
  dense decode     = B·N·H_kv·D·2·2 B + q and out
Writes benchmarks/results/sparse_decode.{json,md} and, with matplotlib, sparse_decode.png.
Usage: python benchmarks/bench_sparse_decode.py [--batches 1,8,32,64] [--contexts 8192,...]
       [--out DIR] [--sglang-site DIR]; python benchmarks/bench_sparse_decode.py --plot-only
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

HQ, HKV, D, BLOCK, TOPK, DIDX = 64, 4, 128, 128, 16, 128
BYTES_PER_TOKEN_ALLOC = HKV * D * 2 * 2 + DIDX * 2 + (DIDX + 4) + 4 + HKV * D * 2  # + NHD copy peak
RESULTS = Path(__file__).parent / "results"
# The anchor points (GPU.md measured SGLang there) run first; MTP cases after the first.
ANCHORS = [(8, 131072), (32, 32768), (1, 1048576), (8, 1048576), (64, 131072)]
MTP_AFTER = (8, 131072)
MTP_CASES = [(8, 131072, 4), (8, 131072, 16), (1, 131072, 16)]
ATTN_COPIES = 8  # selections cycled by the attention-only graphs (graph_cycle_ms)
STEP_CYCLE = 8  # steps per graph for the per-step ("cycle") times: a decode graph holds all layers
STEP_LAYERS = 4  # index-K caches (layers) those steps cycle through, where memory allows


def sparse_attn_bytes(b: int, n: int, q: int = 1) -> int:
    return (
        b * q * HKV * min(TOPK, math.ceil(n / BLOCK)) * BLOCK * D * 2 * 2 + 2 * b * q * HQ * D * 2
    )


def index_bytes(b: int, n: int, fp8: bool) -> int:
    return b * n * (DIDX + 4 if fp8 else DIDX * 2)


def dense_bytes(b: int, n: int) -> int:
    return b * n * HKV * D * 2 * 2 + 2 * b * HQ * D * 2


def bench(fn) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (the HBM ceiling we can reach)."""
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = bench(lambda: y.copy_(x))
    return 2 * (1 << 30) / (ms * 1e-3)


def random_selection(rows: int, nb: int, gen: torch.Generator) -> torch.Tensor:
    """[H_kv, rows / H_kv, TOPK] distinct random blocks < nb − 1 with the local block (nb − 1)
    last: what the top-k hands the attention when every query sits in the last block."""
    keys = torch.rand(rows, nb - 1, device="cuda", generator=gen)
    ids = keys.topk(TOPK - 1, dim=1).indices.to(torch.int32)
    local = torch.full((rows, 1), nb - 1, dtype=torch.int32, device="cuda")
    return torch.cat([ids, local], 1).view(HKV, rows // HKV, TOPK).contiguous()


def graph_cycle_ms(fn, copies: int, calls: int = 16) -> float:
    """ms per call of fn(i), replayed from one CUDA graph of ``calls`` calls cycling ``copies``
    input sets. Decode runs under CUDA graphs, so this keeps the host's launch cost (tens of µs
    per Triton/FlashInfer launch, more than a batch-8 attention's GPU time) out of the number; the
    copies (different selections, ≥ 8 × the pages of one call) keep consecutive calls reading
    HBM, not L2, and do_bench still clears the L2 before every replay."""
    g = capture(lambda: [fn(j % copies) for j in range(calls)])
    ms = bench(g.replay) / calls
    del g
    return ms


def step_cycle_inputs(idx_k, q, idx_q, gen) -> dict[str, list[torch.Tensor]]:
    """STEP_CYCLE query sets and up to STEP_LAYERS index-K caches (bf16 and FP8 + scale; the
    first is the case's own) for step graphs that cycle layers: as many layer copies as fit in a
    quarter of the free memory (one at the largest cases, whose keys dwarf the L2 anyway)."""
    from m3serve.kernels.msa.reference import quantize_index_k_fp8

    per_layer = idx_k.numel() * (idx_k.element_size() + 1) + idx_k.numel() // DIDX * 4
    free, _ = torch.cuda.mem_get_info()
    layers = max(1, min(STEP_LAYERS, 1 + int(0.25 * free // per_layer)))
    caches = [idx_k] + [
        torch.randn(idx_k.shape, device="cuda", dtype=idx_k.dtype, generator=gen)
        for _ in range(layers - 1)
    ]
    k8s, s8s = [], []
    for c in caches:
        k8, s8 = quantize_index_k_fp8(c.view(-1, DIDX))
        k8s.append(k8.view(c.shape))
        s8s.append(s8.view(c.shape[:2]))
    rand = lambda t: torch.randn(t.shape, device="cuda", dtype=t.dtype, generator=gen)  # noqa: E731
    return {
        "idx_k": caches, "idx_k8": k8s, "idx_s8": s8s,
        "q": [q] + [rand(q) for _ in range(STEP_CYCLE - 1)],
        "idx_q": [idx_q] + [rand(idx_q) for _ in range(STEP_CYCLE - 1)],
    }  # fmt: skip


def cycle_keys(cyc: dict[str, list[torch.Tensor]], i: int, fp8: bool):
    """Step i's index keys in a step cycle (step_cycle_inputs): layer i mod the copies; (FP8 keys,
    their scales) or (bf16 keys, None)."""
    layer = i % len(cyc["idx_k"])
    if fp8:
        return cyc["idx_k8"][layer], cyc["idx_s8"][layer]
    return cyc["idx_k"][layer], None


def decode_step(
    w, ranked: bool, q, iq, cache, sc, k, v, page_table, seq_lens, ids, out, scale, ws,
    max_seq_len: int | None, q_fp8: bool = False, fuse: bool | None = None,
) -> None:  # fmt: skip
    """One MSA decode step (Q = 1) through wrapper ``w``: ``ranked``, the scoring launch alone and
    the attention ranking the top-k itself (score_blocks_decode + run(scores=), how the backend
    runs it by default); else select_blocks_decode (top-k fused into the scoring launch or not,
    ``fuse``) and the attention reading its ids."""
    from m3serve.kernels.msa.index_select import score_blocks_decode, select_blocks_decode

    args = (iq, cache, sc, page_table, seq_lens, 1, TOPK)
    if ranked:
        s = score_blocks_decode(*args, max_seq_len=max_seq_len, workspace=ws, q_fp8=q_fp8)
        w.run(q, k, v, page_table, ids, scale, out=out, scores=s)
        return
    select_blocks_decode(
        *args, out=ids, max_seq_len=max_seq_len, workspace=ws, q_fp8=q_fp8, fuse_topk=fuse
    )
    w.run(q, k, v, page_table, ids, scale, out=out)


def capture(fn) -> torch.cuda.CUDAGraph:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g


def set_split_config(wrapper, cfg: str, seq_host: list[int], qn: int) -> None:
    """Switch the split kernel's config and re-plan (the config's waves set the split count)."""
    wrapper.split_config = cfg
    wrapper.plan(seq_host, qn, HQ, HKV, D, BLOCK, TOPK)


def load_sglang(site: str | None):
    if site:
        sys.path.insert(0, site)
    try:
        from sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse import (
            minimax_sparse_decode,
        )
    except Exception as err:  # the baseline is optional: report why it is missing
        print(f"[sglang baseline unavailable: {type(err).__name__}: {err}]")
        return None
    return minimax_sparse_decode


def sglang_decode(fn, q, k_nhd, v_nhd, idx_q, idx_k_nhd, req_to_token, seq_lens, n, page_size):
    """SGLang 0.5.23's M3 decode step (scores + top-k + sparse attention), as its backend calls it."""
    b = q.shape[0]
    _, o = fn(
        q=q,
        sink=None,
        k_cache=k_nhd,
        v_cache=v_nhd,
        idx_q=idx_q,
        idx_sink=None,
        idx_k_cache=idx_k_nhd,
        idx_v_cache=None,
        req_to_token=req_to_token,
        slot_ids=torch.arange(b, dtype=torch.int32, device=q.device),
        seq_lens=seq_lens,
        max_seqlen=n,
        block_size_q=1,
        block_size_k=BLOCK,
        topk=TOPK,
        init_blocks=0,
        local_blocks=1,
        sm_scale=1 / math.sqrt(D),
        idx_sm_scale=1 / math.sqrt(DIDX),
        score_type="max",
        disable_index_value=True,
        page_size=page_size,
    )
    return o


def dense_wrapper(page_table: torch.Tensor, n: int):
    import flashinfer

    b, nb = page_table.shape
    ws = torch.zeros(128 << 20, dtype=torch.uint8, device="cuda")
    w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        ws, "HND", use_tensor_cores=True, backend="fa2"
    )
    indptr = torch.arange(b + 1, dtype=torch.int32) * nb
    last = torch.full((b,), n - (nb - 1) * BLOCK, dtype=torch.int32)
    w.plan(
        indptr.cuda(), page_table.flatten().contiguous(), last.cuda(), HQ, HKV, D, BLOCK,
        q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16, sm_scale=1 / math.sqrt(D),
    )  # fmt: skip
    return w


def case_inputs(b: int, n: int) -> tuple:
    """One case's random inputs on the GPU: (nb, pages, gen, page_table, k, v, idx_k, idx_k8,
    idx_s8, q, idx_q, seq_lens, seq_host) — B requests at context n, pages shuffled over a pool."""
    from m3serve.kernels.msa.reference import quantize_index_k_fp8

    dev = "cuda"
    nb = math.ceil(n / BLOCK)
    pages = b * nb + 1
    gen = torch.Generator(device=dev).manual_seed(b * 7919 + n)
    page_table = (
        torch.randperm(pages, device=dev, generator=gen)[: b * nb].view(b, nb).to(torch.int32)
    )
    k = torch.randn(pages, HKV, BLOCK, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(pages, HKV, BLOCK, D, device=dev, dtype=torch.bfloat16, generator=gen)
    idx_k = torch.randn(pages, BLOCK, DIDX, device=dev, dtype=torch.bfloat16, generator=gen)
    idx_k8, idx_s8 = quantize_index_k_fp8(idx_k.view(-1, DIDX))
    idx_k8, idx_s8 = idx_k8.view(pages, BLOCK, DIDX), idx_s8.view(pages, BLOCK)
    q = torch.randn(b, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
    idx_q = torch.randn(b, HKV, DIDX, device=dev, dtype=torch.bfloat16, generator=gen)
    seq_lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    return (nb, pages, gen, page_table, k, v, idx_k, idx_k8, idx_s8, q, idx_q, seq_lens, [n] * b)


def run_case(b: int, n: int, sglang_fn, peak: float) -> dict[str, Any]:
    from m3serve.kernels.msa.index_select import (
        DecodeSelectWorkspace,
        fuse_topk_default,
        select_blocks_decode,
    )
    from m3serve.kernels.msa.pdl import pdl, pdl_active
    from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
    from m3serve.kernels.msa.sparse_decode_split import SPLIT_CONFIGS

    dev = "cuda"
    nb, pages, gen, page_table, k, v, idx_k, idx_k8, idx_s8, q, idx_q, seq_lens, seq_host = (
        case_inputs(b, n)
    )
    scale = 1 / math.sqrt(D)
    res: dict[str, Any] = {"batch": b, "context": n}

    # -- dense FlashInfer decode on the same cache --
    dw = dense_wrapper(page_table, n)
    out_dense = torch.empty_like(q)
    res["dense_ms"] = bench(lambda: dw.run(q, (k, v), out=out_dense))

    # -- ours: selection (bf16 / FP8 index keys) + sparse attention --
    ws = DecodeSelectWorkspace(b * HKV, nb, dev)
    topk_ids = torch.empty(HKV, b, TOPK, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    wrappers = {
        name: SparseDecodeWrapper(dev, backend=name, max_rows=b * HKV)
        for name in ("flashinfer", "triton")
    }
    for w in wrappers.values():
        w.plan(seq_host, 1, HQ, HKV, D, BLOCK, TOPK)
    res["auto_backend_default"] = SparseDecodeWrapper(dev, backend="auto").auto_pick(b * HKV)

    def select(fp8: bool, q_fp8: bool = False, fuse: bool | None = None) -> None:
        """``q_fp8``: FP8 keys and queries quantized in-kernel (e4m3 x e4m3 MMA, opt-in);
        ``fuse``: top-k inside the scoring launch or as a second launch (None: the default)."""
        cache, sc = (idx_k8, idx_s8) if fp8 else (idx_k, None)
        select_blocks_decode(
            idx_q,
            cache,
            sc,
            page_table,
            seq_lens,
            1,
            TOPK,
            out=topk_ids,
            max_seq_len=n,
            workspace=ws,
            q_fp8=q_fp8,
            fuse_topk=fuse,
        )

    def attn(name: str):
        return lambda: wrappers[name].run(q, k, v, page_table, topk_ids, scale, out=out)

    select(False)
    sels = [topk_ids] + [random_selection(b * HKV, nb, gen) for _ in range(ATTN_COPIES - 1)]

    def attn_i(name: str):
        return lambda i: wrappers[name].run(q, k, v, page_table, sels[i], scale, out=out)

    res["attn_flashinfer_ms"] = graph_cycle_ms(attn_i("flashinfer"), len(sels))
    res["attn_flashinfer_eager_ms"] = bench(attn("flashinfer"))
    ref_out = wrappers["flashinfer"].run(q, k, v, page_table, topk_ids, scale).float()
    for cfg in SPLIT_CONFIGS:
        set_split_config(wrappers["triton"], cfg, seq_host, 1)
        res[f"attn_triton_{cfg}_ms"] = graph_cycle_ms(attn_i("triton"), len(sels))
    best_cfg = min(SPLIT_CONFIGS, key=lambda c: res[f"attn_triton_{c}_ms"])
    set_split_config(wrappers["triton"], best_cfg, seq_host, 1)
    res["attn_triton_ms"], res["split_config"] = res[f"attn_triton_{best_cfg}_ms"], best_cfg
    res["attn_triton_eager_ms"] = bench(attn("triton"))
    tri_out = wrappers["triton"].run(q, k, v, page_table, topk_ids, scale).float()
    res["attn_backends_maxdiff"] = float((tri_out - ref_out).abs().max())
    best = "triton" if res["attn_triton_ms"] <= res["attn_flashinfer_ms"] else "flashinfer"
    res["step_backend"] = best
    # the step as the backend runs it by default (M3SERVE_DECODE_RANK=attention): on the Triton
    # backend the top-k is ranked inside the attention launch (its own split configs); the
    # launch-structure experiments below (fuse=True / False) keep the top-k launch
    ranked = SparseDecodeWrapper(dev, backend="triton", max_rows=b * HKV, ranked=True)
    ranked.plan(seq_host, 1, HQ, HKV, D, BLOCK, TOPK)
    rank_here = best == "triton" and ranked.ranks_in_attention(nb)
    res["step_rank"] = "attention" if rank_here else "launch"

    def run_step(qq, iq, cache, sc, q_fp8: bool = False, fuse: bool | None = None) -> None:
        rank = rank_here and fuse is None
        decode_step(
            ranked if rank else wrappers[best], rank, qq, iq, cache, sc, k, v, page_table,
            seq_lens, topk_ids, out, scale, ws, n, q_fp8, fuse,
        )  # fmt: skip

    def step(fp8: bool, q_fp8: bool = False, fuse: bool | None = None):
        def fn() -> None:
            cache, sc = (idx_k8, idx_s8) if fp8 else (idx_k, None)
            run_step(q, idx_q, cache, sc, q_fp8, fuse)

        return fn

    res["select_bf16_ms"] = bench(lambda: select(False))
    res["select_fp8_ms"] = bench(lambda: select(True))
    res["step_bf16_eager_ms"] = bench(step(False))
    g = capture(step(False))
    res["step_bf16_graph_ms"] = bench(g.replay)
    g.replay()
    torch.cuda.synchronize()
    ours_out = out.float().clone()
    g8 = capture(step(True))
    res["step_fp8_graph_ms"] = bench(g8.replay)
    del g, g8
    # -- the step's launch structure: top-k fused into the scoring launch or not (the default
    #    fuses rows of ≤ FUSE_TOPK_MAX_BLOCKS), and programmatic dependent launch (PDL) between
    #    the step's kernels on or off (opt-in, M3SERVE_PDL=1); outputs must not change --
    res["fuse_topk_default"] = fuse_topk_default(nb)
    for fuse in (True, False):
        g = capture(step(True, fuse=fuse))
        res[f"step_fp8_graph_{'fused' if fuse else 'two_launch'}_ms"] = bench(g.replay)
        del g
    with pdl(True):
        res["pdl_active"] = pdl_active(q)
        for fp8 in (False, True):
            g = capture(step(fp8))
            res[f"step_{'fp8' if fp8 else 'bf16'}_graph_pdl_ms"] = bench(g.replay)
            if not fp8:
                g.replay()
                torch.cuda.synchronize()
                res["pdl_same_out"] = bool(torch.equal(out.float(), ours_out))
            del g
        if best == "triton":
            res["attn_triton_pdl_ms"] = graph_cycle_ms(attn_i("triton"), len(sels))
    try:  # FP8 keys + FP8 queries (M3SERVE_INDEX_Q_FP8=1)
        res["select_fp8q_ms"] = bench(lambda: select(True, True))
        g8q = capture(step(True, True))
        res["step_fp8q_graph_ms"] = bench(g8q.replay)
        del g8q
    except Exception as err:
        print(f"  fp8 queries failed: {type(err).__name__}: {err}")

    # -- per-step time inside one graph of several steps: a decode iteration replays one graph
    #    over all layers, so a layer's step costs its kernels' GPU time without a graph launch.
    #    Each step of the cycle reads its own layer's index-K cache (copies) with its own queries,
    #    so no step finds the previous one's keys in L2. Same method for SGLang's step below. --
    cyc = step_cycle_inputs(idx_k, q, idx_q, gen)
    res["cycle_layers"] = len(cyc["idx_k"])

    def step_i(fp8: bool):
        def fn(i: int) -> None:
            run_step(cyc["q"][i], cyc["idx_q"][i], *cycle_keys(cyc, i, fp8))

        return fn

    try:  # the dense baseline timed the same way (its KV dwarfs the L2: one cache suffices)
        res["dense_cycle_ms"] = graph_cycle_ms(
            lambda i: dw.run(cyc["q"][i], (k, v), out=out_dense), STEP_CYCLE, STEP_CYCLE
        )
    except Exception as err:
        print(f"  dense FlashInfer under a CUDA graph: {type(err).__name__}: {str(err)[:200]}")
    res["step_bf16_cycle_ms"] = graph_cycle_ms(step_i(False), STEP_CYCLE, STEP_CYCLE)
    res["step_fp8_cycle_ms"] = graph_cycle_ms(step_i(True), STEP_CYCLE, STEP_CYCLE)

    # -- SGLang 0.5.23 on the same values, token-major (its layout) --
    if sglang_fn is not None:
        del wrappers, ws
        torch.cuda.empty_cache()
        k_nhd = k.transpose(1, 2).reshape(pages * BLOCK, HKV, D).contiguous()
        del k
        v_nhd = v.transpose(1, 2).reshape(pages * BLOCK, HKV, D).contiguous()
        del v
        tok = torch.arange(n, device=dev)
        req_to_token = (page_table[:, tok // BLOCK].long() * BLOCK + tok % BLOCK).to(torch.int32)
        idx_k_nhd = idx_k.view(pages * BLOCK, 1, DIDX)
        best = None
        for ps in (BLOCK,):  # page_size 1 was slower at every point of the first H200 run

            def fn(ps=ps):
                return sglang_decode(
                    sglang_fn, q, k_nhd, v_nhd, idx_q, idx_k_nhd, req_to_token, seq_lens, n, ps
                )

            try:
                o = fn()
                ms = bench(fn)
            except Exception as err:
                print(f"  sglang page_size {ps} failed: {type(err).__name__}: {err}")
                continue
            res[f"sglang_ps{ps}_ms"] = ms
            res[f"sglang_ps{ps}_maxdiff"] = float((o.float() - ours_out).abs().max())
            if best is None or ms < best[0]:
                best = (ms, ps, fn)
        if best is not None:
            res["sglang_ms"], res["sglang_page_size"] = best[:2]
            # SGLang runs this step eagerly (0.5.23 turns MSA decode off under its CUDA graphs),
            # so its time above includes its host launches and moves with the host's load; a
            # replay from a graph, where it captures, is its kernels' GPU time alone.
            try:
                g_sg = capture(best[2])
                res["sglang_graph_ms"] = bench(g_sg.replay)
                del g_sg
                ps = best[1]

                def sg_i(i: int, ps=ps) -> None:
                    layer = i % len(cyc["idx_k"])
                    sglang_decode(
                        sglang_fn, cyc["q"][i], k_nhd, v_nhd, cyc["idx_q"][i],
                        cyc["idx_k"][layer].view(pages * BLOCK, 1, DIDX), req_to_token, seq_lens,
                        n, ps,
                    )  # fmt: skip

                res["sglang_cycle_ms"] = graph_cycle_ms(sg_i, STEP_CYCLE, STEP_CYCLE)
            except Exception as err:
                print(f"  sglang under a CUDA graph: {type(err).__name__}: {str(err)[:200]}")
    res["bytes_attn"] = sparse_attn_bytes(b, n)
    res["bytes_step_bf16"] = sparse_attn_bytes(b, n) + index_bytes(b, n, False)
    res["bytes_step_fp8"] = sparse_attn_bytes(b, n) + index_bytes(b, n, True)
    res["bytes_dense"] = dense_bytes(b, n)
    res["peak_Bps"] = peak
    return res


def to_cases(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cases = []

    def add(case, ours, baseline, base_val, nbytes, peak):
        cases.append({
            "case": case, "ours": round(ours, 5), "baseline": baseline, "baseline_value": round(base_val, 5),
            "unit": "ms", "ratio": round(base_val / ours, 3),
            "roofline_fraction": round(nbytes / (ours * 1e-3) / peak, 3),
        })  # fmt: skip

    for r in rows:
        tag = f"b{r['batch']} n{r['context'] // 1024}K" + (f" [{r['run']}]" if r.get("run") else "")
        pk = r["peak_Bps"]
        add(
            f"{tag} step bf16-idx graph",
            r["step_bf16_graph_ms"],
            "dense FlashInfer decode",
            r["dense_ms"],
            r["bytes_step_bf16"],
            pk,
        )
        add(
            f"{tag} step fp8-idx graph",
            r["step_fp8_graph_ms"],
            "dense FlashInfer decode",
            r["dense_ms"],
            r["bytes_step_fp8"],
            pk,
        )
        if "step_fp8q_graph_ms" in r:
            add(
                f"{tag} step fp8-idx + fp8 q graph",
                r["step_fp8q_graph_ms"],
                "dense FlashInfer decode",
                r["dense_ms"],
                r["bytes_step_fp8"],
                pk,
            )
        if "sglang_ms" in r:
            sg = f"SGLang 0.5.23 minimax_sparse_decode (eager, page_size {r['sglang_page_size']})"
            add(
                f"{tag} step bf16-idx graph",
                r["step_bf16_graph_ms"],
                sg,
                r["sglang_ms"],
                r["bytes_step_bf16"],
                pk,
            )
            add(
                f"{tag} step bf16-idx eager",
                r["step_bf16_eager_ms"],
                sg,
                r["sglang_ms"],
                r["bytes_step_bf16"],
                pk,
            )
        if "step_fp8_cycle_ms" in r:
            for idx, key, nbytes in (
                ("bf16", "step_bf16_cycle_ms", r["bytes_step_bf16"]),
                ("fp8", "step_fp8_cycle_ms", r["bytes_step_fp8"]),
            ):
                add(
                    f"{tag} step {idx}-idx per step in an 8-step graph",
                    r[key],
                    "dense FlashInfer decode",
                    r["dense_ms"],
                    nbytes,
                    pk,
                )
            if "dense_cycle_ms" in r:
                add(
                    f"{tag} step fp8-idx per step in an 8-step graph",
                    r["step_fp8_cycle_ms"],
                    "dense FlashInfer decode, per call in an 8-call graph",
                    r["dense_cycle_ms"],
                    r["bytes_step_fp8"],
                    pk,
                )
            if "sglang_cycle_ms" in r:
                add(
                    f"{tag} step bf16-idx per step in an 8-step graph",
                    r["step_bf16_cycle_ms"],
                    "SGLang 0.5.23 minimax_sparse_decode, per step in an 8-step graph",
                    r["sglang_cycle_ms"],
                    r["bytes_step_bf16"],
                    pk,
                )
        best = min(r["attn_flashinfer_ms"], r["attn_triton_ms"])
        add(
            f"{tag} sparse attention (best backend)",
            best,
            "FlashInfer rows (ours, kv_indices rewrite)",
            r["attn_flashinfer_ms"],
            r["bytes_attn"],
            pk,
        )
    return cases


def mtp_cases(mtp: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cases = []
    for r in mtp:
        tag = f"b{r['batch']} n{r['context'] // 1024}K Q{r['q_per_req']}" + (
            f" [{r['run']}]" if r.get("run") else ""
        )
        ours = min(r["attn_flashinfer_ms"], r["attn_triton_ms"])
        cases.append({
            "case": f"{tag} sparse attention (best backend)", "ours": round(ours, 5),
            "baseline": "FlashInfer rows (ours, kv_indices rewrite)",
            "baseline_value": round(r["attn_flashinfer_ms"], 5), "unit": "ms",
            "ratio": round(r["attn_flashinfer_ms"] / ours, 3),
            "roofline_fraction": round(r["bytes_attn"] / (ours * 1e-3) / r["peak_Bps"], 3),
        })  # fmt: skip
    return cases


def _section(title: str, header: str) -> list[str]:
    """A markdown table's lead: a blank line, its title, a blank line, the header row and the
    separator row (as many columns as the header has)."""
    return ["", title, "", header, "|" + "---|" * (header.count("|") - 1)]


def _opt(v: float | None, spec: str) -> str:
    """A table cell: ``v`` formatted, or a dash where the run has no value."""
    return "—" if v is None else format(v, spec)


def _vs_pair(base: float | None, a: float, b: float) -> str:
    """'base/a× / base/b×' (the baseline over ours with bf16 / FP8 index keys), or a dash."""
    return "—" if base is None else f"{base / a:.2f}× / {base / b:.2f}×"


def write_markdown(doc: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    gbs = lambda nbytes, ms: nbytes / (ms * 1e-3) / 1e9  # noqa: E731
    lines = [
        f"# MSA sparse decode — {doc['card']}, {doc['date']}",
        "",
        f"versions: {json.dumps(doc['versions'])}; HBM copy peak {rows[0]['peak_Bps'] / 1e12:.2f} TB/s"
        if rows
        else "",
        "",
        "Times in ms (median, L2 cleared per repetition). step = index scoring + top-k + sparse attention.",
        "",
        "| run | B | N | dense FI | SGLang (ps) | ours bf16 eager | ours bf16 graph | ours fp8 graph | vs dense (bf16/fp8) | vs SGLang (graph/eager) | step bf16 GB/s (% peak) | attn FI rows (graph) | attn split, best cfg (graph) | attn GB/s | attn split eager | step attn backend |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pk = r["peak_Bps"]
        sg = f"{r['sglang_ms']:.3f} ({r['sglang_page_size']})" if "sglang_ms" in r else "—"
        if "sglang_graph_ms" in r:
            sg += f"; graph {r['sglang_graph_ms']:.3f}"
        vs_sg = (
            f"{r['sglang_ms'] / r['step_bf16_graph_ms']:.2f}× / {r['sglang_ms'] / r['step_bf16_eager_ms']:.2f}×"
            if "sglang_ms" in r
            else "—"
        )
        ab = min(r["attn_flashinfer_ms"], r["attn_triton_ms"])
        lines.append(
            f"| {r.get('run', '')} | {r['batch']} | {r['context'] // 1024}K | {r['dense_ms']:.3f} | {sg} | {r['step_bf16_eager_ms']:.3f} | "
            f"{r['step_bf16_graph_ms']:.3f} | {r['step_fp8_graph_ms']:.3f} | "
            f"{r['dense_ms'] / r['step_bf16_graph_ms']:.2f}× / {r['dense_ms'] / r['step_fp8_graph_ms']:.2f}× | {vs_sg} | "
            f"{gbs(r['bytes_step_bf16'], r['step_bf16_graph_ms']):.0f} ({r['bytes_step_bf16'] / (r['step_bf16_graph_ms'] * 1e-3) / pk:.0%}) | "
            f"{r['attn_flashinfer_ms']:.4f} | {r['attn_triton_ms']:.4f} | {gbs(r['bytes_attn'], ab):.0f} | {r.get('attn_triton_eager_ms', float('nan')):.4f} | {r['step_backend']}{'/' + r['split_config'] if r['step_backend'] == 'triton' else ''}{', top-k in the attention' if r.get('step_rank') == 'attention' else ''} |"
        )  # fmt: skip
    cy = [r for r in rows if "step_fp8_cycle_ms" in r]
    if cy:
        lines += _section(
            "Per step inside one CUDA graph of 8 steps (a decode iteration replays one graph over all"
            " layers): each step reads its own layer's index-K cache (up to 4 copies) with its own"
            " queries; SGLang's step timed the same way. ms; % = step bytes / time / copy peak.",
            "| B | N | layers | dense FI eager / per call in an 8-call graph | ours bf16 | ours FP8 | vs dense eager (bf16 / FP8) | vs dense in graph (bf16 / FP8) | bf16 % peak | FP8 % peak | SGLang | vs SGLang (bf16 / FP8) | single-step replay bf16 / FP8 |",
        )
        for r in cy:
            pk = r["peak_Bps"]
            b16, f8 = r["step_bf16_cycle_ms"], r["step_fp8_cycle_ms"]
            sgc, dc = r.get("sglang_cycle_ms"), r.get("dense_cycle_ms")
            sg_s, dc_s = _opt(sgc, ".4f"), _opt(dc, ".3f")
            vs_s, vs_dc = _vs_pair(sgc, b16, f8), _vs_pair(dc, b16, f8)
            lines.append(
                f"| {r['batch']} | {r['context'] // 1024}K | {r['cycle_layers']} | {r['dense_ms']:.3f} / {dc_s} | {b16:.4f} | {f8:.4f} | "
                f"{r['dense_ms'] / b16:.2f}× / {r['dense_ms'] / f8:.2f}× | {vs_dc} | {r['bytes_step_bf16'] / (b16 * 1e-3) / pk:.0%} | "
                f"{r['bytes_step_fp8'] / (f8 * 1e-3) / pk:.0%} | {sg_s} | {vs_s} | "
                f"{r['step_bf16_graph_ms']:.4f} / {r['step_fp8_graph_ms']:.4f} |"
            )  # fmt: skip
    ls = [r for r in rows if "step_bf16_graph_pdl_ms" in r]
    if ls:
        lines += _section(
            "Launch structure (graph replays, ms): FP8-key step with the top-k fused into the scoring launch"
            " vs as a second launch; PDL (programmatic dependent launch between the step's kernels, opt-in"
            " M3SERVE_PDL=1) off vs on; the sparse attention alone (split kernel + merge) with PDL.",
            "| B | N | fp8 step fused | fp8 step 2 launches | default fuses | bf16 step | bf16 step PDL | fp8 step | fp8 step PDL | PDL same output | attn split | attn split PDL | attn PDL % peak |",
        )
        for r in ls:
            ap = r.get("attn_triton_pdl_ms")
            ap_s = _opt(ap, ".4f")
            ap_pk = _opt(
                None if ap is None else r["bytes_attn"] / (ap * 1e-3) / r["peak_Bps"], ".0%"
            )
            lines.append(
                f"| {r['batch']} | {r['context'] // 1024}K | {r['step_fp8_graph_fused_ms']:.4f} | {r['step_fp8_graph_two_launch_ms']:.4f} | "
                f"{r['fuse_topk_default']} | {r['step_bf16_graph_ms']:.4f} | {r['step_bf16_graph_pdl_ms']:.4f} | "
                f"{r['step_fp8_graph_ms']:.4f} | {r['step_fp8_graph_pdl_ms']:.4f} | {r.get('pdl_same_out')} | "
                f"{r['attn_triton_ms']:.4f} | {ap_s} | {ap_pk} |"
            )  # fmt: skip
    q8 = [r for r in rows if "step_fp8q_graph_ms" in r]
    if q8:
        lines += _section(
            "FP8 index keys + FP8 queries (q_fp8, opt-in M3SERVE_INDEX_Q_FP8=1), graph:",
            "| B | N | select fp8 keys (eager) | select fp8 keys + q (eager) | step fp8 graph | step fp8 + q graph | vs dense |",
        )
        for r in q8:
            lines.append(
                f"| {r['batch']} | {r['context'] // 1024}K | {r['select_fp8_ms']:.4f} | {r['select_fp8q_ms']:.4f} | "
                f"{r['step_fp8_graph_ms']:.4f} | {r['step_fp8q_graph_ms']:.4f} | {r['dense_ms'] / r['step_fp8q_graph_ms']:.2f}× |"
            )  # fmt: skip
    if doc.get("mtp"):
        lines += _section(
            "MTP verify (Q queries per request, own selection each; ours only):",
            "| B | N | Q | attn FI rows | attn split (cfg) | attn GB/s | step bf16 graph | step GB/s |",
        )
        for r in doc["mtp"]:
            ab = min(r["attn_flashinfer_ms"], r["attn_triton_ms"])
            lines.append(
                f"| {r['batch']} | {r['context'] // 1024}K | {r['q_per_req']} | {r['attn_flashinfer_ms']:.4f} | "
                f"{r['attn_triton_ms']:.4f} ({r['split_config']}) | {gbs(r['bytes_attn'], ab):.0f} | "
                f"{r['step_bf16_graph_ms']:.4f} | {gbs(r['bytes_step_bf16'], r['step_bf16_graph_ms']):.0f} |"
            )  # fmt: skip
    if doc.get("skipped"):
        lines += ["", "Not run: " + ", ".join(doc["skipped"])]
    for name, what in doc.get("runs", {}).items():
        lines += ["", f"{name}: {what}"]
    for note in doc.get("notes", []):
        lines += ["", note]
    lines += ["", "Bytes formulas: see the docstring of benchmarks/bench_sparse_decode.py."]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[no matplotlib: PNG not written]")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for b in sorted({r["batch"] for r in rows}):
        rs = sorted((r for r in rows if r["batch"] == b), key=lambda r: r["context"])
        x = [r["context"] for r in rs]
        axes[0].plot(
            x, [r["dense_ms"] / r["step_bf16_graph_ms"] for r in rs], "o-", label=f"B={b} bf16 idx"
        )
        axes[0].plot(
            x, [r["dense_ms"] / r["step_fp8_graph_ms"] for r in rs], "s--", label=f"B={b} fp8 idx"
        )
        sg = [r for r in rs if "sglang_ms" in r]
        axes[1].plot(
            [r["context"] for r in sg],
            [r["sglang_ms"] / r["step_bf16_graph_ms"] for r in sg],
            "o-",
            label=f"B={b}",
        )
    for ax, title in zip(
        axes,
        (
            "step speedup vs dense FlashInfer decode (ours: CUDA graph)",
            "step speedup vs SGLang 0.5.23 (ours graph, SGLang eager)",
        ),
        strict=True,
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("×")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description="MSA sparse decode benchmark")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--contexts", default="8192,32768,131072,1048576")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--sglang-site", default=None)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--no-mtp", action="store_true", help="skip the MTP (Q > 1) cases")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        doc = json.loads((args.out / "sparse_decode.json").read_text())
        plot(doc["raw"], args.out / "sparse_decode.png")
        return
    import flashinfer

    sglang_fn = load_sglang(args.sglang_site)
    peak = copy_bandwidth()
    print(
        f"device {torch.cuda.get_device_name()}, copy peak {peak / 1e12:.2f} TB/s, flashinfer {flashinfer.__version__}"
    )
    rows: list[dict[str, Any]] = []
    mtp: list[dict[str, Any]] = []
    skipped: list[str] = []
    pairs = [(int(b), int(n)) for b in args.batches.split(",") for n in args.contexts.split(",")]
    pairs.sort(key=lambda p: (p not in ANCHORS, ANCHORS.index(p) if p in ANCHORS else 0))
    for b, n in pairs:  # the anchor cases first: a timeout cuts the others
        free, _ = torch.cuda.mem_get_info()
        if b * n * BYTES_PER_TOKEN_ALLOC > 0.85 * free:
            skipped.append(f"B={b} N={n} (memory)")
            print(f"skip B={b} N={n}: needs ~{b * n * BYTES_PER_TOKEN_ALLOC / 2**30:.0f} GiB")
            continue
        r = run_case(b, n, sglang_fn, peak)
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}))
        torch.cuda.empty_cache()
        write_all(args.out, rows, mtp, skipped, sglang_fn is not None)  # survives a timeout
        if (b, n) == MTP_AFTER and not args.no_mtp:
            for b_m, n_m, q_m in MTP_CASES:
                mtp.append(run_mtp_case(b_m, n_m, q_m, peak))
                print(json.dumps(mtp[-1]))
                torch.cuda.empty_cache()
            write_all(args.out, rows, mtp, skipped, sglang_fn is not None)
    print((args.out / "sparse_decode.md").read_text())


def run_mtp_case(b: int, n: int, qn: int, peak: float) -> dict[str, Any]:
    """MTP verify (Q queries per request, each with its own selection): ours only."""
    from m3serve.kernels.msa.index_select import DecodeSelectWorkspace, select_blocks_decode
    from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper
    from m3serve.kernels.msa.sparse_decode_split import SPLIT_CONFIGS

    dev = "cuda"
    nb = math.ceil(n / BLOCK)
    pages = b * nb + 1
    gen = torch.Generator(device=dev).manual_seed(b * 31 + n + qn)
    page_table = (
        torch.randperm(pages, device=dev, generator=gen)[: b * nb].view(b, nb).to(torch.int32)
    )
    k = torch.randn(pages, HKV, BLOCK, D, device=dev, dtype=torch.bfloat16, generator=gen)
    v = torch.randn(pages, HKV, BLOCK, D, device=dev, dtype=torch.bfloat16, generator=gen)
    idx_k = torch.randn(pages, BLOCK, DIDX, device=dev, dtype=torch.bfloat16, generator=gen)
    q = torch.randn(b * qn, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
    idx_q = torch.randn(b * qn, HKV, DIDX, device=dev, dtype=torch.bfloat16, generator=gen)
    seq_lens = torch.full((b,), n, dtype=torch.int32, device=dev)
    ws = DecodeSelectWorkspace(b * qn * HKV, nb, dev)
    topk_ids = torch.empty(HKV, b * qn, TOPK, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    scale = 1 / math.sqrt(D)

    def select() -> None:
        select_blocks_decode(
            idx_q,
            idx_k,
            None,
            page_table,
            seq_lens,
            qn,
            TOPK,
            out=topk_ids,
            max_seq_len=n,
            workspace=ws,
        )

    select()
    res: dict[str, Any] = {"batch": b, "context": n, "q_per_req": qn}
    ws_ = {name: SparseDecodeWrapper(dev, backend=name) for name in ("flashinfer", "triton")}
    for w in ws_.values():
        w.plan([n] * b, qn, HQ, HKV, D, BLOCK, TOPK)
    sels = [topk_ids] + [random_selection(b * qn * HKV, nb, gen) for _ in range(ATTN_COPIES - 1)]

    def attn_i(name: str):
        return lambda i: ws_[name].run(q, k, v, page_table, sels[i], scale, out=out)

    res["attn_flashinfer_ms"] = graph_cycle_ms(attn_i("flashinfer"), len(sels))
    for cfg in SPLIT_CONFIGS:
        set_split_config(ws_["triton"], cfg, [n] * b, qn)
        res[f"attn_triton_{cfg}_ms"] = graph_cycle_ms(attn_i("triton"), len(sels))
    best_cfg = min(SPLIT_CONFIGS, key=lambda c: res[f"attn_triton_{c}_ms"])
    set_split_config(ws_["triton"], best_cfg, [n] * b, qn)
    res["attn_triton_ms"], res["split_config"] = res[f"attn_triton_{best_cfg}_ms"], best_cfg
    best = "triton" if res["attn_triton_ms"] <= res["attn_flashinfer_ms"] else "flashinfer"

    def step() -> None:
        select()
        ws_[best].run(q, k, v, page_table, topk_ids, scale, out=out)

    g = capture(step)
    res["step_bf16_graph_ms"] = bench(g.replay)
    res["step_backend"] = best
    res["bytes_attn"] = sparse_attn_bytes(b, n, qn)
    res["bytes_step_bf16"] = sparse_attn_bytes(b, n, qn) + index_bytes(b, n, False)
    res["peak_Bps"] = peak
    return res


def write_all(
    out: Path,
    rows: list[dict[str, Any]],
    mtp: list[dict[str, Any]],
    skipped: list[str],
    have_sglang: bool,
) -> None:
    import flashinfer
    import triton

    doc = {
        "benchmark": "sparse_decode",
        "card": torch.cuda.get_device_name(),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "flashinfer": flashinfer.__version__,
            "sglang": "0.5.23 (minimax_sparse ops only)" if have_sglang else None,
        },
        "cases": to_cases(rows) + mtp_cases(mtp),
        "skipped": skipped,
        "raw": rows,
        "mtp": mtp,
    }
    (out / "sparse_decode.json").write_text(json.dumps(doc, indent=1) + "\n")
    write_markdown(doc, rows, out / "sparse_decode.md")
    plot(rows, out / "sparse_decode.png")


if __name__ == "__main__":
    main()
