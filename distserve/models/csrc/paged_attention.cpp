// Decode attention that reads K/V straight from the paged cache through block tables.
//
// Why: the torch path first copies every request's blocks into one padded tensor
// (index_select), then runs SDPA over it, so each byte of context is read three times
// and the padding is attended too. Here each (request, KV head) pair streams its own
// blocks once: a pass for the scores of the query heads that share the KV head, a
// softmax, and a pass for the weighted sum of V. Arithmetic in float32, as SDPA's CPU
// kernel does. AVX-512 where the compiler targets it, plain loops otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

namespace {

inline float to_float(float x) { return x; }
inline float to_float(c10::Half x) { return static_cast<float>(x); }
inline float to_float(c10::BFloat16 x) {
  uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}

// Where one (request, KV head) finds its tokens: K of token t of the context sits at
// k_row(t), V at k_row(t) + kv_offset.
template <typename T>
struct Rows {
  const T* cache;
  const int64_t* table;
  int64_t block_size, s_block, s_tok, head_offset, kv_offset;
  const T* k_row(int64_t t) const {
    return cache + table[t / block_size] * s_block + (t % block_size) * s_tok + head_offset;
  }
};

// --- portable loops --------------------------------------------------------------------
template <typename T>
void scores_plain(const Rows<T>& rows, const float* q, int64_t group, int64_t dim, int64_t len,
                  float* scores) {
  for (int64_t t = 0; t < len; ++t) {
    const T* k = rows.k_row(t);
    for (int64_t g = 0; g < group; ++g) {
      float s = 0.f;
      for (int64_t d = 0; d < dim; ++d) s += q[g * dim + d] * to_float(k[d]);
      scores[g * len + t] = s;
    }
  }
}

template <typename T>
void values_plain(const Rows<T>& rows, const float* p, int64_t group, int64_t dim, int64_t len,
                  float* acc) {
  std::fill(acc, acc + group * dim, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    const T* v = rows.k_row(t) + rows.kv_offset;
    for (int64_t g = 0; g < group; ++g) {
      const float w = p[g * len + t];
      for (int64_t d = 0; d < dim; ++d) acc[g * dim + d] += w * to_float(v[d]);
    }
  }
}

// Turns scores into probabilities in place.
void softmax_plain(float* s, int64_t len) {
  float mx = -INFINITY;
  for (int64_t t = 0; t < len; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
  for (int64_t t = 0; t < len; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  const float inv = 1.f / sum;
  for (int64_t t = 0; t < len; ++t) s[t] *= inv;
}

#ifdef __AVX512F__
// --- AVX-512: 16 lanes along the head dimension ----------------------------------------
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 is the top half of a float32
  __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

constexpr int64_t kMaxChunks = 16;  // head_dim up to 256
constexpr int64_t kMaxLanes = 64;   // query heads per KV head x chunks held at once

// Each K row is loaded (and converted) once for all the query heads that share it.
template <typename T>
void scores_avx512(const Rows<T>& rows, const float* q, int64_t group, int64_t dim, int64_t len,
                   float* scores) {
  const int64_t chunks = dim / 16;
  __m512 qv[kMaxLanes], kv[kMaxChunks];
  for (int64_t i = 0; i < group * chunks; ++i) qv[i] = _mm512_loadu_ps(q + 16 * i);
  for (int64_t t = 0; t < len; ++t) {
    const T* k = rows.k_row(t);
    for (int64_t c = 0; c < chunks; ++c) kv[c] = load16(k + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      __m512 a = _mm512_mul_ps(qv[g * chunks], kv[0]);
      for (int64_t c = 1; c < chunks; ++c) a = _mm512_fmadd_ps(qv[g * chunks + c], kv[c], a);
      scores[g * len + t] = _mm512_reduce_add_ps(a);
    }
  }
}

template <typename T>
void values_avx512(const Rows<T>& rows, const float* p, int64_t group, int64_t dim, int64_t len,
                   float* acc) {
  const int64_t chunks = dim / 16;
  __m512 a[kMaxLanes], vv[kMaxChunks];
  for (int64_t i = 0; i < group * chunks; ++i) a[i] = _mm512_setzero_ps();
  for (int64_t t = 0; t < len; ++t) {
    const T* v = rows.k_row(t) + rows.kv_offset;
    for (int64_t c = 0; c < chunks; ++c) vv[c] = load16(v + 16 * c);
    for (int64_t g = 0; g < group; ++g) {
      const __m512 w = _mm512_set1_ps(p[g * len + t]);
      for (int64_t c = 0; c < chunks; ++c) a[g * chunks + c] = _mm512_fmadd_ps(w, vv[c], a[g * chunks + c]);
    }
  }
  for (int64_t i = 0; i < group * chunks; ++i) _mm512_storeu_ps(acc + 16 * i, a[i]);
}

// e^x for x <= 0, 16 at a time: Cephes' expf polynomial (within 2 ulp of std::exp).
inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 n = _mm512_roundscale_ps(
      _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
      _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}

void softmax_avx512(float* s, int64_t len) {
  const int64_t whole = len / 16 * 16;
  __m512 m = _mm512_set1_ps(-INFINITY);
  for (int64_t t = 0; t < whole; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(s + t));
  float mx = _mm512_reduce_max_ps(m);
  for (int64_t t = whole; t < len; ++t) mx = std::max(mx, s[t]);
  const __m512 vmx = _mm512_set1_ps(mx);
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t t = 0; t < whole; t += 16) {
    const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + t), vmx));
    _mm512_storeu_ps(s + t, e);
    vsum = _mm512_add_ps(vsum, e);
  }
  float sum = _mm512_reduce_add_ps(vsum);
  for (int64_t t = whole; t < len; ++t) {
    s[t] = std::exp(s[t] - mx);
    sum += s[t];
  }
  const __m512 inv = _mm512_set1_ps(1.f / sum);
  for (int64_t t = 0; t < whole; t += 16) _mm512_storeu_ps(s + t, _mm512_mul_ps(_mm512_loadu_ps(s + t), inv));
  for (int64_t t = whole; t < len; ++t) s[t] *= 1.f / sum;
}
#endif

template <typename T>
void decode_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& cache,
                      const at::Tensor& block_tables, const at::Tensor& context_lens,
                      double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), dim = q.size(2);
  const int64_t num_kv_heads = cache.size(3), group = num_heads / num_kv_heads;
  const int64_t width = block_tables.size(1);
  const T* q_ptr = q.data_ptr<T>();
  T* out_ptr = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const float fscale = static_cast<float>(scale);
#ifdef __AVX512F__
  const bool vector = dim % 16 == 0 && dim / 16 * group <= kMaxLanes;
#endif

  at::parallel_for(0, batch * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * dim), acc(group * dim), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, h = item % num_kv_heads, len = lens[b];
      const Rows<T> rows{cache.data_ptr<T>(), tables + b * width, cache.size(2), cache.stride(0),
                         cache.stride(2), h * cache.stride(3), cache.stride(1)};
      scores.resize(group * len);
      for (int64_t i = 0; i < group * dim; ++i)
        qf[i] = to_float(q_ptr[(b * num_heads + h * group) * dim + i]) * fscale;
#ifdef __AVX512F__
      if (vector) scores_avx512(rows, qf.data(), group, dim, len, scores.data());
      else
#endif
        scores_plain(rows, qf.data(), group, dim, len, scores.data());
      for (int64_t g = 0; g < group; ++g) {
#ifdef __AVX512F__
        if (vector) softmax_avx512(scores.data() + g * len, len);
        else
#endif
          softmax_plain(scores.data() + g * len, len);
      }
#ifdef __AVX512F__
      if (vector) values_avx512(rows, scores.data(), group, dim, len, acc.data());
      else
#endif
        values_plain(rows, scores.data(), group, dim, len, acc.data());
      T* o = out_ptr + (b * num_heads + h * group) * dim;
      for (int64_t i = 0; i < group * dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

// out [B, Hq, D] (written), q [B, Hq, D] contiguous, cache [num_blocks, 2, block_size, Hkv, D]
// (any strides but a contiguous last dim), block_tables [B, W] int64, context_lens [B] int64.
void paged_decode_attention(at::Tensor out, const at::Tensor& q, const at::Tensor& cache,
                            const at::Tensor& block_tables, const at::Tensor& context_lens,
                            double scale) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous(), "q and out must be contiguous");
  TORCH_CHECK(cache.dim() == 5 && cache.size(1) == 2 && cache.stride(4) == 1,
              "cache must be [blocks, 2, block_size, heads, dim] with a contiguous last dim");
  TORCH_CHECK(q.dim() == 3 && q.size(2) == cache.size(4) && q.size(1) % cache.size(3) == 0,
              "q must be [batch, heads, dim] with heads a multiple of the KV heads");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong &&
              block_tables.is_contiguous() && context_lens.is_contiguous(),
              "block tables and lengths must be contiguous int64");
  TORCH_CHECK(q.scalar_type() == cache.scalar_type() && out.scalar_type() == q.scalar_type(),
              "q, out and cache must share a dtype");
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention<float>(out, q, cache, block_tables, context_lens, scale); break;
    case at::kBFloat16: decode_attention<c10::BFloat16>(out, q, cache, block_tables, context_lens, scale); break;
    case at::kHalf: decode_attention<c10::Half>(out, q, cache, block_tables, context_lens, scale); break;
    default: TORCH_CHECK(false, "paged_decode_attention: unsupported dtype ", q.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(distserve_cpu, m) {
  m.def("paged_decode_attention(Tensor(a!) out, Tensor q, Tensor cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("paged_decode_attention", &paged_decode_attention);
}
