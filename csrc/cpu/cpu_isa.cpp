// Run-time choice of the CPU kernels' instruction-set path (cpu_isa.h).
#include "cpu_isa.h"

#include <atomic>
#include <cstdlib>
#include <stdexcept>

namespace fercuda {
namespace cpu {
namespace {

constexpr const char* kNames[] = {"baseline", "avx2", "avx512", "avx512_bf16"};
constexpr const char* kEnv = "FERCUDA_CPU_ISA";

bool cpu_has(Isa isa) {
#if defined(__GNUC__) && defined(__x86_64__)
  // GCC's __builtin_cpu_supports also checks that the OS saves the registers (XCR0).
  switch (isa) {
    case Isa::kBaseline:
      return true;
    case Isa::kAvx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("bmi2") &&
             __builtin_cpu_supports("f16c");
    case Isa::kAvx512:
      return cpu_has(Isa::kAvx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
             __builtin_cpu_supports("avx512cd");
    case Isa::kAvx512Bf16:
      return cpu_has(Isa::kAvx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return isa == Isa::kBaseline;
#endif
}

Isa parse(const std::string& name, const char* what) {
  if (name == "auto") return detected_isa();
  for (int i = 0; i < 4; ++i)
    if (name == kNames[i]) return static_cast<Isa>(i);
  throw std::invalid_argument(std::string(what) + " must be one of 'auto', 'baseline', 'avx2', 'avx512', " +
                              "'avx512_bf16', got '" + name + "'");
}

Isa checked(Isa isa, const char* what) {
  if (!cpu_has(isa)) {
    std::string can;
    for (Isa s : supported_isas()) can += std::string(can.empty() ? "" : ", ") + "'" + isa_name(s) + "'";
    throw std::runtime_error(std::string(what) + ": this CPU cannot run the '" + isa_name(isa) +
                             "' path; it runs " + can);
  }
  return isa;
}

Isa initial_isa() {
  const char* env = std::getenv(kEnv);
  if (env == nullptr || *env == '\0') return detected_isa();
  const std::string what = std::string("environment variable ") + kEnv;
  return checked(parse(env, what.c_str()), what.c_str());
}

std::atomic<int>& active() {
  // Read at first use, i.e. when the library loads (fercuda._C asks for it then), so a bad
  // value fails the import with its message.
  static std::atomic<int> isa{static_cast<int>(initial_isa())};
  return isa;
}

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

std::vector<Isa> supported_isas() {
  std::vector<Isa> out;
  for (int i = 0; i < 4; ++i)
    if (cpu_has(static_cast<Isa>(i))) out.push_back(static_cast<Isa>(i));
  return out;
}

Isa detected_isa() { return supported_isas().back(); }

Isa active_isa() { return static_cast<Isa>(active().load(std::memory_order_relaxed)); }

std::string set_isa(const std::string& name) {
  const Isa isa = checked(parse(name, "fercuda.set_cpu_isa: argument 'isa'"), "fercuda.set_cpu_isa");
  return isa_name(static_cast<Isa>(active().exchange(static_cast<int>(isa))));
}

}  // namespace cpu
}  // namespace fercuda
