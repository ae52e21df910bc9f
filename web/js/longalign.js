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
const FONT_PX = 12;
const LINE_PX = 16;
const CHAR_PX = 7.5; // a monospace character at FONT_PX, rounded up
const PANEL_MARGIN = 6; // around each panel, inside the node
const PANEL_MARGIN_PX = 40; // the panel's margins and padding, and some room
const WRAP_SLACK = 4; // characters a line may lose to wrapping at a word boundary

const STYLE = `
.longalign-counter { font: ${FONT_PX}px monospace; padding: 2px 6px; line-height: ${LINE_PX}px; white-space: normal;
  overflow-wrap: anywhere; overflow: hidden; color: ${OK_COLOR}; box-sizing: border-box; }
.longalign-counter[data-state="truncated"] { color: ${WARN_COLOR}; }
.longalign-counter[data-state="error"] { color: ${ERROR_COLOR}; }
.longalign-scores { font: 12px monospace; padding: 2px 6px; overflow: auto; box-sizing: border-box;
  color: var(--input-text, #ddd); }
.longalign-scores table { border-collapse: collapse; width: 100%; }
.longalign-scores th, .longalign-scores td { text-align: right; padding: 0 4px; }
.longalign-scores th { color: var(--descrip-text, #999); font-weight: normal; }
.longalign-scores caption { text-align: left; color: var(--descrip-text, #999); }
.longalign-scores tr[data-chosen="false"] td { opacity: 0.5; }
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

// A read-only DOM panel whose content needs height(element) pixels; the front end draws a DOM
// widget in the height it asks for less its margin on both sides, so the margin is added.
function addPanel(node, name, className, height) {
  const element = document.createElement("div");
  element.className = className;
  const panel = node.addDOMWidget(name, "div", element, {
    serialize: false,
    hideOnZoom: false,
    margin: PANEL_MARGIN,
    getMinHeight: () => height(element) + 2 * PANEL_MARGIN,
    getMaxHeight: () => height(element) + 2 * PANEL_MARGIN,
  });
  panel.serialize = false; // never in widgets_values nor in the prompt
  return { element, panel };
}

// ---- LongAlign Text Encode: live token counter ------------------------------------------------

// The counter's lines come from the server (TokenCount.summary): line 1, the tokens kept of how
// many, the segment count and whether the rest is cut (warning colour); line 2, each segment's tokens.

// The panel height that shows every line whole at the node's width (lines wrap, never clip).
function linesHeight(lines, width) {
  const perLine = Math.max(16, Math.floor((width - PANEL_MARGIN_PX) / CHAR_PX) - WRAP_SLACK);
  const rows = lines.reduce((sum, line) => sum + Math.max(1, Math.ceil(line.length / perLine)), 0);
  return rows * LINE_PX + 8;
}

// Grow the node (never shrink it) so that a panel of the new height lies inside it.
function fitNode(node) {
  const needed = node.computeSize()[1];
  if (node.size[1] < needed) node.setSize([node.size[0], needed]);
  app.graph?.setDirtyCanvas(true, true);
}

// The prompt the node will encode: its text widget, or the text widget of the node its linked
// text input comes from (e.g. a String (Multiline) node feeding several nodes); undefined when
// the text is computed by the graph.
function promptSource(node) {
  const input = node.inputs?.find((i) => i.name === "text");
  if (input?.link == null) return widget(node, "text");
  const links = app.graph?.links;
  const link = links?.get?.(input.link) ?? links?.[input.link];
  const origin = link && app.graph.getNodeById(link.origin_id);
  const source = origin?.widgets?.find((w) => typeof w.value === "string" && (w.name === "value" || w.name === "text"));
  return source;
}

// The text encoder file the node's CLIP is loaded from: the clip_name of the CLIP Loader its clip
// input comes from, through nodes that pass a CLIP on (LoRA loaders, CLIP Set Last Layer); null for
// a checkpoint's CLIP or any other source. The server reads the file's window (Long-CLIP: 248).
function clipLoader(node) {
  const seen = new Set();
  let current = node;
  while (current && !seen.has(current.id)) {
    seen.add(current.id);
    const name = widget(current, "clip_name");
    if (name && current !== node) return name;
    const input = current.inputs?.find((i) => i.type === "CLIP" && i.link != null);
    if (!input) return null;
    const links = app.graph?.links;
    const link = links?.get?.(input.link) ?? links?.[input.link];
    current = link && app.graph.getNodeById(link.origin_id);
  }
  return null;
}

function tooltip(result) {
  return result.segments.map((s, i) => `${i + 1}. [${s.tokens}] ${s.text}`).join("\n");
}

function setupCounter(node) {
  let lines = ["…"];
  const { element } = addPanel(node, "longalign_counter", "longalign-counter",
    () => linesHeight(lines, node.size[0]));
  element.textContent = lines[0];
  let timer = null;
  let sequence = 0;
  const watched = new WeakSet();

  function show(newLines) {
    lines = newLines;
    element.replaceChildren(...lines.map((line) => cell("div", line)));
    fitNode(node);
  }

  async function refresh() {
    const source = promptSource(node);
    if (source?.element && !watched.has(source.element)) { // a linked prompt node's text box
      watched.add(source.element);
      source.element.addEventListener("input", schedule);
    }
    const text = source?.value;
    if (typeof text !== "string") {
      element.dataset.state = "ok";
      show(["text comes from an input: counted when it runs"]);
      return;
    }
    const loader = clipLoader(node);
    if (loader && !watched.has(loader)) { // another text encoder file chosen upstream
      watched.add(loader);
      const callback = loader.callback;
      loader.callback = function (...args) {
        schedule();
        return callback?.apply(this, args);
      };
    }
    const body = {
      text,
      token_length: Number(widget(node, "token_length")?.value ?? 240),
      split: widget(node, "split")?.value ?? "sentences",
      keep_bos: widget(node, "keep_bos")?.value ?? true,
      clip_name: typeof loader?.value === "string" ? loader.value : null,
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
      show([`token count unavailable: ${error.message}`]);
      element.title = "";
      return;
    }
    if (mine !== sequence) return; // a newer request is on its way
    element.dataset.state = result.truncated ? "truncated" : "ok";
    element.dataset.segments = String(result.segments.length);
    element.dataset.tokens = result.segments.map((s) => s.tokens).join(",");
    element.dataset.kept = String(result.kept_tokens);
    element.dataset.total = String(result.total_tokens);
    element.dataset.window = String(result.window);
    show(result.summary);
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
  const onConnectionsChange = node.onConnectionsChange;
  node.onConnectionsChange = function (...args) {
    schedule(); // the text or clip input linked or unlinked
    return onConnectionsChange?.apply(this, args);
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
  const chosen = Array.isArray(data.chosen) ? new Set(data.chosen) : null;
  let caption = ranked ? `ranked by ${data.score}` : `w = ${data.w}`;
  if (chosen) caption += ` · ${chosen.size} chosen${data.min_score == null ? "" : ` (score ≥ ${data.min_score})`}`;
  table.appendChild(cell("caption", `${caption} · direction: ${data.direction}${data.note ? ` (${data.note})` : ""}`));
  const head = document.createElement("tr");
  for (const label of [ranked ? "rank" : "", "image", ...columns.map(([, label]) => label)]) head.appendChild(cell("th", label));
  table.appendChild(head);
  rows.forEach(([image, values], rank) => {
    const tr = document.createElement("tr");
    tr.dataset.image = String(image);
    if (chosen) tr.dataset.chosen = String(chosen.has(image)); // rejected rows are dimmed
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
  const onConfigure = node.onConfigure;
  node.onConfigure = function (...args) {
    const result = onConfigure?.apply(this, args);
    fitNode(node); // a saved size too small for the panel
    return result;
  };
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
    fitNode(node);
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
