"""A small byte-level BPE tokenizer with MiniMax-M3's special tokens, trained locally.

No tokenizer can be downloaded here, so tiny checkpoints carry one trained by the ``tokenizers``
library on an embedded corpus. Training is deterministic (single thread, fixed corpus), so the
same call writes the same bytes. The special tokens and the chat template follow MiniMax's
format: ``]~!b[`` begins a conversation, ``]~b]ROLE\\n … [e~[\\n`` wraps a turn, and each image
part becomes one ``]<]image[>[``: the processor (transformers', SGLang's, the gateway's) replaces it
by ``]<]start of image[>[`` + the image token once per merged patch + ``]<]end of image[>[``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

BOS = "]~!b["
TURN = "]~b]"
EOS = "[e~["
IMAGE_TOKEN = "]<]image[>["
VIDEO_TOKEN = "]<]video[>["
IMAGE_START = "]<]start of image[>["
IMAGE_END = "]<]end of image[>["
VIDEO_START = "]<]start of video[>["
VIDEO_END = "]<]end of video[>["
PAD = "<pad>"
SPECIAL_TOKENS = [
    BOS, TURN, EOS, IMAGE_TOKEN, VIDEO_TOKEN, IMAGE_START, IMAGE_END, VIDEO_START, VIDEO_END, PAD,
]  # fmt: skip

# Jinja that both transformers (jinja2) and the gateway (minijinja) render identically.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'ai' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{- ']~b]' ~ role ~ '\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] in ['image', 'image_url'] -%}{{- ']<]image[>[' -}}"
    "{%- elif part['type'] in ['video', 'video_url'] -%}{{- ']<]video[>[' -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '[e~[\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- ']~b]ai\n' -}}{%- endif -%}"
)

_CORPUS = """\
The quick brown fox jumps over the lazy dog while the server streams tokens to the client.
MiniMax M3 reads a million tokens of context and looks at images through a vision tower.
Sparse attention picks sixteen blocks of one hundred and twenty eight tokens for every query.
A photo of an astronaut, a cat named Chelsea, a cup of coffee and a rocket on the launch pad.
What is in this image? Describe the colors, the shapes and the people you can see.
The gateway decodes JPEG and PNG files, resizes them, and cuts them into patches of fourteen pixels.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000 3.14 2.71 42 128 2048 65536 1048576.
Hello! How are you today? I am fine, thank you. Please answer in one short sentence.
def forward(self, x): return self.proj(torch.relu(x)) + x  # a residual block
{"role": "user", "content": "tell me a story about a red kite flying over green hills"}
Latency, throughput, tokens per second, time to first token, batch size, concurrency, GPU memory.
"""


def _train_tokenizer(vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tok


def write_tokenizer(out_dir: str | os.PathLike[str], vocab_size: int = 640) -> dict[str, Any]:
    """Write tokenizer.json + tokenizer_config.json; return the special token ids and vocab size."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # deterministic merges order
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer(vocab_size)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=False) + "\n")
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    added = {
        str(ids[t]): {
            "content": t, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for t in SPECIAL_TOKENS
    }  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": None,
        "model_max_length": 1048576,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return {
        "vocab_size": tok.get_vocab_size(),
        "bos_token_id": ids[BOS],
        "eos_token_id": ids[EOS],
        "pad_token_id": ids[PAD],
        "image_token_id": ids[IMAGE_TOKEN],
        "video_token_id": ids[VIDEO_TOKEN],
        "image_start_token_id": ids[IMAGE_START],
        "image_end_token_id": ids[IMAGE_END],
        "video_start_token_id": ids[VIDEO_START],
        "video_end_token_id": ids[VIDEO_END],
        "special_token_ids": ids,
    }
