"""The explorer's JSON API as pydantic models: the requests (which FastAPI validates and
documents), the answers (documented; the "qkv.explain/1" answer is `qkv.inspect.schema.
ExplainData`, the format the offline HTML and PNG check), and the error form.

Every refusal is an `ApiError`, answered as {"error": {"status", "code", "message"}}: a
validation error of pydantic becomes one through `api_error`, with the codes of the API
(missing_field, unknown_field, wrong_type, bad_value, empty_text, text_too_long, bad_text, ...).
The requests are strict (no "1" for 1, no 1 for true) and refuse unknown fields. The text
limit is the server's, so `request_models(limits)` makes the request classes of one app.

Nothing here imports Starlette or FastAPI (docs/architecture.md, "web").
"""

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

from ..inspect.schema import LEVELS, METHODS, ExplainData

DEFAULT_MODEL = "minilm"
TEXT_FIELDS = ("text", "other")


class ApiError(Exception):
    """A problem with one request: answered as {"error": {"status", "code", "message"}}."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message

    def to_dict(self) -> dict:
        return {"error": {"status": self.status, "code": self.code, "message": self.message}}


@dataclass(frozen=True)
class Limits:
    max_chars: int = 1000  # characters of text (each sentence)
    max_body: int = 64 * 1024  # bytes of a request body

    def to_dict(self) -> dict:
        return {"max_chars": self.max_chars, "max_body_bytes": self.max_body}


# --------------------------------------------------------------------------- requests


def _sentence(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("empty_text", "is empty; give a sentence, e.g. \"The cat sat on the mat.\"")
    return value


Word = Annotated[str, Field(min_length=1, max_length=200)] | Annotated[int, Field(ge=0)]
_WORD = "a word of the text (first match, case-insensitive) or its index among the shown labels at `level`"


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str = Field(DEFAULT_MODEL, description="a model name from GET /api/models (never a path)")
    level: Literal[LEVELS] = "word"
    hide_special: bool = Field(False, description="hide [CLS], [SEP], BOS and renormalise rows")


def request_models(limits: Limits) -> tuple[type[_Request], type[_Request], type[_Request]]:
    """(ExplainRequest, StepsRequest, CompareRequest) for a server taking at most
    `limits.max_chars` characters per sentence."""
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_chars,
                                description=f"a sentence (at most {limits.max_chars} characters)"),
                     AfterValidator(_sentence)]

    class ExplainRequest(_Request):
        text: Text
        focus: Word | None = Field(None, description=f"the focus word (optional): {_WORD}")
        method: Literal[METHODS] = "raw"

    class StepsRequest(_Request):
        text: Text
        word: Word = Field(description=_WORD)
        layer: int = Field(ge=0)
        head: int = Field(ge=0)

    class CompareRequest(ExplainRequest):
        other: Text

    return ExplainRequest, StepsRequest, CompareRequest


_KINDS = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
          "literal_error": "a string", "model_type": "a JSON object"}
_UNKNOWN = {"layer": "unknown_layer", "head": "unknown_head"}


def api_error(errors: list[dict], fields: list[str]) -> ApiError:
    """The ApiError of pydantic's validation errors of a request body (loc starting "body").

    One error is told: an unknown field first, as it names the mistake best; of the errors of
    one field (a word gives one per member of its union), one that is not of the wrong type."""
    from ..models.tokenizer import check_texts

    errors = [dict(e, loc=tuple(e["loc"])[1:] if tuple(e["loc"])[:1] == ("body",) else tuple(e["loc"]))
              for e in errors]
    first = next((e for e in errors if e["type"] == "extra_forbidden"), errors[0])
    if not first["loc"]:
        return ApiError(422, "wrong_type", f"the request body must be a JSON object; got {_type(first['input'])}")
    name = first["loc"][0]
    same = [e for e in errors if e["loc"][:1] == (name,)]
    err = next((e for e in same if e["type"] not in _KINDS), first)
    kind, value = err["type"], err.get("input")
    if kind == "missing":
        return ApiError(422, "missing_field", f"the field {name!r} is required")
    if kind == "extra_forbidden":
        ordered = sorted(fields, key=lambda f: f not in TEXT_FIELDS)  # the sentences first
        return ApiError(422, "unknown_field", f"unknown field {name!r}; the fields are: {', '.join(ordered)}")
    if kind == "string_unicode":  # a lone surrogate such as JSON "\ud800": the message of the one text check
        try:
            check_texts(value, what=repr(name))
        except ValueError as exc:
            return ApiError(422, "bad_text", str(exc))
    if kind == "empty_text" or (kind == "string_too_short" and name in TEXT_FIELDS):
        return ApiError(422, "empty_text", f"{name!r} is empty; give a sentence, e.g. \"The cat sat on the mat.\"")
    if kind == "string_too_long" and name in TEXT_FIELDS:
        return ApiError(413, "text_too_long", f"{name!r} has {len(value)} characters; this server explains at most "
                                              f"{err['ctx']['max_length']}")
    if kind in ("string_too_short", "string_too_long"):
        return ApiError(422, "bad_value", f"{name!r} must be one word of the text (1 to 200 characters); "
                                          f"got {len(value)} characters")
    if kind == "greater_than_equal":
        return ApiError(422, _UNKNOWN.get(name, "unknown_word"), f"{name!r} is {value}: indices count from 0")
    if kind == "literal_error" and isinstance(value, str):
        return ApiError(422, "bad_value", f"{name!r} must be one of {err['ctx']['expected']}; got {value[:40]!r}")
    expected = " or ".join(dict.fromkeys(_KINDS.get(e["type"], "valid") for e in same))
    return ApiError(422, "wrong_type", f"{name!r} must be {expected}; got {_type(value)}")


def _type(x: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(x), type(x).__name__)


# --------------------------------------------------------------------------- answers

Vector = list[float | None]  # null where a score is masked (-inf)


class StepsData(BaseModel):
    """One query token in one head, the three steps: scores = dots * scale (null where
    masked), weights = softmax(scores), output = sum_j weights_j * values_j."""

    format: Literal["qkv.steps/1"]
    model: str
    text: str
    layer: int
    head: int
    layers: int
    heads: int
    token: int = Field(description="the query token's index among the tokens")
    token_label: str
    labels: list[str] = Field(description="the n tokens")
    special: list[bool]
    scale: float
    query: Vector = Field(description="(d,)")
    keys: list[Vector] = Field(description="(n, d)")
    dots: Vector = Field(description="(n,): q.k before the scale")
    scores: Vector = Field(description="(n,)")
    weights: Vector = Field(description="(n,)")
    values: list[Vector] = Field(description="(n, d)")
    output: Vector = Field(description="(d,)")


class Largest(BaseModel):
    layer: int
    head: int
    jsd: float


class CompareData(BaseModel):
    """Two sentences side by side, with the per-head divergence of a focus word."""

    format: Literal["qkv.compare/1"]
    a: ExplainData
    b: ExplainData
    same_length: bool
    jsd: list[Vector] | None = Field(description="(layers, heads): Jensen-Shannon divergence (bits) of the focus "
                                                    "rows; null without a focus or for sentences of different lengths")
    largest: Largest | None
    note: str | None


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str


class Error(BaseModel):
    """Every refusal: {"error": {"status", "code", "message"}}."""

    error: ErrorDetail


ERRORS = {
    400: "malformed JSON or a body that is not UTF-8 (code malformed_json), a bad Content-Length header "
         "(bad_request), or a Host header that is not the server's own (bad_host)",
    404: "unknown model (code unknown_model): only names listed by GET /api/models",
    405: "a method other than POST (method_not_allowed)",
    413: "body larger than the limit (body_too_large), or a text longer than max_chars (text_too_long)",
    415: "the body is not sent as application/json (unsupported_media_type)",
    422: "a field is missing (missing_field), unknown (unknown_field), of the wrong type (wrong_type), or has a "
         "value not offered (bad_value); an empty text (empty_text); a text that is not valid Unicode, e.g. a "
         "lone surrogate \\ud800 (bad_text); a word not in the text (unknown_word); a layer or head the model "
         "lacks (unknown_layer, unknown_head); a text the model cannot take, e.g. more tokens than it has "
         "positions (cannot_explain); the step-through asked of an encoder-decoder model (not_supported)",
    500: "an unexpected error (internal) or a model that could not be loaded (model_unavailable); no details "
         "are sent",
    503: "the queue is full (busy); try again (see Retry-After)",
}


def error_responses(*statuses: int) -> dict:
    """FastAPI's `responses` for these error statuses: the Error model and what each means."""
    out: dict = {s: {"model": Error, "description": ERRORS[s]} for s in statuses}
    if 503 in out:
        out[503]["headers"] = {"Retry-After": {"schema": {"type": "integer"}}}
    return out
