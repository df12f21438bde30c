"""Prior preservation on the train nodes: the class images a ``class_dataset`` input gives, or
the base model draws into a folder under ComfyUI's output (``trainers/prior.py`` trains them
beside the dataset). One place for every node that offers it (``TrainNodeSpec.prior`` /
``advanced_prior``).
"""

from __future__ import annotations

from typing import Any

from . import _host
from .types import Dataset
from .validation import InputRefused

# The prior-preservation widgets in the node's words (the config's help names data.class_dir,
# which the node sets itself).
PRIOR_TIPS = {
    "data.class_prompt": "Prior preservation: the caption of every class image, e.g. 'a photo "
                         "of a dog' (what class_images draws). Empty: each class image's own "
                         "caption file.",
    "data.class_images": "Prior preservation without class_dataset: the base model draws this "
                         "many class images of class_prompt before training, into a folder "
                         "under ComfyUI's output that later runs with the same prompt, "
                         "resolution and model reuse. 0: none drawn (class_dataset's images, "
                         "if connected).",
    "train.prior_loss_weight": "Weight of the class images' loss beside the dataset's (with "
                               "class_dataset or class_images).",
}
CLASS_INPUT = Dataset.Input(
    "class_dataset", optional=True,
    tooltip="Prior preservation: class images (e.g. other dogs, from Load Training Dataset) "
            "trained beside the dataset so the class is not forgotten. Not connected: off, "
            "unless class_images asks the base model to draw them.")
ADVANCED_PRIOR_TAIL = ("Prior preservation: connect class_dataset (or set class_images and "
                       "class_prompt) to keep the class as it was.")


def check_class_prompt(values: dict[str, Any]) -> None:
    """Drawn class images need a class prompt (said in the node's words: the backend's
    message names data.class_dir, which the node sets itself)."""
    if values.get("data.class_images") and not str(values.get("data.class_prompt", "")).strip():
        raise InputRefused(
            f"class_images = {values['data.class_images']} has the base model draw class "
            "images, which needs class_prompt (what to draw, e.g. 'a photo of a dog'); type "
            "one, or set class_images to 0 (with class_dataset connected: its images).")


def prior_folder(values: dict[str, Any], class_dataset, model) -> None:
    """Set ``data.class_dir``: the connected class dataset's folder (used as it is), or, when
    ``data.class_images`` asks for drawn class images, a folder under ComfyUI's output keyed
    by the class prompt, the resolution and the base model, so a later run reuses them."""
    count = values.get("data.class_images", 0)
    if class_dataset is not None:
        if count:
            raise InputRefused(
                f"class_images = {count}: class images are drawn only when no class_dataset "
                "is connected (drawing would add files to that dataset's folder); set "
                "class_images to 0, or disconnect class_dataset.")
        values["data.class_dir"] = str(class_dataset.root)
    elif count:
        check_class_prompt(values)
        values["data.class_dir"] = str(_host.class_images_dir(
            values.get("data.class_prompt", ""), values.get("data.resolution"), model))
