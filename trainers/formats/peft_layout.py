"""The diffusers / peft layout: ``unet.<path>.lora_A.weight`` / ``lora_B.weight`` (read only).

Files other tools write (diffusers' ``save_lora_weights``, peft adapters, old diffusers
attention-processor LoRAs); alpha comes from diffusers' ``lora_adapter_metadata``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping

from .lora_keys import (
    COMPONENTS,
    ModuleIndex,
    canonical_path,
    component_of_kohya_name,
    two_encoders,
)
from .lora_keys import PAIR as _PAIR
from .lora_state import (
    KeyPool,
    LoraFormatError,
    LoraStateDict,
    assemble,
    refuse_unsupported,
    split_key,
)

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' JSON LoraConfig per component
PEFT_PREFIXES = {"unet": "unet.", "text_encoder": "text_encoder.",
                 "text_encoder_2": "text_encoder_2."}  # diffusers' SDXL names its pair so
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",
                  ".lora.down.weight": "down", ".lora.up.weight": "up", ".alpha": "alpha"}
_PEFT_MARKERS = (".lora_A.weight", ".lora_B.weight", ".lora.down.weight", ".lora.up.weight")
# Old diffusers attention-processor LoRA: <block>.processor.to_q_lora.down.weight
_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _peft_pattern_value(patterns: Mapping[str, float], path: str):
    # peft's rank/alpha pattern rule: the pattern matches the path or a dotted suffix of it.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", path):
            return value
    return None


def _adapter_config(metadata: Mapping[str, str], component: str) -> dict | None:
    raw = (metadata or {}).get(ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoraFormatError(f"metadata {ADAPTER_METADATA_KEY} is not valid JSON ({e}); the "
                              "file is damaged.") from e
    prefix = f"{component}."
    scoped = {k[len(prefix):]: v for k, v in data.items() if k.startswith(prefix)}
    if scoped:
        return scoped
    return data if "lora_alpha" in data else None  # a single-model adapter file


class PeftFormat:
    """diffusers / peft: ``unet.<path>.lora_A.weight`` / ``lora_B.weight``.

    Also reads old diffusers ``<path>.lora.down.weight`` / ``.lora.up.weight`` (+ ``.alpha``)
    and processor-style ``...processor.to_q_lora.down.weight``, and raw peft keys (with or
    without ``base_model.model.``) whose component comes from ``component=`` or the index.
    Alpha comes from diffusers' ``lora_adapter_metadata``, else ``.alpha`` keys, else rank.
    """

    name = "peft"

    @staticmethod
    def _strip(key: str) -> str:
        return key[len("base_model.model."):] if key.startswith("base_model.model.") else key

    def detect(self, keys: Iterable[str]) -> bool:
        for key in keys:
            if (key.startswith(("diffusion_model.", "text_encoders."))
                    or component_of_kohya_name(key) is not None):
                continue  # the other layouts' keys; the layouts stay disjoint
            if key.endswith(_PEFT_MARKERS) or _PROCESSOR.search(key):
                return True
        return False

    def _locate(self, body: str, component: str | None, module_index: ModuleIndex | None,
                pair: bool = False):
        for comp, prefix in PEFT_PREFIXES.items():
            if body.startswith(prefix):
                return (_PAIR.get(comp, comp) if pair else comp), body[len(prefix):]
        if component is not None:
            return component, body
        if module_index is not None:
            owners = [c for c in module_index.components
                      if body in module_index.paths(c)
                      or COMPONENTS[c].root and COMPONENTS[c].root + body in module_index.paths(c)]
            if len(owners) == 1:
                return owners[0], body
        raise LoraFormatError(f"peft key for module {body!r} does not say which model part it "
                              f"belongs to (no {' / '.join(PEFT_PREFIXES.values())} prefix); "
                              "pass component='unet' or 'text_encoder', or a module_index that "
                              "contains it.")

    def read(self, tensors, metadata=None, module_index: ModuleIndex | None = None, *,
             component: str | None = None, **_unused) -> LoraStateDict:
        refuse_unsupported(tensors, self.name)
        pool = KeyPool(tensors, self.name)
        groups: dict[tuple[str, str], dict[str, str]] = {}
        # SDXL: diffusers writes text_encoder. / text_encoder_2.; ours are _1 / _2.
        pair = two_encoders([self._strip(k) for k in tensors], module_index, "text_encoder_2.")
        for key in tensors:
            body = self._strip(key)
            m = _PROCESSOR.search(body)
            if m:
                leaf = "to_out.0" if m.group(1) == "to_out" else m.group(1)
                split = (f"{body[:m.start()]}.{leaf}", "down" if m.group(2) == "down" else "up")
            else:
                split = split_key(body, _PEFT_SUFFIXES)
            if split is None:
                continue
            comp, path = self._locate(split[0], component, module_index, pair)
            path = (module_index.resolve(comp, path) if module_index is not None
                    else canonical_path(comp, path))
            groups.setdefault((comp, path), {})[split[1]] = key
        # diffusers' adapter metadata names the first encoder "text_encoder" in SDXL files too.
        configs = {c: _adapter_config(metadata, "text_encoder" if c == "text_encoder_1" else c)
                   for c in {c for c, _ in groups}}

        def alpha_from_config(comp: str, path: str, rank: int) -> float:
            cfg = configs.get(comp)
            if not cfg:
                return float(rank)  # peft/diffusers without alpha: scale 1
            alpha = _peft_pattern_value(cfg.get("alpha_pattern") or {}, path)
            alpha = float(cfg.get("lora_alpha", rank) if alpha is None else alpha)
            # rsLoRA scales by alpha / sqrt(r); the same update under alpha' / r:
            return alpha * math.sqrt(rank) if cfg.get("use_rslora") else alpha

        lsd = LoraStateDict(metadata=dict(metadata or {}))
        assemble(pool, groups, lsd, self.name, default_alpha=alpha_from_config)
        pool.finish()
        return lsd
