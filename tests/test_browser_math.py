"""
Math in the chat page's replies (nanochat/static/markdown.js: KaTeX to MathML), in a real browser:
the same Chromium, server and Page helper as tests/test_browser.py. `$…$` and `$$…$$` become
<math> elements; prices, escaped dollars and code stay text; bad TeX shows its source; hostile TeX
and MathML payloads run nothing, load nothing from another host and leave the page responsive.
"""

import time

import pytest

from test_browser import PHONE, Page, browser, page, save_screenshot, server, streamed_and_once  # noqa: F401
from test_chat_web import chat_base_dir  # noqa: F401  (a fixture)

MATH_REPLY = r"""Euler's identity, $e^{i\pi} + 1 = 0$, and a sum $\sum_{k=1}^{n} k = \frac{n(n+1)}{2}$.

$$
\int_0^1 x^2 \, dx = \frac{1}{3}
$$

Inline display: $$a^2 + b^2 = c^2$$ in a sentence.

It costs $5 and $10, or \$20 with $x$ in it.

Code stays code: `$x^2$` and

```
echo "$HOME costs $5"
$$not math$$
```

Bad TeX: $\frac{1}{$ and $\notacommand{x}$ end.

Wide: $$\sum_{i=1}^{100} a_i b_i c_i d_i e_i f_i g_i h_i i_i j_i k_i l_i m_i n_i o_i p_i q_i r_i s_i t_i u_i v_i w_i x_i y_i z_i$$
"""


def stream(page, text, size=9):
    page.canned([{"token": text[i:i + size]} for i in range(0, len(text), size)])


def test_inline_and_display_math_render_as_mathml(browser, server, tmp_path):
    page = Page(browser, server.url, viewport=PHONE)
    stream(page, MATH_REPLY)
    page.send("math please")
    page.wait_idle()
    reply = page.page.locator(".msg.assistant .reply")
    assert reply.locator("math").count() == 6  # e^iπ, sum, integral, a²+b², x, and the wide sum
    assert reply.locator("math[display=block]").count() == 3
    assert reply.locator(".math-display math[display=block]").count() == 3
    assert reply.locator("math annotation").first.text_content() == r"e^{i\pi} + 1 = 0"
    assert reply.locator("mfrac").count() == 2 and reply.locator("msubsup").count() >= 2
    text = page.page.inner_text(".msg.assistant .reply")
    assert "It costs $5 and $10, or $20 with" in text  # prices and \$ stay text
    assert reply.locator("code").nth(0).inner_text() == "$x^2$"  # math in code stays literal
    assert reply.locator("pre code").inner_text() == 'echo "$HOME costs $5"\n$$not math$$\n'
    errors = reply.locator(".katex-error")  # bad TeX: its source, in red, with the error as a title
    assert errors.all_inner_texts() == [r"\frac{1}{", r"\notacommand{x}"]
    assert "Undefined control sequence" in errors.nth(1).get_attribute("title")
    assert page.page.evaluate("getComputedStyle(document.querySelector('.katex-error')).color") == "rgb(198, 40, 40)"
    # a wide formula scrolls in its own box; the page does not scroll sideways on a phone
    width = page.page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"horizontal scrolling on a phone: {width}px"
    wide = page.page.locator(".math-display").last
    assert wide.evaluate("(el) => el.scrollWidth > el.clientWidth")
    save_screenshot(page, tmp_path, "chat_math_phone")
    page.reload()  # and rendered the same from storage
    assert page.page.locator(".msg.assistant .reply math").count() == 6
    # the page's first load asked its own server only, KaTeX included (Page.close checks the rest)
    assert any(u == server.url + "/static/vendor/katex.min.js" for u in page.requests)
    page.close()


MATH_STREAM = r"""Let $f(x) = x^2$ and $g$ be given; the price is $5.

$$
\frac{d}{dx} f(x) = 2x
$$

Then $$\int f = \frac{x^3}{3}$$ and *bold $a*b$ italics* with $x_1$ and $y_1$.

- a list with $\sqrt{2}$
- and $$e^x$$

$$unclosed at the end \alpha"""


def test_streaming_math_renders_the_same_as_rendering_once(page):
    """As tests/test_browser.py does for markdown: the text cut at every length, streamed and
    rendered once, gives the same elements and text; an unclosed $$ is text while it streams."""
    result = streamed_and_once(page, MATH_STREAM)
    result.update(page.page.evaluate("""() => {
        const once = window.renderedOnce;
        return {maths: once.querySelectorAll('math').length, em: once.querySelector('em').textContent,
                last: once.lastElementChild.textContent};
    }"""))
    assert result["mismatches"] == [] and result["same"], result
    assert result["maths"] == 9, result  # f, g, d/dx, ∫, a*b, x1, y1, √2, e^x; "$5" and the unclosed one are text
    assert result["em"].startswith("bold ") and result["em"].endswith(" italics")  # the * inside math is not emphasis
    assert result["last"] == r"$$unclosed at the end \alpha"


# -----------------------------------------------------------------------------
# Untrusted TeX and MathML stay inert

HOSTILE_TEX = [
    r"$\href{javascript:window.pwned=1}{click}$",
    r"$$\href{https://evil.example/x}{click}$$",
    r"$\url{javascript:window.pwned=2}$",
    r"$\htmlClass{x}{y}$ $\htmlId{x}{y}$ $\htmlData{a=b}{y}$",
    r"$\htmlStyle{position:fixed;inset:0;background:red}{cover}$",
    r"$\includegraphics[height=1em]{https://evil.example/x.png}$",
    r"$\def\a{\a\a}\a$",
    r"$\gdef\b{\b\b}\b$",
    r"$\def\x{xxxxxxxxxx}\def\y{\x\x\x\x\x\x\x\x\x\x}\def\z{\y\y\y\y\y\y\y\y\y\y}\z\z\z\z\z\z\z\z\z\z$",
    r"$\rule{100000em}{100000em}$",
    r"$\textcolor{javascript:alert(1)}{x}$ $\color{url(https://evil.example/x)}{y}$",
    r"$x</math><img src=x onerror=window.pwned=3>$",
    r"$\text{<img src=x onerror=window.pwned=4>}$",
    r"$\verb|<script>window.pwned=5</script>|$",
    r"$\operatorname{<svg onload=window.pwned=6>}$",
    r"$\char`<\char`>$",
    r"$\newcommand{\alert}{x}\alert(1)$",
    r"$\mathrm{\@ifnextchar}$",
    "$" + "x^{" * 990 + "x" + "}" * 990 + "$",  # 990 levels deep, just under the length cap
    "$" + "{" * 20_000 + "x" + "}" * 20_000 + "$",  # deeper than the parser's stack, over the cap
    "$$" + r"\frac{a}{b}+" * 4_200 + "1$$",  # 50,000 characters
]
# Everything KaTeX writes, and nothing that runs or loads (markdown.js's MATHML_TAGS)
MATH_TAGS = {"math", "semantics", "annotation", "mrow", "mi", "mn", "mo", "mtext", "mspace", "msup", "msub",
             "msubsup", "mover", "munder", "munderover", "mfrac", "mroot", "msqrt", "mtable", "mtr", "mtd",
             "mlabeledtr", "menclose", "mstyle", "mpadded", "mphantom"}
FIND_BAD = """(root) => {
    const found = [], ok = new Set(%s);
    for (const el of root.querySelectorAll('*')) {
        const tag = el.tagName.toLowerCase();
        if (el.namespaceURI === 'http://www.w3.org/1998/Math/MathML' ? !ok.has(tag)
            : ['script', 'img', 'svg', 'iframe', 'style', 'form', 'object', 'embed', 'link', 'meta', 'base',
               'video', 'source', 'input', 'body'].includes(tag)) found.push(el.outerHTML.slice(0, 200));
        for (const a of el.attributes) {
            const html = el.namespaceURI === 'http://www.w3.org/1999/xhtml';
            if (/^on/i.test(a.name) || /^(style|srcdoc|src|xlink:href|action|data)$/i.test(a.name)
                || (a.name === 'href' && (!html || !/^(https?:|#|\\/[^/]|[^:]*$)/i.test(a.value))))
                found.push(tag + ' ' + a.name + '=' + a.value);
        }
    }
    return found;
}""" % sorted(MATH_TAGS)


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitiser-alone"])
def test_hostile_tex_runs_nothing_loads_nothing_and_the_page_stays_responsive(browser, server, bypass_csp):
    page = Page(browser, server.url, bypass_csp=bypass_csp)
    reply = "\n\n".join(f"TeX {i}: {t}" for i, t in enumerate(HOSTILE_TEX))
    stream(page, reply, size=97)
    t0 = time.perf_counter()
    page.send("tex")
    page.wait_idle()
    assert time.perf_counter() - t0 < 20  # ~1 s here: every formula rendered or refused, no hang
    bad = page.page.evaluate(f"() => ({FIND_BAD})(document.getElementById('messages'))")
    assert bad == []
    assert page.page.evaluate("window.pwned") is None
    reply = page.page.locator(".msg.assistant .reply")
    errors = reply.locator(".katex-error")
    titles = [errors.nth(i).get_attribute("title") for i in range(errors.count())]
    assert sum("Too many expansions" in t for t in titles) == 3  # \def, \gdef and the 10^4 expansion bomb
    assert sum("over 4000 characters" in t for t in titles) == 2  # the 50,000 and 40,000 characters: their source
    assert reply.locator("math").count() >= 10  # the rest rendered, with trust off: \href etc. in red
    assert r"\href" in page.page.inner_text(".msg.assistant .reply")
    # responsive: typing works and a task on the page runs at once
    page.page.fill("#input", "still here")
    t0 = time.perf_counter()
    assert page.page.evaluate("new Promise((r) => setTimeout(() => r(1), 0))") == 1
    assert time.perf_counter() - t0 < 1
    page.reload()  # rendered again from storage
    page.page.wait_for_selector(".msg.assistant math")
    assert page.page.evaluate(f"() => ({FIND_BAD})(document.getElementById('messages'))") == []
    page.page.wait_for_timeout(300)  # a chance for anything deferred to run
    assert page.page.evaluate("window.pwned") is None
    page.close()  # no dialog, no page error, no request to another host


# MathML's known sanitiser bypasses (mXSS through namespace confusion, integration points) and
# MathML's own links and actions
MATHML_XSS = [
    "<math><mtext><table><mglyph><style><img src=x onerror=window.pwned=1>",
    "<math><mtext><table><mglyph><style><!--</style><img title=\"--&gt;&lt;/mglyph&gt;&lt;img&Tab;src=1&Tab;"
    "onerror=window.pwned=2&gt;\">",
    "<form><math><mtext></form><form><mglyph><style></math><img src onerror=window.pwned=3>",
    "<math><mtext><h1><a><h6></a></h6><mglyph><svg><mtext><style><a title=\"</style><img src onerror=window.pwned=4>\">"
    "</style></h1>",
    "<math href=\"javascript:window.pwned=5\"><mi>click</mi></math>",
    "<math><mi href=\"javascript:window.pwned=6\">click</mi></math>",
    "<math><mrow href=\"https://evil.example/\"><mi>a link without rel=noopener</mi></mrow></math>",
    "<math><maction actiontype=\"statusline\" xlink:href=\"javascript:window.pwned=7\">x<mtext>y</mtext></maction></math>",
    "<math><maction actiontype=\"toggle\"><mi>a</mi><mi onclick=\"window.pwned=8\">b</mi></maction></math>",
    "<math><annotation-xml encoding=\"text/html\"><img src=x onerror=window.pwned=9></annotation-xml></math>",
    "<math><semantics><annotation-xml encoding=\"application/xhtml+xml\"><style><img src=x onerror=window.pwned=10>"
    "</style></annotation-xml></semantics></math>",
    "<math><mglyph src=\"https://evil.example/x.png\"></mglyph></math>",
    "<math><style><img src=x onerror=window.pwned=11></style></math>",
    "<math><mi><table><tr><td><img src=x onerror=window.pwned=12></td></tr></table></mi></math>",
    "<math><mi style=\"position:fixed;inset:0;background:red\">cover</mi></math>",
    "<math><mstyle mathbackground=\"url(https://evil.example/x)\">x</mstyle></math>",
    "<math display=\"block\"><mtext><iframe src=\"javascript:window.pwned=13\"></iframe></mtext></math>",
    "<math><mi xlink:href=\"data:text/html,<script>window.pwned=14</script>\">x</mi></math>",
    "<svg></p><style><a id=\"</style><img src=1 onerror=window.pwned=15>\">",
    "<math><mtext><noscript><p title=\"</noscript><img src=x onerror=window.pwned=16>\"></noscript></mtext></math>",
]


@pytest.mark.parametrize("bypass_csp", [False, True], ids=["with-csp", "sanitiser-alone"])
def test_mathml_payloads_are_inert_as_replies_and_to_the_sanitiser_itself(browser, server, bypass_csp):
    """As a raw reply each payload is escaped text (layer 1). The sanitiser, which sees MathML
    only from KaTeX, must hold on its own too: each payload straight through Markdown.sanitize
    into the live page, where nothing may run, load or survive beyond the allowed MathML."""
    page = Page(browser, server.url, bypass_csp=bypass_csp)
    reply = "\n\n".join(f"MathML {i}: {p}" for i, p in enumerate(MATHML_XSS))
    stream(page, reply, size=13)
    page.send("mathml")
    page.wait_idle()
    assert page.page.locator(".msg.assistant .reply math").count() == 0  # shown as text
    assert "MathML 0: <math><mtext><table>" in page.page.inner_text(".msg.assistant .reply")
    found = page.page.evaluate("""([payloads, findBad]) => {
        const check = eval(findBad), bad = [];
        for (const payload of payloads) {
            const box = document.createElement('div');
            box.className = 'md';
            box.innerHTML = Markdown.sanitize(payload);
            document.getElementById('messages').append(box);
            bad.push(...check(box).map((b) => payload.slice(0, 40) + ' -> ' + b));
        }
        return bad;
    }""", [MATHML_XSS, FIND_BAD])
    assert found == []
    page.page.hover("#messages > .md >> nth=0")
    page.page.wait_for_timeout(300)  # a chance for onerror, onload and the like to run
    assert page.page.evaluate("window.pwned") is None
    assert page.page.is_visible("#input")  # no style covered or hid the page
    page.close()  # no dialog, no page error, no request to another host
