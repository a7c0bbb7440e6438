"""
The chat page (nanochat/ui.html + nanochat/static/) in a real browser: Playwright driving Debian's
Chromium (/usr/bin/chromium; install it with `bash dev/install_browser.sh`, never `playwright
install`) against `python -m scripts.chat_web` on 127.0.0.1 serving the tiny trained chat model of
tests/test_chat_web.py. Replies the tiny model cannot write (markdown, XSS payloads) come from a
canned /chat/completions response (Playwright's routing) into the same page code. Screenshots
go to the test's tmp dir and, when $NANOCHAT_ARTIFACTS is set, there too.

Robust under load: every wait is on the page's state (a selector, a function of the DOM), never a
sleep; the streaming test slows the stream itself down to one event per two animation frames.
"""

import json
import os
import re
import shutil
import time

import pytest
import requests

from test_chat_web import CALC_TEXT, HI_REPLY, SING_CHUNK, chat_base_dir, run_server  # noqa: F401  (a fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: run `bash dev/install_browser.sh` (apt-get installs Debian's chromium)")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(chat_base_dir, tmp_path_factory):
    # Greedy: the tiny model has learned its replies, but sampling at 0.8 can still stray from them.
    with run_server(chat_base_dir, tmp_path_factory.mktemp("browser_logs"), "-m", "40", "-t", "0") as server:
        yield server


class Page:
    """A browser tab (its own context: its own localStorage) on the page, recording the bodies it
    POSTs to /chat/completions, every URL it requests, every dialog and every page error."""

    def __init__(self, browser, url, viewport=DESKTOP, color_scheme="light", init_script=None, **context):
        self.context = browser.new_context(viewport=viewport, color_scheme=color_scheme, **context)
        self.page = self.context.new_page()
        self.page.set_default_timeout(20_000)
        self.url, self.errors, self.posts, self.requests, self.dialogs = url, [], [], [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("dialog", lambda d: (self.dialogs.append(d.message), d.dismiss()))
        self.page.on("request", self.on_request)
        if init_script:
            self.page.add_init_script(init_script)
        self.goto()

    def on_request(self, r):
        self.requests.append(r.url)
        if r.method == "POST" and r.url.endswith("/chat/completions"):
            self.posts.append(json.loads(r.post_data))

    def goto(self):
        self.page.goto(self.url)
        self.page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")

    def reload(self):
        self.page.reload()
        self.page.wait_for_function("() => document.getElementById('model-name').textContent.length > 0")

    def send(self, text):
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self):  # the reply finished: the regenerate/retry button is back
        self.page.wait_for_selector("#regenerate")

    def texts(self, selector):
        return self.page.locator(selector).all_inner_texts()

    def replies(self):  # the assistant messages' text (not their copy button and stats)
        return [t.strip() for t in self.texts(".msg.assistant .reply")]

    def canned(self, events):
        """Answer the next POSTs to /chat/completions with these SSE events (dicts), ending with done."""
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in [*events, {"done": True, "finish_reason": "stop"}])
        self.page.route("**/chat/completions", lambda route: route.fulfill(
            status=200, headers={"Content-Type": "text/event-stream"}, body=body))

    def foreign_requests(self):  # every request not to the server (data:/blob: are the page's own)
        return [u for u in self.requests if not u.startswith((self.url, "data:", "blob:"))]

    def close(self):
        assert not self.errors, self.errors
        assert not self.dialogs, self.dialogs
        assert not self.foreign_requests(), self.foreign_requests()
        self.context.close()


@pytest.fixture
def page(browser, server):
    page = Page(browser, server.url)
    yield page
    page.close()


def save_screenshot(page, tmp_path, name):
    path = tmp_path / f"{name}.png"
    page.page.screenshot(path=str(path), full_page=True)
    if os.environ.get("NANOCHAT_ARTIFACTS"):
        os.makedirs(os.environ["NANOCHAT_ARTIFACTS"], exist_ok=True)
        shutil.copy(path, os.path.join(os.environ["NANOCHAT_ARTIFACTS"], path.name))
    assert path.stat().st_size > 5_000
    return path


# The page's fetch of /chat/completions, re-chunked: one SSE event per read, each two animation
# frames after the last, so the page draws every state of the reply however fast the server is.
# Stopping aborts it as it aborts a real fetch (the wrapper may already hold the whole reply).
SLOW_STREAM = """(() => {
  const realFetch = window.fetch, encoder = new TextEncoder();
  const frames = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  window.fetch = async (url, options) => {
    const res = await realFetch(url, options);
    if (!String(url).endsWith('/chat/completions') || !res.ok) return res;
    const reader = res.body.getReader(), decoder = new TextDecoder();
    let buffer = '';
    return new Response(new ReadableStream({ async pull(controller) {
      while (buffer.indexOf('\\n\\n') < 0) {
        const { value, done } = await reader.read();
        if (done) { if (buffer) controller.enqueue(encoder.encode(buffer)); buffer = ''; controller.close(); return; }
        buffer += decoder.decode(value, { stream: true });
      }
      await frames();
      // a real fetch's body errors once aborted, even when all of it has arrived: so does this one
      if (options && options.signal && options.signal.aborted) throw new DOMException('aborted', 'AbortError');
      const cut = buffer.indexOf('\\n\\n') + 2;
      controller.enqueue(encoder.encode(buffer.slice(0, cut)));
      buffer = buffer.slice(cut);
    } }), { status: res.status, headers: res.headers });
  };
})();"""


def test_type_send_and_watch_the_reply_stream_in(browser, server, tmp_path):
    page = Page(browser, server.url, init_script=SLOW_STREAM)
    assert page.page.is_visible("#empty")
    # Record the reply's text at every change of the page
    page.page.evaluate("""() => { window.seen = []; new MutationObserver(() => {
        const reply = document.querySelector('.msg.assistant .reply');
        if (reply) window.seen.push(reply.textContent.trim());
      }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true}); }""")
    page.send("hi")
    page.wait_idle()
    assert page.texts(".msg.user .bubble") == ["hi"]
    assert page.replies() == [HI_REPLY]
    seen = [s for s in page.page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 5, seen  # partial replies were shown before the whole one
    assert all(HI_REPLY.startswith(s) for s in seen), seen
    assert not any("\ufffd" in s for s in seen)  # never half an emoji
    assert page.page.input_value("#input") == "" and not page.page.is_visible("#empty")
    assert page.posts == [{"messages": [{"role": "user", "content": "hi"}]}]
    save_screenshot(page, tmp_path, "chat_desktop")
    page.close()


def test_shift_enter_adds_a_line_and_the_input_grows(page):
    box = page.page.locator("#input")
    height = box.bounding_box()["height"]
    box.type("first line")
    for _ in range(3):
        box.press("Shift+Enter")
    box.type("last line")
    assert page.page.input_value("#input") == "first line\n\n\nlast line"
    assert box.bounding_box()["height"] > height + 30
    assert page.posts == [] and page.texts(".msg") == []
    assert page.page.is_disabled("#send") is False


def test_edit_a_message_truncates_and_resends(page):
    page.send("hi")
    page.wait_idle()
    page.send("sing")
    page.wait_idle()
    assert page.texts(".msg.user .bubble") == ["hi", "sing"]
    page.page.click(".msg.user .bubble >> nth=0")
    page.page.fill("#edit-box", "sing")
    page.page.click("#edit-save")
    page.wait_idle()
    assert page.texts(".msg.user .bubble") == ["sing"]  # the later turns are gone
    [reply] = page.replies()
    assert reply and (SING_CHUNK * 12).startswith(reply)
    assert page.posts[-1]["messages"] == [{"role": "user", "content": "sing"}]
    # Escape cancels an edit
    page.page.click(".msg.user .bubble")
    page.page.press("#edit-box", "Escape")
    assert page.texts(".msg.user .bubble") == ["sing"]


def test_regenerate_replaces_the_last_reply(page):
    page.send("hi")
    page.wait_idle()
    page.send("/temperature 0")
    page.page.click("#regenerate")
    page.wait_idle()
    assert page.replies() == [HI_REPLY]  # replaced, not appended
    assert len(page.posts) == 2 and page.posts[1] == {"messages": [{"role": "user", "content": "hi"}],
                                                      "temperature": 0}


def test_slash_commands(page):
    page.send("/help")
    assert "/temperature" in page.texts(".msg.notice")[-1] and "/topk" in page.texts(".msg.notice")[-1]
    page.send("/temperature 0.5")
    assert page.texts(".msg.notice")[-1] == "Temperature set to 0.5."
    page.send("/topk 7")
    assert page.texts(".msg.notice")[-1] == "Top-k set to 7."
    page.send("/topk 1.5")
    assert "whole number from 0 to 200" in page.texts(".msg.notice")[-1]
    page.send("/temperature 9")
    assert "from 0 to 2" in page.texts(".msg.notice")[-1]
    page.send("/nope")
    assert "Unknown command /nope" in page.texts(".msg.notice")[-1]
    assert page.posts == []  # commands never reach the model
    page.send("hi")
    page.wait_idle()
    assert page.posts[-1] == {"messages": [{"role": "user", "content": "hi"}], "temperature": 0.5, "top_k": 7}
    page.reload()  # settings persist in localStorage (and the conversation too)
    assert page.texts(".msg.user .bubble") == ["hi"]
    page.send("/temperature")
    assert page.texts(".msg.notice")[-1].startswith("Temperature: 0.5")
    page.send("/clear")
    assert page.texts(".msg") == [] and page.page.is_visible("#empty")
    page.send("/temperature default")
    page.send("/topk default")
    page.send("hi")
    page.wait_idle()
    assert page.posts[-1] == {"messages": [{"role": "user", "content": "hi"}]}


def test_new_chat_button(page):
    page.send("hi")
    page.wait_idle()
    page.page.click("#new-chat")
    assert page.texts(".msg") == [] and page.page.is_visible("#empty")
    assert page.page.evaluate("document.activeElement.id") == "input"


def test_server_error_shows_its_message_in_the_banner(page):
    page.send("x" * 8_001)
    page.page.wait_for_selector("#banner:not([hidden])")
    assert "too long" in page.page.inner_text("#banner-text") and "400" in page.page.inner_text("#banner-text")
    assert page.replies() == []  # no empty reply left behind
    assert page.page.inner_text("#regenerate") == "↻ Retry"
    page.page.click("#banner-close")
    assert page.page.is_hidden("#banner")


STOP_WHEN_STREAMING = """() => { window.stopState = new Promise((resolve, reject) => {
    const check = () => {
        const reply = document.querySelector('.msg.assistant.streaming .reply');
        if (!reply || reply.textContent.length <= 12) return false;
        const send = document.getElementById('send');
        const state = {label: send.getAttribute('aria-label'),
                       stop_icon: !document.getElementById('icon-stop').hasAttribute('hidden'),
                       send_icon: !document.getElementById('icon-send').hasAttribute('hidden')};
        send.click();
        resolve(state);
        return true;
    };
    const observer = new MutationObserver(() => {
        try { if (check()) observer.disconnect(); } catch (e) { observer.disconnect(); reject(e); }
    });
    observer.observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    setTimeout(() => { observer.disconnect(); reject(new Error('no streaming reply of 12+ characters')); }, 20000);
}); }"""


@pytest.mark.slow  # starts a server of its own (~5-10 s)
def test_stop_a_reply_then_the_error_banner_when_the_server_is_stopped(browser, chat_base_dir, tmp_path):
    # "sing" goes on for 2,000 tokens, greedily (-t 0), so the reply is known. The tiny model sings
    # cleanly only as far as it was trained (24 chunks) and then drifts, so the test compares the
    # stopped reply with the server's own full reply rather than with an endless song.
    with run_server(chat_base_dir, tmp_path, "-m", "2000", "-t", "0") as server:
        page = Page(browser, server.url)
        aborted = []
        page.page.on("requestfailed",
                     lambda r: aborted.append(r.failure) if r.url.endswith("/chat/completions") else None)
        # The whole reply streams in under a second on a fast machine: a round trip from Python per
        # check could land after its end. So the page itself watches the stream and, at its first
        # dozen characters, records the button's state and clicks it.
        page.page.evaluate(STOP_WHEN_STREAMING)
        page.send("sing")
        before_click = page.page.evaluate("window.stopState")
        assert before_click == {"label": "Stop generating", "stop_icon": True, "send_icon": False}
        page.wait_idle()
        [partial] = page.replies()
        assert page.page.inner_text(".msg.assistant .stats") == "stopped"
        assert page.page.is_hidden("#banner")  # stopping is not an error
        assert page.page.is_visible("#icon-send") and page.page.is_hidden("#icon-stop")
        assert aborted == ["net::ERR_ABORTED"]  # the page aborted its request
        # The server frees its worker either way: it notices the disconnect and cancels (usually
        # within ~50 tokens), or, when the browser closes the socket late, the 0.8 s reply has
        # already run out (test_chat_web.py tests the cancel itself, with a raw socket).
        deadline = time.time() + 10
        while (stats := requests.get(server.url + "/stats", timeout=5).json())["requests_in_flight"] != 0:
            assert time.time() < deadline, str(stats)
            time.sleep(0.05)
        assert stats["workers_available"] == 1 and stats["requests_cancelled"] + stats["requests_served"] == 1
        full = requests.post(server.url + "/v1/chat/completions", timeout=120, json={
            "messages": [{"role": "user", "content": "sing"}]}).json()["choices"][0]["message"]["content"]
        assert full.startswith(SING_CHUNK * 20)
        assert full.startswith(partial) and 0 < len(partial) < len(full) // 2  # cut well before the end

        server.stop()
        page.send("hi again")
        page.page.wait_for_selector("#banner:not([hidden])")
        assert "Cannot reach the server" in page.page.inner_text("#banner-text")
        assert page.texts(".msg.user .bubble") == ["sing", "hi again"]
        assert page.page.inner_text("#regenerate") == "↻ Retry"
        save_screenshot(page, tmp_path, "error_banner")
        page.close()


def test_phone_viewport(browser, server, tmp_path):
    page = Page(browser, server.url, viewport=PHONE, color_scheme="dark")
    page.send("hi")
    page.wait_idle()
    page.send("sing")
    page.wait_idle()
    width = page.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"horizontal scrolling on a phone: {width}px"
    box = page.page.locator("#composer").bounding_box()
    assert box["y"] + box["height"] <= PHONE["height"] and box["width"] <= PHONE["width"]
    assert page.page.is_visible("#new-chat")
    save_screenshot(page, tmp_path, "chat_phone")
    # the saved conversations are a drawer: closed, opened by the menu button, closed by a choice
    sidebar = page.page.locator("#sidebar")
    assert sidebar.bounding_box()["x"] + sidebar.bounding_box()["width"] <= 0
    page.page.click("#toggle-sidebar")
    page.page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    assert page.texts("#conversations .open") == ["hi"]
    page.page.click("#conversations .open")
    page.page.wait_for_function("() => document.getElementById('sidebar').getBoundingClientRect().right <= 0")
    assert page.texts(".msg.user .bubble") == ["hi", "sing"]
    page.close()


def test_accessibility_basics(page):
    assert page.page.locator("label[for=input]").count() == 1
    for selector in ("#send", "#new-chat", "#banner-close"):
        assert page.page.get_attribute(selector, "aria-label")
    assert page.page.get_attribute("#messages", "role") == "log"
    page.send("hi")
    page.wait_idle()
    page.page.focus("#input")  # the keyboard reaches the user's message (a button) to edit it
    page.page.keyboard.press("Shift+Tab")
    for _ in range(6):
        if page.page.evaluate("document.activeElement.className") == "bubble":
            break
        page.page.keyboard.press("Shift+Tab")
    assert page.page.evaluate("document.activeElement.className") == "bubble"
    page.page.keyboard.press("Enter")
    assert page.page.is_visible("#edit-box")


# -----------------------------------------------------------------------------
# Rendered replies: markdown, highlighting, tool chips, copy, stats

MARKDOWN_REPLY = """# Title

Some **bold**, *italic*, `inline code` and a [link](https://example.com/docs).

- one
- two

1. first
2. second

> a quote

| name | value |
| ---- | ----- |
| pi   | 3.14  |

```python
def add(a, b):
    return a + b  # <b>not bold</b>
```
"""
CODE = 'def add(a, b):\n    return a + b  # <b>not bold</b>\n'


def test_markdown_is_rendered_and_code_highlighted(page):
    page.canned([{"token": MARKDOWN_REPLY[i:i + 7]} for i in range(0, len(MARKDOWN_REPLY), 7)])
    page.send("show me markdown")
    page.wait_idle()
    reply = page.page.locator(".msg.assistant .reply")
    counts = {tag: reply.locator(tag).count() for tag in ("h1", "strong", "em", "code", "pre", "a", "ul li", "ol li",
                                                          "blockquote", "table", "th", "td")}
    assert counts == {"h1": 1, "strong": 1, "em": 1, "code": 2, "pre": 1, "a": 1, "ul li": 2, "ol li": 2,
                      "blockquote": 1, "table": 1, "th": 2, "td": 2}, counts
    assert reply.locator("pre code").inner_text() == CODE  # the <b> in the code is text
    assert reply.locator("pre code span[class^=hljs-]").count() >= 3  # highlighted (keyword, title, comment)
    link = reply.locator("a")
    assert link.get_attribute("target") == "_blank" and link.get_attribute("rel") == "noopener noreferrer"
    # the user's own message stays plain text, line breaks kept
    page.send("**not bold**\nsecond line")
    page.wait_idle()
    assert page.texts(".msg.user .bubble")[-1] == "**not bold**\nsecond line"


TRICKY_MARKDOWN = """Setext title
============

- a loose list

- that goes on after a blank line
  and wraps

1. numbers
2. more

A paragraph
that continues.

    indented code

```
unclosed fence at the end
"""


def streamed_and_once(page, text: str) -> dict:
    """The incremental renderer (re-lexes and re-renders only the last blocks) against one full
    render of `text`, cut at every length: the first mismatches of elements and text, and whether
    the final HTML is the same. The full render stays in window.renderedOnce for further checks."""
    return page.page.evaluate("""(text) => {
        const once = document.createElement('div'), live = document.createElement('div');
        const stream = new Markdown.StreamingMarkdown(live);
        const shape = (el) => [...el.querySelectorAll('*')].filter((e) => !['DIV', 'BUTTON', 'SPAN'].includes(e.tagName))
            .map((e) => e.tagName).join(',') + '|' + el.textContent.replace(/Copy/g, '');
        const mismatches = [];
        for (let n = 1; n <= text.length; n++) {
            stream.update(text.slice(0, n));
            Markdown.render(once, text.slice(0, n));
            if (shape(live) !== shape(once)) mismatches.push([n, shape(live), shape(once)]);
        }
        stream.update(text, true);
        Markdown.render(once, text);
        window.renderedOnce = once;
        return {mismatches: mismatches.slice(0, 3), same: live.innerHTML.replace(/<\\/?div[^>]*>/g, '') === once.innerHTML};
    }""", text)


@pytest.mark.parametrize("name", ["reply", "tricky"])
def test_streaming_markdown_renders_the_same_as_rendering_once(page, name):
    """Streamed and rendered once, with the text cut at every length: the same elements and the
    same text; at the end, the same HTML. An unclosed fence shows as code while it streams."""
    text = {"reply": MARKDOWN_REPLY, "tricky": TRICKY_MARKDOWN}[name]
    result = streamed_and_once(page, text)
    assert result["mismatches"] == [] and result["same"], result
    result = page.page.evaluate("""() => {
        // a reference link resolves once the reply is complete (mid-stream, only the last blocks are re-lexed)
        const refs = document.createElement('div'), refStream = new Markdown.StreamingMarkdown(refs);
        const refText = '[ref]: https://example.com/ref\\n\\nSome text.\\n\\nMore.\\n\\nA [link][ref].';
        for (let n = 1; n <= refText.length; n++) refStream.update(refText.slice(0, n));
        refStream.update(refText, true);
        const fence = document.createElement('div');
        new Markdown.StreamingMarkdown(fence).update('Here:\\n\\n```js\\nconst x = 1;\\nconst y');
        return {reference: !!refs.querySelector('a[href="https://example.com/ref"]'),
                fence: fence.querySelector('pre code') && fence.querySelector('pre code').textContent};
    }""")
    assert result["reference"], "a reference link did not resolve once the reply was complete"
    assert result["fence"].rstrip("\n") == "const x = 1;\nconst y"


def test_a_tool_call_shows_as_a_collapsed_chip(page):
    page.send("calc")
    page.wait_idle()
    chip = page.page.locator(".msg.assistant details.tool")
    assert chip.count() == 1 and chip.get_attribute("open") is None
    assert chip.locator("summary").inner_text() == "calculator · 6*7 → 42"
    assert [t.strip() for t in page.texts(".msg.assistant .reply .md")] == ["Let me compute.", "The answer is 42."]
    assert " ".join(t.strip() for t in page.texts(".msg.assistant .reply .md")) == CALC_TEXT
    assert "<|" not in page.page.inner_text("#messages")
    chip.locator("summary").click()
    assert chip.get_attribute("open") is not None and "output: 42" in chip.inner_text()
    page.reload()  # saved with the conversation
    assert page.page.locator("details.tool summary").inner_text() == "calculator · 6*7 → 42"


def test_stats_under_each_reply_and_the_model_in_the_footer(page):
    page.send("hi")
    page.wait_idle()
    stats = page.page.inner_text(".msg.assistant .stats")
    assert re.fullmatch(r"\d+ tokens · [\d.]+ (ms|s) to first token · [\d.]+ tok/s", stats), stats
    assert page.page.inner_text("#model-info") == "nanochat-sft-d2-step80 · depth 2 · context 2,048 tokens"


def test_copy_a_code_block_and_a_message(browser, server):
    page = Page(browser, server.url, permissions=["clipboard-read", "clipboard-write"])
    page.canned([{"token": MARKDOWN_REPLY}])
    page.send("code please")
    page.wait_idle()
    button = page.page.locator(".msg.assistant pre .copy")
    button.click()
    page.page.wait_for_function("() => document.querySelector('pre .copy').textContent === 'Copied'")
    assert page.page.evaluate("navigator.clipboard.readText()") == CODE
    page.page.locator(".msg.assistant .copy-message").click()
    page.page.wait_for_function("() => document.querySelector('.msg.assistant .copy-message').textContent === 'Copied'")
    assert page.page.evaluate("navigator.clipboard.readText()") == MARKDOWN_REPLY
    page.page.locator(".msg.user .copy-message").click()
    page.page.wait_for_function("() => document.querySelector('.msg.user .copy-message').textContent === 'Copied'")
    assert page.page.evaluate("navigator.clipboard.readText()") == "code please"
    # the clipboard API refused: the fallback copies the selected text of a hidden textarea
    page.page.evaluate("""() => {
        navigator.clipboard.writeText = () => Promise.reject(new DOMException('denied', 'NotAllowedError'));
        window.copied = null;
        document.addEventListener('copy', () => { window.copied = document.activeElement.value; });
    }""")
    page.page.wait_for_function("() => document.querySelector('pre .copy').textContent === 'Copy'")
    button.click()
    page.page.wait_for_function("() => window.copied !== null")
    assert page.page.evaluate("window.copied") == CODE
    assert button.inner_text() in ("Copied", "Press Ctrl+C")
    page.close()


# -----------------------------------------------------------------------------
# Untrusted text stays inert

XSS = [
    "<script>window.pwned = 1; alert(1)</script>",
    "<img src=x onerror=\"window.pwned = 2; alert(2)\">",
    "<svg onload=\"window.pwned = 3\"><circle r=5></circle></svg>",
    "<iframe src=\"javascript:window.parent.pwned = 4\"></iframe>",
    "<iframe srcdoc=\"<script>parent.pwned = 5</script>\"></iframe>",
    "<style>body { display: none }</style>",
    "<form action=\"https://evil.example/steal\"><button>go</button></form>",
    "[click](javascript:window.pwned=6)",
    "[click](JaVaScRiPt:window.pwned=7)",
    "[click](data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==)",
    "![tracker](https://evil.example/pixel.png)",
    "![tracker](//evil.example/pixel.png)",
    "![x](x\" onerror=\"window.pwned=8)",
    "<a href=\"javascript:window.pwned=9\">x</a>",
    "<details open ontoggle=\"window.pwned=10\">x</details>",
    "<math><mtext><table><mglyph><style><img src=x onerror=window.pwned=11>",
    "<object data=\"https://evil.example/x.swf\"></object>",
    "<embed src=\"https://evil.example/x\">",
    "<link rel=stylesheet href=\"https://evil.example/x.css\">",
    "<meta http-equiv=\"refresh\" content=\"0;url=https://evil.example/\">",
    "<base href=\"https://evil.example/\">",
    "<video><source onerror=\"window.pwned=12\"></video>",
    "<body onload=window.pwned=13>",
    "<input autofocus onfocus=\"window.pwned=14\">",
    "[x](https://evil.example/\" onmouseover=\"window.pwned=15)",
    "<a href=\"https://evil.example/\" style=\"position:fixed;inset:0\">cover</a>",
    "`<img src=x onerror=window.pwned=16>`",
    "```html\n<script>window.pwned = 17</script>\n```",
    "<noscript><p title=\"</noscript><img src=x onerror=window.pwned=18>\">",
    "<scr<script>ipt>window.pwned=19</script>",
    "[a](vbscript:msgbox(20))",
    "<svg><a xlink:href=\"javascript:window.pwned=21\"><text y=20>x</text></a></svg>",
]


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitiser-alone"])
def test_xss_payloads_in_replies_and_user_messages_run_and_load_nothing(browser, server, bypass_csp):
    """Every payload, as a reply and as a user message: no global set, no dialog, no request to
    another host, and no element or attribute that could run or load. Run with the page's CSP and
    again without it (bypass_csp), so that the sanitiser alone must hold."""
    page = Page(browser, server.url, bypass_csp=bypass_csp)
    assert len(XSS) >= 20
    reply = "\n\n".join(f"Payload {i}: {p}" for i, p in enumerate(XSS))
    page.canned([{"token": reply[i:i + 11]} for i in range(0, len(reply), 11)])
    for payload in XSS[:10]:
        page.send(payload)
        page.wait_idle()
    page.send("\n".join(XSS))
    page.wait_idle()
    page.reload()  # and rendered again from storage
    page.page.wait_for_selector(".msg.assistant")
    bad = page.page.evaluate("""() => {
        const found = [];
        for (const el of document.querySelectorAll('#messages *')) {
            if (['SCRIPT', 'IMG', 'SVG', 'IFRAME', 'STYLE', 'FORM', 'OBJECT', 'EMBED', 'LINK', 'META', 'BASE',
                 'VIDEO', 'SOURCE', 'MATH', 'INPUT', 'BODY'].includes(el.tagName.toUpperCase())) found.push(el.outerHTML);
            for (const a of el.attributes) {
                if (/^on/i.test(a.name) || a.name === 'style' || a.name === 'srcdoc') found.push(a.name + '=' + a.value);
                if (/^(href|src|xlink:href|action|data)$/i.test(a.name) && !/^(https?:|#|\\/[^/]|[^:]*$)/i.test(a.value))
                    found.push(a.name + '=' + a.value);
            }
        }
        return found;
    }""")
    assert bad == []
    assert page.page.evaluate("window.pwned") is None
    assert "Payload 0: <script>" in page.page.inner_text(".msg.assistant .reply")  # shown as text
    page.page.hover(".msg.assistant .reply a >> nth=0")
    page.page.wait_for_timeout(300)  # a chance for anything deferred (onerror, ontoggle) to run
    assert page.page.evaluate("window.pwned") is None
    assert page.page.is_visible("#input")  # no style hid the page
    page.close()  # no dialog, no page error, no request to another host


# -----------------------------------------------------------------------------
# Saved conversations

def test_conversations_survive_a_reload_and_can_be_opened_renamed_and_deleted(page):
    page.send("hi")
    page.wait_idle()
    page.page.click("#new-chat")
    page.send("sing")
    page.wait_idle()
    assert page.texts("#conversations .open") == ["sing", "hi"]  # newest first
    page.reload()
    assert page.texts("#conversations .open") == ["sing", "hi"]
    assert page.texts(".msg.user .bubble") == ["sing"]  # the open conversation is back
    page.page.click("#conversations .open >> text=hi")
    assert page.texts(".msg.user .bubble") == ["hi"] and page.replies() == [HI_REPLY]
    page.page.click("#conversations .conversation.current .rename")
    page.page.fill(".rename-box", "greetings")
    page.page.press(".rename-box", "Enter")
    page.reload()
    assert page.texts("#conversations .open") == ["sing", "greetings"]
    assert page.texts(".msg.user .bubble") == ["hi"]
    page.page.click("#conversations .conversation.current .delete")
    assert page.texts("#conversations .open") == ["sing"] and page.page.is_visible("#empty")
    page.reload()
    assert page.texts("#conversations .open") == ["sing"]
    with page.page.expect_download() as download:
        page.page.click("#conversations .open")
        page.page.click("#export-json")
    saved = json.loads(open(download.value.path()).read())
    assert [m["role"] for m in saved["messages"]] == ["user", "assistant"] and saved["title"] == "sing"
    with page.page.expect_download() as download:
        page.page.click("#export-md")
    text = open(download.value.path()).read()
    assert text.startswith("# sing\n") and "## You\n\nsing" in text and SING_CHUNK.strip() in text


def test_a_stopped_reply_is_saved(browser, server):
    page = Page(browser, server.url, init_script=SLOW_STREAM)
    page.page.evaluate(STOP_WHEN_STREAMING)
    page.send("sing")
    page.page.evaluate("window.stopState")
    page.wait_idle()
    [partial] = page.replies()
    page.reload()
    assert page.replies() == [partial] and page.page.inner_text(".msg.assistant .stats") == "stopped"
    page.close()


@pytest.mark.parametrize("saved", ["{not json", '{"a": 1}', '[{"id": 5}]', "[null]"])
def test_corrupt_saved_data_gives_a_notice_and_a_working_page(browser, server, saved):
    page = Page(browser, server.url,
                init_script=f"if (!sessionStorage.seeded) {{ localStorage.setItem('nanochat-conversations', "
                            f"{json.dumps(saved)}); sessionStorage.seeded = 1; }}")
    assert page.page.is_visible("#storage-notice") and "could not be read" in page.page.inner_text("#storage-text")
    page.send("hi")
    page.wait_idle()
    assert page.replies() == [HI_REPLY]
    page.reload()  # saved over the corrupt data (which is kept aside)
    assert page.page.is_hidden("#storage-notice") and page.texts("#conversations .open") == ["hi"]
    assert page.page.evaluate("localStorage.getItem('nanochat-conversations-unreadable')") == saved
    page.close()


def test_a_full_storage_quota_gives_a_notice_and_a_working_page(browser, server):
    page = Page(browser, server.url, init_script="""Storage.prototype.setItem = function () {
        throw new DOMException('the quota has been exceeded', 'QuotaExceededError'); };""")
    page.send("hi")
    page.wait_idle()
    assert page.replies() == [HI_REPLY]
    assert "storage is full" in page.page.inner_text("#storage-text") and page.page.is_visible("#storage-notice")
    page.close()


# -----------------------------------------------------------------------------
# Screenshots for the README (docs/): a rendered reply with code, a table and a tool chip

SHOWCASE = [{"token": "Sure. Here is the product, then a helper and a table.\n\n"},
            {"tool_call": {"tool": "calculator", "input": "6*7"}},
            {"tool_output": {"tool": "calculator", "output": "42"}},
            {"token": "So **6 × 7 = 42**. In Python:\n\n```python\ndef times(a, b):\n    \"\"\"Multiply.\"\"\"\n"
                      "    return a * b\n\nprint(times(6, 7))  # 42\n```\n\n| a | b | a × b |\n|---|---|---|\n"
                      "| 6 | 7 | 42 |\n| 3 | 4 | 12 |\n"}]


@pytest.mark.parametrize("name,viewport,scheme", [("chat_desktop_light", DESKTOP, "light"),
                                                  ("chat_desktop_dark", DESKTOP, "dark"),
                                                  ("chat_phone_dark", PHONE, "dark")])
def test_screenshots(browser, server, tmp_path, name, viewport, scheme):
    page = Page(browser, server.url, viewport=viewport, color_scheme=scheme)
    page.send("hi")
    page.wait_idle()
    page.canned(SHOWCASE)
    page.send("What is 6 times 7? Show me in Python.")
    page.wait_idle()
    page.page.wait_for_selector(".msg.assistant details.tool")
    width = page.page.evaluate("document.documentElement.scrollWidth")
    assert width <= viewport["width"], f"horizontal scrolling: {width}px"
    save_screenshot(page, tmp_path, name)
    page.close()
