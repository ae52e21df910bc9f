// ComfyUI-LongAlign front end: a live token counter on LongAlign Text Encode and the per-image
// scores on Decomposed Reward Score / Rank By Reward. Plain JS, loaded through WEB_DIRECTORY.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const ENCODER = "LongAlignTextEncode";
const SCORERS = ["LongAlignDecomposedRewardScore", "LongAlignRankByReward"];
const DEBOUNCE_MS = 300;
const OK_COLOR = "var(--descrip-text, #999)";
const WARN_COLOR = "#f0a030";
const ERROR_COLOR = "#e05050";

const STYLE = `
.longalign-counter { font: 12px monospace; padding: 2px 6px; line-height: 1.35; white-space: nowrap;
  overflow: hidden; color: ${OK_COLOR}; box-sizing: border-box; }
.longalign-counter[data-state="truncated"] { color: ${WARN_COLOR}; }
.longalign-counter[data-state="error"] { color: ${ERROR_COLOR}; white-space: normal; }
.longalign-counter > div { overflow: hidden; text-overflow: ellipsis; }
.longalign-scores { font: 12px monospace; padding: 2px 6px; overflow: auto; box-sizing: border-box;
  color: var(--input-text, #ddd); }
.longalign-scores table { border-collapse: collapse; width: 100%; }
.longalign-scores th, .longalign-scores td { text-align: right; padding: 0 4px; }
.longalign-scores th { color: var(--descrip-text, #999); font-weight: normal; }
.longalign-scores caption { text-align: left; color: var(--descrip-text, #999); }
`;

function addStyle() {
  const style = document.createElement("style");
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function cell(tag, text) {
  const el = document.createElement(tag);
  el.textContent = text;
  return el;
}

function addPanel(node, name, className, height) {
  const element = document.createElement("div");
  element.className = className;
  const panel = node.addDOMWidget(name, "div", element, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => height(element),
    getMaxHeight: () => height(element),
  });
  panel.serialize = false; // never in widgets_values nor in the prompt
  return { element, panel };
}

// ---- LongAlign Text Encode: live token counter ------------------------------------------------

// Line 1: the summary (warning colour when cut); line 2: the rows each segment adds.
function describe(result) {
  const n = result.segments.length;
  const L = result.token_length;
  let summary = `${n} segment${n === 1 ? "" : "s"} · kept ${result.kept_tokens}`;
  summary += L > 0 ? ` / L = ${L}` : " (L = 0: natural length)";
  if (result.truncated) summary += ` · truncated: the last ${result.kept_tokens - L} are cut`;
  return [summary, `per segment: ${result.segments.map((s) => s.tokens).join(" + ")}`];
}

function tooltip(result) {
  return result.segments.map((s, i) => `${i + 1}. [${s.tokens}] ${s.text}`).join("\n");
}

function setupCounter(node) {
  const { element } = addPanel(node, "longalign_counter", "longalign-counter", () => 40);
  element.textContent = "…";
  let timer = null;
  let sequence = 0;

  async function refresh() {
    const text = widget(node, "text")?.value;
    if (typeof text !== "string") {
      element.textContent = "text comes from an input: counted when it runs";
      element.dataset.state = "ok";
      return;
    }
    const body = {
      text,
      token_length: Number(widget(node, "token_length")?.value ?? 240),
      split: widget(node, "split")?.value ?? "sentences",
      keep_bos: widget(node, "keep_bos")?.value ?? true,
    };
    const mine = ++sequence;
    let result;
    try {
      const response = await api.fetchApi("/longalign/tokenize", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      });
      result = await response.json();
      if (!response.ok) throw new Error(result?.error ?? `HTTP ${response.status}`);
    } catch (error) {
      if (mine !== sequence) return;
      element.dataset.state = "error";
      element.textContent = `token count unavailable: ${error.message}`;
      element.title = "";
      return;
    }
    if (mine !== sequence) return; // a newer request is on its way
    element.dataset.state = result.truncated ? "truncated" : "ok";
    element.dataset.segments = String(result.segments.length);
    element.dataset.tokens = result.segments.map((s) => s.tokens).join(",");
    element.dataset.kept = String(result.kept_tokens);
    element.dataset.total = String(result.total_tokens);
    element.replaceChildren(...describe(result).map((line) => cell("div", line)));
    element.title = tooltip(result);
  }

  function schedule() {
    clearTimeout(timer);
    timer = setTimeout(refresh, DEBOUNCE_MS);
  }

  for (const name of ["text", "token_length", "split", "keep_bos"]) {
    const w = widget(node, name);
    if (!w) continue;
    const callback = w.callback;
    w.callback = function (...args) {
      schedule();
      return callback?.apply(this, args);
    };
    w.element?.addEventListener("input", schedule); // the multiline text box
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    schedule(); // values loaded from a workflow set no callbacks
    return onConfigure?.apply(this, args);
  };
  node.longalignRefreshCounter = schedule;
  schedule();
}

// ---- reward nodes: per-image scores after execution -------------------------------------------

const COLUMNS = [
  ["total", "total"],
  ["text_relevant", "relevant"],
  ["text_irrelevant", "irrelevant"],
  ["reweighted", "s_w"],
];

// null: a NaN or infinite score (the summary flags the image in "nonfinite"; it ranks last).
function fmt(x) {
  return typeof x === "number" ? x.toFixed(4) : x === null ? "non-finite" : "";
}

// Rows in display order: [image index, {field: value}] from a score summary or a ranking.
function scoreRows(data) {
  const order = data.order ?? [...(data.total ?? []).keys()];
  return order.map((image, rank) => {
    const values = {};
    for (const [field] of COLUMNS) {
      if (Array.isArray(data[field])) values[field] = data[field][image];
    }
    if (data.score && Array.isArray(data.scores)) values[data.score] = data.scores[rank];
    return [image, values];
  });
}

function renderScores(element, data) {
  const rows = scoreRows(data);
  const columns = COLUMNS.filter(([field]) => rows.some(([, values]) => field in values));
  const table = document.createElement("table");
  const ranked = Array.isArray(data.order);
  const caption = ranked ? `ranked by ${data.score}` : `w = ${data.w}`;
  table.appendChild(cell("caption", `${caption} · direction: ${data.direction}${data.note ? ` (${data.note})` : ""}`));
  const head = document.createElement("tr");
  for (const label of [ranked ? "rank" : "", "image", ...columns.map(([, label]) => label)]) head.appendChild(cell("th", label));
  table.appendChild(head);
  rows.forEach(([image, values], rank) => {
    const tr = document.createElement("tr");
    tr.dataset.image = String(image);
    tr.appendChild(cell("td", ranked ? String(rank + 1) : ""));
    tr.appendChild(cell("td", `#${image}`));
    for (const [field] of columns) {
      const td = cell("td", fmt(values[field]));
      td.dataset.field = field;
      tr.appendChild(td);
    }
    table.appendChild(tr);
  });
  element.replaceChildren(table);
  element.dataset.images = String(rows.length);
}

function setupScores(node) {
  const { element } = addPanel(node, "longalign_scores", "longalign-scores",
    (el) => (el.dataset.images ? 40 + 18 * Math.min(Number(el.dataset.images), 8) : 24));
  element.textContent = "scores appear here after a run";
  const onExecuted = node.onExecuted;
  node.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const text = message?.text?.[0];
    if (typeof text !== "string") return;
    try {
      renderScores(element, JSON.parse(text));
    } catch (error) {
      element.textContent = `could not read the scores: ${error.message}`;
    }
    node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]);
    app.graph.setDirtyCanvas(true, true);
  };
}

app.registerExtension({
  name: "LongAlign.FrontEnd",
  setup: addStyle,
  nodeCreated(node) {
    if (node.comfyClass === ENCODER) setupCounter(node);
    else if (SCORERS.includes(node.comfyClass)) setupScores(node);
  },
});
