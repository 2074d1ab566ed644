// Fused multi-head self-attention on the packed qkv projection.
//
// Input (B, N, 3, heads, hd), output (B, N, heads * hd), both read and written in these
// layouts directly: no transposes, no N x N matrix in global memory. A block owns one
// (batch, head) pair, or, when there are few pairs, a group of query rows of one pair
// (grid.y); it stages that pair's K and V in shared memory once, and its warps then
// work through query rows against the staged tile.
//
// fp16: tensor cores (mma.sync, fp16 inputs, fp32 accumulation). A warp takes 16 query
//   rows at a time; S = Q K^T over 32 keys at a time (64 for hd 64), scaled into the log2
//   domain, an online softmax in fp32 over those key chunks (running row max and sum; a
//   row is spread over 4 lanes, reduced with two shuffles), P rounded to fp16 and
//   multiplied with V by the tensor cores straight from the S registers. K is staged
//   row-major and V transposed, each row padded by 8 halves so that the fragment loads
//   are free of bank conflicts. Shared memory: 2 * (Np * (hd + 8) + hd * (Np + 8)) bytes
//   with Np = N rounded up to 16: <= 37 KB for hd 32 / N 256 and hd 64 / N 128.
// fp32: CUDA cores, fp32 arithmetic throughout. A warp takes R query rows at a time (R = 2
//   for hd 32, 1 for hd 64) and holds them in registers; lane j scores keys j, j + 32, ...
//   (K staged with a 16-byte-chunk XOR swizzle, so that the float4 reads of 8 different
//   keys by 8 lanes hit different banks); an exact two-pass softmax with warp shuffles
//   writes unnormalized probabilities to a per-warp shared row, and lane c accumulates
//   output column c (and c + 32 for hd 64). Shared memory: 4 * (2 * N4 * hd + 4 * R *
//   (hd + N4)) bytes with N4 = N rounded up to 4: above 48 KB from N = 165 (hd 32) /
//   N = 89 (hd 64), which takes the device's opt-in shared memory (64 KB on Turing: hd 32
//   up to N = 224, hd 64 up to N = 120; 99 KB or more from Ampere on: every supported N).
//   Above 48 KB a kernel needs its MaxDynamicSharedMemorySize attribute raised; that is done
//   once per device and kernel (SharedMemoryAttribute).
#include <algorithm>
#include <cfloat>
#include <climits>
#include <mutex>

#include "common.cuh"

namespace trtvit {
namespace {

constexpr int kMaxTokensHd32 = 256;
constexpr int kMaxTokensHd64 = 128;
constexpr int kDefaultSharedBytes = 48 * 1024;
// With at least this many (batch, head) pairs a block takes a whole pair (K and V read
// once); with fewer, query rows are split over more blocks so that the GPU fills up.
constexpr long long kPairsForWholeBlocks = 1024;

// ----------------------------------------------------------------------------------
// fp16, tensor cores
// ----------------------------------------------------------------------------------

constexpr int kTcMaxWarps = 8;
// Keys per online-softmax step: 32 for hd 32 (64 registers a thread, so 8 blocks of 4
// warps fit an SM), 64 for hd 64.
template <int HD> __host__ __device__ constexpr int key_chunk() { return HD == 32 ? 32 : 64; }

__host__ __device__ constexpr int round_up(int v, int m) { return (v + m - 1) / m * m; }

size_t tc_shared_bytes(int tokens, int hd) {
    const size_t np = static_cast<size_t>(round_up(tokens, 16));
    return sizeof(__half) * (np * (hd + 8) + static_cast<size_t>(hd) * (np + 8));
}

// D += A (16x16, row) * B (16x8, col); fp16 inputs, fp32 accumulators. Fragments per the
// PTX ISA (g = lane / 4, t = lane % 4):
//   a[0] = A[g][2t, 2t+1]  a[1] = A[g+8][2t, 2t+1]  a[2] = A[g][2t+8, +9]  a[3] = A[g+8][2t+8, +9]
//   b0 = B[2t, 2t+1][g]    b1 = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]   d[2], d[3] = D[g+8][2t, 2t+1]
// (lower column in the lower 16 bits). Turing has only the k8 shape: two of them.
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if __CUDA_ARCH__ >= 800
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(b0));
    asm("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5}, {%6}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[2]), "r"(a[3]), "r"(b1));
#endif
}

__device__ __forceinline__ uint32_t lds4(const __half* p) { return *reinterpret_cast<const uint32_t*>(p); }

__device__ __forceinline__ uint32_t pack_half2(__half2 v) { return *reinterpret_cast<const uint32_t*>(&v); }

// A fragments of the 16 query rows [row0, row0 + 16) of one head; rows >= tokens are zero.
template <int HD>
__device__ __forceinline__ void load_q_fragments(uint32_t (&qa)[HD / 16][4], const __half* base, size_t row_stride,
                                                 int row0, int tokens, int g, int t) {
    const int r0 = row0 + g, r1 = row0 + g + 8;
    const __half* q0 = base + static_cast<size_t>(min(r0, tokens - 1)) * row_stride + 2 * t;
    const __half* q1 = base + static_cast<size_t>(min(r1, tokens - 1)) * row_stride + 2 * t;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
        qa[ks][0] = r0 < tokens ? ldg4(q0 + 16 * ks) : 0u;
        qa[ks][1] = r1 < tokens ? ldg4(q1 + 16 * ks) : 0u;
        qa[ks][2] = r0 < tokens ? ldg4(q0 + 16 * ks + 8) : 0u;
        qa[ks][3] = r1 < tokens ? ldg4(q1 + 16 * ks + 8) : 0u;
    }
}

// Block: (batch * heads) x query-tile groups; each block covers `tiles_per_block` tiles of
// 16 query rows, its warps taking every (blockDim.x / 32)-th tile.
template <int HD>
__global__ void __launch_bounds__(kTcMaxWarps * 32)
attention_fp16_kernel(const __half* __restrict__ qkv, __half* __restrict__ out, int tokens, int heads,
                      int tiles_per_block, float scale_log2) {
    constexpr int KST = HD + 8;               // row stride of the staged K (halves)
    constexpr int VPR = HD / 8;               // 16-byte vectors per head row
    constexpr int KC = key_chunk<HD>();       // keys per softmax step
    constexpr int NT = KC / 8;                // n-tiles of S per step
    const int np = round_up(tokens, 16);
    const int vst = np + 8;  // row stride of the staged V^T (halves)
    extern __shared__ uint4 smem_tc[];
    __half* ks = reinterpret_cast<__half*>(smem_tc);  // [np][KST]
    __half* vt = ks + np * KST;                      // [HD][vst]

    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const size_t row_stride = 3 * static_cast<size_t>(heads) * HD;  // elements per token
    const __half* base = qkv + static_cast<size_t>(b) * tokens * row_stride + static_cast<size_t>(h) * HD;
    const __half* kbase = base + static_cast<size_t>(heads) * HD;
    const __half* vbase = base + 2 * static_cast<size_t>(heads) * HD;

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int nwarps = blockDim.x >> 5;
    const int group = static_cast<int>(blockIdx.y);
    const int tile_end = min(np / 16, (group + 1) * tiles_per_block);
    int tile = group * tiles_per_block + warp;

    // The first query tile's fragments are requested before K and V, so that their
    // latencies overlap.
    uint32_t qa[HD / 16][4];
    if (tile < tile_end) load_q_fragments<HD>(qa, base, row_stride, tile * 16, tokens, g, t);

    // Stage K (row-major) and V (transposed); rows [tokens, np) are zero.
#pragma unroll 2
    for (int idx = threadIdx.x; idx < np * VPR; idx += blockDim.x) {
        const int j = idx / VPR;
        const int c0 = (idx % VPR) * 8;
        uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
        if (j < tokens) {
            kv = ldg16(kbase + static_cast<size_t>(j) * row_stride + c0);
            vv = ldg16(vbase + static_cast<size_t>(j) * row_stride + c0);
        }
        *reinterpret_cast<uint4*>(ks + j * KST + c0) = kv;
        const __half* ve = reinterpret_cast<const __half*>(&vv);
#pragma unroll
        for (int e = 0; e < 8; ++e) vt[(c0 + e) * vst + j] = ve[e];
    }
    __syncthreads();

    __half* out_base = out + static_cast<size_t>(b) * tokens * heads * HD + static_cast<size_t>(h) * HD;
    for (; tile < tile_end; tile += nwarps) {
        float o[HD / 8][4];
#pragma unroll
        for (int nc = 0; nc < HD / 8; ++nc) o[nc][0] = o[nc][1] = o[nc][2] = o[nc][3] = 0.f;
        float m0 = -INFINITY, m1 = -INFINITY;  // running max of rows g and g + 8 (log2 domain)
        float l0 = 0.f, l1 = 0.f;              // this lane's part of their running sums

        for (int kb = 0; kb < tokens; kb += KC) {
            // S = Q K^T for keys [kb, kb + KC); tiles entirely past the last key are skipped.
            float s[NT][4];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                s[nt][0] = s[nt][1] = s[nt][2] = s[nt][3] = 0.f;
                if (kb + nt * 8 < tokens) {
                    const __half* krow = ks + (kb + nt * 8 + g) * KST + 2 * t;
#pragma unroll
                    for (int kk = 0; kk < HD / 16; ++kk)
                        mma_16x8x16(s[nt], qa[kk], lds4(krow + 16 * kk), lds4(krow + 16 * kk + 8));
                }
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kb + nt * 8 + 2 * t + (e & 1);
                    s[nt][e] = key < tokens ? s[nt][e] * scale_log2 : -INFINITY;
                }
            }
            // Row maxima over this chunk (4 lanes share a row), then the new running max.
            float x0 = -INFINITY, x1 = -INFINITY;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                x0 = fmaxf(x0, fmaxf(s[nt][0], s[nt][1]));
                x1 = fmaxf(x1, fmaxf(s[nt][2], s[nt][3]));
            }
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 1));
            x0 = fmaxf(x0, __shfl_xor_sync(0xffffffffu, x0, 2));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 1));
            x1 = fmaxf(x1, __shfl_xor_sync(0xffffffffu, x1, 2));
            // Every chunk holds at least one key, so the new maxima are finite; the
            // correction factors of the first chunk are exp2(-inf) = 0.
            const float n0 = fmaxf(m0, x0), n1 = fmaxf(m1, x1);
            const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
            m0 = n0;
            m1 = n1;

            // P = exp2(S - max), rounded to fp16 as the A operand of P V; the sums use the
            // rounded values, so the weights applied to V sum to exactly the divisor.
            uint32_t pa[NT / 2][4];
            float p0 = 0.f, p1 = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const __half2 lo = __floats2half2_rn(exp2f(s[nt][0] - n0), exp2f(s[nt][1] - n0));
                const __half2 hi = __floats2half2_rn(exp2f(s[nt][2] - n1), exp2f(s[nt][3] - n1));
                const float2 flo = __half22float2(lo), fhi = __half22float2(hi);
                p0 += flo.x + flo.y;
                p1 += fhi.x + fhi.y;
                // n-tile nt covers keys 8 nt .. 8 nt + 7 of the chunk: k-step nt / 2, upper
                // half of the k range when nt is odd.
                pa[nt / 2][(nt & 1) * 2 + 0] = pack_half2(lo);
                pa[nt / 2][(nt & 1) * 2 + 1] = pack_half2(hi);
            }
            l0 = l0 * a0 + p0;
            l1 = l1 * a1 + p1;
#pragma unroll
            for (int nc = 0; nc < HD / 8; ++nc) {
                o[nc][0] *= a0;
                o[nc][1] *= a0;
                o[nc][2] *= a1;
                o[nc][3] *= a1;
            }
            // O += P V over the chunk's 16-key steps that hold keys.
#pragma unroll
            for (int kk = 0; kk < NT / 2; ++kk) {
                if (kb + 16 * kk < tokens) {
#pragma unroll
                    for (int nc = 0; nc < HD / 8; ++nc) {
                        const __half* vrow = vt + (nc * 8 + g) * vst + kb + 16 * kk + 2 * t;
                        mma_16x8x16(o[nc], pa[kk], lds4(vrow), lds4(vrow + 8));
                    }
                }
            }
        }

        l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
        l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
        l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
        const float inv0 = 1.f / l0, inv1 = 1.f / l1;
        const int r0 = tile * 16 + g, r1 = r0 + 8;
        __half* out0 = out_base + static_cast<size_t>(r0) * heads * HD + 2 * t;
        __half* out1 = out_base + static_cast<size_t>(r1) * heads * HD + 2 * t;
#pragma unroll
        for (int nc = 0; nc < HD / 8; ++nc) {
            if (r0 < tokens)
                *reinterpret_cast<__half2*>(out0 + nc * 8) = __floats2half2_rn(o[nc][0] * inv0, o[nc][1] * inv0);
            if (r1 < tokens)
                *reinterpret_cast<__half2*>(out1 + nc * 8) = __floats2half2_rn(o[nc][2] * inv1, o[nc][3] * inv1);
        }
        if (tile + nwarps < tile_end) load_q_fragments<HD>(qa, base, row_stride, (tile + nwarps) * 16, tokens, g, t);
    }
}

template <int HD>
int launch_fp16(const void* qkv, void* out, int batch, int tokens, int heads, float scale_log2,
                cudaStream_t stream) {
    const int ntiles = round_up(tokens, 16) / 16;
    int warps, tiles_per_block;
    if (static_cast<long long>(batch) * heads >= kPairsForWholeBlocks) {
        // One block per pair; spread the tiles evenly over at most 8 warps.
        const int rounds = (ntiles + kTcMaxWarps - 1) / kTcMaxWarps;
        warps = (ntiles + rounds - 1) / rounds;
        tiles_per_block = ntiles;
    } else {
        warps = ntiles < 4 ? ntiles : 4;
        tiles_per_block = warps;
    }
    const dim3 grid(static_cast<unsigned>(batch * heads),
                    static_cast<unsigned>((ntiles + tiles_per_block - 1) / tiles_per_block));
    const size_t smem = tc_shared_bytes(tokens, HD);  // <= 48 KB for the supported sizes
    return launch(attention_fp16_kernel<HD>, grid, dim3(warps * 32), smem, stream, static_cast<const __half*>(qkv),
                  static_cast<__half*>(out), tokens, heads, tiles_per_block, scale_log2);
}

// ----------------------------------------------------------------------------------
// fp32, CUDA cores
// ----------------------------------------------------------------------------------

constexpr int kSimtWarps = 4;

template <int HD> __host__ __device__ constexpr int simt_rows() { return HD == 32 ? 2 : 1; }  // query rows per warp step

size_t simt_shared_bytes(int tokens, int hd) {
    const size_t n4 = static_cast<size_t>(round_up(tokens, 4));
    const size_t rows = hd == 32 ? 2 : 1;
    return sizeof(float) * (2 * n4 * hd + kSimtWarps * rows * (hd + n4));
}

// KPL: keys per lane (32 * KPL >= tokens). R: query rows per warp step. Block:
// (batch * heads) x row groups of `rows_per_block` query rows.
template <int HD, int KPL, int R>
__global__ void __launch_bounds__(kSimtWarps * 32)
attention_fp32_kernel(const float* __restrict__ qkv, float* __restrict__ out, int tokens, int heads,
                      int rows_per_block, float scale_log2) {
    constexpr int C4 = HD / 4;  // float4 chunks per head row
    static_assert(C4 >= 8 && (C4 & (C4 - 1)) == 0, "the K swizzle permutes 8 chunks");
    const int n4 = round_up(tokens, 4);
    extern __shared__ float4 smem_simt[];
    float4* ks = smem_simt;                               // [n4][C4], chunk c of key j at c ^ (j & 7)
    float4* vs = ks + n4 * C4;                            // [n4][C4]
    float* qs = reinterpret_cast<float*>(vs + n4 * C4);  // [kSimtWarps][R][HD]
    float* ps = qs + kSimtWarps * R * HD;                 // [kSimtWarps][R][n4]

    const int b = blockIdx.x / heads;
    const int h = blockIdx.x % heads;
    const size_t row_stride = 3 * static_cast<size_t>(heads) * HD;
    const float* base = qkv + static_cast<size_t>(b) * tokens * row_stride + static_cast<size_t>(h) * HD;
    const float* kbase = base + static_cast<size_t>(heads) * HD;
    const float* vbase = base + 2 * static_cast<size_t>(heads) * HD;

#pragma unroll 2
    for (int idx = threadIdx.x; idx < n4 * C4; idx += blockDim.x) {
        const int j = idx / C4;
        const int c = idx % C4;
        float4 kv = make_float4(0.f, 0.f, 0.f, 0.f), vv = kv;
        if (j < tokens) {
            kv = __ldg(reinterpret_cast<const float4*>(kbase + static_cast<size_t>(j) * row_stride) + c);
            vv = __ldg(reinterpret_cast<const float4*>(vbase + static_cast<size_t>(j) * row_stride) + c);
        }
        ks[j * C4 + (c ^ (j & 7))] = kv;
        vs[j * C4 + c] = vv;
    }
    __syncthreads();

    const int warp = threadIdx.x >> 5;
    const int lane = threadIdx.x & 31;
    float* qw = qs + warp * R * HD;
    float* pw = ps + warp * R * n4;
    const int row_begin = static_cast<int>(blockIdx.y) * rows_per_block;
    const int row_end = min(tokens, row_begin + rows_per_block);
    float* out_base = out + static_cast<size_t>(b) * tokens * heads * HD + static_cast<size_t>(h) * HD;

    for (int i0 = row_begin + warp * R; i0 < row_end; i0 += kSimtWarps * R) {
        // Query rows, pre-scaled into the log2 domain; rows past the group repeat its last
        // row and are not stored.
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const float* qrow = base + static_cast<size_t>(min(i0 + r, row_end - 1)) * row_stride;
#pragma unroll
            for (int c = lane; c < HD; c += 32) qw[r * HD + c] = __ldg(qrow + c) * scale_log2;
        }
        __syncwarp();
        float q[R][HD];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int c = 0; c < C4; ++c) {
                const float4 v = reinterpret_cast<const float4*>(qw + r * HD)[c];
                q[r][4 * c] = v.x;
                q[r][4 * c + 1] = v.y;
                q[r][4 * c + 2] = v.z;
                q[r][4 * c + 3] = v.w;
            }

        // Scores of keys lane, lane + 32, ...
        float s[R][KPL];
#pragma unroll
        for (int kt = 0; kt < KPL; ++kt) {
            const int j = lane + 32 * kt;
            float acc[R];
#pragma unroll
            for (int r = 0; r < R; ++r) acc[r] = 0.f;
            if (j < tokens) {
                const float4* krow = ks + j * C4;
#pragma unroll
                for (int c = 0; c < C4; ++c) {
                    const float4 k = krow[c ^ (j & 7)];
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        acc[r] = fmaf(q[r][4 * c], k.x, acc[r]);
                        acc[r] = fmaf(q[r][4 * c + 1], k.y, acc[r]);
                        acc[r] = fmaf(q[r][4 * c + 2], k.z, acc[r]);
                        acc[r] = fmaf(q[r][4 * c + 3], k.w, acc[r]);
                    }
                }
            }
#pragma unroll
            for (int r = 0; r < R; ++r) s[r][kt] = j < tokens ? acc[r] : -INFINITY;
        }

        // Exact softmax per row; unnormalized probabilities to shared memory (zero for
        // the padding keys [tokens, n4)), the divisor applied to the output.
        float inv[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float m = -INFINITY;
#pragma unroll
            for (int kt = 0; kt < KPL; ++kt) m = fmaxf(m, s[r][kt]);
            m = warp_max(m);
            float l = 0.f;
#pragma unroll
            for (int kt = 0; kt < KPL; ++kt) {
                const int j = lane + 32 * kt;
                const float p = exp2f(s[r][kt] - m);
                l += p;
                if (j < n4) pw[r * n4 + j] = p;
            }
            inv[r] = 1.f / warp_sum(l);
        }
        __syncwarp();

        float acc[R][HD / 32];
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int cc = 0; cc < HD / 32; ++cc) acc[r][cc] = 0.f;
        for (int j = 0; j < n4; j += 4) {
            float4 p[R];
#pragma unroll
            for (int r = 0; r < R; ++r) p[r] = *reinterpret_cast<const float4*>(pw + r * n4 + j);
            const float* v = reinterpret_cast<const float*>(vs + j * C4);
#pragma unroll
            for (int cc = 0; cc < HD / 32; ++cc) {
                const int c = lane + 32 * cc;
                const float v0 = v[c], v1 = v[HD + c], v2 = v[2 * HD + c], v3 = v[3 * HD + c];
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    acc[r][cc] = fmaf(p[r].x, v0, acc[r][cc]);
                    acc[r][cc] = fmaf(p[r].y, v1, acc[r][cc]);
                    acc[r][cc] = fmaf(p[r].z, v2, acc[r][cc]);
                    acc[r][cc] = fmaf(p[r].w, v3, acc[r][cc]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            if (i0 + r < row_end) {
                float* o = out_base + static_cast<size_t>(i0 + r) * heads * HD;
#pragma unroll
                for (int cc = 0; cc < HD / 32; ++cc) o[lane + 32 * cc] = acc[r][cc] * inv[r];
            }
        }
        __syncwarp();  // qw and pw are rewritten by this warp's next step
    }
}

// Keys per lane of the fp32 kernel that serves `tokens` tokens.
constexpr int keys_per_lane(int tokens) { return tokens <= 64 ? 2 : tokens <= 128 ? 4 : 8; }

// The MaxDynamicSharedMemorySize attribute of one kernel, set once per device to a value
// that does not depend on the call: the most shared memory the kernel ever takes, capped
// by the device's opt-in limit. The attribute belongs to the device and is shared by every
// host thread (several TensorRT contexts or Triton instances launch concurrently); set per
// call to the call's own size, another thread could lower it between this thread's
// setting and its launch, which then fails. (Devices from ordinal kDevices on, if any, have
// the same value set on every call: still call-independent, so still race-free.)
class SharedMemoryAttribute {
  public:
    int ensure(const void* kernel, size_t most, int device, int optin_limit) {
        std::lock_guard<std::mutex> lock(mutex_);
        if (device >= 0 && device < kDevices && set_[device]) return TRTVIT_OK;
        const int value = static_cast<int>(std::min(most, static_cast<size_t>(optin_limit)));
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, value);
        if (err != cudaSuccess) return cuda_failure(err);
        if (device >= 0 && device < kDevices) set_[device] = true;
        return TRTVIT_OK;
    }

  private:
    static constexpr int kDevices = 64;
    std::mutex mutex_;
    bool set_[kDevices] = {};  // set_[d]: the attribute is set on device d
};

// Largest dynamic shared memory of the fp32 kernel with KPL keys per lane.
template <int HD, int KPL> size_t simt_most_shared_bytes() {
    return simt_shared_bytes(std::min(32 * KPL, HD == 32 ? kMaxTokensHd32 : kMaxTokensHd64), HD);
}

template <int HD, int KPL> constexpr auto fp32_kernel() { return attention_fp32_kernel<HD, KPL, simt_rows<HD>()>; }

// smem above the 48 KB default: `device` is the current device, `optin_limit` its opt-in
// shared memory per block, and smem fits it.
template <int HD, int KPL>
int launch_fp32_kpl(const void* qkv, void* out, int batch, int tokens, int heads, float scale_log2, size_t smem,
                    int device, int optin_limit, cudaStream_t stream) {
    constexpr int R = simt_rows<HD>();
    auto kernel = fp32_kernel<HD, KPL>();
    if (smem > static_cast<size_t>(kDefaultSharedBytes)) {
        static SharedMemoryAttribute attribute;  // one per kernel
        if (int status = attribute.ensure(reinterpret_cast<const void*>(kernel), simt_most_shared_bytes<HD, KPL>(),
                                          device, optin_limit))
            return status;
    }
    const int rows_per_block =
        static_cast<long long>(batch) * heads >= kPairsForWholeBlocks ? tokens : kSimtWarps * R * 4;
    const dim3 grid(static_cast<unsigned>(batch * heads),
                    static_cast<unsigned>((tokens + rows_per_block - 1) / rows_per_block));
    return launch(kernel, grid, dim3(kSimtWarps * 32), smem, stream, static_cast<const float*>(qkv),
                  static_cast<float*>(out), tokens, heads, rows_per_block, scale_log2);
}

// OK when `smem` bytes of dynamic shared memory fit a block on the current device (above
// the 48 KB default, the device's opt-in limit decides); `device` and `optin_limit` are
// filled in when the device is asked.
int shared_memory_fits(size_t smem, int* device = nullptr, int* optin_limit = nullptr) {
    if (smem <= static_cast<size_t>(kDefaultSharedBytes)) return TRTVIT_OK;
    int dev = 0, limit = 0;
    cudaError_t err = cudaGetDevice(&dev);
    if (err == cudaSuccess) err = cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    if (err != cudaSuccess) return cuda_failure(err);
    if (device) *device = dev;
    if (optin_limit) *optin_limit = limit;
    return smem <= static_cast<size_t>(limit) ? TRTVIT_OK : TRTVIT_ERR_UNSUPPORTED;
}

template <int HD>
int launch_fp32(const void* qkv, void* out, int batch, int tokens, int heads, float scale_log2,
                cudaStream_t stream) {
    const size_t smem = simt_shared_bytes(tokens, HD);
    int device = 0, limit = 0;
    if (int status = shared_memory_fits(smem, &device, &limit)) return status;
    switch (keys_per_lane(tokens)) {
        case 2: return launch_fp32_kpl<HD, 2>(qkv, out, batch, tokens, heads, scale_log2, smem, device, limit, stream);
        case 4: return launch_fp32_kpl<HD, 4>(qkv, out, batch, tokens, heads, scale_log2, smem, device, limit, stream);
        default:
            return launch_fp32_kpl<HD, 8>(qkv, out, batch, tokens, heads, scale_log2, smem, device, limit, stream);
    }
}

// The kernel trtvit_attention launches for these sizes (valid and within the maximum).
const void* attention_kernel(int tokens, int head_dim, int dtype) {
    if (dtype == TRTVIT_FLOAT16)
        return head_dim == 32 ? reinterpret_cast<const void*>(attention_fp16_kernel<32>)
                              : reinterpret_cast<const void*>(attention_fp16_kernel<64>);
    const int kpl = keys_per_lane(tokens);
    if (head_dim == 32)
        return kpl == 2 ? reinterpret_cast<const void*>(fp32_kernel<32, 2>())
               : kpl == 4 ? reinterpret_cast<const void*>(fp32_kernel<32, 4>())
                          : reinterpret_cast<const void*>(fp32_kernel<32, 8>());
    return kpl == 2 ? reinterpret_cast<const void*>(fp32_kernel<64, 2>())
                    : reinterpret_cast<const void*>(fp32_kernel<64, 4>());
}

}  // namespace
}  // namespace trtvit

extern "C" TRTVIT_API int trtvit_attention_max_tokens(int head_dim) {
    return head_dim == 32 ? trtvit::kMaxTokensHd32 : head_dim == 64 ? trtvit::kMaxTokensHd64 : 0;
}

extern "C" TRTVIT_API int trtvit_attention_supported(int tokens, int head_dim, int dtype) {
    using namespace trtvit;
    clear_cuda_error();
    // The same answers as trtvit_attention for these values: invalid before unsupported.
    if (tokens <= 0 || head_dim <= 0 || (dtype != TRTVIT_FLOAT32 && dtype != TRTVIT_FLOAT16))
        return TRTVIT_ERR_INVALID_ARGUMENT;
    const int max_tokens = trtvit_attention_max_tokens(head_dim);
    if (max_tokens == 0 || tokens > max_tokens) return TRTVIT_ERR_UNSUPPORTED;
    // A kernel image of the kernel the launch would take, for the current device (a build
    // restricted to other architectures has none).
    cudaFuncAttributes attributes;
    const cudaError_t err = cudaFuncGetAttributes(&attributes, attention_kernel(tokens, head_dim, dtype));
    if (err == cudaErrorNoKernelImageForDevice || err == cudaErrorInvalidDeviceFunction) {
        cuda_failure(err);  // kept for trtvit_last_cuda_error(): why the device cannot run it
        return TRTVIT_ERR_UNSUPPORTED;
    }
    if (err != cudaSuccess) return cuda_failure(err);
    if (dtype == TRTVIT_FLOAT16) return TRTVIT_OK;  // tc_shared_bytes <= 37 KB for every supported size
    return shared_memory_fits(simt_shared_bytes(tokens, head_dim));
}

extern "C" TRTVIT_API int trtvit_attention(const void* qkv, void* out, int batch, int tokens, int heads,
                                           int head_dim, float scale, int dtype, cudaStream_t stream) {
    using namespace trtvit;
    clear_cuda_error();
    // Every check comes before the first CUDA call.
    if (!qkv || !out || batch <= 0 || tokens <= 0 || heads <= 0 || head_dim <= 0) return TRTVIT_ERR_INVALID_ARGUMENT;
    const float scale_log2 = scale * 1.4426950408889634f;  // softmax in base 2: exp(x) = exp2(x log2 e)
    if (!(scale > 0.f) || !(scale_log2 <= FLT_MAX)) return TRTVIT_ERR_INVALID_ARGUMENT;  // positive, finite
    if (dtype != TRTVIT_FLOAT32 && dtype != TRTVIT_FLOAT16) return TRTVIT_ERR_INVALID_ARGUMENT;
    if (!aligned16(qkv) || !aligned16(out)) return TRTVIT_ERR_INVALID_ARGUMENT;
    const int max_tokens = trtvit_attention_max_tokens(head_dim);
    if (max_tokens == 0 || tokens > max_tokens) return TRTVIT_ERR_UNSUPPORTED;
    if (static_cast<long long>(batch) * heads > INT_MAX) return TRTVIT_ERR_UNSUPPORTED;  // grid.x

    if (dtype == TRTVIT_FLOAT16) {
        return head_dim == 32 ? launch_fp16<32>(qkv, out, batch, tokens, heads, scale_log2, stream)
                              : launch_fp16<64>(qkv, out, batch, tokens, heads, scale_log2, stream);
    }
    return head_dim == 32 ? launch_fp32<32>(qkv, out, batch, tokens, heads, scale_log2, stream)
                          : launch_fp32<64>(qkv, out, batch, tokens, heads, scale_log2, stream);
}
