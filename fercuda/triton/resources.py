"""Registers, spills and shared memory of fercuda's Triton kernels, compiled for sm_90 and sm_80
without a GPU.

``variants()`` is the one enumeration of the kernel specializations the ops launch on a GPU
(constexprs, argument types, num_warps), read from the launch parameters of
fercuda/triton/canny.py, dwconv.py and bn_act.py; tests/test_triton_compile.py compiles
them and this module's command prints the table:

    python -m fercuda.triton.resources            # markdown, one row per kernel and option set
    python -m fercuda.triton.resources --all      # one row per variant
    python -m fercuda.triton.resources --json     # every variant, for tools

What a variant fixes: every constexpr; the element type of every pointer; int arguments as
int32, or int64 for the element counts that pass 2**31 (INDEX_64, the reductions' positions);
the strides that are 1 in the layout as the constant 1, as Triton specializes them; pointers
16-byte aligned, as torch allocates them. What it leaves generic: the other ints' values (Triton
also specializes ints that are 1 or multiples of 16: shape-dependent, and rarely changes
register use), padding (a constexpr the network uses at 1 only; other values compile alike).

Registers and the stack frame come from the cubin (cuobjdump -res-usage), shared memory from
Triton's metadata. Triton kernels hold no local arrays, so a non-zero stack frame is spilled
registers. Compilation needs Triton's NVIDIA backend (ptxas, bundled with Triton), not a GPU;
under TRITON_INTERPRET=1 (the kernels are then interpreted functions) it runs in a child
process without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import itertools
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

# (compute capability, shared memory a block may use, bytes): the opt-in maximum per block of
# the H100 / H200 and of the A100.
TARGETS = {90: 227 * 1024, 80: 163 * 1024}
WARP_SIZE = 32

_DTYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One compiled form of a kernel: `args` is (name, type) in the kernel's argument order, type
    a Triton signature type ("*fp32", "i32", ...) or "constexpr"; `constexprs` their values."""

    module: str  # "canny", "dwconv" or "bn_act", a module of fercuda.triton
    kernel: str
    args: tuple
    constexprs: tuple
    num_warps: int
    # The launch's options beside the constexprs (dtype, layout, index width), for the table.
    options: tuple = ()

    @property
    def key(self):
        return f"{self.kernel}[{self.label}]"

    @property
    def label(self):
        parts = [f"{k}={_show(v)}" for k, v in self.options]
        parts += [f"{k}={_show(v)}" for k, v in self.constexprs if not _is_unit_stride(k, v, self)]
        return " ".join(parts + [f"num_warps={self.num_warps}"])

    @property
    def group(self):
        """The row of the summary table: the kernel and the constexprs that set its work (block
        shape, kind of pass), over the dtypes, layouts, index widths, strides and Canny options."""
        skip = {"INDEX_64", "CHANNELS_LAST", "STRIDE", "PAD", "BLOCK_P", "BLOCK_C", "BLOCK", "KSIZE", "PAPER", "L2",
                "TILE_H", "TILE_W"}
        parts = [f"{k}={_show(v)}" for k, v in self.constexprs
                 if k not in skip and not _is_unit_stride(k, v, self)]
        return self.kernel, " ".join(parts)


def _show(v):
    return int(v) if isinstance(v, bool) else v


def _is_unit_stride(name, value, variant):
    return value == 1 and dict(variant.args).get(name) == "constexpr" and name.startswith("s")


def _kernel_args(module, kernel):
    fn = getattr(_module(module), kernel)
    return list(fn.arg_names)


def _module(name):
    if name == "canny":
        from fercuda.triton import canny as module
    elif name == "bn_act":
        from fercuda.triton import bn_act as module
    else:
        from fercuda.triton import dwconv as module
    return module


def _variant(module, kernel, types, constexprs, num_warps, options=()):
    """types: argument name -> signature type for the runtime arguments; constexprs: name -> value.
    Every argument of the kernel must be in one of them."""
    names = _kernel_args(module, kernel)
    missing = [n for n in names if n not in types and n not in constexprs]
    if missing:
        raise ValueError(f"{kernel}: no type or value for {missing}")
    args = tuple((n, "constexpr" if n in constexprs else types[n]) for n in names)
    consts = tuple((n, constexprs[n]) for n in names if n in constexprs)
    return Variant(module, kernel, args, consts, num_warps, tuple(options))


# ---- The enumeration --------------------------------------------------------------------------


def _canny_variants():
    canny = _module("canny")
    u8, i32 = "*u8", "*i32"
    out = []
    image = dict(img_ptr=u8, out_ptr=u8, blur_ptr=u8, mag_ptr=i32, state_ptr=u8, H="i32", W="i32", low="i32",
                 high="i32")
    for side in canny._IMAGE_BLOCKS:
        _, warps = canny.image_block(side, side)
        for ksize, paper, l2 in itertools.product((0, 3, 5, 7), (False, True), (False, True)):
            out.append(_variant("canny", "_canny_image_kernel", image,
                                dict(KSIZE=ksize, PAPER=paper, L2=l2, BLOCK_H=side, BLOCK_W=side), warps))
    tile = dict(TILE_H=canny._TILE, TILE_W=canny._TILE)
    warps = canny._TILE_WARPS
    for ksize in (3, 5, 7):
        out.append(_variant("canny", "_blur_rows_tile_kernel", dict(img_ptr=u8, rows_ptr=i32, H="i32", W="i32"),
                            dict(KSIZE=ksize, **tile), warps))
        out.append(_variant("canny", "_blur_cols_tile_kernel", dict(rows_ptr=i32, blur_ptr=u8, H="i32", W="i32"),
                            dict(KSIZE=ksize, **tile), warps))
    for paper, l2 in itertools.product((False, True), (False, True)):
        out.append(_variant("canny", "_magnitude_tile_kernel", dict(blur_ptr=u8, mag_ptr=i32, H="i32", W="i32"),
                            dict(PAPER=paper, L2=l2, **tile), warps))
        out.append(_variant("canny", "_nms_tile_kernel",
                            dict(blur_ptr=u8, mag_ptr=i32, state_ptr=u8, H="i32", W="i32", low="i32", high="i32"),
                            dict(PAPER=paper, L2=l2, **tile), warps))
    out.append(_variant("canny", "_hysteresis_tile_kernel", dict(state_ptr=u8, changed_ptr=i32, H="i32", W="i32"),
                        tile, warps))
    out.append(_variant("canny", "_edges_tile_kernel", dict(state_ptr=u8, out_ptr=u8, H="i32", W="i32"), tile, warps))
    return out


def _strides(prefix, channels_last):
    """Stride arguments (n, c, h, w) of a tensor in a layout: its unit stride the constant 1."""
    unit = "c" if channels_last else "w"
    types = {f"{prefix}{d}": "i32" for d in "nchw" if d != unit}
    return types, {f"{prefix}{unit}": 1}


def _dwconv_variants():
    dwconv = _module("dwconv")
    f32 = "*fp32"
    warps = dwconv._NUM_WARPS
    out = []
    for dtype, channels_last, stride, index_64 in itertools.product(
            _DTYPES, (False, True), (1, 2), (False, True)):
        t = "*" + _DTYPES[dtype]
        layout = dict(dtype=dtype, layout="channels_last" if channels_last else "nchw")
        options = tuple(layout.items()) + (("index", "int64" if index_64 else "int32"),)
        count = "i64" if index_64 else "i32"
        x_types, x_units = _strides("sx", channels_last)
        y_types, y_units = _strides("sy", channels_last)
        conv = dict(CHANNELS_LAST=channels_last, STRIDE=stride, PAD=1)

        # Inference (BatchNorm folded here, conv bias or not) and training pass 2 (scale and shift
        # given, no bias).
        for from_running, has_bias in ((True, True), (True, False), (False, False)):
            types = dict(y_ptr=t, x_ptr=t, w_ptr=t, b_ptr=t if has_bias else f32, p0_ptr=f32, p1_ptr=f32,
                         p2_ptr=f32, p3_ptr=f32, eps="fp32", total=count, C="i32", H="i32", W="i32", HO="i32",
                         WO="i32", **x_types)
            out.append(_variant("dwconv", "_dwconv_bn_relu6_apply_kernel", types,
                                dict(HAS_BIAS=has_bias, FROM_RUNNING=from_running, BLOCK=dwconv._BLOCK["gpu"],
                                     INDEX_64=index_64, **conv, **x_units), warps, options))

        # Reductions: training pass 1 (no bias: the mean absorbs it), backward passes 1 and 2.
        # Positions pass 2**31 only where the elements do: "index" sets their width here.
        block_p, block_c = dwconv._REDUCE_TILE["gpu"][channels_last]
        for kind, has_bias in ((0, False), (1, False), (1, True), (2, False), (2, True)):
            types = dict(slots_ptr=f32, slots_w_ptr=f32, gz_ptr=f32, x_ptr=t, w_ptr=t, b_ptr=t if has_bias else f32,
                         g_ptr=t if kind else f32, bnw_ptr=f32, bnb_ptr=f32, mean_ptr=f32, invstd_ptr=f32,
                         coef_ptr=f32, C="i32", H="i32", W="i32", HO="i32", WO="i32", positions=count, chunk=count,
                         **x_types)
            consts = dict(KIND=kind, HAS_BIAS=has_bias, STRIDE=stride, PAD=1, BLOCK_P=block_p, BLOCK_C=block_c,
                          **x_units)
            if kind:
                types.update(y_types)
                consts.update(y_units)
            else:  # no output read: its strides are 0
                types.update({f"sy{d}": "i32" for d in "nchw"})
            out.append(_variant("dwconv", "_dwconv_reduce_kernel", types, consts, warps, options))

        types = dict(gx_ptr=t, gz_ptr=f32, w_ptr=t, total=count, C="i32", H="i32", W="i32", HO="i32", WO="i32",
                     **y_types)
        out.append(_variant("dwconv", "_dwconv_grad_input_kernel", types,
                            dict(BLOCK=dwconv._grad_input_block("gpu", index_64), INDEX_64=index_64, **conv,
                                 **y_units), warps, options))
    return out


def _bn_act_variants():
    bn_act = _module("bn_act")
    f32 = "*fp32"
    warps = bn_act._NUM_WARPS
    out = []
    for dtype, channels_last, index_64 in itertools.product(_DTYPES, (False, True), (False, True)):
        t = "*" + _DTYPES[dtype]
        options = (("dtype", dtype), ("layout", "channels_last" if channels_last else "nchw"),
                   ("index", "int64" if index_64 else "int32"))
        count = "i64" if index_64 else "i32"
        # The unit stride of the layout is the constant 1: s_p in NCHW, s_c in channels_last.
        strides = dict(s_n="i32", **({"s_p": "i32"} if channels_last else {"s_c": "i32"}))
        units = {"s_c": 1} if channels_last else {"s_p": 1}
        block_p, block_c = bn_act._REDUCE_TILE["gpu"][channels_last]
        for kind, relu6 in ((0, False), (1, False), (1, True)):
            types = dict(part_ptr=f32, x_ptr=t, g_ptr=t, mean_ptr=f32, invstd_ptr=f32, scale_ptr=f32, shift_ptr=f32,
                         C="i32", P="i32", positions=count, chunk=count, **strides)
            out.append(_variant("bn_act", "_bn_act_reduce_kernel", types,
                                dict(KIND=kind, RELU6=relu6, BLOCK_P=block_p, BLOCK_C=block_c, **units), warps,
                                options))
        block = bn_act._BLOCK["gpu"]
        for relu6, residual in itertools.product((False, True), (False, True)):
            types = dict(y_ptr=t, x_ptr=t, r_ptr=t, scale_ptr=f32, shift_ptr=f32, total=count, C="i32", P="i32")
            out.append(_variant("bn_act", "_bn_act_apply_kernel", types,
                                dict(CHANNELS_LAST=channels_last, RELU6=relu6, HAS_RESIDUAL=residual, BLOCK=block),
                                warps, options))
        for relu6 in (False, True):
            types = dict(gx_ptr=t, g_ptr=t, x_ptr=t, mean_ptr=f32, invstd_ptr=f32, scale_ptr=f32, shift_ptr=f32,
                         k_ptr=f32, total=count, C="i32", P="i32")
            out.append(_variant("bn_act", "_bn_act_grad_x_kernel", types,
                                dict(CHANNELS_LAST=channels_last, RELU6=relu6, BLOCK=block), warps, options))
    return out


@functools.lru_cache(maxsize=None)
def variants():
    """Every kernel specialization the ops launch on a GPU, as a tuple."""
    return tuple(_canny_variants() + _dwconv_variants() + _bn_act_variants())


def checked(capability, variant):
    """Whether tests/test_triton_compile.py compiles the variant for this target: every variant
    for sm_90; for sm_80, whose code differs little, every Canny variant (where the register
    pressure is) and the float32 and bfloat16 dwconv variants with int32 indices."""
    if capability == 90 or variant.module == "canny":
        return True
    options = dict(variant.options)
    return options["dtype"] in ("float32", "bfloat16") and options["index"] == "int32"


def checked_jobs():
    return [(i, cap) for cap in sorted(TARGETS, reverse=True) for i, v in enumerate(variants()) if checked(cap, v)]


def missing_toolchain():
    """Why the kernels cannot be compiled here, or None."""
    try:
        import triton
        from triton.backends import backends
    except ImportError as e:
        return f"Triton is not installed ({e})"
    if "nvidia" not in backends:
        return f"Triton {triton.__version__} has no NVIDIA backend"
    for tool in ("ptxas", "cuobjdump"):
        try:
            _tool(tool)
        except RuntimeError as e:
            return str(e)
    return None


# ---- Compiling and measuring ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Resources:
    registers: int  # per thread
    stack: int  # bytes per thread: spilled registers
    shared: int  # bytes per block
    seconds: float = 0.0  # to compile (0 where Triton's cache held the kernel)
    error: str = ""  # why the kernel did not compile, or ""

    def over_shared(self, capability):
        return self.shared > TARGETS[capability]


def _tool(name):
    """A CUDA binary tool: Triton's own (knobs, then its bundled copy), else one on PATH."""
    import triton

    try:
        path = getattr(triton.knobs.nvidia, name).path
        if path and os.path.exists(path):
            return path
    except (AttributeError, RuntimeError):
        pass
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if os.path.exists(bundled):
        return bundled
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: neither Triton's NVIDIA backend nor PATH has it")
    return found


def _cubin_usage(cubin, kernel):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    m = re.search(rf"Function {re.escape(kernel)}:\s*REG:(\d+) STACK:(\d+)", text)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line for {kernel}:\n{text}")
    return int(m.group(1)), int(m.group(2))


def _metadata(compiled, field):
    md = compiled.metadata
    return md[field] if isinstance(md, dict) else getattr(md, field)


def _divisibility_attr():
    from triton.backends.compiler import BaseBackend

    parse = getattr(BaseBackend, "parse_attr", None)
    return parse("D") if parse is not None else [["tt.divisibility", 16]]


def compile_variant(variant, capability):
    """The compiled kernel (triton's CompiledKernel) of a variant for sm_<capability>."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = getattr(_module(variant.module), variant.kernel)
    names = [name for name, _ in variant.args]
    signature = dict(variant.args)
    # Keyed by argument path, (index,), which every Triton 3 release takes; names only some.
    constexprs = {(names.index(k),): v for k, v in variant.constexprs}
    aligned = _divisibility_attr()
    attrs = {(i,): aligned for i, (_, t) in enumerate(variant.args) if t.startswith("*")}
    src = triton.compiler.ASTSource(fn, signature, constexprs, attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, WARP_SIZE),
                          options={"num_warps": variant.num_warps})


def measure(variant, capability):
    start = time.perf_counter()
    try:
        compiled = compile_variant(variant, capability)
        registers, stack = _cubin_usage(compiled.asm["cubin"], _metadata(compiled, "name"))
        return Resources(registers, stack, int(_metadata(compiled, "shared")), time.perf_counter() - start)
    except Exception as e:  # noqa: BLE001  (reported per variant: the table and the test name it)
        return Resources(-1, -1, -1, time.perf_counter() - start, f"{type(e).__name__}: {e}".strip()[:2000])


def _measure_one(job):
    index, capability = job
    return index, capability, dataclasses.asdict(measure(variants()[index], capability))


def _needs_child():
    """Compile in a child process where this one cannot: the kernels here are interpreted
    (TRITON_INTERPRET=1), or CUDA is initialized (forked workers must not inherit it)."""
    from fercuda.triton import canny

    torch = sys.modules.get("torch")
    return not hasattr(canny._canny_image_kernel, "cache_key") or (torch is not None and torch.cuda.is_initialized())


def measure_all(jobs, workers=None):
    """{(variant index, capability): Resources} for jobs [(variant index, capability), ...],
    compiled in `workers` processes (default: one per core)."""
    jobs = list(jobs)
    workers = workers or os.cpu_count() or 1
    if _needs_child():
        return _measure_in_child(jobs, workers)
    if workers == 1 or len(jobs) == 1:
        results = map(_measure_one, jobs)
    else:
        # fork: the children inherit the imported kernels (CUDA is not initialized: _needs_child).
        pool = concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"))
        with pool:
            results = list(pool.map(_measure_one, jobs))
    return {(i, cap): Resources(**r) for i, cap, r in results}


def _measure_in_child(jobs, workers):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "fercuda.triton.resources", "--jobs-json", json.dumps(jobs),
           "--workers", str(workers)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"compiling the kernels in a child process failed ({done.returncode}):\n{done.stderr}")
    return {(i, cap): Resources(**r) for i, cap, r in json.loads(done.stdout)}


@functools.lru_cache(maxsize=None)
def _cached(jobs, workers):
    return measure_all(jobs, workers)


def measured(jobs, workers=None):
    """measure_all, computed once per process for the same jobs."""
    return _cached(tuple(tuple(j) for j in jobs), workers)


# ---- The table --------------------------------------------------------------------------------


def _cells(results):
    """registers, stack, shared over a set of variants: a range where they differ."""
    if any(r.error for r in results):
        return ["fails", "", ""]

    def span(values):
        lo, hi = min(values), max(values)
        return str(lo) if lo == hi else f"{lo}-{hi}"

    return [span([r.registers for r in results]), span([r.stack for r in results]),
            span([r.shared for r in results])]


def table(all_variants, results, capabilities, per_variant=False):
    """Markdown: per kernel and option set (or per variant), registers per thread, stack frame
    (spills) and shared memory in bytes for each target."""
    rows = {}
    for i, v in enumerate(all_variants):
        key = (v.kernel, v.label) if per_variant else v.group
        rows.setdefault(key, []).append(i)
    head = ["kernel", "variant" if per_variant else "constexprs", "variants", "num_warps"]
    for cap in capabilities:
        head += [f"sm_{cap} registers", f"sm_{cap} spills (B)", f"sm_{cap} shared (B)"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for (kernel, what), indices in rows.items():
        warps = sorted({all_variants[i].num_warps for i in indices})
        cells = [f"`{kernel}`", what or "-", str(len(indices)), "/".join(map(str, warps))]
        for cap in capabilities:
            got = [results[(i, cap)] for i in indices if (i, cap) in results]
            cells += _cells(got) if got else ["-", "-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=sorted(TARGETS, reverse=True),
                        choices=sorted(TARGETS), help="compute capabilities (default: 90 80)")
    parser.add_argument("--all", action="store_true", help="one row per variant")
    parser.add_argument("--json", action="store_true", help="every result as JSON")
    parser.add_argument("--workers", type=int, default=None, help="compiling processes (default: one per core)")
    parser.add_argument("--jobs-json", help=argparse.SUPPRESS)  # the child process of measure_all
    args = parser.parse_args(argv)
    if args.jobs_json is not None:
        jobs = [tuple(j) for j in json.loads(args.jobs_json)]
        results = measure_all(jobs, args.workers)
        json.dump([[i, cap, dataclasses.asdict(r)] for (i, cap), r in results.items()], sys.stdout)
        return 0
    all_variants = variants()
    results = measure_all([(i, cap) for cap in args.arch for i in range(len(all_variants))], args.workers)
    if args.json:
        json.dump([dict(kernel=all_variants[i].kernel, variant=all_variants[i].label, arch=f"sm_{cap}",
                        **dataclasses.asdict(r)) for (i, cap), r in sorted(results.items())], sys.stdout, indent=1)
        print()
    else:
        import triton

        print(f"Triton {triton.__version__}; {len(all_variants)} variants per target\n")
        print(table(all_variants, results, args.arch, per_variant=args.all))
    failed = [(all_variants[i].key, cap, r.error) for (i, cap), r in results.items() if r.error]
    over = [(all_variants[i].key, cap, r.shared) for (i, cap), r in results.items() if not r.error and
            r.over_shared(cap)]
    for key, cap, error in failed:
        print(f"\nsm_{cap} {key}: does not compile: {error}", file=sys.stderr)
    for key, cap, shared in over:
        print(f"\nsm_{cap} {key}: {shared} B of shared memory, over the {TARGETS[cap]} B a block may use",
              file=sys.stderr)
    return 1 if failed or over else 0


if __name__ == "__main__":
    sys.exit(main())
