// Every header that the compute of BatchNorm + activation + add uses, included by each path's
// translation unit before its `#pragma GCC target`: what these headers define (inline functions,
// and the templates instantiated from them) is then compiled for the baseline in every unit alike,
// and only the path's own code for its instruction set.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "bn_act_cpu_paths.h"
#include "fercuda/bn_act_math.h"
