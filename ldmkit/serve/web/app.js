"use strict";
// Every string from the server reaches the page through textContent or a property, never as HTML.
const $ = (id) => document.getElementById(id);
const KEY = "ldmkit.key";
const FIELDS = { prompt: "prompt", negative_prompt: "negative", n: "n", steps: "steps", cfg: "cfg", seed: "seed",
                 sampler: "sampler", width: "width", height: "height", model: "model" };
const models = new Map();
let current = null;  // the id of the job being watched

class ApiError extends Error {
  constructor(message, status, param, retryAfter) {
    super(message);
    Object.assign(this, { status, param, retryAfter });
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}

function say(text, kind) {
  $("status").textContent = text;
  $("status").className = kind || "";
}

// Integers past 2^53 (user-chosen seeds) keep their digits where the browser exposes the JSON source text.
function parseJSON(text) {
  return JSON.parse(text, (k, v, ctx) =>
    Number.isInteger(v) && !Number.isSafeInteger(v) && ctx && ctx.source ? ctx.source : v);
}

async function api(method, path, body) {
  const headers = { Authorization: "Bearer " + (sessionStorage.getItem(KEY) || "") };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, body, cache: "no-store", credentials: "omit" });
  } catch (e) {
    throw new ApiError("the server cannot be reached: " + e.message, 0);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? parseJSON(text) : null; } catch (e) { data = null; }
  if (!res.ok) {
    const err = data && typeof data === "object" ? data.error : null;
    const message = (err && err.message) || (data && typeof data.detail === "string" && data.detail)
      || `HTTP ${res.status} ${res.statusText}`;
    throw new ApiError(message, res.status, err && err.param, Number(res.headers.get("Retry-After")) || 0);
  }
  if (data === null) throw new ApiError("the server's answer is not JSON", res.status);
  return data;
}

function showError(e) {
  say((e.status ? `Error ${e.status}: ` : "Error: ") + e.message, "error");
  const id = e.param && FIELDS[e.param.split(".")[0]];
  if (id) { $(id).setAttribute("aria-invalid", "true"); $(id).focus(); }
  if (e.status === 401) signOut(false);
}

// --- signing in and out ---------------------------------------------------------------------------------------
async function signIn() {
  say("Signing in…");
  try {
    await loadModels();
  } catch (e) {
    sessionStorage.removeItem(KEY);
    showError(e);
    return;
  }
  $("key").value = "";
  $("login-form").hidden = true;
  $("app").hidden = false;
  $("signout").hidden = false;
  say("");
  await refreshGallery();
}

function signOut(clearStatus = true) {
  current = null;
  sessionStorage.removeItem(KEY);
  models.clear();
  $("model").replaceChildren();
  $("gallery").replaceChildren();
  $("app").hidden = true;
  $("signout").hidden = true;
  $("login-form").hidden = false;
  $("generate").disabled = false;
  $("cancel").hidden = true;
  if (clearStatus) say("");
  $("key").focus();
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!key) { say("Enter an API key (create one with `ldmkit keys create`).", "error"); return; }
  sessionStorage.setItem(KEY, key);
  signIn();
});
$("signout").addEventListener("click", () => signOut());

// --- models -----------------------------------------------------------------------------------------------------
async function loadModels() {
  const { data } = await api("GET", "v1/models");
  models.clear();
  // the page generates through POST /v1/jobs: models that serve other routes only (inpainting) are not offered
  const options = data.filter((m) => (m.routes || []).includes("/v1/jobs")).map((m) => {
    models.set(m.id, m);
    const o = el("option", "", m.id);
    o.value = m.id;
    return o;
  });
  $("model").replaceChildren(...options);
  if (!options.length) throw new ApiError("this server serves no model that generates", 0);
  applyModel();
}

function applyModel() {
  const m = models.get($("model").value);
  if (!m) return;
  const classes = m.classes || [];
  const multiple = m.multiple || 1;
  for (const id of ["width", "height"]) {
    $(id).step = multiple;
    $(id).value = m.resolution;
  }
  $("classes").replaceChildren(...classes.map((c) => { const o = el("option"); o.value = c; return o; }));
  // a distilled model's own sampler, steps and guidance (its `sampling`); the page's defaults for the others
  const own = m.sampling || {};
  for (const id of ["sampler", "steps", "cfg"]) {
    const input = $(id);
    const initial = input.tagName === "SELECT"
      ? ([...input.options].find((o) => o.defaultSelected) || input.options[0]).value : input.defaultValue;
    input.value = id in own ? String(own[id]) : initial;
  }
  $("negative").disabled = !m.text;
  let takes;
  if (m.text) takes = "takes prompts";
  else if (classes.length) takes = `draws classes: the prompt is empty (every class in turn) or one of ${classes.join(", ")}`;
  else takes = "unconditional: leave the prompt empty";
  $("prompt").placeholder = m.text ? "a prompt" : classes.length ? "a class name, or blank" : "(none)";
  $("model-info").textContent = `${m.task || "generate"}, ${m.resolution}×${m.resolution} pixels, ` +
    `${m.channels} channel${m.channels === 1 ? "" : "s"}, sizes in multiples of ${multiple}; ${takes}.`;
}
$("model").addEventListener("change", applyModel);

// --- generating ---------------------------------------------------------------------------------------------------
function number(id, blank) {
  const v = $(id).value.trim();
  if (v === "" && blank !== undefined) return blank;
  return v !== "" && Number.isFinite(Number(v)) ? Number(v) : v;  // the server names a field it cannot read
}

function request() {
  const seed = $("seed").value.trim();
  return JSON.stringify({
    model: $("model").value,
    prompt: $("prompt").value,
    negative_prompt: $("negative").disabled ? "" : $("negative").value,
    n: number("n"),
    steps: number("steps"),
    cfg: number("cfg"),
    seed: seed === "" ? null : seed,  // sent as text so that seeds past 2^53 keep their digits
    sampler: $("sampler").value,
    width: number("width", 0),
    height: number("height", 0),
  });
}

$("gen-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  if (current) return;
  for (const e of document.querySelectorAll("[aria-invalid]")) e.removeAttribute("aria-invalid");
  $("generate").disabled = true;
  say("Submitting…");
  try {
    const job = await api("POST", "v1/jobs", request());
    current = job.id;
    $("cancel").hidden = false;
    await watch(job.id, performance.now());
  } catch (e) {
    showError(e);
  } finally {
    current = null;
    $("generate").disabled = false;
    $("cancel").hidden = true;
  }
});

async function watch(id, started) {
  let doneAt = 0;  // a job is "done" a moment before its images are encoded
  while (current === id) {
    let job;
    try {
      job = await api("GET", "v1/jobs/" + encodeURIComponent(id));
    } catch (e) {
      if (e.status !== 429) throw e;
      await sleep(1000 * (e.retryAfter || 1));  // polling counts against the key's rate; wait and go on
      continue;
    }
    if (current !== id) return;
    const secs = ((performance.now() - started) / 1000).toFixed(1);
    if (job.status === "done" && job.images) {
      say(`Done in ${secs} s.`, "done");
      await refreshGallery();
      return;
    }
    if (job.status === "done" && (doneAt ||= performance.now()) < performance.now() - 10000) {
      throw new ApiError(`job ${id} is done but its images never arrived; see the server log`, 0);
    }
    if (job.status === "failed" || job.status === "cancelled") {
      say(`Job ${job.status}: ${job.error || "no reason given"}`, "error");
      await refreshGallery();
      return;
    }
    say(`${{ running: "Running", done: "Finishing" }[job.status] || "Queued"}… ${secs} s`);
    await sleep(300);
  }
}

$("cancel").addEventListener("click", async () => {
  if (!current) return;
  try { await api("DELETE", "v1/jobs/" + encodeURIComponent(current)); } catch (e) { showError(e); }
});

// --- the gallery --------------------------------------------------------------------------------------------------
async function refreshGallery() {
  let data;
  try {
    ({ data } = await api("GET", "v1/jobs?limit=20"));
  } catch (e) {
    showError(e);
    return;
  }
  const cards = [];
  for (const job of data) {
    if (job.status === "done" && Array.isArray(job.images)) {
      job.images.forEach((b64, i) => {
        if (b64) {
          cards.push(card(job, b64, i));
        } else {  // withheld by the safety filter: never shown
          const fig = el("figure", "failed");
          const why = Array.isArray(job.withheld) ? job.withheld[i] : "";
          fig.append(el("div", "", `${job.model}: image withheld`), el("div", "", why || ""));
          cards.push(fig);
        }
      });
    } else if (job.status === "failed" || job.status === "cancelled") {
      const fig = el("figure", "failed");
      fig.append(el("div", "", `${job.model}: ${job.status}`), el("div", "", job.error || ""));
      cards.push(fig);
    }
  }
  $("gallery").replaceChildren(...cards);
  $("empty").hidden = cards.length > 0;
}

function promptOf(job, i) {
  const p = job.params || {};
  if (Array.isArray(p.prompts) && p.prompts.length) return p.prompts[i % p.prompts.length];
  const classes = (models.get(job.model) || {}).classes || [];
  if (Array.isArray(p.labels) && p.labels.length) {
    const label = p.labels[i % p.labels.length];
    return classes[label] !== undefined ? classes[label] : `class ${label}`;
  }
  return classes.length ? classes[i % classes.length] : "";
}

function card(job, b64, i) {
  const p = job.params || {};
  const seed = Array.isArray(job.seeds) ? job.seeds[i] : "";
  const prompt = promptOf(job, i);
  const src = "data:image/png;base64," + b64;
  const fig = el("figure");
  const link = el("a");
  link.href = src;
  link.download = `${job.model}-${seed}.png`;
  link.title = "Download the PNG (its parameters are embedded)";
  const img = el("img", "result");
  img.alt = `${job.model}: ${prompt || "(no prompt)"}, seed ${seed}`;
  img.addEventListener("load", () => {  // a whole-number zoom keeps the pixels square
    const zoom = Math.max(1, Math.floor(192 / Math.max(img.naturalWidth, img.naturalHeight)));
    img.style.width = img.naturalWidth * zoom + "px";
  });
  img.src = src;
  link.append(img);
  const dl = el("dl");
  const rows = [["prompt", prompt || "(none)"]];
  if (p.negative_prompt) rows.push(["negative", p.negative_prompt]);
  rows.push(["model", job.model], ["seed", seed], ["steps", p.steps], ["cfg", p.cfg], ["sampler", p.sampler]);
  if (job.created) {
    const made = new Date(job.created * 1000);
    const today = made.toDateString() === new Date().toDateString();
    rows.push(["made", today ? made.toLocaleTimeString() : made.toLocaleString()]);
  }
  for (const [k, v] of rows) dl.append(el("dt", "", k), el("dd", "", v === undefined ? "" : v));
  const caption = el("figcaption");
  caption.append(dl);
  fig.append(link, caption);
  return fig;
}

// --- start ------------------------------------------------------------------------------------------------------
if (sessionStorage.getItem(KEY)) signIn(); else $("key").focus();
