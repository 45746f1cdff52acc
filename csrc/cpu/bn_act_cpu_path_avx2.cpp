// BatchNorm + activation + add, the AVX2 path (x86-64-v3: AVX2, FMA, BMI2, F16C).
#include "bn_act_cpu_path_prelude.h"

#if defined(__GNUC__) && defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v3")
#define FERCUDA_BN_ACT_PATH_FN path_avx2
#include "bn_act_cpu_compute.h"
#pragma GCC pop_options
#else
namespace fercuda::bn_act_cpu {
const Path& path_avx2() { return path_baseline(); }
}  // namespace fercuda::bn_act_cpu
#endif
