"""Compile freezekern's Triton kernels ahead of time for NVIDIA GPUs, without one.

Run as a script in a process where TRITON_INTERPRET is unset (the interpreter
replaces triton.language's functions at import):

    python tests/ops/triton_aot.py ARCH [ARCH ...]        # e.g. 80 90

For each kernel variant below (the cosine's norm kinds, dtypes, single/looped
D; each autotune config of the fused linear cross-entropy's forward, which is
also the logit lens, and backward kernels; not every combination of the
optional norm weight and biases) it prints one JSON line: the case, and the
tensor-core instructions found in the PTX (``mma``/``wgmma``), or the compile
error.
"""

from __future__ import annotations

import json
import re
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

from freezekern.ops import triton_common
from freezekern.ops import triton_deviation as td
from freezekern.ops import triton_linear_cross_entropy as tlce

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16"}


def _row_cases():
    for h in ("fp32", "bf16", "fp16"):
        for single, block_d in ((True, 1024), (False, 256)):
            for norm, has_nb in ((0, False), (1, False), (2, True)):
                yield {
                    "kernel": "row", "h": h, "single": single, "norm": norm, "has_nb": has_nb,
                    "constexprs": dict(NORM=norm, HAS_NW=True, HAS_NB=has_nb, SINGLE=single, BLOCK_N=4,
                                       BLOCK_D=block_d),
                    "signature": {
                        "h_ptr": PTR[h], "stride_hn": "i32", "stride_hd": "i32", "nw_ptr": "*fp32",
                        "nb_ptr": "*fp32", "g_ptr": "*fp32", "stride_gm": "i32", "stride_gd": "i32", "M": "i32",
                        "idx_ptr": "*i64", "out_ptr": "*fp32", "N": "i32", "D": "i32", "eps": "fp32",
                    },
                    "num_warps": 4,
                }


def _lce_cases():
    """The fused linear cross-entropy's kernels: the first config with each dtype pairing, soft-capped or
    not, dW asked or not; the forward's first config also in single-pass TF32 (to count its tensor-core
    instructions against); the other autotune configs in bf16 (kept few: each variant costs seconds)."""
    fp32, low = (triton_common.dot_precision(torch.device("cpu"), dt) for dt in (torch.float32, torch.bfloat16))
    kinds = [("fp32", "fp32", fp32), ("fp32", "bf16", fp32), ("bf16", "bf16", low), ("fp16", "fp16", low)]
    common = {"x_ptr": None, "stride_xn": "i32", "stride_xd": "i32", "w_ptr": None, "stride_wv": "i32",
              "stride_wd": "i32", "b_ptr": "*fp32", "t_ptr": "*i64"}
    for kernel, shapes in (("lce_forward", tlce._FORWARD_SHAPES), ("lce_backward", tlce._BACKWARD_SHAPES)):
        for index, config in enumerate(tlce._configs(False, shapes)):
            extra = [("fp32", "fp32", "tf32")] if index == 0 and kernel == "lce_forward" else []
            for x, w, precision in (kinds + extra) if index == 0 else kinds[2:3]:
                for cap, need_w in ((False, True), (True, False)) if index == 0 else ((True, True),):
                    signature = dict(common, x_ptr=PTR[x], w_ptr=PTR[w])
                    constexprs = dict(HAS_BIAS=True, HAS_CAP=cap, DOT_PRECISION=precision, DOT_FP32=False,
                                      **config.kwargs)
                    if kernel == "lce_forward":
                        signature.update({"m_ptr": "*fp32", "s_ptr": "*fp32", "z_ptr": "*fp32", "N": "i32",
                                          "D": "i32", "V": "i32", "V_PER_SPLIT": "i32", "ignore_index": "i32",
                                          "softcap": "fp32", "N_BIN": "i32"})
                    else:
                        signature.update({"lse_ptr": "*fp32", "g_ptr": "*fp32", "dx_ptr": "*fp32", "dw_ptr": "*fp32",
                                          "db_ptr": "*fp32", "N": "i32", "D": "i32", "V": "i32",
                                          "ignore_index": "i32", "softcap": "fp32", "N_BIN": "i32"})
                        constexprs.update(NEED_H=True, NEED_W=need_w, NEED_B=need_w)
                    yield {"kernel": kernel, "x": x, "w": w, "precision": precision, "softcap": cap,
                           "need_w": need_w, **config.kwargs, "constexprs": constexprs, "signature": signature,
                           "num_warps": config.num_warps, "num_stages": config.num_stages}


KERNELS = {"row": td._row_kernel, "lce_forward": tlce._forward_kernel, "lce_backward": tlce._backward_kernel}


def compile_case(case: dict, arch: int) -> dict:
    fn = JITFunction(KERNELS[case["kernel"]])
    signature = dict(case["signature"], **{name: "constexpr" for name in case["constexprs"]})
    options = {"num_warps": case["num_warps"], "num_stages": case.get("num_stages", 1)}
    report = {k: v for k, v in case.items() if k not in ("signature", "constexprs")}
    report["arch"] = arch
    try:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=case["constexprs"]),
                                  target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as exc:  # reported, so the test names the failing variant
        report["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return report
    ptx = compiled.asm["ptx"]
    found = re.findall(r"\b(wgmma\.mma_async\.[\w.]+|mma\.sync\.[\w.]+)", ptx)
    report["mma"] = sorted(set(found))
    report["mma_count"] = len(found)
    return report


def main(argv: list[str]) -> int:
    for arch in (int(a) for a in argv):
        for case in (*_row_cases(), *_lce_cases()):
            print(json.dumps(compile_case(case, arch)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
