// A Llama decoder stack's decode step in one call: every layer's norms, projections, rotary,
// cache write, paged attention and MLP, through the same kernels the Python layers call.
//
// Why: at batch 1 a decode step streams the weights once and does little else, so what
// surrounds the kernels shows. SmolLM2's 30 layers make ~270 op calls and ~270 module calls a
// step from Python, 5-8 ms of a ~25 ms step on a 2-core Zen 3 (its weights' bandwidth floor is
// 10-15 ms there). From C++ each call costs a tensor allocation and a function call.
// The kernels and their order are those of the Python path, so its results are bit for bit
// the same (tests/models/test_decode_layers.py).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "kernels.h"

namespace {

using LinearFn = void (*)(at::Tensor&, const at::Tensor&, const at::Tensor&,
                          const c10::optional<at::Tensor>&);

// one layer's tensors in `weights`: input norm, q/k/v, o, post-attention norm, gate/up, down
// (the projections packed by amx_pack)
constexpr int64_t kPerLayer = 6;

LinearFn linear_kernel(const std::string& name) {
  if (name == "amx") return &distserve::amx_linear;
  if (name == "dpbf16") return &distserve::dpbf16_linear;
  if (name == "avx2") return &distserve::avx2_linear;
  TORCH_CHECK(false, "llama_decode_layers: no linear kernel named ", name);
}

at::Tensor linear(LinearFn kernel, const at::Tensor& x, const at::Tensor& packed, int64_t out_features,
                  const c10::optional<at::Tensor>& bias) {
  at::Tensor out = at::empty({x.size(0), out_features}, x.options());
  kernel(out, x, packed, bias);
  return out;
}

// x [B, hidden] (the embeddings, or the previous stage's output) and residual (none before
// the first layer) -> (the last layer's output, the residual stream before it is added), as
// LlamaDecoderLayer.forward leaves them. x and residual are overwritten, and the residual
// returned is the one passed in (or, before the first layer, a new one): the schema does not
// say so, so this op is for eager calls only (not for torch.compile or functionalization).
std::tuple<at::Tensor, at::Tensor> llama_decode_layers(
    at::Tensor x, const c10::optional<at::Tensor>& residual_in, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::Tensor& kv_cache,
    const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& slot_blocks,
    const at::Tensor& slot_offsets, const at::Tensor& block_tables, const at::Tensor& context_lens,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t ffn, double eps, double scale,
    c10::string_view kernel_name) {
  const int64_t layers = static_cast<int64_t>(weights.size()) / kPerLayer;
  TORCH_CHECK(layers > 0 && static_cast<int64_t>(weights.size()) == layers * kPerLayer &&
                  static_cast<int64_t>(qkv_biases.size()) == layers,
              "llama_decode_layers: ", kPerLayer, " weights and one q/k/v bias (or None) a layer");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "llama_decode_layers: x must be contiguous [batch, hidden]");
  TORCH_CHECK(kv_cache.dim() == 6 && kv_cache.size(1) == layers,
              "llama_decode_layers: kv_cache must be [blocks, layers, 2, block_size, kv heads, dim]");
  const LinearFn kernel = linear_kernel(std::string(kernel_name));
  const int64_t batch = x.size(0), hidden = x.size(1), dim = kv_cache.size(5);
  const int64_t qkv_size = (num_q_heads + 2 * num_kv_heads) * dim;
  at::Tensor residual = residual_in.has_value() ? *residual_in : at::Tensor();
  for (int64_t i = 0; i < layers; ++i) {
    const at::Tensor* w = weights.data() + i * kPerLayer;
    if (!residual.defined()) {
      // the first layer of the model: nothing to add yet, and x + 0 is x, so the other layers'
      // fused norm serves (as fused.rms_norm does from Python). torch's rms_norm here took
      // 0.12-0.2 ms a step after the stream had emptied the caches (SmolLM2 batch 1, AMD Zen
      // 4); with this the token took 0.96x the time (11 of 16 paired runs faster)
      residual = at::zeros_like(x);
    }
    distserve::add_rms_norm_(x, residual, w[0], eps);
    const at::Tensor layer_cache = kv_cache.select(1, i);
    const at::Tensor heads = linear(kernel, x, w[1], qkv_size, qkv_biases.get(i))
                                 .view({batch, num_q_heads + 2 * num_kv_heads, dim});
    distserve::rotary_cache_write(heads, cos, signed_sin, layer_cache, slot_blocks, slot_offsets,
                                  num_q_heads);
    at::Tensor attention = at::empty({batch, num_q_heads, dim}, x.options());
    distserve::paged_decode_attention(attention, heads.narrow(1, 0, num_q_heads), layer_cache,
                                      block_tables, context_lens, scale);
    x = linear(kernel, attention.view({batch, num_q_heads * dim}), w[2], hidden, c10::nullopt);
    distserve::add_rms_norm_(x, residual, w[3], eps);
    const at::Tensor gate_up = linear(kernel, x, w[4], 2 * ffn, c10::nullopt);
    at::Tensor activated = at::empty({batch, ffn}, x.options());
    distserve::silu_mul(activated, gate_up);
    x = linear(kernel, activated, w[5], hidden, c10::nullopt);
  }
  return {x, residual};
}

// The same layers, then the final norm and the head: the logits [B, vocab] of every row (a
// decode-only batch samples them all). Why one call: the layers stream the weights through
// every cache (SmolLM2: 213 MB; L3 is 32 MB here), and each Python op after that finds its
// interpreter and dispatcher state gone: the final norm cost ~170 us between the layers and
// the head from Python, 12 us when its state is cached (AMD Zen 4, batch 1).
at::Tensor llama_decode_logits(
    at::Tensor x, const c10::optional<at::Tensor>& residual_in, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::Tensor& kv_cache,
    const at::Tensor& cos, const at::Tensor& signed_sin, const at::Tensor& slot_blocks,
    const at::Tensor& slot_offsets, const at::Tensor& block_tables, const at::Tensor& context_lens,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t ffn, double eps, double scale,
    c10::string_view kernel_name, const at::Tensor& norm, const at::Tensor& head, int64_t vocab) {
  auto [hidden, residual] = llama_decode_layers(
      x, residual_in, weights, qkv_biases, kv_cache, cos, signed_sin, slot_blocks, slot_offsets,
      block_tables, context_lens, num_q_heads, num_kv_heads, ffn, eps, scale, kernel_name);
  distserve::add_rms_norm_(hidden, residual, norm, eps);
  return linear(linear_kernel(std::string(kernel_name)), hidden, head, vocab, c10::nullopt);
}


// Greedy decoding of up to `steps` tokens a row in one call, for a decode-only batch: each
// step embeds the batch's last tokens, runs llama_decode_logits at the next position of every
// row and takes each row's argmax as its next token. ids [B] are the tokens of the first
// step, context_lens [B] the tokens in the cache after it, and last_lens [B] each row's
// context after its last step that counts (its table holds slots up to there): a row past
// it computes its last position again, with a token the engine drops (its request has
// stopped by then). Returns the tokens [B, steps]. Why: after a step has streamed the weights
// through every cache, the Python between two steps (building the next step's inputs, the
// embedding, the argmax) finds its state gone: ~0.6 ms of SmolLM2's 7 ms batch-1 step (AMD
// Zen 4). The ops are those of one step from Python, so the tokens are those of `steps`
// calls, bit for bit.
at::Tensor llama_decode_ahead(
    const at::Tensor& ids, const at::Tensor& embedding, const at::Tensor& rope, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& qkv_biases, const at::Tensor& kv_cache,
    const at::Tensor& block_tables, const at::Tensor& context_lens, const at::Tensor& last_lens,
    int64_t num_q_heads, int64_t num_kv_heads, int64_t ffn, double eps, double scale,
    c10::string_view kernel_name, const at::Tensor& norm, const at::Tensor& head, int64_t vocab,
    int64_t steps) {
  const int64_t batch = ids.numel(), block_size = kv_cache.size(3);
  TORCH_CHECK(steps >= 1, "llama_decode_ahead: steps must be >= 1, got ", steps);
  for (const at::Tensor* t : {&ids, &context_lens, &last_lens})
    TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->numel() == batch,
                "llama_decode_ahead: ids, context_lens and last_lens must be int64 [batch]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == batch &&
                  block_tables.scalar_type() == at::kLong,
              "llama_decode_ahead: block_tables must be int64 [batch, blocks]");
  TORCH_CHECK(rope.dim() == 3 && rope.size(0) == 2 && embedding.dim() == 2,
              "llama_decode_ahead: rope must be [2, positions, head_dim], embedding [vocab, hidden]");
  TORCH_CHECK(context_lens.min().item<int64_t>() >= 1 && (last_lens >= context_lens).all().item<bool>() &&
                  last_lens.max().item<int64_t>() <= std::min(rope.size(1), block_tables.size(1) * block_size),
              "llama_decode_ahead: the rows' last lengths run past the positions (", rope.size(1),
              ") or the block tables (", block_tables.size(1) * block_size, " slots)");
  // every step's positions are known now: their rotary rows, slots and lengths are looked
  // up once, and a step's own work is its embedding rows, the layers and the argmax
  const at::Tensor step = at::arange(steps, context_lens.options()).unsqueeze(0);     // [1, steps]
  const at::Tensor by_row = at::minimum(context_lens.unsqueeze(1) + step, last_lens.unsqueeze(1));
  const at::Tensor lens = by_row.t().contiguous();                                    // [steps, B]
  const at::Tensor positions = (lens - 1).flatten();
  const at::Tensor cos = rope[0].index_select(0, positions).view({steps, batch, -1});
  const at::Tensor sin = rope[1].index_select(0, positions).view({steps, batch, -1});
  const at::Tensor slot_blocks =
      block_tables.gather(1, at::floor_divide(by_row - 1, block_size)).t().contiguous();
  const at::Tensor slot_offsets = at::remainder(positions, block_size).view({steps, batch});
  at::Tensor tokens = at::empty({steps, batch}, ids.options());
  at::Tensor next = ids.contiguous();
  for (int64_t s = 0; s < steps; ++s) {
    const at::Tensor logits = llama_decode_logits(
        embedding.index_select(0, next), c10::nullopt, weights, qkv_biases, kv_cache, cos[s],
        sin[s], slot_blocks[s], slot_offsets[s], block_tables, lens[s], num_q_heads,
        num_kv_heads, ffn, eps, scale, kernel_name, norm, head, vocab);
    next = tokens[s];
    distserve::argmax_rows(next, logits);
  }
  return tokens.t();
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(distserve_cpu, m) {
  m.def("llama_decode_layers(Tensor(a!) x, Tensor(b!)? residual, Tensor[] weights, "
        "Tensor?[] qkv_biases, Tensor(c!) kv_cache, Tensor cos, Tensor signed_sin, "
        "Tensor slot_blocks, Tensor slot_offsets, Tensor block_tables, Tensor context_lens, "
        "int num_q_heads, int num_kv_heads, int ffn, float eps, float scale, str kernel) "
        "-> (Tensor, Tensor)");
  m.def("llama_decode_logits(Tensor(a!) x, Tensor(b!)? residual, Tensor[] weights, "
        "Tensor?[] qkv_biases, Tensor(c!) kv_cache, Tensor cos, Tensor signed_sin, "
        "Tensor slot_blocks, Tensor slot_offsets, Tensor block_tables, Tensor context_lens, "
        "int num_q_heads, int num_kv_heads, int ffn, float eps, float scale, str kernel, "
        "Tensor norm, Tensor head, int vocab) -> Tensor");
  m.def("llama_decode_ahead(Tensor ids, Tensor embedding, Tensor rope, Tensor[] weights, "
        "Tensor?[] qkv_biases, Tensor(a!) kv_cache, Tensor block_tables, Tensor context_lens, "
        "Tensor last_lens, int num_q_heads, int num_kv_heads, int ffn, float eps, float scale, str kernel, "
        "Tensor norm, Tensor head, int vocab, int steps) -> Tensor");
}

TORCH_LIBRARY_IMPL(distserve_cpu, CPU, m) {
  m.impl("llama_decode_layers", &llama_decode_layers);
  m.impl("llama_decode_logits", &llama_decode_logits);
  m.impl("llama_decode_ahead", &llama_decode_ahead);
}
