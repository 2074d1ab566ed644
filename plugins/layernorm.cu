// Fused LayerNorm (optionally with the residual add before it), one warp per row, four
// rows (warps) per 128-thread block.
//
// The whole row lives in registers: one read of x (and r), one write of y (and s); gamma
// and beta are read per row but stay in L1/L2. Each lane holds EPT elements (the smallest
// of 8, 16, 32, 64, 128 with 32 * EPT >= d, so d <= 4096); with 16-byte vectors (d a
// multiple of 4 fp32 / 8 fp16 elements and 16-byte aligned pointers) a lane's elements are
// EPT/N vectors strided by 32 vectors, otherwise single elements strided by 32 (coalesced
// either way). Mean, then variance as the mean of squared deviations, are two exact passes
// over the registers in fp32, each finished with a butterfly shuffle reduction.
// Register use stays within the budget (no local memory) for every instance except the
// element-wise residual kernel at 128 elements per lane (d > 2048 that is not a multiple
// of the vector width, or misaligned pointers), which spills a few values.
#include <initializer_list>

#include "common.cuh"

namespace trtvit {
namespace {

constexpr int kWarpsPerBlock = 4;

template <typename T, int EPT, int N, bool RESIDUAL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
layernorm_kernel(const T* x, const T* r, const T* __restrict__ gamma, const T* __restrict__ beta, T* sum_out, T* y,
                 int rows, int d, float eps) {
    constexpr int CHUNKS = EPT / N;
    const int lane = threadIdx.x & 31;
    const long long row = static_cast<long long>(blockIdx.x) * kWarpsPerBlock + (threadIdx.x >> 5);
    if (row >= rows) return;  // whole warps exit together: row is uniform within a warp
    const size_t base = static_cast<size_t>(row) * static_cast<size_t>(d);

    float v[EPT];
    float sum = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int col = (c * 32 + lane) * N;
        if (col < d) {
            load<T, N>(x + base + col, &v[c * N]);
            if constexpr (RESIDUAL) {
                float rv[N];
                load<T, N>(r + base + col, rv);
#pragma unroll
                for (int k = 0; k < N; ++k) v[c * N + k] = round_to<T>(v[c * N + k] + rv[k]);
                store<T, N>(sum_out + base + col, &v[c * N]);
            }
#pragma unroll
            for (int k = 0; k < N; ++k) sum += v[c * N + k];
        }
    }
    const float mean = warp_sum(sum) / d;
    float sq = 0.f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int col = (c * 32 + lane) * N;
        if (col < d) {
#pragma unroll
            for (int k = 0; k < N; ++k) {
                const float t = v[c * N + k] - mean;
                sq += t * t;
            }
        }
    }
    const float rstd = rsqrtf(warp_sum(sq) / d + eps);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
        const int col = (c * 32 + lane) * N;
        if (col < d) {
            float g[N], b[N], out[N];
            load<T, N>(gamma + col, g);
            load<T, N>(beta + col, b);
#pragma unroll
            for (int k = 0; k < N; ++k) out[k] = (v[c * N + k] - mean) * rstd * g[k] + b[k];
            store<T, N>(y + base + col, out);
        }
    }
}

template <typename T, int EPT, int N>
int launch_ept(const T* x, const T* r, const T* gamma, const T* beta, T* sum_out, T* y, int rows, int d, float eps,
               cudaStream_t stream) {
    const unsigned blocks = static_cast<unsigned>((static_cast<long long>(rows) + kWarpsPerBlock - 1) / kWarpsPerBlock);
    if (r != nullptr)
        return launch(layernorm_kernel<T, EPT, N, true>, dim3(blocks), dim3(kWarpsPerBlock * 32), 0, stream, x, r,
                      gamma, beta, sum_out, y, rows, d, eps);
    return launch(layernorm_kernel<T, EPT, N, false>, dim3(blocks), dim3(kWarpsPerBlock * 32), 0, stream, x, r,
                  gamma, beta, sum_out, y, rows, d, eps);
}

// Pick the smallest register tile (elements per lane) that holds a row.
template <typename T, int N>
int launch_dispatch(const T* x, const T* r, const T* gamma, const T* beta, T* sum_out, T* y, int rows, int d,
                    float eps, cudaStream_t stream) {
    const int per_lane = (d + 31) / 32;
    if (per_lane <= 8) return launch_ept<T, 8, N>(x, r, gamma, beta, sum_out, y, rows, d, eps, stream);
    if (per_lane <= 16) return launch_ept<T, 16, N>(x, r, gamma, beta, sum_out, y, rows, d, eps, stream);
    if (per_lane <= 32) return launch_ept<T, 32, N>(x, r, gamma, beta, sum_out, y, rows, d, eps, stream);
    if (per_lane <= 64) return launch_ept<T, 64, N>(x, r, gamma, beta, sum_out, y, rows, d, eps, stream);
    return launch_ept<T, 128, N>(x, r, gamma, beta, sum_out, y, rows, d, eps, stream);
}

template <typename T>
int launch(const void* x, const void* r, const void* gamma, const void* beta, void* sum_out, void* y, int rows, int d,
           float eps, cudaStream_t stream) {
    constexpr int V = Vec16<T>::N;
    const bool vectorized = d % V == 0 && aligned16(x) && aligned16(y) && aligned16(gamma) && aligned16(beta) &&
                            (r == nullptr || (aligned16(r) && aligned16(sum_out)));
    auto cx = static_cast<const T*>(x);
    auto cr = static_cast<const T*>(r);
    auto cg = static_cast<const T*>(gamma);
    auto cb = static_cast<const T*>(beta);
    auto cs = static_cast<T*>(sum_out);
    auto cy = static_cast<T*>(y);
    if (vectorized) return launch_dispatch<T, V>(cx, cr, cg, cb, cs, cy, rows, d, eps, stream);
    return launch_dispatch<T, 1>(cx, cr, cg, cb, cs, cy, rows, d, eps, stream);
}

bool element_aligned(const void* p, int dtype) {
    return (reinterpret_cast<std::uintptr_t>(p) & (dtype == TRTVIT_FLOAT16 ? 1u : 3u)) == 0;
}

// Every check of both launchers; no CUDA call.
int validate(const void* x, const void* r, const void* gamma, const void* beta, const void* sum_out, const void* y,
             int rows, int d, float eps, int dtype, bool residual) {
    if (!x || !gamma || !beta || !y || (residual && (!r || !sum_out))) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (rows <= 0 || d <= 0 || !(eps >= 0.f)) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (dtype != TRTVIT_FLOAT32 && dtype != TRTVIT_FLOAT16) return TRTVIT_ERR_INVALID_ARGUMENT;
    for (const void* p : {x, gamma, beta, y})
        if (!element_aligned(p, dtype)) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (residual && (!element_aligned(r, dtype) || !element_aligned(sum_out, dtype))) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (d > TRTVIT_LAYERNORM_MAX_D) return TRTVIT_ERR_UNSUPPORTED;
    return TRTVIT_OK;
}

}  // namespace
}  // namespace trtvit

extern "C" TRTVIT_API int trtvit_layernorm(const void* x, const void* gamma, const void* beta, void* y, int rows,
                                           int d, float eps, int dtype, cudaStream_t stream) {
    using namespace trtvit;
    clear_cuda_error();
    if (int status = validate(x, nullptr, gamma, beta, nullptr, y, rows, d, eps, dtype, false)) return status;
    if (dtype == TRTVIT_FLOAT16) return launch<__half>(x, nullptr, gamma, beta, nullptr, y, rows, d, eps, stream);
    return launch<float>(x, nullptr, gamma, beta, nullptr, y, rows, d, eps, stream);
}

extern "C" TRTVIT_API int trtvit_layernorm_residual(const void* x, const void* residual, const void* gamma,
                                                    const void* beta, void* sum_out, void* y, int rows, int d,
                                                    float eps, int dtype, cudaStream_t stream) {
    using namespace trtvit;
    clear_cuda_error();
    if (int status = validate(x, residual, gamma, beta, sum_out, y, rows, d, eps, dtype, true)) return status;
    if (dtype == TRTVIT_FLOAT16) return launch<__half>(x, residual, gamma, beta, sum_out, y, rows, d, eps, stream);
    return launch<float>(x, residual, gamma, beta, sum_out, y, rows, d, eps, stream);
}
