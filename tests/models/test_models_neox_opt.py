"""GPT-NeoX and OPT (issue 17) against transformers on tiny random checkpoints.

Each variant is built by transformers from a config written here (vocab 64, hidden 32, 4 heads,
2 layers, 64 positions; weights drawn with std 0.2 so the logits are of order 1 and the 1e-4
tolerance means something; every LayerNorm weight and every bias redrawn in [0.5, 1.5]), saved
with a word-level tokenizer, loaded by `qkv.load` and run through the shared proof
(family_checks.py). Then, per family, what it adds is switched off in the transformers model to
show that it changes the logits (so the proof could fail), the checkpoints as they were
released (Pythia's `embed_out` and buffers, OPT's `decoder.` keys) load, and the refusals.

OPT and left padding: transformers' OPT computes positions from the attention mask (real tokens
only, padding at -1), not from the slot index, and qkv's OPT does the same when `hidden` gets a
mask and no positions (opt.py). So `check_left_padded_logits`, which calls both models with
the mask alone, compares like with like for OPT too; `test_opt_positions_count_real_tokens`
shows that counting every slot instead would move the logits.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from family_checks import TOLERANCE, check_greedy, check_left_padded_logits, check_tokenizer, left_padded
from hf_folders import randomise_norms, save_folder

import qkv
from qkv.models import ModelError

SIZES = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=64,
             bos_token_id=2, eos_token_id=None)
NEOX = dict(SIZES, intermediate_size=48, initializer_range=0.2)
OPT = dict(SIZES, ffn_dim=48, init_std=0.2, pad_token_id=1, dropout=0.0)
VARIANTS = {
    # Pythia's layout, half of each head rotated, a RoPE base other than the default
    "neox": ("GPTNeoX", dict(NEOX, rotary_pct=0.5, rotary_emb_base=500)),
    # the sequential residual, a quarter of each head rotated with linear RoPE scaling, no
    # projection biases, a tied head
    "neox_sequential": ("GPTNeoX", dict(NEOX, use_parallel_residual=False, attention_bias=False,
                                        tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "opt": ("OPT", OPT),  # 125m's layout: pre-norm, a final LayerNorm, tied head
    # 350m's layout: post-norm without a final LayerNorm, embeddings narrower than the blocks
    "opt_350m": ("OPT", dict(OPT, do_layer_norm_before=False, word_embed_proj_dim=16)),
    # no biases, LayerNorms without weights, the final LayerNorm removed, an untied head, gelu,
    # LayerDrop (training only)
    "opt_bare": ("OPT", dict(OPT, enable_bias=False, layer_norm_elementwise_affine=False,
                             _remove_final_layer_norm=True, tie_word_embeddings=False, activation_function="gelu",
                             layerdrop=0.5)),
}


def _reference(kind: str, **changes):
    """A random transformers model of a variant (weights as the module docstring says), eval mode."""
    import transformers

    prefix, config = VARIANTS[kind]
    model = getattr(transformers, f"{prefix}ForCausalLM")(getattr(transformers, f"{prefix}Config")(
        **{**config, **changes}))
    return randomise_norms(model, biases=True)


def _like(ref, **changes):
    """ref's weights in a transformers model whose config differs by `changes` (what a family
    adds, switched off); weights the other config lacks are dropped, new ones keep their init."""
    config = type(ref.config)(**{**ref.config.to_dict(), **changes})
    other = type(ref)(config)
    other.load_state_dict(ref.state_dict(), strict=False)
    return other.eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """kind -> (folder, the transformers model saved in it), each built once, on first use."""
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(kind)
            cache[kind] = folder, save_folder(folder, _reference(kind))
        return cache[kind]

    return get


@pytest.fixture(scope="module")
def loaded(built):
    cache: dict = {}

    def get(kind: str):
        if kind not in cache:
            folder, ref = built(kind)
            cache[kind] = qkv.load(folder), ref
        return cache[kind]

    return get


def _logits_gap(a, b, ids, mask=None, **kw) -> float:
    with torch.no_grad():
        return (a(input_ids=ids, attention_mask=mask, **kw).logits - b(input_ids=ids, attention_mask=mask).logits
                ).abs().max().item()


# ------------------------------------------------------------------------------ both families
@pytest.mark.parametrize("kind", list(VARIANTS))
def test_family_proof(kind, built, loaded):
    """The shared proof of issue 17: left-padded logits within 1e-4, 20 greedy tokens (short,
    left-padded batch, chunked prefill), the tokenizer's ids."""
    model, ref = loaded(kind)
    assert type(model).__name__ == type(ref).__name__
    check_left_padded_logits(model, ref, vocab=64)
    check_greedy(model, ref, vocab=64)
    check_tokenizer(built(kind)[0], model)


@pytest.mark.parametrize("kind", ["neox", "opt_350m"])
def test_cache_decoding_equals_recompute(kind, loaded):
    from hf_folders import decode_in_steps

    model, _ = loaded(kind)
    stepped, full, _ = decode_in_steps(model, torch.randint(4, 64, (2, 12), generator=torch.Generator().manual_seed(5)))
    assert (stepped - full).abs().max().item() < 1e-5


# -------------------------------------------------------------------------------- GPT-NeoX
def test_neox_parallel_residual_matters(loaded):
    """The same weights run sequentially give other logits; qkv follows the parallel residual."""
    model, ref = loaded("neox")
    ids, mask = left_padded([13, 9], 64, seed=2)
    gap = _logits_gap(_like(ref, use_parallel_residual=False), ref, ids, mask)
    assert gap > 1e-3, f"use_parallel_residual changed nothing ({gap:.2e})"
    assert check_left_padded_logits(model, ref, vocab=64) < TOLERANCE


def test_neox_partial_rotary_matters(loaded):
    """Rotating whole heads instead of half of each gives other logits; qkv rotates half."""
    model, ref = loaded("neox")
    assert model.gpt_neox.rotary_emb.head_dim == 4 and model.config.head_size == 8
    ids, mask = left_padded([13, 9], 64, seed=2)
    whole = _like(ref, rope_parameters={**ref.config.rope_parameters, "partial_rotary_factor": 1.0})
    gap = _logits_gap(whole, ref, ids, mask)
    assert gap > 1e-3, f"partial_rotary_factor changed nothing ({gap:.2e})"


def test_neox_fused_projection_is_regrouped(loaded):
    """query_key_value holds per head [q_h | k_h | v_h]; qkv's qkv_proj holds [q | k | v]:
    its first E rows are the q rows of every head, in head order."""
    model, ref = loaded("neox")
    H, D, E = 4, 8, 32
    theirs = ref.gpt_neox.layers[0].attention.query_key_value.weight.view(H, 3, D, E)  # (H, 3, D, E)
    ours = model.gpt_neox.layers[0].attention.qkv_proj.weight.view(3, H, D, E)  # (3, H, D, E)
    assert torch.equal(ours, theirs.transpose(0, 1))
    assert not torch.equal(ours.reshape(3 * E, E), theirs.reshape(3 * E, E))  # the layouts do differ


def test_regroup_rows_loads_and_exports(tmp_path):
    """checkpoint.Piece(regroup=(a, b)) reorders rows (a, b, n) -> (b, a, n) at load time, and
    qkv.train's export_weights undoes it."""
    from safetensors.torch import save_file

    from qkv.models.checkpoint import Piece, load_weights, read_shapes, regroup_rows
    from qkv.train._loop import export_weights

    stored = torch.arange(24.0).view(12, 2)  # rows (a=2, b=3, n=2): block (i, j) holds rows 6i + 2j, 6i + 2j + 1
    moved = regroup_rows(stored, 2, 3)
    assert moved[:, 0].tolist() == [0, 2, 12, 14, 4, 6, 16, 18, 8, 10, 20, 22]
    assert torch.equal(regroup_rows(moved, 3, 2), stored)
    assert torch.equal(regroup_rows(stored[:, 0], 2, 3), moved[:, 0])  # a bias, 1-D
    save_file({"w": stored}, tmp_path / "w.safetensors")
    plan = {"weight": (Piece("w", (12, 2), regroup=(2, 3)),)}
    layer = torch.nn.Linear(2, 12, bias=False)
    load_weights(layer, plan, read_shapes([tmp_path / "w.safetensors"]))
    assert torch.equal(layer.weight.data, moved)
    assert torch.equal(export_weights(layer, plan)["w"], stored)


def _rewrite(src, dst, *, rename=lambda k: k, extra=None, config=lambda c: c):
    """A copy of folder `src` in `dst` with its keys renamed (None drops one), tensors added and
    config.json edited: the layout of the checkpoints as they were published."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    tensors = {rename(k): v for k, v in load_file(src / "model.safetensors").items() if rename(k) is not None}
    save_file({**tensors, **(extra or {})}, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config(json.loads((src / "config.json").read_text()))))
    shutil.copy(src / "tokenizer.json", dst / "tokenizer.json")


def test_neox_released_layout_loads(built, tmp_path):
    """Pythia's folders: the head is `embed_out`, each layer stores its causal mask (bool),
    masked_bias and RoPE's inv_freq, and config.json says rotary_pct / rotary_emb_base
    (transformers 4). transformers reads the copy as the same model, and so does qkv."""
    import transformers

    folder, ref = built("neox")

    def old_config(c):
        c = {k: v for k, v in c.items() if k != "rope_parameters"}
        return {**c, "rotary_pct": 0.5, "rotary_emb_base": 500, "transformers_version": "4.24.0"}

    buffers = {}
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        buffers[p + "bias"] = torch.tril(torch.ones(64, 64, dtype=torch.bool)).view(1, 1, 64, 64)
        buffers[p + "masked_bias"] = torch.tensor(-1e9)
        buffers[p + "rotary_emb.inv_freq"] = 1.0 / 500 ** (torch.arange(0, 4, 2).float() / 4)
    _rewrite(folder, tmp_path / "pythia", rename=lambda k: "embed_out.weight" if k == "lm_head.weight" else k,
             extra=buffers, config=old_config)
    theirs = transformers.GPTNeoXForCausalLM.from_pretrained(tmp_path / "pythia").eval()
    assert _logits_gap(theirs, ref, *left_padded([13, 9], 64, seed=2)) == 0  # the same model to transformers
    model = qkv.load(tmp_path / "pythia")
    assert model.config.partial_rotary_factor == 0.5 and model.config.rope_theta == 500
    check_left_padded_logits(model, ref, vocab=64)


RAW = {"hidden_size": 32, "num_attention_heads": 4}
ROPE_READINGS = [
    {},
    {"rotary_pct": 0.5, "rotary_emb_base": 500},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 55.0, "partial_rotary_factor": 0.5}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 55.0}, "rotary_pct": 0.5},
    {"rope_scaling": {"type": "linear", "factor": 2.0}, "rotary_pct": 0.5},
    {"rope_scaling": {"rope_type": "linear", "factor": 2.0, "rope_theta": 300.0},
     "rope_parameters": {"rope_theta": 1.0}},  # rope_scaling wins
    {"rope_scaling": None, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "rope_theta": 500.0}},
    {"rope_theta": 10000.0, "partial_rotary_factor": 0.25},  # top level, equal to what transformers uses
    # as transformers 4.4x wrote it: copies of rotary_emb_base and rotary_pct at the top level
    {"rotary_pct": 0.5, "partial_rotary_factor": 0.5, "rotary_emb_base": 500, "rope_theta": 500, "rope_scaling": None},
]


@pytest.mark.parametrize("fields", ROPE_READINGS)
def test_neox_rope_fields_read_as_transformers_reads_them(fields):
    """rope_parameters, rope_scaling, rotary_pct and rotary_emb_base, in the priority transformers
    5.24 gives them: base, rotated share and scaling equal to its `rope_parameters`."""
    import copy

    import transformers

    from qkv.models.gpt_neox import GPTNeoXConfig

    ours = GPTNeoXConfig.from_hf({**RAW, **copy.deepcopy(fields)})
    theirs = transformers.GPTNeoXConfig(**{**RAW, **copy.deepcopy(fields)}).rope_parameters
    assert ours.rope_theta == theirs["rope_theta"]
    assert ours.partial_rotary_factor == theirs["partial_rotary_factor"]
    assert (ours.rope_scaling or {"rope_type": "default"})["rope_type"] == theirs["rope_type"]
    for key, value in (ours.rope_scaling or {}).items():
        assert theirs[key] == value, key


@pytest.mark.parametrize("fields, message", [
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}},
     r"rope_parameters.rope_type=\"dynamic\" is not supported: qkv computes the rope types default, linear, llama3"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, r"rope_scaling.type=\"yarn\" is not supported"),
    ({"rotary_pct": 0.375}, r"rotates 3, an odd number; rotary embeddings rotate pairs"),
    ({"partial_rotary_factor": 0.5}, r"partial_rotary_factor=0.5 is not supported: transformers reads GPT-NeoX's "
                                     r"partial_rotary_factor from rope_parameters.partial_rotary_factor or rotary_pct "
                                     r"\(here 0.25\) and ignores a top-level"),
    ({"rope_theta": 500.0, "rotary_emb_base": 100}, r"rope_theta=500.0 is not supported: .* or rotary_emb_base "
                                                    r"\(here 100\)"),
    ({"rotary_pct": 1.5}, r"rotary_pct=1.5 is out of range; it must be in \[0, 1\]"),
    ({"hidden_size": 30}, r"hidden_size=30 is not divisible by num_attention_heads=4"),
])
def test_neox_refusals(fields, message, tmp_path):
    from qkv.models.gpt_neox import GPTNeoXConfig

    with pytest.raises(ModelError, match=message):
        GPTNeoXConfig.from_hf({**RAW, **fields}, tmp_path / "config.json")


def test_neox_no_rotation(tmp_path):
    """rotary_pct 0: no feature is rotated (transformers' tables are empty); qkv builds none."""
    torch.manual_seed(1)
    ref = _reference("neox", rotary_pct=0.0)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    model = qkv.load(tmp_path)
    assert model.gpt_neox.rotary_emb is None
    ids = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(ids) - ref(ids).logits).abs().max().item() < TOLERANCE


# ------------------------------------------------------------------------------------ OPT
def test_opt_positions_count_real_tokens(loaded):
    """OPT embeds position p at row p + 2, p counting the real tokens of the row (from the mask).
    Counting every slot (position_ids = 0, 1, ...) moves the logits of the padded rows; qkv's
    forward with the mask equals transformers', in one pass and in chunks, and given explicit
    positions it runs those."""
    model, ref = loaded("opt")
    ids, mask = left_padded([13, 9, 5], 64, seed=1)
    slots = torch.arange(13).expand(3, 13)
    real = mask.bool()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask).logits
        every_slot = ref(input_ids=ids, attention_mask=mask, position_ids=slots).logits
        gap = (every_slot[real] - want[real]).abs().max().item()
        assert gap > 1e-3, f"positions under left padding changed nothing ({gap:.2e})"
        for chunk in (None, 4):
            got = model(ids, attention_mask=mask, chunk_size=chunk)
            assert (got[real] - want[real]).abs().max().item() < TOLERANCE
        got = model.logits(model.hidden(ids, attention_mask=mask, positions=slots))
        assert (got[real] - every_slot[real]).abs().max().item() < TOLERANCE


def test_opt_post_norm_matters(loaded):
    """The 350m layout (LayerNorm after each residual sum) run as pre-norm gives other logits."""
    model, ref = loaded("opt_350m")
    assert model.model.decoder.final_layer_norm is None and model.model.decoder.project_in is not None
    ids, mask = left_padded([13, 9], 64, seed=2)
    gap = _logits_gap(_like(ref, do_layer_norm_before=True), ref, ids, mask)
    assert gap > 1e-3, f"do_layer_norm_before changed nothing ({gap:.2e})"


def test_opt_removed_final_layer_norm_matters(loaded):
    """_remove_final_layer_norm: without it transformers would add a final LayerNorm."""
    model, ref = loaded("opt_bare")
    assert model.model.decoder.final_layer_norm is None
    ids, mask = left_padded([13, 9], 64, seed=2)
    gap = _logits_gap(_like(ref, _remove_final_layer_norm=False), ref, ids, mask)
    assert gap > 1e-3, f"_remove_final_layer_norm changed nothing ({gap:.2e})"


def test_opt_released_layout_loads(built, tmp_path):
    """The released OPT folders were converted from OPTModel: keys under `decoder.`, no
    lm_head.weight (tied). transformers reads such a copy as the same model, and so does qkv,
    for both architecture names."""
    import transformers

    folder, ref = built("opt_350m")
    for arch in ("OPTForCausalLM", "OPTModel"):
        dst = tmp_path / arch
        _rewrite(folder, dst, rename=lambda k: None if k == "lm_head.weight" else k.removeprefix("model."),
                 config=lambda c, arch=arch: {**c, "architectures": [arch]})
        if arch == "OPTForCausalLM":
            theirs = transformers.OPTForCausalLM.from_pretrained(dst).eval()
            assert _logits_gap(theirs, ref, *left_padded([13, 9], 64, seed=2)) == 0
        model = qkv.load(dst)
        assert type(model).__name__ == "OPTForCausalLM"
        check_left_padded_logits(model, ref, vocab=64)


@pytest.mark.parametrize("fields, message", [
    ({"activation_function": "prelu"}, r"activation_function=\"prelu\" is not supported; it must be one of"),
    ({"hidden_size": 30}, r"hidden_size=30 is not divisible by num_attention_heads=4"),
    ({"layerdrop": 1.0}, r"layerdrop=1.0 is out of range"),
    ({"word_embed_proj_dim": 0}, r"word_embed_proj_dim=0 is out of range"),
])
def test_opt_refusals(fields, message, tmp_path):
    from qkv.models.opt import OPTConfig

    with pytest.raises(ModelError, match=message):
        OPTConfig.from_hf({**RAW, **fields}, tmp_path / "config.json")


def test_opt_training_mode_layerdrop_skips_blocks(loaded):
    """LayerDrop is a training-mode thing: in eval mode every block runs (the proof above, with
    layerdrop 0.5); in training mode a skipped block returns its input unchanged."""
    model, _ = loaded("opt_bare")
    block = model.model.decoder.layers[0]
    x = torch.randn(1, 3, 32)
    block.layerdrop = 0.999999
    try:
        block.train()
        assert torch.equal(block(x, None, None, None), x)
    finally:
        block.layerdrop = 0.5
        block.eval()
