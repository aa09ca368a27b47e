"""What e2e_serving.py and long_request.py share: the two implementations compared, the servers
that serve them side by side on one card, and the card's name."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

from m3serve.launch import SGLangServer

# only the MSA layers differ: m3serve's kernels vs SGLang 0.5.23's in-tree MSA ops
IMPL_ENV = {"ours": {"M3SERVE_MSA_IMPL": "auto"}, "sglang": {"M3SERVE_MSA_IMPL": "sglang"}}


def side_by_side_servers(
    ckpt: str,
    names: Sequence[str],
    base_args: Sequence[str],
    *,
    device: str,
    max_total_tokens: int,
    first_mem_fraction: float,
    log_prefix: Path,
    gpu_args: Sequence[str] = (),
) -> dict[str, SGLangServer]:
    """One server per implementation, to start with launch.start_staggered. Each profiles the
    memory the ones before it hold, so the first takes ``first_mem_fraction`` of the card and
    later ones 0.9 (SGLang's fraction counts the whole card); the same ``max_total_tokens``
    gives them equal KV capacity."""

    def share(i: int) -> list[str]:
        if device != "cuda":  # a CPU dry run
            return []
        frac = first_mem_fraction if i == 0 else 0.9
        return ["--mem-fraction-static", str(frac), *gpu_args]

    return {
        n: SGLangServer(
            ckpt,
            device=device,
            use_standin=True,
            max_total_tokens=max_total_tokens,
            extra_args=[*base_args, *share(i)],
            env=IMPL_ENV[n],
            log_path=Path(f"{log_prefix}_{n}.log"),
            startup_timeout=480,
        )
        for i, n in enumerate(names)
    }


def card_name(device: str) -> str:
    if device != "cuda":
        return "cpu (dry run)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return out.stdout.strip()
