"""
Evaluate the tokenizer's compression: bytes per token (higher = more text per token, so more
text per context window and per FLOP) on fixed texts and on samples of the train and val shards,
for our tokenizer next to GPT-2's and GPT-4's (tiktoken `gpt2`, `cl100k_base`).

Run (after scripts.tok_train):
    python -m scripts.tok_eval
    python -m scripts.tok_eval --reference_timeout=5   # give up on GPT-2/GPT-4 sooner

tiktoken downloads the GPT-2/GPT-4 vocabularies on first use (and caches them in
$TIKTOKEN_CACHE_DIR). Without network they cannot be loaded: the table then shows our tokenizer
alone, with a note. Loading runs in a background thread bounded by --reference_timeout, so a
network that swallows packets cannot hang the script.

Reference nanochat: 65,536 tokens trained on 2B chars of FineWeb-Edu give ~4.8-4.9 bytes/token on
FineWeb-Edu, vs 4.6-4.7 for GPT-2 and ~4.8 for GPT-4.
"""

import threading

from nanochat.dataset import parquets_iter_batched
from nanochat.flags import StopRun, parse_flags, print_flags
from nanochat.report import get_report
from nanochat.tokenizer import RustBPETokenizer, get_tokenizer

DEFAULTS = dict(
    reference_timeout=30.0,  # seconds to wait for tiktoken to load each of gpt2 / cl100k_base
)
cfg = parse_flags(DEFAULTS, doc=__doc__)
print_flags(cfg, DEFAULTS)

# -----------------------------------------------------------------------------
# Texts: short fixed samples (written for this file), then the first row group of each split

NEWS = """The city council voted on Tuesday to approve a new budget for public transport, ending months
of debate over fares and service cuts. The plan adds 120 buses to the fleet by 2027 and extends
night service on six routes. "This is a good day for commuters," the mayor told reporters outside
City Hall, while opponents warned that the $48.5 million cost would strain the city's finances."""

KOREAN = """서울시는 화요일 대중교통 요금 동결을 포함한 새 예산안을 발표했다. 시는 내년까지 버스 120대를
추가로 도입하고 심야 노선 여섯 개를 연장할 계획이다. 시민들은 출퇴근 시간이 줄어들 것이라며 환영했지만,
일부 전문가들은 재정 부담이 커질 수 있다고 우려했다. 한국어는 음절 단위로 한글을 모아 쓰는 문자 체계를 사용한다."""

CODE = '''class Counter:
    """Count how often each item appears."""

    def __init__(self):
        self.counts = {}

    def add(self, item, n=1):
        self.counts[item] = self.counts.get(item, 0) + n
        return self

    def most_common(self, k=3):
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]


if __name__ == "__main__":
    c = Counter()
    for word in "the cat and the hat and the bat".split():
        c.add(word)
    print(c.most_common(2))  # [('the', 3), ('and', 2)]
'''

MATH = r"""\begin{theorem}[Cauchy--Schwarz]
For all vectors $u, v$ in an inner product space, $|\langle u, v\rangle|^2 \le \langle u, u\rangle \cdot \langle v, v\rangle$.
\end{theorem}
\begin{proof}
If $v = 0$ both sides are $0$. Otherwise let $\lambda = \langle u, v\rangle / \langle v, v\rangle$ and expand
$0 \le \|u - \lambda v\|^2 = \|u\|^2 - 2\lambda\langle u, v\rangle + \lambda^2\|v\|^2 = \|u\|^2 - \frac{|\langle u, v\rangle|^2}{\|v\|^2}$.
\end{proof}
Example: $\int_0^1 x^2\,dx = \frac{1}{3}$ and $\sum_{n=1}^{\infty} \frac{1}{n^2} = \frac{\pi^2}{6} \approx 1.6449$."""

SCIENCE = """Photosynthesis converts light energy into chemical energy stored in glucose. In the light-dependent
reactions, chlorophyll in the thylakoid membranes absorbs photons, splitting water molecules and
releasing oxygen (2H2O -> 4H+ + 4e- + O2). The resulting ATP and NADPH drive the Calvin cycle in the
stroma, where the enzyme RuBisCO fixes carbon dioxide into three-carbon sugars. Roughly 6 CO2 + 6 H2O
yield one C6H12O6 and 6 O2, with a typical efficiency of only 1-2% of incident sunlight."""

texts = [("news", NEWS), ("korean", KOREAN), ("code", CODE), ("math", MATH), ("science", SCIENCE)]
notes = []
for split in ("train", "val"):
    try:
        texts.append((f"fwe-{split}", "\n".join(next(parquets_iter_batched(split=split)))))
    except FileNotFoundError as e:
        notes.append(f"no {split} sample: {e}")

# -----------------------------------------------------------------------------
# Tokenizers: ours, and GPT-2 / GPT-4 when tiktoken can load them in time


def load_reference(name: str, timeout: float) -> tuple[RustBPETokenizer | None, str]:
    """(tokenizer, "") or (None, why not). The load runs in a daemon thread we can walk away from."""
    result = {}

    def load():
        try:
            result["tokenizer"] = RustBPETokenizer.from_pretrained(name)
        except Exception as e:  # no network, DNS failure, HTTP error, corrupt cache, ...
            message = (str(e).splitlines() or [""])[0]
            result["error"] = f"{type(e).__name__}: {message[:200] + '...' if len(message) > 200 else message}"

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return None, f"no answer within {timeout:g}s"
    return result.get("tokenizer"), result.get("error", "")


try:
    tokenizers = [("ours", get_tokenizer())]
except FileNotFoundError as e:  # the message says how to train one
    raise StopRun(f"tok_eval: {e}") from None
missing = []  # comparison tokenizers tiktoken could not load: (label, why)
for label, name in (("gpt2", "gpt2"), ("gpt4", "cl100k_base")):
    tok, why = load_reference(name, cfg.reference_timeout)
    if tok is None:
        missing.append((label, why))
    else:
        tokenizers.append((label, tok))

# -----------------------------------------------------------------------------
# Bytes per token

rows = []
for text_name, text in texts:
    num_bytes = len(text.encode("utf-8"))
    row = {"text": text_name, "bytes": num_bytes}
    for label, tok in tokenizers:
        ids = tok.encode(text)
        assert tok.decode(ids) == text, f"{label} does not round-trip the {text_name} text"
        row[f"{label} tokens"] = len(ids)
        row[f"{label} bytes/token"] = num_bytes / len(ids)
    rows.append(row)

columns = list(rows[0].keys())
fmt = lambda v: f"{v:.2f}" if isinstance(v, float) else f"{v:,}" if isinstance(v, int) else v
table = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
table += ["| " + " | ".join(fmt(row[c]) for c in columns) + " |" for row in rows]
table = "\n".join(table)

print("vocab sizes: " + ", ".join(f"{label} {tok.get_vocab_size():,}" for label, tok in tokenizers))
print(table)
for note in notes:
    print(f"note: {note}")
if missing:  # one short line, and nothing of it in the report: an offline run is not an error
    print(f"note: left out {' and '.join(label for label, _ in missing)} (tiktoken fetches them once over the "
          f"network, then caches them; {missing[0][1][:80]})")

get_report().log(section="Tokenizer evaluation", data=[
    {f"{label} vocab size": tok.get_vocab_size() for label, tok in tokenizers},
    table,
    *[f"Note: {note}" for note in notes],
])
