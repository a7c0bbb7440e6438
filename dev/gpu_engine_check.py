"""
The KV-cache engine against naive generation, on whatever device is given (used by dev/gpu_check.sh).

    python -m dev.gpu_engine_check --device=cuda --depth=4

Greedy, random weights (normal / sqrt(fan_in)), batch 1 and 3, a prompt of 100 tokens, 48 new ones:
- fp32 weights, eager engine (compile_decode=0) vs GPT.generate;
- Compute.compute_dtype weights (bf16 on CUDA), compiled engine vs GPT.generate with the same weights.
Agreement is teacher-forced: each row's tokens against the argmax of one full, cache-free forward
of the same weights over that row's own prefix, so one near-tie flip (bf16 sums in another order)
costs one token, not the rest of the run. Prints one JSON line with the agreement of each and
exits 1 if any is below --min_agree, or if a run's length differs from naive generation's.
"""

import json

import torch

from bench.engine import build_model
from nanochat.common import compute_init
from nanochat.engine import Engine
from nanochat.flags import parse_flags
from nanochat.tokenizer import RustBPETokenizer

cfg = parse_flags(dict(device="", depth=4, new_tokens=48, min_agree=0.9), doc=__doc__)
compute = compute_init(cfg.device)
tokenizer = RustBPETokenizer.from_mergeable_ranks({bytes([i]): i for i in range(256)})
prompt = torch.randint(0, 256, (100,), generator=torch.Generator().manual_seed(0)).tolist()
result, ok = {"device": compute.device_type}, True
for name, dtype, compile_decode in (("fp32_eager", torch.float32, False), ("fast", compute.compute_dtype, None)):
    model = build_model(cfg.depth, 65536, 2048, compute.device, dtype)
    naive = list(model.generate(prompt, max_tokens=cfg.new_tokens, temperature=0.0))
    engine = Engine(model, tokenizer, compile_decode=compile_decode)
    for batch in (1, 3):
        steps = list(engine.generate(prompt, num_samples=batch, max_tokens=cfg.new_tokens, temperature=0.0))
        agree = total = 0
        for row in range(batch):  # teacher-forced: the argmax of one full forward over each row's own prefix
            tokens = [column[row] for column, _ in steps]
            with torch.inference_mode():
                preds = model(torch.tensor([prompt + tokens], device=compute.device))[0, len(prompt) - 1:-1]
            agree += sum(p == t for p, t in zip(preds.argmax(-1).tolist(), tokens))
            total += len(tokens)
        result[f"{name}_batch{batch}"] = f"{agree}/{total}"
        ok = ok and len(steps) == len(naive) and agree >= cfg.min_agree * total
    result[f"{name}_compiled"] = engine.compile_decode
print(json.dumps(result), flush=True)
raise SystemExit(0 if ok else 1)
