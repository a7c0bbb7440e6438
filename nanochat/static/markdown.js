/* Markdown for the chat page (nanochat/ui.html): model output -> safe, highlighted DOM.

   Why marked (vendor/marked.min.js) and not markdown-it: both are CommonMark + GFM (tables, fences,
   autolinks); marked is 55 KB to markdown-it's ~100 KB with its dependencies, is faster on long
   inputs, and its lexer hands back the reply as a list of blocks, each with its raw source, which
   is what lets a streaming reply re-render only the block that is still growing.

   Math: `$…$` inline and `$$…$$` display, rendered by KaTeX (vendor/katex.min.js) to MathML,
   which the browser lays out itself (Chromium 109+, Firefox, Safari). Why MathML and not KaTeX's
   usual HTML output: that output positions every glyph with inline style="…" attributes, which the
   page's CSP (style-src 'self') blocks, and it needs KaTeX's CSS and its 20 web fonts; MathML
   needs neither, so the CSP stays strict and only the 273 KB script is vendored. A `$` opens math only
   when no space follows it and closes it only when no space precedes it and no digit follows it,
   so "$5 and $10" stays text; `\$` is a plain dollar; math in code stays code. Untrusted TeX is
   rendered with trust: false (no \href, \url, \includegraphics, \htmlClass: they show as red
   text), a cap on macro expansions and sizes, and a cap on length; a formula that fails to parse
   shows its source in red. An unclosed `$$` mid-stream is text until its `$$` arrives.

   Everything the model writes is untrusted. Three layers keep it inert:
   1. raw HTML in the markdown is rendered as escaped text (it shows, it never becomes elements);
   2. the HTML marked makes goes through DOMPurify, which allows no script, style, form, frame,
      svg or image elements, no style or event attributes, and only http(s)/mailto/relative URLs;
      links open in a new tab with rel="noopener noreferrer"; images become plain links, so a
      markdown image to another host loads nothing; of MathML it allows only the elements and
      attributes KaTeX writes (no maction, mglyph or annotation-xml, no href or src), and
      DOMPurify's own namespace checks (against MathML's mXSS tricks) stay on;
   3. the server's Content-Security-Policy runs only the page's own scripts and loads from it only.

   While a reply streams, `StreamingMarkdown.update(text)` is called at most once per animation
   frame; it lexes only the reply's last two blocks and re-renders only those whose source changed
   -- usually the last one -- so a 4,000-token reply is not re-lexed or re-rendered from the top at
   every frame (bench/chat_page.py measures it against doing so). An unclosed
   code fence lexes as a code block to the end of the text, so code in progress shows as code.
   The growing block is highlighted once it is complete (or the reply ends), not at every frame;
   a block that names no language is highlighted by a worker (see highlight() below). After the
   page loads, warmUp() pays the libraries' first-call costs while the page is idle. */
"use strict";

const Markdown = (() => {
  const escapeHtml = (s) => s.replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c]));

  // TeX -> MathML. maxExpand bounds macro expansion (\def\a{\a\a}\a is an error, not a hang),
  // maxSize bounds \rule and spaces (in em); no shared `macros` object, so a \gdef lasts one formula.
  // Errors are thrown and shown here: KaTeX's own error span has a style attribute (the CSP blocks it).
  // The browser picks the math font (Cambria Math, STIX Two Math...: chat.css); none is vendored.
  const KATEX = { output: "mathml", throwOnError: true, trust: false, strict: "ignore", maxExpand: 1000, maxSize: 50 };
  // A formula's cost is mostly the browser's (sanitising, laying out ~1 MathML element per 2-4
  // characters): 4,000 characters of dense TeX take 70-300 ms on a 2-core machine, about what
  // 12,000 characters of *emphasis* do. Longer formulas are shown as their source.
  const MAX_TEX = 4_000;
  function texToHtml(tex, displayMode) {
    let html;
    try {
      if (tex.length > MAX_TEX) throw new Error(`a formula of over ${MAX_TEX} characters is not rendered`);
      html = katex.renderToString(tex, { ...KATEX, displayMode });
    } catch (e) {  // a TeX error (KaTeX's ParseError), too long, or anything else KaTeX throws
      html = `<span class="katex-error" title="${escapeHtml(String(e && e.message))}">${escapeHtml(tex)}</span>`;
    }
    return displayMode ? `<span class="math-display">${html}</span>` : html;  // a block that scrolls when wide
  }

  // The body of a formula: backslash escapes, or anything but `$`. A display block has no blank
  // line (TeX forbids one in math, and it keeps a block inside one markdown paragraph, which the
  // streaming renderer below relies on).
  const INLINE_MATH = /^(?:\$\$((?:\\[^]|[^\\$])+?)\$\$|\$(?!\s)((?:\\[^]|[^\\$])+?)(?<!\s)\$(?!\d))/;
  const BLOCK_BODY = String.raw`((?:\\[^\n]|\n(?![ \t]*\n)|[^\\$\n])+?)`;
  const BLOCK_MATH = new RegExp(String.raw`^ {0,3}\$\$${BLOCK_BODY}\$\$[ \t]*(?:\n+|$)`);
  const BLOCK_MATH_AHEAD = new RegExp(String.raw`\n(?= {0,3}\$\$${BLOCK_BODY}\$\$[ \t]*(?:\n|$))`);
  const mathBlock = {
    name: "mathBlock", level: "block",
    start: (src) => { const i = src.search(BLOCK_MATH_AHEAD); return i < 0 ? undefined : i + 1; },  // ends a paragraph
    tokenizer: (src) => { const m = BLOCK_MATH.exec(src); if (m) return { type: "mathBlock", raw: m[0], text: m[1] }; },
    renderer: (token) => texToHtml(token.text, true) + "\n",
  };
  const mathInline = {
    name: "math", level: "inline",
    start: (src) => { const i = src.indexOf("$"); return i < 0 ? undefined : i; },
    tokenizer: (src) => {
      const m = INLINE_MATH.exec(src);
      if (m) return { type: "math", raw: m[0], text: m[1] ?? m[2], display: m[1] !== undefined };
    },
    renderer: (token) => texToHtml(token.text, token.display),
  };
  const INLINE_MATH_ALL = new RegExp(INLINE_MATH.source.slice(1), "g");

  marked.use({
    gfm: true,
    breaks: false,
    extensions: [mathBlock, mathInline],
    // marked looks for *emphasis* delimiters over the whole line first: hide the ones inside math
    hooks: { emStrongMask: (src) => src.replace(INLINE_MATH_ALL, (m) => "a".repeat(m.length)) },
    renderer: {
      html: (token) => escapeHtml(token.text),  // raw HTML, block or inline: shown, never run
      image: (token) => `<a href="${escapeHtml(token.href || "")}">🖼 ${escapeHtml(token.text || token.href || "image")}</a>`,
    },
  });

  // What KaTeX's MathML output is made of (its src/mathMLTree.ts), less mglyph (\includegraphics)
  const MATHML_TAGS = ["math", "semantics", "annotation", "mrow", "mi", "mn", "mo", "mtext", "mspace", "msup",
    "msub", "msubsup", "mover", "munder", "munderover", "mfrac", "mroot", "msqrt", "mtable", "mtr", "mtd",
    "mlabeledtr", "menclose", "mstyle", "mpadded", "mphantom"];
  const MATHML_ATTR = ["display", "encoding", "mathvariant", "mathcolor", "mathbackground", "mathsize", "stretchy",
    "fence", "separator", "lspace", "rspace", "largeop", "minsize", "maxsize", "accent", "accentunder", "width",
    "height", "depth", "voffset", "notation", "displaystyle", "scriptlevel", "linethickness", "linebreak",
    "columnalign", "columnlines", "columnspacing", "rowlines", "rowspacing"];
  const PURIFY = {
    ALLOWED_TAGS: ["a", "b", "blockquote", "br", "code", "del", "em", "h1", "h2", "h3", "h4", "h5", "h6", "hr",
      "i", "li", "ol", "p", "pre", "s", "span", "strong", "sub", "sup", "table", "tbody", "td", "th",
      "thead", "tr", "ul", ...MATHML_TAGS],
    ALLOWED_ATTR: ["href", "title", "class", "align", "start", ...MATHML_ATTR],
    // http(s), mailto, #fragment, /path (not //host), ./ ../, or a relative name: no other scheme
    ALLOWED_URI_REGEXP: /^(?:https?:|mailto:|#|\/(?!\/)|\.{1,2}\/|[^:/?#]+(?:[/?#]|$))/i,
    ALLOW_DATA_ATTR: false,
  };
  DOMPurify.addHook("afterSanitizeAttributes", (node) => {
    if (node.tagName === "A") {
      node.setAttribute("target", "_blank");
      node.setAttribute("rel", "noopener noreferrer");
    } else if (node.namespaceURI === "http://www.w3.org/1998/Math/MathML") {
      node.removeAttribute("href");  // a MathML link (Firefox follows them) would have neither
    }
  });

  const sanitize = (html) => DOMPurify.sanitize(html, PURIFY);

  // sanitized HTML of some lexed blocks
  function blocksToHtml(tokens, links) {
    const list = tokens.slice();
    list.links = links;
    return sanitize(marked.parser(list));
  }

  // A block that names its language (```python) is highlighted here: one grammar, a few ms. One
  // that names none is sent to static/highlight-worker.js, which guesses the language by running
  // every grammar (20-110 ms: too long for the page's main thread); its answer, sanitised to
  // <span class>, replaces the block's plain code if the block is still on the page, unchanged.
  function highlight(root) {
    for (const code of root.querySelectorAll("pre code:not(.hljs)")) {
      const named = /\blanguage-(\S+)/.exec(code.className);
      if (named) hljs.highlightElement(code);  // an unknown name leaves it plain
      else guessAndHighlight(code);
    }
  }

  let worker = null, nextId = 0;
  const waiting = new Map();  // id -> [code element, its text]
  function startWorker() {
    if (worker !== null) return worker;
    try {
      worker = new Worker("/static/highlight-worker.js");
    } catch (e) {
      return (worker = false);  // no workers here: such blocks stay plain
    }
    worker.onmessage = ({ data }) => {
      const entry = waiting.get(data?.id);
      waiting.delete(data?.id);
      if (!entry) return;
      const [code, text] = entry;
      if (!code.isConnected || code.textContent !== text) return;  // re-rendered or gone meanwhile
      if (typeof data.html === "string") {
        code.innerHTML = DOMPurify.sanitize(data.html, { ALLOWED_TAGS: ["span"], ALLOWED_ATTR: ["class"] });
        if (code.textContent !== text) code.textContent = text;  // highlighting never changes the code
      }
      const guess = typeof data.language === "string" && /^[\w+#-]{1,40}$/.test(data.language) ? data.language : "plaintext";
      code.classList.add(`language-${guess}`);  // the guess (also: this block is done)
    };
    worker.onerror = (event) => {  // e.g. the script did not load: handled here, not a page error
      event.preventDefault();
      worker.terminate();
      worker = false;
      waiting.clear();
    };
    return worker;
  }
  function guessAndHighlight(code) {
    code.classList.add("hljs");  // claimed (and styled): not sent twice
    if (!startWorker()) return;
    const text = code.textContent, id = ++nextId;
    waiting.set(id, [code, text]);
    worker.postMessage({ id, code: text });
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

  // The first call of each library is slow: marked and DOMPurify are compiled by the JIT (~15-25 ms),
  // KaTeX too (~5 ms), each highlight.js grammar is compiled on first use (2-35 ms), and the
  // browser's first layout of code and math shapes their fonts (~6 ms). Paid during the first
  // frames of a reply, these add up to one 25 ms task, or 60 ms on a busy machine. warmUp() pays them
  // while the page is idle after loading, one small step per idle callback: render a sample with
  // each kind of block, lay it out off screen (added and removed in the same step, so nothing else
  // ever sees it), compile every grammar, and start the worker that guesses languages; then
  // Markdown.warm is true.
  const SAMPLE = "## A title\n\nSome **bold**, *emphasis*, `code` and $x^2$:\n\n- one\n- two\n\n1. first\n\n" +
    "> quoted\n\n$$\n\\frac{1}{n} \\sum_{j=1}^{n} \\sqrt{x_j}\n$$\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n" +
    "```python\ndef f(x):\n    return x + 1  # one\n```\n";
  function warmUp() {
    const sample = document.createElement("div");
    sample.className = "md offscreen";
    sample.setAttribute("aria-hidden", "true");
    const steps = [
      () => marked.lexer(SAMPLE),
      () => katex.renderToString("\\sqrt{x^2}", KATEX) + katex.renderToString("\\frac{1}{n}", { ...KATEX, displayMode: true }),
      () => hljs.highlight("def f(x):\n    return x  # one\n", { language: "python" }),
      () => sanitize(marked.parse(SAMPLE)),
      () => render(sample, SAMPLE),
      () => {
        document.body.append(sample);
        sample.getBoundingClientRect();  // forces style and layout now
        sample.remove();
      },
      ...hljs.listLanguages().map((language) => () => hljs.highlight("x = 1", { language, ignoreIllegals: true })),
      startWorker,
      () => { api.warm = true; },
    ];
    const idle = window.requestIdleCallback || ((f) => setTimeout(f, 50));  // Safari has no requestIdleCallback
    const run = () => {  // one step a callback: two cold steps in a row can pass 50 ms
      try { steps.shift()(); } catch (e) { /* a warm-up step is never worth an error */ }
      if (steps.length) idle(run, { timeout: 2000 });
    };
    idle(run, { timeout: 2000 });
  }

  const api = { render, StreamingMarkdown, copyText, escapeHtml, sanitize, warmUp, warm: false };
  return api;
})();
