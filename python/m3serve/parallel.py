"""The process's tensor-parallel rank and size, from SGLang's parallel context (SGLang 0.5.23's
ModelRunner has no ``tp_size`` attribute). Read by the model (head/expert shards, all-reduce) and
by the msa backend (heads per rank), so the two split heads by the same numbers."""

from __future__ import annotations


def tp_rank_size() -> tuple[int, int]:
    from sglang.srt.runtime_context import get_parallel

    p = get_parallel()
    return int(p.tp_rank), int(p.tp_size)
