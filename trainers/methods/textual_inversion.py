"""Textual Inversion: learn the embedding of one new word, in every text encoder of the family.

The new word (``network.token``) stands for ``network.vectors_per_token`` vectors. Each text
encoder's token-embedding layer is wrapped (:class:`NewTokenEmbedding`): the original matrix
stays as it is, frozen, and the new vectors are a separate fp32 parameter used where the ids
are the new tokens' — so nothing but those vectors can change (no gradient masking to get
wrong, no resized matrix to copy). The tokenizer learns the new tokens and writes the word
out as its vectors' tokens (``mychar`` -> ``mychar mychar_1 ...``, diffusers' convention).

Images without a caption train on object or style prompt templates (``network.templates``);
a caption that lacks the word gets it first, as a trigger word would be.

The file (``formats.embedding``) holds the vectors: ``emb_params`` for one encoder, one key
per encoder by width for several (SDXL: ``clip_l`` and ``clip_g``).
"""

from __future__ import annotations

import logging
import random
import re

import torch

from ..config import ConfigError, TsuikaConfig
from ..families.base import ModelBundle
from .base import MethodError, load_named_tensors

log = logging.getLogger(__name__)

# Prompt templates for images without captions ({} is the token), after the textual-inversion
# paper's object and style lists (Gal et al. 2022), written afresh.
TEMPLATES = {
    "object": ("a photo of a {}", "a rendering of a {}", "a close-up photo of the {}",
               "a bright photo of a {}", "a cropped photo of the {}", "a good photo of a {}",
               "a photo of one {}", "a dark photo of the {}", "a photo of a small {}",
               "a photo of the large {}"),
    "style": ("a painting in the style of {}", "a rendering in the style of {}",
              "a picture in the style of {}", "a cropped painting in the style of {}",
              "artwork in the style of {}", "a close-up painting in the style of {}",
              "a bright painting in the style of {}", "a small painting in the style of {}",
              "a large painting in the style of {}", "a dark painting in the style of {}"),
}
_TOKEN = re.compile(r"[a-z0-9_<>\-]+")
_PARAM = "vectors"  # the trained parameter's name inside NewTokenEmbedding


class NewTokenEmbedding(torch.nn.Module):
    """A frozen token-embedding layer plus trainable vectors for ids from ``first_id`` on.

    Args:
        base: the text encoder's own ``nn.Embedding`` (kept, frozen, unchanged).
        first_id: the id of the first new token.
        init: (vectors, width) starting values.
    """

    def __init__(self, base: torch.nn.Embedding, first_id: int, init: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_id = first_id
        self.vectors = torch.nn.Parameter(init.detach().float().clone())

    @property
    def weight(self) -> torch.Tensor:  # callers read the layer's dtype and device from it
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_id
        out = self.base(ids.masked_fill(new, 0))
        index = (ids - self.first_id).clamp(0, self.vectors.shape[0] - 1)
        picked = self.vectors.to(out.dtype)[index]
        return torch.where(new.unsqueeze(-1), picked, out)


class ExpandingTokenizer:
    """A tokenizer that writes ``token`` out as its vectors' tokens before tokenizing.

    Everything else is the wrapped tokenizer's (attributes are delegated).
    """

    def __init__(self, tokenizer, token: str, names: list[str]):
        self.tokenizer = tokenizer
        self.token = token
        self.names = names
        self._word = re.compile(rf"(?<![\w<>\-]){re.escape(token)}(?![\w<>\-])", re.IGNORECASE)

    def expand(self, text: str) -> str:
        return self._word.sub(" ".join(self.names), text)

    def __call__(self, text, *args, **kwargs):
        text = self.expand(text) if isinstance(text, str) else [self.expand(t) for t in text]
        return self.tokenizer(text, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


def token_names(token: str, count: int) -> list[str]:
    """The tokens of a word with ``count`` vectors: ``token``, ``token_1``, ..."""
    return [token] + [f"{token}_{i}" for i in range(1, count)]


def has_token(caption: str, token: str) -> bool:
    return re.search(rf"(?<![\w<>\-]){re.escape(token)}(?![\w<>\-])", caption,
                     re.IGNORECASE) is not None


def _unwrapped(tokenizer):
    return tokenizer.tokenizer if isinstance(tokenizer, ExpandingTokenizer) else tokenizer


def _known(tokenizer, word: str) -> bool:
    vocab = tokenizer.get_vocab()
    return word in vocab or f"{word}</w>" in vocab


def _pool_at_eos(text_encoder: torch.nn.Module, tokenizer) -> None:
    """Make the pooled output read the end-of-text position even with the new ids.

    transformers' CLIP pools at the largest id when a config carries the old
    ``eos_token_id = 2`` (many SDXL text_encoder_2 configs do); the new tokens' ids are larger
    than the end token's, so the pooled embedding (SDXL's conditioning) would be read at the
    new word. Pooling at the first end token gives the same position for every prompt
    without the new ids.
    """
    for module in text_encoder.modules():
        if getattr(module, "eos_token_id", None) == 2 and tokenizer.eos_token_id is not None:
            module.eos_token_id = tokenizer.eos_token_id


class TextualInversionMethod:
    """New token vectors in every text encoder; the model itself stays frozen."""

    name = "textual_inversion"
    summary = ("learns a new word's embedding (network.token; a few KB, in "
               "models/embeddings)")
    trains_base_weights = False

    def trains_text_encoder(self, config: TsuikaConfig) -> bool:
        # The gradient flows through the frozen text encoders to the new vectors.
        return True

    def check_options(self, net) -> None:
        """Judge the network options at config validation (no model needed)."""
        token = net.token
        if not token:
            raise ConfigError("network.token is empty: textual inversion learns a new word; "
                              "set network.token to the word your prompts will use, e.g. "
                              "'mychar'.")
        if not _TOKEN.fullmatch(token):
            raise ConfigError(f"network.token = {token!r} must be one lowercase word of "
                              "letters, digits, '_', '-', '<' or '>' (the CLIP tokenizer "
                              "lowercases prompts), e.g. 'mychar'.")
        if not net.init_word.strip():
            raise ConfigError("network.init_word is empty; give the concept's class word, "
                              "e.g. 'dog', or '*'.")

    def validate(self, config: TsuikaConfig, bundle: ModelBundle) -> None:
        from ..formats.embedding import EmbeddingFormatError, encoder_key

        net = config.network
        self.check_options(net)
        widths = [te.get_input_embeddings().weight.shape[1] for te in bundle.text_encoders]
        if len(widths) > 1:
            try:
                keys = list(_embedding_keys(bundle)) or [encoder_key(w) for w in widths]
            except EmbeddingFormatError as e:
                raise MethodError(f"network.method = 'textual_inversion': {e}") from None
            if len(set(keys)) != len(keys):
                raise MethodError(f"network.method = 'textual_inversion': the text encoders "
                                  f"share the embedding key {keys}.")
        for tok in bundle.tokenizers:
            tok = _unwrapped(tok)
            for word in token_names(net.token, net.vectors_per_token):
                if _known(tok, word):
                    raise MethodError(f"network.token = {net.token!r}: {word!r} is already a "
                                      "word of the tokenizer, so the embedding would replace "
                                      "it; pick a new word, e.g. "
                                      f"'{net.token}_tsk'.")
            if not self._init_ids(tok, net.init_word):
                raise MethodError(f"network.init_word = {net.init_word!r} gives no tokens; "
                                  "use a plain word such as 'dog'.")
        if net.train_text_encoder:
            log.info("network.train_text_encoder has no effect with textual inversion")

    @staticmethod
    def _init_ids(tokenizer, word: str) -> list[int]:
        return tokenizer(word, add_special_tokens=False).input_ids

    def prepare(self, config: TsuikaConfig, bundle: ModelBundle) -> list[dict]:
        net = config.network
        names = token_names(net.token, net.vectors_per_token)
        params = []
        for i, te in enumerate(bundle.text_encoders):
            tok = _unwrapped(bundle.tokenizers[i])
            base = te.get_input_embeddings()
            rows = base.weight.detach()[torch.tensor(self._init_ids(tok, net.init_word))].float()
            layer = _add_word(bundle, i, net.token, rows[torch.arange(len(names)) % len(rows)])
            layer.vectors.requires_grad_(True)
            params.append(layer.vectors)
        log.info("textual inversion: %d vectors per encoder for %r (from %r), %d encoders",
                 len(names), net.token, net.init_word, len(params))
        return [{"params": params, "lr": config.train.learning_rate, "name": "embedding"}]

    def caption(self, config: TsuikaConfig, original: str, caption: str,
                rng: random.Random) -> str:
        """The step's caption: a template for an image without one, the token put first
        where the caption lacks it, an empty caption (caption dropout) left empty."""
        net = config.network
        if not original.strip():
            return rng.choice(TEMPLATES[net.templates]).format(net.token)
        if not caption or has_token(caption, net.token):
            return caption
        return f"{net.token}, {caption}"

    @staticmethod
    def layers(bundle: ModelBundle) -> list[NewTokenEmbedding]:
        """Each text encoder's :class:`NewTokenEmbedding` (after ``prepare``)."""
        layers = [te.get_input_embeddings() for te in bundle.text_encoders]
        if not all(isinstance(layer, NewTokenEmbedding) for layer in layers):
            raise MethodError("textual inversion: the text encoders were not prepared.")
        return layers

    def trainable_state(self, bundle: ModelBundle) -> dict[str, torch.Tensor]:
        return {f"{comp}::{name}": p.detach().to("cpu").clone()
                for comp, module in bundle.components.items()
                for name, p in module.named_parameters() if p.requires_grad}

    def load_trainable_state(self, bundle: ModelBundle,
                             state: dict[str, torch.Tensor]) -> None:
        load_named_tensors(bundle, state, lambda name, p: p.requires_grad,
                           "network options (network.vectors_per_token?)")

    def export(self, config: TsuikaConfig, bundle: ModelBundle,
               dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """``emb_params`` (one encoder) or ``clip_l`` / ``clip_g`` ... (several)."""
        from ..formats.embedding import embedding_tensors

        return embedding_tensors([layer.vectors.detach() for layer in self.layers(bundle)],
                                 _embedding_keys(bundle))

    def file_metadata(self, config: TsuikaConfig, bundle: ModelBundle,
                      metadata: dict[str, str]) -> dict[str, str]:
        """The run's metadata plus the token, its vector count and the init word."""
        from ..formats.embedding import META_INIT, META_TOKEN, META_VECTORS

        net = config.network
        return {**metadata, META_TOKEN: net.token, META_VECTORS: str(net.vectors_per_token),
                META_INIT: net.init_word,
                "modelspec.architecture": f"{metadata.get('modelspec.architecture', '')}"
                                          "/textual-inversion".lstrip("/")}


def _add_word(bundle: ModelBundle, index: int, token: str,
              vectors: torch.Tensor) -> NewTokenEmbedding:
    """Teach text encoder ``index`` (and its tokenizer) the word ``token`` as ``vectors``
    (one row per vector): new token ids, a :class:`NewTokenEmbedding` holding the rows, and
    a tokenizer that writes the word out as its tokens."""
    te = bundle.text_encoders[index]
    tok = _unwrapped(bundle.tokenizers[index])
    names = token_names(token, vectors.shape[0])
    base = te.get_input_embeddings()
    first_id = len(tok)
    added = tok.add_tokens(names)
    ids = tok.convert_tokens_to_ids(names)
    if added != len(names) or ids != list(range(first_id, first_id + len(names))):
        raise MethodError(f"network.token = {token!r}: the tokenizer did not take the new "
                          f"tokens {names} as new ids; pick another word.")
    layer = NewTokenEmbedding(base, first_id, vectors.to(base.weight.device))
    te.set_input_embeddings(layer)
    _pool_at_eos(te, tok)
    bundle.tokenizers[index] = ExpandingTokenizer(tok, token, names)
    return layer


def apply_file(bundle: ModelBundle, embedding, token: str | None = None) -> str:
    """Make ``bundle`` understand a saved embedding's word in its prompts, frozen, as
    ComfyUI's ``embedding:name`` does (the quality benchmark scores embeddings so).

    Args:
        bundle: a loaded model (its text encoders and tokenizers are changed in place).
        embedding: a ``formats.embedding.Embedding`` (``read_embedding``).
        token: the word prompts use; default the word the file was trained for.

    Returns:
        The word.

    Raises:
        MethodError: no word is given or recorded, the file lacks a vector set for one of
            the text encoders, or a vector set's width is not its encoder's.
    """
    from ..formats.embedding import encoder_key

    word = token or embedding.token
    if not word or not _TOKEN.fullmatch(word):
        raise MethodError(f"embedding word {word!r}: give the word prompts use (one lowercase "
                          "word), e.g. token='mychar'.")
    found = dict(embedding.vectors)
    if len(bundle.text_encoders) == 1 and len(found) == 1:
        sets = list(found.values())
    else:
        widths = [te.get_input_embeddings().weight.shape[1] for te in bundle.text_encoders]
        keys = list(_embedding_keys(bundle)) or [encoder_key(w) for w in widths]
        missing = [k for k in keys if k not in found]
        if missing:
            raise MethodError(f"the embedding has vectors for {sorted(found)}, not for "
                              f"{missing}; it was trained for another model family.")
        sets = [found[k] for k in keys]
    for i, vectors in enumerate(sets):
        width = bundle.text_encoders[i].get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != width:
            raise MethodError(f"the embedding's vectors are {vectors.shape[1]} wide; text "
                              f"encoder {i} is {width} wide (another model family).")
        _add_word(bundle, i, word, vectors.float()).requires_grad_(False)
    return word


def _embedding_keys(bundle: ModelBundle) -> tuple[str, ...]:
    """The family's embedding-file key of each text encoder (SDXL: clip_l, clip_g); empty
    when it names none (keys by width)."""
    from ..families import family_facts

    return family_facts(bundle.family).embedding_keys
