"""
Tests for the Hugging Face export/import (nanochat/hf_convert.py, scripts/hf_export.py,
scripts/hf_import.py) and the HF Trainer fine-tuning (scripts/hf_finetune.py), with transformers'
own NanoChatForCausalLM and AutoTokenizer (no custom code, no hub, no network), on tiny models:
a 2-layer GQA model with noisy weights, and the trained tiny chat model of test_chat_web.

These need the optional `[hf]` dependencies (transformers >= 5, safetensors, accelerate); without
them they are skipped, with the reason. `bash dev/setup.sh --dev` installs them.
"""

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from conftest import REPO_ROOT
from test_chat_web import HI_REPLY, SING_CHUNK, chat_base_dir  # noqa: F401  (chat_base_dir: a fixture)

transformers = pytest.importorskip("transformers", minversion="5.0",
                                   reason="the [hf] extra is not installed: pip install -e '.[hf]'")
pytest.importorskip("safetensors", reason="the [hf] extra is not installed: pip install -e '.[hf]'")

from nanochat import hf_convert  # noqa: E402
from nanochat.engine import Engine  # noqa: E402
from nanochat.tokenizer import SPECIAL_TOKENS  # noqa: E402

CHAT_SAMPLE = REPO_ROOT / "dev" / "cpu_sample" / "chat" / "self_instruct_seed_tasks.messages.jsonl"


def run(base_dir: Path, module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sample_conversations(n: int = 40) -> list[dict]:
    with open(CHAT_SAMPLE) as f:
        return [json.loads(line) for line, _ in zip(f, range(n))]


def tiny_gqa_model(vocab_size: int):
    """2 layers, 4 query heads sharing 2 kv heads, every weight non-trivial (c_proj starts at 0)."""
    from nanochat.gpt import GPT, GPTConfig
    config = GPTConfig(sequence_len=256, vocab_size=vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = GPT(config)
    model.to_empty(device="cpu")
    model.init_weights()
    for p in model.parameters():
        p.data.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def gqa_base_dir(base_dir_with_tokenizer, tiny_tokenizer):
    """This test's base dir with a noisy GQA model saved as base checkpoint d2, step 7."""
    from nanochat.checkpoint_manager import save_checkpoint
    model = tiny_gqa_model(tiny_tokenizer.get_vocab_size())
    save_checkpoint(str(base_dir_with_tokenizer / "base_checkpoints" / "d2"), 7, model.state_dict(), None,
                    {"model_config": asdict(model.config)})
    return base_dir_with_tokenizer, model


@pytest.fixture(scope="module")
def chat_hf_dir(chat_base_dir, tmp_path_factory):  # noqa: F811
    """The trained tiny chat model exported (fp32) with scripts.hf_export, verification included."""
    out = tmp_path_factory.mktemp("hf_chat") / "export"
    result = run(chat_base_dir, "scripts.hf_export", "-i", "sft", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "max |logit difference| 0.00e+00" in result.stdout, result.stdout
    return out


# -----------------------------------------------------------------------------
# Tokenizer and chat template


def test_tokenizer_json_encodes_and_decodes_like_ours(tiny_tokenizer, tmp_path):
    from tokenizers import Tokenizer
    hf_convert.hf_tokenizer(tiny_tokenizer).save(str(tmp_path / "tokenizer.json"))
    hf = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))  # the file, as any HF user reads it
    texts = [m["content"] for c in sample_conversations(200) for m in c["messages"]]
    texts += [hf_convert.SAMPLE_TEXT.replace("<|bos|>", ""), "1234567 89", "don't WE'LL 's", "\r\n\r\n  \t x  ",
              "😀你好\u200b", "", " " * 9, "a\n\n\nb", "ÿ\x00\x7f"]
    for text in texts:
        ids = tiny_tokenizer.encode(text)
        assert hf.encode(text, add_special_tokens=False).ids == ids, text
        assert hf.decode(ids) == tiny_tokenizer.decode(ids)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert hf.token_to_id(name) == tiny_tokenizer.get_vocab_size() - 9 + i
    # and back: tokenizer.json -> our tokenizer, the same tiktoken ranks and pattern
    back = hf_convert.tokenizer_from_hf(json.loads((tmp_path / "tokenizer.json").read_text()), "tokenizer.json")
    assert back.enc._mergeable_ranks == tiny_tokenizer.enc._mergeable_ranks
    assert back.enc._pat_str == tiny_tokenizer.enc._pat_str


def test_auto_tokenizer_and_chat_template_give_our_ids(chat_hf_dir, tiny_tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(chat_hf_dir)  # no trust_remote_code
    conversations = sample_conversations() + [hf_convert.SAMPLE_CONVERSATION]
    conversations.append({"messages": [{"role": "system", "content": "You are terse."},
                                       {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                       {"role": "user", "content": "c\n"}, {"role": "assistant", "content": ""}]})
    for conversation in conversations:
        messages = conversation["messages"]
        prompt = hf.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=True, return_dict=True)
        assert list(prompt["input_ids"]) == tiny_tokenizer.render_for_completion(conversation)
        whole = hf.apply_chat_template(messages, tokenize=True, return_dict=True)
        assert list(whole["input_ids"]) == tiny_tokenizer.render_conversation(conversation, max_tokens=None)[0]
    assert hf.bos_token_id == tiny_tokenizer.get_bos_token_id()
    assert hf.eos_token_id == tiny_tokenizer.encode_special("<|assistant_end|>")


# -----------------------------------------------------------------------------
# The model


def test_export_logits_match_with_gqa(gqa_base_dir, tmp_path):
    base_dir, model = gqa_base_dir
    out = tmp_path / "hf"
    result = run(base_dir, "scripts.hf_export", "-i", "base", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "base d2 step 7" in result.stdout and "verified" in result.stdout
    assert json.loads((out / "nanochat_export.json").read_text())["source"] == {"source": "base", "model_tag": "d2", "step": 7}
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 2
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    idx = torch.randint(0, model.config.vocab_size, (3, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (hf_model(idx).logits - model(idx)).abs().max().item()
    assert diff <= 1e-3, diff
    # the noise makes the logits large enough that the softcap and every norm matter
    assert model(idx).abs().max() > 3


def test_bf16_export_is_our_model_with_rounded_weights(gqa_base_dir, tmp_path):
    base_dir, model = gqa_base_dir
    out = tmp_path / "hf_bf16"
    result = run(base_dir, "scripts.hf_export", "-i", "base", "-o", str(out), "--dtype", "bfloat16")
    assert result.returncode == 0, result.stderr
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}
    assert "verified" in result.stdout


def test_generate_greedy_equals_our_engine(chat_hf_dir, chat_base_dir, tiny_tokenizer):  # noqa: F811
    from nanochat.checkpoint_manager import load_model
    os.environ["NANOCHAT_BASE_DIR"] = str(chat_base_dir)  # restored by the autouse base_dir fixture
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    engine = Engine(model, tokenizer)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(chat_hf_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(chat_hf_dir)
    for prompt, max_tokens in [("hi", 64), ("sing", 40), ("Tell me about the sea.", 30)]:
        conversation = {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
        ids = tokenizer.render_for_completion(conversation)
        (ours,), _ = engine.generate_batch(ids, num_samples=1, max_tokens=max_tokens, temperature=0.0)
        inputs = hf_tok.apply_chat_template(conversation["messages"][:-1], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)
        theirs = hf_model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False)[0].tolist()
        stop = theirs[len(ids):][-1:] == [tokenizer.encode_special("<|assistant_end|>")]
        assert theirs[:len(ours)] == ours and len(theirs) == len(ours) + stop, prompt
        if prompt == "hi":
            assert tokenizer.decode(ours[len(ids):]) == HI_REPLY and stop
        if prompt == "sing":
            assert tokenizer.decode(ours[len(ids):]).startswith(SING_CHUNK * 3) and not stop


# -----------------------------------------------------------------------------
# Import


def test_export_import_round_trip_is_bit_identical_and_chat_cli_runs(chat_hf_dir, chat_base_dir, tmp_path):  # noqa: F811
    target = tmp_path / "imported_base"
    result = run(target, "scripts.hf_import", str(chat_hf_dir), "--model_tag", "d2")
    assert result.returncode == 0, result.stderr
    original = torch.load(chat_base_dir / "chatsft_checkpoints" / "d2" / "model_000080.pt", weights_only=True)
    imported = torch.load(target / "chatsft_checkpoints" / "d2" / "model_000080.pt", weights_only=True)
    assert original.keys() == imported.keys()
    for name, tensor in original.items():
        assert imported[name].dtype == tensor.dtype and torch.equal(imported[name], tensor), name
    for name in ("tokenizer.pkl", "token_bytes.pt"):
        assert (target / "tokenizer" / name).read_bytes() == (chat_base_dir / "tokenizer" / name).read_bytes()
    cli = run(target, "scripts.chat_cli", "-p", "hi", "-t", "0", "--device_type", "cpu")
    assert cli.returncode == 0 and cli.stdout.strip() == HI_REPLY, cli.stderr
    # the same step again is refused, not silently overwritten
    again = run(target, "scripts.hf_import", str(chat_hf_dir), "--model_tag", "d2")
    assert again.returncode == 1 and "already has a checkpoint of step 80" in again.stderr
    assert "Traceback" not in again.stderr


def test_import_refuses_what_it_cannot_map_exactly(chat_hf_dir, tmp_path, base_dir_with_tokenizer):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(chat_hf_dir, bad)
    config = json.loads((bad / "config.json").read_text())
    cases = [({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
             ({"final_logit_softcapping": 30.0}, "final_logit_softcapping is 30.0"),
             ({"tie_word_embeddings": True}, "tie_word_embeddings"),
             ({"model_type": "llama"}, "not 'nanochat'")]
    for change, message in cases:
        (bad / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(hf_convert.HFFormatError, match=message) as error:
            hf_convert.read_hf_dir(str(bad))
        assert str(error.value).startswith(str(bad / "config.json"))  # names the file
    result = run(tmp_path / "b", "scripts.hf_import", str(bad))  # the script: that one line, exit 1
    assert result.returncode == 1 and "not 'nanochat'" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    result = run(tmp_path / "c", "scripts.hf_import", str(tmp_path / "missing"))
    assert result.returncode == 1 and "is not a directory" in result.stderr
    # the very tokenizer already in the base dir: fine; another one: refused, the fix named
    result = run(base_dir_with_tokenizer, "scripts.hf_import", str(chat_hf_dir))
    assert result.returncode == 0, result.stderr
    from nanochat.tokenizer import RustBPETokenizer
    other = tmp_path / "other_base"
    RustBPETokenizer.train_from_iterator(["abc abd abe " * 50], 300).save(str(other / "tokenizer"))
    result = run(other, "scripts.hf_import", str(chat_hf_dir))
    assert result.returncode == 1 and "holds another tokenizer" in result.stderr and "NANOCHAT_BASE_DIR" in result.stderr


# -----------------------------------------------------------------------------
# Fine-tuning with the HF Trainer


def test_finetune_labels_are_our_mask_and_the_loss_is_our_sft_loss(chat_hf_dir, chat_base_dir):  # noqa: F811
    pytest.importorskip("accelerate", reason="the [hf] extra is not installed: pip install -e '.[hf]'")
    from nanochat.checkpoint_manager import load_model
    from scripts.hf_finetune import IGNORE, build_examples, make_collator
    os.environ["NANOCHAT_BASE_DIR"] = str(chat_base_dir)  # restored by the autouse base_dir fixture
    model, tokenizer, _ = load_model("sft", "cpu", "eval")
    conversations = sample_conversations(3) + [hf_convert.SAMPLE_CONVERSATION]
    examples = build_examples(conversations, tokenizer, max_seq_len=2048)
    for conversation, example in zip(conversations, examples):
        ids, mask = tokenizer.render_conversation(conversation)
        assert example["input_ids"] == ids
        assert example["labels"] == [i if m else IGNORE for i, m in zip(ids, mask)]
    batch = make_collator(tokenizer.encode_special("<|assistant_end|>"))(examples)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(chat_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_loss = hf_model(**batch).loss
        # ours, as chat_sft builds it: inputs ids[:-1], targets ids[1:] where the mask is 1, else -1
        targets = batch["labels"][:, 1:].masked_fill(batch["labels"][:, 1:] == IGNORE, -1)
        our_loss = model(batch["input_ids"][:, :-1], targets)
    assert torch.allclose(hf_loss, our_loss, rtol=1e-5), (hf_loss, our_loss)


def finetune(base_dir: Path, hf_dir: Path, out: Path, launcher: tuple = (), extra: tuple = (),
             batch_size: int = 4) -> list[float]:
    """5 steps of scripts.hf_finetune on 4 sample conversations (the whole set each step); the losses."""
    data = out.parent / "mine.jsonl"
    data.write_text("".join(json.dumps(c["messages"]) + "\n" for c in sample_conversations(4)))
    flags = ["--hf_dir", str(hf_dir), "--data", str(data), "--out_dir", str(out), "--max_steps", "5",
             "--batch_size", str(batch_size), "--lr", "3e-3", *extra]
    if launcher:  # torchrun: the module and its flags follow the launcher's own
        # (DeepSpeed JIT-compiles a C++ shared-memory op on first use: minutes on 2 cores, then cached)
        result = run(base_dir, "torch.distributed.run", *launcher, "-m", "scripts.hf_finetune", *flags, timeout=1200)
    else:
        result = run(base_dir, "scripts.hf_finetune", *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(x) for x in result.stdout.split("losses:")[1].split("\n")[0].split()]


@pytest.fixture(scope="module")
def finetuned_losses(chat_hf_dir, tmp_path_factory):
    pytest.importorskip("accelerate", reason="the [hf] extra is not installed: pip install -e '.[hf]'")
    base = tmp_path_factory.mktemp("finetune_base")
    out = tmp_path_factory.mktemp("finetune") / "tuned"
    return finetune(base, chat_hf_dir, out), base, out


def test_finetune_five_steps_on_cpu_then_import(finetuned_losses):
    losses, base_dir, out = finetuned_losses
    assert len(losses) == 5 and losses[-1] < losses[0], losses
    # the imported checkpoint is exactly the saved HF model, and chat_cli runs on it
    from safetensors.torch import load_file
    hf_weights = load_file(out / "model.safetensors")
    ours = torch.load(base_dir / "chatsft_checkpoints" / "hf_finetune" / "model_000005.pt", weights_only=True)
    assert torch.equal(ours["transformer.h.1.mlp.c_fc.weight"], hf_weights["model.layers.1.mlp.fc1.weight"])
    assert torch.equal(ours["lm_head.weight"], hf_weights["lm_head.weight"])
    cli = run(base_dir, "scripts.chat_cli", "-p", "hi", "-t", "0", "-m", "8", "--model_tag", "hf_finetune",
              "--device_type", "cpu")
    assert cli.returncode == 0, cli.stderr


@pytest.mark.slow
def test_finetune_with_deepspeed_zero2_on_two_cpu_ranks_matches_one_process(finetuned_losses, chat_hf_dir, tmp_path):
    """DeepSpeed ZeRO-2 (dev/deepspeed_zero2.json) under torchrun, 2 CPU ranks over gloo, 2 conversations
    each: the same global batch as the single process of batch 4, so the same losses."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed); "
                                            "the ZeRO-2 path is then untested")
    single, _, single_out = finetuned_losses
    out = tmp_path / "tuned_ds"
    losses = finetune(tmp_path / "base", chat_hf_dir, out, launcher=("--standalone", "--nproc_per_node=2"),
                      extra=("--deepspeed", str(REPO_ROOT / "dev" / "deepspeed_zero2.json")), batch_size=2)
    assert losses == pytest.approx(single, abs=2e-3), (losses, single)
    from safetensors.torch import load_file
    ds, one = load_file(out / "model.safetensors"), load_file(single_out / "model.safetensors")
    for name in one:
        assert torch.allclose(ds[name], one[name], atol=1e-4), name


def test_import_a_directory_that_transformers_wrote_itself(tiny_tokenizer, tmp_path, base_dir):
    """As the published weights were made: NanoChatForCausalLM.save_pretrained in bf16, with
    transformers' default rms_norm_eps (1e-6) and pad id. Imported, our GPT computes its logits up to
    that eps (noted on import) and the bf16 rounding is kept exactly."""
    kwargs = {**hf_convert.hf_config_kwargs(tiny_gqa_model(512).config, tiny_tokenizer), "rms_norm_eps": 1e-6,
              "pad_token_id": 1}
    torch.manual_seed(0)
    hf_model = transformers.NanoChatForCausalLM(transformers.NanoChatConfig(**kwargs)).to(torch.bfloat16)
    hf_dir = tmp_path / "from_transformers"
    hf_model.save_pretrained(hf_dir)
    hf_convert.hf_tokenizer(tiny_tokenizer).save(str(hf_dir / "tokenizer.json"))
    result = run(base_dir, "scripts.hf_import", str(hf_dir), "--source", "base")
    assert result.returncode == 0, result.stderr
    assert "rms_norm_eps 1e-06" in result.stdout and "step 0" in result.stdout
    from nanochat.checkpoint_manager import load_model
    model, _, _ = load_model("base", "cpu", "eval", model_tag="d2")
    assert torch.equal(model.lm_head.weight, hf_model.lm_head.weight.float())
    idx = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (model(idx) - hf_model.float()(idx).logits).abs().max().item()
    assert diff <= 1e-3, diff


def test_scripts_without_the_hf_extra_say_how_to_install_it(tmp_path, base_dir):
    blocker = tmp_path / "no_hf"
    blocker.mkdir()
    for name in ("transformers", "safetensors"):  # importing either fails, as in a venv without [hf]
        (blocker / f"{name}.py").write_text(f"raise ModuleNotFoundError('blocked', name={name!r})\n")
    env = {**os.environ, "NANOCHAT_BASE_DIR": str(base_dir), "PYTHONPATH": str(blocker)}
    for module, args in [("scripts.hf_export", ["-i", "sft", "-o", str(tmp_path / "x")]),
                         ("scripts.hf_import", [str(tmp_path)]),
                         ("scripts.hf_finetune", ["--hf_dir", "a", "--data", "b", "--out_dir", "c"])]:
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 1 and "pip install -e '.[hf]'" in result.stderr, (module, result.stderr)
        assert "Traceback" not in result.stderr
