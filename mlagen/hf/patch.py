"""mlagen.patch / mlagen.unpatch: swap a transformers model's attention layers for
generated modules that share the layers' parameter tensors.

The spec comes from `model.config` through the from-hf path (so every refusal there,
with its config key, applies here), kernels are generated once per distinct config
into the mlagen cache directory and reused, and each `self_attn` becomes an instance
of a subclass of the generated Attention class (attention.py) whose parameters ARE the
original layer's Parameter objects: no copy, no extra memory, unchanged state dicts.

Patching also
- registers an attention implementation "mlagen" whose mask is the 2-D padding mask
  of the new tokens (None without padding), so transformers never materialises a
  [B, 1, S, S] mask the kernels would not read;
- makes generate() create an MlagenCache when the caller gives no cache.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path
from types import MethodType

import torch
from torch import nn

from mlagen.errors import MlagenError
from mlagen.hf.attention import TransformersAttention
from mlagen.hf.cache import MlagenCache
from mlagen.hf.compat import cache_argument
from mlagen.hf.deepseek_v4 import is_deepseek_v4, layer_specs_for, transformers_cache_bytes_per_token
from mlagen.spec.from_hf import spec_from_hf_config, yaml_from_hf_config

ATTN_IMPLEMENTATION = "mlagen"
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
_ORIGINAL = "_mlagen_original_attention"
_STATE = "_mlagen_patch_state"


def default_out_root() -> Path:
    """Where patch() generates kernels: $MLAGEN_CACHE_DIR/generated, else ~/.cache/mlagen/generated."""
    root = os.environ.get("MLAGEN_CACHE_DIR") or Path.home() / ".cache" / "mlagen"
    return Path(root) / "generated"


@dataclass(frozen=True, slots=True)
class PatchReport:
    layers: int
    layer_class: str
    spec_name: str
    family: str
    package_dir: Path
    cache_bytes_per_token: int  # over all patched layers
    transformers_cache_bytes_per_token: int  # the unpatched model's DynamicCache, measured

    def __str__(self) -> str:
        return (
            f"mlagen.patch: {self.layers} {self.layer_class} layers -> {self.family} module "
            f"{self.spec_name} ({self.package_dir}); cache {self.cache_bytes_per_token:,} B per token "
            f"(transformers' DynamicCache: {self.transformers_cache_bytes_per_token:,} B)"
        )


def patch(model: nn.Module, *, out_root: str | Path | None = None, verbose: bool = True) -> PatchReport:
    """Replace every attention layer of a transformers causal LM (DeepSeek-V2/V3/V3.2, Kimi K2,
    GLM-5, Llama, Mistral) with the generated module for its config; print one line saying what
    was replaced (verbose) and return it as a PatchReport."""
    if getattr(model, _STATE, None) is not None:
        raise ValueError("the model is already patched by mlagen; call mlagen.unpatch(model) first")
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise ValueError(
            f"mlagen.patch takes a transformers model with a .config, got {type(model).__name__}"
        )
    dropout = getattr(config, "attention_dropout", 0.0) or 0.0
    if dropout > 0:
        raise ValueError(
            f"the config has attention_dropout={dropout}, which mlagen's kernels do not apply; "
            "set model.config.attention_dropout = 0.0 to patch"
        )
    slots = _attention_slots(model)
    if not slots:
        raise ValueError(f"found no `self_attn` attention layers in {type(model).__name__}")
    originals = [parent.self_attn for parent in slots]
    weight = next(originals[0].parameters())
    # One spec for every layer, or (DeepSeek-V4) one per attention layer type.
    specs = (
        layer_specs_for(config, weight.dtype)
        if is_deepseek_v4(config)
        else {None: _spec_for(config, weight.dtype)}
    )
    import mlagen

    root = out_root if out_root is not None else default_out_root()
    packages = {kind: mlagen.load(spec, root) for kind, spec in specs.items()}
    name = f"Mlagen{type(originals[0]).__name__}"
    classes = {
        kind: type(name, (TransformersAttention, package.Attention), {}) for kind, package in packages.items()
    }
    v4 = is_deepseek_v4(config)
    before = transformers_cache_bytes_per_token(model) if v4 else _transformers_cache_bytes(model)
    replacements = [
        _replacement(classes[original.layer_type if v4 else None], original) for original in originals
    ]
    for parent, replacement in zip(slots, replacements):
        parent.self_attn = replacement
    _register_attention_implementation()
    object.__setattr__(model, _STATE, _own_configs(model))
    model._prepare_cache_for_generation = MethodType(_prepare_mlagen_cache, model)
    report = PatchReport(
        layers=len(replacements),
        layer_class=type(originals[0]).__name__,
        spec_name=", ".join(spec.name for spec in specs.values()),
        family=next(iter(specs.values())).family,
        package_dir=Path(next(iter(packages.values())).__file__).parent if len(packages) == 1 else Path(root),
        cache_bytes_per_token=MlagenCache(model, batch_size=1, max_tokens=1).bytes_per_token(),
        transformers_cache_bytes_per_token=before,
    )
    if verbose:
        print(report)
    return report


def unpatch(model: nn.Module) -> int:
    """Put back the attention layers patch() replaced; returns how many."""
    if getattr(model, _STATE, None) is None:
        raise ValueError("the model is not patched by mlagen")
    restored = 0
    for parent in _attention_slots(model):
        layer = parent.self_attn
        if isinstance(layer, TransformersAttention):
            parent.self_attn = getattr(layer, _ORIGINAL)
            restored += 1
    for module, config in getattr(model, _STATE):
        module.config = config
    object.__delattr__(model, _STATE)
    del model._prepare_cache_for_generation
    return restored


def patched_attention_layers(model: nn.Module) -> list[TransformersAttention]:
    """The patched layers in layer_idx order (the index the cache uses)."""
    layers = [m for m in model.modules() if isinstance(m, TransformersAttention)]
    return sorted(layers, key=lambda layer: layer.layer_idx)


def _attention_slots(model: nn.Module) -> list[nn.Module]:
    """Decoder layers: the modules with a `self_attn` child."""
    return [module for module in model.modules() if isinstance(getattr(module, "self_attn", None), nn.Module)]


def _spec_for(config, dtype: torch.dtype):
    data = config.to_dict()
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"mlagen runs bf16, fp16 or fp32 models; this one is {dtype}")
    data["dtype"] = _DTYPE_NAMES[dtype]  # the weights' dtype, whatever config.json said
    source = f"{type(config).__name__} of the model"
    # One package per distinct attention config: named by its spec text, reused across calls.
    try:
        digest = hashlib.sha256(yaml_from_hf_config(data, "probe", source).encode()).hexdigest()[:10]
        return spec_from_hf_config(data, f"hf_{data.get('model_type', 'model')}_{digest}", source)
    except MlagenError as exc:
        raise ValueError(f"mlagen cannot patch this model: {exc}") from None


def _replacement(layer_class: type, original: nn.Module) -> TransformersAttention:
    """A generated layer built on the meta device whose parameters are then set to the
    original layer's Parameter objects (shared, not copied)."""
    weight = next(original.parameters())
    # GLM-5's "shared" layers have no indexer: they take the previous layer's selection.
    options = {"indexer": False} if getattr(original, "indexer", True) is None else {}
    layer = layer_class(dtype=weight.dtype, device="meta", **options)
    theirs = dict(original.named_parameters())
    ours = dict(layer.named_parameters())
    missing = sorted(set(ours) - set(theirs))
    unused = sorted(set(theirs) - set(ours))
    if missing or unused:
        raise ValueError(
            f"{type(original).__name__} has parameters {sorted(theirs)} but the generated module expects "
            f"{sorted(ours)} (missing {missing}, unused {unused}); the config does not describe this layer"
        )
    for name, parameter in theirs.items():
        if parameter.shape != ours[name].shape:
            raise ValueError(
                f"{type(original).__name__}.{name} is {list(parameter.shape)} but the spec gives "
                f"{list(ours[name].shape)}; the config does not describe this layer"
            )
        owner_name, _, leaf = name.rpartition(".")
        setattr(layer.get_submodule(owner_name), leaf, parameter)
    layer.rotary_emb.materialize(weight.device)
    layer.layer_idx = original.layer_idx
    layer.passes_selection = "prev_topk_indices" in inspect.signature(type(original).forward).parameters
    object.__setattr__(layer, _ORIGINAL, original)  # not a child: parameters stay listed once
    return layer


def probe_transformers_cache(model: nn.Module):
    """transformers' own DynamicCache after one token through the model: what this
    transformers version stores per token in each layer (4.x: MLA's expanded K/V; 5.x:
    the latent)."""
    from transformers.cache_utils import DynamicCache

    cache = DynamicCache(config=model.config)
    token = torch.zeros(1, 1, dtype=torch.long, device=model.get_input_embeddings().weight.device)
    with torch.no_grad():
        model(token, **{cache_argument(model): cache}, use_cache=True)
    return cache


def _transformers_cache_bytes(model: nn.Module) -> int:
    """Bytes per token of the unpatched model's DynamicCache, measured."""
    cache = probe_transformers_cache(model)
    # sparse layers (DynamicIndexedLayer) also keep the indexer's keys
    stored = [(layer.keys, layer.values, getattr(layer, "indexer_keys", None)) for layer in cache.layers]
    return sum(t.numel() * t.element_size() for tensors in stored for t in tensors if t is not None)


# What transformers' mask builders pass to a mask interface besides the padding mask and
# the new-token count: sizes and helpers for materialising a mask, which mlagen never does.
_MASK_BUILDER_ARGUMENTS = frozenset(
    {
        "batch_size",
        "kv_length",
        "q_offset",
        "kv_offset",
        "mask_function",
        "local_size",
        "allow_is_bidirectional_skip",
        "allow_torch_fix",
        "dtype",
        "config",
        "use_vmap",
        "device",
    }
)


def _new_token_padding_mask(
    attention_mask=None, allow_is_causal_skip=True, q_length=None, cache_position=None, **kwargs
):
    """The mask transformers hands mlagen layers: which of the new tokens are real
    ([B, new tokens] bool), or None when all are. The kernels compute causal (and
    sliding-window) attention over a row's real tokens, nothing else: transformers turns
    off `allow_is_causal_skip` exactly when it adds another pattern (packed sequences,
    whose position_ids restart inside a row, or extra mask functions), so that is refused.
    The new-token count comes as q_length (transformers 5.2x) or as cache_position (one
    entry per new token, earlier releases)."""
    unknown = sorted(set(kwargs) - _MASK_BUILDER_ARGUMENTS)
    if unknown:
        raise ValueError(
            f"transformers asked mlagen's mask for argument(s) {', '.join(unknown)} it does not understand; "
            "use a transformers version in mlagen's supported range (pyproject.toml) or mlagen.unpatch(model)"
        )
    if not allow_is_causal_skip and not _plain_causal(kwargs.get("mask_function")):
        raise ValueError(
            "this call needs a mask beyond causal + padding (packed sequences restarting position_ids "
            "inside a row, or a custom mask function), which mlagen-patched layers do not compute; "
            "pass one sequence per row with an attention_mask, or mlagen.unpatch(model)"
        )
    if attention_mask is None:
        return None
    new_count = q_length if q_length is not None else cache_position.shape[0]
    new_tokens = attention_mask[:, -new_count:]
    return None if bool(new_tokens.all()) else new_tokens


def _plain_causal(mask_function) -> bool:
    """Whether a mask builder asked for causal + padding only: sparse models (DeepSeek-V3.2,
    GLM-5) turn off allow_is_causal_skip for their indexer whatever the mask holds, so the
    mask function itself says whether another pattern was added."""
    from transformers.masking_utils import causal_mask_function

    return mask_function is causal_mask_function


def _attention_not_used(*args, **kwargs):
    raise RuntimeError("attn_implementation='mlagen' is only for layers patched by mlagen.patch")


def _register_attention_implementation() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, _attention_not_used)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, _new_token_padding_mask)


def _own_configs(model: nn.Module) -> list[tuple[nn.Module, object]]:
    """Give the model private copies of its configs with attn_implementation "mlagen":
    models built from one config object share it, and patching this model must not
    change the others. Returns (module, original config) pairs for unpatch."""
    originals, copies = [], {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            continue
        if id(config) not in copies:
            copies[id(config)] = copy.deepcopy(config)
            copies[id(config)]._attn_implementation = ATTN_IMPLEMENTATION
        originals.append((module, config))
        module.config = copies[id(config)]
    return originals


def _prepare_mlagen_cache(
    self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
):
    """generate()'s cache set-up on a patched model: an MlagenCache unless the caller gave
    a cache or asked for none."""
    name = cache_argument(self)
    if model_kwargs.get(name) is not None or generation_config.use_cache is False:
        return type(self)._prepare_cache_for_generation(
            self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
        )
    if generation_config.num_beams > 1:
        raise ValueError("mlagen-patched models generate with greedy or sampling search; set num_beams=1")
    if generation_config.cache_implementation not in (None, "dynamic"):
        raise ValueError(
            f"cache_implementation={generation_config.cache_implementation!r} is not available on an "
            "mlagen-patched model, which keeps its own MlagenCache; leave it unset"
        )
    rows = max(generation_config.num_return_sequences or 1, 1) * batch_size
    model_kwargs[name] = MlagenCache(self, rows, max_cache_length)
