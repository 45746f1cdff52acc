// The few CUDA built-ins the Canny kernels use, emulated on the CPU with one std::thread per
// CUDA thread (blocks run one after another), so csrc/cuda/canny_kernels.cuh compiles with a
// host compiler and its results can be compared with cv2 where no GPU is present. Barriers
// and warp shuffles are real rendezvous of those threads, so ordering bugs between stages
// show up as wrong pixels, not silently.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cstdint>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
#define __shared__
#define __align__(n) __attribute__((aligned(n)))

using std::max;
using std::min;

struct dim3 {
  unsigned int x = 1, y = 1, z = 1;
};

struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline uint4 make_uint4(unsigned int x, unsigned int y, unsigned int z, unsigned int w) { return {x, y, z, w}; }

namespace emu {
inline thread_local dim3 thread_idx, block_idx;
inline dim3 block_dim, grid_dim;
inline std::barrier<>* block_barrier = nullptr;
inline std::barrier<>* warp0_barrier = nullptr;  // warp-level built-ins: warp 0 only
inline uint64_t warp_slots[32];

inline int lane() { return static_cast<int>(thread_idx.x & 31); }

template <class T>
T shuffle_from(T v, int src) {
  warp_slots[lane()] = static_cast<uint64_t>(v);
  warp0_barrier->arrive_and_wait();
  const T r = static_cast<T>(warp_slots[src]);
  warp0_barrier->arrive_and_wait();
  return r;
}

// Runs body() as grid.x blocks of block.x threads, one block after the other.
template <class F>
void launch(unsigned int grid, unsigned int block, F&& body) {
  grid_dim = {grid, 1, 1};
  block_dim = {block, 1, 1};
  for (unsigned int b = 0; b < grid; ++b) {
    std::barrier<> bar(block);
    std::barrier<> warp_bar(std::min(block, 32u));
    block_barrier = &bar;
    warp0_barrier = &warp_bar;
    std::vector<std::thread> threads;
    for (unsigned int t = 0; t < block; ++t) {
      threads.emplace_back([&body, b, t] {
        thread_idx = {t, 0, 0};
        block_idx = {b, 0, 0};
        body();
      });
    }
    for (auto& th : threads) th.join();
  }
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_sync(unsigned, T v, int src) {
  return emu::shuffle_from(v, src);
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int src = emu::lane() - static_cast<int>(d);
  const T r = emu::shuffle_from(v, src < 0 ? emu::lane() : src);
  return r;
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned d) {
  const int src = emu::lane() + static_cast<int>(d);
  return emu::shuffle_from(v, src > 31 ? emu::lane() : src);
}
inline bool __any_sync(unsigned, bool pred) {
  emu::warp_slots[emu::lane()] = pred;
  emu::warp0_barrier->arrive_and_wait();
  bool any = false;
  for (int i = 0; i < 32; ++i) any = any || emu::warp_slots[i] != 0;
  emu::warp0_barrier->arrive_and_wait();
  return any;
}

inline unsigned long long atomicOr(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_or(v);
}
inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> a(*p);
  int old = a.load();
  while (old > v && !a.compare_exchange_weak(old, v)) {
  }
  return old;
}
template <class T>
T __ldcg(const T* p) {
  return std::atomic_ref<T>(*const_cast<T*>(p)).load();
}
