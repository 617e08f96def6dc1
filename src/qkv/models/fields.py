"""Typed reading of the JSON objects of a model folder (config.json and the like).

One mechanism for every family: a config dataclass's fields are read from the dict by their
annotations (int, float, bool, str, Optional[...], int-or-list), each checked against an
optional `Limit` (a range or a set of choices). A value of the wrong JSON type or out of range
is a `ModelError` naming the file, the field, the value, what it must be, and the fix; JSON's
`true` is not an integer and `12.0` is not one either, since transformers would refuse both.
A field that is absent keeps the dataclass default.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

from .checkpoint import ModelError, json_type

_MISSING = object()


@dataclass(frozen=True)
class Limit:
    """Allowed values of one field: lo <= v <= hi (open ends strict), or one of `choices`."""

    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    choices: Optional[tuple] = None

    def allows(self, v) -> bool:
        if self.choices is not None:
            return v in self.choices
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return False
        if self.hi is not None and (v >= self.hi if self.hi_open else v > self.hi):
            return False
        return True

    def describe(self) -> str:
        if self.choices is not None:
            return "one of " + ", ".join(json.dumps(c) for c in self.choices)
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}{')' if self.hi_open else ']'}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        return f"{'<' if self.hi_open else '<='} {self.hi:g}"


POSITIVE = Limit(lo=1)  # sizes and counts
NON_NEGATIVE = Limit(lo=0)  # token ids
PROBABILITY = Limit(lo=0, hi=1, hi_open=True)  # dropout (1 would drop everything)
EPS = Limit(lo=0)  # norm epsilons
POSITIVE_REAL = Limit(lo=0, lo_open=True)  # bases and factors


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _kind(value) -> str:
    if isinstance(value, float) and not isinstance(value, bool):
        return "a number with a fraction or exponent" if math.isfinite(value) else "not a finite number"
    return json_type(value)


class Fields:
    """Typed access to one JSON object of a folder; every failure names `source` and the field.

    Args:
        data: the parsed object.
        source: the file it came from (a path or a name), for messages.
        prefix: for a nested object, the path of its parent field ("rope_parameters.").
        fix: what the message tells the user to do.
    """

    def __init__(self, data: Mapping, source, *, prefix: str = "",
                 fix: str = "correct it in the file (or restore the file from the model's source)"):
        self.data, self.source, self.prefix, self.fix = data, source, prefix, fix

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def unsupported(self, name: str, why: str) -> ModelError:
        """The error for a field whose value qkv refuses: file, field, value, and `why` (with the fix)."""
        return ModelError(f"{self.source}: {self.prefix}{name}={_show(self.data.get(name))} is not supported: {why}")

    def get(self, name: str, annotation: Any, default: Any = _MISSING, limit: Optional[Limit] = None):
        """The value of `name` checked against a type annotation and a limit; `default` if absent."""
        if name not in self.data:
            if default is _MISSING:
                raise ModelError(f"{self.source}: field {self.prefix}{name} is missing; add it "
                                 f"(or restore the file from the model's source)")
            return default
        return self.check(name, self.data[name], annotation, limit)

    def check(self, name: str, value, annotation: Any, limit: Optional[Limit] = None):
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
        if origin is Union:
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            for a in options:
                if _is(value, a):
                    return self.check(name, value, a, limit)
            raise self._type_error(name, value, options, none_ok=type(None) in args)
        if not _is(value, annotation):
            raise self._type_error(name, value, [annotation], none_ok=False)
        if annotation is list or origin is list:  # each item typed as list[...] says (the limit applies to items)
            item_type = args[0] if args else Any
            return [self.check(f"{name}[{i}]", item, item_type, limit) for i, item in enumerate(value)]
        self._limit(name, value, limit)
        return value

    def _limit(self, name: str, value, limit: Optional[Limit]) -> None:
        if limit is not None and not limit.allows(value):
            what = "is not supported" if limit.choices is not None else "is out of range"
            raise ModelError(f"{self.source}: {self.prefix}{name}={_show(value)} {what}; it must be "
                             f"{limit.describe()}; {self.fix}")

    def _type_error(self, name: str, value, options, *, none_ok: bool) -> ModelError:
        want = [_describe(a) for a in options] + (["null"] if none_ok else [])
        return ModelError(f"{self.source}: {self.prefix}{name}={_show(value)} is {_kind(value)}; it must be "
                          f"{' or '.join(want)}; {self.fix}")

    def sub(self, name: str) -> Optional["Fields"]:
        """A nested object field as Fields (None if absent or null); any other type is an error."""
        value = self.get(name, Optional[dict], None)
        return None if value is None else Fields(value, self.source, prefix=f"{self.prefix}{name}.", fix=self.fix)


_NAMES = {int: ("an integer", "integers"), float: ("a finite number", "finite numbers"),
          bool: ("true or false", "booleans"),
          str: ("a string", "strings"), dict: ("an object", "objects"), list: ("an array", "arrays")}


def _describe(annotation) -> str:
    """How a message says what a value must be: "an integer", "an array of strings"."""
    origin, args = typing.get_origin(annotation) or annotation, typing.get_args(annotation)
    one = _NAMES.get(origin, (getattr(origin, "__name__", str(origin)),))[0]
    if origin is list and args and args[0] in _NAMES:
        return f"{one} of {_NAMES[args[0]][1]}"
    return one


def _is(value, annotation) -> bool:
    t = typing.get_origin(annotation) or annotation
    if t is Any:
        return True
    if t is bool:
        return isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if t is float:  # JSON 1 and 1.0 are both numbers; inf/nan (Python's json accepts them) are not
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if t is list:
        return isinstance(value, list)
    return isinstance(value, t)


def read_dataclass(cls, fields: Fields, *, limits: Optional[Mapping[str, Limit]] = None,
                   skip: tuple[str, ...] = ()) -> dict:
    """Keyword arguments for config dataclass `cls`: every field present in `fields`, typed by its
    annotation and checked against `limits`; absent fields are left to the dataclass defaults.

    Args:
        cls: a config dataclass (BertConfig, GPT2Config, ...).
        fields: the config.json object.
        limits: field -> Limit.
        skip: fields the caller reads itself (e.g. Llama's rope_scaling).
    """
    hints = typing.get_type_hints(cls)
    limits = limits or {}
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip or f.name not in fields:
            continue
        out[f.name] = fields.get(f.name, hints[f.name], limit=limits.get(f.name))
    return out


def refuse_common(fields: Fields) -> None:
    """Fields every family refuses: each changes what the stored numbers mean in a way qkv's
    modules do not run, so loading them as plain weights would compute something else."""
    if fields.get("quantization_config", Any, None) is not None:
        raise fields.unsupported(
            "quantization_config", "the weights are quantized (packed integers with scales) and qkv runs "
            "unquantized floating-point weights; use the model's unquantized safetensors")
    pruned = fields.get("pruned_heads", Optional[dict], None)
    if pruned and any(pruned.values()):
        raise fields.unsupported(
            "pruned_heads", "pruned layers have fewer heads than the others, and qkv's layers all have "
            "num_attention_heads heads; use the unpruned model")


def check_divisible(source, name: str, value: int, by: str, divisor: int,
                    fix: str = "correct one of them (the head size is their quotient)") -> None:
    """A size that must split evenly into heads: `name`=value divisible by `by`=divisor, or a ModelError."""
    if value % divisor:
        raise ModelError(f"{source}: {name}={value} is not divisible by {by}={divisor}; {fix}")


def refuse_cross_attention(fields: Fields, ours: str, plain: str) -> None:
    """add_cross_attention=true asks for decoder-to-encoder layers `ours` (e.g. "BertModel") does not have."""
    if fields.get("add_cross_attention", bool, False):
        raise fields.unsupported("add_cross_attention", f"qkv's {ours} has no cross-attention layers; use the "
                                 f"folder of a plain {plain} (add_cross_attention false)")


class HFConfig:
    """Base of the family config dataclasses: `from_hf` reads config.json the same way for each.

    A family sets `LIMITS` (field -> Limit) and may override `read_fields` (fields read by hand,
    refusals particular to it; the default reads every dataclass field by its annotation) and
    `check` (relations between fields, e.g. a hidden size divisible by the heads).
    """

    LIMITS: ClassVar[Mapping[str, Limit]] = {}

    @classmethod
    def from_hf(cls, d: dict, source="config.json"):
        """Read a Hugging Face config.json dict: every field qkv uses, typed and range-checked,
        and the fields that change the math in ways qkv does not run refused by name
        (docs/models.md lists every field). `source` names the file in messages."""
        f = Fields(d, source)
        refuse_common(f)
        cfg = cls(**cls.read_fields(f))
        cfg.check(source)
        return cfg

    @classmethod
    def read_fields(cls, f: Fields) -> dict:
        """The dataclass keyword arguments from config.json (after the common refusals)."""
        return read_dataclass(cls, f, limits=cls.LIMITS)

    def check(self, source) -> None:
        """Refuse a config whose fields are each valid but do not fit together."""
