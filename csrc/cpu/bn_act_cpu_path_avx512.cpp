// BatchNorm + activation + add, the avx512 path (x86-64-v4: AVX-512 F, BW, DQ, VL, CD).
#include "bn_act_cpu_path_prelude.h"

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define FERCUDA_BN_ACT_AVX512_BF16 0
#define FERCUDA_BN_ACT_PATH_FN path_avx512
#include "bn_act_cpu_compute.h"
#pragma GCC pop_options
#else
namespace fercuda::bn_act_cpu {
const Path& path_avx512() { return path_avx2(); }
}  // namespace fercuda::bn_act_cpu
#endif
