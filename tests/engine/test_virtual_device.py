"""The engine on a second device, without a GPU: every tensor a step creates
must follow the model's device.

The model is moved to the virtual device of tests/helpers/virtual_device.py
(real CPU numbers behind tensors that report another device, with every op
checking that its tensors share one device), the engine warms up and serves
batched greedy requests with logprobs and prompt logprobs, and the outputs
must equal those of the same model served on the CPU. A tensor made on the
CPU by the engine, the runner or sampling fails the run, as it would on CUDA.
"""

from __future__ import annotations

import pytest
import torch

from quantizers import quantize
from quantizers.loading import LoadedModel
from server.engine import Engine
from tests.engine.conftest import make_loaded
from tests.engine.streams import Result, request, run, run_all
from tests.helpers.virtual_device import VIRTUAL, VirtualDeviceMode, on_virtual_device, to_virtual

PROMPTS = ["Once upon a time", "def main():", "1, 2, 3, 4, 5, 6"]

Outputs = tuple[list[Result], Result]


def serve(loaded: LoadedModel, virtual: bool) -> Outputs:
    """Three greedy requests batched together, then one with logprobs and
    prompt logprobs, on an engine over `loaded` (moved to the virtual device
    first when `virtual`)."""
    requests = [
        request(loaded.tokenizer.encode(p), f"r{i}", max_tokens=6, ignore_eos=True)
        for i, p in enumerate(PROMPTS)
    ]
    scored = request(
        loaded.tokenizer.encode(PROMPTS[0]), "scored", prompt_logprobs=True,
        max_tokens=4, ignore_eos=True, logprobs=2,
    )
    with VirtualDeviceMode() if virtual else torch.no_grad():
        if virtual:
            loaded.model._apply(to_virtual)
            assert loaded.device == VIRTUAL
        engine = Engine(loaded, max_num_seqs=4, max_model_len=256, num_threads=1)
        if virtual:
            engine._run = on_virtual_device(engine._run)  # type: ignore[method-assign]
        engine.start()
    try:
        return run_all(engine, requests), run(engine, scored)
    finally:
        engine.shutdown()


def assert_same_outputs(virtual: Outputs, cpu: Outputs, tolerance: float) -> None:
    batched, scored = virtual
    batched_cpu, scored_cpu = cpu
    for result in (*batched, scored):
        assert result.finish.reason == "length", result.finish.error
    assert [r.token_ids for r in batched] == [r.token_ids for r in batched_cpu]
    assert scored.token_ids == scored_cpu.token_ids
    logprobs = [lp.logprob for d in scored.deltas for lp in d.logprobs]
    logprobs_cpu = [lp.logprob for d in scored_cpu.deltas for lp in d.logprobs]
    assert logprobs == pytest.approx(logprobs_cpu, abs=tolerance, rel=tolerance)
    prompt = [e.logprob for e in scored.finish.prompt_logprobs[1:]]
    prompt_cpu = [e.logprob for e in scored_cpu.finish.prompt_logprobs[1:]]
    assert prompt == pytest.approx(prompt_cpu, abs=tolerance, rel=tolerance)


def test_float_model_serves_on_another_device() -> None:
    cpu = serve(make_loaded(), virtual=False)
    assert_same_outputs(serve(make_loaded(), virtual=True), cpu, tolerance=1e-4)


@pytest.mark.parametrize(
    ("method", "config"),
    [("int8", None), ("int4", {"group_size": 32}), ("w8a8-dynamic", None)],
)
def test_quantized_model_serves_on_another_device(method: str, config: dict | None) -> None:
    def quantized() -> LoadedModel:
        loaded = make_loaded()
        loaded.quantization = quantize(loaded.model, method, config).to_dict()
        return loaded

    # bf16 activations, and off the CPU the int8 module takes its dequantising
    # path (the one CUDA runs) and attention its math path: logprobs agree to
    # bf16 rounding, greedy tokens exactly.
    cpu = serve(quantized(), virtual=False)
    assert_same_outputs(serve(quantized(), virtual=True), cpu, tolerance=0.1)
