"""M3SERVE_MSA_IMPL=sglang (SGLang 0.5.23's in-tree MSA ops inside our backend) computes what our
kernels compute: the baseline the serving benchmark compares against is the same attention.

Two backends are built by ``setup()`` over the same K/V contents at M3's shapes (64 q / 4 KV heads,
head_dim 128, index dim 128, block 128, top-k 16): ours over the page-major HND pool, the in-tree
ops over SGLang's token-major pool (what they read). Each serves the same chunked prefill (two
requests, the second chunk behind a prefix) and decode steps for one MSA layer; outputs must
agree within bf16 tolerance on all but a sliver of rows (a near-tie in block scores may select a
different block in bf16).
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
PAGES_PER_REQ = 40


class _Pool:
    """K/V per layer, HND [pages, H, block, D] or token-major [slots, H, D]."""

    def __init__(self, pages: int, hnd: bool) -> None:
        shape = (pages, HKV, BLOCK, D) if hnd else (pages * BLOCK, HKV, D)
        self.hnd = hnd
        self.k = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)
        self.v = torch.zeros(shape, device="cuda", dtype=torch.bfloat16)

    def get_key_buffer(self, layer_id: int) -> torch.Tensor:
        return self.k

    def get_value_buffer(self, layer_id: int) -> torch.Tensor:
        return self.v

    def write(self, loc: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.hnd:
            p, o = loc // BLOCK, loc % BLOCK
            self.k[p, :, o], self.v[p, :, o] = k, v
        else:
            self.k[loc], self.v[loc] = k, v


def _backend(impl: str, r2t: torch.Tensor, pages: int) -> Any:
    from m3serve.backend.msa_backend import MSAAttnBackend

    b = object.__new__(MSAAttnBackend)
    pool = _Pool(pages, hnd=impl != "sglang")
    b.setup(
        device="cuda", kv_pool=pool, req_to_token_pool=SimpleNamespace(req_to_token=r2t),
        block=BLOCK, topk=TOPK, index_dim=DI, sparse_layers={0}, num_q_heads=HQ,
        num_kv_heads=HKV, q_dtype=torch.bfloat16, context_len=PAGES_PER_REQ * BLOCK, impl=impl,
        index_dtype="bf16", dense_impl="torch",
    )  # fmt: skip
    assert b.sparse_impl == ("sglang" if impl == "sglang" else "fast")
    b._save_kv = lambda layer, fb, k, v: pool.write(fb.out_cache_loc, k, v)
    return b


def _mode(decode: bool) -> Any:
    return SimpleNamespace(is_decode_or_idle=lambda: decode, is_extend=lambda: not decode)


def _step(backends: list[Any], r2t: torch.Tensor, q_lens: list[int], prefixes: list[int], g):
    decode = all(q == 1 for q in q_lens) and all(p > 0 for p in prefixes)
    reqs = torch.arange(1, len(q_lens) + 1, device="cuda")
    seq = [p + q for p, q in zip(prefixes, q_lens, strict=True)]
    loc = torch.cat([r2t[r, p : p + q].long() for r, p, q in zip(reqs.tolist(), prefixes, q_lens, strict=True)])  # fmt: skip
    seq_t = torch.tensor(seq, device="cuda")
    fb = SimpleNamespace(
        forward_mode=_mode(decode), seq_lens=seq_t, seq_lens_cpu=seq_t.cpu(),
        extend_seq_lens=torch.tensor(q_lens, device="cuda"), extend_seq_lens_cpu=q_lens,
        req_pool_indices=reqs, out_cache_loc=loc,
    )  # fmt: skip
    t = sum(q_lens)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", generator=g).bfloat16()

    q, k, v, iq, ik = r(t, HQ, D), r(t, HKV, D), r(t, HKV, D), r(t, HKV, DI), r(t, 1, DI)
    layer = SimpleNamespace(layer_id=0, tp_q_head_num=HQ, tp_k_head_num=HKV, head_dim=D, scaling=D**-0.5)
    outs = []
    for b in backends:
        b.init_forward_metadata(fb)
        outs.append(b._run(q, k, v, layer, fb, True, iq, ik)[1].view(t, HQ, D).float())
    return outs


def test_sglang_ops_inside_the_backend_match_our_kernels() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    pytest.importorskip("sglang.srt.layers.attention.minimax_sparse_ops.minimax_sparse")
    g = torch.Generator(device="cuda").manual_seed(0)
    pages = 1 + 2 * PAGES_PER_REQ
    perm = torch.randperm(pages - 1, device="cuda", generator=g) + 1
    tok = torch.arange(PAGES_PER_REQ * BLOCK, device="cuda")
    r2t = torch.zeros(3, PAGES_PER_REQ * BLOCK, dtype=torch.int32, device="cuda")
    for r in range(2):
        r2t[r + 1] = (perm[r * PAGES_PER_REQ + tok // BLOCK] * BLOCK + tok % BLOCK).int()
    ours, theirs = _backend("auto", r2t, pages), _backend("sglang", r2t, pages)
    steps = [([3000, 1500], [0, 0]), ([1700, 333], [3000, 1500]), ([1, 1], [4700, 1833]),
             ([1, 1], [4701, 1834])]  # fmt: skip
    for q_lens, prefixes in steps:
        a, b = _step([ours, theirs], r2t, q_lens, prefixes, g)
        close = torch.isclose(a, b, atol=3e-2, rtol=3e-2).flatten(1).all(dim=1)
        assert close.float().mean() >= 0.99, (
            f"{q_lens}/{prefixes}: only {close.float().mean():.3f} of rows agree, max |Δ| "
            f"{(a - b).abs().max():.3g}"
        )
