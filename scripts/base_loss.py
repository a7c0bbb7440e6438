"""
Evaluate a base model checkpoint: bits per byte on --split_tokens tokens of the train and of the
val split, plus greedy completions of a few fixed prompts; writes a report section. For a masked
diffusion model (base_train --objective=mdlm) the figure is an upper bound from the ELBO, with
--t_samples masking rates per row from a fixed seed (nanochat/diffusion.py), labelled as a bound.

Run:
    python -m scripts.base_loss                                  # largest base model, latest step
    torchrun --standalone --nproc_per_node=8 -m scripts.base_loss -- --device_batch_size=16
    python -m scripts.base_loss --device_type=cpu --split_tokens=65536 --device_batch_size=4
"""

from nanochat.checkpoint_manager import load_model
from nanochat.common import compute_cleanup, compute_init, print0
from nanochat.dataloader import tokenizing_distributed_data_loader
from nanochat.dataset import check_shards
from nanochat.diffusion import evaluate_bpb_bound
from nanochat.flags import FlagError, StopRun, parse_flags, print_flags
from nanochat.loss_eval import evaluate_bpb, greedy_samples
from nanochat.report import get_report
from nanochat.tokenizer import get_token_bytes

# -----------------------------------------------------------------------------
# Flags

DEFAULTS = dict(
    device_type="",  # cuda | mps | cpu; empty = autodetect
    device_batch_size=32,
    split_tokens=20 * 524288,  # tokens evaluated per split
    model_tag="",  # default: the largest d<depth> in base_checkpoints
    step=-1,  # default: the latest complete checkpoint
    t_samples=4,  # masked diffusion only: masking rates t drawn per row for the bpb bound
)
cfg = parse_flags(DEFAULTS, doc=__doc__)

# -----------------------------------------------------------------------------
# Compute, model

compute = compute_init(cfg.device_type)
device = compute.device
print_flags(cfg, DEFAULTS)
try:
    model, tokenizer, meta = load_model("base", device, phase="eval", model_tag=cfg.model_tag or None,
                                        step=cfg.step if cfg.step >= 0 else None, objectives=("ar", "mdlm"))
except FileNotFoundError as e:  # the message says which command writes the checkpoint
    raise StopRun(f"base_loss: {e}") from None
sequence_len = meta["model_config"]["sequence_len"]
token_bytes = get_token_bytes(device=device)
tokens_per_step = cfg.device_batch_size * sequence_len * compute.world_size
if cfg.split_tokens < tokens_per_step:
    raise FlagError(f"--split_tokens={cfg.split_tokens} is less than one batch "
                    f"(device_batch_size · sequence_len · world_size = {tokens_per_step})")
steps = cfg.split_tokens // tokens_per_step
try:
    check_shards()  # a damaged train or val shard: one line now, not a traceback halfway
except FileNotFoundError as e:
    raise StopRun(f"base_loss: {e}") from None
print0(f"base model at step {meta['step']}: {steps} batches of {tokens_per_step:,} tokens per split")
mdlm = meta.get("objective", "ar") == "mdlm"
label = "bpb bound (ELBO)" if mdlm else "bpb"  # masked diffusion: an upper bound, not the exact figure
if mdlm and cfg.t_samples < 1:
    raise FlagError(f"--t_samples must be >= 1 (got {cfg.t_samples})")

# -----------------------------------------------------------------------------
# Bits per byte on train and val

bpb_results = {}
for split in ("train", "val"):
    loader = tokenizing_distributed_data_loader(cfg.device_batch_size, sequence_len, split, device=device)
    with compute.autocast():
        if mdlm:
            mask_id, bos_id = tokenizer.encode_special("<|mask|>"), tokenizer.get_bos_token_id()
            bpb_results[split] = evaluate_bpb_bound(model, loader, steps, token_bytes, mask_id, bos_id,
                                                    cfg.t_samples, name=f"{split} {label}")
        else:
            bpb_results[split] = evaluate_bpb(model, loader, steps, token_bytes, name=f"{split} bpb")
    print0(f"{split} {label}: {bpb_results[split]:.4f}")

# -----------------------------------------------------------------------------
# Greedy samples (rank 0)

samples = greedy_samples(model, tokenizer, compute.autocast) if compute.master_process else []
for sample in samples:
    print0(repr(sample))

# -----------------------------------------------------------------------------
# Report, cleanup

get_report().log(section="Base model loss", data=[  # rank 0 writes; a no-op elsewhere
    {"model step": meta["step"], **({"objective": f"mdlm, {cfg.t_samples} t samples per row"} if mdlm else {}),
     f"train {label}": bpb_results["train"], f"val {label}": bpb_results["val"]},
    {f"sample {i}": s for i, s in enumerate(samples)},
])
compute_cleanup()
