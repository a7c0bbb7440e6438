"""
A short training run of a tiny GPT, for tests/test_distributed.py: the same global batch on any
number of ranks must give the same parameters.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 tests/dist_train_worker.py OUT_DIR [mdlm]

Each rank writes OUT_DIR/rank{r}.pt (final parameters, grad norms, its optimiser shard sizes).
The test calls `train(rank=0, world_size=1)` in its own process for the single-rank reference.

The model has awkward shapes on purpose: vocab 67 rows (AdamW pads dim 0 to split it over 2
ranks), 3 layers (Muon's same-shape groups have an odd count, so the last list is padded and one
rank owns nothing in it), GQA (c_k/c_v form their own shape group). Every step accumulates 4
micro-batches of 2 rows globally (4 on one rank, 2 per rank on two), clips at a norm the gradient
exceeds, and changes the learning rates and Muon's momentum: nanochat.optim.step, as every
training script calls it. With `mdlm` the objective is masked diffusion (bidirectional attention, the
last id as <|mask|>, id 0 as BOS), its masks drawn per step for the global batch, as base_train does.
"""

import sys

import torch

from nanochat import optim
from nanochat.diffusion import diffusion_loss, draw_noise
from nanochat.gpt import GPT, GPTConfig

CONFIG = GPTConfig(sequence_len=16, vocab_size=67, n_layer=3, n_head=2, n_kv_head=1, n_embd=32)
STEPS, MICRO_BATCHES, ROWS, MAX_NORM = 4, 4, 2, 0.3


def train(rank: int, world_size: int, objective: str = "ar") -> dict:
    torch.manual_seed(0)  # the same initial weights on every rank, without a broadcast
    with torch.device("meta"):
        model = GPT(CONFIG)
    model.to_empty(device="cpu")
    model.init_weights()
    model.causal = objective == "ar"
    mask_id = CONFIG.vocab_size - 1
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizers = model.setup_optimizers()
    data = torch.Generator().manual_seed(1)
    accum = MICRO_BATCHES // world_size  # this rank's micro-batches per step
    norms, local_norms = [], []
    for step in range(STEPS):
        x = torch.randint(0, CONFIG.vocab_size, (MICRO_BATCHES * ROWS, 16), generator=data)  # global batch
        y = torch.randint(0, CONFIG.vocab_size, (MICRO_BATCHES * ROWS, 16), generator=data)
        t, u = draw_noise(MICRO_BATCHES * ROWS, 16, step, "cpu")  # the global batch's masks
        for k in range(accum):
            rows = slice((rank * accum + k) * ROWS, (rank * accum + k + 1) * ROWS)
            if objective == "ar":
                loss = model(x[rows], y[rows])
            else:
                loss = diffusion_loss(model, x[rows].clamp(max=mask_id - 1), t[rows], u[rows], mask_id, bos_id=0)
            (loss / accum).backward()
        local_norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        norm = optim.step(optimizers, 1 - step / STEPS, momentum=optim.muon_momentum(step, ramp_steps=STEPS),
                          grad_clip=MAX_NORM)  # the step every training script takes
        norms.append(norm.item())
    adamw, muon = optimizers
    return dict(
        params={name: p.detach().clone() for name, p in model.named_parameters()},
        unchanged=[name for name, p in model.named_parameters() if torch.equal(p, initial[name])],
        norms=norms, local_norms=local_norms,
        adamw_rows={tuple(p.shape): adamw.state[p]["exp_avg"].size(0) for g in adamw.param_groups for p in g["params"]},
        muon_owned=[name for name, p in model.named_parameters() if p in muon.state],
    )


if __name__ == "__main__":
    from nanochat.common import compute_cleanup, compute_init
    compute = compute_init("cpu")
    assert compute.ddp and compute.world_size > 1, "run me under torchrun with several processes"
    result = train(compute.rank, compute.world_size, *sys.argv[2:3])
    torch.save(result, f"{sys.argv[1]}/rank{compute.rank}.pt")
    compute_cleanup()
