"""``benchmarks/gpu_check.py``, the script a lent GPU machine runs: what it can be checked for without one."""

from __future__ import annotations

from ._benchmarks import BENCHMARKS, benchmark_module


def test_the_tests_it_runs_exist_and_hold_the_tests_it_selects() -> None:
    """Test files move (tests mirror the modules); the GPU run must not find out by collecting nothing."""
    module = benchmark_module("gpu_check")
    repository = BENCHMARKS.parent
    sources = {path: (repository / path).read_text() for path in {*module.CUDA_TESTS, *module.CPU_TESTS}}
    for selection, paths in ((module.CUDA_SELECTION, module.CUDA_TESTS), (module.CPU_SELECTION, module.CPU_TESTS)):
        for name in (part.strip(" ()").split(" and ")[0] for part in selection.split(" or ")):
            assert any(name in sources[path] for path in paths), (name, paths)
