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
#define TRTVIT_API __declspec(dllexport)
#else
#define TRTVIT_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

enum trtvit_status {
    TRTVIT_OK = 0,
    TRTVIT_ERR_INVALID_ARGUMENT = 1, /* null or misaligned pointer, size <= 0, bad dtype or eps */
    TRTVIT_ERR_UNSUPPORTED = 2,      /* valid but beyond the kernels: d, head_dim, tokens, shared memory */
    TRTVIT_ERR_CUDA = 3              /* the CUDA runtime reported an error (launch or device query) */
};

enum trtvit_dtype { TRTVIT_FLOAT32 = 0, TRTVIT_FLOAT16 = 1 };

/* Largest normalized dimension d of the LayerNorm kernels. */
#define TRTVIT_LAYERNORM_MAX_D 4096

/* Human-readable name of a status code (static string). Host only, no CUDA call. */
TRTVIT_API const char* trtvit_status_string(int status);

/* Version of this library: major * 10000 + minor * 100 + patch. Host only. */
TRTVIT_API int trtvit_kernels_version(void);

/* Largest token count N the attention kernel accepts for head_dim (0 when head_dim is
 * unsupported). Host only. A device with little shared memory may accept fewer for
 * fp32-sized tiles; the launcher then returns TRTVIT_ERR_UNSUPPORTED. */
TRTVIT_API int trtvit_attention_max_tokens(int head_dim);

/* y = LN(x) over the last dimension: rows x d, row-major. gamma, beta: d values.
 * mean and (biased) variance in fp32; y = (x - mean) * rsqrt(var + eps) * gamma + beta.
 * One read of x, one write of y. y may alias x. d <= TRTVIT_LAYERNORM_MAX_D. */
TRTVIT_API int trtvit_layernorm(const void* x, const void* gamma, const void* beta, void* y, int rows, int d,
                                float eps, int dtype, cudaStream_t stream);

/* s = x + residual (rounded to dtype, written to sum_out), y = LN(s): the pre-norm
 * Transformer's residual add and its next LayerNorm in one pass. sum_out may alias x or
 * residual; y may alias x. */
TRTVIT_API int trtvit_layernorm_residual(const void* x, const void* residual, const void* gamma, const void* beta,
                                         void* sum_out, void* y, int rows, int d, float eps, int dtype,
                                         cudaStream_t stream);

/* Multi-head self-attention from the packed qkv projection.
 * qkv: (batch, tokens, 3, heads, head_dim) contiguous (q, k, v, then heads);
 * out: (batch, tokens, heads * head_dim):
 *   out[b, n, h, :] = sum_j softmax_j(q[b,n,h] . k[b,j,h] * scale) v[b,j,h].
 * K and V of one (batch, head) are staged in shared memory; no tokens x tokens matrix
 * is written to global memory. head_dim 32 or 64; tokens <= trtvit_attention_max_tokens.
 * qkv and out must be 16-byte aligned and must not overlap. */
TRTVIT_API int trtvit_attention(const void* qkv, void* out, int batch, int tokens, int heads, int head_dim,
                                float scale, int dtype, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

#endif /* TRTVIT_KERNELS_H */
