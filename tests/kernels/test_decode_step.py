"""The whole MSA decode step's launch structure: fused top-k and programmatic dependent launch.

CPU: the PDL switch is off without CUDA / under the interpreter, and its scope restores the
previous state. GPU: one decode step (index scoring + top-k, fused or in two launches, then the
split-KV sparse attention) captured in a CUDA graph with PDL on gives, replay after replay on new
inputs, exactly the ids and outputs of the plain eager step (PDL changes when kernels start, never
what they compute).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # before the kernels are imported: triton.jit reads it then
    os.environ.setdefault("TRITON_INTERPRET", "1")

from m3serve.kernels.msa import pdl as pdl_mod
from m3serve.kernels.msa.index_select import (
    DecodeSelectWorkspace,
    score_blocks_decode,
    select_blocks_decode,
)
from m3serve.kernels.msa.reference import quantize_index_k_fp8
from m3serve.kernels.msa.sparse_decode import SparseDecodeWrapper

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_pdl_switch_scopes_and_stays_off_on_cpu():
    t = torch.zeros(1)
    before = pdl_mod._STATE["on"]
    with pdl_mod.pdl(True):
        assert pdl_mod._STATE["on"] is True
        assert pdl_mod.pdl_active(t) is False  # CPU tensor: never
        with pdl_mod.pdl(False):
            assert pdl_mod._STATE["on"] is False
        assert pdl_mod._STATE["on"] is True
    assert pdl_mod._STATE["on"] == before
    assert pdl_mod.launch_kwargs(True) == {"launch_pdl": True}
    assert pdl_mod.launch_kwargs(False) == {}
    if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter has no registers to cap
        assert pdl_mod.launch_kwargs(False, 128) == {}
    else:
        assert pdl_mod.launch_kwargs(True, 128) == {"launch_pdl": True, "maxnreg": 128}


HKV, GROUP, D, BLOCK, TOPK, DIDX = 4, 16, 128, 128, 16, 128


class Step:
    """Fixed buffers of one decode step (B requests of the given lengths) and its launches."""

    def __init__(self, seq_lens: list[int], fp8: bool, fuse: bool | str) -> None:
        """fuse: True / False — the top-k in the scoring launch / its own launch; "attention" —
        ranked inside the attention launch (score_blocks_decode + run(scores=))."""
        dev = "cuda"
        self.b = len(seq_lens)
        self.nb = max(math.ceil(n / BLOCK) for n in seq_lens)
        pages = self.b * self.nb + 3
        self.fp8, self.fuse = fp8, fuse
        self.seq_host = list(seq_lens)
        self.seq = torch.tensor(seq_lens, dtype=torch.int32, device=dev)
        self.pt = torch.randperm(pages, device=dev)[: self.b * self.nb].view(self.b, self.nb)
        self.pt = self.pt.to(torch.int32).contiguous()
        self.k = torch.empty(pages, HKV, BLOCK, D, device=dev, dtype=torch.bfloat16)
        self.v = torch.empty_like(self.k)
        self.idx_k = torch.empty(pages, BLOCK, DIDX, device=dev, dtype=torch.bfloat16)
        self.idx_k8 = torch.empty(pages, BLOCK, DIDX, device=dev, dtype=torch.float8_e4m3fn)
        self.idx_s8 = torch.empty(pages, BLOCK, device=dev, dtype=torch.float32)
        self.q = torch.empty(self.b, HKV * GROUP, D, device=dev, dtype=torch.bfloat16)
        self.idx_q = torch.empty(self.b, HKV, DIDX, device=dev, dtype=torch.bfloat16)
        self.ids = torch.empty(HKV, self.b, TOPK, dtype=torch.int32, device=dev)
        self.out = torch.empty_like(self.q)
        self.ws = DecodeSelectWorkspace(self.b * HKV, self.nb, dev)
        self.attn = SparseDecodeWrapper(dev, backend="triton", max_rows=self.b * HKV)
        self.attn.plan(self.seq_host, 1, HKV * GROUP, HKV, D, BLOCK, TOPK)

    def load(self, seed: int) -> None:
        g = torch.Generator(device="cuda").manual_seed(seed)
        for t in (self.k, self.v, self.idx_k, self.q, self.idx_q):
            t.copy_(torch.randn(t.shape, generator=g, device="cuda", dtype=t.dtype))
        k8, s8 = quantize_index_k_fp8(self.idx_k.view(-1, DIDX))
        self.idx_k8.copy_(k8.view(self.idx_k8.shape))
        self.idx_s8.copy_(s8.view(self.idx_s8.shape))

    def __call__(self) -> None:
        cache, scale = (self.idx_k8, self.idx_s8) if self.fp8 else (self.idx_k, None)
        if self.fuse == "attention":
            sc = score_blocks_decode(
                self.idx_q, cache, scale, self.pt, self.seq, 1, TOPK,
                max_seq_len=max(self.seq_host), workspace=self.ws,
            )  # fmt: skip
            self.attn.run(
                self.q, self.k, self.v, self.pt, self.ids, 1 / math.sqrt(D), out=self.out,
                scores=sc,
            )  # fmt: skip
            return
        select_blocks_decode(
            self.idx_q, cache, scale, self.pt, self.seq, 1, TOPK, out=self.ids,
            max_seq_len=max(self.seq_host), workspace=self.ws, fuse_topk=self.fuse,
        )  # fmt: skip
        self.attn.run(self.q, self.k, self.v, self.pt, self.ids, 1 / math.sqrt(D), out=self.out)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("fuse", [True, False])
def test_gpu_pdl_step_graph_equals_plain_eager(fp8, fuse):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("PDL needs sm_90+")
    step = Step([1, 129, 1111, 4099, 20000, 130_000, 333, 2048], fp8, fuse)
    step.load(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with pdl_mod.pdl(True), torch.cuda.stream(stream):
        assert pdl_mod.pdl_active(step.q)
        step()  # warm-up: JIT outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2, 3):
        step.load(seed)
        step.ids.fill_(-7)
        step.out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        got_ids, got_out = step.ids.clone(), step.out.clone()
        with pdl_mod.pdl(False):
            step()  # plain eager launches
        torch.cuda.synchronize()
        assert torch.equal(got_ids, step.ids), f"seed {seed}: ids differ under PDL + graph"
        assert torch.equal(got_out, step.out), f"seed {seed}: outputs differ under PDL + graph"
        assert int(step.ws.counters.abs().sum()) == 0


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("fp8", [False, True])
def test_gpu_rank_in_attention_graph_equals_two_launch_eager(fp8):
    """The step with the top-k ranked inside the attention launch, captured in a CUDA graph and
    replayed on new inputs, gives exactly the ids and outputs of the eager two-launch step."""
    lens = [1, 129, 1111, 4099, 20000, 130_000, 333, 2048]
    step = Step(lens, fp8, "attention")
    plain = Step(lens, fp8, False)
    assert step.attn.ranks_in_attention(step.nb)
    step.load(0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()  # warm-up: JIT outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2):
        step.load(seed)
        step.ids.fill_(-7)
        step.out.fill_(float("nan"))
        graph.replay()
        for name in ("k", "v", "idx_k", "idx_k8", "idx_s8", "q", "idx_q", "pt"):
            getattr(plain, name).copy_(getattr(step, name))
        plain()
        torch.cuda.synchronize()
        assert torch.equal(step.ids, plain.ids), f"seed {seed}: ids differ"
        assert torch.equal(step.out, plain.out), f"seed {seed}: outputs differ"
