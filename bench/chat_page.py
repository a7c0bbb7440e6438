"""
The chat page's main thread while a long reply streams in: a 4,000-token markdown reply (prose,
lists, code blocks with and without a language, tables, inline and display math) streamed into
nanochat/ui.html in Chromium, as the page ships (once per animation frame, only the reply's last
blocks re-lexed and re-rendered) and, side by side, with the baseline the issue warns about (the
whole reply re-rendered at every frame).

Run:
    python bench/chat_page.py                       # 4,000 tokens, 2 ms apart (500 tok/s)
    python bench/chat_page.py --tokens 8000 --gap_ms 0
    python bench/chat_page.py --warm_up 0            # the page without its idle warm-up

The page is served by a small stand-in server here (http.server on 127.0.0.1), not by chat_web:
its / and /static/ are the real files with chat_web's CSP, /health a canned answer, and
/chat/completions streams the canned reply as SSE, one token per event, `--gap_ms` apart, over
real HTTP. No model is needed, so the page's cost is all that is measured.

What it reports, per mode (Chromium's own counters, via the DevTools protocol and the page's
PerformanceObserver):
- scripting: the main thread's total script time during the stream (CDP ScriptDuration), and
  layout + style time (LayoutDuration + RecalcStyleDuration);
- the longest task and the count of tasks over 50 ms from the moment the message is sent (Long
  Tasks API); the page's own load (parsing the vendored scripts) is shown on a row of its own;
- typing: a key is typed into #input every 50 ms during the stream; the worst and the median
  delay from the key's event to its handler (Event Timing API: processingStart - startTime);
- the wall time from the first token to the rendered end;
- tables, code blocks (of which highlighted: "lit") and formulas on the page at the end.
Both modes start once the page's idle warm-up is done (Markdown.warm), as a user's first reply would.
Goal: no task over 50 ms, and typing stays responsive throughout.
"""

import argparse
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

parser = argparse.ArgumentParser(description="Main-thread cost of streaming a long markdown reply into the chat page.")
parser.add_argument("--tokens", type=int, default=4000, help="reply length in SSE token events")
parser.add_argument("--gap_ms", type=float, default=2.0, help="time between two token events (0: as fast as possible)")
parser.add_argument("--warm_up", type=int, default=1, help="0: serve the page without its idle warm-up (to measure what it buys)")
parser.add_argument("--chromium", default="/usr/bin/chromium", help="the browser (bash dev/install_browser.sh)")
args = parser.parse_args()


def markdown_reply(n_tokens: int) -> list[str]:
    """A long reply in ~4-character tokens: sections of prose, a list, math, a Python block, a block that
    names no language (its language is guessed: static/highlight-worker.js) and a table."""
    sections = []
    i = 0
    while sum(len(s) for s in sections) < n_tokens * 4:
        sections.append(f"## Step {i}\n\nWe compute the **running total** of `values[{i}]` and keep the *maximum*; "
                        f"see [the docs](https://example.com/{i}).\n\n- first, read the input\n- then, add it up\n\n"
                        f"The mean is $\\bar{{x}} = \\frac{{1}}{{n}} \\sum_{{j=1}}^{{n}} x_j$, and for $5 the bound is\n\n"
                        f"$$\n\\max_{{j}} x_j \\le \\sqrt{{\\sum_{{j=1}}^{{n}} x_j^2}} + {i}\n$$\n\n"
                        f"```python\ndef total_{i}(values):\n    best = 0\n    for v in values:\n"
                        f"        best = max(best, v + {i})  # step {i}\n    return best\n```\n\n"
                        f"Run it:\n\n```\n$ python -m scripts.total --step {i} --values data/values_{i}.txt\n"
                        f"total_{i}: {i * 3} (max {i * 7})\n```\n\n"
                        f"| n | total | max |\n|---|---|---|\n| {i} | {i * 3} | {i * 7} |\n| {i + 1} | {i * 3 + 3} | {i * 7 + 7} |\n\n")
        i += 1
    text = "".join(sections)
    return [text[j:j + 4] for j in range(0, len(text), 4)][:n_tokens]


TOKENS = markdown_reply(args.tokens)
from scripts.chat_web import CSP  # noqa: E402  (the page gets the real policy)

FILES = {"/": REPO_ROOT / "nanochat" / "ui.html"}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def send(self, status, body: bytes, kind: str, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers:
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/health":
            health = {"model": "bench-canned", "depth": 0, "context_len": 0, "defaults": {}}
            return self.send(200, json.dumps(health).encode(), "application/json")
        path = FILES.get(self.path) or REPO_ROOT / "nanochat" / self.path.lstrip("/")
        if ".." in self.path or not path.is_file():
            return self.send(404, b"not found", "text/plain")
        kind = {".html": "text/html", ".js": "text/javascript", ".css": "text/css", ".svg": "image/svg+xml"}.get(
            path.suffix, "application/octet-stream")
        body = path.read_bytes()
        if not args.warm_up and path.name == "chat.js":
            body = body.replace(b"Markdown.warmUp();", b"")
        self.send(200, body, kind, [("Content-Security-Policy", CSP)] if path.suffix == ".html" else [])

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def chunk(data: str):
            raw = data.encode()
            self.wfile.write(f"{len(raw):x}\r\n".encode() + raw + b"\r\n")
            self.wfile.flush()
        t_next = time.perf_counter()
        for token in TOKENS:
            chunk(f"data: {json.dumps({'token': token})}\n\n")
            t_next += args.gap_ms / 1000
            if (delay := t_next - time.perf_counter()) > 0:
                time.sleep(delay)
        chunk(f"data: {json.dumps({'done': True, 'stats': {'tokens': len(TOKENS)}})}\n\n")
        self.wfile.write(b"0\r\n\r\n")


# The baseline: the whole reply re-rendered at every frame (what a simple page does)
FULL_RERENDER = """() => { Markdown.StreamingMarkdown.prototype.update = function (text) { Markdown.render(this.el, text); }; }"""
OBSERVE = """(() => {
  window.longTasks = []; window.keyDelays = []; window.observedFrom = performance.now();
  new PerformanceObserver((list) => { for (const e of list.getEntries())  // [start relative to now, duration]
      window.longTasks.push([e.startTime - window.observedFrom, e.duration]); })
    .observe({ type: 'longtask', buffered: true });
  new PerformanceObserver((list) => { for (const e of list.getEntries())
      if (e.name === 'keydown') window.keyDelays.push(e.processingStart - e.startTime); })
    .observe({ type: 'event', durationThreshold: 16, buffered: true });
  document.getElementById('input').addEventListener('keydown', (e) => {
      window.keyDelays.push(performance.now() - e.timeStamp); });
})();"""


def run(browser, url: str, baseline: bool) -> dict:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(600_000)
    page.goto(url)
    page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")
    if args.warm_up:  # the page's warm-up, done while idle (a user is still typing)
        page.wait_for_function("() => Markdown.warm")
    else:
        page.wait_for_timeout(1000)
    if baseline:
        page.evaluate(FULL_RERENDER)
    page.evaluate(OBSERVE)
    cdp = context.new_cdp_session(page)
    cdp.send("Performance.enable")
    metrics = lambda: {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}  # noqa: E731
    before = metrics()
    page.fill("#input", "go")
    page.press("#input", "Enter")
    t0 = time.perf_counter()
    page.wait_for_selector(".msg.assistant.streaming")
    while page.query_selector(".msg.assistant.streaming"):  # type while it streams
        page.keyboard.type("x")
        page.wait_for_timeout(50)
    page.wait_for_selector("#regenerate")
    wall = time.perf_counter() - t0
    try:  # blocks that name no language are highlighted by a worker: its last answers may still come
        page.wait_for_function("() => [...document.querySelectorAll('.msg.assistant pre code')]"
                               ".every((c) => c.querySelector('span'))", timeout=10_000)
    except Exception:
        pass  # counted below as not highlighted
    after = metrics()
    # buffered: the page's own load shows up too (start < 0); it is reported apart from the stream
    entries = page.evaluate("window.longTasks")
    long_tasks = [duration for start, duration in entries if start >= 0]
    load_tasks = [duration for start, duration in entries if start < 0]
    delays = sorted(page.evaluate("window.keyDelays"))
    rendered = page.locator(".msg.assistant .reply")
    result = {"scripting_s": after["ScriptDuration"] - before["ScriptDuration"],
              "layout_style_s": (after["LayoutDuration"] - before["LayoutDuration"]
                                 + after["RecalcStyleDuration"] - before["RecalcStyleDuration"]),
              "longest_task_ms": max(long_tasks, default=0.0), "tasks_over_50ms": len(long_tasks),
              "load_longest_task_ms": max(load_tasks, default=0.0),
              "key_delay_max_ms": delays[-1] if delays else 0.0,
              "key_delay_median_ms": delays[len(delays) // 2] if delays else 0.0, "keys": len(delays),
              "wall_s": wall, "tables": rendered.locator("table").count(), "code_blocks": rendered.locator("pre").count(),
              "highlighted": rendered.locator("pre code:has(span)").count(),
              "formulas": rendered.locator("math").count()}
    context.close()
    return result


def main():
    from playwright.sync_api import sync_playwright
    if not os.path.exists(args.chromium):
        raise SystemExit(f"{args.chromium} not found: run `bash dev/install_browser.sh`")
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    chars = sum(len(t) for t in TOKENS)
    print(f"streaming {len(TOKENS):,} tokens ({chars:,} characters of markdown), {args.gap_ms} ms apart, into {url}")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        results = {"page (last blocks, once a frame)": run(browser, url, baseline=False),
                   "baseline (whole reply every frame)": run(browser, url, baseline=True)}
        browser.close()
    server.shutdown()
    names = list(results)
    rows = [("scripting (s)", "scripting_s", "{:.2f}"), ("layout + style (s)", "layout_style_s", "{:.2f}"),
            ("longest task > 50 ms (ms)", "longest_task_ms", "{:.0f}"), ("tasks over 50 ms", "tasks_over_50ms", "{}"),
            ("page load: same (ms)", "load_longest_task_ms", "{:.0f}"),
            ("key delay, max (ms)", "key_delay_max_ms", "{:.0f}"), ("key delay, median (ms)", "key_delay_median_ms", "{:.1f}"),
            ("keys typed", "keys", "{}"), ("first token to end (s)", "wall_s", "{:.1f}"),
            ("tables / code (lit) / math", None, None)]
    print(f"\n| {'':24} | {names[0]:>36} | {names[1]:>36} | ratio |")
    print(f"|{'-' * 26}|{'-' * 38}:|{'-' * 38}:|------:|")
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{results[n]['tables']} / {results[n]['code_blocks']} ({results[n]['highlighted']}) / "
                     f"{results[n]['formulas']}" for n in names]
            print(f"| {label:24} | {cells[0]:>36} | {cells[1]:>36} |       |")
            continue
        a, b = results[names[0]][key], results[names[1]][key]
        ratio = f"{b / a:.1f}x" if a else "-"
        print(f"| {label:24} | {fmt.format(a):>36} | {fmt.format(b):>36} | {ratio:>5} |")
    page = results[names[0]]
    ok = page["tasks_over_50ms"] == 0 and page["key_delay_max_ms"] < 50
    print(f"\ngoal (no task over 50 ms, keys handled within 50 ms): {'met' if ok else 'NOT met'}")


if __name__ == "__main__":
    main()
