"""Low-bit kernels vs plain float matmul at SmolLM2's linear shapes.

Every runtime module's forward (the path a served model takes) is timed
against nn.functional.linear in float32 and bfloat16 on the same input, in the
same process, interleaved, and reported as speed-up ratios (> 1 means the
kernel is faster), because absolute times on a shared CPU are noise.

    .venv/bin/python bench/kernels_bench.py [--write-docs] [--threads N]

--write-docs replaces the `## Kernels` section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantizers import kernels  # noqa: E402
from quantizers.evaluation.machine import describe_machine  # noqa: E402
from quantizers.runtime import (  # noqa: E402 - after the repo root is importable
    Int4WeightOnlyLinear,
    Int8WeightOnlyLinear,
    W8A8Linear,
)

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]
ROWS = [1, 4, 16, 128, 512]
SECTION = "## Kernels"
FINDINGS = [
    "What the runtime does with this (decided from these measurements):",
    "",
    "- int8 (`int8 module`): quantserve's own kernel (`quantizers/kernels/lowbit.cpp`)",
    "  below `kernels.int8_kernel_rows()` rows. It quantises each activation row",
    "  to 15-bit integer codes (one scale per row; the rounding stays below the",
    "  bf16 rounding the output carries, tested with a 200x outlier column) and",
    "  sums exact integer products: AMX `tdpbssd` on the int8 weight tiles as",
    "  they lie in memory from 4 rows (the codes as two int8 halves),",
    "  AVX512-VNNI `vpdpwssd` below that and where there is no AMX, AVX2",
    "  `vpmaddwd` elsewhere. Every path gives the same bits, so a row's result",
    "  depends neither on its batch nor on the path its batch size picks.",
    "  `int8 module (vnni)` is the same module held to the VNNI path: what a CPU",
    "  without AMX runs. From `int8_kernel_rows()` rows (256 with AMX, else 32)",
    "  the module casts its int8 weight to bfloat16 in chunks of 2048 output rows",
    "  for a bfloat16 matmul. `(stock)` is the module on torch's",
    "  `_weight_int8pack_mm` (where the kernels cannot be built).",
    "- int4 (`int4 g128`, `int4 g32`): the own kernel at every row count where the",
    "  CPU has AVX512-VNNI. It reads torch's CPU packing as it is (no artifact",
    "  change), quantises activation rows as int8 does and sums each group exactly",
    "  in integers: VNNI `vpdpwssd` on the nibbles as int16 pairs, and from 8 rows",
    "  AMX `tdpbssd` on B tiles it builds by interleaving four k's per channel;",
    "  both paths give the same bits. `(stock)` is torch's",
    "  `_weight_int4pack_mm_for_cpu`, which it beats from a few hundred outputs",
    "  up (on the 192-wide projection at one row a call's fixed cost shows).",
    "- torchao 0.18 offers nothing else to run here: its int8/int4 weight-only CPU",
    "  paths call the same aten kernels, and its `da8w4` CPU kernel lives in a C++",
    "  extension this wheel does not ship for CPU.",
    "- W8A8 on `torch._int_mm` quantises activations to 8 bits per token: a",
    "  method with its own measured quality, not a kernel choice of the int8 one.",
]


def time_call(fn: Callable[[], Tensor], budget_s: float) -> float:
    """Median CPU seconds per call over rounds of a few calls each: on a shared
    machine, wall time mostly measures the other processes."""
    fn()
    fn()
    started = time.process_time()
    fn()
    once = max(time.process_time() - started, 1e-6)
    per_round = max(1, int(budget_s / 5 / once))
    rounds = []
    for _ in range(5):
        started = time.process_time()
        for _ in range(per_round):
            fn()
        rounds.append((time.process_time() - started) / per_round)
    return statistics.median(rounds)


def on_stock(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """The module's forward on torch's stock kernels instead of quantserve's."""

    def call(x: Tensor) -> Tensor:
        with kernels.stock():
            return module(x)

    return call


def on_int8_path(module: nn.Module, path: str) -> Callable[[Tensor], Tensor]:
    """The module's forward with the own int8 kernel held to `path`."""

    def call(x: Tensor) -> Tensor:
        with kernels.int8_path(path):
            return module(x)

    return call


def candidates(linear: nn.Linear) -> dict[str, Callable[[Tensor], Tensor]]:
    """The raw int8 kernel and every runtime module (which picks its path by rows),
    the weight-only ones also on torch's stock kernels, and int8 also on the
    VNNI path where AMX is the default."""
    low, high = -4.0, 4.0
    int8 = Int8WeightOnlyLinear.from_float(linear)
    int4 = Int4WeightOnlyLinear.from_float(linear, 128)
    lowered = {}
    if kernels.int8_paths()[-2:] == ["vnni", "amx"]:
        lowered = {"int8 module (vnni)": on_int8_path(int8, "vnni")}
    return {
        "int8 kernel": lambda x: torch.ops.aten._weight_int8pack_mm(x, int8.weight, int8.scale),
        "int8 module (stock)": on_stock(int8),
        **lowered,
        "int8 module": int8,
        "int4 g128 (stock)": on_stock(int4),
        "int4 g128": int4,
        "int4 g32": Int4WeightOnlyLinear.from_float(linear, 32),
        "w8a8 dynamic": W8A8Linear.from_float(linear),
        "w8a8 static": W8A8Linear.from_float(linear, (low, high)),
    }


def run(budget_s: float) -> list[dict[str, object]]:
    rows = []
    torch.manual_seed(0)
    for k, n in SHAPES:
        linear = nn.Linear(k, n, bias=False)
        w32 = linear.weight.detach()
        w16 = w32.to(torch.bfloat16)
        modules = candidates(linear)
        for m in ROWS:
            x32 = torch.randn(m, k)
            x16 = x32.to(torch.bfloat16)
            with torch.no_grad():
                base32 = time_call(lambda x32=x32, w32=w32: F.linear(x32, w32), budget_s)
                base16 = time_call(lambda x16=x16, w16=w16: F.linear(x16, w16), budget_s)
                for name, module in modules.items():
                    t = time_call(lambda module=module, x16=x16: module(x16), budget_s)
                    rows.append({
                        "K": k, "N": n, "M": m, "kernel": name, "us": t * 1e6,
                        "vs_fp32": base32 / t, "vs_bf16": base16 / t,
                        "fp32_us": base32 * 1e6, "bf16_us": base16 * 1e6,
                    })
                    print(f"K={k} N={n} M={m} {name}: {t * 1e6:.0f} us, "
                          f"x{base32 / t:.2f} vs fp32, x{base16 / t:.2f} vs bf16", flush=True)
    return rows


def markdown(rows: list[dict[str, object]], command: str) -> str:
    kernels = list(dict.fromkeys(str(r["kernel"]) for r in rows))
    lines = [
        SECTION,
        "",
        "Speed-up over `F.linear` on the same input (ratio of median CPU times in",
        "one process; > 1 = faster than float). Each cell is `vs fp32 / vs bf16`; inputs",
        "are bfloat16 for the quantised paths. `int8 kernel` is torch's raw",
        "`_weight_int8pack_mm`; every other column is a runtime module's forward, i.e.",
        "the path a served model takes (see below the table).",
        f"Machine: {describe_machine()}.",
        "",
        "Command:",
        "",
        "```",
        command,
        "```",
        "",
        "| K x N | M | fp32 us | bf16 us | " + " | ".join(kernels) + " |",
        "|---|---|---|---|" + "---|" * len(kernels),
    ]
    keyed = {(r["K"], r["N"], r["M"], r["kernel"]): r for r in rows}
    for k, n in SHAPES:
        for m in ROWS:
            first = keyed[(k, n, m, kernels[0])]
            cells = [
                f"{keyed[(k, n, m, name)]['vs_fp32']:.2f} / {keyed[(k, n, m, name)]['vs_bf16']:.2f}"
                for name in kernels
            ]
            lines.append(
                f"| {k} x {n} | {m} | {first['fp32_us']:.0f} | {first['bf16_us']:.0f} | "
                + " | ".join(cells) + " |"
            )
    lines += ["", *FINDINGS]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace (or append) the `## Kernels` section, leaving other sections alone."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        tail = text[end + 1 :] if end >= 0 else ""
        text = text[:start] + section + ("\n" + tail if tail else "")
    path.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python " + " ".join(["bench/kernels_bench.py", *sys.argv[1:]])
    table = markdown(run(args.budget), command)
    print(table)
    if args.write_docs:
        write_section(ROOT / "docs" / "benchmarks.md", table)


if __name__ == "__main__":
    main()
