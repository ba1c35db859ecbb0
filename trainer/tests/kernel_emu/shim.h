// Enough of CUDA to run this crate's CUDA C kernels on the CPU (see ../kernel_emu.rs).
//
// * Built-ins: `threadIdx`, `blockIdx`, `blockDim`, `gridDim` with x, y and z.
// * Blocks run one after another (x fastest, then y, then z). The threads of a block are
//   cooperative fibers (ucontext) on one OS thread: each runs until `__syncthreads()` or its end,
//   then the next one runs; a round ends when every live thread waits at the barrier, and the
//   next round resumes them (in reverse order every other round, starting with the block's
//   index, so a read of another thread's value without a barrier sees a stale value in one of the
//   two orders, and the blocks of a launch see both whatever the number of barriers before the
//   read). A thread that returns no longer takes part in barriers. Kernels without
//   `__syncthreads` run their threads as plain calls.
// * `__shared__` variables are function-local statics: one block runs at a time.
// * Maths is plain IEEE single/double (compile with -ffp-contract=off: nothing is fused).
#pragma once
#include <math.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

struct uint3 {
    unsigned int x = 0, y = 0, z = 0;
};
typedef uint3 dim3;

static uint3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __shared__ static

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int max(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline unsigned int __float_as_uint(float f) {
    unsigned int u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }

namespace emu {
struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false;
};
inline ucontext_t main_ctx;
inline std::vector<Fiber> fibers;
inline int current = -1;
inline const std::function<void()>* kernel_fn = nullptr;
inline const char* kernel_name = "";

inline void trampoline() {
    (*kernel_fn)();
    fibers[current].done = true;  // uc_link goes back to the scheduler
}

inline void set_thread(unsigned int t) {
    threadIdx.x = t % blockDim.x;
    threadIdx.y = (t / blockDim.x) % blockDim.y;
    threadIdx.z = t / (blockDim.x * blockDim.y);
}

// Runs `kernel` over `grid` x `block`; `syncs`: whether the kernel calls __syncthreads.
inline void launch(const char* name, uint3 grid, uint3 block, bool syncs,
                   const std::function<void()>& kernel) {
    if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 ||
        block.z == 0 || block.x * block.y * block.z > 1024 || grid.y > 65535 || grid.z > 65535) {
        std::fprintf(stderr, "%s: invalid launch grid (%u,%u,%u) block (%u,%u,%u)\n", name,
                     grid.x, grid.y, grid.z, block.x, block.y, block.z);
        std::exit(2);
    }
    kernel_name = name;
    gridDim = grid;
    blockDim = block;
    unsigned int nt = block.x * block.y * block.z;
    kernel_fn = &kernel;
    if (syncs && fibers.size() < nt) fibers.resize(nt);
    for (unsigned int bz = 0; bz < grid.z; ++bz)
        for (unsigned int by = 0; by < grid.y; ++by)
            for (unsigned int bx = 0; bx < grid.x; ++bx) {
                blockIdx = uint3{bx, by, bz};
                if (!syncs) {
                    current = -1;
                    for (unsigned int t = 0; t < nt; ++t) {
                        set_thread(t);
                        kernel();
                    }
                    continue;
                }
                for (unsigned int t = 0; t < nt; ++t) {
                    Fiber& f = fibers[t];
                    if (f.stack.empty()) f.stack.resize(64 * 1024);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.data();
                    f.ctx.uc_stack.ss_size = f.stack.size();
                    f.ctx.uc_link = &main_ctx;
                    makecontext(&f.ctx, trampoline, 0);
                    f.done = false;
                }
                for (unsigned int round = 0;; ++round) {
                    unsigned int live = 0;
                    for (unsigned int i = 0; i < nt; ++i) {
                        unsigned int t = (round + bx + by + bz) % 2 ? nt - 1 - i : i;
                        if (fibers[t].done) continue;
                        set_thread(t);
                        current = (int)t;
                        swapcontext(&main_ctx, &fibers[t].ctx);
                        if (!fibers[t].done) ++live;
                    }
                    if (live == 0) break;
                }
                current = -1;
            }
}
}  // namespace emu

inline void __syncthreads() {
    if (emu::current < 0) {
        std::fprintf(stderr, "%s: __syncthreads in a kernel launched without fibers\n",
                     emu::kernel_name);
        std::exit(2);
    }
    swapcontext(&emu::fibers[emu::current].ctx, &emu::main_ctx);
}
