// Prints what the installed kernel library supports. Host-only calls: runs without a GPU.
#include <cstdio>
#include <initializer_list>

#include "trtvit_kernels.h"

int main() {
    const int v = trtvit_kernels_version();
    std::printf("libtrtvit_kernels %d.%d.%d\n", v / 10000, v / 100 % 100, v % 100);
    for (int head_dim : {32, 64}) {
        std::printf("attention head_dim %d: up to %d tokens\n", head_dim, trtvit_attention_max_tokens(head_dim));
    }
    std::printf("layernorm: d up to %d\n", TRTVIT_LAYERNORM_MAX_D);
    std::printf("status %d: %s\n", TRTVIT_ERR_UNSUPPORTED, trtvit_status_string(TRTVIT_ERR_UNSUPPORTED));
    return 0;
}
