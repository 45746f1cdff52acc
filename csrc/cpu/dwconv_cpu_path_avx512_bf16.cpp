// The fused block's avx512_bf16 path (x86-64-v4 and AVX512_BF16): the AVX-512 kernels of
// dwconv_cpu_avx512.h where they apply, the AVX2 path elsewhere.
#include "dwconv_cpu_path_prelude.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define FERCUDA_AVX512_BF16 1
#define FERCUDA_DWCONV_PATH_FN path_avx512_bf16
#include "dwconv_cpu_compute.h"
#pragma GCC pop_options
#else
namespace fercuda::dwconv_cpu {
const Path& path_avx512_bf16() { return path_avx2(); }
}  // namespace fercuda::dwconv_cpu
#endif
