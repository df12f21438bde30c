"""SD1.x / SD2.x single-file checkpoints (the original CompVis / LDM layout) <-> diffusers.

A single-file checkpoint holds three models under fixed prefixes:

* ``model.diffusion_model.*``  the UNet (``input_blocks`` / ``middle_block`` / ``output_blocks``),
* ``first_stage_model.*``      the VAE (``encoder.down.N.block.M``, ``mid.attn_1`` ...),
* ``cond_stage_model.transformer.text_model.*``  SD1's CLIP-L in Hugging Face naming, or
  ``cond_stage_model.model.*`` SD2's OpenCLIP ViT-H text tower.

This is what ComfyUI's CheckpointLoaderSimple reads. Our backend trains diffusers /
transformers modules, so we convert both ways, entirely offline: the architecture is read
from tensor shapes (:func:`infer_sd_configs`); what shapes cannot tell (attention heads, norm
groups) comes from the family rules or from ``tsuika.*`` metadata hints that
:func:`config_metadata_hints` produces for the writer. Pure dict in, dict out: file I/O lives
in ``safetensors_io``.

Split by concern: ``ldm_config`` (architecture from shapes), ``ldm_to_diffusers`` and
``diffusers_to_ldm`` (the two directions), ``ldm_unet_keys`` (key tables, detection, hints);
this module keeps the one import path callers use.
"""

from .diffusers_to_ldm import diffusers_to_ldm
from .ldm_config import SdConfigs, infer_sd_configs
from .ldm_to_diffusers import LdmConversion, ldm_to_diffusers
from .ldm_unet_keys import (
                            LdmCheckpointError,
                            config_metadata_hints,
                            detect,
                            unet_module_map,
                            vae_module_map,
)

__all__ = ["LdmCheckpointError", "LdmConversion", "SdConfigs", "config_metadata_hints", "detect",
           "diffusers_to_ldm", "infer_sd_configs", "ldm_to_diffusers", "unet_module_map",
           "vae_module_map"]
