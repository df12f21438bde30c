"""Per-step caption augmentation: trigger word, tag shuffling, tag and caption dropout.

A caption is read as comma-separated tags ("1girl, red hair, smiling"). The result of
``CaptionAugment.apply`` is laid out as::

    [trigger tags] [kept caption tags] [the other tags, shuffled and/or dropped]

- The trigger word is always first, spelled as configured. If the caption already holds it
  as a tag (compared case-insensitively) that tag is moved to the front, not repeated. A
  trigger with commas ("mychar, red coat") is several tags, all kept.
- ``keep_tokens`` counts from the start of that layout, trigger included (as in kohya, where
  users write the trigger as the caption's first tag and set ``keep_tokens = 1``); the
  trigger is kept even when ``keep_tokens`` is smaller than the number of trigger tags.
- ``caption_dropout`` empties the whole caption, trigger included (kohya's behaviour and
  what the option's help says: the step trains on an empty caption, which teaches the
  concept to show up without a prompt and keeps classifier-free guidance working).
- Without trigger, shuffle or dropout a caption is returned exactly as given.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


def split_tags(text: str) -> list[str]:
    """The non-empty, whitespace-stripped comma-separated tags of ``text``.

    Args:
        text: a caption or trigger word.
    """
    return [tag.strip() for tag in text.split(",") if tag.strip()]


@dataclass
class CaptionAugment:
    """How captions change from step to step.

    Attributes:
        trigger_word: put first in every caption (kept through shuffle and tag dropout).
        shuffle_tags: shuffle the tags that are not kept, every step.
        keep_tokens: the first N tags (trigger included) never move or drop.
        tag_dropout: probability of dropping each tag that is not kept, per step.
        caption_dropout: probability of an empty caption (trigger included) for a step.
    """

    trigger_word: str = ""
    shuffle_tags: bool = False
    keep_tokens: int = 0
    tag_dropout: float = 0.0
    caption_dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.trigger_word, str):
            raise ValueError(f"trigger_word = {self.trigger_word!r} must be a string.")
        if not isinstance(self.shuffle_tags, bool):
            raise ValueError(f"shuffle_tags = {self.shuffle_tags!r} must be true or false.")
        if (not isinstance(self.keep_tokens, int) or isinstance(self.keep_tokens, bool)
                or self.keep_tokens < 0):
            raise ValueError(f"keep_tokens = {self.keep_tokens!r} must be a whole number >= 0 "
                             f"(0 keeps only the trigger word in place).")
        for name in ("tag_dropout", "caption_dropout"):
            value = getattr(self, name)
            if (isinstance(value, bool) or not isinstance(value, (int, float))
                    or not math.isfinite(value) or not 0.0 <= value <= 1.0):
                raise ValueError(f"{name} = {value!r} must be a probability between 0 and 1 "
                                 f"(e.g. 0.1 for 10% of steps).")

    @property
    def is_static(self) -> bool:
        """True when ``apply`` gives the same text every call (no shuffle or dropout).

        The trainer caches text embeddings only then.
        """
        return not self.shuffle_tags and self.tag_dropout == 0 and self.caption_dropout == 0

    def apply(self, caption: str, rng: random.Random) -> str:
        """The caption for one training step.

        Args:
            caption: the image's caption (comma-separated tags or free text).
            rng: the step's random source; the same rng state gives the same result. It is
                only drawn from when shuffle or dropout is on.

        Returns:
            The augmented caption, tags joined with ", " ("" after caption dropout).
        """
        if self.drops(rng):
            return ""
        return self.arrange(caption, rng)

    def drops(self, rng: random.Random) -> bool:
        """Whether this step trains on the empty caption (draws only with caption_dropout)."""
        return self.caption_dropout > 0 and rng.random() < self.caption_dropout

    def arrange(self, caption: str, rng: random.Random) -> str:
        """The caption's tags laid out for one step (trigger first, kept tags, the rest
        dropped and shuffled): :meth:`apply` without the caption dropout."""
        trigger = split_tags(self.trigger_word)
        if not trigger and self.is_static:
            return caption
        tags = _with_trigger_first(split_tags(caption), trigger)
        kept_count = max(self.keep_tokens, len(trigger))
        kept, rest = tags[:kept_count], tags[kept_count:]
        if self.tag_dropout > 0:
            rest = [tag for tag in rest if rng.random() >= self.tag_dropout]
        if self.shuffle_tags:
            rng.shuffle(rest)
        return ", ".join(kept + rest)


def _with_trigger_first(tags: list[str], trigger: list[str]) -> list[str]:
    """``trigger`` followed by the caption's other tags (any copy of a trigger tag removed)."""
    if not trigger:
        return tags
    wanted = {t.casefold() for t in trigger}
    return trigger + [tag for tag in tags if tag.casefold() not in wanted]
