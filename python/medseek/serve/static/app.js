// medseek viewer: one page over the gateway's JSON API (POST /v1/search, GET /v1/items/{id},
// GET /v1/stats). Every piece of data is put in the page with textContent, never as HTML.
"use strict";

const VOLUME_EXT = [".nii", ".nii.gz", ".zip"];
const TOKEN_KEY = "medseek-token";
const $ = (id) => document.getElementById(id);

// The query of the last search, kept to show beside a clicked hit.
let lastQuery = null;

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

class ApiError extends Error {
  constructor(status, code, message) {
    super(`${code}: ${message}`);
    this.status = status;
    this.code = code;
  }
}

async function api(method, path, body) {
  const headers = {};
  const token = $("token").value.trim();
  if (token) headers["Authorization"] = `Bearer ${token}`;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  let resp;
  try {
    resp = await fetch(path, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
  } catch (err) {
    throw new ApiError(0, "UNAVAILABLE", `the gateway cannot be reached (${err.message})`);
  }
  let payload = null;
  try {
    payload = await resp.json();
  } catch (err) {
    throw new ApiError(resp.status, "UNKNOWN", `HTTP ${resp.status} without a JSON answer`);
  }
  if (!resp.ok) throw new ApiError(resp.status, payload.code || "UNKNOWN", payload.message || `HTTP ${resp.status}`);
  return payload;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

// --- the query form -------------------------------------------------------------------

function queryKind() {
  return document.querySelector("input[name=kind]:checked").value;
}

function showKindFields() {
  const kind = queryKind();
  for (const k of ["text", "file", "item"]) {
    document.querySelector(`.when-${k}`).hidden = k !== kind;
  }
}

function list(id) {
  return $(id).value.split(",").map((s) => s.trim()).filter((s) => s.length > 0);
}

function numberOrNull(id) {
  const raw = $(id).value.trim();
  return raw === "" ? null : Number(raw);
}

function fileKind(file) {
  const chosen = $("q-file-kind").value;
  if (chosen !== "auto") return chosen;
  const name = file.name.toLowerCase();
  return VOLUME_EXT.some((ext) => name.endsWith(ext)) ? "volume" : "image";
}

function readBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).split(",", 2)[1] || "");
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

// The region of the form: {name, box, z_range}, or null when nothing is set.
function formRegion() {
  const name = $("region-name").value.trim();
  const box = ["box-x0", "box-y0", "box-x1", "box-y1"].map(numberOrNull);
  const z = ["z0", "z1"].map(numberOrNull);
  const region = {};
  if (name) region.name = name;
  if (box.some((v) => v !== null)) region.box = box;
  if (z.some((v) => v !== null)) region.z_range = z;
  return Object.keys(region).length ? region : null;
}

async function buildRequest() {
  const body = {thumbnails: true, preview: true, thumbnail_size: 160};
  const kind = queryKind();
  let shown = {kind};
  if (kind === "text") {
    body.text = $("q-text").value;
    shown.text = body.text;
  } else if (kind === "file") {
    const file = $("q-file").files[0];
    if (!file) throw new ApiError(0, "INVALID_ARGUMENT", "file: choose an image or volume file first");
    const as = fileKind(file);
    body[as] = await readBase64(file);
    shown = {kind: as, name: file.name};
  } else {
    body.item_id = $("q-item").value.trim();
    shown.item_id = body.item_id;
  }
  const k = numberOrNull("k");
  if (k !== null) body.k = k;
  const collection = $("collection").value;
  if (collection) body.collection = collection;
  const filters = {};
  for (const [key, id] of [["modality", "f-modality"], ["body_part", "f-body-part"],
                           ["view", "f-view"], ["labels_any", "f-labels"]]) {
    const values = list(id);
    if (values.length) filters[key] = values;
  }
  if (Object.keys(filters).length) body.filters = filters;
  if ($("diversify").checked) body.diversify = true;
  const mmr = numberOrNull("mmr");
  if (mmr !== null) body.mmr_lambda = mmr;
  const region = formRegion();
  if (region) body.region = region;
  shown.region = region;
  return {body, shown};
}

async function onSearch(event) {
  event.preventDefault();
  showError("");
  const button = $("search-btn");
  button.disabled = true;
  $("summary").textContent = "searching\u2026";
  try {
    const {body, shown} = await buildRequest();
    const resp = await api("POST", "/v1/search", body);
    shown.preview = resp.query_preview || null;
    lastQuery = shown;
    renderResults(resp);
  } catch (err) {
    $("summary").textContent = "";
    showError(err.message);
  } finally {
    button.disabled = false;
  }
}

// --- pictures with boxes and z-ranges ---------------------------------------------------

// A thumbnail with the box drawn over it (box in the source pixels the thumbnail reports).
function picture(thumb, box, alt) {
  const frame = el("div", "picture");
  if (!thumb) {
    frame.append(el("div", "no-picture", "no picture"));
    return frame;
  }
  const img = el("img");
  img.src = thumb.png;
  img.alt = alt;
  frame.append(img);
  if (box && thumb.width && thumb.height) {
    const [x0, y0, x1, y1] = box;
    const overlay = el("div", "box-overlay");
    overlay.style.left = `${(100 * x0) / thumb.width}%`;
    overlay.style.top = `${(100 * y0) / thumb.height}%`;
    overlay.style.width = `${(100 * Math.max(0, x1 - x0)) / thumb.width}%`;
    overlay.style.height = `${(100 * Math.max(0, y1 - y0)) / thumb.height}%`;
    overlay.title = `box ${box.map((v) => Math.round(v)).join(", ")}`;
    frame.append(overlay);
  }
  if (thumb.source === "metadata") frame.classList.add("card-only");
  return frame;
}

// Slices [z0, z1) as a bar over the volume's depth (when known) with its caption.
function zBar(zRange, thumb) {
  const wrap = el("div", "zrange");
  const depth = thumb && thumb.depth;
  const [z0, z1] = zRange;
  if (depth) {
    const track = el("div", "ztrack");
    const span = el("div", "zspan");
    span.style.left = `${(100 * z0) / depth}%`;
    span.style.width = `${(100 * Math.max(1, z1 - z0)) / depth}%`;
    track.append(span);
    if (thumb.slice !== null && thumb.slice !== undefined) {
      const mark = el("div", "zmark");
      mark.style.left = `${(100 * (thumb.slice + 0.5)) / depth}%`;
      track.append(mark);
    }
    wrap.append(track);
  }
  wrap.append(el("span", "muted", `slices ${z0}\u2013${z1}${depth ? ` of ${depth}` : ""}`));
  return wrap;
}

// The box and z-range that say where a hit matched: its region child's, else its own.
function hitShape(hit, item) {
  const region = hit.region || {};
  return {box: region.box || item.box || null, z: region.z_range || item.z_range || null};
}

// --- results ------------------------------------------------------------------------------

function fmt(x) {
  return x === null || x === undefined ? "\u2013" : Number(x).toFixed(3);
}

function chips(values, className) {
  const row = el("div", "chips");
  for (const v of values) row.append(el("span", className, v));
  return row;
}

function provenance(item) {
  const parts = [];
  if (item.patient_pseudonym) parts.push(`patient ${item.patient_pseudonym}`);
  if (item.study_pseudonym) parts.push(`study ${item.study_pseudonym}`);
  if (item.source_document) parts.push(`source ${item.source_document}`);
  return el("div", "provenance", parts.length ? parts.join(" \u00b7 ") : "no provenance recorded");
}

function hitCard(hit, rank) {
  const item = hit.item;
  const card = el("article", "hit-card");
  card.tabIndex = 0;
  card.dataset.id = hit.id;
  const shape = hitShape(hit, item);
  card.append(picture(hit.thumbnail, shape.box, `hit ${rank}: ${hit.id}`));
  if (shape.z) card.append(zBar(shape.z, hit.thumbnail));
  const head = el("div", "hit-head");
  head.append(el("span", "rank", `#${rank}`), el("span", "score", fmt(hit.score)));
  card.append(head);
  card.append(el("div", "hit-id", hit.id));
  const meta = [item.collection, item.modality, item.body_part, item.view].filter((v) => v);
  card.append(el("div", "muted", meta.join(" \u00b7 ")));
  if (item.labels.length) card.append(chips(item.labels, "label"));
  if (hit.matched_region) {
    const rs = hit.region_score === null ? "" : ` (${fmt(hit.region_score)})`;
    card.append(el("div", "region", `region ${hit.matched_region}${rs}`));
  }
  if (hit.concepts.length) {
    card.append(el("div", "why", "why: " + hit.concepts.map((c) => c.name).join(", ")));
  }
  card.append(provenance(item));
  const open = () => openCompare(hit);
  card.addEventListener("click", open);
  card.addEventListener("keydown", (e) => { if (e.key === "Enter") open(); });
  return card;
}

function renderResults(resp) {
  const results = $("results");
  results.replaceChildren();
  $("compare").hidden = true;
  const total = resp.timings_ms && resp.timings_ms.total;
  let summary = `${resp.hits.length} hits of ${resp.candidates} candidates`;
  if (total !== undefined) summary += `, ${total.toFixed(1)} ms`;
  if (resp.notice) summary += ` \u2014 ${resp.notice}`;
  $("summary").textContent = summary;
  resp.hits.forEach((hit, n) => results.append(hitCard(hit, n + 1)));
}

// --- side by side -------------------------------------------------------------------------

function queryPane(query) {
  const pane = [el("h3", null, "Query")];
  if (query.kind === "text") {
    pane.push(el("blockquote", "query-text", query.text));
  } else {
    const region = query.region || {};
    pane.push(picture(query.preview, region.box || null, "query"));
    if (region.z_range && region.z_range.every((v) => v !== null)) pane.push(zBar(region.z_range, query.preview));
    const what = query.item_id ? `stored item ${query.item_id}` : `${query.kind} ${query.name || ""}`;
    pane.push(el("div", "muted", what));
    if (region.name) pane.push(el("div", "region", `region ${region.name}`));
  }
  return pane;
}

function detailRows(hit, item) {
  const table = el("table", "details");
  const rows = [
    ["id", hit.id], ["score", fmt(hit.score)], ["global score", fmt(hit.global_score)],
    ["region score", fmt(hit.region_score)], ["collection", item.collection],
    ["modality", item.modality], ["body part", item.body_part], ["view", item.view],
    ["labels", item.labels.join(", ")], ["patient", item.patient_pseudonym],
    ["study", item.study_pseudonym], ["source document", item.source_document],
    ["parent", item.parent_id], ["matched region", hit.matched_region],
  ];
  for (const [name, value] of rows) {
    if (value === "" || value === null || value === undefined) continue;
    const tr = el("tr");
    tr.append(el("th", null, name), el("td", null, value));
    table.append(tr);
  }
  return table;
}

function conceptTable(concepts) {
  const table = el("table", "concepts");
  const head = el("tr");
  for (const h of ["concept", "query", "hit", "contribution"]) head.append(el("th", null, h));
  table.append(head);
  for (const c of concepts) {
    const tr = el("tr");
    tr.append(el("td", null, c.name), el("td", null, fmt(c.query_score)),
              el("td", null, fmt(c.hit_score)), el("td", null, fmt(c.contribution)));
    table.append(tr);
  }
  return table;
}

async function openCompare(hit) {
  const panel = $("compare");
  $("compare-query").replaceChildren(...queryPane(lastQuery || {kind: "text", text: ""}));
  const pane = $("compare-hit");
  pane.replaceChildren(el("h3", null, "Hit"), el("p", "muted", "loading\u2026"));
  panel.hidden = false;
  panel.scrollIntoView({block: "start"});
  let item = hit.item;
  let thumb = hit.thumbnail;
  try {
    const full = await api("GET", `/v1/items/${encodeURIComponent(hit.id)}?size=384`);
    item = full;
    thumb = full.thumbnail;
  } catch (err) {
    showError(err.message);
  }
  const shape = hitShape(hit, item);
  const parts = [el("h3", null, "Hit"), picture(thumb, shape.box, `hit ${hit.id}`)];
  if (shape.z) parts.push(zBar(shape.z, thumb));
  parts.push(detailRows(hit, item));
  if (hit.concepts.length) parts.push(el("h4", null, "Why it matches"), conceptTable(hit.concepts));
  pane.replaceChildren(...parts);
}

// --- start ------------------------------------------------------------------------------

async function loadStats() {
  try {
    const stats = await api("GET", "/v1/stats");
    const select = $("collection");
    const chosen = select.value;
    select.replaceChildren(el("option", null, "default"));
    select.firstChild.value = "";
    for (const c of stats.collections) {
      const option = el("option", null, `${c.name} (${c.items})`);
      option.value = c.name;
      select.append(option);
    }
    select.value = chosen;
    const counts = stats.collections.map((c) => `${c.name} ${c.items}`).join(" \u00b7 ");
    $("stats").textContent = `model ${stats.model || "?"} \u00b7 ${counts || "empty archive"}`;
  } catch (err) {
    $("stats").textContent = err.status === 401 ? "enter a token to connect" : err.message;
  }
}

function start() {
  const token = $("token");
  token.value = sessionStorage.getItem(TOKEN_KEY) || "";
  token.addEventListener("change", () => {
    sessionStorage.setItem(TOKEN_KEY, token.value.trim());
    loadStats();
  });
  for (const radio of document.querySelectorAll("input[name=kind]")) {
    radio.addEventListener("change", showKindFields);
  }
  $("q-file").addEventListener("change", () => { $("kind-file").checked = true; showKindFields(); });
  $("query-form").addEventListener("submit", onSearch);
  $("compare-close").addEventListener("click", () => { $("compare").hidden = true; });
  showKindFields();
  loadStats();
}

document.addEventListener("DOMContentLoaded", start);
