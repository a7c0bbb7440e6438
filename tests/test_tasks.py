"""
Tests for tasks/: every task loads the real data of the CPU sample (dev/cpu_sample, evenly spaced
rows of each data set; its README gives the counts) with the exact row counts and first/last rows, and
renders conversations with the right roles, format and masks; GSM8K's tool parts round-trip
through render_conversation; mixtures are deterministic and oversample by repetition; malformed
rows name their file and line; the Hugging Face download path works against a local http.server
that serves parquet files written from the sample in the Hub's column layout.
"""

import gzip
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanochat.tokenizer import RustBPETokenizer
from tasks.arc import ARC
from tasks.common import Task, TaskMixture, hf_shuffle_order, render_mc
from tasks.customjson import CustomJSON
from tasks.gsm8k import GSM8K, extract_answer, parse_solution
from tasks.humaneval import HumanEval, extract_fenced, extract_program
from tasks.mmlu import MMLU
from tasks.smoltalk import SmolTalk


@pytest.fixture(autouse=True)
def local_data(sample_data, monkeypatch):
    """Tasks read dev/cpu_sample unless a test unsets NANOCHAT_DATA_DIR."""
    monkeypatch.setenv("NANOCHAT_DATA_DIR", str(sample_data))
    return sample_data


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A real (tiktoken) tokenizer with the 256 bytes and no merges: needs no trained BPE."""
    return RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})


class Numbers(Task):
    """A tiny in-memory task: example i says i."""

    def __init__(self, n, name="n", **view):
        super().__init__(**view)
        self.n, self.name = n, name

    def num_rows(self):
        return self.n

    def row_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.name}{i}"}, {"role": "assistant", "content": "ok"}]}


def said(example):
    return example["messages"][0]["content"]


def file_row(task, j):
    """The example made from row j of the task's file (tasks list their rows in the reference's
    shuffled order: tests/test_eval_parity.py checks that order)."""
    return task[task.rows.order.index(j)]


# -----------------------------------------------------------------------------
# Task views, mixtures, sequences


def test_view_slices_like_python():
    for start, stop, step in [(0, None, 1), (3, None, 1), (2, 17, 3), (0, 100, 7), (5, 5, 1), (40, None, 2)]:
        task = Numbers(20, start=start, stop=stop, step=step)
        expected = [f"n{i}" for i in range(20)[start:stop:step]]
        assert task.num_examples() == len(task) == len(expected)
        assert [said(task.get_example(i)) for i in range(len(task))] == expected
        assert [said(task[i]) for i in range(len(task))] == expected
    with pytest.raises(IndexError):
        Numbers(10, stop=5).get_example(5)
    with pytest.raises(ValueError, match="step"):
        Numbers(10, step=0)


def test_mixture_is_deterministic_complete_and_oversamples():
    a, b = Numbers(30, "a"), Numbers(10, "b")
    mix = TaskMixture([a, b, b], seed=42)
    seen = [said(mix[i]) for i in range(len(mix))]
    assert len(mix) == 50
    assert sorted(seen) == sorted([f"a{i}" for i in range(30)] + [f"b{i}" for i in range(10)] * 2)
    assert seen == [said(ex) for ex in TaskMixture([a, b, b], seed=42)]  # same seed, same order
    assert seen != [said(ex) for ex in TaskMixture([a, b, b], seed=43)]
    assert seen[:10] != [f"a{i}" for i in range(10)]  # actually shuffled
    # a mixture of views, viewed again (e.g. one rank's share)
    strided = TaskMixture([a, Numbers(10, "b", stop=4)], seed=1, start=1, step=2)
    full = TaskMixture([a, Numbers(10, "b", stop=4)], seed=1)
    assert [said(ex) for ex in strided] == [said(full[i]) for i in range(1, len(full), 2)]


def test_render_mc_format():
    text = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert text == "Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n\nRespond only with the letter of the correct answer."


# -----------------------------------------------------------------------------
# Real data: counts and formats


def test_arc_counts_and_format():
    easy, challenge = ARC("ARC-Easy", "test"), ARC("ARC-Challenge", "test")
    assert len(easy) == 400 and len(challenge) == 300
    assert len(ARC("ARC-Easy", "train")) == 400 and len(ARC("ARC-Challenge", "train")) == 300
    assert file_row(easy, 399)["messages"][0]["content"].startswith("Multiple Choice question: Historically, how has the compass been used?\n- for navigation=A\n")
    assert file_row(challenge, 299)["messages"][0]["content"].startswith("Multiple Choice question: Which of these is a response of cats to external stimuli?")
    assert easy.eval_type == "categorical"
    ex = file_row(easy, 0)
    user, assistant = ex["messages"]
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert user["content"].startswith("Multiple Choice question: Which statement best explains why photosynthesis")
    assert "\n- Sunlight is the source of energy for nearly all ecosystems.=A\n" in user["content"]
    assert assistant["content"] == "A" and ex["letters"] == ["A", "B", "C", "D"]
    letter_sets = set()
    for task in (easy, challenge):
        for i in range(len(task)):
            ex = task[i]
            letter_sets.add(tuple(ex["letters"]))
            assert ex["messages"][1]["content"] in ex["letters"]
            assert task.evaluate(ex, ex["messages"][1]["content"]) == 1
    assert ("1", "2", "3", "4") in letter_sets  # NY Regents labels kept as they are
    assert {len(s) for s in letter_sets} >= {3, 4, 5}
    ex = file_row(easy, 0)
    assert easy.evaluate(ex, "B") == 0 and easy.evaluate(ex, " A") == 1


def test_mmlu_counts_and_format():
    test = MMLU("all", "test")
    assert len(test) == 570 and len(MMLU("all", "validation")) == 300 and len(MMLU("all", "dev")) == 285
    ex = file_row(test, 0)
    assert ex["letters"] == ["A", "B", "C", "D"] and ex["subject"] == "abstract_algebra"
    assert ex["messages"][0]["content"] == render_mc(
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18)) over Q.",
        "ABCD", ["0", "4", "2", "6"])
    assert ex["messages"][1]["content"] == "B" and test.evaluate(ex, "B") == 1 and test.evaluate(ex, "C") == 0
    answers = {test[i]["messages"][1]["content"] for i in range(0, len(test), 50)}
    assert answers == {"A", "B", "C", "D"}
    last = file_row(test, 569)
    assert last["subject"] == "world_religions" and last["messages"][1]["content"] == "C"
    assert last["messages"][0]["content"].startswith("Multiple Choice question: Who was the first significant anchorite hermit?\n- Pachomius=A\n")
    assert len({test[i]["subject"] for i in range(len(test))}) == 57  # the sample spans every subject


def test_mmlu_auxiliary_train_missing_locally_is_a_clear_error(local_data):
    with pytest.raises(FileNotFoundError, match="auxiliary_train.jsonl"):
        MMLU("auxiliary_train", "train")
    with pytest.raises(ValueError, match="auxiliary_train"):
        MMLU("auxiliary_train", "test")


def test_gsm8k_counts_tool_parts_and_answers():
    train, test = GSM8K("train"), GSM8K("test")
    assert len(train) == 600 and len(test) == 200
    assert file_row(test, 199)["messages"][0]["content"].startswith("Tom's restaurant gets 6 reservations a night.")
    ex = file_row(train, 0)
    assert ex["messages"][0]["content"].startswith("Natalia sold clips to 48 of her friends")
    assert ex["messages"][1]["content"] == [
        {"type": "text", "text": "Natalia sold 48/2 = "},
        {"type": "python", "text": "48/2"}, {"type": "python_output", "text": "24"},
        {"type": "text", "text": "24 clips in May.\nNatalia sold 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips altogether in April and May.\n#### 72"}]
    assert train.evaluate(ex, "They sold 72 clips.\n#### 72") == 1
    assert train.reward(ex, "#### 72") == 1.0 and train.reward(ex, "#### 71") == 0.0
    assert train.evaluate(ex, "72") == 0  # no '####': no answer
    # every problem parses, and the parts put together give back the original text
    raw = [json.loads(line) for line in open(os.environ["NANOCHAT_DATA_DIR"] + "/gsm8k/test.jsonl")]
    for i in range(len(test)):
        parts = test[i]["messages"][1]["content"]
        rebuilt = "".join(f"<<{p['text']}=" if p["type"] == "python" else p["text"] + ">>" if p["type"] == "python_output"
                          else p["text"] for p in parts)
        assert rebuilt == raw[test.rows.order[i]]["answer"]
        assert test.evaluate(test[i], raw[test.rows.order[i]]["answer"]) == 1


def test_gsm8k_extract_answer():
    assert extract_answer("so #### 1,234") == "1234"
    assert extract_answer("#### -5") == "-5"
    assert extract_answer("####3.5.") == "3.5"
    assert extract_answer("no marker 42") is None
    assert parse_solution("a <<2*3=6>>6 b") == [{"type": "text", "text": "a "}, {"type": "python", "text": "2*3"},
                                                {"type": "python_output", "text": "6"}, {"type": "text", "text": "6 b"}]


def test_humaneval_count_and_canonical_solutions():
    task = HumanEval()
    assert len(task) == 164 and task.eval_type == "generative"
    ex = file_row(task, 0)
    assert ex["task_id"] == "HumanEval/0" and ex["entry_point"] == "has_close_elements"
    assert ex["messages"][0]["content"] == ex["prompt"]
    assert ex["messages"][1]["content"] == ex["prompt"] + "\n" + ex["canonical_solution"]
    # the reference assembly (default): the whole function passes, plain or fenced; a body alone fails
    whole = ex["messages"][1]["content"]
    assert task.evaluate(ex, whole) == 1
    assert task.evaluate(ex, "Here you go:\n```python\n" + whole + "```\nDone.") == 1
    assert task.evaluate(ex, ex["canonical_solution"]) == 0
    assert task.evaluate(ex, whole.replace("distance < threshold", "distance <= threshold")) == 1
    assert task.evaluate(ex, whole.replace("return True", "return False")) == 0
    # the official assembly: prompt + completion, so the body alone passes
    official = HumanEval(assembly="official")
    assert official.evaluate(ex, ex["canonical_solution"]) == 1 and official.evaluate(ex, "    return None\n") == 0


def test_extract_program():
    # the reference's: the first closed ``` / ```python block, else everything; stripped
    assert extract_program(" x = 1\n") == "x = 1"
    assert extract_program("text\n```python\nx = 1\n```\nmore\n```\ny\n```") == "x = 1"
    assert extract_program("```\n    return 2\n```") == "return 2"
    assert extract_program("```py\nz = 3") == "```py\nz = 3"  # no closed block: the whole text
    # the official assembly's: unclosed fences run to the end, nothing stripped
    assert extract_fenced("x = 1") == "x = 1"
    assert extract_fenced("text\n```python\nx = 1\n```\nmore\n```\ny\n```") == "x = 1\n"
    assert extract_fenced("```\n    return 2\n```") == "    return 2\n"
    assert extract_fenced("```py\nz = 3") == "z = 3"


def test_smoltalk_local_stand_in(local_data):
    train, test = SmolTalk("train"), SmolTalk("test")
    assert len(train) + len(test) == 600 + 175 + 252  # dolly_hhrlhf, seed tasks, user-oriented
    assert len(test) == 52 and len(train) == 975  # every 20th conversation is test
    assert file_row(test, 0) == {"messages": _jsonl(local_data / "chat/dolly_hhrlhf_small.messages.jsonl")[0]["messages"]}
    assert file_row(train, 974) == {"messages": _jsonl(local_data / "chat/self_instruct_user_oriented.messages.jsonl")[-1]["messages"]}
    for task in (train, test):
        for i in range(0, len(task), 7):
            messages = task[i]["messages"]
            assert messages[0]["role"] == "user" and messages[-1]["role"] == "assistant"


def test_customjson(tmp_path):
    path = tmp_path / "identity.jsonl"
    rows = [[{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "nanochat."}],
            {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                          {"role": "assistant", "content": "hello"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    task = CustomJSON(str(path))
    assert len(task) == 2
    assert task[0]["messages"] == rows[0] and task[1]["messages"] == rows[1]["messages"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        CustomJSON(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("bad_line, message", [
    ('{"not": "a list"}', "line 2"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "message 1 has role 'user'"),
    ('[{"role": "user", "content": "only one"}]', "at least 2"),
    ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": 5}]', "string 'content'"),
    ('[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}', "line 2"),  # broken JSON
])
def test_malformed_rows_name_file_and_line(tmp_path, bad_line, message):
    good = json.dumps([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    path = tmp_path / "convs.jsonl"
    path.write_text(good + "\n" + bad_line + "\n" + good + "\n")
    with pytest.raises(ValueError, match=message) as info:
        CustomJSON(str(path))
    assert str(path) in str(info.value) and "line 2" in str(info.value)


def test_malformed_task_file_names_file_and_line(tmp_path, local_data):
    (tmp_path / "gsm8k").mkdir()
    lines = (local_data / "gsm8k" / "test.jsonl").read_text().splitlines()[:5]
    lines[3] = json.dumps({"question": "q", "answer": "no final answer"})
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k/test.jsonl, line 4: malformed row: the answer has no '####"):
        GSM8K("test", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="has no gsm8k/train.jsonl"):
        GSM8K("train", data_dir=str(tmp_path))


# -----------------------------------------------------------------------------
# Rendering with a real tokenizer: roles, masks, tool parts


def _check_rendering(tokenizer, example):
    """The mask is 1 exactly on the assistant's tokens (and <|assistant_end|>), never on the
    prompt, the specials the model is given, or tool outputs."""
    ids, mask = tokenizer.render_conversation(example, max_tokens=None)
    special = {name: tokenizer.encode_special(name) for name in tokenizer.get_special_tokens()}
    assert ids[0] == tokenizer.get_bos_token_id() and len(ids) == len(mask)
    trained = tokenizer.decode([i for i, m in zip(ids, mask) if m == 1])
    expected = ""
    for message in example["messages"]:
        if message["role"] == "assistant":
            content = message["content"]
            parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
            for p in parts:
                expected += {"text": p["text"], "python": f"<|python_start|>{p['text']}<|python_end|>",
                             "python_output": ""}[p["type"]]
            expected += "<|assistant_end|>"
    assert trained == expected
    given = [i for i, m in zip(ids, mask) if m == 0]
    assert special["<|assistant_end|>"] not in given and special["<|python_start|>"] not in given
    return ids, mask


def test_task_examples_render_with_correct_masks(byte_tokenizer):
    tasks = [ARC("ARC-Challenge", "test", stop=20), MMLU("all", "dev", stop=20), GSM8K("train", stop=20),
             HumanEval(stop=5), SmolTalk("test", stop=20)]
    for task in tasks:
        for example in task:
            _check_rendering(byte_tokenizer, example)
    # a categorical answer is exactly one trained token + <|assistant_end|>
    example = ARC("ARC-Easy", "test")[0]
    ids, mask = byte_tokenizer.render_conversation(example)
    assert sum(mask) == 2 and byte_tokenizer.decode(ids[-2:]) == example["messages"][1]["content"] + "<|assistant_end|>"


def test_gsm8k_tool_parts_round_trip(byte_tokenizer):
    ex = file_row(GSM8K("train"), 0)
    ids, mask = _check_rendering(byte_tokenizer, ex)
    text = byte_tokenizer.decode(ids)
    assert "Natalia sold 48/2 = <|python_start|>48/2<|python_end|><|output_start|>24<|output_end|>24 clips" in text
    # the tool output is masked, the call is trained on
    out_start = ids.index(byte_tokenizer.encode_special("<|output_start|>"))
    out_end = ids.index(byte_tokenizer.encode_special("<|output_end|>"))
    assert mask[out_start:out_end + 1] == [0] * (out_end - out_start + 1)
    py_start = ids.index(byte_tokenizer.encode_special("<|python_start|>"))
    assert mask[py_start:out_start] == [1] * (out_start - py_start)
    # the completion prompt stops right after <|assistant_start|>
    prompt = byte_tokenizer.render_for_completion(ex)
    assert prompt == ids[:len(prompt)] and prompt[-1] == byte_tokenizer.encode_special("<|assistant_start|>")


def test_rendering_with_trained_tokenizer(tiny_tokenizer):
    for example in [GSM8K("test")[5], ARC("ARC-Easy", "test")[3], SmolTalk("train")[10]]:
        _check_rendering(tiny_tokenizer, example)


# -----------------------------------------------------------------------------
# The Hugging Face path, against a local server


class HubServer:
    """Serves the Hub's parquet listing API and the parquet files of `splits` from `root`."""

    def __init__(self, root, splits, fail_files=0):
        self.requests, self.fail_files = [], fail_files
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                prefix = "/api/datasets/"
                if self.path.startswith(prefix) and "/parquet/" in self.path:
                    repo, rest = self.path[len(prefix):].split("/parquet/")
                    files = splits.get((repo, *rest.split("/")))
                    if files is None:
                        return self.send_error(404)
                    body = json.dumps([f"{server.url}/files/{name}" for name in files]).encode()
                elif self.path.startswith("/files/"):
                    if server.fail_files > 0:
                        server.fail_files -= 1
                        return self.send_error(500)
                    body = (root / self.path[len("/files/"):]).read_bytes()
                else:
                    return self.send_error(404)
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def _jsonl(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture
def hub(tmp_path, local_data, monkeypatch):
    """Parquet files in the Hub's column layout, written from the sample; GSM8K test is split
    over two files like a sharded export; MMLU auxiliary_train rows are wrapped in a `train` struct."""
    root = tmp_path / "hub"
    root.mkdir()

    def write(name, rows):
        pq.write_table(pa.Table.from_pylist(rows), root / name)
        return name

    gsm = _jsonl(local_data / "gsm8k" / "test.jsonl")
    chats = [{"messages": r["messages"]} for r in _jsonl(local_data / "chat" / "self_instruct_seed_tasks.messages.jsonl")]
    splits = {
        ("openai/gsm8k", "main", "test"): [write("gsm_0.parquet", gsm[:120]), write("gsm_1.parquet", gsm[120:])],
        ("openai/gsm8k", "main", "train"): [write("gsm_2.parquet", gsm[:5]),  # row 3 of the second file is bad
                                            write("gsm_3.parquet", gsm[5:8] + [{"question": "q", "answer": "none"}])],
        ("allenai/ai2_arc", "ARC-Challenge", "test"): [write("arc.parquet", _jsonl(local_data / "arc/ARC-Challenge/test.jsonl"))],
        ("cais/mmlu", "auxiliary_train", "train"): [write("aux.parquet", [{"train": r} for r in _jsonl(local_data / "mmlu/dev.jsonl")])],
        ("openai/openai_humaneval", "openai_humaneval", "test"): [write("he.parquet", _jsonl(local_data / "humaneval/HumanEval.jsonl.gz"))],
        ("HuggingFaceTB/smol-smoltalk", "default", "test"): [write("smol.parquet", chats)],
    }
    server = HubServer(root, splits)
    monkeypatch.delenv("NANOCHAT_DATA_DIR")
    monkeypatch.setenv("NANOCHAT_HF_URL", server.url)
    yield server
    server.close()


def test_hf_download_matches_local_and_is_cached(hub, local_data, base_dir):
    remote = GSM8K("test")
    local = GSM8K("test", data_dir=str(local_data))
    assert len(remote) == 200
    assert all(remote[i] == local[i] for i in range(200))
    cache = base_dir / "task_data" / "openai__gsm8k" / "main" / "test"
    assert sorted(os.listdir(cache)) == [".lock", "0000.parquet", "0001.parquet", "files.json"]
    n_requests = len(hub.requests)
    assert len(GSM8K("test")) == 200 and len(hub.requests) == n_requests  # second load: no network

    arc = ARC("ARC-Challenge", "test")
    assert len(arc) == 300 and arc[7] == ARC("ARC-Challenge", "test", data_dir=str(local_data))[7]
    aux = MMLU("auxiliary_train", "train")  # rows unwrapped from the `train` struct
    assert len(aux) == 285 and aux[0] == MMLU("all", "dev", data_dir=str(local_data))[0]
    he = HumanEval(stop=3)
    assert he[2]["task_id"] == f"HumanEval/{hf_shuffle_order(164)[2]}"  # the reference's order
    assert he.evaluate(he[2], he[2]["messages"][1]["content"]) == 1
    assert len(SmolTalk("test")) == 175


def test_hf_download_errors_are_clear(hub, base_dir, monkeypatch):
    monkeypatch.setenv("NANOCHAT_HF_URL", hub.url + "/nothing-here")
    with pytest.raises(RuntimeError, match="NANOCHAT_DATA_DIR"):
        GSM8K("test")
    assert not (base_dir / "task_data" / "openai__gsm8k" / "main" / "test" / "files.json").exists()


def test_hf_download_retries_a_failing_file(hub, monkeypatch):
    monkeypatch.setenv("NANOCHAT_DOWNLOAD_BACKOFF", "0.01")
    hub.fail_files = 2
    assert len(ARC("ARC-Challenge", "test")) == 300
    assert sum(r.startswith("/files/arc") for r in hub.requests) == 3


def test_hf_malformed_row_names_file_and_row(hub):
    task = GSM8K("train")
    assert len(task) == 9 and task[7]["messages"][0]["role"] == "user"
    with pytest.raises(ValueError, match=r"0001.parquet, row 3: malformed row: the answer has no '####"):
        task[8]
