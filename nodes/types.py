"""Custom ComfyUI socket types of the pack."""

from comfy_api.latest import io

# A scanned dataset folder (trainers.data.folder.DatasetScan).
Dataset = io.Custom("TSUIKA_DATASET")
