"""LoRA adapters on the served model: same numbers as peft, per-row in a shared batch,
on float and quantised variants, loaded, evicted and unloaded while serving."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from quantizers import quantize
from quantizers.lora import LoraAdapter, read_adapter, write_adapter
from server.engine import Engine
from server.engine.adapters import DuplicateAdapter, UnknownAdapter
from server.engine.kv_cache import KVCache
from server.engine.lora import AdapterMismatch
from server.engine.served_model import ServedModel
from tests.engine.conftest import make_loaded
from tests.engine.streams import collect, request, run, run_all
from tests.helpers.lora_adapters import peft_logits, save_random_adapter

PROMPT = list(range(40, 75))


def served_logits(
    model: nn.Module, adapter: LoraAdapter | None, token_ids: list[int], runner: str
) -> torch.Tensor:
    """float32 logits `[T, vocab]` of a prefill on our runner, with `adapter` applied."""
    loaded = make_loaded()
    loaded.model = model
    served = ServedModel(
        loaded,
        max_num_seqs=1,
        max_model_len=128,
        runner="general" if runner == "general" else "auto",
    )
    assert served.choice.path == runner
    uids = []
    if adapter is not None:
        served.lora.check(adapter)
        served.lora.apply([(1, adapter)])
        uids = [1]
    served.lora.state.select(uids or [None], single=True)
    cache = KVCache(served.runner.kv_spec, 8, 16)
    return served.runner.prefill(cache, list(range(8)), token_ids, all_logits=True)


@pytest.mark.parametrize("runner", ["lean", "general"])
def test_an_adapter_we_save_gives_peft_logits(tmp_path: Path, runner: str) -> None:
    """peft makes a random adapter; we read it, write it back, and peft loads what we
    wrote: its logits on the float model equal ours served from it (float32: within
    1e-4 on logits of magnitude ~10-30, i.e. rounding)."""
    base = make_loaded().model
    save_random_adapter(base, tmp_path / "peft", seed=1)
    write_adapter(read_adapter(tmp_path / "peft"), tmp_path / "ours")
    adapter = read_adapter(tmp_path / "ours")
    expected = peft_logits(base, tmp_path / "ours", PROMPT)
    ours = served_logits(make_loaded().model, adapter, PROMPT, runner)
    plain = served_logits(make_loaded().model, None, PROMPT, runner)
    assert (plain - expected).abs().max() > 1.0  # the adapter changes the output
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


def test_partial_targets_and_ranks_fuse_correctly(tmp_path: Path) -> None:
    """An adapter on q and v only (k in the same fused matmul untouched), rank 3."""
    base = make_loaded().model
    save_random_adapter(
        base, tmp_path / "qv", seed=2, rank=3, alpha=5.0, targets=("q_proj", "v_proj")
    )
    expected = peft_logits(base, tmp_path / "qv", PROMPT)
    ours = served_logits(make_loaded().model, read_adapter(tmp_path / "qv"), PROMPT, "lean")
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-5)


def _quantized(method: str, config: dict | None):
    loaded = make_loaded()
    if method != "float":
        loaded.quantization = quantize(loaded.model, method, config).to_dict()
    return loaded


@torch.inference_mode()
def _hooked_reference(model: nn.Module, adapter: LoraAdapter, ids: list[int]) -> torch.Tensor:
    """The model's own forward with each target's low-rank product added by a hook."""
    hooks = []
    for path, lora in adapter.modules.items():

        def add(module: nn.Module, inputs: tuple, out: torch.Tensor, lora=lora) -> torch.Tensor:
            delta = (inputs[0].float() @ lora.a.T) @ lora.b.T * lora.scale
            return out + delta.to(out.dtype)

        hooks.append(model.get_submodule(path).register_forward_hook(add))
    try:
        return model(torch.tensor([ids])).logits[0].float()
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize(("method", "config"), [("int8", None), ("int4", {"group_size": 32})])
def test_adapter_on_a_quantised_base(tmp_path: Path, method: str, config: dict | None) -> None:
    """On the low-bit kernels, base + adapter equals the model's own forward plus
    the low-rank products (bf16 activations, so a bf16 tolerance)."""
    save_random_adapter(make_loaded().model, tmp_path / "a", seed=3)
    adapter = read_adapter(tmp_path / "a")
    expected = _hooked_reference(_quantized(method, config).model, adapter, PROMPT)
    plain = served_logits(_quantized(method, config).model, None, PROMPT, "lean")
    for runner in ("lean", "general"):
        ours = served_logits(_quantized(method, config).model, adapter, PROMPT, runner)
        assert (ours - expected).abs().max() < 0.05 * (plain - expected).abs().max()


def _engine_with_adapters(tmp_path: Path, loaded, names: list[str], **kwargs) -> Engine:
    engine = Engine(loaded, max_num_seqs=8, max_model_len=256, num_threads=1, **kwargs)
    engine.start()
    for seed, name in enumerate(names, start=10):
        save_random_adapter(make_loaded().model, tmp_path / name, seed=seed)
        engine.load_adapter(name, read_adapter(tmp_path / name), str(tmp_path / name))
    return engine


def _req(prompt: list[int], adapter: str | None, rid: str = "r"):
    req = request(prompt, request_id=rid, max_tokens=12, ignore_eos=True)
    return type(req)(**{**req.__dict__, "adapter": adapter})


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("float", None),
        ("int8", None),
        ("int4", {"group_size": 32}),
    ],
)
def test_greedy_alone_equals_mixed_batch(tmp_path: Path, method: str, config: dict | None) -> None:
    """Base, adapter a and adapter b share one batch; each row gets its own
    product: a's greedy tokens are those it gets alone, and base's are those of a
    server with no adapter at all."""
    loaded = _quantized(method, config)
    engine = Engine(loaded, max_num_seqs=8, max_model_len=256, num_threads=1)
    engine.start()
    try:
        prompts = [PROMPT, list(range(100, 120)), list(range(7, 30))]
        base_before = [run(engine, _req(p, None)).token_ids for p in prompts]
        for seed, name in enumerate(("a", "b"), start=10):
            save_random_adapter(make_loaded().model, tmp_path / name, seed=seed)
            engine.load_adapter(name, read_adapter(tmp_path / name), name)
        alone = {
            (name, i): run(engine, _req(p, name)).token_ids
            for name in ("a", "b")
            for i, p in enumerate(prompts)
        }
        mixed_requests = [(name, i) for i in range(len(prompts)) for name in (None, "a", "b")]
        mixed = run_all(
            engine, [_req(prompts[i], name, f"{name}-{i}") for name, i in mixed_requests]
        )
    finally:
        engine.shutdown()
    by_key = {key: r.token_ids for key, r in zip(mixed_requests, mixed, strict=True)}
    assert [by_key[(None, i)] for i in range(len(prompts))] == base_before
    for key, tokens in alone.items():
        assert by_key[key] == tokens
    assert alone[("a", 0)] != base_before[0] and alone[("a", 0)] != alone[("b", 0)]
    assert {r.finish.adapter for r in mixed} == {None, "a", "b"}


def test_load_errors_say_why(tmp_path: Path) -> None:
    engine = _engine_with_adapters(tmp_path, make_loaded(), ["a"], max_lora_rank=8)
    try:
        with pytest.raises(DuplicateAdapter, match="already loaded"):
            engine.load_adapter("a", read_adapter(tmp_path / "a"), "a")
        save_random_adapter(make_loaded().model, tmp_path / "big", seed=4, rank=16)
        with pytest.raises(AdapterMismatch, match="rank 16 exceeds"):
            engine.load_adapter("big", read_adapter(tmp_path / "big"), "big")
        other = make_loaded()
        wide = copy.deepcopy(other.model)
        wide.model.layers[0].self_attn.q_proj = nn.Linear(64, 96, bias=False)
        save_random_adapter(wide, tmp_path / "wide", seed=5, targets=("q_proj",))
        with pytest.raises(AdapterMismatch, match="maps 64 -> 96 features"):
            engine.load_adapter("wide", read_adapter(tmp_path / "wide"), "wide")
        module = read_adapter(tmp_path / "a").modules["model.layers.0.mlp.down_proj"]
        stray = LoraAdapter({"model.layers.0.mlp.gate": module})
        with pytest.raises(AdapterMismatch, match="not a linear projection"):
            engine.load_adapter("stray", stray, "stray")
        with pytest.raises(UnknownAdapter):
            engine.unload_adapter("nope")
        assert [r.name for r in engine.adapters()] == ["a"]
    finally:
        engine.shutdown()


def test_least_recently_used_is_evicted(tmp_path: Path) -> None:
    engine = _engine_with_adapters(tmp_path, make_loaded(), ["a", "b"], max_loras=2)
    try:
        run(engine, _req(PROMPT, "a"))  # a is now more recent than b
        save_random_adapter(make_loaded().model, tmp_path / "c", seed=6)
        evicted = engine.load_adapter("c", read_adapter(tmp_path / "c"), "c")
        assert evicted == ["b"]
        assert [r.name for r in engine.adapters()] == ["a", "c"]
        with pytest.raises(UnknownAdapter):
            run(engine, _req(PROMPT, "b"))
    finally:
        engine.shutdown()


def test_unloading_lets_running_requests_finish(tmp_path: Path) -> None:
    import asyncio

    engine = _engine_with_adapters(tmp_path, make_loaded(), ["a"])
    try:
        alone = run(engine, _req(PROMPT, "a")).token_ids

        async def main() -> list[int]:
            long = _req(PROMPT, "a")
            task = asyncio.ensure_future(collect(engine, long))
            while not engine.stats().running:
                await asyncio.sleep(0.001)
            engine.unload_adapter("a")
            return (await task).token_ids

        assert asyncio.run(main()) == alone
        assert engine.adapters() == []
        with pytest.raises(UnknownAdapter):
            run(engine, _req(PROMPT, "a"))
        run(engine, _req(PROMPT, None))  # a step later the stacks are gone
        assert engine._worker.active.lora.state.current is None
    finally:
        engine.shutdown()


def test_a_quantised_swap_keeps_adapters(tmp_path: Path) -> None:
    engine = _engine_with_adapters(tmp_path, make_loaded(), ["a"])
    try:
        engine.swap_model(_quantized("int8", None))
        base = run(engine, _req(PROMPT, None)).token_ids
        tuned = run(engine, _req(PROMPT, "a"))
    finally:
        engine.shutdown()
    assert tuned.finish.variant == "int8" and tuned.finish.adapter == "a"
    assert tuned.token_ids != base
