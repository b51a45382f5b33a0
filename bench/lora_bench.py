"""LoRA adapters on SmolLM2 int4: train one on 90% of a text, serve it, measure.

In one process, on the embedded SmolLM2-135M quantised to int4 (default config):

* `train`: an adapter trained (`quantizers.lora.train`, on a private int4 copy)
  on the first 90% of the bundled Tiny Shakespeare's tokens; wall and CPU
  seconds; then the *served* perplexity on windows of the last 10% (the
  engine's runner, prefill with all logits, adapter applied by its hooks),
  base against base + adapter. Target: >= 25% lower, training < 10 min.
* `decode`: an engine with the trained adapter and two random ones loaded;
  alternating rounds of one greedy base request and one adapter request at
  batch 1: decode tokens/s (wall) and CPU seconds per token. Target >= 0.8x.
* `mixed`: 8 concurrent clients on the base alone against 8 spread over base
  and the 3 adapters (2 each), alternating rounds: total tokens/s and CPU
  seconds per token. Target >= 0.8x.

The machine is shared: ratios are of contenders measured in the same run,
alternated; CPU time (`process_time`, all threads of this process) is less
sensitive to neighbours than wall time.

    .venv/bin/python bench/lora_bench.py --output-json /tmp/lora.json

(defaults: the run in docs/benchmarks.md; 1 torch thread, since on a shared
machine 2 threads spent most of a training step waiting at OpenMP barriers)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an install

from quantizers import quantize
from quantizers.calibration import DATASET_FILES
from quantizers.datasets import data_file
from quantizers.evaluation.machine import describe_machine
from quantizers.loading import LoadedModel, load_model
from quantizers.lora import LoraAdapter, LoraModule
from quantizers.lora.train import LoraTrainConfig, train_lora
from server.engine import Engine, Finish, GenerationRequest, SamplingParams
from server.engine.kv_cache import KVCache
from server.engine.served_model import ServedModel


def int4_model() -> LoadedModel:
    loaded = load_model(None, dtype="bfloat16")
    loaded.quantization = quantize(loaded.model, "int4", None).to_dict()
    return loaded


def text_tokens(loaded: LoadedModel, dataset: str) -> torch.Tensor:
    text = data_file(DATASET_FILES[dataset]).read_text(encoding="utf-8")
    return torch.tensor(loaded.tokenizer(text, add_special_tokens=False)["input_ids"])


def served_perplexity(
    served: ServedModel, tokens: torch.Tensor, window: int, uid: int | None
) -> float:
    """exp(mean NLL) over consecutive windows, each scored from its second token."""
    served.lora.state.select([uid], single=True)
    cache = KVCache(served.runner.kv_spec, -(-window // 16), 16)
    total, count = 0.0, 0
    for start in range(0, tokens.numel() - window + 1, window):
        ids = tokens[start : start + window].tolist()
        logits = served.runner.prefill(cache, list(range(cache.num_blocks)), ids, all_logits=True)
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum")
        total, count = total + float(nll), count + window - 1
    return math.exp(total / count)


def random_like(adapter: LoraAdapter, seed: int) -> LoraAdapter:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        path: LoraModule(
            torch.randn(m.a.shape, generator=generator) * 0.02,
            torch.randn(m.b.shape, generator=generator) * 0.02,
            m.scale,
        )
        for path, m in adapter.modules.items()
    }
    return LoraAdapter(modules, dict(adapter.config))


def request(prompt: list[int], adapter: str | None, tokens: int, index: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    return GenerationRequest(f"r{index}", prompt, params, adapter=adapter)


async def _collect(engine: Engine, req: GenerationRequest) -> Finish:
    async for item in engine.generate(req):
        if isinstance(item, Finish):
            return item
    raise AssertionError("no Finish")


def run_batch(engine: Engine, reqs: list[GenerationRequest]) -> tuple[float, float, int]:
    """(wall s, CPU s, generated tokens) of running `reqs` concurrently."""

    async def main() -> list[Finish]:
        return await asyncio.gather(*(_collect(engine, r) for r in reqs))

    wall, cpu = time.perf_counter(), time.process_time()
    finishes = asyncio.run(main())
    tokens = sum(f.completion_tokens for f in finishes)
    return time.perf_counter() - wall, time.process_time() - cpu, tokens


def compare(
    engine: Engine, contenders: dict[str, list[GenerationRequest]], rounds: int
) -> dict[str, dict[str, float]]:
    """Alternate the contenders `rounds` times; tokens/s (wall) and CPU s per token."""
    sums = {name: [0.0, 0.0, 0] for name in contenders}
    for _ in range(rounds):
        for name, reqs in contenders.items():
            wall, cpu, tokens = run_batch(engine, reqs)
            sums[name][0] += wall
            sums[name][1] += cpu
            sums[name][2] += tokens
    return {
        name: {"tokens_per_s": tokens / wall, "cpu_s_per_token": cpu / tokens}
        for name, (wall, cpu, tokens) in sums.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dataset", default="tinyshakespeare")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"Machine: {describe_machine(args.threads)}", flush=True)
    results: dict[str, Any] = {"machine": describe_machine(args.threads), "args": dict(vars(args))}
    results["args"]["output_json"] = str(args.output_json)

    served_loaded = int4_model()
    tokens = text_tokens(served_loaded, args.dataset)
    split = int(tokens.numel() * 0.9)
    train_ids, held_out = tokens[:split], tokens[split:][: args.eval_tokens]
    config = LoraTrainConfig(
        rank=args.rank,
        alpha=args.alpha,
        steps=args.steps,
        learning_rate=args.learning_rate,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
    )
    trainee = copy.deepcopy(served_loaded.model)
    wall, cpu = time.perf_counter(), time.process_time()
    trained = train_lora(
        trainee,
        train_ids,
        config,
        on_step=lambda step, loss: print(
            f"  step {step}: loss {loss:.3f} ({time.perf_counter() - wall:.0f}s)", flush=True
        ),
    )
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    del trainee
    adapter = trained.adapter

    served = ServedModel(served_loaded, max_num_seqs=1, max_model_len=2048)
    served.lora.apply([(1, adapter)])
    base_ppl = served_perplexity(served, held_out, args.seq_len, None)
    tuned_ppl = served_perplexity(served, held_out, args.seq_len, 1)
    served.lora.apply([])
    del served
    results["train"] = {
        "config": config.to_dict(),
        "train_tokens": split,
        "eval_tokens": held_out.numel(),
        "wall_s": round(train_wall, 1),
        "cpu_s": round(train_cpu, 1),
        "first_loss": trained.losses[0],
        "last_loss": trained.losses[-1],
        "base_ppl": round(base_ppl, 3),
        "adapter_ppl": round(tuned_ppl, 3),
        "ppl_reduction": round(1 - tuned_ppl / base_ppl, 4),
    }
    print(json.dumps(results["train"]), flush=True)

    engine = Engine(served_loaded, max_num_seqs=8, max_model_len=1024, num_threads=args.threads)
    engine.start()
    try:
        names = ["shakespeare", "random-1", "random-2"]
        engine.load_adapter(names[0], adapter, "trained")
        for seed, name in enumerate(names[1:], start=1):
            engine.load_adapter(name, random_like(adapter, seed), "random")
        prompt = tokens[split : split + 32].tolist()
        n = args.decode_tokens
        results["decode_batch1"] = compare(
            engine,
            {
                "base": [request(prompt, None, n, 0)],
                "adapter": [request(prompt, names[0], n, 0)],
            },
            args.rounds,
        )
        prompts = [tokens[split + 64 * i : split + 64 * i + 32].tolist() for i in range(8)]
        spread = [None, None, *[name for name in names for _ in range(2)]]
        results["mixed_8_clients"] = compare(
            engine,
            {
                "base": [request(p, None, n, i) for i, p in enumerate(prompts)],
                "base+3_adapters": [
                    request(p, a, n, i)
                    for i, (p, a) in enumerate(zip(prompts, spread, strict=True))
                ],
            },
            args.rounds,
        )
    finally:
        engine.shutdown()
    for part, (new, old) in (
        ("decode_batch1", ("adapter", "base")),
        ("mixed_8_clients", ("base+3_adapters", "base")),
    ):
        figures = results[part]
        figures["ratio_tokens_per_s"] = round(
            figures[new]["tokens_per_s"] / figures[old]["tokens_per_s"], 3
        )
        figures["ratio_cpu_per_token"] = round(
            figures[old]["cpu_s_per_token"] / figures[new]["cpu_s_per_token"], 3
        )
    print(json.dumps(results, indent=2), flush=True)
    if args.output_json:
        args.output_json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
