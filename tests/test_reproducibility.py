"""A seeded recipe trains to the same bits in two fresh processes, whatever the caller's thread setting.

What makes the same seeded recipe give another model elsewhere, measured on
this project's 2-core machine (``docs/reproducibility.md``): the thread count,
the instruction set of ATen's kernels (``ATEN_CPU_CAPABILITY``), oneDNN's
(``ONEDNN_MAX_CPU_ISA``) and MKL's code path (``MKL_CBWR``) each change the
trained weights. ``Recipe.num_threads`` pins the first; the others follow the
CPU and are recorded with each reference checkpoint.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from timm_ood._runtime import cpu_threads, numerics_environment

#: trains a small recipe and prints a digest of every weight; argv: caller's thread count, seed
TRAIN_AND_DIGEST = """
import dataclasses, hashlib, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from timm_ood.reference import FAST_RECIPE, train_on_source
recipe = dataclasses.replace(FAST_RECIPE, train_images=512, batch_size=64, seed=int(sys.argv[2]))
model, accuracy = train_on_source(recipe, progress=False)
digest = hashlib.sha256()
for name, tensor in sorted(model.state_dict().items()):
    digest.update(name.encode())
    digest.update(tensor.detach().contiguous().numpy().tobytes())
print(digest.hexdigest(), torch.get_num_threads())
"""


def _train_in_fresh_process(threads: int, seed: int) -> tuple[str, int]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", TRAIN_AND_DIGEST, str(threads), str(seed)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    digest, threads_after = done.stdout.split()[-2:]
    return digest, int(threads_after)


@pytest.mark.slow
@pytest.mark.usefixtures("data_fashion_mnist")
def test_one_recipe_trains_to_identical_weights_in_two_fresh_processes() -> None:
    first, threads_after = _train_in_fresh_process(threads=1, seed=0)
    second, _ = _train_in_fresh_process(threads=2, seed=0)  # another caller setting: the recipe pins its own
    assert first == second
    assert threads_after == 1  # the caller's setting is restored after training
    other_seed, _ = _train_in_fresh_process(threads=1, seed=1)
    assert other_seed != first  # the digest does see the weights


def test_cpu_threads_pins_and_restores() -> None:
    before = torch.get_num_threads()
    with cpu_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with cpu_threads(None):
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="at least 1"), cpu_threads(0):
        pass


def test_numerics_environment_names_what_decides_the_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    record = numerics_environment()
    assert record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert record["threads"] == torch.get_num_threads()
    assert record["MKL_CBWR"] == "AVX2"
    assert isinstance(record["cpu"], str) and record["cpu"]
