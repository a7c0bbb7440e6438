"""
Code highlighting in the chat page without stalls, in a real browser (the same Chromium, server and
Page helper as tests/test_browser.py). A code block that names its language is highlighted on the
page; one that names none goes to static/highlight-worker.js, which guesses the language off the
main thread; its answer is sanitised and may never change the code's text. After loading, the page
warms its libraries up while idle (Markdown.warmUp) and leaves nothing behind.
"""

import pytest

from test_browser import XSS, Page, browser, page, server  # noqa: F401
from test_chat_web import chat_base_dir  # noqa: F401  (a fixture)

PYTHON = "def mean(values):\n    import math\n    return sum(v for v in values if v is not None) / len(values)\n"
SHELL = "#!/bin/bash\nfor f in *.txt; do\n  echo \"$f\"\ndone\n"
JS = "const add = (a, b) => a + b;\n"
REPLY = f"Python:\n\n```\n{PYTHON}```\n\nShell:\n\n```\n{SHELL}```\n\nNamed:\n\n```js\n{JS}```\n"
ALL_GUESSED = "() => [...document.querySelectorAll('.msg.assistant pre code')].every((c) => /\\blanguage-/.test(c.className))"


def stream(page, text, size=9):
    page.canned([{"token": text[i:i + size]} for i in range(0, len(text), size)])


def codes(page):
    return page.page.evaluate("""() => [...document.querySelectorAll('.msg.assistant pre code')].map((c) =>
        ({text: c.textContent, cls: c.className, spans: c.querySelectorAll('span[class^=hljs-]').length}))""")


def test_blocks_that_name_no_language_are_guessed_in_a_worker_not_on_the_page(page):
    page.page.wait_for_function("() => Markdown.warm")
    # highlight.js guesses when it is given a block without a language: if the page ever did so, this says
    page.page.evaluate("""() => { const each = hljs.highlightElement, auto = hljs.highlightAuto;
        hljs.highlightElement = (el) => { if (!/\\blanguage-/.test(el.className)) window.guessedOnPage = true; return each(el); };
        hljs.highlightAuto = (...a) => { window.guessedOnPage = true; return auto(...a); }; }""")
    stream(page, REPLY)
    page.send("code")
    page.wait_idle()
    page.page.wait_for_function(ALL_GUESSED)
    blocks = codes(page)
    assert [b["text"] for b in blocks] == [PYTHON, SHELL, JS]  # the code itself, exactly
    assert "language-python" in blocks[0]["cls"] and "language-bash" in blocks[1]["cls"], blocks
    assert all(b["spans"] >= 2 for b in blocks), blocks  # highlighted
    assert page.page.evaluate("window.guessedOnPage") is None
    assert any(u.endswith("/static/highlight-worker.js") for u in page.requests)
    # after a reload the saved reply is rendered again, and guessed again
    page.reload()
    page.page.wait_for_function(ALL_GUESSED)
    assert [b["text"] for b in codes(page)] == [PYTHON, SHELL, JS]


def test_the_idle_warm_up_finishes_and_leaves_nothing_on_the_page(page):
    page.page.wait_for_function("() => Markdown.warm")
    left = page.page.evaluate("() => document.querySelectorAll('.offscreen.md, body > .md').length")
    assert left == 0
    assert page.page.locator("#messages *").count() == 0  # an empty conversation still shows nothing
    page.send("hi")  # and the page works as before
    page.wait_idle()
    assert page.replies() and page.replies()[0]


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitiser-alone"])
def test_hostile_code_in_a_guessed_block_stays_text(browser, server, bypass_csp):
    page = Page(browser, server.url, bypass_csp=bypass_csp)
    payloads = [p for p in XSS if "```" not in p] + ["</code></pre><script>window.pwned = 99</script><pre><code>"]
    reply = "".join(f"Block {i}:\n\n```\n{p}\n```\n\n" for i, p in enumerate(payloads))
    stream(page, reply, size=13)
    page.send("payloads")
    page.wait_idle()
    page.page.wait_for_function(ALL_GUESSED)
    assert [b["text"] for b in codes(page)] == [p + "\n" for p in payloads]
    found = page.page.evaluate("""() => [...document.querySelectorAll('.msg.assistant pre code *')]
        .filter((el) => el.tagName !== 'SPAN' || [...el.attributes].some((a) => a.name !== 'class'))
        .map((el) => el.outerHTML.slice(0, 100))""")
    assert found == []
    page.page.wait_for_timeout(300)  # a chance for anything deferred to run
    assert page.page.evaluate("window.pwned") is None
    page.close()  # no dialog, no page error, no request to another host


# What the page does with whatever comes back: a stand-in worker at the worker's URL
LYING_WORKER = """onmessage = (e) => postMessage({id: e.data.id, language: '"><img src=x onerror=window.pwned=1>',
    html: '<img src=x onerror="window.pwned=2"><a href="javascript:window.pwned=3">other text</a>'});"""
BROKEN_WORKER = "throw new Error('this worker does not start');"
ODD_WORKER = """onmessage = (e) => { postMessage(null); postMessage('x'); postMessage({id: e.data.id + 1000});
    postMessage({id: e.data.id, html: 42, language: null}); };"""


@pytest.mark.parametrize("worker", ["lying", "broken", "missing", "odd"])
def test_a_bad_worker_leaves_the_code_as_plain_text(browser, server, worker):
    page = Page(browser, server.url)
    body = {"lying": LYING_WORKER, "broken": BROKEN_WORKER, "odd": ODD_WORKER}.get(worker)
    page.page.route("**/static/highlight-worker.js", lambda route: route.fulfill(
        status=404 if body is None else 200, content_type="text/javascript", body=body or "not found"))
    page.reload()  # with the stand-in worker
    stream(page, REPLY)
    page.send("code")
    page.wait_idle()
    if worker in ("lying", "odd"):  # it answers: the answer is checked
        page.page.wait_for_function(ALL_GUESSED)
    else:  # it never answers: the page does not wait for it
        page.page.wait_for_function("() => Markdown.warm")
    blocks = codes(page)
    assert [b["text"] for b in blocks] == [PYTHON, SHELL, JS]
    assert page.page.locator(".msg.assistant pre code img, .msg.assistant pre code a").count() == 0
    assert "language-js" in blocks[2]["cls"] and blocks[2]["spans"] >= 1  # named: highlighted on the page
    for b in blocks[:2]:
        assert b["spans"] == 0 and ("language-plaintext" in b["cls"] or worker in ("broken", "missing")), b
    page.page.wait_for_timeout(300)
    assert page.page.evaluate("window.pwned") is None
    page.send("hi")  # the page still works
    page.wait_idle()
    page.close()
