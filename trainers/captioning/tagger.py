"""A booru tagger: a WD14-style ONNX model run with onnxruntime (the ``tagger`` extra).

A tagger folder holds what those models ship: ``model.onnx`` and ``selected_tags.csv``, one
row per model output with at least the columns ``name`` and ``category`` (0 general, 4
character, 9 rating). The model takes a batch of square BGR images, float 0-255, not
normalised, channels last (NHWC; a channels-first model is fed NCHW), at the size its input
declares (448 for the published ones), and gives one probability per tag.

The caption is the character tags above ``character_threshold`` then the general tags above
``threshold``, each group most confident first; rating tags are never written (they describe
the image's rating, not what a prompt should ask for). Underscores become spaces except in
kaomoji (``^_^``, ``o_o``: tags whose letters and digits all stand alone), where the
underscore is the mouth.

:class:`Tagger` has the captioner interface (``caption(images) -> list[str]``), so
``captioners.caption_folder`` writes its captions like a captioning model's.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

TAGGER_FILES = {"model.onnx": "the ONNX model",
                "selected_tags.csv": "its tag list: name and category per output"}
GENERAL, CHARACTER, RATING = 0, 4, 9
DEFAULT_SIZE = 448  # the published WD14 models' input, used when the model leaves it open
_WORD = re.compile(r"[^\W_]{2}")  # two letters/digits in a row: a word, not a kaomoji face


def is_tagger_folder(folder: str | Path) -> bool:
    """True when ``folder`` is laid out as a tagger (it has ``model.onnx``)."""
    return (Path(folder) / "model.onnx").is_file()


def clean_tag(name: str, keep_underscores: bool = False) -> str:
    """A tag as a caption writes it: underscores as spaces, except in kaomoji.

    Args:
        name: the tag as ``selected_tags.csv`` spells it ("long_hair", "^_^").
        keep_underscores: write every tag as spelled.
    """
    name = name.strip()
    if keep_underscores or "_" not in name or not _WORD.search(name):
        return name
    return name.replace("_", " ")


def read_tags(path: Path) -> tuple[list[str], np.ndarray]:
    """The tag names and categories of ``selected_tags.csv``.

    Raises:
        CaptionerError: no ``name`` / ``category`` column, a category that is not a number,
            or no rows.
    """
    from .captioners import CaptionerError

    names, categories = [], []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"name", "category"} <= set(reader.fieldnames):
            raise CaptionerError(f"tag list {str(path)!r} needs the columns 'name' and "
                                 f"'category' (found {reader.fieldnames}); use the "
                                 "selected_tags.csv that came with the model.")
        for line, row in enumerate(reader, start=2):
            try:
                categories.append(int(row["category"]))
            except (TypeError, ValueError):
                raise CaptionerError(f"tag list {str(path)!r} line {line}: category "
                                     f"{row['category']!r} is not a number (0 general, 4 "
                                     "character, 9 rating).") from None
            names.append(row["name"])
    if not names:
        raise CaptionerError(f"tag list {str(path)!r} has no tags.")
    return names, np.asarray(categories)


def prepare(image, size: int) -> np.ndarray:
    """``image`` (PIL) as the model's input: padded to a centred square with white, resized
    to ``size``, BGR, float32 0-255, shape (size, size, 3)."""
    from PIL import Image

    if image.mode != "RGB":  # alpha goes onto white, like the padding
        canvas = Image.new("RGBA", image.size, (255, 255, 255, 255))
        canvas.alpha_composite(image.convert("RGBA"))
        image = canvas.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    if side != size:
        square = square.resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1]


@dataclass
class Tagger:
    """A loaded tagger and how it turns probabilities into a caption.

    Attributes:
        threshold: lowest probability of a general tag written.
        character_threshold: lowest probability of a character tag written.
        exclude: tags never written (either spelling, case-insensitive).
        max_tags: most tags per caption (0 = no limit); the most confident are kept,
            character tags first.
        keep_underscores: write tags as the tag list spells them.
    """

    session: object
    names: list[str]
    categories: np.ndarray
    threshold: float = 0.35
    character_threshold: float = 0.85
    exclude: list[str] = field(default_factory=list)
    max_tags: int = 0
    keep_underscores: bool = False
    size: int = DEFAULT_SIZE
    channels_first: bool = False
    kind: str = "tagger"

    def scores(self, images: list) -> np.ndarray:
        """The model's probabilities, shape (len(images), tags).

        Args:
            images: PIL images.
        """
        batch = np.stack([prepare(im, self.size) for im in images])
        if self.channels_first:
            batch = batch.transpose(0, 3, 1, 2)
        inp = self.session.get_inputs()[0].name
        probs = np.asarray(self.session.run(None, {inp: np.ascontiguousarray(batch)})[0])
        if probs.ndim != 2 or probs.shape[1] != len(self.names):
            from .captioners import CaptionerError

            raise CaptionerError(f"the tagger's model gives {probs.shape[-1]} outputs but "
                                 f"its selected_tags.csv lists {len(self.names)} tags; use "
                                 "the tag list that came with this model.")
        return probs

    def tags(self, probs: np.ndarray) -> list[str]:
        """The caption's tags for one image's probabilities, in caption order."""
        gone = {t.strip().casefold() for t in self.exclude}
        gone |= {t.replace(" ", "_") for t in gone}
        picked = []
        for category, cut in ((CHARACTER, self.character_threshold),
                              (GENERAL, self.threshold)):
            idx = np.flatnonzero((self.categories == category) & (probs >= cut))
            idx = idx[np.argsort(-probs[idx], kind="stable")]  # ties keep the CSV order
            for i in idx:
                tag = clean_tag(self.names[i], self.keep_underscores)
                if tag.casefold() not in gone and self.names[i].casefold() not in gone:
                    picked.append(tag)
        return picked[:self.max_tags] if self.max_tags > 0 else picked

    def caption(self, images: list) -> list[str]:
        """One caption (tags joined with ", ") per PIL image.

        Args:
            images: PIL images.
        """
        if not images:
            return []
        return [", ".join(self.tags(p)) for p in self.scores(images)]


def load_tagger(folder: str | Path, threshold: float = 0.35,
                character_threshold: float = 0.85, exclude: list[str] | None = None,
                max_tags: int = 0, keep_underscores: bool = False,
                device: str = "cpu") -> Tagger:
    """Load the tagger in ``folder`` (``model.onnx`` + ``selected_tags.csv``).

    Args:
        folder: the tagger folder.
        threshold: see :class:`Tagger`.
        character_threshold: see :class:`Tagger`.
        exclude: see :class:`Tagger`.
        max_tags: see :class:`Tagger`.
        keep_underscores: see :class:`Tagger`.
        device: "cpu", or "cuda" to use onnxruntime's CUDA provider when it has one.

    Raises:
        CaptionerError: a missing file, onnxruntime not installed, a model onnxruntime
            cannot load, or a model whose input is not one image batch.
    """
    from .captioners import CaptionerError

    folder = Path(folder).expanduser()
    missing = [f"{name} ({what})" for name, what in TAGGER_FILES.items()
               if not (folder / name).is_file()]
    if missing:
        raise CaptionerError(f"tagger folder {str(folder)!r} is incomplete; it needs: "
                             f"{'; '.join(missing)}. Copy both files of the model (nothing "
                             "is downloaded).")
    for name, value, top in (("threshold", threshold, 1), ("character_threshold",
                                                           character_threshold, 1)):
        if not 0 <= value <= top:
            raise CaptionerError(f"{name} {value} is not a probability; give 0..1 "
                                 "(0.35 general, 0.85 character are usual).")
    if max_tags < 0:
        raise CaptionerError(f"max_tags {max_tags} is negative; give 0 (no limit) or more.")
    try:
        import onnxruntime as ort
    except ImportError:
        raise CaptionerError("the tagger needs onnxruntime: pip install 'tsuika[tagger]' "
                             "(or pip install onnxruntime) into the Python that runs "
                             "Tsuika.") from None
    names, categories = read_tags(folder / "selected_tags.csv")
    providers = ["CPUExecutionProvider"]
    if str(device).startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    try:
        session = ort.InferenceSession(str(folder / "model.onnx"), providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for a bad file
        raise CaptionerError(f"tagger model {str(folder / 'model.onnx')!r} cannot be "
                             f"loaded by onnxruntime: {e}") from e
    shape = list(session.get_inputs()[0].shape)
    if len(shape) != 4 or 3 not in (shape[1], shape[3]):
        raise CaptionerError(f"tagger model {str(folder / 'model.onnx')!r} takes input of "
                             f"shape {shape}, not a batch of RGB images; use a WD14-style "
                             "tagger (input batch x 448 x 448 x 3).")
    channels_first = shape[1] == 3 and shape[3] != 3
    side = shape[2] if channels_first else shape[1]
    size = side if isinstance(side, int) and side > 0 else DEFAULT_SIZE
    log.info("tagger %s: %d tags, %d px input", folder.name, len(names), size)
    return Tagger(session=session, names=names, categories=categories, threshold=threshold,
                  character_threshold=character_threshold, exclude=list(exclude or []),
                  max_tags=max_tags, keep_underscores=keep_underscores, size=size,
                  channels_first=channels_first)
