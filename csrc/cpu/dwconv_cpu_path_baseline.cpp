// The fused block's baseline path: x86-64 (SSE2), or any other architecture.
#include "dwconv_cpu_path_prelude.h"

#define FERCUDA_DWCONV_PATH_FN path_baseline
#include "dwconv_cpu_compute.h"
