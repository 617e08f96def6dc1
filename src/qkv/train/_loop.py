"""The training loop shared by qkv's small models: deterministic batches, AdamW, a tqdm
progress bar, checkpoints that survive interruption, and Hugging Face-style output folders.

Determinism: parameters come from `torch.manual_seed(seed)`, and the batch of step t from a
private generator seeded with (seed, t), so a run resumed at step t sees exactly the batches an
uninterrupted run would. The learning rate is a pure function of the step (linear warm-up, then
cosine decay; Loshchilov & Hutter 2017, AdamW and SGDR), so the checkpoint needs only the
weights, the AdamW moments and the step: no scheduler and no RNG state.

Files are written by qkv's one writer (`qkv._files`): next to their destination and renamed
over it (`os.replace`), so a run stopped at any moment leaves either the previous checkpoint or
the new one, never half a file. Checkpoints are safetensors (tensors plus JSON metadata), never
pickle.

The output folder is qkv's own: the first thing a run writes there is the marker file
`.qkv-train` (JSON: format and task), and a run refuses, before touching anything, a folder
that exists, is not empty and has no marker, since its files are someone else's (another
model's config.json and weights would be overwritten). A folder with the marker (a finished
or interrupted run) is resumed or overwritten.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Union

import torch
from torch import Tensor, nn

from .._files import write_bytes, write_text
from ..models.checkpoint import CheckpointError, Plan, regroup_rows

CHECKPOINT = "checkpoint.safetensors"
FORMAT = "qkv.train/1"
MARKER = ".qkv-train"  # {"format": FORMAT, "task": ...}: this folder is written by qkv train


class TrainingError(ValueError):
    """A training run cannot start or resume; the message says why and how to fix it."""


@dataclass(frozen=True)
class Schedule:
    steps: int  # optimizer steps in the whole run
    lr: float = 3e-3  # peak learning rate
    warmup: int = 100  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    checkpoint_every: int = 200  # steps between checkpoints

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


@dataclass(frozen=True)
class Size:
    """A task's model dimensions and the run that trains them. Each task has two (`SIZES`):
    "shipped", the bundled weights that `qkv train TASK` reproduces, and "tiny", the test suite's,
    which runs the same code (training, checkpoints, resume, export, `qkv.load`) in a second."""

    width: int  # model width (embedding and attention)
    layers: int  # layers (of each stack, for an encoder-decoder)
    heads: int  # attention heads per layer
    ffn: int  # feed-forward inner width
    steps: int  # optimizer steps of a run (`qkv train --steps` overrides it)
    batch: int  # examples per step
    lr: float  # peak learning rate (AdamW)


def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """GPT-2's initialisation (Radford et al. 2019): N(0, 0.02) weights, zero biases, unit LayerNorms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def step_generator(seed: int, step: int) -> torch.Generator:
    """The private generator of one training step: a function of (seed, step) only."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _marker(out: Path) -> Optional[dict]:
    """The marker of a qkv training run in `out` (a Path), or None where there is none of ours."""
    marker = out / MARKER
    if not marker.is_file():  # a FIFO or a folder of that name is no marker (and is never opened)
        return None
    try:
        content = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) and content.get("format") == FORMAT else None


def check_folder(out: Path, task: Optional[str] = None) -> None:
    """Refuse `out` (a Path) as a training folder unless it is missing, empty, or marked as qkv's
    (as a run of `task`, when given).

    Raises:
        TrainingError: `out` is not a folder, holds files qkv train did not write (named, at
            most 8 of them), or holds another task's run (its files would stay beside this one's:
            a recall folder's tokenizer.json in a digits folder); nothing is touched.
    """
    if not out.exists():
        return
    if not out.is_dir():
        raise TrainingError(f"--out {str(out)!r} is not a folder; give a folder")
    names = sorted(p.name for p in out.iterdir())
    marker = _marker(out)
    if marker is not None and task is not None and marker.get("task") not in (None, task):
        raise TrainingError(
            f"--out {str(out)!r} holds a qkv train run of {marker.get('task')!r}, not {task!r}; its files would "
            f"stay beside this model's, so nothing was touched: choose another --out"
        )
    if not names or marker is not None:
        return
    shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
    raise TrainingError(
        f"--out {str(out)!r} holds files that qkv train did not write ({shown}); it writes only into a new "
        f"or empty folder or one of its own runs (marked by {MARKER}), so nothing was touched: choose "
        f"another --out"
    )


def claim_folder(out: Path, task: str) -> None:
    """Make `out` (a Path) a qkv training folder of `task` ("recall", "translate"): check it
    (`check_folder`), create it, and write the marker first, before any other file."""
    check_folder(out, task)
    out.mkdir(parents=True, exist_ok=True)
    marker = {"format": FORMAT, "task": task}
    if _marker(out) != marker:
        write_text(out / MARKER, json.dumps(marker) + "\n", what="the training marker")


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    from safetensors.torch import save

    data = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    write_bytes(path, save(data, metadata=metadata), what=f"the {path.name}")


def export_weights(model: nn.Module, plan: Plan) -> dict[str, Tensor]:
    """The inverse of `checkpoint.load_weights`: qkv parameters -> checkpoint keys of `plan`."""
    params = dict(model.named_parameters())
    out: dict[str, Tensor] = {}
    for name, pieces in plan.items():
        value = params[name].detach()
        sizes = [p.shape[-1] if p.transpose else p.shape[0] for p in pieces]
        for piece, part in zip(pieces, value.split(sizes, dim=0)):
            part = regroup_rows(part, *reversed(piece.regroup)) if piece.regroup else part
            out[piece.key] = part.t().contiguous() if piece.transpose else part.contiguous()
    return out


def save_folder(out: Path, config: dict, weights: dict[str, Tensor], tokenizer, *, task: str,
                extra: Optional[dict[str, dict]] = None) -> None:
    """Write a Hugging Face-style folder of `task`: config.json, model.safetensors,
    tokenizer.json and the JSON files of `extra` (file name -> content), each whole or not at
    all, into `out` (a Path) once `claim_folder` accepts it."""
    claim_folder(out, task)
    save_tensors(out / "model.safetensors", weights, {"format": "pt"})
    write_text(out / "tokenizer.json", tokenizer.to_str(pretty=True), what="the tokenizer.json")
    write_text(out / "config.json", json.dumps(config, indent=2) + "\n", what="the config.json")
    for name, content in (extra or {}).items():
        write_text(out / name, json.dumps(content, indent=2) + "\n", what=f"the {name}")


def progress_bar(name: str, total: int, start: int, *, enabled: bool = True):
    """A tqdm bar on stderr for the steps `start..total` of task `name`, rewritten in place with
    `\\r` at most every 0.25 s (the last state always drawn when it closes):

        recall   120/6000 [--------...], loss 2.3026 acc  11.0% 00:41

    `enabled=False` (`qkv train --quiet`, `progress=False`) draws nothing."""
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=name, disable=not enabled, file=sys.stderr, mininterval=0.25,
                ascii="-#", bar_format="{desc} {n:>5}/{total} [{bar:24}]{postfix} {elapsed}")


def _save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, step: int, meta: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            for key, value in opt.state.get(p, {}).items():
                t = value if isinstance(value, Tensor) else torch.tensor(value)
                tensors[f"optim.{names[id(p)]}.{key}"] = t.reshape(-1) if t.dim() == 0 else t
    # tied parameters share storage: save_file refuses shared tensors, so each gets its own copy
    save_tensors(path, tensors, {"format": FORMAT, "step": str(step), "meta": json.dumps(meta, sort_keys=True)})


def _load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, meta: dict) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        raise CheckpointError(
            f"the checkpoint {path} is unreadable ({exc}); delete it to train from the start"
        ) from None
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a qkv training checkpoint; delete it or choose another --out")
    saved = json.loads(header.get("meta", "{}"))
    if saved != meta:
        diff = ", ".join(f"{k}={saved.get(k)!r} (now {meta.get(k)!r})" for k in sorted(set(saved) | set(meta))
                         if saved.get(k) != meta.get(k))
        raise TrainingError(
            f"the checkpoint in {path.parent} belongs to another run ({diff}); rerun with the same "
            f"settings to resume, or choose another --out (or delete {path.name}) to start over"
        )
    state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint {path} does not fit this model ({exc}); "
                              "delete it to start over") from None
    for name, p in model.named_parameters():
        st = {}
        for key in ("step", "exp_avg", "exp_avg_sq"):
            t = tensors.get(f"optim.{name}.{key}")
            if t is not None:
                st[key] = t.reshape(()) if key == "step" else t
        if st:
            opt.state[p] = st
    return int(header["step"])


def train_loop(model: nn.Module, *, out: Path, schedule: Schedule, seed: int, meta: dict,
               loss_fn: Callable[[nn.Module, int], tuple[Tensor, float]], name: str,
               progress: bool = True, stop_after: Optional[int] = None,
               history: Optional[list] = None) -> int:
    """Train `model` in place for `schedule.steps` steps, resuming from out/checkpoint.safetensors.

    Args:
        model: freshly initialised from `seed` (a resumed run overwrites it from the checkpoint).
        out: the output folder; the checkpoint lives there while training runs.
        meta: the run's settings; a checkpoint whose settings differ is refused, not mixed in.
        loss_fn: (model, step) -> (loss to minimise, accuracy of this batch in [0, 1]).
        name: the task ("recall", "translate"): the progress bar's label and the marker's task.
        stop_after: stop (with a checkpoint) after this many steps in total, as a run stopped
            on purpose; an interruption (KeyboardInterrupt) keeps the last periodic checkpoint,
            if one was written (`interrupted_note` says which).
        history: if given, each step's loss is appended to it.

    Returns:
        the step reached (schedule.steps unless stopped).

    Raises:
        TrainingError: `out` holds files qkv train did not write (`check_folder`), or a
            checkpoint of a run with other settings.
    """
    claim_folder(out, name)
    ckpt = out / CHECKPOINT
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=schedule.lr, betas=(0.9, 0.98))
    step = _load_checkpoint(ckpt, model, opt, meta) if ckpt.exists() else 0
    model.train()
    # An interrupt (KeyboardInterrupt) may land between the optimizer's update and `step += 1`:
    # it propagates, keeping the last periodic checkpoint, which is whole, rather than saving a
    # state of unknown step. The bar is closed (its last state drawn) either way.
    with progress_bar(name, schedule.steps, step, enabled=progress) as bar:
        while step < schedule.steps:
            if stop_after is not None and step >= stop_after:
                break
            for group in opt.param_groups:
                group["lr"] = schedule.lr_at(step)
            loss, acc = loss_fn(model, step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            step += 1
            loss_value = float(loss.detach())
            if history is not None:
                history.append(loss_value)
            bar.set_postfix_str(f"loss {loss_value:.4f} acc {100 * acc:5.1f}%", refresh=False)
            bar.update(1)
            if step % schedule.checkpoint_every == 0 and step < schedule.steps:
                _save_checkpoint(ckpt, model, opt, step, meta)
    if step < schedule.steps:
        _save_checkpoint(ckpt, model, opt, step, meta)
    model.eval()
    return step


def train_task(task: str, out: Union[str, Path], sizes: dict[str, Size], build: Callable[[Size], nn.Module],
               step_loss: Callable[[nn.Module, torch.Generator, int], tuple[Tensor, float]],
               save: Callable[[nn.Module, Path], None], *, size: Union[str, Size] = "shipped", seed: int = 0,
               steps: Optional[int] = None, batch: Optional[int] = None, lr: Optional[float] = None,
               progress: bool = True, stop_after: Optional[int] = None, checkpoint_every: int = 200,
               history: Optional[list] = None) -> nn.Module:
    """Train the model of `task` and save it to `out` (resuming from out/checkpoint.safetensors).

    Args:
        out: the folder to write (config.json, model.safetensors, tokenizer.json, and the
            marker .qkv-train first): new, empty, or one that qkv train wrote; a folder holding
            other files is refused with a TrainingError before anything is touched.
        sizes, size: the task's sizes by name, and the one to train (a name or a `Size`).
        build: Size -> a fresh model (its parameters are then drawn from `seed`).
        step_loss: (model, the step's generator, batch) -> (loss, accuracy of the batch).
        save: (model, out) -> writes the finished folder.
        seed: parameters and every batch follow from it: same seed and steps, same weights.
        steps, batch, lr: optimizer steps of `batch` examples each, at peak learning rate `lr`
            (each by default the size's).
        stop_after: stop after this many steps, leaving a checkpoint (an interruption, for tests).
        history: if given, each step's loss is appended to it.

    Returns:
        the model (eval mode); the folder is written only when all steps are done.
    """
    if isinstance(size, str):
        if size not in sizes:
            raise TrainingError(f"size {size!r} is not one of {', '.join(sizes)}")
        size = sizes[size]
    given = {"steps": steps, "batch": batch, "lr": lr}
    run = replace(size, **{k: v for k, v in given.items() if v is not None})  # the size, with what the caller set
    torch.manual_seed(seed)
    model = build(run)
    init_weights(model)
    schedule = Schedule(steps=run.steps, lr=run.lr, warmup=min(100, max(1, run.steps // 10)),
                        checkpoint_every=checkpoint_every)
    meta = {"task": task, "seed": seed, **asdict(run)}  # a checkpoint of other settings is refused
    reached = train_loop(model, out=Path(out), schedule=schedule, seed=seed, meta=meta,
                         loss_fn=lambda m, step: step_loss(m, step_generator(seed, step), run.batch), name=task,
                         progress=progress, stop_after=stop_after, history=history)
    if reached == run.steps:
        save(model, Path(out))
        finish(Path(out))
    return model


def checkpoint_step(out: Path) -> Optional[int]:
    """The step of the checkpoint in `out` (a Path), from its header; None where there is none.

    Raises:
        CheckpointError: the checkpoint is there but unreadable.
    """
    from safetensors import safe_open

    ckpt = out / CHECKPOINT
    if not ckpt.is_file():
        return None
    try:
        with safe_open(str(ckpt), framework="pt") as f:
            return int((f.metadata() or {})["step"])
    except Exception as exc:
        raise CheckpointError(f"the checkpoint {ckpt} is unreadable ({exc}); "
                              "delete it to train from the start") from None


def interrupted_note(out: Path) -> str:
    """What an interrupted run leaves in `out` (a Path), read from the folder, so it is true
    wherever the interruption landed: the checkpoint's step and how to resume, or that there
    is no checkpoint and the same command starts over."""
    try:
        step = checkpoint_step(out)
    except CheckpointError as exc:
        return str(exc)
    if step is None:
        return f"no checkpoint was saved in {out} yet, so the same command starts over from step 0"
    return f"the checkpoint of step {step} in {out} is kept: run the same command to resume from it"


def finish(out: Path) -> None:
    """Remove the checkpoint once the finished folder is written (it holds the AdamW moments too)."""
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        ckpt.unlink()
