"""The device logic of daemon/workers/runtime.py that needs no GPU: which compile
mode runs where, a CUDA device asked for where there is none, pinning
without CUDA, the H2D tally. On a GPU host the same tests run with CUDA
hidden from them where they need it absent (monkeypatched)."""

from __future__ import annotations

import mmap

import pytest
import torch

from daemon.workers.runtime import (
    H2DTimes,
    LoadError,
    Runner,
    is_pinned,
    pin_host_memory,
    resolve_compile,
    unpin_host_memory,
)
from daemon.workers.spec import ModelSpec, TensorDecl

DEVICES = ["cpu", "cuda", "cuda:0", "cuda:1"]
EXPLICIT = ["off", "default", "reduce-overhead", "max-autotune"]


@pytest.mark.parametrize("device", DEVICES)
def test_resolve_compile_auto_is_off_on_cpu_and_default_on_cuda(device):
    want = "off" if device == "cpu" else "default"
    assert resolve_compile("auto", torch.device(device)) == want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", EXPLICIT)
def test_resolve_compile_keeps_an_explicit_mode_on_every_device(device, mode):
    assert resolve_compile(mode, torch.device(device)) == mode


def _spec(device: str, compile_mode: str = "off") -> ModelSpec:
    return ModelSpec(name="demo", version="1", factory="daemon.workers.zoo:mlp_scorer",
                     artifact=None, checkpoint=None,
                     inputs=[TensorDecl("input", "float32", (128,))],
                     single_input=True, device=device, compile=compile_mode, buckets=[1, 2])


@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA absent, on any machine."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_a_cuda_device_without_cuda_is_a_clear_load_error(no_cuda, device):
    with pytest.raises(LoadError, match=rf"device '{device}' is configured but CUDA is not "
                                        r"available on this machine; use devices = \[\"cpu\"\]"):
        Runner(_spec(device)).load()


def test_an_unknown_device_type_is_a_load_error():
    with pytest.raises(LoadError, match="unsupported device 'meta'"):
        Runner(_spec("meta")).load()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA to count its devices")
def test_a_cuda_index_past_the_last_device_is_a_load_error():
    n = torch.cuda.device_count()
    with pytest.raises(LoadError, match=rf"does not exist: this machine has {n} CUDA device"):
        Runner(_spec(f"cuda:{n}")).load()


def test_pinning_without_cuda_says_not_pinned(no_cuda):
    with mmap.mmap(-1, 1 << 16) as mm:
        t = torch.frombuffer(mm, dtype=torch.uint8)
        address = t.data_ptr()
        assert pin_host_memory(address, len(mm)) is False
        assert is_pinned(t) is False
        unpin_host_memory(address)   # a no-op, not an error
        del t


def test_a_cpu_runner_has_no_h2d_tally_and_no_compile_counts():
    r = Runner(_spec("cpu"))
    r.load()
    assert r.stream is None and r.h2d is None and r.compile_counts() is None
    assert r.compile_mode == "off"   # "off" asked; "auto" would give the same on the CPU


def test_h2d_times_by_bucket():
    h = H2DTimes()
    assert h.snapshot() == {"batches": 0, "mean_us": None, "max_us": None, "by_bucket": {}}
    for bucket, ms in ((8, 0.010), (1, 0.004), (8, 0.020), (1, 0.006)):
        h.add(bucket, ms)
    s = h.snapshot()
    assert s["batches"] == 4 and s["mean_us"] == 10.0 and s["max_us"] == 20.0
    assert s["by_bucket"] == {"1": {"batches": 2, "mean_us": 5.0, "max_us": 6.0},
                              "8": {"batches": 2, "mean_us": 15.0, "max_us": 20.0}}
    assert list(s["by_bucket"]) == ["1", "8"]
    h.reset()
    assert h.snapshot()["batches"] == 0
