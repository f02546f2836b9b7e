"""Offline SASS of the quantized decode-attention kernel: no GPU, no device time.

  python -m pip install --target /tmp/triton-pkg --no-deps triton   # once; not a project dependency
  python benchmarks/kernel_sass.py --triton /tmp/triton-pkg --format int8 --batch 16 [--options JSON]

Pallas lowers the kernel to Triton IR on any machine (the CPU lowering that `jax.export` runs
for platform "cuda"); a separately installed Triton compiles that IR for sm_90 with the same
num_warps / num_stages and ships `cuobjdump`. The script prints, per loop of the kernel (found
by its backward branch), the instructions one warp issues per iteration and the most common
opcodes, plus the layout conversions in the TTGIR. pip Triton is not the Triton inside jaxlib,
so counts are close to, not equal to, what runs (a comparison with Nsight Compute's count:
docs/kernels.md, section "Reading the kernel's machine code without a GPU"). Files go to --out: .ttir, .ttgir, .ptx, .cubin, .sass.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import export  # noqa: E402
from jax._src.pallas.triton import lowering as triton_lowering  # noqa: E402

from benchmarks.quantized_attention_bench import HQ, D, make_cache  # noqa: E402
from pallas_kernels.quantized_attention import quantized_decode_attention  # noqa: E402

_SASS_LINE = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);")


def triton_ir(fmt: str, batch: int, slots: int, options: dict) -> tuple[str, int, int]:
    """Triton IR of the attention kernel (the first pallas_call the wrapper lowers) and the
    num_warps and num_stages it is compiled with."""
    modules = []
    lower = triton_lowering.lower_jaxpr_to_triton_module

    def capture(*args, **kwargs):
        result = lower(*args, **kwargs)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    triton_lowering.lower_jaxpr_to_triton_module = capture
    try:
        k, v = make_cache(fmt, jax.random.PRNGKey(0), batch, slots)
        q = jnp.zeros((batch, HQ, D), jnp.bfloat16)
        length = jnp.full((batch,), slots, jnp.int32)
        fn = jax.jit(
            lambda q, k, v, n: quantized_decode_attention(
                q, k, v, n, implementation="pallas_gpu", **options
            )
        )
        unchecked = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
        module = export.export(fn, platforms=["cuda"], disabled_checks=unchecked)(
            q, k, v, length
        ).mlir_module()
    finally:
        triton_lowering.lower_jaxpr_to_triton_module = lower
    warps, stages = (int(re.search(rf"{key} = (\d+)", module).group(1))
                     for key in ("num_warps", "num_stages"))
    return modules[0], warps, stages


def loop_mix(sass: str):
    """(start, end, opcode counts) of each loop: the span of a backward branch."""
    instructions = [
        (int(m.group(1), 16), m.group(2).split(".")[0], m.group(3))
        for m in map(_SASS_LINE.match, sass.splitlines())
        if m
    ]
    for address, opcode, rest in instructions:
        target = re.search(r"0x([0-9a-f]+)", rest) if opcode == "BRA" else None
        if target and int(target.group(1), 16) < address:
            start = int(target.group(1), 16)
            body = [op for a, op, _ in instructions if start <= a <= address]
            yield start, address, collections.Counter(body)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--triton", type=Path, required=True, help="folder holding a pip Triton")
    ap.add_argument("--format", default="int4", choices=["int4", "int8", "kivi4", "kivi2", "bf16"])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--slots", type=int, default=32768)
    ap.add_argument("--options", type=json.loads, default={}, help="kernel options (JSON)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/kernel_sass"))
    args = ap.parse_args(argv)

    sys.path.insert(0, str(args.triton))
    import triton  # noqa: PLC0415 (optional, installed by hand)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415

    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{args.format}_b{args.batch}"
    ttir, warps, stages = triton_ir(args.format, args.batch, args.slots, args.options)
    stem.with_suffix(".ttir").write_text(ttir)
    compiled = triton.compile(
        str(stem.with_suffix(".ttir")),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=warps, num_stages=stages),
    )
    for ext in ("ttgir", "ptx"):
        stem.with_suffix(f".{ext}").write_text(compiled.asm[ext])
    stem.with_suffix(".cubin").write_bytes(compiled.asm["cubin"])
    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    sass = subprocess.run(
        [str(cuobjdump), "--dump-sass", str(stem.with_suffix(".cubin"))],
        check=True, capture_output=True, text=True,
    ).stdout
    stem.with_suffix(".sass").write_text(sass)
    print(f"{args.format} batch {args.batch} {json.dumps(args.options)}: {warps} warps,"
          f" {stages} stages, {compiled.metadata.shared} bytes of shared memory; files in {args.out}")
    for start, end, mix in loop_mix(sass):
        top = ", ".join(f"{op} {n}" for op, n in mix.most_common(16))
        print(f"loop {start:#x}-{end:#x}: {sum(mix.values())} instructions per warp: {top}")
    conversions = collections.Counter(
        line.split(": ", 1)[-1].split(" loc(")[0]
        for line in compiled.asm["ttgir"].splitlines()
        if "convert_layout" in line
    )
    for what, n in conversions.most_common():
        print(f"layout conversion x{n}: {what}")


if __name__ == "__main__":
    main()
