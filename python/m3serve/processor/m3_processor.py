"""The M3 multimodal processor (SGLang side of the gateway wire format)."""

from __future__ import annotations

from typing import Any

from sglang.srt.multimodal.processors.base_processor import BaseMultimodalProcessor

from m3serve.models.m3_vl import MiniMaxM3SparseForConditionalGeneration


class M3MultimodalProcessor(BaseMultimodalProcessor):
    models = [MiniMaxM3SparseForConditionalGeneration]  # noqa: RUF012 (SGLang's class attribute)
    gpu_image_decode = False

    async def process_mm_data_async(
        self, image_data: Any, audio_data: Any, input_text: Any, request_obj: Any, **kwargs: Any
    ) -> Any:
        raise ValueError("m3serve: image inputs are not supported yet")
