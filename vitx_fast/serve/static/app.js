// vitx-fast web page: upload an image, pick methods and a class, draw each method's map over the image.
"use strict";
const $ = (id) => document.getElementById(id);
const state = { file: null, image: null, model: null, target: null };

// jet colour map (the same as the overlays of `vitx explain`): value in [0, 1] -> [r, g, b]
function jet(v) {
  const f = (x) => Math.max(0, Math.min(1, x));
  return [f(1.5 - Math.abs(4 * v - 3)), f(1.5 - Math.abs(4 * v - 2)), f(1.5 - Math.abs(4 * v - 1))].map((c) => Math.round(255 * c));
}

function drawColorbar() {
  const c = $("bar"), ctx = c.getContext("2d");
  for (let x = 0; x < c.width; x++) { const [r, g, b] = jet(x / (c.width - 1)); ctx.fillStyle = `rgb(${r},${g},${b})`; ctx.fillRect(x, 0, 1, c.height); }
}

function status(text, error = false) { $("status").textContent = text; $("status").className = error ? "error" : ""; }

async function loadModel() {
  const r = await fetch("/v1/models");
  const m = (await r.json()).models[0];
  state.model = m;
  $("model-info").textContent = `${m.name} (${m.model_id}) · ${m.num_classes} classes · grid ${m.layout.grid.join("×")}`;
  const box = $("methods");
  for (const [name, info] of Object.entries(m.methods)) {
    const label = document.createElement("label");
    const cb = document.createElement("input");
    cb.type = "checkbox"; cb.value = name; cb.disabled = !info.available;
    cb.checked = info.available && ["reciprocam", "agcam", "gae", "rollout"].includes(name);
    label.title = info.available ? info.summary : info.reasons.join("; ");
    label.append(cb, " " + name + (info.available ? "" : " (unavailable)"));
    box.append(label);
  }
}

function chosenMethods() { return [...document.querySelectorAll("#methods input:checked")].map((c) => c.value); }

async function explain(method, target) {
  const form = new FormData();
  form.append("image", state.file);
  form.append("method", method);
  if (target !== null) form.append("target", String(target));
  const r = await fetch("/v1/explain", { method: "POST", body: form });
  const body = await r.json();
  if (!r.ok) throw new Error(`${method}: ${body.error ? body.error.message : r.status}`);
  return body;
}

function showPredictions(preds) {
  const list = $("predictions");
  list.replaceChildren();
  for (const p of preds) {
    const li = document.createElement("li");
    li.textContent = `${p.label} — ${(100 * p.probability).toFixed(1)} %`;
    li.dataset.cls = p.class;
    if (state.target === p.class) li.className = "chosen";
    li.onclick = () => { state.target = p.class; showPredictions(preds); run(); };
    list.append(li);
  }
}

function drawOverlay(result) {
  const size = 224, map = result.maps[0], h = map.length, w = map[0].length;
  let lo = Infinity, hi = -Infinity;
  for (const row of map) for (const v of row) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  const heat = document.createElement("canvas"); heat.width = w; heat.height = h;
  const hctx = heat.getContext("2d"), img = hctx.createImageData(w, h);
  for (let i = 0; i < h; i++) for (let j = 0; j < w; j++) {
    const [r, g, b] = jet(hi > lo ? (map[i][j] - lo) / (hi - lo) : 0), k = 4 * (i * w + j);
    img.data[k] = r; img.data[k + 1] = g; img.data[k + 2] = b; img.data[k + 3] = 255;
  }
  hctx.putImageData(img, 0, 0);
  const canvas = document.createElement("canvas"); canvas.width = size; canvas.height = size;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(state.image, 0, 0, size, size);
  ctx.globalAlpha = 0.5; ctx.imageSmoothingEnabled = true; ctx.drawImage(heat, 0, 0, size, size); ctx.globalAlpha = 1;
  const fig = document.createElement("figure"); fig.className = "overlay"; fig.dataset.method = result.method;
  const cap = document.createElement("figcaption");
  const link = document.createElement("a");
  link.textContent = "maps.json"; link.download = `${result.method}_class${result.targets[0]}.json`;
  link.href = URL.createObjectURL(new Blob([JSON.stringify({ method: result.method, targets: result.targets, maps: result.maps })], { type: "application/json" }));
  const s = result.scores[0];
  cap.append(`${result.method} · class ${result.targets[0]}${s.probability !== null ? ` (${(100 * s.probability).toFixed(1)} %)` : ""}`, link);
  fig.append(canvas, cap);
  return fig;
}

async function run() {
  if (!state.file) return;
  const methods = chosenMethods();
  if (!methods.length) { status("pick at least one method", true); return; }
  status(`explaining with ${methods.join(", ")}…`);
  $("run").disabled = true;
  const t0 = performance.now();
  try {
    const results = await Promise.all(methods.map((m) => explain(m, state.target)));
    if (state.target === null && results[0].predictions.length) state.target = results[0].predictions[0].class;
    showPredictions(results[0].predictions);
    $("overlays").replaceChildren(...results.map(drawOverlay));
    const batches = results.map((r) => r.timings.batch_size).join(", ");
    status(`done in ${((performance.now() - t0) / 1000).toFixed(2)} s (batch sizes ${batches})`);
  } catch (e) { status(String(e.message || e), true); }
  $("run").disabled = false;
}

function useFile(file) {
  if (!file) return;
  state.file = file; state.target = null;
  const url = URL.createObjectURL(file), img = new Image();
  img.onload = () => { state.image = img; $("preview").src = url; $("preview").hidden = false; $("drop-text").hidden = true; $("run").disabled = false; run(); };
  img.onerror = () => status("the browser cannot show this file as an image", true);
  img.src = url;
}

$("file").onchange = (e) => useFile(e.target.files[0]);
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over"); useFile(e.dataTransfer.files[0]); };
$("run").onclick = run;
drawColorbar();
loadModel().catch((e) => status(`cannot reach the service: ${e}`, true));
