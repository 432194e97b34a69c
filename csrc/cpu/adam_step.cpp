// amp_engine::adam_step_ on the CPU: fused Adam / AdamW over a whole list.
// Contract and arithmetic: amp_engine/ops/optim_reference.py (bitwise equal: every
// operation below is a single correctly rounded fp op, in the reference's order).
#include <torch/library.h>

#include <type_traits>

#include "cpu/optim_common.h"

// No fused multiply-adds (the reference has none); applies to the functions below.
#pragma GCC optimize("fp-contract=off")

namespace amp_engine::optim {
namespace {

template <typename A>
struct AdamScalars {  // the same for every tensor of the call
  A grad_mul, wd, decay, w1, one_minus_w1, beta2, omb2, eps;
  bool decoupled, amsgrad, lerp_small, sr;
};

struct AdamTensor {  // one param's pointers and step-dependent scalars
  c10::ScalarType p_type, g_type;
  void* p;
  const void* g;
  float* master;  // nullptr: the param is its own weight
  void *m, *v, *vmax;
  double bc2_sqrt, neg_step_size;
  uint32_t key;
};

// The update of one block of n <= kBlock elements; g and w hold the grad and the
// weight in A, w receives the new weight. The options are template arguments so
// that the loop has no control flow and vectorizes.
enum class Decay { kNone, kDecoupled, kL2 };

template <typename A, Decay D, bool kAmsgrad>
inline void adam_math(const AdamScalars<A>& s, A bc2_sqrt, A neg_step_size,
                      const A* __restrict g, A* __restrict w, A* __restrict m, A* __restrict v,
                      A* __restrict vmax, int64_t n) {
  const A gmul = s.grad_mul;
  const bool lerp_small = s.lerp_small;
#if !defined(__NO_MATH_ERRNO__)
  // sqrt sets errno here, so GCC will not vectorize it: a separate SIMD pass instead
  A den[kBlock], new_m[kBlock];
#endif
  for (int64_t k = 0; k < n; ++k) {
    // g * inv_scale, negated for maximize: the sign flip is exact, so it is folded in
    A gk = g[k] * gmul;
    A wk = w[k];
    if constexpr (D == Decay::kDecoupled) wk = wk * s.decay;
    if constexpr (D == Decay::kL2) gk = gk + s.wd * wk;
    // torch's lerp: both forms are computed and one is selected (a blend, no branch)
    const A mo = m[k];
    const A diff = gk - mo;
    const A m_small = mo + s.w1 * diff;
    const A m_large = gk - diff * s.one_minus_w1;
    const A mk = lerp_small ? m_small : m_large;
    const A vk = v[k] * s.beta2 + (s.omb2 * gk) * gk;
    A vu = vk;
    if constexpr (kAmsgrad) {
      const A old = vmax[k];
      vu = ((old > vk) | (old != old)) ? old : vk;  // torch.maximum: NaN propagates
      vmax[k] = vu;
    }
    m[k] = mk;
    v[k] = vk;
#if defined(__NO_MATH_ERRNO__)
    w[k] = wk + (neg_step_size * mk) / (std::sqrt(vu) / bc2_sqrt + s.eps);
#else
    w[k] = wk;
    new_m[k] = mk;
    den[k] = vu;
#endif
  }
#if !defined(__NO_MATH_ERRNO__)
  sqrt_block(den, n);
  for (int64_t k = 0; k < n; ++k) {
    w[k] = w[k] + (neg_step_size * new_m[k]) / (den[k] / bc2_sqrt + s.eps);
  }
#endif
}

template <typename A>
inline void adam_block(const AdamScalars<A>& s, A bc2_sqrt, A nss, const A* g, A* w, A* m, A* v,
                       A* vmax, int64_t n) {
  const Decay d = s.wd == A(0) ? Decay::kNone : (s.decoupled ? Decay::kDecoupled : Decay::kL2);
  if (s.amsgrad) {
    if (d == Decay::kNone) adam_math<A, Decay::kNone, true>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
    if (d == Decay::kDecoupled) adam_math<A, Decay::kDecoupled, true>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
    if (d == Decay::kL2) adam_math<A, Decay::kL2, true>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
  } else {
    if (d == Decay::kNone) adam_math<A, Decay::kNone, false>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
    if (d == Decay::kDecoupled) adam_math<A, Decay::kDecoupled, false>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
    if (d == Decay::kL2) adam_math<A, Decay::kL2, false>(s, bc2_sqrt, nss, g, w, m, v, vmax, n);
  }
}

template <typename A>
void adam_chunk(const AdamScalars<A>& s, const AdamTensor& t, int64_t begin, int64_t end) {
  constexpr c10::ScalarType kAcc = std::is_same_v<A, float> ? c10::kFloat : c10::kDouble;
  A g_buf[kBlock], w_buf[kBlock];
  A* m = static_cast<A*>(t.m);
  A* v = static_cast<A*>(t.v);
  A* vmax = static_cast<A*>(t.vmax);
  const A bc2_sqrt = static_cast<A>(t.bc2_sqrt);
  const A nss = static_cast<A>(t.neg_step_size);
  // Grads and weights already in A are updated in place, without a staging copy; the
  // weight is the master (fp32) or an fp32/fp64 param. Only other dtypes are staged.
  const A* g_mem = t.g_type == kAcc ? static_cast<const A*>(t.g) : nullptr;
  A* w_mem = t.master ? reinterpret_cast<A*>(t.master)
                      : (t.p_type == kAcc ? static_cast<A*>(t.p) : nullptr);
  const bool write_param = w_mem == nullptr || t.master != nullptr;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const A* g = g_mem ? g_mem + b : g_buf;
    if (!g_mem) load_block<A>(t.g_type, t.g, b, g_buf, n);
    A* w = w_mem ? w_mem + b : w_buf;
    if (!w_mem) load_block<A>(t.p_type, t.p, b, w_buf, n);
    adam_block<A>(s, bc2_sqrt, nss, g, w, m + b, v + b, vmax ? vmax + b : nullptr, n);
    if (write_param) store_block<A>(t.p_type, t.p, b, w, n, s.sr, t.key);
  }
}

template <typename A>
AdamScalars<A> make_scalars(const c10::optional<at::Tensor>& inv_scale, double lr, double beta1,
                            double beta2, double eps, double wd, bool decoupled, bool amsgrad,
                            bool maximize, bool sr) {
  AdamScalars<A> s;
  const A inv = inv_scale.has_value() ? static_cast<A>(inv_scale->data_ptr<float>()[0]) : A(1);
  s.grad_mul = maximize ? -inv : inv;
  s.wd = static_cast<A>(wd);
  s.decay = static_cast<A>(1.0 - lr * wd);
  s.w1 = static_cast<A>(1.0 - beta1);
  s.one_minus_w1 = A(1) - s.w1;
  s.lerp_small = s.w1 < A(0.5);
  s.beta2 = static_cast<A>(beta2);
  s.omb2 = static_cast<A>(1.0 - beta2);
  s.eps = static_cast<A>(eps);
  s.decoupled = decoupled;
  s.amsgrad = amsgrad;
  s.sr = sr;
  return s;
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                   at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                   at::TensorList max_exp_avg_sqs, at::TensorList steps,
                   const c10::optional<at::Tensor>& lr_tensor, double lr,
                   const c10::optional<at::Tensor>& inv_scale,
                   const c10::optional<at::Tensor>& found_inf,
                   const c10::optional<at::Tensor>& rng_state, double beta1, double beta2,
                   double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   bool stochastic_rounding) {
  const c10::Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                       found_inf, rng_state, stochastic_rounding);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  check_state_list(exp_avgs, params, "exp_avgs", dev);
  check_state_list(exp_avg_sqs, params, "exp_avg_sqs", dev);
  if (amsgrad) {
    check_state_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", dev);
  }
  if (params.empty() || skip_step(found_inf)) return;  // skip: nothing at all changes

  const double lr_v = read_lr(lr_tensor, lr);
  const bool sr = stochastic_rounding;
  const int64_t* rng = rng_state.has_value() ? rng_state->data_ptr<int64_t>() : nullptr;
  const auto s32 = make_scalars<float>(inv_scale, lr_v, beta1, beta2, eps, weight_decay,
                                       decoupled, amsgrad, maximize, sr);
  const auto s64 = make_scalars<double>(inv_scale, lr_v, beta1, beta2, eps, weight_decay,
                                        decoupled, amsgrad, maximize, sr);

  const size_t n = params.size();
  const bool has_master = !masters.empty();
  std::vector<Entry> entries;
  std::vector<AdamTensor> ts(n);
  std::vector<int64_t> numels(n);
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> writable = {true, false, true, true};
    if (amsgrad) group.push_back(max_exp_avg_sqs[i]), writable.push_back(true);
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(make_entry(std::move(group), std::move(writable)));
    const auto& w = entries.back().work;
    AdamTensor& t = ts[i];
    t.p_type = w[0].scalar_type();
    t.g_type = w[1].scalar_type();
    t.p = w[0].data_ptr();
    t.g = w[1].data_ptr();
    t.m = w[2].data_ptr();
    t.v = w[3].data_ptr();
    t.vmax = amsgrad ? w[4].data_ptr() : nullptr;
    t.master = has_master ? w.back().data_ptr<float>() : nullptr;
    // bias corrections in fp64 from the incremented step, as torch's single-tensor path
    float* step = steps[i].data_ptr<float>();
    const double st = double(*step) + 1.0;
    const double bc1 = 1.0 - std::pow(beta1, st);
    t.bc2_sqrt = std::sqrt(1.0 - std::pow(beta2, st));
    t.neg_step_size = -(lr_v / bc1);
    t.key = rng ? sr_key(rng, static_cast<int64_t>(i)) : 0u;
    numels[i] = w[0].numel();
  }

  const std::vector<Chunk> chunks = make_chunks(numels);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const AdamTensor& t = ts[ch.tensor];
      if (t.p_type == c10::kDouble) {
        adam_chunk<double>(s64, t, ch.begin, ch.end);
      } else {
        adam_chunk<float>(s32, t, ch.begin, ch.end);
      }
    }
  });

  for (size_t i = 0; i < n; ++i) {
    write_back(entries[i]);
    steps[i].data_ptr<float>()[0] += 1.0f;
  }
  if (sr && rng_state.has_value()) rng_state->data_ptr<int64_t>()[1] += 1;
}

}  // namespace
}  // namespace amp_engine::optim

TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("adam_step_", &amp_engine::optim::adam_step_cpu);
}
