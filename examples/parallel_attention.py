"""Tensor- and context-parallel attention with torch.distributed, checked against one rank.

    torchrun --standalone --nproc-per-node 2 examples/parallel_attention.py                  # CPU: gloo + interpreter
    torchrun --standalone --nproc-per-node 4 examples/parallel_attention.py --spec specs/tiny_gqa.yaml
    torchrun --standalone --nproc-per-node 8 examples/parallel_attention.py --spec specs/deepseek_v3.yaml --seq 4096  # 8 GPUs, NCCL

Every rank builds the same module (same seed). Tensor parallel: a copy sharded by heads
runs the whole batch (and, for mla, a prefill plus decode steps over its replicated
latent cache). Context parallel: each rank runs its zigzag share of the sequence and the
shares are gathered. Both, forward and input gradient, are compared with the unsharded
module on the full sequence; rank 0 prints the largest differences.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist

import mlagen
import mlagen.parallel

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spec", type=Path, default=ROOT / "specs" / "tiny_mla.yaml")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=16, help="a multiple of 2 x world size")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda:  # before the generated kernels are imported
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    package = mlagen.load(args.spec, ROOT / "generated")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)  # the same weights and inputs on every rank
    module = package.Attention(dtype=dtype, device=device)
    hidden = torch.randn(args.batch, args.seq, package.D_MODEL, dtype=dtype, device=device)
    expected = module(hidden.requires_grad_())
    expected.square().sum().backward()
    expected_grad, hidden.grad = hidden.grad, None
    scale = expected.abs().max().item()
    errors = {}

    sharded = mlagen.parallel.tensor_parallel(copy.deepcopy(module))
    out = sharded(hidden)
    out.square().sum().backward()
    errors["tensor parallel output"] = (out - expected).abs().max().item() / scale
    errors["tensor parallel input grad"] = (hidden.grad - expected_grad).abs().max().item() / expected_grad.abs().max().item()
    hidden.grad = None
    if package.SPEC["family"] == "mla":  # prefill, then decode steps over each rank's replicated latent cache
        cache = sharded.new_cache(batch_size=args.batch, max_tokens=args.seq)
        with torch.no_grad():
            steps = [sharded(hidden[:, : args.seq - 4], cache=cache)]
            steps += [sharded(hidden[:, t : t + 1], cache=cache) for t in range(args.seq - 4, args.seq)]
        errors["tensor parallel decode"] = (torch.cat(steps, 1) - expected).abs().max().item() / scale

    local = mlagen.parallel.zigzag_split(hidden.detach(), rank, world).requires_grad_()
    local_out = mlagen.parallel.context_parallel(module)(local)
    local_out.square().sum().backward()
    gathered = mlagen.parallel.zigzag_gather(local_out.detach())
    local_expected_grad = mlagen.parallel.zigzag_split(expected_grad, rank, world)
    errors["context parallel output"] = (gathered - expected).abs().max().item() / scale
    errors["context parallel input grad"] = (
        (local.grad - local_expected_grad).abs().max().item() / expected_grad.abs().max().item()
    )
    if rank == 0:
        print(f"{package.SPEC_NAME} on {world} ranks ({dist.get_backend()}, {dtype}); largest difference from one rank, "
              "relative to the largest value:")
        for what, error in errors.items():
            print(f"  {what:30s} {error:.2e}")
    return errors


if __name__ == "__main__":
    main()
    gc.collect()  # the Triton interpreter's reference cycles must go before the process group (CPU runs)
    dist.destroy_process_group()
