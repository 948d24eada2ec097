// Calls to the API: paths relative to the page (it works behind a path prefix), the API key
// (localStorage) sent as X-API-Key, errors turned into Error objects with the problem's detail.

const KEY = "hsc.apiKey";

export function getKey() {
  try {
    return localStorage.getItem(KEY) || "";
  } catch {
    return "";
  }
}

export function setKey(value) {
  try {
    if (value) localStorage.setItem(KEY, value);
    else localStorage.removeItem(KEY);
  } catch {
    // private mode: the key lives for this page only
  }
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(describe(status, problem));
    this.status = status;
    this.problem = problem || {};
  }
}

function describe(status, p) {
  if (!p || typeof p !== "object") return `HTTP ${status}`;
  let text = p.detail || p.title || `HTTP ${status}`;
  if (Array.isArray(p.valid_classes) && !String(text).includes(p.valid_classes[0])) {
    text += ` (valid classes: ${p.valid_classes.join(", ")})`;
  }
  return p.code ? `${text} [${p.code}]` : text;
}

function withKey(headers = {}) {
  const key = getKey();
  return key ? { ...headers, "X-API-Key": key } : headers;
}

export async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: withKey(options.headers) });
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json().catch(() => null) : null;
  if (!response.ok) throw new ApiError(response.status, body);
  return body;
}

// A download that needs the key: fetch it, then save the blob under the server's file name.
export async function download(path, fallbackName) {
  const response = await fetch(path, { headers: withKey() });
  if (!response.ok) {
    const body = await response.json().catch(() => null);
    throw new ApiError(response.status, body);
  }
  const disposition = response.headers.get("content-disposition") || "";
  const match = /filename="?([^";]+)"?/.exec(disposition);
  const url = URL.createObjectURL(await response.blob());
  const a = document.createElement("a");
  a.href = url;
  a.download = match ? match[1] : fallbackName;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}
