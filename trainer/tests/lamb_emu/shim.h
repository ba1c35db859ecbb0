// Just enough of CUDA to run the LAMB kernels (trainer/src/cuda/lamb.rs) on the CPU: blocks run
// one after another, the threads of a block as std::threads, `__syncthreads` as a barrier,
// `__shared__` as a function-local static (one block at a time), and the `_rn` intrinsics as
// plain IEEE operations (compile with -ffp-contract=off so nothing is fused).
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <thread>
#include <vector>

struct Dim3 { unsigned int x = 0, y = 0, z = 0; };
static thread_local Dim3 threadIdx;
static Dim3 blockIdx, blockDim;
static std::barrier<>* g_barrier;

#define __global__
#define __device__
#define __forceinline__ inline
#define __shared__ static
inline void __syncthreads() { g_barrier->arrive_and_wait(); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
using std::fminf;
using std::isfinite;
using std::sqrt;

// A launch of `grid` blocks of `threads` threads running `kernel`.
inline void launch(unsigned int grid, unsigned int threads, const std::function<void()>& kernel) {
    blockDim.x = threads;
    for (unsigned int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::barrier<> barrier(threads);
        g_barrier = &barrier;
        std::vector<std::thread> ts;
        for (unsigned int t = 0; t < threads; ++t) {
            ts.emplace_back([&, t] {
                threadIdx.x = t;
                kernel();
                barrier.arrive_and_drop();
            });
        }
        for (auto& th : ts) th.join();
    }
}
