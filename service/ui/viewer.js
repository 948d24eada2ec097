// The one-image form (model, classes, image, options) and the result (overlay, legend, heatmaps).

import { api } from "./api.js";

const $ = (id) => document.getElementById(id);
let models = [];
let imageUrl = null;
let imageName = "image";

// The PASCAL VOC colour of label i: bits 0/1/2 of i feed red/green/blue, from the top bit down.
export function vocColour(i) {
  const rgb = [0, 0, 0];
  for (let j = 0, c = i; j < 8; j++, c >>= 3) {
    for (let ch = 0; ch < 3; ch++) rgb[ch] |= ((c >> ch) & 1) << (7 - j);
  }
  return rgb;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

export async function loadModels() {
  const data = await api("models");
  models = data.models || [];
  const select = $("model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.id, textContent: m.id })));
  select.value = data.default || (models[0] && models[0].id) || "";
  showClasses();
}

function currentModel() {
  return models.find((m) => m.id === $("model").value);
}

function showClasses() {
  const model = currentModel();
  const names = model ? model.classes.slice(1) : [];
  $("chips").replaceChildren(
    ...names.map((name, i) => {
      const chip = el("button", { type: "button", className: "chip", textContent: name });
      chip.dataset.name = name;
      chip.setAttribute("aria-pressed", "false");
      const [r, g, b] = vocColour(i + 1);
      chip.style.setProperty("--swatch", `rgb(${r} ${g} ${b})`);
      chip.addEventListener("click", () => {
        const on = chip.getAttribute("aria-pressed") !== "true";
        chip.setAttribute("aria-pressed", String(on));
      });
      return chip;
    }),
  );
  $("bg").placeholder = model && model.bg_threshold != null ? `model default (${model.bg_threshold})` : "model default";
  syncAuto();
}

function syncAuto() {
  const auto = $("auto").checked;
  $("auto-opts").hidden = !auto;
  for (const chip of $("chips").children) chip.disabled = auto;
}

function chosenLabels() {
  if ($("auto").checked) return "auto";
  return [...$("chips").children].filter((c) => c.getAttribute("aria-pressed") === "true").map((c) => c.dataset.name);
}

function setFile(file) {
  imageUrl = file ? URL.createObjectURL(file) : null;
  imageName = file ? file.name : "image";
  $("drop").querySelector(".hint").textContent = file ? `${file.name} (${Math.ceil(file.size / 1024)} KiB)` : "or drop an image here";
}

function showError(message) {
  const box = $("run-error");
  box.textContent = message || "";
  box.hidden = !message;
}

async function run(event) {
  event.preventDefault();
  showError("");
  const file = $("image").files[0];
  const labels = chosenLabels();
  if (!file) return showError("Choose an image first.");
  if (labels !== "auto" && !labels.length) return showError("Choose at least one class (or auto).");
  const form = new FormData();
  form.append("image", file, file.name);
  form.append("labels", labels === "auto" ? "auto" : labels.join(","));
  form.append("model", $("model").value);
  form.append("crf", $("crf").checked ? "true" : "false");
  form.append("outputs", "heatmaps");
  if ($("bg").value !== "") form.append("bg_threshold", $("bg").value);
  if (labels === "auto") form.append("label_threshold", $("label-threshold").value || "0.5");
  const shown = { url: imageUrl, name: imageName }; // the file may change while it runs
  const button = $("run");
  button.disabled = true;
  button.textContent = "Running…";
  try {
    const result = await api("pseudo-label", { method: "POST", body: form, headers: { Accept: "application/json" } });
    await showResult(result, shown);
  } catch (e) {
    showError(e.message);
    if (e.status === 401) $("api-key").focus();
  } finally {
    button.disabled = false;
    button.textContent = "Run";
  }
}

// The palette mask with its background made transparent, as a PNG data URL.
function transparentMask(b64) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => {
      const canvas = el("canvas", { width: img.naturalWidth, height: img.naturalHeight });
      const ctx = canvas.getContext("2d");
      ctx.drawImage(img, 0, 0);
      const data = ctx.getImageData(0, 0, canvas.width, canvas.height);
      const px = data.data;
      for (let i = 0; i < px.length; i += 4) if (!px[i] && !px[i + 1] && !px[i + 2]) px[i + 3] = 0;
      ctx.putImageData(data, 0, 0);
      resolve(canvas.toDataURL("image/png"));
    };
    img.onerror = () => reject(new Error("the mask PNG could not be decoded"));
    img.src = `data:image/png;base64,${b64}`;
  });
}

function applyOpacity() {
  const value = String($("opacity").value / 100);
  $("overlay").style.opacity = value;
  $("heat").style.opacity = value;
}

function toggleHeatmap(button, heatmaps) {
  const on = button.getAttribute("aria-pressed") !== "true";
  for (const b of $("legend").querySelectorAll("button[aria-pressed]")) {
    b.setAttribute("aria-pressed", "false");
    b.textContent = "show";
  }
  button.setAttribute("aria-pressed", String(on));
  button.textContent = on ? "hide" : "show";
  const heat = $("heat");
  heat.hidden = !on;
  $("overlay").hidden = on;
  heat.alt = on ? `heatmap of ${button.dataset.name}` : "";
  if (on) heat.src = `data:image/png;base64,${heatmaps[button.dataset.name].png}`;
}

function pct(x) {
  return x == null ? "–" : `${(100 * x).toFixed(1)} %`;
}

function fillList(dl, entries) {
  dl.replaceChildren(...entries.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]));
}

async function showResult(r, shown) {
  const old = $("base").src;
  if (old.startsWith("blob:") && old !== shown.url) URL.revokeObjectURL(old);
  $("base").src = shown.url;
  $("overlay").src = await transparentMask(r.mask.data);
  $("overlay").hidden = false;
  $("heat").hidden = true;
  applyOpacity();
  const heatmaps = r.heatmaps || {};
  $("legend").replaceChildren(
    ...(r.classes || []).map((c) => {
      const [red, g, b] = vocColour(c.index);
      const swatch = el("span", { className: "swatch" });
      swatch.style.background = `rgb(${red} ${g} ${b})`;
      let toggle = "–";
      if (heatmaps[c.name]) {
        toggle = el("button", { type: "button", className: "toggle", textContent: "show" });
        toggle.dataset.name = c.name;
        toggle.setAttribute("aria-pressed", "false");
        toggle.setAttribute("aria-label", `heatmap of ${c.name}`);
        toggle.addEventListener("click", () => toggleHeatmap(toggle, heatmaps));
      }
      return el(
        "tr",
        {},
        el("th", { scope: "row" }, swatch, ` ${c.name}`),
        el("td", { textContent: pct(c.fraction) }),
        el("td", { textContent: c.mean_confidence == null ? "–" : c.mean_confidence.toFixed(3) }),
        el("td", {}, toggle),
      );
    }),
  );
  $("download-mask").href = `data:image/png;base64,${r.mask.data}`;
  $("download-mask").download = `${shown.name.replace(/\.[^.]*$/, "") || "image"}_mask.png`;
  $("warnings").replaceChildren(...(r.warnings || []).map((w) => el("li", { textContent: w })));
  const labels = r.labels || {};
  const facts = [
    ["model", `${r.model.id}@${String(r.model.sha256 || "").slice(0, 12)}`],
    ["image", `${r.image.width} × ${r.image.height} ${r.image.format || ""}`],
    ["classes", `${(r.classes || []).map((c) => c.name).join(", ")} (${labels.source || "given"})`],
    ["quality", r.quality == null ? "–" : r.quality.toFixed(3)],
    ...(labels.classifier_scores ? [["classifier scores", JSON.stringify(labels.classifier_scores)]] : []),
    ...Object.entries(r.settings || {}).map(([k, v]) => [k, typeof v === "object" ? JSON.stringify(v) : String(v)]),
  ];
  fillList($("settings"), facts);
  fillList($("timings"), Object.entries(r.timings_ms || {}).map(([k, v]) => [k, String(v)]));
  $("result").hidden = false;
  $("result").scrollIntoView({ behavior: "smooth", block: "start" });
}

export function initViewer() {
  $("model").addEventListener("change", showClasses);
  $("auto").addEventListener("change", syncAuto);
  $("image").addEventListener("change", () => setFile($("image").files[0]));
  $("opacity").addEventListener("input", applyOpacity);
  $("run-form").addEventListener("submit", run);
  const drop = $("drop");
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (e) => {
      e.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) drop.addEventListener(type, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (!file) return;
    $("image").files = e.dataTransfer.files;
    setFile(file);
  });
}
