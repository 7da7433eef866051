"""DeepSeek-V4 config.json -> one `compressed` spec per distinct attention layer type.

A V4 model mixes three attention layers (transformers' DeepseekV4Attention by `layer_types`):
sliding_attention (a 128-token window only), compressed_sparse_attention (CSA: entries of 4
tokens from overlapping windows, a lightning indexer keeping the top k) and
heavily_compressed_attention (HCA: entries of 128 tokens, all attended). Each becomes its own
spec; the layer pattern says which layer is which. Values are read the way
DeepseekV4Config reads them: its defaults, the published checkpoints' legacy keys
(`compress_ratios`, `qk_rope_head_dim`, `rope_scaling`, `compress_rate_csa/hca`) and the 5.x
keys (`layer_types`, `compress_rates`, `partial_rotary_factor`, `rope_parameters` with its
`main` and `compress` tables). Sliding layers take the main rope, CSA/HCA layers the
compress rope (yarn), exactly as transformers assigns them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlagen.errors import MlagenError, SpecError
from mlagen.spec.from_hf import (
    Conversion,
    _atomic_write,
    _Config,
    _Draft,
    _dtype,
    _kind,
    _render,
    load_hf_config,
)
from mlagen.spec.parse import parse_spec
from mlagen.spec.schema import CompressedSpec

MODEL_TYPE = "deepseek_v4"
LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
SUFFIX = {
    "sliding_attention": "sliding",
    "compressed_sparse_attention": "csa",
    "heavily_compressed_attention": "hca",
}
LETTER = {"sliding_attention": "S", "compressed_sparse_attention": "C", "heavily_compressed_attention": "H"}
# DeepseekV4Config's legacy per-layer ratios (compress_ratios) and default compress_rates.
RATIO_TO_LAYER_TYPE = {
    0: "sliding_attention",
    4: "compressed_sparse_attention",
    128: "heavily_compressed_attention",
}
DEFAULT_RATES = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}
_DEFAULT = "absent: transformers' default"


def is_layered(config: Any) -> bool:
    """Whether a parsed config.json describes several attention layer types (DeepSeek-V4)."""
    return isinstance(config, dict) and config.get("model_type") == MODEL_TYPE


@dataclass(frozen=True, slots=True)
class LayerSpecs:
    """One spec (and its YAML) per layer type present, in LAYER_TYPES order, and every layer's type."""

    texts: dict[str, str]
    specs: dict[str, CompressedSpec]
    layer_types: tuple[str, ...]

    @property
    def pattern(self) -> str:
        """One letter per layer: S sliding, C compressed sparse (CSA), H heavily compressed (HCA)."""
        return "".join(LETTER[kind] for kind in self.layer_types)

    def describe(self) -> str:
        """`43 layers: 2 sliding_attention (0-1), 21 compressed_sparse_attention (2, 4, ..., 42), ...`"""
        parts = []
        for kind in self.specs:
            layers = [i for i, t in enumerate(self.layer_types) if t == kind]
            parts.append(f"{len(layers)} {kind} ({_layers(layers)})")
        return f"{len(self.layer_types)} layers: {', '.join(parts)}; pattern {self.pattern}"


def _layers(layers: list[int]) -> str:
    """[0, 1] -> '0-1'; an arithmetic run of step 2 -> '2, 4, ..., 42'."""
    if len(layers) <= 3:
        return ", ".join(map(str, layers))
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if steps == {1}:
        return f"{layers[0]}-{layers[-1]}"
    if len(steps) == 1:
        return f"{layers[0]}, {layers[1]}, ..., {layers[-1]}"
    return ", ".join(map(str, layers))


def _layer_types(cfg: _Config, layers: int) -> tuple[str, ...]:
    """As DeepseekV4Config.__post_init__: layer_types, else the legacy compress_ratios (0/4/128
    per layer), else V4-Pro's default (2 HCA, then CSA and HCA alternating); cut to the layers."""
    types = cfg.data.get("layer_types")
    key = "layer_types"
    if types is None and cfg.data.get("compress_ratios") is not None:
        key = "compress_ratios"
        ratios = cfg.data["compress_ratios"]
        if not isinstance(ratios, list) or any(r not in RATIO_TO_LAYER_TYPE for r in ratios):
            raise cfg.error(key, f"must be a list of 0, 4 and 128 (sliding, CSA, HCA), got {ratios!r}")
        types = [RATIO_TO_LAYER_TYPE[r] for r in ratios]
    if types is None:
        interleave = [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention"
            for i in range(layers - 2)
        ]
        types = ["heavily_compressed_attention"] * min(layers, 2) + interleave
    if not isinstance(types, list) or any(t not in LAYER_TYPES for t in types):
        raise cfg.error(key, f"must be a list of {', '.join(LAYER_TYPES)}, got {types!r}")
    if len(types) < layers:
        raise cfg.error(key, f"gives {len(types)} layers but num_hidden_layers is {layers}")
    return tuple(types[:layers])


def _rates(cfg: _Config) -> dict[str, tuple[int, str, str]]:
    """The compression rate of CSA and HCA layers, with the key it came from (and a note)."""
    table = cfg.data.get("compress_rates") or {}
    if not isinstance(table, dict):
        raise cfg.error("compress_rates", f"must be an object, got {_kind(table)}")
    rates = {}
    for kind, legacy in (
        ("compressed_sparse_attention", "compress_rate_csa"),
        ("heavily_compressed_attention", "compress_rate_hca"),
    ):
        if legacy in cfg.data:
            rates[kind] = (cfg.int(legacy), legacy, "")
        elif kind in table:
            rates[kind] = (cfg.int(kind, table=table, prefix="compress_rates."), f"compress_rates.{kind}", "")
        else:
            rates[kind] = (DEFAULT_RATES[kind], "compress_rates", _DEFAULT)
    return rates


def _rope_tables(cfg: _Config, head_dim: int) -> tuple[dict[str, Any], str, dict[str, Any], str, int]:
    """(main table, its key, compress table, its key, rope_head_dim). transformers 5 saves the
    nested {main, compress}; older configs have rope_theta / compress_rope_theta beside one flat
    scaling table (rope_scaling or rope_parameters), which only the compress rope takes."""
    params = cfg.data.get("rope_parameters")
    legacy_rope = cfg.data.get("qk_rope_head_dim")
    partial = cfg.data.get("partial_rotary_factor")
    if legacy_rope is not None:
        rope_dim = cfg.int("qk_rope_head_dim")
    elif partial is not None:
        factor = cfg.float("partial_rotary_factor")
        rope_dim = int(head_dim * factor)
    else:
        rope_dim = int(head_dim * 64 / 512)  # DeepseekV4Config.default_partial_rotary_factor
    if (
        isinstance(params, dict)
        and isinstance(params.get("main"), dict)
        and isinstance(params.get("compress"), dict)
    ):
        return (
            params["main"],
            "rope_parameters.main",
            params["compress"],
            "rope_parameters.compress",
            rope_dim,
        )
    flat_key = "rope_scaling" if cfg.data.get("rope_scaling") else "rope_parameters"
    flat = cfg.data.get(flat_key) or {}
    if not isinstance(flat, dict):
        raise cfg.error(flat_key, f"must be an object or null, got {_kind(flat)}")
    main = {"rope_type": "default", "rope_theta": cfg.data.get("rope_theta", 10000.0)}
    compress = {**{k: v for k, v in flat.items() if k not in ("main", "compress")}}
    compress["rope_theta"] = cfg.data.get("compress_rope_theta", 160000.0)
    return main, "rope_theta", compress, flat_key, rope_dim


def _set_rope(cfg: _Config, draft: _Draft, table: dict[str, Any], key: str, theta_key: str) -> None:
    prefix = f"{key}."
    theta = table.get("rope_theta")
    if not isinstance(theta, int | float) or isinstance(theta, bool):
        raise cfg.error(theta_key, f"must be a number, got {theta!r}")
    draft.set("rope.theta", float(theta), theta_key)
    draft.set("rope.layout", "interleave", "model_type", "DeepseekV4 rotates interleaved pairs in place")
    rope_type = table.get("rope_type", table.get("type", "default"))
    if rope_type in (None, "default"):
        return
    if rope_type != "yarn":
        raise cfg.error(
            prefix + "rope_type", f"rope scaling {rope_type!r} is not supported; mlagen implements yarn"
        )
    attention_factor = table.get("attention_factor", 1.0)
    if attention_factor != 1.0:
        raise cfg.error(
            prefix + "attention_factor",
            f"{attention_factor!r}: DeepSeek-V4 keeps cos/sin unscaled (attention_factor 1), as mlagen's compressed family does",
        )
    draft.set("rope.scaling.type", "yarn", prefix + "type")
    draft.set("rope.scaling.factor", cfg.float("factor", table=table, prefix=prefix), prefix + "factor")
    original = "original_max_position_embeddings"
    if original in table:
        draft.set(
            "rope.scaling.original_max_position",
            cfg.int(original, table=table, prefix=prefix),
            prefix + original,
        )
    else:
        draft.set(
            "rope.scaling.original_max_position",
            draft.value("max_position"),
            "max_position_embeddings",
            f"no {original}",
        )
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if table.get(name):
            draft.set(f"rope.scaling.{name}", cfg.float(name, table=table, prefix=prefix), prefix + name)
        else:
            draft.set(f"rope.scaling.{name}", default, prefix + name, _DEFAULT)


def _draft(cfg: _Config, kind: str, rates: dict[str, tuple[int, str, str]], ropes) -> _Draft:
    draft = _Draft()
    draft.set("family", "compressed", "model_type", kind)
    draft.set("d_model", cfg.int("hidden_size", 4096), "hidden_size")
    heads = cfg.int("num_attention_heads", 64)
    draft.set("heads", heads, "num_attention_heads")
    kv_heads = cfg.int("num_key_value_heads", 1)
    if kv_heads != 1:
        raise cfg.error("num_key_value_heads", f"{kv_heads}: DeepSeek-V4 attends with one shared K = V head")
    max_position = cfg.int("max_position_embeddings", 1048576)
    draft.set("max_position", max_position, "max_position_embeddings")
    head_dim = cfg.int("head_dim", 512)
    main, main_key, compress, compress_key, rope_dim = ropes
    draft.set("head_dim", head_dim, "head_dim")
    draft.set(
        "rope_head_dim",
        rope_dim,
        "qk_rope_head_dim" if "qk_rope_head_dim" in cfg.data else "partial_rotary_factor",
    )
    draft.set("q_lora_rank", cfg.int("q_lora_rank", 1024), "q_lora_rank")
    draft.set("o_groups", cfg.int("o_groups", 8), "o_groups")
    draft.set("o_lora_rank", cfg.int("o_lora_rank", 1024), "o_lora_rank")
    draft.set("window", cfg.int("sliding_window", 128), "sliding_window")
    draft.set("sinks", True, "model_type", "a learned sink logit per head")
    if kind == "sliding_attention":
        _set_rope(
            cfg, draft, main, main_key, "rope_theta" if main_key == "rope_theta" else main_key + ".rope_theta"
        )
    else:
        theta_key = (
            "compress_rope_theta"
            if compress_key != "rope_parameters.compress"
            else compress_key + ".rope_theta"
        )
        _set_rope(cfg, draft, compress, compress_key, theta_key)
        rate, rate_key, note = rates[kind]
        draft.set("compression.rate", rate, rate_key, note)
        if kind == "compressed_sparse_attention":
            draft.set("compression.overlap", True, "model_type", "CSA pools overlapping windows")
            draft.set("compression.indexer.heads", cfg.int("index_n_heads", 64), "index_n_heads")
            draft.set("compression.indexer.head_dim", cfg.int("index_head_dim", 128), "index_head_dim")
            draft.set("compression.indexer.top_k", cfg.int("index_topk", 512), "index_topk")
    draft.set(
        "norm_eps", cfg.float("rms_norm_eps", 1e-6), "rms_norm_eps", "every norm of DeepseekV4Attention"
    )
    draft.set("causal", True, "model_type", "a decoder")
    _dtype(cfg, draft)
    return draft


def layer_specs(config: dict[str, Any], name: str, source: str = "config.json") -> LayerSpecs:
    """The spec of every layer type a DeepSeek-V4 config uses, named `<name>_sliding`,
    `<name>_csa` and `<name>_hca`."""
    cfg = _Config(config, source)
    if cfg.get("model_type") != MODEL_TYPE:
        raise cfg.error("model_type", f"layer specs are read from {MODEL_TYPE} configs")
    if cfg.data.get("attention_bias"):
        raise cfg.error("attention_bias", "true: DeepseekV4Attention has no biases whatever the config says")
    layers = cfg.int("num_hidden_layers", 43)
    types = _layer_types(cfg, layers)
    rates, ropes = _rates(cfg), _rope_tables(cfg, cfg.int("head_dim", 512))
    texts, specs = {}, {}
    for kind in LAYER_TYPES:
        if kind not in types:
            continue
        draft = _draft(cfg, kind, rates, ropes)
        spec_name = f"{name}_{SUFFIX[kind]}"
        text = _render(draft, spec_name, source, f"{MODEL_TYPE} {kind}")
        try:
            specs[kind] = parse_spec(text, source)
        except SpecError as exc:
            key = draft.key_of(exc.field) if exc.field else None
            raise SpecError(exc.message, source=source, field=key or exc.field) from None
        texts[kind] = text
    return LayerSpecs(texts, specs, types)


def convert_file(
    config_path: str | Path, out: str | Path, name: str | None = None, force: bool = False
) -> tuple[list[Conversion], LayerSpecs]:
    """config.json -> one spec file per layer type: `out` names the first (specs/deepseek_v4.yaml
    gives specs/deepseek_v4_sliding.yaml, ..._csa.yaml, ..._hca.yaml). Existing files with other
    content are kept unless `force`."""
    out = Path(out)
    name = name if name is not None else out.stem
    layered = layer_specs(load_hf_config(config_path), name, str(config_path))
    planned = [
        (out.with_name(f"{spec.name}{out.suffix or '.yaml'}"), layered.texts[kind], spec)
        for kind, spec in layered.specs.items()
    ]
    if not out.parent.is_dir():
        raise MlagenError(f"cannot write {out}: directory {out.parent} does not exist")
    for path, text, _ in planned:  # refuse before writing any
        try:
            old = path.read_text(encoding="utf-8") if path.exists() else None
        except (OSError, UnicodeDecodeError):
            old = ""
        if old is not None and old != text and not force:
            raise MlagenError(f"{path} exists and differs from the conversion; pass --force to replace it")
    results = []
    for path, text, spec in planned:
        if path.exists() and path.read_text(encoding="utf-8") == text:
            results.append(Conversion(spec, path, written=False))
            continue
        try:
            _atomic_write(path, text)
        except OSError as exc:
            raise MlagenError(f"cannot write {path}: {exc.strerror}") from None
        results.append(Conversion(spec, path, written=True))
    return results, layered


def summary(spec: CompressedSpec) -> str:
    """One line: what a converted layer spec holds."""
    compression = spec.compression
    if compression is None:
        keys = f"window {spec.window}"
    else:
        keys = f"window {spec.window} + entries of {compression.rate} tokens"
        if compression.overlap:
            keys += " (overlapping windows)"
        if compression.indexer is not None:
            index = compression.indexer
            keys += f", top {index.top_k} by a {index.heads}-head x {index.head_dim} indexer"
    rope = spec.rope
    yarn = f" + yarn x{rope.scaling.factor:g}" if rope.scaling is not None else ""
    return (
        f"{spec.name}: {spec.layer_type}, d_model {spec.d_model}, {spec.heads} heads of {spec.head_dim} "
        f"(rope {spec.rope_head_dim}, theta {rope.theta:g}{yarn}), {keys}, {spec.dtype}"
    )
