"""GPU benchmarks of fercuda's Canny against kornia, cv2.cuda (if built) and cv2 on the CPU.

Run with pytest-benchmark (benchmarks/gpu_check.sh does):
    python -m pytest benchmarks/bench_canny_gpu.py --benchmark-json=canny.json

pytest-benchmark's own figures are host wall times of a call followed by a synchronize.
The figures to read are in each benchmark's extra_info: GPU medians from triton.testing.do_bench
(CUDA events, warm-up, median), images/s, the fraction of HBM bandwidth reached (bytes in +
out over time, against a device-to-device copy measured in the same run), ratios against the
peers, and differing pixels against cv2.Canny on the CPU. gpu_check.sh prints its `table`.
The settings, FER2013's faces, the peers and the timer are fercuda.compare's (`make compare`'s);
the environment is recorded once (gpu_check.py's environment stage, benchmarks/conftest.py).
"""

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("GPU benchmarks need a CUDA device", allow_module_level=True)

import cv2  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import fercuda  # noqa: E402,F401  (loads the C++ ops)
from fercuda.compare import emit, median_ms, times_ms  # noqa: E402
from fercuda.compare.canny import HIGH, KSIZE, LOW, cv2_canny, fer_images, kornia_canny  # noqa: E402
from fercuda.triton import canny as triton_canny  # noqa: E402
from gpu_cases import CANNY_PICTURES, FER_COUNT  # noqa: E402

try:
    import kornia  # noqa: E402
except ImportError:  # not installed on every GPU machine
    kornia = None


def _stand_in(n, h, w, gen, cells=None, contrast=55.0, noise=4.0):
    """Smooth random images: bicubic-upsampled random cells of the given contrast, plus noise."""
    ch, cw = (cells, cells) if cells else (max(2, h // 12), max(2, w // 12))
    low = torch.rand(n, 1, ch, cw, generator=gen)
    img = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)
    img = (img - img.mean((2, 3), keepdim=True)) / img.std((2, 3), keepdim=True).clamp_min(1e-3)
    img = 128 + contrast * img + noise * torch.randn(n, 1, h, w, generator=gen)
    return img.clamp(0, 255).round().to(torch.uint8)[:, 0]


def _fer_batch():
    faces = fer_images(FER_COUNT, ("train", "test"))
    if faces is not None:
        return torch.from_numpy(faces), "FER2013 train+test"
    # FER2013's two parts differ: at 50/150 (5x5 blur) its 28,709 train images have 1.3 % edge
    # pixels, its 7,178 test images 16.1 %. The stand-in mixes two populations tuned to each
    # (1.5 % and 15.7 %), shuffled, so hysteresis sees the same mix of sparse and busy images.
    gen = torch.Generator().manual_seed(2013)
    smooth = _stand_in(28709, 48, 48, gen, cells=4, contrast=48.0, noise=1.0)
    busy = _stand_in(FER_COUNT - 28709, 48, 48, gen, cells=8, contrast=55.0, noise=4.0)
    mixed = torch.cat([smooth, busy])[torch.randperm(FER_COUNT, generator=gen)]
    return mixed, "stand-in (FER2013 not reachable)"


def _cv2_reference(batch):
    return torch.from_numpy(cv2_canny(batch.numpy()))


def _gpu_ms(fn):
    return median_ms(fn, device="cuda", rep_ms=200)


def _copy_ms(nbytes):
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return _gpu_ms(lambda: dst.copy_(src))


def _sync(fn):
    def run():
        fn()
        torch.cuda.synchronize()

    return run


def _record(benchmark, case, info):
    """The figures into pytest-benchmark's extra_info, and the row printed and kept at once."""
    benchmark.extra_info.update(info)
    emit("canny", case, info["table"], **{k: v for k, v in info.items() if k != "table"})


@pytest.fixture(scope="module")
def fer_batch():
    return _fer_batch()


def test_canny_fer2013_batch(benchmark, fer_batch):
    """All 35,887 48x48 images in one call."""
    host, source = fer_batch
    img = host.cuda()
    ours = lambda: torch.ops.fercuda.canny(img, LOW, HIGH, KSIZE, False, "sobel")  # noqa: E731
    tri = lambda: triton_canny.canny(img, LOW, HIGH)  # noqa: E731
    expected = _cv2_reference(host)
    nbytes = 2 * img.numel()  # uint8 in, uint8 out
    ms = _gpu_ms(ours)
    copy_ms = _copy_ms(img.numel())  # reads and writes the same number of bytes
    triton_ms = _gpu_ms(tri)
    info = {
        "images": source,
        "gpu_ms_median": ms,
        "images_per_s": FER_COUNT / (ms / 1e3),
        "bytes_in_out": nbytes,
        "achieved_GBps": nbytes / (ms / 1e3) / 1e9,
        "copy_GBps": nbytes / (copy_ms / 1e3) / 1e9,
        "fraction_of_copy_bandwidth": copy_ms / ms,
        "triton_gpu_ms_median": triton_ms,
        "triton_over_cuda_time": triton_ms / ms,
        "diff_pixels_cuda_vs_cv2": int((ours().cpu() != expected).sum()),
        "diff_pixels_triton_vs_cv2": int((tri().cpu() != expected).sum()),
        "edge_fraction": float((expected > 0).float().mean()),
    }
    if kornia is not None:
        kornia_ms = _gpu_ms(kornia_canny(img))
        info.update(kornia_gpu_ms_median=kornia_ms, kornia_over_cuda_time=kornia_ms / ms)
    info["table"] = (
        f"FER batch {FER_COUNT}x48x48 ({source}): CUDA {ms * 1e3:.0f} us ({FER_COUNT / ms * 1e3:.3g} img/s, "
        f"{copy_ms / ms:.0%} of copy bandwidth), Triton {triton_ms / ms:.1f}x slower, "
        + (f"kornia {info['kornia_over_cuda_time']:.0f}x slower, " if kornia is not None else "kornia absent, ")
        + f"diff vs cv2: CUDA {info['diff_pixels_cuda_vs_cv2']}, Triton {info['diff_pixels_triton_vs_cv2']}"
    )
    _record(benchmark, f"fer_batch_{FER_COUNT}x48x48", info)
    benchmark.pedantic(_sync(ours), rounds=20, warmup_rounds=3)


@pytest.mark.parametrize("height, width", CANNY_PICTURES)
def test_canny_single_image(benchmark, height, width):
    host = _stand_in(1, height, width, torch.Generator().manual_seed(height))[0]
    img = host.cuda()
    ours = lambda: torch.ops.fercuda.canny(img, LOW, HIGH, KSIZE, False, "sobel")  # noqa: E731
    tri = lambda: triton_canny.canny(img, LOW, HIGH)  # noqa: E731
    expected = _cv2_reference(host.unsqueeze(0))[0]
    ms = _gpu_ms(ours)
    triton_ms = _gpu_ms(tri)
    copy_ms = _copy_ms(img.numel())
    info = {
        "gpu_ms_median": ms,
        "fraction_of_copy_bandwidth": copy_ms / ms,
        "triton_gpu_ms_median": triton_ms,
        "triton_over_cuda_time": triton_ms / ms,
        "diff_pixels_cuda_vs_cv2": int((ours().cpu() != expected).sum()),
        "diff_pixels_triton_vs_cv2": int((tri().cpu() != expected).sum()),
    }
    cpu = host.numpy()
    info["cv2_cpu_ms"] = times_ms(lambda: cv2_canny(cpu), 5, warmup=0)[0]
    if kornia is not None:
        kornia_ms = _gpu_ms(kornia_canny(img))
        info.update(kornia_gpu_ms_median=kornia_ms, kornia_over_cuda_time=kornia_ms / ms)
    if hasattr(cv2, "cuda") and cv2.cuda.getCudaEnabledDeviceCount() > 0:
        gpu_mat = cv2.cuda_GpuMat()
        gpu_mat.upload(cpu)
        gauss = cv2.cuda.createGaussianFilter(cv2.CV_8UC1, cv2.CV_8UC1, (KSIZE, KSIZE), 0)
        detector = cv2.cuda.createCannyEdgeDetector(LOW, HIGH)
        info["cv2_cuda_ms"] = times_ms(lambda: detector.detect(gauss.apply(gpu_mat)).download(), 10, warmup=0,
                                       synchronize=True)[0]
    info["table"] = (
        f"{width}x{height}: CUDA {ms * 1e3:.0f} us, Triton {triton_ms / ms:.1f}x slower, "
        + (f"kornia {info['kornia_over_cuda_time']:.0f}x slower, " if kornia is not None else "kornia absent, ")
        + (f"cv2.cuda {info['cv2_cuda_ms']:.2f} ms, " if "cv2_cuda_ms" in info else "cv2.cuda absent, ")
        + f"cv2 CPU {info['cv2_cpu_ms']:.2f} ms, diff vs cv2: CUDA {info['diff_pixels_cuda_vs_cv2']}, "
        f"Triton {info['diff_pixels_triton_vs_cv2']}"
    )
    _record(benchmark, f"{width}x{height}", info)
    benchmark.pedantic(_sync(ours), rounds=20, warmup_rounds=3)

