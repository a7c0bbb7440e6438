"""
Import a Hugging Face nanochat model directory (`NanoChatForCausalLM`: ours from scripts.hf_export,
or published weights downloaded with e.g. `huggingface-cli download karpathy/nanochat-d32 --local-dir
hf/d32`) into this repo's checkpoint layout, so chat_cli, chat_web and chat_eval run on it:

    python -m scripts.hf_import hf/d32                         # -> <base>/chatsft_checkpoints/d32/
    python -m scripts.hf_import hf/my-model --source base --model_tag d20 --step 0
    python -m scripts.chat_cli -i sft --model_tag d32

The tokenizer (tokenizer.json, a byte-level BPE with nanochat's 9 special tokens) becomes
<base>/tokenizer/tokenizer.pkl + token_bytes.pt; a base dir holds one tokenizer, so a different one
already there is an error (use another NANOCHAT_BASE_DIR, or --overwrite). Weights are stored in
fp32, like every parameter of our GPT: an fp32 export comes back bit for bit. Everything the
mapping refuses (another activation, softcap, rope or a tied head) is reported as one line.
Needs the optional dependencies: pip install -e '.[hf]'.
"""

import argparse
import sys

parser = argparse.ArgumentParser(description="Import a Hugging Face nanochat directory as a nanochat checkpoint.")
parser.add_argument("hf_dir", help="directory with config.json, model.safetensors and tokenizer.json")
parser.add_argument("--source", default="sft", choices=["base", "mid", "sft", "rl"], help="stage to file it under")
parser.add_argument("--model_tag", default=None, help="checkpoint tag (default: d<number of layers>)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the exported step, else 0)")
parser.add_argument("--overwrite", action="store_true", help="replace a different tokenizer / the same step")
args = parser.parse_args()

from nanochat.hf_convert import HFFormatError, require_hf_packages, save_as_checkpoint  # noqa: E402

require_hf_packages("hf_import", "safetensors", "tokenizers")

try:
    checkpoint_dir, step, info = save_as_checkpoint(args.hf_dir, args.source, args.model_tag, args.step, args.overwrite)
except HFFormatError as e:
    sys.exit(f"hf_import: {e}")
if "note" in info:
    print(f"note: {info['note']}")
print(f"imported {args.hf_dir} as step {step} in {checkpoint_dir}")
