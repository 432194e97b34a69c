// amp_engine::adam_step_ on CUDA: fused Adam / AdamW over a whole list, one
// multi-tensor-apply launch sequence per (param dtype, grad dtype) group, then
// one launch that counts the step. Contract: amp_engine/ops/optim_reference.py
// (same operations, same order, correctly rounded, no FMAs: bitwise equal to
// the reference on the GPU). found_inf, inv_scale, lr and the step counters are
// read on the device: nothing syncs with the host.
#include <torch/library.h>

#include "cuda/optim_step.cuh"

namespace amp_engine {
namespace cuda {
namespace optim_step {
namespace {

// Everything a chunk needs besides its tensors; by value in the kernel arguments.
struct AdamArgs {
  const float* found_inf;   // nullable: always applied
  const float* inv_scale;   // nullable: 1
  const float* lr_f32;      // lr_tensor, if fp32
  const double* lr_f64;     // lr_tensor, if fp64
  const float* steps;       // the step counters before this step, [n]
  const int64_t* rng_state;  // nullable unless stochastic rounding
  double lr, beta1, beta2, weight_decay;       // fp64, as the reference
  double w1, beta2_acc, omb2, eps, wd_acc;     // already rounded to the acc type
  bool has_master, has_wd, decoupled, amsgrad, maximize, lerp_small, stochastic;
};

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 max_exp_avg_sq, 5 master.
template <typename P, typename G>
struct AdamFunctor {
  using A = typename Acc<P>::type;
  AdamArgs a;

  // Per-chunk values: computed by every thread (no shared memory, no barrier).
  struct Chunk {
    const AdamArgs& a;
    const ChunkRef<6>& c;
    A inv, decay, wd, w1, omw1, beta2, omb2, eps, bc2_sqrt, neg_step;
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
        A g = mul(to_acc<A>(g_in[k]), inv);  // inv = -inv_scale when maximizing: exact
        if (a.has_wd) {
          if (a.decoupled) {
            w[k] = mul(w[k], decay);
          } else {
            g = add(g, mul(wd, w[k]));
          }
        }
        // torch's lerp: two formulas, chosen by the weight (as the reference)
        m[k] = a.lerp_small ? add(m[k], mul(w1, sub(g, m[k]))) : sub(g, mul(sub(g, m[k]), omw1));
        v[k] = add(mul(v[k], beta2), mul(mul(omb2, g), g));
        A v_use = v[k];
        if (a.amsgrad) v_use = vmax[k] = maximum(vmax[k], v[k]);
        const A denom = add(div(sqrt_rn(v_use), bc2_sqrt), eps);
        w[k] = add(w[k], div(mul(neg_step, m[k]), denom));
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

  __device__ void operator()(const ChunkRef<6>& c) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped: touch nothing
    // Per-tensor scalars in fp64 from the incremented step, rounded to A once.
    const double step = static_cast<double>(a.steps[c.tensor_index]) + 1.0;
    const double lr = a.lr_f64 ? *a.lr_f64 : a.lr_f32 ? static_cast<double>(*a.lr_f32) : a.lr;
    const double bc1 = __dsub_rn(1.0, pow(a.beta1, step));  // ::pow, as torch.pow on CUDA
    const A inv = a.inv_scale ? static_cast<A>(*a.inv_scale) : A(1);
    const A w1 = static_cast<A>(a.w1);
    const Chunk ch{a, c, a.maximize ? -inv : inv,
                   static_cast<A>(__dsub_rn(1.0, __dmul_rn(lr, a.weight_decay))),
                   static_cast<A>(a.wd_acc), w1, sub(A(1), w1), static_cast<A>(a.beta2_acc),
                   static_cast<A>(a.omb2), static_cast<A>(a.eps),
                   static_cast<A>(__dsqrt_rn(__dsub_rn(1.0, pow(a.beta2, step)))),
                   static_cast<A>(-__ddiv_rn(lr, bc1)),
                   a.stochastic ? sr_key(a.rng_state, c.tensor_index) : 0u};
    constexpr int kVec = 4;
    const bool vec = aligned_for<P, kVec>(c.base[0]) && aligned_for<G, kVec>(c.base[1]) &&
                     aligned_for<A, kVec>(c.base[2]) && aligned_for<A, kVec>(c.base[3]) &&
                     (!a.amsgrad || aligned_for<A, kVec>(c.base[4])) &&
                     (!a.has_master || aligned_for<float, kVec>(c.base[5]));
    for_each_pack<kVec>(c.size, vec, ch);
  }
};

template <typename A>
double acc_round(double x) {
  return static_cast<double>(static_cast<A>(x));
}

void adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters,
                    at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                    at::TensorList max_exp_avg_sqs, at::TensorList steps,
                    const std::optional<at::Tensor>& lr_tensor, double lr,
                    const std::optional<at::Tensor>& inv_scale,
                    const std::optional<at::Tensor>& found_inf,
                    const std::optional<at::Tensor>& rng_state, double beta1, double beta2,
                    double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    bool stochastic_rounding) {
  using namespace ::amp_engine::optim;
  const c10::Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                       found_inf, rng_state, stochastic_rounding);
  TORCH_CHECK_VALUE(beta1 >= 0.0 && beta1 < 1.0, "beta1 must be in [0, 1), got ", beta1);
  TORCH_CHECK_VALUE(beta2 >= 0.0 && beta2 < 1.0, "beta2 must be in [0, 1), got ", beta2);
  TORCH_CHECK_VALUE(eps >= 0.0, "eps must be >= 0, got ", eps);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  check_state_list(exp_avgs, params, "exp_avgs", dev);
  check_state_list(exp_avg_sqs, params, "exp_avg_sqs", dev);
  if (amsgrad) check_state_list(max_exp_avg_sqs, params, "max_exp_avg_sqs", dev);
  if (params.empty()) return;
  TORCH_CHECK_VALUE(dev.is_cuda(), "the CUDA kernel got tensors on ", dev);
  const c10::cuda::CUDAGuard guard(dev);

  const bool has_master = !masters.empty();
  Work<6> work;
  for (size_t i = 0; i < params.size(); ++i) {
    work.add({params[i], grads[i], exp_avgs[i], exp_avg_sqs[i],
              amsgrad ? std::optional<at::Tensor>(max_exp_avg_sqs[i]) : std::nullopt,
              has_master ? std::optional<at::Tensor>(masters[i]) : std::nullopt},
             {true, false, true, true, true, true});
  }
  const at::Tensor step_values = stacked_steps(steps);
  const bool lr_is_f64 = lr_tensor && lr_tensor->scalar_type() == c10::kDouble;
  AdamArgs args{};
  args.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  args.inv_scale = inv_scale ? inv_scale->data_ptr<float>() : nullptr;
  args.lr_f32 = lr_tensor && !lr_is_f64 ? lr_tensor->data_ptr<float>() : nullptr;
  args.lr_f64 = lr_is_f64 ? lr_tensor->data_ptr<double>() : nullptr;
  args.steps = step_values.data_ptr<float>();
  args.rng_state = rng_state ? rng_state->data_ptr<int64_t>() : nullptr;
  args.lr = lr;
  args.beta1 = beta1;
  args.beta2 = beta2;
  args.weight_decay = weight_decay;
  args.has_master = has_master;
  args.has_wd = weight_decay != 0.0;
  args.decoupled = decoupled;
  args.amsgrad = amsgrad;
  args.maximize = maximize;
  const auto lists = work.tensor_lists();
  for (const auto& group : work.groups) {
    const auto p_type = work.lists[0][group[0]].scalar_type();
    dispatch_param_grad(p_type, work.lists[1][group[0]].scalar_type(), [&](auto ptag, auto gtag) {
      using P = decltype(ptag);
      using G = decltype(gtag);
      using A = typename Acc<P>::type;
      AdamArgs g = args;  // hyper-parameters rounded to this group's acc type, as the reference
      g.w1 = acc_round<A>(1.0 - beta1);
      g.beta2_acc = acc_round<A>(beta2);
      g.omb2 = acc_round<A>(1.0 - beta2);
      g.eps = acc_round<A>(eps);
      g.wd_acc = acc_round<A>(weight_decay);
      g.lerp_small = g.w1 < 0.5;
      g.stochastic = stochastic_rounding && p_type == c10::kBFloat16;
      multi_tensor_apply<6>(lists, group, AdamFunctor<P, G>{g});
    });
  }
  count_step(steps, found_inf,
             stochastic_rounding && rng_state ? rng_state->data_ptr<int64_t>() : nullptr);
  work.write_back();
}

}  // namespace
}  // namespace optim_step
}  // namespace cuda
}  // namespace amp_engine

TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("adam_step_", &amp_engine::cuda::optim_step::adam_step_cuda);
}
