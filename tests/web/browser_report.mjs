// Drives a real ComfyUI page in headless Chromium (playwright-core) to check what
// web/js/node_report.js draws: loads a workflow, sets widgets by name, queues it from the page
// and either lets it finish ("run") or presses Cancel after a few training steps ("cancel");
// then, for every Tsuika node, records its report, the lines the canvas drew (with their
// colours) and a screenshot. Prints one JSON line: RESULT {...}.
// usage: node browser_report.mjs URL WORKFLOW.json OUT_DIR MODE [SETTINGS_JSON]
//   SETTINGS_JSON: {"NodeType": {"widget_name": value}} applied after loading
// env: PLAYWRIGHT_CORE, CHROMIUM, END_TIMEOUT_MS
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const [url, workflowPath, outDir, mode, settingsArg] = process.argv.slice(2);
const settings = JSON.parse(settingsArg || "{}");
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const result = { console: [], tsuikaConsole: [], pageErrors: [], nodes: {} };
const say = (m) => console.error(`[browser_report ${new Date().toISOString().slice(11, 19)}] ${m}`);
const timeout = Number(process.env.END_TIMEOUT_MS || 240000);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.addInitScript(() => {
    const fillText = CanvasRenderingContext2D.prototype.fillText;
    CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
      window.__tsuikaTexts?.push({ text: String(text), fill: String(this.fillStyle) });
      return fillText.call(this, text, ...rest);
    };
  });
  page.on("console", (m) => {
    const line = `${m.type()}: ${m.text()}`;
    if (m.type() === "error" || m.type() === "warning") result.console.push(line);
    if (/tsuika|node_report|report_text/i.test(line)) result.tsuikaConsole.push(line);
  });
  page.on("pageerror", (e) => result.pageErrors.push(String(e.stack || e)));
  page.on("response", async (r) => {
    if (r.status() >= 400) result.console.push(`HTTP ${r.status()} ${r.url()}`);
    if (r.status() >= 400 && new URL(r.url()).pathname === "/api/prompt") {
      result.promptError = await r.text().catch(() => "?");
    }
  });

  await page.goto(url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.canvas && window.app?.extensions?.length,
                             null, { timeout: 120000 });
  await page.waitForTimeout(2000); // let first-run dialogs appear, then close them
  await page.keyboard.press("Escape");
  result.extensionLoaded = await page.evaluate(
    () => window.app.extensions.some((e) => e.name === "tsuika.nodereport"));
  say(`app loaded, tsuika.nodereport registered: ${result.extensionLoaded}`);

  await page.evaluate(async ([wf, sets]) => {
    if (wf.nodes) await window.app.loadGraphData(wf); // UI format, as a user opens it
    else await window.app.loadApiJson(wf, "workflow.json");
    for (const node of window.app.graph.nodes) {
      for (const [name, value] of Object.entries(sets[node.type] || {})) {
        const w = node.widgets?.find((x) => x.name === name);
        if (!w) throw new Error(`${node.type} has no widget ${name}`);
        w.value = value;
      }
    }
    window.__tsuikaLoss = 0;
    window.__tsuikaEnd = null;
    const api = window.app.api;
    api.addEventListener("tsuika.loss", () => { window.__tsuikaLoss += 1; });
    for (const end of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(end, ({ detail }) => { window.__tsuikaEnd = { end, detail }; });
    }
  }, [workflow, settings]);
  const savedValues = () => page.evaluate(() => Object.fromEntries(window.app.graph.serialize().nodes
    .filter((n) => n.type.startsWith("Tsuika")).map((n) => [n.type, n.widgets_values])));
  result.savedBefore = await savedValues();

  await page.evaluate(() => window.app.queuePrompt(0, 1));
  if (mode === "cancel") {
    await page.waitForFunction(() => window.__tsuikaLoss >= 3 || window.__tsuikaEnd, null,
                               { timeout, polling: 500 });
    say("training runs; pressing Cancel (interrupt)");
    await page.evaluate(() => window.app.api.interrupt());
  }
  await page.waitForFunction(() => window.__tsuikaEnd, null, { timeout, polling: 500 })
    .catch((e) => { throw new Error(result.promptError ? `queue failed: ${result.promptError}` : e.message); });
  result.end = await page.evaluate(() => window.__tsuikaEnd);
  result.lossEvents = await page.evaluate(() => window.__tsuikaLoss);
  say(`prompt ended: ${result.end.end} after ${result.lossEvents} loss events`);
  await page.waitForTimeout(1500); // let a dialog (if any) open

  // An error dialog is what an ordinary interruption must not show.
  result.dialogs = await page.evaluate(() => [...document.querySelectorAll(
    "[role=dialog], [role=alertdialog], .p-dialog, .comfy-modal")]
    .filter((d) => d.getClientRects().length > 0 && getComputedStyle(d).visibility !== "hidden")
    .map((d) => d.innerText.slice(0, 300)));
  result.savedAfter = await savedValues();

  const types = await page.evaluate(() => window.app.graph.nodes
    .filter((n) => n.type.startsWith("Tsuika")).map((n) => n.type));
  for (const type of types) {
    const m = await page.evaluate((t) => {
      const app = window.app;
      const node = app.graph.nodes.find((n) => n.type === t);
      app.canvas.ds.scale = 1;
      app.canvas.centerOnNode(node);
      window.__tsuikaTexts = [];
      app.canvas.setDirty(true, true);
      app.canvas.draw(true, true);
      const el = app.canvas.canvas;
      const dpr = el.width / el.clientWidth;
      const [ox, oy] = app.canvas.ds.offset;
      const s = app.canvas.ds.scale;
      const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
      const r = el.getBoundingClientRect();
      const report = node.tsuikaReport;
      return {
        id: node.id, size: [node.size[0], node.size[1]],
        report: report ? { text: report.text, level: report.level,
                           lines: (report.layout?.lines || []).map((l) => ({ text: l.text, kind: l.kind })) } : null,
        hasWidget: !!node.widgets?.find((w) => w.name === "tsuika_report"),
        widgets: (node.widgets || []).map((w) => String(w.name)),
        drawn: window.__tsuikaTexts,
        clip: { x: r.left + (node.pos[0] + ox) * s, y: r.top + (node.pos[1] - titleH + oy) * s,
                width: node.size[0] * s, height: (node.size[1] + titleH) * s, dpr },
      };
    }, type);
    const pad = 20;
    await page.screenshot({ path: `${outDir}/${mode}_${type}.png`,
                            clip: { x: Math.max(0, m.clip.x - pad), y: Math.max(0, m.clip.y - pad),
                                    width: Math.min(1400, m.clip.width + 2 * pad),
                                    height: Math.min(900, m.clip.height + 2 * pad) } });
    result.nodes[type] = m;
    say(`${type}: ${m.report ? m.report.lines.length + " report lines" : "no report"}`);
  }
  await page.screenshot({ path: `${outDir}/${mode}_page.png` });
} catch (e) {
  result.error = String(e.stack || e);
} finally {
  await browser.close();
  console.log("RESULT " + JSON.stringify(result));
}
