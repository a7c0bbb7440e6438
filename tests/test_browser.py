"""
The chat UI (nanochat/ui.html) in a real browser: Playwright driving Debian's Chromium
(/usr/bin/chromium; install it with `bash dev/install_browser.sh`, never `playwright install`)
against `python -m scripts.chat_web` on 127.0.0.1 serving the tiny trained chat model of
tests/test_chat_web.py. Screenshots (desktop and phone) go to the test's tmp dir and, when
$NANOCHAT_ARTIFACTS is set, there too.
"""

import json
import os
import shutil
import time

import pytest
import requests

from test_chat_web import HI_REPLY, SING_CHUNK, chat_base_dir, run_server  # noqa: F401  (chat_base_dir: a fixture)

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
    with run_server(chat_base_dir, tmp_path_factory.mktemp("browser_logs"), "-m", "24") as server:
        yield server


class Page:
    """A browser tab on the UI that records the bodies it POSTs to /chat/completions."""

    def __init__(self, browser, url, viewport=DESKTOP, color_scheme="light"):
        self.page = browser.new_page(viewport=viewport, color_scheme=color_scheme)
        self.page.set_default_timeout(20_000)
        self.errors, self.posts = [], []
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("request", lambda r: self.posts.append(json.loads(r.post_data))
                     if r.method == "POST" and r.url.endswith("/chat/completions") else None)
        self.page.goto(url)
        self.page.wait_for_function("document.getElementById('model-name').textContent.length > 0")

    def send(self, text):
        self.page.fill("#input", text)
        self.page.press("#input", "Enter")

    def wait_idle(self):  # the reply finished: the regenerate/retry button is back
        self.page.wait_for_selector("#regenerate")

    def texts(self, selector):
        return self.page.locator(selector).all_inner_texts()

    def close(self):
        assert not self.errors, self.errors
        self.page.close()


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


def test_type_send_and_watch_the_reply_stream_in(page, tmp_path):
    assert page.page.is_visible("#empty")
    # Record every text the reply element is given, to see it grow token by token. The texts come
    # from the mutation records, not from reading the element when the observer runs: the tiny
    # model writes its whole reply in a millisecond, so several tokens often reach the page in one
    # network read, and by the time the observer runs the element holds only the last of them.
    page.page.evaluate("""() => { window.seen = []; new MutationObserver(records => {
        for (const r of records) {
          if (!(r.target.closest && r.target.closest('.msg.assistant'))) continue;
          for (const n of r.addedNodes) if (n.nodeType === Node.TEXT_NODE) window.seen.push(n.data);
        }
      }).observe(document.getElementById('messages'), {childList: true, subtree: true}); }""")
    page.send("hi")
    page.wait_idle()
    assert page.texts(".msg.user .bubble") == ["hi"]
    assert page.texts(".msg.assistant") == [HI_REPLY]
    seen = [s for s in page.page.evaluate("window.seen") if s]
    assert len(set(seen)) >= 3, seen  # partial replies were shown before the whole one
    assert all(HI_REPLY.startswith(s) for s in seen)
    assert not any("\ufffd" in s for s in seen)  # never half an emoji
    assert page.page.input_value("#input") == "" and not page.page.is_visible("#empty")
    assert page.posts == [{"messages": [{"role": "user", "content": "hi"}]}]
    save_screenshot(page, tmp_path, "chat_desktop")


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
    [reply] = page.texts(".msg.assistant")
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
    assert page.texts(".msg.assistant") == [HI_REPLY]  # replaced, not appended
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
    page.page.reload()  # settings persist in localStorage
    page.page.wait_for_selector("#empty")
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
    assert page.texts(".msg.assistant") == []  # no empty reply left behind
    assert page.page.inner_text("#regenerate") == "↻ Retry"
    page.page.click("#banner-close")
    assert page.page.is_hidden("#banner")


STOP_WHEN_STREAMING = """() => { window.stopState = new Promise((resolve, reject) => {
    const check = () => {
        const reply = document.querySelector('.msg.assistant.streaming');
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
        [partial] = page.texts(".msg.assistant")
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
