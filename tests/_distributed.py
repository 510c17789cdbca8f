"""Two gloo ranks for distributed tests: rank 1 in a spawned process, rank 0 in the test's own process.

The test's process has its imports done already, so only rank 1 pays for a
fresh interpreter. The rendezvous timeout is generous: a loaded 2-core
machine can take a minute to start the spawned rank.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
import torch.multiprocessing as mp

TIMEOUT_SECONDS = 300
GLOO_AVAILABLE = dist.is_available() and dist.is_gloo_available()


@contextmanager
def gloo_process_group(rank: int, init_file: str) -> Iterator[None]:
    """A world of two gloo ranks joined through ``init_file``, destroyed on exit."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=TIMEOUT_SECONDS))
    try:
        yield
    finally:
        dist.destroy_process_group()


def run_two_ranks(worker: Callable[[int, str, str], None], tmp_path: Path) -> None:
    """Run ``worker(rank, init_file, results_dir)`` on ranks 0 and 1; fail if rank 1 does not exit cleanly.

    ``worker`` must be a module-level function (the spawned process imports it).
    """
    args = (str(tmp_path / "rendezvous"), str(tmp_path))
    other_rank = mp.get_context("spawn").Process(target=worker, args=(1, *args))
    other_rank.start()
    try:
        worker(0, *args)
    finally:
        other_rank.join(timeout=TIMEOUT_SECONDS)
        if other_rank.is_alive():
            other_rank.kill()
    assert other_rank.exitcode == 0
