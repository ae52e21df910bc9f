// ComfyUI-LongAlign front end: the live loss / reward plot on LongAlign Train LoRA. The server sends
// one "longalign.train" message per logged step (and one when the job ends) to the tab that queued the
// prompt; the node's output then carries the run's whole history, drawn again when it arrives. The latest
// validation image is ComfyUI's own progress preview while the job runs, the node's output image after.
// When the LoRA is written, the model lists are refreshed (as the R key does), so Load LoRA offers it.
import { app } from "../../../scripts/app.js";
import { api } from "../../../scripts/api.js";

const TRAINER = "LongAlignTrainLoRA";
const EVENT = "longalign.train";
const WIDGET = "longalign_train_plot";
const SERIES = [
  { key: "loss", color: "#4fa3ff", side: "left" },
  { key: "reward", color: "#f0a030", side: "right" },
];
const PLOT_PX = 150; // the canvas
const CAPTION_PX = 18; // the line above it
const MARGIN = 6; // around the panel, inside the node
const PAD = { left: 44, right: 44, top: 6, bottom: 16 };
const AXIS_COLOR = "#888";
const FONT = "10px monospace";

const STYLE = `
.longalign-train { box-sizing: border-box; padding: 0 4px; color: var(--input-text, #ddd); font: 11px monospace; }
.longalign-train .caption { height: ${CAPTION_PX}px; line-height: ${CAPTION_PX}px; white-space: nowrap; overflow: hidden;
  text-overflow: ellipsis; color: var(--descrip-text, #999); }
.longalign-train[data-status="cancelled"] .caption, .longalign-train[data-status="failed"] .caption { color: #f0a030; }
.longalign-train canvas { display: block; width: 100%; height: ${PLOT_PX}px; }
`;

function addStyle() {
  const style = document.createElement("style");
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function fmt(x) {
  if (typeof x !== "number" || !Number.isFinite(x)) return "–";
  return Math.abs(x) >= 1000 || (Math.abs(x) < 0.01 && x !== 0) ? x.toExponential(2) : x.toPrecision(3);
}

// The [min, max] of one series, widened when flat so that the line sits in the middle.
function range(values) {
  let lo = Math.min(...values);
  let hi = Math.max(...values);
  if (hi - lo < 1e-12) {
    const pad = Math.abs(lo) * 0.05 || 0.5;
    lo -= pad;
    hi += pad;
  }
  return [lo, hi];
}

function draw(canvas, state) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(1, canvas.clientWidth);
  const height = PLOT_PX;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const x0 = PAD.left, x1 = width - PAD.right, y0 = PAD.top, y1 = height - PAD.bottom;
  ctx.strokeStyle = AXIS_COLOR;
  ctx.lineWidth = 1;
  ctx.strokeRect(x0 + 0.5, y0 + 0.5, x1 - x0, y1 - y0);
  ctx.font = FONT;
  ctx.fillStyle = AXIS_COLOR;
  const total = Math.max(state.total || 0, ...state.points.map((p) => p.step), 1);
  ctx.textAlign = "left";
  ctx.fillText("0", x0, height - 4);
  ctx.textAlign = "right";
  ctx.fillText(`step ${total}`, x1, height - 4);
  const xOf = (step) => x0 + ((x1 - x0) * step) / total;
  for (const { key, color, side } of SERIES) {
    const points = state.points.filter((p) => typeof p[key] === "number" && Number.isFinite(p[key]));
    if (!points.length) continue;
    const [lo, hi] = range(points.map((p) => p[key]));
    const yOf = (v) => y1 - ((y1 - y0) * (v - lo)) / (hi - lo);
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.5;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(xOf(p.step), yOf(p[key])) : ctx.moveTo(xOf(p.step), yOf(p[key]))));
    if (points.length === 1) ctx.arc(xOf(points[0].step), yOf(points[0][key]), 2, 0, 2 * Math.PI);
    ctx.stroke();
    ctx.fillStyle = color;
    ctx.textAlign = side === "left" ? "right" : "left";
    const tx = side === "left" ? x0 - 3 : x1 + 3;
    ctx.fillText(fmt(hi), tx, y0 + 8);
    ctx.fillText(fmt(lo), tx, y1);
    ctx.fillText(key, tx, (y0 + y1) / 2 + 3);
  }
}

function caption(state) {
  if (state.message) return state.message;
  const last = state.points[state.points.length - 1];
  if (!last) return "loss and reward appear here while it trains";
  const values = SERIES.filter(({ key }) => key in last).map(({ key }) => `${key} ${fmt(last[key])}`);
  return [`step ${last.step} / ${state.total}`, ...values].join(" · ");
}

function setupPlot(node) {
  const element = document.createElement("div");
  element.className = "longalign-train";
  const text = document.createElement("div");
  text.className = "caption";
  const canvas = document.createElement("canvas");
  element.append(text, canvas);
  const height = CAPTION_PX + PLOT_PX + 2 * MARGIN;
  const widget = node.addDOMWidget(WIDGET, "div", element, {
    serialize: false,
    hideOnZoom: false,
    margin: MARGIN,
    getMinHeight: () => height,
    getMaxHeight: () => height,
  });
  widget.serialize = false; // never in widgets_values nor in the prompt
  const state = { prompt: null, points: [], total: 0, status: "idle", message: "" };

  function render() {
    element.dataset.status = state.status;
    element.dataset.points = String(state.points.length);
    element.dataset.step = String(state.points.at(-1)?.step ?? 0);
    element.dataset.total = String(state.total);
    text.textContent = caption(state);
    text.title = text.textContent;
    draw(canvas, state);
  }

  node.longalignTrain = {
    state,
    // one websocket message from the server
    receive(detail) {
      if (detail.prompt_id !== state.prompt) {
        Object.assign(state, { prompt: detail.prompt_id, points: [], total: 0, status: "running", message: "" });
      }
      if (typeof detail.step === "number") {
        state.total = detail.total;
        state.status = "running";
        const point = { step: detail.step, ...detail.scalars };
        const at = state.points.findIndex((p) => p.step >= detail.step); // a resumed run restarts mid-way
        if (at >= 0) state.points.splice(at);
        state.points.push(point);
      }
      if (detail.status) {
        state.status = detail.status;
        state.message = detail.message ?? "";
        if (detail.status === "done") app.refreshComboInNodes?.(); // the new LoRA in every Load LoRA list, as R does
      }
      render();
    },
  };

  const onExecuted = node.onExecuted;
  node.onExecuted = function (message) {
    onExecuted?.apply(this, arguments);
    const data = message?.longalign_train?.[0];
    if (typeof data !== "string") return;
    try {
      const done = JSON.parse(data);
      Object.assign(state, { prompt: null, points: done.history, total: done.total, status: "done",
                             message: done.message });
    } catch (error) {
      state.message = `could not read the history: ${error.message}`;
    }
    render();
  };
  // the canvas follows its own width: the node resized, or the panel attached to the page later (Vue nodes)
  new ResizeObserver(() => draw(canvas, state)).observe(canvas);
  render();
  if (node.size[1] < node.computeSize()[1]) node.setSize([node.size[0], node.computeSize()[1]]);
  requestAnimationFrame(render);
}

function nodeOf(detail) {
  const id = String(detail.display_node ?? detail.node);
  return app.graph?.getNodeById(id) ?? app.graph?.getNodeById(Number(id));
}

app.registerExtension({
  name: "LongAlign.TrainPlot",
  setup() {
    addStyle();
    api.addEventListener(EVENT, ({ detail }) => nodeOf(detail)?.longalignTrain?.receive(detail));
  },
  nodeCreated(node) {
    if (node.comfyClass === TRAINER) setupPlot(node);
  },
});
