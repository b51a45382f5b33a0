"""Quality, size and speed of quantised models.

`quality_report` is the short check the server attaches to every quantisation
job; `quantizers.evaluation.cli` is the `quantserve eval` benchmark that writes
the method table in docs/benchmarks.md.
"""

from quantizers.evaluation.divergence import DivergenceResult, compare
from quantizers.evaluation.perplexity import PerplexityResult, perplexity, split_windows
from quantizers.evaluation.report import quality_report
from quantizers.evaluation.size import SizeReport, linear_weight_counts, size_report
from quantizers.evaluation.speed import DecodeSpeed, decode_speed, greedy_decode
from quantizers.evaluation.wikitext import wikitext_tokens

__all__ = [
    "DecodeSpeed",
    "DivergenceResult",
    "PerplexityResult",
    "SizeReport",
    "compare",
    "decode_speed",
    "greedy_decode",
    "linear_weight_counts",
    "perplexity",
    "quality_report",
    "size_report",
    "split_windows",
    "wikitext_tokens",
]
