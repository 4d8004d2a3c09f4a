"""Benchmarks for `vtc eval`: the procedural `vtc-shapes` family and loaders for real benchmark files."""

from . import gqa, mme, pope, scienceqa, shapes, textvqa  # noqa: E402,F401  (registers the benchmarks)
from .base import BENCHMARKS as BENCHMARKS
from .base import Benchmark as Benchmark
from .base import Sample as Sample
from .base import create_benchmark as create_benchmark
from .base import list_benchmarks as list_benchmarks
from .base import normalize_answer as normalize_answer
from .base import register_benchmark as register_benchmark
