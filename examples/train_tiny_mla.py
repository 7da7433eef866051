"""Train a tiny MLA layer for a few steps on CPU, with attention in the generated
Triton kernels (forward and backward) under the Triton interpreter.

The task is exactly learnable: a student layer learns to reproduce a teacher
layer of the same spec (fixed random weights) on random inputs.

    python examples/train_tiny_mla.py [--steps 30]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the generated kernels are imported

import torch  # noqa: E402

import mlagen  # noqa: E402


def train(steps: int = 30, seed: int = 0, spec: str = "specs/tiny_mla.yaml", log_every: int = 5) -> list[float]:
    package = mlagen.load(spec, out_root=Path(spec).resolve().parent.parent / "generated")
    torch.manual_seed(seed + 1)
    teacher = package.Attention(dtype=torch.float32).requires_grad_(False)
    torch.manual_seed(seed)
    student = package.Attention(dtype=torch.float32)
    optimizer = torch.optim.Adam(student.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for step in range(steps):
        x = torch.randn(2, 16, package.D_MODEL, generator=generator)
        target = teacher(x)
        # Relative error, so the number reads the same whatever the teacher's output scale.
        loss = (student(x) - target).square().mean() / target.square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if step % log_every == 0 or step == steps - 1:
            print(f"step {step:3d}  relative loss {loss.item():.4f}")
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    losses = train(args.steps)
    print(f"relative loss {losses[0]:.4f} -> {losses[-1]:.4f}")
