"""Stand-in for Hugging Face ``datasets`` in the benchmark client on the GPU machine only.

sglang.benchmark.serving imports ``datasets.load_dataset`` at module level for datasets we do not
use (MMMU etc.); the real package (with pyarrow) is too large to travel to the offline GPU machine.
The random-ids dataset we drive the server with never calls it.
"""

from __future__ import annotations

from typing import Any


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    raise NotImplementedError("datasets is a stand-in on this machine: use --dataset-name random-ids")
