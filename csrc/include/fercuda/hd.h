// The two macros of fercuda's shared C++ code, defined once.
//
// FERCUDA_HD marks the per-pixel arithmetic that the CPU and the CUDA kernels share
// (canny_math.h, dwconv_math.h): host and device functions under nvcc, inline functions
// elsewhere (the C++ CPU kernels, and the CPU emulation of the CUDA kernels in the tests).
//
// FERCUDA_SIMD marks the CPU kernels' hot loops: GCC compiles them twice, for x86-64-v3
// (AVX2, FMA, BMI2) and for the baseline, and the loader picks the clone the CPU can run, so
// the library still runs on CPUs without AVX2.
#pragma once

#if defined(__CUDACC__) || defined(__HIPCC__)
#define FERCUDA_HD __host__ __device__ __forceinline__
#else
#define FERCUDA_HD inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__CUDACC__)
#define FERCUDA_SIMD __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define FERCUDA_SIMD
#endif
