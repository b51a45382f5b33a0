"""Every method quantises a model where it lives, with nothing left on the CPU.

Quantisation jobs run on the serving GPU. Here the tiny Llama is moved to the
virtual device of tests/helpers/virtual_device.py (real CPU numbers, every op
checking that its tensors share one device): a calibration batch, Hessian,
statistic or packed weight made on the CPU fails the run, as on CUDA.
bitsandbytes is not covered: its parameters re-wrap tensors, which the virtual
device's wrapper cannot follow.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaForCausalLM

from quantizers import quantize
from tests.helpers.virtual_device import VIRTUAL, VirtualDeviceMode, to_virtual

from .conftest import tiny_llama_config

METHODS: list[tuple[str, dict[str, Any] | None]] = [
    ("int8", None),
    ("int4", {"group_size": 32}),
    ("w8a8-dynamic", None),
    ("w8a8-static", None),
    ("smoothquant", None),
    ("gptq", {"group_size": 32}),
    ("feedback", None),
    ("mixed", {"target_bits_per_weight": 6.0, "group_size": 32}),
]


@pytest.mark.parametrize(("method", "config"), METHODS, ids=[m for m, _ in METHODS])
def test_method_quantises_on_the_model_device(method: str, config: dict[str, Any] | None) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    generator = torch.Generator().manual_seed(1)
    # CPU token ids, as calibration_batches makes them: quantize moves them.
    batches = [torch.randint(0, 256, (1, 32), generator=generator) for _ in range(8)]
    with VirtualDeviceMode():
        model._apply(to_virtual)
        report = quantize(model, method, config, calibration=batches)
        ids = torch.tensor([[1, 2, 3]], device=VIRTUAL)
        logits = model(input_ids=ids, use_cache=False).logits
    assert report.to_dict()["layers"]
    assert {t.device for t in [*model.parameters(), *model.buffers()]} == {VIRTUAL}
    assert logits.device == VIRTUAL and bool(torch.isfinite(logits).all())
