/* nanochat's chat page (nanochat/ui.html): the conversation, the stream from the server and the
   slash commands. Markdown rendering is in markdown.js, saved conversations in conversations.js.

   The server: POST /chat/completions streams Server-Sent Events, one JSON object each:
     {"token": text} | {"tool_call": {tool, input}} | {"tool_output": {tool, output}} | {"error": msg}
     | {"done": true, "finish_reason", "stats": {tokens, prompt_tokens, ttft_s, tokens_per_s}}
   GET /health names the model (and its depth and context length) and the sampling defaults.
   Saved conversations (storage, sidebar, export) are in conversations.js. */
"use strict";
const $ = (id) => document.getElementById(id);
const input = $("input"), sendButton = $("send"), messagesEl = $("messages"), scroller = $("scroller");

// A conversation: {id, title, renamed, updated, messages}. A message: {role: "user" | "assistant" |
// "notice", content} where an assistant's content is its text only (what is sent back to the model)
// and `parts` [{type: "text", text} | {type: "tool", tool, input, output}] is what is shown; `stats`
// come from the server's final event, `stopped` when the user stopped it. Notices are never sent.
const state = { conversations: [], current: null, controller: null, editing: null,
  temperature: null, topK: null, defaults: {} };
const messages = () => state.current ? state.current.messages : [];

// ---------------------------------------------------------------- the conversation
function nearBottom() { return scroller.scrollHeight - scroller.scrollTop - scroller.clientHeight < 80; }
function scrollDown() { scroller.scrollTop = scroller.scrollHeight; }

function render() {
  messagesEl.replaceChildren();
  $("empty").hidden = messages().length > 0;
  messages().forEach((m, i) => messagesEl.append(m.role === "user" && state.editing === i ? editorEl(i) : messageEl(m, i)));
  renderActions();
}

// Below the conversation: regenerate the last reply, or retry after an error; then the sidebar
// and the composer. All a finished reply needs (its own element is completed in place).
function renderActions() {
  messagesEl.querySelector(":scope > .actions")?.remove();
  const last = lastTurn();
  if (!state.controller && last) {
    const actions = document.createElement("div");
    actions.className = "actions";
    const button = document.createElement("button");
    button.type = "button"; button.className = "ghost"; button.id = "regenerate";
    button.textContent = last.role === "assistant" ? "↻ Regenerate" : "↻ Retry";
    button.setAttribute("aria-label", last.role === "assistant" ? "Regenerate the last reply" : "Retry the last message");
    button.onclick = regenerate;
    actions.append(button);
    messagesEl.append(actions);
  }
  renderSidebar();
  updateComposer();
}

function copyButton(label, text) {
  const button = document.createElement("button");
  button.type = "button"; button.className = "copy-message"; button.textContent = button.dataset.label = "Copy";
  button.setAttribute("aria-label", label);
  button.onclick = () => Markdown.copyText(text(), button);
  return button;
}

function toolEl(part) {  // collapsed: calculator · 6*7 → 42
  const chip = document.createElement("details");
  chip.className = "tool";
  const summary = document.createElement("summary");
  const code = (text) => { const c = document.createElement("code"); c.textContent = text; return c; };
  summary.append(`${part.tool} · `, code(part.input));
  if (part.output !== undefined) summary.append(" → ", code(part.output));
  const body = document.createElement("div");
  body.className = "tool-body";
  body.append("input: ", code(part.input), document.createElement("br"),
    part.output !== undefined ? "output: " : "no output (the calculator could not evaluate it)");
  if (part.output !== undefined) body.append(code(part.output));
  chip.append(summary, body);
  return chip;
}

// The body of an assistant message: its text parts as markdown, its tool calls as chips. Rendered
// once per message (re-rendering every reply whenever the conversation changes is a long task)
const rendered = new WeakMap();
function fillReply(body, m) {
  body.replaceChildren();
  for (const part of m.parts || [{ type: "text", text: m.content }]) {
    if (part.type === "tool") { body.append(toolEl(part)); continue; }
    const md = document.createElement("div");
    md.className = "md";
    Markdown.render(md, part.text);
    body.append(md);
  }
}

function statsText(s) {
  const parts = [`${s.tokens} tokens`];
  if (s.ttft_s != null) parts.push(`${s.ttft_s < 1 ? Math.round(s.ttft_s * 1000) + " ms" : s.ttft_s.toFixed(2) + " s"} to first token`);
  if (s.tokens_per_s != null) parts.push(`${s.tokens_per_s.toFixed(1)} tok/s`);
  return parts.join(" · ");
}

function messageEl(m, i) {
  const el = document.createElement("div");
  el.className = `msg ${m.role}` + (m.streaming ? " streaming" : "");
  if (m.role === "user") {
    const bubble = document.createElement("button");  // a button: clickable and reachable by keyboard
    bubble.type = "button"; bubble.className = "bubble"; bubble.textContent = m.content;
    bubble.title = "Click to edit and resend";
    bubble.setAttribute("aria-label", `Your message: ${m.content}. Activate to edit.`);
    bubble.onclick = () => { if (!state.controller) { state.editing = i; render(); } };
    el.append(bubble);
  } else if (m.role === "assistant") {
    let body = rendered.get(m);  // a reply is rendered once, then its element is reused
    if (!body) {
      body = document.createElement("div");
      body.className = "reply";
      if (!m.streaming) { fillReply(body, m); rendered.set(m, body); }
    }
    el.append(body);
  } else {
    el.textContent = m.content;
    return el;
  }
  if (!m.streaming) el.append(metaEl(m));
  return el;
}

function metaEl(m) {  // under a message: its copy button, and a reply's stats
  const meta = document.createElement("div");
  meta.className = "meta";
  meta.append(copyButton(m.role === "user" ? "Copy your message" : "Copy the reply", () => m.content));
  if (m.stats || m.stopped) {
    const stats = document.createElement("span");
    stats.className = "stats";
    stats.textContent = [m.stats ? statsText(m.stats) : "", m.stopped ? "stopped" : ""].filter(Boolean).join(" · ");
    meta.append(stats);
  }
  return meta;
}

function editorEl(i) {
  const el = document.createElement("div");
  el.className = "msg user";
  el.innerHTML = `<div class="editor"><label class="sr-only" for="edit-box">Edit your message</label>
    <textarea id="edit-box"></textarea><div><button type="button" class="ghost" id="edit-cancel">Cancel</button>
    <button type="button" class="primary" id="edit-save">Send</button></div></div>`;
  const box = el.querySelector("textarea");
  box.value = messages()[i].content;
  const cancel = () => { state.editing = null; render(); };
  const saveEdit = () => {
    const text = box.value.trim();
    if (!text) return;
    state.editing = null;
    state.current.messages = messages().slice(0, i);  // everything after the edited message goes
    state.current.messages.push({ role: "user", content: text });
    generate();
  };
  el.querySelector("#edit-cancel").onclick = cancel;
  el.querySelector("#edit-save").onclick = saveEdit;
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); saveEdit(); }
    if (e.key === "Escape") cancel();
  });
  requestAnimationFrame(() => {  // once the editor is on the page; a caret already placed in it stays
    if (document.activeElement === box) return;
    box.focus(); box.setSelectionRange(box.value.length, box.value.length);
  });
  return el;
}

function updateComposer() {
  const busy = !!state.controller;
  $("icon-send").toggleAttribute("hidden", busy);  // SVG elements have no .hidden property
  $("icon-stop").toggleAttribute("hidden", !busy);
  sendButton.setAttribute("aria-label", busy ? "Stop generating" : "Send message");
  sendButton.title = busy ? "Stop" : "Send (Enter)";
  sendButton.disabled = !busy && !input.value.trim();
  $("export-md").disabled = $("export-json").disabled = !conversation().length;
}

function autoGrow() { input.style.height = "auto"; input.style.height = input.scrollHeight + "px"; updateComposer(); }

function showBanner(text) { $("banner-text").textContent = text; $("banner").hidden = false; }
function hideBanner() { $("banner").hidden = true; }
function notice(text) { currentConversation().messages.push({ role: "notice", content: text }); render(); scrollDown(); }
const conversation = () => messages().filter((m) => m.role !== "notice");
const lastTurn = () => conversation().slice(-1)[0];

// ---------------------------------------------------------------- talking to the server
// The reply as it streams: text goes to the last text part, drawn at most once per animation frame
function streamInto(reply, replyEl) {
  let live = null, frame = 0;
  const draw = () => {
    frame = 0;
    const follow = nearBottom();
    const part = reply.parts[reply.parts.length - 1];
    if (part && part.type === "text") {
      if (!live) {
        const md = document.createElement("div");
        md.className = "md";
        replyEl.append(md);
        live = new Markdown.StreamingMarkdown(md);
      }
      live.update(part.text);
    }
    if (follow) scrollDown();
  };
  return {
    text(t) {
      const last = reply.parts[reply.parts.length - 1];
      if (last && last.type === "text") last.text += t; else reply.parts.push({ type: "text", text: t });
      reply.content += t;
      if (!frame) frame = requestAnimationFrame(draw);
    },
    tool(part) {
      if (frame) { cancelAnimationFrame(frame); draw(); }
      if (live) live.update(reply.parts[reply.parts.length - 1].text, true);
      live = null;
      reply.parts.push(part);
      replyEl.append(toolEl(part));
    },
    output(o) {
      const part = reply.parts[reply.parts.length - 1];
      if (!part || part.type !== "tool") return;
      part.output = o.output;
      replyEl.lastChild.replaceWith(toolEl(part));
    },
    finish() {  // the last block settles (highlighted); the streamed element is the rendered reply
      if (frame) { cancelAnimationFrame(frame); draw(); }
      const part = reply.parts[reply.parts.length - 1];
      if (live && part && part.type === "text") live.update(part.text, true);
      rendered.set(reply, replyEl);
    },
  };
}

async function generate() {
  const sent = conversation().map(({ role, content }) => ({ role, content }));
  const reply = { role: "assistant", content: "", parts: [], streaming: true };
  const owner = currentConversation();
  owner.messages.push(reply);
  touch(); save();
  state.controller = new AbortController();
  render(); scrollDown();
  const replyEl = messagesEl.querySelector(".msg.streaming .reply");
  const stream = streamInto(reply, replyEl);
  const body = { messages: sent };
  if (state.temperature !== null) body.temperature = state.temperature;
  if (state.topK !== null) body.top_k = state.topK;
  let done = false;
  try {
    const res = await fetch("/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body), signal: state.controller.signal });
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).error || detail; } catch (e) { /* keep the status text */ }
      throw new Error(`The server could not answer (${res.status}): ${detail}`);
    }
    hideBanner();
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = "";
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {  // one SSE event per blank-line-terminated block
        const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const event = JSON.parse(line.slice(6));
          if (event.error) throw new Error(`The model failed: ${event.error}`);
          if (event.token) stream.text(event.token);
          if (event.tool_call) stream.tool({ type: "tool", tool: event.tool_call.tool, input: event.tool_call.input });
          if (event.tool_output) stream.output(event.tool_output);
          if (event.done) { done = true; reply.stats = event.stats; }
        }
      }
      save(false);
    }
    if (!done) throw new Error("The connection to the server closed before the reply was complete.");
  } catch (err) {
    if (err.name === "AbortError") reply.stopped = true;  // the user pressed stop: keep what arrived
    else showBanner(err instanceof TypeError ? "Cannot reach the server. Is chat_web still running? (" + err.message + ")" : err.message);
  } finally {
    stream.finish();
    delete reply.streaming;
    const at = owner.messages.indexOf(reply);
    if (!reply.parts.length && at >= 0) owner.messages.splice(at, 1);
    state.controller = null;
    save();
    const follow = nearBottom(), replyMsg = replyEl.parentElement;
    if (owner === state.current && at >= 0 && reply.parts.length && replyMsg.isConnected) {
      replyMsg.classList.remove("streaming");  // completed in place: moving a long reply's DOM is a long task
      replyMsg.append(metaEl(reply));
      renderActions();
    } else {
      render();  // the user opened another conversation, or nothing came back
    }
    if (follow) scrollDown();
    if (state.editing === null) input.focus();
  }
}

function send() {
  const text = input.value.trim();
  if (!text || state.controller) return;
  input.value = ""; autoGrow();
  if (text.startsWith("/")) return command(text);
  currentConversation().messages.push({ role: "user", content: text });
  generate();
}

function regenerate() {
  if (state.controller) return;
  const last = lastTurn();
  if (!last) return;
  const all = messages();
  state.current.messages = all.slice(0, all.lastIndexOf(last) + (last.role === "user" ? 1 : 0));
  generate();
}

function newConversation() {
  if (state.controller) state.controller.abort();
  state.current = null; state.editing = null;
  save(); hideBanner(); closeDrawer(); render(); input.focus();
}

// ---------------------------------------------------------------- slash commands
function command(text) {
  const [name, arg] = text.split(/\s+/, 2);
  const current = (value, key) => value === null ? `server default (${state.defaults[key] ?? "?"})` : value;
  if (name === "/clear") return newConversation();
  if (name === "/help") {
    return notice("Commands:\n• /temperature 0.6 — sampling temperature from 0 to 2 (0: always the most likely token)\n" +
      "• /topk 50 — sample among the k most likely tokens, 0 to 200 (0: all of them)\n" +
      "• /temperature default, /topk default — back to the server's defaults\n" +
      "• /clear — start a new conversation\n• /help — this help\n" +
      `Now: temperature ${current(state.temperature, "temperature")}, top-k ${current(state.topK, "top_k")}.\n` +
      "Click one of your messages to edit it; ↻ regenerates the last reply.");
  }
  if (name === "/temperature" || name === "/topk") {
    const isTemp = name === "/temperature", key = isTemp ? "temperature" : "topK";
    const label = isTemp ? "Temperature" : "Top-k", max = isTemp ? 2 : 200;
    if (arg === undefined) return notice(`${label}: ${current(state[key], isTemp ? "temperature" : "top_k")}. Usage: ${name} <0–${max}>`);
    if (arg === "default") { state[key] = null; saveSettings(); return notice(`${label} reset to the server default.`); }
    const value = Number(arg);
    if (arg.trim() === "" || !Number.isFinite(value) || value < 0 || value > max || (!isTemp && !Number.isInteger(value))) {
      return notice(`${label} must be ${isTemp ? "a number" : "a whole number"} from 0 to ${max} (got "${arg}").`);
    }
    state[key] = value; saveSettings();
    return notice(`${label} set to ${value}.`);
  }
  notice(`Unknown command ${name}. Type /help for the list.`);
}

// ---------------------------------------------------------------- wiring
$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  if (state.controller) state.controller.abort(); else send();
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
});
input.addEventListener("input", autoGrow);
$("new-chat").onclick = newConversation;
$("banner-close").onclick = hideBanner;
$("storage-close").onclick = () => { $("storage-notice").hidden = true; };
$("toggle-sidebar").onclick = () => document.body.classList.contains("drawer-open") ? closeDrawer() : openDrawer();
$("close-sidebar").onclick = closeDrawer;
$("scrim").onclick = closeDrawer;
$("export-md").onclick = () => download(exportName(".md"), "text/markdown", toMarkdown(state.current));
$("export-json").onclick = () => download(exportName(".json"), "application/json", JSON.stringify(
  { title: state.current.title, messages: conversation().map(({ role, content, parts, stats }) => ({ role, content, parts, stats })) }, null, 2));
window.addEventListener("storage", (e) => { if (e.key === STORE && !state.controller) { load(); render(); } });  // another tab

fetch("/health").then((res) => res.json()).then((health) => {
  $("model-name").textContent = health.model || "";
  $("model-info").textContent = `${health.model} · depth ${health.depth} · context ${Number(health.context_len).toLocaleString("en")} tokens`;
  state.defaults = health.defaults || {};
}).catch(() => showBanner("Cannot reach the server. Is chat_web still running?"));
load();
render();
scrollDown();
Markdown.warmUp();  // while the page is idle: the first reply's first frames are then as cheap as the rest
