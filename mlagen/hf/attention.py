"""The attention layer a patched transformers model runs: a generated mlagen module
that also speaks transformers' attention-layer protocol.

`patched_class(Attention)` subclasses a generated Attention class, so the layer has the
generated module's parameters under transformers' names (state dicts are unchanged) and
its forward, called the way transformers' decoder layers call self_attn:

    out, _ = self_attn(hidden_states, position_embeddings=..., attention_mask=...,
                       cache=..., position_ids=..., **kwargs)

(`past_key_values=` before transformers 5.24; both names are taken, and any other
argument is either understood or refused: see compat.py.)

Padding: transformers pads prompts on the left and marks pads in a 2-D attention mask.
The layer moves each row's real tokens to the front (right padding), which a causal
kernel handles exactly because no real query sees a later key, runs the generated
module, and moves the outputs back; pads get zeros. With an MlagenCache only real
tokens are cached, so later steps need no mask at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
from torch import nn

from mlagen.hf.cache import CompressedCacheLayer, KVCacheLayer, LatentCacheLayer, MlagenCache
from mlagen.hf.compat import check_layer_arguments, layer_cache
from mlagen.runtime.launch import use_kernels
from mlagen.runtime.modules import generated_source


@dataclass(frozen=True, slots=True)
class Packing:
    """Where each row's real tokens go when they are moved to the front of the row."""

    order: torch.Tensor  # [B, S] int64: source index of packed slot j (real tokens first, in order)
    counts: tuple[int, ...]  # real tokens per row

    @staticmethod
    def of(real: torch.Tensor | None) -> Packing | None:
        """None when every token is real (nothing to move)."""
        if real is None:
            return None
        counts = real.sum(dim=1).tolist()
        if all(count == real.shape[1] for count in counts):
            return None
        # A stable sort on "is padding" keeps real tokens in order and puts them first.
        order = torch.sort((~real).to(torch.int8), dim=1, stable=True).indices
        return Packing(order, tuple(int(c) for c in counts))

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        index = self.order.view(*self.order.shape, *(1,) * (x.dim() - 2)).expand_as(x)
        return x.gather(1, index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Outputs back to the input layout; padding positions get zeros."""
        seqlen = packed.shape[1]
        real = (
            torch.arange(seqlen, device=packed.device)[None, :]
            < torch.tensor(self.counts, device=packed.device)[:, None]
        )
        packed = packed * real.view(*real.shape, *(1,) * (packed.dim() - 2)).to(packed.dtype)
        index = self.order.view(*self.order.shape, *(1,) * (packed.dim() - 2)).expand_as(packed)
        return torch.zeros_like(packed).scatter(1, index, packed)


def real_tokens(attention_mask: torch.Tensor | None, seqlen: int) -> torch.Tensor | None:
    """[B, S] bool: which of the S new tokens are real, from the 2-D mask that mlagen's
    attention implementation makes transformers pass (see patch.py)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise ValueError(
            f"mlagen-patched attention takes a 2-D or 4-D tensor mask, got {type(attention_mask).__name__}; "
            "keep the attention implementation mlagen.patch set"
        )
    if attention_mask.dim() == 2:
        return attention_mask[:, -seqlen:].bool()
    raise ValueError(
        f"mlagen-patched layers take a 2-D padding mask [batch, tokens], got shape {list(attention_mask.shape)}: "
        "a 4-D mask can hold patterns the causal kernels do not compute; pass the 2-D attention_mask"
    )


class TransformersAttention(nn.Module):
    """Mixin for a generated Attention class: transformers' calling convention and caches.
    Set by mlagen.patch: layer_idx, the original layer (kept out of the module tree), and
    `passes_selection`: sparse layers whose decoder layer hands each layer's top-k selection
    to the next (GLM-5: the layer takes prev_topk_indices and returns its selection third)."""

    layer_idx: int
    passes_selection: bool = False

    @property
    def generated(self) -> ModuleType:
        """The generated module.py this class comes from (kernels, reference path)."""
        return generated_source(self)

    @property
    def family(self) -> str:
        return self.generated.SPEC["family"]

    @property
    def sparse(self) -> bool:
        return self.generated.SPEC.get("sparse") is not None

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings=None,
        attention_mask=None,
        cache=None,
        position_ids: torch.Tensor | None = None,
        *,
        past_key_values=None,
        **kwargs,
    ):
        # position_embeddings are transformers' cos/sin of position_ids; the generated
        # module computes the same rotation from position_ids itself.
        # A GLM-5 decoder layer passes the previous layer's selection (None before the first
        # layer); mlagen's layers hand each other their own (key positions of the real tokens).
        previous = kwargs.pop("prev_topk_indices", None) if self.passes_selection else None
        check_layer_arguments(kwargs, causal=self.generated.SPEC["causal"])
        batch, seqlen = hidden_states.shape[:2]
        layer = self._cache_layer(layer_cache(cache, past_key_values))
        if position_ids is None:
            seen = layer.seen if layer is not None else 0
            position_ids = torch.arange(seen, seen + seqlen, device=hidden_states.device)[None]
        position_ids = position_ids.expand(batch, seqlen)
        packing = Packing.of(real_tokens(attention_mask, seqlen))
        if packing is not None:
            hidden_states, position_ids = packing.pack(hidden_states), packing.pack(position_ids)
        counts = packing.counts if packing is not None else None
        if self.family == "compressed":
            # Each row's real tokens, moved to the front, are at positions 0.. after its cached
            # ones: the compressed module takes them from there (its windows count from the first).
            position_ids = None
        selection = {}
        if self.sparse:
            # a layer without an indexer (GLM-5's "shared") reads the previous layer's choice
            selection = {"selected": previous if self.indexer is None else None, "return_selected": True}
        if layer is None:
            out = super().forward(hidden_states, position_ids, **selection)
        elif isinstance(layer, (LatentCacheLayer, CompressedCacheLayer)):
            out = super().forward(
                hidden_states, position_ids, cache=layer.storage(), new_tokens=counts, **selection
            )
        else:
            out = self._cached_kv_forward(hidden_states, position_ids, layer, counts or (seqlen,) * batch)
        if layer is not None:
            layer.seen += seqlen
        out, selected = out if self.sparse else (out, None)
        out = packing.unpack(out) if packing is not None else out
        return (out, None, selected) if self.passes_selection else (out, None)

    def _cache_layer(self, cache):
        """This layer's MlagenCache layer, or None to run without a cache. A transformers
        cache is left untouched and marked, so that reusing it for a later step (which would
        silently restart positions at 0) fails with a clear error instead."""
        if cache is None:
            return None
        if isinstance(cache, MlagenCache):
            if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
                # Appends write into the cache in place and decode reads it through kernels
                # without a backward: gradients would be silently wrong.
                raise ValueError(
                    "an MlagenCache is for inference: run under torch.no_grad() (generate() does), "
                    "or train with use_cache=False"
                )
            return cache.layers[self.layer_idx]
        skipped = cache.__dict__.setdefault("_mlagen_unfilled_layers", set())
        if self.layer_idx in skipped:
            raise ValueError(
                f"this {type(cache).__name__} was not filled by the mlagen-patched layers; "
                "decode with model.generate(), or pass cache=mlagen.hf.MlagenCache(model, batch_size, "
                "max_tokens) to the forward calls"
            )
        skipped.add(self.layer_idx)
        return None

    def _cached_kv_forward(self, hidden_states, position_ids, layer: KVCacheLayer, counts):
        hidden_states, position_ids = self._check_inputs(hidden_states, position_ids)
        generated = self.generated
        on_kernels = use_kernels(hidden_states, generated.kernels.KERNELS[0])
        table = generated.kernels.ATTENTION if on_kernels else generated.REFERENCE_ATTENTION
        return self._forward(hidden_states, position_ids, _CachedAttention(table, layer, tuple(counts)))

    def new_cache_layer(
        self,
        batch_size: int,
        max_tokens: int,
        page_size: int | None,
        num_pages: int | None,
        cache_dtype: str | None = None,
    ):
        weight = next(self.parameters())
        spec = self.generated.SPEC
        if self.family == "mla":
            options = {"cache_dtype": cache_dtype} if cache_dtype is not None else {}

            def make_storage():
                return self.new_cache(
                    batch_size,
                    max_tokens,
                    page_size=page_size or spec["page_size"],
                    num_pages=num_pages,
                    **options,
                )

            probe = self.new_cache(1, 1, page_size=1, **options)  # one token's rows: what a token costs
            return LatentCacheLayer(make_storage, batch_size, max_tokens, probe.bytes_per_token)
        if self.family == "compressed":

            def make_compressed_storage():
                return self.new_cache(
                    batch_size, max_tokens, page_size=page_size or spec["page_size"], num_pages=num_pages
                )

            probe = self.new_cache(1, 1, page_size=1)  # what a token costs: its share of an entry
            return CompressedCacheLayer(
                make_compressed_storage, batch_size, max_tokens, probe.bytes_per_token
            )
        kv_heads = spec.get("kv_heads") or spec["heads"]
        return KVCacheLayer(
            batch_size, max_tokens, kv_heads, spec["head_dim"], spec["head_dim"], weight.dtype, weight.device
        )


class _CachedAttention:
    """Stands in for the generated module's attention table: appends the new keys and
    values to the layer's cache, then attends each row's new tokens over all of its
    cached ones. Rows with the same cached length and new-token count share one launch
    (one launch in total when the batch is not padded)."""

    def __init__(self, table: dict, layer: KVCacheLayer, counts: tuple[int, ...]):
        self.table, self.layer, self.counts = table, layer, counts

    def __getitem__(self, name: str):
        attention = self.table[name]

        def cached_attention(q_a, q_b, k_a, k_b, v, *, scale, causal, window, group_mask):
            if q_b is not None or k_b is not None:
                raise ValueError(
                    "the K/V cache holds one key part; split-score kernels decode from the latent cache"
                )
            starts = self.layer.append(k_a, v, self.counts)
            batch, seqlen, heads = q_a.shape[:3]
            out = q_a.new_zeros((batch, seqlen, heads, v.shape[-1]))
            groups: dict[tuple[int, int], list[int]] = {}
            for row, key in enumerate(zip(starts, self.counts)):
                groups.setdefault(key, []).append(row)
            keys, values = self.layer.keys_buffer, self.layer.values_buffer
            for (start, count), rows in groups.items():
                if count == 0:
                    continue
                end = start + count
                if len(rows) == batch:
                    out[:, :count] = attention(
                        q_a[:, :count],
                        None,
                        keys[:, :end],
                        None,
                        values[:, :end],
                        scale=scale,
                        causal=causal,
                        window=window,
                        group_mask=group_mask,
                    )
                    continue
                index = torch.tensor(rows, device=q_a.device)
                out[index, :count] = attention(
                    q_a[index, :count],
                    None,
                    keys[index, :end],
                    None,
                    values[index, :end],
                    scale=scale,
                    causal=causal,
                    window=window,
                    group_mask=group_mask,
                )
            return out

        return cached_attention
