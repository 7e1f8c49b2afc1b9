// memplan serve: the form is drawn from /api/form (every training flag of memplan.options.FLAGS), every change asks
// /api/plan for memplan's own result objects and draws them. Nothing here computes a memory figure: it formats
// bytes as GiB (2^30) the way the CLI does (`:,.2f`) and lays out what the server sent.
"use strict";

const GIB = 2 ** 30;
const PAGE_KEYS = ["model", "gpu", "margin"];
let FORM = null;          // /api/form
let EXTRA = {};           // query keys of a shared URL that the form has no input for (the server judges them)
let seq = 0;              // request counter: a late answer to an old request is dropped
let timer = null;

const $ = (id) => document.getElementById(id);
const gib = (bytes) => (bytes / GIB).toLocaleString("en-US", { minimumFractionDigits: 2, maximumFractionDigits: 2 });
const signed = (bytes) => (bytes >= 0 ? "+" : "−") + gib(Math.abs(bytes));

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

function defaults() {
  const d = { ...FORM.defaults };
  for (const f of FORM.fields) d[f.key] = f.default;
  return d;
}

function input(key) { return $("f-" + key); }

function setValue(key, value) {
  const node = input(key);
  if (!node) return false;
  if (node.tagName === "SELECT" && ![...node.options].some((o) => o.value === value)) {
    node.append(el("option", { value, textContent: value }));  // keep an unknown value: the server says why
  }
  node.value = value;
  return true;
}

function buildForm() {
  const models = $("model-list");
  for (const m of FORM.models) {
    const hint = m.local ? "local config given to memplan serve --config" : (m.hf_id || "");
    models.append(el("option", { value: m.name, textContent: hint }));
  }
  const gpu = $("f-gpu");
  gpu.append(el("option", { value: "", textContent: "(none: skip fit)" }));
  for (const g of FORM.gpus) gpu.append(el("option", { value: g.name, textContent: `${g.name} · ${gib(g.memory_bytes)} GiB` }));
  const box = $("train");
  for (const f of FORM.fields) {
    box.append(el("label", { htmlFor: "f-" + f.key, title: f.help }, `${f.flag} `, el("span", { class: "dim" }, f.help)));
    let node;
    if (f.kind === "select") {
      node = el("select", { id: "f-" + f.key, name: f.key });
      for (const c of f.choices) node.append(el("option", { value: c, textContent: c }));
    } else {  // numbers too: the server parses them as the CLI does, so a typo gets the CLI's message
      node = el("input", { id: "f-" + f.key, name: f.key, spellcheck: false,
                           inputMode: f.kind === "number" ? "decimal" : "text" });
    }
    box.append(node);
  }
  for (const node of document.querySelectorAll("#form input, #form select")) {
    node.addEventListener("input", () => { EXTRA = {}; schedule(); });
    node.addEventListener("change", () => { EXTRA = {}; schedule(); });
  }
  $("form").addEventListener("submit", (ev) => ev.preventDefault());
  $("reset").addEventListener("click", () => { EXTRA = {}; fillForm(new URLSearchParams()); schedule(0); });
}

function fillForm(params) {
  const d = defaults();
  for (const [k, v] of Object.entries(d)) setValue(k, v);
  EXTRA = {};
  for (const [k, v] of params.entries()) if (!setValue(k, v)) EXTRA[k] = v;
}

// The query: only what differs from the defaults, so a link is short and reads like a command line.
function query() {
  const d = defaults();
  const p = new URLSearchParams();
  for (const key of [...PAGE_KEYS, ...FORM.fields.map((f) => f.key)]) {
    const node = input(key);
    const v = node.value.trim();
    node.classList.toggle("changed", v !== d[key]);
    if (v !== d[key]) p.set(key, v);
  }
  for (const [k, v] of Object.entries(EXTRA)) p.set(k, v);
  return p.toString();
}

function schedule(ms = 150) {
  clearTimeout(timer);
  timer = setTimeout(update, ms);
}

async function update() {
  const q = query();
  history.replaceState(null, "", q ? "?" + q : location.pathname);
  const mine = ++seq;
  $("status").dataset.state = "loading";
  let status, body;
  try {
    const r = await fetch("/api/plan?" + q);
    status = r.status;
    body = await r.json();
  } catch (e) {
    status = 0;
    body = { error: "no answer from the memplan server: is `memplan serve` still running?" };
  }
  if (mine !== seq) return;
  if (status !== 200) return showError(body.error || `HTTP ${status}`, q);
  render(body);
  $("error").hidden = true;
  $("result").hidden = false;
  $("status").dataset.query = q;
  $("status").dataset.state = "ok";
}

function showError(message, q) {
  $("error").textContent = "error: " + message;
  $("error").hidden = false;
  $("result").hidden = true;
  $("status").dataset.query = q;
  $("status").dataset.state = "error";
}

function table(node, head, rows) {
  node.replaceChildren();
  const tr = el("tr");
  for (const h of head) tr.append(el("th", { class: h.endsWith("GiB") ? "num" : "" }, h));
  node.append(el("thead", {}, tr));
  const body = el("tbody");
  for (const r of rows) body.append(r);
  node.append(body);
}

function row(cells, cls = "") {
  const tr = el("tr", { class: cls });
  for (const c of cells) {
    const [text, klass] = Array.isArray(c) ? c : [c, ""];
    tr.append(el("td", { class: klass }, text));
  }
  return tr;
}

function render(v) {
  const e = v.estimate;
  $("peak").textContent = gib(e.peak_bytes) + " GiB";
  $("peak").dataset.bytes = e.peak_bytes;
  $("device-total").textContent = gib(e.device_total_bytes) + " GiB";
  $("device-total").dataset.bytes = e.device_total_bytes;
  $("peak-phase").textContent = e.peak_phase;
  $("describe").textContent = `${v.model} · ${(e.params.total / 1e9).toFixed(2)} B params, ` +
    `${(e.params.trainable / 1e6).toLocaleString("en-US", { maximumFractionDigits: 1, minimumFractionDigits: 1 })} M trainable · ${v.describe}`;
  $("command").textContent = "$ " + v.command + " --json";
  const fits = v.gpus.filter((g) => g.fits);
  const sel = v.gpus.find((g) => g.name === input("gpu").value);
  const verdict = $("verdict");
  verdict.replaceChildren();
  if (sel) {
    verdict.append(`${sel.name} (${gib(sel.memory_bytes)} GiB): `,
      el("span", { class: sel.fits ? "yes" : "no", id: "verdict-selected" }, sel.fits ? "fits" : "does not fit"),
      `, headroom ${signed(sel.headroom_bytes)} GiB · `);
  }
  verdict.append(`fits ${fits.length} of ${v.gpus.length} catalog GPUs`);

  if (window.Plotly) {
    Plotly.react("chart", v.figure.data, v.figure.layout, { displaylogo: false, responsive: true });
  } else {
    $("chart").textContent = "plotly.min.js is not available (pip install 'memplan[web]'): the tables below hold every figure.";
  }

  const comp = Object.entries(e.components).filter(([, b]) => b).map(([c, b]) =>
    row([c, [gib(b), "num"], [v.sources[c] || "", "dim"]]));
  comp.push(row(["tensor peak", [gib(e.peak_bytes), "num"], ["compare with torch.cuda.max_memory_allocated", "dim"]], "total"));
  for (const [c, b] of Object.entries(e.device_overheads)) comp.push(row([c, [gib(b), "num"], ["device overhead", "dim"]]));
  comp.push(row(["device total", [gib(e.device_total_bytes), "num"], ["compare with nvidia-smi / NVML", "dim"]], "total"));
  table($("components"), ["component", "GiB", "source"], comp);

  table($("phases"), ["phase", "tensor peak GiB"], Object.entries(e.phases).map(([p, b]) =>
    row([p === e.peak_phase ? p + " ◀ peak" : p, [gib(b), "num"]], p === e.peak_phase ? "peak" : "")));

  const counts = v.gpus.length && "min_gpus" in v.gpus[0];  // once memplan models multi-GPU runs
  table($("gpus"), ["GPU", "memory GiB", "headroom GiB", "fits", ...(counts ? ["GPUs needed"] : [])], v.gpus.map((g) =>
    row([g.name, [gib(g.memory_bytes), "num"], [signed(g.headroom_bytes), "num"], [g.fits ? "yes" : "no", g.fits ? "yes" : "no"],
         ...(counts ? [[g.min_gpus === null ? "> 8" : String(g.min_gpus), "num"]] : [])],
        g.name === input("gpu").value ? "selected" : "")));

  renderFit(v);

  $("notes").replaceChildren(...(e.notes.length ? e.notes : ["none"]).map((n) => el("li", {}, n)));
  const stack = Object.entries(v.stack.libraries).map(([k, ver]) => `${k} ${ver}`).join(", ");
  $("provenance").replaceChildren(
    el("li", {}, `memplan ${v.memplan_version}; analytic estimate (memplan/estimate/: each component's module cites its formula)`),
    el("li", {}, `library stack: ${stack} (${v.stack.source})`),
    el("li", {}, `device overheads: ${v.overheads_used}`),
    el("li", {}, `model architecture: ${v.model_source}`),
    el("li", {}, `GPU memory sizes: memplan/catalog/gpus.json (each entry names its source)`));
  $("version").textContent = `memplan ${v.memplan_version} · stack ${stack}`;
}

function renderFit(v) {
  const box = $("fit");
  box.replaceChildren();
  const f = v.fit;
  if (!f) { box.append("pick a GPU above to plan against it"); return; }
  if (f.error) { box.append(el("p", { class: "no", id: "fit-error" }, f.error)); return; }
  const b = f.budget;
  box.append(el("p", {}, `${b.label}: ${gib(b.total_bytes)} GiB − margin ${gib(b.margin_bytes)} = `,
    el("b", {}, `${gib(b.usable_bytes)} GiB usable`), " (judged on the device total)"));
  box.append(el("p", {}, `this configuration: device total ${gib(f.device_total_bytes)} GiB → `,
    el("span", { class: f.fits ? "yes" : "no", id: "fit-verdict" }, f.fits ? "fits" : "does not fit"),
    `, ${f.headroom_bytes >= 0 ? "headroom" : "short by"} ${gib(Math.abs(f.headroom_bytes))} GiB`));
  const bs = f.config.batch_size, seqLen = f.config.seq_len;
  box.append(el("p", {}, `largest sequence length at batch ${bs}: `,
    el("b", { id: "fit-max-seq" }, f.max_seq_len ? f.max_seq_len.toLocaleString("en-US") + (f.max_seq_len_capped ? "+" : "") : "none"),
    ` tokens (multiples of ${f.seq_len_granularity}) · largest batch at sequence length ${seqLen.toLocaleString("en-US")}: `,
    el("b", {}, f.max_batch_size ? String(f.max_batch_size) + (f.max_batch_capped ? "+" : "") : "none")));
  if (f.frontier.length > 1) {
    box.append(el("p", { class: "dim" }, "largest sequence length by batch: " +
      f.frontier.map((x) => `${x.batch_size}×${x.max_seq_len.toLocaleString("en-US")}`).join(" · ")));
  }
  if (f.options.length) {
    const t = el("table", { id: "fit-options" });
    table(t, ["#", "change (cheapest first, each alone)", "device GiB", "fits", "what it costs", "source"],
      f.options.map((o, i) => row([String(i + 1), o.label, [gib(o.device_total_bytes), "num"],
        [o.fits ? "yes" : "no", o.fits ? "yes" : "no"], o.cost, [o.source, "dim"]])));
    box.append(t);
  }
  if (f.combination.length) {
    box.append(el("p", {}, el("b", {}, "no single change is enough; combined, cheapest first:")));
    box.append(el("ol", {}, ...f.combination.map((s) =>
      el("li", {}, `${s.label}: device total ${gib(s.device_total_bytes)} GiB${s.fits ? " — fits" : ""}`))));
  }
  box.append(el("p", { class: "dim" }, `$ ${v.fit_command} · searched ${f.configurations_searched.toLocaleString("en-US")} ` +
    `configurations (${f.estimates} estimated) in ${Math.round(f.seconds * 1000)} ms`));
}

async function init() {
  try {
    const r = await fetch("/api/form");
    FORM = await r.json();
  } catch (e) {
    return showError("cannot load the form from the memplan server", "");
  }
  buildForm();
  fillForm(new URLSearchParams(location.search));
  window.addEventListener("popstate", () => { fillForm(new URLSearchParams(location.search)); schedule(0); });
  update();
}

document.addEventListener("DOMContentLoaded", init);
