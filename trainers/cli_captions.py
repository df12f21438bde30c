"""``tsuika captions DIR``: edit a dataset's caption files and count their tags.

    tsuika captions DIR [--prefix sks] [--suffix TAGS] [--remove TAGS] [--replace OLD=NEW,...]
                        [--dedupe] [--sort] [--write] [--freq] [--json]

Without ``--write`` it only shows what would change (nothing is written); with it, each
changed caption file is replaced atomically. ``--freq`` prints the tag-frequency table (of
the captions after the edits).
"""

from __future__ import annotations

import argparse
import json
import sys


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


def run(args: argparse.Namespace) -> int:
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
        sys.stdout.write(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
        return 0
    verb = "rewrote" if args.write else "would change (run again with --write)"
    lines = [f"{verb} {len(result.changes)} caption files; {result.unchanged} unchanged"]
    lines += [f"  {rel(p)}: {o!r} -> {n!r}" for p, (o, n) in result.changes.items()]
    if result.without_file:
        lines.append(f"{len(result.without_file)} images have no caption file: "
                     + ", ".join(rel(p) for p in result.without_file[:10]))
    if args.freq:
        lines += ["tag frequency (captions holding the tag):",
                  frequency_table(freq, len(scan.items))]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0
