import builtins
import json
import sys
import time
import types

import pytest
import torch

from kvbench import telemetry
from kvbench.telemetry import Telemetry, with_telemetry, write_provenance


def test_cpu_run_says_telemetry_is_unavailable_and_does_not_fail(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with Telemetry(interval_s=0.01) as tel:
        time.sleep(0.02)
    s = tel.summary()
    assert s == {"available": False, "reason": "no CUDA device (CPU run)"}


def test_missing_nvidia_ml_py_is_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_import = builtins.__import__

    def no_pynvml(name, *args, **kwargs):
        if name == "pynvml":
            raise ImportError("No module named 'pynvml'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pynvml)
    with Telemetry() as tel:
        pass
    s = tel.summary()
    assert s["available"] is False and "nvidia-ml-py" in s["reason"]


def test_nvml_that_cannot_start_is_reported(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    fake = types.ModuleType("pynvml")

    def init():
        raise RuntimeError("NVML Shared Library Not Found")

    fake.nvmlInit = init
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    with Telemetry() as tel:
        pass
    s = tel.summary()
    assert s["available"] is False and "NVML Shared Library Not Found" in s["reason"]


class FakeNVML:
    """Just enough of pynvml: memory climbs, power and clock vary, temperature is 'not supported'."""

    NVML_CLOCK_SM = 1
    NVML_TEMPERATURE_GPU = 0

    def __init__(self):
        self.n = 0

    def nvmlDeviceGetName(self, h):
        return b"Fake H100"

    def nvmlDeviceGetMemoryInfo(self, h):
        self.n += 1
        return types.SimpleNamespace(used=self.n * 2**20)

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000 if self.n % 2 else 500_000  # mW

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980

    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50)

    def nvmlDeviceGetTemperature(self, h, which):
        raise RuntimeError("not supported")


def test_sampler_summarises_what_nvml_reports(monkeypatch):
    fake = FakeNVML()
    monkeypatch.setattr(telemetry, "unavailable_reason", lambda device=None: None)
    monkeypatch.setattr(telemetry, "nvml_handle", lambda device=None: (fake, "h0"))
    with Telemetry(interval_s=0.005) as tel:
        time.sleep(0.06)
    s = tel.summary()
    assert s["available"] is True and s["device"] == "Fake H100"
    assert s["samples"] >= 3 and s["samples"] == fake.n
    assert s["mem_used_max_bytes"] == fake.n * 2**20 and s["mem_used_min_bytes"] == 2**20
    assert 300 <= s["power_mean_w"] <= 500 and s["power_max_w"] == 500
    assert s["sm_clock_median_mhz"] == 1980 and s["util_mean_pct"] == 50
    assert "temp_max_c" not in s  # unsupported fields are left out, not invented


def test_with_telemetry_adds_a_summary_to_every_cell(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    wrapped = with_telemetry(lambda cell: {"x": cell})
    m = wrapped(3)
    assert m["x"] == 3 and m["telemetry"]["available"] is False


def test_provenance_appends_one_entry_per_run(tmp_path):
    write_provenance(tmp_path, "kernels", {"contexts": [4096]})
    write_provenance(tmp_path, "kernels", {"contexts": [8192]}, copy_bandwidth={"copy_gbs": 1.0})
    runs = json.loads((tmp_path / "kernels.provenance.json").read_text())["runs"]
    assert [r["options"]["contexts"] for r in runs] == [[4096], [8192]]
    for key in ("command", "commit", "gpu", "date", "torch", "records"):
        assert key in runs[0]
    assert runs[1]["copy_bandwidth"] == {"copy_gbs": 1.0}


@pytest.mark.gpu
def test_real_nvml_samples_the_current_gpu():
    with Telemetry(interval_s=0.02) as tel:
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            x = x @ x / 64
        torch.cuda.synchronize()
    s = tel.summary()
    if not s["available"]:
        pytest.skip(f"NVML not usable here: {s['reason']}")
    assert s["samples"] >= 2 and s["mem_used_max_bytes"] > 0
