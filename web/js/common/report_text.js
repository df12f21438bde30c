// Text layout for the reports Tsuika nodes draw on themselves (web/js/node_report.js).
// Pure functions, no ComfyUI imports, so Node's test runner can check them
// (tests/web/report_text_test.mjs).
//
// The report contract (nodes return ui={"tsuika_report": [TEXT], "tsuika_level": [LEVEL]}):
// TEXT is plain multi-line text whose first line is a one-line headline; lines starting with
// "warning:" or "skipped" are warnings. A section header such as "2 skipped:" or
// "1 warning:" marks the indented lines under it as warnings too.

export const LIST_LIMIT = 5; // entries of one indented list shown before "... and N more"
export const LINE_LIMIT = 28; // lines at most, after wrapping, so a node never grows huge
export const LINE_HEIGHT = 15;
export const PAD = 8;
export const FONT = "12px sans-serif";
export const HEADLINE_FONT = "bold 12px sans-serif";

export const COLOURS = {
  headline: "#f0f0f0",
  text: "#c8c8c8",
  warning: "#f2b84b", // amber: readable on the dark node, not the red of an error
  cancelled: "#8cc8e8", // calm blue: a stop the user asked for, not a failure
  more: "#8a8a8a",
};

const WARNING_LINE = /^(warning\b|skipped\b)/i;
const WARNING_HEADER = /^\d+\s+(skipped|warnings?)\b/i;

const indentOf = (line) => line.length - line.trimStart().length;

/**
 * Split a report into classified lines.
 * @param {string} text the report
 * @param {string} level "info" | "warning" | "cancelled"
 * @returns {{text: string, kind: string, indent: number}[]} kind is headline | text | warning
 */
export function classify(text, level = "info") {
  const raw = String(text ?? "").replace(/\r\n?/g, "\n").split("\n");
  while (raw.length && !raw[raw.length - 1].trim()) raw.pop();
  const out = [];
  let warnUnder = -1; // indent of the warning header whose list we are in, -1 for none
  raw.forEach((line, i) => {
    const indent = indentOf(line);
    const body = line.trim();
    if (warnUnder >= 0 && (indent <= warnUnder || !body)) warnUnder = -1;
    let kind = "text";
    if (i === 0) {
      kind = "headline";
    } else if (WARNING_LINE.test(body) || WARNING_HEADER.test(body)) {
      kind = "warning";
      if (body.endsWith(":")) warnUnder = indent;
    } else if (warnUnder >= 0) {
      kind = "warning";
    }
    out.push({ text: body, kind, indent });
  });
  if (out.length && level === "cancelled") out[0].kind = "cancelled";
  if (out.length && level === "warning") out[0].kind = "warning";
  return out;
}

/**
 * Shorten every indented list to ``limit`` entries plus "... and N more".
 * A list is a run of lines indented deeper than the line before it.
 */
export function shortenLists(lines, limit = LIST_LIMIT) {
  const out = [];
  let i = 0;
  while (i < lines.length) {
    const head = lines[i];
    out.push(head);
    i += 1;
    let j = i;
    while (j < lines.length && lines[j].indent > head.indent) j += 1;
    const items = lines.slice(i, j);
    // nested lists keep their own shape: only shorten at this level
    const top = items.length ? Math.min(...items.map((l) => l.indent)) : 0;
    const entries = items.filter((l) => l.indent === top).length;
    if (entries > limit) {
      let shown = 0;
      let k = 0;
      for (; k < items.length; k += 1) {
        if (items[k].indent === top) {
          if (shown === limit) break;
          shown += 1;
        }
        out.push(items[k]);
      }
      out.push({ text: `... and ${entries - limit} more`, kind: "more", indent: top });
    } else {
      out.push(...shortenLists(items, limit));
    }
    i = j;
  }
  return out;
}

/**
 * Break one line into pieces no wider than ``width`` by ``measure``: at spaces first, then
 * after "/" or "\\" (paths), and anywhere as a last resort.
 */
export function wrapLine(text, width, measure) {
  if (!text) return [""];
  if (measure(text) <= width) return [text];
  const tokens = text.match(/[^\s/\\]*[/\\]|[^\s/\\]+\s*|\s+/g) || [text];
  const pieces = [];
  let cur = "";
  for (const tok of tokens) {
    if (measure(cur + tok) <= width || !cur) {
      cur += tok;
    } else {
      pieces.push(cur.trimEnd());
      cur = tok.trimStart();
    }
    while (measure(cur) > width && cur.length > 1) {
      let cut = cur.length - 1;
      while (cut > 1 && measure(cur.slice(0, cut)) > width) cut -= 1;
      pieces.push(cur.slice(0, cut));
      cur = cur.slice(cut);
    }
  }
  if (cur.trim()) pieces.push(cur.trimEnd());
  return pieces.length ? pieces : [text];
}

/**
 * Lay a report out for drawing ``width`` pixels wide.
 * @param {string} text the report
 * @param {object} opts level, width, measure(text, font) -> px, listLimit, lineLimit
 * @returns {{lines: {text: string, kind: string, x: number, font: string}[], height: number}}
 */
export function layoutReport(text, {
  level = "info", width = 300, measure = (t) => t.length * 6.5,
  listLimit = LIST_LIMIT, lineLimit = LINE_LIMIT,
} = {}) {
  const lines = shortenLists(classify(text, level), listLimit);
  const out = [];
  lines.forEach((line, i) => {
    const x = PAD + Math.min(line.indent, 8) * 4;
    const font = i === 0 ? HEADLINE_FONT : FONT;
    const avail = Math.max(40, width - x - PAD);
    const parts = wrapLine(line.text, avail, (t) => measure(t, font));
    parts.forEach((p, n) => out.push({ text: p, kind: line.kind, x: x + (n ? 10 : 0), font }));
  });
  if (out.length > lineLimit) {
    const hidden = out.length - (lineLimit - 1);
    out.splice(lineLimit - 1);
    out.push({ text: `... and ${hidden} more lines`, kind: "more", x: PAD, font: FONT });
  }
  return { lines: out, height: out.length ? out.length * LINE_HEIGHT + 2 * PAD : 0 };
}

/** The text of a node's ``executed`` output, or null when it carries no Tsuika report. */
export function reportFromOutput(output) {
  const texts = output?.tsuika_report;
  if (!Array.isArray(texts) || !texts.length) return null;
  const level = Array.isArray(output.tsuika_level) ? output.tsuika_level[0] : undefined;
  return { text: texts.map(String).join("\n"), level: level || "info" };
}
