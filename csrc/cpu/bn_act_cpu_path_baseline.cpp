// BatchNorm + activation + add, the baseline path: x86-64 (SSE2), or any other architecture.
#include "bn_act_cpu_path_prelude.h"

#define FERCUDA_BN_ACT_PATH_FN path_baseline
#include "bn_act_cpu_compute.h"
