/*
 * trtvit_kernels: fused LayerNorm and attention CUDA kernels of trtvit_native, C ABI.
 *
 * Every launcher takes device pointers, sizes, parameters and a cudaStream_t, validates
 * all of its arguments before touching the GPU, and returns a status code; it never
 * writes outside the buffers its sizes describe. Launches are asynchronous on `stream`.
 *
 * Data types: TRTVIT_FLOAT32 or TRTVIT_FLOAT16 (IEEE half); every tensor of one call has
 * the same type. Statistics, softmax and accumulation are fp32 for both.
 */
#ifndef TRTVIT_KERNELS_H
#define TRTVIT_KERNELS_H

#include <cuda_runtime_api.h>

#if defined(_WIN32)
#if defined(TRTVIT_BUILDING)
#define TRTVIT_API __declspec(dllexport)
#else
#define TRTVIT_API __declspec(dllimport)
#endif
#else
#define TRTVIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum trtvit_status {
    TRTVIT_OK = 0,
    TRTVIT_ERR_INVALID_ARGUMENT = 1, /* null or misaligned pointer, size <= 0, bad dtype, eps or scale */
    TRTVIT_ERR_UNSUPPORTED = 2,      /* valid but beyond the kernels: d, head_dim, tokens, shared memory */
    TRTVIT_ERR_CUDA = 3              /* the CUDA runtime reported an error: trtvit_last_cuda_error() names it */
};

enum trtvit_dtype { TRTVIT_FLOAT32 = 0, TRTVIT_FLOAT16 = 1 };

/* Largest normalized dimension d of the LayerNorm kernels. */
#define TRTVIT_LAYERNORM_MAX_D 4096

/* Human-readable name of a status code (static string). Host only, no CUDA call. */
TRTVIT_API const char* trtvit_status_string(int status);

/* Version of this library: major * 10000 + minor * 100 + patch. Host only. */
TRTVIT_API int trtvit_kernels_version(void);

/* The CUDA error behind the calling thread's last call into a launcher or
 * trtvit_attention_supported (cudaSuccess when that call met none): its cudaError_t value,
 * and, where the pointers are not null, its name ("cudaErrorNoKernelImageForDevice") and
 * description (static strings). The library links the CUDA runtime statically, so its errors
 * are never in the caller's cudaGetLastError(); this is where they are kept. Host only. */
TRTVIT_API int trtvit_last_cuda_error(const char** name, const char** description);

/* Largest token count N the attention kernel accepts for head_dim: 256 for head_dim 32,
 * 128 for head_dim 64, 0 for any other head_dim (unsupported). Host only, no CUDA call.
 * fp32 attention stages K and V as fp32 and needs more than 48 KB of shared memory from
 * N = 165 (head_dim 32) / N = 89 (head_dim 64); a device whose opt-in limit is smaller
 * (64 KB on Turing: N <= 224 / N <= 120) returns TRTVIT_ERR_UNSUPPORTED beyond it.
 * fp16 attention fits in 48 KB for every N up to the maximum. */
TRTVIT_API int trtvit_attention_max_tokens(int head_dim);

/* Whether trtvit_attention can run `tokens` tokens of `head_dim` in `dtype` on the current
 * CUDA device: TRTVIT_OK; TRTVIT_ERR_UNSUPPORTED for more tokens than
 * trtvit_attention_max_tokens, for fp32 needing more shared memory than the device's opt-in
 * limit (e.g. N > 224 / N > 120 on Turing), or for a device this build of the library has no
 * kernel image for (trtvit_last_cuda_error() then names cudaErrorNoKernelImageForDevice);
 * TRTVIT_ERR_INVALID_ARGUMENT exactly where trtvit_attention says so for these three values
 * (tokens <= 0, head_dim <= 0, bad dtype); TRTVIT_ERR_CUDA when the device cannot be queried.
 * Launches nothing. For build-time checks, before an engine is made that could not run. */
TRTVIT_API int trtvit_attention_supported(int tokens, int head_dim, int dtype);

/* y = LN(x) over the last dimension: x, y are rows x d, row-major; gamma, beta: d values,
 * all of the same dtype. mean and (biased) variance in fp32:
 *   y = (x - mean) * rsqrt(var + eps) * gamma + beta.
 * One read of x and one write of y; the row is held in registers. y may alias x.
 * 1 <= d <= TRTVIT_LAYERNORM_MAX_D (larger d: TRTVIT_ERR_UNSUPPORTED); eps >= 0.
 * Pointers must be aligned to the element size; 16-byte vector accesses when d is a
 * multiple of 8 (fp16) / 4 (fp32) and every pointer is 16-byte aligned, element accesses
 * otherwise. */
TRTVIT_API int trtvit_layernorm(const void* x, const void* gamma, const void* beta, void* y, int rows, int d,
                                float eps, int dtype, cudaStream_t stream);

/* s = x + residual (rounded to dtype, written to sum_out), y = LN(s), where LN is computed
 * from the rounded s, so y equals trtvit_layernorm of the stored sum: the pre-norm
 * Transformer's residual add and its next LayerNorm in one pass. sum_out may alias x or
 * residual; y may alias x. Limits as trtvit_layernorm. */
TRTVIT_API int trtvit_layernorm_residual(const void* x, const void* residual, const void* gamma, const void* beta,
                                         void* sum_out, void* y, int rows, int d, float eps, int dtype,
                                         cudaStream_t stream);

/* Multi-head self-attention from the packed qkv projection.
 * qkv: (batch, tokens, 3, heads, head_dim) contiguous (q, k, v, then heads, as the output
 * of one Linear(d, 3d)); out: (batch, tokens, heads * head_dim):
 *   out[b, n, h, :] = sum_j softmax_j(q[b,n,h] . k[b,j,h] * scale) v[b,j,h].
 * K and V of one (batch, head) are staged in shared memory; no tokens x tokens matrix is
 * written to global memory. Softmax and accumulation in fp32 (fp16: tensor-core products of
 * fp16 inputs with fp32 sums; the probabilities are rounded to fp16 for the second product).
 * head_dim 32 or 64; 1 <= tokens <= trtvit_attention_max_tokens(head_dim); scale finite
 * and > 0; batch * heads <= INT_MAX. qkv and out must be 16-byte aligned and must not
 * overlap. */
TRTVIT_API int trtvit_attention(const void* qkv, void* out, int batch, int tokens, int heads, int head_dim,
                                float scale, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* TRTVIT_KERNELS_H */
