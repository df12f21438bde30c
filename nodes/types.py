"""Custom ComfyUI socket types of the pack."""

from comfy_api.latest import io

# A scanned dataset folder (trainers.data.folder.DatasetScan).
Dataset = io.Custom("TSUIKA_DATASET")

# Training options set by the options nodes: {"section.key": value} (nodes/options.py).
Options = io.Custom("TSUIKA_OPTIONS")
