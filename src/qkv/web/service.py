"""What the web API does, without the web: the shared models and the three operations
(explain, steps, compare) as functions from a checked request (the pydantic models of
`qkv.web.schema`) to a JSON-ready dict.

Nothing here imports Starlette, so it is tested directly; `qkv.web.app` puts HTTP around it.
Every problem a request can cause is an `ApiError` (an HTTP status, a short machine code and a
one-line message); anything else is a bug and becomes a bare JSON 500 in the app.

Models are named, never located, by a request: a bundled name (`qkv.models.BUNDLED`) or the
name of a folder found under --model-dir when the server started. No request string is ever
joined to a path.
"""

from __future__ import annotations

import base64
import binascii
import importlib
import io
import logging
import math
import re
import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from .schema import ApiError

log = logging.getLogger("qkv.web")

# A folder under --model-dir is offered under its own name when the name is this plain.
_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class ModelEntry:
    name: str
    source: str  # "bundled" or "model-dir"
    key: str  # what the loader is given: a bundled name or a folder found at start-up


class ModelRegistry:
    """The models a server offers, each loaded once (under a lock) and shared by all requests.

    A model's forward pass is run under that model's own lock: explain attaches recording
    hooks to the model, so two requests must not run the same model at once.

    The folders under `model_dir` are checked when the registry is made, by `check` (default
    `check_model_folder`: cheap, no weights read); a folder it refuses is not offered, and the
    reason is logged (the "qkv.web" logger) and kept in `skipped`. A model that passes the check
    but fails to load on first use answers 500 model_unavailable, is logged, and is no longer
    listed by `entries` (nor tried again).
    """

    def __init__(self, model_dir: Optional[str | Path] = None, *, loader: Optional[Callable[[str], Any]] = None,
                 check: Optional[Callable[[Path], Optional[str]]] = None):
        from ..models import BUNDLED

        if loader is None:
            loader = _load_for_explain
        self._loader = loader
        self._entries: dict[str, ModelEntry] = {}
        for name in BUNDLED:
            if "/" not in name:
                # Aliases of one bundled model share one loaded copy: key by what ships it.
                self._entries[name] = ModelEntry(name, "bundled", name)
        self._alias = {name: "bundled:" + "/".join(BUNDLED[name]) for name in self._entries}
        self.skipped: dict[str, str] = {}  # folder name -> why it is not offered
        if model_dir is not None:
            root = Path(model_dir)
            if not root.is_dir():
                raise ValueError(f"--model-dir {str(model_dir)!r} is not a folder")
            if check is None:
                check = check_model_folder
            for folder in sorted(root.iterdir()):
                name = folder.name
                if not folder.is_dir() or name.startswith("."):  # files and hidden folders (.git, .cache)
                    continue
                if not _MODEL_NAME.match(name):
                    reason = "its name is not a plain model name (letters, digits, '.', '_', '-'; at most 64)"
                elif name.lower() in self._entries:
                    reason = f"a bundled model is named {name.lower()!r}"
                elif not (folder / "config.json").is_file():
                    reason = "no config.json: not a Hugging Face model folder"
                else:
                    reason = check(folder)
                if reason is not None:
                    self.skipped[name] = reason
                    log.warning("--model-dir: skipped the folder %r: %s", name, reason)
                    continue
                self._entries[name] = ModelEntry(name, "model-dir", str(folder.resolve()))
                self._alias[name] = "dir:" + str(folder.resolve())
        self._loaded: dict[str, Any] = {}
        self._modality: dict[str, str] = {}
        self._samples: dict[str, list[Sample]] = {}
        self._failed: set[str] = set()
        self._load_lock = threading.Lock()
        self._run_locks: dict[str, threading.Lock] = {}

    def entries(self) -> list[ModelEntry]:
        return [e for e in self._entries.values() if e.name not in self._failed]

    def entry(self, name: Any) -> ModelEntry:
        from ..models.checkpoint import json_type

        if not isinstance(name, str):
            raise ApiError(422, "wrong_type", f"'model' must be a string (a model name); got {json_type(name)}")
        found = self._entries.get(name) or self._entries.get(name.lower())
        if found is None or (found.source == "model-dir" and found.name != name):
            offered = ", ".join(sorted(self._entries))
            raise ApiError(404, "unknown_model", f"no model named {name[:80]!r}; this server offers: {offered}")
        return found

    def get(self, name: Any):
        """(the loaded model, its run lock) for a model name; loads it on first use."""
        entry = self.entry(name)
        alias = self._alias[entry.name]
        unavailable = ApiError(500, "model_unavailable", f"the model {entry.name!r} could not be loaded on this server")
        with self._load_lock:  # one load at a time; a second request for it waits, then shares it
            if entry.name in self._failed:
                raise unavailable
            if alias not in self._loaded:
                try:
                    self._loaded[alias] = self._loader(entry.key)
                except Exception as exc:  # a broken folder or a missing package: the server's problem
                    log.error("loading model %r failed: %s; it is no longer offered", entry.name, exc)
                    self._failed.add(entry.name)
                    raise unavailable from None
                self._run_locks[alias] = threading.Lock()
            return self._loaded[alias], self._run_locks[alias]

    def loaded(self) -> list[str]:
        return [e.name for e in self._entries.values() if self._alias[e.name] in self._loaded]

    def folder(self, entry: ModelEntry) -> Optional[Path]:
        """The folder a model comes from (None: a bundled model whose package is not installed)."""
        if entry.source == "model-dir":
            return Path(entry.key)
        from ..models import bundled_path

        try:
            return bundled_path(entry.key)
        except (FileNotFoundError, KeyError):
            return None

    def modality(self, name: Any) -> str:
        """"image" for a vision transformer, else "text": decided from config.json (`folder_modality`),
        without loading the model; kept."""
        entry = self.entry(name)
        if entry.name not in self._modality:
            folder = self.folder(entry)
            self._modality[entry.name] = "text" if folder is None else folder_modality(folder)
        return self._modality[entry.name]

    def samples(self, name: Any, max_bytes: int) -> list["Sample"]:
        """The sample images a model's folder ships (`qkv.inspect.image.samples`: samples/*.png),
        each read once and kept: its name and bytes. Files over `max_bytes` or not PNG are left out
        (logged). [] for a text model or a folder without samples."""
        entry = self.entry(name)
        if entry.name not in self._samples:
            found: list[Sample] = []
            folder = self.folder(entry)
            if folder is not None and self.modality(entry.name) == "image":
                from ..inspect.image import samples

                for path in samples(folder):
                    try:
                        size = path.stat().st_size
                        data = path.read_bytes() if size <= max_bytes else b""
                    except OSError as exc:
                        log.warning("model %r: sample %r not readable: %s", entry.name, path.name, exc)
                        continue
                    if not data.startswith(PNG_SIGNATURE):
                        log.warning("model %r: sample %r left out: %s", entry.name, path.name,
                                    "over the image size limit" if size > max_bytes else "not a PNG file")
                        continue
                    found.append(Sample(path.name, data))
            self._samples[entry.name] = found
        return self._samples[entry.name]


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Sample:
    """A sample image of a model: its file name (what a request names it by) and its PNG bytes."""

    name: str
    data: bytes

    def data_url(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.data).decode("ascii")


def folder_modality(folder: Path) -> str:
    """"image" when the folder's config.json names qkv's vision transformer (an architecture of
    `qkv.models.vit.FAMILIES`, or no architectures and model_type "vit"), else "text"; an
    unreadable config.json is "text" (the folder check or the loader says what is wrong)."""
    from ..models.checkpoint import read_config
    from ..models.vit import FAMILIES

    try:
        config = read_config(folder)
    except Exception:
        return "text"
    if not isinstance(config, dict):
        return "text"
    archs = config.get("architectures")
    archs = [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []
    vit = {a for family in FAMILIES for a in family.architectures}
    if any(a in vit for a in archs) or (not archs and config.get("model_type") == "vit"):
        return "image"
    return "text"


def _load_for_explain(key: str):
    """qkv's own model, or a transformers model for an architecture qkv does not run natively
    (`qkv.models.loading.load_for_explain`), which is logged."""
    from ..models.loading import load_for_explain

    return load_for_explain(key, note=lambda line: log.warning("%s", line))


def check_model_folder(folder: Path) -> Optional[str]:
    """Why `qkv.load` would refuse this model folder, found without reading its weights; None if
    it looks loadable. Checks: config.json is readable JSON naming an architecture qkv runs,
    with the fields that architecture needs; safetensors weights are there and their headers
    readable; tokenizer files are there (explain needs them; a vision transformer needs none,
    `folder_modality`). An architecture qkv has no native implementation of is offered through
    transformers when transformers is installed and the folder is not an encoder-decoder
    (`check_foreign_folder`; logged), else skipped with the reason (how to install transformers).
    Not checked: that the weights' keys and shapes fit config.json (that needs the model built);
    a folder failing only that is found on first use (500 model_unavailable, then no longer
    offered)."""
    from ..models.checkpoint import find_in_folder, read_config, read_shapes, safetensors_files
    from ..models.loading import FAMILIES, ForeignArchitecture, architecture_of, check_foreign_folder, foreign_note

    try:
        config = read_config(folder)
        try:
            FAMILIES[architecture_of(config, folder)].config.from_hf(config)
        except ForeignArchitecture as exc:
            try:
                reason = check_foreign_folder(folder, exc.architecture)
            except Exception as inner:  # as below: the message is logged, not sent
                reason = _reason(inner)
            if reason is None:
                log.warning("--model-dir: %s: %s", folder.name, foreign_note(exc.architecture))
                return None
            return reason if exc.architecture in reason else f"{exc.architecture} (through transformers): {reason}"
        read_shapes(safetensors_files(folder))
        if folder_modality(folder) == "image":
            return None  # a vision transformer reads pixels: no tokenizer
    except UnicodeDecodeError:
        return "a file of it (config.json or a weights index) is not UTF-8 text"
    except Exception as exc:  # whatever the loader would stumble on; the message is logged, not sent
        return _reason(exc)
    if not (find_in_folder(folder, "tokenizer.json", "vocab.txt")
            or (find_in_folder(folder, "vocab.json") and find_in_folder(folder, "merges.txt"))):
        return "no tokenizer files (tokenizer.json, vocab.txt, or vocab.json + merges.txt); explain needs them"
    return None


def _reason(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (ValueError, OSError)) and str(exc) else f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- images
# An image comes in the JSON body (never as a file on the server): "image" is a data URL
# ("data:image/png;base64,...") or bare base64 of a PNG, JPEG, BMP or GIF file. Its size is
# checked twice before it is decoded: its bytes (from the base64's length, then decoded) against
# max_image_bytes, and its pixels (width x height from the file's header, Image.open reads no
# more) against max_image_pixels; PIL's own decompression-bomb refusal (MAX_IMAGE_PIXELS) is
# answered the same way. Only then are the pixels decoded.

IMAGE_FORMATS = ("PNG", "JPEG", "BMP", "GIF")  # the decoders Pillow may use for an upload
_DATA_URL = "data:"


def decode_upload(data: str, limits, what: str = "'image'"):
    """A data URL or bare base64 (the request's "image") -> its bytes, checked against
    `limits.max_image_bytes` before and after decoding (413 image_too_large; 400 bad_image for
    something that is not base64)."""
    payload = data.strip()
    if payload.startswith(_DATA_URL):
        header, comma, payload = payload.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ApiError(400, "bad_image", f"{what} is a data URL without base64 data; send "
                                             "\"data:image/png;base64,...\" (or the base64 text alone)")
    payload = "".join(payload.split())  # base64 may be wrapped over lines
    if not payload:
        raise ApiError(400, "bad_image", f"{what} is empty; send a PNG, JPEG, BMP or GIF file as a data URL")
    if len(payload) // 4 * 3 > limits.max_image_bytes + 3:
        raise _too_large_bytes(len(payload) // 4 * 3, limits, what)
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "bad_image", f"{what} is not base64 text; send the file as a data URL "
                                         "(\"data:image/png;base64,...\", as FileReader.readAsDataURL gives)") from None
    if len(raw) > limits.max_image_bytes:
        raise _too_large_bytes(len(raw), limits, what)
    return raw


def _too_large_bytes(size: int, limits, what: str) -> ApiError:
    from .schema import FLAGS, MB

    return ApiError(413, "image_too_large", f"{what} has about {size / MB:,.1f} MB; this server reads images of at "
                                            f"most {limits.max_image_bytes / MB:,.1f} MB (qkv serve "
                                            f"{FLAGS['max_image_bytes']} N raises it); send a smaller file",
                    {"name": "max_image_bytes", "estimate": int(size), "limit": int(limits.max_image_bytes),
                     "flag": FLAGS["max_image_bytes"]})


def open_image_bytes(raw: bytes, limits, what: str = "'image'", before_decode: Optional[Callable] = None):
    """An image file's bytes -> a loaded PIL image (its first frame), its pixel count checked from
    the header before any pixel is decoded (413 image_too_large); 400 bad_image when Pillow
    cannot read it as a PNG, JPEG, BMP or GIF. `before_decode(width, height)`, when given, is
    called with the header's size before any pixel is decoded (the caller's cost check)."""
    from .schema import FLAGS

    try:
        from PIL import Image
    except ImportError:  # the web extra brings Pillow
        raise ApiError(500, "internal", "this server cannot read images: Pillow is not installed "
                                        "(pip install 'qkv[web]')") from None
    too_many = None
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)  # the header only
        width, height = img.size
        if width * height > limits.max_image_pixels:
            too_many = width * height
        else:
            if before_decode is not None:
                before_decode(width, height)
            img.load()
    except Image.DecompressionBombError:
        too_many = -1
    except ApiError:  # before_decode's refusal
        raise
    except Image.UnidentifiedImageError:
        raise ApiError(400, "bad_image", f"{what} is not an image this server reads; send a PNG, JPEG, BMP or "
                                         "GIF file") from None
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, ... per format
        why = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else type(exc).__name__
        raise ApiError(400, "bad_image", f"{what} could not be decoded ({why}); send a PNG, JPEG, BMP or GIF "
                                         "file") from None
    if too_many is not None:
        size = f" ({width}x{height}, {too_many:,} pixels)" if too_many > 0 else ""
        raise ApiError(413, "image_too_large", f"{what} has too many pixels{size}; this server reads images of at "
                                                f"most {limits.max_image_pixels:,} pixels (qkv serve "
                                                f"{FLAGS['max_image_pixels']} N raises it); send a smaller image",
                       {"name": "max_image_pixels", "estimate": max(too_many, 0),
                        "limit": int(limits.max_image_pixels), "flag": FLAGS["max_image_pixels"]})
    from ..models.images import upright

    return upright(img)  # as its EXIF orientation says, as an image file given to qkv explain


# --------------------------------------------------------------------------- costs
# Every request's cost is estimated before any work, from the tokenizer's count and the model's
# shape: the attention weights the model forms (tokens^2 x layers x heads), the bytes it holds
# at its peak (recorded q/k/v and masks, the forward's activations, the row chunks of the
# weights, the answer as Python objects and as JSON) and the bytes of the JSON answer. Over a
# limit: 413 too_costly, naming the estimate, the limit and the flag of `qkv serve` that raises it.

JSON_FLOAT = 9  # bytes of one weight in the JSON: "0.01234," (rounded to 5 decimals; qkv.inspect.rows)
PY_FLOAT = 32  # bytes of one float as a Python object in a list (24 + an 8-byte pointer)
CHUNK = 1 << 22  # weights formed at once by the core's row chunks (qkv.inspect.rows.CHUNK_ELEMENTS)


@dataclass(frozen=True)
class Cost:
    """A request's estimate. compute: attention weights formed; memory, answer: bytes."""

    tokens: int
    layers: int
    heads: int
    compute: int
    memory: int
    answer: int
    view: str  # "full" or "rows" (explain), "steps", "weights", "compare"

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.tokens + other.tokens, self.layers, self.heads, self.compute + other.compute,
                    self.memory + other.memory, self.answer + other.answer, "compare")

    def to_dict(self) -> dict:
        return {"tokens": self.tokens, "layers": self.layers, "heads": self.heads, "compute": self.compute,
                "memory_bytes": self.memory, "answer_bytes": self.answer, "view": self.view}


def _core():
    """The module qkv.inspect.explain (`qkv.inspect.explain` the name is the function)."""
    return importlib.import_module("qkv.inspect.explain")


def full_cells(layers: int, heads: int, units: int) -> int:
    return layers * heads * units * units


def default_view(layers: int, heads: int, units: int) -> str:
    """What rows="auto" ships: full maps while layers x heads x n x n <= FULL_CELLS, else rows."""
    return "full" if full_cells(layers, heads, units) <= _core().FULL_CELLS else "rows"


def explain_answer_bytes(units: int, layers: int, heads: int, view: str, rows: int = 1,
                         k: Optional[int] = None) -> int:
    """Estimated bytes of a to_dict answer (`qkv.inspect.explain.answer_bytes`; the model's name
    and the text are added by the caller). k: keys per shipped row of the compact view (default
    TOP_K; an image's rows ship every key)."""
    return int(_core().answer_bytes(units, layers, heads, view, rows=rows, k=_core().TOP_K if k is None else k))


def _answer_numbers(units: int, layers: int, heads: int, view: str, rows: int = 1, k: Optional[int] = None) -> int:
    """The numbers of a to_dict answer (each a Python float while the dict is built)."""
    per_head, k = layers * heads, _core().TOP_K if k is None else k
    if view == "full":
        return full_cells(layers, heads, units) + 2 * layers * units + per_head
    return 3 * layers * units + 3 * per_head + per_head * rows * (2 * k + 2)


def explain_cost(tokens: int, units: int, layers: int, heads: int, head_dim: int, hidden: int, *,
                 view: str, recorded_rows: int, shipped_rows: int = 1, shown_heads: Optional[int] = None,
                 passes: Optional[int] = None, k: Optional[int] = None) -> Cost:
    """The estimate of one explain of `tokens` tokens (`units` at the level shown) on a model of
    `layers` x `heads` heads of `head_dim`, `hidden` wide. recorded_rows: query rows recorded
    (tokens, or the focus word's); view: "full" or "rows"; shown_heads: 1 for rollout; passes:
    how many times every layer's weights are formed over all rows (default `layers`: once each;
    the compact view's rollout rows add layers (layers + 1) / 2, `rollout_passes`); k: keys per
    shipped row of the compact view (default TOP_K; every unit for an image)."""
    n, R = tokens, recorded_rows
    shown = heads if shown_heads is None else shown_heads
    recorded = layers * heads * ((R + 2 * n) * head_dim * 4 + n * 4)  # q, k, v, value norms (masks: on demand)
    forward = 24 * n * hidden * 4  # hidden states, q/k/v, the MLP's widening: linear in n
    chunk = min(R * n * heads, max(CHUNK, n * heads)) * 4 * 8  # scores, weights, logs, temporaries of a chunk
    answer = explain_answer_bytes(units, layers, shown, view, shipped_rows, k) + 4 * len_of_text_bytes(n)
    objects = _answer_numbers(units, layers, shown, view, shipped_rows, k) * PY_FLOAT + 2 * answer  # dict, JSON
    maps = full_cells(layers, heads, n) * 4 * 3 if view == "full" else 0  # stacked weights, merged, rounded
    passes = layers if passes is None else passes
    return Cost(tokens=n, layers=layers, heads=heads, compute=n * n * passes * heads,
                memory=recorded + forward + chunk + maps + objects, answer=answer, view=view)


def rollout_passes(layers: Sequence[int]) -> int:
    """Passes over every row that the rollout rows of `layers` cost: layer l's row is a product
    with the residual maps of layers l, l - 1, ..., 0 (`qkv.inspect.rows.rollout_rows`)."""
    return sum(layer + 1 for layer in layers)


def len_of_text_bytes(tokens: int) -> int:
    """The text in the answer, about (it is sent once more, escaped): a few bytes a token."""
    return 8 * tokens


def weights_cost(tokens: int, units: int, layers: int, heads: int, picked: int, method: str,
                 rollout_layers: Sequence[int] = ()) -> Cost:
    """The estimate of /api/weights: `picked` (layers x heads x rows) full rows of `units` keys,
    from recorded q/k (the rollout rows of `rollout_layers` need every row of the layers up to each,
    `rollout_passes`)."""
    numbers = picked * units
    answer = numbers * JSON_FLOAT + 8 * picked + 4096
    compute = (tokens * tokens * heads * rollout_passes(rollout_layers) if method == "rollout"
               else picked * tokens)
    work = min(tokens * tokens * heads, max(CHUNK, tokens * heads)) * 4 * 4 + picked * tokens * 4 * 4
    return Cost(tokens=tokens, layers=layers, heads=heads, compute=compute,
                memory=work + numbers * PY_FLOAT + 2 * answer, answer=answer, view="weights")


def check_cost(cost: Cost, limits) -> None:
    """413 too_costly when the estimate is over one of the server's limits (`qkv.web.schema.Limits`)."""
    from .schema import FLAGS, MB

    n, L, H = cost.tokens, cost.layers, cost.heads
    if cost.compute > limits.max_cost:
        what = (f"form {cost.compute:,} attention weights ({n:,} tokens squared x {L} layers x {H} heads)"
                if cost.view != "weights" else f"form {cost.compute:,} attention weights")
        message = (f"this request would make the model {what}; this server allows {limits.max_cost:,} per request "
                   f"(qkv serve --max-cost N raises it); shorten the text")
        name, estimate, limit = "max_cost", cost.compute, limits.max_cost
    elif cost.answer > limits.max_answer:
        hint = ("ask for fewer layers, heads or rows" if cost.view == "weights" else
                "leave rows at \"auto\" (a compact answer for long texts) or shorten the text")
        message = (f"the answer would be about {cost.answer / MB:,.1f} MB of JSON; this server sends at most "
                   f"{limits.max_answer / MB:,.0f} MB (qkv serve --max-answer-mb N raises it); {hint}")
        name, estimate, limit = "max_answer", cost.answer, limits.max_answer
    elif cost.memory > limits.max_memory:
        message = (f"this request would hold about {cost.memory / MB:,.0f} MB of memory; this server runs requests "
                   f"within {limits.max_memory / MB:,.0f} MB (qkv serve --max-memory-mb N raises it); shorten "
                   "the text")
        name, estimate, limit = "max_memory", cost.memory, limits.max_memory
    else:
        return
    raise ApiError(413, "too_costly", message, {"name": name, "estimate": int(estimate), "limit": int(limit),
                                                 "flag": FLAGS[name]})


def model_dims(model) -> tuple[int, int, int, int]:
    """(attention layers, query heads, head size, hidden size) of a qkv or transformers model."""
    from ..inspect.explain import model_shape

    layers, heads = model_shape(model)
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    hidden = getattr(config, "hidden_size", None) or getattr(config, "d_model", None) or 1024
    head_dim = getattr(config, "head_dim", None) or max(1, int(hidden) // max(1, heads))
    if getattr(model, "is_encoder_decoder", False):
        layers = max(layers, 1)
    return max(layers, 1), max(heads, 1), int(head_dim), int(hidden)


# --------------------------------------------------------------------------- cancellation


class Cancelled(Exception):
    """The client went away; the job stopped (the core's `qkv.inspect.capture.Cancelled` is one too)."""


def _core_cancellation():
    """(stopping, Cancelled) of the core (`qkv.inspect.capture`), or (None, None) before it has them."""
    from ..inspect import capture

    return getattr(capture, "stopping", None), getattr(capture, "Cancelled", None)


_job = threading.local()


def stop_requested() -> bool:
    """Whether the job running in this thread should stop (its client went away)."""
    stop = getattr(_job, "stop", None)
    return stop is not None and stop.is_set()


def checkpoint() -> None:
    """Raise Cancelled when this thread's job should stop: between the stages of a job (the
    core's recorder and chunk loops check within them, through `stopping`)."""
    if stop_requested():
        raise Cancelled("the client went away")


def run_stoppable(stop: threading.Event, fn: Callable[[], Any]) -> Any:
    """fn() in this worker thread, stopped (Cancelled) once `stop` is set: the core's recorder
    and chunk loops check it through `qkv.inspect.capture.stopping`, and the stages here between."""
    stopping, core_cancelled = _core_cancellation()
    _job.stop = stop
    try:
        checkpoint()
        if stopping is None:
            return fn()
        with stopping(stop.is_set):
            return fn()
    except Exception as exc:
        if core_cancelled is not None and isinstance(exc, core_cancelled) and not isinstance(exc, Cancelled):
            raise Cancelled(str(exc)) from None
        raise
    finally:
        _job.stop = None


# --------------------------------------------------------------------------- sessions


def result_nbytes(result) -> int:
    """Bytes the recorded tensors of an ExplainResult hold (its `nbytes` once the core has it)."""
    return int(result.nbytes)


class Sessions:
    """The recorded results of the last explains, by id, in an LRU bounded by bytes (`nbytes`):
    what POST /api/weights computes full rows from. Shared by the worker threads (a lock)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.used = 0
        self.evicted = 0
        self._items: OrderedDict[str, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result) -> Optional[str]:
        """Keep `result`; its id, or None when it alone is over the budget or is an encoder-decoder's
        (/api/weights serves one stack of layers). What the answer's views built and cached (full
        maps of a rollout, summaries) is dropped first: only the recorded tensors are counted and kept."""
        if getattr(result, "roles", None) is not None:
            return None
        result._cache.clear()
        size = result_nbytes(result)
        if size > self.max_bytes:
            return None
        sid = secrets.token_urlsafe(12)
        with self._lock:
            self._items[sid] = (result, size)
            self.used += size
            while self.used > self.max_bytes:
                _, (_, gone) = self._items.popitem(last=False)
                self.used -= gone
                self.evicted += 1
        return sid

    def get(self, sid: str):
        with self._lock:
            found = self._items.get(sid)
            if found is not None:
                self._items.move_to_end(sid)
        if found is None:
            raise ApiError(410, "session_expired", "this session is unknown or was evicted to make room for newer "
                                                   "ones: explain the text again (POST /api/explain) and use the "
                                                   "session it answers")
        return found[0]

    def stats(self) -> dict:
        with self._lock:
            return {"count": len(self._items), "bytes": self.used, "max_bytes": self.max_bytes,
                    "evicted": self.evicted}


# --------------------------------------------------------------------------- operations


@dataclass
class Plan:
    """A checked request: its estimate, and the job that answers it (run in a worker thread)."""

    cost: Cost
    run: Callable[[], dict]


@dataclass
class _Probe:
    model: Any
    name: str
    run_lock: Any
    probe: Any  # an ExplainResult without records: the tokens, words and units of the text (or image)
    dims: tuple[int, int, int, int]
    image: Any = None  # an image: (1, C, H, W) in [0, 1] at the model's size, what explain reads
    interpolate: bool = False  # an image: interpolate_pos_encoding


class Service:
    """The operations over a ModelRegistry. Each checks its request at once (cheap, on the event
    loop, so a bad request is answered even when the queue is full), returns a planner; the
    planner (a thread: it may load the model and tokenises) estimates the cost, refuses it over
    the limits and returns the Plan whose job runs in a worker thread:
    `service.explain(body)().run()` is the answer."""

    def __init__(self, registry: ModelRegistry, limits=None):
        from .schema import Limits

        self.registry = registry
        self.limits = limits if limits is not None else Limits()
        self.sessions = Sessions(self.limits.max_sessions)

    # ------------------------------------------------------------ shared pieces
    def _probe(self, text: str, model_name: str, field: str = "text") -> _Probe:
        """The text tokenised (no model run) and the model's shape; too many tokens -> 422."""
        from ..inspect.explain import prepare
        from ..inspect.foreign import is_transformers_model, max_tokens

        model, run_lock = self.registry.get(model_name)
        name = self.registry.entry(model_name).name
        tok = getattr(model, "tokenizer", None)
        limit = max_tokens(model, tok) if is_transformers_model(model) else getattr(tok, "max_length", None)
        if limit is not None:  # said here with the field's name (the library would suggest truncate=True)
            n = len(tok.encode(text))
            if n > limit:
                raise ApiError(422, "cannot_explain", f"{field!r} has {n} tokens but the model {name!r} "
                                                      f"takes at most {limit}; shorten it")
        try:
            probe, _ = prepare(text, model, name)
        except ValueError as exc:
            raise ApiError(422, "cannot_explain", str(exc)) from None
        return _Probe(model, name, run_lock, probe, model_dims(model))

    def check_input(self, req, *, images: bool = True) -> str:
        """The request's input against its model's modality, on the event loop (cheap: no model
        loaded): "text" or "image". 422 missing_field without one, 400 wrong_input for text to an
        image model or an image to a text model (or to compare, `images` False)."""
        entry = self.registry.entry(req.model)
        modality = self.registry.modality(entry.name)
        given = [f for f in ("text", "image", "sample") if getattr(req, f, None) is not None]
        if modality == "image" and not images:
            raise ApiError(400, "wrong_input", f"the model {entry.name!r} reads images, and compare takes two "
                                               "sentences; explain one image at a time with /api/explain")
        if not given:
            if modality == "image":
                raise ApiError(422, "missing_field", f"the model {entry.name!r} reads images: give 'image' (a data "
                                                     "URL of a PNG, JPEG, BMP or GIF file) or 'sample' (a name from "
                                                     f"GET /api/samples?model={entry.name})")
            from .schema import MISSING_TEXT

            raise ApiError(422, "missing_field", MISSING_TEXT)
        if len(given) > 1:
            raise ApiError(422, "bad_value", f"give one input: {' and '.join(repr(f) for f in given)} were both "
                                             "given ('text' for a text model, 'image' or 'sample' for an image model)")
        if modality == "image" and given == ["text"]:
            raise ApiError(400, "wrong_input", f"the model {entry.name!r} reads images, not text: send 'image' (a "
                                               "data URL of a PNG, JPEG, BMP or GIF file) or 'sample' (a name from "
                                               f"GET /api/samples?model={entry.name}), or pick a text model")
        if modality == "text" and given != ["text"]:
            images_offered = [e.name for e in self.registry.entries() if self.registry.modality(e.name) == "image"]
            pick = f" or pick an image model ({', '.join(images_offered)})" if images_offered else ""
            raise ApiError(400, "wrong_input", f"the model {entry.name!r} reads text, not images: send 'text'{pick}")
        if modality == "text" and (getattr(req, "image_name", None) is not None
                                   or getattr(req, "interpolate_pos_encoding", False)):
            field = "image_name" if getattr(req, "image_name", None) is not None else "interpolate_pos_encoding"
            raise ApiError(422, "bad_value", f"{field!r} is for an image model's 'image'; leave it out with 'text'")
        if given == ["sample"] and getattr(req, "image_name", None) is not None:
            raise ApiError(422, "bad_value", "'image_name' names an uploaded 'image'; a sample is named by 'sample'")
        return modality

    def sample(self, model_name: str, name: str) -> Sample:
        """A sample image of the model by its name: looked up in the model's list, never joined to a path."""
        found = {s.name: s for s in self.registry.samples(model_name, self.limits.max_image_bytes)}
        if name not in found:
            entry = self.registry.entry(model_name)
            offered = ", ".join(sorted(found)) or "none"
            raise ApiError(404, "unknown_sample", f"the model {entry.name!r} has no sample named {name[:80]!r}; its "
                                                  f"samples (GET /api/samples?model={entry.name}): {offered}")
        return found[name]

    def _input_probe(self, req, field: str = "text") -> _Probe:
        """`_probe` of the request's text, or `_image_probe` of its image or sample."""
        if getattr(req, "image", None) is None and getattr(req, "sample", None) is None:
            return self._probe(req.text, req.model, field)
        return self._image_probe(req)

    def _image_probe(self, req) -> _Probe:
        """The request's image decoded (sizes checked first) and read as the model reads it
        (`qkv.inspect.image.read_image`: its preprocessor's resize; 400 bad_image with the
        ImageError's line), and a probe of its units: the class token and the patches."""
        from ..inspect import image as _image
        from ..inspect.explain import image_probe
        from ..models.images import ImageError

        model, run_lock = self.registry.get(req.model)
        name = self.registry.entry(req.model).name
        if not _image.is_image_model(model):  # a folder that looked like a ViT but did not load as one
            raise ApiError(400, "wrong_input", f"the model {name!r} does not read images; send 'text'")
        if req.sample is not None:
            found = self.sample(name, req.sample)
            label, what = found.name, f"the sample {found.name!r}"
            raw = found.data
        else:
            label = req.image_name or "image"
            what = "'image'" if req.image_name is None else f"the image {req.image_name!r}"
            raw = decode_upload(req.image, self.limits, what)
        checkpoint()
        img = open_image_bytes(raw, self.limits, what, before_decode=lambda w, h: self._check_grid(
            model, name, w, h, req.interpolate_pos_encoding))
        checkpoint()
        try:
            shown, _, _ = _image.read_image(img, model, name, req.interpolate_pos_encoding)  # (1, C, H, W)
        except ImageError as exc:
            raise ApiError(400, "bad_image", str(exc).replace("the image", what, 1)) from None
        probe = image_probe(label, shown, model, name)
        return _Probe(model, name, run_lock, probe, model_dims(model), image=shown,
                      interpolate=req.interpolate_pos_encoding)

    def _check_grid(self, model, name: str, width: int, height: int, interpolate: bool) -> None:
        """Before an upload's pixels are decoded: with interpolated positions the patch grid follows
        the image's size, so the run's cost (every row, the view of its unit count) is checked on the
        grid the header's size gives (413 too_costly), and a huge grid never reaches the decoder."""
        if not interpolate:
            return  # the model's own size: the cost is the model's, checked on the probe
        from ..models.images import Preprocessor

        pre = getattr(model, "preprocessor", None) or Preprocessor.identity(model.config)
        h, w = (pre.height, pre.width) if pre.do_resize else (height, width)
        P = model.config.patch_size
        tokens = 1 + (h // P) * (w // P)
        layers, heads, head_dim, hidden = model_dims(model)
        cost = explain_cost(tokens, tokens, layers, heads, head_dim, hidden,
                            view=default_view(layers, heads, tokens), recorded_rows=tokens, shipped_rows=1, k=tokens)
        check_cost(cost, self.limits)

    def _explain(self, p: _Probe, *, focus=None, rows: str = "auto"):
        """Run the model (under its lock) and record; its result named as the server names it."""
        from ..inspect import explain
        from ..models.images import ImageError

        checkpoint()
        kwargs: dict = {"rows": rows}
        if rows == "focus":
            kwargs["focus"] = focus
        with p.run_lock:
            checkpoint()
            try:
                if p.image is not None:
                    result = explain(image=p.image, model=p.model, name=p.name,
                                     interpolate_pos_encoding=p.interpolate, **kwargs)
                else:
                    result = explain(p.probe.text, p.model, **kwargs)
            except ImageError as exc:  # not seen: the probe read the same image
                raise ApiError(400, "bad_image", str(exc)) from None
            except ValueError as exc:  # e.g. more tokens than the model has positions
                raise ApiError(422, "cannot_explain", str(exc)) from None
        result.model_name = p.name
        if p.image is not None:  # named as the request named it (a tensor is "image" to the core)
            result.text = result.image.name = p.probe.text
        checkpoint()
        return result

    @staticmethod
    def _unit_index(result, word: str | int, level: str, hide_special: bool) -> int:
        """The index at `level` (all units, specials included) of a word or a shown index."""
        labels, special, _ = result.units(level)
        if isinstance(word, int):
            shown = [i for i, s in enumerate(special) if not (hide_special and s)]
            if not 0 <= word < len(shown):
                raise ApiError(422, "unknown_word", f"word index {word} is out of range: the text has {len(shown)} "
                                                    f"{level}s{' (special tokens hidden)' if hide_special else ''}")
            return shown[word]
        try:
            return result.focus_index(word, level)
        except ValueError as exc:
            raise ApiError(422, "unknown_word", str(exc)) from None

    def _focus(self, probe, focus, level: str, hide_special: bool) -> Optional[int]:
        """The focus as a unit index at `level` (specials counted), checked on the probe."""
        if focus is None:
            return None
        index = self._unit_index(probe, focus, level, hide_special)
        _, special, _ = probe.units(level)
        if hide_special and special[index]:
            raise ApiError(422, "unknown_word", "the focus is a special token, and special tokens are hidden")
        return index

    def _explain_plan(self, p: _Probe, level: str, method: str, rows: str, focus: Optional[int],
                      hide_special: bool) -> Cost:
        """The cost of an explain, for the view it will have: the view is decided here, by the core's
        rule on the units shown (`ExplainResult.compact_view`), and `_to_dict` asks for that view."""
        layers, heads, head_dim, hidden = p.dims
        tokens = len(p.probe.tokens)
        _, special, _ = p.probe.units(level)
        units = sum(1 for s in special if not (hide_special and s))
        shown = 1 if method == "rollout" else heads
        seq2seq = bool(getattr(p.model, "is_encoder_decoder", False))
        if rows == "all" or seq2seq:  # an encoder-decoder's result always gives full maps
            view = "full"
        elif rows == "focus":
            view = "rows"
        else:
            view = default_view(layers, heads, units)
        recorded, shipped = tokens, 1
        if focus is not None and rows == "focus":
            word = self._word_unit(p.probe, focus, level)
            recorded = max(1, sum(1 for u in p.probe.units("word")[2] if u == word))  # the word's tokens
        if seq2seq:
            tokens, units = 2 * tokens, 2 * units  # the target is as long as the source, about
        passes = layers
        if method == "rollout":  # full: one pass for the maps; compact: the summaries, then every layer's rows
            passes = layers if view == "full" else layers + rollout_passes(range(layers))
        k = units if p.image is not None else None  # an image's compact rows ship every key
        return explain_cost(tokens, units, layers, heads, head_dim, hidden, view=view, recorded_rows=recorded,
                            shipped_rows=shipped, shown_heads=shown, passes=passes, k=k)

    @staticmethod
    def _word_unit(probe, unit: int, level: str) -> int:
        """The word-level unit index holding the unit `unit` at `level`."""
        if level == "word":
            return unit
        _, _, unit_of = probe.units("word")
        return unit_of[probe.units(level)[2].index(unit)]

    def _to_dict(self, result, method: str, level: str, hide_special: bool, focus: Optional[int],
                 view: str) -> dict:
        """The answer in the view the plan estimated (`_explain_plan`): "full" or "rows"."""
        checkpoint()
        options: dict = {"method": method, "level": level, "hide_special": hide_special, "focus": focus,
                         "rows": "all" if view == "full" else "focus"}
        try:
            return result.to_dict(**options)
        except ValueError as exc:
            raise ApiError(422, "cannot_explain", str(exc)) from None

    # ------------------------------------------------------------ operations
    def explain(self, req) -> Callable[[], Plan]:
        """`req`: an ExplainRequest (qkv.web.schema), already validated: a text, or for an image
        model an image or a sample."""
        modality = self.check_input(req)  # an unknown model or a wrong input is reported before any work
        focus_given = req.focus
        if req.rows == "focus" and focus_given is None:
            if modality != "image":
                raise ApiError(422, "bad_value", "'rows' \"focus\" needs a focus word (focus)")
            focus_given = "cls"  # as qkv.explain(image=...) does: the class token's row

        def plan() -> Plan:
            p = self._input_probe(req)
            focus = self._focus(p.probe, focus_given, req.level, req.hide_special)
            if req.rows == "focus" and req.method == "rollout":
                raise ApiError(422, "bad_value", "rollout needs every row of every layer: use rows \"auto\"")
            cost = self._explain_plan(p, req.level, req.method, req.rows, focus, req.hide_special)
            cost = _with_image(cost, p)
            check_cost(cost, self.limits)

            def run() -> dict:
                word_focus = None if focus is None else self._word_unit(p.probe, focus, req.level)
                result = self._explain(p, focus=word_focus, rows=req.rows)
                out = self._to_dict(result, req.method, req.level, req.hide_special, focus, cost.view)
                out["session"] = self.sessions.put(result)
                return out
            return Plan(cost, run)
        return plan

    def steps(self, req) -> Callable[[], Plan]:
        """`req`: a StepsRequest. Records only the word's rows: linear in the length. For an image
        model, the word is a patch ("r1c2") or the class token ("cls"), of the image or sample given."""
        self.check_input(req)

        def plan() -> Plan:
            loaded, _ = self.registry.get(req.model)
            if getattr(loaded, "is_encoder_decoder", False):
                raise ApiError(422, "not_supported",
                               f"the step-through follows one stack of layers (an encoder or a decoder); "
                               f"{self.registry.entry(req.model).name!r} is an encoder-decoder: see its attention "
                               "with /api/explain")
            p = self._input_probe(req)
            unit = self._unit_index(p.probe, req.word, req.level, req.hide_special)
            layers, heads, head_dim, hidden = p.dims
            if not 0 <= req.layer < layers:
                raise ApiError(422, "unknown_layer",
                               f"layer {req.layer} does not exist: the model has layers 0..{layers - 1}")
            if not 0 <= req.head < heads:
                raise ApiError(422, "unknown_head",
                               f"head {req.head} does not exist: the model has heads 0..{heads - 1}")
            tokens = len(p.probe.tokens)
            cost = explain_cost(tokens, tokens, layers, heads, head_dim, hidden, view="rows", recorded_rows=1)
            cost = Cost(tokens, layers, heads, cost.compute, cost.memory + tokens * head_dim * 2 * (PY_FLOAT + 40),
                        tokens * (2 * head_dim + 4) * JSON_FLOAT + 64 * tokens, "steps")
            cost = _with_image(cost, p)
            check_cost(cost, self.limits)

            def run() -> dict:
                _, _, unit_of = p.probe.units(req.level)
                token = unit_of.index(unit)
                word_unit = p.probe.units("word")[2][token]
                result = self._explain(p, focus=word_unit, rows="focus")
                checkpoint()
                return self._steps(result, p.probe.text, token, req.layer, req.head)
            return Plan(cost, run)
        return plan

    def _steps(self, result, text: str, token: int, layer: int, head: int) -> dict:
        s = result.steps(token, layer, head)
        dots = s.keys @ s.query  # (n,) q.k before the scale
        return {
            "format": "qkv.steps/1", "model": result.model_name, "text": text,
            "layer": layer, "head": head, "layers": result.num_layers, "heads": result.num_heads,
            "token": s.token, "token_label": s.labels[s.token], "labels": s.labels,
            "special": list(result.special), "scale": s.scale,
            "query": _floats(s.query), "keys": _floats(s.keys), "dots": _floats(dots),
            "scores": _floats(s.scores), "weights": _floats(s.weights),
            "values": _floats(s.values), "output": _floats(s.output),
        }

    def compare(self, req) -> Callable[[], Plan]:
        """`req`: a CompareRequest. Each side as explain with rows "auto" (compact when long), with
        its own session. Text models only (400 wrong_input for an image model)."""
        self.check_input(req, images=False)

        def plan() -> Plan:
            pa, pb = self._probe(req.text, req.model), self._probe(req.other, req.model, "other")
            focus = self._focus(pa.probe, req.focus, req.level, req.hide_special)
            b_focus = req.focus
            if isinstance(b_focus, str):
                try:
                    pb.probe.focus_index(b_focus, req.level)
                except ValueError:
                    b_focus = None  # the word is not in the other sentence: show it without a focus
            if isinstance(b_focus, int) and not 0 <= b_focus < len(pb.probe.labels(req.level, req.hide_special)):
                b_focus = None
            b_index = self._focus(pb.probe, b_focus, req.level, req.hide_special) if b_focus is not None else None
            cost_a = self._explain_plan(pa, req.level, req.method, "auto", focus, req.hide_special)
            cost_b = self._explain_plan(pb, req.level, req.method, "auto", b_index, req.hide_special)
            cost = cost_a + cost_b
            check_cost(cost, self.limits)
            return Plan(cost, lambda: self._compare(pa, pb, req, focus, b_index, (cost_a.view, cost_b.view)))
        return plan

    def _compare(self, pa: _Probe, pb: _Probe, req, focus: Optional[int], b_focus: Optional[int],
                 views: tuple[str, str]) -> dict:
        level, hide = req.level, req.hide_special
        a = self._explain(pa)
        out_a = self._to_dict(a, req.method, level, hide, focus, views[0])
        out_a["session"] = self.sessions.put(a)
        b = self._explain(pb)
        out_b = self._to_dict(b, req.method, level, hide, b_focus, views[1])
        out_b["session"] = self.sessions.put(b)
        out: dict = {"format": "qkv.compare/1", "a": out_a, "b": out_b, "same_length": False, "jsd": None,
                     "largest": None, "note": None}
        na, nb = len(a.labels(level)), len(b.labels(level))
        out["same_length"] = na == nb
        if na != nb:
            out["note"] = (f"the sentences have {na} and {nb} {level}s; the per-head divergence needs the same "
                           "number, e.g. one word swapped")
        elif focus is not None:
            checkpoint()
            jsd = _focus_jsd(a, b, focus, level)  # (L, H) bits
            out["jsd"] = _floats(jsd)
            flat = int(jsd.flatten().argmax())
            layer, head = divmod(flat, jsd.shape[1])
            out["largest"] = {"layer": layer, "head": head, "jsd": float(jsd[layer, head])}
        else:
            out["note"] = "give a focus word to see how its attention changes (Jensen-Shannon divergence per head)"
        return out

    def weights(self, req) -> Callable[[], Plan]:
        """`req`: a WeightsRequest: full rows of a session's recorded result."""
        from .schema import FLAGS

        for name in ("rows", "layers", "heads"):
            picked = getattr(req, name)
            if picked is not None and len(picked) > self.limits.max_pick:
                raise ApiError(413, "too_costly", f"{name!r} names {len(picked)} {name}; this server sends at most "
                                                  f"{self.limits.max_pick} per request (ask again for the rest)",
                               {"name": "max_pick", "estimate": len(picked), "limit": self.limits.max_pick,
                                "flag": FLAGS["max_pick"]})
            if picked is not None and not picked:
                raise ApiError(422, "bad_value", f"{name!r} is empty; give at least one index, or leave it out")

        def plan() -> Plan:
            result = self.sessions.get(req.session)
            labels, special, _ = result.units(req.level)
            n = sum(1 for s in special if not (req.hide_special and s))
            L, H = result.num_layers, result.num_heads
            layers = list(range(L)) if req.layers is None else list(req.layers)
            if req.method == "rollout" and req.heads is not None:
                raise ApiError(422, "bad_value", "'heads' must be left out with method rollout: it averages the "
                                                 "heads first (one map, head \"rollout\")")
            heads_all = [int(h) for h in result.records[0].heads]
            heads = heads_all if req.heads is None else list(req.heads)
            for name, picked, have in (("layer", layers, range(L)), ("head", heads, heads_all),
                                       ("row", req.rows, range(n))):
                wrong = [i for i in picked if i not in have]
                if wrong:
                    what = {"layer": f"layers 0..{L - 1}", "head": f"heads {heads_all[0]}..{heads_all[-1]}",
                            "row": f"{n} {req.level}s" + (" (special tokens hidden)" if req.hide_special else "")}
                    raise ApiError(422, f"unknown_{name}", f"{name} {wrong[0]} does not exist: the "
                                                           f"{'model' if name != 'row' else 'text'} has {what[name]}")
            shown = 1 if req.method == "rollout" else len(heads)
            cost = weights_cost(len(result.tokens), n, L, H, len(layers) * shown * len(req.rows), req.method,
                                layers)
            check_cost(cost, self.limits)

            def run() -> dict:
                checkpoint()
                try:
                    out = result.weights_dict(list(req.rows), layers=layers,
                                              heads=None if req.method == "rollout" else heads, method=req.method,
                                              level=req.level, hide_special=req.hide_special)
                except ValueError as exc:
                    raise ApiError(422, "cannot_explain", str(exc)) from None
                out["session"] = req.session
                return out
            return Plan(cost, run)
        return plan


def _with_image(cost: Cost, p: _Probe) -> Cost:
    """The cost with an image's pixels added to its memory: the picture (float32), its
    normalised copy and the PNG written for the answer."""
    if p.image is None:
        return cost
    pixels = int(p.image.numel())
    return Cost(cost.tokens, cost.layers, cost.heads, cost.compute, cost.memory + 16 * pixels,
                cost.answer + 2 * pixels, cost.view)


def _focus_jsd(a, b, focus: int, level: str):
    """(L, H) Jensen-Shannon divergence (bits) of the focus rows of two results of one length,
    from the rows alone (focus_rows: a chunk of rows from the recorded q/k, linear in the length)."""
    from ..inspect import analysis

    return analysis.jensen_shannon(a.focus_rows(focus, "raw", level), b.focus_rows(focus, "raw", level))


def _floats(t) -> Any:
    """Nested lists of floats; -inf / nan (a masked score) become null, which JSON can hold."""
    def clean(x):
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x if math.isfinite(x) else None

    return clean(t.double().tolist())


def check_limits(limits: Mapping[str, int]) -> None:
    for name, value in limits.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")
