"""
The mapping between a nanochat checkpoint and the Hugging Face format of `transformers`'
`NanoChatForCausalLM` (model_type "nanochat"): weights, config and tokenizer, both ways.

    hf_dir = export_hf(model, tokenizer, meta, "out/", dtype=torch.float32)   # scripts/hf_export.py
    state_dict, model_config, tokenizer = read_hf_dir("out/")                 # scripts/hf_import.py
    require_hf_packages("hf_export", "transformers")  # the [hf] extra, or one line saying what to install

What was checked against transformers' modeling_nanochat.py, and how each point maps:
- Parameter names: `transformer.wte` <-> `model.embed_tokens`, `attn.c_q/c_k/c_v/c_proj` <->
  `self_attn.q_proj/k_proj/v_proj/o_proj`, `mlp.c_fc/c_proj` <-> `mlp.fc1/fc2`, `lm_head` <->
  `lm_head` (untied: `tie_word_embeddings` false). Same shapes, same (out, in) layout: a rename.
- Rotary: both rotate the pairs (x[i], x[i + D/2]) (split halves, not interleaved pairs), and HF's
  `rotate_half` for NanoChat is (x2, -x1), so y1 = x1·cos + x2·sin, y2 = x2·cos - x1·sin: our
  signs. Same inverse frequencies (base 10,000, computed the same way in fp32), no permutation.
- Norms: RMSNorm without weight in the same places (after the embedding, before attention and MLP,
  after the last block, and on q and k after rotary). Ours is `F.rms_norm` with its default eps,
  torch.finfo(fp32).eps = 1.1920928955078125e-07; HF's default is 1e-6, so the export writes ours.
- ReLU² is HF's "relu2"; attention scale 1/√head_dim in both; GQA repeats each kv head for
  n_head/n_kv_head consecutive q heads in both (SDPA's enable_gqa and HF's repeat_kv).
- Softcap 15·tanh(logits/15): HF's `final_logit_softcapping` = 15.0.
- `pad_token_id` is None in the model config: HF gives nn.Embedding that row as padding_idx,
  which zeroes its gradient in fine-tuning (ours has none). Generation gets its pad id from
  generation_config.json instead.
- Tokenizer: tokenizer.json is a byte-level BPE with our split regex and, as merges, every split
  of every token into two tokens, ordered by the merged token's rank (what tiktoken's
  "merge any adjacent pair whose bytes are a token, lowest rank first" amounts to), and
  `ignore_merges` (a chunk that is a whole token is taken as is, as tiktoken does). The 9 special
  tokens are added tokens at our ids. Known difference: HF turns the literal text "<|bos|>" etc.
  inside a message into the special token; our encode keeps it as text.
"""

from __future__ import annotations

import importlib
import json
import os

import torch

from nanochat.flags import StopRun
from nanochat.gpt import GPTConfig
from nanochat.tokenizer import SPECIAL_TOKENS, SPLIT_PATTERN, RustBPETokenizer

RMS_NORM_EPS = torch.finfo(torch.float32).eps  # F.rms_norm's default for fp32 input
SOFTCAP = 15.0
ROPE_THETA = 10000.0
EXPORT_META_FILE = "nanochat_export.json"  # where the model came from (stage, tag, step)

# (our name, HF name) per block, after "transformer.h.{i}." / "model.layers.{i}."
_BLOCK_NAMES = [("attn.c_q", "self_attn.q_proj"), ("attn.c_k", "self_attn.k_proj"),
                ("attn.c_v", "self_attn.v_proj"), ("attn.c_proj", "self_attn.o_proj"),
                ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]

# A chat template that renders exactly what RustBPETokenizer.render_conversation renders (and, with
# add_generation_prompt, render_for_completion): a leading system message is merged into the first
# user message with a blank line; assistant content is a string or a list of typed parts.
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\\n\\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{- ns.system + message['content'] -}}<|user_end|>{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant_start|>"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}"
    "{%- elif part['type'] == 'python' -%}<|python_start|>{{- part['text'] -}}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{- part['text'] -}}<|output_end|>"
    "{%- endif -%}{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


class HFFormatError(ValueError):
    """An HF directory this converter cannot map exactly; the message names the file and field."""


def require_hf_packages(script: str, *modules: str, note: str = "") -> None:
    """Import the optional packages `modules` (the [hf] extra), or stop `script` with one line that
    names the missing one (a missing dependency of theirs included) and how to install it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise StopRun(f"{script}: {e.name} is not installed: pip install -e '.[hf]'{note}") from None


# -----------------------------------------------------------------------------
# Weights and config


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], n_layer: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our state dict (any `_orig_mod.` prefix removed) -> HF names, cast to `dtype`, contiguous."""
    sd = {k.removeprefix("_orig_mod."): v for k, v in state_dict.items()}
    names = {"transformer.wte.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, hf in _BLOCK_NAMES:
            names[f"transformer.h.{i}.{ours}.weight"] = f"model.layers.{i}.{hf}.weight"
    if set(sd) != set(names):
        raise HFFormatError(f"unexpected parameters {sorted(set(sd) ^ set(names))[:4]} for a {n_layer}-layer GPT")
    return {names[k]: v.detach().to(dtype=dtype, device="cpu").contiguous() for k, v in sd.items()}


def from_hf_state_dict(hf_state_dict: dict[str, torch.Tensor], n_layer: int, where: str) -> dict[str, torch.Tensor]:
    """HF names -> ours, in fp32 (the dtype of every parameter of our GPT)."""
    names = {"model.embed_tokens.weight": "transformer.wte.weight", "lm_head.weight": "lm_head.weight"}
    for i in range(n_layer):
        for ours, hf in _BLOCK_NAMES:
            names[f"model.layers.{i}.{hf}.weight"] = f"transformer.h.{i}.{ours}.weight"
    missing, unexpected = set(names) - set(hf_state_dict), set(hf_state_dict) - set(names)
    if missing or unexpected:
        raise HFFormatError(f"{where}: tensors do not match a {n_layer}-layer NanoChat model "
                            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return {names[k]: v.to(torch.float32) for k, v in hf_state_dict.items()}


def hf_config_kwargs(config: GPTConfig, tokenizer: RustBPETokenizer) -> dict:
    """Keyword arguments of transformers.NanoChatConfig for our model."""
    special = tokenizer.encode_special
    return dict(
        vocab_size=config.vocab_size, hidden_size=config.n_embd, intermediate_size=4 * config.n_embd,
        num_hidden_layers=config.n_layer, num_attention_heads=config.n_head,
        num_key_value_heads=config.n_kv_head, max_position_embeddings=config.sequence_len,
        hidden_act="relu2", rms_norm_eps=RMS_NORM_EPS, final_logit_softcapping=SOFTCAP,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, attention_bias=False,
        tie_word_embeddings=False, bos_token_id=special("<|bos|>"),
        eos_token_id=special("<|assistant_end|>"), pad_token_id=None)


def gpt_config_from_hf(hf: dict, where: str) -> GPTConfig:
    """Our GPTConfig from an HF config.json dict, refusing anything our GPT cannot compute exactly."""
    def field(name, default=None):
        if name not in hf and default is None:
            raise HFFormatError(f"{where}: field '{name}' is missing")
        return hf.get(name, default)

    if hf.get("model_type") != "nanochat":
        raise HFFormatError(f"{where}: model_type is {hf.get('model_type')!r}, not 'nanochat': "
                            f"only NanoChatForCausalLM checkpoints can be imported")
    n_embd, n_head = field("hidden_size"), field("num_attention_heads")
    n_kv_head = hf.get("num_key_value_heads") or n_head
    rope = hf.get("rope_parameters") or {}
    checks = [  # (field, value, what our GPT computes)
        ("intermediate_size", field("intermediate_size"), 4 * n_embd),
        ("hidden_act", hf.get("hidden_act", "relu2"), "relu2"),
        ("final_logit_softcapping", hf.get("final_logit_softcapping", SOFTCAP), SOFTCAP),
        ("attention_bias", hf.get("attention_bias", False), False),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", False), False),
        ("rope_parameters.rope_type", rope.get("rope_type", "default"), "default"),
        ("rope_parameters.rope_theta", rope.get("rope_theta", hf.get("rope_theta", ROPE_THETA)), ROPE_THETA),
        ("head_dim", hf.get("head_dim") or n_embd // n_head, n_embd // n_head),
    ]
    for name, value, ours in checks:
        if value != ours:
            raise HFFormatError(f"{where}: {name} is {value!r} but nanochat's GPT computes {ours!r}; "
                                f"this model cannot be mapped exactly")
    if n_embd % n_head or n_head % n_kv_head:
        raise HFFormatError(f"{where}: hidden_size {n_embd}, num_attention_heads {n_head} and "
                            f"num_key_value_heads {n_kv_head} must divide evenly")
    return GPTConfig(sequence_len=field("max_position_embeddings"), vocab_size=field("vocab_size"),
                     n_layer=field("num_hidden_layers"), n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd)


# -----------------------------------------------------------------------------
# Tokenizer


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (what tokenizer.json stores)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def hf_tokenizer(tokenizer: RustBPETokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like our tiktoken-based tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    ranks: dict[bytes, int] = tokenizer.enc._mergeable_ranks
    to_unicode = _byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []  # (rank of the merged token, rank of the left part, rank of the right part, left, right)
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], left, right))
    merges.sort()
    bpe = BPE({text(t): r for t, r in ranks.items()}, [(text(a), text(b)) for *_, a, b in merges],
              fuse_unk=False, ignore_merges=True)
    hf = Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tokenizer.enc._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    specials = sorted(tokenizer.get_special_tokens(), key=tokenizer.encode_special)
    hf.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    for s in specials:
        assert hf.token_to_id(s) == tokenizer.encode_special(s), f"special token {s} landed at another id"
    return hf


def tokenizer_from_hf(tokenizer_json: dict, where: str) -> RustBPETokenizer:
    """Our tokenizer from an HF byte-level BPE tokenizer.json: token bytes -> id as mergeable ranks,
    the Split pre-tokenizer's regex as pattern, our 9 special tokens right after the ordinary ones."""
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise HFFormatError(f"{where}: model.type must be 'BPE' with a vocab (found {model.get('type')!r})")
    from_unicode = {c: b for b, c in _byte_to_unicode().items()}
    added = {t["content"]: t["id"] for t in tokenizer_json.get("added_tokens", [])}
    ranks = {}
    for token, token_id in model["vocab"].items():
        if token in added:
            continue
        try:
            ranks[bytes(from_unicode[c] for c in token)] = token_id
        except KeyError:
            raise HFFormatError(f"{where}: vocab entry {token!r} is not byte-level BPE text") from None
    n = len(ranks)
    expected = {s: n + i for i, s in enumerate(SPECIAL_TOKENS)}
    if {s: added.get(s) for s in SPECIAL_TOKENS} != expected:
        raise HFFormatError(f"{where}: added_tokens must hold nanochat's special tokens at ids {n}..{n + 8} "
                            f"in the order {SPECIAL_TOKENS}")
    pattern = _split_pattern(tokenizer_json.get("pre_tokenizer") or {}, where)
    try:
        return RustBPETokenizer.from_mergeable_ranks(ranks, pattern)
    except ValueError as e:
        raise HFFormatError(f"{where}: {e}") from None


def _split_pattern(pre_tokenizer: dict, where: str) -> str:
    steps = pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    splits = [s for s in steps if s.get("type") == "Split" and "Regex" in (s.get("pattern") or {})]
    if not splits:
        raise HFFormatError(f"{where}: pre_tokenizer has no Split step with a Regex (expected nanochat's "
                            f"split pattern {SPLIT_PATTERN!r})")
    return splits[0]["pattern"]["Regex"]


# -----------------------------------------------------------------------------
# Whole directories


def export_hf(model, tokenizer: RustBPETokenizer, meta: dict, out_dir: str, dtype: torch.dtype,
              source: dict | None = None) -> None:
    """Write model.safetensors, config.json, generation_config.json, the tokenizer files (with the
    chat template) and nanochat_export.json (where it came from) into out_dir."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig, NanoChatConfig, PreTrainedTokenizerFast
    config: GPTConfig = model.config
    os.makedirs(out_dir, exist_ok=True)
    save_file(to_hf_state_dict(model.state_dict(), config.n_layer, dtype),
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf_config = NanoChatConfig(**hf_config_kwargs(config, tokenizer))
    hf_config.architectures = ["NanoChatForCausalLM"]
    hf_config.dtype = dtype
    hf_config.save_pretrained(out_dir)
    special = tokenizer.encode_special
    # Our Engine stops at <|assistant_end|> or <|bos|>; padding (batched generate) uses assistant_end.
    GenerationConfig(bos_token_id=special("<|bos|>"), eos_token_id=[special("<|assistant_end|>"), special("<|bos|>")],
                     pad_token_id=special("<|assistant_end|>"), do_sample=False).save_pretrained(out_dir)
    fast = PreTrainedTokenizerFast(tokenizer_object=hf_tokenizer(tokenizer), bos_token="<|bos|>",
                                   eos_token="<|assistant_end|>", pad_token="<|assistant_end|>",
                                   model_max_length=config.sequence_len)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    # transformers 5 writes its new class name "TokenizersBackend"; the old name loads the same
    # tokenizer in 5 and also in 4.x (and in tools pinned to it)
    tokenizer_config_path = os.path.join(out_dir, "tokenizer_config.json")
    tokenizer_config = {**_read_json(tokenizer_config_path), "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(tokenizer_config_path, "w") as f:
        json.dump(tokenizer_config, f, indent=2)
    info = {"model_config": {k: getattr(config, k) for k in GPTConfig.__dataclass_fields__},
            "step": meta.get("step", 0), "source": source or {}, "dtype": str(dtype).removeprefix("torch.")}
    with open(os.path.join(out_dir, EXPORT_META_FILE), "w") as f:
        json.dump(info, f, indent=2)


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise HFFormatError(f"{path} is missing: is this a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise HFFormatError(f"{path} is not valid JSON ({e})") from None


def read_hf_weights(hf_dir: str) -> dict[str, torch.Tensor]:
    """Every tensor of model.safetensors, or of the shards listed in model.safetensors.index.json."""
    from safetensors.torch import load_file
    single, index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    if os.path.exists(single):
        return load_file(single)
    if os.path.exists(index):
        tensors = {}
        for shard in sorted(set(_read_json(index)["weight_map"].values())):
            tensors.update(load_file(os.path.join(hf_dir, shard)))
        return tensors
    raise HFFormatError(f"{hf_dir} has neither model.safetensors nor model.safetensors.index.json "
                        f"(only safetensors weights are read, not pytorch_model.bin)")


def read_hf_dir(hf_dir: str) -> tuple[dict[str, torch.Tensor], GPTConfig, RustBPETokenizer, dict]:
    """(our fp32 state dict, GPTConfig, tokenizer, export info or {}) of an HF nanochat directory."""
    if not os.path.isdir(hf_dir):
        raise HFFormatError(f"{hf_dir} is not a directory (expected an HF model directory with config.json)")
    config_path = os.path.join(hf_dir, "config.json")
    config = gpt_config_from_hf(_read_json(config_path), config_path)
    tokenizer_path = os.path.join(hf_dir, "tokenizer.json")
    tokenizer = tokenizer_from_hf(_read_json(tokenizer_path), tokenizer_path)
    if tokenizer.get_vocab_size() != config.vocab_size:
        raise HFFormatError(f"{tokenizer_path} has {tokenizer.get_vocab_size()} tokens but {config_path} "
                            f"says vocab_size {config.vocab_size}")
    from tokenizers import Tokenizer  # the reference: the file as the HF tokenizers library reads it
    sample = SAMPLE_TEXT.replace("<|bos|>", "")
    if Tokenizer.from_file(tokenizer_path).encode(sample, add_special_tokens=False).ids != tokenizer.encode(sample):
        raise HFFormatError(f"{tokenizer_path}: the HF tokenizer and its nanochat conversion encode a sample "
                            f"text differently (a normalizer, other pre-tokenizer steps or merges not "
                            f"derivable from the vocab?)")
    state_dict = from_hf_state_dict(read_hf_weights(hf_dir), config.n_layer, hf_dir)
    from nanochat.gpt import GPT
    with torch.device("meta"):
        expected = {k: v.shape for k, v in GPT(config).state_dict().items()}
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name]:
            raise HFFormatError(f"{hf_dir}: {name} has shape {tuple(tensor.shape)} but config.json implies "
                                f"{tuple(expected[name])}")
    info_path = os.path.join(hf_dir, EXPORT_META_FILE)
    info = _read_json(info_path) if os.path.exists(info_path) else {}
    eps = _read_json(config_path).get("rms_norm_eps", RMS_NORM_EPS)
    if eps != RMS_NORM_EPS:  # e.g. 1e-6, transformers' default: a tiny difference in every norm
        info["note"] = (f"config.json has rms_norm_eps {eps}; nanochat's GPT uses {RMS_NORM_EPS} "
                        f"(F.rms_norm's default, as the original nanochat): logits may differ slightly from transformers'")
    return state_dict, config, tokenizer, info


def save_as_checkpoint(hf_dir: str, source: str, model_tag: str | None = None, step: int | None = None,
                       overwrite: bool = False) -> tuple[str, int, dict]:
    """Import hf_dir into the base dir: the tokenizer into <base>/tokenizer (it must be absent or
    the same one unless overwrite), the weights as checkpoint `step` of stage `source` with tag
    `model_tag` (default d<n_layer>; step default: the exported step, else 0).
    Returns (checkpoint dir, step, info)."""
    from dataclasses import asdict

    from nanochat.checkpoint_manager import SOURCES, save_checkpoint
    from nanochat.common import get_base_dir
    from nanochat.tokenizer import TOKENIZER_FILE, get_tokenizer_dir
    state_dict, config, tokenizer, info = read_hf_dir(hf_dir)
    tokenizer_dir = get_tokenizer_dir()
    if os.path.exists(os.path.join(tokenizer_dir, TOKENIZER_FILE)) and not overwrite:
        present = RustBPETokenizer.from_directory(tokenizer_dir).enc
        same = (present._mergeable_ranks == tokenizer.enc._mergeable_ranks and present._pat_str == tokenizer.enc._pat_str
                and present._special_tokens == tokenizer.enc._special_tokens)
        if not same:
            raise HFFormatError(f"{tokenizer_dir} holds another tokenizer than {hf_dir}/tokenizer.json: import "
                                f"into another base dir (NANOCHAT_BASE_DIR=...) or pass --overwrite")
    else:
        tokenizer.save(tokenizer_dir)
    model_tag = model_tag or f"d{config.n_layer}"
    step = info.get("step", 0) if step is None else step
    checkpoint_dir = os.path.join(get_base_dir(), SOURCES[source][0], model_tag)
    if os.path.exists(os.path.join(checkpoint_dir, f"meta_{step:06d}.json")) and not overwrite:
        raise HFFormatError(f"{checkpoint_dir} already has a checkpoint of step {step}: choose another "
                            f"--model_tag or --step, or pass --overwrite")
    meta = {"model_config": asdict(config), "user_config": {}, "imported_from": os.path.abspath(hf_dir),
            "hf_export_info": info}
    save_checkpoint(checkpoint_dir, step, state_dict, None, meta)
    return checkpoint_dir, step, info


# -----------------------------------------------------------------------------
# Checks that an export computes what our model computes

SAMPLE_TEXT = "Hello world! It's 2025: 12345 apples,\n\n  tabs\tand ünïcödé 😀 你好 <|bos|>?"
SAMPLE_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 12 * 34?"},
    {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                      {"type": "python", "text": "12 * 34"},
                                      {"type": "python_output", "text": "408"},
                                      {"type": "text", "text": "It is 408."}]},
    {"role": "user", "content": "Thanks!\nAnd 2 + 2?"},
    {"role": "assistant", "content": "4"},
]}


def verify_export(model, tokenizer: RustBPETokenizer, hf_dir: str, atol: float = 1e-3) -> dict:
    """Load hf_dir with transformers' Auto classes (no custom code) and check it against ours:
    tokenizer ids on SAMPLE_TEXT, chat-template ids on SAMPLE_CONVERSATION, and the logits of that
    conversation (HF in fp32 against our model with the exported weights, i.e. rounded to the
    exported dtype). Raises HFFormatError on a mismatch; returns {max_abs_logit_diff, tokens}."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer
    hf_tok = AutoTokenizer.from_pretrained(hf_dir)
    if hf_tok(SAMPLE_TEXT.replace("<|bos|>", ""))["input_ids"] != tokenizer.encode(SAMPLE_TEXT.replace("<|bos|>", "")):
        raise HFFormatError(f"{hf_dir}/tokenizer.json encodes the sample text differently from nanochat's tokenizer")
    ours = tokenizer.render_for_completion(SAMPLE_CONVERSATION)
    messages = SAMPLE_CONVERSATION["messages"][:-1]
    theirs = list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"])
    if theirs != ours:
        raise HFFormatError(f"{hf_dir}: the chat template renders {theirs[:12]}... but nanochat renders {ours[:12]}...")
    hf_model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    hf_model.eval()
    exported_dtype = _read_json(os.path.join(hf_dir, "config.json")).get("dtype", "float32")
    reference = model
    if exported_dtype != "float32":  # compare with the weights that were written
        reference = copy.deepcopy(model)
        for p in reference.parameters():
            p.data = p.data.to(getattr(torch, exported_dtype)).float()
    ids = torch.tensor([ours], device=next(model.parameters()).device)
    with torch.no_grad():
        expected = reference(ids).float().cpu()
        got = hf_model(ids.cpu()).logits.float()
    diff = (expected - got).abs().max().item()
    if not diff <= atol:
        raise HFFormatError(f"{hf_dir}: transformers' logits differ from nanochat's by {diff:.3g} (> {atol})")
    return {"max_abs_logit_diff": diff, "tokens": len(ours)}
