"""Small runtime helpers: where a model lives, eval mode, and the CPU numerics a result depends on."""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["NUMERICS_ENV_VARS", "cpu_threads", "eval_mode", "model_device", "model_dtype", "numerics_environment",
           "package_version"]

#: environment variables that change which CPU kernels run, read once when torch loads
#: (docs/reproducibility.md): setting them the same on two machines removes that source of difference
NUMERICS_ENV_VARS: tuple[str, ...] = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS",
                                      "MKL_NUM_THREADS")


@contextmanager
def cpu_threads(count: int | None) -> Iterator[None]:
    """Run torch's CPU kernels with ``count`` threads inside the block (None: leave it as it is).

    Parallel CPU reductions split their work by thread, so the thread count
    changes the order of floating-point sums and therefore the bits of a
    trained model; pinning it makes a seeded training repeatable across
    machines with different core counts (on the same CPU kernels).
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ValueError(f"cpu thread count must be at least 1, got {count}")
    saved = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics_environment() -> dict[str, Any]:
    """What decides the bits of a CPU result besides the code and the seed: recorded with trained models.

    The CPU model and the instruction set torch's vectorised kernels use
    (``torch.backends.cpu.get_cpu_capability``), the thread count, whether
    oneDNN is on, the torch version, and any of :data:`NUMERICS_ENV_VARS` that is set.
    Two runs that agree on all of these give bit-identical models.
    """
    return {
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.is_available() and bool(torch.backends.mkldnn.enabled),
        **{name: os.environ[name] for name in NUMERICS_ENV_VARS if name in os.environ},
    }


def _first_tensor(module: nn.Module) -> torch.Tensor | None:
    tensor: torch.Tensor | None = next(module.parameters(), None)
    if tensor is None:
        tensor = next((b for b in module.buffers() if b is not None), None)
    return tensor


def model_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (CPU for a module without any)."""
    tensor = _first_tensor(module)
    return tensor.device if tensor is not None else torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype of the module's first floating parameter (float32 when none)."""
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put modules in eval mode and restore each submodule's own mode afterwards.

    Scores and fitted statistics must not depend on the rest of the batch, so
    BatchNorm uses running statistics and dropout is off (ODIN pitfall 6).
    """
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for module, training in saved:
            module.training = training


def package_version() -> str:
    """timm-ood's installed version (``timm_ood.__version__``); "0.1.0" when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("timm-ood")
    except PackageNotFoundError:
        return "0.1.0"
