// attnserve playground: plain JavaScript against the server's own /v1 JSON API (no build step,
// nothing loaded from elsewhere). Two calls per change of the text: the text pipeline
// (textFormat DOCUMENT: sentences, confidence, placeholders), then, for the chosen sentence, a
// raw translation with n-best and the cross-attention weights.
"use strict";

const DEBOUNCE_MS = 350;
const LOW_CONFIDENCE = 0.5;
const $ = (id) => document.getElementById(id);
const state = { timer: 0, controller: null, segments: [], placeholders: [], selected: 0, analysis: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function api(path, body, signal) {
  const response = await fetch(path, body === undefined ? { headers: headers(), signal }
    : { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

async function loadModels() {
  try {
    const data = await api("/v1/models");
    const ready = (data.models || []).filter((m) => m.state === "READY");
    const select = $("model");
    select.replaceChildren();
    for (const m of ready) {
      const option = document.createElement("option");
      option.value = m.name;
      option.textContent = `${m.sourceLanguage || "?"} → ${m.targetLanguage || "?"} (${m.name} v${m.version})`;
      if (m.isDefault) option.selected = true;
      select.append(option);
    }
    setStatus(ready.length ? "Ready." : "No model is ready on this server.", !ready.length);
  } catch (error) {
    setStatus("Cannot list the models: " + error.message, true);
  }
}

function schedule() {
  clearTimeout(state.timer);
  state.timer = setTimeout(translate, DEBOUNCE_MS);
}

async function translate() {
  const text = $("source").value;
  if (state.controller) state.controller.abort();  // a newer text replaces the request in flight
  state.controller = new AbortController();
  const signal = state.controller.signal;
  if (!text.trim()) {
    render([], []);
    setStatus("");
    return;
  }
  setStatus("Translating…");
  try {
    const model = $("model").value;
    const data = await api("/v1/translate", { model, sentences: [text], options: { textFormat: "DOCUMENT" } }, signal);
    const t = (data.translations || [])[0] || {};
    let segments = (t.segments || []).map((s) => ({ source: s.source || "", translation: s.translation || "", confidence: s.confidence || 0, flags: s.flags || [] }));
    if (!segments.length) segments = [{ source: text, translation: ((t.hypotheses || [])[0] || {}).text || "", confidence: t.confidence || 0, flags: t.flags || [] }];
    if (state.selected >= segments.length) state.selected = 0;
    render(segments, t.placeholders || []);
    await analyse(signal);
    setStatus(`Translated by ${data.model} v${data.version}.`);
  } catch (error) {
    if (error.name !== "AbortError") setStatus(error.message, true);
  }
}

// Text with each placeholder occurrence in a <mark>, built as DOM nodes (never as HTML).
function highlighted(text, placeholders) {
  const fragment = document.createDocumentFragment();
  const wanted = [...new Set(placeholders)].filter((p) => p).sort((a, b) => b.length - a.length);
  let i = 0, plain = "";
  while (i < text.length) {
    const hit = wanted.find((p) => text.startsWith(p, i));
    if (hit) {
      if (plain) fragment.append(plain);
      plain = "";
      const mark = document.createElement("mark");
      mark.className = "ph";
      mark.textContent = hit;
      fragment.append(mark);
      i += hit.length;
    } else {
      plain += text[i++];
    }
  }
  if (plain) fragment.append(plain);
  return fragment;
}

function render(segments, placeholders) {
  state.segments = segments;
  state.placeholders = placeholders;
  const list = $("translation");
  list.replaceChildren();
  segments.forEach((segment, index) => {
    const button = document.createElement("button");
    button.type = "button";
    button.className = "segment";
    button.setAttribute("role", "listitem");
    button.setAttribute("aria-pressed", String(index === state.selected));
    const text = document.createElement("span");
    text.className = "text";
    text.append(highlighted(segment.translation, placeholders));
    const confidence = document.createElement("span");
    confidence.className = "confidence" + (segment.confidence < LOW_CONFIDENCE ? " low" : "");
    confidence.textContent = "confidence " + segment.confidence.toFixed(2);
    confidence.title = segment.flags.join(", ");
    button.append(text, confidence);
    button.addEventListener("click", () => {
      state.selected = index;
      for (const b of list.children) b.setAttribute("aria-pressed", String(b === button));
      analyse(state.controller ? state.controller.signal : undefined).catch((e) => setStatus(e.message, true));
    });
    list.append(button);
  });
  $("placeholders").textContent = placeholders.length ? "Placeholders kept: " + placeholders.join("  ") : "";
  if (!segments.length) {
    $("nbest").replaceChildren();
    drawHeatmap(null);
  }
}

async function analyse(signal) {
  const segment = state.segments[state.selected];
  if (!segment) return;
  const data = await api("/v1/translate", {
    model: $("model").value, sentences: [segment.source],
    options: { beamSize: 4, nbest: 3, returnAlignment: true },
  }, signal);
  const t = (data.translations || [])[0] || {};
  const nbest = $("nbest");
  nbest.replaceChildren();
  for (const h of t.hypotheses || []) {
    const li = document.createElement("li");
    li.append(highlighted(h.text || "", state.placeholders));
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = "log-prob/len " + (h.score || 0).toFixed(3);
    li.append(score);
    nbest.append(li);
  }
  const best = (t.hypotheses || [])[0];
  drawHeatmap(best ? { source: t.sourceTokens || [], target: best.targetTokens || [], weights: (best.alignment || []).map((r) => r.weights || []) } : null);
}

function drawHeatmap(analysis) {
  state.analysis = analysis;
  const table = $("heatmap");
  const strip = $("source-tokens");
  table.replaceChildren();
  strip.replaceChildren();
  $("download").disabled = !analysis;
  table.dataset.rows = analysis ? analysis.target.length : 0;
  table.dataset.cols = analysis ? analysis.source.length : 0;
  if (!analysis) return;
  const caption = document.createElement("caption");
  caption.className = "hint";
  caption.textContent = `${analysis.target.length} target × ${analysis.source.length} source subwords`;
  const head = document.createElement("thead");
  const headRow = document.createElement("tr");
  const corner = document.createElement("th");
  corner.scope = "col";
  corner.textContent = "target \\ source";
  headRow.append(corner);
  analysis.source.forEach((token, j) => {
    const th = document.createElement("th");
    th.scope = "col";
    th.className = "src";
    th.dataset.col = j;
    th.textContent = token;
    headRow.append(th);
    const span = document.createElement("span");
    span.textContent = token;
    span.dataset.col = j;
    strip.append(span);
  });
  head.append(headRow);
  const body = document.createElement("tbody");
  analysis.target.forEach((token, i) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.dataset.row = i;
    const th = document.createElement("th");
    th.scope = "row";
    th.textContent = token;
    tr.append(th);
    const weights = analysis.weights[i] || [];
    analysis.source.forEach((source, j) => {
      const td = document.createElement("td");
      const w = weights[j] || 0;
      td.style.backgroundColor = `rgba(29, 78, 216, ${Math.min(1, w).toFixed(3)})`;
      td.title = `${token} → ${source}: ${w.toFixed(3)}`;
      tr.append(td);
    });
    tr.setAttribute("aria-label", `${token}: attends most to ${source_of(analysis, i)}`);
    tr.addEventListener("mouseenter", () => highlightRow(i));
    tr.addEventListener("focus", () => highlightRow(i));
    tr.addEventListener("keydown", (event) => {
      const next = event.key === "ArrowDown" ? tr.nextElementSibling : event.key === "ArrowUp" ? tr.previousElementSibling : null;
      if (next) { event.preventDefault(); next.focus(); }
    });
    body.append(tr);
  });
  table.append(caption, head, body);
  table.addEventListener("mouseleave", () => highlightRow(-1));
}

function source_of(analysis, i) {
  const weights = analysis.weights[i] || [];
  let best = 0;
  weights.forEach((w, j) => { if (w > weights[best]) best = j; });
  return analysis.source[best] || "";
}

// Source subwords holding most of the row's attention: the largest weights until half the mass.
function highlightRow(i) {
  const analysis = state.analysis;
  const attended = new Set();
  if (analysis && i >= 0) {
    const weights = analysis.weights[i] || [];
    const order = weights.map((w, j) => [w, j]).sort((a, b) => b[0] - a[0]);
    let mass = 0;
    for (const [w, j] of order) { if (mass >= 0.5) break; attended.add(j); mass += w; }
  }
  for (const tr of $("heatmap").querySelectorAll("tbody tr")) tr.classList.toggle("active", Number(tr.dataset.row) === i);
  for (const el of document.querySelectorAll("#heatmap th.src, #source-tokens span")) {
    const j = Number(el.dataset.col);
    const weight = analysis && i >= 0 ? (analysis.weights[i] || [])[j] || 0 : 0;
    el.classList.toggle("attended", attended.has(j));
    if (el.tagName === "SPAN") el.style.backgroundColor = `rgba(253, 230, 138, ${Math.min(1, weight * 2).toFixed(3)})`;
  }
}

// The heatmap drawn on a canvas (labels included) and saved as PNG.
function downloadPng() {
  const analysis = state.analysis;
  if (!analysis) return;
  const cell = 22, font = "12px system-ui, sans-serif";
  const canvas = $("canvas");
  const ctx = canvas.getContext("2d");
  ctx.font = font;
  const left = Math.ceil(Math.max(...analysis.target.map((t) => ctx.measureText(t).width), 10)) + 12;
  const top = Math.ceil(Math.max(...analysis.source.map((t) => ctx.measureText(t).width), 10)) + 12;
  canvas.width = left + cell * analysis.source.length + 4;
  canvas.height = top + cell * analysis.target.length + 4;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  ctx.font = font;
  ctx.fillStyle = "#111";
  ctx.textBaseline = "middle";
  analysis.source.forEach((token, j) => {
    ctx.save();
    ctx.translate(left + j * cell + cell / 2, top - 6);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(token, 0, 0);
    ctx.restore();
  });
  analysis.target.forEach((token, i) => {
    ctx.textAlign = "right";
    ctx.fillStyle = "#111";
    ctx.fillText(token, left - 6, top + i * cell + cell / 2);
    analysis.source.forEach((_, j) => {
      const w = (analysis.weights[i] || [])[j] || 0;
      ctx.fillStyle = `rgba(29, 78, 216, ${Math.min(1, w)})`;
      ctx.fillRect(left + j * cell, top + i * cell, cell - 1, cell - 1);
    });
  });
  canvas.toBlob((blob) => {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = "attention.png";
    link.click();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }, "image/png");
}

document.addEventListener("DOMContentLoaded", () => {
  $("key").value = sessionStorage.getItem("attnserve-key") || "";
  $("key").addEventListener("change", () => { sessionStorage.setItem("attnserve-key", $("key").value); loadModels().then(schedule); });
  $("source").addEventListener("input", schedule);
  $("model").addEventListener("change", schedule);
  $("controls").addEventListener("submit", (event) => { event.preventDefault(); translate(); });
  $("download").addEventListener("click", downloadPng);
  loadModels().then(() => { if ($("source").value.trim()) schedule(); });
});
