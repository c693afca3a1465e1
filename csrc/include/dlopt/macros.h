// Portability macros shared by the C++ (CPU) and CUDA translation units.
#pragma once
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define DLOPT_HD __host__ __device__ __forceinline__
#else
#define DLOPT_HD inline __attribute__((always_inline))
#endif
