"""``m3serve demo``: a tiny MiniMax-M3 served on CPU behind the smg gateway, one image+text request.

Everything is local and real: the checkpoint is made here (random weights, so the answer is
noise), the worker is ``python -m sglang.launch_server`` with the m3serve plugin and the ``msa``
attention backend, the gateway is the Rust ``smg`` binary that decodes, resizes and patchifies the
image and tokenizes the prompt, and the request is an OpenAI chat completion over HTTP with the
photo as a data: URI. Prints the answer and where the time went.
"""

from __future__ import annotations

import base64
import io
import tempfile
import time
from pathlib import Path

import requests

from m3serve.launch import SGLangServer


def _photo_data_uri() -> tuple[str, str]:
    """A real photo shipped inside scikit-image (the astronaut), as a PNG data: URI."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((256, 256), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    uri = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return uri, f"scikit-image astronaut, {img.width}x{img.height} PNG, {len(buf.getvalue())} B"


def _chat_body(prompt: str, image_uri: str | None, max_tokens: int) -> dict:
    content: list[dict] = [{"type": "text", "text": prompt}]
    if image_uri is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_uri}})
    return {
        "model": "default",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "temperature": 0,
    }


def _flatten(obj: object, prefix: str = "") -> list[tuple[str, float]]:
    """The gateway's timings JSON (numbers, per-image lists of stage dicts) as (name, ms) rows."""
    if isinstance(obj, dict):  # grid_thw and wire_bytes ride along with the timings; not times
        return [
            row
            for k, v in obj.items()
            if k not in ("grid_thw", "wire_bytes")
            for row in _flatten(v, f"{prefix}{k}.")
        ]
    if isinstance(obj, list):
        return [row for i, v in enumerate(obj) for row in _flatten(v, f"{prefix}{i}.")]
    if isinstance(obj, int | float):
        return [(prefix.rstrip("."), float(obj))]
    return []


def _release_gateway() -> Path:
    """The optimized smg binary, brought up to date with this tree (cargo is incremental)."""
    import os
    import subprocess

    from m3serve.gateway import find_smg_binary
    from m3serve.launch import REPO_ROOT

    env = dict(os.environ)
    env.setdefault("CARGO_TARGET_DIR", str(Path.home() / ".cache" / "m3serve" / "cargo-target"))
    print("[demo] building the smg gateway (release; incremental)", flush=True)
    subprocess.run(
        ["cargo", "build", "--release", "-q", "-p", "smg-gateway"], cwd=REPO_ROOT, env=env, check=True
    )
    os.environ.setdefault("CARGO_TARGET_DIR", env["CARGO_TARGET_DIR"])
    return find_smg_binary(build=False, profile="release")


def _make_checkpoint(family: str, work: Path) -> Path:
    if family == "llama":
        from m3serve.checkpoint.tiny_llama import make_tiny_llama

        return make_tiny_llama(work / "tiny-llama")
    from m3serve.checkpoint.make_tiny import make_tiny

    return make_tiny(work / "tiny-m3")


def run_demo(family: str = "m3", workdir: str | None = None, prompt: str = "Hello") -> int:
    import signal
    import sys

    # SIGTERM/SIGHUP unwind the context managers, so the worker and gateway (own process groups)
    # never outlive the demo
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    from m3serve.gateway import start_gateway

    work = Path(workdir or tempfile.mkdtemp(prefix="m3serve-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ckpt = _make_checkpoint(family, work)
    t_ckpt = time.perf_counter() - t0
    print(f"[demo] tiny {family} checkpoint: {ckpt} ({t_ckpt:.2f} s)", flush=True)
    smg = _release_gateway()  # built (incrementally) now, so its time is not counted below
    extra = ["--attention-backend", "msa", "--page-size", "16"] if family == "m3" else []
    image_uri, image_desc = _photo_data_uri() if family == "m3" else (None, "none (text model)")

    t0 = time.perf_counter()
    with SGLangServer(ckpt, log_path=work / "sglang.log", extra_args=extra) as server:
        t_worker = time.perf_counter() - t0
        print(f"[demo] SGLang worker (CPU) ready at {server.url} ({t_worker:.1f} s)", flush=True)
        t0 = time.perf_counter()
        with start_gateway([server.url], ckpt, log=work / "smg.log", binary=smg) as gw:
            t_gw = time.perf_counter() - t0
            print(f"[demo] smg gateway ready at {gw.url} ({t_gw * 1e3:.0f} ms)", flush=True)
            body = _chat_body(prompt, image_uri, max_tokens=16)
            t0 = time.perf_counter()
            r = requests.post(gw.url + "/v1/chat/completions", json=body, timeout=600)
            total = time.perf_counter() - t0
    if r.status_code != 200:
        print(f"[demo] request failed: HTTP {r.status_code}: {r.text[:500]}")
        return 1
    out = r.json()
    usage = out.get("usage", {})
    stages = out.get("m3serve", {}).get("timings_ms", {})
    grids = [im.get("grid_thw") for im in stages.get("per_image", []) if isinstance(im, dict)]
    print(f"[demo] image: {image_desc}; patch grid (t, h, w): {grids}")
    print(f"[demo] prompt: {prompt!r}")
    print(f"[demo] answer (random weights, so not meaningful): {out['choices'][0]['message']['content']!r}")
    print(f"[demo] tokens: prompt {usage.get('prompt_tokens')}, completion {usage.get('completion_tokens')}")
    rows = [("checkpoint made", t_ckpt * 1e3), ("worker start", t_worker * 1e3),
            ("gateway start", t_gw * 1e3)]
    rows += [(f"gateway {name}", value) for name, value in _flatten(stages)]
    rows.append(("request end to end", total * 1e3))
    width = max(len(name) for name, _ in rows)
    print("[demo] timings:")
    for name, value in rows:
        print(f"  {name:<{width}} {value:10.2f} ms")
    print(f"[demo] logs: {work / 'sglang.log'}, {work / 'smg.log'}")
    return 0
