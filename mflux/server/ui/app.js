// mflux's web page: a form over POST /mflux/v1/generate (server-sent events), with no other origin.
// Seeds stay strings from the form to the server and back: JavaScript numbers lose digits above 2**53.
"use strict";

const $ = (id) => document.getElementById(id);
let currentJob = null;
let streamAbort = null;
let currentOriginal = null; // the image the running job edits, shown beside its results
const variants = {}; // model name -> its variant, from /v1/models' "mflux" object

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
  for (const m of models.data) {
    select.add(new Option(m.id, m.id));
    variants[m.id] = m.mflux ? m.mflux.variant : "";
  }
  select.value = health.model || health.default_model || (models.data[0] || {}).id || "";
  setMode();
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
    if (mode() !== "kontext") {
      body.strength = number("strength");
      const mask = maskDataUrl();
      if (mask) body.mask = mask;
    }
  }
  return body;
}

// What the chosen model does with the image: "kontext" edits it by the prompt's instruction, "fill"
// repaints the painted mask, anything else is img2img, or inpainting where a mask is painted.
function mode() {
  const variant = variants[$("model").value];
  return variant === "kontext" || variant === "fill" ? variant : "text";
}

const MODES = {
  kontext: ["Edit by instruction (kontext): the reference image",
    "The prompt says what to change (\"make it a snowy evening\"). Width and height left empty: the reference's aspect."],
  fill: ["Inpaint (fill): paint what to repaint", "Paint over the area to repaint; fill needs a mask."],
  text: ["Image: img2img, or paint a mask to inpaint", "Without a mask: img2img at the strength."],
};

let shownMode = null;

function setMode() {
  const m = mode();
  [$("image_legend").textContent, $("image_hint").textContent] = MODES[m];
  $("mask_tools").hidden = m === "kontext";
  $("mask_canvas").hidden = m === "kontext" || $("init_preview").hidden;
  $("strength_label").hidden = m === "kontext";
  if (m !== shownMode) $("strength").value = m === "fill" ? "1" : "0.6"; // each mode's own default
  shownMode = m;
  for (const id of ["width", "height"]) { // kontext picks its size from the reference when these are empty
    $(id).placeholder = m === "kontext" ? "from the reference" : "";
    if (m === "kontext" && $(id).value === "1024") $(id).value = "";
    if (m !== "kontext" && $(id).value === "") $(id).value = "1024";
  }
}

// The mask painter: strokes on a canvas of the image's own pixel size, laid over the image. The mask sent
// is white where painted (the stroke's opacity), black elsewhere; none when nothing is painted.
let stroking = null;

function canvasPoint(event) {
  const canvas = $("mask_canvas"), box = canvas.getBoundingClientRect();
  return { x: (event.clientX - box.left) * canvas.width / box.width, y: (event.clientY - box.top) * canvas.height / box.height };
}

function paint(from, to) {
  const ctx = $("mask_canvas").getContext("2d");
  ctx.globalCompositeOperation = $("tool_eraser").checked ? "destination-out" : "source-over";
  ctx.strokeStyle = "rgb(255, 40, 90)";
  ctx.lineWidth = number("brush_size") || 16;
  ctx.lineCap = ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.moveTo(from.x, from.y);
  ctx.lineTo(to.x, to.y);
  ctx.stroke();
}

function clearMask() {
  const canvas = $("mask_canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
}

function maskDataUrl() {
  const canvas = $("mask_canvas");
  if (!canvas.width || !canvas.height) return null;
  const painted = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  const out = new ImageData(canvas.width, canvas.height);
  let any = false;
  for (let i = 0; i < painted.length; i += 4) {
    const alpha = painted[i + 3];
    out.data[i] = out.data[i + 1] = out.data[i + 2] = alpha;
    out.data[i + 3] = 255;
    any ||= alpha >= 128; // the server repaints where the mask is at least half white
  }
  if (!any) return null;
  const flat = document.createElement("canvas");
  [flat.width, flat.height] = [canvas.width, canvas.height];
  flat.getContext("2d").putImageData(out, 0, 0);
  return flat.toDataURL("image/png");
}

function showImage(url) {
  const img = $("init_preview"), canvas = $("mask_canvas");
  if (!url) {
    img.hidden = canvas.hidden = true;
    img.removeAttribute("src");
    [canvas.width, canvas.height] = [0, 0];
    return;
  }
  img.onload = () => {
    [canvas.width, canvas.height] = [img.naturalWidth, img.naturalHeight]; // a new size clears it too
    img.hidden = false;
    canvas.hidden = mode() === "kontext";
  };
  img.src = url;
}

async function generate(event) {
  event.preventDefault();
  const body = settingsFromForm();
  currentOriginal = body.image || null;
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
  const img = item.querySelector("img.image");
  img.src = url;
  img.dataset.seed = data.seed;
  if (currentOriginal) { // an edit: the original on its left
    const original = document.createElement("img");
    original.className = "original";
    original.alt = original.title = "original";
    original.src = currentOriginal;
    item.classList.add("edit");
    img.after(original);
  }
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
  if (!file) { showImage(null); return; }
  const reader = new FileReader();
  reader.onload = () => showImage(reader.result);
  reader.readAsDataURL(file);
});
$("model").addEventListener("change", setMode);
$("clear_mask").addEventListener("click", clearMask);
$("mask_canvas").addEventListener("pointerdown", (e) => {
  $("mask_canvas").setPointerCapture(e.pointerId);
  stroking = canvasPoint(e);
  paint(stroking, stroking);
});
$("mask_canvas").addEventListener("pointermove", (e) => {
  if (!stroking) return;
  const to = canvasPoint(e);
  paint(stroking, to);
  stroking = to;
});
for (const end of ["pointerup", "pointercancel"]) $("mask_canvas").addEventListener(end, () => { stroking = null; });
document.addEventListener("dragover", (e) => { e.preventDefault(); document.body.classList.add("dragging"); });
document.addEventListener("dragleave", () => document.body.classList.remove("dragging"));
document.addEventListener("drop", dropped);
loadChoices().catch((e) => message(e.message, true));
setInterval(refreshStatus, 5000); // other clients' jobs come and go too
