"""Backend selection: one place, explicit requests fail loudly, auto falls back."""
import os
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
    with pytest.raises(ValueError, match="LLM_KERNELS.*choose one of auto, torch, pytorch, triton, cuda"):
        kernels.get_backend()


def test_unknown_backend_name():
    with pytest.raises(ValueError, match="unknown kernels backend 'tpu'"):
        kernels.set_backend("tpu")


def _import_triton_kernels_under_the_interpreter():
    """Triton decides interpreted-or-compiled when each @triton.jit kernel is decorated, i.e. when the
    backend is first imported: import it now, while TRITON_INTERPRET=1, so that a test which then
    unsets the variable does not leave compiled-mode kernels behind for the CPU tests after it."""
    if os.environ.get("TRITON_INTERPRET"):
        backends._load_backend("triton")


def test_explicit_backend_that_cannot_run_raises_naming_why(monkeypatch):
    _import_triton_kernels_under_the_interpreter()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # without the interpreter Triton needs CUDA tensors
    q = torch.randn(1, 1, 2, 4)
    with kernels.backend("triton"), pytest.raises(kernels.BackendUnavailableError, match="'triton' cannot run causal_attention on cpu: .+CUDA tensors"):
        kernels.causal_attention(q, q, q)


def test_cuda_backend_without_the_extension_raises_naming_why():
    # a machine where kernels._C was never built (or fails to load): import still works, "auto" runs,
    # and asking for "cuda" by name says what is missing and how to build it
    code = (
        "import sys; sys.modules['kernels._C'] = None\n"  # makes `from . import _C` raise ImportError
        "import torch, kernels\n"
        "x = torch.randn(2, 4); w = torch.ones(4); b = torch.zeros(4)\n"
        "kernels.layer_norm(x, w, b)\n"
        "print(kernels.available_backends('cpu')['cuda'])\n"
        "with kernels.backend('cuda'):\n"
        "    kernels.layer_norm(x, w, b)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 1
    assert "kernels._C is not built or failed to load" in result.stdout
    assert "BackendUnavailableError: kernels backend 'cuda' cannot run layer_norm on cpu" in result.stderr
    assert "pip install -e . --no-build-isolation" in result.stderr


def test_available_backends_reports_reasons(monkeypatch):
    _import_triton_kernels_under_the_interpreter()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    report = kernels.available_backends("cpu")
    assert report["torch"] is None and report["pytorch"] is None
    assert set(report) == {"torch", "pytorch", "triton", "cuda"}
    assert isinstance(report["triton"], str) and "CUDA tensors" in report["triton"]
    # the cuda backend runs everywhere its extension is built (C++ CPU kernels); else it says why not
    assert report["cuda"] is None or "kernels._C" in report["cuda"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.available_backends("cpu")["triton"] is None  # the interpreter runs every op on the CPU


@pytest.mark.parametrize("value,on", [("1", True), ("true", True), ("TRUE", True), ("on", True), ("yes", True),
                                      ("0", False), ("false", False), ("off", False), ("", False)])
def test_triton_interpret_is_read_as_triton_reads_it(monkeypatch, value, on):
    """Not only "1": whatever Triton takes as its interpreter switch runs the Triton kernels on the CPU."""
    pytest.importorskip("triton")
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert backends.triton_interpreting() is on is bool(knobs.runtime.interpret)
    reason = kernels.available_backends("cpu")["triton"]
    assert (reason is None) if on else ("CUDA tensors" in reason)


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


def test_auto_prefers_triton_then_pytorch_on_cuda_and_the_reference_on_cpu(monkeypatch):
    # resolve() only looks at the device type, so this runs without a GPU
    pytest.importorskip("triton")
    cuda = torch.device("cuda")
    assert backends.resolve("layer_norm", cuda) is backends._IMPLS["triton"]["layer_norm"]
    assert backends.resolve("layer_norm", torch.device("cpu")) is backends._IMPLS["torch"]["layer_norm"]
    # a backend that lacks an op is skipped, saying so once, for the next in line
    monkeypatch.delitem(backends._IMPLS["triton"], "cross_entropy")
    monkeypatch.setattr(backends, "_warned", set())
    with pytest.warns(UserWarning, match="auto skips the triton backend for cross_entropy on cuda"):
        assert backends.resolve("cross_entropy", cuda) is backends._IMPLS["pytorch"]["cross_entropy"]


def test_auto_on_an_apple_gpu_runs_pytorchs_own_ops():
    """MPS (and any device type without a list of its own): PyTorch's fused ops, then the reference;
    Triton and the extension never run there, and say why when asked for by name.  A fake device
    object is enough: the choice reads only its type."""
    from kernels import _pytorch_backend  # noqa: F401  (registered)

    for dev in (torch.device("mps"), torch.device("xpu")):
        for op in backends.OPS:
            assert backends.resolve(op, dev) is backends._IMPLS["pytorch"][op], (dev, op)
        assert "CUDA tensors" in backends.unavailable_reason("triton", "layer_norm", dev)
        if backends._load_backend("cuda") is None:
            assert "CUDA and CPU tensors only" in backends.unavailable_reason("cuda", "layer_norm", dev)
    with kernels.backend("triton"), pytest.raises(backends.BackendUnavailableError, match="mps"):
        backends.resolve("layer_norm", torch.device("mps"))
