"""The quality benchmark's table plumbing: rows run in groups merge into one docs table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import quality  # noqa: E402


def _row(concept, method, value):
    return f"| {concept} | {method} | {value} |"


def test_rows_not_rerun_are_kept_and_ordered_by_concept_then_method():
    lora, dream, ti = "LoRA (UNet linears)", "DreamBooth (whole UNet, lr 5e-5)", \
        "Textual Inversion (1 vector, lr 5e-3)"
    head = ["| concept | method | x |", "|---|---|---|"]
    old = "\n".join(["`python benchmarks/quality.py --steps 300` — old machine", "", *head,
                     _row("zorbit", lora, "z-old"), _row("heart", dream, "d-old"),
                     _row("heart", lora, "l-old"), "", "footnote"])
    new = "\n".join(["`python benchmarks/quality.py --methods X` — this machine", "", *head,
                     _row("heart", ti, "t-new"), _row("heart", lora, "l-new"), "",
                     "footnote"])
    out = quality.merged(old, new, "python benchmarks/quality.py --steps 300").splitlines()
    assert out[0].startswith("`python benchmarks/quality.py --steps 300` (run in groups")
    assert out[0].endswith("— this machine")
    body = [line for line in out if line.startswith("| ") and "concept |" not in line]
    assert body == [_row("heart", lora, "l-new"), _row("heart", dream, "d-old"),
                    _row("heart", ti, "t-new"), _row("zorbit", lora, "z-old")]
    assert out[-1] == "footnote" and out.count("footnote") == 1


def test_the_full_command_drops_the_grouping_options():
    argv = ["--concepts", "heart", "--methods", "LoHa (UNet linears)", "DoRA (UNet linears)",
            "--steps", "300", "--work", "/tmp/x", "--lr", "5e-4"]
    assert quality._without(argv, ("--methods", "--concepts", "--work")) == [
        "--steps", "300", "--lr", "5e-4"]


def test_the_sweep_verdict_judges_each_recipe_against_dreambooth():
    import defaults_sweep

    def row(name, new_context, retention):
        return {"recipe": name, "after": {"new_context_concept": new_context,
                                          "retention_subject": retention}}

    result = {"before": {"retention_subject": 0.85}, "settings": {"max_retention_drop": 0.1},
              "rows": [row("DreamBooth (whole UNet)", 0.7, 0.65), row("close", 0.62, 0.8),
                       row("forgets", 0.7, 0.7), row("stays put", 0.1, 0.85)]}
    lines = defaults_sweep.verdict(result)
    assert "DreamBooth's own fall: 0.20" in lines[0]
    assert lines[1].startswith("- close:") and lines[1].endswith("meets the goal.")
    assert "retention falls 0.15 > 0.10" in lines[2] and "new contexts" not in \
        lines[2].split("(", 2)[2]
    assert "new contexts 0.10 < 0.60" in lines[3]
    assert defaults_sweep.verdict({**result, "rows": result["rows"][1:]}) == [
        "DreamBooth was not in this run, so no recipe is judged against it."]
