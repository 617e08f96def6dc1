"""The explorer's JSON API as pydantic models: the requests (which FastAPI validates and
documents), the answers (documented; the "qkv.explain/1" answer is `qkv.inspect.schema.
ExplainData`, the format the offline HTML and PNG check), and the error form.

Every refusal is an `ApiError`, answered as {"error": {"status", "code", "message"}}: a
validation error of pydantic becomes one through `api_error`, with the codes of the API
(missing_field, unknown_field, wrong_type, bad_value, empty_text, text_too_long, bad_text, ...).
The requests are strict (no "1" for 1, no 1 for true) and refuse unknown fields. The text
limit is the server's, so `request_models(limits)` makes the request classes of one app.

Nothing here imports Starlette or FastAPI (docs/architecture.md, "Inspect, web, and the
rest").
"""

import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WrapValidator
from pydantic_core import PydanticCustomError

from ..inspect.schema import LEVELS, METHODS, ExplainData

DEFAULT_MODEL = "minilm"


class ApiError(Exception):
    """A problem with one request: answered as {"error": {"status", "code", "message"}}, plus
    "limit" ({"name", "estimate", "limit", "flag"}) when a cost estimate was over a limit."""

    def __init__(self, status: int, code: str, message: str, limit: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.limit = limit

    def to_dict(self) -> dict:
        error: dict = {"status": self.status, "code": self.code, "message": self.message}
        if self.limit is not None:
            error["limit"] = self.limit
        return {"error": error}


MB = 2**20
DEFAULT_MAX_CHARS = 40_000  # about 7,000 English words: the cost limits below are the real ones


@dataclass(frozen=True)
class Limits:
    """A server's limits (docs/web.md, "Long inputs: costs, budgets and lazy fetching"). Each
    request's cost is estimated before it runs and refused (413 too_costly) over max_cost,
    max_answer or max_memory; the flag of `qkv serve` that raises each is in FLAGS."""

    max_chars: int = DEFAULT_MAX_CHARS  # characters of text (each sentence)
    max_body: int = 12 * DEFAULT_MAX_CHARS + 64 * 1024  # bytes of a request body (two texts, JSON escapes)
    max_cost: int = 2**30  # attention weights a request makes the model form: tokens^2 x layers x heads
    max_answer: int = 64 * MB  # bytes of one JSON answer
    max_memory: int = 2048 * MB  # bytes the requests running at once may hold (estimated)
    max_sessions: int = 1024 * MB  # bytes of recorded results kept for /api/weights (an LRU)
    max_pick: int = 64  # layers, heads and rows one /api/weights request may name (each)
    max_image_bytes: int = 8 * MB  # bytes of an uploaded image file (before base64)
    max_image_pixels: int = 4096 * 4096  # width x height of an uploaded image, read from its header

    def to_dict(self) -> dict:
        return {"max_chars": self.max_chars, "max_body_bytes": self.max_body, "max_cost": self.max_cost,
                "max_answer_bytes": self.max_answer, "max_memory_bytes": self.max_memory,
                "max_session_bytes": self.max_sessions, "max_pick": self.max_pick}

    def image_dict(self) -> dict:
        """The image limits (GET /api/models "image_limits")."""
        return {"max_image_bytes": self.max_image_bytes, "max_image_pixels": self.max_image_pixels,
                "formats": ["PNG", "JPEG", "BMP", "GIF"]}


# The `qkv serve` flag that raises each limit (named in a 413 too_costly).
FLAGS = {"max_cost": "--max-cost", "max_answer": "--max-answer-mb", "max_memory": "--max-memory-mb",
         "max_sessions": "--max-session-mb", "max_chars": "--max-chars", "max_pick": "--max-pick",
         "max_image_bytes": "--max-image-mb", "max_image_pixels": "--max-image-pixels"}


# --------------------------------------------------------------------------- requests
# A check of the API's own raises a PydanticCustomError whose type is the API's error code and
# whose message follows the field's name ("'text' is empty; ..."); `api_error` answers it as is.
# The checks run before the type's own (BeforeValidator, WrapValidator), so a request is told
# what it was told before the models: a blank text is empty whatever its length, a blank word
# is a bad value, a too long text is too long before its characters are looked at.

MAX_WORD = 200  # characters of a word given by name


def _sentence_check(max_chars: int):
    def check(value: Any) -> Any:
        if isinstance(value, str):  # anything else: the type's own error (wrong_type)
            if not value.strip():
                raise PydanticCustomError("empty_text", "is empty; give a sentence, e.g. \"The cat sat on the mat.\"")
            if len(value) > max_chars:
                raise PydanticCustomError("text_too_long", "has {length} characters; this server explains at most "
                                                           "{max_chars}",
                                          {"length": len(value), "max_chars": max_chars})
        return value
    return BeforeValidator(check)


def _any_text(value: Any, handler: Callable[[Any], Any]) -> Any:
    """A string with a lone surrogate (JSON "\\ud800") passes as it is: as a word it is no word
    of the text (unknown_word), as a model name no model's (unknown_model)."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value
    return handler(value)


def _word_check(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError("bad_value", "is empty; give a word of the text or its index")
        if len(value) > MAX_WORD:
            raise PydanticCustomError("bad_value", "is {length} characters long; give one word of the text",
                                      {"length": len(value)})
    return value


# No ge=0 on the indices: the service says which ones the text or the model has (unknown_word,
# unknown_layer, unknown_head), after the model is known; the document still says minimum 0.
Index = Annotated[int, Field(json_schema_extra={"minimum": 0})]
Word = Annotated[Annotated[str, Field(min_length=1, max_length=MAX_WORD)] | Index,
                 WrapValidator(_any_text), BeforeValidator(_word_check)]  # the last runs first
_WORD = "a word of the text (first match, case-insensitive) or its index among the shown labels at `level`"
Model = Annotated[str, WrapValidator(_any_text),
                  Field(description="a model name from GET /api/models (never a path)")]
HideSpecial = Annotated[bool, Field(description="hide [CLS], [SEP], BOS and renormalise rows")]
Method = Literal[METHODS]
Level = Literal[LEVELS]
ROWS = ("auto", "all", "focus")
Rows = Annotated[Literal[ROWS], Field(description=(
    "auto: full maps when layers x heads x n x n is small (qkv.inspect.explain.FULL_CELLS), else the "
    "compact view (view 'rows': summaries, minimap, top-k keys of the focus rows); all: full maps "
    "(refused when the answer would be over the server's limit); focus: record and ship only the "
    "focus word's rows (needs focus)"))]
MAX_NAME = 200  # characters of an image's name or a sample's name


def _name_check(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise PydanticCustomError("bad_value", "is empty; leave it out or give a name")
        if len(value) > MAX_NAME:
            raise PydanticCustomError("bad_value", "is {length} characters long; give at most {most}",
                                      {"length": len(value), "most": MAX_NAME})
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON "\ud800"): no name to show or send back
            raise PydanticCustomError("bad_value", "is not valid Unicode (it holds a lone surrogate); give a name "
                                                   "in UTF-8 text") from None
    return value


ImageData = Annotated[str, Field(description=(
    "an image model's input: the image file (PNG, JPEG, BMP or GIF) as a data URL "
    "(\"data:image/png;base64,...\", as FileReader.readAsDataURL gives) or its bare base64; at most the "
    "server's max_image_bytes and max_image_pixels (GET /api/models, image_limits). Give text, image or "
    "sample, one of them"))]
ImageName = Annotated[str, BeforeValidator(_name_check), Field(min_length=1, max_length=MAX_NAME, description=(
    "the uploaded image's name (shown; default \"image\")"))]
SampleName = Annotated[str, BeforeValidator(_name_check), Field(min_length=1, max_length=MAX_NAME, description=(
    "an image model's input: the name of one of its samples (GET /api/samples?model=...), looked up in that "
    "list (never a path)"))]
Interpolate = Annotated[bool, Field(description=(
    "an image of another size than the model's runs on resampled position embeddings instead of being "
    "refused (for a model whose preprocessor does not resize)"))]
MISSING_TEXT = "the field 'text' is required ('image' or 'sample' for an image model)"
Session = Annotated[str, Field(description="the id an explain or compare answer gave (unknown or evicted: 410)")]
Picks = Annotated[list[Index], Field(description="indices (at most the server's max_pick)")]
_STRICT = ConfigDict(strict=True, extra="forbid")


def request_models(limits: Limits) -> tuple[type[BaseModel], ...]:
    """(ExplainRequest, StepsRequest, CompareRequest, WeightsRequest) for a server taking at most
    `limits.max_chars` characters per sentence. The fields are declared in the order they are
    checked (and listed in an unknown_field message): the sentences, the model, then the rest."""
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_chars,
                                description=f"a sentence (at most {limits.max_chars} characters): a text model's "
                                            "input"),
                     _sentence_check(limits.max_chars)]

    # A text model reads `text`; an image model (GET /api/models, "modality": "image") `image` or
    # `sample` instead: exactly one input is given (the service checks it against the model). The
    # image fields come last, so that the fields are still listed (and checked) as before them.
    class ExplainRequest(BaseModel):
        model_config = _STRICT
        text: Text = Field(None)
        model: Model = DEFAULT_MODEL
        focus: Word | None = Field(None, description=f"the focus word (optional): {_WORD}; for an image "
                                                     "a patch \"r1c2\" or the class token \"cls\"")
        method: Method = "raw"
        level: Level = "word"
        hide_special: HideSpecial = False
        rows: Rows = "auto"
        image: ImageData = Field(None)
        image_name: ImageName = Field(None)
        sample: SampleName = Field(None)
        interpolate_pos_encoding: Interpolate = False

    class StepsRequest(BaseModel):
        model_config = _STRICT
        text: Text = Field(None)
        model: Model = DEFAULT_MODEL
        word: Word = Field(description=f"{_WORD}; for an image a patch \"r1c2\" or the class token \"cls\"")
        layer: Index
        head: Index
        level: Level = "word"
        hide_special: HideSpecial = False
        image: ImageData = Field(None)
        image_name: ImageName = Field(None)
        sample: SampleName = Field(None)
        interpolate_pos_encoding: Interpolate = False

    class CompareRequest(BaseModel):
        model_config = _STRICT
        text: Text
        other: Text
        model: Model = DEFAULT_MODEL
        focus: Word | None = Field(None, description=f"the focus word (optional): {_WORD}")
        method: Method = "raw"
        level: Level = "word"
        hide_special: HideSpecial = False

    class WeightsRequest(BaseModel):
        """Full rows of chosen layers, heads and query rows, computed from the recorded queries
        and keys that an explain (or compare) kept under `session`."""

        model_config = _STRICT
        session: Session
        rows: Picks = Field(description="query rows: unit indices at `level` (labels of the explain answer, "
                                        "special tokens counted unless hide_special)")
        layers: Picks | None = Field(None, description="layers (default: all)")
        heads: Picks | None = Field(None, description="heads (default: all)")
        method: Method = "raw"
        level: Level = "word"
        hide_special: HideSpecial = False

    return ExplainRequest, StepsRequest, CompareRequest, WeightsRequest


_KINDS = {"string_type": "a string", "int_type": "an integer", "bool_type": "true or false",
          "literal_error": "a string", "list_type": "a list of integers"}
_WORD_KIND = "a word (a string) or a word index (an integer)"


def api_error(errors: list[dict], request: type[BaseModel], body: Any) -> ApiError:
    """The ApiError of pydantic's validation errors (loc starting "body") of `body`, the parsed
    JSON of a request to be a `request`.

    One error is told, as when the requests were checked by hand: a body that is not an object;
    an unknown field (the first by name, even one pydantic cannot read, such as a lone surrogate);
    then the first field in the declared order with an error, and of its errors (a word gives
    one per member of its union) one that is not of the wrong type; a model that is null last,
    as the model's name is looked at once the rest is right."""
    from ..models.checkpoint import json_type
    from ..models.tokenizer import check_texts

    if not isinstance(body, dict):
        return ApiError(422, "wrong_type", f"the request body must be a JSON object; got {json_type(body)}")
    fields = list(request.model_fields)
    unknown = sorted(set(body) - set(fields))
    if unknown:
        return ApiError(422, "unknown_field", f"unknown field {unknown[0]!r}; the fields are: {', '.join(fields)}")
    if "sample" in fields and not {"text", "image", "sample"} & set(body):  # no input: told first, as before
        return ApiError(422, "missing_field", MISSING_TEXT)
    errors = [dict(e, loc=tuple(e["loc"])[1:]) for e in errors
              if tuple(e["loc"])[:1] == ("body",) and len(e["loc"]) > 1 and e["loc"][1] in fields]
    if not errors:  # not seen: every error of a body that is an object names one of its fields
        return ApiError(422, "bad_value", "the request body does not fit the request's fields")

    def rank(e: dict) -> int:
        return len(fields) if e["loc"][0] == "model" and e.get("input") is None else fields.index(e["loc"][0])

    first = min(errors, key=rank)
    name = first["loc"][0]
    same = [e for e in errors if e["loc"][:1] == (name,)]
    err = next((e for e in same if e["type"] not in _KINDS), first)
    kind, value = err["type"], err.get("input")
    annotation = request.model_fields[name].annotation
    if kind == "missing":
        return ApiError(422, "missing_field", f"the field {name!r} is required")
    if kind in ("empty_text", "text_too_long", "bad_value"):  # the API's own checks (above)
        return ApiError(413 if kind == "text_too_long" else 422, kind, f"{name!r} {err['msg']}")
    if typing.get_origin(annotation) is Literal and isinstance(value, str):
        choices = ", ".join(typing.get_args(annotation))
        return ApiError(422, "bad_value", f"{name!r} must be one of {choices}; got {value[:40]!r}")
    if kind == "string_unicode":  # a lone surrogate such as JSON "\ud800": the message of the one text check
        try:
            check_texts(value, what=repr(name))
        except ValueError as exc:
            return ApiError(422, "bad_text", str(exc))
    if name == "model" and value is None:
        return ApiError(422, "wrong_type", f"'model' must be a string (a model name); got {json_type(value)}")
    expected = _WORD_KIND if len(same) > 1 else _KINDS.get(kind, "valid")  # several: a word's union
    return ApiError(422, "wrong_type", f"{name!r} must be {expected}; got {json_type(value)}")


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


class ExplainAnswer(ExplainData):
    """The "qkv.explain/1" dict of `ExplainResult.to_dict`, plus the session that keeps its
    recorded queries and keys on the server for POST /api/weights."""

    session: str | None = Field(description="the id to give POST /api/weights; null when the recorded result "
                                            "is larger than the server keeps (max_session_bytes)")


class WeightsData(BaseModel):
    """Full rows of the chosen layers, heads and rows (`ExplainResult.weights_dict`)."""

    model_config = ConfigDict(extra="allow")
    format: Literal["qkv.weights/1"]
    session: str
    method: Literal[METHODS]
    level: Literal[LEVELS]
    layers: list[int]
    heads: list[int | str] = Field(description="head indices; [\"rollout\"] with method rollout (one map)")
    rows: list[int] = Field(description="the query rows, unit indices at `level`")
    n: int = Field(description="the number of keys (units at `level`) of each row")
    weights: list[list[list[Vector]]] = Field(description="(layers, heads, rows, n)")


class CompareData(BaseModel):
    """Two sentences side by side, with the per-head divergence of a focus word."""

    format: Literal["qkv.compare/1"]
    a: ExplainAnswer
    b: ExplainAnswer
    same_length: bool
    jsd: list[Vector] | None = Field(description="(layers, heads): Jensen-Shannon divergence (bits) of the focus "
                                                    "rows; null without a focus or for sentences of different lengths")
    largest: Largest | None
    note: str | None


class LimitDetail(BaseModel):
    name: str = Field(description="the limit: max_cost, max_answer, max_memory")
    estimate: int = Field(description="the request's estimate (weights or bytes)")
    limit: int = Field(description="the server's limit, in the same unit")
    flag: str = Field(description="the `qkv serve` option that raises it")


class ErrorDetail(BaseModel):
    status: int
    code: str
    message: str
    limit: LimitDetail | None = Field(None, description="with too_costly: the estimate over the limit")


class Error(BaseModel):
    """Every refusal: {"error": {"status", "code", "message"}}."""

    error: ErrorDetail


ERRORS = {
    400: "malformed JSON or a body that is not UTF-8 (code malformed_json), a bad Content-Length header "
         "(bad_request), a Host header that is not the server's own (bad_host), text for an image model or an "
         "image for a text model (wrong_input), or an image the model cannot read: not a PNG, JPEG, BMP or GIF, "
         "16-bit samples, transparency, colour for a grayscale model, another size than the model's (bad_image)",
    404: "unknown model (code unknown_model): only names listed by GET /api/models; unknown sample "
         "(unknown_sample): only names listed by GET /api/samples",
    405: "a method other than POST (method_not_allowed)",
    410: "the session of POST /api/weights is unknown or was evicted (session_expired): explain the text again",
    413: "body larger than the limit (body_too_large), a text longer than max_chars (text_too_long), or a request "
         "whose estimated cost is over a limit of the server (too_costly: the weights the model would form, "
         "max_cost; the bytes of the answer, max_answer; the memory it would hold, max_memory; error.limit "
         "names the estimate, the limit and the qkv serve flag that raises it), or an image over the server's "
         "max_image_bytes or max_image_pixels (image_too_large, checked before the image is decoded)",
    415: "the body is not sent as application/json (unsupported_media_type)",
    422: "a field is missing (missing_field), unknown (unknown_field), of the wrong type (wrong_type), or has a "
         "value not offered (bad_value); an empty text (empty_text); a text that is not valid Unicode, e.g. a "
         "lone surrogate \\ud800 (bad_text); a word not in the text (unknown_word); a layer or head the model "
         "lacks (unknown_layer, unknown_head); a row the text lacks (unknown_row); a text the model cannot take, "
         "e.g. more tokens than it has positions (cannot_explain); the step-through asked of an encoder-decoder "
         "model (not_supported)",
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
