// amp_engine::sgd_step_ on CUDA: fused SGD (momentum, dampening, nesterov) over
// a whole list, one multi-tensor-apply launch sequence per (param dtype, grad
// dtype) group, then the launch that counts the step. Contract:
// amp_engine/ops/reference/optim.py; the update of one element is
// math::sgd_update (csrc/math/sgd.h), shared with the CPU kernel. found_inf,
// inv_scale, lr and the step counters are read on the device: no host sync.
#include <torch/csrc/stable/library.h>

#include "cuda/optim_step.cuh"
#include "math/sgd.h"

namespace amp_engine {
namespace cuda {
namespace optim_step {
namespace {

struct SgdArgs {
  const float* found_inf;    // nullable: always applied
  const float* inv_scale;    // nullable: 1
  const float* lr_f32;       // lr_tensor, if fp32
  const double* lr_f64;      // lr_tensor, if fp64
  const int64_t* rng_state;  // nullable unless stochastic rounding
  double lr, momentum, dampening, weight_decay;
  bool has_master, has_wd, has_momentum, nesterov, maximize, stochastic;
};

// Lists: 0 param, 1 grad, 2 momentum buffer, 3 master, 4 step.
constexpr int kDepth = 5;

template <typename P, typename G>
struct SgdFunctor {
  using A = typename Acc<P>::type;
  SgdArgs a;

  struct Chunk {
    const SgdArgs& a;
    const ChunkRef<kDepth>& c;
    math::SgdCoeffs<A> s;
    math::Momentum mom;  // kFirst when the counter is 0: the buffer takes the grad
    uint32_t key;

    template <int N>
    __device__ __forceinline__ void run(int64_t i) const {
      const int64_t off = c.begin + i;
      G g_in[N];
      A w[N], buf[N];
      load_n<N>(c.base[1], off, g_in);
      if (a.has_master) {
        float mw[N];
        load_n<N>(c.base[3], off, mw);
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = static_cast<A>(mw[k]);
      } else {
        P p_in[N];
        load_n<N>(c.base[0], off, p_in);
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = to_acc<A>(p_in[k]);
      }
      if (mom == math::Momentum::kHeavyBall) load_n<N>(c.base[2], off, buf);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        w[k] = math::sgd_update(s, a.has_wd, mom, a.nesterov, to_acc<A>(g_in[k]), w[k], buf[k]);
      }
      if (a.has_momentum) store_n<N>(c.base[2], off, buf);
      if (a.has_master) {
        float mw[N];
#pragma unroll
        for (int k = 0; k < N; ++k) mw[k] = static_cast<float>(w[k]);
        store_n<N>(c.base[3], off, mw);
      }
      P p_out[N];
#pragma unroll
      for (int k = 0; k < N; ++k) p_out[k] = round_param<P, A>(w[k], off + k, key, a.stochastic);
      store_n<N>(c.base[0], off, p_out);
    }
  };

  __device__ void operator()(const ChunkRef<kDepth>& c) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped: touch nothing
    const double lr = a.lr_f64 ? *a.lr_f64 : a.lr_f32 ? static_cast<double>(*a.lr_f32) : a.lr;
    const A inv = a.inv_scale ? static_cast<A>(*a.inv_scale) : A(1);
    const bool first = *static_cast<const float*>(c.base[4]) == 0.0f;
    const math::Momentum mom = !a.has_momentum ? math::Momentum::kNone
                               : first         ? math::Momentum::kFirst
                                               : math::Momentum::kHeavyBall;
    const Chunk ch{a, c,
                   math::sgd_coeffs<A>(inv, lr, a.momentum, a.dampening, a.weight_decay,
                                       a.maximize),
                   mom,
                   a.stochastic ? math::sr_key(a.rng_state[0], a.rng_state[1], c.tensor_index) : 0u};
    constexpr int kVec = 4;
    const bool vec = aligned_for<P, kVec>(c.base[0]) && aligned_for<G, kVec>(c.base[1]) &&
                     (!a.has_momentum || aligned_for<A, kVec>(c.base[2])) &&
                     (!a.has_master || aligned_for<float, kVec>(c.base[3]));
    for_each_pack<kVec>(c.size, vec, ch);
  }
};

void sgd_step_cuda(TensorList params, TensorList grads, TensorList masters,
                   TensorList momentum_buffers, TensorList steps, OptTensor lr_tensor, double lr,
                   OptTensor inv_scale, OptTensor found_inf, OptTensor rng_state, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize,
                   bool stochastic_rounding) {
  const Device dev = ::amp_engine::optim::check_sgd_args(
      params, grads, masters, momentum_buffers, steps, lr_tensor, lr, inv_scale, found_inf,
      rng_state, momentum, dampening, weight_decay, nesterov, stochastic_rounding);
  if (params.empty()) return;
  check_cuda(dev);
  const DeviceGuard guard(dev.index());
  const cudaStream_t stream = current_stream(dev);

  const bool has_momentum = momentum != 0.0;
  const bool has_master = !masters.empty();
  Work<kDepth> work;
  for (size_t i = 0; i < params.size(); ++i) {
    work.add({params[i], grads[i], has_momentum ? OptTensor(momentum_buffers[i]) : std::nullopt,
              has_master ? OptTensor(masters[i]) : std::nullopt},
             {true, false, true, true}, steps[i]);
  }
  const bool lr_is_f64 = lr_tensor && lr_tensor->scalar_type() == ScalarType::Double;
  SgdArgs args{};
  args.found_inf = opt_ptr<float>(found_inf);
  args.inv_scale = opt_ptr<float>(inv_scale);
  args.lr_f32 = lr_tensor && !lr_is_f64 ? ptr<const float>(*lr_tensor) : nullptr;
  args.lr_f64 = lr_is_f64 ? ptr<const double>(*lr_tensor) : nullptr;
  args.rng_state = opt_ptr<int64_t>(rng_state);
  args.lr = lr;
  args.momentum = momentum;
  args.dampening = dampening;
  args.weight_decay = weight_decay;
  args.has_master = has_master;
  args.has_wd = weight_decay != 0.0;
  args.has_momentum = has_momentum;
  args.nesterov = nesterov;
  args.maximize = maximize;
  for (const auto& group : work.groups) {
    const ScalarType p_type = work.p_types[group[0]];
    dispatch_param_grad(p_type, work.g_types[group[0]], [&](auto ptag, auto gtag) {
      using P = decltype(ptag);
      using G = decltype(gtag);
      SgdArgs g = args;
      g.stochastic = stochastic_rounding && p_type == ScalarType::BFloat16;
      multi_tensor_apply<kDepth>(work.table, group, SgdFunctor<P, G>{g}, stream);
    });
  }
  int64_t* rng = stochastic_rounding && rng_state ? ptr<int64_t>(*rng_state) : nullptr;
  bump_steps(steps, args.found_inf, rng, stream);
  work.write_back();
}

}  // namespace
}  // namespace optim_step
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("sgd_step_", TORCH_BOX(&amp_engine::cuda::optim_step::sgd_step_cuda));
}
