/* Markdown for the chat page (nanochat/ui.html): model output -> safe, highlighted DOM.

   Why marked (vendor/marked.min.js) and not markdown-it: both are CommonMark + GFM (tables, fences,
   autolinks); marked is 55 KB to markdown-it's ~100 KB with its dependencies, is faster on long
   inputs, and its lexer hands back the reply as a list of blocks, each with its raw source, which
   is what lets a streaming reply re-render only the block that is still growing.

   Everything the model writes is untrusted. Three layers keep it inert:
   1. raw HTML in the markdown is rendered as escaped text (it shows, it never becomes elements);
   2. the HTML marked makes goes through DOMPurify, which allows no script, style, form, frame,
      svg or image elements, no style or event attributes, and only http(s)/mailto/relative URLs;
      links open in a new tab with rel="noopener noreferrer"; images become plain links, so a
      markdown image to another host loads nothing;
   3. the server's Content-Security-Policy runs only the page's own scripts and loads from it only.

   While a reply streams, `StreamingMarkdown.update(text)` is called at most once per animation
   frame; it lexes only the reply's last two blocks and re-renders only those whose source changed
   -- usually the last one -- so a 4,000-token reply is not re-lexed or re-rendered from the top at
   every frame (bench/chat_page.py measures it against doing so). An unclosed
   code fence lexes as a code block to the end of the text, so code in progress shows as code.
   The growing block is highlighted once it is complete (or the reply ends), not at every frame. */
"use strict";

const Markdown = (() => {
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  marked.use({
    gfm: true,
    breaks: false,
    renderer: {
      html: (token) => escapeHtml(token.text),  // raw HTML, block or inline: shown, never run
      image: (token) => `<a href="${escapeHtml(token.href || "")}">🖼 ${escapeHtml(token.text || token.href || "image")}</a>`,
    },
  });

  const PURIFY = {
    ALLOWED_TAGS: ["a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
      "i", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table", "tbody", "td", "th",
      "thead", "tr", "ul"],
    ALLOWED_ATTR: ["href", "title", "class", "align", "start"],
    // http(s), mailto, #fragment, /path (not //host), ./ ../, or a relative name: no other scheme
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#|\/(?!\/)|\.{1,2}\/|[^:/?#]+(?:[/?#]|$))/i,
    ALLOW_DATA_ATTR: false,
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    }
  });

  // sanitized HTML of some lexed blocks
  function blocksToHtml(tokens, links) {
    const list = tokens.slice();
    list.links = links;
    return DOMPurify.sanitize(marked.parser(list), PURIFY);
  }

  function highlight(root) {
    for (const code of root.querySelectorAll("pre code:not(.hljs)")) {
      hljs.highlightElement(code);  // language from class="language-x", else detected
    }
  }

  // A "Copy" button on every code block of `root` (buttons are ours: added after sanitising)
  function addCodeButtons(root) {
    for (const pre of root.querySelectorAll("pre")) {
      if (pre.querySelector(":scope > .copy")) continue;
      const button = document.createElement("button");
      button.type = "button"; button.className = "copy"; button.textContent = "Copy";
      button.setAttribute("aria-label", "Copy the code");
      button.onclick = () => copyText(pre.querySelector("code")?.textContent ?? "", button);
      pre.prepend(button);
    }
  }

  // Clipboard API first; when it is refused (permissions, an insecure origin), a hidden textarea
  // and execCommand("copy"); when that fails too, the text is left selected for Ctrl+C.
  async function copyText(text, button) {
    const say = (label) => {
      button.textContent = label;
      clearTimeout(button.copyTimer);
      button.copyTimer = setTimeout(() => { button.textContent = button.dataset.label || "Copy"; }, 1500);
    };
    try {
      await navigator.clipboard.writeText(text);
      return say("Copied");
    } catch (e) { /* fall back below */ }
    const area = document.createElement("textarea");
    area.value = text; area.className = "offscreen"; area.setAttribute("readonly", "");
    document.body.append(area);
    area.select();
    let ok = false;
    try { ok = document.execCommand("copy"); } catch (e) { ok = false; }
    area.remove();
    say(ok ? "Copied" : "Press Ctrl+C");
  }

  // A finished piece of markdown (a saved reply): one pass
  function render(el, text) {
    const tokens = marked.lexer(text);
    el.innerHTML = blocksToHtml(tokens, tokens.links);
    highlight(el);
    addCodeButtons(el);
  }

  class StreamingMarkdown {
    constructor(el) { this.el = el; this.blocks = []; }  // blocks: [{raw, node, done}]; their raws join to the text

    // Re-lex only from the start of the second-to-last block (text appended to a reply can change
    // at most its last two blocks: a blank line then more list items extends a list). When the
    // reply has link definitions, the final update lexes it all once, so reference links resolve.
    update(text, final = false, all = false) {
      const relex = all || (final && /^ {0,3}\[[^\]]+\]:/m.test(text));  // link definitions: lex it all once
      let keep = relex ? 0 : Math.max(0, this.blocks.length - 2), offset = 0;
      for (let j = 0; j < keep; j++) offset += this.blocks[j].raw.length;
      if (text.slice(0, offset) !== this.blocks.slice(0, keep).map((b) => b.raw).join("")) keep = offset = 0;
      const tokens = marked.lexer(text.slice(offset));
      // marked normalises a few sources (a list item "- " at the very end): then lex it all
      if (offset && tokens.map((t) => t.raw).join("") !== text.slice(offset)) return this.update(text, final, true);
      let i = 0;  // tokens before i are unchanged
      while (i < tokens.length && keep + i < this.blocks.length && this.blocks[keep + i].raw === tokens[i].raw) i++;
      if (relex && Object.keys(tokens.links || {}).length) i = 0;  // reference links (rare): draw it all anew
      for (const block of this.blocks.splice(keep + i)) block.node.remove();
      for (let j = i; j < tokens.length; j++) {
        const node = document.createElement("div");
        node.className = "block";
        node.innerHTML = blocksToHtml([tokens[j]], tokens.links);
        this.el.append(node);
        this.blocks.push({ raw: tokens[j].raw, node, done: false });
      }
      // every block but the last is complete: highlight it once, give its code a copy button
      const settled = final ? this.blocks.length : this.blocks.length - 1;
      for (let j = 0; j < settled; j++) {
        const block = this.blocks[j];
        if (block.done) continue;
        highlight(block.node); addCodeButtons(block.node); block.done = true;
      }
    }
  }

  return { render, StreamingMarkdown, copyText, escapeHtml };
})();
