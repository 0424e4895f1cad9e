"""Device slots: every visible GPU, else CPU workers sharing the cores; overrides checked."""

import pytest

from harness.errors import UserError
from harness.study import scheduler
from harness.study.scheduler import discover_slots

pytestmark = pytest.mark.fast


@pytest.fixture
def gpus(monkeypatch):
    """Pretend this many CUDA devices are visible (CI has none; the GPU path is plain bookkeeping)."""
    def set_count(n):
        monkeypatch.setattr(scheduler, "_cuda_count", lambda: n)
    return set_count


def test_one_slot_per_visible_gpu(gpus, monkeypatch):
    gpus(2)
    monkeypatch.setattr(scheduler.joblib, "cpu_count", lambda: 16)
    slots = discover_slots()
    assert [s.device for s in slots] == ["cuda:0", "cuda:1"] and [s.threads for s in slots] == [8, 8]
    shared = discover_slots("cuda", per_device=2)
    assert [s.device for s in shared] == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert [s.index for s in shared] == [0, 1, 2, 3] and all(s.threads == 4 for s in shared)
    assert [s.device for s in discover_slots("cuda:1")] == ["cuda:1"]


def test_cpu_workers_divide_the_cores(gpus, monkeypatch):
    gpus(0)
    monkeypatch.setattr(scheduler.joblib, "cpu_count", lambda: 8)
    assert [(s.device, s.threads) for s in discover_slots()] == [("cpu", 1)] * 8
    assert [(s.device, s.threads) for s in discover_slots("cpu", per_device=2)] == [("cpu", 4)] * 2


@pytest.mark.parametrize("devices, per_device, message", [
    ("cuda", None, "no CUDA GPU is visible"),
    ("cuda:2", None, "cuda:2 is not visible here (1 GPUs)"),
    ("tpu", None, "'tpu' is not cpu, cuda or cuda:N"),
    ("cpu", 0, "must be at least 1"),
])
def test_bad_device_requests_say_what_is_there(gpus, devices, per_device, message):
    gpus(1 if devices == "cuda:2" else 0)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        discover_slots(devices, per_device)
