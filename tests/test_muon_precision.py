"""
Muon's Newton-Schulz on the paths the training runs take: fp32 eager (CPU, MPS) and, as the
reference, bf16 compiled (CUDA). Both are checked on the CPU against the fp32 eager result.

Measured (relative Frobenius difference to fp32 eager, random Gaussian G, torch 2.13 CPU):
- bf16 eager: 0.0135 at (96, 256), 0.0117 at (256, 1024), 0.0116 at (1024, 256);
- compiled fp32 (inductor, CPU): 0 to 1.6e-6;
- compiled bf16: 0.0125 / 0.0118 / 0.0116 (vs bf16 eager: up to 0.016, bf16 summation order).
The bounds below are about 2x those figures.
"""

import pytest
import torch

from nanochat.optim import zeropower_compiled, zeropower_via_newtonschulz5

BF16_BOUND = 0.03  # measured <= 0.0135 (see above)
COMPILED_FP32_BOUND = 1e-4  # measured <= 1.6e-6


def relative_difference(x, reference):
    return ((x.float() - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("shape", [(96, 256), (256, 96)])
def test_bf16_newton_schulz_stays_close_to_fp32(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    fp32 = zeropower_via_newtonschulz5(G)
    bf16 = zeropower_via_newtonschulz5(G, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.shape == G.shape
    assert 0 < relative_difference(bf16, fp32) < BF16_BOUND


@pytest.mark.parametrize("shape", [(96, 256), (256, 96)])
def test_compiled_newton_schulz_matches_eager(shape):
    G = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    fp32 = zeropower_via_newtonschulz5(G)
    assert relative_difference(zeropower_compiled(G), fp32) < COMPILED_FP32_BOUND
    compiled_bf16 = zeropower_compiled(G, dtype=torch.bfloat16)
    assert compiled_bf16.dtype == torch.bfloat16
    assert relative_difference(compiled_bf16, fp32) < BF16_BOUND
