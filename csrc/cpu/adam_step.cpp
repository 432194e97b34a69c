// amp_engine::adam_step_ on the CPU: fused Adam / AdamW over a whole list.
// Contract: amp_engine/ops/reference/optim.py; the arithmetic of one element is
// math::adam_update (csrc/math/adam.h), which the CUDA kernel runs too.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <type_traits>

#include "cpu/optim_common.h"
#include "math/adam.h"

namespace amp_engine::optim {
namespace {

using math::AdamCoeffs;
using math::AdamStepTerms;
using math::Decay;

struct AdamTensor {  // one param's pointers and step-dependent scalars
  ScalarType p_type, g_type;
  void* p;
  const void* g;
  float* master;  // nullptr: the param is its own weight
  void *m, *v, *vmax;
  AdamStepTerms<float> t32;
  AdamStepTerms<double> t64;
  uint32_t key;
};

// One block of n <= kBlock elements; g and w hold the grad and the weight in A,
// w receives the new weight. The options are template arguments so that the
// loop has no control flow and vectorizes (-fno-math-errno lets sqrt vectorize).
template <typename A, Decay D, bool kAmsgrad>
inline void adam_math(const AdamCoeffs<A>& s, const AdamStepTerms<A>& t, const A* __restrict g,
                      A* __restrict w, A* __restrict m, A* __restrict v, A* __restrict vmax,
                      int64_t n) {
  A unused = A(0);
  for (int64_t k = 0; k < n; ++k) {
    A& vm = kAmsgrad ? vmax[k] : unused;
    w[k] = math::adam_update(s, D, kAmsgrad, t, g[k], w[k], m[k], v[k], vm);
  }
}

template <typename A>
inline void adam_block(const AdamCoeffs<A>& s, Decay d, bool amsgrad, const AdamStepTerms<A>& t,
                       const A* g, A* w, A* m, A* v, A* vmax, int64_t n) {
  if (amsgrad) {
    if (d == Decay::kNone) adam_math<A, Decay::kNone, true>(s, t, g, w, m, v, vmax, n);
    if (d == Decay::kDecoupled) adam_math<A, Decay::kDecoupled, true>(s, t, g, w, m, v, vmax, n);
    if (d == Decay::kL2) adam_math<A, Decay::kL2, true>(s, t, g, w, m, v, vmax, n);
  } else {
    if (d == Decay::kNone) adam_math<A, Decay::kNone, false>(s, t, g, w, m, v, vmax, n);
    if (d == Decay::kDecoupled) adam_math<A, Decay::kDecoupled, false>(s, t, g, w, m, v, vmax, n);
    if (d == Decay::kL2) adam_math<A, Decay::kL2, false>(s, t, g, w, m, v, vmax, n);
  }
}

template <typename A>
struct AdamCall {  // what every chunk of the call shares
  AdamCoeffs<A> s;
  Decay decay;
  bool amsgrad, sr;
};

template <typename A>
void adam_chunk(const AdamCall<A>& c, const AdamTensor& t, int64_t begin, int64_t end) {
  constexpr ScalarType kAcc = std::is_same_v<A, float> ? ScalarType::Float : ScalarType::Double;
  A g_buf[kBlock], w_buf[kBlock];
  A* m = static_cast<A*>(t.m);
  A* v = static_cast<A*>(t.v);
  A* vmax = static_cast<A*>(t.vmax);
  AdamStepTerms<A> terms;
  if constexpr (std::is_same_v<A, float>) terms = t.t32; else terms = t.t64;
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
    adam_block<A>(c.s, c.decay, c.amsgrad, terms, g, w, m + b, v + b, vmax ? vmax + b : nullptr, n);
    if (write_param) store_block<A>(t.p_type, t.p, b, w, n, c.sr, t.key);
  }
}

void adam_step_cpu(TensorList params, TensorList grads, TensorList masters, TensorList exp_avgs,
                   TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps,
                   OptTensor lr_tensor, double lr, OptTensor inv_scale, OptTensor found_inf,
                   OptTensor rng_state, double beta1, double beta2, double eps,
                   double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                   bool stochastic_rounding) {
  check_adam_args(params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps,
                  lr_tensor, lr, inv_scale, found_inf, rng_state, beta1, beta2, eps,
                  weight_decay, amsgrad, stochastic_rounding);
  if (params.empty() || skip_step(found_inf)) return;  // skip: nothing at all changes

  const double lr_v = read_lr(lr_tensor, lr);
  const bool sr = stochastic_rounding;
  const int64_t* rng = rng_state.has_value() ? ptr<const int64_t>(*rng_state) : nullptr;
  const float inv = read_inv_scale(inv_scale);
  const Decay decay = weight_decay == 0.0 ? Decay::kNone
                      : decoupled         ? Decay::kDecoupled
                                          : Decay::kL2;
  const AdamCall<float> c32{
      math::adam_coeffs<float>(inv, lr_v, beta1, beta2, eps, weight_decay, maximize), decay,
      amsgrad, sr};
  const AdamCall<double> c64{
      math::adam_coeffs<double>(inv, lr_v, beta1, beta2, eps, weight_decay, maximize), decay,
      amsgrad, sr};

  const size_t n = params.size();
  const bool has_master = !masters.empty();
  std::vector<Entry> entries;
  std::vector<AdamTensor> ts(n);
  std::vector<int64_t> numels(n);
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TensorList group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> writable = {true, false, true, true};
    if (amsgrad) group.push_back(max_exp_avg_sqs[i]), writable.push_back(true);
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(make_entry(std::move(group), std::move(writable)));
    const TensorList& w = entries.back().work;
    AdamTensor& t = ts[i];
    t.p_type = w[0].scalar_type();
    t.g_type = w[1].scalar_type();
    t.p = w[0].data_ptr();
    t.g = w[1].data_ptr();
    t.m = w[2].data_ptr();
    t.v = w[3].data_ptr();
    t.vmax = amsgrad ? w[4].data_ptr() : nullptr;
    t.master = has_master ? ptr<float>(w.back()) : nullptr;
    const float step = *ptr<const float>(steps[i]);
    t.t32 = math::adam_step_terms<float>(lr_v, beta1, beta2, step);
    t.t64 = math::adam_step_terms<double>(lr_v, beta1, beta2, step);
    t.key = rng ? math::sr_key(rng[0], rng[1], static_cast<int64_t>(i)) : 0u;
    numels[i] = w[0].numel();
  }

  const std::vector<Chunk> chunks = make_chunks(numels);
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      const AdamTensor& t = ts[ch.tensor];
      if (t.p_type == ScalarType::Double) {
        adam_chunk<double>(c64, t, ch.begin, ch.end);
      } else {
        adam_chunk<float>(c32, t, ch.begin, ch.end);
      }
    }
  });

  for (size_t i = 0; i < n; ++i) {
    write_back(entries[i]);
    *ptr<float>(steps[i]) += 1.0f;
  }
  if (sr && rng_state.has_value()) ptr<int64_t>(*rng_state)[1] += 1;
}

}  // namespace
}  // namespace amp_engine::optim

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CPU, m) {
  m.impl("adam_step_", TORCH_BOX(&amp_engine::optim::adam_step_cpu));
}
