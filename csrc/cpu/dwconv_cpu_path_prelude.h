// Every header that the compute of the fused block uses, included by each path's translation
// unit before its `#pragma GCC target`: what these headers define (inline functions, and the
// templates instantiated from them) is then compiled for the baseline in every unit alike, and
// only the path's own code for its instruction set.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "dwconv_cpu_paths.h"
#include "fercuda/dwconv_math.h"
#include "fercuda/hd.h"
