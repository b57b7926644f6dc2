// node --test web/tests/
// (.mjs files are not listed by ComfyUI's /extensions, which lists **/*.js, so the frontend never imports these)
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, mkdirSync, copyFileSync, writeFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";

import * as core from "../fluxbridge_core.js";

const WEB = join(dirname(fileURLToPath(import.meta.url)), "..");

// ------------------------------------------------------------------------------------------- fakes

class FakeElement {
  constructor(tag) {
    this.tagName = tag.toUpperCase();
    this.children = [];
    this.style = {};
    this.textContent = "";
  }
  appendChild(c) {
    this.children.push(c);
    return c;
  }
  removeChild(c) {
    this.children = this.children.filter((x) => x !== c);
    return c;
  }
  get firstChild() {
    return this.children[0] || null;
  }
  allText() {
    return [this.textContent, ...this.children.map((c) => c.allText())].filter(Boolean).join("\n");
  }
}
const fakeDocument = { createElement: (tag) => new FakeElement(tag) };

function fakeCtx() {
  const calls = [];
  const rec = (name) => (...args) => calls.push([name, ...args]);
  return {
    calls,
    save: rec("save"), restore: rec("restore"), beginPath: rec("beginPath"), moveTo: rec("moveTo"),
    lineTo: rec("lineTo"), stroke: rec("stroke"), fillRect: rec("fillRect"), fillText: rec("fillText"),
    set fillStyle(v) {}, set strokeStyle(v) {}, set lineWidth(v) {}, set font(v) {},
  };
}

function fakeNodeType() {
  function NodeType() {
    this.size = [300, 120];
    this.flags = {};
    this.widgets = [];
    this.dirty = 0;
  }
  NodeType.prototype.computeSize = function () {
    return [300, 100];
  };
  NodeType.prototype.setSize = function (s) {
    this.size = s;
  };
  NodeType.prototype.setDirtyCanvas = function () {
    this.dirty += 1;
  };
  NodeType.prototype.addDOMWidget = function (name, type, element, options) {
    const w = { name, type, element, options };
    this.widgets.push(w);
    return w;
  };
  return NodeType;
}

async function registered(name) {
  const ext = core.createExtension({ app: {}, api: {}, doc: fakeDocument });
  const NodeType = fakeNodeType();
  let original = 0;
  NodeType.prototype.onExecuted = function () {
    original += 1;
  };
  await ext.beforeRegisterNodeDef(NodeType, { name });
  return { ext, node: new NodeType(), originalCalls: () => original };
}

// ------------------------------------------------------------------------------------------- tests

test("payload parsing merges fluxbridge objects and JSON strings; sigmas are flattened", () => {
  const p = core.parsePayload({ fluxbridge: [{ layout: "bfl" }, JSON.stringify({ variant: "dev" })], text: ["x"] });
  assert.deepEqual(p, { layout: "bfl", variant: "dev" });
  assert.deepEqual(core.extractSigmas({ sigmas: [[1, 0.5], [0]] }), [1, 0.5, 0]);
  assert.deepEqual(core.extractSigmas({ fluxbridge: [{ sigmas: [1, "0.25", 0] }] }), [1, 0.25, 0]);
  assert.equal(core.extractSigmas({ text: ["hello"] }), null);
  assert.deepEqual(core.parsePayload(undefined), {});
  assert.deepEqual(core.parsePayload({ text: ['{"layout": "comfy"}', "plain"] }), { layout: "comfy" });
  assert.deepEqual(core.textLines({ text: ['{"a":1}', "line one\nline two"] }), ["line one", "line two"]);
});

test("loader lines show family, layout, variant and dtype", () => {
  assert.deepEqual(core.loaderLines({ family: "flux-transformer", layout: "bfl", variant: "dev", dtype: "bf16" }),
    ["flux-transformer · layout bfl · variant dev · dtype bf16"]);
  assert.deepEqual(core.loaderLines({ layout: "comfy", dtypes: { bf16: 10, fp32: 2 }, warnings: ["odd key"] }),
    ["layout comfy · dtype bf16×10, fp32×2", "⚠ odd key"]);
  assert.deepEqual(core.loaderLines({ components: [{ family: "clip-l", layout: "hf" }, { family: "t5-xxl", dtypes: ["fp16"] }] }),
    ["clip-l · layout hf", "t5-xxl · dtype fp16"]);
  assert.deepEqual(core.loaderLines(null), []);
});

test("LoRA summary counts lists or numbers and keeps the key lists for the details view", () => {
  const s = core.loraSummary({ format: "kohya", patched: ["a", "b"], zero_filled: 1, not_placed: { "x.lora_up": "no target" } });
  assert.equal(s.line, "format kohya · patched 2 · zero-filled 1 · not placed 1");
  assert.deepEqual(s.sections, [
    { title: "patched", keys: ["a", "b"] },
    { title: "not placed", keys: ["x.lora_up: no target"] },
  ]);
  assert.equal(core.loraSummary({}).line, "patched 0 · zero-filled 0 · not placed 0");
  const asSent = core.loraSummary({ format: "kohya", patched: ["double_blocks.0.img_attn.qkv"], zero_filled: [],
    not_placed: [{ key: "lora_te1_x.lora_down.weight", reason: "no CLIP-L connected" }] });
  assert.deepEqual(asSent.sections[1], { title: "not placed", keys: ["lora_te1_x.lora_down.weight: no CLIP-L connected"] });
});

test("sigma curve geometry spans the box; decreasing sigmas go down", () => {
  const geo = core.sigmaCurve([1, 0.75, 0.5, 0], 10, 20, 200, 100, 0);
  assert.equal(geo.points.length, 4);
  assert.deepEqual(geo.points[0], [10, 20]);
  assert.deepEqual(geo.points[3], [210, 120]);
  assert.equal(geo.steps, 3);
  for (let i = 1; i < 4; i++) assert.ok(geo.points[i][1] > geo.points[i - 1][1]);
  assert.equal(core.sigmaCurve([], 0, 0, 10, 10), null);
  assert.equal(core.sigmaCurve([1, 0], 0, 0, 4, 4, 4), null);
  const flat = core.sigmaCurve([0, 0], 0, 0, 50, 50);
  assert.ok(flat.points.every(([, y]) => Number.isFinite(y)));
});

test("drawSigmaCurve strokes one polyline through every sigma", () => {
  const ctx = fakeCtx();
  const geo = core.drawSigmaCurve(ctx, [1, 0.6, 0.2, 0], 0, 0, 120, 60);
  assert.ok(geo);
  const names = ctx.calls.map((c) => c[0]);
  assert.equal(names.filter((n) => n === "moveTo").length, 1);
  assert.equal(names.filter((n) => n === "lineTo").length, 3);
  assert.ok(names.includes("stroke"));
  assert.equal(names[0], "save");
  assert.equal(names[names.length - 1], "restore");
  assert.ok(ctx.calls.some((c) => c[0] === "fillText" && /3 steps/.test(c[1])));
});

test("extension: name, and only our node types are hooked", async () => {
  const ext = core.createExtension({ app: {}, api: {}, doc: fakeDocument });
  assert.equal(ext.name, "FluxBridge.ui");
  const NodeType = fakeNodeType();
  await ext.beforeRegisterNodeDef(NodeType, { name: "KSampler" });
  assert.equal(NodeType.prototype.onExecuted, undefined);
  assert.equal(NodeType.prototype.onDrawForeground, undefined);
  const app = {};
  await core.createExtension({ app }).setup();
  assert.equal(app.__fluxbridgeReady, true);
});

test("loader node shows its detection in a DOM widget; the original onExecuted still runs", async () => {
  const { node, originalCalls } = await registered("FluxBridgeLoadTransformer");
  node.onExecuted({ fluxbridge: [{ family: "flux-transformer", layout: "bfl", variant: "schnell", dtype: "fp8_e4m3fn" }] });
  assert.equal(originalCalls(), 1);
  assert.equal(node.widgets.length, 1);
  assert.equal(node.widgets[0].options.serialize, false);
  assert.match(node.widgets[0].element.allText(), /layout bfl · variant schnell · dtype fp8_e4m3fn/);
  node.onExecuted({ fluxbridge: [{ layout: "diffusers" }] });
  assert.equal(node.widgets.length, 1, "the widget is reused, not added again");
  assert.doesNotMatch(node.widgets[0].element.allText(), /bfl/);
  assert.ok(node.dirty >= 2);
});

test("loader falls back to the plain text it was sent", async () => {
  const { node } = await registered("FluxBridgeLoadVAE");
  node.onExecuted({ text: ["flux-vae, layout ldm"] });
  assert.match(node.widgets[0].element.allText(), /flux-vae, layout ldm/);
});

test("LoRA node: summary line plus collapsible key lists", async () => {
  const { node } = await registered("FluxBridgeLoadLoRA");
  node.onExecuted({ fluxbridge: [{ format: "peft", patched: ["transformer_blocks.0.attn.to_q"], zero_filled: [], not_placed: { "foo.lora_A": "unknown module" } }] });
  const el = node.widgets[0].element;
  assert.match(el.allText(), /format peft · patched 1 · zero-filled 0 · not placed 1/);
  const details = el.children.filter((c) => c.tagName === "DETAILS");
  assert.equal(details.length, 2);
  assert.match(details[0].children[0].textContent, /patched \(1\)/);
  assert.match(details[1].allText(), /foo.lora_A: unknown module/);
});

test("scheduler node grows to fit the curve and draws it in onDrawForeground", async () => {
  const { node } = await registered("FluxBridgeScheduler");
  const ctx = fakeCtx();
  node.onDrawForeground(ctx);
  assert.equal(ctx.calls.length, 0, "nothing drawn before execution");
  node.onExecuted({ sigmas: [1, 0.8, 0.5, 0.2, 0] });
  assert.ok(node.size[1] >= 100 + core.CURVE_HEIGHT);
  node.onDrawForeground(ctx);
  assert.equal(ctx.calls.filter((c) => c[0] === "lineTo").length, 4);
  const collapsed = fakeCtx();
  node.flags.collapsed = true;
  node.onDrawForeground(collapsed);
  assert.equal(collapsed.calls.length, 0);
});

test("scheduler node grows when its size is a Float32Array, as in the real frontend", async () => {
  const { node } = await registered("FluxBridgeScheduler");
  node.size = new Float32Array([360, 182]);
  node.setSize = undefined;
  node.computeSize = () => [360, 154];
  node.onExecuted({ sigmas: [1, 0.5, 0] });
  assert.ok(node.size[1] >= 154 + core.CURVE_HEIGHT, `size ${node.size[1]}`);
});

test("nodes without addDOMWidget draw their lines on the canvas instead", async () => {
  const ext = core.createExtension({ app: {}, api: {}, doc: fakeDocument });
  function Legacy() {
    this.size = [200, 80];
    this.flags = {};
  }
  await ext.beforeRegisterNodeDef(Legacy, { name: "FluxBridgeLoadTextEncoders" });
  const node = new Legacy();
  node.onExecuted({ fluxbridge: [{ family: "clip-l", layout: "hf" }] });
  const ctx = fakeCtx();
  node.onDrawForeground(ctx);
  assert.ok(ctx.calls.some((c) => c[0] === "fillText" && c[1] === "clip-l · layout hf"));
});

test("every .js file in web/ imports cleanly as the frontend would; only fluxbridge.js registers", async () => {
  // Lay the files out as ComfyUI serves them: /extensions/<pack>/*.js next to /scripts/{app,api}.js.
  const root = mkdtempSync(join(tmpdir(), "fluxbridge-web-"));
  mkdirSync(join(root, "scripts"));
  const ext = join(root, "extensions", "fluxbridge");
  mkdirSync(ext, { recursive: true });
  writeFileSync(join(root, "scripts", "app.js"),
    "export const registered = [];\nexport const app = { registerExtension(e) { if (registered.some((r) => r.name === e.name)) throw new Error('duplicate'); registered.push(e); } };\n");
  writeFileSync(join(root, "scripts", "api.js"), "export const api = { addEventListener() {} };\n");
  const jsFiles = readdirSync(WEB).filter((f) => f.endsWith(".js"));
  assert.deepEqual(jsFiles.sort(), ["fluxbridge.js", "fluxbridge_core.js"]);
  for (const f of jsFiles) copyFileSync(join(WEB, f), join(ext, f));
  const appModule = await import(pathToFileURL(join(root, "scripts", "app.js")).href);
  for (const f of jsFiles) await import(pathToFileURL(join(ext, f)).href);
  assert.deepEqual(appModule.registered.map((e) => e.name), ["FluxBridge.ui"]);
  assert.equal(typeof appModule.registered[0].beforeRegisterNodeDef, "function");
});

test("payloads as our nodes send them (nodes/_common.ui: text + fluxbridge + sigmas)", async () => {
  const loader = await registered("FluxBridgeLoadTextEncoders");
  loader.node.onExecuted({
    text: ["clip_l.safetensors: clip-l, layout comfy, float32; tokenizer from the models folder"],
    fluxbridge: [{ components: [
      { name: "clip_l.safetensors", family: "clip-l", layout: "comfy", dtype: "float32", tokenizer: "the models folder", warnings: [] },
      { name: "t5xxl_fp16.safetensors", family: "t5-xxl", layout: "comfy", dtype: "float16", tokenizer: "the models folder", warnings: ["1 unexpected tensor(s): x"] },
    ], cached: false }],
  });
  const text = loader.node.widgets[0].element.allText();
  assert.match(text, /clip-l · layout comfy · dtype float32 · tokenizer the models folder/);
  assert.match(text, /t5-xxl · layout comfy · dtype float16/);
  assert.match(text, /⚠ 1 unexpected tensor\(s\): x/);
  const sched = await registered("FluxBridgeScheduler");
  sched.node.onExecuted({ text: ["4 step(s), fixed shift 1.0"], fluxbridge: [{ sigmas: [1, 0.75, 0.5, 0.25, 0], shift: "fixed" }], sigmas: [1, 0.75, 0.5, 0.25, 0] });
  const ctx = fakeCtx();
  sched.node.onDrawForeground(ctx);
  assert.equal(ctx.calls.filter((c) => c[0] === "lineTo").length, 4);
});
