"""The ``output`` section: where the trained file and the run's states are written."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import ConfigError, _Section, opt

# The longest output.name in UTF-8 bytes: file systems allow 255 per name, and the run adds
# suffixes such as "-step00001000.safetensors" and "-samples.png".
MAX_NAME_BYTES = 200


@dataclass
class OutputConfig(_Section):
    SECTION = "output"
    dir: str = opt("outputs", "Folder for the trained file, states, logs and samples.")
    name: str = opt("tsuika_lora", "Base file name of the trained LoRA (no extension).")
    save_every: int = opt(0, "Save the LoRA and a resumable state every N steps; 0 = only at "
                             "the end.", min=0)
    keep_last: int = opt(3, "Keep only the newest N intermediate saves; 0 = keep all.", min=0)
    overwrite: bool = opt(False, "Allow replacing an existing output file of the same name, "
                          "and a fresh start in an output.dir that holds resumable states "
                          "(they are moved aside to states.replaced-<time>, not deleted).")
    save_dtype: str = opt("fp16", "Precision of the saved LoRA tensors.",
                          choices=("fp16", "bf16", "fp32"))
    metadata_paths: bool = opt(False, "Write local folder paths into the file's metadata.")

    def validate(self) -> None:
        bad = set('/\\:*?"<>|') & set(self.name)
        if bad or not self.name.strip() or self.name in (".", ".."):
            raise ConfigError(f"output.name = {self.name!r} is not a plain file name; remove "
                              f"{''.join(sorted(bad)) or 'the dots'} (it may not contain a path).")
        if any(ord(c) < 32 or ord(c) == 127 for c in self.name):
            raise ConfigError(f"output.name = {self.name!r} contains control characters "
                              "(newline, tab, ...); use letters, digits, '-' and '_'.")
        if self.name.startswith("."):
            raise ConfigError(f"output.name = {self.name!r} starts with a dot (a hidden file "
                              "that file lists and ComfyUI do not show); remove the dot.")
        size = len(self.name.encode("utf-8", "surrogatepass"))
        if size > MAX_NAME_BYTES:
            raise ConfigError(f"output.name is {size} bytes long (UTF-8); the limit is "
                              f"{MAX_NAME_BYTES} (file systems allow 255 per name and suffixes "
                              "are added); use a shorter name.")
