/* nanochat's chat page (nanochat/ui.html): the saved conversations -- storage, the sidebar (a
   drawer on a phone) and export. Loaded before chat.js, whose `state`, render() and
   newConversation() these functions use when they are called.

   Conversations live in localStorage ("nanochat-conversations"), saved as they change (during a
   reply at most once a second, and when it ends, stopped or not). A full quota or data that does
   not parse gives a one-line notice; the page keeps working with what it has in memory. Data
   that does not parse is kept aside as "nanochat-conversations-unreadable". */
"use strict";
const STORE = "nanochat-conversations", CURRENT = "nanochat-current", SETTINGS = "nanochat-settings";

// ---------------------------------------------------------------- storage
function storageNotice(text) { $("storage-text").textContent = text; $("storage-notice").hidden = false; }

function load() {
  try { Object.assign(state, JSON.parse(localStorage.getItem(SETTINGS) || "{}")); } catch (e) { /* defaults */ }
  let raw = null;
  try {
    raw = localStorage.getItem(STORE);
    const saved = raw === null ? [] : JSON.parse(raw);
    if (!Array.isArray(saved) || !saved.every((c) => c && typeof c.id === "string" && Array.isArray(c.messages)
        && c.messages.every((m) => m && typeof m.role === "string" && typeof m.content === "string"))) {
      throw new Error("not a list of conversations");
    }
    state.conversations = saved;
  } catch (e) {
    state.conversations = [];
    try { if (raw !== null) localStorage.setItem(STORE + "-unreadable", raw); } catch (e2) { /* full: drop it */ }
    storageNotice("Saved conversations could not be read (" + e.message + "); starting afresh. The old data is kept as " + STORE + "-unreadable.");
  }
  const id = localStorage.getItem(CURRENT);
  state.current = state.conversations.find((c) => c.id === id) || null;
}

let saveTimer = null;
function save(now = true) {
  if (!now) {  // while a reply streams: at most once a second
    if (!saveTimer) saveTimer = setTimeout(() => { saveTimer = null; save(); }, 1000);
    return;
  }
  clearTimeout(saveTimer); saveTimer = null;
  try {
    localStorage.setItem(STORE, JSON.stringify(state.conversations.filter(worthKeeping)));
    localStorage.setItem(CURRENT, state.current ? state.current.id : "");
  } catch (e) {
    storageNotice("This conversation could not be saved: the browser's storage is full (" + e.name + "). Delete old conversations to make room.");
  }
}
const saveSettings = () => {
  try { localStorage.setItem(SETTINGS, JSON.stringify({ temperature: state.temperature, topK: state.topK })); } catch (e) { /* noticed on save */ }
};

const worthKeeping = (c) => c.messages.some((m) => m.role === "user");  // not only command output

// The open conversation, made (and listed) when its first message is sent
function currentConversation() {
  if (!state.current) {
    state.current = { id: Date.now().toString(36) + Math.random().toString(36).slice(2, 8), title: "", renamed: false,
      updated: Date.now(), messages: [] };
    state.conversations.push(state.current);
  }
  return state.current;
}
function touch() {
  const c = state.current;
  if (!c) return;
  c.updated = Date.now();
  const first = c.messages.find((m) => m.role === "user");
  if (!c.renamed) c.title = first ? first.content.replace(/\s+/g, " ").trim().slice(0, 48) : "New chat";
}

// ---------------------------------------------------------------- the sidebar
function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren();
  const shown = state.conversations.filter(worthKeeping).sort((a, b) => b.updated - a.updated);
  $("no-conversations").hidden = shown.length > 0;
  for (const c of shown) {
    const item = document.createElement("li");
    item.className = "conversation" + (c === state.current ? " current" : "");
    item.dataset.id = c.id;
    const open = document.createElement("button");
    open.type = "button"; open.className = "open"; open.textContent = c.title || "Untitled";
    open.title = c.title; open.onclick = () => openConversation(c);
    if (c === state.current) open.setAttribute("aria-current", "true");
    const rename = document.createElement("button");
    rename.type = "button"; rename.className = "icon rename"; rename.textContent = "✎";
    rename.setAttribute("aria-label", `Rename “${c.title}”`); rename.onclick = () => renameEl(item, c);
    const remove = document.createElement("button");
    remove.type = "button"; remove.className = "icon delete"; remove.textContent = "🗑";
    remove.setAttribute("aria-label", `Delete “${c.title}”`); remove.onclick = () => deleteConversation(c);
    item.append(open, rename, remove);
    list.append(item);
  }
}

function renameEl(item, c) {
  const box = document.createElement("input");
  box.className = "rename-box"; box.value = c.title; box.setAttribute("aria-label", "New name");
  const done = (keep) => {
    const title = box.value.trim();
    if (keep && title) { c.title = title.slice(0, 80); c.renamed = true; save(); }
    renderSidebar();
  };
  box.addEventListener("keydown", (e) => {
    if (e.key === "Enter") { e.preventDefault(); done(true); }
    if (e.key === "Escape") done(false);
  });
  box.addEventListener("blur", () => done(true));
  item.replaceChildren(box);
  box.focus(); box.select();
}

function deleteConversation(c) {
  if (c === state.current) newConversation();
  state.conversations = state.conversations.filter((x) => x !== c);
  save(); renderSidebar();
}

function openConversation(c) {
  if (state.controller) state.controller.abort();
  state.current = c; state.editing = null;
  save(); hideBanner(); closeDrawer(); render(); scrollDown();
}

function openDrawer() { document.body.classList.add("drawer-open"); $("scrim").hidden = false; $("toggle-sidebar").setAttribute("aria-expanded", "true"); }
function closeDrawer() { document.body.classList.remove("drawer-open"); $("scrim").hidden = true; $("toggle-sidebar").setAttribute("aria-expanded", "false"); }

// ---------------------------------------------------------------- export
function download(name, type, text) {
  const link = document.createElement("a");
  link.href = URL.createObjectURL(new Blob([text], { type }));
  link.download = name;
  document.body.append(link); link.click(); link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10_000);
}
function exportName(ext) { return (state.current.title || "conversation").replace(/[^\w-]+/g, "_").slice(0, 40) + ext; }
function toMarkdown(c) {
  const out = [`# ${c.title || "Conversation"}`, ""];
  for (const m of c.messages.filter((x) => x.role !== "notice")) {
    out.push(m.role === "user" ? "## You" : "## nanochat", "");
    for (const part of m.parts || [{ type: "text", text: m.content }]) {
      out.push(part.type === "tool" ? `> ${part.tool}: \`${part.input}\` → \`${part.output ?? ""}\`` : part.text, "");
    }
  }
  return out.join("\n");
}
