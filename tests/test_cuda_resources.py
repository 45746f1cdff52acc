"""Every CUDA kernel of the built extension, read from the library (fercuda.cuda_resources): no
spills, static shared memory within the target's limit, the targets the build names present."""

import pytest

from fercuda import _build_info, cuda_resources

# Stack frame plus local memory a kernel may use, bytes per thread, on either target (cuobjdump does
# not tell spills from local arrays): bounded at what these kernels use today, 0 for all others.
STACK_LIMIT = {"canny_fused_kernel": 16, "dwconv_reduce_kernel": 8, "dwconv_bn_relu6_apply_kernel": 8}

pytestmark = pytest.mark.skipif(not _build_info.WITH_CUDA,
                                reason="fercuda._C was built without CUDA kernels (USE_CUDA=0 or no toolkit)")


@pytest.fixture(scope="module")
def usages():
    try:
        tool = cuda_resources.cuobjdump()
    except RuntimeError as e:
        pytest.skip(f"no cuobjdump to read the kernels with: {e}")
    assert tool
    return cuda_resources.usages()


def test_every_kernel_of_every_target_is_read(usages):
    archs = {u.arch for u in usages}
    assert archs >= {80, 90} or archs == set(), archs
    names = {u.name for u in usages}
    for expected in ("bn_act_reduce_kernel", "bn_act_apply_kernel", "dwconv_reduce_kernel"):
        assert expected in names, sorted(names)


def test_no_kernel_spills_or_passes_the_shared_memory_limit(usages):
    spilling = [f"sm_{u.arch} {u.kernel}: stack {u.stack} B, local {u.local} B" for u in usages
                if u.stack + u.local > STACK_LIMIT.get(u.name, 0)]
    assert not spilling, "\n".join(spilling)
    over = [f"sm_{u.arch} {u.kernel}: {u.shared} B" for u in usages
            if u.shared > cuda_resources.SHARED_LIMITS.get(u.arch, 48 * 1024)]
    assert not over, "\n".join(over)


def test_table_lists_every_kernel(usages):
    text = cuda_resources.table(usages)
    for name in {u.name for u in usages}:
        assert f"`{name}`" in text
