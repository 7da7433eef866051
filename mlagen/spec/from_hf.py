"""Hugging Face config.json -> spec: the attention layer of a published model.

The input is the parsed config.json (a dict); mlagen never imports transformers.
Each value is read the way transformers (4.57 and 5.x) reads it: its config
classes' defaults, the 4.x `rope_theta` / `rope_scaling` keys and the 5.x
`rope_parameters` table. A config whose attention mlagen cannot express
exactly is refused with one line naming the config file and key; nothing is
approximated. The result is spec YAML that goes through `parse_spec` like any
hand-written spec, so every mlagen rule still applies (its errors are
re-pointed at the config key the value came from).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlagen.errors import MlagenError, SpecError
from mlagen.spec.parse import parse_spec
from mlagen.spec.schema import GqaSpec, MlaSpec, Spec

REFUSED = {
    "qwen2": "Qwen2 gives q_proj, k_proj and v_proj a bias but o_proj none; mlagen's attention_bias "
    "covers all four projections",
    "qwen3": "Qwen3 normalises q and k per head (q_norm, k_norm), which no mlagen family has",
}
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
# transformers' DeepseekV2/V3 attention builds q_a_layernorm and kv_a_layernorm with the
# RMSNorm default eps (1e-6) whatever rms_norm_eps says; rms_norm_eps is for the decoder
# layer's own norms, outside the attention module.
MLA_NORM_EPS = 1e-6
_REQUIRED = object()
_PLAIN = re.compile(r"[a-z][a-z0-9_]*\Z")
_YAML_WORDS = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else "an object"
    )


class _Config:
    """config.json values read with transformers' defaults; errors name the file and the key."""

    def __init__(self, data: dict[str, Any], source: str):
        self.data = data
        self.source = source

    def error(self, key: str, message: str) -> SpecError:
        return SpecError(message, source=self.source, field=key)

    def get(self, key: str, default: Any = _REQUIRED, table: dict[str, Any] | None = None, prefix: str = ""):
        data = self.data if table is None else table
        if key not in data:
            if default is _REQUIRED:
                raise self.error(prefix + key, "missing; the attention layer cannot be derived without it")
            return default
        return data[key]

    def int(self, key: str, default: Any = _REQUIRED, *, nullable: bool = False, **where) -> int | None:
        value = self.get(key, default, **where)
        if value is None and nullable:
            return None
        if value is None:
            raise self.error(where.get("prefix", "") + key, "must be an integer, got null")
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(
                where.get("prefix", "") + key, f"must be an integer, got {_kind(value)} {value!r}"
            )
        return value

    def float(self, key: str, default: Any = _REQUIRED, **where) -> float:
        value = self.get(key, default, **where)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(where.get("prefix", "") + key, f"must be a finite number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED, **where) -> bool:
        value = self.get(key, default, **where)
        if not isinstance(value, bool):
            raise self.error(
                where.get("prefix", "") + key, f"must be true or false, got {_kind(value)} {value!r}"
            )
        return value


@dataclass
class _Draft:
    """Spec fields in YAML order, each with the config key it came from: the key an error
    is blamed on, and (with a note) the value's YAML comment."""

    notes: list[str] = field(default_factory=list)
    fields: list[tuple[str, Any, str, str]] = field(default_factory=list)  # (spec path, value, key, note)

    def set(self, path: str, value: Any, key: str, note: str = "") -> None:
        self.fields.append((path, value, key, note))

    def value(self, path: str) -> Any:
        return next(value for name, value, _, _ in self.fields if name == path)

    def key_of(self, path: str) -> str | None:
        return next((key for name, _, key, _ in self.fields if name == path), None)


# --- rope -----------------------------------------------------------------------------------------

_DEFAULT = "absent: transformers' default"


def _rope(cfg: _Config, draft: _Draft, layout: str, layout_key: str, layout_note: str) -> None:
    """theta and yarn scaling, from the 4.x keys (rope_theta, rope_scaling) or 5.x rope_parameters.

    Mirrors transformers' `convert_rope_params_to_dict` / `standardize_rope_params`: a non-empty
    rope_scaling wins over rope_parameters; theta comes from that table, else top-level
    rope_theta, else 10000; `rope_type` wins over the older `type`.
    """
    key = "rope_scaling" if cfg.data.get("rope_scaling") else "rope_parameters"
    params = cfg.data.get(key) or {}
    if not isinstance(params, dict):
        raise cfg.error(key, f"must be an object or null, got {_kind(params)}")
    prefix = f"{key}."
    if any(isinstance(value, dict) for value in params.values()):
        raise cfg.error(key, "per-layer-type rope parameters are not supported; a spec has one rope")
    for where, table in ((prefix, params), ("", cfg.data)):
        partial = table.get("partial_rotary_factor")
        if partial is not None and partial != 1:
            raise cfg.error(
                where + "partial_rotary_factor",
                f"{partial!r}: partial rotary embeddings are not supported; mlagen rotates the whole rope dim",
            )
    if "rope_theta" in params:
        draft.set("rope.theta", cfg.float("rope_theta", table=params, prefix=prefix), prefix + "rope_theta")
    else:
        theta_note = "" if "rope_theta" in cfg.data else _DEFAULT
        draft.set("rope.theta", cfg.float("rope_theta", 10000.0), "rope_theta", theta_note)
    draft.set("rope.layout", layout, layout_key, layout_note)

    rope_type = params.get("rope_type", params.get("type", "default"))
    type_key = prefix + ("rope_type" if "rope_type" in params else "type")
    if rope_type in (None, "default"):
        return
    if rope_type != "yarn":
        raise cfg.error(
            type_key,
            f"rope scaling {rope_type!r} is not supported; mlagen implements yarn only "
            "(linear, dynamic, llama3, longrope... change the angles the model was trained with)",
        )
    draft.set("rope.scaling.type", "yarn", type_key)
    draft.set("rope.scaling.factor", cfg.float("factor", table=params, prefix=prefix), prefix + "factor")
    # A top-level original_max_position_embeddings overrides the table's (transformers' Phi-3
    # rule); with neither, transformers falls back to max_position_embeddings.
    original_key = "original_max_position_embeddings"
    if original_key in cfg.data:
        draft.set("rope.scaling.original_max_position", cfg.int(original_key), original_key)
    elif original_key in params:
        value = cfg.int(original_key, table=params, prefix=prefix)
        draft.set("rope.scaling.original_max_position", value, prefix + original_key)
    else:
        value = draft.value("max_position")
        draft.set(
            "rope.scaling.original_max_position", value, "max_position_embeddings", f"no {original_key}"
        )
    # `beta_fast or 32`, `beta_slow or 1`: transformers takes null and 0 as unset.
    for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0)):
        if params.get(name):
            draft.set(f"rope.scaling.{name}", cfg.float(name, table=params, prefix=prefix), prefix + name)
        else:
            draft.set(f"rope.scaling.{name}", default, prefix + name, _DEFAULT)
    mscale_all_dim = 0.0
    if params.get("mscale_all_dim") is not None:
        mscale_all_dim = cfg.float("mscale_all_dim", table=params, prefix=prefix)
    if params.get("mscale") is not None:
        draft.set("rope.scaling.mscale", cfg.float("mscale", table=params, prefix=prefix), prefix + "mscale")
    else:
        # transformers scales cos/sin by the mscale ratio only when mscale and mscale_all_dim are
        # both set, else by get_mscale(factor); mscale 0 takes that branch in mlagen too.
        note = "unset: cos/sin scale from factor alone"
        draft.set("rope.scaling.mscale", 0.0 if mscale_all_dim else 1.0, prefix + "mscale", note)
    draft.set("rope.scaling.mscale_all_dim", mscale_all_dim, prefix + "mscale_all_dim")
    if params.get("attention_factor") is not None:
        raise cfg.error(
            prefix + "attention_factor",
            "an explicit yarn attention_factor is not supported; mlagen derives it from factor, "
            "mscale and mscale_all_dim, as transformers does when it is null",
        )
    if params.get("truncate", True) is not True:
        raise cfg.error(prefix + "truncate", "only yarn's truncated correction range (true) is supported")


# --- families -------------------------------------------------------------------------------------


def _common(cfg: _Config, draft: _Draft, max_position_default: int) -> tuple[int, int]:
    d_model = cfg.int("hidden_size")
    heads = cfg.int("num_attention_heads")
    if heads < 1:
        raise cfg.error("num_attention_heads", f"must be at least 1, got {heads}")
    draft.set("d_model", d_model, "hidden_size")
    draft.set("heads", heads, "num_attention_heads")
    max_position = cfg.int("max_position_embeddings", max_position_default)
    note = "" if "max_position_embeddings" in cfg.data else _DEFAULT
    draft.set("max_position", max_position, "max_position_embeddings", note)
    return d_model, heads


def _dtype(cfg: _Config, draft: _Draft) -> None:
    # 5.x writes `dtype`, 4.x `torch_dtype`; transformers keeps `dtype` when both are there.
    key = next((k for k in ("dtype", "torch_dtype") if cfg.data.get(k) is not None), None)
    if key is None:
        draft.set("dtype", "bf16", "torch_dtype", "absent: mlagen's default")
        return
    value = cfg.data[key]
    if not isinstance(value, str) or value not in DTYPES:
        raise cfg.error(key, f"{value!r} is not one of {', '.join(DTYPES)} (mlagen runs bf16, fp16 or fp32)")
    draft.set("dtype", DTYPES[value], key)


# DeepSeek Sparse Attention models: transformers' config defaults per model type.
_SPARSE_DEFAULTS = {
    # model_type: (max_position_embeddings, index_n_heads, indexer RoPE layout)
    "deepseek_v32": (163840, 64, "half"),
    "glm_moe_dsa": (202752, 32, "interleave"),
}
_MAX_POSITION_DEFAULTS = {"deepseek_v2": 2048, **{k: v[0] for k, v in _SPARSE_DEFAULTS.items()}}


def _mla(cfg: _Config, draft: _Draft, model_type: str) -> None:
    draft.set("family", "mla", "model_type")
    _, heads = _common(cfg, draft, _MAX_POSITION_DEFAULTS.get(model_type, 4096))
    kv_heads = cfg.int("num_key_value_heads", None, nullable=True)
    if kv_heads is not None and kv_heads != heads:
        raise cfg.error(
            "num_key_value_heads",
            f"{kv_heads}: MLA expands one shared latent into num_attention_heads={heads} key/value "
            "heads, and transformers' attention needs num_key_value_heads == num_attention_heads",
        )
    draft.set("q_lora_rank", cfg.int("q_lora_rank", nullable=True), "q_lora_rank")
    for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        draft.set(key, cfg.int(key), key)
    if model_type == "deepseek_v2":
        # DeepseekV2Attention rotates (2i, 2i+1) pairs as complex numbers; it reads no rope_interleave.
        _rope(cfg, draft, "interleave", "model_type", "deepseek_v2 rotates pairs as complex numbers")
    elif model_type in _SPARSE_DEFAULTS:
        # DeepseekV32Attention and GlmMoeDsaAttention always rotate interleaved pairs.
        if cfg.data.get("rope_interleave") is False:
            draft.notes.append(
                f"rope_interleave=false is ignored, as {model_type} in transformers ignores it"
            )
        _rope(cfg, draft, "interleave", "model_type", f"{model_type} always rotates interleaved pairs")
    else:
        interleave = cfg.bool("rope_interleave", True)
        note = "" if "rope_interleave" in cfg.data else "absent: transformers' default true"
        _rope(cfg, draft, "interleave" if interleave else "half", "rope_interleave", note)
    draft.set("norm_eps", MLA_NORM_EPS, "rms_norm_eps", "not read: transformers' q_a/kv_a norms use 1e-6")
    rms = cfg.data.get("rms_norm_eps")
    if isinstance(rms, int | float) and not isinstance(rms, bool) and rms != MLA_NORM_EPS:
        draft.notes.append(
            f"rms_norm_eps={rms!r} is the decoder layer's norms' eps; transformers' attention "
            "norms use 1e-6, and so does this spec"
        )
    draft.set("attention_bias", cfg.bool("attention_bias", False), "attention_bias", "q_a, kv_a and o proj")
    draft.set("causal", True, "model_type", "a decoder")
    if model_type in _SPARSE_DEFAULTS:
        _sparse(cfg, draft, model_type)


def _sparse(cfg: _Config, draft: _Draft, model_type: str) -> None:
    """The lightning indexer of DeepSeek-V3.2 / GLM-5, as transformers' DeepseekV32Indexer
    and GlmMoeDsaIndexer read it (the indexer projects its queries from c_q, so q_lora_rank
    must be set: transformers builds q_a_proj unconditionally for these models)."""
    if draft.value("q_lora_rank") is None:
        raise cfg.error(
            "q_lora_rank", f"must be set for {model_type}: the indexer reads the query latent c_q"
        )
    _, index_heads, layout = _SPARSE_DEFAULTS[model_type]
    for spec_key, key, default in (
        ("index_heads", "index_n_heads", index_heads),
        ("index_head_dim", "index_head_dim", 128),
        ("top_k", "index_topk", 2048),
    ):
        note = "" if key in cfg.data else f"absent: transformers' default {default}"
        draft.set(f"sparse.{spec_key}", cfg.int(key, default), key, note)
    draft.set("sparse.index_rope_layout", layout, "model_type", f"{model_type}'s indexer rotates {layout}")
    if model_type == "glm_moe_dsa":
        if cfg.data.get("indexer_rope_interleave") is False:
            draft.notes.append(
                "indexer_rope_interleave=false is ignored, as transformers' GlmMoeDsaIndexer ignores it"
            )
        shared = _shared_indexer_layers(cfg)
        if shared:
            draft.notes.append(
                f"layers {_ranges(shared)} reuse the previous full layer's top-k (indexer_types 'shared'): "
                "build them with Attention(indexer=False); mlagen.patch does"
            )


def _shared_indexer_layers(cfg: _Config) -> list[int]:
    """GLM-5's per-layer indexer pattern, as GlmMoeDsaConfig derives it: `indexer_types`, else
    `index_topk_pattern` ("F"/"S" per layer), else every `index_topk_freq`-th layer from
    `index_skip_topk_offset` on runs the indexer."""
    types = cfg.data.get("indexer_types")
    if types is None:
        pattern = cfg.data.get("index_topk_pattern")
        if isinstance(pattern, str):
            types = ["shared" if char == "S" else "full" for char in pattern]
        elif pattern is not None:
            types = list(pattern)
        else:
            layers = cfg.int("num_hidden_layers", 78)
            freq = max(cfg.int("index_topk_freq", 1), 1)
            offset = cfg.int("index_skip_topk_offset", 2)
            types = ["full" if max(i - offset + 1, 0) % freq == 0 else "shared" for i in range(layers)]
    if not isinstance(types, list) or any(t not in ("full", "shared") for t in types):
        raise cfg.error("indexer_types", f"must be a list of 'full' and 'shared', got {types!r}")
    if types and types[0] == "shared":
        raise cfg.error(
            "indexer_types", "the first layer is 'shared' but no earlier layer selects keys for it"
        )
    return [layer for layer, kind in enumerate(types) if kind == "shared"]


def _ranges(layers: list[int]) -> str:
    """[3, 4, 5, 7] -> '3-5, 7'."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)


def _gqa(cfg: _Config, draft: _Draft, model_type: str) -> None:
    mistral = model_type == "mistral"
    draft.set("family", None, "num_key_value_heads")  # known once the kv heads are read
    d_model, heads = _common(cfg, draft, 131072 if mistral else 2048)
    # MistralConfig defaults to 8 kv heads, LlamaConfig to one per query head.
    kv_heads = cfg.int("num_key_value_heads", 8 if mistral else None, nullable=True)
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1:
        raise cfg.error("num_key_value_heads", f"must be at least 1, got {kv_heads}")
    family = "mha" if kv_heads == heads else "mqa" if kv_heads == 1 else "gqa"
    draft.fields[0] = ("family", family, "num_key_value_heads", f"{kv_heads} kv heads for {heads} heads")
    draft.set("kv_heads", kv_heads, "num_key_value_heads")
    head_dim = cfg.int("head_dim", None, nullable=True)
    if head_dim is not None:
        draft.set("head_dim", head_dim, "head_dim")
    elif d_model % heads:
        raise cfg.error(
            "head_dim", f"missing, and hidden_size={d_model} is not a multiple of num_attention_heads={heads}"
        )
    else:
        draft.set("head_dim", d_model // heads, "hidden_size", "divided by num_attention_heads; no head_dim")
    _rope(cfg, draft, "half", "model_type", f"{model_type} rotates halves: rotate_half")
    if mistral:
        window = cfg.int("sliding_window", 4096, nullable=True)
        note = "" if "sliding_window" in cfg.data else "absent: transformers' default 4096"
        draft.set("window", window, "sliding_window", note)
        draft.set("attention_bias", False, "model_type", "MistralAttention has no biases")
    else:
        draft.set("attention_bias", cfg.bool("attention_bias", False), "attention_bias", "q, k, v and o proj")
    draft.set("causal", True, "model_type", "a decoder")


CONVERTERS: dict[str, Callable[[_Config, _Draft, str], None]] = {
    "deepseek_v2": _mla,
    "deepseek_v3": _mla,
    "kimi_k2": _mla,
    "deepseek_v32": _mla,
    "glm_moe_dsa": _mla,
    "llama": _gqa,
    "mistral": _gqa,
}


# --- YAML -----------------------------------------------------------------------------------------


def _scalar(value: Any) -> str:
    if isinstance(value, str) and _PLAIN.match(value) and value not in _YAML_WORDS:
        return value
    if isinstance(value, float):
        return repr(value)  # 1e-06 included: the spec loader reads exponents without a dot
    return json.dumps(value)


def _printable(text: str) -> str:
    return "".join(ch if ch.isprintable() else "?" for ch in text)


def _render(draft: _Draft, name: str, source: str, model_type: str) -> str:
    lines = [
        f"# {model_type} attention from {_printable(source)}, converted by `mlagen from-hf`.",
        "# Each value's comment names the config.json key it came from.",
    ]
    lines += [f"# Note: {note}" for note in draft.notes]
    lines += [
        f"name: {_scalar(name)}",
        f"description: {_scalar(f'{model_type} attention from {_printable(source)}')}",
    ]
    open_tables: list[str] = []
    for path, value, config_key, note in draft.fields:
        *tables, spec_key = path.split(".")
        depth = 0
        while depth < len(tables) and depth < len(open_tables) and tables[depth] == open_tables[depth]:
            depth += 1
        for level in range(depth, len(tables)):
            lines.append(f"{'  ' * level}{tables[level]}:")
        open_tables = tables
        text = f"{'  ' * len(tables)}{spec_key}: {_scalar(value)}"
        comment = f"{config_key} ({note})" if note else config_key
        lines.append(f"{text:<40}# {_printable(comment)}")
    return "\n".join(lines) + "\n"


def _convert(config: Any, name: str, source: str) -> tuple[str, Spec]:
    if not isinstance(config, dict):
        raise SpecError(f"a config.json holds a JSON object, got {_kind(config)}", source=source)
    cfg = _Config(config, source)
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise cfg.error("model_type", f"must be a string, got {_kind(model_type)}")
    if model_type in REFUSED:
        raise cfg.error("model_type", f"{model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in CONVERTERS:
        raise cfg.error(
            "model_type", f"{model_type!r} is not supported; mlagen converts {', '.join(CONVERTERS)}"
        )
    draft = _Draft()
    CONVERTERS[model_type](cfg, draft, model_type)
    _dtype(cfg, draft)
    text = _render(draft, name, source, model_type)
    try:
        return text, parse_spec(text, source)
    except SpecError as exc:
        key = draft.key_of(exc.field) if exc.field else None
        raise SpecError(exc.message, source=source, field=key or exc.field) from None


def yaml_from_hf_config(config: dict[str, Any], name: str, source: str = "config.json") -> str:
    """The spec YAML (commented, deterministic) for config.json's attention layer."""
    return _convert(config, name, source)[0]


def spec_from_hf_config(config: dict[str, Any], name: str, source: str = "config.json") -> Spec:
    """The validated Spec for config.json's attention layer; `source` names the file in errors."""
    return _convert(config, name, source)[1]


def summary(spec: Spec) -> str:
    """One line: what the converted spec holds."""
    rope = spec.rope
    yarn = f" + yarn x{rope.scaling.factor:g}" if rope is not None and rope.scaling is not None else ""
    if isinstance(spec, MlaSpec):
        q = "no q compression" if spec.q_lora_rank is None else f"q_lora_rank {spec.q_lora_rank}"
        shape = (
            f"{spec.heads} heads, {q}, kv_lora_rank {spec.kv_lora_rank}, "
            f"qk {spec.qk_nope_head_dim}+{spec.qk_rope_head_dim}, v {spec.v_head_dim}"
        )
        if spec.sparse is not None:
            sparse = spec.sparse
            shape += (
                f", sparse top {sparse.top_k} by a {sparse.index_heads}-head x {sparse.index_head_dim} "
                f"indexer ({sparse.index_rope_layout} rope)"
            )
    else:
        assert isinstance(spec, GqaSpec)
        window = f", window {spec.window}" if spec.window else ""
        shape = f"{spec.heads} heads / {spec.kv_heads} kv heads of {spec.head_dim}{window}"
    return (
        f"{spec.name}: family {spec.family}, d_model {spec.d_model}, {shape}, "
        f"rope {rope.layout} theta {rope.theta:g}{yarn}, {spec.dtype}, max_position {spec.max_position}"
    )


# --- files ----------------------------------------------------------------------------------------


def load_hf_config(path: str | Path) -> dict[str, Any]:
    """Read a config.json; a missing file or bad JSON is a one-line SpecError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file; give the model's config.json", source=str(path)) from None
    except IsADirectoryError:
        raise SpecError("is a directory; give the config.json inside it", source=str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("is not UTF-8 text; a config.json is JSON text", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", source=str(path)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SpecError(
            f"invalid JSON: {exc.msg} (column {exc.colno})", source=str(path), line=exc.lineno
        ) from None
    except RecursionError:
        raise SpecError("invalid JSON: nested too deeply", source=str(path)) from None
    if not isinstance(data, dict):
        raise SpecError(f"a config.json holds a JSON object, got {_kind(data)}", source=str(path))
    return data


def _atomic_write(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never half of one (as codegen writes packages)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp's file is private; match a plain write
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@dataclass(frozen=True, slots=True)
class Conversion:
    spec: Spec
    path: Path
    written: bool  # False when the file already held exactly this text


def convert_file(
    config_path: str | Path, out: str | Path, name: str | None = None, force: bool = False
) -> Conversion:
    """config.json -> spec file, written atomically. An existing file with other content is kept
    unless `force`: it may be a hand-edited spec."""
    out = Path(out)
    name = name if name is not None else out.stem
    source = str(config_path)
    try:
        text, spec = _convert(load_hf_config(config_path), name, source)
    except SpecError as exc:
        if exc.field == "name":
            raise SpecError(
                f"{exc.message} (the name comes from --name, else the output file's name)", source=source
            ) from None
        raise
    try:
        old = out.read_text(encoding="utf-8") if out.exists() else None
    except (OSError, UnicodeDecodeError):
        old = ""
    if old == text:
        return Conversion(spec, out, written=False)
    if old is not None and not force:
        raise MlagenError(f"{out} exists and differs from the conversion; pass --force to replace it")
    if not out.parent.is_dir():
        raise MlagenError(f"cannot write {out}: directory {out.parent} does not exist")
    try:
        _atomic_write(out, text)
    except OSError as exc:
        raise MlagenError(f"cannot write {out}: {exc.strerror}") from None
    return Conversion(spec, out, written=True)
