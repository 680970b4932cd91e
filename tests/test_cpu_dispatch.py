""""auto" on the CPU runs, per op and shape, the backend the measured table says is fastest."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import kernels
from kernels import _cpu_dispatch, backends

CPU = torch.device("cpu")


def _table(tmp_path, ops, name="t.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"format": _cpu_dispatch.FORMAT, "machine": "test", "ops": ops}))
    return path


@pytest.fixture
def use_table(monkeypatch):
    def use(path):
        monkeypatch.setenv("LLM_CPU_DISPATCH", str(path))
        _cpu_dispatch.reset()
    yield use
    monkeypatch.delenv("LLM_CPU_DISPATCH", raising=False)
    _cpu_dispatch.reset()


def test_the_nearest_measured_shape_decides(tmp_path, use_table):
    use_table(_table(tmp_path, {"layer_norm": [
        {"shape": {"M": 256, "C": 128}, "ms": {"torch": 3.0, "pytorch": 1.0, "cuda": 2.0}},
        {"shape": {"M": 256, "C": 768}, "ms": {"torch": 3.0, "pytorch": 2.0, "cuda": 1.0}},
    ]}))
    narrow, wide = torch.randn(4, 64, 100), torch.randn(4, 64, 700)  # M = 256; C nearer 128, nearer 768
    assert backends.resolve("layer_norm", CPU, narrow) is backends._IMPLS["pytorch"]["layer_norm"]
    expect_wide = "cuda" if backends.unavailable_reason("cuda", "layer_norm", CPU) is None else "pytorch"
    assert backends.resolve("layer_norm", CPU, wide) is backends._IMPLS[expect_wide]["layer_norm"]
    assert backends.backend_for("layer_norm", CPU, narrow) == "pytorch"
    # an op the table does not list, another dtype, no tensors: the reference
    assert backends.resolve("cross_entropy", CPU, torch.randn(8, 10)) is backends._IMPLS["torch"]["cross_entropy"]
    assert backends.resolve("layer_norm", CPU, narrow.double()) is backends._IMPLS["torch"]["layer_norm"]
    assert backends.resolve("layer_norm", CPU) is backends._IMPLS["torch"]["layer_norm"]
    # asked for by name, the name wins
    with kernels.backend("torch"):
        assert backends.resolve("layer_norm", CPU, narrow) is backends._IMPLS["torch"]["layer_norm"]


def test_an_unavailable_or_skipped_backend_is_never_chosen(tmp_path, use_table, monkeypatch):
    use_table(_table(tmp_path, {"layer_norm": [
        {"shape": {"M": 8, "C": 8}, "ms": {"torch": 3.0, "pytorch": "skipped: not here", "cuda": 1.0}}]}))
    monkeypatch.setitem(backends._load_reasons, "cuda", "the extension is not built")
    x = torch.randn(8, 8)
    assert backends.resolve("layer_norm", CPU, x) is backends._IMPLS["torch"]["layer_norm"]


def test_a_bad_table_means_the_reference(tmp_path, use_table):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something else", "ops": {}}))
    use_table(bad)
    with pytest.warns(UserWarning, match="not a CPU dispatch table.*auto runs the reference"):
        assert _cpu_dispatch.table() is None
    assert backends.resolve("layer_norm", CPU, torch.randn(8, 8)) is backends._IMPLS["torch"]["layer_norm"]
    use_table(tmp_path / "missing.json")
    with pytest.warns(UserWarning, match="cannot read the CPU dispatch table"):
        assert _cpu_dispatch.table() is None


def test_shape_keys():
    q = torch.randn(2, 3, 5, 8)
    assert _cpu_dispatch.shape_key("causal_attention", q) == {"BH": 6, "T": 5, "D": 8}
    assert _cpu_dispatch.shape_key("layer_norm", torch.randn(2, 5, 16)) == {"M": 10, "C": 16}
    assert _cpu_dispatch.shape_key("cross_entropy", torch.randn(2, 5, 99)) == {"N": 10, "V": 99}
    h, w = torch.randn(2, 5, 16), torch.randn(99, 16)
    assert _cpu_dispatch.shape_key("linear_cross_entropy", h, w) == {"N": 10, "C": 16, "V": 99}
    assert _cpu_dispatch.shape_key("rms_norm", torch.randn(2, 5, 16)) == {"M": 10, "C": 16}
    assert _cpu_dispatch.shape_key("swiglu", torch.randn(2, 5, 24)) == {"M": 10, "C": 24}
    assert _cpu_dispatch.shape_key("rope", q) == {"BH": 6, "T": 5, "D": 8}


def test_the_shipped_table_was_measured_for_every_op_and_backend():
    table = _cpu_dispatch.Table.load(_cpu_dispatch.SHIPPED)
    assert set(table.entries) == set(backends.OPS)
    raw = json.loads(_cpu_dispatch.SHIPPED.read_text())
    assert raw["measured_by"] == "bench/cpu_dispatch.py" and raw["machine"].startswith("CPU")
    for op, rows in table.entries.items():
        assert rows, op
        for shape, ms in rows:
            assert set(ms) == set(_cpu_dispatch.CANDIDATES), (op, shape)
            assert isinstance(ms["torch"], float)  # the reference always runs
            assert all(isinstance(v, float) or v.startswith("skipped: ") for v in ms.values())


def test_the_benchmark_writes_a_table_for_every_op(tmp_path, use_table):
    """bench/cpu_dispatch.py --quick measures every op on every CPU backend and writes a table auto can read."""
    table_path = tmp_path / "table.json"
    result = subprocess.run(
        [sys.executable, "bench/cpu_dispatch.py", "--quick", "--reps", "1", "--write-table", str(table_path),
         "--out", str(tmp_path)],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    use_table(table_path)
    table = _cpu_dispatch.table()
    assert set(table.entries) == set(backends.OPS)
    for op, rows in table.entries.items():
        for _, ms in rows:
            assert isinstance(ms["torch"], float) and ms["torch"] > 0, op
            for name, value in ms.items():  # timed, or skipped with the backend's own reason for this op
                assert isinstance(value, float) or value == f"skipped: {backends.unavailable_reason(name, op, CPU)}"


def test_auto_trains_the_same_model_whatever_it_picks():
    # whichever backends the table picks, a GPT step under auto matches the reference's
    from llm.model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, block_size=16, n_layer=2, n_head=2, n_embd=32))
    x, y = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    losses, grads = {}, {}
    for name in ("auto", "torch"):
        model.zero_grad(set_to_none=True)
        with kernels.backend(name):
            _, loss = model(x, y)
            loss.backward()
        losses[name], grads[name] = loss.detach(), [p.grad.clone() for p in model.parameters()]
    torch.testing.assert_close(losses["auto"], losses["torch"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["auto"], grads["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
