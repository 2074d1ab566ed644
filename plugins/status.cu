// Host-only entry points: status names and version. No CUDA runtime call.
#include "trtvit_kernels.h"

extern "C" TRTVIT_API const char* trtvit_status_string(int status) {
    switch (status) {
        case TRTVIT_OK: return "ok";
        case TRTVIT_ERR_INVALID_ARGUMENT: return "invalid argument (null or misaligned pointer, size <= 0, dtype, eps or scale)";
        case TRTVIT_ERR_UNSUPPORTED: return "unsupported (d, head_dim, token count or shared memory beyond the kernels)";
        case TRTVIT_ERR_CUDA: return "CUDA runtime error";
        default: return "unknown status";
    }
}

extern "C" TRTVIT_API int trtvit_kernels_version(void) { return 10000; }
