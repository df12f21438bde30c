"""How our nodes refuse inputs when a prompt is queued (``/prompt``), and in which words.

ComfyUI attaches a message *returned* by ``validate_inputs`` once to every input the method
received (execution.py: ``for x in input_filtered``), so a node that needs all its values to
check one rule would show the same message ten times, each under another widget. A message
*raised* from ``validate_inputs`` is reported once, on the node, and the prompt is refused
all the same. So our nodes raise :class:`InputRefused`, whose text names the widget, the bad
value and the fix. Pure module: no ComfyUI import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping


class InputRefused(ValueError):
    """A node input is refused; the message names the widget, the value and the fix."""


def refuse(message: str) -> None:
    """Refuse the queued prompt with ``message`` (see the module docstring for why raise)."""
    raise InputRefused(message)


def widget_message(message: str, widget_of: Mapping[str, str]) -> str:
    """A config message in the node's words: each ``section.key`` becomes its widget name.

    Args:
        message: e.g. ``"train.lr_warmup_steps = 600 must be smaller than train.steps = 500."``
        widget_of: ``{"train.steps": "steps", ...}``; option names without a widget stay.
    """
    def swap(match: re.Match) -> str:
        return widget_of.get(match.group(0), match.group(0))

    names = sorted(widget_of, key=len, reverse=True)
    if not names:
        return message
    return re.sub("|".join(re.escape(n) for n in names), swap, message)


def check_number(widget: str, value, lo=None, hi=None) -> None:
    """What ComfyUI checks for a widget it leaves to us, plus NaN and infinity (which its own
    ``<`` / ``>`` range check lets through)."""
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        refuse(f"{widget} = {value} is not a number; set {widget} to a finite value.")
    if lo is not None and value < lo:
        refuse(f"{widget} = {value} is below its minimum {lo}; set it to at least {lo}.")
    if hi is not None and value > hi:
        refuse(f"{widget} = {value} is above its maximum {hi}; set it to at most {hi}.")


def check_choice(widget: str, value, choices) -> None:
    """A combo value must be one of its own choices (ComfyUI skips that check for a node that
    validates the input itself)."""
    if value is not None and value not in choices:
        refuse(f"{widget} = {value!r} is not one of its choices: "
               f"{', '.join(map(str, choices))}.")


# Windows refuses these names for files, whatever the extension.
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)),
             *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME_BYTES = 200  # leaves room for "-partial-step<N>.safetensors" under the usual 255


def plain_name_problem(name: str) -> str | None:
    """Why ``name`` is not a plain file name (no folders, no hidden file, portable), or None.
    Names are never rewritten: a rewritten name can land on another file."""
    if name is None or not name.strip():
        return "is empty; give a file name such as 'my_lora'"
    if name != name.strip():
        return "starts or ends with a space; remove it"
    if "/" in name or "\\" in name:
        return "contains a folder separator; give a plain file name (no folders)"
    if name.startswith("."):
        return "starts with a dot (a hidden file, or a folder such as '..'); remove the dot"
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127})
    if bad:
        return (f"contains a control character ({', '.join(repr(c) for c in bad)}); "
                "remove it")
    bad = sorted(set(name) & set(':*?"<>|'))
    if bad:
        return f"contains {''.join(bad)}, which file systems refuse; remove them"
    if name.endswith("."):
        return "ends with a dot; remove it"
    if name.split(".")[0].lower() in _RESERVED:
        return f"is a name Windows reserves for a device ({name.split('.')[0]}); choose another"
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        return f"is too long ({size} bytes; at most {MAX_NAME_BYTES}); shorten it"
    return None


def check_plain_name(widget: str, name) -> None:
    """Refuse ``name`` unless it is a plain file name, saying why."""
    if name is None:  # linked from another node: checked when it runs
        return
    problem = plain_name_problem(name)
    if problem:
        refuse(f"{widget} {name!r} {problem}.")
