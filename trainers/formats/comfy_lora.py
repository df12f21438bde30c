"""ComfyUI's own LoRA layout (Train LoRA + Save LoRA, LoRA extraction): LDM module names."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .lora_keys import PAIR as _PAIR
from .lora_keys import LoraKeyError, ModuleIndex, canonical_path, two_encoders
from .lora_state import (
    LYCORIS_SUFFIXES,
    KeyPool,
    LoraFormatError,
    LoraStateDict,
    assemble,
    normalise_ldm_map,
    refuse_unsupported,
    split_key,
)

COMFY_TEXT_ENCODERS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


class ComfyFormat:
    """ComfyUI's own LoRA files (Train LoRA + Save LoRA, LoRA extraction): LDM module names.

    ``diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_up.weight`` and
    ``text_encoders.clip_l.transformer.text_model.encoder...q_proj.lora_down.weight``. UNet
    paths need ``ldm_to_diffusers_module_map`` (LDM module path, relative to
    ``diffusion_model.``, -> diffusers module path). ComfyUI also stores full differences
    (``.diff`` / ``.diff_b``) for norms and biases; a LoRA cannot hold them, so they are an
    error unless ``drop_weight_diffs=True``.
    """

    name = "comfy"
    _SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
                 ".lora_B.weight": "up", ".alpha": "alpha", **LYCORIS_SUFFIXES}
    _DIFFS = (".diff", ".diff_b")

    def detect(self, keys: Iterable[str]) -> bool:
        return any(k.startswith(("diffusion_model.", "text_encoders.")) for k in keys)

    def _locate(self, body: str, ldm_map: Mapping[str, str] | None,
                pair: bool = False) -> tuple[str, str]:
        if body.startswith("diffusion_model."):
            ldm_path = body[len("diffusion_model."):]
            if ldm_map is None:
                raise LoraFormatError(
                    "reading a ComfyUI-native LoRA needs the LDM -> diffusers UNet module map: "
                    "pass ldm_to_diffusers_module_map (LDM module path -> diffusers module path "
                    "for this UNet).")
            if ldm_path not in ldm_map:
                raise LoraKeyError(f"ComfyUI LoRA module diffusion_model.{ldm_path} is not in "
                                   "the LDM -> diffusers map; the LoRA was made for a different "
                                   "UNet or the map is incomplete.")
            return "unet", ldm_map[ldm_path]
        parts = body.split(".", 3)  # text_encoders.<clip>.transformer.<path>
        if len(parts) == 4 and parts[2] == "transformer" and parts[1] in COMFY_TEXT_ENCODERS:
            comp = COMFY_TEXT_ENCODERS[parts[1]]
            return (_PAIR.get(comp, comp) if pair else comp), parts[3]
        raise LoraFormatError(f"ComfyUI LoRA module {body!r}: unknown model part; known text "
                              f"encoders: {', '.join(COMFY_TEXT_ENCODERS)}.")

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             ldm_to_diffusers_module_map: Mapping[str, str] | None = None,
             drop_weight_diffs: bool = False, **_unused) -> LoraStateDict:
        refuse_unsupported(tensors, self.name)
        ldm_map = normalise_ldm_map(ldm_to_diffusers_module_map)
        pool = KeyPool(tensors, self.name)
        diffs = [k for k in tensors if k.endswith(self._DIFFS)]
        if diffs and not drop_weight_diffs:
            raise LoraFormatError(f"this ComfyUI LoRA also holds {len(diffs)} full weight "
                                  f"differences (e.g. {diffs[0]!r}: trained norms/biases) that "
                                  "a LoRA cannot represent; pass drop_weight_diffs=True to read "
                                  "the LoRA part without them.")
        for key in diffs:
            pool.take(key)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        for key in tensors:
            split = split_key(key, self._SUFFIXES)
            if split is None or not self.detect([split[0]]):
                continue
            comp, path = self._locate(split[0], ldm_map,
                                      two_encoders(tensors, module_index, "text_encoders.clip_g."))
            path = (module_index.resolve(comp, path) if module_index is not None
                    else canonical_path(comp, path))
            groups.setdefault((comp, path), {})[split[1]] = key
        lsd = LoraStateDict(metadata=dict(metadata or {}))
        assemble(pool, groups, lsd, self.name)
        pool.finish()
        return lsd

