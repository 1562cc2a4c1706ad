"""freezekern verify: every op and backend against the fp64 truth; a wrong kernel is caught and named."""

import json

import pytest
import torch

import freezekern
from freezekern.cli import main
from freezekern.ops import dispatch, native
from freezekern.ops.verification import KERNELS, OPS, register_kernel, verify

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def report():
    return verify()


def test_every_op_backend_dtype_and_odd_shape_passes_here(report):
    assert report.passed, report.table()
    rows = report.rows
    assert {r.op.split(":")[0] for r in rows} == set(OPS)
    assert {r.op for r in rows if r.op.startswith("linear_cross_entropy")} == {
        f"linear_cross_entropy:{o}" for o in ("loss", "dh", "dW", "dbias")}
    assert {r.dtype for r in rows} == {"float32", "bfloat16", "float16"}
    assert any("N=1 " in r.shape for r in rows) and any("strided" in r.shape for r in rows)
    backends = {r.backend for r in rows}
    assert "torch (cpu)" in backends
    assert ("native (cpu)" in backends) == native.has_op("linear_cross_entropy", "cpu")
    assert all(r.error <= r.bound for r in rows)
    # the Triton interpreter only when asked
    assert "triton (interpreter)" not in backends
    assert any(s["backend"] == "triton (interpreter)" and "--triton-interpret" in s["reason"] for s in report.skipped)
    assert freezekern.verify is verify


def test_every_dispatched_op_and_backend_is_checked():
    dispatched = {op for op, _, _ in dispatch.AUTO_ORDER}
    assert dispatched <= set(OPS)
    for op in OPS:
        assert {b for o, b in KERNELS if o == op} >= {"torch", "native", "triton"}


def _wrong_lens(inputs):
    right = OPS["logit_lens_deviation"].run(inputs, "torch")["deviation"]
    return {"deviation": right * (1 + 1e-3)}  # 0.1 % off: far beyond the rule, small enough to look plausible


def test_a_wrong_kernel_fails_with_its_op_and_backend_named(capsys):
    remove = register_kernel("logit_lens_deviation", "broken", _wrong_lens)
    try:
        report = verify(ops=["logit_lens_deviation"], backends=["broken"], dtypes=(torch.float32,))
        assert not report.passed
        assert {(r.op, r.backend) for r in report.failures} == {("logit_lens_deviation", "broken (cpu)")}
        assert "FAILED: logit_lens_deviation on broken (cpu)" in report.table()
        assert main(["verify", "--op", "logit_lens_deviation"]) == 1
        printed = capsys.readouterr().out
        assert "broken (cpu)" in printed and "FAIL" in printed
        assert main(["verify", "--json", "--op", "logit_lens_deviation"]) == 1
        data = json.loads(capsys.readouterr().out)
        assert data["passed"] is False
        assert [r for r in data["rows"] if not r["passed"]][0]["backend"] == "broken (cpu)"
    finally:
        remove()
    assert ("logit_lens_deviation", "broken") not in KERNELS


def test_a_kernel_that_raises_or_returns_another_dtype_fails():
    def raises(inputs):
        raise RuntimeError("kernel exploded")

    def half(inputs):
        return {"deviation": OPS["cosine_deviation"].run(inputs, "torch")["deviation"].half()}

    removals = [register_kernel("cosine_deviation", "raises", raises),
                register_kernel("cosine_deviation", "half", half)]
    try:
        report = verify(ops=["cosine_deviation"], backends=["raises", "half"], dtypes=(torch.float32,))
    finally:
        for remove in removals:
            remove()
    notes = {r.backend: r.note for r in report.failures}
    assert "kernel exploded" in notes["raises (cpu)"] and "dtype torch.float16" in notes["half (cpu)"]
    assert len(report.failures) == len(report.rows) == 4


def test_cli_verify_json_and_exit_code(capsys):
    assert main(["verify", "--json", "--op", "cosine_deviation"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True and data["rows"]
    assert {"op", "backend", "dtype", "shape", "error", "bound", "passed"} <= set(data["rows"][0])
    assert main(["verify", "--op", "no_such_op"]) == 2
    assert "no op no_such_op" in capsys.readouterr().err
