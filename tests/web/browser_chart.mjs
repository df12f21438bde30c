// Drives a real ComfyUI page in headless Chromium (playwright-core): loads a UI-format
// workflow, queues it from the page, waits for "tsuika.loss" events, checks the loss chart
// drawn on the training node, screenshots it. Prints one JSON line: RESULT {...}.
// usage: node browser_chart.mjs URL WORKFLOW.json OUT_DIR [MIN_EVENTS]
// env: PLAYWRIGHT_CORE (module dir, default "playwright-core"), CHROMIUM (default /usr/bin/chromium)
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";

const [url, workflowPath, outDir, minEventsArg] = process.argv.slice(2);
const minEvents = Number(minEventsArg || 3);
const require = createRequire(import.meta.url);
const { chromium } = require(process.env.PLAYWRIGHT_CORE || "playwright-core");
const workflow = JSON.parse(readFileSync(workflowPath, "utf8"));
const result = { console: [], tsuikaConsole: [], pageErrors: [] };
const say = (m) => console.error(`[browser_chart ${new Date().toISOString().slice(11, 19)}] ${m}`);

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.addInitScript(() => {
    const fillText = CanvasRenderingContext2D.prototype.fillText;
    CanvasRenderingContext2D.prototype.fillText = function (text, ...rest) {
      window.__tsuikaTexts?.push(String(text));
      return fillText.call(this, text, ...rest);
    };
  });
  page.on("console", (m) => {
    const line = `${m.type()}: ${m.text()}`;
    if (m.type() === "error" || m.type() === "warning") result.console.push(line);
    if (/tsuika|loss_chart/i.test(line)) result.tsuikaConsole.push(line);
  });
  page.on("pageerror", (e) => result.pageErrors.push(String(e.stack || e)));
  page.on("requestfailed", (r) => result.console.push(`request failed: ${r.url()}`));
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
    () => window.app.extensions.some((e) => e.name === "tsuika.losschart"));
  say(`app loaded, tsuika.losschart registered: ${result.extensionLoaded}`);

  // Load the workflow, count chart-coloured pixels on the training node before any event.
  // Pixels of the chart's line colour inside the chart widget's rectangle, and the texts drawn.
  const measure = () => page.evaluate(() => {
    const app = window.app;
    const node = app.graph.nodes.find((n) => /^TsuikaTrain/.test(n.type)); // the (one) train node
    const chart = (node.widgets || []).find((w) => w.name === "tsuika_loss_chart");
    app.canvas.centerOnNode?.(node);
    window.__tsuikaTexts = [];
    app.canvas.setDirty(true, true);
    app.canvas.draw(true, true);
    const el = app.canvas.canvas;
    const dpr = el.width / el.clientWidth;
    const s = app.canvas.ds.scale * dpr;
    const [ox, oy] = app.canvas.ds.offset;
    const wy = chart?.y ?? chart?.last_y ?? 0;
    const rect = (x, y, w, h) => {
      const px = { x: Math.max(0, Math.floor((x + ox) * s)), y: Math.max(0, Math.floor((y + oy) * s)) };
      px.w = Math.max(1, Math.min(el.width - px.x, Math.ceil(w * s)));
      px.h = Math.max(1, Math.min(el.height - px.y, Math.ceil(h * s)));
      return px;
    };
    const area = rect(node.pos[0], node.pos[1] + wy, node.size[0], 110);
    const data = el.getContext("2d").getImageData(area.x, area.y, area.w, area.h).data;
    let blue = 0; // #6aa9ff = (106, 169, 255), allow antialiasing against the dark fill
    for (let i = 0; i < data.length; i += 4) {
      if (Math.abs(data[i] - 106) < 40 && Math.abs(data[i + 1] - 169) < 40 && data[i + 2] > 200) blue++;
    }
    const titleH = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
    const whole = rect(node.pos[0], node.pos[1] - titleH, node.size[0], node.size[1] + titleH);
    const r = el.getBoundingClientRect();
    const css = (p) => ({ x: r.left + p.x / dpr, y: r.top + p.y / dpr, width: p.w / dpr, height: p.h / dpr });
    return {
      nodeId: node.id, hasChartWidget: !!chart, chartY: wy, blue, points: (node.tsuikaLoss || []).length,
      texts: window.__tsuikaTexts.filter((t) => /^(step \d|loss chart)/.test(t)),
      clip: css(whole), chartClip: css(area),
    };
  });
  await page.evaluate(async (wf) => {
    if (wf.nodes) await window.app.loadGraphData(wf); // UI format
    else await window.app.loadApiJson(wf, "workflow.json"); // API format
    window.__tsuikaEvents = [];
    window.__tsuikaEnd = null;
    const api = window.app.api;
    api.addEventListener("tsuika.loss", ({ detail }) => window.__tsuikaEvents.push(detail));
    for (const end of ["execution_success", "execution_error", "execution_interrupted"]) {
      api.addEventListener(end, ({ detail }) => { window.__tsuikaEnd = { end, detail }; });
    }
  }, workflow);
  await page.waitForTimeout(500);
  result.before = await measure();
  say(`workflow loaded; before training: ${JSON.stringify(result.before)}`);

  await page.evaluate(() => window.app.queuePrompt(0, 1));
  say("queued; waiting for tsuika.loss events");
  await page.waitForFunction((n) => window.__tsuikaEvents.length >= n || window.__tsuikaEnd, minEvents,
                             { timeout: Number(process.env.EVENT_TIMEOUT_MS || 240000), polling: 500 })
    .catch((e) => { throw new Error(result.promptError ? `queue failed: ${result.promptError}` : e.message); });
  const end = await page.evaluate(() => window.__tsuikaEnd);
  const got = await page.evaluate(() => window.__tsuikaEvents.length);
  if (got < minEvents) {
    throw new Error(`the prompt ended (${JSON.stringify(end).slice(0, 2000)}) after ${got} tsuika.loss events`);
  }
  result.events = await page.evaluate(() => window.__tsuikaEvents);
  await page.waitForTimeout(300);
  result.after = await measure();
  say(`after ${result.events.length} events: ${JSON.stringify(result.after)}`);
  const pad = 40;
  const c = result.after.clip;
  await page.screenshot({ path: `${outDir}/chart_node.png`,
                          clip: { x: Math.max(0, c.x - pad), y: Math.max(0, c.y - pad),
                                  width: c.width + 2 * pad, height: c.height + 2 * pad } });
  await page.screenshot({ path: `${outDir}/page.png` });
} catch (e) {
  result.error = String(e.stack || e);
} finally {
  await browser.close();
  console.log("RESULT " + JSON.stringify(result));
}
