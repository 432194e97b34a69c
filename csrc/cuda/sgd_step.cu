// amp_engine::sgd_step_ on CUDA: fused SGD (momentum, dampening, nesterov) over
// a whole list, one multi-tensor-apply launch sequence per (param dtype, grad
// dtype) group, then one launch that counts the step. Contract:
// amp_engine/ops/optim_reference.py (bitwise equal on the GPU). found_inf,
// inv_scale, lr and the step counters are read on the device: no host sync.
#include <torch/library.h>

#include "cuda/optim_step.cuh"

namespace amp_engine {
namespace cuda {
namespace optim_step {
namespace {

struct SgdArgs {
  const float* found_inf;    // nullable: always applied
  const float* inv_scale;    // nullable: 1
  const float* lr_f32;       // lr_tensor, if fp32
  const double* lr_f64;      // lr_tensor, if fp64
  const float* steps;        // the step counters before this step, [n]
  const int64_t* rng_state;  // nullable unless stochastic rounding
  double lr;
  double wd_acc, momentum, one_minus_dampening;  // already rounded to the acc type
  bool has_master, has_wd, has_momentum, nesterov, maximize, stochastic;
};

// Lists: 0 param, 1 grad, 2 momentum buffer, 3 master.
template <typename P, typename G>
struct SgdFunctor {
  using A = typename Acc<P>::type;
  SgdArgs a;

  struct Chunk {
    const SgdArgs& a;
    const ChunkRef<4>& c;
    A inv, wd, momentum, damp, neg_lr;
    bool first;  // the counter is 0: the buffer takes the grad (torch's first step)
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
      if (a.has_momentum && !first) load_n<N>(c.base[2], off, buf);
#pragma unroll
      for (int k = 0; k < N; ++k) {
        A g = mul(to_acc<A>(g_in[k]), inv);  // inv = -inv_scale when maximizing: exact
        if (a.has_wd) g = add(g, mul(wd, w[k]));
        if (a.has_momentum) {
          buf[k] = first ? g : add(mul(buf[k], momentum), mul(damp, g));
          g = a.nesterov ? add(g, mul(momentum, buf[k])) : buf[k];
        }
        w[k] = add(w[k], mul(neg_lr, g));
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

  __device__ void operator()(const ChunkRef<4>& c) const {
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped: touch nothing
    const double lr = a.lr_f64 ? *a.lr_f64 : a.lr_f32 ? static_cast<double>(*a.lr_f32) : a.lr;
    const A inv = a.inv_scale ? static_cast<A>(*a.inv_scale) : A(1);
    const Chunk ch{a, c, a.maximize ? -inv : inv, static_cast<A>(a.wd_acc),
                   static_cast<A>(a.momentum), static_cast<A>(a.one_minus_dampening),
                   static_cast<A>(-lr), a.steps[c.tensor_index] == 0.0f,
                   a.stochastic ? sr_key(a.rng_state, c.tensor_index) : 0u};
    constexpr int kVec = 4;
    const bool vec = aligned_for<P, kVec>(c.base[0]) && aligned_for<G, kVec>(c.base[1]) &&
                     (!a.has_momentum || aligned_for<A, kVec>(c.base[2])) &&
                     (!a.has_master || aligned_for<float, kVec>(c.base[3]));
    for_each_pack<kVec>(c.size, vec, ch);
  }
};

void sgd_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList masters,
                   at::TensorList momentum_buffers, at::TensorList steps,
                   const std::optional<at::Tensor>& lr_tensor, double lr,
                   const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf,
                   const std::optional<at::Tensor>& rng_state, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, bool stochastic_rounding) {
  using namespace ::amp_engine::optim;
  const c10::Device dev = check_common(params, grads, masters, steps, lr_tensor, lr, inv_scale,
                                       found_inf, rng_state, stochastic_rounding);
  TORCH_CHECK_VALUE(momentum >= 0.0, "momentum must be >= 0, got ", momentum);
  TORCH_CHECK_VALUE(weight_decay >= 0.0, "weight_decay must be >= 0, got ", weight_decay);
  TORCH_CHECK_VALUE(!nesterov || (momentum > 0.0 && dampening == 0.0),
                    "nesterov=True requires momentum > 0 and dampening == 0, got momentum=",
                    momentum, ", dampening=", dampening);
  const bool has_momentum = momentum != 0.0;
  if (has_momentum) check_state_list(momentum_buffers, params, "momentum_buffers", dev);
  if (params.empty()) return;
  TORCH_CHECK_VALUE(dev.is_cuda(), "the CUDA kernel got tensors on ", dev);
  const c10::cuda::CUDAGuard guard(dev);

  const bool has_master = !masters.empty();
  Work<4> work;
  for (size_t i = 0; i < params.size(); ++i) {
    work.add({params[i], grads[i],
              has_momentum ? std::optional<at::Tensor>(momentum_buffers[i]) : std::nullopt,
              has_master ? std::optional<at::Tensor>(masters[i]) : std::nullopt},
             {true, false, true, true});
  }
  const at::Tensor step_values = stacked_steps(steps);
  const bool lr_is_f64 = lr_tensor && lr_tensor->scalar_type() == c10::kDouble;
  SgdArgs args{};
  args.found_inf = found_inf ? found_inf->data_ptr<float>() : nullptr;
  args.inv_scale = inv_scale ? inv_scale->data_ptr<float>() : nullptr;
  args.lr_f32 = lr_tensor && !lr_is_f64 ? lr_tensor->data_ptr<float>() : nullptr;
  args.lr_f64 = lr_is_f64 ? lr_tensor->data_ptr<double>() : nullptr;
  args.steps = step_values.data_ptr<float>();
  args.rng_state = rng_state ? rng_state->data_ptr<int64_t>() : nullptr;
  args.lr = lr;
  args.has_master = has_master;
  args.has_wd = weight_decay != 0.0;
  args.has_momentum = has_momentum;
  args.nesterov = nesterov;
  args.maximize = maximize;
  const auto lists = work.tensor_lists();
  for (const auto& group : work.groups) {
    const auto p_type = work.lists[0][group[0]].scalar_type();
    dispatch_param_grad(p_type, work.lists[1][group[0]].scalar_type(), [&](auto ptag, auto gtag) {
      using P = decltype(ptag);
      using G = decltype(gtag);
      using A = typename Acc<P>::type;
      SgdArgs g = args;  // hyper-parameters rounded to this group's acc type, as the reference
      g.wd_acc = static_cast<double>(static_cast<A>(weight_decay));
      g.momentum = static_cast<double>(static_cast<A>(momentum));
      g.one_minus_dampening = static_cast<double>(static_cast<A>(1.0 - dampening));
      g.stochastic = stochastic_rounding && p_type == c10::kBFloat16;
      multi_tensor_apply<4>(lists, group, SgdFunctor<P, G>{g});
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
  m.impl("sgd_step_", &amp_engine::cuda::optim_step::sgd_step_cuda);
}
