// The kernels' entry points (each defined in its own source file and registered as a
// torch op there), for C++ that chains them without going back through Python.
#pragma once

#include <ATen/ATen.h>

namespace distserve {

void add_rms_norm_(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps);
void silu_mul(at::Tensor out, const at::Tensor& gate_up);
void rotary_cache_write(at::Tensor heads, const at::Tensor& cos, const at::Tensor& signed_sin,
                        at::Tensor cache, const at::Tensor& slot_blocks, const at::Tensor& slot_offsets,
                        int64_t num_q_heads);
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            double scale);
int64_t simd_lanes();
void argmax_rows(at::Tensor indices, const at::Tensor& logits);

bool amx_available();
bool dpbf16_available();
bool avx2_available();
void amx_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                const c10::optional<at::Tensor>& bias);
void dpbf16_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                   const c10::optional<at::Tensor>& bias);
void avx2_linear(at::Tensor& out, const at::Tensor& x, const at::Tensor& packed,
                 const c10::optional<at::Tensor>& bias);

}  // namespace distserve
