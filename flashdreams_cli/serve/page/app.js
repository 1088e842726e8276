// fd serve page: one WebSocket for JSON control and binary JPEG frames; frames are drawn on a <canvas>.
// Frames come a block at a time; a small playout queue draws them at the spec's fps and drops the oldest
// when it grows (latest wins), so a slow tab shows a choppier picture, never a growing delay.
"use strict";

const $ = (id) => document.getElementById(id);
const HEADER_BYTES = 28;
const CONTROL_HZ = 15;

const state = {
  ws: null, hello: null, phase: "connecting", session: null, fps: 16,
  queue: [], lastDraw: 0, framesDrawn: 0, framesReceived: 0, dropped: 0, skipped: 0, nextIndex: 0, blockFrames: 0,
  fpsCount: 0, fpsSince: performance.now(), clockOffset: 0, rtt: null, block: null,
  keys: new Set(), drag: null, look: [0, 0], lastControlSent: 0, controlActive: false,
  saves: [],   // saved points of this rollout (server-side snapshots), newest last
};
window.fdDebug = state;   // read by the browser test (frames drawn, phase, session)

function token() {
  return new URLSearchParams(location.search).get("token");
}

function connect() {
  const proto = location.protocol === "https:" ? "wss" : "ws";
  const t = token();
  const ws = new WebSocket(`${proto}://${location.host}/ws` + (t ? `?token=${encodeURIComponent(t)}` : ""));
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => (typeof ev.data === "string" ? onJson(JSON.parse(ev.data)) : onFrame(ev.data));
  ws.onclose = (ev) => { setPhase("closed"); say(`disconnected (${ev.code}${ev.reason ? ": " + ev.reason : ""})`, true); };
  ws.onerror = () => say("connection error", true);
  state.ws = ws;
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
}

function say(text, isError = false) {
  const m = $("message");
  m.textContent = text;
  m.classList.toggle("error", isError);
}

function setPhase(phase) {
  state.phase = phase;
  const pill = $("status");
  pill.dataset.state = phase;
  pill.textContent = phase;
  const live = ["streaming", "paused", "done", "starting"].includes(phase);
  $("start").disabled = !["ready", "stopped"].includes(phase);
  $("pause").disabled = phase !== "streaming";
  $("resume").disabled = phase !== "paused";
  $("reset").disabled = !live;
  $("save").disabled = !["streaming", "paused", "done"].includes(phase);
  $("branch").disabled = !live || state.saves.length === 0;
  $("stop").disabled = !(live || phase === "queued");
  $("switch").disabled = !live || !(state.hello && state.hello.has_prompt);
  $("queue").hidden = phase !== "queued";
  $("idle").hidden = !["ready", "stopped"].includes(phase);
}

// ------------------------------------------------------------------ messages
function onJson(msg) {
  switch (msg.type) {
    case "hello": {
      if (msg.auth_required) { say("this server needs a token: open the page with ?token=…", true); return; }
      state.hello = msg;
      state.fps = msg.fps || 16;
      $("spec-name").textContent = msg.spec;
      $("description").textContent = msg.description || "";
      const hasPrompt = msg.has_prompt;
      $("prompt").hidden = $("prompt-label").hidden = $("switch").hidden = !hasPrompt;
      if (hasPrompt && msg.prompt && !$("prompt").value) $("prompt").value = msg.prompt;
      $("seed").hidden = $("seed-label").hidden = !msg.has_seed;
      if (msg.has_seed && msg.seed != null) $("seed").placeholder = `spec default ${msg.seed}`;
      const camera = (msg.controls || []).length > 0;
      $("camera-help").hidden = !camera;
      $("stage").classList.toggle("camera", camera);
      if (msg.frame_size) { $("video").width = msg.frame_size[0]; $("video").height = msg.frame_size[1]; }
      setPhase("ready");
      say("");
      ping();
      break;
    }
    case "queue": setPhase("queued"); $("queue-pos").textContent = msg.position; break;
    case "started": state.session = msg.session; state.saves = []; newStream(); setPhase("streaming"); say(""); break;
    case "block": state.block = msg.block; state.blockFrames = Math.max(state.blockFrames, msg.frames || 0); $("block-ms").textContent = msg.ms.toFixed(0); $("block").textContent = msg.block; break;
    case "prompt": say(`prompt switched at block ${msg.block}` + (state.hello && state.hello.prompt_switch ? ` (${state.hello.prompt_switch})` : "")); break;
    case "paused": setPhase("paused"); break;
    case "resumed": setPhase("streaming"); break;
    case "reset": state.session = msg.session; dropQueue(); newStream(); setPhase("streaming"); break;
    case "saved":
      state.saves.push(msg.save);
      say(`saved point ${msg.save} at block ${msg.block}: Branch goes back to the latest one, with the prompt in the box`);
      setPhase(state.phase);
      break;
    case "branched": state.session = msg.session; dropQueue(); newStream(); setPhase("streaming"); say(`branched from point ${msg.save} (block ${msg.block})`); break;
    case "done": setPhase("done"); say(`finished ${msg.blocks} blocks: Reset to go again, Stop to free the server`); break;
    case "stopped":
      if (msg.session === null || msg.session === state.session) {
        state.session = null; dropQueue(); setPhase("stopped");
        if (msg.reason !== "stopped") say(`session ended: ${msg.reason}`);
      }
      break;
    case "pong": {
      const now = Date.now();
      state.rtt = now - msg.t;
      state.clockOffset = msg.server_t - (msg.t + state.rtt / 2);
      $("rtt").textContent = state.rtt.toFixed(0);
      break;
    }
    case "error": say(msg.message, true); break;
    case "auth": break;
  }
}

function parseHeader(buf) {
  const v = new DataView(buf);
  if (v.getUint8(0) !== 70 || v.getUint8(1) !== 68) return null;   // "FD"
  return { flags: v.getUint8(3), session: v.getUint32(4, true), block: v.getUint32(8, true),
           index: v.getUint32(12, true), width: v.getUint16(16, true), height: v.getUint16(18, true),
           ts: v.getFloat64(20, true) };
}

// Drops are counted as the server counts them (/metrics frames_dropped): frames it generated for this
// session that never arrived, i.e. gaps in the frame index of the headers. The server paces a session at
// the spec's fps (one block ahead), so playback has no reason to drop; frames it still has to discard
// because the playout queue overflowed (a stalled tab) are "skipped", shown apart.
function countArrival(h) {
  if (h.index > state.nextIndex) state.dropped += h.index - state.nextIndex;
  state.nextIndex = Math.max(state.nextIndex, h.index + 1);
}

function newStream() {
  state.nextIndex = 0;
}

function playoutCap() {   // two blocks (the paced lead plus the one arriving), at least two seconds
  return Math.max(4, Math.ceil(2 * state.fps), 2 * state.blockFrames + 2);
}

async function onFrame(buf) {
  const h = parseHeader(buf);
  if (!h || h.session !== state.session) return;          // a frame of a session we reset or stopped
  state.framesReceived++;
  countArrival(h);
  $("dropped").textContent = state.dropped;
  const bitmap = await createImageBitmap(new Blob([buf.slice(HEADER_BYTES)], { type: "image/jpeg" }));
  if (h.session !== state.session) { bitmap.close(); return; }
  state.queue.push({ bitmap, h });
  while (state.queue.length > playoutCap()) { state.queue.shift().bitmap.close(); state.skipped++; }
  $("skipped").textContent = state.skipped;
  $("skipped-box").hidden = state.skipped === 0;
}

function dropQueue() {
  for (const f of state.queue) f.bitmap.close();
  state.queue = [];
}

// ------------------------------------------------------------------ drawing
function draw(now) {
  const interval = 1000 / state.fps;
  // draw at the stream's fps (the server paces the stream to it)
  if (state.queue.length && now - state.lastDraw >= interval * 0.95) {
    const { bitmap, h } = state.queue.shift();
    const canvas = $("video");
    if (canvas.width !== bitmap.width || canvas.height !== bitmap.height) {
      canvas.width = bitmap.width; canvas.height = bitmap.height;
    }
    canvas.getContext("2d").drawImage(bitmap, 0, 0);
    bitmap.close();
    state.lastDraw = now;
    state.framesDrawn++;
    state.fpsCount++;
    $("latency").textContent = Math.max(0, Date.now() + state.clockOffset - h.ts).toFixed(0);
  }
  if (now - state.fpsSince >= 1000) {
    $("fps").textContent = (state.fpsCount * 1000 / (now - state.fpsSince)).toFixed(1);
    state.fpsCount = 0;
    state.fpsSince = now;
  }
  tickControls(now);
  requestAnimationFrame(draw);
}

function ping() {
  send({ type: "ping", t: Date.now() });
}

// ------------------------------------------------------------------ camera / action input
function controlKind() {
  const c = state.hello && state.hello.controls;
  return c && c.length ? c[0] : null;
}

const MOVE = { KeyW: [1, 0], KeyS: [-1, 0], KeyD: [0, 1], KeyA: [0, -1] };
const LOOK = { ArrowRight: [1, 0], ArrowLeft: [-1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] };

function controlVector() {
  // [forward, right, yaw, pitch], each in [-1, 1]
  let fwd = 0, right = 0, yaw = state.look[0], pitch = state.look[1];
  for (const k of state.keys) {
    if (MOVE[k]) { fwd += MOVE[k][0]; right += MOVE[k][1]; }
    if (LOOK[k]) { yaw += LOOK[k][0]; pitch += LOOK[k][1]; }
  }
  const clip = (x) => Math.max(-1, Math.min(1, x));
  return [clip(fwd), clip(right), clip(yaw), clip(pitch)];
}

function tickControls(now) {
  const kind = controlKind();
  if (!kind || !["streaming", "paused"].includes(state.phase)) return;
  if (now - state.lastControlSent < 1000 / CONTROL_HZ) return;
  const v = controlVector();
  const active = v.some((x) => x !== 0);
  if (active || state.controlActive) {          // keep sending while held, once more (zeros) on release
    send({ type: kind, value: v });
    state.lastControlSent = now;
    state.controlActive = active;
  }
  if (!state.drag) state.look = [0, 0];
}

function typing(ev) {
  return ev.target instanceof HTMLInputElement;
}

document.addEventListener("keydown", (ev) => {
  if (!controlKind() || typing(ev) || !(ev.code in MOVE || ev.code in LOOK)) return;
  state.keys.add(ev.code);
  ev.preventDefault();
});
document.addEventListener("keyup", (ev) => state.keys.delete(ev.code));
window.addEventListener("blur", () => state.keys.clear());

const stage = $("stage");
stage.addEventListener("pointerdown", (ev) => {
  if (!controlKind()) return;
  stage.focus();
  state.drag = { x: ev.clientX, y: ev.clientY };
  stage.classList.add("dragging");
  stage.setPointerCapture(ev.pointerId);
});
stage.addEventListener("pointermove", (ev) => {
  if (!state.drag) return;
  const scale = 1 / 40;                         // 40 px of drag = full-rate look
  state.look = [(ev.clientX - state.drag.x) * scale, (ev.clientY - state.drag.y) * scale];
  state.drag = { x: ev.clientX, y: ev.clientY };
});
const endDrag = () => { state.drag = null; state.look = [0, 0]; stage.classList.remove("dragging"); };
stage.addEventListener("pointerup", endDrag);
stage.addEventListener("pointercancel", endDrag);

// ------------------------------------------------------------------ buttons
function startMessage() {
  const msg = { type: "start", options: {} };
  if (state.hello.has_prompt) msg.prompt = $("prompt").value;
  const seed = $("seed").value.trim();
  if (state.hello.has_seed && seed !== "") msg.seed = Math.max(0, Math.floor(Number(seed)));
  return msg;
}

$("start").onclick = () => { dropQueue(); setPhase("starting"); send(startMessage()); };
$("switch").onclick = () => send({ type: "prompt", prompt: $("prompt").value });
$("pause").onclick = () => send({ type: "pause" });
$("resume").onclick = () => send({ type: "resume" });
$("reset").onclick = () => send({ type: "reset" });
$("save").onclick = () => send({ type: "save" });
$("branch").onclick = () => {
  const msg = { type: "branch", save: state.saves[state.saves.length - 1] };
  if (state.hello && state.hello.has_prompt) msg.prompt = $("prompt").value;
  send(msg);
};
$("stop").onclick = () => send({ type: "stop" });
$("prompt").addEventListener("keydown", (ev) => {
  if (ev.key !== "Enter") return;
  if (!$("switch").disabled) $("switch").click();
  else if (!$("start").disabled) $("start").click();
});

setPhase("connecting");
connect();
setInterval(ping, 2000);
requestAnimationFrame(draw);
