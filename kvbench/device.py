"""Which device a run uses, and handing memory back between measurements."""

from __future__ import annotations

import gc

from kvbench.errors import KVBenchError


def resolve_device(device: str | None, *, check: bool = True):
    """A torch.device: None or 'auto' is cuda when a GPU is visible, else cpu. `check=False` accepts cuda without a
    visible GPU (a driver listing cells that other machines will run)."""
    import torch

    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise KVBenchError(f"--device '{device}' is not a device; use cpu, cuda or cuda:N") from None
    if check and dev.type == "cuda" and not torch.cuda.is_available():
        raise KVBenchError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    return dev


def free_memory() -> None:
    """Collect garbage and hand the CUDA caching allocator's free blocks back."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release(device) -> None:
    """Hand freed GPU blocks back before the next measurement; on the CPU refcounting has already freed them (and a
    full garbage collection costs a fifth of a second)."""
    if device.type == "cuda":
        free_memory()
