"""Backend selection: one place, explicit requests fail loudly, auto falls back."""
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import backends

x, w, b = torch.randn(3, 4), torch.ones(4), torch.zeros(4)


def test_default_is_auto_and_runs_the_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("LLM_KERNELS", raising=False)
    assert kernels.get_backend() == "auto"
    assert backends.resolve("layer_norm", torch.device("cpu")) is kernels.reference.layer_norm


def test_context_manager_sets_and_restores():
    before = kernels.get_backend()
    with kernels.backend("torch"):
        assert kernels.get_backend() == "torch"
        kernels.layer_norm(x, w, b)
    assert kernels.get_backend() == before


def test_env_variable_chooses_and_is_validated(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "torch")
    assert kernels.get_backend() == "torch"
    monkeypatch.setenv("LLM_KERNELS", "fastest")
    with pytest.raises(ValueError, match="LLM_KERNELS.*choose one of auto, torch, triton, cuda"):
        kernels.get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown kernels backend 'tpu'"):
        kernels.set_backend("tpu")


@pytest.mark.parametrize("name", ["triton", "cuda"])
def test_explicit_backend_that_cannot_run_raises_naming_why(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton needs CUDA tensors
    # the "cuda" backend (when built) runs layer_norm and causal_attention on the CPU too: ask it for an op it lacks
    from kernels import backends

    cpu = torch.device("cpu")
    if name == "cuda" and backends.unavailable_reason("cuda", "causal_attention", cpu) is None:
        op = next((op for op in backends.OPS if backends.unavailable_reason("cuda", op, cpu)), None)
        if op is None:
            pytest.skip("the built cuda backend runs every op on the CPU")
        with kernels.backend(name), pytest.raises(kernels.BackendUnavailableError, match=f"'cuda' cannot run {op} on cpu: .+"):
            backends.resolve(op, cpu)
        return
    q = torch.randn(1, 1, 2, 4)
    with kernels.backend(name), pytest.raises(kernels.BackendUnavailableError, match=f"'{name}' cannot run causal_attention on cpu: .+"):
        kernels.causal_attention(q, q, q)


def test_available_backends_reports_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = kernels.available_backends("cpu")
    assert report["torch"] is None
    assert set(report) == {"torch", "triton", "cuda"}
    assert all(isinstance(r, str) and r for n, r in report.items() if n != "torch")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available_backends("cpu")["triton"] is None  # the interpreter runs every op on the CPU


def test_set_backend_persists_until_reset_and_none_returns_to_the_env(monkeypatch):
    monkeypatch.setenv("LLM_KERNELS", "torch")
    try:
        kernels.set_backend("auto")  # an explicit choice beats the environment
        assert kernels.get_backend() == "auto"
        kernels.set_backend("torch")
        assert kernels.get_backend() == "torch"
    finally:
        kernels.set_backend(None)
    assert kernels.get_backend() == "torch"  # back to $LLM_KERNELS
    monkeypatch.delenv("LLM_KERNELS")
    assert kernels.get_backend() == "auto"


def test_register_validates_names():
    with pytest.raises(ValueError, match="unknown op"):
        backends.register("torch", "softmax")
    with pytest.raises(ValueError, match="cannot register for backend 'auto'"):
        backends.register("auto", "layer_norm")


def test_import_needs_no_gpu_and_no_extension():
    # A fresh interpreter that hides CUDA still imports both packages.
    code = "import kernels, llm; import torch; assert not torch.cuda.is_available(); print('ok')"
    env = {"CUDA_VISIBLE_DEVICES": ""}
    import os

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
