"""The eval command end to end on a tiny model directory: real worker processes,
real int8 quantisation, the table, JSON, docs section and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from quantizers.evaluation.cli import SECTION_TITLE, main
from quantizers.evaluation.texts import VALIDATION, WIKITEXT, evaluation_tokens
from tests.quantizers.conftest import tiny_llama_config
from tests.quantizers.evaluation_helpers import tiny_tokenizer


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    directory = tmp_path / "tiny-llama"
    LlamaForCausalLM(tiny_llama_config(vocab_size=300)).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory


def test_eval_measures_baselines_and_a_method_in_one_run(model_dir, tmp_path, capsys) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    doc.parent.mkdir()
    doc.write_text("# Benchmarks\n\n## Kernels\n\nkept\n")
    out_json, plot = tmp_path / "eval.json", tmp_path / "docs" / "plot.png"
    code = main([
        "--model", str(model_dir), "--method", "float,int8", "--limit-tokens", "96",
        "--window", "32", "--decode-tokens", "4", "--threads", "1",
        "--output-md", str(doc), "--output-json", str(out_json), "--plot", str(plot),
    ])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    assert [r["label"] for r in rows] == ["float32", "bf16", "int8"]
    float32, bf16, int8 = rows
    assert float32["kl"] == 0.0 and float32["top1"] == 1.0
    for row in rows:
        assert (row["tokens"], row["window"], row["windows"]) == (96, 32, 3)
        assert row["base_perplexity"] == pytest.approx(float32["perplexity"], rel=1e-5)
        assert row["decode"]["threads"] == 1
        assert row["decode"]["tokens_per_second"] > 0
    assert 0.0 < int8["kl"] < 0.05
    assert int8["perplexity"] == pytest.approx(float32["perplexity"], rel=0.05)
    assert bf16["bits_per_weight_linear"] == 16.0
    assert 8.0 < int8["bits_per_weight_linear"] < 9.0
    assert int8["weight_bytes"] < bf16["weight_bytes"] < float32["weight_bytes"]
    assert int8["quant_report"]["method"] == "int8"
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\n## Kernels\n\nkept\n")
    assert f"## {SECTION_TITLE}" in text
    assert "| int8 |" in text and "![perplexity against weight bytes](plot.png)" in text
    assert plot.read_bytes().startswith(b"\x89PNG")
    assert "| float32 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("method", "message"),
    [("no-such-method", "unknown method"), ("int4:{oops", "not valid JSON")],
)
def test_eval_rejects_bad_methods_before_loading(method, message, capsys) -> None:
    assert main(["--model", "/nonexistent", "--method", method]) == 2
    assert message in capsys.readouterr().err


def test_eval_reports_a_missing_model_in_one_line(tmp_path, capsys) -> None:
    assert main(["--model", str(tmp_path / "absent"), "--method", "int8"]) == 2
    assert "model path does not exist" in capsys.readouterr().err


def test_eval_scores_the_validation_text_when_asked(model_dir, tmp_path, capsys) -> None:
    out_json = tmp_path / "eval.json"
    code = main(["--model", str(model_dir), "--method", "int8", "--text", "validation",
                 "--limit-tokens", "64", "--window", "32", "--decode-tokens", "2",
                 "--threads", "1", "--output-json", str(out_json)])
    assert code == 0
    rows = json.loads(out_json.read_text())["rows"]
    tokens = evaluation_tokens(tiny_tokenizer(), VALIDATION, 64)
    wiki = evaluation_tokens(tiny_tokenizer(), WIKITEXT, 64)
    assert not torch.equal(tokens, wiki)
    assert all(r["text"] == VALIDATION and r["tokens"] == 64 for r in rows)
    out = capsys.readouterr().out
    assert "validation text (carroll-alice): first 64 tokens" in out
    assert "Targets of" not in out, "targets are judged on WikiText-2 test only"


def test_eval_never_validates_on_its_calibration_text(capsys) -> None:
    assert main(["--model", "/nonexistent", "--method", "gptq", "--text", "validation",
                 "--calibration-dataset", "alice"]) == 2
    assert "cannot also be the calibration text" in capsys.readouterr().err
