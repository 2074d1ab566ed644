// A CUDA runtime in host memory for testing the kernel library's host code without a GPU.
//
// The library's .cu files are compiled by nvcc with `-cudart none` and linked against this
// file instead of the CUDA runtime: it defines the runtime functions they call (and those
// the C++ example calls) with the runtime's C signatures. It registers every kernel under
// its device name (from nvcc's registration code), simulates devices with their own opt-in
// shared-memory limits and kernel-image availability, enforces a kernel's
// MaxDynamicSharedMemorySize attribute at launch as the runtime does, counts launches and
// attribute calls, and, when asked, executes the library's kernels on the host (for the
// example). Control functions are named trtvit_mock_*.
//
// Environment at load: TRTVIT_MOCK_OPTIN="232448,65536" (one opt-in limit per device;
// default one device of 227 KB), TRTVIT_MOCK_NO_IMAGE=1 (no kernel image on any device),
// TRTVIT_MOCK_EXECUTE=1 (run launched kernels on the host).
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#define MOCK_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr int kDefaultShared = 48 * 1024;

struct Device {
    int optin_limit = 232448;
    bool has_image = true;
    std::map<const void*, int> max_dynamic_shared;  // per kernel, set by cudaFuncSetAttribute
};

std::mutex state_mutex;
std::vector<Device> devices(1);
std::map<const void*, std::string> kernel_names;  // host stub -> device function name
bool execute = false;
std::atomic<int> launches{0}, attribute_calls{0}, last_attribute_value{0};
thread_local int current_device = 0;
thread_local cudaError_t last_error = cudaSuccess;

// The race hook: the next cudaFuncSetAttribute waits until another thread's launch returns.
std::mutex hold_mutex;
std::condition_variable hold_cv;
int hold_ms = 0;            // armed when > 0
bool holding = false;       // a call is being held
int launches_while_held = 0;

// The race hook, at the end of a successful cudaFuncSetAttribute: between the caller's
// attribute call and its launch.
void hold_after_attribute() {
    std::unique_lock<std::mutex> lock(hold_mutex);
    if (hold_ms > 0) {
        const int ms = hold_ms;
        hold_ms = 0;
        holding = true;
        hold_cv.wait_for(lock, std::chrono::milliseconds(ms), [] { return launches_while_held > 0; });
        holding = false;
    }
}

cudaError_t fail(cudaError_t err) {
    last_error = err;
    return err;
}

Device* device_or_null() {
    return current_device >= 0 && current_device < static_cast<int>(devices.size()) ? &devices[current_device]
                                                                                      : nullptr;
}

void configure_from_environment() {
    if (const char* optin = std::getenv("TRTVIT_MOCK_OPTIN")) {
        devices.clear();
        for (const char* p = optin; *p;) {
            char* end = nullptr;
            const long v = std::strtol(p, &end, 10);
            if (end == p) break;
            devices.emplace_back();
            devices.back().optin_limit = static_cast<int>(v);
            p = *end == ',' ? end + 1 : end;
        }
    }
    if (const char* no_image = std::getenv("TRTVIT_MOCK_NO_IMAGE"))
        for (auto& d : devices) d.has_image = std::strcmp(no_image, "1") != 0;
    if (const char* e = std::getenv("TRTVIT_MOCK_EXECUTE")) execute = std::strcmp(e, "1") == 0;
}

struct Init {
    Init() { configure_from_environment(); }
} init;

// --- host execution of the library's kernels (for the C++ example) ---------------------

template <typename T> float load(const void* p, size_t i) {
    if constexpr (sizeof(T) == 2) return __half2float(static_cast<const __half*>(p)[i]);
    else return static_cast<const float*>(p)[i];
}
template <typename T> void store(void* p, size_t i, float v) {
    if constexpr (sizeof(T) == 2) static_cast<__half*>(p)[i] = __float2half_rn(v);
    else static_cast<float*>(p)[i] = v;
}
template <typename T> float round_to(float v) {
    if constexpr (sizeof(T) == 2) return __half2float(__float2half_rn(v));
    else return v;
}

template <typename T> void layernorm(void** a, bool residual) {
    const void *x = *static_cast<void**>(a[0]), *r = *static_cast<void**>(a[1]);
    const void *g = *static_cast<void**>(a[2]), *b = *static_cast<void**>(a[3]);
    void *s = *static_cast<void**>(a[4]), *y = *static_cast<void**>(a[5]);
    const int rows = *static_cast<int*>(a[6]), d = *static_cast<int*>(a[7]);
    const float eps = *static_cast<float*>(a[8]);
    std::vector<float> v(d);
    for (int i = 0; i < rows; ++i) {
        const size_t base = size_t(i) * d;
        float mean = 0, var = 0;
        for (int j = 0; j < d; ++j) {
            v[j] = load<T>(x, base + j);
            if (residual) {
                v[j] = round_to<T>(v[j] + load<T>(r, base + j));
                store<T>(s, base + j, v[j]);
            }
            mean += v[j];
        }
        mean /= d;
        for (int j = 0; j < d; ++j) var += (v[j] - mean) * (v[j] - mean);
        const float rstd = 1.f / std::sqrt(var / d + eps);
        for (int j = 0; j < d; ++j) store<T>(y, base + j, (v[j] - mean) * rstd * load<T>(g, j) + load<T>(b, j));
    }
}

template <typename T> void attention(void** a, dim3 grid, int hd) {
    const void* qkv = *static_cast<void**>(a[0]);
    void* out = *static_cast<void**>(a[1]);
    const int tokens = *static_cast<int*>(a[2]), heads = *static_cast<int*>(a[3]);
    const float scale_log2 = *static_cast<float*>(a[5]);
    const int batch = static_cast<int>(grid.x) / heads;
    auto at = [&](int b, int n, int part, int h, int c) {
        return load<T>(qkv, (((size_t(b) * tokens + n) * 3 + part) * heads + h) * hd + c);
    };
    std::vector<float> p(tokens);
    for (int b = 0; b < batch; ++b)
        for (int h = 0; h < heads; ++h)
            for (int i = 0; i < tokens; ++i) {
                float m = -INFINITY, l = 0;
                for (int j = 0; j < tokens; ++j) {
                    float s = 0;
                    for (int c = 0; c < hd; ++c) s += at(b, i, 0, h, c) * at(b, j, 1, h, c);
                    m = std::max(m, p[j] = s * scale_log2);
                }
                for (int j = 0; j < tokens; ++j) l += (p[j] = std::exp2(p[j] - m));
                for (int c = 0; c < hd; ++c) {
                    float o = 0;
                    for (int j = 0; j < tokens; ++j) o += p[j] * at(b, j, 2, h, c);
                    store<T>(out, (size_t(b) * tokens + i) * heads * hd + size_t(h) * hd + c, o / l);
                }
            }
}

// Decodes the launch by the kernel's (mangled) name: its template arguments give the
// element type, the residual flag and head_dim; the arguments are the kernel's parameters.
void run_on_host(const std::string& name, dim3 grid, void** args) {
    const bool half = name.find("I6__half") != std::string::npos;
    if (name.find("layernorm_kernel") != std::string::npos) {
        const bool residual = name.find("Lb1E") != std::string::npos;
        half ? layernorm<__half>(args, residual) : layernorm<float>(args, residual);
    } else if (name.find("attention_fp16_kernel") != std::string::npos) {
        attention<__half>(args, grid, name.find("ILi64E") != std::string::npos ? 64 : 32);
    } else if (name.find("attention_fp32_kernel") != std::string::npos) {
        attention<float>(args, grid, name.find("ILi64E") != std::string::npos ? 64 : 32);
    }
}

}  // namespace

// --- control ---------------------------------------------------------------------------

// `count` devices with these opt-in limits and kernel images (has_image may be null: all
// have one); attributes, counters and the current device of the calling thread reset.
MOCK_API void trtvit_mock_set_devices(int count, const int* optin_limits, const int* has_image) {
    std::lock_guard<std::mutex> lock(state_mutex);
    devices.assign(count, Device{});
    for (int i = 0; i < count; ++i) {
        devices[i].optin_limit = optin_limits[i];
        devices[i].has_image = has_image == nullptr || has_image[i] != 0;
    }
    launches = attribute_calls = last_attribute_value = 0;
    current_device = 0;
}

MOCK_API void trtvit_mock_set_execute(int on) { execute = on != 0; }
MOCK_API int trtvit_mock_launches(void) { return launches; }
MOCK_API int trtvit_mock_attribute_calls(void) { return attribute_calls; }
MOCK_API int trtvit_mock_last_attribute_value(void) { return last_attribute_value; }

// Arm the race hook: the next successful cudaFuncSetAttribute (on any thread) returns only
// once a launch on another thread has returned, or after `milliseconds`.
MOCK_API void trtvit_mock_hold_next_attribute(int milliseconds) {
    std::lock_guard<std::mutex> lock(hold_mutex);
    hold_ms = milliseconds;
    launches_while_held = 0;
}
MOCK_API int trtvit_mock_holding(void) {
    std::lock_guard<std::mutex> lock(hold_mutex);
    return holding;
}

// --- the runtime -----------------------------------------------------------------------

extern "C" {

void** __cudaRegisterFatBinary(void* fat_cubin) { return static_cast<void**>(fat_cubin); }
void __cudaRegisterFatBinaryEnd(void**) {}
void __cudaUnregisterFatBinary(void**) {}
char __cudaInitModule(void**) { return 1; }
void __cudaRegisterFunction(void**, const char* host_fun, char* device_fun, const char*, int, uint3*, uint3*, dim3*,
                            dim3*, int*) {
    std::lock_guard<std::mutex> lock(state_mutex);
    kernel_names[host_fun] = device_fun;
}
cudaError_t __cudaPopCallConfiguration(dim3*, dim3*, size_t*, void*) { return cudaErrorNotSupported; }
unsigned __cudaPushCallConfiguration(dim3, dim3, size_t, CUstream_st*) { return 1; }
cudaError_t __cudaGetKernel(cudaKernel_t*, const void*) { return cudaErrorNotSupported; }
cudaError_t __cudaLaunchKernel(cudaKernel_t, dim3, dim3, void**, size_t, cudaStream_t) {
    return cudaErrorNotSupported;
}

const char* cudaGetErrorName(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "cudaSuccess";
        case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
        case cudaErrorNoDevice: return "cudaErrorNoDevice";
        case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
        case cudaErrorNoKernelImageForDevice: return "cudaErrorNoKernelImageForDevice";
        case cudaErrorInvalidDeviceFunction: return "cudaErrorInvalidDeviceFunction";
        default: return "cudaErrorUnknown";
    }
}

const char* cudaGetErrorString(cudaError_t err) {
    switch (err) {
        case cudaSuccess: return "no error";
        case cudaErrorInvalidValue: return "invalid argument";
        case cudaErrorNoDevice: return "no CUDA-capable device is detected";
        case cudaErrorNoKernelImageForDevice: return "no kernel image is available for execution on the device";
        default: return "unknown error";
    }
}

cudaError_t cudaGetLastError(void) {
    const cudaError_t err = last_error;
    last_error = cudaSuccess;
    return err;
}

cudaError_t cudaGetDeviceCount(int* count) {
    *count = static_cast<int>(devices.size());
    return devices.empty() ? fail(cudaErrorNoDevice) : cudaSuccess;
}

cudaError_t cudaGetDevice(int* device) {
    if (devices.empty()) return fail(cudaErrorNoDevice);
    *device = current_device;
    return cudaSuccess;
}

cudaError_t cudaSetDevice(int device) {
    if (device < 0 || device >= static_cast<int>(devices.size())) return fail(cudaErrorInvalidDevice);
    current_device = device;
    return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device) {
    if (device < 0 || device >= static_cast<int>(devices.size())) return fail(cudaErrorInvalidDevice);
    if (attr != cudaDevAttrMaxSharedMemoryPerBlockOptin) return fail(cudaErrorInvalidValue);
    *value = devices[device].optin_limit;
    return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(cudaDeviceProp* prop, int device) {
    if (device < 0 || device >= static_cast<int>(devices.size())) return fail(cudaErrorInvalidDevice);
    std::memset(prop, 0, sizeof *prop);
    std::snprintf(prop->name, sizeof prop->name, "mock GPU (%d bytes of opt-in shared memory)",
                  devices[device].optin_limit);
    prop->major = devices[device].optin_limit <= 65536 ? 7 : 9;
    prop->minor = devices[device].optin_limit <= 65536 ? 5 : 0;
    prop->sharedMemPerBlockOptin = devices[device].optin_limit;
    return cudaSuccess;
}

cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, const void* func) {
    Device* d = device_or_null();
    if (d == nullptr) return fail(cudaErrorNoDevice);
    if (!d->has_image) return fail(cudaErrorNoKernelImageForDevice);
    std::lock_guard<std::mutex> lock(state_mutex);
    if (!kernel_names.count(func)) return fail(cudaErrorInvalidDeviceFunction);
    std::memset(attr, 0, sizeof *attr);
    attr->maxThreadsPerBlock = 1024;
    attr->maxDynamicSharedSizeBytes =
        d->max_dynamic_shared.count(func) ? d->max_dynamic_shared[func] : kDefaultShared;
    return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void* func, cudaFuncAttribute attr, int value) {
    attribute_calls++;
    last_attribute_value = value;
    Device* d = device_or_null();
    if (d == nullptr) return fail(cudaErrorNoDevice);
    if (!d->has_image) return fail(cudaErrorNoKernelImageForDevice);
    std::unique_lock<std::mutex> lock(state_mutex);
    if (!kernel_names.count(func)) return fail(cudaErrorInvalidDeviceFunction);
    if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize || value < 0 || value > d->optin_limit)
        return fail(cudaErrorInvalidValue);
    d->max_dynamic_shared[func] = value;
    lock.unlock();
    hold_after_attribute();
    return cudaSuccess;
}

cudaError_t cudaLaunchKernel(const void* func, dim3 grid, dim3 block, void** args, size_t smem, cudaStream_t) {
    Device* d = device_or_null();
    if (d == nullptr) return fail(cudaErrorNoDevice);
    if (!d->has_image) return fail(cudaErrorNoKernelImageForDevice);
    std::string name;
    cudaError_t result = cudaSuccess;
    {
        std::lock_guard<std::mutex> lock(state_mutex);
        auto it = kernel_names.find(func);
        if (it == kernel_names.end()) {
            result = cudaErrorInvalidDeviceFunction;
        } else {
            name = it->second;
            const int allowed = d->max_dynamic_shared.count(func) ? d->max_dynamic_shared[func] : kDefaultShared;
            if (smem > static_cast<size_t>(allowed) || grid.x == 0 || block.x == 0 || block.x > 1024)
                result = cudaErrorInvalidValue;
        }
    }
    if (result == cudaSuccess) {
        launches++;
        if (execute) run_on_host(name, grid, args);
    }
    {
        std::lock_guard<std::mutex> lock(hold_mutex);
        if (holding) {
            launches_while_held++;
            hold_cv.notify_all();
        }
    }
    return result == cudaSuccess ? cudaSuccess : fail(result);
}

cudaError_t cudaMalloc(void** ptr, size_t size) {
    *ptr = std::aligned_alloc(256, (size + 255) / 256 * 256);
    return *ptr ? cudaSuccess : fail(cudaErrorMemoryAllocation);
}

cudaError_t cudaFree(void* ptr) {
    std::free(ptr);
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void* dst, const void* src, size_t count, cudaMemcpyKind) {
    std::memcpy(dst, src, count);
    return cudaSuccess;
}

cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }

}  // extern "C"
