// FluxBridge frontend logic, as pure functions (no imports, no registration, no DOM at import time).
//
// The frontend imports every .js file in web/, this one included: importing it only defines functions.
// `fluxbridge.js` registers the extension built by `createExtension({app, api})`; the tests under
// web/tests/ (Node's test runner, `node --test web/tests/`) call the same functions with fake objects.
//
// UI payloads read (the `ui` dict a node returns arrives as the `executed` message's `output`):
//   output.fluxbridge: [ {...}, ... ]  JSON objects (or JSON strings) sent by our nodes; merged in order.
//       loaders: {family, layout, variant, dtype | dtypes, config?, warnings?}
//       FluxBridgeLoadLoRA, FluxBridgeNativeLoRA: {format, patched, zero_filled, not_placed, keys?}  (counts or lists; a
//           not_placed entry may be {key, reason})
//       FluxBridgeScheduler: {sigmas: [...]}
//   output.sigmas: [...] (or [[...]])  also accepted for the scheduler.
//   output.text: ["..."]  shown as is when nothing structured came.

export const EXTENSION_NAME = "FluxBridge.ui";
export const LOADER_NODES = ["FluxBridgeLoadTransformer", "FluxBridgeLoadTextEncoders", "FluxBridgeLoadVAE",
  "FluxBridgeLoadNativeModel"];
export const LORA_NODES = ["FluxBridgeLoadLoRA", "FluxBridgeNativeLoRA"];
export const SCHEDULER_NODES = ["FluxBridgeScheduler"];
export const CURVE_HEIGHT = 90;
const INFO_WIDGET = "fluxbridge_info";

export function nodeKind(name) {
  if (LOADER_NODES.includes(name)) return "loader";
  if (LORA_NODES.includes(name)) return "lora";
  if (SCHEDULER_NODES.includes(name)) return "scheduler";
  return null;
}

function asObject(entry) {
  if (entry && typeof entry === "object" && !Array.isArray(entry)) return entry;
  if (typeof entry === "string") {
    try {
      const parsed = JSON.parse(entry);
      if (parsed && typeof parsed === "object" && !Array.isArray(parsed)) return parsed;
    } catch (_) {
      /* plain text */
    }
  }
  return null;
}

/** Merge the structured parts of an `executed` output into one object (later entries win). */
export function parsePayload(output) {
  const merged = {};
  if (!output || typeof output !== "object") return merged;
  const parts = Array.isArray(output.fluxbridge) ? output.fluxbridge : output.fluxbridge ? [output.fluxbridge] : [];
  for (const part of parts) Object.assign(merged, asObject(part) || {});
  if (!parts.length && Array.isArray(output.text)) {
    for (const t of output.text) Object.assign(merged, asObject(t) || {});
  }
  const sigmas = extractSigmas(output);
  if (sigmas) merged.sigmas = sigmas;
  return merged;
}

/** Plain text lines the node sent (`output.text`), minus the ones that were JSON. */
export function textLines(output) {
  if (!output || !Array.isArray(output.text)) return [];
  return output.text
    .filter((t) => typeof t === "string" && !asObject(t))
    .flatMap((t) => t.split("\n"))
    .filter((t) => t.trim() !== "");
}

/** A flat list of finite numbers from `output.sigmas` / `output.fluxbridge[].sigmas`, or null. */
export function extractSigmas(output) {
  if (!output || typeof output !== "object") return null;
  let raw = output.sigmas;
  if (raw === undefined && Array.isArray(output.fluxbridge)) {
    for (const part of output.fluxbridge) {
      const obj = asObject(part);
      if (obj && obj.sigmas !== undefined) raw = obj.sigmas;
    }
  }
  if (raw === undefined || raw === null) return null;
  const flat = [];
  const walk = (v) => {
    if (Array.isArray(v)) v.forEach(walk);
    else if (typeof v === "number" && Number.isFinite(v)) flat.push(v);
    else if (typeof v === "string" && v.trim() !== "" && Number.isFinite(Number(v))) flat.push(Number(v));
  };
  walk(raw);
  return flat.length ? flat : null;
}

function count(v) {
  if (Array.isArray(v)) return v.length;
  if (v && typeof v === "object") return Object.keys(v).length;
  if (typeof v === "number") return v;
  return 0;
}

function dtypeText(info) {
  if (typeof info.dtype === "string") return info.dtype;
  const d = info.dtypes;
  if (Array.isArray(d)) return d.join(", ");
  if (d && typeof d === "object") {
    return Object.entries(d)
      .map(([k, v]) => (typeof v === "number" ? `${k}×${v}` : `${k}`))
      .join(", ");
  }
  return null;
}

/** Lines describing what a loader detected: "layout bfl · variant dev · dtype bf16" and so on. */
export function loaderLines(info) {
  if (!info || typeof info !== "object") return [];
  const items = Array.isArray(info.components) ? info.components : [info];
  const lines = [];
  for (const c of items) {
    const parts = [];
    if (c.family) parts.push(String(c.family));
    if (c.layout) parts.push(`layout ${c.layout}`);
    if (c.variant) parts.push(`variant ${c.variant}`);
    const dt = dtypeText(c);
    if (dt) parts.push(`dtype ${dt}`);
    if (c.tokenizer) parts.push(`tokenizer ${typeof c.tokenizer === "string" ? c.tokenizer : JSON.stringify(c.tokenizer)}`);
    if (parts.length) lines.push(parts.join(" · "));
    for (const w of Array.isArray(c.warnings) ? c.warnings : []) lines.push(`⚠ ${w}`);
  }
  return lines;
}

/** Summary line of a LoRA report, and the key lists for the details view. */
export function loraSummary(report) {
  if (!report || typeof report !== "object") return { line: "", sections: [] };
  const patched = count(report.patched);
  const zero = count(report.zero_filled);
  const notPlaced = count(report.not_placed);
  const head = [];
  if (report.format) head.push(`format ${report.format}`);
  head.push(`patched ${patched}`, `zero-filled ${zero}`, `not placed ${notPlaced}`);
  const sections = [];
  const item = (k) => {
    if (typeof k === "string") return k;
    if (k && typeof k === "object" && "key" in k) return k.reason ? `${k.key}: ${k.reason}` : String(k.key);
    return JSON.stringify(k);
  };
  const keyList = (v) => {
    if (Array.isArray(v)) return v.map(item);
    if (v && typeof v === "object") return Object.entries(v).map(([k, why]) => `${k}: ${typeof why === "string" ? why : JSON.stringify(why)}`);
    return [];
  };
  for (const [title, key] of [["patched", "patched"], ["zero-filled", "zero_filled"], ["not placed", "not_placed"]]) {
    const keys = keyList(report[key]);
    if (keys.length) sections.push({ title, keys });
  }
  if (Array.isArray(report.keys) && report.keys.length) sections.push({ title: "keys", keys: report.keys.map(String) });
  return { line: head.join(" · "), sections };
}

/** Geometry of the sigma curve inside a box: points (x,y) and the value range. */
export function sigmaCurve(sigmas, x, y, w, h, pad = 4) {
  if (!Array.isArray(sigmas) || sigmas.length === 0 || !(w > 2 * pad) || !(h > 2 * pad)) return null;
  let lo = Math.min(...sigmas, 0);
  let hi = Math.max(...sigmas);
  if (hi - lo < 1e-12) hi = lo + 1;
  const n = sigmas.length;
  const points = sigmas.map((s, i) => [
    x + pad + (n === 1 ? 0 : (i / (n - 1)) * (w - 2 * pad)),
    y + pad + (1 - (s - lo) / (hi - lo)) * (h - 2 * pad),
  ]);
  return { points, min: lo, max: hi, steps: n - 1 };
}

/** Draw the sigma curve with a CanvasRenderingContext2D-like `ctx`. Returns the geometry (or null). */
export function drawSigmaCurve(ctx, sigmas, x, y, w, h, colors = {}) {
  const geo = sigmaCurve(sigmas, x, y, w, h);
  if (!geo || !ctx) return null;
  ctx.save();
  ctx.fillStyle = colors.background || "rgba(0,0,0,0.35)";
  ctx.fillRect(x, y, w, h);
  ctx.strokeStyle = colors.line || "#6cf";
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  geo.points.forEach(([px, py], i) => (i === 0 ? ctx.moveTo(px, py) : ctx.lineTo(px, py)));
  ctx.stroke();
  ctx.fillStyle = colors.dot || "#fff";
  if (geo.points.length <= 64) {
    for (const [px, py] of geo.points) ctx.fillRect(px - 1.5, py - 1.5, 3, 3);
  }
  ctx.fillStyle = colors.text || "#ccc";
  ctx.font = "10px sans-serif";
  ctx.fillText(`σ ${geo.max.toFixed(3)} → ${sigmas[sigmas.length - 1].toFixed(3)} · ${geo.steps} steps`, x + 6, y + h - 6);
  ctx.restore();
  return geo;
}

function setText(el, text) {
  if (!el) return;
  el.textContent = text;
}

/** Fill (or refresh) the info DOM element of a node: summary lines, and a <details> key list for LoRAs. */
export function renderInfo(doc, container, lines, sections = []) {
  if (!doc || !container) return container;
  while (container.firstChild) container.removeChild(container.firstChild);
  for (const line of lines) {
    const div = doc.createElement("div");
    setText(div, line);
    container.appendChild(div);
  }
  for (const section of sections) {
    const details = doc.createElement("details");
    const summary = doc.createElement("summary");
    setText(summary, `${section.title} (${section.keys.length})`);
    details.appendChild(summary);
    const pre = doc.createElement("pre");
    setText(pre, section.keys.join("\n"));
    details.appendChild(pre);
    container.appendChild(details);
  }
  return container;
}

function infoElement(node, doc) {
  if (node.__fluxbridgeInfo) return node.__fluxbridgeInfo;
  if (!doc || typeof node.addDOMWidget !== "function") return null;
  const el = doc.createElement("div");
  el.className = "fluxbridge-info";
  if (el.style) {
    el.style.fontSize = "11px";
    el.style.fontFamily = "monospace";
    el.style.whiteSpace = "pre-wrap";
    el.style.overflow = "auto";
    el.style.opacity = "0.85";
  }
  node.addDOMWidget(INFO_WIDGET, "fluxbridge_info", el, { serialize: false, hideOnZoom: false });
  node.__fluxbridgeInfo = el;
  return el;
}

/** Apply one `executed` output to a node of a given kind; returns what was shown. */
export function applyOutput(node, kind, output, doc) {
  const payload = parsePayload(output);
  const text = textLines(output);
  let lines = [];
  let sections = [];
  if (kind === "loader") {
    lines = loaderLines(payload);
  } else if (kind === "lora") {
    const s = loraSummary(payload);
    lines = s.line ? [s.line] : [];
    sections = s.sections;
  } else if (kind === "scheduler") {
    node.__fluxbridgeSigmas = payload.sigmas || null;
    // the frontend keeps node.size in a Float32Array, not an Array
    if (node.__fluxbridgeSigmas && node.size && node.size.length >= 2) {
      const base = typeof node.computeSize === "function" ? node.computeSize()[1] : node.size[1];
      const need = base + CURVE_HEIGHT + 8;
      if (node.size[1] < need) {
        if (typeof node.setSize === "function") node.setSize([node.size[0], need]);
        else node.size[1] = need;
      }
    }
  }
  if (!lines.length && kind !== "scheduler") lines = text;
  node.__fluxbridgeLines = lines;
  if (kind !== "scheduler") {
    const el = infoElement(node, doc);
    if (el) renderInfo(doc, el, lines, sections);
  }
  if (typeof node.setDirtyCanvas === "function") node.setDirtyCanvas(true, true);
  return { lines, sections, sigmas: node.__fluxbridgeSigmas || null };
}

/** Foreground drawing: the sigma curve at the bottom of a scheduler node; text lines where no DOM widget. */
export function drawForeground(node, ctx) {
  if (!node || !ctx || (node.flags && node.flags.collapsed)) return;
  const [w, h] = node.size || [0, 0];
  if (node.__fluxbridgeSigmas) {
    drawSigmaCurve(ctx, node.__fluxbridgeSigmas, 8, h - CURVE_HEIGHT - 6, w - 16, CURVE_HEIGHT);
  } else if (!node.__fluxbridgeInfo && Array.isArray(node.__fluxbridgeLines) && node.__fluxbridgeLines.length) {
    ctx.save();
    ctx.fillStyle = "#aaa";
    ctx.font = "10px monospace";
    node.__fluxbridgeLines.slice(0, 6).forEach((line, i) => ctx.fillText(line, 8, h - 8 - 12 * (Math.min(node.__fluxbridgeLines.length, 6) - 1 - i)));
    ctx.restore();
  }
}

function chain(proto, method, after) {
  const original = proto[method];
  proto[method] = function (...args) {
    const r = typeof original === "function" ? original.apply(this, args) : undefined;
    try {
      after.apply(this, args);
    } catch (err) {
      if (typeof console !== "undefined") console.warn("[FluxBridge]", method, err);
    }
    return r;
  };
}

/** The extension object for `app.registerExtension`. `doc` defaults to the page's document. */
export function createExtension({ app, api, doc } = {}) {
  const document_ = doc || (typeof document !== "undefined" ? document : null);
  return {
    name: EXTENSION_NAME,
    async beforeRegisterNodeDef(nodeType, nodeData) {
      const kind = nodeKind(nodeData && nodeData.name);
      if (!kind || !nodeType || !nodeType.prototype) return;
      chain(nodeType.prototype, "onExecuted", function (output) {
        applyOutput(this, kind, output, document_);
      });
      chain(nodeType.prototype, "onDrawForeground", function (ctx) {
        drawForeground(this, ctx);
      });
    },
    async setup() {
      if (app) app.__fluxbridgeReady = true;
    },
  };
}
