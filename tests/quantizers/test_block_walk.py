"""The block walk (GPTQ, mixed's sensitivities, QAT) feeds every block what the model does.

Gemma 3 mixes sliding-window and global layers, each kind with its own mask
and rotary table; with a window shorter than the calibration sequences, a
walk that ran every block on the first block's arguments computes a
different model from the global layer on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from quantizers.loading import load_model
from quantizers.methods.block_walk import block_output, capture_block_inputs, decoder_blocks
from quantizers.methods.sensitivity import SensitivityProbe, measured_kl
from tests.helpers.tiny_architectures import ARCHITECTURES, write_tiny_architecture

WINDOW = 4
CALIBRATION = [
    torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(i)) for i in range(2)
]


def gemma_mixed_layers() -> PreTrainedModel:
    """Sliding, global, sliding: the global layer's mask and rotary differ from
    the first block's, and a sliding layer follows it."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gemma3_text",
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=WINDOW,
        initializer_range=0.1,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
    )
    return AutoModelForCausalLM.from_config(config).eval()


def _walk_matches_model(model: PreTrainedModel) -> None:
    _, blocks = decoder_blocks(model)
    calls = capture_block_inputs(model, blocks, CALIBRATION, dtype=torch.float32)
    assert len(calls) == 1  # equal lengths are stacked into one call
    with torch.no_grad():
        expected = model(torch.cat(CALIBRATION), output_hidden_states=True).hidden_states
        hidden = calls[0].hidden
        for index, block in enumerate(blocks):
            torch.testing.assert_close(hidden, expected[index], rtol=1e-5, atol=1e-5)
            hidden = block_output(block, replace(calls[0], hidden=hidden), index)


def test_walk_reproduces_every_block_input_with_mixed_layer_kinds() -> None:
    model = gemma_mixed_layers()
    assert max(ids.shape[-1] for ids in CALIBRATION) > WINDOW
    _walk_matches_model(model)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_walk_reproduces_every_block_input(model_type: str, tmp_path: Path) -> None:
    _walk_matches_model(load_model(write_tiny_architecture(tmp_path, model_type)).model)


def test_capture_leaves_the_blocks_as_they_were() -> None:
    model = gemma_mixed_layers()
    before = model(CALIBRATION[0]).logits
    _, blocks = decoder_blocks(model)
    capture_block_inputs(model, blocks, CALIBRATION)
    assert not any("forward" in vars(block) for block in blocks)
    torch.testing.assert_close(model(CALIBRATION[0]).logits, before, rtol=0, atol=0)


def test_sensitivity_of_a_global_layer_is_the_whole_model_kl() -> None:
    """Mixed's KL for a perturbed layer, through the walk, equals the KL of the
    whole model's forward with that layer perturbed."""
    model = gemma_mixed_layers()
    probe = SensitivityProbe(model, CALIBRATION)
    ids = torch.cat(CALIBRATION)
    with torch.no_grad():
        reference = model(ids).logits
        for name in ("model.layers.1.self_attn.q_proj", "model.layers.0.mlp.down_proj"):
            layer = model.get_submodule(name)
            original = layer.weight.data.clone()
            noisy = original + 0.05 * torch.randn_like(original)
            walked = probe.kl_with(name, noisy)
            layer.weight.data = noisy
            whole = measured_kl(reference, model(ids).logits)
            layer.weight.data = original
            assert whole > 1e-4
            assert walked == pytest.approx(whole, rel=1e-3)
