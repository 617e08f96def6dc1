"""Reading Hugging Face checkpoint folders: JSON files, safetensors headers and weights, key by key.

A folder is read, never executed: weights come only from `.safetensors` files (one file, or
shards listed in `model.safetensors.index.json`, each a file inside the folder). Pickle
checkpoints (`pytorch_model.bin`, `*.pt`, `*.ckpt`) are refused with an explanation, since
unpickling can run arbitrary code. Every JSON file of a folder is read by `read_json`, so a
broken one is one `ModelError` that names it.

Each architecture describes its checkpoint with one pure function `hf_plan(config)`:
for every parameter of the qkv module, the checkpoint keys it is made of (concatenated on
dim 0 for fused projections), their shapes, and whether they are stored transposed (GPT-2's
Conv1D) or with their rows grouped otherwise (GPT-NeoX's per-head fused projection).
`check_plan` compares the plan with the safetensors headers (every planned key exists with its
exact shape and a floating-point dtype, every key of the checkpoint is used) before anything
is allocated, and `load_weights` copies.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable, Mapping, NamedTuple, Optional, Sequence

import torch
from torch import nn


class ModelError(ValueError):
    """A model folder or its contents cannot be used; the message says why and how to fix it."""


class CheckpointError(ModelError):
    """A checkpoint key is missing, misshapen, unexpected or not floating point, or the weights
    are not safetensors."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# safetensors dtype names of the weights qkv copies; integer, bool and float8 tensors are
# quantized or packed data whose meaning needs scales qkv does not apply.
FLOAT_DTYPES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


class Dim(int):
    """A planned size taken straight from one config field, so a mismatch can name the field.

    Behaves as the int it is; arithmetic on it gives plain ints (a product of two fields names
    neither).
    """

    field: str

    def __new__(cls, value: int, field: str) -> "Dim":
        obj = super().__new__(cls, value)
        obj.field = field
        return obj


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor that goes into a qkv parameter.

    key: name in the checkpoint; shape: its shape there (entries may be `Dim`s naming their
    config field); transpose: stored (in, out) as GPT-2's Conv1D, so it is transposed into
    nn.Linear's (out, in); regroup: (a, b) when the rows (dim 0, after any transpose) are
    stored as a groups of b blocks and qkv wants b groups of a blocks (`regroup_rows`):
    GPT-NeoX stores its fused projection per head, [q_h | k_h | v_h] for h = 0..H-1, and
    qkv's fused `qkv_proj` holds [q | k | v], so regroup=(H, 3).
    index: the piece is `stored[index]` (ints and slices), a part of the
    stored tensor, e.g. one expert's rows of transformers 5's stacked expert tensors
    (mixtral.py); () = the whole tensor. `shape` is always the whole stored shape.
    """

    key: str
    shape: tuple[int, ...]
    transpose: bool = False
    regroup: Optional[tuple[int, int]] = None
    index: tuple = ()


# A plan: qkv parameter name -> pieces, concatenated along dim 0 after any transpose (and regroup).
Plan = Mapping[str, tuple[Piece, ...]]


def regroup_rows(t: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """Rows (dim 0) of t stored as (a, b, n) blocks -> (b, a, n): row (i, j, r) moves to (j, i, r).

    regroup_rows(t, b, a) undoes it. t: (a * b * n, ...) -> the same shape.
    """
    rest = t.shape[1:]
    blocks = t.reshape(a, b, -1, *rest)  # (a, b, n, ...)
    return blocks.transpose(0, 1).reshape(t.shape)  # (b, a, n, ...) -> (a * b * n, ...)


class Stored(NamedTuple):
    """What a safetensors header says about one key: shape, the file holding it, and its dtype
    name ("F32", "BF16", "I64", "BOOL", ...)."""

    shape: tuple[int, ...]
    path: Path
    dtype: str = "F32"


def json_type(value) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if value is None:
        return "null"
    return {dict: "an object", list: "an array", str: "a string", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__)


def read_json(path: Path, expect: type = dict, *, fix: str = "restore the file from the model's source"):
    """A JSON file of a model folder, parsed; any problem is a ModelError naming the file.

    Args:
        path: the file (it must exist; callers decide whether a missing file matters).
        expect: the type the top level must have (dict for an object, list for an array).
        fix: what the message tells the user to do.

    Raises:
        ModelError for unreadable bytes, text that is not UTF-8, invalid JSON, or another
        top-level type.
    """
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ModelError(f"{path} cannot be read ({exc.strerror or exc}); {fix}") from None
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark is harmless; anything else must be UTF-8
    except UnicodeDecodeError as exc:
        raise ModelError(
            f"{path} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); JSON files of a "
            f"model folder are UTF-8: {fix}"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(
            f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}); {fix}"
        ) from None
    except RecursionError:
        raise ModelError(f"{path} nests too deeply to be a model file; {fix}") from None
    if not isinstance(value, expect):
        want = "an object ({...})" if expect is dict else "an array ([...])" if expect is list else expect.__name__
        raise ModelError(f"{path} must hold {want} at the top level; it holds {json_type(value)}; {fix}")
    return value


def inside_folder(name) -> bool:
    """Whether a file name from a folder's own JSON (a shard, a module path) stays inside the
    folder: relative, no `..`, no drive. Checked on the text alone, without touching the disk,
    so a name aimed elsewhere is never opened; symlinks inside the folder (the Hugging Face
    cache's layout) are the folder's own business."""
    if not isinstance(name, str) or "\x00" in name:
        return False
    posix, windows = PurePosixPath(name.replace("\\", "/")), PureWindowsPath(name)
    return not (posix.is_absolute() or windows.drive or windows.root or ".." in posix.parts)


def resolve_folder(path) -> Path:
    """Check that `path` is a folder holding config.json; return it as a Path."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} does not exist; pass the path of a Hugging Face model folder "
            f"(config.json, model.safetensors, tokenizer.json) or a bundled name such as 'minilm'"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is a file, not a model folder; "
                                "pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} has no config.json; a Hugging Face model folder needs config.json "
            f"next to its weights (save one with model.save_pretrained(folder))"
        )
    return folder


# ------------------------------------------------------------------ Hugging Face Hub ids

# "org/name" as the Hub spells repository ids (huggingface_hub's validate_repo_id: word
# characters, '-' and '.', at most 96 each side, no "--" or ".."); qkv asks for the owner.
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")
# the files of a repository qkv reads, by name (huggingface_hub matches with fnmatch, whose `*`
# also crosses "/": broad patterns would take every subfolder's copies, code and pickles):
# config, generation config, tokenizer files, safetensors weights (one file or shards and their
# index) and sentence-transformers' pooling files. Never pickles, never code (HUB_REFUSED).
HUB_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "added_tokens.json", "vocab.txt", "vocab.json", "merges.txt",
             "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
             "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
             "modules.json", "sentence_bert_config.json", "config_sentence_transformers.json", "*_Pooling/config.json")
# never fetched, even where a name above would match (a pattern's `*` crossing into a subfolder)
HUB_REFUSED = ("*.py", "*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.ckpt", "*.h5", "*.msgpack", "*.onnx",
               "*.gguf", "*/model*.safetensors", "*/tokenizer*")
_TRUE = {"1", "on", "yes", "true"}


def is_hub_id(text) -> bool:
    """Whether `text` has the form of a Hub repository id, "org/name"."""
    return (isinstance(text, str) and HUB_ID.fullmatch(text) is not None and "--" not in text
            and ".." not in text and not text.endswith((".", "-")))


def hub_offline() -> bool:
    """Offline mode as transformers sees it: huggingface_hub's HF_HUB_OFFLINE (read from
    HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE when huggingface_hub is imported), or either
    variable set since."""
    from huggingface_hub import constants

    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return bool(constants.HF_HUB_OFFLINE) or (env or "").strip().lower() in _TRUE


def hub_cache() -> str:
    """The Hugging Face cache folder: HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else HF_HOME/hub, read
    now (so a variable set after huggingface_hub's import counts), else huggingface_hub's default."""
    from huggingface_hub import constants

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expandvars(os.path.expanduser(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expandvars(os.path.expanduser(os.environ["HF_HOME"])), "hub")
    return constants.HF_HUB_CACHE


def resolve_hub_id(repo_id: str, *, local_files_only: bool = False) -> Path:
    """The local snapshot folder of the Hub repository `repo_id` ("org/name"), through
    `huggingface_hub.snapshot_download` with only the files qkv reads (`HUB_FILES`).

    From the cache alone when offline mode is on (`hub_offline`) or `local_files_only`; else
    huggingface_hub checks the Hub for the newest revision and downloads what is missing, as
    transformers' `from_pretrained` does.

    Raises:
        FileNotFoundError: not cached and offline (or the Hub unreachable), or no such repository;
            the message names the id, the cache, and how to fetch it.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:  # a LocalEntryNotFoundError raised for a partly cached snapshot (recent huggingface_hub only)
        from huggingface_hub.errors import IncompleteSnapshotError
    except ImportError:
        IncompleteSnapshotError = None
    cache = hub_cache()
    offline = hub_offline()
    where = f"no folder {repo_id!r} here ({os.getcwd()})"
    fetch = (f"fetch it once with network access (`hf download {repo_id}`"
             f"{', or run without HF_HUB_OFFLINE' if offline else ''}), or pass the path of a local model folder")
    try:
        path = snapshot_download(repo_id, cache_dir=cache, allow_patterns=list(HUB_FILES),
                                 ignore_patterns=list(HUB_REFUSED), local_files_only=offline or local_files_only)
    except LocalEntryNotFoundError as exc:
        if IncompleteSnapshotError is not None and isinstance(exc, IncompleteSnapshotError):
            raise FileNotFoundError(f"{where}, and the Hugging Face cache ({cache}) holds only part of the Hub "
                                    f"model {repo_id!r}; {fetch}") from None
        why = ("offline mode is on (HF_HUB_OFFLINE)" if offline else "local_files_only=True" if local_files_only
               else f"the Hub could not be reached ({type(exc.__cause__ or exc).__name__})")
        raise FileNotFoundError(f"{where}, and the Hub model {repo_id!r} is not in the Hugging Face cache "
                                f"({cache}) and {why}; {fetch}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{where}, and no model {repo_id!r} on the Hugging Face Hub (or it is "
                                "private or gated: log in with `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise OSError(f"the Hugging Face Hub refused {repo_id!r}: {str(exc).splitlines()[0]}") from None
    return Path(path)


def read_config(folder: Path) -> dict:
    """config.json as a dict (see `read_json` for the errors)."""
    return read_json(folder / "config.json")


INDEX = "model.safetensors.index.json"


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder's weights, or an error explaining what is there instead.

    A sharded folder's index must map every weight name to a `.safetensors` file inside the
    folder; a name that leaves it (absolute, `..`) is refused without being opened.
    """
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / INDEX
    if index.is_file():
        return _shards(folder, index)
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if others:
        return [folder / name for name in others]
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"model folder {str(folder)!r} holds only pickle checkpoints ({', '.join(pickles)}); qkv loads "
            f"safetensors only, because unpickling a file can run arbitrary code. Convert it once where you "
            f"trust the file: `from transformers import AutoModel; AutoModel.from_pretrained(folder)"
            f".save_pretrained(folder, safe_serialization=True)`, or with safetensors.torch.save_file on "
            f"torch.load(path, weights_only=True)"
        )
    raise FileNotFoundError(
        f"model folder {str(folder)!r} has no weights: expected model.safetensors (or "
        f"{INDEX} with its shards)"
    )


def _shards(folder: Path, index: Path) -> list[Path]:
    fix = "restore the index from the model's source (save_pretrained writes it next to the shards)"
    weight_map = read_json(index, fix=fix).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        got = ("is missing" if weight_map is None
               else f"is {json_type(weight_map)}" + (" with no entries" if weight_map in ({}, []) else ""))
        raise ModelError(
            f"{index}: field 'weight_map' {got}; it must be an object mapping each weight name to its shard "
            f"file, e.g. {{\"lm_head.weight\": \"model-00001-of-00002.safetensors\"}}; {fix}"
        )
    names = set()
    for key, name in weight_map.items():
        where = f"{index}: field 'weight_map' entry {key!r}"
        if not isinstance(name, str) or not name:
            raise ModelError(f"{where} is {json_type(name)}; it must be the file name of a shard; {fix}")
        if not inside_folder(name):
            raise ModelError(
                f"{where} points outside the model folder ({name!r}); shards must be files inside the "
                f"folder, e.g. 'model-00001-of-00002.safetensors'. qkv did not open it; {fix}"
            )
        if not name.endswith(".safetensors"):
            raise CheckpointError(
                f"{where} names {name!r}, which is not a .safetensors file; qkv reads weights from "
                f"safetensors only; {fix}"
            )
        names.add(name)
    files = sorted(folder / name for name in names)
    missing = [str(p.relative_to(folder)) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{index.name} in {str(folder)!r} lists shard(s) that are not there: {', '.join(missing)}; "
            f"download every shard into the folder"
        )
    return files


def read_shapes(files: Iterable[Path]) -> dict[str, Stored]:
    """Every key of the safetensors files -> Stored(shape, file, dtype), from the headers alone."""
    from safetensors import safe_open

    out: dict[str, Stored] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    out[key] = Stored(tuple(s.get_shape()), path, s.get_dtype())
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); download it again") from None
    return out


def _fmt(shape) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def _listed(items: Sequence[str], n: int = 8, sep: str = ", ") -> str:
    return sep.join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def check_layers(layers: Iterable[tuple[str, int, str]], shapes: Mapping[str, tuple], source="config.json") -> None:
    """Compare each layer count of the config with the layers the checkpoint's keys hold.

    Runs before a plan is built, so a count far beyond the weights (n_layer: 10000000) fails
    at once instead of planning millions of layers.

    Args:
        layers: (config field, its value, key prefix followed by the layer index), e.g.
            ("num_hidden_layers", 12, "model.layers.").
        shapes: from `read_shapes`.
        source: the config file, for the message.
    """
    for field, count, prefix in layers:
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
        if count != len(found):
            held = (f"{len(found)} layer(s) ({prefix}0 to {prefix}{max(found)})" if found
                    else f"no {prefix}<i>. keys")
            fix = f"set {field} to {len(found)}" if found else "check that these weights belong to this config"
            raise CheckpointError(
                f"{source}: {field}={count}, but the checkpoint holds {held}; {fix}, or use the config.json "
                f"that belongs to these weights"
            )


def check_plan(plan: Plan, shapes: Mapping[str, tuple], model: Optional[nn.Module] = None, *,
               ignored: Optional[Mapping[str, tuple]] = None, source="config.json") -> None:
    """Raise CheckpointError naming any missing, misshapen, non-float or unused key.

    Works on headers alone, so it runs before the model is allocated. Where a misshapen size
    comes straight from a config field (a `Dim`), the message names the field and the value
    the weights hold.

    Args:
        plan: from the architecture's `hf_plan`.
        shapes: checkpoint key -> Stored(shape, file, dtype) from `read_shapes`.
        model: the module whose parameters the plan fills; if given, every parameter must be planned.
        ignored: checkpoint keys that are buffers, not weights (e.g. BERT's position_ids),
            key -> expected shape; accepted (and shape-checked) but not copied.
        source: the config file, for the message.
    """
    if model is not None:
        unplanned = sorted(set(dict(model.named_parameters())) - set(plan))
        if unplanned:  # a bug in qkv, not in the checkpoint
            raise RuntimeError(f"internal: no checkpoint plan for parameters {unplanned}")
    missing, misshapen, not_float = [], [], []
    fields: dict[str, dict] = {}  # config field -> {"config": value, "weights": {sizes}}
    for pieces in plan.values():
        for piece in pieces:
            stored = shapes.get(piece.key)
            if stored is None:
                missing.append(piece.key)
                continue
            shape = tuple(stored[0])
            if shape != tuple(piece.shape):
                misshapen.append(f"{piece.key}: checkpoint {_fmt(shape)}, model expects {_fmt(piece.shape)}")
                if len(shape) == len(piece.shape):
                    for want, have in zip(piece.shape, shape):
                        if isinstance(want, Dim) and want != have:
                            fields.setdefault(want.field, {"config": int(want), "weights": set()})["weights"].add(have)
            dtype = stored[2] if len(stored) > 2 else "F32"
            if dtype not in FLOAT_DTYPES:
                not_float.append(f"{piece.key} ({dtype} in {stored[1]})")
    ignored = dict(ignored or {})
    for key, shape in ignored.items():
        if key in shapes and shape is not None and tuple(shapes[key][0]) != tuple(shape):
            misshapen.append(f"{key}: checkpoint {_fmt(shapes[key][0])}, model expects {_fmt(shape)}")
    used = {p.key for pieces in plan.values() for p in pieces} | set(ignored)
    unused = sorted(set(shapes) - used)
    if not_float:
        raise CheckpointError(
            f"the checkpoint holds weights that are not floating point: {_listed(not_float)}; qkv loads "
            f"{', '.join(FLOAT_DTYPES.values())} weights only (integer, bool and float8 tensors are quantized "
            f"or packed data); use the model's unquantized safetensors"
        )
    problems = []
    for f, v in fields.items():
        problems.append(f"{f}={v['config']} but the weights hold {' or '.join(str(w) for w in sorted(v['weights']))}")
    if missing:
        problems.append(f"missing key(s) {_listed(missing)}")
    if misshapen:
        problems.append(f"misshapen key(s) {_listed(misshapen, sep='; ')}")
    if unused:
        problems.append(f"unused key(s) {_listed(unused)}")
    if problems:
        settable = [f"{f} to {next(iter(v['weights']))}" for f, v in fields.items() if len(v["weights"]) == 1]
        fix = (f"Set {', '.join(settable)} if these weights are right, or use" if settable else
               "Check that config.json belongs to these weights (sizes, layer count, architecture), or use")
        raise CheckpointError(
            f"the checkpoint does not match {source}: " + "; ".join(problems)
            + f". {fix} the config.json saved with these weights"
        )


def load_weights(model: nn.Module, plan: Plan, shapes: Mapping[str, tuple], *,
                 ignored: Optional[Mapping[str, tuple]] = None, source="config.json") -> None:
    """Check the plan against the checkpoint (see `check_plan`), then copy every tensor in."""
    from safetensors import safe_open

    check_plan(plan, shapes, model, ignored=ignored, source=source)
    params = dict(model.named_parameters())
    paths = {stored[1] for stored in shapes.values()}
    handles = {path: safe_open(str(path), framework="pt") for path in paths}
    with torch.no_grad():
        for name, pieces in plan.items():
            parts = []
            for piece in pieces:
                handle = handles[shapes[piece.key][1]]
                # a part is read on its own (safetensors slices the file), not the whole tensor
                t = handle.get_slice(piece.key)[piece.index] if piece.index else handle.get_tensor(piece.key)
                t = t.t() if piece.transpose else t
                parts.append(regroup_rows(t, *piece.regroup) if piece.regroup else t)
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            param = params[name]
            if value.shape != param.shape:
                raise RuntimeError(f"internal: plan for {name} gives {_fmt(value.shape)}, "
                                   f"parameter is {_fmt(param.shape)}")
            param.copy_(value)


def find_in_folder(folder: Path, *names: str) -> Optional[Path]:
    """The first of `names` that exists in the folder, or None."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None
