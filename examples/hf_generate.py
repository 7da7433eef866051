"""mlagen.patch on a transformers model, then generate() with the compressed paged cache.

Without arguments: a tiny random DeepSeek-V3 (2 layers, fp32, CPU, kernels under the
Triton interpreter) generates for a left-padded batch of 3 prompts, before and after
patching; the tokens are the same. With --model: a local checkpoint directory (any
DeepSeek-V2/V3, Kimi K2, Llama or Mistral), on the GPU when there is one.

    python examples/hf_generate.py
    python examples/hf_generate.py --model /path/to/DeepSeek-V2-Lite --new-tokens 32
"""

from __future__ import annotations

import argparse
import os

import torch
import transformers

import mlagen


def tiny_deepseek_v3() -> transformers.PreTrainedModel:
    config = transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, first_k_dense_replace=2,
        num_attention_heads=4, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256, dtype="float32", pad_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.DeepseekV3ForCausalLM(config)
    with torch.no_grad():  # unit-scale random weights, so that attention decides the tokens
        for name, param in model.named_parameters():
            param.copy_(1 + 0.3 * torch.randn_like(param) if name.endswith("norm.weight")
                        else torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model.eval()


def main(argv: list[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a local transformers checkpoint directory")
    parser.add_argument("--new-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():  # before patch() imports the generated kernels
        os.environ.setdefault("TRITON_INTERPRET", "1")
    model = (transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype="auto",
                                                              device_map="cuda" if torch.cuda.is_available() else None)
             if args.model else tiny_deepseek_v3())
    device = next(model.parameters()).device
    prompts = torch.randint(1, 97, (3, 7), generator=torch.Generator().manual_seed(1)).to(device)
    mask = torch.ones_like(prompts)
    mask[1, :2] = mask[2, :5] = 0  # left padding, as generate() expects
    prompts = prompts.masked_fill(mask == 0, model.config.pad_token_id or 0)
    options = dict(attention_mask=mask, max_new_tokens=args.new_tokens, do_sample=False)

    before = model.generate(prompts, **options)
    mlagen.patch(model)                # prints what was replaced and the cache bytes per token
    after = model.generate(prompts, **options)  # MLA layers: MlagenCache, paged latent + rope key
    mlagen.unpatch(model)
    print("transformers:", before.tolist())
    print("mlagen:      ", after.tolist())
    print("same tokens:", torch.equal(before, after))
    return before, after


if __name__ == "__main__":
    main()
