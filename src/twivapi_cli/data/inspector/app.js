// twivapi inspect: the call list and a call's page, from the admin app's JSON and its event stream.
// Plain JS, no build step, nothing fetched from anywhere but this bridge's admin port.
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token") || "";
const ENVELOPE_COLUMNS = 200;          // the waveform's envelope, published on the canvas for checks
const ROWS = {twilio: 0, state: 1, vapi: 2, media: 3, race: 1, parked: 2, bridge: 1};
const $ = (id) => document.getElementById(id);

const view = {call: null, detail: null, wav: null, wavKey: "", pxPerSec: 200, startMs: 0, endMs: 1000};

function withToken(path) {
  return path + (path.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(path, options = {}) {
  const headers = Object.assign({Authorization: "Bearer " + TOKEN}, options.headers || {});
  const response = await fetch(path, Object.assign({}, options, {headers}));
  if (!response.ok) throw new Error(path + " answered " + response.status);
  return response;
}

function cell(row, text, cls) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (cls) td.className = cls;
  return td;
}

function ms(value) {
  return typeof value === "number" ? value.toFixed(1) : "";
}

// --- the call list -------------------------------------------------------------------------------
async function refreshList() {
  const {calls} = await (await api("/calls")).json();
  const body = $("calls").tBodies[0];
  body.replaceChildren();
  for (const call of calls) {
    const row = body.insertRow();
    row.className = call.live ? "live" : "";
    row.dataset.callSid = call.call_sid;
    const link = document.createElement("a");
    link.href = "#call=" + call.call_sid;
    link.textContent = call.call_sid;
    cell(row, "", "sid").appendChild(link);
    cell(row, call.state);
    cell(row, call.mode);
    cell(row, call.age_s.toFixed(0) + " s");
    cell(row, call.caller);
    cell(row, call.events);
    cell(row, call.barge_ins || 0);
  }
  $("call-count").textContent = "(" + calls.length + ")";
}

// --- a call's page -------------------------------------------------------------------------------
function offsetMs(event) {
  return (event.received_at - view.t0) * 1000;
}

async function refreshCall() {
  const sid = view.call;
  const detail = await (await api("/calls/" + sid)).json();
  if (sid !== view.call) return;
  view.detail = detail;
  const recording = detail.recording;
  view.t0 = recording && recording.started_at ? recording.started_at
    : (detail.events.length ? detail.events[0].received_at : Date.now() / 1000);
  const offsets = detail.events.map(offsetMs);
  view.startMs = Math.min(0, ...offsets) - 200;
  view.endMs = Math.max(1000, (recording && recording.duration_ms) || 0, ...offsets) + 200;
  $("call-sid").textContent = sid;
  const session = detail.session || {};
  $("call-state").textContent = [session.state, session.mode, session.ended_reason].filter(Boolean).join(" · ");
  renderEvents(detail.events);
  renderTurns(detail.turns);
  renderWebhooks(detail.webhooks);
  await loadRecording(recording);
  layout();
}

function renderEvents(events) {
  const body = $("events").tBodies[0];
  body.replaceChildren();
  for (const event of events) {
    const row = body.insertRow();
    row.dataset.type = event.type;
    cell(row, (offsetMs(event) / 1000).toFixed(3) + " s");
    cell(row, event.type);
    cell(row, JSON.stringify(event.data), "data");
  }
}

function renderTurns(turns) {
  const body = $("turns").tBodies[0];
  body.replaceChildren();
  for (const turn of turns) {
    const row = body.insertRow();
    for (const key of ["turn", "heard_ms", "relay_in_ms", "vapi_ms", "relay_out_ms", "pacing_ms", "vapi_turn_ms",
                       "vapi_transcriber_ms", "vapi_endpointing_ms", "vapi_model_ms", "vapi_voice_ms"]) {
      cell(row, key === "turn" ? turn.turn : ms(turn[key]));
    }
  }
}

function renderWebhooks(webhooks) {
  const body = $("webhooks").tBodies[0];
  body.replaceChildren();
  webhooks.forEach((webhook, index) => {
    const row = body.insertRow();
    cell(row, index);
    cell(row, ((webhook.at - view.t0)).toFixed(3) + " s");
    cell(row, webhook.path);
    cell(row, webhook.kind);
    cell(row, webhook.status);
    const button = document.createElement("button");
    button.type = "button";
    button.textContent = "re-send";
    button.className = "resend";
    button.addEventListener("click", () => resend(index));
    cell(row, "").appendChild(button);
  });
}

async function resend(index) {
  const answer = await (await api("/calls/" + view.call + "/resend", {
    method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify({index})})).json();
  $("resend-out").textContent = "re-sent " + answer.path + ": " + answer.status;
}

async function copyFixture() {
  const text = await (await api("/calls/" + view.call + "/fixture")).text();
  const out = $("fixture-out");
  out.textContent = JSON.stringify(JSON.parse(text), null, 2);
  out.hidden = false;
  try { await navigator.clipboard.writeText(out.textContent); } catch (e) { /* shown on the page instead */ }
}

// --- the recording: WAV parsed here, drawn per pixel column ------------------------------------
function parseWav(buffer) {
  const data = new DataView(buffer);
  let at = 12;
  let channels = 2, rate = 8000;
  while (at + 8 <= data.byteLength) {
    const id = String.fromCharCode(data.getUint8(at), data.getUint8(at + 1), data.getUint8(at + 2), data.getUint8(at + 3));
    const size = data.getUint32(at + 4, true);
    if (id === "fmt ") {
      channels = data.getUint16(at + 10, true);
      rate = data.getUint32(at + 12, true);
    } else if (id === "data") {
      const frames = Math.floor(Math.min(size, data.byteLength - at - 8) / (2 * channels));
      const samples = new Int16Array(buffer.slice(at + 8, at + 8 + frames * 2 * channels));
      const legs = [];
      for (let c = 0; c < channels; c++) {
        const leg = new Int16Array(frames);
        for (let i = 0; i < frames; i++) leg[i] = samples[i * channels + c];
        legs.push(leg);
      }
      return {rate, legs};
    }
    at += 8 + size + (size % 2);
  }
  return {rate, legs: []};
}

async function loadRecording(recording) {
  const player = $("player");
  const has = Boolean(recording);
  player.hidden = $("download").hidden = !has;
  $("no-recording").hidden = has;
  if (!has) { view.wav = null; return; }
  const key = recording.duration_ms + ":" + recording.complete;
  if (key === view.wavKey) return;
  view.wavKey = key;
  const url = withToken("/calls/" + view.call + "/recording.wav");
  view.wav = parseWav(await (await api("/calls/" + view.call + "/recording.wav")).arrayBuffer());
  $("download").href = url;
  player.src = url;
}

function envelope(leg) {
  const out = [];
  for (let i = 0; i < ENVELOPE_COLUMNS; i++) {
    const from = Math.floor(i * leg.length / ENVELOPE_COLUMNS), to = Math.floor((i + 1) * leg.length / ENVELOPE_COLUMNS);
    let peak = 0;
    for (let j = from; j < to; j++) peak = Math.max(peak, Math.abs(leg[j]));
    out.push(peak);
  }
  return out;
}

function x(msValue) {
  return (msValue - view.startMs) * view.pxPerSec / 1000;
}

function drawWave(canvas, leg, rate, color) {
  const width = canvas.width, height = canvas.height, mid = height / 2;
  const context = canvas.getContext("2d");
  context.clearRect(0, 0, width, height);
  if (!leg) { delete canvas.dataset.envelope; return; }
  context.fillStyle = color;
  const perPx = rate / view.pxPerSec;          // samples per pixel column
  const origin = x(0);
  for (let px = Math.max(0, Math.floor(origin)); px < width; px++) {
    const from = Math.floor((px - origin) * perPx), to = Math.floor((px + 1 - origin) * perPx);
    if (from >= leg.length) break;
    let low = 0, high = 0;
    for (let j = Math.max(0, from); j < Math.min(to, leg.length); j++) {
      if (leg[j] < low) low = leg[j];
      if (leg[j] > high) high = leg[j];
    }
    if (high === 0 && low === 0) continue;
    const top = mid - high * mid / 32768, bottom = mid - low * mid / 32768;
    context.fillRect(px, top, 1, Math.max(1, bottom - top));
  }
  const env = envelope(leg);
  canvas.dataset.envelope = env.join(",");
  canvas.dataset.samples = String(leg.length);
  canvas.dataset.peak = String(Math.max(0, ...env));
  // the interruptions, on both legs
  context.fillStyle = "#e03131";
  for (const event of view.detail.events) {
    if (event.type === "media.clear") context.fillRect(Math.round(x(offsetMs(event))), 0, 2, height);
  }
}

function layout() {
  if (!view.detail) return;
  const width = Math.min(30000, Math.max(600, Math.ceil(x(view.endMs))));
  $("track").style.width = width + "px";
  $("zoom-label").textContent = view.pxPerSec + " px/s";
  for (const id of ["wave-caller", "wave-heard"]) $(id).width = width;
  const legs = view.wav ? view.wav.legs : [];
  drawWave($("wave-caller"), legs[0], view.wav && view.wav.rate, "#1864ab");
  drawWave($("wave-heard"), legs[1], view.wav && view.wav.rate, "#5f3dc4");
  drawTimeline(width);
  follow();
}

function svg(tag, attributes, parent) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, value);
  if (parent) parent.appendChild(node);
  return node;
}

function eventClass(event) {
  if (event.type === "media.clear") return "barge-in";
  if (event.type === "media.first-audio") return "first-audio";
  if (event.type === "vapi.call-created") return "setup";
  return event.acked_at ? "ack" : "";
}

function drawTimeline(width) {
  const timeline = $("timeline");
  timeline.replaceChildren();
  timeline.setAttribute("width", width);
  const step = view.pxPerSec >= 100 ? 1000 : view.pxPerSec >= 20 ? 5000 : 30000;
  for (let t = Math.ceil(view.startMs / step) * step; t <= view.endMs; t += step) {
    svg("line", {class: "tick", x1: x(t), x2: x(t), y1: 0, y2: 150}, timeline);
    svg("text", {x: x(t) + 2, y: 148}, timeline).textContent = (t / 1000) + " s";
  }
  const lastLabel = {};
  for (const event of view.detail.events) {
    const at = x(offsetMs(event));
    const row = ROWS[event.type.split(".")[0]] || 0;
    const y = 8 + row * 32;
    const group = svg("g", {class: ("ev " + eventClass(event)).trim(), "data-type": event.type,
                            "data-offset-ms": offsetMs(event).toFixed(1)}, timeline);
    svg("title", {}, group).textContent = event.type + " " + JSON.stringify(event.data);
    if (event.acked_at) {
      svg("rect", {x: at, y: y, width: Math.max(2, (event.acked_at - event.received_at) * view.pxPerSec), height: 6}, group);
    }
    if (event.type === "vapi.call-created" && typeof event.data.setup_ms === "number") {
      const w = event.data.setup_ms * view.pxPerSec / 1000;
      svg("rect", {x: at - w, y: y + 8, width: Math.max(2, w), height: 6}, group);
    }
    svg("line", {x1: at, x2: at, y1: y, y2: y + 24}, group);
    if (!(row in lastLabel) || at - lastLabel[row] > 90) {
      svg("text", {x: at + 3, y: y + 20}, group).textContent = event.type;
      lastLabel[row] = at;
    }
  }
}

function follow() {
  const player = $("player");
  const at = x(player.currentTime * 1000);
  $("playhead").style.left = at + "px";
  const scroller = $("scroller");
  if (!player.paused && (at < scroller.scrollLeft || at > scroller.scrollLeft + scroller.clientWidth - 40)) {
    scroller.scrollLeft = Math.max(0, at - 60);
  }
}

function animate() {
  follow();
  if (!$("player").paused) requestAnimationFrame(animate);
}

// --- routing and live updates ------------------------------------------------------------------
function route() {
  const match = /^#call=(CA[0-9a-fA-F]{32})$/.exec(location.hash);
  view.call = match ? match[1] : null;
  view.wavKey = "";
  $("list-view").hidden = Boolean(view.call);
  $("call-view").hidden = !view.call;
  $("fixture-out").hidden = true;
  return view.call ? refreshCall() : refreshList();
}

function debounce(fn, wait) {
  let timer = null;
  return () => {
    if (timer) return;
    timer = setTimeout(() => { timer = null; fn().catch(showError); }, wait);
  };
}

function showError(error) {
  $("live").textContent = String(error.message || error);
}

function listen() {
  const refreshListSoon = debounce(refreshList, 500), refreshCallSoon = debounce(refreshCall, 500);
  const source = new EventSource(withToken("/events?since=" + (Date.now() / 1000 - 1)));
  source.onopen = () => { $("live").textContent = "live"; };
  source.onerror = () => { $("live").textContent = "reconnecting…"; };
  source.addEventListener("event", (message) => {
    const event = JSON.parse(message.data);
    if (!view.call) refreshListSoon();
    else if (event.call_sid === view.call) refreshCallSoon();
  });
}

function start() {
  $("zoom").addEventListener("input", (e) => {
    const scroller = $("scroller");
    const centreMs = view.startMs + (scroller.scrollLeft + scroller.clientWidth / 2) * 1000 / view.pxPerSec;
    view.pxPerSec = Number(e.target.value);
    layout();
    scroller.scrollLeft = Math.max(0, x(centreMs) - scroller.clientWidth / 2);
  });
  $("track").addEventListener("click", (e) => {
    const rect = $("track").getBoundingClientRect();
    const at = (e.clientX - rect.left) * 1000 / view.pxPerSec + view.startMs;
    if (view.wav && at >= 0) { $("player").currentTime = at / 1000; follow(); }
  });
  $("player").addEventListener("play", animate);
  $("player").addEventListener("timeupdate", follow);
  $("copy-fixture").addEventListener("click", () => copyFixture().catch(showError));
  $("home").addEventListener("click", (e) => { e.preventDefault(); location.hash = ""; });
  window.addEventListener("hashchange", () => route().catch(showError));
  route().catch(showError);
  listen();
}

window.inspector = {view, x};   // for checks from a test (the page's own scale)
document.addEventListener("DOMContentLoaded", start);
