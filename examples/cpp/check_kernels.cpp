// Calls the trtvit kernels from C++ on device buffers and checks them against a host
// computation, in fp32 and fp16. Sizes the device cannot run (trtvit_attention_supported:
// fp32 attention beyond a Turing GPU's 64 KB of shared memory, or no kernel image for the
// device) are skipped, saying why. Exit status 0 when every check that ran passes.
//
//   cmake -S . -B build && cmake --build build -j && ./build/examples/cpp/check_kernels
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "trtvit_kernels.h"

namespace {

int failures = 0, skipped = 0;
size_t shared_optin = 0;  // the device's opt-in shared memory per block

#define CUDA_CHECK(call)                                                                      \
    do {                                                                                      \
        cudaError_t err_ = (call);                                                            \
        if (err_ != cudaSuccess) {                                                            \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(err_)); \
            std::exit(2);                                                                     \
        }                                                                                     \
    } while (0)

// Device buffer holding n values of float or half, filled from / read back to floats.
struct Buffer {
    void* ptr = nullptr;
    size_t n = 0;
    bool half = false;
    Buffer(size_t count, bool fp16) : n(count), half(fp16) { CUDA_CHECK(cudaMalloc(&ptr, n * (half ? 2 : 4))); }
    ~Buffer() { cudaFree(ptr); }
    void upload(const std::vector<float>& v) {
        if (half) {
            std::vector<__half> h(n);
            for (size_t i = 0; i < n; ++i) h[i] = __float2half_rn(v[i]);
            CUDA_CHECK(cudaMemcpy(ptr, h.data(), n * 2, cudaMemcpyHostToDevice));
        } else {
            CUDA_CHECK(cudaMemcpy(ptr, v.data(), n * 4, cudaMemcpyHostToDevice));
        }
    }
    std::vector<float> download() const {
        std::vector<float> v(n);
        if (half) {
            std::vector<__half> h(n);
            CUDA_CHECK(cudaMemcpy(h.data(), ptr, n * 2, cudaMemcpyDeviceToHost));
            for (size_t i = 0; i < n; ++i) v[i] = __half2float(h[i]);
        } else {
            CUDA_CHECK(cudaMemcpy(v.data(), ptr, n * 4, cudaMemcpyDeviceToHost));
        }
        return v;
    }
};

// Values as the device sees them: rounded to half when the buffers are half.
std::vector<float> random_values(size_t n, bool fp16, std::mt19937& rng, float scale = 1.f) {
    std::normal_distribution<float> dist(0.f, scale);
    std::vector<float> v(n);
    for (auto& x : v) {
        x = dist(rng);
        if (fp16) x = __half2float(__float2half_rn(x));
    }
    return v;
}

float round_as(float x, bool fp16) { return fp16 ? __half2float(__float2half_rn(x)) : x; }

void report(const char* what, double err, double limit) {
    const bool ok = err <= limit;
    failures += !ok;
    std::printf("%-48s max|err| %.3g (limit %.1g)  %s\n", what, err, limit, ok ? "PASS" : "FAIL");
}

std::string cuda_error();

// A launcher's status: on success wait for the kernel, otherwise count a failure.
bool launched(const char* kernel, int status) {
    if (status != TRTVIT_OK) {
        const std::string cause = cuda_error();
        std::printf("%s failed: %s%s%s\n", kernel, trtvit_status_string(status), cause.empty() ? "" : ": ",
                    cause.c_str());
        ++failures;
        return false;
    }
    CUDA_CHECK(cudaDeviceSynchronize());
    return true;
}

void check_layernorm(int rows, int d, bool fp16, bool residual, std::mt19937& rng) {
    auto x = random_values(size_t(rows) * d, fp16, rng);
    auto r = random_values(size_t(rows) * d, fp16, rng);
    // gamma near 1 and beta near 0, as in trained models: the outputs stay below 8, where
    // rounding the output to fp16 costs at most 2^-9 (inside the fp16 limit of 2e-3).
    auto g = random_values(d, fp16, rng, 0.1f);
    for (auto& v : g) v = round_as(1.f + v, fp16);
    auto b = random_values(d, fp16, rng, 0.1f);
    Buffer dx(x.size(), fp16), dr(r.size(), fp16), dg(d, fp16), db(d, fp16), ds(x.size(), fp16), dy(x.size(), fp16);
    dx.upload(x), dr.upload(r), dg.upload(g), db.upload(b);
    const int dtype = fp16 ? TRTVIT_FLOAT16 : TRTVIT_FLOAT32;
    int status = residual ? trtvit_layernorm_residual(dx.ptr, dr.ptr, dg.ptr, db.ptr, ds.ptr, dy.ptr, rows, d, 1e-5f,
                                                      dtype, nullptr)
                          : trtvit_layernorm(dx.ptr, dg.ptr, db.ptr, dy.ptr, rows, d, 1e-5f, dtype, nullptr);
    if (!launched("layernorm", status)) return;
    auto y = dy.download();
    const auto s = residual ? ds.download() : std::vector<float>();
    double err = 0, sum_err = 0;
    std::vector<double> row(d);
    for (int i = 0; i < rows; ++i) {
        double mean = 0, var = 0;
        for (int j = 0; j < d; ++j) {
            float v = x[size_t(i) * d + j];
            if (residual) v = round_as(v + r[size_t(i) * d + j], fp16);
            row[j] = v;
            mean += v;
        }
        mean /= d;
        for (int j = 0; j < d; ++j) var += (row[j] - mean) * (row[j] - mean);
        var /= d;
        for (int j = 0; j < d; ++j) {
            double ref = (row[j] - mean) / std::sqrt(var + 1e-5) * g[j] + b[j];
            err = std::max(err, std::fabs(ref - y[size_t(i) * d + j]));
        }
        if (residual)
            for (int j = 0; j < d; ++j) sum_err = std::max(sum_err, std::fabs(row[j] - s[size_t(i) * d + j]));
    }
    char what[96];
    std::snprintf(what, sizeof what, "layernorm%s %s rows %d d %d", residual ? "+residual" : "", fp16 ? "fp16" : "fp32",
                  rows, d);
    report(what, err, fp16 ? 2e-3 : 1e-5);
    if (residual) report("  residual sum", sum_err, 0.0);
}

// The CUDA error behind the library's last status, as "name: description", or "".
std::string cuda_error() {
    const char *name = nullptr, *description = nullptr;
    if (trtvit_last_cuda_error(&name, &description) == 0) return "";
    return std::string(name) + ": " + description;
}

void check_attention(int batch, int tokens, int heads, int hd, bool fp16, std::mt19937& rng) {
    char what[96];
    std::snprintf(what, sizeof what, "attention %s B %d N %d heads %d head_dim %d", fp16 ? "fp16" : "fp32", batch,
                  tokens, heads, hd);
    const int dtype = fp16 ? TRTVIT_FLOAT16 : TRTVIT_FLOAT32;
    const int supported = trtvit_attention_supported(tokens, hd, dtype);
    if (supported == TRTVIT_ERR_UNSUPPORTED) {
        // No kernel image for the device (the CUDA error says so), or more shared memory
        // than the device's opt-in limit (fp32 from N = 165 / 89).
        std::string cause = cuda_error();
        if (cause.empty())
            cause = "needs more shared memory than its opt-in limit of " + std::to_string(shared_optin) + " bytes";
        std::printf("%-48s SKIP: this device cannot run it: %s\n", what, cause.c_str());
        ++skipped;
        return;
    }
    if (!launched("attention size query", supported)) return;
    const int width = heads * hd;
    auto qkv = random_values(size_t(batch) * tokens * 3 * width, fp16, rng);
    Buffer dq(qkv.size(), fp16), dout(size_t(batch) * tokens * width, fp16);
    dq.upload(qkv);
    const float scale = 1.f / std::sqrt(float(hd));
    int status = trtvit_attention(dq.ptr, dout.ptr, batch, tokens, heads, hd, scale, dtype, nullptr);
    if (!launched("attention", status)) return;
    auto out = dout.download();
    auto at = [&](int b, int n, int part, int h, int c) {
        return double(qkv[(((size_t(b) * tokens + n) * 3 + part) * heads + h) * hd + c]);
    };
    double err = 0;
    std::vector<double> p(tokens);
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < tokens; ++i) {
                double m = -1e300, l = 0;
                for (int j = 0; j < tokens; ++j) {
                    double s = 0;
                    for (int c = 0; c < hd; ++c) s += at(b, i, 0, h, c) * at(b, j, 1, h, c);
                    p[j] = s * scale;
                    m = std::max(m, p[j]);
                }
                for (int j = 0; j < tokens; ++j) l += (p[j] = std::exp(p[j] - m));
                for (int c = 0; c < hd; ++c) {
                    double o = 0;
                    for (int j = 0; j < tokens; ++j) o += p[j] / l * at(b, j, 2, h, c);
                    err = std::max(err, std::fabs(o - out[(size_t(b) * tokens + i) * width + h * hd + c]));
                }
            }
    report(what, err, fp16 ? 2e-3 : 1e-5);
}

int expect(const char* what, int status, int wanted) {
    const bool ok = status == wanted;
    std::printf("%-48s -> %s  %s\n", what, trtvit_status_string(status), ok ? "PASS" : "FAIL");
    failures += !ok;
    return status;
}

}  // namespace

int main() {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
        std::fprintf(stderr, "no CUDA device: nothing to check\n");
        return 2;
    }
    cudaDeviceProp prop{};
    CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    shared_optin = prop.sharedMemPerBlockOptin;
    std::printf("libtrtvit_kernels version %d on %s (sm_%d%d)\n", trtvit_kernels_version(), prop.name, prop.major,
                prop.minor);
    std::mt19937 rng(0);
    for (bool fp16 : {false, true}) {
        check_layernorm(2 * 49, 1024, fp16, false, rng);
        check_layernorm(2 * 196, 512, fp16, true, rng);
        check_layernorm(37, 1000, fp16, true, rng);
        check_layernorm(5, 1023, fp16, false, rng);
        check_layernorm(5, 1023, fp16, true, rng);
        check_layernorm(3, 4096, fp16, true, rng);
        check_attention(2, 49, 32, 32, fp16, rng);
        check_attention(1, 196, 16, 32, fp16, rng);
        check_attention(3, 1, 2, 32, fp16, rng);
        check_attention(2, 33, 3, 32, fp16, rng);
        check_attention(1, 256, 2, 32, fp16, rng);
        check_attention(2, 49, 4, 64, fp16, rng);
        check_attention(1, 128, 2, 64, fp16, rng);
    }
    // Errors are reported, never executed: each call below returns before any launch.
    const int too_many = trtvit_attention_max_tokens(32) + 1;
    Buffer big(size_t(too_many) * 3 * 32, false), small(size_t(too_many) * 32, false);
    char what[96];
    std::snprintf(what, sizeof what, "attention with %d tokens", too_many);
    expect(what, trtvit_attention(big.ptr, small.ptr, 1, too_many, 1, 32, 0.1f, TRTVIT_FLOAT32, nullptr),
           TRTVIT_ERR_UNSUPPORTED);
    expect("attention with head_dim 48", trtvit_attention(big.ptr, small.ptr, 1, 8, 1, 48, 0.1f, TRTVIT_FLOAT32, nullptr),
           TRTVIT_ERR_UNSUPPORTED);
    expect("attention with a null qkv", trtvit_attention(nullptr, small.ptr, 1, 8, 1, 32, 0.1f, TRTVIT_FLOAT32, nullptr),
           TRTVIT_ERR_INVALID_ARGUMENT);
    expect("layernorm with 0 rows",
           trtvit_layernorm(big.ptr, big.ptr, big.ptr, small.ptr, 0, 32, 1e-5f, TRTVIT_FLOAT32, nullptr),
           TRTVIT_ERR_INVALID_ARGUMENT);
    expect("layernorm with d 8192",
           trtvit_layernorm(big.ptr, big.ptr, big.ptr, small.ptr, 1, 8192, 1e-5f, TRTVIT_FLOAT32, nullptr),
           TRTVIT_ERR_UNSUPPORTED);
    CUDA_CHECK(cudaDeviceSynchronize());
    if (skipped) std::printf("%d attention checks skipped: beyond this device\n", skipped);
    std::printf("%s\n", failures ? "FAILED" : "all checks passed");
    return failures ? 1 : 0;
}
