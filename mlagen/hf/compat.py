"""What differs between the transformers versions mlagen supports (pyproject's range),
decided from the installed transformers itself rather than from version numbers.

- The cache argument: transformers 5.24 renamed `past_key_values` to `cache` in every
  model, decoder layer and attention layer (a deprecation shim maps the old name until
  5.40), and generate() keeps the cache under the new name in its model kwargs.
- The keyword arguments a decoder layer passes on to `self_attn`: a patched layer must
  understand each of them or refuse the call, never drop one silently (that is how the
  rename above turned into wrong tokens without an error).
"""

from __future__ import annotations

import inspect
from functools import cache

from torch import nn

OLD_CACHE_ARGUMENT = "past_key_values"
NEW_CACHE_ARGUMENT = "cache"

# Passed through every decoder layer by some transformers version; none changes what an
# attention layer computes. cache_position indexes transformers' own (static) caches:
# an MlagenCache appends after each row's cached tokens instead.
IGNORED_ARGUMENTS = frozenset(
    {
        "use_cache",
        "cache_position",
        "output_hidden_states",
        "output_router_logits",
        "num_items_in_batch",
        "return_dict",
    }
)
# Packed-sequence (varlen) metadata: mlagen's kernels take one sequence per row.
PACKED_ARGUMENTS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


@cache
def _forward_parameters(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_argument(model: nn.Module) -> str:
    """The name under which this transformers version's `model.forward` (and generate's
    model kwargs) take the cache."""
    if NEW_CACHE_ARGUMENT in _forward_parameters(type(model)):
        return NEW_CACHE_ARGUMENT
    return OLD_CACHE_ARGUMENT


def layer_cache(cache_argument_value, past_key_values):
    """The cache a decoder layer handed to self_attn, under either name."""
    if (
        cache_argument_value is not None
        and past_key_values is not None
        and cache_argument_value is not past_key_values
    ):
        raise ValueError("mlagen-patched attention got both `cache` and `past_key_values`; pass one cache")
    return cache_argument_value if cache_argument_value is not None else past_key_values


def check_layer_arguments(arguments: dict, *, causal: bool) -> None:
    """Refuse, in one line, every keyword argument a patched layer cannot honour."""
    unknown = sorted(
        set(arguments) - IGNORED_ARGUMENTS - {"output_attentions", "is_causal", *PACKED_ARGUMENTS}
    )
    if unknown:
        raise ValueError(
            f"mlagen-patched attention does not understand the argument(s) {', '.join(unknown)} that this "
            "transformers version passes to its attention layers; use a transformers version in mlagen's "
            "supported range (pyproject.toml) or mlagen.unpatch(model)"
        )
    if arguments.get("output_attentions"):
        raise ValueError(
            "mlagen's kernels never form the attention weights; call without output_attentions=True "
            "or mlagen.unpatch(model)"
        )
    is_causal = arguments.get("is_causal")
    if is_causal is not None and bool(is_causal) != causal:
        raise ValueError(
            f"is_causal={is_causal} but the patched layer's spec has causal={causal}; "
            "mlagen.unpatch(model) to run the layers another way"
        )
    packed = [name for name in PACKED_ARGUMENTS if arguments.get(name) is not None]
    if packed:
        raise ValueError(
            f"packed sequences ({', '.join(packed)}) are not computed by mlagen-patched layers; "
            "pass one sequence per row with an attention_mask, or mlagen.unpatch(model)"
        )
