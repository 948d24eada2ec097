// Start-up: the API key form, the model list, the viewer and the jobs panel.

import { getKey, setKey } from "./api.js";
import { initJobs, refreshJobs } from "./jobs.js";
import { initViewer, loadModels } from "./viewer.js";

const $ = (id) => document.getElementById(id);

function notice(message) {
  $("notice").textContent = message || "";
  $("notice").hidden = !message;
}

async function load() {
  try {
    await loadModels();
    notice("");
  } catch (e) {
    if (e.status === 401) {
      notice("This server needs an API key: type it above and press Save.");
      $("api-key").focus();
    } else {
      notice(`The models could not be listed: ${e.message}`);
    }
  }
  await refreshJobs();
}

$("api-key").value = getKey();
$("key-form").addEventListener("submit", (e) => {
  e.preventDefault();
  setKey($("api-key").value.trim());
  load();
});
initViewer();
initJobs();
load();
