"""Decode throughput of a whole transformers model, patched by mlagen versus not.

    python -m mlagen.bench.hf_decode --layers 4 --batch 1 16 64 --context 4096

The model has a published model's real attention sizes (a config.json, DeepSeek-V3's by
default), a few layers, a small dense MLP and vocabulary, and random weights: attention
and its cache dominate decode, as in the real model. Every contender's cache is filled
with `context` random tokens per sequence (a prefill is not timed, and eager transformers
could not prefill 64 x 4k tokens anyway), then `steps` one-token forward calls are timed
after warm-up: tokens/s = batch * steps / seconds.

Contenders: transformers with attn_implementation "eager" and "sdpa" (their own
DynamicCache), and the model after mlagen.patch (its MlagenCache). Numbers mean
something on a GPU only; on CPU (--smoke) this checks the harness.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

CONTENDERS = ("transformers-eager", "transformers-sdpa", "mlagen")
SCHEMA = "mlagen-hf-decode/1"  # what `mlagen bench --report` looks for
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "tests" / "hf_configs" / "deepseek_v3.json"
SMOKE_SIZES = dict(
    hidden_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=32,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=16,
)


def build_model(config_path: Path, layers: int, dtype: torch.dtype, device: str, smoke: bool):
    """The config's attention in `layers` layers, with a 1024-wide dense MLP and a 1024-token vocabulary."""
    import transformers

    data = json.loads(Path(config_path).read_text())
    for key in ("quantization_config", "auto_map", "architectures"):
        data.pop(key, None)
    data.update(
        num_hidden_layers=layers,
        intermediate_size=1024,
        vocab_size=1024,
        first_k_dense_replace=layers,
        num_nextn_predict_layers=0,
    )
    if smoke:
        data.update(SMOKE_SIZES, intermediate_size=96, vocab_size=97)
    config = transformers.AutoConfig.for_model(**data)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def fill_transformers_cache(model, batch: int, context: int):
    """A DynamicCache holding `context` random tokens per sequence in every layer, in the
    shapes this transformers version caches (probed with one token)."""
    from transformers.cache_utils import DynamicCache

    from mlagen.hf.patch import probe_transformers_cache

    probe = probe_transformers_cache(model)
    cache = DynamicCache(config=model.config)
    for index, layer in enumerate(probe.layers):
        keys, values = (
            torch.randn(batch, t.shape[1], context, t.shape[3], dtype=t.dtype, device=t.device)
            for t in (layer.keys, layer.values)
        )
        cache.update(keys, values, index)
    return cache


def fill_mlagen_cache(model, batch: int, context: int, capacity: int):
    from mlagen.hf import MlagenCache
    from mlagen.hf.cache import LatentCacheLayer

    cache = MlagenCache(model, batch_size=batch, max_tokens=capacity)
    for layer in cache.layers:
        if isinstance(layer, LatentCacheLayer):
            storage = layer.storage()
            storage.reserve([context] * batch)
            storage.buffer.normal_()
            storage.commit([context] * batch)
        else:
            keys = torch.randn(
                batch, context, layer.kv_heads, layer.k_dim, dtype=layer.dtype, device=layer.device
            )
            layer.append(keys, torch.randn_like(keys), (context,) * batch)
        layer.seen = context
    return cache


def tokens_per_second(model, cache, batch: int, context: int, steps: int, warmup: int) -> float:
    from mlagen.hf.compat import cache_argument

    device = next(model.parameters()).device
    tokens = torch.randint(model.config.vocab_size, (batch, 1), device=device)

    def step(position: int):
        positions = torch.full((batch, 1), position, device=device)
        with torch.no_grad():
            return model(
                tokens, position_ids=positions, **{cache_argument(model): cache}, use_cache=True
            ).logits

    for offset in range(warmup):
        step(context + offset)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for offset in range(warmup, warmup + steps):
        step(context + offset)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def run(
    config_path: Path,
    layers: int,
    batches: list[int],
    context: int,
    steps: int,
    warmup: int,
    dtype: torch.dtype,
    device: str,
    smoke: bool,
) -> list[dict]:
    import mlagen

    model = build_model(config_path, layers, dtype, device, smoke)
    results = []
    for contender in CONTENDERS:
        if contender == "mlagen":
            model.set_attn_implementation("eager")
            report = mlagen.patch(model)
        else:
            model.set_attn_implementation(contender.removeprefix("transformers-"))
        for batch in batches:
            row = {"contender": contender, "batch": batch, "context": context, "layers": layers}
            try:
                if contender == "mlagen":
                    cache = fill_mlagen_cache(model, batch, context, context + warmup + steps)
                else:
                    cache = fill_transformers_cache(model, batch, context)
                row["tokens_per_s"] = tokens_per_second(model, cache, batch, context, steps, warmup)
            except torch.OutOfMemoryError:
                row["tokens_per_s"], row["note"] = None, "out of memory"
            del cache
            if device == "cuda":
                torch.cuda.empty_cache()
            results.append(row)
            print(
                f"{contender:20s} batch {batch:3d}: "
                + (f"{row['tokens_per_s']:10.1f} tokens/s" if row["tokens_per_s"] else row["note"]),
                flush=True,
            )
    mlagen.unpatch(model)
    for row in results:
        row["cache_bytes_per_token"] = (
            report.cache_bytes_per_token
            if row["contender"] == "mlagen"
            else report.transformers_cache_bytes_per_token
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlagen.bench.hf_decode", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="config.json (default DeepSeek-V3)"
    )
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU under the interpreter")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if device == "cpu" and not args.smoke:
        parser.error("needs a CUDA GPU; use --smoke for the CPU harness check")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    results = run(
        args.config, args.layers, args.batch, args.context, args.steps, args.warmup, dtype, device, args.smoke
    )
    if args.out:
        meta = {
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": str(dtype).removeprefix("torch."),
            "steps": args.steps,
            "warmup": args.warmup,
            "date": time.strftime("%Y-%m-%d"),
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {"schema": SCHEMA, "meta": meta, "results": results}
        args.out.write_text(json.dumps(document, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
