// amp_engine::sgd_step_ on the CPU: fused SGD (momentum, dampening, nesterov)
// over a whole list. Contract: amp_engine/ops/reference/optim.py; the
// arithmetic of one element is math::sgd_update (csrc/math/sgd.h), shared with CUDA.
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <type_traits>

#include "cpu/optim_common.h"
#include "math/sgd.h"

namespace amp_engine::optim {
namespace {

using math::Momentum;
using math::SgdCoeffs;

struct SgdTensor {
  ScalarType p_type, g_type;
  void* p;
  const void* g;
  float* master;
  void* buf;   // nullptr when momentum == 0
  bool first;  // step == 0: the buffer takes the grad
  uint32_t key;
};

// Options as template arguments: the loop has no control flow and vectorizes.
template <typename A, bool kDecay, Momentum M, bool kNesterov>
inline void sgd_math(const SgdCoeffs<A>& s, const A* __restrict g, A* __restrict w,
                     A* __restrict buf, int64_t n) {
  A unused = A(0);
  for (int64_t k = 0; k < n; ++k) {
    A& bk = M == Momentum::kNone ? unused : buf[k];
    w[k] = math::sgd_update(s, kDecay, M, kNesterov, g[k], w[k], bk);
  }
}

template <typename A, bool kDecay>
inline void sgd_block(const SgdCoeffs<A>& s, bool nesterov, bool first, const A* g, A* w, A* buf,
                      int64_t n) {
  if (!buf) return sgd_math<A, kDecay, Momentum::kNone, false>(s, g, w, buf, n);
  if (first) {
    if (nesterov) return sgd_math<A, kDecay, Momentum::kFirst, true>(s, g, w, buf, n);
    return sgd_math<A, kDecay, Momentum::kFirst, false>(s, g, w, buf, n);
  }
  if (nesterov) return sgd_math<A, kDecay, Momentum::kHeavyBall, true>(s, g, w, buf, n);
  return sgd_math<A, kDecay, Momentum::kHeavyBall, false>(s, g, w, buf, n);
}

template <typename A>
struct SgdCall {
  SgdCoeffs<A> s;
  bool decay, nesterov, sr;
};

template <typename A>
void sgd_chunk(const SgdCall<A>& c, const SgdTensor& t, int64_t begin, int64_t end) {
  constexpr ScalarType kAcc = std::is_same_v<A, float> ? ScalarType::Float : ScalarType::Double;
  A g_buf[kBlock], w_buf[kBlock];
  A* buf = static_cast<A*>(t.buf);
  // as in adam_step.cpp: grads and weights already in A are used in place
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
    A* bb = buf ? buf + b : nullptr;
    if (c.decay) {
      sgd_block<A, true>(c.s, c.nesterov, t.first, g, w, bb, n);
    } else {
      sgd_block<A, false>(c.s, c.nesterov, t.first, g, w, bb, n);
    }
    if (write_param) store_block<A>(t.p_type, t.p, b, w, n, c.sr, t.key);
  }
}

void sgd_step_cpu(TensorList params, TensorList grads, TensorList masters,
                  TensorList momentum_buffers, TensorList steps, OptTensor lr_tensor, double lr,
                  OptTensor inv_scale, OptTensor found_inf, OptTensor rng_state, double momentum,
                  double dampening, double weight_decay, bool nesterov, bool maximize,
                  bool stochastic_rounding) {
  check_sgd_args(params, grads, masters, momentum_buffers, steps, lr_tensor, lr, inv_scale,
                 found_inf, rng_state, momentum, dampening, weight_decay, nesterov,
                 stochastic_rounding);
  if (params.empty() || skip_step(found_inf)) return;  // skip: nothing at all changes

  const bool has_buf = momentum != 0.0;
  const double lr_v = read_lr(lr_tensor, lr);
  const int64_t* rng = rng_state.has_value() ? ptr<const int64_t>(*rng_state) : nullptr;
  const float inv = read_inv_scale(inv_scale);
  const bool decay = weight_decay != 0.0;
  const bool sr = stochastic_rounding;
  const SgdCall<float> c32{
      math::sgd_coeffs<float>(inv, lr_v, momentum, dampening, weight_decay, maximize), decay,
      nesterov, sr};
  const SgdCall<double> c64{
      math::sgd_coeffs<double>(inv, lr_v, momentum, dampening, weight_decay, maximize), decay,
      nesterov, sr};
  const size_t n = params.size();
  const bool has_master = !masters.empty();
  std::vector<Entry> entries;
  std::vector<SgdTensor> ts(n);
  std::vector<int64_t> numels(n);
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TensorList group = {params[i], grads[i]};
    std::vector<bool> writable = {true, false};
    if (has_buf) group.push_back(momentum_buffers[i]), writable.push_back(true);
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(make_entry(std::move(group), std::move(writable)));
    const TensorList& w = entries.back().work;
    SgdTensor& t = ts[i];
    t.p_type = w[0].scalar_type();
    t.g_type = w[1].scalar_type();
    t.p = w[0].data_ptr();
    t.g = w[1].data_ptr();
    t.buf = has_buf ? w[2].data_ptr() : nullptr;
    t.master = has_master ? ptr<float>(w.back()) : nullptr;
    t.first = *ptr<const float>(steps[i]) == 0.0f;
    t.key = rng ? math::sr_key(rng[0], rng[1], static_cast<int64_t>(i)) : 0u;
    numels[i] = w[0].numel();
  }

  const std::vector<Chunk> chunks = make_chunks(numels);
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      const SgdTensor& t = ts[ch.tensor];
      if (t.p_type == ScalarType::Double) {
        sgd_chunk<double>(c64, t, ch.begin, ch.end);
      } else {
        sgd_chunk<float>(c32, t, ch.begin, ch.end);
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
  m.impl("sgd_step_", TORCH_BOX(&amp_engine::optim::sgd_step_cpu));
}
