// Drives web/js/loss_chart.js against stand-ins of ComfyUI's app and api modules.
import { exts } from "./app_stub.mjs";
import { listeners } from "./api_stub.mjs";
await import(process.argv[2]);
const ext = exts[0];
if (ext.name !== "tsuika.losschart") throw new Error("name");
ext.setup();
function Proto() {}
Proto.prototype.onNodeCreated = function () {};
const widgets = [];
Proto.prototype.addCustomWidget = function (w) { widgets.push(w); };
const trainOutputs = ["MODEL", "CLIP", "LORA_MODEL", "LOSS_MAP", "IMAGE"];
await ext.beforeRegisterNodeDef(Proto, { name: "TsuikaTrainLoRA", output: trainOutputs });
const node = new Proto(); node.onNodeCreated();
node.setDirtyCanvas = () => {};
globalThis.nodes = { 3: node };
for (let s = 1; s <= 5; s++) listeners["tsuika.loss"]({ detail: { node: "3", step: s, total: 5, loss: 1 / s } });
const calls = [];
const ctx = new Proxy({}, { get: (t, k) => (k in t ? t[k] : (...a) => calls.push([k, ...a])), set: (t, k, v) => ((t[k] = v), true) });
widgets[0].draw(ctx, node, 300, 10);
const text = calls.filter((c) => c[0] === "fillText").map((c) => c[1]);
console.log(node.tsuikaLoss.length, widgets.length, text);
if (node.tsuikaLoss.length !== 5 || !text[0].includes("step 5/5")) throw new Error("chart did not update");
// Any Tsuika node with a LOSS_MAP output is a train node (the seam gives every one of them a
// loss output); other nodes get no chart.
for (const [name, output, charts] of [
  ["TsuikaTrainCheckpoint", ["MODEL", "CLIP", "STRING", "LOSS_MAP", "IMAGE"], 1],
  ["TsuikaSaveLoRA", ["STRING"], 0],
  ["OtherPackTrain", ["LOSS_MAP"], 0],
]) {
  function P() {}
  const got = [];
  P.prototype.addCustomWidget = function (w) { got.push(w); };
  await ext.beforeRegisterNodeDef(P, { name, output });
  new P().onNodeCreated?.();
  if (got.length !== charts) throw new Error(`${name}: ${got.length} charts, expected ${charts}`);
}
