// FluxBridge frontend extension: loader detections, LoRA reports and the scheduler's sigma curve.
// The logic lives in fluxbridge_core.js (pure functions, tested with `node --test web/tests/`).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { createExtension } from "./fluxbridge_core.js";

app.registerExtension(createExtension({ app, api }));
