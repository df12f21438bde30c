"""File-level model and LoRA tools (extract, resize, bake, ...) over the pure math in ``ops/``.

Each tool reads its inputs with the project's readers, calls ``ops``, and writes one
safetensors file atomically (never over an existing file unless asked) with provenance
metadata: which tool, which source files (names only, never local paths), which settings.
The CLI (``trainers/cli_tools.py``) and the nodes call these.
"""
