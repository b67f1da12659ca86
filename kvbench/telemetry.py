"""What the GPU was doing while a cell ran, from NVML (nvidia-ml-py), and where a run's numbers came from.

`Telemetry` samples memory used, power, SM clock, GPU utilization and temperature in a background thread (every 50 ms
by default) and summarises them into the cell's record: a throttled clock or a neighbour's memory shows up next to the
number it spoiled. Where NVML is missing (no driver, the CPU, a container without the library) the summary says
`{"available": false, "reason": ...}` and nothing fails.

`write_provenance` writes `<out>/<suite>.provenance.json` next to the records: command line, commit, GPU, driver, date
and options of every run that appended to them.

    with Telemetry() as tel:
        run_cell()
    metrics["telemetry"] = tel.summary()
"""

from __future__ import annotations

import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kvbench.records import environment, now_iso


def _nvml():
    """The initialised pynvml module, or raise with the reason NVML cannot be used."""
    import pynvml  # nvidia-ml-py

    pynvml.nvmlInit()  # reference-counted; cheap after the first call
    return pynvml


def nvml_handle(device: torch.device | int | None = None):
    """(pynvml, handle) for a torch CUDA device. NVML numbers GPUs ignoring CUDA_VISIBLE_DEVICES, so the GPU is found
    by its UUID or PCI bus id rather than by torch's index."""
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device")
    pynvml = _nvml()
    if device is None:
        index = torch.cuda.current_device()
    elif isinstance(device, int):
        index = device
    else:
        index = torch.device(device).index
        index = torch.cuda.current_device() if index is None else index
    props = torch.cuda.get_device_properties(index)
    tries: list[Callable] = []
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        text = str(uuid)
        tries.append(lambda: pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith(("GPU-", "MIG-")) else
                                                              f"GPU-{text}"))
    if getattr(props, "pci_bus_id", None) is not None:
        bus = f"{getattr(props, 'pci_domain_id', 0):08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        tries.append(lambda: pynvml.nvmlDeviceGetHandleByPciBusId(bus))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        tries.append(lambda: pynvml.nvmlDeviceGetHandleByIndex(index))
    else:
        ids = [s.strip() for s in visible.split(",") if s.strip()]
        if index < len(ids) and ids[index].isdigit():
            tries.append(lambda: pynvml.nvmlDeviceGetHandleByIndex(int(ids[index])))
    last: Exception | None = None
    for t in tries:
        try:
            return pynvml, t()
        except Exception as e:  # noqa: BLE001 - try the next way of naming the GPU
            last = e
    raise RuntimeError(f"NVML cannot find torch's cuda:{index} ({type(last).__name__ if last else 'no id'})")


def nvml_memory_used(device=None) -> int | None:
    """Device memory in use right now per NVML (every process, CUDA contexts included); None without NVML."""
    try:
        pynvml, h = nvml_handle(device)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:  # noqa: BLE001 - NVML is optional
        return None


def unavailable_reason(device=None) -> str | None:
    """None when NVML can sample this device, else one line saying why not."""
    if not torch.cuda.is_available():
        return "no CUDA device (CPU run)"
    try:
        nvml_handle(device)
    except ImportError:
        return "nvidia-ml-py is not installed (pip install nvidia-ml-py)"
    except Exception as e:  # noqa: BLE001
        return f"NVML unavailable: {type(e).__name__}: {e}"
    return None


class Telemetry:
    """Background NVML sampler for the duration of a `with` block.

    Parameters
    ----------
    interval_s : float, default 0.05
        Seconds between samples (NVML's utilization counter itself averages over 1/6 s to 1 s, depending on the GPU).
    device : torch device or index, default the current CUDA device
    """

    FIELDS = ("mem_used", "power_mw", "sm_clock_mhz", "util_pct", "temp_c")

    def __init__(self, interval_s: float = 0.05, device=None):
        self.interval_s, self.device = interval_s, device
        self.samples: list[dict[str, float]] = []
        self.reason: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = self._t1 = 0.0
        self._handle = self._pynvml = None
        self.name: str | None = None

    def __enter__(self) -> "Telemetry":
        self._t0 = time.perf_counter()
        self.reason = unavailable_reason(self.device)
        if self.reason is None:
            try:
                self._pynvml, self._handle = nvml_handle(self.device)
                name = self._pynvml.nvmlDeviceGetName(self._handle)
                self.name = name.decode() if isinstance(name, bytes) else name
            except Exception as e:  # noqa: BLE001 - NVML refused after all: say so
                self.reason = f"NVML unavailable: {type(e).__name__}: {e}"
        if self.reason is None:
            self.sample()  # at least one sample before and one after, however short the block
            self._thread = threading.Thread(target=self._loop, name="kvbench-telemetry", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._t1 = time.perf_counter()
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Take one sample now; fields this GPU does not report are left out (e.g. power under MIG)."""
        nv, h = self._pynvml, self._handle
        s: dict[str, float] = {"t": time.perf_counter()}
        for key, read in (("mem_used", lambda: nv.nvmlDeviceGetMemoryInfo(h).used),
                          ("power_mw", lambda: nv.nvmlDeviceGetPowerUsage(h)),
                          ("sm_clock_mhz", lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
                          ("util_pct", lambda: nv.nvmlDeviceGetUtilizationRates(h).gpu),
                          ("temp_c", lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU))):
            try:
                s[key] = float(read())
            except Exception:  # noqa: BLE001 - not supported here; leave it out
                pass
        self.samples.append(s)

    def summary(self) -> dict[str, Any]:
        """What goes into a record's metrics['telemetry']."""
        if self.reason is not None:
            return {"available": False, "reason": self.reason}
        col = {k: [s[k] for s in self.samples if k in s] for k in self.FIELDS}
        out: dict[str, Any] = {"available": True, "device": self.name, "samples": len(self.samples),
                               "interval_ms": round(self.interval_s * 1e3, 1),
                               "duration_s": round(self._t1 - self._t0, 3)}
        if col["mem_used"]:
            out.update(mem_used_max_bytes=int(max(col["mem_used"])), mem_used_min_bytes=int(min(col["mem_used"])))
        if col["power_mw"]:
            out.update(power_mean_w=statistics.fmean(col["power_mw"]) / 1e3, power_max_w=max(col["power_mw"]) / 1e3)
        if col["sm_clock_mhz"]:
            out.update(sm_clock_median_mhz=statistics.median(col["sm_clock_mhz"]),
                       sm_clock_min_mhz=min(col["sm_clock_mhz"]))
        if col["util_pct"]:
            out.update(util_mean_pct=statistics.fmean(col["util_pct"]))
        if col["temp_c"]:
            out.update(temp_max_c=max(col["temp_c"]))
        return out


def with_telemetry(runner: Callable[[Any], dict], interval_s: float = 0.05) -> Callable[[Any], dict]:
    """Wrap a sweep runner so every cell's metrics carry a `telemetry` summary."""

    def wrapped(cell):
        with Telemetry(interval_s) as tel:
            metrics = runner(cell) or {}
        metrics["telemetry"] = tel.summary()
        return metrics

    return wrapped


def write_provenance(out: str | Path, suite: str, options: dict[str, Any], **extra) -> Path:
    """Append this run's provenance (command, commit, GPU, driver, date, options) to `<out>/<suite>.provenance.json`,
    so results committed under reports/data/<gpu>/ say exactly how they were made."""
    path = Path(out) / f"{suite}.provenance.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    run = {"suite": suite, "date": now_iso(), "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
           "commit": env.get("commit"), "gpu": env.get("gpu"), "driver": env.get("driver"), "torch": env.get("torch"),
           "transformers": env.get("transformers"), "cuda": env.get("cuda"), "host": env.get("host"),
           "records": f"{suite}.jsonl", "options": options, **extra}
    runs = []
    if path.exists():
        try:
            runs = json.loads(path.read_text()).get("runs", [])
        except (json.JSONDecodeError, AttributeError):
            runs = []  # a broken file is replaced, not fatal
    runs.append(run)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"runs": runs}, indent=1, default=str) + "\n")
    os.replace(tmp, path)
    return path
