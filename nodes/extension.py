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
        from .lora_grid import TsuikaLoRAGrid
        from .lora_tools import (
            TsuikaBakeLoRA,
            TsuikaExtractLoRA,
            TsuikaInspectLoRA,
            TsuikaMergeCheckpoints,
            TsuikaMergeLoRAs,
            TsuikaResizeLoRA,
        )
        from .train_checkpoint import TsuikaTrainCheckpoint, TsuikaTrainCheckpointAdvanced
        from .train_embedding import TsuikaTrainEmbedding, TsuikaTrainEmbeddingAdvanced
        from .train_hypernetwork import (
            TsuikaTrainHypernetwork,
            TsuikaTrainHypernetworkAdvanced,
        )
        from .train_lora import TsuikaTrainLoRA, TsuikaTrainLoRAAdvanced
        from .train_options import OPTIONS_NODES

        return [TsuikaLoadDataset, TsuikaDatasetFromImages, TsuikaTrainLoRA,
                TsuikaTrainLoRAAdvanced, *OPTIONS_NODES, TsuikaApplyLoRA, TsuikaSaveLoRA,
                TsuikaTrainCheckpoint, TsuikaTrainCheckpointAdvanced, TsuikaTrainHypernetwork,
                TsuikaTrainHypernetworkAdvanced, TsuikaTrainEmbedding,
                TsuikaTrainEmbeddingAdvanced, TsuikaExtractLoRA, TsuikaResizeLoRA,
                TsuikaBakeLoRA, TsuikaMergeCheckpoints, TsuikaMergeLoRAs, TsuikaInspectLoRA,
                TsuikaCaptionDataset, TsuikaCheckDataset, TsuikaEditCaptions,
                TsuikaEditCaptionText, TsuikaLoRAGrid]
