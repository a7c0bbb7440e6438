"""
Export a nanochat checkpoint as a Hugging Face model directory that `transformers` loads without
custom code (`NanoChatForCausalLM`, model_type "nanochat"; transformers >= 5):

    python -m scripts.hf_export -i sft -o hf/nanochat-d20            # the latest SFT model, fp32
    python -m scripts.hf_export -i base --model_tag d20 --step 21400 -o hf/base-d20 --dtype bfloat16

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained("hf/nanochat-d20")
    tokenizer = AutoTokenizer.from_pretrained("hf/nanochat-d20")
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=64, do_sample=False)

Writes model.safetensors, config.json, generation_config.json (stops at <|assistant_end|> or
<|bos|>, as our Engine does), tokenizer.json + tokenizer_config.json + chat_template.jinja, and
nanochat_export.json (stage, tag, step). The mapping and what was checked: nanochat/hf_convert.py.
Weights are cast to --dtype explicitly (whatever dtype the checkpoint stored): float32 is exact and
round-trips bit for bit through scripts.hf_import; bfloat16 halves the size.

Then, unless --no_verify, it loads the directory back with transformers and checks that the logits
of a sample conversation match ours and that the tokenizer and chat template give our ids.
Needs the optional dependencies: pip install -e '.[hf]'.
"""

import argparse
import os
import sys

parser = argparse.ArgumentParser(description="Export a nanochat checkpoint to the Hugging Face format.")
parser.add_argument("-i", "--source", required=True, choices=["base", "mid", "sft", "rl"], help="model stage")
parser.add_argument("-o", "--out_dir", required=True, help="the directory to write (created if needed)")
parser.add_argument("--model_tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="dtype of the weights written")
parser.add_argument("--no_verify", action="store_true", help="skip loading the export back with transformers")
args = parser.parse_args()

import torch  # noqa: E402

from nanochat.checkpoint_manager import SOURCES, find_largest_model, load_model  # noqa: E402
from nanochat.common import get_base_dir  # noqa: E402
from nanochat.hf_convert import export_hf, require_hf_packages, verify_export  # noqa: E402

require_hf_packages("hf_export", "safetensors", "transformers", note=" (transformers>=5, safetensors)")
import transformers  # noqa: E402

try:
    model, tokenizer, meta = load_model(args.source, "cpu", phase="eval", model_tag=args.model_tag, step=args.step)
except (FileNotFoundError, ValueError) as e:
    sys.exit(f"hf_export: {e}")
dtype = getattr(torch, args.dtype)
model_tag = args.model_tag or find_largest_model(os.path.join(get_base_dir(), SOURCES[args.source][0]))
source = {"source": args.source, "model_tag": model_tag, "step": meta["step"]}
export_hf(model, tokenizer, meta, args.out_dir, dtype, source=source)
print(f"wrote {args.source} {model_tag} step {meta['step']} ({model.num_params():,} parameters, {args.dtype}) to {args.out_dir}")
if not args.no_verify:
    report = verify_export(model, tokenizer, args.out_dir)
    print(f"verified with transformers {transformers.__version__}: max |logit difference| "
          f"{report['max_abs_logit_diff']:.2e} over {report['tokens']} tokens; tokenizer and chat template ids equal")
