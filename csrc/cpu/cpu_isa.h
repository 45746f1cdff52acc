// The instruction-set paths of the CPU kernels: what this CPU can run, and which path the
// kernels take. Chosen at run time from what the CPU reports (cpuid, with the OS's support of
// the wider registers), never from the machine that built the library; FERCUDA_CPU_ISA (read
// when the library loads) or fercuda.set_cpu_isa() forces a path the CPU can run.
#pragma once

#include <string>
#include <vector>

namespace fercuda {
namespace cpu {

// Ordered: each path needs the instructions of those before it.
enum class Isa : int {
  kBaseline = 0,    // x86-64 (SSE2), or any other architecture
  kAvx2 = 1,        // x86-64-v3: AVX2, FMA, BMI2, F16C
  kAvx512 = 2,      // x86-64-v4: AVX-512 F, BW, DQ, VL, CD
  kAvx512Bf16 = 3,  // x86-64-v4 and AVX512_BF16 (vcvtneps2bf16, vdpbf16ps)
};

const char* isa_name(Isa isa);
// The paths this CPU can run, in order (baseline first).
std::vector<Isa> supported_isas();
// The widest path this CPU can run.
Isa detected_isa();
// The path the kernels take now.
Isa active_isa();
// Forces a path by name ("baseline", "avx2", "avx512", "avx512_bf16"), or "auto" for the
// detected one; throws std::invalid_argument for an unknown name and std::runtime_error for a
// path this CPU cannot run. Returns the name of the path taken before.
std::string set_isa(const std::string& name);

}  // namespace cpu
}  // namespace fercuda
