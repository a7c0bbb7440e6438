"""
Tests for nanochat/core_eval.py and nanochat/core_bundle.py: prompt rendering against hand-written
strings, token spans and left-cropping, the scorer with an oracle model (accuracy 1.0) and a
uniform one (chance, ties to the first choice), batch-size and 2-rank invariance, bundle validation
errors, and the bundle download from a local HTTP server (good zip, corrupt zip, two concurrent
downloaders; an endless body, a trickle, garbage in the middle, a dropped connection, Ctrl-C in a
real subprocess).
"""

import http.server
import json
import os
import random
import shutil
import threading
import zipfile
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO_ROOT
from misbehaving_server import MisbehavingServer, interrupt_mid_download
from nanochat import core_bundle
from nanochat.core_bundle import BundleError, load_bundle, load_task_data
from nanochat.core_eval import (crop_left, evaluate_core, evaluate_task, prepare_item, render_prompts_lm,
                                render_prompts_mc, render_prompts_schema, tokenize_example)
from nanochat.download import DownloadError


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine OpenMP
    threads waiting on each other made these tests 3x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ByteTokenizer:
    """One token per UTF-8 byte, BOS = 256: spans are easy to count by hand."""
    bos = 256

    def get_bos_token_id(self):
        return self.bos

    def encode(self, text, prepend=None):
        if isinstance(text, list):
            return [self.encode(t, prepend) for t in text]
        return ([] if prepend is None else [prepend]) + list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def small_bpe():
    """A real (tiktoken) BPE tokenizer without training: the 256 bytes plus the prefix chains of
    some common words, so words merge into multi-byte tokens ("Question", " the", " Answer")."""
    from nanochat.tokenizer import RustBPETokenizer
    words = ["Question", ":", " Answer", "Answer", " the", "The", " a", " of", " and", " to", " is", " in",
             " was", " that", " he", " she", " it", " because", " therefore", " water", " op", " =",
             "\n\n", "ing", "ed", " they", " his", " her", " you", " for", " with", " on", " not"]
    ranks = {bytes([b]): b for b in range(256)}
    for word in words:
        encoded = word.encode("utf-8")
        for k in range(2, len(encoded) + 1):
            ranks.setdefault(encoded[:k], len(ranks))
    return RustBPETokenizer.from_mergeable_ranks(ranks)


class OracleModel(torch.nn.Module):
    """Knows the gold sequences: after any prefix of one of them it puts a large logit on the gold
    next token(s), and is uniform everywhere else. So gold spans get ~0 loss, others log(V)."""

    def __init__(self, gold_rows, vocab_size, sequence_len=None):
        super().__init__()
        self.trie, self.vocab_size = {}, vocab_size
        self.config = SimpleNamespace(sequence_len=sequence_len)
        for row in gold_rows:
            node = self.trie
            for tok in row:
                node = node.setdefault(tok, {})

    def forward(self, idx):
        B, T = idx.shape
        hits = []  # (b, t, token) to boost
        for b, row in enumerate(idx.tolist()):
            node = self.trie
            for t, tok in enumerate(row):
                node = node.get(tok)
                if not node:
                    break
                hits += [(b, t, nxt) for nxt in node]
        logits = torch.zeros(B, T, self.vocab_size)
        if hits:
            logits[tuple(torch.tensor(hits).T)] = 20.0
        return logits


class UniformModel(torch.nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size, self.config = vocab_size, SimpleNamespace(sequence_len=None)

    def forward(self, idx):
        return torch.zeros(*idx.shape, self.vocab_size)


class CausalMeanModel(torch.nn.Module):
    """A tiny random causal LM: logits at t from the running mean of the embeddings of tokens <= t.
    Deterministic and causal, so right-padding and batch composition cannot change a score."""

    def __init__(self, vocab_size, n_embd=16, sequence_len=None, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.wte = torch.nn.Parameter(torch.randn(vocab_size, n_embd, generator=g))
        self.lm_head = torch.nn.Parameter(torch.randn(n_embd, vocab_size, generator=g))
        self.config = SimpleNamespace(sequence_len=sequence_len)

    def forward(self, idx):
        x = self.wte[idx]  # (B, T, C)
        x = x.cumsum(dim=1) / torch.arange(1, idx.size(1) + 1).view(1, -1, 1)
        return x @ self.lm_head  # (B, T, V)


def task_meta(task_type, num_fewshot=0, delimiter=" "):
    return {"task_type": task_type, "num_fewshot": num_fewshot, "continuation_delimiter": delimiter}


def sample_tasks(sample_data, max_per_task):
    """(task, data) for each task of core_sample, shuffled and capped as evaluate_core does."""
    out = []
    for task in load_bundle(str(sample_data / "core_sample")):
        data = load_task_data(task["dataset_path"], task["task_type"])
        random.Random(1337).shuffle(data)
        out.append((task, data[:max_per_task]))
    return out


def gold_rows(tasks, tokenizer, sequence_len=None):
    rows = []
    for task, data in tasks:
        for idx, item in enumerate(data):
            item_rows, _, _ = prepare_item(idx, data, tokenizer, task, sequence_len)
            rows.append(item_rows[item.get("gold", 0)])
    return rows


# -----------------------------------------------------------------------------
# Rendering


MC_DATA = [{"query": "Question: 2+2?", "choices": ["3", "4"], "gold": 1},
           {"query": "Question: sky?", "choices": ["blue", "green", "red"], "gold": 0},
           {"query": "Question: cats say?", "choices": ["woof", "meow"], "gold": 1}]


def test_render_mc_fewshot_with_delimiter():
    prompts = render_prompts_mc(MC_DATA[2], "\nAnswer: ", MC_DATA[:2])
    assert prompts == [
        "Question: 2+2?\nAnswer: 4\n\nQuestion: sky?\nAnswer: blue\n\nQuestion: cats say?\nAnswer: woof",
        "Question: 2+2?\nAnswer: 4\n\nQuestion: sky?\nAnswer: blue\n\nQuestion: cats say?\nAnswer: meow",
    ]


def test_render_mc_zero_shot_default_delimiter():
    item = {"query": "The man turned on the faucet, therefore", "gold": 1,
            "choices": ["the toilet filled with water.", "water flowed from the spout."]}
    assert render_prompts_mc(item, " ", []) == ["The man turned on the faucet, therefore the toilet filled with water.",
                                                "The man turned on the faucet, therefore water flowed from the spout."]


def test_render_schema():
    ex = {"context_options": ["Ann hid because Ann", "Ann hid because Bob"], "continuation": "was scared.", "gold": 0}
    item = {"context_options": ["The trophy did not fit because the trophy", "The trophy did not fit because the case"],
            "continuation": "is too large.", "gold": 0}
    assert render_prompts_schema(item, " ", []) == ["The trophy did not fit because the trophy is too large.",
                                                    "The trophy did not fit because the case is too large."]
    assert render_prompts_schema(item, " ", [ex]) == [
        "Ann hid because Ann was scared.\n\nThe trophy did not fit because the trophy is too large.",
        "Ann hid because Ann was scared.\n\nThe trophy did not fit because the case is too large."]


def test_render_lm():
    item = {"context": "op 2 op 3 = ", "continuation": "6"}
    shots = [{"context": " op 1 op 1 =", "continuation": "1"}, {"context": "op 2 op 2 =", "continuation": "4"}]
    assert render_prompts_lm(item, " ", shots) == ["op 1 op 1 = 1\n\nop 2 op 2 = 4\n\nop 2 op 3 =",
                                                   "op 1 op 1 = 1\n\nop 2 op 2 = 4\n\nop 2 op 3 = 6"]
    assert render_prompts_lm({"context": "Hello there\n", "continuation": "friend"}, " ", []) == [
        "Hello there", "Hello there friend"]


def test_fewshot_draw_excludes_item_and_is_seeded():
    tok = ByteTokenizer()
    data = [{"context": f"item {i}", "continuation": str(i)} for i in range(6)]
    meta = task_meta("language_modeling", num_fewshot=3)
    for idx in range(len(data)):
        rows, _, _ = prepare_item(idx, data, tok, meta, None)
        text = tok.decode(rows[0])
        others = [i for i in range(len(data)) if i != idx]
        expected = random.Random(1234 + idx).sample(others, 3)  # the reference draw
        assert text == "".join(f"item {i} {i}\n\n" for i in expected) + f"item {idx} {idx}"
    # asking for more shots than there are other items uses all of them
    rows, _, _ = prepare_item(0, data, tok, task_meta("language_modeling", num_fewshot=10), None)
    assert tok.decode(rows[0]).count("\n\n") == 5


# -----------------------------------------------------------------------------
# Spans and cropping


def test_spans_mc_schema_lm():
    tok = ByteTokenizer()
    rows, starts, ends = tokenize_example(tok, ["Q: a cat", "Q: a dog!"], "multiple_choice")
    assert rows[0][0] == 256 and starts == [6, 6] and ends == [9, 10]  # BOS + "Q: a " is shared
    assert tok.decode(rows[1][6:10]) == "dog!"
    rows, starts, ends = tokenize_example(tok, ["Ann said it", "Bobby said it"], "schema")
    assert starts == [4, 6] and ends == [12, 14]  # the shared suffix " said it" (8 tokens)
    assert tok.decode(rows[0][4:12]) == " said it"
    rows, starts, ends = tokenize_example(tok, ["2 + 2 =", "2 + 2 = 4"], "language_modeling")
    assert len(rows) == 1 and starts == [8] and ends == [10] and tok.decode(rows[0][8:10]) == " 4"
    # identical choices would leave an empty span: the last token is scored instead
    _, starts, ends = tokenize_example(tok, ["same", "same"], "multiple_choice")
    assert starts == [4, 4] and ends == [5, 5]


def test_crop_left_shifts_spans():
    rows, starts, ends = crop_left([list(range(10)), list(range(4))], [6, 2], [10, 4], max_len=5)
    assert rows == [[5, 6, 7, 8, 9], [0, 1, 2, 3]] and starts == [1, 2] and ends == [5, 4]
    rows, starts, ends = crop_left([list(range(10))], [2], [10], max_len=4)  # the span itself overflows
    assert rows == [[6, 7, 8, 9]] and starts == [1] and ends == [4]
    assert crop_left([[1, 2]], [1], [2], None) == ([[1, 2]], [1], [2])


# -----------------------------------------------------------------------------
# Scoring


def test_oracle_scores_one_on_core_sample(sample_data):
    tok = small_bpe()
    assert len(tok.encode("Question: the water")) < len("Question: the water")  # merges happen
    tasks = sample_tasks(sample_data, max_per_task=24)
    model = OracleModel(gold_rows(tasks, tok), tok.get_vocab_size())
    out = evaluate_core(model, tok, "cpu", max_per_task=24, bundle_dir=str(sample_data / "core_sample"))
    assert set(out["results"]) == {"arc_easy", "copa", "lambada_openai", "winograd", "bigbench_operators"}
    assert all(acc == 1.0 for acc in out["results"].values()), out["results"]
    assert all(c == pytest.approx(1.0) for c in out["centered_results"].values())
    assert out["core_metric"] == pytest.approx(1.0)
    assert out["num_examples"] == {label: 24 for label in out["results"]}


def test_oracle_with_cropping(sample_data):
    """A short context window: rows lose tokens on the left and the spans move with them."""
    tok = ByteTokenizer()
    tasks = [(t, d) for t, d in sample_tasks(sample_data, max_per_task=8) if t["label"] in ("arc_easy", "lambada_openai")]
    model = OracleModel(gold_rows(tasks, tok, sequence_len=64), 257, sequence_len=64)
    for task, data in tasks:
        assert max(len(prepare_item(i, data, tok, task, None)[0][0]) for i in range(len(data))) > 64
        assert evaluate_task(model, tok, data, "cpu", task) == 1.0


def test_uniform_model_is_chance_with_ties_to_first(sample_data):
    tok = ByteTokenizer()
    out = evaluate_core(UniformModel(257), tok, "cpu", max_per_task=40, bundle_dir=str(sample_data / "core_sample"))
    for task, data in sample_tasks(sample_data, max_per_task=40):
        label = task["label"]
        if task["task_type"] == "language_modeling":
            assert out["results"][label] == 0.0  # argmax of equal logits is token 0, never in the text
        else:  # all means tie: the first option is picked, right exactly when gold == 0
            assert out["results"][label] == pytest.approx(sum(item["gold"] == 0 for item in data) / len(data))
        b = task["random_baseline"] / 100
        assert out["centered_results"][label] == pytest.approx((out["results"][label] - b) / (1 - b))
    assert abs(out["results"]["copa"] - 0.5) < 0.2 and abs(out["results"]["arc_easy"] - 0.25) < 0.2
    assert out["core_metric"] == pytest.approx(sum(out["centered_results"].values()) / 5)


def test_same_accuracies_whatever_the_batch_size(sample_data):
    tok = small_bpe()
    model = CausalMeanModel(tok.get_vocab_size(), sequence_len=128)
    results = [evaluate_core(model, tok, "cpu", max_per_task=16, bundle_dir=str(sample_data / "core_sample"),
                             batch_size=bs)["results"] for bs in (1, 5, 64)]
    assert results[0] == results[1] == results[2]
    assert 0 < sum(results[0].values()) < 5  # a random model: neither all right nor all wrong


class RecordingModel(CausalMeanModel):
    """Remembers the decoded text of every row it is asked about."""

    def forward(self, idx):
        self.seen = getattr(self, "seen", []) + [ByteTokenizer().decode(row) for row in idx.tolist()]
        return super().forward(idx)


def _rank_main(rank, world, init_file, out_dir, data):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    model = RecordingModel(257)
    acc = evaluate_task(model, ByteTokenizer(), data, "cpu", task_meta("multiple_choice"), batch_size=4)
    seen = sorted({int(text.split("#")[1].split(":")[0]) for text in model.seen})
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"acc": acc, "seen": seen}, f)
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_cover_every_item_once(tmp_path):
    rng = random.Random(0)
    data = [{"query": f"item #{i}: pick", "choices": [rng.choice("abcdef") * 3, "xyz", "ab"], "gold": rng.randrange(3)}
            for i in range(23)]
    single = evaluate_task(RecordingModel(257), ByteTokenizer(), data, "cpu", task_meta("multiple_choice"))
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path), data), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["seen"] == list(range(0, 23, 2)) and ranks[1]["seen"] == list(range(1, 23, 2))
    assert ranks[0]["acc"] == ranks[1]["acc"] == single
    assert 0 < single < 1


# -----------------------------------------------------------------------------
# Bundle errors


@pytest.fixture
def bundle(tmp_path, sample_data):
    path = tmp_path / "bundle"
    shutil.copytree(sample_data / "core_sample", path)
    return path


def test_bundle_loads_sample(bundle):
    tasks = load_bundle(str(bundle))
    assert [t["label"] for t in tasks] == ["arc_easy", "copa", "lambada_openai", "winograd", "bigbench_operators"]
    arc = tasks[0]
    assert arc["num_fewshot"] == 10 and arc["continuation_delimiter"] == "\nAnswer: " and arc["random_baseline"] == 25
    assert tasks[1]["continuation_delimiter"] == " " and tasks[3]["task_type"] == "schema"


def test_bundle_errors_name_file_and_line(bundle, monkeypatch):
    yaml_path = bundle / "core.yaml"
    original = yaml_path.read_text()

    yaml_path.write_text(original.replace("icl_task_type: schema", "icl_task_type: ranking"))
    with pytest.raises(BundleError, match=r"core.yaml:22: task 'winograd' has unknown icl_task_type 'ranking'"):
        load_bundle(str(bundle))
    yaml_path.write_text(original.replace("  dataset_uri: commonsense_reasoning/copa.jsonl\n", ""))
    with pytest.raises(BundleError, match=r"core.yaml:9: task 'copa' has no 'dataset_uri'"):
        load_bundle(str(bundle))
    yaml_path.write_text(original.replace("copa.jsonl", "copa_v2.jsonl"))  # a missing data file: not an error
    assert [t["available"] for t in load_bundle(str(bundle))] == [True, False, True, True, True]
    yaml_path.write_text(original.replace("label: copa", "label: copa_new"))
    with pytest.raises(BundleError, match=r"core.yaml:9: task 'copa_new' has no 'Random baseline' row in .*eval_meta_data.csv"):
        load_bundle(str(bundle))
    yaml_path.write_text(original.replace("label: lambada_openai", "label: copa"))
    with pytest.raises(BundleError, match=r"core.yaml:14: task label 'copa' appears twice"):
        load_bundle(str(bundle))
    yaml_path.write_text(original.replace("num_fewshot: [0]", "num_fewshot: zero", 1))
    with pytest.raises(BundleError, match=r"core.yaml:11: task 'copa': num_fewshot must be an int"):
        load_bundle(str(bundle))
    yaml_path.write_text("icl_tasks: [\n")
    with pytest.raises(BundleError, match="core.yaml: not valid YAML"):
        load_bundle(str(bundle))
    yaml_path.unlink()
    with pytest.raises(BundleError, match="core.yaml: missing"):
        load_bundle(str(bundle))
    monkeypatch.setenv("NANOCHAT_EVAL_BUNDLE", str(bundle))
    with pytest.raises(BundleError, match="NANOCHAT_EVAL_BUNDLE=.*no core.yaml there"):
        core_bundle.get_eval_bundle_dir()


def test_bad_rows_name_file_and_line(bundle):
    copa = bundle / "eval_data" / "commonsense_reasoning" / "copa.jsonl"
    lines = copa.read_text().splitlines()
    copa.write_text("\n".join(lines[:2] + ['{"query": "x", "choices": ["a", "b"], "gold": 1'] + lines[3:]) + "\n")
    with pytest.raises(BundleError, match=r"copa.jsonl:3: bad JSON"):
        load_task_data(str(copa), "multiple_choice")
    copa.write_text("\n".join(lines[:4] + ['{"query": "x", "gold": 1}'] + lines[5:]) + "\n")
    with pytest.raises(BundleError, match=r"copa.jsonl:5: a multiple_choice item needs 'choices' \(list\)"):
        load_task_data(str(copa), "multiple_choice")
    copa.write_text('{"query": "x", "choices": ["a", "b"], "gold": 2}\n')
    with pytest.raises(BundleError, match=r"copa.jsonl:1: gold 2 is out of range for 2 options"):
        load_task_data(str(copa), "multiple_choice")
    lambada = bundle / "eval_data" / "language_understanding" / "lambada_openai.jsonl"
    lambada.write_text('{"context": "a", "continuation": "b"}\n{"context": "a"}\n')
    with pytest.raises(BundleError, match=r"lambada_openai.jsonl:2: a language_modeling item needs 'continuation'"):
        load_task_data(str(lambada), "language_modeling")


# -----------------------------------------------------------------------------
# Download from a local server


class _Server:
    """Serves one payload at /eval_bundle.zip on 127.0.0.1 and counts the requests."""

    def __init__(self, payload: bytes):
        self.payload, self.requests = payload, 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests += 1
                self.send_response(200)
                self.send_header("Content-Length", str(len(server.payload)))
                self.end_headers()
                self.wfile.write(server.payload)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/eval_bundle.zip"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _zip_of(folder, tmp_path) -> bytes:
    path = tmp_path / "made.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                zf.write(file, "eval_bundle/" + str(file.relative_to(folder)))
    return path.read_bytes()


def test_download_bundle_once_with_two_downloaders(sample_data, tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    server = _Server(_zip_of(sample_data / "core_sample", tmp_path))
    try:
        got = []
        threads = [threading.Thread(target=lambda: got.append(core_bundle.get_eval_bundle_dir(url=server.url)))
                   for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert got == [str(base_dir / "eval_bundle")] * 2 and server.requests == 1
    finally:
        server.close()
    assert len(load_bundle(got[0])) == 5  # and later calls need no network at all
    assert core_bundle.get_eval_bundle_dir(url=server.url) == got[0]
    assert sorted(os.listdir(base_dir)) == ["eval_bundle", "eval_bundle.lock"]


def test_corrupt_zip_is_discarded(sample_data, tmp_path, base_dir, monkeypatch):
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    good = _zip_of(sample_data / "core_sample", tmp_path)
    for payload in (good[: len(good) // 2], b"<html>not a zip</html>",
                    good.replace(b"icl_tasks", b"icl_taskz")):  # the last one: a CRC mismatch
        server = _Server(payload)
        try:
            with pytest.raises(RuntimeError, match="could not download"):
                core_bundle.download_eval_bundle(server.url, str(base_dir / "eval_bundle"), attempts=1)
        finally:
            server.close()
        assert sorted(os.listdir(base_dir)) == ["eval_bundle.lock"]  # no bundle, zip or temp folder left


@pytest.fixture
def bad_server(sample_data, tmp_path, monkeypatch):
    """The sample bundle as eval_bundle.zip on the misbehaving server (tests/misbehaving_server.py)."""
    root = tmp_path / "served"
    root.mkdir()
    (root / "eval_bundle.zip").write_bytes(_zip_of(sample_data / "core_sample", tmp_path))
    monkeypatch.delenv("NANOCHAT_EVAL_BUNDLE", raising=False)
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0.01")
    with MisbehavingServer(root, trickle_s=0.5) as server:
        server.zip_url = f"{server.url}/eval_bundle.zip"
        yield server


def test_bundle_download_has_a_size_cap_and_a_deadline_and_keeps_no_damage(bad_server, base_dir, monkeypatch):
    bundle_dir = str(base_dir / "eval_bundle")
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_MAX_MB", "2")
    bad_server.plan = {"eval_bundle.zip": ["endless"]}
    with pytest.raises(DownloadError, match=r"^eval_bundle.zip: .* sends more than the 2 MB cap for one file"):
        core_bundle.download_eval_bundle(bad_server.zip_url, bundle_dir)
    assert sorted(os.listdir(base_dir)) == ["eval_bundle.lock"]
    monkeypatch.delenv("NANOCHAT_DOWNLOAD_MAX_MB")

    monkeypatch.setenv("NANOCHAT_DOWNLOAD_DEADLINE", "1")
    bad_server.plan = {"eval_bundle.zip": ["trickle"]}
    with pytest.raises(DownloadError, match=r"^eval_bundle.zip: .* did not finish within its deadline of 1 s"):
        core_bundle.download_eval_bundle(bad_server.zip_url, bundle_dir)
    assert sorted(os.listdir(base_dir)) == ["eval_bundle.lock"]
    monkeypatch.delenv("NANOCHAT_DOWNLOAD_DEADLINE")

    # garbage in the middle (the zip directory at the end intact: caught by the CRCs), a dropped
    # connection: both retried, then the good zip is unpacked
    bad_server.plan = {"eval_bundle.zip": ["corrupt_middle", "truncate"]}
    assert core_bundle.download_eval_bundle(bad_server.zip_url, bundle_dir) == bundle_dir
    assert len(load_bundle(bundle_dir)) == 5 and bad_server.requests == ["eval_bundle.zip"] * 5
    assert sorted(os.listdir(base_dir)) == ["eval_bundle", "eval_bundle.lock"]


def test_ctrl_c_during_the_bundle_download_leaves_nothing(bad_server, base_dir):
    bad_server.trickle_s = 30
    bad_server.plan = {"eval_bundle.zip": ["trickle"]}
    code = ("from nanochat.core_bundle import download_eval_bundle\n"
            f"download_eval_bundle({bad_server.zip_url!r}, {str(base_dir / 'eval_bundle')!r})")
    temp_files = lambda: [f for f in os.listdir(base_dir) if f != "eval_bundle.lock"]
    # timed until the temp file is gone: the exit after it unloads torch, slow on a busy machine
    stopped, status, stderr = interrupt_mid_download(["-c", code], REPO_ROOT, started=temp_files,
                                                     stopped=lambda: not temp_files())
    assert stopped < 1, stopped
    assert status != 0 and "KeyboardInterrupt" in stderr
    assert sorted(os.listdir(base_dir)) == ["eval_bundle.lock"]
