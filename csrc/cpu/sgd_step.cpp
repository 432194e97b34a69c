// amp_engine::sgd_step_ on the CPU: fused SGD (momentum, dampening, nesterov)
// over a whole list. Contract and arithmetic: amp_engine/ops/optim_reference.py
// (bitwise equal: single correctly rounded fp ops, in the reference's order).
#include <torch/library.h>

#include <type_traits>

#include "cpu/optim_common.h"

// No fused multiply-adds: the reference has none (see adam_step.cpp).
#pragma GCC optimize("fp-contract=off")

namespace amp_engine::optim {
namespace {

template <typename A>
struct SgdScalars {
  A grad_mul, wd, momentum, one_minus_dampening, neg_lr;
  bool nesterov;
};

struct SgdTensor {
  c10::ScalarType p_type, g_type;
  void* p;
  const void* g;
  float* master;
  void* buf;        // nullptr when momentum == 0
  bool first;       // step == 0: the buffer takes the grad
  uint32_t key;
};

// Options as template arguments: the loop has no control flow and vectorizes.
enum class Momentum { kNone, kFirst, kHeavyBall };  // kFirst: the buffer takes the grad

template <typename A, bool kDecay, Momentum M, bool kNesterov>
inline void sgd_math(const SgdScalars<A>& s, const A* __restrict g, A* __restrict w,
                     A* __restrict buf, int64_t n) {
  for (int64_t k = 0; k < n; ++k) {
    A gk = g[k] * s.grad_mul;  // maximize folded into grad_mul (an exact sign flip)
    const A wk = w[k];
    if constexpr (kDecay) gk = gk + s.wd * wk;
    if constexpr (M != Momentum::kNone) {
      A bk;
      if constexpr (M == Momentum::kFirst) {
        bk = gk;
      } else {
        bk = buf[k] * s.momentum + s.one_minus_dampening * gk;
      }
      buf[k] = bk;
      gk = kNesterov ? gk + s.momentum * bk : bk;
    }
    w[k] = wk + s.neg_lr * gk;
  }
}

template <typename A, bool kDecay>
inline void sgd_block(const SgdScalars<A>& s, bool first, const A* g, A* w, A* buf, int64_t n) {
  if (!buf) return sgd_math<A, kDecay, Momentum::kNone, false>(s, g, w, buf, n);
  if (first) {
    if (s.nesterov) return sgd_math<A, kDecay, Momentum::kFirst, true>(s, g, w, buf, n);
    return sgd_math<A, kDecay, Momentum::kFirst, false>(s, g, w, buf, n);
  }
  if (s.nesterov) return sgd_math<A, kDecay, Momentum::kHeavyBall, true>(s, g, w, buf, n);
  return sgd_math<A, kDecay, Momentum::kHeavyBall, false>(s, g, w, buf, n);
}

template <typename A>
void sgd_chunk(const SgdScalars<A>& s, bool sr, const SgdTensor& t, int64_t begin, int64_t end) {
  constexpr c10::ScalarType kAcc = std::is_same_v<A, float> ? c10::kFloat : c10::kDouble;
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
    if (s.wd != A(0)) {
      sgd_block<A, true>(s, t.first, g, w, bb, n);
    } else {
      sgd_block<A, false>(s, t.first, g, w, bb, n);
    }
    if (write_param) store_block<A>(t.p_type, t.p, b, w, n, sr, t.key);
  }
}

template <typename A>
SgdScalars<A> make_scalars(const c10::optional<at::Tensor>& inv_scale, double lr, double momentum,
                           double dampening, double wd, bool nesterov, bool maximize) {
  SgdScalars<A> s;
  const A inv = inv_scale.has_value() ? static_cast<A>(inv_scale->data_ptr<float>()[0]) : A(1);
  s.grad_mul = maximize ? -inv : inv;
  s.wd = static_cast<A>(wd);
  s.momentum = static_cast<A>(momentum);
  s.one_minus_dampening = static_cast<A>(1.0 - dampening);
  s.neg_lr = static_cast<A>(-lr);
  s.nesterov = nesterov;
  return s;
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList masters,
                  at::TensorList momentum_buffers, at::TensorList steps,
                  const c10::optional<at::Tensor>& lr_tensor, double lr,
                  const c10::optional<at::Tensor>& inv_scale,
                  const c10::optional<at::Tensor>& found_inf,
                  const c10::optional<at::Tensor>& rng_state, double momentum, double dampening,
                  double weight_decay, bool nesterov, bool maximize, bool stochastic_rounding) {
  const c10::Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                       found_inf, rng_state, stochastic_rounding);
  TORCH_CHECK_VALUE(momentum >= 0.0, "momentum must be >= 0, got ", momentum);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "nesterov=True requires momentum > 0 and dampening == 0, got momentum=",
                    momentum, ", dampening=", dampening);
  const bool has_buf = momentum != 0.0;
  if (has_buf) check_state_list(momentum_buffers, params, "momentum_buffers", dev);
  if (params.empty() || skip_step(found_inf)) return;  // skip: nothing at all changes

  const double lr_v = read_lr(lr_tensor, lr);
  const int64_t* rng = rng_state.has_value() ? rng_state->data_ptr<int64_t>() : nullptr;
  const auto s32 = make_scalars<float>(inv_scale, lr_v, momentum, dampening, weight_decay,
                                       nesterov, maximize);
  const auto s64 = make_scalars<double>(inv_scale, lr_v, momentum, dampening, weight_decay,
                                        nesterov, maximize);
  const size_t n = params.size();
  const bool has_master = !masters.empty();
  std::vector<Entry> entries;
  std::vector<SgdTensor> ts(n);
  std::vector<int64_t> numels(n);
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    std::vector<at::Tensor> group = {params[i], grads[i]};
    std::vector<bool> writable = {true, false};
    if (has_buf) group.push_back(momentum_buffers[i]), writable.push_back(true);
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(make_entry(std::move(group), std::move(writable)));
    const auto& w = entries.back().work;
    SgdTensor& t = ts[i];
    t.p_type = w[0].scalar_type();
    t.g_type = w[1].scalar_type();
    t.p = w[0].data_ptr();
    t.g = w[1].data_ptr();
    t.buf = has_buf ? w[2].data_ptr() : nullptr;
    t.master = has_master ? w.back().data_ptr<float>() : nullptr;
    t.first = steps[i].data_ptr<float>()[0] == 0.0f;
    t.key = rng ? sr_key(rng, static_cast<int64_t>(i)) : 0u;
    numels[i] = w[0].numel();
  }

  const bool sr = stochastic_rounding;
  const std::vector<Chunk> chunks = make_chunks(numels);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const Chunk& ch = chunks[c];
      const SgdTensor& t = ts[ch.tensor];
      if (t.p_type == c10::kDouble) {
        sgd_chunk<double>(s64, sr, t, ch.begin, ch.end);
      } else {
        sgd_chunk<float>(s32, sr, t, ch.begin, ch.end);
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
  m.impl("sgd_step_", &amp_engine::optim::sgd_step_cpu);
}
