"""Reading Hugging Face checkpoint folders: config.json and safetensors weights, key by key.

A folder is read, never executed: weights come only from `.safetensors` files (one file, or
shards listed in `model.safetensors.index.json`). Pickle checkpoints (`pytorch_model.bin`,
`*.pt`, `*.ckpt`) are refused with an explanation, since unpickling can run arbitrary code.

Each architecture describes its checkpoint with one pure function `hf_plan(config)`:
for every parameter of the qkv module, the checkpoint keys it is made of (concatenated on
dim 0 for fused projections), their shapes, and whether they are stored transposed (GPT-2's
Conv1D). `load_weights` then checks that every planned key exists with its exact shape, that
every key of the checkpoint is used, and copies.
"""

from __future__ import annotations

import json

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Optional

import torch
from torch import nn


class ModelError(ValueError):
    """A model folder or its contents cannot be used; the message says why and how to fix it."""


class CheckpointError(ModelError):
    """A checkpoint key is missing, misshapen or unexpected, or the weights are not safetensors."""


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor that goes into a qkv parameter.

    key: name in the checkpoint; shape: its shape there; transpose: stored (in, out) as
    GPT-2's Conv1D, so it is transposed into nn.Linear's (out, in).
    """

    key: str
    shape: tuple[int, ...]
    transpose: bool = False


# A plan: qkv parameter name -> pieces, concatenated along dim 0 after any transpose.
Plan = Mapping[str, tuple[Piece, ...]]


def resolve_folder(path) -> Path:
    """Check that `path` is a folder holding config.json; return it as a Path."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} does not exist; pass the path of a Hugging Face model folder "
            f"(config.json, model.safetensors, tokenizer.json) or a bundled name such as 'minilm'"
        )
    if not folder.is_dir():
        raise FileNotFoundError(f"{str(folder)!r} is a file, not a model folder; pass the folder that holds config.json")
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"model folder {str(folder)!r} has no config.json; a Hugging Face model folder needs config.json "
            f"next to its weights (save one with model.save_pretrained(folder))"
        )
    return folder


def read_config(folder: Path) -> dict:
    """config.json as a dict, with a clear error for broken JSON."""
    path = folder / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}); restore the file from the model's source") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path} must hold a JSON object; got {type(config).__name__}")
    return config


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors files of the folder's weights, or an error explaining what is there instead."""
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map", {})
        files = sorted({folder / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index.name} in {str(folder)!r} lists shard(s) that are not there: {', '.join(missing)}; "
                f"download every shard into the folder"
            )
        return files
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
        f"model.safetensors.index.json with its shards)"
    )


def read_shapes(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    """Every key of the safetensors files -> (shape, file), without loading the tensors."""
    from safetensors import safe_open

    out: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    out[key] = (tuple(f.get_slice(key).get_shape()), path)
        except Exception as exc:  # safetensors raises its own error types for broken headers
            raise CheckpointError(f"{path} is not a readable safetensors file ({exc}); download it again") from None
    return out


def _fmt(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def check_plan(plan: Plan, shapes: Mapping[str, tuple], model: nn.Module, *,
               ignored: Optional[Mapping[str, tuple]] = None) -> None:
    """Raise CheckpointError naming any missing, misshapen or unused key.

    Args:
        plan: from the architecture's `hf_plan`.
        shapes: checkpoint key -> (shape, file) from `read_shapes`.
        model: the module whose parameters the plan fills; every parameter must be planned.
        ignored: checkpoint keys that are buffers, not weights (e.g. BERT's position_ids),
            key -> expected shape; accepted (and shape-checked) but not copied.
    """
    params = dict(model.named_parameters())
    unplanned = sorted(set(params) - set(plan))
    if unplanned:  # a bug in qkv, not in the checkpoint
        raise RuntimeError(f"internal: no checkpoint plan for parameters {unplanned}")
    missing, misshapen = [], []
    for name, pieces in plan.items():
        for piece in pieces:
            if piece.key not in shapes:
                missing.append(piece.key)
            elif tuple(shapes[piece.key][0]) != tuple(piece.shape):
                misshapen.append(f"{piece.key}: checkpoint {_fmt(shapes[piece.key][0])}, model expects {_fmt(piece.shape)}")
    ignored = dict(ignored or {})
    for key, shape in ignored.items():
        if key in shapes and shape is not None and tuple(shapes[key][0]) != tuple(shape):
            misshapen.append(f"{key}: checkpoint {_fmt(shapes[key][0])}, model expects {_fmt(shape)}")
    used = {p.key for pieces in plan.values() for p in pieces} | set(ignored)
    unused = sorted(set(shapes) - used)
    problems = []
    if missing:
        problems.append(f"missing key(s) {', '.join(missing[:8])}" + (f" and {len(missing) - 8} more" if len(missing) > 8 else ""))
    if misshapen:
        problems.append("misshapen key(s) " + "; ".join(misshapen[:8]) + (f" and {len(misshapen) - 8} more" if len(misshapen) > 8 else ""))
    if unused:
        problems.append(f"unused key(s) {', '.join(unused[:8])}" + (f" and {len(unused) - 8} more" if len(unused) > 8 else ""))
    if problems:
        raise CheckpointError(
            "the checkpoint does not match config.json: " + "; ".join(problems)
            + ". Check that config.json belongs to these weights (sizes, layer count, architecture)"
        )


def load_weights(model: nn.Module, plan: Plan, shapes: Mapping[str, tuple], *,
                 ignored: Optional[Mapping[str, tuple]] = None) -> None:
    """Check the plan against the checkpoint (see `check_plan`), then copy every tensor in."""
    from safetensors import safe_open

    check_plan(plan, shapes, model, ignored=ignored)
    params = dict(model.named_parameters())
    by_file: dict[Path, list[str]] = {}
    for key, (_, path) in shapes.items():
        by_file.setdefault(path, []).append(key)
    handles = {path: safe_open(str(path), framework="pt") for path in by_file}
    with torch.no_grad():
        for name, pieces in plan.items():
            parts = []
            for piece in pieces:
                t = handles[shapes[piece.key][1]].get_tensor(piece.key)
                parts.append(t.t() if piece.transpose else t)
            value = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            param = params[name]
            if value.shape != param.shape:
                raise RuntimeError(f"internal: plan for {name} gives {_fmt(value.shape)}, parameter is {_fmt(param.shape)}")
            param.copy_(value)


def find_in_folder(folder: Path, *names: str) -> Optional[Path]:
    """The first of `names` that exists in the folder, or None."""
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


