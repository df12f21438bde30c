"""Tsuika: train and edit diffusion models inside ComfyUI graphs, or headless from a CLI.

Importing this package has no side effects and imports nothing heavy: ComfyUI reads
``WEB_DIRECTORY`` and awaits ``comfy_entrypoint`` only when it loads the pack, and the
nodes (which import ComfyUI) are imported inside that call.
"""

WEB_DIRECTORY = "./web/js"


async def comfy_entrypoint():
    from .nodes import extension

    return extension.TsuikaExtension()


__all__ = ["WEB_DIRECTORY", "comfy_entrypoint"]
