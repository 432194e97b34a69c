// amp_engine::adam_step_compact_ on the CPU: fused Adam / AdamW whose moments are
// fp32, bf16 or 8-bit blocks, over a whole list. Contract and truth:
// amp_engine/ops/reference/moments8.py. Per 256-element block, in one pass: read
// the grad, decode the moments, run math::adam_update (csrc/math/adam.h, the fp32
// arithmetic every backend shares), re-encode the moments with the block's new
// absmax (csrc/math/moments8.h), write master and param. A block of the work split
// is a block of the 8-bit format (both 256, chunks are multiples of it).
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>

#include <cstring>

#include "compact_checks.h"
#include "cpu/compact_avx2.h"
#include "cpu/optim_common.h"
#include "math/adam.h"

namespace amp_engine::optim {
namespace {

using math::AdamCoeffs;
using math::AdamStepTerms;
using math::Decay;
static_assert(kBlock == m8::kBlock, "a work block must be one 8-bit block");

struct CompactTensor {  // one param's pointers and step-dependent scalars
  ScalarType p_type, g_type;
  MomentFormat m_fmt, v_fmt;
  void* p;
  const void* g;
  float* master;  // nullptr: the param is its own weight
  void *m, *v;
  float *m_absmax, *v_absmax;  // 8-bit moments only
  AdamStepTerms<float> terms;
  uint32_t key;
};

// dst[k] = the moment's value at element base + k, k < n (one block).
// 8-bit codes decode from their bits (m8::decode_bits): a table lookup per element
// does not vectorize on AVX2.
template <bool kSigned>
inline void load_moment(MomentFormat f, const void* src, const float* absmax, int64_t base,
                        float* __restrict dst, int64_t n) {
  if (f == MomentFormat::kBlocks8) {
    const uint8_t* c = static_cast<const uint8_t*>(src) + base;
    const float a = absmax[base / kBlock];
    for (int64_t k = 0; k < n; ++k) dst[k] = m8::decode_bits(c[k], a, kSigned);
  } else if (f == MomentFormat::kBFloat16) {
    const uint16_t* s = static_cast<const uint16_t*>(src) + base;
    for (int64_t k = 0; k < n; ++k) dst[k] = m8::bf16_to_float(s[k]);
  } else {
    std::memcpy(dst, static_cast<const float*>(src) + base, n * sizeof(float));
  }
}

// 8-bit: the block's absmax (m8::absmax_from_max_bits: max |x| from an integer max of
// the bits, NaN if any x is NaN; flushed below 2**-126).
inline float block_absmax(const float* __restrict x, int64_t n) {
  uint32_t mx = 0;
  for (int64_t k = 0; k < n; ++k) {
    const uint32_t a = m8::to_bits(x[k]) & 0x7FFFFFFFu;
    mx = a > mx ? a : mx;
  }
  return m8::absmax_from_max_bits(mx, x, n);
}

template <bool kSigned>
inline void encode_block(const float* __restrict x, uint8_t* __restrict c, float* absmax,
                         int64_t n) {
  const float a = block_absmax(x, n);
  *absmax = a;
  const float scale = m8::encode_scale(a, kSigned ? m8::kSignedM : m8::kUnsignedM);
  for (int64_t k = 0; k < n; ++k) c[k] = m8::encode(x[k], scale, kSigned);
}

// src (one block, fp32) -> the moment's memory at base, in its format.
template <bool kSigned>
inline void store_moment(MomentFormat f, void* dst, float* absmax, int64_t base,
                         const float* __restrict src, int64_t n) {
  if (f == MomentFormat::kBlocks8) {
    encode_block<kSigned>(src, static_cast<uint8_t*>(dst) + base, absmax + base / kBlock, n);
  } else if (f == MomentFormat::kBFloat16) {
    uint16_t* d = static_cast<uint16_t*>(dst) + base;
    for (int64_t k = 0; k < n; ++k) d[k] = m8::bf16_round_nearest(src[k]);
  } else {
    std::memcpy(static_cast<float*>(dst) + base, src, n * sizeof(float));
  }
}

// The update of one block in fp32 buffers; the decay is a template argument so
// that the loop has no control flow and vectorizes.
template <Decay D>
inline void update_block(const AdamCoeffs<float>& s, const AdamStepTerms<float>& t,
                         const float* __restrict g, float* __restrict w, float* __restrict m,
                         float* __restrict v, int64_t n) {
  float unused = 0.0f;
  for (int64_t k = 0; k < n; ++k) w[k] = math::adam_update(s, D, false, t, g[k], w[k], m[k], v[k], unused);
}

// A block whose moments are both 8-bit, in one fused routine where the build has one
// (compact_avx2.h, bitwise the scalar loops); nullptr: the scalar loops.
using Block8Fn = void (*)(const AdamCoeffs<float>&, const AdamStepTerms<float>&, const float*,
                          float*, uint8_t*, uint8_t*, float*, float*, int64_t);

#if defined(AMP_ENGINE_COMPACT_AVX2)
const m8::avx2::UnsignedTables kUnsignedTables;

template <Decay D, bool kSmall>
void block8_avx2(const AdamCoeffs<float>& s, const AdamStepTerms<float>& t, const float* g,
                 float* w, uint8_t* mc, uint8_t* vc, float* ma, float* va, int64_t n) {
  m8::avx2::step_block8<D, kSmall>(s, t, kUnsignedTables, g, w, mc, vc, ma, va, n);
}

Block8Fn pick_block8(Decay d, bool lerp_small) {
  if (d == Decay::kNone) return lerp_small ? block8_avx2<Decay::kNone, true> : block8_avx2<Decay::kNone, false>;
  if (d == Decay::kDecoupled)
    return lerp_small ? block8_avx2<Decay::kDecoupled, true> : block8_avx2<Decay::kDecoupled, false>;
  return lerp_small ? block8_avx2<Decay::kL2, true> : block8_avx2<Decay::kL2, false>;
}
#else
Block8Fn pick_block8(Decay, bool) { return nullptr; }
#endif

struct CompactCall {  // what every chunk of the call shares
  AdamCoeffs<float> s;
  Decay decay;
  bool sr;
  Block8Fn block8;
};

void compact_chunk(const CompactCall& c, const CompactTensor& t, int64_t begin, int64_t end) {
  alignas(64) float g_buf[kBlock], w_buf[kBlock], m_buf[kBlock], v_buf[kBlock];
  const float* g_mem = t.g_type == ScalarType::Float ? static_cast<const float*>(t.g) : nullptr;
  float* w_mem = t.master ? t.master
                          : (t.p_type == ScalarType::Float ? static_cast<float*>(t.p) : nullptr);
  const bool write_param = w_mem == nullptr || t.master != nullptr;
  const bool fused8 = c.block8 && t.m_fmt == MomentFormat::kBlocks8 && t.v_fmt == MomentFormat::kBlocks8;
  for (int64_t b = begin; b < end; b += kBlock) {
    const int64_t n = std::min(kBlock, end - b);
    const float* g = g_mem ? g_mem + b : g_buf;
    if (!g_mem) load_block<float>(t.g_type, t.g, b, g_buf, n);
    float* w = w_mem ? w_mem + b : w_buf;
    if (!w_mem) load_block<float>(t.p_type, t.p, b, w_buf, n);
    if (fused8) {
      c.block8(c.s, t.terms, g, w, static_cast<uint8_t*>(t.m) + b, static_cast<uint8_t*>(t.v) + b,
               t.m_absmax + b / kBlock, t.v_absmax + b / kBlock, n);
      if (write_param) store_block<float>(t.p_type, t.p, b, w, n, c.sr, t.key);
      continue;
    }
    load_moment<true>(t.m_fmt, t.m, t.m_absmax, b, m_buf, n);
    load_moment<false>(t.v_fmt, t.v, t.v_absmax, b, v_buf, n);
    if (c.decay == Decay::kNone) update_block<Decay::kNone>(c.s, t.terms, g, w, m_buf, v_buf, n);
    if (c.decay == Decay::kDecoupled) update_block<Decay::kDecoupled>(c.s, t.terms, g, w, m_buf, v_buf, n);
    if (c.decay == Decay::kL2) update_block<Decay::kL2>(c.s, t.terms, g, w, m_buf, v_buf, n);
    store_moment<true>(t.m_fmt, t.m, t.m_absmax, b, m_buf, n);
    store_moment<false>(t.v_fmt, t.v, t.v_absmax, b, v_buf, n);
    if (write_param) store_block<float>(t.p_type, t.p, b, w, n, c.sr, t.key);
  }
}

void adam_step_compact_cpu(TensorList params, TensorList grads, TensorList masters,
                           TensorList exp_avgs, TensorList exp_avg_sqs, TensorList exp_avg_absmax,
                           TensorList exp_avg_sq_absmax, TensorList steps, OptTensor lr_tensor,
                           double lr, OptTensor inv_scale, OptTensor found_inf,
                           OptTensor rng_state, double beta1, double beta2, double eps,
                           double weight_decay, bool decoupled, bool maximize,
                           bool stochastic_rounding) {
  check_adam_compact_args(params, grads, masters, exp_avgs, exp_avg_sqs, exp_avg_absmax,
                          exp_avg_sq_absmax, steps, lr_tensor, lr, inv_scale, found_inf,
                          rng_state, beta1, beta2, eps, weight_decay, stochastic_rounding);
  if (params.empty() || skip_step(found_inf)) return;  // skip: nothing at all changes

  const double lr_v = read_lr(lr_tensor, lr);
  const bool sr = stochastic_rounding;
  const int64_t* rng = rng_state.has_value() ? ptr<const int64_t>(*rng_state) : nullptr;
  const Decay decay = weight_decay == 0.0 ? Decay::kNone
                      : decoupled         ? Decay::kDecoupled
                                          : Decay::kL2;
  const AdamCoeffs<float> coeffs = math::adam_coeffs<float>(read_inv_scale(inv_scale), lr_v, beta1,
                                                            beta2, eps, weight_decay, maximize);
  const CompactCall call{coeffs, decay, sr, pick_block8(decay, coeffs.lerp_small)};

  const size_t n = params.size();
  const bool has_master = !masters.empty();
  std::vector<Entry> entries;
  std::vector<CompactTensor> ts(n);
  std::vector<int64_t> numels(n);
  entries.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    TensorList group = {params[i], grads[i], exp_avgs[i], exp_avg_sqs[i]};
    std::vector<bool> writable = {true, false, true, true};
    if (has_master) group.push_back(masters[i]), writable.push_back(true);
    entries.push_back(make_row_major_entry(std::move(group), std::move(writable)));
    const TensorList& w = entries.back().work;
    CompactTensor& t = ts[i];
    t.p_type = w[0].scalar_type();
    t.g_type = w[1].scalar_type();
    t.m_fmt = moment_format(w[2].scalar_type());
    t.v_fmt = moment_format(w[3].scalar_type());
    t.p = w[0].data_ptr();
    t.g = w[1].data_ptr();
    t.m = w[2].data_ptr();
    t.v = w[3].data_ptr();
    t.m_absmax = absmax_ptr(exp_avgs, exp_avg_absmax, i);
    t.v_absmax = absmax_ptr(exp_avg_sqs, exp_avg_sq_absmax, i);
    t.master = has_master ? ptr<float>(w.back()) : nullptr;
    t.terms = math::adam_step_terms<float>(lr_v, beta1, beta2, *ptr<const float>(steps[i]));
    t.key = rng ? math::sr_key(rng[0], rng[1], static_cast<int64_t>(i)) : 0u;
    numels[i] = w[0].numel();
  }

  const std::vector<Chunk> chunks = make_chunks(numels);
  torch::stable::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const Chunk& ch = chunks[k];
      compact_chunk(call, ts[ch.tensor], ch.begin, ch.end);
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
  m.impl("adam_step_compact_", TORCH_BOX(&amp_engine::optim::adam_step_compact_cpu));
}
