"""YAML -> Spec: safe loading with line numbers, then every field checked.

Every problem raises SpecError naming file, line and field, and what to change.
Only YAML's safe tags are accepted: a spec can never construct objects or run code.
"""

from __future__ import annotations

import difflib
import keyword
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlagen.errors import SpecError
from mlagen.spec.schema import (
    DTYPES,
    FAMILIES,
    ROPE_LAYOUTS,
    GqaSpec,
    LatentSpec,
    MlaSpec,
    Rope,
    Spec,
    Yarn,
)

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
SAFE_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}


@dataclass(frozen=True, slots=True)
class FieldRule:
    """How one YAML field is checked. `kind` is int, float, bool, str or dict (a nested table)."""

    name: str
    kind: type
    required: bool = True
    default: Any = None
    nullable: bool = False
    low: float | None = None
    high: float | None = None
    multiple_of: int | None = None
    choices: tuple[str, ...] | None = None
    why: str = ""


def _dims(name: str, high: int = 256, why: str = "") -> FieldRule:
    return FieldRule(
        name,
        int,
        low=1,
        high=high,
        multiple_of=8,
        why=why or "head dims are multiples of 8 so rows load as 16-byte vectors",
    )


COMMON = (
    FieldRule("name", str, required=False),
    FieldRule("family", str, choices=FAMILIES),
    FieldRule("description", str, required=False),
    FieldRule("d_model", int, low=8, high=65536, multiple_of=8, why="rows load as 16-byte vectors"),
    FieldRule("heads", int, low=1, high=1024),
    FieldRule("dtype", str, required=False, default="bf16", choices=DTYPES),
    FieldRule("max_position", int, required=False, default=4096, low=1, high=1 << 24),
)

YARN = (
    FieldRule("type", str, required=False, default="yarn", choices=("yarn",)),
    FieldRule("factor", float, low=1.0, high=1024.0),
    FieldRule("original_max_position", int, low=1, high=1 << 24),
    FieldRule("beta_fast", float, required=False, default=32.0, low=0.001, high=1024.0),
    FieldRule("beta_slow", float, required=False, default=1.0, low=0.001, high=1024.0),
    FieldRule("mscale", float, required=False, default=1.0, low=0.0, high=100.0),
    FieldRule("mscale_all_dim", float, required=False, default=0.0, low=0.0, high=100.0),
)

ROPE = (
    FieldRule("theta", float, low=2.0, high=1e12),
    FieldRule("layout", str, required=False, default="half", choices=ROPE_LAYOUTS),
    FieldRule("scaling", dict, required=False, nullable=True),
)

FAMILY_FIELDS: dict[str, tuple[FieldRule, ...]] = {
    "mla": (
        FieldRule(
            "q_lora_rank",
            int,
            nullable=True,
            low=16,
            high=8192,
            multiple_of=16,
            why="the rank is a matmul dimension; tensor-core tiles are 16 wide",
        ),
        FieldRule(
            "kv_lora_rank",
            int,
            low=16,
            high=2048,
            multiple_of=16,
            why="the latent is the K dimension of the decode dot products; tiles are 16 wide",
        ),
        _dims("qk_nope_head_dim"),
        _dims("qk_rope_head_dim", why="rope dims are multiples of 8 so rows load as 16-byte vectors"),
        _dims("v_head_dim"),
        FieldRule("rope", dict),
        FieldRule("norm_eps", float, required=False, default=1e-6, low=0.0, high=1.0),
        FieldRule("causal", bool, required=False, default=True),
        FieldRule("attention_bias", bool, required=False, default=False),
        FieldRule("page_size", int, required=False, default=64, low=1, high=4096),
    ),
    "gqa": (
        FieldRule("kv_heads", int, low=1, high=1024),
        _dims("head_dim"),
        FieldRule("rope", dict),
        FieldRule("window", int, required=False, nullable=True, low=1, high=1 << 24),
        FieldRule("causal", bool, required=False, default=True),
        FieldRule("attention_bias", bool, required=False, default=False),
    ),
    "latent": (
        _dims("head_dim"),
        FieldRule("latent_tokens", int, low=1, high=4096),
        FieldRule("self_attention", bool, required=False, default=False),
        FieldRule("chunk_size", int, required=False, nullable=True, low=1, high=1 << 20),
        FieldRule("window", int, required=False, nullable=True, low=1, high=1 << 24),
        FieldRule("rope", dict, required=False, nullable=True),
        FieldRule("causal", bool, required=False, default=False),
    ),
}
FAMILY_FIELDS["mha"] = tuple(
    FieldRule("kv_heads", int, required=False, low=1, high=1024) if r.name == "kv_heads" else r
    for r in FAMILY_FIELDS["gqa"]
)
FAMILY_FIELDS["mqa"] = FAMILY_FIELDS["mha"]


class _Located:
    """A parsed YAML document: values plus the line of every dotted field path."""

    def __init__(self, source: str):
        self.source = source
        self.lines: dict[str, int] = {}

    def error(self, path: str, message: str, near: str | None = None) -> SpecError:
        """An error at `path`, located at its line (or, for a missing field, at `near`'s)."""
        line = self.lines.get(path) or (self.lines.get(near) if near else None)
        if line is None and "." in path:
            line = self.lines.get(path.rsplit(".", 1)[0])
        return SpecError(message, source=self.source, line=line, field=path or None)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        dict: "a mapping",
        list: "a list",
    }.get(type(value), type(value).__name__)


def _to_python(node: yaml.Node, loader: yaml.SafeLoader, doc: _Located, path: str, seen: set[int]) -> Any:
    line = node.start_mark.line + 1
    if id(node) in seen:
        # Only an alias (*name) reaches a node twice; refusing them also stops
        # self-referencing documents and exponential "billion laughs" expansion.
        raise SpecError(
            "YAML anchors and aliases (& and *) are not allowed; write the value out",
            source=doc.source,
            line=line,
            field=path or None,
        )
    seen.add(id(node))
    if node.tag == "tag:yaml.org,2002:timestamp":
        raise SpecError(
            "a date is not a spec value; quote it if it is text",
            source=doc.source,
            line=line,
            field=path or None,
        )
    if node.tag not in SAFE_TAGS:
        raise SpecError(
            f"YAML tag {node.tag!r} is not allowed; specs hold plain values only",
            source=doc.source,
            line=line,
            field=path or None,
        )
    if isinstance(node, yaml.MappingNode):
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = _to_python(key_node, loader, doc, path, seen)
            if not isinstance(key, str):
                raise SpecError(
                    f"keys must be field names, got {key!r}",
                    source=doc.source,
                    line=key_node.start_mark.line + 1,
                    field=path or None,
                )
            child = f"{path}.{key}" if path else key
            if key in result:
                raise SpecError(
                    f"duplicate key (first set on line {doc.lines[child]}); keep one",
                    source=doc.source,
                    line=key_node.start_mark.line + 1,
                    field=child,
                )
            doc.lines[child] = key_node.start_mark.line + 1
            if id(value_node) in seen:  # report the alias where it is used, not where it was anchored
                raise SpecError(
                    "YAML anchors and aliases (& and *) are not allowed; write the value out",
                    source=doc.source,
                    line=doc.lines[child],
                    field=child,
                )
            result[key] = _to_python(value_node, loader, doc, child, seen)
        return result
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, loader, doc, path, seen) for item in node.value]
    return loader.construct_object(node)


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that also reads `1e-6` as a number (YAML 1.1 wants `1.0e-6`, a classic trap)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _load_yaml(text: str, source: str) -> tuple[Any, _Located]:
    doc = _Located(source)
    loader = None
    try:
        loader = _SpecLoader(text)
        root = loader.get_single_node()
        if root is None:
            raise SpecError("the file is empty; start from one of the specs in specs/", source=source)
        return _to_python(root, loader, doc, "", set()), doc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise SpecError(
            f"character {exc.character!r} is not allowed in YAML; remove it", source=source, line=line
        ) from None
    except RecursionError:
        raise SpecError(
            "the YAML is nested too deeply; a spec is a flat mapping with small nested tables", source=source
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        reason = (exc.problem or exc.context or "invalid YAML").strip()
        raise SpecError(f"YAML syntax error: {reason}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {str(exc).splitlines()[0]}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_table(data: Any, rules: tuple[FieldRule, ...], doc: _Located, prefix: str) -> dict[str, Any]:
    """Check one mapping against its rules; return the values with defaults filled in."""
    where = prefix or "the spec"
    if not isinstance(data, dict):
        raise doc.error(prefix, f"{where} must be a mapping of fields, got {_type_name(data)}")
    by_name = {rule.name: rule for rule in rules}
    for key in data:
        if key not in by_name:
            path = f"{prefix}.{key}" if prefix else key
            close = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(sorted(by_name))}"
            raise doc.error(path, f"unknown field; {hint}")
    values: dict[str, Any] = {}
    for rule in rules:
        path = f"{prefix}.{rule.name}" if prefix else rule.name
        if rule.name not in data:
            if rule.required:
                raise doc.error(prefix, f"missing required field {path!r}; add it")
            values[rule.name] = rule.default
            continue
        values[rule.name] = _check_value(data[rule.name], rule, doc, path)
    return values


def _check_value(value: Any, rule: FieldRule, doc: _Located, path: str) -> Any:
    if value is None:
        if rule.nullable:
            return None
        raise doc.error(path, f"must be {_type_name(rule.kind())}, got null; give a value")
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int in Python, but `heads: true` is a mistake, not 1.
    if not isinstance(value, rule.kind) or (rule.kind is not bool and isinstance(value, bool)):
        raise doc.error(path, f"must be {_type_name(rule.kind())}, got {_type_name(value)} {value!r}")
    if rule.kind is float and value != value:
        raise doc.error(path, "must be a number, got NaN")
    if rule.choices is not None and value not in rule.choices:
        close = difflib.get_close_matches(str(value), rule.choices, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise doc.error(path, f"{value!r} is not one of {', '.join(rule.choices)}{hint}")
    if rule.low is not None and value < rule.low:
        raise doc.error(path, f"{rule.name}={value}: must be at least {rule.low:g}")
    if rule.high is not None and value > rule.high:
        raise doc.error(path, f"{rule.name}={value}: must be at most {rule.high:g}")
    if rule.multiple_of and value % rule.multiple_of:
        why = f" ({rule.why})" if rule.why else ""
        raise doc.error(path, f"{rule.name}={value}: must be a multiple of {rule.multiple_of}{why}")
    if rule.kind is str and any(ch in value for ch in "\n\r\0"):
        raise doc.error(path, "must be a single line of text")
    return value


def _parse_rope(data: Any, doc: _Located, path: str) -> Rope:
    values = _check_table(data, ROPE, doc, path)
    scaling = values.pop("scaling")
    yarn = None
    if scaling is not None:
        yarn_values = _check_table(scaling, YARN, doc, f"{path}.scaling")
        yarn_values.pop("type")
        yarn = Yarn(**yarn_values)
    return Rope(scaling=yarn, **values)


def _resolve_name(values: dict[str, Any], source: str, doc: _Located) -> str:
    name = values.pop("name")
    origin = "name"
    if name is None:
        name, origin = Path(source).stem, "the file name (no 'name' field)"
    if not NAME_PATTERN.match(name) or keyword.iskeyword(name):
        raise doc.error(
            "name",
            f"{name!r} from {origin} is not a safe module name; use lowercase "
            "letters, digits and underscores, starting with a letter",
        )
    return name


RuleCheck = Callable[[dict[str, Any], _Located], None]


def _rules_mla(v: dict[str, Any], doc: _Located) -> None:
    if v["qk_rope_head_dim"] % 2:
        raise doc.error(
            "qk_rope_head_dim", f"qk_rope_head_dim={v['qk_rope_head_dim']}: must be even (RoPE rotates pairs)"
        )


def _rules_gqa(v: dict[str, Any], doc: _Located) -> None:
    family, heads = v["family"], v["heads"]
    if v["kv_heads"] is None:
        v["kv_heads"] = heads if family == "mha" else 1
    kv_heads = v["kv_heads"]
    if family == "mha" and kv_heads != heads:
        raise doc.error(
            "kv_heads",
            f"kv_heads={kv_heads}: family mha needs kv_heads == heads ({heads}); "
            "use family gqa for grouped heads",
        )
    if family == "mqa" and kv_heads != 1:
        raise doc.error(
            "kv_heads", f"kv_heads={kv_heads}: family mqa has one kv head; use family gqa for more"
        )
    if heads % kv_heads:
        raise doc.error(
            "kv_heads",
            f"kv_heads={kv_heads}: must divide heads={heads} "
            "(each kv head serves an equal group of query heads)",
        )
    if v["head_dim"] % 2:
        raise doc.error("head_dim", f"head_dim={v['head_dim']}: must be even (RoPE rotates pairs)")
    if v["window"] is not None and not v["causal"]:
        raise doc.error("window", "a sliding window needs causal: true (mlagen's windows look back only)")


def _rules_latent(v: dict[str, Any], doc: _Located) -> None:
    if v["causal"] and v["chunk_size"] is None:
        raise doc.error(
            "chunk_size",
            "a causal latent spec needs chunk_size: each chunk gets its own "
            "latent summary so no token sees the future",
            near="causal",
        )
    if not v["causal"] and v["chunk_size"] is not None:
        raise doc.error(
            "chunk_size", "chunk_size applies to causal latent specs only; remove it or set causal: true"
        )
    if v["window"] is not None and not v["causal"]:
        raise doc.error("window", "the local window of the hybrid needs causal: true")
    if v["rope"] is not None and v["window"] is None:
        raise doc.error(
            "rope", "rope applies to the local window path of the hybrid; set window or remove rope"
        )


FAMILY_RULES: dict[str, tuple[RuleCheck, type]] = {
    "mla": (_rules_mla, MlaSpec),
    "mha": (_rules_gqa, GqaSpec),
    "gqa": (_rules_gqa, GqaSpec),
    "mqa": (_rules_gqa, GqaSpec),
    "latent": (_rules_latent, LatentSpec),
}


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Parse and validate a spec from YAML text; `source` is used in messages."""
    data, doc = _load_yaml(text, source)
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping of fields, got {_type_name(data)}", source=source, line=1)
    family = data.get("family")
    if family is None:
        misspelt = difflib.get_close_matches("family", [k for k in data if k != "family"], n=1, cutoff=0.6)
        if misspelt:
            raise doc.error(misspelt[0], "unknown field; did you mean 'family'?")
        if "family" in data:
            raise doc.error("family", f"must be one of {', '.join(FAMILIES)}, got null")
        raise SpecError(
            f"missing required field 'family'; one of {', '.join(FAMILIES)}",
            source=source,
            line=1,
            field="family",
        )
    _check_value(family, FieldRule("family", str, choices=FAMILIES), doc, "family")
    values = _check_table(data, COMMON + FAMILY_FIELDS[family], doc, "")
    values.pop("description")
    name = _resolve_name(values, source, doc)
    if values["rope"] is not None:
        values["rope"] = _parse_rope(values["rope"], doc, "rope")
    check, cls = FAMILY_RULES[family]
    check(values, doc)
    lines = tuple(sorted(doc.lines.items()))
    return cls(name=name, source=source, field_lines=lines, **values)


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError("no such file; check the path", source=str(path)) from None
    except IsADirectoryError:
        raise SpecError("is a directory; give a .yaml spec file", source=str(path)) from None
    except UnicodeDecodeError:
        raise SpecError("is not UTF-8 text; a spec is a YAML text file", source=str(path)) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", source=str(path)) from None
    return parse_spec(text, str(path))
