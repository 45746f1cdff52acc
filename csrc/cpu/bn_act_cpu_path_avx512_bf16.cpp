// BatchNorm + activation + add, the avx512_bf16 path (x86-64-v4 and AVX512_BF16).
#include "bn_act_cpu_path_prelude.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define FERCUDA_BN_ACT_AVX512_BF16 1
#define FERCUDA_BN_ACT_PATH_FN path_avx512_bf16
#include "bn_act_cpu_compute.h"
#pragma GCC pop_options
#else
namespace fercuda::bn_act_cpu {
const Path& path_avx512_bf16() { return path_avx2(); }
}  // namespace fercuda::bn_act_cpu
#endif
