// tsuika.nodereport: each Tsuika node's report (images used, skipped files and why, the
// training summary, where the result went) drawn on the node itself, and the notice of a
// cancelled training.
//
// How the reports arrive (ComfyUI 0.3.64, frontend 1.27): execution.py sends
// "executed" {node, display_node, output} with the node's `ui` dict as `output` (also for a
// cached node); the frontend's app calls node.onExecuted(output) on the node found by
// display_node || node. A cancelled training sends "tsuika.stopped" {node, text} before
// ComfyUI's ordinary interruption. "executing" (detail: the node id) marks a node starting,
// which clears its old report.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { COLOURS, LINE_HEIGHT, PAD, layoutReport, reportFromOutput } from "./common/report_text.js";

export const WIDGET_NAME = "tsuika_report";
const MIN_WIDTH = 340; // wide enough for a headline and a short path per line
const INSET = 6; // the box's margin inside the node

let measureCtx = null;
function measure(text, font) {
  if (measureCtx === null) {
    measureCtx = globalThis.document?.createElement("canvas")?.getContext("2d") ?? false;
  }
  if (!measureCtx) return text.length * 6.5; // no DOM (tests): a typical glyph width
  measureCtx.font = font;
  return measureCtx.measureText(text).width;
}

/** The laid-out report of ``node`` at its current width (cached until either changes). */
export function reportLayout(node) {
  const report = node.tsuikaReport;
  if (!report) return { lines: [], height: 0 };
  const width = node.size[0] - 2 * INSET;
  if (report.layout?.width !== width) {
    report.layout = { width, ...layoutReport(report.text, { level: report.level, width, measure }) };
  }
  return report.layout;
}

function drawReport(ctx, node, width, y) {
  const { lines, height } = reportLayout(node);
  if (!lines.length) return;
  const level = node.tsuikaReport.level;
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(INSET, y, width - 2 * INSET, height);
  if (level === "cancelled" || level === "warning") {
    // a thin bar in the level's colour on the left: seen at a glance, not alarming
    ctx.fillStyle = COLOURS[level];
    ctx.fillRect(INSET, y, 3, height);
  }
  ctx.textAlign = "left";
  ctx.textBaseline = "alphabetic";
  lines.forEach((line, i) => {
    ctx.font = line.font;
    ctx.fillStyle = COLOURS[line.kind] || COLOURS.text;
    ctx.fillText(line.text, INSET + line.x, y + PAD + (i + 1) * LINE_HEIGHT - 4);
  });
  ctx.restore();
}

function reportWidget(node) {
  return node.widgets?.find((w) => w.name === WIDGET_NAME);
}

function setSize(node, width, height) {
  if (node.setSize) node.setSize([width, height]);
  else node.size = [width, height];
}

// Fit the node to what it now shows. The node grows only as far as the report needs beyond
// the room it already had (a node the user made tall keeps its height), and gives exactly
// that growth back when the report goes.
function fit(node) {
  const base = node.size[1] - (node.tsuikaGrowth || 0);
  const need = node.computeSize?.()[1] ?? base;
  const height = Math.max(base, need);
  node.tsuikaGrowth = height - base;
  setSize(node, node.size[0], height);
}

// The frontend's image preview ("$$canvas-image-preview": sample images during training)
// paints everything below its top, so the report goes before it, not after.
function placeBeforePreviews(node, widget) {
  const at = node.widgets.findIndex((w) => w !== widget && String(w.name).startsWith("$$"));
  const from = node.widgets.indexOf(widget);
  if (at >= 0 && at < from) {
    node.widgets.splice(from, 1);
    node.widgets.splice(at, 0, widget);
  }
}

/** Show ``text`` on ``node`` (level: "info" | "warning" | "cancelled"). */
export function showReport(node, text, level = "info") {
  if (node.size[0] < MIN_WIDTH) setSize(node, MIN_WIDTH, node.size[1]);
  node.tsuikaReport = { text: String(text), level };
  if (!reportWidget(node)) {
    const widget = node.addCustomWidget({
      name: WIDGET_NAME,
      type: "tsuika.report",
      // not part of the saved workflow nor of the prompt: widgets_values keep their order
      serialize: false,
      options: { serialize: false },
      draw(ctx, n, width, y) { drawReport(ctx, n, width, y); },
      computeSize() { return [node.size[0], reportLayout(node).height]; },
      serializeValue() { return undefined; },
    });
    placeBeforePreviews(node, widget ?? reportWidget(node));
  }
  fit(node);
  node.setDirtyCanvas?.(true, true);
}

/** Remove the report from ``node`` (it runs again). */
export function clearReport(node) {
  const widget = reportWidget(node);
  node.tsuikaReport = null;
  if (widget) {
    if (node.removeWidget) node.removeWidget(widget);
    else node.widgets.splice(node.widgets.indexOf(widget), 1);
    fit(node);
  }
  node.setDirtyCanvas?.(true, true);
}

/** The node an execution id names ("12", or "5:12" inside the subgraph of node 5). */
export function nodeByExecutionId(graph, id) {
  let node = null;
  for (const part of String(id).split(":")) {
    node = graph?.getNodeById(Number(part)) ?? null;
    if (!node) return null;
    graph = node.subgraph;
  }
  return node;
}

const isTsuika = (nodeData) => String(nodeData?.name ?? "").startsWith("Tsuika");

app.registerExtension({
  name: "tsuika.nodereport",
  setup() {
    api.addEventListener("executing", ({ detail }) => {
      if (detail == null) return;
      const node = nodeByExecutionId(app.graph, detail);
      if (node?.tsuikaReport) clearReport(node);
    });
    api.addEventListener("tsuika.stopped", ({ detail }) => {
      const node = nodeByExecutionId(app.graph, detail?.node);
      if (node && detail.text) showReport(node, detail.text, "cancelled");
    });
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isTsuika(nodeData)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      const report = reportFromOutput(output);
      if (report) showReport(this, report.text, report.level);
    };
  },
});
