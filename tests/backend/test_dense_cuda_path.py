"""The msa backend's dense layers on CUDA (FlashInfer paged prefill / decode) against the reference.

Chunked prefill at odd lengths with prefixes (query i of request r at prefix_r + i), then a decode
step, at M3's head shapes (GQA 16, head_dim 128, block 128), bf16, over a scattered page table.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from m3serve.kernels.msa import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.filterwarnings("ignore::UserWarning:sglang.*"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

BLOCK, HQ, HKV, D, PAGES = 128, 32, 2, 128, 96


class _Pool:
    def __init__(self) -> None:
        shape = (PAGES, HKV, BLOCK, D)
        self.k = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
        self.v = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v

    def set_kv_buffer(self, layer: Any, loc: Any, k: torch.Tensor, v: torch.Tensor) -> None:
        slots = loc.loc.long()
        p, o = slots // BLOCK, slots % BLOCK
        self.k[p, :, o] = k.to(self.k.dtype)
        self.v[p, :, o] = v.to(self.v.dtype)


def _backend() -> Any:
    from m3serve.backend.msa_backend import MSAAttnBackend

    b = object.__new__(MSAAttnBackend)
    b.setup(
        device="cuda", kv_pool=_Pool(), req_to_token_pool=None, block=BLOCK, topk=16,
        index_dim=128, sparse_layers=set(), num_q_heads=HQ, num_kv_heads=HKV,
        q_dtype=torch.bfloat16, context_len=PAGES * BLOCK,
    )  # fmt: skip
    assert b.dense_fast and b.dense_layout == "HND"
    return b


def _step(b: Any, table: torch.Tensor, q_lens: list[int], prefixes: list[int], decode: bool, g):
    from m3serve.backend.msa_backend import MSAMetadata

    seq = [p + q for p, q in zip(prefixes, q_lens, strict=True)]
    cu = torch.zeros(len(seq) + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(torch.tensor(q_lens, device="cuda"), 0)
    loc = torch.cat([
        table[r, torch.arange(p, p + q, device="cuda") // BLOCK].long() * BLOCK
        + torch.arange(p, p + q, device="cuda") % BLOCK
        for r, (p, q) in enumerate(zip(prefixes, q_lens, strict=True))
    ])  # fmt: skip
    seq_t = torch.tensor(seq, dtype=torch.int32, device="cuda")
    pre_t = torch.tensor(prefixes, dtype=torch.int32, device="cuda")
    md = MSAMetadata(cu, pre_t, seq_t, table, loc, is_decode=decode, max_q_len=max(q_lens),
                     max_seq_len=max(seq), q_lens_host=q_lens, seq_lens_host=seq)  # fmt: skip
    b.forward_metadata = md
    fb = SimpleNamespace(out_cache_loc=loc, out_cache_loc_is_physical=True)
    t = sum(q_lens)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D, scaling=D**-0.5)
    q = torch.randn(t, HQ * D, generator=g, device="cuda").to(torch.bfloat16)
    k = torch.randn(t, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
    v = torch.randn(t, HKV, D, generator=g, device="cuda").to(torch.bfloat16)
    import m3serve.backend.msa_backend as mb

    def no_sglang_save(layer, forward_batch, k, v):
        b.token_to_kv_pool.set_kv_buffer(
            layer, SimpleNamespace(loc=forward_batch.out_cache_loc), k, v
        )

    b._save_kv = no_sglang_save
    out = mb.MSAAttnBackend._run(b, q, k, v, layer, fb, True, None, None)
    want = ref.ref_dense_causal_attention(
        q.view(t, HQ, D).float(), b.token_to_kv_pool.k.float(), b.token_to_kv_pool.v.float(),
        table, cu, pre_t, seq_t, D**-0.5,
    )  # fmt: skip
    return out.view(t, HQ, D).float(), want.float()


def test_dense_cuda_path_matches_reference() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("flashinfer")
    g = torch.Generator(device="cuda").manual_seed(0)
    b = _backend()
    table = torch.randperm(PAGES, device="cuda")[:3 * 10].view(3, 10).to(torch.int32)  # fmt: skip
    steps = (
        ([300, 1, 517], [0, 0, 0], False),  # first chunks (one a single token)
        ([129, 255, 700], [300, 1, 517], False),  # chunks behind odd prefixes
        ([1, 1, 1], [429, 256, 1217], True),  # decode
        ([1, 1, 1], [430, 257, 1218], True),
    )
    for q_lens, prefixes, decode in steps:
        out, want = _step(b, table, q_lens, prefixes, decode, g)
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
        assert b._dense_plan_md is b.forward_metadata  # the FlashInfer path ran, not the SDPA one
