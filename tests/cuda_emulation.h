// The few CUDA built-ins the fercuda kernels use, emulated on the CPU with one OS thread per CUDA
// thread of a block (blocks run one after another), so csrc/cuda/canny_kernels.cuh and
// dwconv_kernels.cuh compile with a host compiler and their results can be compared with cv2 and
// float64 PyTorch where no GPU is present. Barriers and warp shuffles are real rendezvous of
// those threads, so ordering bugs between stages show up as wrong results, not silently.
//
// Dynamic shared memory: a kernel's `extern __shared__` array is a buffer that the file including
// the kernels defines in the kernels' namespace (blocks run one at a time, so one buffer serves
// them all); the launch that passes it checks the launch's byte count against it, poisons it
// before each block and checks after each block that nothing was written past that count.
// Static `__shared__` arrays are not emulated: they would compile as per-thread arrays.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
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

// Whether a thread of the current block has synchronized (barrier or warp built-in), and whether
// the launch has stopped running its blocks one at a time.
inline std::atomic<bool> block_synced{false};
inline std::atomic<bool> blocks_overlap{false};
inline std::atomic<bool> synced_while_overlapping{false};

// Marks the calling thread's synchronization; false where the launch runs its blocks overlapped.
inline bool note_sync() {
  block_synced.store(true, std::memory_order_relaxed);
  if (!blocks_overlap.load(std::memory_order_relaxed)) return true;
  synced_while_overlapping.store(true, std::memory_order_relaxed);
  return false;
}

template <class T>
T shuffle_from(T v, int src) {
  if (!note_sync()) return v;
  warp_slots[lane()] = static_cast<uint64_t>(v);
  warp0_barrier->arrive_and_wait();
  const T r = static_cast<T>(warp_slots[src]);
  warp0_barrier->arrive_and_wait();
  return r;
}

// The threads that run the CUDA threads of every launch, started once and kept: starting a block's
// worth of threads costs more than most blocks do.
class ThreadPool {
 public:
  // Runs job(t) on threads t = 0 .. n - 1, all at once, and returns when every one has returned.
  void run(unsigned int n, const std::function<void(unsigned int)>& job) {
    std::unique_lock<std::mutex> lock(mutex_);
    while (workers_.size() < n) {
      const auto id = static_cast<unsigned int>(workers_.size());
      workers_.emplace_back([this, id, seen = generation_] { work(id, seen); });
    }
    job_ = &job;
    active_ = n;
    pending_ = n;
    ++generation_;
    wake_.notify_all();
    done_.wait(lock, [&] { return pending_ == 0; });
    job_ = nullptr;
  }

  ~ThreadPool() {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      stop_ = true;
      ++generation_;
    }
    wake_.notify_all();
    for (auto& w : workers_) w.join();
  }

 private:
  void work(unsigned int id, uint64_t seen) {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (stop_) return;
      if (id >= active_) continue;
      const std::function<void(unsigned int)>* job = job_;
      lock.unlock();
      (*job)(id);
      lock.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(unsigned int)>* job_ = nullptr;
  unsigned int active_ = 0, pending_ = 0;
  uint64_t generation_ = 0;
  bool stop_ = false;
};

inline ThreadPool thread_pool;

// A launch the GPU would refuse is an error here too, and so is a kernel that synchronizes in some
// blocks and not in its first (see launch).
struct launch_error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

constexpr std::size_t kDefaultSharedLimit = 48 << 10;  // more needs cudaFuncSetAttribute
constexpr unsigned char kSharedPoison = 0xff;          // NaN in every float

// Runs body() as grid.x * grid.y blocks of block threads (x fastest). shared / capacity: the
// buffer behind the kernel's `extern __shared__` array, if it has one; shared_bytes: the launch's
// dynamic shared memory. Blocks run one after the other, except that when the first block neither
// synchronized nor has shared memory, each thread runs the remaining blocks without waiting for the
// others (as a GPU runs blocks concurrently), which saves a rendezvous of all threads per block.
inline void launch(dim3 grid, unsigned int block, const std::function<void()>& body, unsigned char* shared = nullptr,
                   std::size_t capacity = 0, std::size_t shared_bytes = 0) {
  if (block == 0 || block > 1024) throw launch_error("block of " + std::to_string(block) + " threads");
  if (grid.x == 0 || grid.y == 0 || grid.z != 1 || grid.y > 65535 || grid.x > 0x7fffffffu) {
    throw launch_error("grid of " + std::to_string(grid.x) + " x " + std::to_string(grid.y) + " x " +
                       std::to_string(grid.z) + " blocks");
  }
  if (shared_bytes > std::min(capacity, kDefaultSharedLimit)) {
    throw launch_error(std::to_string(shared_bytes) + " bytes of dynamic shared memory, " +
                       std::to_string(std::min(capacity, kDefaultSharedLimit)) + " available");
  }
  grid_dim = grid;
  block_dim = {block, 1, 1};
  const uint64_t blocks = static_cast<uint64_t>(grid.x) * grid.y;
  uint64_t finished = 0;
  std::string overrun;
  if (shared != nullptr) std::memset(shared, kSharedPoison, capacity);
  block_synced = false;
  blocks_overlap = false;
  synced_while_overlapping = false;
  // Runs once every thread has finished a block: check its shared memory, poison it for the next.
  auto between_blocks = [&]() noexcept {
    ++finished;
    if (shared == nullptr) {
      if (finished == 1 && !block_synced.load()) blocks_overlap = true;
      return;
    }
    for (std::size_t i = shared_bytes; i < capacity && overrun.empty(); ++i) {
      if (shared[i] != kSharedPoison) {
        overrun = "block " + std::to_string(finished - 1) + " wrote shared byte " + std::to_string(i) +
                  " past the launch's " + std::to_string(shared_bytes);
      }
    }
    std::memset(shared, kSharedPoison, capacity);
  };
  std::barrier<> bar(block);
  std::barrier<> warp_bar(std::min(block, 32u));
  std::barrier between(block, between_blocks);
  block_barrier = &bar;
  warp0_barrier = &warp_bar;
  thread_pool.run(block, [&](unsigned int t) {
    thread_idx = {t, 0, 0};
    for (uint64_t b = 0; b < blocks; ++b) {
      block_idx = {static_cast<unsigned int>(b % grid.x), static_cast<unsigned int>(b / grid.x), 0};
      body();
      if (!blocks_overlap.load()) between.arrive_and_wait();
    }
  });
  if (!overrun.empty()) throw launch_error(overrun);
  if (synced_while_overlapping) throw launch_error("a later block synchronized, the first did not");
}

inline void launch(unsigned int grid, unsigned int block, const std::function<void()>& body) {
  launch(dim3{grid, 1, 1}, block, body);
}
}  // namespace emu

#define threadIdx (emu::thread_idx)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() {
  if (emu::note_sync()) emu::block_barrier->arrive_and_wait();
}

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
  if (!emu::note_sync()) return pred;
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
