"""How often CPU bf16 autocast gets a convolution's weight gradient wrong, and that Float32Conv2d does not.

    python scripts/bf16_conv_check.py            # 200 trials per case, one thread

For each case: a 3x3 Conv2d (64 -> 128 channels, padding 1) on a batch of 32 random inputs of the given size and
stride, forward under ``torch.autocast("cpu", dtype=torch.bfloat16)``, backward of the sum; the weight gradient is
compared with float32 autograd on the same inputs (wrong: non-finite, or off by more than 5% of its largest
entry). The figures in docs/reliability.md ("CPU bf16 convolutions") came from this script.
"""

import argparse

import torch
import torch.nn.functional as F

from batchmates.models.conv_guard import Float32Conv2d

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--trials", type=int, default=200)
a = p.parse_args()
torch.set_num_threads(1)


def wrong_in(cls: type, size: int, stride: int) -> tuple[int, int]:
    nonfinite = wrong = 0
    for _ in range(a.trials):
        torch.manual_seed(0)
        conv = cls(64, 128, 3, stride, 1, bias=False)
        x = torch.randn(32, 64, size, size)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = conv(x)
        out.float().sum().backward()
        w = conv.weight.detach().clone().requires_grad_(True)
        F.conv2d(x, w, None, stride, 1).sum().backward()
        g = conv.weight.grad
        if not torch.isfinite(g).all():
            nonfinite += 1
        elif (g - w.grad).abs().max() > 0.05 * w.grad.abs().max():
            wrong += 1
    return nonfinite, wrong


print(f"torch {torch.__version__}; {a.trials} trials per case; wrong weight gradients (non-finite + finite but wrong)")
print("| input | stride | nn.Conv2d | Float32Conv2d |")
print("|---|---:|---:|---:|")
for size, stride in ((1, 2), (2, 3), (1, 1), (2, 2), (4, 2)):
    plain, guarded = wrong_in(torch.nn.Conv2d, size, stride), wrong_in(Float32Conv2d, size, stride)
    print(f"| {size}x{size} | {stride} | {plain[0]} + {plain[1]} | {guarded[0]} + {guarded[1]} |")
