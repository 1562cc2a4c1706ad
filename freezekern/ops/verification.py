"""``freezekern verify``: every kernel on this machine checked against an fp64 truth, forward and gradients.

    report = freezekern.verify()          # or: freezekern verify [--json] [--triton-interpret]
    print(report.table()); report.passed

Every op in ``OPS`` (the cosine and logit-lens deviations, the fused linear
cross-entropy's loss and its gradients dh, dW, dbias) runs on every backend
that works here (``KERNELS``: the PyTorch reference, the native C++ kernel,
its CUDA kernel when a GPU is present, Triton on the GPU; the Triton
interpreter on the CPU only when asked), in fp32, bf16 and fp16, on shapes
that catch edge cases (N = 1, D = 59, V = 4099: a multiple of no block size,
rows with an odd stride and a transposed weight). Each result is held to the
test suite's rule (``freezekern.ops.tolerance``): its error against the fp64
truth of the same rounded inputs is at most twice what plain PyTorch gets in
the same dtype, plus a tiny floor.

New kernels are included by registering them: an op with ``register_op``
(its inputs, its plain-PyTorch formula, how a backend runs it), a backend of
an op with ``register_kernel``; the backends named in
``freezekern.ops.IMPLS`` are registered for every op.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from freezekern.ops.tolerance import judge
from freezekern.version import __version__

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_IGNORE = -100


@dataclass(frozen=True)
class Case:
    """One input set of an op: a label for the table and the parameters its ``make`` reads."""

    label: str
    params: dict


@dataclass(frozen=True)
class OpCheck:
    """How to check one op.

    ``make(case, generator)``: the inputs, fp32/int64 on the CPU, contiguous.
    ``plain(inputs)``: plain PyTorch's outputs (name -> tensor) for inputs of
    one floating dtype; fp64 inputs give the truth. ``run(inputs, impl)``: a
    freezekern backend's outputs. ``layout(inputs, case)``: the inputs as the
    case lays them out (strides), values unchanged.
    """

    name: str
    cases: tuple[Case, ...]
    make: Callable[[Case, torch.Generator], dict]
    plain: Callable[[dict], dict]
    run: Callable[[dict, str], dict]
    layout: Callable[[dict, Case], dict] = lambda inputs, case: inputs


@dataclass(frozen=True)
class Kernel:
    """A backend of an op: ``run(inputs) -> outputs`` and ``available(device, dtype) -> str | None`` (why not)."""

    run: Callable[[dict], dict]
    available: Callable[[torch.device, torch.dtype], str | None]


OPS: dict[str, OpCheck] = {}
KERNELS: dict[tuple[str, str], Kernel] = {}
_RUN = {"triton_interpret": False}  # what the running verify() was asked for


def register_op(check: OpCheck) -> Callable[[], None]:
    """Add an op to the check, with a kernel for each backend of ``freezekern.ops.IMPLS``; returns its removal."""
    OPS[check.name] = check
    added = []
    for backend in _builtin_backends():
        if (check.name, backend) not in KERNELS:
            KERNELS[(check.name, backend)] = Kernel(run=_impl_runner(check, backend),
                                                    available=_impl_available(check.name, backend))
            added.append((check.name, backend))

    def remove() -> None:
        OPS.pop(check.name, None)
        for key in added:
            KERNELS.pop(key, None)

    return remove


def register_kernel(op: str, backend: str, run: Callable[[dict], dict],
                    available: Callable[[torch.device, torch.dtype], str | None] | None = None) -> Callable[[], None]:
    """Add a backend of ``op`` (``run(inputs) -> outputs``, the names of ``OPS[op].plain``'s); returns its removal.

    ``available``: None where it runs on that device and dtype, else the
    reason it does not (default: the CPU only).
    """
    if op not in OPS:
        raise KeyError(f"no op {op!r} to check; the ops: {', '.join(OPS)}")
    if (op, backend) in KERNELS:
        raise ValueError(f"{op} already has a backend {backend!r}")
    KERNELS[(op, backend)] = Kernel(run=run, available=available or (
        lambda device, dtype: None if device.type == "cpu" else "registered for the CPU only"))
    return lambda: KERNELS.pop((op, backend), None)


def _builtin_backends() -> tuple[str, ...]:
    from freezekern.ops import IMPLS

    return tuple(b for b in IMPLS if b != "auto")


def _impl_runner(check: OpCheck, impl: str):
    return lambda inputs: check.run(inputs, impl)


def _impl_available(op: str, impl: str):
    def available(device: torch.device, dtype: torch.dtype) -> str | None:
        from freezekern.ops import dispatch

        if impl == "triton" and device.type == "cpu" and not _RUN["triton_interpret"]:
            return "the Triton interpreter runs only when asked (--triton-interpret)"
        try:
            dispatch.resolve_impl(op, impl, device, dtype)
        except RuntimeError as exc:
            return str(exc)
        return None

    return available


# -- the ops ---------------------------------------------------------------------------------

def _odd_rows(t: torch.Tensor) -> torch.Tensor:
    """The same values with an odd row stride (a slice of a wider matrix)."""
    wide = t.new_zeros(t.shape[0], t.shape[1] + 3)
    wide[:, : t.shape[1]] = t
    return wide[:, : t.shape[1]]


def _transposed(t: torch.Tensor) -> torch.Tensor:
    """The same values stored column-major."""
    return t.t().contiguous().t()


def _strided(names_rows: tuple[str, ...], names_transposed: tuple[str, ...]):
    def layout(inputs: dict, case: Case) -> dict:
        if not case.params.get("strided"):
            return inputs
        out = dict(inputs)
        for name in names_rows:
            out[name] = _odd_rows(inputs[name])
        for name in names_transposed:
            out[name] = _transposed(inputs[name])
        return out

    return layout


def _norm(h: torch.Tensor, kind: str, weight, bias, eps: float = 1e-6) -> torch.Tensor:
    x = h if h.dtype == torch.float64 else h.float()
    if kind == "rms":
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    else:
        centred = x - x.mean(-1, keepdim=True)
        x = centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + eps)
    x = x * weight.to(x.dtype)
    return x if bias is None else x + bias.to(x.dtype)


def _deviation_inputs(case: Case, gen: torch.Generator, rows_name: str) -> dict:
    p = case.params
    n, d, v = p["n"], p["d"], p["v"]
    target = torch.randint(0, v, (n,), generator=gen)
    if n > 2:
        target[1::3] = -1 if rows_name == "basis" else _IGNORE
    return {
        "h": torch.randn(n, d, generator=gen) * 3 + 0.5,
        rows_name: torch.randn(v, d, generator=gen) * (2 / d**0.5),
        "target": target,
        "bias": torch.randn(v, generator=gen) * 0.5 if p.get("bias") else None,
        "norm_weight": torch.rand(d, generator=gen) + 0.5,
        "norm_bias": torch.randn(d, generator=gen) * 0.1 if p["norm"] == "layer" else None,
    }


def _cosine_plain(inputs: dict) -> dict:
    """Every input upcast to fp32 (fp64 for the truth): the op's definition, which the kernels follow."""
    x = _norm(inputs["h"], inputs["norm"], inputs["norm_weight"], inputs["norm_bias"])
    target = inputs["target"]
    rows = inputs["basis"].to(x.dtype)[target.clamp(min=0)]
    cos = (x * rows).sum(-1) / (x.norm(dim=-1) * rows.norm(dim=-1)).clamp_min(1e-30)
    return {"deviation": torch.where(target >= 0, 1.0 - cos, torch.zeros_like(cos))}


def _cosine_run(inputs: dict, impl: str) -> dict:
    from freezekern.ops import cosine_deviation

    return {"deviation": cosine_deviation(inputs["h"], inputs["basis"], inputs["target"], norm=inputs["norm"],
                                          norm_weight=inputs["norm_weight"], norm_bias=inputs["norm_bias"],
                                          impl=impl)}


def _lens_plain(inputs: dict) -> dict:
    """As a model computes it in the inputs' dtype: the norm's output in that dtype, the logits of an nn.Linear
    in that dtype, the cross-entropy on logits upcast to fp32 (Hugging Face's loss)."""
    h = inputs["h"]
    x = _norm(h, inputs["norm"], inputs["norm_weight"], inputs["norm_bias"]).to(h.dtype)
    bias = inputs["bias"]
    logits = F.linear(x, inputs["weight"].to(h.dtype), None if bias is None else bias.to(h.dtype))
    if logits.dtype != torch.float64:
        logits = logits.float()
    target = inputs["target"]
    counted = target != _IGNORE
    picked = logits.gather(1, torch.where(counted, target, 0)[:, None]).squeeze(1)
    deviation = torch.logsumexp(logits, dim=-1) - picked
    return {"deviation": torch.where(counted, deviation, torch.zeros_like(deviation))}


def _lens_run(inputs: dict, impl: str) -> dict:
    from freezekern.ops import logit_lens_deviation

    return {"deviation": logit_lens_deviation(inputs["h"], inputs["weight"], inputs["target"], bias=inputs["bias"],
                                              norm=inputs["norm"], norm_weight=inputs["norm_weight"],
                                              norm_bias=inputs["norm_bias"], impl=impl)}


def _lce_inputs(case: Case, gen: torch.Generator) -> dict:
    p = case.params
    n, d, v = p["n"], p["d"], p["v"]
    target = torch.randint(0, v, (n,), generator=gen)
    if n > 2:
        target[::3] = _IGNORE
    return {
        "h": torch.randn(n, d, generator=gen) * 2,
        "weight": torch.randn(v, d, generator=gen) * (2 / d**0.5),
        "bias": torch.randn(v, generator=gen) * 0.5 if p.get("bias") else None,
        "target": target,
        "upstream": torch.rand(n, generator=gen) + 0.5,  # the gradient flowing into a per-row loss
    }


def _lce_grads(loss: torch.Tensor, inputs: dict, leaves: dict) -> dict:
    upstream = torch.tensor(1.7) if loss.dim() == 0 else inputs["upstream"]
    names = [k for k in ("h", "weight", "bias") if leaves.get(k) is not None]
    grads = torch.autograd.grad(loss, [leaves[k] for k in names], upstream.to(loss.device, loss.dtype))
    out = {"loss": loss.detach()}
    out.update({{"h": "dh", "weight": "dW", "bias": "dbias"}[k]: g for k, g in zip(names, grads)})
    return out


def _lce_leaves(inputs: dict) -> dict:
    """Differentiable copies of the floating inputs that keep their strides (views of fresh leaves)."""
    leaves = {}
    for name in ("h", "weight", "bias"):
        t = inputs[name]
        if t is None:
            continue
        base = t.detach().clone() if t.is_contiguous() else None
        if base is None:  # keep the layout: a view of a leaf with the same strides
            wide = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=t.device)
            wide.copy_(t)
            leaves[name] = wide.requires_grad_()
        else:
            leaves[name] = base.requires_grad_()
    return leaves


def _lce_plain(inputs: dict) -> dict:
    leaves = _lce_leaves(inputs)
    h, weight, bias = leaves["h"], leaves["weight"], leaves.get("bias")
    logits = F.linear(h, weight, bias)
    softcap = inputs["softcap"]
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    if logits.dtype != torch.float64:
        logits = logits.float()  # Hugging Face's upcast before the cross-entropy
    loss = F.cross_entropy(logits, inputs["target"], ignore_index=_IGNORE, reduction=inputs["reduction"])
    return _lce_grads(loss, inputs, leaves)


def _lce_run(inputs: dict, impl: str) -> dict:
    from freezekern.ops import linear_cross_entropy

    leaves = _lce_leaves(inputs)
    loss = linear_cross_entropy(leaves["h"], leaves["weight"], inputs["target"], bias=leaves.get("bias"),
                                softcap=inputs["softcap"], reduction=inputs["reduction"], impl=impl)
    return _lce_grads(loss, inputs, leaves)


def _with(make, **fixed):
    def made(case: Case, gen: torch.Generator) -> dict:
        inputs = make(case, gen)
        inputs.update({k: case.params.get(k, v) for k, v in fixed.items()})
        return inputs

    return made


_SHAPES = ((1, 59, 4099), (37, 59, 4099))


def _cases(**options) -> tuple[Case, ...]:
    cases = []
    for (n, d, v), strided in zip(_SHAPES, (False, True)):
        label = f"N={n} D={d} V={v}" + (" strided" if strided else "")
        cases.append(Case(label, {"n": n, "d": d, "v": v, "strided": strided,
                                  **{k: pair[strided] for k, pair in options.items()}}))
    return tuple(cases)


register_op(OpCheck(
    name="cosine_deviation",
    cases=_cases(norm=("rms", "layer")),
    make=_with(lambda case, gen: _deviation_inputs(case, gen, "basis"), norm=None),
    plain=_cosine_plain, run=_cosine_run, layout=_strided(("h",), ("basis",)),
))
register_op(OpCheck(
    name="logit_lens_deviation",
    cases=_cases(norm=("rms", "layer"), bias=(False, True)),
    make=_with(lambda case, gen: _deviation_inputs(case, gen, "weight"), norm=None),
    plain=_lens_plain, run=_lens_run, layout=_strided(("h",), ("weight",)),
))
register_op(OpCheck(
    name="linear_cross_entropy",
    cases=_cases(reduction=("sum", "none"), softcap=(None, 5.0), bias=(False, True)),
    make=_with(_lce_inputs, reduction=None, softcap=None),
    plain=_lce_plain, run=_lce_run, layout=_strided(("h",), ("weight",)),
))


# -- running ---------------------------------------------------------------------------------

@dataclass
class Row:
    """One output of one op on one backend, dtype and shape."""

    op: str
    backend: str
    dtype: str
    shape: str
    error: float
    bound: float
    passed: bool
    note: str = ""


@dataclass
class VerifyReport:
    """The rows, the backends that could not run here and why, the machine."""

    rows: list[Row] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if not r.passed]

    def to_dict(self) -> dict:
        return {"passed": self.passed, "machine": self.machine, "seconds": round(self.seconds, 2),
                "rows": [{k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                          for k, v in asdict(r).items()} for r in self.rows],
                "skipped": self.skipped}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self) -> str:
        header = ("op", "backend", "dtype", "shape", "max error", "bound", "pass")
        lines = [header] + [(r.op, r.backend, r.dtype, r.shape, f"{r.error:.3g}", f"{r.bound:.3g}",
                             "ok" if r.passed else "FAIL" + (f" ({r.note})" if r.note else ""))
                            for r in self.rows]
        widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
        text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
        text.insert(1, "  ".join("-" * w for w in widths))
        grouped: dict[tuple[str, str], list[str]] = {}
        for skip in self.skipped:
            ops = grouped.setdefault((skip["backend"], skip["reason"]), [])
            if skip["op"] not in ops:
                ops.append(skip["op"])
        for (backend, reason), ops in grouped.items():
            text.append(f"not run: {backend} for {', '.join(ops)}: {reason}")
        failed = self.failures
        text.append(f"{len(self.rows) - len(failed)} of {len(self.rows)} checks pass ({self.seconds:.1f} s)"
                    + (": every kernel is within the rule" if not failed else
                       "; FAILED: " + ", ".join(sorted({f"{r.op} on {r.backend}" for r in failed}))))
        return "\n".join(text)


def _devices() -> list[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def _backend_label(backend: str, device: torch.device) -> str:
    if backend == "triton" and device.type == "cpu":
        return "triton (interpreter)"
    return f"{backend} ({device.type})"


def _cast(inputs: dict, dtype: torch.dtype, device) -> dict:
    """Floating inputs in ``dtype`` on ``device`` (1-D norm parameters stay fp32 except for the fp64 truth)."""
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor):
            keep = value.dtype.is_floating_point and name.startswith("norm_") and dtype != torch.float64
            value = value.to(device=device, dtype=(value.dtype if not value.dtype.is_floating_point or keep
                                                   else dtype))
        out[name] = value
    return out


def _outputs(kernel: Kernel, inputs: dict) -> tuple[dict | None, str]:
    try:
        return kernel.run(inputs), ""
    except Exception as exc:  # noqa: BLE001 - a kernel that raises fails its rows, named
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"


def verify(*, ops: list[str] | None = None, backends: list[str] | None = None,
           dtypes: tuple[torch.dtype, ...] = DTYPES, triton_interpret: bool = False,
           seed: int = 0) -> VerifyReport:
    """Check every registered op on every backend available here; see the module docstring.

    ``ops`` / ``backends``: a subset by name (default: all registered).
    ``triton_interpret``: also run the Triton kernels in Triton's interpreter
    on the CPU (slow; TRITON_INTERPRET=1 must be set before triton is first
    imported, which the command line does).
    """
    started = time.perf_counter()
    unknown = sorted(set(ops or ()) - set(OPS))
    if unknown:
        raise ValueError(f"no op {', '.join(unknown)} to check; the ops: {', '.join(OPS)}")
    previous, _RUN["triton_interpret"] = _RUN["triton_interpret"], bool(triton_interpret)
    report = VerifyReport(machine=_machine())
    try:
        for name in ops or list(OPS):
            check = OPS[name]
            kernels = {b: k for (op, b), k in KERNELS.items() if op == name and (backends is None or b in backends)}
            for case_index, case in enumerate(check.cases):
                master = check.make(case, torch.Generator().manual_seed(seed * 1000 + case_index))
                for dtype in dtypes:
                    rounded = _cast(master, dtype, "cpu")
                    truth = check.plain(_cast(rounded, torch.float64, "cpu"))
                    for device in _devices():
                        runnable = {}
                        for backend, kernel in kernels.items():
                            reason = kernel.available(device, dtype)
                            if reason is None:
                                runnable[backend] = kernel
                            elif case_index == 0:
                                report.skipped.append({"op": name, "backend": _backend_label(backend, device),
                                                       "dtype": str(dtype).removeprefix("torch."), "reason": reason})
                        if not runnable:
                            continue
                        placed = _cast(rounded, dtype, device)
                        ref = check.plain(placed)
                        laid_out = check.layout(placed, case)
                        for backend, kernel in runnable.items():
                            got, note = _outputs(kernel, laid_out)
                            for output, want in truth.items():
                                row = Row(op=f"{name}:{output}" if len(truth) > 1 else name,
                                          backend=_backend_label(backend, device),
                                          dtype=str(dtype).removeprefix("torch."), shape=case.label,
                                          error=math.inf, bound=math.nan, passed=False, note=note)
                                if got is not None and output not in got:
                                    row.note = f"no output {output!r}"
                                elif got is not None:
                                    verdict = judge(got[output], ref[output], want)
                                    row.error, row.bound, row.passed = verdict.error, verdict.bound, verdict.passed
                                    if got[output].dtype != ref[output].dtype:
                                        row.passed, row.note = False, (f"dtype {got[output].dtype}, PyTorch gives "
                                                                       f"{ref[output].dtype}")
                                report.rows.append(row)
    finally:
        _RUN["triton_interpret"] = previous
    report.seconds = time.perf_counter() - started
    return report


def _machine() -> dict:
    info = {"freezekern": __version__, "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


__all__ = ["DTYPES", "KERNELS", "OPS", "Case", "Kernel", "OpCheck", "Row", "VerifyReport", "register_kernel",
           "register_op", "verify"]
