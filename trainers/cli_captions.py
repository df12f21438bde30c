"""``tsuika captions DIR``: edit a dataset's caption files and count their tags.

    tsuika captions DIR [--prefix sks] [--suffix TAGS] [--remove TAGS] [--replace OLD=NEW,...]
                        [--dedupe] [--sort] [--write] [--freq] [--json]
    tsuika caption DIR --model CAPTIONER_FOLDER [--prompt TEXT] [--prefix sks] [--overwrite]
                       [--merge replace|prefix|append]
                       [--threshold 0.35 --character-threshold 0.85 --exclude TAGS
                        --max-tags N --keep-underscores]   (a WD14-style tagger folder)

Without ``--write`` it only shows what would change (nothing is written); with it, each
changed caption file is replaced atomically. ``--freq`` prints the tag-frequency table (of
the captions after the edits).
"""

from __future__ import annotations

import argparse
import json

from .captioning.tools import MERGES


def add_parser(sub) -> None:
    """Register ``captions`` on the ``tsuika`` command's sub-parsers."""
    p = sub.add_parser("captions", help="edit caption files (trigger word, remove/replace "
                       "tags, dedupe, sort) and show the tag-frequency table")
    p.add_argument("dir", help="the dataset folder")
    p.add_argument("--caption-extension", default=".txt")
    p.add_argument("--prefix", default="", help="tag(s) put first, e.g. a trigger word")
    p.add_argument("--suffix", default="", help="tag(s) put last")
    p.add_argument("--remove", default="", help="comma-separated tags to remove")
    p.add_argument("--replace", default="", help="comma-separated old=new pairs")
    p.add_argument("--dedupe", action="store_true", help="drop repeated tags")
    p.add_argument("--sort", action="store_true", help="sort tags alphabetically")
    p.add_argument("--write", action="store_true", help="rewrite the caption files (default: "
                   "show the changes only)")
    p.add_argument("--freq", action="store_true", help="print the tag-frequency table")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(run=run)
    c = sub.add_parser("caption", help="write caption files with a captioning model from a "
                       "local folder (only where an image has none, unless --overwrite)")
    c.add_argument("dir", help="the dataset folder")
    c.add_argument("--model", required=True, help="captioner folder (BLIP, GIT or an "
                   "image-text-to-text model, as save_pretrained writes it; or a WD14-style "
                   "tagger: model.onnx + selected_tags.csv)")
    c.add_argument("--prompt", default=None, help="BLIP/GIT: start of every caption; "
                   "vision-language models: the question")
    c.add_argument("--prefix", default="", help="tag(s) put first, e.g. a trigger word")
    c.add_argument("--overwrite", action="store_true", help="replace existing caption files")
    c.add_argument("--batch-size", type=int, default=4)
    c.add_argument("--max-new-tokens", type=int, default=40)
    c.add_argument("--device", default="cpu")
    c.add_argument("--caption-extension", default=".txt")
    c.add_argument("--merge", default="replace", choices=MERGES, help="with --overwrite: "
                   "replace the caption file's text, or put the new tags before it (prefix) "
                   "or after it (append), each tag once")
    t = c.add_argument_group("tagger (a folder with model.onnx and selected_tags.csv)")
    t.add_argument("--threshold", type=float, default=0.35, help="lowest probability of a "
                   "general tag written")
    t.add_argument("--character-threshold", type=float, default=0.85, help="lowest "
                   "probability of a character tag written")
    t.add_argument("--exclude", default="", help="comma-separated tags never written")
    t.add_argument("--max-tags", type=int, default=0, help="most tags per caption (0 = all)")
    t.add_argument("--keep-underscores", action="store_true", help="write tags as the tag "
                   "list spells them (default: long_hair -> long hair; kaomoji keep theirs)")
    c.set_defaults(run=run_caption)


def run_caption(args: argparse.Namespace) -> list[str]:
    """Caption the folder; Ctrl-C stops after the current batch, keeping what was written."""
    import logging

    from .captioning.captioners import caption_folder, load_captioner
    from .captioning.tools import parse_tag_list
    from .data.folder import scan_folder

    log = logging.getLogger("tsuika")
    scan = scan_folder(args.dir, caption_extension=args.caption_extension)
    tagger = {"threshold": args.threshold, "character_threshold": args.character_threshold,
              "exclude": parse_tag_list(args.exclude), "max_tags": args.max_tags,
              "keep_underscores": args.keep_underscores}
    model = load_captioner(args.model, prompt=args.prompt, max_new_tokens=args.max_new_tokens,
                           device=args.device, tagger=tagger)
    result = caption_folder(scan, model, overwrite=args.overwrite, batch_size=args.batch_size,
                            extension=args.caption_extension, prefix=args.prefix,
                            merge=args.merge,
                            on_progress=lambda done, total: log.info("captioned %d/%d",
                                                                     done, total))
    for path in result.empty:
        log.warning("no caption for %s (the model gave none)", path.name)
    return [f"wrote {len(result.written)} caption files; {len(result.kept)} kept"]


def run(args: argparse.Namespace) -> list[str]:
    from .captioning.tools import (
        TagEdit,
        edit_caption_folder,
        frequency_table,
        parse_replacements,
        parse_tag_list,
        tag_frequency,
    )
    from .data.folder import scan_folder

    edit = TagEdit(prefix=args.prefix, suffix=args.suffix, remove=parse_tag_list(args.remove),
                   replace=parse_replacements(args.replace), dedupe=args.dedupe, sort=args.sort)
    scan = scan_folder(args.dir, caption_extension=args.caption_extension)
    result = edit_caption_folder(scan, edit, write=args.write)
    after = {item.path: item.caption for item in scan.items}
    for item in scan.items:
        if item.caption_file in result.changes:
            after[item.path] = result.changes[item.caption_file][1]
    freq = tag_frequency(after.values())
    rel = scan._relative
    if args.json:
        out = {"changed": {rel(p): {"old": o, "new": n} for p, (o, n) in result.changes.items()},
               "unchanged": result.unchanged, "written": args.write,
               "without_caption_file": [rel(p) for p in result.without_file],
               "tag_frequency": freq}
        return [json.dumps(out, indent=2, ensure_ascii=False)]
    verb = "rewrote" if args.write else "would change (run again with --write)"
    lines = [f"{verb} {len(result.changes)} caption files; {result.unchanged} unchanged"]
    lines += [f"  {rel(p)}: {o!r} -> {n!r}" for p, (o, n) in result.changes.items()]
    if result.without_file:
        lines.append(f"{len(result.without_file)} images have no caption file: "
                     + ", ".join(rel(p) for p in result.without_file[:10]))
    if args.freq:
        lines += ["tag frequency (captions holding the tag):",
                  frequency_table(freq, len(scan.items))]
    return lines
