"""Captions of reference-world scenes, their inverse, and the fixed evaluation prompts.

Every caption names every attribute of its scene, in one canonical sentence (used for
evaluation prompts) or one of a few paraphrases (training variety). ``words`` maps a value
to the text that stands for it, which is how a trigger token replaces a concept's name
(``{"zorbit": "sks"}``) in fine-tuning captions and in evaluation prompts alike.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from .concepts import ATTRIBUTES, HELD_OUT, Scene, is_object, vocabulary

CANONICAL = "{a_np} on a {background} background, {size}, {position}"
PARAPHRASES = (
    "{size_np}, {position}, {background} background",
    "{a_size_np} in the {position} of a {background} background",
    "{background} background with {a_np} at the {position}, {size}",
    "a picture of {a_size_np} on {background}, {position}",
)


def caption(scene: Scene, rng: random.Random | None = None,
            words: dict[str, str] | None = None) -> str:
    """Describe ``scene`` in one sentence that names each of its attributes.

    ``caption(scene)`` is the canonical form, e.g.
    ``"a striped red circle on a gray background, small, top left"``; objects have no
    colour or texture words (``"a zorbit on a pink background, large, center"``).

    Args:
        scene: the scene to describe.
        rng: when given, pick uniformly among the canonical sentence and the paraphrases.
        words: value -> text substitutions (trigger tokens); values not listed are used as is.
    """
    words = words or {}
    say = {a: words.get(v, v) for a, v in scene.spec().items()}
    noun = " ".join(say[a] for a in ("texture", "color", "shape") if a in say)
    size_noun = f"{say['size']} {noun}"
    fields = {"a_np": _with_article(noun), "size_np": size_noun,
              "a_size_np": _with_article(size_noun), **say}
    template = CANONICAL if rng is None else rng.choice((CANONICAL,) + PARAPHRASES)
    return template.format(**fields)


def _with_article(phrase: str) -> str:
    return ("an " if phrase[:1].lower() in "aeiou" else "a ") + phrase


def parse_prompt(text: str, words: dict[str, str] | None = None) -> dict[str, str]:
    """The attributes a caption or prompt names, as ``{attribute: value}``.

    Inverse of ``caption`` for any of its templates; attributes the text does not name are
    simply absent.

    Args:
        text: a caption or a prompt.
        words: the same substitutions that produced the text.

    Raises:
        ValueError: when the text names two values of one attribute.
    """
    words = words or {}
    lowered = f" {text.lower()} "
    spec = {}
    for attribute, values in vocabulary().items():
        found = [v for v in values
                 if re.search(rf"(?<![\w-]){re.escape(words.get(v, v).lower())}(?![\w-])",
                              lowered)]
        if len(found) > 1:
            raise ValueError(f"prompt {text!r} names several {attribute} values {found}; a "
                             "reference-world prompt names at most one of each attribute.")
        if found:
            spec[attribute] = found[0]
    return spec


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt and the scene it asks for.

    Attributes:
        text: the canonical caption of ``scene`` (with the ``words`` substitutions).
        scene: every attribute the prompt asks for (offset zero).
        kind: ``retention`` (known values only), ``concept`` (a held-out concept in its
            fine-tuning context) or ``new_context`` (a held-out concept in a context its
            fine-tuning set never shows).
        concept: the held-out concept, ``None`` for retention prompts.
    """

    text: str
    scene: Scene
    kind: str
    concept: str | None = None

    @property
    def spec(self) -> dict[str, str]:
        """``scene.spec()``: what prompt fidelity checks."""
        return self.scene.spec()


def retention_scenes() -> list[Scene]:
    """Eight fixed scenes of known values that together show every known value at least once.

    Attributes cycle with different periods so that no two prompts share their whole
    context; the list never changes unless the concept table does.
    """
    known = vocabulary(include_held_out=False)
    n = max(len(known["shape"]), len(known["color"]))
    scenes = []
    for i in range(n):
        spec = {"shape": known["shape"][i % len(known["shape"])],
                "color": known["color"][i % len(known["color"])],
                "texture": known["texture"][i % len(known["texture"])],
                "background": known["background"][(i + i // 4) % len(known["background"])],
                "position": known["position"][(2 * i) % len(known["position"])],
                "size": known["size"][(i // 2) % len(known["size"])]}
        scenes.append(Scene.from_spec(spec))
    return scenes


def prompts_for_eval(words: dict[str, str] | None = None) -> list[EvalPrompt]:
    """The fixed evaluation prompts, retention prompts first.

    For each held-out concept: one ``concept`` prompt (its fine-tuning context, with the
    first value of each varying attribute: ``large`` and ``center`` unless pinned) and one
    ``new_context`` prompt per entry of ``HELD_OUT[concept].new_contexts``.

    Args:
        words: value -> text substitutions, e.g. the trigger token a model was trained with.
    """
    prompts = [EvalPrompt(caption(s, words=words), s, "retention") for s in retention_scenes()]
    defaults = {"size": "large", "position": "center"}
    known = vocabulary(include_held_out=False)
    for name, held in HELD_OUT.items():
        spec = {held.attribute: held.value, **held.finetune_context}
        for attribute in ATTRIBUTES:
            if attribute not in spec:
                spec[attribute] = defaults.get(attribute, known[attribute][0])
        scenes = [("concept", Scene.from_spec(_drop_object_colours(spec)))]
        scenes += [("new_context",
                    Scene.from_spec(_drop_object_colours({held.attribute: held.value, **ctx})))
                   for ctx in held.new_contexts]
        prompts += [EvalPrompt(caption(s, words=words), s, kind, name) for kind, s in scenes]
    return prompts


def _drop_object_colours(spec: dict[str, str]) -> dict[str, str]:
    if is_object(spec.get("shape", "")):
        return {a: v for a, v in spec.items() if a not in ("color", "texture")}
    return spec
