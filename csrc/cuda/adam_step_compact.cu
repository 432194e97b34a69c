// amp_engine::adam_step_compact_ on CUDA: fused Adam / AdamW whose moments are
// fp32, bf16 or 8-bit blocks, one multi-tensor-apply launch sequence per (param,
// grad, exp_avg, exp_avg_sq dtype) group, then the launch that counts the step.
// Contract and truth: amp_engine/ops/reference/moments8.py. Each warp runs one
// 256-element block at a time in one pass: lane l holds elements l, l + 32, ...
// (coalesced), decodes, runs math::adam_update (csrc/math/adam.h, the arithmetic
// the CPU tests verify bitwise), and for 8-bit moments reduces the block's new
// absmax across the warp before encoding (csrc/math/moments8.h). found_inf,
// inv_scale, lr and the step counters are read on the device: nothing syncs.
#include <torch/csrc/stable/library.h>

#include <array>
#include <type_traits>

#include "compact_checks.h"
#include "cuda/optim_step.cuh"
#include "math/adam.h"

namespace amp_engine {
namespace cuda {
namespace optim_step {
namespace {

using ::amp_engine::optim::MomentFormat;

struct CompactArgs {  // everything a chunk needs besides its tensors; by value
  const float* found_inf;    // nullable: always applied
  const float* inv_scale;    // nullable: 1
  const float* lr_f32;       // lr_tensor, if fp32
  const double* lr_f64;      // lr_tensor, if fp64
  const int64_t* rng_state;  // nullable unless stochastic rounding
  double lr, beta1, beta2, eps, weight_decay;
  math::Decay decay;
  MomentFormat m_fmt, v_fmt;  // the same for every tensor of a launch (its group)
  bool has_master, maximize, stochastic;
};

// Lists: 0 param, 1 grad, 2 exp_avg, 3 exp_avg_sq, 4 exp_avg absmax, 5 exp_avg_sq
// absmax, 6 master, 7 step.
constexpr int kDepth = 8;
constexpr int kWarp = 32;
constexpr int kPerLane = m8::kBlock / kWarp;  // elements of a block per lane
static_assert(kChunkSize % m8::kBlock == 0, "chunks must hold whole 8-bit blocks");

__device__ __forceinline__ float load_moment(MomentFormat f, const void* base, int64_t j,
                                             float absmax, const float* table) {
  if (f == MomentFormat::kBlocks8) return m8::decode(static_cast<const uint8_t*>(base)[j], absmax, table);
  if (f == MomentFormat::kBFloat16) return m8::bf16_to_float(static_cast<const uint16_t*>(base)[j]);
  return static_cast<const float*>(base)[j];
}

// The block's absmax across the warp (every lane gets it), NaN-propagating.
__device__ __forceinline__ float warp_absmax(float acc) {
#pragma unroll
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    acc = m8::absmax_fold(acc, __shfl_xor_sync(0xffffffffu, acc, off));
  }
  return m8::absmax_flush(acc);
}

// Writes one lane's values of a block (x[k] is element lane + 32 k of the block
// starting at b, n elements in it) in the moment's format; warp-uniform control.
template <bool kSigned>
__device__ __forceinline__ void store_moment(MomentFormat f, void* base, float* absmax, int64_t b,
                                             int n, int lane, const float (&x)[kPerLane]) {
  if (f == MomentFormat::kBlocks8) {
    float acc = 0.0f;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (lane + k * kWarp < n) acc = m8::absmax_fold(acc, x[k]);
    }
    const float a = warp_absmax(acc);
    if (lane == 0) absmax[b / m8::kBlock] = a;
    const float scale = m8::encode_scale(a, kSigned ? m8::kSignedM : m8::kUnsignedM);
    uint8_t* c = static_cast<uint8_t*>(base) + b;
#pragma unroll
    for (int k = 0; k < kPerLane; ++k) {
      if (lane + k * kWarp < n) c[lane + k * kWarp] = m8::encode(x[k], scale, kSigned);
    }
    return;
  }
#pragma unroll
  for (int k = 0; k < kPerLane; ++k) {
    const int64_t j = b + lane + k * kWarp;
    if (lane + k * kWarp >= n) continue;
    if (f == MomentFormat::kBFloat16) {
      static_cast<uint16_t*>(base)[j] = m8::bf16_round_nearest(x[k]);
    } else {
      static_cast<float*>(base)[j] = x[k];
    }
  }
}

template <typename P, typename G>
struct CompactFunctor {
  CompactArgs a;

  __device__ void operator()(const ChunkRef<kDepth>& c) const {
    // every thread of the block calls this, so the skip is uniform (no barrier is
    // left half-reached) and the tables below can be shared
    if (a.found_inf != nullptr && *a.found_inf != 0.0f) return;  // skipped: touch nothing
    __shared__ float tables[2][256];  // DECODE: [0] signed map, [1] unsigned (exact)
    for (int i = threadIdx.x; i < 512; i += blockDim.x) {
      tables[i >> 8][i & 255] = m8::decode_value(static_cast<uint32_t>(i & 255), i < 256);
    }
    __syncthreads();

    const double lr = a.lr_f64 ? *a.lr_f64 : a.lr_f32 ? static_cast<double>(*a.lr_f32) : a.lr;
    const float inv = a.inv_scale ? *a.inv_scale : 1.0f;
    const math::AdamCoeffs<float> s =
        math::adam_coeffs<float>(inv, lr, a.beta1, a.beta2, a.eps, a.weight_decay, a.maximize);
    const float step = *static_cast<const float*>(c.base[7]);  // before this step's bump
    const math::AdamStepTerms<float> t = math::adam_step_terms<float>(lr, a.beta1, a.beta2, step);
    const uint32_t key =
        a.stochastic ? math::sr_key(a.rng_state[0], a.rng_state[1], c.tensor_index) : 0u;
    const G* g_in = static_cast<const G*>(c.base[1]);
    P* p = static_cast<P*>(c.base[0]);
    float* master = static_cast<float*>(c.base[6]);
    float* m_absmax = static_cast<float*>(c.base[4]);
    float* v_absmax = static_cast<float*>(c.base[5]);

    const int lane = threadIdx.x % kWarp;
    const int warps = blockDim.x / kWarp;
    const int64_t n_blocks = (c.size + m8::kBlock - 1) / m8::kBlock;
    for (int64_t blk = threadIdx.x / kWarp; blk < n_blocks; blk += warps) {
      const int64_t b = c.begin + blk * m8::kBlock;  // the block's first element
      const int n = c.numel - b < m8::kBlock ? static_cast<int>(c.numel - b) : m8::kBlock;
      const float ma = a.m_fmt == MomentFormat::kBlocks8 ? m_absmax[b / m8::kBlock] : 0.0f;
      const float va = a.v_fmt == MomentFormat::kBlocks8 ? v_absmax[b / m8::kBlock] : 0.0f;
      float w[kPerLane], m[kPerLane], v[kPerLane];
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t j = b + lane + k * kWarp;
        if (lane + k * kWarp >= n) {
          w[k] = m[k] = v[k] = 0.0f;
          continue;
        }
        w[k] = a.has_master ? master[j] : to_acc<float>(p[j]);
        m[k] = load_moment(a.m_fmt, c.base[2], j, ma, tables[0]);
        v[k] = load_moment(a.v_fmt, c.base[3], j, va, tables[1]);
        float unused = 0.0f;
        w[k] = math::adam_update(s, a.decay, false, t, to_acc<float>(g_in[j]), w[k], m[k], v[k],
                                 unused);
      }
      store_moment<true>(a.m_fmt, c.base[2], m_absmax, b, n, lane, m);
      store_moment<false>(a.v_fmt, c.base[3], v_absmax, b, n, lane, v);
#pragma unroll
      for (int k = 0; k < kPerLane; ++k) {
        const int64_t j = b + lane + k * kWarp;
        if (lane + k * kWarp >= n) continue;
        if (a.has_master) master[j] = w[k];
        p[j] = round_param<P, float>(w[k], j, key, a.stochastic);
      }
    }
  }
};

void adam_step_compact_cuda(TensorList params, TensorList grads, TensorList masters,
                            TensorList exp_avgs, TensorList exp_avg_sqs,
                            TensorList exp_avg_absmax, TensorList exp_avg_sq_absmax,
                            TensorList steps, OptTensor lr_tensor, double lr,
                            OptTensor inv_scale, OptTensor found_inf, OptTensor rng_state,
                            double beta1, double beta2, double eps, double weight_decay,
                            bool decoupled, bool maximize, bool stochastic_rounding) {
  namespace o = ::amp_engine::optim;
  const Device dev = o::check_adam_compact_args(
      params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax, exp_avg_sq_absmax, steps,
      lr_tensor, lr, inv_scale, found_inf, rng_state, beta1, beta2, eps, weight_decay,
      stochastic_rounding);
  if (params.empty()) return;
  check_cuda(dev);
  const DeviceGuard guard(dev.index());
  const cudaStream_t stream = current_stream(dev);

  // Rows as Work<> builds them, but row-major (compact_checks.h), grouped by the
  // moments' formats as well as the param and grad dtypes.
  const bool has_master = !masters.empty();
  std::vector<o::Entry> entries;
  LaunchTable<kDepth> table;
  std::vector<std::array<int, 4>> keys;  // p, g, m format, v format
  std::vector<std::vector<size_t>> groups;
  entries.reserve(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    TensorList group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> writable = {true, false, true, true};
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(o::make_row_major_entry(std::move(group), std::move(writable)));
    const TensorList& w = entries.back().work;
    float* ma = o::absmax_ptr(exp_avgs, exp_avg_absmax, i);
    float* va = o::absmax_ptr(exp_avg_sqs, exp_avg_sq_absmax, i);
    void* self = w[0].data_ptr();  // an absent list's address: never touched
    const std::array<void*, kDepth> row = {
        self, w[1].data_ptr(), w[2].data_ptr(), w[3].data_ptr(), ma ? ma : self, va ? va : self,
        has_master ? w.back().data_ptr() : self, steps[i].data_ptr()};
    table.add(row, w[0].numel(), static_cast<int32_t>(i));
    const std::array<int, 4> key = {static_cast<int>(w[0].scalar_type()),
                                    static_cast<int>(w[1].scalar_type()),
                                    static_cast<int>(o::moment_format(w[2].scalar_type())),
                                    static_cast<int>(o::moment_format(w[3].scalar_type()))};
    size_t gi = 0;
    while (gi < keys.size() && keys[gi] != key) ++gi;
    if (gi == keys.size()) keys.push_back(key), groups.emplace_back();
    groups[gi].push_back(i);
  }

  const bool lr_is_f64 = lr_tensor && lr_tensor->scalar_type() == ScalarType::Double;
  CompactArgs args{};
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
  args.maximize = maximize;
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& key = keys[gi];
    const auto p_type = static_cast<ScalarType>(key[0]);
    dispatch_param_grad(p_type, static_cast<ScalarType>(key[1]), [&](auto ptag, auto gtag) {
      using P = decltype(ptag);
      using G = decltype(gtag);
      if constexpr (!std::is_same_v<P, double>) {  // fp64 params are refused by the checks
        CompactArgs g = args;
        g.m_fmt = static_cast<MomentFormat>(key[2]);
        g.v_fmt = static_cast<MomentFormat>(key[3]);
        g.stochastic = stochastic_rounding && p_type == ScalarType::BFloat16;
        multi_tensor_apply<kDepth>(table, groups[gi], CompactFunctor<P, G>{g}, stream);
      }
    });
  }
  int64_t* rng = stochastic_rounding && rng_state ? ptr<int64_t>(*rng_state) : nullptr;
  bump_steps(steps, args.found_inf, rng, stream);
  for (auto& e : entries) o::write_back(e);
}

}  // namespace
}  // namespace optim_step
}  // namespace cuda
}  // namespace amp_engine

STABLE_TORCH_LIBRARY_IMPL(amp_engine, CUDA, m) {
  m.impl("adam_step_compact_", TORCH_BOX(&amp_engine::cuda::optim_step::adam_step_compact_cuda));
}
