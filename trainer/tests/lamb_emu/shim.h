// Just enough of CUDA to run the LAMB kernels (trainer/src/cuda/lamb.rs) on the CPU: the shim of
// kernel_emu (blocks one after another, the threads of a block as cooperative fibers on one OS
// thread that switch at `__syncthreads`, `__shared__` as a function-local static) plus the
// rounded intrinsics the LAMB kernels use, as plain IEEE operations (compile with
// -ffp-contract=off so nothing is fused).
#pragma once
#include "../kernel_emu/shim.h"

inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }

// A launch of `grid` blocks of `threads` threads running `kernel` (every LAMB kernel
// synchronises, so the threads always run as fibers).
inline void launch(const char* name, unsigned int grid, unsigned int threads,
                   const std::function<void()>& kernel) {
    emu::launch(name, uint3{grid, 1, 1}, uint3{threads, 1, 1}, true, kernel);
}
