"""A small classifier that reads reference-world images back into attributes, and the scores
built on it.

The network has one head per attribute (``shape`` covers the held-out shape and the named
object too). It is trained by ``python -m tsuika.reference.train_evaluator`` on the whole
world, held-out concepts included, with mild noise, blur and colour jitter so that it judges
generated samples, not only clean renders.

Scores, all fractions in [0, 1]:

- ``concept_fidelity(images, concept)``: the fraction of images whose predicted value of the
  concept's attribute is the concept (``heart`` -> shape head says ``heart``).
- ``prompt_fidelity(images, spec)``: the fraction of images for which *every* attribute the
  spec names is predicted right (a new concept in a new context must get the context too).
- ``retention(images_by_prompt)``: the unweighted mean over prompts of their prompt fidelity
  (each prompt counts once however many images it has).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from .captions import EvalPrompt, parse_prompt
from .concepts import ATTRIBUTES, Scene, is_object, vocabulary

log = logging.getLogger(__name__)

FORMAT = "tsuika-reference-evaluator"
FORMAT_VERSION = 1
METADATA_KEY = "tsuika_evaluator"
# Colour and texture are not defined for objects: their loss is masked with this label.
IGNORE = -100


class EvaluatorNet(nn.Module):
    """Five strided 3x3 conv blocks, a 4x4 spatial summary (positions need where, not only
    what), one shared hidden layer and a linear head per attribute.

    Args:
        head_sizes: number of classes of each head, in ``ATTRIBUTES`` order.
        width: channels of the first block; later blocks use 1x, 2x, 2x, 3x.
        hidden: size of the shared hidden layer.
    """

    def __init__(self, head_sizes: Mapping[str, int], width: int = 32, hidden: int = 128):
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width, 3 * width]
        blocks = []
        for i in range(5):
            stride = 1 if i == 0 else 2
            blocks += [nn.Conv2d(chans[i], chans[i + 1], 3, stride, 1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(chans[-1] * 16, hidden), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, n) for a, n in head_sizes.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per head for ``images`` (N, 3, H, W) in [0, 1]."""
        h = self.hidden(self.features(images * 2 - 1))
        return {a: head(h) for a, head in self.heads.items()}


class Evaluator:
    """A trained ``EvaluatorNet`` with its label vocabulary.

    Args:
        net: the network.
        vocab: labels of each head, in logit order.
        image_size: side the network was trained on; inputs are resized to it.
        report: training figures (steps, seed, accuracy on fresh renders per head).
    """

    def __init__(self, net: EvaluatorNet, vocab: Mapping[str, Sequence[str]], image_size: int,
                 report: Mapping | None = None):
        self.net = net.eval()
        self.vocab = {a: tuple(v) for a, v in vocab.items()}
        self.image_size = int(image_size)
        self.report = dict(report or {})

    # ----------------------------------------------------------------- files

    def metadata(self) -> dict:
        """Everything but the weights, as stored next to them."""
        return {"format": FORMAT, "version": FORMAT_VERSION, "image_size": self.image_size,
                "width": self.net.features[0].out_channels,
                "hidden": self.net.hidden[0].out_features,
                "vocab": {a: list(v) for a, v in self.vocab.items()}, **self.report}

    def save(self, path: str | Path, overwrite: bool = False) -> tuple[Path, Path]:
        """Write ``<path>`` (safetensors, metadata inside) and ``<path stem>.json`` (the same
        metadata, readable).

        Args:
            path: destination ``.safetensors`` file.
            overwrite: replace existing files.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.suffix != ".safetensors":
            raise ValueError(f"evaluator path {str(path)!r} must end in .safetensors.")
        sidecar = path.with_suffix(".json")
        for p in (path, sidecar):
            if p.exists() and not overwrite:
                raise FileExistsError(f"{p} already exists; remove it or pass overwrite=True "
                                      "(--overwrite).")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = self.metadata()
        state = {k: v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(state, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, path)
        tmp = sidecar.with_name(f".{sidecar.name}.tmp")
        tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, sidecar)
        return path, sidecar

    @classmethod
    def load(cls, path: str | Path) -> Evaluator:
        """Read an evaluator written by ``save`` (only the ``.safetensors`` file is needed).

        Args:
            path: the ``.safetensors`` file.
        """
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluator {path} does not exist; train one with "
                                    "`python -m tsuika.reference.train_evaluator --out PATH`.")
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
            state = {k: f.get_tensor(k) for k in f.keys()}
        if raw is None:
            raise ValueError(f"{path} has no {METADATA_KEY!r} metadata; it is not a Tsuika "
                             "reference evaluator.")
        meta = json.loads(raw)
        if meta.get("format") != FORMAT or meta.get("version") != FORMAT_VERSION:
            raise ValueError(f"{path} is format {meta.get('format')!r} version "
                             f"{meta.get('version')!r}; this code reads {FORMAT!r} version "
                             f"{FORMAT_VERSION}. Retrain it with train_evaluator.")
        vocab = meta["vocab"]
        if vocab != {a: list(v) for a, v in vocabulary().items()}:
            log.warning("%s was trained on a different world vocabulary than the current "
                        "concept table; retrain it with train_evaluator.", path)
        net = EvaluatorNet({a: len(v) for a, v in vocab.items()}, meta["width"], meta["hidden"])
        net.load_state_dict(state)
        report = {k: v for k, v in meta.items()
                  if k not in ("format", "version", "image_size", "width", "hidden", "vocab")}
        return cls(net, vocab, meta["image_size"], report)

    # ----------------------------------------------------------- prediction

    def to_batch(self, images) -> torch.Tensor:
        """``images`` as a float (N, 3, S, S) tensor in [0, 1] at the evaluator's size.

        Args:
            images: a list of PIL images, or an array / tensor in [0, 1] shaped (N, 3, H, W)
                or (N, H, W, 3) (ComfyUI's IMAGE layout).
        """
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images is empty; pass at least one image.")
            if not all(isinstance(im, Image.Image) for im in images):
                raise TypeError("images is a list with non-PIL items; pass PIL images or "
                                "one array/tensor.")
            arrays = [np.asarray(im.convert("RGB").resize(
                (self.image_size, self.image_size), Image.Resampling.BILINEAR))
                for im in images]
            return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
        x = torch.as_tensor(images).float()
        if x.ndim != 4 or 3 not in (x.shape[1], x.shape[-1]):
            raise ValueError(f"images has shape {tuple(x.shape)}; expected (N, 3, H, W) or "
                             "(N, H, W, 3).")
        if x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        if x.numel() and (x.min() < -0.01 or x.max() > 1.01):
            raise ValueError(f"images range from {x.min():.3f} to {x.max():.3f}; expected "
                             "[0, 1] (convert [-1, 1] samples with (x + 1) / 2).")
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              antialias=True, align_corners=False)
        return x.clamp(0, 1)

    @torch.no_grad()
    def predict(self, images, batch_size: int = 256) -> list[dict[str, str | None]]:
        """The most likely value of each attribute, one dict per image.

        Colour and texture are ``None`` where the predicted shape is an object, matching
        ``Scene.spec()``.

        Args:
            images: see ``to_batch``.
            batch_size: images per forward pass.
        """
        x = self.to_batch(images)
        out = []
        for start in range(0, len(x), batch_size):
            logits = self.net(x[start:start + batch_size])
            idx = {a: logits[a].argmax(1).tolist() for a in self.vocab}
            for i in range(len(idx[ATTRIBUTES[0]])):
                pred = {a: self.vocab[a][idx[a][i]] for a in self.vocab}
                if is_object(pred["shape"]):
                    pred["color"] = pred["texture"] = None
                out.append(pred)
        return out

    # --------------------------------------------------------------- scores

    def concept_fidelity(self, images, concept: str) -> float:
        """Fraction of ``images`` whose predicted value of ``concept``'s attribute is ``concept``.

        Args:
            images: samples of the concept's prompt (see ``to_batch``).
            concept: any value of the vocabulary, typically a held-out one (``heart``,
                ``checkered``, ``zorbit``).
        """
        attribute = self._attribute_of(concept)
        preds = self.predict(images)
        return sum(p[attribute] == concept for p in preds) / len(preds)

    def prompt_fidelity(self, images, spec) -> float:
        """Fraction of ``images`` in which every attribute ``spec`` names is predicted right.

        Args:
            images: samples of one prompt (see ``to_batch``).
            spec: what the prompt asked for: a ``Scene`` or ``EvalPrompt`` (all their
                attributes), a ``{attribute: value}`` dict (only those), or prompt text
                (the attributes ``parse_prompt`` finds in it).
        """
        wanted = self._spec(spec)
        preds = self.predict(images)
        return sum(all(p[a] == v for a, v in wanted.items()) for p in preds) / len(preds)

    def retention(self, images_by_prompt: Mapping) -> float:
        """Mean prompt fidelity over prompts of known concepts, each prompt weighted equally.

        Compare the fine-tuned model's value with the base model's on the same prompts and
        seeds: the drop is what fine-tuning made the model forget.

        Args:
            images_by_prompt: ``{prompt: images}``, keys as ``prompt_fidelity``'s ``spec``
                (``EvalPrompt``, ``Scene`` or prompt text).
        """
        if not images_by_prompt:
            raise ValueError("images_by_prompt is empty; pass {prompt: images} for the "
                             "retention prompts of prompts_for_eval().")
        scores = [self.prompt_fidelity(imgs, key) for key, imgs in images_by_prompt.items()]
        return sum(scores) / len(scores)

    def _attribute_of(self, value: str) -> str:
        for attribute, labels in self.vocab.items():
            if value in labels:
                return attribute
        raise ValueError(f"concept {value!r} is not a label of this evaluator; known values: "
                         f"{', '.join(v for labels in self.vocab.values() for v in labels)}.")

    def _spec(self, spec) -> dict[str, str]:
        if isinstance(spec, (Scene, EvalPrompt)):
            wanted = spec.spec() if isinstance(spec, Scene) else spec.spec
        elif isinstance(spec, str):
            wanted = parse_prompt(spec)
        elif isinstance(spec, Mapping):
            wanted = {a: v for a, v in spec.items() if v is not None}
        else:
            raise TypeError(f"spec {spec!r} is a {type(spec).__name__}; pass a Scene, an "
                            "EvalPrompt, a dict or prompt text.")
        if not wanted:
            raise ValueError(f"spec {spec!r} names no attribute to check.")
        for attribute, value in wanted.items():
            if value not in self.vocab.get(attribute, ()):
                raise ValueError(f"spec {attribute} = {value!r} is not a label of this "
                                 f"evaluator; choose one of: "
                                 f"{', '.join(self.vocab.get(attribute, ()))}.")
        return wanted
