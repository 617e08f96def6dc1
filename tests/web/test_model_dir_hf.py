"""`qkv serve --model-dir`: folders of architectures qkv has no native implementation of are
offered through transformers when it is installed (logged), answer the same numbers as
`qkv.explain` on the transformers model, and are skipped with the reason (how to install
transformers; encoder-decoders refused) otherwise."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
from starlette.testclient import TestClient

import qkv
from qkv.web.app import create_app

from .web_helpers import TEXT


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from models.foreign_folders import electra_folder, falcon_folder

    root = tmp_path_factory.mktemp("model-dir")
    electra_folder(root / "electra")
    falcon_folder(root / "falcon")  # transformers runs it, but its attention is its own code: skipped at start
    from qkv.models import bundled_path

    shutil.copytree(bundled_path("recall"), root / "native")
    (root / "seq2seq").mkdir()
    (root / "seq2seq" / "config.json").write_text(json.dumps(
        {"architectures": ["BartForConditionalGeneration"], "model_type": "bart", "is_encoder_decoder": True}))
    return root


def test_a_foreign_folder_is_offered_through_transformers(model_dir, caplog):
    from qkv.models import load_transformers
    from qkv.web.schema import ExplainData, StepsData

    with caplog.at_level(logging.WARNING, logger="qkv.web"):
        app = create_app(model_dir=str(model_dir))
    reg = app.state.service.registry
    assert "electra: qkv runs ElectraModel through transformers (qkv has no native implementation)" in caplog.text
    assert set(reg.skipped) == {"seq2seq", "falcon"} and "is an encoder-decoder" in reg.skipped["seq2seq"]
    assert "computes its attention in its own code" in reg.skipped["falcon"]
    expected = qkv.explain(TEXT, load_transformers(model_dir / "electra")).to_dict(focus="cat")
    with TestClient(app) as c:
        offered = {e["name"]: e["source"] for e in c.get("/api/models").json()["models"]}
        assert offered["electra"] == offered["native"] == "model-dir"
        got = c.post("/api/explain", json={"text": TEXT, "model": "electra", "focus": "cat"})
        assert got.status_code == 200, got.text
        data = ExplainData.model_validate(got.json()).model_dump()
        assert data["labels"] == expected["labels"] and data["maps"] == expected["maps"]
        steps = c.post("/api/steps", json={"text": TEXT, "model": "electra", "word": "cat", "layer": 1, "head": 2})
        assert steps.status_code == 200, steps.text
        StepsData.model_validate(steps.json())
        long = c.post("/api/explain", json={"text": " ".join(["the cat"] * 30), "model": "electra"})
        assert long.status_code == 422 and "takes at most 40" in long.json()["error"]["message"]
        native = c.post("/api/explain", json={"text": "c3 a7 k2 ? a", "model": "native"})
        assert native.status_code == 200, native.text
    assert app.state.internal_errors == 0
    model, _ = reg.get("electra")
    assert type(model).__name__ == "ElectraModel"  # the transformers model, as the log said
    assert type(reg.get("native")[0]).__module__.startswith("qkv.")  # native folders stay qkv's own


def test_without_transformers_a_foreign_folder_is_skipped_with_how_to_install(model_dir, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with caplog.at_level(logging.WARNING, logger="qkv.web"):
        app = create_app(model_dir=str(model_dir))
    skipped = app.state.service.registry.skipped
    assert set(skipped) == {"electra", "seq2seq", "falcon"}
    assert skipped["electra"] == ("qkv has no native implementation of ElectraModel, and running it through "
                                  "transformers needs transformers: pip install 'qkv[hf]'")
    assert "skipped the folder 'electra'" in caplog.text
