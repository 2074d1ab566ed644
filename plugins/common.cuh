// Shared device helpers of the trtvit kernels: fp32 <-> storage conversion, 16-byte
// vector loads and stores, warp reductions, host-side checks.
#pragma once

#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "trtvit_kernels.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 750
#error "the trtvit kernels need compute capability 7.5 (Turing) or newer"
#endif

namespace trtvit {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Round an fp32 value to the storage type and back (what storing and reloading does).
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float<T>(from_float<T>(v)); }

// Elements of T in one 16-byte vector.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };

// Load N consecutive elements (N == 1, or a full 16-byte vector) as floats.
template <typename T, int N> __device__ __forceinline__ void load(const T* p, float* out) {
    if constexpr (N == 1) {
        out[0] = to_float<T>(*p);
    } else {
        static_assert(N == Vec16<T>::N, "vector loads are 16 bytes");
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) out[i] = to_float<T>(e[i]);
    }
}

// Store N floats (N == 1, or a full 16-byte vector) as consecutive elements of T.
template <typename T, int N> __device__ __forceinline__ void store(T* p, const float* in) {
    if constexpr (N == 1) {
        *p = from_float<T>(in[0]);
    } else {
        static_assert(N == Vec16<T>::N, "vector stores are 16 bytes");
        uint4 raw;
        T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
        for (int i = 0; i < N; ++i) e[i] = from_float<T>(in[i]);
        *reinterpret_cast<uint4*>(p) = raw;
    }
}

// Read-only global loads (the data must not be written during the kernel).
__device__ __forceinline__ uint4 ldg16(const void* p) { return __ldg(reinterpret_cast<const uint4*>(p)); }
__device__ __forceinline__ uint32_t ldg4(const void* p) { return __ldg(reinterpret_cast<const unsigned int*>(p)); }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// The CUDA error behind a TRTVIT_ERR_CUDA. The library links the CUDA runtime statically, so
// it has a runtime (and a per-thread last-error slot) of its own, which the caller's
// cudaGetLastError() never sees: the error is kept per thread for trtvit_last_cuda_error()
// instead, and the library's own slot is cleared. (A sticky error, such as an illegal
// address, lives in the CUDA context, which both runtimes share: the caller's next call
// reports it too.)
void clear_cuda_error();           // at the start of every entry point that may call CUDA
int cuda_failure(cudaError_t err);  // keeps err for this thread, returns TRTVIT_ERR_CUDA

template <typename T> struct same_type { using type = T; };

// Launch ``kernel`` and return the status of this launch alone. cudaLaunchKernel returns the
// launch's own error, so an earlier, unrelated error pending on the thread is not reported as
// this launch's. The arguments convert to the kernel's parameter types implicitly, as in a
// <<<>>> launch (a double becomes an int; a void* does not become a float*, as static_cast
// would make it); the non-deduced parameters leave the types to the kernel's signature.
template <typename... Params>
inline int launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                  typename same_type<Params>::type... values) {
    void* args[] = {static_cast<void*>(&values)...};
    const cudaError_t err = cudaLaunchKernel(reinterpret_cast<const void*>(kernel), grid, block, args, smem, stream);
    return err == cudaSuccess ? TRTVIT_OK : cuda_failure(err);
}

}  // namespace trtvit
