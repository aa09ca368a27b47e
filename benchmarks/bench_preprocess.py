"""CPU image preprocessing: m3serve's Rust core vs transformers' processors, one core.

Cases, per input (640x480, 1280x960, 4032x3024; JPEG q90 and PNG):
- whole request (decode included): ours `m3serve.preprocess.preprocess(bytes)` vs
  transformers 5.19 `MiniMaxM3VLImageProcessor` (torchvision backend) on PIL-decoded bytes, and vs
  `Qwen2VLImageProcessorPil` with M3's parameters (min 3136 / max 451,584 pixels, patch 14,
  merge 2, CLIP mean/std);
- decode alone: ours (libjpeg-turbo / png) vs PIL `open + exif_transpose + convert("RGB")`;
- after decode (resize + normalise + patchify): ours vs the M3 processor on a decoded image.
Throughput (img/s per core) is 1000 / p50 ms. torch runs with 1 thread; ours is single-threaded.
All in one process on the same bytes. Writes benchmarks/results/preprocess_cpu.{json,md}
(the md's table is replaced; the hand-written run notes below it are kept).
Usage: python benchmarks/bench_preprocess.py [--iters 15]  (pins itself to one CPU; the
thread-scaling case then widens the affinity to every CPU).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import io
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from m3serve import preprocess as pp

RESULTS = Path(__file__).resolve().parent / "results"
SIZES = [(640, 480), (1280, 960), (4032, 3024)]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def make_image(w: int, h: int) -> np.ndarray:
    """A real photo (scikit-image's coffee) resized to w x h, with mild noise for texture."""
    from skimage import data

    im = Image.fromarray(data.coffee()).resize((w, h), Image.Resampling.LANCZOS)
    arr = np.asarray(im).astype(np.int16)
    rng = np.random.default_rng(0)
    arr = arr + rng.integers(-6, 7, size=arr.shape)
    return np.clip(arr, 0, 255).astype(np.uint8)


def encode(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def timeit(fn: Callable[[], object], iters: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def p50(x: list[float]) -> float:
    return statistics.median(x)


def p99(x: list[float]) -> float:
    return float(np.percentile(x, 99))


def hand_written_notes(md: str) -> list[str]:
    """The lines below the results table of a previous preprocess_cpu.md (run notes written by
    hand), so a rerun replaces the table and keeps them."""
    lines = md.splitlines()
    try:
        i = next(k for k, line in enumerate(lines) if line.startswith("| case | ours p50"))
    except StopIteration:
        return []
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    while i < len(lines) and not lines[i].strip():
        i += 1
    return [*lines[i:], ""] if i < len(lines) else []


def pil_decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=15)
    args = ap.parse_args()
    load0 = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    all_cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(all_cpus)})
    torch.set_num_threads(1)

    import transformers
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.minimax_m3_vl.image_processing_minimax_m3_vl import (
        MiniMaxM3VLImageProcessor,
    )
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    hf = MiniMaxM3VLImageProcessor()
    pilproc = Qwen2VLImageProcessorPil(
        min_pixels=3136,
        max_pixels=451_584,
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
        image_mean=OPENAI_CLIP_MEAN,
        image_std=OPENAI_CLIP_STD,
    )

    cases: list[dict] = []
    rows: list[str] = []

    def add(
        case: str,
        ours: list[float] | float,
        baseline: str,
        base: list[float] | float,
        unit: str = "ms",
    ) -> None:
        o = p50(ours) if isinstance(ours, list) else ours
        b = p50(base) if isinstance(base, list) else base
        ratio = b / o if unit == "ms" else o / b
        cases.append(
            {
                "case": case,
                "ours": round(o, 4),
                "baseline": baseline,
                "baseline_value": round(b, 4),
                "unit": unit,
                "ratio": round(ratio, 3),
                "roofline_fraction": None,
            }
        )
        o99 = f"{p99(ours):.2f}" if isinstance(ours, list) else "-"
        b99 = f"{p99(base):.2f}" if isinstance(base, list) else "-"
        rows.append(
            f"| {case} | {o:.2f} | {o99} | {baseline} | {b:.2f} | {b99} | {unit} | {ratio:.2f}x |"
        )
        print(rows[-1], flush=True)

    for w, h in SIZES:
        arr = make_image(w, h)
        for fmt in ("JPEG", "PNG"):
            data = encode(arr, fmt)
            tag = f"{w}x{h} {fmt}"
            iters = args.iters if w < 4000 else max(5, args.iters)
            timings: list[pp.StageTimings] = []

            def ours_total(data: bytes = data, timings: list = timings) -> None:
                timings.append(pp.preprocess(data).timings)

            t_ours = timeit(ours_total, iters)
            t_hf = timeit(lambda data=data: hf(images=pil_decode(data), return_tensors="pt"), iters)
            t_pil = timeit(
                lambda data=data: pilproc(images=pil_decode(data), return_tensors="pt"), iters
            )
            decoded = pil_decode(data)
            t_pil_dec = timeit(lambda data=data: pil_decode(data), iters)
            t_hf_after = timeit(lambda im=decoded: hf(images=im, return_tensors="pt"), iters)
            ts = timings[1:]
            t_ours_dec = [t.decode_us / 1e3 for t in ts]
            t_ours_after = [(t.resize_us + t.normalize_patchify_us) / 1e3 for t in ts]

            add(
                f"{tag} whole request (decode incl.)",
                t_ours,
                "HF MiniMaxM3VLImageProcessor (torchvision)",
                t_hf,
            )
            add(
                f"{tag} whole request (decode incl.)",
                t_ours,
                "HF Qwen2VLImageProcessorPil (M3 params)",
                t_pil,
            )
            add(f"{tag} decode", t_ours_dec, "PIL open+exif_transpose+convert(RGB)", t_pil_dec)
            add(
                f"{tag} resize+normalize+patchify",
                t_ours_after,
                "HF MiniMaxM3VLImageProcessor on decoded image",
                t_hf_after,
            )
            add(
                f"{tag} throughput per core",
                1e3 / p50(t_ours),
                "HF MiniMaxM3VLImageProcessor (torchvision)",
                1e3 / p50(t_hf),
                unit="img/s",
            )

    # Scaling with cores: the GIL is released, so threads run in parallel. Pool threads are
    # created after the affinity is widened, so they inherit every CPU.
    os.sched_setaffinity(0, all_cpus)
    data = encode(make_image(1280, 960), "JPEG")
    n_img = 40
    rates = {}
    for threads in (1, 2):
        with cf.ThreadPoolExecutor(threads) as ex:
            list(ex.map(pp.preprocess, [data] * 4))
            t0 = time.perf_counter()
            list(ex.map(pp.preprocess, [data] * n_img))
            rates[threads] = n_img / (time.perf_counter() - t0)
    add(
        "1280x960 JPEG throughput, 2 threads vs 1 thread (ours)",
        rates[2],
        "ours, 1 thread",
        rates[1],
        unit="img/s",
    )

    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "pillow": Image.__version__,
        "triton": None,
        "flashinfer": None,
        "sglang": None,
    }
    try:
        import torchvision

        versions["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    result = {
        "benchmark": "preprocess_cpu",
        "card": cpu_model(),
        "date": datetime.date.today().isoformat(),
        "versions": versions,
        "cases": cases,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "preprocess_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    md_path = RESULTS / "preprocess_cpu.md"
    notes = hand_written_notes(md_path.read_text() if md_path.exists() else "")
    md = [
        f"# preprocess_cpu — {result['card']}, {result['date']}, one core (torch threads 1)",
        "",
        "p50 / p99 over the timed iterations; ratio > 1 means ours is better.",
        "",
        f"Load average at start: {load0}. The 2-core dev box is shared with other engineers'",
        "builds and tests, so absolute numbers are noisy; ours and the baselines run interleaved",
        "in the same process on the same bytes, so ratios are the meaningful figures.",
        "",
        "| case | ours p50 | ours p99 | baseline | baseline p50 | baseline p99 | unit | ratio |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        *notes,
    ]
    md_path.write_text("\n".join(md))
    print(f"wrote {RESULTS / 'preprocess_cpu.json'}")


if __name__ == "__main__":
    main()
