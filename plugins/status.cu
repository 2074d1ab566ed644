// Host-only entry points: status names, version, and the CUDA error kept per thread.
#include "common.cuh"

namespace trtvit {
namespace {
thread_local cudaError_t last_cuda_error = cudaSuccess;
}  // namespace

void clear_cuda_error() { last_cuda_error = cudaSuccess; }

int cuda_failure(cudaError_t err) {
    last_cuda_error = err;
    cudaGetLastError();  // the library runtime's own slot; the caller's is separate (static runtime)
    return TRTVIT_ERR_CUDA;
}
}  // namespace trtvit

extern "C" TRTVIT_API const char* trtvit_status_string(int status) {
    switch (status) {
        case TRTVIT_OK: return "ok";
        case TRTVIT_ERR_INVALID_ARGUMENT: return "invalid argument (null or misaligned pointer, size <= 0, dtype, eps or scale)";
        case TRTVIT_ERR_UNSUPPORTED:
            return "unsupported (d, head_dim, token count, shared memory or kernel image beyond the kernels)";
        case TRTVIT_ERR_CUDA: return "CUDA runtime error";
        default: return "unknown status";
    }
}

extern "C" TRTVIT_API int trtvit_kernels_version(void) { return 10000; }

extern "C" TRTVIT_API int trtvit_last_cuda_error(const char** name, const char** description) {
    const cudaError_t err = trtvit::last_cuda_error;
    if (name) *name = cudaGetErrorName(err);
    if (description) *description = cudaGetErrorString(err);
    return static_cast<int>(err);
}
