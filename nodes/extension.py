"""The pack's node list (ComfyUI V3 API). Node ids are the workflow's identity: never rename."""

from __future__ import annotations

from comfy_api.latest import ComfyExtension, io


class TsuikaExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .dataset import TsuikaDatasetFromImages, TsuikaLoadDataset
        from .dataset_tools import (
            TsuikaCaptionDataset,
            TsuikaCheckDataset,
            TsuikaEditCaptions,
            TsuikaEditCaptionText,
        )
        from .lora import TsuikaApplyLoRA, TsuikaSaveLoRA
        from .train_lora import TsuikaTrainLoRA, TsuikaTrainLoRAAdvanced
        from .train_options import OPTIONS_NODES

        return [TsuikaLoadDataset, TsuikaDatasetFromImages, TsuikaTrainLoRA,
                TsuikaTrainLoRAAdvanced, *OPTIONS_NODES, TsuikaApplyLoRA, TsuikaSaveLoRA,
                TsuikaCaptionDataset, TsuikaCheckDataset, TsuikaEditCaptions,
                TsuikaEditCaptionText]
