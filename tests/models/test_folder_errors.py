"""Bad model folders: every one is one ModelError (a ValueError) that names the file and the
field and says what would fix it, raised before any weight is allocated; and every config
field that changes the math is honoured (checked against transformers) or refused by name.

One test per class of problem, parametrized over its cases; each case builds its folder in
tmp_path from the session's tiny random checkpoints.
"""

from __future__ import annotations

import json
import shutil
import time

import pytest
import torch
from hf_folders import SENTENCES, build_bert_folder, build_folder
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import CheckpointError, ModelError

DROP = object()  # edit_json: remove the field


def edit_json(path, **changes):
    data = json.loads(path.read_text(encoding="utf-8"))
    for k, v in changes.items():
        if v is DROP:
            data.pop(k, None)
        else:
            data[k] = v
    path.write_text(json.dumps(data), encoding="utf-8")


def copy(src, dst):
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="session")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bert")
    return folder, build_bert_folder(folder)


@pytest.fixture
def folders(tmp_path, bert_folder, gpt2_folder, llama_folder):
    """kind -> a fresh copy of that kind's tiny folder in tmp_path."""
    src = {"bert": bert_folder[0], "gpt2": gpt2_folder[0], "llama": llama_folder[0]}

    def make(kind):
        if kind == "seq2seq":
            return copy(qkv.models.bundled_path("translate"), tmp_path / kind)
        return copy(src[kind], tmp_path / kind)

    return make


def assert_names(exc, path, *words):
    msg = str(exc.value)
    assert str(path) in msg, f"message does not name {path}: {msg}"
    for w in words:
        assert w in msg, f"message does not mention {w!r}: {msg}"
    assert "\n" not in msg, f"not one line: {msg}"


# ------------------------------------------------------------ config.json: types and ranges
WRONG_FIELDS = [
    ("gpt2", "n_head", 0),  # was ZeroDivisionError
    ("gpt2", "n_head", "4"),
    ("gpt2", "n_layer", 2.0),
    ("gpt2", "n_layer", 1e7),  # a float: refused by type, before anything is planned
    ("gpt2", "n_embd", None),
    ("gpt2", "scale_attn_weights", "false"),  # was truthy: silently scaled
    ("gpt2", "add_cross_attention", "no"),
    ("gpt2", "attn_pdrop", 1.5),
    ("gpt2", "layer_norm_epsilon", -1),
    ("gpt2", "activation_function", 3),
    ("gpt2", "eos_token_id", "2"),
    ("llama", "num_attention_heads", True),
    ("llama", "hidden_size", -32),
    ("llama", "num_key_value_heads", 0),  # was read as "no GQA"
    ("llama", "head_dim", 0),
    ("llama", "rms_norm_eps", "1e-6"),
    ("llama", "eos_token_id", [2, "x"]),
    ("llama", "rope_parameters", "llama3"),
    ("llama", "tie_word_embeddings", 1),
    ("llama", "max_position_embeddings", 0),
    ("bert", "type_vocab_size", 0),
    ("bert", "hidden_act", 5),
    ("bert", "hidden_act", "prelu"),
    ("bert", "layer_norm_eps", float("nan")),
    ("bert", "is_decoder", "true"),
    ("bert", "vocab_size", 4e9),  # a float
    ("seq2seq", "d_model", "64"),
    ("seq2seq", "encoder_layers", 0),
]


@pytest.mark.parametrize("kind,field,value", WRONG_FIELDS, ids=[f"{k}-{f}-{v!r}" for k, f, v in WRONG_FIELDS])
def test_config_field_of_wrong_type_or_range(folders, kind, field, value):
    folder = folders(kind)
    edit_json(folder / "config.json", **{field: value})
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / "config.json", field, "must be")


RELATED_FIELDS = [  # fields that are fine alone but not together; the message names both
    ("gpt2", {"n_embd": 30}, ("n_embd", "n_head")),
    ("bert", {"num_attention_heads": 5}, ("hidden_size", "num_attention_heads")),
    ("llama", {"num_key_value_heads": 3}, ("num_attention_heads", "num_key_value_heads")),
    ("llama", {"head_dim": 7}, ("head_dim", "even")),
    ("llama", {"architectures": "LlamaForCausalLM"}, ("architectures", "array")),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}},
     ("rope_parameters.low_freq_factor", "missing")),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0, "low_freq_factor": 4.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
     ("rope_parameters.high_freq_factor", "low_freq_factor")),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": "2"}},
     ("rope_parameters.factor", "must be")),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 0, "factor": 2}},
     ("rope_parameters.rope_theta", "must be")),
]


@pytest.mark.parametrize("kind,changes,words", RELATED_FIELDS, ids=[str(i) for i in range(len(RELATED_FIELDS))])
def test_config_fields_that_do_not_fit_together(folders, kind, changes, words):
    folder = folders(kind)
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / "config.json", *words)


# ------------------------------------------------ fields that change the math: refused by name
REFUSED = [
    ("bert", "add_cross_attention", True),
    ("bert", "position_embedding_type", "relative_key"),
    ("bert", "pruned_heads", {"0": [1]}),
    ("gpt2", "add_cross_attention", True),
    ("gpt2", "pruned_heads", {"1": [0, 2]}),
    ("gpt2", "quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("llama", "quantization_config", {"quant_method": "bitsandbytes", "load_in_4bit": True}),
    ("llama", "partial_rotary_factor", 0.5),
    ("llama", "rope_parameters", {"rope_type": "proportional", "rope_theta": 500.0, "factor": 4.0}),
    ("llama", "rope_scaling", {"type": "su", "short_factor": [1.0] * 4, "long_factor": [1.0] * 4}),
]


@pytest.mark.parametrize("kind,field,value", REFUSED, ids=[f"{k}-{f}" for k, f, _ in REFUSED])
def test_field_that_changes_the_math_is_refused_by_name(folders, kind, field, value):
    folder = folders(kind)
    changes = {field: value}
    if field == "rope_scaling":
        changes["rope_parameters"] = None
    edit_json(folder / "config.json", **changes)
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / "config.json", field, "not supported")


# ------------------------------------------- fields that change the math: honoured, vs transformers
def _bert_ids():
    ids = torch.tensor([[2, 7, 9, 11, 13, 15, 3], [2, 8, 10, 3, 0, 0, 0]])
    return ids, ids != 0


HONOURED_OR_NO_EFFECT = [  # (kind, transformers kwargs[, config.json edits after saving]): qkv equals transformers
    ("bert", {"chunk_size_feed_forward": 1}),  # no effect: the feed-forward one position at a time
    ("bert", {"use_cache": False, "classifier_dropout": 0.3}),  # no effect on BertModel
    ("gpt2", {"scale_attn_weights": False}),
    ("gpt2", {"reorder_and_upcast_attn": True}),  # no effect in float32
    ("gpt2", {"summary_type": "mean", "summary_use_proj": False}),  # heads qkv does not load
    ("gpt2", {"eos_token_id": [5, 6]}),
    ("llama", {"pretraining_tp": 2}),  # no effect: transformers 5 does not read it
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}}),
    # the transformers 4 layout of the same thing: rope_theta and rope_scaling at the top level
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 300.0, "factor": 2.0}},
     {"rope_parameters": DROP, "rope_theta": 300.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
]


@pytest.mark.parametrize("case", HONOURED_OR_NO_EFFECT, ids=[str(i) for i in range(len(HONOURED_OR_NO_EFFECT))])
def test_field_is_honoured_or_has_no_effect_as_in_transformers(tmp_path, case):
    kind, kw, edits = (*case, {})[:3]
    if kind == "bert":
        ref = build_bert_folder(tmp_path, seed=5, **kw)
        ids, mask = _bert_ids()
        with torch.no_grad():
            want = ref(input_ids=ids, attention_mask=mask.long()).last_hidden_state[mask]
            got = qkv.load(tmp_path)(ids, mask)[mask]
    else:
        ref = build_folder(tmp_path, kind, seed=5, **kw)
        edit_json(tmp_path / "config.json", **edits)
        ids = torch.randint(4, 64, (2, 40), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref(ids).logits
            got = qkv.load(tmp_path)(ids)
    err = (got - want).abs().max().item()
    assert err < 1e-5, f"{kind} {kw}: max |qkv - transformers| = {err:.2e}"


# -------------------------------------------------------------- every JSON file of a folder
NOT_UTF8 = b'{"a": "\xff\xfe"}'
BAD_JSON_FILES = [
    ("gpt2", "config.json", NOT_UTF8),
    ("gpt2", "config.json", b"[1, 2]"),
    ("gpt2", "config.json", b'{"n_layer": 2,'),
    ("llama", "model.safetensors.index.json", b"{not json"),
    ("llama", "model.safetensors.index.json", b'{"weight_map": ["model-00001-of-00002.safetensors"]}'),
    ("llama", "model.safetensors.index.json", b'{"metadata": {}}'),
    ("llama", "model.safetensors.index.json", b'{"weight_map": {"lm_head.weight": 7}}'),
    ("bert", "tokenizer_config.json", b"{broken"),
    ("bert", "tokenizer_config.json", b'{"do_lower_case": "yes"}'),
    ("bert", "modules.json", b"[{"),
    ("bert", "modules.json", b'{"0": "Transformer"}'),
    ("bert", "modules.json", b'["sentence_transformers.models.Pooling"]'),
    ("bert", "modules.json", b'[{"type": "sentence_transformers.models.Pooling", "path": "../../etc"}]'),
    ("bert", "1_Pooling/config.json", NOT_UTF8),
    ("bert", "1_Pooling/config.json", b'{"pooling_mode_mean_tokens": "true"}'),
    ("bert", "1_Pooling/config.json", b'{"pooling_mode_mean_tokens": true, "word_embedding_dimension": 384}'),
    ("bert", "sentence_bert_config.json", b"max_seq_length: 32"),
    ("bert", "sentence_bert_config.json", b'{"max_seq_length": "32"}'),
    ("gpt2", "generation_config.json", b"{,}"),
    ("gpt2", "generation_config.json", b'{"max_new_tokens": "5"}'),
]


@pytest.mark.parametrize("kind,name,content", BAD_JSON_FILES,
                         ids=[f"{k}-{n}-{i}" for i, (k, n, _) in enumerate(BAD_JSON_FILES)])
def test_broken_json_file_is_named(folders, tmp_path, gpt2_folder, llama_folder, kind, name, content):
    if name == "model.safetensors.index.json":
        folder = tmp_path / "sharded"
        llama_folder[1].save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
        shutil.copy(llama_folder[0] / "tokenizer.json", folder)
    else:
        folder = folders(kind)
    if name == "tokenizer_config.json" or kind == "bert":
        (folder / "tokenizer.json").unlink(missing_ok=True)  # vocab.txt + tokenizer_config.json
    (folder / name).write_bytes(content)
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / name)


# ------------------------------------------------------------------------- tokenizer files
BAD_TOKENIZER_FILES = [
    ("vocab.json", b"{bad"),
    ("vocab.json", b"[1, 2]"),
    ("vocab.json", b'{"a": "x"}'),
    ("merges.txt", b"#version: 0.2\n\xff\xfe\n"),
    ("merges.txt", b"#version: 0.2\nabc\n"),
    ("merges.txt", b"#version: 0.2\nzzz qqq\n"),  # tokens not in vocab.json
    ("vocab.txt", b"\xff\xfe[PAD]\n"),
    ("vocab.txt", b""),
]


@pytest.mark.parametrize("name,content", BAD_TOKENIZER_FILES,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_TOKENIZER_FILES)])
def test_corrupt_tokenizer_file_is_named(folders, name, content):
    if name == "vocab.txt":
        folder = folders("bert")
        (folder / "tokenizer.json").unlink(missing_ok=True)
    else:
        from tokenizers import ByteLevelBPETokenizer

        folder = folders("gpt2")
        (folder / "tokenizer.json").unlink()
        bpe = ByteLevelBPETokenizer()
        bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1)
        bpe.save_model(str(folder))
    (folder / name).write_bytes(content)
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / name)


# --------------------------------------------------------- shards named outside the folder
OUTSIDE = ["../outside.safetensors", "{abs}", "sub/../../outside.safetensors", "..\\outside.safetensors",
           "C:\\outside.safetensors", "/etc/passwd"]


@pytest.mark.parametrize("target", OUTSIDE)
def test_weight_map_entry_outside_the_folder_is_refused_unopened(tmp_path, gpt2_folder, monkeypatch, target):
    """The shard outside the folder is a valid checkpoint of this very model, so opening it
    would load; it must be refused from its name alone."""
    folder = copy(gpt2_folder[0], tmp_path / "m")
    outside = tmp_path / "outside.safetensors"
    (folder / "model.safetensors").rename(outside)
    name = str(outside) if target == "{abs}" else target
    keys = load_file(str(outside)).keys()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: name for k in keys}}))
    import safetensors

    opened = []
    real = safetensors.safe_open
    monkeypatch.setattr(safetensors, "safe_open", lambda path, *a, **k: opened.append(path) or real(path, *a, **k))
    with pytest.raises(ModelError) as exc:
        qkv.load(folder)
    assert_names(exc, folder / "model.safetensors.index.json", "weight_map", "outside")
    assert opened == [], f"opened {opened}"


# ------------------------------------------------------------ weights that are not floats
NOT_FLOAT = [torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", NOT_FLOAT, ids=str)
def test_non_float_weight_is_refused_by_name(tmp_path, llama_folder, dtype):
    folder = copy(llama_folder[0], tmp_path / "m")
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    key = "model.layers.1.mlp.up_proj.weight"
    sd[key] = sd[key].to(dtype) if dtype != torch.bool else sd[key] > 0
    save_file(sd, str(path))
    with pytest.raises(CheckpointError) as exc:
        qkv.load(folder)
    assert_names(exc, key, "model.safetensors", "floating point")


# --------------------------------------------- sizes beyond the weights: fail before allocating
HUGE = [
    ("gpt2", {"vocab_size": 4_000_000_000}, "vocab_size=4000000000 but the weights hold 64"),
    ("llama", {"vocab_size": 4_000_000_000}, "vocab_size=4000000000 but the weights hold 64"),
    ("bert", {"max_position_embeddings": 10**12}, "max_position_embeddings=1000000000000 but the weights hold 40"),
    ("gpt2", {"n_layer": 10_000_000}, "n_layer=10000000, but the checkpoint holds 2 layer(s)"),
    ("llama", {"num_hidden_layers": 10_000_000}, "num_hidden_layers=10000000, but the checkpoint holds 2"),
    ("bert", {"num_hidden_layers": 10_000_000}, "num_hidden_layers=10000000, but the checkpoint holds 2"),
    ("seq2seq", {"decoder_layers": 10_000_000}, "decoder_layers=10000000, but the checkpoint holds 2"),
    ("llama", {"hidden_size": 2**40, "head_dim": 8}, "hidden_size=1099511627776 but the weights hold 32"),
    ("gpt2", {"n_inner": 10**9}, "n_inner=1000000000 but the weights hold 128"),
]


@pytest.mark.parametrize("kind,changes,words", HUGE, ids=[f"{k}-{next(iter(c))}" for k, c, _ in HUGE])
def test_sizes_beyond_the_weights_fail_fast_before_allocating(folders, monkeypatch, kind, changes, words):
    folder = folders(kind)
    edit_json(folder / "config.json", **changes)

    def no_allocation(*a, **k):
        raise AssertionError("the model was allocated before its shapes were checked")

    monkeypatch.setattr(torch.nn.Module, "to_empty", no_allocation)
    start = time.perf_counter()
    with pytest.raises(CheckpointError) as exc:
        qkv.load(folder)
    assert time.perf_counter() - start < 5.0
    assert_names(exc, folder / "config.json", words)


# ----------------------------------------------------------------------- device and dtype
BAD_TARGETS = [
    ({"device": "cuda"}, ValueError, "cuda"),
    ({"device": "cuda:3"}, ValueError, "cuda:3"),
    ({"device": "gpu"}, ValueError, "not a device torch knows"),
    ({"device": "meta"}, ValueError, "meta"),
    ({"dtype": torch.int64}, ValueError, "torch.int64"),
    ({"dtype": torch.bool}, ValueError, "pass one of torch.float32"),
    ({"dtype": "float16"}, TypeError, "dtype must be a torch.dtype"),
]


@pytest.mark.parametrize("kw,error,words", BAD_TARGETS, ids=[str(list(k.values())[0]) for k, _, _ in BAD_TARGETS])
def test_unusable_device_or_dtype_is_a_clear_error(gpt2_folder, monkeypatch, kw, error, words):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a machine without CUDA
    with pytest.raises(error) as exc:
        qkv.load(gpt2_folder[0], **kw)
    assert words in str(exc.value), str(exc.value)


# ------------------------------------------------------------------------------------- CLI
def test_cli_prints_one_line_and_exits_2(folders, capsys):
    from qkv.cli import main

    folder = folders("gpt2")
    edit_json(folder / "config.json", n_head=0)
    assert main(["generate", "--model", str(folder), "the cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(folder / "config.json") in err and "n_head" in err, err
