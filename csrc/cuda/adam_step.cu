// amp_engine::adam_step_ on CUDA: fused Adam / AdamW over a whole list, one
// multi-tensor-apply launch sequence per (param dtype, grad dtype) group, then
// the launch that counts the step. Contract: amp_engine/ops/reference/optim.py;
// the update of one element is math::adam_update (csrc/math/adam.h), the code
// the CPU kernel runs and the CPU tests verify bitwise. found_inf, inv_scale, lr
// and the step counters are read on the device: nothing syncs with the host.
#include <torch/csrc/stable/library.h>

#include "cuda/optim_step.cuh"
#include "math/adam.h"

namespace amp_engine {
namespace cuda {
namespace optim_step {
namespace {

// Everything a chunk needs besides its tensors; by value in the kernel arguments.
struct AdamArgs {
  const float* found_inf;    // nullable: always applied
  const float* inv_scale;    // nullable: 1
  const float* lr_f32;       // lr_tensor, if fp32
  const double* lr_f64;      // lr_tensor, if fp64
  const int64_t* rng_state;  // nullable unless stochastic rounding
  double lr, beta1, beta2, eps, weight_decay;
  math::Decay decay;
  bool has_master, amsgrad, maximize, stochastic;
};

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 master, 6 step.
constexpr int kDepth = 7;

template <typename P, typename G>
struct AdamFunctor {
  using A = typename Acc<P>::type;
  AdamArgs a;

  // Per-chunk values: computed by every thread (no shared memory, no barrier).
  struct Chunk {
    const AdamArgs& a;
    const ChunkRef<kDepth>& c;
    math::AdamCoeffs<A> s;
    math::AdamStepTerms<A> t;
    uint32_t key;

    template <int N>
    __device__ __forceinline__ void run(int64_t i) const {
      const int64_t off = c.begin + i;
      G g_in[N];
      A w[N], m[N], v[N], vmax[N];
      load_n<N>(c.base[1], off, g_in);
      if (a.has_master) {
        float mw[N];
        load_n<N>(c.base[5], off, mw);
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = static_cast<A>(mw[k]);
      } else {
        P p_in[N];
        load_n<N>(c.base[0], off, p_in);
#pragma unroll
        for (int k = 0; k < N; ++k) w[k] = to_acc<A>(p_in[k]);
      }
      load_n<N>(c.base[2], off, m);
      load_n<N>(c.base[3], off, v);
      if (a.amsgrad) load_n<N>(c.base[4], off, vmax);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        w[k] = math::adam_update(s, a.decay, a.amsgrad, t, to_acc<A>(g_in[k]), w[k], m[k], v[k],
                                 vmax[k]);
      }
      store_n<N>(c.base[2], off, m);
      store_n<N>(c.base[3], off, v);
      if (a.amsgrad) store_n<N>(c.base[4], off, vmax);
      if (a.has_master) {
        float mw[N];
#pragma unroll
        for (int k = 0; k < N; ++k) mw[k] = static_cast<float>(w[k]);
        store_n<N>(c.base[5], off, mw);
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
    const float step = *static_cast<const float*>(c.base[6]);  // before this step's bump
    const Chunk ch{a, c,
                   math::adam_coeffs<A>(inv, lr, a.beta1, a.beta2, a.eps, a.weight_decay,
                                        a.maximize),
                   math::adam_step_terms<A>(lr, a.beta1, a.beta2, step),
                   a.stochastic ? math::sr_key(a.rng_state[0], a.rng_state[1], c.tensor_index) : 0u};
    constexpr int kVec = 4;
    const bool vec = aligned_for<P, kVec>(c.base[0]) && aligned_for<G, kVec>(c.base[1]) &&
                     aligned_for<A, kVec>(c.base[2]) && aligned_for<A, kVec>(c.base[3]) &&
                     (!a.amsgrad || aligned_for<A, kVec>(c.base[4])) &&
                     (!a.has_master || aligned_for<float, kVec>(c.base[5]));
    for_each_pack<kVec>(c.size, vec, ch);
  }
};

void adam_step_cuda(TensorList params, TensorList grads, TensorList masters, TensorList exp_avgs,
                    TensorList exp_avg_sqs, TensorList max_exp_avg_sqs, TensorList steps,
                    OptTensor lr_tensor, double lr, OptTensor inv_scale, OptTensor found_inf,
                    OptTensor rng_state, double beta1, double beta2, double eps,
                    double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    bool stochastic_rounding) {
  const Device dev = ::amp_engine::optim::check_adam_args(
      params, grads, masters, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, lr_tensor, lr,
      inv_scale, found_inf, rng_state, beta1, beta2, eps, weight_decay, amsgrad,
      stochastic_rounding);
  if (params.empty()) return;
  check_cuda(dev);
  const DeviceGuard guard(dev.index());
  const cudaStream_t stream = current_stream(dev);

  const bool has_master = !masters.empty();
  Work<kDepth> work;
  for (size_t i = 0; i < params.size(); ++i) {
    work.add({params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
              amsgrad ? OptTensor(max_exp_avg_sqs[i]) : std::nullopt,
              has_master ? OptTensor(masters[i]) : std::nullopt},
             {true, false, true, true, true, true}, steps[i]);
  }
  const bool lr_is_f64 = lr_tensor && lr_tensor->scalar_type() == ScalarType::Double;
  AdamArgs args{};
  args.found_inf = opt_ptr<float>(found_inf);
  args.inv_scale = opt_ptr<float>(inv_scale);
  args.lr_f32 = lr_tensor && !lr_is_f64 ? ptr<const float>(*lr_tensor) : nullptr;
  args.lr_f64 = lr_is_f64 ? ptr<const double>(*lr_tensor) : nullptr;
  args.rng_state = opt_ptr<int64_t>(rng_state);
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.eps = eps;
  args.weight_decay = weight_decay;
  args.decay = weight_decay == 0.0 ? math::Decay::kNone
               : decoupled         ? math::Decay::kDecoupled
                                   : math::Decay::kL2;
  args.has_master = has_master;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  for (const auto& group : work.groups) {
    const ScalarType p_type = work.p_types[group[0]];
    dispatch_param_grad(p_type, work.g_types[group[0]], [&](auto ptag, auto gtag) {
      using P = decltype(ptag);
      using G = decltype(gtag);
      AdamArgs g = args;
      g.stochastic = stochastic_rounding && p_type == ScalarType::BFloat16;
      multi_tensor_apply<kDepth>(work.table, group, AdamFunctor<P, G>{g}, stream);
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
  m.impl("adam_step_", TORCH_BOX(&amp_engine::cuda::optim_step::adam_step_cuda));
}
