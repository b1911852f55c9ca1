// lora-kit playground: compare adapters side by side, browse the registry, watch the server.
// Plain JavaScript, no framework and no build step. Every data call goes through the public API
// (the same routes and bearer auth the SDKs use). Server text is only ever set as textContent.
"use strict";

const MAX_COLUMNS = 4;
const POLL_MS = 2000;
const state = {
  token: null, // the bearer token: in memory only, never stored
  baseModel: "",
  models: [],
  columns: [],
  pendingAuth: null, // a promise while the token prompt is open
  resolveAuth: null,
  lastScrape: null,
  pollTimer: null,
};

// -- small helpers ------------------------------------------------------------------------------

function $(id) {
  return document.getElementById(id);
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function svg(tag, attrs = {}) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  return node;
}

function fmt(value, digits = 3) {
  if (typeof value !== "number" || !Number.isFinite(value)) return value == null ? "—" : String(value);
  return Number.isInteger(value) ? String(value) : value.toFixed(digits);
}

function pct(value) {
  return typeof value === "number" ? `${(value * 100).toFixed(1)}%` : "—";
}

// The message of an error body in either API shape (OpenAI's {error: {...}} or Cloudflare's envelope).
function errorMessage(body, status) {
  if (body && body.error && body.error.message) return body.error.message;
  if (body && Array.isArray(body.errors) && body.errors.length) return body.errors.map((e) => e.message).join("; ");
  return `HTTP ${status}`;
}

// -- auth and API calls -------------------------------------------------------------------------

class AuthNeeded extends Error {}

function headers(extra = {}) {
  const out = { ...extra };
  if (state.token) out.Authorization = `Bearer ${state.token}`;
  return out;
}

function askForToken(message) {
  $("auth").hidden = false;
  $("auth-error").textContent = message || "";
  document.querySelector("main").hidden = true;
  $("auth-token").focus();
  if (!state.pendingAuth) {
    state.pendingAuth = new Promise((resolve) => {
      state.resolveAuth = resolve;
    });
  }
  return state.pendingAuth;
}

function onTokenSubmit(event) {
  event.preventDefault();
  state.token = $("auth-token").value.trim() || null;
  $("auth-token").value = "";
  $("auth").hidden = true;
  document.querySelector("main").hidden = false;
  const resolve = state.resolveAuth;
  state.pendingAuth = null;
  if (resolve) resolve();
  init();
}

// fetch with the bearer token; a 401 asks for the token again and throws AuthNeeded.
async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401) {
    askForToken(state.token ? "That token was refused (401); try again." : "");
    throw new AuthNeeded("authentication needed");
  }
  return response;
}

async function apiJson(path) {
  const response = await api(path);
  const body = await response.json().catch(() => null);
  if (!response.ok) throw new Error(errorMessage(body, response.status));
  return body;
}

// -- tabs ---------------------------------------------------------------------------------------

const TABS = ["compare", "registry", "server"];

function showTab(name, focus = false) {
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    const selected = tab === name;
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`view-${tab}`).hidden = !selected;
    if (selected && focus) button.focus();
  }
  if (name === "registry") loadRegistry();
  if (name === "server") startPolling();
  else stopPolling();
}

function onTabKey(event) {
  const index = TABS.indexOf(event.target.id.replace("tab-", ""));
  const moves = { ArrowRight: 1, ArrowLeft: -1, Home: -index, End: TABS.length - 1 - index };
  if (!(event.key in moves)) return;
  event.preventDefault();
  showTab(TABS[(index + moves[event.key] + TABS.length) % TABS.length], true);
}

// -- compare ------------------------------------------------------------------------------------

let columnSerial = 0;

function addColumn(model = "") {
  if (state.columns.length >= MAX_COLUMNS) return null;
  const node = $("column-template").content.firstElementChild.cloneNode(true);
  const id = ++columnSerial;
  const part = (name) => node.querySelector(`[data-id="${name}"]`);
  for (const label of node.querySelectorAll("label[data-for]")) {
    const input = part(label.dataset.for);
    input.id = `col${id}-${label.dataset.for}`;
    label.htmlFor = input.id;
    label.textContent = `${label.textContent} (column ${id})`;
  }
  node.setAttribute("aria-label", `Column ${id}`);
  node.dataset.column = String(id);
  const column = { id, node, part };
  part("model").value = model;
  part("remove").setAttribute("aria-label", `Remove column ${id}`);
  part("remove").addEventListener("click", () => removeColumn(column));
  part("copy-curl").addEventListener("click", () => copySnippet(column, curlSnippet(column)));
  part("copy-python").addEventListener("click", () => copySnippet(column, pythonSnippet(column)));
  state.columns.push(column);
  $("columns").append(node);
  updateColumnButtons();
  return column;
}

function removeColumn(column) {
  if (state.columns.length <= 1) return;
  if (column.abort) column.abort.abort();
  state.columns = state.columns.filter((c) => c !== column);
  column.node.remove();
  updateColumnButtons();
  $("add-column").focus();
}

function updateColumnButtons() {
  $("add-column").disabled = state.columns.length >= MAX_COLUMNS;
  for (const column of state.columns) column.part("remove").disabled = state.columns.length <= 1;
}

// The chat of the prompt box: a JSON list of messages, or one user message (after the system one).
function promptMessages() {
  const text = $("prompt").value.trim();
  let messages = null;
  if (text.startsWith("[")) {
    try {
      const parsed = JSON.parse(text);
      if (Array.isArray(parsed)) messages = parsed;
    } catch (err) {
      messages = null; // not JSON: the text is the prompt itself
    }
  }
  messages = messages || [{ role: "user", content: text }];
  const system = $("system").value.trim();
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

// The column's `lora` value: null for the base, a JSON list (a weighted mix) as given, else the ref.
function loraOf(column) {
  const ref = column.part("model").value.trim();
  if (!ref || ref === "base" || ref === state.baseModel) return null;
  if (ref.startsWith("[")) {
    try {
      return JSON.parse(ref);
    } catch (err) {
      return ref; // the server answers what is wrong with it
    }
  }
  return ref;
}

function numberOf(column, name) {
  const value = column.part(name).valueAsNumber;
  return Number.isFinite(value) ? value : undefined;
}

// The OpenAI chat body a column sends (the same as the SDKs' `extra_body={"lora": ...}`).
function chatBody(column, stream) {
  const body = { model: state.baseModel, messages: promptMessages() };
  const lora = loraOf(column);
  if (lora !== null) body.lora = lora;
  const temperature = numberOf(column, "temperature");
  const maxTokens = numberOf(column, "max-tokens");
  if (temperature !== undefined) body.temperature = temperature;
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  if (stream) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  return body;
}

function setAnswer(column, text, isError = false) {
  const answer = column.part("answer");
  answer.textContent = text;
  answer.classList.toggle("error", isError);
}

async function runAll(event) {
  if (event) event.preventDefault();
  if (!$("prompt").value.trim()) {
    $("compare-status").textContent = "Type a prompt first.";
    $("prompt").focus();
    return;
  }
  $("run").disabled = true;
  $("compare-status").textContent = "Running…";
  const started = performance.now();
  await Promise.all(state.columns.map((column) => runColumn(column)));
  $("run").disabled = false;
  $("compare-status").textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
}

async function runColumn(column) {
  if (column.abort) column.abort.abort();
  column.abort = new AbortController();
  column.node.dataset.state = "running";
  setAnswer(column, "");
  column.part("stats").textContent = "waiting…";
  const t0 = performance.now();
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(chatBody(column, true)),
      signal: column.abort.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error(errorMessage(body, response.status));
    }
    const result = await readStream(response, column, t0);
    column.part("stats").textContent = statsLine(result, t0);
    column.node.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") return;
    setAnswer(column, err instanceof AuthNeeded ? "Authentication needed." : `Error: ${err.message}`, true);
    column.part("stats").textContent = "";
    column.node.dataset.state = "error";
  }
}

// Read the SSE stream of chat.completion.chunk objects into the column; returns {text, usage, firstMs}.
async function readStream(response, column, t0) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  const result = { text: "", usage: null, firstMs: null };
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      handleEvent(event, result, column, t0);
    }
  }
  return result;
}

function handleEvent(event, result, column, t0) {
  const data = event
    .split("\n")
    .filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(5).trim())
    .join("\n");
  if (!data || data === "[DONE]") return;
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(errorMessage(chunk, 500));
  if (chunk.usage) result.usage = chunk.usage;
  for (const choice of chunk.choices || []) {
    const delta = (choice.delta && choice.delta.content) || "";
    if (delta) {
      if (result.firstMs === null) result.firstMs = performance.now() - t0;
      result.text += delta;
      setAnswer(column, result.text);
    }
  }
}

function statsLine(result, t0) {
  const seconds = (performance.now() - t0) / 1000;
  const usage = result.usage || {};
  const completion = usage.completion_tokens;
  const parts = [];
  if (completion !== undefined) parts.push(`${usage.prompt_tokens} prompt + ${completion} completion tokens`);
  if (completion !== undefined && seconds > 0) parts.push(`${(completion / seconds).toFixed(1)} tokens/s`);
  if (result.firstMs !== null) parts.push(`first token ${(result.firstMs / 1000).toFixed(2)} s`);
  parts.push(`total ${seconds.toFixed(2)} s`);
  if (!result.text) parts.unshift("(empty answer)");
  return parts.join(" · ");
}

// -- copy as curl / Python ----------------------------------------------------------------------

function shellQuote(text) {
  return `'${text.replace(/'/g, `'"'"'`)}'`;
}

function curlSnippet(column) {
  const auth = state.token ? ` \\\n  -H "Authorization: Bearer $LORA_KIT_API_TOKEN"` : "";
  return (
    `curl -N ${location.origin}/v1/chat/completions${auth} \\\n` +
    `  -H 'Content-Type: application/json' \\\n` +
    `  -d ${shellQuote(JSON.stringify(chatBody(column, true)))}`
  );
}

function pyString(text) {
  // JSON's string escapes (\" \\ \n \uXXXX ...) are Python's; U+2028/U+2029 are escaped too, so
  // that no editor takes them for line breaks inside the literal.
  return JSON.stringify(text).replace(/[\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}

function pyValue(value, depth = 1) {
  // Python source for a JSON value, written from the value itself (never by rewriting JSON text,
  // which would turn a "false" inside a string into "False"), laid out as JSON.stringify(_, null, 4)
  // is, each line indented by `depth` levels after the first.
  const pad = "    ".repeat(depth + 1);
  const end = "    ".repeat(depth);
  if (value === null || value === undefined) return "None";
  if (value === true) return "True";
  if (value === false) return "False";
  if (typeof value === "number") return Number.isFinite(value) ? String(value) : "None";
  if (typeof value === "string") return pyString(value);
  if (Array.isArray(value)) {
    if (!value.length) return "[]";
    return `[\n${value.map((v) => pad + pyValue(v, depth + 1)).join(",\n")}\n${end}]`;
  }
  const keys = Object.keys(value).filter((k) => value[k] !== undefined);
  if (!keys.length) return "{}";
  const items = keys.map((k) => `${pad}${pyString(k)}: ${pyValue(value[k], depth + 1)}`);
  return `{\n${items.join(",\n")}\n${end}}`;
}

function pythonSnippet(column) {
  const body = chatBody(column, false);
  const lines = [
    "import os",
    "",
    "from cloudflare import Cloudflare",
    "",
    "client = Cloudflare(",
    `    api_token=os.environ.get("LORA_KIT_API_TOKEN", "unused"),`,
    `    base_url="${location.origin}/client/v4",`,
    ")",
    "result = client.ai.run(",
    `    ${JSON.stringify(state.baseModel)},`,
    `    account_id="local",`,
    `    messages=${pyValue(body.messages)},`,
  ];
  if (body.lora !== undefined) lines.push(`    lora=${pyValue(body.lora)},`);
  if (body.temperature !== undefined) lines.push(`    temperature=${body.temperature},`);
  if (body.max_tokens !== undefined) lines.push(`    max_tokens=${body.max_tokens},`);
  lines.push(")", 'print(result["response"])');
  return lines.join("\n");
}

async function copySnippet(column, text) {
  const snippet = column.part("snippet");
  snippet.textContent = text;
  snippet.hidden = false;
  try {
    await navigator.clipboard.writeText(text);
    column.part("stats").textContent = "Copied to the clipboard (also shown below).";
  } catch (err) {
    column.part("stats").textContent = "The clipboard is not available here: copy the text below.";
  }
}

// -- registry -----------------------------------------------------------------------------------

async function loadRegistry() {
  const list = $("adapter-list");
  $("registry-status").textContent = "Loading…";
  try {
    const body = await apiJson("/v1/lora-kit/adapters");
    list.replaceChildren(...body.data.map(adapterItem));
    $("registry-status").textContent = body.data.length
      ? `${body.data.length} adapter(s) for ${body.base_model}`
      : "The registry is empty (lora-kit train, or lora-kit adapters add).";
  } catch (err) {
    if (!(err instanceof AuthNeeded)) $("registry-status").textContent = `Error: ${err.message}`;
  }
}

function adapterItem(adapter) {
  const aliases = Object.entries(adapter.aliases).map(([alias, version]) => `${alias} → @${version}`);
  const versions = el("ul", { "aria-label": `Versions of ${adapter.name}` });
  for (const version of adapter.versions) {
    const button = el("button", { type: "button", "aria-pressed": "false", "data-ref": version.ref });
    button.textContent = `@${version.version}${version.aliases.length ? ` (${version.aliases.join(", ")})` : ""}`;
    button.setAttribute("aria-label", `${version.ref}${version.aliases.length ? `, aliases ${version.aliases.join(", ")}` : ""}`);
    button.addEventListener("click", () => showVersion(version.ref, button));
    versions.append(el("li", {}, button));
  }
  return el(
    "li",
    {},
    el("span", { class: "adapter-name", text: adapter.name }),
    el("span", { class: "muted", text: aliases.length ? ` — ${aliases.join(", ")}` : "" }),
    versions,
  );
}

async function showVersion(ref, button) {
  for (const other of document.querySelectorAll("#adapter-list button")) other.setAttribute("aria-pressed", "false");
  if (button) button.setAttribute("aria-pressed", "true");
  const detail = $("version-detail");
  detail.replaceChildren(el("p", { class: "muted", text: `Loading ${ref}…` }));
  try {
    const version = await apiJson(`/v1/lora-kit/adapters/${encodeURIComponent(ref)}`);
    detail.replaceChildren(...versionView(version));
  } catch (err) {
    if (!(err instanceof AuthNeeded)) detail.replaceChildren(el("p", { class: "error", text: `Error: ${err.message}` }));
  }
}

function facts(pairs) {
  const list = el("dl", { class: "facts" });
  for (const [term, value] of pairs) list.append(el("dt", { text: term }), el("dd", { text: value }));
  return list;
}

function versionView(v) {
  const lineage = v.lineage || {};
  const m = lineage.metrics || {};
  const recipe = lineage.recipe || {};
  const base = lineage.base_model || {};
  const lora = lineage.lora_config || {};
  const verify = v.verify || { ok: false, problems: [] };
  const out = [el("h3", { text: `${v.ref}${v.aliases.length ? ` (${v.aliases.join(", ")})` : ""}` })];
  if (v.description) out.push(el("p", { text: v.description }));
  out.push(el("h4", { text: "Lineage" }));
  out.push(
    facts([
      ["Base model", base.spec || v.base_model || "—"],
      ["Base fingerprint", base.fingerprint ? `${base.fingerprint.slice(0, 16)}…` : "—"],
      ["LoRA", `r=${v.rank}, alpha=${v.alpha}, targets ${(v.target_modules || []).join(", ")}`],
      ["Recipe hash", lineage.recipe_hash ? `${lineage.recipe_hash.slice(0, 16)}…` : "—"],
      ["Recipe", recipeSummary(recipe)],
      ["Train data fingerprint", lineage.dataset_fingerprint ? `${lineage.dataset_fingerprint.slice(0, 16)}…` : "—"],
      ["Eval data fingerprint", lineage.eval_dataset_fingerprint ? `${lineage.eval_dataset_fingerprint.slice(0, 16)}…` : "—"],
      ["Held-out exact match", `base ${pct(m.base_exact_match)} → adapter ${pct(m.eval_exact_match)}${heldOutSize(m)}`],
      ["Eval loss", fmt(m.eval_loss, 4)],
      ["Train loss (last)", fmt(m.train_loss, 4)],
      ["Steps", fmt(m.steps)],
      ["Created", v.created_at],
      ["lora-kit version", lineage.lora_kit_version || "—"],
      ["Parent", lineage.parent ? lineage.parent.ref || "—" : "—"],
      ["Dropout / rsLoRA", `${fmt(lora.lora_dropout)} / ${lora.use_rslora ? "yes" : "no"}`],
    ]),
  );
  out.push(el("h4", { text: "Training loss" }), lossCurve(m.loss_curve));
  out.push(el("h4", { text: "Integrity" }), verifyView(verify));
  out.push(el("h4", { text: "Export targets" }), exportView(v.export_targets));
  const raw = el("details", {}, el("summary", { text: "Full lineage (JSON)" }), el("pre", { text: JSON.stringify(lineage, null, 2) }));
  out.push(raw);
  return out;
}

function heldOutSize(m) {
  const n = m.task_eval && m.task_eval.n;
  return typeof n === "number" ? ` (${n} examples)` : "";
}

function recipeSummary(recipe) {
  const t = recipe.train || {};
  const d = recipe.data || {};
  if (!recipe.train) return "—";
  const data = [d.train, d.eval].filter(Boolean).join(" + ");
  return `${data || "?"}; ${t.epochs} epoch(s), lr ${t.learning_rate}, batch ${t.micro_batch_size}×${t.gradient_accumulation_steps}` +
    `${t.max_steps ? `, max ${t.max_steps} steps` : ""}; quantization ${(recipe.model || {}).quantization || "?"}`;
}

function verifyView(verify) {
  if (verify.ok) return el("p", { class: "ok", text: "✓ Stored files match their sha256 (verified just now)." });
  const list = el("ul", { class: "error" });
  for (const problem of verify.problems) list.append(el("li", { text: problem }));
  return el("div", {}, el("p", { class: "error", text: "✗ Verification found problems:" }), list);
}

const KNOWN_TARGETS = ["peft", "cloudflare", "vllm", "gguf"];

// The export targets this version passes (the server's list), and the known ones it does not.
function exportView(targets) {
  if (!Array.isArray(targets)) return el("p", { class: "muted", text: "This server does not report export targets." });
  const list = el("ul", { class: "targets" });
  for (const name of new Set([...KNOWN_TARGETS, ...targets])) {
    const ok = targets.includes(name);
    list.append(el("li", { class: ok ? "ok" : "muted", text: `${ok ? "✓" : "✗"} ${name}${ok ? "" : " (not possible for this adapter)"}` }));
  }
  const hint = el("p", { class: "hint", text: "lora-kit adapters export REF DEST --target NAME" });
  return el("div", {}, list, hint);
}

// The loss curve as an SVG path: x = optimizer step, y = train loss (linear axes from the data).
function lossCurve(points) {
  if (!Array.isArray(points) || points.length === 0) {
    return el("p", { class: "muted", text: "No loss curve in this version's lineage (registered without a training run, or before lora-kit recorded one)." });
  }
  const W = 600, H = 240, L = 52, R = 12, T = 12, B = 34;
  const steps = points.map((p) => p[0]);
  const losses = points.map((p) => p[1]);
  const [x0, x1] = [Math.min(...steps), Math.max(...steps)];
  const [y0, y1] = [Math.min(...losses), Math.max(...losses)];
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0 || 1)) * (H - T - B);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, class: "loss-curve", role: "img" });
  chart.setAttribute("aria-label", `Training loss from ${fmt(losses[0], 3)} at step ${x0} to ${fmt(losses[losses.length - 1], 3)} at step ${x1}`);
  chart.append(svg("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  chart.append(svg("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  const labels = [
    [L - 6, T + 4, fmt(y1, 3), "end"],
    [L - 6, H - B, fmt(y0, 3), "end"],
    [L, H - B + 16, `step ${x0}`, "start"],
    [W - R, H - B + 16, `step ${x1}`, "end"],
  ];
  for (const [x, y, text, anchor] of labels) {
    const label = svg("text", { x, y, "text-anchor": anchor });
    label.textContent = text;
    chart.append(label);
  }
  const d = points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  chart.append(svg("path", { class: "curve", d: points.length === 1 ? `${d} h1` : d }));
  return chart;
}

// -- server -------------------------------------------------------------------------------------

// Prometheus text -> [{name, labels, value}] (the subset /metrics writes: no timestamps, no escapes in names).
function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(\{(.*)\})?\s+(\S+)$/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[pair[1]] = pair[2].replace(/\\n/g, "\n").replace(/\\"/g, '"').replace(/\\\\/g, "\\");
    }
    samples.push({ name: match[1], labels, value: Number(match[4]) });
  }
  return samples;
}

function perAdapter(samples) {
  const rows = {};
  const row = (name) => (rows[name] ||= { requests: 0, errors: 0, prompt: 0, generated: 0 });
  for (const s of samples) {
    // No adapter label: the base model, or a request refused before its adapter was resolved.
    const adapter = s.labels.adapter === "" ? "(base / unresolved)" : s.labels.adapter;
    if (s.name === "lora_kit_requests_total") {
      row(adapter).requests += s.value;
      if (Number(s.labels.status) >= 400) row(adapter).errors += s.value;
    } else if (s.name === "lora_kit_generated_tokens_total") row(adapter).generated += s.value;
    else if (s.name === "lora_kit_prompt_tokens_total") row(adapter).prompt += s.value;
  }
  return rows;
}

async function scrape() {
  try {
    const [metricsText, health] = await Promise.all([
      api("/metrics").then((r) => r.text()),
      api("/healthz").then((r) => r.json()),
    ]);
    renderServer(parseMetrics(metricsText), health, performance.now());
  } catch (err) {
    if (!(err instanceof AuthNeeded)) $("server-updated").textContent = `Error: ${err.message}`;
  }
}

function gauge(samples, name) {
  const found = samples.find((s) => s.name === name);
  return found ? found.value : 0;
}

function renderServer(samples, health, now) {
  const rows = perAdapter(samples);
  const previous = state.lastScrape;
  const seconds = previous ? (now - previous.at) / 1000 : 0;
  const rate = (name) => (previous && seconds > 0 ? Math.max(0, (rows[name].generated - (previous.rows[name] || { generated: 0 }).generated) / seconds) : null);
  const totalGenerated = Object.values(rows).reduce((sum, r) => sum + r.generated, 0);
  const totalRate = previous && seconds > 0 ? Math.max(0, (totalGenerated - previous.total) / seconds) : null;
  const gauges = [
    ["Queue", gauge(samples, "lora_kit_queue_depth")],
    ["Running", gauge(samples, "lora_kit_running_requests")],
    ["Tokens/s", totalRate === null ? "…" : totalRate.toFixed(1)],
    ["Resident adapters", `${gauge(samples, "lora_kit_resident_adapters")} / ${gauge(samples, "lora_kit_adapter_slots")} slots`],
  ];
  $("server-gauges").replaceChildren(...gauges.map(([k, v]) => el("div", {}, el("dt", { text: k }), el("dd", { text: String(v) }))));
  const resident = health.resident_adapters || [];
  $("server-resident").textContent = resident.length ? resident.join(", ") : "none loaded yet";
  const tbody = $("server-adapters").querySelector("tbody");
  tbody.replaceChildren(
    ...Object.keys(rows).sort().map((name) => {
      const r = rows[name];
      const tps = rate(name);
      const cells = [r.requests, r.errors, r.prompt, r.generated, tps === null ? "…" : tps.toFixed(1)];
      return el("tr", {}, el("th", { scope: "row", text: name }), ...cells.map((c) => el("td", { class: "num", text: String(c) })));
    }),
  );
  if (!Object.keys(rows).length) tbody.append(el("tr", {}, el("td", { colspan: "6", class: "muted", text: "No inference requests yet." })));
  state.lastScrape = { at: now, rows, total: totalGenerated };
  $("server-updated").textContent = `Updated ${new Date().toLocaleTimeString()}.`;
}

function startPolling() {
  if (state.pollTimer) return;
  scrape();
  state.pollTimer = setInterval(scrape, POLL_MS);
}

function stopPolling() {
  clearInterval(state.pollTimer);
  state.pollTimer = null;
}

// -- start --------------------------------------------------------------------------------------

async function init() {
  try {
    const body = await apiJson("/v1/models");
    state.baseModel = body.data[0].id;
    state.models = body.data.map((m) => m.id);
  } catch (err) {
    if (!(err instanceof AuthNeeded)) $("served-model").textContent = `Cannot list models: ${err.message}`;
    return;
  }
  $("served-model").textContent = `serving ${state.baseModel}`;
  const options = ["base", ...state.models.slice(1)].map((id) => el("option", { value: id }));
  $("model-options").replaceChildren(...options);
  if (!state.columns.length) {
    addColumn("base");
    addColumn(state.models.find((id, i) => i > 0 && !id.includes("@")) || "");
  }
  const current = TABS.find((t) => $(`tab-${t}`).getAttribute("aria-selected") === "true");
  if (current !== "compare") showTab(current);
}

function wire() {
  for (const tab of TABS) {
    $(`tab-${tab}`).addEventListener("click", () => showTab(tab));
    $(`tab-${tab}`).addEventListener("keydown", onTabKey);
  }
  $("auth-form").addEventListener("submit", onTokenSubmit);
  $("compare-form").addEventListener("submit", runAll);
  $("add-column").addEventListener("click", () => {
    const column = addColumn("");
    if (column) column.part("model").focus();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) runAll(event);
  });
  init();
}

document.addEventListener("DOMContentLoaded", wire);
