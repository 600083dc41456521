// Fused elementwise steps of a Llama layer, for CPUs in bf16/fp16 (AVX-512 or AVX2 vectors,
// plain loops elsewhere).
//
// Why: at a decode step's sizes (tens of rows of a few hundred values) each torch op costs
// 10-80 us of dispatch, allocation and dtype round trips, not arithmetic; a Llama layer
// spends ~15 of them between its matmuls (SmolLM2 at batch 32: ~17 ms of a 45 ms step).
// Here each step is one pass over its rows, in float32 with one rounding at the end:
//   add_rms_norm_      residual += x; x = rms_norm(residual) * weight      (vLLM's fused_add_rms_norm)
//   silu_mul           out = silu(gate) * up, gate_up = [gate | up]
//   rotary_cache_write rotate q and k in place (rotate-half convention), then write k and v
//                      into their cache slots
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "cpu_math.h"
#include "kernels.h"

namespace {

template <typename T>
void add_rms_norm_impl(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t rows = x.size(0), dim = x.size(1);
  T* xp = x.data_ptr<T>();
  T* rp = residual.data_ptr<T>();
  const T* wp = weight.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> r(dim);
    for (int64_t i = begin; i < end; ++i) {
      T* xr = xp + i * dim;
      T* rr = rp + i * dim;
      float sum = 0.f;
      int64_t j0 = 0;
#ifdef DISTSERVE_SIMD
      vfloat acc = vzero();
      for (; j0 + kLanes <= dim; j0 += kLanes) {
        vstore(rr + j0, vadd(vload(rr + j0), vload(xr + j0)));
        const vfloat v = vload(rr + j0);  // rounded to T
        vstore(r.data() + j0, v);
        acc = vfma(v, v, acc);
      }
      sum = vsum(acc);
#endif
      for (int64_t j = j0; j < dim; ++j) {
        // the residual stream is kept in T, as the unfused layer keeps it: round, then square
        const T rounded = static_cast<T>(to_float(rr[j]) + to_float(xr[j]));
        rr[j] = rounded;
        r[j] = to_float(rounded);
        sum += r[j] * r[j];
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(dim) + feps);
      j0 = 0;
#ifdef DISTSERVE_SIMD
      const vfloat vinv = vset1(inv);
      for (; j0 + kLanes <= dim; j0 += kLanes)
        vstore(xr + j0, vmul(vmul(vload(r.data() + j0), vinv), vload(wp + j0)));
#endif
      for (int64_t j = j0; j < dim; ++j) xr[j] = static_cast<T>(r[j] * inv * to_float(wp[j]));
    }
  });
}

template <typename T>
void silu_mul_impl(at::Tensor& out, const at::Tensor& gate_up) {
  const int64_t rows = out.size(0), dim = out.size(1);
  T* op = out.data_ptr<T>();
  const T* gp = gate_up.data_ptr<T>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const T* g = gp + i * 2 * dim;
      const T* u = g + dim;
      T* o = op + i * dim;
      int64_t j0 = 0;
#ifdef DISTSERVE_SIMD
      for (; j0 + kLanes <= dim; j0 += kLanes) {  // sigmoid(a) from e = exp(-|a|): 1/(1+e), or e/(1+e) below 0
        const vfloat a = vload(g + j0);
        const vfloat e = exp_nonpositive(vsub(vzero(), vabs(a)));
        const vfloat inv = vdiv(vset1(1.f), vadd(e, vset1(1.f)));
        const vfloat sig = vselect_negative(a, vmul(inv, e), inv);
        vstore(o + j0, vmul(vmul(a, sig), vload(u + j0)));
      }
#endif
      for (int64_t j = j0; j < dim; ++j) {
        const float a = to_float(g[j]);
        o[j] = static_cast<T>(a / (1.f + std::exp(-a)) * to_float(u[j]));
      }
    }
  });
}

template <typename T>
void rotary_cache_write_impl(at::Tensor& heads, const at::Tensor& cos, const at::Tensor& signed_sin,
                             at::Tensor& cache, const at::Tensor& slot_blocks,
                             const at::Tensor& slot_offsets, int64_t num_q_heads) {
  const int64_t tokens = heads.size(0), all_heads = heads.size(1), dim = heads.size(2);
  const int64_t num_kv_heads = (all_heads - num_q_heads) / 2, half = dim / 2;
  const int64_t rotated = num_q_heads + num_kv_heads;
  T* hp = heads.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = signed_sin.data_ptr<T>();
  T* cache_ptr = cache.data_ptr<T>();
  const int64_t* blocks = slot_blocks.data_ptr<int64_t>();
  const int64_t* offsets = slot_offsets.data_ptr<int64_t>();
  const int64_t s_block = cache.stride(0), s_kv = cache.stride(1), s_tok = cache.stride(2),
                s_head = cache.stride(3);
  at::parallel_for(0, tokens, 4, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cp + t * dim;
      const T* s = sp + t * dim;
      T* row = hp + t * all_heads * dim;
      for (int64_t h = 0; h < rotated; ++h) {
        T* x = row + h * dim;
        int64_t j0 = 0;
#ifdef DISTSERVE_SIMD
        for (; j0 + kLanes <= half; j0 += kLanes) {
          const vfloat x1 = vload(x + j0), x2 = vload(x + half + j0);
          vstore(x + j0, vfma(x1, vload(c + j0), vmul(x2, vload(s + j0))));
          vstore(x + half + j0, vfma(x2, vload(c + half + j0), vmul(x1, vload(s + half + j0))));
        }
#endif
        for (int64_t j = j0; j < half; ++j) {  // x * cos + [x2, x1] * signed_sin
          const float x1 = to_float(x[j]), x2 = to_float(x[j + half]);
          x[j] = static_cast<T>(x1 * to_float(c[j]) + x2 * to_float(s[j]));
          x[j + half] = static_cast<T>(x2 * to_float(c[j + half]) + x1 * to_float(s[j + half]));
        }
      }
      T* slot = cache_ptr + blocks[t] * s_block + offsets[t] * s_tok;
      for (int64_t h = 0; h < num_kv_heads; ++h) {
        std::memcpy(slot + h * s_head, row + (num_q_heads + h) * dim, dim * sizeof(T));
        std::memcpy(slot + s_kv + h * s_head, row + (rotated + h) * dim, dim * sizeof(T));
      }
    }
  });
}

}  // namespace

namespace distserve {  // entry points, also called by decode_layers.cpp

// x, residual [rows, dim] contiguous, weight [dim]; both x and residual are written.
void add_rms_norm_(at::Tensor x, at::Tensor residual, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.sizes() == residual.sizes() && weight.dim() == 1 &&
                  weight.size(0) == x.size(1),
              "add_rms_norm_: x and residual must be [rows, dim] and weight [dim]");
  TORCH_CHECK(x.is_contiguous() && residual.is_contiguous() && weight.is_contiguous(),
              "add_rms_norm_: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() && x.scalar_type() == weight.scalar_type(),
              "add_rms_norm_: x, residual and weight must share a dtype");
  DISPATCH_FLOAT_TYPES(x.scalar_type(), "add_rms_norm_", add_rms_norm_impl<scalar>(x, residual, weight, eps));
}

// out [rows, dim], gate_up [rows, 2 * dim], both contiguous.
void silu_mul(at::Tensor out, const at::Tensor& gate_up) {
  TORCH_CHECK(out.dim() == 2 && gate_up.dim() == 2 && gate_up.size(0) == out.size(0) &&
                  gate_up.size(1) == 2 * out.size(1),
              "silu_mul: out must be [rows, dim] and gate_up [rows, 2 * dim]");
  TORCH_CHECK(out.is_contiguous() && gate_up.is_contiguous(), "silu_mul: tensors must be contiguous");
  TORCH_CHECK(out.scalar_type() == gate_up.scalar_type(), "silu_mul: out and gate_up must share a dtype");
  DISPATCH_FLOAT_TYPES(out.scalar_type(), "silu_mul", silu_mul_impl<scalar>(out, gate_up));
}

// heads [T, Hq + 2 Hkv, D] contiguous (q, k, v heads), cos and signed_sin [T, D] contiguous,
// cache [blocks, 2, block_size, Hkv, D] with contiguous (Hkv, D), slot_blocks/offsets [T] int64.
void rotary_cache_write(at::Tensor heads, const at::Tensor& cos, const at::Tensor& signed_sin,
                        at::Tensor cache, const at::Tensor& slot_blocks, const at::Tensor& slot_offsets,
                        int64_t num_q_heads) {
  TORCH_CHECK(heads.dim() == 3 && heads.is_contiguous() && heads.size(2) % 2 == 0,
              "rotary_cache_write: heads must be contiguous [tokens, heads, even dim]");
  const int64_t num_kv_heads = (heads.size(1) - num_q_heads) / 2;
  TORCH_CHECK(num_q_heads > 0 && num_kv_heads > 0 && num_q_heads + 2 * num_kv_heads == heads.size(1),
              "rotary_cache_write: heads must hold q, k and v heads");
  TORCH_CHECK(cos.is_contiguous() && signed_sin.is_contiguous() && cos.dim() == 2 &&
                  cos.sizes() == signed_sin.sizes() && cos.size(0) == heads.size(0) &&
                  cos.size(1) == heads.size(2),
              "rotary_cache_write: cos and sin must be contiguous [tokens, dim]");
  TORCH_CHECK(cache.dim() == 5 && cache.size(1) == 2 && cache.size(3) == num_kv_heads &&
                  cache.size(4) == heads.size(2) && cache.stride(4) == 1 &&
                  cache.stride(3) == heads.size(2),
              "rotary_cache_write: cache must be [blocks, 2, block_size, kv heads, dim]");
  TORCH_CHECK(slot_blocks.scalar_type() == at::kLong && slot_offsets.scalar_type() == at::kLong &&
                  slot_blocks.is_contiguous() && slot_offsets.is_contiguous() &&
                  slot_blocks.numel() == heads.size(0) && slot_offsets.numel() == heads.size(0),
              "rotary_cache_write: slots must be contiguous int64, one per token");
  TORCH_CHECK(heads.scalar_type() == cos.scalar_type() && heads.scalar_type() == signed_sin.scalar_type() &&
                  heads.scalar_type() == cache.scalar_type(),
              "rotary_cache_write: heads, cos, sin and cache must share a dtype");
  DISPATCH_FLOAT_TYPES(heads.scalar_type(), "rotary_cache_write",
                      rotary_cache_write_impl<scalar>(heads, cos, signed_sin, cache, slot_blocks,
                                                      slot_offsets, num_q_heads));
}

}  // namespace distserve

TORCH_LIBRARY_FRAGMENT(distserve_cpu, m) {
  m.def("add_rms_norm_(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("silu_mul(Tensor(a!) out, Tensor gate_up) -> ()");
  m.def("rotary_cache_write(Tensor(a!) heads, Tensor cos, Tensor signed_sin, Tensor(b!) cache, "
        "Tensor slot_blocks, Tensor slot_offsets, int num_q_heads) -> ()");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("add_rms_norm_", &distserve::add_rms_norm_);
  m.impl("silu_mul", &distserve::silu_mul);
  m.impl("rotary_cache_write", &distserve::rotary_cache_write);
}
