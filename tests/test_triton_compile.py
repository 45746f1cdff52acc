"""Every Triton kernel of fercuda compiled for the GPUs it targets, sm_90 (H100, H200) and sm_80
(A100), on any machine, a GPU or not: each specialization the ops launch
(fercuda.triton.resources.variants(): every ksize, gradient and norm of Canny, block shape,
dtype, index width, layout and stride of the fused block) compiles, fits in the shared memory a
block may use on the target, and spills no more than SPILL_LIMIT allows.

sm_90 compiles all of them; sm_80, whose code differs little, every Canny variant and the
float32 and bfloat16, int32-index dwconv variants (resources.checked). The kernels compile once
per session, in parallel child processes; Triton's cache keeps them for the next session.
``python -m fercuda.triton.resources`` prints what is measured here (BENCHMARKS.md).
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: fercuda has no Triton kernels to compile")

from fercuda.triton import resources  # noqa: E402

MISSING = resources.missing_toolchain()
needs_toolchain = pytest.mark.skipif(MISSING is not None, reason=f"cannot compile Triton kernels here: {MISSING}")

VARIANTS = resources.variants()
# Stack frame (spilled registers) a kernel may need, bytes per thread, on either target; 0 for
# kernels not named. The one-program Canny kernel: fercuda/triton/canny.py says why. The fused
# block's reductions in NCHW (256 positions of 9 taps a program) and its int64-index stride-2
# apply pass on sm_80 spill a few words at 255 registers; 8 warps instead of 4 still spill 8 B.
SPILL_LIMIT = {"_canny_image_kernel": 16, "_dwconv_reduce_kernel": 32, "_dwconv_bn_relu6_apply_kernel": 8}
JOBS = resources.checked_jobs()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="session")
def compiled():
    return resources.measured(JOBS)


@needs_toolchain
@pytest.mark.parametrize("job", JOBS, ids=[f"sm_{cap}-{VARIANTS[i].key}" for i, cap in JOBS])
def test_kernel_compiles_within_shared_memory_without_spills(job, compiled, record_property):
    index, capability = job
    got = compiled[job]
    for name in ("registers", "stack", "shared", "seconds"):
        record_property(name, getattr(got, name))
    what = f"sm_{capability} {VARIANTS[index].key}"
    assert not got.error, f"{what} does not compile: {got.error}"
    assert got.shared <= resources.TARGETS[capability], (
        f"{what} needs {got.shared} B of shared memory per block, over the {resources.TARGETS[capability]} B the "
        "target has")
    # Spills are reported (BENCHMARKS.md), and bounded where fercuda/triton/canny.py says why
    # the one-program Canny kernel cannot avoid them; the other kernels keep what they have today.
    limit = SPILL_LIMIT.get(VARIANTS[index].kernel, 0)
    assert got.stack <= limit, (
        f"{what} spills: {got.registers} registers and a {got.stack} B stack frame, over the {limit} B allowed")


def test_every_kernel_is_enumerated():
    """Each @triton.jit kernel of the ops' modules has variants: a new kernel cannot go unchecked."""
    from fercuda.triton import bn_act, canny, dwconv

    kernels = {(module.__name__.rsplit(".", 1)[1], name) for module in (canny, dwconv, bn_act)
               for name in dir(module) if name.endswith("_kernel")}
    assert kernels == {(v.module, v.kernel) for v in VARIANTS}


def test_variants_are_distinct_and_name_their_options():
    assert len({(v.kernel, v.args, v.constexprs, v.num_warps) for v in VARIANTS}) == len(VARIANTS)
    assert len({v.key for v in VARIANTS}) == len(VARIANTS)


@needs_toolchain
def test_table_lists_every_kernel(compiled):
    text = resources.table(VARIANTS, compiled, sorted(resources.TARGETS, reverse=True))
    for kernel in {v.kernel for v in VARIANTS}:
        assert f"`{kernel}`" in text
    assert "fails" not in text


# ---- The enumeration against the launches -----------------------------------------------------

_TRITON_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8",
                 torch.int32: "i32"}
# Launch parameters that differ under the interpreter (smaller blocks: each program costs milliseconds).
_INTERPRETER_SIZED = {"BLOCK", "BLOCK_P", "BLOCK_C"}


def _launched(fn, args, kwargs):
    """A launch as {argument: (type, value)}, typed as Triton's JIT types it, and its num_warps
    (None in the interpreter, which drops it)."""
    bound = dict(zip(fn.arg_names, args), **kwargs)
    out = {"num_warps": ("", kwargs.get("num_warps"))}
    for name in fn.arg_names:
        v = bound[name]
        if isinstance(v, torch.Tensor):
            out[name] = ("*" + _TRITON_TYPES[v.dtype], None)
        elif isinstance(v, bool):
            out[name] = ("bool", v)
        elif isinstance(v, int):
            out[name] = ("i64" if not -2**31 <= v < 2**31 else "i32", v)
        else:
            out[name] = ("fp32", v)
    return out


def _matches(variant, launch, interpreted):
    consts = dict(variant.constexprs)
    if launch["num_warps"][1] not in (None, variant.num_warps):
        return False
    for name, kind in variant.args:
        got_kind, got = launch[name]
        if kind == "constexpr":
            if got != consts[name] and not (interpreted and name in _INTERPRETER_SIZED):
                return False
        elif got_kind != kind and not (kind in ("i32", "i64") and got_kind in ("i32", "i64") and got == 1):
            return False
    return True


@pytest.fixture
def launches():
    """Every kernel launch made inside, as (kernel name, {argument: (type, value)})."""
    from fercuda.triton import bn_act, canny, dwconv

    seen, hooked = [], []
    for module in (canny, dwconv, bn_act):
        for name in dir(module):
            fn = getattr(module, name)
            if name.endswith("_kernel") and hasattr(fn, "add_pre_run_hook"):
                def hook(*args, _fn=fn, _name=name, **kwargs):
                    seen.append((_name, _launched(_fn, args, kwargs)))
                fn.add_pre_run_hook(hook)
                hooked.append((fn, hook))
    if not hooked:
        pytest.skip("this Triton has no pre-run hooks on kernels")
    if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("the kernels run on CPU tensors under TRITON_INTERPRET=1 only")
    yield seen
    for fn, hook in hooked:
        fn.pre_run_hooks.remove(hook)


def test_enumeration_holds_every_launch(launches, rng):
    """The ops' launches on a few inputs, each a variant of the enumeration: its argument types,
    the strides it takes as 1 and its constexprs (but the block sizes, smaller in the
    interpreter): what the kernels' launch sites pass and what the enumeration compiles agree."""
    import fercuda.ops as F
    from bn_act_cases import sample_inputs as bn_act_inputs
    from dwconv_cases import sample_inputs
    from canny_reference import smooth_random

    img = smooth_random(rng, (1, 9, 13)).to(DEVICE)
    F.canny(img, 20, 60, backend="triton")
    F.canny(img, 20, 60, ksize=0, l2_gradient=True, gradient="paper", backend="triton")
    F.canny(smooth_random(rng, (1, 40, 70)).to(DEVICE), 20, 60, ksize=3, backend="triton")  # tiled
    for dtype, channels_last, stride, bias in ((torch.float32, False, 1, True), (torch.bfloat16, True, 2, False)):
        inputs = list(sample_inputs(DEVICE, dtype, rng, n=2, c=3, h=5, w=6, channels_last=channels_last, bias=bias,
                                    bn_dtype=torch.float32))
        leaves = [t.requires_grad_() if t is not None and i < 5 else t for i, t in enumerate(inputs)]
        F.dwconv_bn_relu6(*leaves, stride=stride, backend="triton").sum().backward()
        F.dwconv_bn_relu6(*leaves, stride=stride, training=True, backend="triton").sum().backward()
    for dtype, channels_last in ((torch.float32, False), (torch.bfloat16, True)):
        x, weight, bias, rm, rv, res = bn_act_inputs(DEVICE, dtype, rng, n=2, c=3, h=5, w=6,
                                                     channels_last=channels_last, bn_dtype=torch.float32)
        leaves = [t.requires_grad_() for t in (x, weight, bias)]
        for relu6, residual in ((True, None), (False, res)):
            for training in (False, True):
                F.batch_norm_act(*leaves, rm, rv, residual, relu6=relu6, training=training,
                                 backend="triton").sum().backward()
    by_kernel = {}
    for v in VARIANTS:
        by_kernel.setdefault(v.kernel, []).append(v)
    assert {name for name, _ in launches} == set(by_kernel)
    for name, launch in launches:
        assert any(_matches(v, launch, DEVICE == "cpu") for v in by_kernel[name]), (
            f"{name} launched as {launch}, which no variant of fercuda.triton.resources describes")
