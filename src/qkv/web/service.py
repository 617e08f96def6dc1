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

import logging
import math
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

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


def _load_for_explain(key: str):
    """qkv's own model, or a transformers model for an architecture qkv does not run natively
    (`qkv.models.loading.load_for_explain`), which is logged."""
    from ..models.loading import load_for_explain

    return load_for_explain(key, note=lambda line: log.warning("%s", line))


def check_model_folder(folder: Path) -> Optional[str]:
    """Why `qkv.load` would refuse this model folder, found without reading its weights; None if
    it looks loadable. Checks: config.json is readable JSON naming an architecture qkv runs,
    with the fields that architecture needs; safetensors weights are there and their headers
    readable; tokenizer files are there (explain needs them). An architecture qkv has no native
    implementation of is offered through transformers when transformers is installed and the folder
    is not an encoder-decoder (`check_foreign_folder`; logged), else skipped with the reason (how to
    install transformers). Not checked: that the weights' keys and shapes fit config.json (that
    needs the model built); a folder failing only that is found on first use (500
    model_unavailable, then no longer offered)."""
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


# --------------------------------------------------------------------------- operations


class Service:
    """The three operations over a ModelRegistry. Each checks its request at once (cheap, on
    the event loop, so a bad request is answered even when the queue is full) and returns the
    job to run in a worker thread: `service.explain(body)()` is the answer."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry

    # ------------------------------------------------------------ shared pieces
    def _explain(self, text: str, model_name: str, field: str = "text"):
        from ..inspect import explain
        from ..inspect.foreign import is_transformers_model, max_tokens

        model, run_lock = self.registry.get(model_name)
        tok = getattr(model, "tokenizer", None)
        limit = max_tokens(model, tok) if is_transformers_model(model) else getattr(tok, "max_length", None)
        if limit is not None:  # said here with the field's name (the library would suggest truncate=True)
            n = len(tok.encode(text))
            if n > limit:
                raise ApiError(422, "cannot_explain", f"{field!r} has {n} tokens but the model "
                                                      f"{self.registry.entry(model_name).name!r} "
                                                      f"takes at most {limit}; shorten it")
        with run_lock:
            try:
                result = explain(text, model)
            except ValueError as exc:  # e.g. more tokens than the model has positions
                raise ApiError(422, "cannot_explain", str(exc)) from None
        result.model_name = self.registry.entry(model_name).name
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

    def _to_dict(self, result, method: str, level: str, hide_special: bool, focus) -> dict:
        if focus is not None:
            index = self._unit_index(result, focus, level, hide_special)
            _, special, _ = result.units(level)
            if hide_special and special[index]:
                raise ApiError(422, "unknown_word", "the focus is a special token, and special tokens are hidden")
            focus = index
        try:
            return result.to_dict(method=method, level=level, hide_special=hide_special, focus=focus)
        except ValueError as exc:
            raise ApiError(422, "cannot_explain", str(exc)) from None

    # ------------------------------------------------------------ operations
    def explain(self, req) -> Callable[[], dict]:
        """`req`: an ExplainRequest (qkv.web.schema), already validated."""
        self.registry.entry(req.model)  # an unknown model is reported before any work

        def run() -> dict:
            result = self._explain(req.text, req.model)
            return self._to_dict(result, req.method, req.level, req.hide_special, req.focus)
        return run

    def steps(self, req) -> Callable[[], dict]:
        """`req`: a StepsRequest."""
        self.registry.entry(req.model)
        return lambda: self._steps(req.text, req.model, req.word, req.layer, req.head, req.level, req.hide_special)

    def _steps(self, text, model, word, layer, head, level, hide) -> dict:
        loaded, _ = self.registry.get(model)
        if getattr(loaded, "is_encoder_decoder", False):
            raise ApiError(422, "not_supported",
                           f"the step-through follows one stack of layers (an encoder or a decoder); "
                           f"{self.registry.entry(model).name!r} is an encoder-decoder: see its attention "
                           "with /api/explain")
        result = self._explain(text, model)
        unit = self._unit_index(result, word, level, hide)
        _, _, unit_of = result.units(level)
        token = unit_of.index(unit)
        if not 0 <= layer < result.num_layers:
            raise ApiError(422, "unknown_layer",
                           f"layer {layer} does not exist: the model has layers 0..{result.num_layers - 1}")
        if not 0 <= head < result.num_heads:
            raise ApiError(422, "unknown_head",
                           f"head {head} does not exist: the model has heads 0..{result.num_heads - 1}")
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

    def compare(self, req) -> Callable[[], dict]:
        """`req`: a CompareRequest."""
        self.registry.entry(req.model)
        return lambda: self._compare(req.text, req.other, req.model, req.focus, req.method, req.level,
                                     req.hide_special)

    def _compare(self, text, other, model, focus, method, level, hide) -> dict:
        a, b = self._explain(text, model), self._explain(other, model, "other")
        out: dict = {"format": "qkv.compare/1", "a": self._to_dict(a, method, level, hide, focus),
                     "b": None, "same_length": False, "jsd": None, "largest": None, "note": None}
        b_focus = focus
        if focus is not None and isinstance(focus, str):
            try:
                b.focus_index(focus, level)
            except ValueError:
                b_focus = None  # the word is not in the other sentence: show it without a focus
        if isinstance(focus, int) and not 0 <= focus < len(b.labels(level, hide)):
            b_focus = None
        out["b"] = self._to_dict(b, method, level, hide, b_focus)
        na, nb = len(a.labels(level)), len(b.labels(level))
        out["same_length"] = na == nb
        if na != nb:
            out["note"] = (f"the sentences have {na} and {nb} {level}s; the per-head divergence needs the same "
                           "number, e.g. one word swapped")
        elif focus is not None:
            index = self._unit_index(a, focus, level, hide)
            cmp = a.compare(b, index, level)
            jsd = cmp["jsd"]  # (L, H) bits
            out["jsd"] = _floats(jsd)
            flat = int(jsd.flatten().argmax())
            layer, head = divmod(flat, jsd.shape[1])
            out["largest"] = {"layer": layer, "head": head, "jsd": float(jsd[layer, head])}
        else:
            out["note"] = "give a focus word to see how its attention changes (Jensen-Shannon divergence per head)"
        return out


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
