// The jobs panel: GET /jobs with progress bars, cancel, archive downloads. Polls every 2 s while a
// job is active, every 15 s otherwise (and not while the tab is hidden).

import { api, download } from "./api.js";

const ACTIVE = new Set(["queued", "running", "cancelling"]);
const FORMATS = ["voc", "coco", "labelstudio", "cvat-segmask", "raw"];
const FAST_MS = 2000;
const SLOW_MS = 15000;
let timer = null;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

function showError(message) {
  $("jobs-error").textContent = message || "";
  $("jobs-error").hidden = !message;
}

function archiveLinks(job) {
  return el(
    "p",
    { className: "downloads" },
    "Download: ",
    ...FORMATS.map((format) => {
      const path = `jobs/${encodeURIComponent(job.id)}/archive?format=${format}`;
      const a = el("a", { href: path, textContent: format });
      a.setAttribute("download", "");
      a.addEventListener("click", (e) => {
        e.preventDefault(); // fetched so that the API key goes along
        download(path, `${job.id}-${format}.zip`).catch((err) => showError(err.message));
      });
      return a;
    }),
  );
}

function jobRow(job) {
  const p = job.progress || {};
  const percent = Math.round(p.percent ?? (p.total ? (100 * (p.done || 0)) / p.total : 0));
  const bar = el("progress", { max: 100, value: percent });
  bar.setAttribute("aria-label", `progress of ${job.id}`);
  const counts = `${p.done ?? 0}/${p.total ?? "?"} done` + (p.failed ? `, ${p.failed} failed` : "");
  const row = el(
    "li",
    { className: `job status-${job.status}` },
    el(
      "div",
      { className: "job-head" },
      el("code", { textContent: job.id }),
      el("span", { className: "badge", textContent: job.status }),
      el("span", { className: "muted", textContent: job.model || "" }),
    ),
    el("div", { className: "job-progress" }, bar, el("span", { textContent: `${percent} % · ${counts}` })),
  );
  row.dataset.id = job.id;
  if (ACTIVE.has(job.status) && job.status !== "cancelling") {
    const cancel = el("button", { type: "button", textContent: "Cancel" });
    cancel.setAttribute("aria-label", `cancel ${job.id}`);
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      try {
        await api(`jobs/${encodeURIComponent(job.id)}`, { method: "DELETE" });
        await refreshJobs();
      } catch (err) {
        showError(err.message);
        cancel.disabled = false;
      }
    });
    row.append(cancel);
  }
  if (job.finished) row.append(archiveLinks(job));
  return row;
}

export async function refreshJobs() {
  clearTimeout(timer);
  let active = false;
  try {
    const data = await api("jobs?limit=20");
    const jobs = data.jobs || [];
    active = jobs.some((j) => ACTIVE.has(j.status));
    $("jobs").replaceChildren(...(jobs.length ? jobs.map(jobRow) : [el("li", { className: "muted", textContent: "No jobs yet." })]));
    showError("");
  } catch (err) {
    showError(err.message);
  }
  timer = setTimeout(tick, active ? FAST_MS : SLOW_MS);
}

function tick() {
  if (document.visibilityState === "hidden") timer = setTimeout(tick, FAST_MS);
  else refreshJobs();
}

export function initJobs() {
  $("jobs-refresh").addEventListener("click", refreshJobs);
}
