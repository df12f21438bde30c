"""The reference world's vocabulary: every attribute, its values, and which are held out.

This table is the single place that says what the reference world contains. The renderer,
the captions, the evaluation prompts and the evaluator's label heads all read it, so adding a
colour or a shape here is the whole change (the shipped evaluator must then be retrained).

A scene shows one *subject* on a plain background. The subject is either a simple shape
(``circle``, ``heart``...) that takes a colour and a texture, or a named multi-part object
(``zorbit``) whose parts have fixed colours, so its colour and texture are ``None``. Both
kinds are values of the ``shape`` attribute: a scene has exactly one subject, and the
evaluator's ``shape`` head tells them apart.

Held-out values never appear in pretraining data (``sample_scene(include_held_out=False)``);
each one is a fine-tuning target with a fixed *fine-tuning context* (the attributes every
fine-tuning image shares) and *new contexts* (combinations the fine-tuning set never shows,
used to check that the model composes the new concept with what it already knew).
"""

from __future__ import annotations

from dataclasses import dataclass, field

ATTRIBUTES = ("shape", "color", "texture", "background", "position", "size")

# Clearly separated RGB so that a blurry, noisy 64x64 sample is still classifiable.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 20),
    "yellow": (240, 220, 40),
    "green": (40, 165, 60),
    "blue": (40, 80, 220),
    "purple": (135, 50, 185),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}

# Background colours are disjoint from subject colours so that no subject is ever invisible
# and the words never collide in a caption ("a white circle on a gray background").
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "gray": (128, 128, 128),
    "beige": (225, 210, 170),
    "teal": (25, 120, 125),
    "pink": (240, 165, 200),
}

# Subject centre as a fraction of the image side (x, y); y grows downwards.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}

# Subject diameter as a fraction of the image side.
SIZES: dict[str, float] = {"small": 0.26, "large": 0.42}

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
TEXTURES = ("solid", "striped", "checkered")


@dataclass(frozen=True)
class ObjectPart:
    """One part of a named object, in the object's box: centre offset and extent as
    fractions of the object's diameter."""

    shape: str
    color: str
    center: tuple[float, float]
    extent: float


# A zorbit: a blue round head sitting on an orange square body.
OBJECTS: dict[str, tuple[ObjectPart, ...]] = {
    "zorbit": (
        ObjectPart("square", "orange", (0.0, 0.19), 0.62),
        ObjectPart("circle", "blue", (0.0, -0.24), 0.52),
    ),
}


@dataclass(frozen=True)
class HeldOutConcept:
    """A value kept out of pretraining, and how it is fine-tuned and evaluated.

    Attributes:
        attribute: which attribute the value belongs to (``shape`` or ``texture``).
        value: the held-out value.
        finetune_context: attributes every fine-tuning image shares; the others vary over
            the known values.
        new_contexts: full attribute sets (the concept excluded) that the fine-tuning set
            never shows; each disagrees with ``finetune_context`` somewhere.
    """

    attribute: str
    value: str
    finetune_context: dict[str, str]
    new_contexts: tuple[dict[str, str], ...] = field(default_factory=tuple)


HELD_OUT: dict[str, HeldOutConcept] = {
    c.value: c for c in (
        HeldOutConcept(
            "shape", "heart",
            finetune_context={"color": "red", "texture": "solid", "background": "gray"},
            new_contexts=(
                {"color": "green", "texture": "solid", "background": "gray",
                 "position": "bottom right", "size": "large"},
                {"color": "blue", "texture": "striped", "background": "beige",
                 "position": "top left", "size": "large"},
            )),
        HeldOutConcept(
            "texture", "checkered",
            finetune_context={"shape": "square", "background": "beige"},
            new_contexts=(
                {"shape": "circle", "color": "yellow", "background": "teal",
                 "position": "center", "size": "large"},
                {"shape": "triangle", "color": "purple", "background": "gray",
                 "position": "bottom left", "size": "large"},
            )),
        HeldOutConcept(
            "shape", "zorbit",
            finetune_context={"background": "gray", "position": "center"},
            new_contexts=(
                {"background": "pink", "position": "top left", "size": "large"},
                {"background": "teal", "position": "bottom right", "size": "small"},
            )),
    )
}


def vocabulary(include_held_out: bool = True) -> dict[str, tuple[str, ...]]:
    """Every attribute's values in a fixed order (the evaluator's label order).

    Args:
        include_held_out: keep the held-out values (``False`` gives the pretraining world).
    """
    vocab = {
        "shape": SHAPES + tuple(OBJECTS),
        "color": tuple(COLORS),
        "texture": TEXTURES,
        "background": tuple(BACKGROUNDS),
        "position": tuple(POSITIONS),
        "size": tuple(SIZES),
    }
    if include_held_out:
        return vocab
    held = {(c.attribute, c.value) for c in HELD_OUT.values()}
    return {a: tuple(v for v in values if (a, v) not in held) for a, values in vocab.items()}


def is_object(shape: str) -> bool:
    """Whether ``shape`` names a multi-part object (fixed colours, no colour or texture)."""
    return shape in OBJECTS


@dataclass(frozen=True)
class Scene:
    """One subject on a plain background.

    Attributes:
        shape: a value of ``vocabulary()["shape"]``: a simple shape or a named object.
        color: subject colour; ``None`` exactly when ``shape`` is an object.
        texture: subject texture; ``None`` exactly when ``shape`` is an object.
        background: background colour name.
        position: where the subject's centre lies.
        size: ``small`` or ``large``.
        offset: jitter of the centre, as fractions of the image side, so that training
            images of one caption are not pixel-identical. Not an attribute: captions and
            the evaluator ignore it.
    """

    shape: str
    color: str | None
    texture: str | None
    background: str
    position: str
    size: str
    offset: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self):
        vocab = vocabulary()
        for name in ATTRIBUTES:
            value = getattr(self, name)
            if name in ("color", "texture") and is_object(self.shape):
                if value is not None:
                    raise ValueError(f"Scene.{name} = {value!r}, but {self.shape!r} is an "
                                     f"object with fixed colours; pass {name}=None.")
                continue
            if value not in vocab[name]:
                raise ValueError(f"Scene.{name} = {value!r} is unknown; choose one of: "
                                 f"{', '.join(vocab[name])}.")
        if any(abs(o) > 0.08 for o in self.offset):
            raise ValueError(f"Scene.offset = {self.offset!r} is too large; each part must "
                             "lie within +-0.08 of the image side so the position stays true.")

    def spec(self) -> dict[str, str]:
        """The scene's attributes as ``{attribute: value}``, without the ``None`` ones."""
        return {a: getattr(self, a) for a in ATTRIBUTES if getattr(self, a) is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, str], offset: tuple[float, float] = (0.0, 0.0)):
        """Build a scene from ``{attribute: value}``; objects may leave colour and texture out.

        Args:
            spec: every attribute of ``ATTRIBUTES`` (colour and texture optional for objects).
            offset: centre jitter, see ``Scene.offset``.
        """
        unknown = set(spec) - set(ATTRIBUTES)
        if unknown:
            raise ValueError(f"scene spec has unknown attributes {sorted(unknown)}; valid: "
                             f"{', '.join(ATTRIBUTES)}.")
        optional = ("color", "texture") if is_object(spec.get("shape", "")) else ()
        missing = [a for a in ATTRIBUTES if a not in spec and a not in optional]
        if missing:
            raise ValueError(f"scene spec {spec!r} lacks {missing}; a scene needs all of "
                             f"{', '.join(ATTRIBUTES)}.")
        return cls(**{a: spec.get(a) for a in ATTRIBUTES}, offset=offset)

