"""The canonical in-memory LoRA every layout reads into, and the helpers readers share.

A :class:`LoraStateDict` maps ``(component, module path) ->`` one module's weights: a
:class:`LoraWeights` (``alpha / rank * up @ down``), a :class:`LohaWeights` (LoHa:
``alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)``) or a :class:`LokrWeights` (LoKr:
``scale * kron(w1, w2)``); any of them may carry DoRA's ``dora_scale``. The module path is the
diffusers / transformers one; ``ops.merge`` turns each into its weight change. Readers take
every key they understand off a :class:`KeyPool` and raise on whatever is left, so nothing in
a file is ignored silently. Alpha is carried per
module, never assumed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

# Key fragments (after the module path) of adapter types the readers refuse, by name.
UNSUPPORTED_PARTS = {
    ".lora_mid.": "LoCon/LyCORIS Tucker-decomposed convolution (lora_mid)",
    ".hada_t1": "LoHa Tucker-decomposed convolution (hada_t1 / hada_t2)",
    ".lokr_t2": "LoKr Tucker-decomposed convolution (lokr_t2)",
    ".lora_magnitude_vector": "DoRA (lora_magnitude_vector)", ".oft_": "OFT (oft_*)",
    ".lora_embedding_": "LoRA on embeddings (lora_embedding_*)",
}
# LyCORIS suffixes (kohya and ComfyUI-native names alike) -> role; a role names the field of
# LohaWeights / LokrWeights it fills, ``dora_scale`` any weights' DoRA magnitude.
LYCORIS_SUFFIXES = {f".{part}": part for part in (
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a",
    "lokr_w2_b", "lokr_w1", "lokr_w2", "dora_scale")}


class LoraFormatError(ValueError):
    """A LoRA file or state dict that cannot be read or written as asked."""


@dataclass
class LoraWeights:
    """One adapted module: ``delta W = alpha / rank * up @ down``.

    Attributes:
        down: ``(rank, in)`` or, for a convolution, ``(rank, in, kh, kw)``.
        up: ``(out, rank)`` or ``(out, rank, 1, 1)``.
        alpha: the trained alpha (scale = alpha / rank).
        dora_scale: DoRA's magnitude (``(out, 1[, 1, 1])`` or ``(1, in[, 1, 1])``), or None.
    """

    down: torch.Tensor
    up: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None

    def __post_init__(self):
        self.alpha = _float_alpha(self.alpha)
        check_lora_weights(self.down, self.up, self.alpha, "LoraWeights")

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def check(self, where: str) -> None:
        """Raise :class:`LoraFormatError` naming ``where`` unless shapes and alpha fit."""
        check_lora_weights(self.down, self.up, self.alpha, where)
        check_dora_scale(self.dora_scale, self.out_features, where)


def _float_alpha(alpha) -> float:
    return float(alpha.float().item() if isinstance(alpha, torch.Tensor) else alpha)


@dataclass
class LohaWeights:
    """One LoHa module: ``delta W = alpha / rank * (w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard
    product), reshaped to the weight; a convolution's ``w*_b`` hold ``in * kh * kw`` columns.

    Attributes:
        w1_a, w2_a: ``(out, rank)``.
        w1_b, w2_b: ``(rank, in)`` or ``(rank, in * kh * kw)``.
        alpha: scale = alpha / rank (rank = ``w1_b.shape[0]``, as ComfyUI reads it).
        dora_scale: DoRA's magnitude, or None.
    """

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    alpha: float
    dora_scale: torch.Tensor | None = None

    def __post_init__(self):
        self.alpha = _float_alpha(self.alpha)

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def out_features(self) -> int:
        return int(self.w1_a.shape[0])

    def check(self, where: str) -> None:
        mats = {k: getattr(self, k) for k in ("w1_a", "w1_b", "w2_a", "w2_b")}
        if any(not isinstance(t, torch.Tensor) or t.ndim != 2 for t in mats.values()):
            raise LoraFormatError(f"{where}: LoHa hada_w1_a / w1_b / w2_a / w2_b must be 2-D "
                                  f"tensors; got {_shapes(mats)}.")
        a1, b1, a2, b2 = (t.shape for t in mats.values())
        if a1[1] != b1[0] or a2[1] != b2[0] or a1[0] != a2[0] or b1[1] != b2[1]:
            raise LoraFormatError(f"{where}: LoHa shapes do not fit together: {_shapes(mats)} "
                                  "(w1_a @ w1_b and w2_a @ w2_b must have one shape).")
        _check_alpha(self.alpha, where)
        check_dora_scale(self.dora_scale, self.out_features, where)


@dataclass
class LokrWeights:
    """One LoKr module: ``delta W = scale * kron(w1, w2)`` reshaped to the weight, each factor
    either whole (``lokr_w1`` / ``lokr_w2``) or a low-rank pair (``w1_a @ w1_b``).

    Attributes:
        w1: ``(a, c)`` or None for ``w1_a (a, rank) @ w1_b (rank, c)``.
        w2: ``(b, d)`` or ``(b, d, kh, kw)``, or None for ``w2_a (b, rank) @ w2_b (rank, d [*
            kh * kw])``; the weight is ``(a * b, c * d [, kh, kw])``.
        alpha: scale = alpha / rank when a factor is low-rank (rank = ``w2_b.shape[0]``, else
            ``w1_b``'s), and 1 when both are whole: the rule of LyCORIS and ComfyUI.
        dora_scale: DoRA's magnitude, or None.
    """

    w1: torch.Tensor | None
    w1_a: torch.Tensor | None
    w1_b: torch.Tensor | None
    w2: torch.Tensor | None
    w2_a: torch.Tensor | None
    w2_b: torch.Tensor | None
    alpha: float
    dora_scale: torch.Tensor | None = None

    def __post_init__(self):
        self.alpha = _float_alpha(self.alpha)

    @property
    def rank(self) -> int | None:
        low = self.w2_b if self.w2_b is not None else self.w1_b
        return None if low is None else int(low.shape[0])

    @property
    def scale(self) -> float:
        return 1.0 if self.rank is None else self.alpha / self.rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(w1, w2)`` in fp32, low-rank pairs multiplied out."""
        w1 = self.w1 if self.w1 is not None else self.w1_a.float() @ self.w1_b.float()
        w2 = self.w2 if self.w2 is not None else self.w2_a.float() @ self.w2_b.float()
        return w1.float(), w2.float()

    @property
    def out_features(self) -> int:
        w1_rows = (self.w1 if self.w1 is not None else self.w1_a).shape[0]
        w2_rows = (self.w2 if self.w2 is not None else self.w2_a).shape[0]
        return int(w1_rows * w2_rows)

    def check(self, where: str) -> None:
        parts = {k: getattr(self, k) for k in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b")}
        for n in ("1", "2"):
            whole, a, b = parts[f"w{n}"], parts[f"w{n}_a"], parts[f"w{n}_b"]
            if whole is not None and (a is not None or b is not None) or (
                    whole is None and (a is None or b is None)):
                raise LoraFormatError(f"{where}: LoKr needs either lokr_w{n} or both lokr_w{n}_a "
                                      f"and lokr_w{n}_b; got {_shapes(parts)}.")
            if whole is None and (a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]):
                raise LoraFormatError(f"{where}: LoKr lokr_w{n}_a @ lokr_w{n}_b do not fit: "
                                      f"{_shapes(parts)}.")
        if (parts["w1"] is not None and parts["w1"].ndim != 2) or (
                parts["w2"] is not None and parts["w2"].ndim not in (2, 4)):
            raise LoraFormatError(f"{where}: LoKr lokr_w1 must be 2-D and lokr_w2 2-D or 4-D; "
                                  f"got {_shapes(parts)}.")
        _check_alpha(self.alpha, where)
        check_dora_scale(self.dora_scale, self.out_features, where)


# One adapted module's weights, whichever algorithm made them.
ModuleWeights = LoraWeights | LohaWeights | LokrWeights


def _shapes(parts: Mapping[str, torch.Tensor | None]) -> str:
    return ", ".join(f"{k} {tuple(v.shape)}" for k, v in parts.items()
                     if isinstance(v, torch.Tensor))


def _check_alpha(alpha: float, where: str) -> None:
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraFormatError(f"{where}: alpha = {alpha} must be a finite number > 0.")


def check_dora_scale(dora_scale, out_features: int, where: str) -> None:
    """Raise unless ``dora_scale`` is None or a DoRA magnitude: ``(out, 1[, 1, 1])`` per output
    channel (peft, LyCORIS's default) or ``(1, in[, 1, 1])`` per input channel."""
    if dora_scale is None:
        return
    if (not isinstance(dora_scale, torch.Tensor) or dora_scale.ndim < 2
            or any(s != 1 for s in dora_scale.shape[2:])
            or 1 not in tuple(dora_scale.shape[:2])):
        raise LoraFormatError(f"{where}: dora_scale {tuple(getattr(dora_scale, 'shape', ()))} "
                              f"must be (out, 1[, 1, 1]) or (1, in[, 1, 1]).")
    if dora_scale.shape[1] == 1 and dora_scale.shape[0] != out_features:
        raise LoraFormatError(f"{where}: dora_scale {tuple(dora_scale.shape)} does not match "
                              f"the module's {out_features} output channels.")


def check_lora_weights(down, up, alpha: float, where: str) -> None:
    """Raise :class:`LoraFormatError` naming ``where`` unless ``down`` / ``up`` / ``alpha``
    form a linear or convolution LoRA with equal ranks and a finite alpha > 0."""
    if not isinstance(down, torch.Tensor) or not isinstance(up, torch.Tensor):
        raise LoraFormatError(f"{where}: down and up must be tensors.")
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise LoraFormatError(f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} are "
                              "neither linear (2-D, 2-D) nor convolution (4-D, 4-D) LoRA.")
    if down.shape[0] != up.shape[1]:
        raise LoraFormatError(f"{where}: rank mismatch, down {tuple(down.shape)} has rank "
                              f"{down.shape[0]} but up {tuple(up.shape)} has rank {up.shape[1]}.")
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise LoraFormatError(f"{where}: convolution up {tuple(up.shape)} must be 1x1.")
    if not math.isfinite(alpha) or alpha <= 0:
        raise LoraFormatError(f"{where}: alpha = {alpha} must be a finite number > 0.")


@dataclass
class LoraStateDict:
    """A LoRA in canonical form.

    Attributes:
        modules: ``{(component, module path): LoraWeights | LohaWeights | LokrWeights}``;
            paths as the diffusers / transformers model names them (text encoders without
            ``text_model.`` unless the model has that level).
        metadata: string metadata carried with the file.
    """

    modules: dict[tuple[str, str], ModuleWeights] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    def components(self) -> list[str]:
        return sorted({c for c, _ in self.modules})

    def add(self, component: str, path: str, weights: ModuleWeights, where: str) -> None:
        if (component, path) in self.modules:
            raise LoraFormatError(f"{where}: module {component}:{path} appears twice (two key "
                                  "spellings of the same module in one file).")
        weights.check(where)
        self.modules[(component, path)] = weights


class KeyPool:
    """The keys a reader has not consumed yet; leftovers are an error."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], fmt: str):
        self.left = dict(tensors)
        self.fmt = fmt

    def take(self, key: str) -> torch.Tensor:
        return self.left.pop(key)

    def finish(self) -> None:
        if not self.left:
            return
        keys = sorted(self.left)
        more = f" (and {len(keys) - 10} more)" if len(keys) > 10 else ""
        raise LoraFormatError(
            f"{len(keys)} key(s) of this {self.fmt} LoRA were not understood: "
            f"{', '.join(keys[:10])}{more}. The file holds parts Tsuika does not read; "
            "nothing was loaded rather than loading it partly.")


def refuse_unsupported(keys: Iterable[str], fmt: str) -> None:
    for fragment, what in UNSUPPORTED_PARTS.items():
        hits = [k for k in keys if fragment in k]
        if hits:
            raise LoraFormatError(f"this {fmt} file uses {what} (e.g. {hits[0]!r}, {len(hits)} "
                                  "keys), which Tsuika's LoRA reader does not support yet; use "
                                  "a plain LoRA file.")


def split_key(key: str, suffixes: Mapping[str, str]) -> tuple[str, str] | None:
    """``(module part, role)`` of a key ending in one of ``suffixes`` (suffix -> role)."""
    for suffix, role in suffixes.items():
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], role
    return None


def assemble(pool: KeyPool, groups: Mapping[tuple[str, str], Mapping[str, str]],
              lsd: LoraStateDict, fmt: str, default_alpha=None) -> None:
    """Build each module's weights from ``{(component, path): {role: key}}`` and take the keys:
    LoHa when it has ``hada_*`` roles, LoKr with ``lokr_*``, else LoRA (``down`` / ``up``)."""
    for (component, path), roles in groups.items():
        where = f"{fmt} module {component}:{path}"
        kinds = {r.split("_")[0] for r in roles if r.startswith(("hada_", "lokr_"))}
        if len(kinds) > 1 or (kinds and ("down" in roles or "up" in roles)):
            raise LoraFormatError(f"{where}: mixes the keys of several adapter kinds: "
                                  f"{', '.join(sorted(roles.values()))}.")
        if not kinds and ("down" not in roles or "up" not in roles):
            have = ", ".join(sorted(roles.values()))
            raise LoraFormatError(f"{where}: needs both a down and an up weight; found only "
                                  f"{have}.")
        tensors = {role: pool.take(key) for role, key in roles.items() if role != "alpha"}
        rank = _rank_of(tensors)
        if "alpha" in roles:
            alpha_t = pool.take(roles["alpha"])
            if alpha_t.numel() != 1:
                raise LoraFormatError(f"{where}: alpha {roles['alpha']!r} has shape "
                                      f"{tuple(alpha_t.shape)}; it must be a single number.")
            alpha = float(alpha_t.float().item())
        elif default_alpha is not None and rank is not None:
            alpha = default_alpha(component, path, rank)
        else:
            alpha = float(rank or 1)  # the loaders' rule for a missing alpha: scale 1
        dora = tensors.pop("dora_scale", None)
        if "hada" in kinds:
            missing = [r for r in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
                       if r not in tensors]
            if missing:
                raise LoraFormatError(f"{where}: a LoHa module needs {', '.join(missing)} too.")
            weights = LohaWeights(**{r[5:]: t for r, t in tensors.items()}, alpha=alpha,
                                  dora_scale=dora)
        elif "lokr" in kinds:
            parts = {r[5:]: tensors.get(r) for r in ("lokr_w1", "lokr_w1_a", "lokr_w1_b",
                                                      "lokr_w2", "lokr_w2_a", "lokr_w2_b")}
            weights = LokrWeights(**parts, alpha=alpha, dora_scale=dora)
        else:
            down, up = tensors["down"], tensors["up"]
            check_lora_weights(down, up, alpha, where)
            weights = LoraWeights(down, up, alpha, dora_scale=dora)
        lsd.add(component, path, weights, where)


def _rank_of(tensors: Mapping[str, torch.Tensor]) -> int | None:
    """The rank alpha divides by, as ComfyUI reads it; None for a LoKr of whole factors."""
    for role in ("down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if role in tensors:
            return int(tensors[role].shape[0])
    return None


def normalise_ldm_map(ldm_map: Mapping[str, str] | None) -> dict[str, str] | None:
    """Keys relative to ``diffusion_model.`` (full-checkpoint prefixes are accepted)."""
    if ldm_map is None:
        return None
    out = {}
    for key, value in ldm_map.items():
        for prefix in ("model.diffusion_model.", "diffusion_model."):
            if key.startswith(prefix):
                key = key[len(prefix):]
                break
        out[key] = value
    return out

