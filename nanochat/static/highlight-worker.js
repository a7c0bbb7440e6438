/* Guesses the language of a code block that names none, off the page's main thread.

   highlight.js guesses by running every grammar it has (~36) over the code and keeping the best
   score: ~110 ms the first time (each grammar is compiled on first use) and 20-50 ms for a 40-line
   block after that, on a 2-core machine. On the page that would be a stall the user feels while
   typing; here it costs the page nothing. static/markdown.js sends {id, code} and gets back
   {id, html, language}: highlight.js's HTML (the code escaped, in <span class="hljs-…">), which the
   page still sanitises before using it. A block that names its language is highlighted on the page
   itself (one grammar: a few ms). Served from /static/ like the page's scripts: the CSP's
   script-src 'self' is what allows it. */
"use strict";

importScripts("vendor/highlight.min.js");

onmessage = (event) => {
  const { id, code } = event.data;
  let html = null, language = null;
  try {
    const result = hljs.highlightAuto(String(code));
    html = result.value;
    language = result.language || null;
  } catch (e) { /* left plain on the page */ }
  postMessage({ id, html, language });
};
