"""Textual-inversion embeddings: the file layouts other tools read, one writer, one reader.

Layouts (all safetensors; pickled ``.pt`` / ``.bin`` embeddings are never read):

- ``emb_params``: one tensor ``emb_params`` of shape (vectors, width). ComfyUI's
  ``embedding:name`` takes the file's only tensor when it has no ``clip_l`` / ``clip_g`` key,
  A1111 takes the only tensor of a single-tensor file, and diffusers'
  ``load_textual_inversion(path, token=...)`` takes the only key of a one-key file. What we
  write for a model with one text encoder.
- ``per_encoder``: one tensor per text encoder, named after the encoder ComfyUI names by its
  width (``clip_l`` 768, ``clip_h`` 1024, ``clip_g`` 1280): the SDXL layout ComfyUI and A1111
  read (diffusers: ``load_textual_inversion(sd["clip_g"], token, text_encoder=pipe
  .text_encoder_2, tokenizer=pipe.tokenizer_2)``). What we write for several encoders.
- ``a1111``: ``string_to_param.*`` (an A1111 embedding stored as safetensors), read.
- ``diffusers``: one tensor named after its token (``<cat-toy>``: diffusers' training script's
  ``learned_embeds.safetensors``), read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .safetensors_io import load_safetensors, save_safetensors

# Text-encoder width -> the key ComfyUI's load_embed looks up for that encoder.
ENCODER_KEYS = {768: "clip_l", 1024: "clip_h", 1280: "clip_g"}
SINGLE_KEY = "emb_params"
A1111_KEY = "string_to_param.*"
# Metadata keys our writer adds (other tools ignore safetensors metadata).
META_TOKEN = "tsuika.ti.token"
META_VECTORS = "tsuika.ti.vectors_per_token"
META_INIT = "tsuika.ti.init_word"


class EmbeddingFormatError(ValueError):
    """A file is not an embedding in a layout we read, or its tensors are malformed."""


@dataclass
class Embedding:
    """An embedding in memory: the new token's vectors for each text encoder.

    Attributes:
        vectors: encoder key (``clip_l`` / ``clip_g`` / ``clip_h``, or ``emb_params`` when a
            single tensor's width names no known encoder) -> (vectors, width) tensor.
        token: the token it was trained for, when the file says (metadata, diffusers key).
        layout: which layout the file had (see the module docstring).
        metadata: the file's safetensors metadata.
    """

    vectors: dict[str, torch.Tensor]
    token: str | None = None
    layout: str = SINGLE_KEY
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]


def encoder_key(width: int) -> str:
    """The ComfyUI embedding key of a text encoder ``width`` wide (768 -> ``clip_l``).

    Raises:
        EmbeddingFormatError: no known encoder has that width.
    """
    if width not in ENCODER_KEYS:
        raise EmbeddingFormatError(
            f"a text encoder {width} wide has no embedding key other tools know (known "
            f"widths: {', '.join(f'{w} {k}' for w, k in ENCODER_KEYS.items())}).")
    return ENCODER_KEYS[width]


def embedding_tensors(vectors: list[torch.Tensor],
                      keys: list[str] | tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The file's tensors for one token's vectors per text encoder, in the bundle's order.

    One encoder gives ``{"emb_params": (n, width)}``; several give one key per encoder named
    by its width (``clip_l``, ``clip_g``).

    Args:
        vectors: per text encoder, a (vectors, width) tensor; all with the same vector count.
        keys: with several encoders, their keys in order (the family's
            ``FamilyFacts.embedding_keys``); empty: named by width.

    Raises:
        EmbeddingFormatError: no vectors, a tensor that is not 2-D, counts that differ, or
            two encoders of the same width (their keys would collide).
    """
    if not vectors:
        raise EmbeddingFormatError("an embedding needs the vectors of at least one encoder.")
    for v in vectors:
        if v.ndim != 2 or v.shape[0] < 1:
            raise EmbeddingFormatError(f"embedding vectors must be (vectors, width); got "
                                       f"{tuple(v.shape)}.")
    if len({v.shape[0] for v in vectors}) > 1:
        raise EmbeddingFormatError(f"every encoder needs the same number of vectors; got "
                                   f"{[v.shape[0] for v in vectors]}.")
    if len(vectors) == 1:
        return {SINGLE_KEY: vectors[0]}
    keys = list(keys) or [encoder_key(v.shape[1]) for v in vectors]
    if len(keys) != len(vectors):
        raise EmbeddingFormatError(f"{len(vectors)} text encoders but {len(keys)} embedding "
                                   f"keys {keys}.")
    if len(set(keys)) != len(keys):
        raise EmbeddingFormatError(f"two text encoders share the key {keys}; cannot write "
                                   "them into one file.")
    return dict(zip(keys, vectors))


def detect(tensors: dict[str, torch.Tensor]) -> str | None:
    """The layout of a file's tensors (``emb_params``, ``per_encoder``, ``a1111``,
    ``diffusers``), or None when they are not an embedding we read."""
    keys = set(tensors)
    if not keys or any(not isinstance(t, torch.Tensor) for t in tensors.values()):
        return None
    if keys == {SINGLE_KEY}:
        return SINGLE_KEY
    if keys <= set(ENCODER_KEYS.values()) and len(keys) >= 1:
        return "per_encoder"
    if keys == {A1111_KEY}:
        return "a1111"
    if len(keys) == 1 and next(iter(tensors.values())).ndim in (1, 2):
        return "diffusers"
    return None


def _as_matrix(name: str, t: torch.Tensor, path: Path) -> torch.Tensor:
    if t.ndim == 1:  # a single vector saved flat (diffusers' script, some A1111 files)
        t = t.unsqueeze(0)
    if t.ndim != 2 or not t.is_floating_point() or t.shape[0] < 1:
        raise EmbeddingFormatError(f"{path}: tensor {name!r} has shape {tuple(t.shape)} and "
                                   f"dtype {t.dtype}; an embedding is a float (vectors, width) "
                                   "tensor.")
    return t


def from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                 path: Path | str = "<tensors>") -> Embedding:
    """An :class:`Embedding` from a file's tensors and metadata (see :func:`read_embedding`).

    Raises:
        EmbeddingFormatError: the tensors are in no layout we read.
    """
    metadata = dict(metadata or {})
    path = Path(path)
    layout = detect(tensors)
    if layout is None:
        raise EmbeddingFormatError(
            f"{path} is not a textual-inversion embedding we read (tensors "
            f"{sorted(tensors)[:5]}); expected 'emb_params', 'clip_l' / 'clip_g', "
            f"'string_to_param.*' or a single tensor.")
    token = metadata.get(META_TOKEN) or None
    if layout == "per_encoder":
        vectors = {k: _as_matrix(k, t, path) for k, t in tensors.items()}
        if len({t.shape[0] for t in vectors.values()}) > 1:
            raise EmbeddingFormatError(f"{path}: the encoders' vector counts differ "
                                       f"({ {k: t.shape[0] for k, t in vectors.items()} }).")
    else:
        name, t = next(iter(tensors.items()))
        t = _as_matrix(name, t, path)
        if layout == "diffusers":
            token = token or name
        vectors = {ENCODER_KEYS.get(t.shape[1], SINGLE_KEY): t}
    return Embedding(vectors=vectors, token=token, layout=layout, metadata=metadata)


def read_embedding(path: Path | str) -> Embedding:
    """Read an embedding file in any layout of the module docstring.

    Args:
        path: a ``.safetensors`` embedding.

    Raises:
        EmbeddingFormatError: the file is no embedding we read (names the tensors found).
        ValueError: the file is not safetensors (pickles are refused).
    """
    tensors, metadata = load_safetensors(path)
    return from_tensors(tensors, metadata, path)


def write_embedding(path: Path | str, vectors: list[torch.Tensor],
                    metadata: dict[str, str] | None = None, overwrite: bool = False,
                    dtype: torch.dtype | None = None) -> Path:
    """Write one token's vectors (per text encoder, in the bundle's order) atomically.

    Args:
        path: destination ``.safetensors``.
        vectors: see :func:`embedding_tensors`.
        metadata: string metadata (our own keys: ``META_TOKEN`` ...).
        overwrite: replace an existing file; otherwise an existing file is an error.
        dtype: the stored dtype of the vectors (default: as given).
    """
    return save_safetensors(path, embedding_tensors(vectors), metadata, overwrite=overwrite,
                            dtype=dtype)


__all__ = ["ENCODER_KEYS", "Embedding", "EmbeddingFormatError", "detect", "embedding_tensors",
           "encoder_key", "from_tensors", "read_embedding", "write_embedding"]
