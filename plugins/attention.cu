// Fused multi-head self-attention on the packed qkv projection, one block per (batch, head).
//
// The block stages K and V of its (batch, head) in shared memory as fp32 (K with an XOR
// swizzle so that 32 lanes reading 32 different keys hit 32 different banks), then each
// warp takes query rows in turn: lane j scores keys j, j+32, ... against the query (held
// in shared memory, read as a broadcast), the warp reduces max and sum for an exact fp32
// softmax, writes the probabilities to its shared-memory row, and lane c accumulates
// output column c (and c+32 for head_dim 64) over all keys. Reads of qkv and writes of
// out are direct, in their packed layouts: no transposes, and no N x N matrix in global
// memory.
#include "common.cuh"

namespace trtvit {
namespace {

constexpr int kWarps = 4;
constexpr int kMaxTokensHd32 = 256;
constexpr int kMaxTokensHd64 = 128;

size_t shared_bytes(int tokens, int head_dim) {
    // K, V (fp32), per-warp query row and probability row
    return sizeof(float) * (2 * static_cast<size_t>(tokens) * head_dim + kWarps * (head_dim + tokens));
}

template <typename T, int HD, int KPL>
__global__ void __launch_bounds__(kWarps * 32)
attention_kernel(const T* __restrict__ qkv, T* __restrict__ out, int tokens, int heads, float scale) {
    extern __shared__ float smem[];
    float* ks = smem;                                   // [tokens][HD], swizzled columns
    float* vs = ks + tokens * HD;                       // [tokens][HD]
    float* qs = vs + tokens * HD;                       // [kWarps][HD]
    float* ps = qs + kWarps * HD;                       // [kWarps][tokens]

    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const size_t row_stride = 3 * static_cast<size_t>(heads) * HD;  // elements per token
    const T* base = qkv + static_cast<size_t>(b) * tokens * row_stride + static_cast<size_t>(h) * HD;
    const size_t k_off = static_cast<size_t>(heads) * HD;
    const size_t v_off = 2 * k_off;

    // Stage K and V: 16-byte vectors, N elements each, HD / N vectors per token.
    constexpr int N = Vec16<T>::N;
    constexpr int VPR = HD / N;
    for (int idx = threadIdx.x; idx < tokens * VPR; idx += blockDim.x) {
        const int j = idx / VPR;
        const int c0 = (idx % VPR) * N;
        float kv[N], vv[N];
        load<T, N>(base + j * row_stride + k_off + c0, kv);
        load<T, N>(base + j * row_stride + v_off + c0, vv);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            const int c = c0 + e;
            ks[j * HD + (c ^ (j & 31))] = kv[e];
            vs[j * HD + c] = vv[e];
        }
    }
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    float* q = qs + warp * HD;
    float* p = ps + warp * tokens;
    T* out_base = out + static_cast<size_t>(b) * tokens * heads * HD + static_cast<size_t>(h) * HD;

    for (int i = warp; i < tokens; i += kWarps) {
        const T* qrow = base + i * row_stride;
#pragma unroll
        for (int c = lane; c < HD; c += 32) q[c] = to_float<T>(qrow[c]) * scale;
        __syncwarp();

        float s[KPL];
        float m = -INFINITY;
#pragma unroll
        for (int t = 0; t < KPL; ++t) {
            const int j = lane + 32 * t;
            float acc = -INFINITY;
            if (j < tokens) {
                acc = 0.f;
                const float* krow = ks + j * HD;
#pragma unroll
                for (int c = 0; c < HD; ++c) acc = fmaf(q[c], krow[c ^ (j & 31)], acc);
            }
            s[t] = acc;
            m = fmaxf(m, acc);
        }
        m = warp_max(m);
        float l = 0.f;
#pragma unroll
        for (int t = 0; t < KPL; ++t) {
            const int j = lane + 32 * t;
            s[t] = j < tokens ? expf(s[t] - m) : 0.f;
            l += s[t];
        }
        const float inv = 1.f / warp_sum(l);
#pragma unroll
        for (int t = 0; t < KPL; ++t) {
            const int j = lane + 32 * t;
            if (j < tokens) p[j] = s[t] * inv;
        }
        __syncwarp();

#pragma unroll
        for (int c = lane; c < HD; c += 32) {
            float acc = 0.f;
            for (int j = 0; j < tokens; ++j) acc = fmaf(p[j], vs[j * HD + c], acc);
            out_base[static_cast<size_t>(i) * heads * HD + c] = from_float<T>(acc);
        }
        __syncwarp();  // q and p are rewritten by this warp's next row
    }
}

template <typename T, int HD, int KPL>
int launch(const void* qkv, void* out, int batch, int tokens, int heads, float scale, size_t smem,
           cudaStream_t stream) {
    auto kernel = attention_kernel<T, HD, KPL>;
    if (smem > 48 * 1024 &&
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)) !=
            cudaSuccess) {
        cudaGetLastError();
        return TRTVIT_ERR_CUDA;
    }
    const unsigned blocks = static_cast<unsigned>(static_cast<long long>(batch) * heads);
    kernel<<<blocks, kWarps * 32, smem, stream>>>(static_cast<const T*>(qkv), static_cast<T*>(out), tokens, heads,
                                                  scale);
    return launch_status();
}

template <typename T, int HD>
int dispatch_tokens(const void* qkv, void* out, int batch, int tokens, int heads, float scale, size_t smem,
                    cudaStream_t stream) {
    if (tokens <= 64) return launch<T, HD, 2>(qkv, out, batch, tokens, heads, scale, smem, stream);
    if (tokens <= 128) return launch<T, HD, 4>(qkv, out, batch, tokens, heads, scale, smem, stream);
    return launch<T, HD, 8>(qkv, out, batch, tokens, heads, scale, smem, stream);
}

}  // namespace
}  // namespace trtvit

extern "C" TRTVIT_API int trtvit_attention_max_tokens(int head_dim) {
    return head_dim == 32 ? trtvit::kMaxTokensHd32 : head_dim == 64 ? trtvit::kMaxTokensHd64 : 0;
}

extern "C" TRTVIT_API int trtvit_attention(const void* qkv, void* out, int batch, int tokens, int heads,
                                           int head_dim, float scale, int dtype, cudaStream_t stream) {
    using namespace trtvit;
    if (!qkv || !out || batch <= 0 || tokens <= 0 || heads <= 0 || !(scale > 0.f) || scale == INFINITY)
        return TRTVIT_ERR_INVALID_ARGUMENT;
    if (dtype != TRTVIT_FLOAT32 && dtype != TRTVIT_FLOAT16) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (!aligned16(qkv) || !aligned16(out)) return TRTVIT_ERR_INVALID_ARGUMENT;
    const int max_tokens = trtvit_attention_max_tokens(head_dim);
    if (max_tokens == 0 || tokens > max_tokens) return TRTVIT_ERR_UNSUPPORTED;
    if (static_cast<long long>(batch) * heads > 0x7fffffffLL) return TRTVIT_ERR_UNSUPPORTED;

    const size_t smem = shared_bytes(tokens, head_dim);
    int device = 0, limit = 0;
    if (cudaGetDevice(&device) != cudaSuccess ||
        cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) != cudaSuccess) {
        cudaGetLastError();
        return TRTVIT_ERR_CUDA;
    }
    if (smem > static_cast<size_t>(limit)) return TRTVIT_ERR_UNSUPPORTED;

    if (dtype == TRTVIT_FLOAT16) {
        return head_dim == 32 ? dispatch_tokens<__half, 32>(qkv, out, batch, tokens, heads, scale, smem, stream)
                              : dispatch_tokens<__half, 64>(qkv, out, batch, tokens, heads, scale, smem, stream);
    }
    return head_dim == 32 ? dispatch_tokens<float, 32>(qkv, out, batch, tokens, heads, scale, smem, stream)
                          : dispatch_tokens<float, 64>(qkv, out, batch, tokens, heads, scale, smem, stream);
}
