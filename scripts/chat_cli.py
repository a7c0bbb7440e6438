"""
Chat with a trained model in the terminal; replies stream in as they are generated.

Run:
    python -m scripts.chat_cli                               # the SFT model, interactive
    python -m scripts.chat_cli -i rl -t 0.6 -k 50            # another stage, other sampling settings
    python -m scripts.chat_cli -p "Why is the sky blue?"     # answer one prompt, print it, exit 0
    python -m scripts.chat_cli --device_type cpu --model_tag d20 --step 700
    python -m scripts.chat_cli -i base --model_tag mdlm --unmask_steps 64 --block_len 32   # a diffusion model

In the chat: `clear` starts a new conversation; `quit`, `exit` or Ctrl-D leaves. Ctrl-C while the
model writes stops that reply (what it wrote so far stays in the conversation); at the prompt it leaves.

Design choices:
- The prompt is the whole conversation rendered by the tokenizer (`render_for_completion`) each turn;
  the Engine's KV cache makes that one prefill per turn.
- Text is printed through nanochat.chat_api.ReplyStream (as in chat_web): an incremental UTF-8
  decoder, so a character split over several tokens (emoji, CJK with a small vocabulary) prints
  once, whole, and tool use shown as what it is, `[calculator: 6*7 → 42]` (dim on a terminal,
  plain when piped), never as special tokens. Only the reply's text goes back into the conversation.
- Each reply uses a fresh random seed, so asking again gives a different sample (at temperature > 0).
- A masked-diffusion base model (base_train --objective=mdlm) writes its whole reply by iterative
  unmasking (nanochat/diffusion.py: --unmask_steps forward passes, most confident positions first,
  --block_len for left-to-right blocks), and then it is printed.
"""

import argparse
import secrets
import sys

# -----------------------------------------------------------------------------
# Flags

parser = argparse.ArgumentParser(description="Chat with a nanochat model in the terminal.")
parser.add_argument("-i", "--source", default="sft", choices=["base", "mid", "sft", "rl"], help="model stage")
parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
parser.add_argument("-t", "--temperature", type=float, default=0.6, help="sampling temperature (0: greedy)")
parser.add_argument("-k", "--top_k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
parser.add_argument("-m", "--max_tokens", type=int, default=512, help="longest reply, in tokens")
parser.add_argument("--model_tag", default=None, help="checkpoint tag, e.g. d20 (default: the largest)")
parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
parser.add_argument("--device_type", default="", choices=["cuda", "mps", "cpu"], help="default: autodetect")
parser.add_argument("--compile_decode", type=int, default=None, choices=[0, 1], help="1: compile the decode step (CUDA graphs), 0: eager; default: on for CUDA")
parser.add_argument("--unmask_steps", type=int, default=0,
                    help="diffusion models: forward passes per reply (0: one per token)")
parser.add_argument("--block_len", type=int, default=0,
                    help="diffusion models: fill blocks of this many tokens left to right (0: one block)")
args = parser.parse_args()
if args.temperature < 0:
    parser.error(f"--temperature must be >= 0, got {args.temperature}")
if args.top_k < 0:
    parser.error(f"--top_k must be >= 0, got {args.top_k}")
if args.max_tokens < 1:
    parser.error(f"--max_tokens must be >= 1, got {args.max_tokens}")
if args.unmask_steps < 0 or args.block_len < 0:
    parser.error(f"--unmask_steps and --block_len must be >= 0, got {args.unmask_steps} and {args.block_len}")

# -----------------------------------------------------------------------------
# Compute, model, engine

import torch  # noqa: E402  (after argument parsing: --help and flag errors stay instant)

from nanochat.chat_api import ReplyStream  # noqa: E402
from nanochat.checkpoint_manager import load_model  # noqa: E402
from nanochat.common import compute_init  # noqa: E402
from nanochat.diffusion import DiffusionEngine  # noqa: E402
from nanochat.engine import Engine  # noqa: E402

compute = compute_init(args.device_type)
try:
    model, tokenizer, meta = load_model(args.source, compute.device, phase="eval", model_tag=args.model_tag,
                                        step=args.step,
                                        objectives=("ar", "mdlm") if args.source == "base" else ("ar",))
except FileNotFoundError as e:
    print(f"chat_cli: {e}", file=sys.stderr)
    sys.exit(1)
model.to(compute.compute_dtype)  # bf16 weights on CUDA, cast once: no autocast while decoding
if model.causal:
    engine = Engine(model, tokenizer, compile_decode=None if args.compile_decode is None else bool(args.compile_decode))
else:  # masked diffusion
    engine = DiffusionEngine(model, tokenizer, steps=args.unmask_steps or None, block_len=args.block_len or None)
context_len = meta["model_config"]["sequence_len"]
stop_ids = {tokenizer.encode_special("<|assistant_end|>"), tokenizer.get_bos_token_id()}


def stream_reply(messages: list[dict]):
    """Yield ("text", str) in whole characters and ("tool", "[calculator: expr → value]") as the
    assistant's reply to `messages` (ending with a user message) is generated."""
    tokens = tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": ""}]})
    if len(tokens) >= context_len:
        raise ValueError(f"the conversation is {len(tokens)} tokens, more than the model reads ({context_len})")
    reply = ReplyStream(tokenizer)  # holds back a character cut short by max_tokens: never printed
    call = None  # the expression of a tool call whose output has not come yet
    with torch.inference_mode(), compute.autocast():
        for token_column, _ in engine.generate(tokens, num_samples=1, temperature=args.temperature,
                                               top_k=args.top_k or None, seed=secrets.randbelow(2**31),
                                               max_tokens=min(args.max_tokens, context_len - len(tokens))):
            if token_column[0] in stop_ids:
                break
            for kind, value in reply.push(token_column[0]):
                if kind == "tool_call":
                    if call is not None:  # a call the calculator could not answer
                        yield "tool", f"[calculator: {call}]"
                    call = value
                elif kind == "tool_output":
                    yield "tool", f"[calculator: {call} → {value}]" if call is not None else f"[calculator → {value}]"
                    call = None
                else:
                    if call is not None:
                        yield "tool", f"[calculator: {call}]"
                        call = None
                    yield "text", value
    for kind, value in reply.finish():  # a call or output cut short by max_tokens
        yield "tool", f"[calculator: {value}]" if kind == "tool_call" else f"[calculator → {value}]"


DIM, RESET = ("\033[2m", "\033[0m") if sys.stdout.isatty() else ("", "")


def print_reply(messages: list[dict], prefix: str = "") -> str | None:
    """Stream the reply to stdout; return it (cut short by Ctrl-C), or None if it could not be made."""
    pieces = []
    try:
        print(prefix, end="", flush=True)
        for kind, text in stream_reply(messages):
            if kind == "text":
                pieces.append(text)
                print(text, end="", flush=True)
            else:
                print(f"{DIM}{text}{RESET}", end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    except ValueError as e:
        print(f"\n(chat_cli: {e}; type 'clear' to start a new conversation)")
        return None
    print(flush=True)
    return "".join(pieces)


# -----------------------------------------------------------------------------
# One prompt (-p), or the interactive loop

if args.prompt is not None:
    if not args.prompt.strip():
        print("chat_cli: -p needs a non-empty prompt", file=sys.stderr)
        sys.exit(2)
    sys.exit(0 if print_reply([{"role": "user", "content": args.prompt}]) is not None else 1)

print(f"nanochat {args.source} model (step {meta['step']}) on {compute.device}. "
      f"Type 'clear' for a new conversation, 'quit' or Ctrl-D to leave.")
messages = []
while True:
    try:
        text = input("\nUser: ").strip()
    except (EOFError, KeyboardInterrupt):  # Ctrl-D / end of piped input, or Ctrl-C at the prompt
        print()
        break
    if text in ("quit", "exit"):
        break
    if text == "clear":
        messages = []
        print("(new conversation)")
        continue
    if not text:
        continue
    reply = print_reply(messages + [{"role": "user", "content": text}], prefix="\nAssistant: ")
    if reply is not None:
        messages += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
print("Bye.")
