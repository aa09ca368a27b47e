"""What e2e_serving.py, long_request.py and tp_serving.py share: the two implementations
compared, the servers that serve them side by side (on one card, or one card each), a check that
those cards are alike, and the card's name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from m3serve.launch import SGLangServer

# only the MSA layers differ: m3serve's kernels vs SGLang 0.5.23's in-tree MSA ops; "inv": ours in
# the TP-invariant mode (m3serve.models.invariant: TP 1 and TP 2 give the same bits); "unfused":
# ours with the model's norms / RoPE as torch ops (M3SERVE_FUSED_OPS=0, the A/B of fused_ops)
IMPL_ENV = {
    "ours": {"M3SERVE_MSA_IMPL": "auto"},
    "sglang": {"M3SERVE_MSA_IMPL": "sglang"},
    "inv": {"M3SERVE_MSA_IMPL": "auto", "M3SERVE_TP_INVARIANT": "2"},
    "unfused": {"M3SERVE_MSA_IMPL": "auto", "M3SERVE_FUSED_OPS": "0"},
}


def server_args(
    page_size: int, context_length: int, max_running: int, extra: str = ""
) -> list[str]:
    """The launch_server flags every serving script shares (msa backend, page = MSA block, the
    pytorch sampler (sgl_kernel's is not there), 8K prefill chunks), plus ``extra`` (space
    separated)."""
    return [
        "--attention-backend", "msa", "--page-size", str(page_size),
        "--sampling-backend", "pytorch", "--context-length", str(context_length),
        "--chunked-prefill-size", "8192", "--max-running-requests", str(max_running),
        "--trust-remote-code", *extra.split(),
    ]  # fmt: skip


def physical_gpus(gpus: Sequence[str]) -> list[str]:
    """The devices behind ``--gpus`` ids, which count within the visible devices
    (CUDA_VISIBLE_DEVICES, when set), as in any CUDA program. A server pinned to a card gets a
    CUDA_VISIBLE_DEVICES of its own, which replaces the inherited one, so it must name the device
    itself: session 9's call 4 passed ``--gpus 0,1`` in a lane that saw cards 2,3, and its servers
    landed on cards 0,1 beside the other lane's."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    visible = [v for v in visible if v]
    if not visible or not gpus:
        return list(gpus)
    out = []
    for g in gpus:
        i = int(g)
        if not 0 <= i < len(visible):
            raise SystemExit(
                f"--gpus {g}: only {len(visible)} devices are visible "
                f"(CUDA_VISIBLE_DEVICES={','.join(visible)}); ids count within those"
            )
        out.append(visible[i])
    return out


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
    gpus: Sequence[str] = (),
) -> dict[str, SGLangServer]:
    """One server per implementation, to start with launch.start_staggered.

    Without ``gpus`` they share the visible card: SGLang's fraction counts the whole card,
    including what the servers before hold, so server i gets (i + 1) · ``first_mem_fraction``
    (at most 0.9): equal shares, the rest left for activations. With ``gpus`` (one device id
    per server, counted within the visible devices: ``physical_gpus``) each has a card of its
    own and takes 0.85 of it. Either way the same ``max_total_tokens`` gives them equal KV
    capacity."""
    if gpus and len(gpus) < len(names):
        raise SystemExit(f"--gpus lists {len(gpus)} cards for {len(names)} servers")

    def share(i: int) -> list[str]:
        if device != "cuda":  # a CPU dry run
            return []
        # sharing a card, server i may reach (i + 1) x the first's share of the whole card:
        # equal shares, and what is left above them is room for activations (session 9 call 5:
        # 0.45 then 0.9 left ours none; it ran out of memory in its warm-up)
        frac = 0.85 if gpus else round(min(0.9, (i + 1) * first_mem_fraction), 3)
        return ["--mem-fraction-static", str(frac), *gpu_args]

    cards = physical_gpus(gpus) if device == "cuda" else list(gpus)

    def env(i: int, n: str) -> dict[str, str]:
        pin = {"CUDA_VISIBLE_DEVICES": cards[i]} if gpus and device == "cuda" else {}
        return {**IMPL_ENV[n], **pin}

    return {
        n: SGLangServer(
            ckpt,
            device=device,
            use_standin=True,
            max_total_tokens=max_total_tokens,
            extra_args=[*base_args, *share(i)],
            env=env(i, n),
            log_path=Path(f"{log_prefix}_{n}.log"),
            startup_timeout=480,
        )
        for i, n in enumerate(names)
    }


_PARITY = r"""
import json, sys, torch
torch.cuda.set_device(int(sys.argv[1]))
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16); b = torch.randn_like(a)
x = torch.empty(1 << 28, device="cuda", dtype=torch.float32); y = torch.empty_like(x)
def t(f, n):
    f(); torch.cuda.synchronize(); s = torch.cuda.Event(True); e = torch.cuda.Event(True)
    s.record(); [f() for _ in range(n)]; e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / n / 1e3
mm = t(lambda: a @ b, 20); cp = t(lambda: y.copy_(x), 20)
print(json.dumps({"gpu": int(sys.argv[1]), "name": torch.cuda.get_device_name(),
    "bf16_gemm_tflops": round(2 * 8192**3 / mm / 1e12, 1), "copy_gbps": round(2 * x.numel() * 4 / cp / 1e9)}))
"""


def card_parity(gpus: Sequence[str]) -> list[dict[str, Any]]:
    """bf16 GEMM TFLOP/s and device-copy GB/s of each card, so a comparison that puts each
    implementation on a card of its own shows the cards are alike (one subprocess each)."""
    rows = []
    for g in gpus:
        p = subprocess.run([sys.executable, "-c", _PARITY, g], capture_output=True, text=True,
                           check=False, timeout=120)  # fmt: skip
        line = p.stdout.strip().splitlines()[-1:] or [""]
        rows.append(
            json.loads(line[0]) if p.returncode == 0 else {"gpu": g, "error": p.stderr[-500:]}
        )
    return rows


def card_name(device: str) -> str:
    if device != "cuda":
        return "cpu (dry run)"
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    names = out.stdout.strip().splitlines()
    return f"{len(names)}x {names[0]}" if len(names) > 1 else (names[0] if names else "?")
