"""The msa backend's decode step under CUDA graphs: capture once, replay at other lengths = eager.

A backend is built by ``setup()`` (no model runner) over a paged HND pool with M3's attention
shapes (64 q / 4 KV heads, head_dim 128, index dim 128, block 128, top-k 16) and a
req_to_token table like SGLang's. One dense layer (FlashInfer graph-mode decode) and one MSA layer
(fast selection + sparse decode) run per step. The graph is captured the way SGLang's decode
graph runner does it: ``init_cuda_graph_state``, then ``init_forward_metadata_out_graph`` with
dummy lengths (in_capture=True) and the captured layer calls; each replay refills the metadata
with a new batch (padded to the graph's batch size with seq_len 1 / request 0, as SGLang pads)
and must equal the eager step on the same inputs. Batch sizes cover both decode kernels (our
split-KV Triton kernel for few rows, FlashInfer for many).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::UserWarning:sglang.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BLOCK, TOPK, HQ, HKV, D, DI = 128, 16, 64, 4, 128, 128
MAX_PAGES = 24  # context limit 3072 tokens per request


class _Pool:
    def __init__(self, pages: int) -> None:
        shape = (pages, HKV, BLOCK, D)
        g = torch.Generator(device="cuda").manual_seed(1)
        self.k = [torch.randn(shape, device="cuda", generator=g).bfloat16() for _ in range(2)]
        self.v = [torch.randn(shape, device="cuda", generator=g).bfloat16() for _ in range(2)]

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k[layer_id]

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v[layer_id]

    def set_kv_buffer(
        self, layer: Any, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> None:
        p, o = loc // BLOCK, loc % BLOCK
        self.k[layer.layer_id][p, :, o] = k.to(torch.bfloat16)
        self.v[layer.layer_id][p, :, o] = v.to(torch.bfloat16)


def _backend(num_reqs: int, index_dtype: str) -> Any:
    from m3serve.backend.msa_backend import MSAAttnBackend

    pages = 1 + num_reqs * MAX_PAGES  # page 0: where padded requests write, as in SGLang
    r2t = torch.zeros(num_reqs + 1, MAX_PAGES * BLOCK, dtype=torch.int32, device="cuda")
    perm = torch.randperm(pages - 1, device="cuda")[: num_reqs * MAX_PAGES] + 1
    tok = torch.arange(MAX_PAGES * BLOCK, device="cuda")
    for r in range(num_reqs):  # request r + 1 owns a scattered set of pages
        r2t[r + 1] = (perm[r * MAX_PAGES + tok // BLOCK] * BLOCK + tok % BLOCK).to(torch.int32)
    b = object.__new__(MSAAttnBackend)
    b.setup(
        device="cuda", kv_pool=_Pool(pages), req_to_token_pool=SimpleNamespace(req_to_token=r2t),
        block=BLOCK, topk=TOPK, index_dim=DI, sparse_layers={1}, num_q_heads=HQ,
        num_kv_heads=HKV, q_dtype=torch.bfloat16, context_len=MAX_PAGES * BLOCK,
        index_dtype=index_dtype,
    )  # fmt: skip
    assert b.use_fast and b.dense_fast
    g = torch.Generator(device="cuda").manual_seed(2)
    for layer in b.index_k:
        b.index_k[layer].copy_(torch.randn(b.index_k[layer].shape, device="cuda", generator=g))
        if b.index_k_scale[layer] is not None:
            b.index_k_scale[layer].uniform_(0.01, 0.02)
    b._save_kv = lambda layer, fb, k, v: b.token_to_kv_pool.set_kv_buffer(
        layer, fb.out_cache_loc.long(), k, v
    )
    return b


def _mode() -> Any:
    return SimpleNamespace(is_decode_or_idle=lambda: True, is_extend=lambda: False)


def _batch(b: Any, reqs: list[int], lens: list[int], bs: int) -> SimpleNamespace:
    """A decode batch padded to ``bs`` rows (seq_len 1, request 0, slot 0 for the padding)."""
    pad = bs - len(reqs)
    reqs_t = torch.tensor(reqs + [0] * pad, dtype=torch.int64, device="cuda")
    lens_t = torch.tensor(lens + [1] * pad, dtype=torch.int64, device="cuda")
    r2t = b.req_to_token_pool.req_to_token
    loc = r2t[reqs_t, lens_t - 1].long()
    loc[len(reqs) :] = 0
    return SimpleNamespace(
        batch_size=bs, forward_mode=_mode(), req_pool_indices=reqs_t, seq_lens=lens_t,
        seq_lens_cpu=lens_t.cpu(), out_cache_loc=loc,
    )  # fmt: skip


def _inputs(bs: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    return dict(q=r(bs, HQ * D), k=r(bs, HKV, D), v=r(bs, HKV, D), iq=r(bs, HKV, DI),
                ik=r(bs, 1, DI))  # fmt: skip


def _layers(b: Any, fb: Any, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    dense = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D, scaling=D**-0.5)
    sparse = SimpleNamespace(layer_id=1, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D, scaling=D**-0.5)
    o0 = b._run(x["q"], x["k"], x["v"], dense, fb, True, None, None)
    o1 = b._run(x["q"].view(-1, HQ, D), x["k"], x["v"], sparse, fb, True, x["iq"], x["ik"])[1]
    return o0.view(-1, HQ, D), o1


@pytest.mark.parametrize(("graph_bs", "index_dtype"), [(4, "bf16"), (80, "bf16"), (4, "fp8")])
def test_decode_graph_replay_equals_eager(graph_bs: int, index_dtype: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flashinfer")
    num_reqs = graph_bs
    b = _backend(num_reqs, index_dtype)
    b.init_cuda_graph_state(graph_bs, graph_bs)
    static = _inputs(graph_bs, seed=0)
    cap = _batch(b, [1] * graph_bs, [1] * graph_bs, graph_bs)
    # static forward-batch tensors the graph reads (SGLang's decode input buffers)
    fb_static = SimpleNamespace(**vars(cap))

    b.init_forward_metadata_out_graph(fb_static, in_capture=True)
    _layers(b, fb_static, static)  # warm-up: compiles every kernel outside the capture
    torch.cuda.synchronize()
    b.init_forward_metadata_out_graph(fb_static, in_capture=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out0, out1 = _layers(b, fb_static, static)

    rng = torch.Generator().manual_seed(graph_bs)
    for step in range(3):
        n = max(1, graph_bs - step)  # fewer real requests than the graph's batch: padding
        reqs = (torch.randperm(num_reqs, generator=rng)[:n] + 1).tolist()
        lens = torch.randint(1, MAX_PAGES * BLOCK + 1, (n,), generator=rng).tolist()
        lens[0] = MAX_PAGES * BLOCK  # one request at the context limit
        real = _batch(b, reqs, lens, graph_bs)
        x = _inputs(graph_bs, seed=10 + step)
        # eager reference on the unpadded batch
        eager_fb = _batch(b, reqs, lens, n)
        b.init_forward_metadata(eager_fb)
        e0, e1 = _layers(b, eager_fb, {k: t[:n] for k, t in x.items()})
        e0, e1 = e0.clone(), e1.clone()
        # replay: copy inputs into the static buffers, refill metadata, replay
        for key, t in x.items():
            static[key].copy_(t)
        for name in ("req_pool_indices", "seq_lens", "out_cache_loc"):
            getattr(fb_static, name).copy_(getattr(real, name))
        fb_static.seq_lens_cpu = real.seq_lens_cpu
        b.init_forward_metadata_out_graph(fb_static)
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out0[:n].float(), e0.float(), atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(out1[:n].float(), e1.float(), atol=1e-2, rtol=1e-2)
