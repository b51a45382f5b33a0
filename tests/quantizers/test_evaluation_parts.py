"""The evaluation command's small parts: method specs, the docs section writer
and the WikiText-2 preparation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from quantizers import datasets
from quantizers.evaluation import wikitext
from quantizers.evaluation.markdown import replace_section
from quantizers.evaluation.table import render_table
from quantizers.evaluation.variants import Variant, VariantSpecError, parse_variants
from tests.quantizers.evaluation_helpers import tiny_tokenizer


def test_variants_put_baselines_first_and_parse_lists_and_inline_configs() -> None:
    variants = parse_variants(
        ["float,int8", 'int4:{"group_size": 64, "x": [1, 2]}', "int4", "int8"],
        {"group_size": 128},
    )
    assert [v.method for v in variants] == ["float32", "bf16", "int8", "int4", "int4"]
    assert variants[3].config == {"group_size": 64, "x": [1, 2]}
    assert variants[4].config == {"group_size": 128}
    assert variants[3].label == "int4 group_size=64 x=[1,2]"
    assert Variant("int8").label == "int8"


@pytest.mark.parametrize("value", ["int4:[1]", "int4:{bad", ":{}"])
def test_variants_reject_bad_specs(value: str) -> None:
    with pytest.raises(VariantSpecError):
        parse_variants([value], None)


def test_replace_section_keeps_other_sections(tmp_path: Path) -> None:
    doc = tmp_path / "docs" / "benchmarks.md"
    replace_section(doc, "Mine", "first")
    assert doc.read_text() == "# Benchmarks\n\n## Mine\n\nfirst\n"
    doc.write_text("# Benchmarks\n\n## Theirs\n\nkeep\n\n## Mine\n\nold\n### sub\n\n## Last\n\nz\n")
    replace_section(doc, "Mine", "new\n")
    assert doc.read_text() == (
        "# Benchmarks\n\n## Theirs\n\nkeep\n\n## Mine\n\nnew\n\n## Last\n\nz\n"
    )
    replace_section(doc, "Other", "o")
    assert doc.read_text().endswith("## Last\n\nz\n\n## Other\n\no\n")


def test_rows_are_lines_joined_by_blank_lines_as_in_the_papers() -> None:
    assert wikitext.join_rows(" \n = Title = \n \n Text .\n") == (
        "\n\n = Title = \n" "\n\n" "" "\n\n" " Text .\n"
    )


def test_prefix_tokens_equal_the_full_tokenisation(tmp_path, monkeypatch) -> None:
    words = " ".join(f"word{i % 97} of line {i}" for i in range(3000))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text(words + "\n")
    monkeypatch.setenv("QUANTSERVE_DATA_DIR", str(tmp_path))
    tokenizer = tiny_tokenizer()
    full = torch.tensor(tokenizer(wikitext.join_rows(words + "\n"))["input_ids"])
    assert torch.equal(wikitext.wikitext_tokens(tokenizer, 700), full[:700])
    assert torch.equal(wikitext.wikitext_tokens(tokenizer, 9000), full[:9000])
    assert torch.equal(wikitext.wikitext_tokens(tokenizer), full)


def test_missing_or_empty_text_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(datasets, "BUNDLED_DATA_DIR", tmp_path / "no-bundle")
    with pytest.raises(wikitext.EvaluationDataError, match="not found"):
        wikitext.wikitext_tokens(tiny_tokenizer(), 10)
    monkeypatch.setenv("QUANTSERVE_DATA_DIR", str(tmp_path))
    (tmp_path / "wikitext-2-raw").mkdir()
    (tmp_path / "wikitext-2-raw" / "wiki.test.raw").write_text("  \n")
    with pytest.raises(wikitext.EvaluationDataError, match="empty"):
        wikitext.wikitext_tokens(tiny_tokenizer(), 10)


def test_table_marks_unavailable_and_failed_methods_without_breaking_columns() -> None:
    rows = [
        {"label": "bnb-nf4", "method": "bnb-nf4", "error": "no CPU kernel | here",
         "error_type": "MethodUnavailableError"},
        {"label": "int8", "method": "int8", "error": "boom\nline 2", "error_type": "ValueError"},
    ]
    lines = render_table(rows).splitlines()
    header_cells = lines[0].count("|")
    assert lines[2].startswith("| bnb-nf4 | unavailable here: no CPU kernel \\| here |")
    assert lines[3].startswith("| int8 | failed: boom line 2 |")
    assert all(line.count("|") - line.count("\\|") == header_cells for line in lines)
