// Node's test runner over web/js/common/report_text.js (the text layout) and
// web/js/node_report.js (the extension, against stand-ins of ComfyUI's app and api modules).
// usage: node node_report_test.mjs MODULE_DIR_URL   (tests/test_web_js.py prepares the folder:
// report_text.mjs and node_report.mjs with their imports pointed at the stand-ins)
import { test } from "node:test";
import assert from "node:assert/strict";
import { exts } from "./app_stub.mjs";
import { listeners } from "./api_stub.mjs";

const dir = process.argv[2].replace(/\/?$/, "/");
const T = await import(dir + "report_text.mjs");
const R = await import(dir + "node_report.mjs");

const DATASET = [
  "9 images used from /data/heart (9 per epoch with repeats)",
  "  (root): 9 images x 1 repeat",
  "captions: 8 present, 1 missing",
  "image sizes: 64x64: 9",
  "12 skipped:",
  ...Array.from({ length: 12 }, (_, i) => `  broken_${i}.png: cannot be read as an image`),
  "1 warning:",
  "  caption of a.png is empty",
].join("\n");

test("the first line is the headline; skipped and warning sections are warnings", () => {
  const lines = T.classify(DATASET);
  assert.equal(lines[0].kind, "headline");
  assert.equal(lines[1].kind, "text");
  const kind = (t) => lines.find((l) => l.text === t).kind;
  assert.equal(kind("captions: 8 present, 1 missing"), "text");
  assert.equal(kind("12 skipped:"), "warning");
  assert.equal(kind("broken_3.png: cannot be read as an image"), "warning");
  assert.equal(kind("1 warning:"), "warning");
  assert.equal(kind("caption of a.png is empty"), "warning");
  const plain = T.classify("trained 5 steps\nwarning: loss rose\nskipped 2 files\nLoRA: /x.safetensors");
  assert.deepEqual(plain.map((l) => l.kind), ["headline", "warning", "warning", "text"]);
});

test("a warning list ends where the indentation does", () => {
  const lines = T.classify("head\n2 skipped:\n  a.png: bad\n  b.png: bad\nrun folder: /out");
  assert.deepEqual(lines.map((l) => l.kind), ["headline", "warning", "warning", "warning", "text"]);
});

test("levels colour the headline", () => {
  assert.equal(T.classify("Training stopped at step 3\nkept: x", "cancelled")[0].kind, "cancelled");
  assert.equal(T.classify("head", "warning")[0].kind, "warning");
  assert.deepEqual(T.classify(""), []);
});

test("long lists are shortened with '... and N more'", () => {
  const out = T.shortenLists(T.classify(DATASET), 5);
  const texts = out.map((l) => l.text);
  assert.ok(texts.includes("broken_4.png: cannot be read as an image"));
  assert.ok(!texts.includes("broken_5.png: cannot be read as an image"));
  const more = out.find((l) => l.kind === "more");
  assert.equal(more.text, "... and 7 more");
  assert.equal(texts.indexOf("... and 7 more"), texts.indexOf("broken_4.png: cannot be read as an image") + 1);
  assert.ok(texts.includes("caption of a.png is empty")); // the next section is still there
  const short = T.shortenLists(T.classify("h\n2 skipped:\n  a\n  b"), 5);
  assert.equal(short.length, 4);
});

test("long lines wrap at spaces and path separators within the width", () => {
  const measure = (t) => t.length * 7;
  const path = "LoRA: /home/someone/ComfyUI/output/tsuika/my_character/run_20260101/my_character.safetensors";
  const parts = T.wrapLine(path, 200, measure);
  assert.ok(parts.length > 1, parts);
  for (const p of parts) assert.ok(measure(p) <= 200, p);
  assert.equal(parts.join("").replace(/\s/g, ""), path.replace(/\s/g, ""));
  assert.ok(parts.slice(0, -1).every((p) => /[/\s]$/.test(p) || p.endsWith(":") || p === "LoRA:"), parts);
  const word = "x".repeat(100);
  const cut = T.wrapLine(word, 70, measure);
  assert.equal(cut.join(""), word);
  assert.ok(cut.every((p) => measure(p) <= 70));
  assert.deepEqual(T.wrapLine("short", 200, measure), ["short"]);
});

test("layout: every line fits, the height follows the lines, and a cap adds a last line", () => {
  const measure = (t) => t.length * 7;
  const lay = T.layoutReport(DATASET, { width: 260, measure });
  assert.equal(lay.height, lay.lines.length * T.LINE_HEIGHT + 2 * T.PAD);
  for (const l of lay.lines) assert.ok(l.x + measure(l.text) <= 260 - T.PAD + 1e-9, JSON.stringify(l));
  assert.equal(lay.lines[0].font, T.HEADLINE_FONT);
  assert.ok(lay.lines.some((l) => l.text === "... and 7 more" && l.kind === "more"));
  const many = Array.from({ length: 60 }, (_, i) => `line ${i}`).join("\n");
  const capped = T.layoutReport(many, { width: 400, measure, lineLimit: 10 });
  assert.equal(capped.lines.length, 10);
  assert.equal(capped.lines[9].text, "... and 51 more lines");
  assert.equal(T.layoutReport("", { measure }).height, 0);
});

test("reports are read from the executed output only under tsuika_report", () => {
  assert.equal(T.reportFromOutput({ text: ["x"] }), null);
  assert.equal(T.reportFromOutput(undefined), null);
  assert.deepEqual(T.reportFromOutput({ tsuika_report: ["a", "b"] }), { text: "a\nb", level: "info" });
  assert.deepEqual(T.reportFromOutput({ tsuika_report: ["a"], tsuika_level: ["warning"] }),
                   { text: "a", level: "warning" });
});

// --- the extension, on a stand-in node with LiteGraph's widget rules -----------------------

function makeNode(type, id) {
  function Proto() {}
  Proto.prototype.onExecuted = function () { this.baseExecuted = (this.baseExecuted || 0) + 1; };
  return { Proto, init(node) {
    node.id = id;
    node.type = type;
    node.size = [300, 120];
    node.widgets = [{ name: "folder", value: "heart" }, { name: "caption_extension", value: ".txt" }];
    node.addCustomWidget = function (w) { this.widgets.push(w); return w; };
    node.removeWidget = function (w) { this.widgets.splice(this.widgets.indexOf(w), 1); };
    node.setSize = function (s) { this.size = [s[0], s[1]]; };
    node.computeSize = function () {
      const h = this.widgets.reduce((a, w) => a + (w.computeSize ? w.computeSize()[1] + 4 : 24), 40);
      return [200, h];
    };
    node.setDirtyCanvas = () => {};
    return node;
  } };
}

// what LGraphNode.serialize writes: widgets with serialize === false are left out
const widgetsValues = (node) => node.widgets.filter((w) => w.serialize !== false).map((w) => w.value);

function drawn(node) {
  const calls = [];
  const ctx = { save() {}, restore() {}, fillRect() {}, measureText: (t) => ({ width: t.length * 6.5 }) };
  ctx.fillText = function (text) { calls.push({ text, colour: this.fillStyle, font: this.font }); };
  const w = node.widgets.find((x) => x.name === R.WIDGET_NAME);
  w.draw(ctx, node, node.size[0], 80);
  return calls;
}

test("the extension draws the report on Tsuika nodes, clears it on a new run, and is not saved", async () => {
  const ext = exts.find((e) => e.name === "tsuika.nodereport");
  assert.ok(ext, "tsuika.nodereport registered");
  ext.setup();
  const { Proto, init } = makeNode("TsuikaLoadDataset", 4);
  await ext.beforeRegisterNodeDef(Proto, { name: "TsuikaLoadDataset" });
  const other = makeNode("KSampler", 5);
  const untouched = other.Proto.prototype.onExecuted;
  await ext.beforeRegisterNodeDef(other.Proto, { name: "KSampler" });
  assert.equal(other.Proto.prototype.onExecuted, untouched);

  const node = init(new Proto());
  globalThis.nodes = { 4: node };
  const savedBefore = widgetsValues(node);
  node.onExecuted({ text: ["not ours"] });
  assert.equal(node.baseExecuted, 1); // the frontend's own onExecuted still runs
  assert.equal(node.widgets.length, 2);

  node.onExecuted({ tsuika_report: [DATASET] });
  const widget = node.widgets.find((w) => w.name === R.WIDGET_NAME);
  assert.ok(widget && widget.serialize === false && widget.options.serialize === false);
  assert.deepEqual(widgetsValues(node), savedBefore);
  assert.ok(node.size[0] >= 340, node.size);
  const reportH = widget.computeSize()[1];
  // grown to fit: the node's slots and widgets (88 px here) plus the report
  assert.ok(reportH > 100, reportH);
  assert.equal(node.size[1], node.computeSize()[1]);
  assert.equal(node.size[1], 88 + reportH + 4);
  const calls = drawn(node);
  // the headline wraps at the node's width (6.5 px a glyph here), in the headline colour
  assert.equal(calls.slice(0, 2).map((c) => c.text).join(" "),
               "9 images used from /data/heart (9 per epoch with repeats)");
  assert.deepEqual(calls.slice(0, 2).map((c) => c.colour), [T.COLOURS.headline, T.COLOURS.headline]);
  assert.equal(calls[0].font, T.HEADLINE_FONT);
  const skipped = calls.find((c) => c.text.startsWith("broken_0.png"));
  assert.equal(skipped.colour, T.COLOURS.warning);
  assert.equal(calls.find((c) => c.text === "... and 7 more").colour, T.COLOURS.more);
  assert.equal(calls.find((c) => c.text.startsWith("captions:")).colour, T.COLOURS.text);
  assert.deepEqual(drawn(node), calls); // a redraw draws the same

  // the node runs again: the old report goes, the node shrinks back
  listeners.executing({ detail: "4" });
  assert.equal(node.tsuikaReport, null);
  assert.equal(node.widgets.length, 2);
  assert.equal(node.size[1], 120); // back to the height it had
  listeners.executing({ detail: null }); // the prompt finished: nothing to do

  // a cancelled training: the node says what was kept, in the calm colour
  listeners["tsuika.stopped"]({ detail: { node: "4", text: "Training stopped at step 3 of 20.\nkept: weights and state" } });
  const stop = drawn(node);
  assert.equal(stop[0].text, "Training stopped at step 3 of 20.");
  assert.equal(stop[0].colour, T.COLOURS.cancelled);
  assert.equal(stop[1].colour, T.COLOURS.text);
  assert.equal(node.widgets.filter((w) => w.name === R.WIDGET_NAME).length, 1);

  // a short report fits in room the node already had: no growth, and none given back
  listeners.executing({ detail: "4" });
  node.setSize([400, 400]);
  node.onExecuted({ tsuika_report: ["saved x.safetensors"] });
  assert.deepEqual(node.size, [400, 400]);
  listeners.executing({ detail: "4" });
  assert.deepEqual(node.size, [400, 400]);
});

test("the report goes above the frontend's image preview, which paints to the node's bottom", async () => {
  const ext = exts.find((e) => e.name === "tsuika.nodereport");
  const { Proto, init } = makeNode("TsuikaTrainLoRA", 9);
  await ext.beforeRegisterNodeDef(Proto, { name: "TsuikaTrainLoRA" });
  const node = init(new Proto());
  node.widgets.push({ name: "$$canvas-image-preview", serialize: false, computeLayoutSize: () => ({ minHeight: 220 }) });
  node.onExecuted({ tsuika_report: ["trained 20 steps"] });
  assert.deepEqual(node.widgets.map((w) => w.name),
                   ["folder", "caption_extension", R.WIDGET_NAME, "$$canvas-image-preview"]);
});

test("execution ids inside subgraphs find the inner node", () => {
  const inner = { id: 7 };
  const outer = { id: 5, subgraph: { getNodeById: (i) => (i === 7 ? inner : null) } };
  const graph = { getNodeById: (i) => (i === 5 ? outer : null) };
  assert.equal(R.nodeByExecutionId(graph, "5:7"), inner);
  assert.equal(R.nodeByExecutionId(graph, "5"), outer);
  assert.equal(R.nodeByExecutionId(graph, "6"), null);
  assert.equal(R.nodeByExecutionId(graph, "5:8"), null);
});
