"""Build SGLang 0.5.23's in-tree MiniMax-M3 on CPU and run its own ``load_weights`` over checkpoints.

Run as a script (``python intree_loader_probe.py OUT.json CKPT_DIR...``) by
tests/model/test_intree_loader.py, in a subprocess of its own because it needs what the pytest
process must not have: the stand-in ``sgl_kernel`` first on ``sys.path`` (SGLang's layer modules
import names from ``sgl_kernel`` at import time; the CUDA wheel cannot load here) and a gloo
process group with SGLang's model-parallel groups initialised (its parallel layers read the TP
rank/size at construction, even at TP 1) — process-wide state that would leak into other tests.

Per checkpoint it writes, as JSON:
  ``arch`` / ``cls``: the architecture in config.json and the in-tree class registered for it;
  ``not_written``: in-tree parameters still (partly) NaN after a full load (every floating
      parameter is NaN-filled first);
  ``not_needed``: checkpoint tensors whose omission leaves no parameter NaN, i.e. tensors the
      in-tree loader silently skips (its loader ``continue``s or only logs on unknown names);
  ``mismatched``: parameters whose loaded values differ from the checkpoint tensors put through
      the in-tree name/shard mapping (written out independently below, from reading the loader);
  ``warnings``: what SGLang's loggers warned during the load;
  ``persistent_buffers``: buffers that would be in a state dict (none is read from a checkpoint).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from pathlib import Path

import torch

TESTS = Path(__file__).resolve().parents[1]


def _init_parallel() -> None:
    """World of one gloo rank + SGLang's TP/PP/EP groups, as sglang.test.layer_ut_utils does."""
    from m3serve.launch import free_port

    os.environ["MASTER_PORT"] = str(free_port())
    from sglang.test.layer_ut_utils import init_single_process_dist

    init_single_process_dist(master_port=int(os.environ["MASTER_PORT"]), backend="gloo")


def _expected(ckpt: dict[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """In-tree parameter name → the value its loader should write, from the checkpoint tensors.

    Mirrors MiniMaxM3SparseForConditionalGeneration.load_weights + minimax_vl_common's vision
    helpers: ``language_model.`` stripped, ``block_sparse_moe`` → ``mlp``; q/k/v → ``qkv_proj``
    (rows q|k|v); gate/up → ``gate_up_proj``; index_q/index_k → ``index_qkv_proj``; experts
    w1/w3 → ``experts.w13_weight[e]`` (rows w1|w3), w2 → ``experts.w2_weight[e]``; vision q/k/v
    (weights and biases) concatenated into ``qkv_proj``, ``mlp.fc1/fc2`` → ``fc1/fc2``,
    ``out_proj`` → ``proj``; projector and merge MLP moved under ``vision_tower.``.
    """
    out: dict[str, torch.Tensor] = {}
    parts: dict[str, dict[str, torch.Tensor]] = {}
    experts: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
    stacked = [
        (".index_qkv_proj.", ".index_q_proj.", "q"),
        (".index_qkv_proj.", ".index_k_proj.", "k"),
        (".qkv_proj.", ".q_proj.", "q"),
        (".qkv_proj.", ".k_proj.", "k"),
        (".qkv_proj.", ".v_proj.", "v"),
        (".gate_up_proj.", ".gate_proj.", "0"),
        (".gate_up_proj.", ".up_proj.", "1"),
    ]
    order = {"q": 0, "k": 1, "v": 2, "0": 0, "1": 1}
    expert_re = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(w[123])\.weight$")
    for name, t in ckpt.items():
        if name.startswith("language_model."):
            name = name[len("language_model.") :].replace(".block_sparse_moe.", ".mlp.")
        else:
            name = name.replace(".mlp.fc1.", ".fc1.").replace(".mlp.fc2.", ".fc2.")
            name = name.replace(".self_attn.out_proj.", ".self_attn.proj.")
            if name.startswith(("patch_merge_mlp.", "multi_modal_projector.")):
                name = "vision_tower." + name
        m = expert_re.match(name)
        if m:
            experts.setdefault((m.group(1), int(m.group(2))), {})[m.group(3)] = t
            continue
        for packed, part, shard in stacked:
            if part in name:
                parts.setdefault(name.replace(part, packed), {})[shard] = t
                break
        else:
            out[name] = t
    for name, shards in parts.items():
        out[name] = torch.cat([shards[s] for s in sorted(shards, key=order.__getitem__)])
    for prefix in {p for p, _ in experts}:
        w = [experts[(prefix, e)] for e in range(num_experts)]
        out[prefix + ".w13_weight"] = torch.stack([torch.cat([x["w1"], x["w3"]]) for x in w])
        out[prefix + ".w2_weight"] = torch.stack([x["w2"] for x in w])
    return out


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def probe(ckpt_dir: Path) -> dict[str, object]:
    from safetensors.torch import load_file
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.models import minimax_m3_vl

    config = json.loads((ckpt_dir / "config.json").read_text())
    arch = config["architectures"][0]
    # how SGLang's registry keys in-tree models: each module's EntryClass by class name
    (cls,) = [c for c in minimax_m3_vl.EntryClass if c.__name__ == arch]
    hf_config = ModelConfig(str(ckpt_dir), dtype="float32").hf_config
    model = cls(hf_config).eval()
    params = dict(model.named_parameters())
    ckpt = load_file(str(ckpt_dir / "model.safetensors"))

    def load(skip: str | None = None) -> set[str]:
        """NaN-fill every parameter, load the checkpoint (less ``skip``), return the NaN ones."""
        with torch.no_grad():
            for p in params.values():
                p.fill_(float("nan"))
            model.load_weights((n, t) for n, t in ckpt.items() if n != skip)
        return {n for n, p in params.items() if torch.isnan(p).any()}

    handler = _Warnings()
    logging.getLogger("sglang").addHandler(handler)
    try:
        not_written = load()
    finally:
        logging.getLogger("sglang").removeHandler(handler)
    expected = _expected(ckpt, hf_config.text_config.num_local_experts)
    mismatched = sorted(
        n
        for n, p in params.items()
        if n in expected and not torch.equal(p.detach().float(), expected[n].float())
    )
    unmapped = sorted(set(expected) - set(params))
    not_needed = sorted(n for n in ckpt if not (load(skip=n) - not_written))
    state = model.state_dict()
    return {
        "arch": arch,
        "cls": f"{cls.__module__}.{cls.__qualname__}",
        "num_params": len(params),
        "num_tensors": len(ckpt),
        "not_written": sorted(not_written),
        "not_needed": not_needed,
        "mismatched": mismatched,
        "expected_but_no_param": unmapped,
        "params_without_expectation": sorted(set(params) - set(expected)),
        "warnings": handler.messages,
        "persistent_buffers": sorted(n for n, _ in model.named_buffers() if n in state),
    }


def main() -> None:
    out, dirs = Path(sys.argv[1]), [Path(d) for d in sys.argv[2:]]
    _init_parallel()
    torch.set_default_dtype(torch.float32)
    result = {str(d): probe(d) for d in dirs}
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    sys.path.insert(0, str(TESTS / "sgl_kernel_standin"))
    main()
