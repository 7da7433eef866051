"""Greedy generation with the compressed paged latent cache, on CPU (Triton interpreter).

A toy language model (embedding -> one generated MLA layer -> output head, random
weights) generates 12 tokens for a batch of 2 prompts: one prefill call that fills
the cache through the expanded path, then one absorbed decode call per token. The
same tokens come out of recomputing the whole sequence at every step without a cache.

    python examples/generate_tiny_mla.py
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the generated kernels are imported

import torch  # noqa: E402

import mlagen  # noqa: E402

SPEC = Path(__file__).resolve().parent.parent / "specs" / "tiny_mla.yaml"


def generate(steps: int = 12, vocab: int = 50, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, str]:
    package = mlagen.load(SPEC, out_root=SPEC.parent.parent / "generated")
    torch.manual_seed(seed)
    embed = torch.nn.Embedding(vocab, package.D_MODEL)
    attention = package.Attention()
    head = torch.nn.Linear(package.D_MODEL, vocab)
    prompts = torch.randint(vocab, (2, 5))

    def next_token(tokens: torch.Tensor, cache=None) -> torch.Tensor:
        hidden = embed(tokens)
        return head(hidden + attention(hidden, cache=cache))[:, -1].argmax(-1, keepdim=True)

    cache = attention.new_cache(batch_size=2, max_tokens=prompts.shape[1] + steps)
    with torch.no_grad():
        cached, step_input = prompts, prompts
        for _ in range(steps):  # the prompt once (prefill fills the cache), then one token per call
            step_input = next_token(step_input, cache)
            cached = torch.cat([cached, step_input], dim=1)
        recomputed = prompts
        for _ in range(steps):  # the same model over the whole sequence at every step, no cache
            recomputed = torch.cat([recomputed, next_token(recomputed)], dim=1)
    return cached, recomputed, repr(cache)


if __name__ == "__main__":
    cached, recomputed, cache = generate()
    print("with the paged latent cache:", cached.tolist())
    print("recomputed without a cache: ", recomputed.tolist())
    print(cache)
    print("identical:", torch.equal(cached, recomputed))
