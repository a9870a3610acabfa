"""Compile every variant of megatrain's Triton kernels for sm_80 and sm_90 without a GPU (triton.compile with a
GPUTarget): the interpreter runs the kernels' Python, only the compiler sees typing/lowering errors.

    python -m tests.ops.kernel_compile ema          # MEGA's EMA kernels (scan + chunked)
    python -m tests.ops.kernel_compile megalodon    # Megalodon's complex EMA and timestep-norm kernels
One line per compiled variant on stdout. Run in a process that has not imported triton for the interpreter
(tests/ops/test_ema_chunked.py and tests/ops/test_megalodon_kernels.py start it as a subprocess).
"""
import inspect
import sys
from concurrent.futures import ProcessPoolExecutor

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

# u dtype -> (math dtype of every other float pointer, the tensor-core / bf16-gradient flags)
DTYPES = {"bf16": ("fp32", True), "fp32": ("fp32", False), "fp64": ("fp64", False)}


def ema_variants():
    scan = [("_forward_chunk", dict(FINAL=False)), ("_forward_chunk", dict(FINAL=True)),
            ("_backward_chunk", dict(FINAL=False)), ("_backward_chunk", dict(FINAL=True)),
            ("_scan_chunks", dict(BACKWARD=False, HAS_INIT=True)),
            ("_scan_chunks", dict(BACKWARD=True, HAS_INIT=True))]
    chunked = [("_ema_chunked_fwd", {}), ("_ema_chunked_bwd", {})]
    for arch in (80, 90):
        for udt, (mdt, low) in DTYPES.items():
            if udt == "fp64" and arch == 80:
                continue  # fp64 is the CUDA test suite's dtype; the GPU check runs it on sm_90
            for name, flags in scan:
                if name == "_scan_chunks" and udt == "bf16":
                    continue  # never reads u: its fp32 variant is the bf16 run's
                flags = dict(flags, CHUNK=64, BD=32, BN=16, HAS_RESETS=True,
                             GU_BF16=low and flags.get("FINAL", False))
                yield "ema.triton_kernel", name, flags, udt, mdt, arch
            for name, flags in chunked:
                # channel-major (the default layout) everywhere; the in-place [B, L, D] layout for bf16 on sm_90
                for cm in (True, False) if udt == "bf16" and arch == 90 else (True,):
                    yield "ema.triton_chunked", name, dict(flags, C=64, BK=16, BN=16, TC=low, EMULATED=False, CM=cm,
                                                           GU_BF16=low), udt, mdt, arch


def megalodon_variants():
    cema = [("_cema_forward_chunk", dict(FINAL=False)), ("_cema_forward_chunk", dict(FINAL=True)),
            ("_cema_backward_chunk", dict(FINAL=False)), ("_cema_backward_chunk", dict(FINAL=True)),
            ("_cema_scan_chunks", dict(BACKWARD=False, HAS_INIT=True)),
            ("_cema_scan_chunks", dict(BACKWARD=True, HAS_INIT=True))]
    tsn = ["_tsn_summary", "_tsn_normalize", "_tsn_backward_terms", "_tsn_backward_dx"]
    for arch in (80, 90):
        for udt in ("bf16", "fp32"):
            mdt, low = DTYPES[udt]
            for name, flags in cema:
                if name == "_cema_scan_chunks" and udt == "bf16":
                    continue  # never reads u
                flags = dict(flags, CHUNK=64, BD=32, BN=16, HAS_RESETS=True,
                             GU_BF16=low and flags.get("FINAL", False))
                yield "cema.triton_kernel", name, flags, udt, mdt, arch
            for name in tsn:
                # the 1.3B/7B shapes: K = D / G = 32, 8 groups per program; documents and padding on
                flags = dict(CHUNK=64, BG=32, BK=32, HAS_RESETS=True, HAS_MASK=True, ACC=tl.float32,
                             Y_BF16=low, DX_BF16=low)
                yield "tsn.triton_kernel", name, flags, udt, mdt, arch


INTS = {"L", "D", "N", "NC", "PAD", "G", "K"}
U_POINTERS = {"U", "GU", "X", "Y", "DY", "DX"}       # in the input's dtype; every other float pointer: the math's


def compile_one(spec):
    module, name, flags, udt, mdt, arch = spec
    mod = __import__(f"megatrain.ops.{module}", fromlist=["_"])
    fn = getattr(mod, name)
    params = list(inspect.signature(fn.fn).parameters)
    consts = {k: v for k, v in flags.items() if k in params}
    sig = {p: "constexpr" if p in consts else "i32" if p in INTS else "fp32" if p == "eps" else "*i8" if p == "RES"
           else f"*{udt}" if p in U_POINTERS else f"*{mdt}" for p in params}
    src = ASTSource(fn=fn, signature=sig, constexprs={(params.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(num_warps=mod._NUM_WARPS))
    assert compiled.asm["cubin"], spec
    shown = sorted((k, str(v)) for k, v in consts.items())
    return f"compiled sm_{arch} {module}.{name} u={udt} {shown}"


if __name__ == "__main__":
    family = {"ema": ema_variants, "megalodon": megalodon_variants}[sys.argv[1]]
    with ProcessPoolExecutor(2) as pool:
        for line in pool.map(compile_one, list(family())):
            print(line, flush=True)
