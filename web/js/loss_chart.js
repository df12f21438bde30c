// tsuika.losschart: a live loss chart on Tsuika's training nodes, fed by "tsuika.loss" events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// Every Tsuika train node (nodes/train_node.py) has a LOSS_MAP output: that marks it, so a
// new method's node gets the chart without an edit here.
export function isTrainNode(nodeData) {
  return String(nodeData?.name || "").startsWith("Tsuika") &&
    (nodeData?.output || []).includes("LOSS_MAP");
}
const HEIGHT = 110;

function drawChart(ctx, node, width, y) {
  const points = node.tsuikaLoss || [];
  ctx.save();
  ctx.fillStyle = "#1b1b1b";
  ctx.fillRect(8, y, width - 16, HEIGHT - 8);
  if (points.length > 1) {
    const losses = points.map((p) => p.loss);
    const lo = Math.min(...losses);
    const hi = Math.max(...losses);
    const span = hi - lo || 1;
    const total = node.tsuikaTotal || points[points.length - 1].step;
    const x = (s) => 12 + ((width - 24) * s) / total;
    // plot above the "step N/M  loss" line drawn at the bottom of the box
    const yy = (v) => y + 6 + (HEIGHT - 36) * (1 - (v - lo) / span);
    ctx.strokeStyle = "#6aa9ff";
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p.step), yy(p.loss)) : ctx.moveTo(x(p.step), yy(p.loss))));
    ctx.stroke();
    const last = points[points.length - 1];
    ctx.fillStyle = "#ddd";
    ctx.font = "11px sans-serif";
    ctx.fillText(`step ${last.step}/${total}  loss ${last.loss.toFixed(4)}`, 14, y + HEIGHT - 12);
  } else {
    ctx.fillStyle = "#888";
    ctx.font = "11px sans-serif";
    ctx.fillText("loss chart: waiting for training", 14, y + HEIGHT / 2);
  }
  ctx.restore();
}

app.registerExtension({
  name: "tsuika.losschart",
  setup() {
    api.addEventListener("tsuika.loss", ({ detail }) => {
      const node = app.graph.getNodeById(Number(detail.node));
      if (!node) return;
      if (!node.tsuikaLoss || detail.step === 1) node.tsuikaLoss = [];
      node.tsuikaLoss.push({ step: detail.step, loss: detail.loss });
      node.tsuikaTotal = detail.total;
      node.setDirtyCanvas(true, false);
    });
    api.addEventListener("tsuika.saved", () => {});
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!isTrainNode(nodeData)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      onNodeCreated?.apply(this, arguments);
      this.addCustomWidget({
        name: "tsuika_loss_chart",
        type: "tsuika.losschart",
        // not part of the saved workflow nor of the prompt: widgets_values keep their order
        serialize: false,
        options: { serialize: false },
        draw(ctx, node, width, y) { drawChart(ctx, node, width, y); },
        computeSize(width) { return [width, HEIGHT]; },
        serializeValue() { return undefined; },
      });
    };
  },
});
