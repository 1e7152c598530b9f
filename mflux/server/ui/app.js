// mflux's web page: a form over POST /mflux/v1/generate (server-sent events), with no other origin.
// Seeds stay strings from the form to the server and back: JavaScript numbers lose digits above 2**53.
"use strict";

const $ = (id) => document.getElementById(id);
let currentJob = null;
let streamAbort = null;

async function api(path, options = {}) {
  const response = await fetch(path, options);
  if (response.status === 401) {
    location.reload(); // the page asks for the key again
    throw new Error("the API key was refused");
  }
  if (!response.ok) {
    const body = await response.json().catch(() => ({}));
    throw new Error(body.error?.message || body.detail || `HTTP ${response.status}`);
  }
  return response;
}

async function loadChoices() {
  const [models, loras, health] = await Promise.all([
    api("/v1/models").then((r) => r.json()),
    api("/sdapi/v1/loras").then((r) => r.json()),
    fetch("/health").then((r) => r.json()), // a 503 (the default model did not load) still lists the others
  ]);
  const select = $("model");
  for (const m of models.data) select.add(new Option(m.id, m.id));
  select.value = health.model || health.default_model || (models.data[0] || {}).id || "";
  showStatus(health);
  const box = $("loras");
  $("no_loras").hidden = loras.length > 0;
  for (const lora of loras) {
    const row = document.createElement("div");
    row.className = "lora";
    row.innerHTML = `<label class="check"><input type="checkbox" data-lora></label>
      <input type="number" step="0.05" value="1.0" title="scale">`;
    row.querySelector("[data-lora]").dataset.lora = lora.name;
    row.querySelector("label").append(" " + lora.name);
    box.append(row);
  }
}

// The header: the server's state as /health gives it, for every client's jobs, not just this page's.
function showStatus(health) {
  const running = health.workers.filter((w) => w.state === "busy").length;
  $("status").textContent = `backend ${health.backend || "starting"} · ${running} running · ${health.queue} queued`;
}

function refreshStatus() {
  api("/health").then((r) => r.json()).then(showStatus).catch(() => {});
}

function number(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function settingsFromForm() {
  const loras = [...document.querySelectorAll("[data-lora]")]
    .filter((box) => box.checked)
    .map((box) => ({ name: box.dataset.lora, scale: Number(box.closest(".lora").querySelector("input[type=number]").value) }));
  const seed = $("random_seed").checked ? "" : $("seed").value.trim();
  const body = {
    prompt: $("prompt").value,
    negative_prompt: $("negative_prompt").value,
    model: $("model").value || null,
    width: number("width"),
    height: number("height"),
    steps: number("steps"),
    guidance: number("guidance"),
    seed,
    count: number("count") || 1,
    loras,
    previews: true,
  };
  if ($("init_preview").src && !$("init_preview").hidden) {
    body.image = $("init_preview").src;
    body.strength = number("strength");
  }
  return body;
}

async function generate(event) {
  event.preventDefault();
  const body = settingsFromForm();
  $("generate").disabled = true;
  $("cancel").disabled = false;
  $("progress").value = 0;
  message("queued…");
  streamAbort = new AbortController();
  try {
    const response = await api("/mflux/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: streamAbort.signal,
    });
    await readEvents(response, onEvent);
  } catch (e) {
    if (e.name !== "AbortError") message(e.message, true);
  } finally {
    currentJob = null;
    $("generate").disabled = false;
    $("cancel").disabled = true;
  }
}

function onEvent(type, data) {
  if (type === "queued") {
    currentJob = data.job_id;
  } else if (type === "position") {
    message(`queued, position ${data.position}`);
    refreshStatus();
  } else if (type === "started") {
    message("running…");
    refreshStatus();
  } else if (type === "step") {
    $("progress").value = data.step / data.total;
    message(`step ${data.step} of ${data.total}`);
    if (data.preview) {
      $("preview").src = "data:image/png;base64," + data.preview;
      $("preview").hidden = false;
    }
  } else if (type === "image") {
    addResult(data);
  } else if (type === "end") {
    refreshStatus();
    $("preview").hidden = true;
    if (data.status === "ok") {
      $("progress").value = 1;
      message("done");
    } else if (data.status === "cancelled") {
      message("cancelled");
    } else {
      message(data.error || data.status, true);
    }
  }
}

// Server-sent events from a fetch body (EventSource cannot POST): blocks separated by a blank line.
async function readEvents(response, handle) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let type = "message", data = "";
      for (const line of block.split("\n")) {
        if (line.startsWith("event: ")) type = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      handle(type, JSON.parse(data));
    }
  }
}

function addResult(data) {
  const item = $("result").content.firstElementChild.cloneNode(true);
  const url = "data:image/png;base64," + data.png;
  const img = item.querySelector("img");
  img.src = url;
  img.dataset.seed = data.seed;
  const s = data.settings;
  item.querySelector("figcaption").textContent =
    `${s.prompt}\nseed ${data.seed} · ${s.width}x${s.height} · ${s.steps} steps · ${s.model}` +
    (s.guidance != null ? ` · guidance ${s.guidance}` : "");
  const link = item.querySelector(".download");
  link.href = url;
  link.download = `mflux-${data.seed}.png`;
  item.querySelector(".reuse").addEventListener("click", () => applySettings({ ...s, seed: data.seed }));
  $("gallery").prepend(item);
}

function applySettings(s) {
  const set = (id, v) => { if (v !== undefined && v !== null) $(id).value = String(v); };
  set("prompt", s.prompt);
  set("negative_prompt", s.negative_prompt ?? "");
  set("width", s.width);
  set("height", s.height);
  set("steps", s.steps);
  set("guidance", s.guidance);
  if (s.model && [...$("model").options].some((o) => o.value === s.model)) $("model").value = s.model;
  if (s.seed !== undefined && s.seed !== null && s.seed !== "") {
    $("seed").value = String(s.seed);
    $("random_seed").checked = false;
  }
  const names = (s.lora_paths || []).map((p) => p.split(/[\\/]/).pop().replace(/\.safetensors$/, ""));
  for (const box of document.querySelectorAll("[data-lora]")) {
    const i = names.indexOf(box.dataset.lora);
    box.checked = i >= 0;
    if (i >= 0 && s.lora_scales) box.closest(".lora").querySelector("input[type=number]").value = s.lora_scales[i];
  }
  message("settings loaded");
}

// PNG text chunks (tEXt, iTXt) of a dropped file: mflux's `mflux` JSON, else A1111's `parameters`.
function pngText(bytes) {
  const view = new DataView(bytes.buffer);
  const latin1 = new TextDecoder("latin1"), utf8 = new TextDecoder();
  const out = {};
  for (let at = 8; at + 8 <= bytes.length;) {
    const length = view.getUint32(at);
    const type = latin1.decode(bytes.subarray(at + 4, at + 8));
    const data = bytes.subarray(at + 8, at + 8 + length);
    const zero = data.indexOf(0);
    if (type === "tEXt" && zero > 0) {
      out[latin1.decode(data.subarray(0, zero))] = latin1.decode(data.subarray(zero + 1));
    } else if (type === "iTXt" && zero > 0 && data[zero + 1] === 0) {
      // keyword, 0, compression flag 0, method, language tag, 0, translated keyword, 0, text
      let p = zero + 3;
      p = data.indexOf(0, p) + 1;
      p = data.indexOf(0, p) + 1;
      out[latin1.decode(data.subarray(0, zero))] = utf8.decode(data.subarray(p));
    }
    at += 12 + length;
  }
  return out;
}

function a1111Settings(text) {
  const lines = text.trim().split("\n");
  const last = lines.pop();
  const fields = {};
  for (const m of last.matchAll(/\s*([\w ]+):\s*("(?:\\.|[^"])*"|[^,]*)(?:,|$)/g)) fields[m[1].trim()] = m[2].trim();
  let negative = "";
  const negAt = lines.findIndex((l) => l.startsWith("Negative prompt:"));
  if (negAt >= 0) negative = lines.splice(negAt).join("\n").slice("Negative prompt:".length).trim();
  const [w, h] = (fields.Size || "").split("x");
  return {
    prompt: lines.join("\n"),
    negative_prompt: negative,
    steps: fields.Steps,
    seed: fields.Seed,
    width: w,
    height: h,
    guidance: fields["Distilled CFG Scale"] ?? fields.Guidance,
    model: fields.Model,
  };
}

async function dropped(event) {
  event.preventDefault();
  document.body.classList.remove("dragging");
  const file = event.dataTransfer.files[0];
  if (!file) return;
  const bytes = new Uint8Array(await file.arrayBuffer());
  const text = pngText(bytes);
  if (text.mflux) {
    const s = JSON.parse(text.mflux);
    // the seed as the file's digits, never through a JavaScript number
    const seed = /"seed":\s*(\d+)/.exec(text.mflux);
    applySettings({ ...s, seed: seed ? seed[1] : s.seed });
  } else if (text.parameters) {
    applySettings(a1111Settings(text.parameters));
  } else {
    message(`${file.name} has no mflux or A1111 settings`, true);
  }
}

function message(text, error = false) {
  $("message").textContent = text;
  $("message").className = error ? "error" : "";
}

$("form").addEventListener("submit", generate);
// Cancel by job id (queued or running); before the id has arrived, closing the stream cancels it too.
$("cancel").addEventListener("click", async () => {
  if (currentJob) await api(`/mflux/v1/jobs/${currentJob}`, { method: "DELETE" }).catch(() => {});
  else if (streamAbort) streamAbort.abort();
  message("cancelled");
});
$("random_seed").addEventListener("change", () => { if (!$("random_seed").checked) $("seed").focus(); });
$("seed").addEventListener("input", () => { $("random_seed").checked = $("seed").value.trim() === ""; });
$("init_image").addEventListener("change", () => {
  const file = $("init_image").files[0];
  if (!file) { $("init_preview").hidden = true; return; }
  const reader = new FileReader();
  reader.onload = () => { $("init_preview").src = reader.result; $("init_preview").hidden = false; };
  reader.readAsDataURL(file);
});
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", dropped);
loadChoices().catch((e) => message(e.message, true));
setInterval(refreshStatus, 5000); // other clients' jobs come and go too
