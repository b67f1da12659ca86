"""Build a CUDA extension from kernels/csrc/ on first use, and cache it.

The .cu files hold kernels and launchers on raw pointers (no torch headers, so nvcc compiles them in seconds and CI can
compile them without a GPU); a small .cpp binding per module checks shapes, devices and dtypes and calls the launchers.
The build folder is named after the sources' hash and the GPU architecture, so a changed source or another GPU gets
its own build, and torch's ninja build is incremental and guarded by a file lock across processes.
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from kvbench.api import KVBenchError

CSRC = Path(__file__).resolve().parent / "csrc"


def _arch_flags() -> list[str]:
    major, minor = torch.cuda.get_device_capability()
    arch = f"{major}{minor}"
    return [f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def build_dir(name: str, sources: list[Path]) -> Path:
    h = hashlib.sha256()
    for src in sorted(sources + list(CSRC.glob("*.cuh")) + list(CSRC.glob("*.h"))):
        h.update(src.name.encode())
        h.update(src.read_bytes())
    major, minor = torch.cuda.get_device_capability()
    root = Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))
    tag = f"{name}-sm{major}{minor}-torch{torch.__version__.split('+')[0]}-{h.hexdigest()[:12]}"
    path = root / "torch_ext" / tag
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load(name: str, *source_names: str):
    """Compile (once) and import the extension `name` built from kernels/csrc/<source_names>."""
    if not torch.cuda.is_available():
        raise KVBenchError(f"the CUDA kernels '{name}' need a CUDA GPU; on the CPU the PyTorch reference runs instead")
    from torch.utils.cpp_extension import load as torch_load

    sources = [CSRC / s for s in source_names]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise FileNotFoundError(f"kernel sources missing: {missing}")
    return torch_load(
        name=name,
        sources=[str(s) for s in sources],
        build_directory=str(build_dir(name, sources)),
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17", "-lineinfo", f"-I{CSRC}", *_arch_flags()],
        extra_include_paths=[str(CSRC)],
        verbose=os.environ.get("KVBENCH_VERBOSE_BUILD") == "1",
    )


def shared_lib(source_name: str) -> ctypes.CDLL:
    """kernels/csrc/<source_name> (a .cu with raw-pointer C entry points) as a shared library, built by nvcc once per
    source and GPU (build_dir names the folder after both) and loaded with ctypes: no torch headers or pybind, so the
    build takes seconds rather than the minute a torch extension takes. The caller declares the argtypes."""
    src = CSRC / source_name
    so = build_dir(src.stem, [src]) / f"{src.stem}.so"
    if not so.exists():
        with open(so.parent / "build.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time across processes; the others then find it
            if not so.exists():
                nvcc = shutil.which("nvcc") or os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin",
                                                           "nvcc")
                tmp = so.with_name(f"{so.name}.{os.getpid()}")
                cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", "-lineinfo", *_arch_flags(),
                       str(src), "-o", str(tmp)]
                r = subprocess.run(cmd, capture_output=True, text=True)
                if r.returncode:
                    raise KVBenchError(f"nvcc could not build {src.name}:\n{r.stderr[-3000:]}")
                tmp.replace(so)
    return ctypes.CDLL(str(so))
