"""DeepSeek-V4 in mlagen.patch: one generated module per attention layer type (sliding,
CSA, HCA; mlagen/spec/from_hf_v4.py), and what transformers' own cache costs per token.

Only `self_attn` is replaced: the decoder layers' hyper-connections, norms and MoE stay
transformers' own, and call the patched layer the way they call DeepseekV4Attention.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

from mlagen.errors import MlagenError
from mlagen.hf.compat import cache_argument
from mlagen.spec.from_hf_v4 import MODEL_TYPE, layer_specs
from mlagen.spec.schema import CompressedSpec

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


def is_deepseek_v4(config) -> bool:
    return getattr(config, "model_type", None) == MODEL_TYPE


def layer_specs_for(config, dtype: torch.dtype) -> dict[str, CompressedSpec]:
    """The spec of each layer type of the model, named by a digest of their text (one package
    per distinct config, reused across calls)."""
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"mlagen runs bf16, fp16 or fp32 models; this one is {dtype}")
    data = config.to_dict()
    data["dtype"] = _DTYPE_NAMES[dtype]  # the weights' dtype, whatever config.json said
    source = f"{type(config).__name__} of the model"
    try:
        probe = layer_specs(data, "probe", source)
        digest = hashlib.sha256("".join(probe.texts.values()).encode()).hexdigest()[:10]
        return layer_specs(data, f"hf_{MODEL_TYPE}_{digest}", source).specs
    except MlagenError as exc:
        raise ValueError(f"mlagen cannot patch this model: {exc}") from None


def _stored_bytes(cache) -> int:
    """Every tensor a DeepseekV4 cache holds: the window's K = V rows (keys and values are
    one tensor), the compressed entries, the unfinished windows and the overlap state."""
    tensors: dict[int, torch.Tensor] = {}
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                tensors[id(tensor)] = tensor
        for name in ("compressed_kv", "buffer_kv", "buffer_gate", "overlap_kv", "overlap_gate"):
            for tensor in getattr(layer, name, {}).values():
                if isinstance(tensor, torch.Tensor):
                    tensors[id(tensor)] = tensor
    return sum(t.numel() * t.element_size() for t in tensors.values())


def transformers_cache_bytes_per_token(model: nn.Module) -> int | float:
    """What one more token costs in transformers' own cache, measured: its bytes after two
    prompt lengths past the window and multiples of every rate, their difference per token
    (the window and the unfinished windows are a fixed cost)."""
    from transformers.cache_utils import DynamicCache

    config = model.config
    step = math.lcm(*config.compress_rates.values())
    first = step * -(-config.sliding_window // step)  # past the window, a multiple of every rate
    lengths = (first, 2 * first)
    device = model.get_input_embeddings().weight.device
    stored = []
    for length in lengths:
        cache = DynamicCache(config=config)
        tokens = torch.zeros(1, length, dtype=torch.long, device=device)
        with torch.no_grad():
            model(tokens, **{cache_argument(model): cache}, use_cache=True)
        stored.append(_stored_bytes(cache))
    share = (stored[1] - stored[0]) / (lengths[1] - lengths[0])
    return int(share) if share.is_integer() else share
