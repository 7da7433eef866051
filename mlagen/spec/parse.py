"""YAML -> Spec: safe loading with line numbers, then every field checked.

Every problem raises SpecError naming file, line and field, and what to change.
Only YAML's safe tags are accepted: a spec can never construct objects or run code.
"""

from __future__ import annotations

import difflib
import keyword
import re
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mlagen.errors import SpecError
from mlagen.spec.schema import (
    CACHE_DTYPES,
    DTYPES,
    FAMILIES,
    ROPE_LAYOUTS,
    CompressedSpec,
    Compression,
    EntryIndexer,
    GqaSpec,
    LatentSpec,
    MlaSpec,
    Rope,
    Sparse,
    Spec,
    Yarn,
)

NAME_PATTERN = re.compile(r"[a-z][a-z0-9_]{0,62}\Z")
# A generated package must not be mistaken for one of these by `import`: the standard library
# (whose names mean the same on every machine) and mlagen, which every generated module imports.
RESERVED_NAMES = frozenset(sys.stdlib_module_names) | {"mlagen"}
SAFE_TAGS = {"tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq")}
# A spec is a few hundred bytes. The cap keeps a wrong path (a log, a dump) from stalling the
# pure-Python YAML parser: 64 KiB of the slowest YAML parses in about half a second.
MAX_SPEC_BYTES = 64 << 10
# Longer integers are refused before conversion: int() of over 4300 digits raises, and the range
# message would echo every digit. Shorter ones reach the field's own "must be at most" check.
MAX_INT_DIGITS = 100


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
    low_why: str = ""
    # (name other tools use, the choice to write instead): suggested, never accepted, so a
    # spec has one spelling per meaning.
    hints: tuple[tuple[str, str], ...] = ()


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
    FieldRule(
        "dtype",
        str,
        required=False,
        default="bf16",
        choices=DTYPES,
        hints=(
            ("bfloat16", "'bf16'"),
            ("float16", "'fp16'"),
            ("half", "'fp16'"),
            ("float32", "'fp32'"),
            ("float", "'fp32'"),
        ),
    ),
    FieldRule("max_position", int, required=False, default=4096, low=1, high=1 << 24),
)

# The two rotary layouts under the names other code gives them. transformers' Llama (and
# every checkpoint converted to it) rotates halves; Meta's original Llama code rotates pairs.
_HALF = "'half' (rotates x[i] with x[i + d/2], rotate_half: NeoX and transformers' Llama)"
_INTERLEAVE = "'interleave' (rotates x[2i] with x[2i+1]: GPT-J and Meta's original Llama code)"

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
    FieldRule(
        "layout",
        str,
        required=False,
        default="half",
        choices=ROPE_LAYOUTS,
        hints=tuple((alias, _HALF) for alias in ("neox", "gpt_neox", "gpt-neox", "llama", "rotate_half"))
        + tuple((alias, _INTERLEAVE) for alias in ("gptj", "gpt-j", "gpt_j", "pairs", "complex")),
    ),
    FieldRule("scaling", dict, required=False, nullable=True),
)

SPARSE = (
    # The paged indexer puts every index head of a token on the rows of one dot product.
    FieldRule("index_heads", int, low=1, high=128),
    FieldRule(
        "index_head_dim",
        int,
        low=16,
        high=512,
        multiple_of=16,
        why="the indexer's q.k is a tensor-core dot product; tiles are 16 wide",
    ),
    FieldRule("top_k", int, low=1, high=1 << 20),
    FieldRule(
        "index_rope_layout",
        str,
        required=False,
        default="half",
        choices=ROPE_LAYOUTS,
        hints=(("deepseek", "'half' (DeepSeek-V3.2's indexer)"), ("glm", "'interleave' (GLM-5's indexer)")),
    ),
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
        FieldRule(
            "norm_eps",
            float,
            required=False,
            default=1e-6,
            low=1e-30,
            high=1.0,
            low_why="eps keeps rsqrt(mean(x^2) + eps) finite for an all-zero row; "
            "0, or a value that rounds to 0 in fp32, turns that row into NaN",
        ),
        FieldRule("causal", bool, required=False, default=True),
        FieldRule("attention_bias", bool, required=False, default=False),
        FieldRule("page_size", int, required=False, default=64, low=1, high=4096),
        FieldRule("sparse", dict, required=False, nullable=True),
        FieldRule(
            "cache_dtype",
            str,
            required=False,
            default="model",
            choices=CACHE_DTYPES,
            hints=(("float8", "'fp8'"), ("e4m3", "'fp8'"), ("fp8_e4m3", "'fp8'"), ("bf16", "'model'")),
        ),
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

COMPRESSION = (
    FieldRule("rate", int, low=1, high=1 << 16),
    FieldRule("overlap", bool, required=False, default=False),
    FieldRule("indexer", dict, required=False, nullable=True),
)
ENTRY_INDEXER = (
    FieldRule("heads", int, low=1, high=1024),
    FieldRule(
        "head_dim",
        int,
        low=16,
        high=1024,
        multiple_of=16,
        why="the indexer's q.k is a tensor-core dot product; tiles are 16 wide",
    ),
    FieldRule("top_k", int, low=1, high=1 << 20),
)
FAMILY_FIELDS["compressed"] = (
    FieldRule(
        "head_dim",
        int,
        low=32,
        high=1024,
        multiple_of=32,
        why="K = V is split into two column halves of whole RoPE pairs, each a tensor-core tile 16 wide",
    ),
    FieldRule("rope_head_dim", int, low=2, high=1024),
    FieldRule("rope", dict),
    FieldRule(
        "q_lora_rank",
        int,
        low=16,
        high=8192,
        multiple_of=16,
        why="the rank is a matmul dimension; tensor-core tiles are 16 wide",
    ),
    FieldRule("o_groups", int, low=1, high=1024),
    FieldRule("o_lora_rank", int, low=1, high=65536),
    FieldRule("window", int, low=1, high=1 << 20),
    FieldRule("sinks", bool, required=False, default=True),
    FieldRule("compression", dict, required=False, nullable=True),
    FieldRule(
        "norm_eps",
        float,
        required=False,
        default=1e-6,
        low=1e-30,
        high=1.0,
        low_why="eps keeps rsqrt(mean(x^2) + eps) finite for an all-zero row; "
        "0, or a value that rounds to 0 in fp32, turns that row into NaN",
    ),
    FieldRule("causal", bool, required=False, default=True),
    FieldRule("page_size", int, required=False, default=64, low=1, high=4096),
)


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
    kind = node.tag.rsplit(":", 1)[1]
    fits = {"map": yaml.MappingNode, "seq": yaml.SequenceNode}.get(kind, yaml.ScalarNode)
    if not isinstance(node, fits):
        raise SpecError(
            f"the tag !!{kind} does not fit {_NODE_NAMES[type(node)]}; remove the tag",
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
    problem = _scalar_problem(kind, node.value)
    if problem is None:
        try:
            return loader.construct_object(node)
        except (ValueError, TypeError, yaml.constructor.ConstructorError):
            # What the checks above miss (an explicit tag on text it cannot convert) ends here.
            problem = f"{_shown(node.value)} cannot be read as !!{kind}; write a plain value"
    raise SpecError(problem, source=doc.source, line=line, field=path or None)


_NODE_NAMES = {yaml.MappingNode: "a mapping", yaml.SequenceNode: "a list", yaml.ScalarNode: "a single value"}
# Numbers are plain decimals. YAML 1.1 (PyYAML) and YAML 1.2 (most other tools) read 010,
# 0x10, 1_000 and 1:04 differently, and a spec must mean the same thing to every reader.
_DECIMAL = {
    "int": re.compile(r"[-+]?(?:0|[1-9][0-9]*)\Z"),
    "float": re.compile(
        r"[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\Z|[-+]?\.(?:inf|Inf|INF)\Z|\.(?:nan|NaN|NAN)\Z"
    ),
}
_EXAMPLE = {"int": "a whole number such as 8", "float": "a number such as 10000 or 1e-6"}


def _shown(value: Any, limit: int = 40) -> str:
    """A user's value as Python writes it (escaped: one line), cut short for a message."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _scalar_problem(kind: str, text: str) -> str | None:
    """Why a scalar that YAML reads as `kind` (implicitly or through a !!tag) is refused, or None."""
    if kind == "bool" and text.lower() not in yaml.constructor.SafeConstructor.bool_values:
        return f"{_shown(text)} is not a boolean; write true or false"
    if kind == "null" and text not in ("", "~", "null", "Null", "NULL"):
        return f"!!null takes no value, got {_shown(text)}; write null, or remove the tag"
    if kind in _DECIMAL:
        return _number_problem(kind, text)
    return None


def _number_problem(kind: str, text: str) -> str | None:
    """Why `text`, read as an int or float, is refused, or None for a plain decimal."""
    if _DECIMAL[kind].match(text):
        digits = len(text.lstrip("+-"))
        if kind == "int" and digits > MAX_INT_DIGITS:
            return f"a {digits}-digit integer is far beyond any field's range; check the value"
        return None
    what = "an integer" if kind == "int" else "a number"
    return _other_number_form(text) or f"{_shown(text)} is not {what}; write {_EXAMPLE[kind]}"


def _other_number_form(text: str) -> str | None:
    """What to write instead of a number in a form other than plain decimal, if it is one."""
    body = text.lstrip("+-")
    sign = text[: len(text) - len(body)]
    if len(body) > 40:  # no field needs that many characters; do not echo or convert them
        return None
    if re.fullmatch(r"[1-9][0-9]*(?::[0-5]?[0-9])+(?:\.[0-9]*)?", body):  # as YAML 1.1 reads it
        return (
            f"{text} is base 60 in YAML 1.1 (it reads as {sign}{_base60(body):g}); "
            "write the number in decimal, or quote text"
        )
    if re.fullmatch(r"[0-9][0-9_]*(?:\.[0-9_]*)?", body) and "_" in body:
        return f"write {sign}{body.replace('_', '')} without underscores (YAML 1.2 reads {text} as text)"
    if re.fullmatch(r"0[0-7]+", body):
        return (
            f"{text} is octal in YAML 1.1 ({sign}{int(body, 8)}) and decimal elsewhere ({sign}{int(body)}); "
            f"write {sign}{int(body)} (or {sign}{int(body, 8)}) without a leading zero"
        )
    if re.fullmatch(r"0[0-9]+", body):
        return f"write {sign}{int(body)} without a leading zero"
    base = re.fullmatch(r"0([xX][0-9a-fA-F]+|[oO][0-7]+|[bB][01]+)", body)
    if base:
        name = {"x": "hexadecimal", "o": "octal", "b": "binary"}[base.group(1)[0].lower()]
        return f"{text} is {name}; write {sign}{int(body, 0)} in decimal"
    return None


def _base60(body: str) -> float:
    """What YAML 1.1 makes of 1:04 (64) or 1:30.5 (90.5), for the message."""
    value = 0.0
    for part in body.split(":"):
        value = value * 60 + float(part)
    return value


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads every plain decimal as a number, as YAML 1.2 does: also `1e-6`,
    `.1e5` and `-.5`, which YAML 1.1 leaves as text (it wants `1.0e-6`, a classic trap)."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$|^[-+]?\.[0-9_]+$"),
    list("-+.0123456789"),
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
        line, reason = _syntax_problem(exc, text)
        raise SpecError(f"YAML syntax error: {reason}", source=source, line=line) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {str(exc).splitlines()[0]}", source=source) from None
    finally:
        if loader is not None:
            loader.dispose()


def _syntax_problem(exc: yaml.MarkedYAMLError, text: str) -> tuple[int | None, str]:
    """The line a YAML syntax error belongs to, and what to change.

    PyYAML reports where it gave up (the problem mark), often the line after the mistake;
    the context mark is where the construct it was reading began."""
    problem = (exc.problem or "").strip()
    context = (exc.context or "").strip()
    at_problem = exc.problem_mark.line + 1 if exc.problem_mark else None
    at_context = exc.context_mark.line + 1 if exc.context_mark else at_problem
    if "'\\t'" in problem:
        return at_problem, "a tab character here; indent with spaces, not tabs (and put a space after ':')"
    no_colon = "this line has no ':' after its key; write `field: value`"
    if context == "while scanning a simple key":
        return at_context, no_colon
    for what, opening, closing in (("sequence", "[", "]"), ("mapping", "{", "}")):
        if context == f"while parsing a flow {what}":
            return at_context, f"the '{opening}' on this line is not closed; add '{closing}'"
    if "<stream end>" in problem:
        return at_context, "the file ends inside a [...] or {...} value; close it"
    if context == "while scanning a quoted scalar":
        return at_context, "the quote opened on this line is not closed; add the closing quote"
    if "<block end>" in problem:
        return at_problem, "this line is indented differently from the fields around it; align it with them"
    if problem == "mapping values are not allowed here":
        # `theta 10000` above `layout: half` reads as one text running into this line's ':'.
        lines = text.splitlines()  # the line breaks YAML counts (others are refused by the reader)
        row = at_problem - 1 if at_problem else 0
        above = [i for i in range(row) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
        if (
            above
            and row < len(lines)
            and ":" not in lines[above[-1]]
            and _indent(lines[above[-1]]) == _indent(lines[row])
        ):
            return above[-1] + 1, no_colon
        return at_problem, (
            "unexpected ':' on this line; indent it like the fields around it, or quote a value that holds ': '"
        )
    return at_problem or at_context, problem or context or "invalid YAML"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


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


def _bound(limit: float) -> str:
    return f"{limit:g}" if isinstance(limit, float) else str(limit)


def _check_value(value: Any, rule: FieldRule, doc: _Located, path: str) -> Any:
    if value is None:
        if rule.nullable:
            return None
        raise doc.error(path, f"must be {_type_name(rule.kind())}, got null; give a value")
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # bool is a subclass of int in Python, but `heads: true` is a mistake, not 1.
    if not isinstance(value, rule.kind) or (rule.kind is not bool and isinstance(value, bool)):
        got = f"must be {_type_name(rule.kind())}, got {_type_name(value)} {_shown(value)}"
        if isinstance(value, str) and rule.kind in (int, float):
            text = value.strip()
            if _DECIMAL[rule.kind.__name__].match(text) and len(text) <= 40:
                got = f"{got}; write {text} without quotes"
            elif hint := _other_number_form(text):
                got = f"{got}; {hint}"
        raise doc.error(path, got)
    if rule.kind is float and value != value:
        raise doc.error(path, "must be a number, got NaN")
    if rule.choices is not None and value not in rule.choices:
        lower = str(value).lower()
        alias = dict(rule.hints).get(lower) or (repr(lower) if lower in rule.choices else None)
        close = difflib.get_close_matches(str(value), rule.choices, n=1, cutoff=0.6)
        hint = f"; did you mean {alias}?" if alias else f"; did you mean {close[0]!r}?" if close else ""
        raise doc.error(path, f"{_shown(value)} is not one of {', '.join(rule.choices)}{hint}")
    if rule.low is not None and value < rule.low:
        why = f" ({rule.low_why})" if rule.low_why else ""
        raise doc.error(path, f"{rule.name}={value}: must be at least {_bound(rule.low)}{why}")
    if rule.high is not None and value > rule.high:
        raise doc.error(path, f"{rule.name}={value}: must be at most {_bound(rule.high)}")
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
    if name in RESERVED_NAMES:
        what = "mlagen itself" if name == "mlagen" else "a Python standard-library module"
        raise doc.error(
            "name",
            f"{name!r} from {origin} is the name of {what}; a generated package of that name "
            f"would hide it from `import {name}`; rename the spec (e.g. {name}_attn)",
        )
    return name


RuleCheck = Callable[[dict[str, Any], _Located], None]


def _rules_mla(v: dict[str, Any], doc: _Located) -> None:
    if v["qk_rope_head_dim"] % 2:
        raise doc.error(
            "qk_rope_head_dim", f"qk_rope_head_dim={v['qk_rope_head_dim']}: must be even (RoPE rotates pairs)"
        )
    if v["sparse"] is not None:
        v["sparse"] = _parse_sparse(v, doc)
    elif v["cache_dtype"] == "fp8":
        raise doc.error(
            "cache_dtype",
            "cache_dtype fp8 is implemented for sparse MLA (its decode kernels read the FP8 rows they "
            "select); add a sparse block or remove cache_dtype",
        )


def _parse_sparse(v: dict[str, Any], doc: _Located) -> Sparse:
    sparse = Sparse(**_check_table(v["sparse"], SPARSE, doc, "sparse"))
    if v["q_lora_rank"] is None:
        raise doc.error(
            "sparse",
            "the indexer projects its queries from c_q, the normalised query latent (q_a_proj, "
            "q_a_layernorm), so a sparse spec needs q_lora_rank; DeepSeek-V3.2 and GLM-5 have one",
            near="q_lora_rank",
        )
    if not v["causal"]:
        raise doc.error(
            "sparse", "the indexer selects among earlier tokens only; a sparse spec needs causal: true"
        )
    if sparse.index_head_dim < v["qk_rope_head_dim"]:
        raise doc.error(
            "sparse.index_head_dim",
            f"index_head_dim={sparse.index_head_dim}: must be at least qk_rope_head_dim="
            f"{v['qk_rope_head_dim']} (RoPE rotates the first qk_rope_head_dim dims of the indexer key)",
        )
    return sparse


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


def _rules_compressed(v: dict[str, Any], doc: _Located) -> None:
    if not v["causal"]:
        raise doc.error(
            "causal", "compressed entries summarise earlier windows for causal decoders; set causal: true"
        )
    rope, head_dim, rope_dim = v["rope"], v["head_dim"], v["rope_head_dim"]
    if rope.layout != "interleave":
        raise doc.error(
            "rope.layout",
            "the compressed family rotates interleaved pairs (2i, 2i+1) in place, as DeepSeek-V4 does "
            "(K = V, so the rotated layout reaches the output); write layout: interleave",
        )
    for name in ("mscale", "mscale_all_dim"):
        if f"rope.scaling.{name}" in doc.lines:
            raise doc.error(
                f"rope.scaling.{name}",
                "the compressed family takes yarn's frequencies only and never scales cos/sin "
                "(DeepSeek-V4's attention_factor 1); remove it",
            )
    if rope_dim % 2 or rope_dim > head_dim:
        raise doc.error(
            "rope_head_dim",
            f"rope_head_dim={rope_dim}: must be even (RoPE rotates pairs) and at most head_dim={head_dim}",
        )
    if v["heads"] % v["o_groups"]:
        raise doc.error(
            "o_groups",
            f"o_groups={v['o_groups']}: must divide heads={v['heads']} "
            "(the output projection maps each group of heads on its own)",
        )
    if v["compression"] is not None:
        v["compression"] = _parse_compression(v["compression"], rope_dim, doc)


def _parse_compression(data: Any, rope_dim: int, doc: _Located) -> Compression:
    values = _check_table(data, COMPRESSION, doc, "compression")
    indexer = values.pop("indexer")
    if indexer is not None:
        indexer = EntryIndexer(**_check_table(indexer, ENTRY_INDEXER, doc, "compression.indexer"))
        if indexer.head_dim < rope_dim:
            raise doc.error(
                "compression.indexer.head_dim",
                f"head_dim={indexer.head_dim}: must be at least rope_head_dim={rope_dim} "
                "(RoPE rotates the last rope_head_dim dims of the indexer's queries and keys)",
            )
    return Compression(indexer=indexer, **values)


FAMILY_RULES: dict[str, tuple[RuleCheck, type]] = {
    "mla": (_rules_mla, MlaSpec),
    "mha": (_rules_gqa, GqaSpec),
    "gqa": (_rules_gqa, GqaSpec),
    "mqa": (_rules_gqa, GqaSpec),
    "latent": (_rules_latent, LatentSpec),
    "compressed": (_rules_compressed, CompressedSpec),
}


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """Parse and validate a spec from YAML text; `source` is used in messages."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
        raise SpecError(_too_large(), source=source)
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


def _too_large() -> str:
    return (
        f"is larger than {MAX_SPEC_BYTES >> 10} KiB, the limit for a spec (a spec is a few hundred "
        "bytes of YAML); check the path"
    )


def load_spec(path: str | Path) -> Spec:
    """Read and validate a spec file (a regular file of at most MAX_SPEC_BYTES)."""
    path = Path(path)
    source = str(path)
    try:
        mode = path.stat().st_mode
        if stat.S_ISDIR(mode):
            raise SpecError("is a directory; give a .yaml spec file", source=source)
        if not stat.S_ISREG(mode):
            # A device or a pipe may never end (/dev/zero) or block on open (a FIFO).
            raise SpecError(
                "is not a regular file (a device, pipe or socket); give a .yaml spec file", source=source
            )
        with path.open("rb") as file:
            data = file.read(MAX_SPEC_BYTES + 1)
    except FileNotFoundError:
        raise SpecError("no such file; check the path", source=source) from None
    except OSError as exc:
        raise SpecError(f"cannot read: {exc.strerror}", source=source) from None
    except ValueError:  # a NUL byte in the path
        raise SpecError("is not a valid file path", source=source) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(_too_large(), source=source)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("is not UTF-8 text; a spec is a YAML text file", source=source) from None
    return parse_spec(text, source)
