"""The ``msa`` attention backend for SGLang (MiniMax Sparse Attention on m3serve's kernels).

``register()`` (called by m3serve.plugin in every SGLang process) adds ``msa`` to
``--attention-backend``'s choices and to SGLang's backend registry, and — only when ``msa`` is
the selected backend — tells SGLang that the model is *not* its in-tree MiniMax sparse model, so
SGLang builds a plain paged MHA KV pool and hands every layer to our backend instead of wrapping
it in its own MiniMax hybrid backend. With any other backend SGLang's in-tree MSA path runs
unchanged (the baseline the benchmarks compare against).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from m3serve.argv import argv_has, argv_values

logger = logging.getLogger(__name__)

BACKEND_NAME = "msa"
_ENV = "M3SERVE_ATTENTION_BACKEND_IS_MSA"  # set in the launcher, inherited by SGLang's children


def _argv_selects_msa(argv: list[str]) -> bool:
    flags = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")
    return BACKEND_NAME in argv_values(argv, *flags)


def msa_selected() -> bool:
    """Whether this server runs the ``msa`` backend (runtime context first, then the env mark)."""
    try:
        from sglang.srt.runtime_context import get_exec

        kernel = get_exec().kernel
        chosen = {
            getattr(kernel, n, None)
            for n in ("attention_backend", "prefill_attention_backend", "decode_attention_backend")
        }
        if BACKEND_NAME in chosen:
            return True
    except Exception:  # not published yet in this process
        pass
    return os.environ.get(_ENV, "") == "1"


def _is_minimax_sparse_unless_msa(original: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
    if msa_selected():
        return False
    return original(*args, **kwargs)


def _cell_size_with_index_k(
    original: Callable[..., int], self: Any, kvc: Any, num_layers: int
) -> int:
    """KV bytes per token plus the msa backend's index-K caches (one key per MSA layer, in the
    backend's index dtype), so SGLang sizes the KV pool for the memory the backend really takes."""
    size = original(self, kvc, num_layers)
    if not msa_selected():
        return size
    try:
        from m3serve.backend.msa_backend import msa_settings

        s = msa_settings(kvc.model_config.hf_text_config)
    except (AttributeError, ValueError):
        return size
    from m3serve.backend.msa_backend import index_k_bytes_per_token

    per_layer = index_k_bytes_per_token(s["index_dim"], getattr(kvc, "kv_cache_dtype", None))
    return int(size + len(s["sparse_layers"]) * per_layer)


def _create_msa_backend(runner: Any) -> Any:
    from m3serve.backend.msa_backend import MSAAttnBackend

    return MSAAttnBackend(runner)


def register() -> None:
    from sglang.srt.arg_groups.choices import (
        ATTENTION_BACKEND_CHOICES,
        add_attention_backend_choices,
    )
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    if _argv_selects_msa(sys.argv):
        os.environ[_ENV] = "1"
        from m3serve.backend.msa_backend import msa_impl

        impl = msa_impl()
        if impl != "sglang":
            # page-major HND KV ([pages, H_kv, block, D] per layer): what the MSA kernels (and
            # FlashInfer's one-head view) index; SGLang's MHA pool has this layout built in.
            # SGLang's in-tree MSA ops (impl "sglang") read the default token-major pool.
            os.environ.setdefault("SGLANG_USE_HND_KVCACHE", "1")
        # launch_server parses sys.argv after loading plugins, so graph defaults are set here
        # unless the command line already chose a graph backend: prefill graphs off (the backend
        # captures decode only); decode graphs off too where the backend cannot capture (the
        # torch reference path: CPU, or M3SERVE_MSA_IMPL=reference).
        off = ["--cuda-graph-backend-prefill"]
        if impl == "reference" or argv_values(sys.argv, "--device")[:1] == ["cpu"]:
            off.append("--cuda-graph-backend-decode")
        for flag in off:
            if not argv_has(sys.argv, flag):
                sys.argv += [flag, "disabled"]
                logger.info("msa backend: %s disabled", flag)
    if BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([BACKEND_NAME])
    register_attention_backend(BACKEND_NAME)(_create_msa_backend)
    HookRegistry.register(
        "sglang.srt.configs.model_config.is_minimax_sparse",
        _is_minimax_sparse_unless_msa,
        HookType.AROUND,
    )
    HookRegistry.register(
        "sglang.srt.model_executor.pool_configurator.DefaultPoolConfigurator._compute_cell_size",
        _cell_size_with_index_k,
        HookType.AROUND,
    )
