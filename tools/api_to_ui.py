"""Turn an API-format workflow into the UI format the ComfyUI editor saves and the Templates
browser opens (``example_workflows/*.json``), using a server's ``/object_info`` dump.

    python tools/api_to_ui.py object_info.json api.json out.json

Nodes are laid out in columns by their depth in the graph. Widget values follow each node's
``input_order``; a seed widget with ``control_after_generate`` gets its "fixed" value after it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _specs(info: dict) -> dict:
    out = {}
    for group in ("required", "optional"):
        out.update(info["input"].get(group, {}))
    return out


def _order(info: dict) -> list[str]:
    order = info.get("input_order", {})
    return list(order.get("required", [])) + list(order.get("optional", []))


def _depths(api: dict) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            ups = [v[0] for v in api[nid]["inputs"].values() if isinstance(v, list)]
            depth[nid] = 1 + max((visit(str(u)) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def convert(object_info: dict, api: dict) -> dict:
    depth = _depths(api)
    rows: dict[int, int] = {}
    nodes, links = [], []
    outputs_links: dict[tuple[str, int], list[int]] = {}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(nid), name,
                              object_info[api[str(value[0])]["class_type"]]["output"][value[1]]])
                outputs_links.setdefault((str(value[0]), value[1]), []).append(len(links))
    for order, (nid, node) in enumerate(sorted(api.items(), key=lambda kv: depth[kv[0]])):
        info = object_info[node["class_type"]]
        specs = _specs(info)
        inputs, widgets = [], []
        for name in _order(info):
            spec = specs[name]
            value = node["inputs"].get(name)
            if _is_widget(spec) and not isinstance(value, list):
                widgets.append(value if value is not None else spec[1].get("default")
                               if len(spec) > 1 else None)
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    widgets.append("fixed")
            elif isinstance(value, list):
                link = next(lk[0] for lk in links if lk[3] == int(nid) and lk[4] == name)
                inputs.append({"name": name, "type": spec[0] if isinstance(spec[0], str)
                               else "COMBO", "link": link})
        outputs = [{"name": (info.get("output_name") or info["output"])[i], "type": t,
                    "links": outputs_links.get((nid, i), []), "slot_index": i}
                   for i, t in enumerate(info["output"])]
        col = depth[nid]
        row = rows.get(col, 0)
        rows[col] = row + 1
        nodes.append({"id": int(nid), "type": node["class_type"], "pos": [40 + 340 * col,
                      40 + 260 * row], "size": [300, 140 + 24 * len(widgets)], "flags": {},
                      "order": order, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widgets})
    for lk in links:  # the UI format names the target slot by index
        target = next(n for n in nodes if n["id"] == lk[3])
        lk[4] = next(i for i, inp in enumerate(target["inputs"]) if inp["link"] == lk[0])
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links),
            "nodes": nodes, "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__)
        return 2
    info = json.loads(Path(argv[0]).read_text())
    api = json.loads(Path(argv[1]).read_text())
    Path(argv[2]).write_text(json.dumps(convert(info, api), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
