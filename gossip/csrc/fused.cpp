// CPU: weighted sum of k buffers fused with the per-segment statistics of its result and of every
// input, in the one pass the merge makes anyway.
//
// A variance-corrected average needs the merged buffer's per-tensor mean and variance (and the
// received models' variances as the target): computed here while the values are in registers,
// the correction then costs one rescale pass on top of the merge instead of k + 2 passes.
// Statistics are of the values as stored (rounded to out's dtype), as segment_stats would see.
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <cstring>

#ifdef __AVX512F__
#include <immintrin.h>
#endif

#include "cpu.h"
#include "moments.h"

namespace gossip {
namespace cpu {
namespace {

// The generic path (any dtypes, any k): per block of kLanes elements, merge the block and add
// every stream's block to its sums, kept in memory since k is not known at compile time. On 2
// cores it costs about the merge alone for k > 8 (whose merge is slow) but several passes more for
// bf16 with k <= 8; merging chunks of 1024 and then summing each stream's chunk from L1 (sums in
// registers) was slower still for k >= 5, as nothing then overlaps the fp64 work with the loads.
template <typename To, typename Ti>
void wsum_stats_interleaved(To* out, const Ti* const* xs, const double* w, int64_t k,
                            bool self, double sw, const std::vector<SegmentPiece>& pieces,
                            Moments* pm_out, Moments* pm_in, int64_t nthreads_work) {
  using A = acc_t<To, Ti>;
  const int64_t np = static_cast<int64_t>(pieces.size());
  const int nt = threads_for(nthreads_work);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    std::vector<MomentLanes> in_lanes(k);
    std::vector<double> in_shift(k);
    std::vector<A> wk(k);
    for (int64_t q = 0; q < k; ++q) wk[q] = static_cast<A>(w[q]);
    const A a_sw = static_cast<A>(sw);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < np; ++j) {
      const int64_t start = pieces[j].start, m = pieces[j].end - start;
      MomentLanes out_lanes;
      for (int64_t q = 0; q < k; ++q) {
        in_lanes[q] = MomentLanes{};
        in_shift[q] = ld<double>(xs[q][start]);
      }
      double out_shift = 0;
      for (int64_t i0 = 0; i0 < m; i0 += kLanes) {
        const int64_t len = std::min<int64_t>(kLanes, m - i0);
        To* __restrict o = out + start + i0;
        A acc[kLanes];
        if (len == kLanes && self) {
#pragma omp simd
          for (int i = 0; i < kLanes; ++i) acc[i] = a_sw * ld<A>(o[i]);
        } else if (len == kLanes) {
          const Ti* __restrict x = xs[0] + start + i0;
          const A a = wk[0];
#pragma omp simd
          for (int i = 0; i < kLanes; ++i) acc[i] = a * ld<A>(x[i]);
        } else if (self) {
          for (int64_t i = 0; i < len; ++i) acc[i] = a_sw * ld<A>(o[i]);
        } else {
          const Ti* x = xs[0] + start + i0;
          for (int64_t i = 0; i < len; ++i) acc[i] = wk[0] * ld<A>(x[i]);
        }
        for (int64_t q = 0; q < k; ++q) {
          const Ti* __restrict x = xs[q] + start + i0;
          const A a = wk[q];
          if (len == kLanes) {
            in_lanes[q].add_block(x, in_shift[q]);
            if (self || q > 0) {
#pragma omp simd
              for (int i = 0; i < kLanes; ++i) acc[i] += a * ld<A>(x[i]);
            }
          } else {
            in_lanes[q].add_tail(x, len, in_shift[q]);
            if (self || q > 0) {
              for (int64_t i = 0; i < len; ++i) acc[i] += a * ld<A>(x[i]);
            }
          }
        }
        if (len == kLanes) {
#pragma omp simd
          for (int i = 0; i < kLanes; ++i) o[i] = st<To>(acc[i]);
        } else {
          for (int64_t i = 0; i < len; ++i) o[i] = st<To>(acc[i]);
        }
        if (i0 == 0) out_shift = ld<double>(o[0]);
        if (len == kLanes) {
          out_lanes.add_block(o, out_shift);
        } else {
          out_lanes.add_tail(o, len, out_shift);
        }
      }
      pm_out[j] = out_lanes.finish(m, out_shift);
      for (int64_t q = 0; q < k; ++q) pm_in[q * np + j] = in_lanes[q].finish(m, in_shift[q]);
    }
  }
}

#if defined(__GNUC__)
// fp32 buffers and k <= 8 inputs (the common case): one loop over blocks of 16 elements merges
// the block and adds it to the statistics of every stream while it is in registers. GCC vector
// types (AVX-512 intrinsics where available: GCC 12 splits __builtin_convertvector into halves)
// pin the sums (16 fp64 lanes = 4 vectors per stream) to registers; the fp64 work then hides
// under the merge's memory traffic. The generic path's lanes (in a per-thread std::vector) stay
// in memory, with a load and a store per sum and block: on 2 cores that made the fused op cost
// more than the merge plus separate segment_stats passes. (Without AVX-512 these 64-byte vectors
// are lowered to narrower ones; the helpers are internal and inlined, so -Wpsabi is moot.)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"
typedef float v16f __attribute__((vector_size(64)));
typedef float v8f __attribute__((vector_size(32)));
typedef double v8d __attribute__((vector_size(64)));

inline v16f load16(const float* p) {
  v16f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// kNarrow (k > 4): 8 lanes, 2 vectors per stream, so that the sums of 9 streams still fit in
// the 32 vector registers of AVX-512 (each sum then takes two adds per block; with that many
// streams there are chains enough to hide the add latency).
template <bool kNarrow>
struct VecLanes {
  v8d s1a = {}, s1b = {}, s2a = {}, s2b = {};
  double t1 = 0, t2 = 0;  // the tail (< 16 elements)

  // The 16 values at p (already stored): deviations from shift, fp64.
  void add16(const float* p, double shift) {
#ifdef __AVX512F__
    // one vcvtps2pd each (GCC 12 splits __builtin_convertvector into halves), and FMA
    const __m512d sh = _mm512_set1_pd(shift);
    const __m512d da = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p)), sh);
    const __m512d db = _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p + 8)), sh);
    s1a = (v8d)_mm512_add_pd((__m512d)s1a, da);
    s2a = (v8d)_mm512_fmadd_pd(da, da, (__m512d)s2a);
    if constexpr (kNarrow) {
      s1a = (v8d)_mm512_add_pd((__m512d)s1a, db);
      s2a = (v8d)_mm512_fmadd_pd(db, db, (__m512d)s2a);
    } else {
      s1b = (v8d)_mm512_add_pd((__m512d)s1b, db);
      s2b = (v8d)_mm512_fmadd_pd(db, db, (__m512d)s2b);
    }
#else
    const v8d da = __builtin_convertvector(load8(p), v8d) - shift;
    const v8d db = __builtin_convertvector(load8(p + 8), v8d) - shift;
    s1a += da;
    s2a += da * da;
    if constexpr (kNarrow) {
      s1a += db;
      s2a += db * db;
    } else {
      s1b += db;
      s2b += db * db;
    }
#endif
  }

  void add_tail(const float* p, int64_t m, double shift) {
    for (int64_t j = 0; j < m; ++j) {
      const double d = static_cast<double>(p[j]) - shift;
      t1 += d;
      t2 += d * d;
    }
  }

  Moments finish(int64_t m, double shift) const {
    const v8d a1 = s1a + s1b, a2 = s2a + s2b;
    double s1 = t1, s2 = t2;
    for (int j = 0; j < 8; ++j) {
      s1 += a1[j];
      s2 += a2[j];
    }
    const double n = static_cast<double>(m);
    return {n, shift + s1 / n, std::max(0.0, s2 - s1 * s1 / n)};
  }
};

template <int K, bool kSelf>
void wsum_stats_f32(float* out, const float* const* xs, const double* w, double sw,
                    const std::vector<SegmentPiece>& pieces, Moments* pm_out, Moments* pm_in,
                    int64_t work) {
  const int64_t np = static_cast<int64_t>(pieces.size());
  const int nt = threads_for(work);
#pragma omp parallel num_threads(nt) if (nt > 1)
  {
    float wk[K];
    for (int q = 0; q < K; ++q) wk[q] = static_cast<float>(w[q]);
    const float a_sw = static_cast<float>(sw);
#pragma omp for schedule(static)
    for (int64_t j = 0; j < np; ++j) {
      const int64_t start = pieces[j].start, m = pieces[j].end - start;
      const float* __restrict x[K];
      double shift[K];
      VecLanes<(K > 4)> in[K], res;
      for (int q = 0; q < K; ++q) {
        x[q] = xs[q] + start;
        shift[q] = static_cast<double>(x[q][0]);
      }
      float* __restrict o = out + start;
      // out's shift: its first element as the merge below will store it
      float first = kSelf ? a_sw * o[0] : wk[0] * x[0][0];
      for (int q = kSelf ? 0 : 1; q < K; ++q) first += wk[q] * x[q][0];
      const double oshift = static_cast<double>(first);
      const int64_t nb = m / 16;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t i = b * 16;
        v16f acc;
        if constexpr (kSelf) {
          acc = a_sw * load16(o + i);
        } else {
          acc = wk[0] * load16(x[0] + i);
        }
#pragma GCC unroll 8
        for (int q = kSelf ? 0 : 1; q < K; ++q) acc += wk[q] * load16(x[q] + i);
        std::memcpy(o + i, &acc, sizeof acc);
#pragma GCC unroll 8
        for (int q = 0; q < K; ++q) in[q].add16(x[q] + i, shift[q]);
        res.add16(o + i, oshift);
      }
      const int64_t i0 = nb * 16, tail = m - i0;
      for (int64_t i = i0; i < m; ++i) {
        float a = kSelf ? a_sw * o[i] : wk[0] * x[0][i];
        for (int q = kSelf ? 0 : 1; q < K; ++q) a += wk[q] * x[q][i];
        o[i] = a;
      }
      for (int q = 0; q < K; ++q) {
        in[q].add_tail(x[q] + i0, tail, shift[q]);
        pm_in[q * np + j] = in[q].finish(m, shift[q]);
      }
      res.add_tail(o + i0, tail, oshift);
      pm_out[j] = res.finish(m, oshift);
    }
  }
}

template <bool kSelf>
bool wsum_stats_f32_k(float* out, const float* const* xs, const double* w, int64_t k, double sw,
                      const std::vector<SegmentPiece>& pieces, Moments* pm_out, Moments* pm_in,
                      int64_t work) {
  switch (k) {
    case 1: wsum_stats_f32<1, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 2: wsum_stats_f32<2, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 3: wsum_stats_f32<3, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 4: wsum_stats_f32<4, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 5: wsum_stats_f32<5, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 6: wsum_stats_f32<6, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 7: wsum_stats_f32<7, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    case 8: wsum_stats_f32<8, kSelf>(out, xs, w, sw, pieces, pm_out, pm_in, work); return true;
    default: return false;
  }
}
#pragma GCC diagnostic pop
#endif

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> weighted_sum_stats_(
    const Tensor& out, at::TensorList inputs, at::ArrayRef<double> weights,
    std::optional<double> self_weight, const Tensor& offsets) {
  const int64_t k = static_cast<int64_t>(inputs.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == k, "got ", k, " inputs but ",
              weights.size(), " weights; need one each");
  TORCH_CHECK(k > 0 || self_weight.has_value(),
              "weighted_sum_stats_ needs inputs or a self weight (out <- 0 has no statistics "
              "worth a pass)");
  check_contiguous(out, "out");
  const ScalarType in_t = k ? inputs[0].scalar_type() : out.scalar_type();
  std::vector<const void*> ptrs(k);
  for (int64_t i = 0; i < k; ++i) {
    check_device(out, inputs[i], "inputs");
    TORCH_CHECK(inputs[i].sizes() == out.sizes(), "inputs[", i, "] has shape ",
                inputs[i].sizes(), ", expected ", out.sizes(), " like out");
    check_contiguous(inputs[i], "inputs");
    TORCH_CHECK(inputs[i].scalar_type() == in_t, "inputs[", i, "] has dtype ",
                inputs[i].scalar_type(), " but inputs[0] has ", in_t,
                "; all inputs must share one dtype");
    ptrs[i] = inputs[i].data_ptr();
  }
  std::vector<int64_t> first;
  const std::vector<SegmentPiece> pieces = segment_pieces(out, offsets, first);
  const int64_t S = offsets.numel() - 1;
  std::vector<int64_t> shape(out.sizes().begin(), out.sizes().end() - 1);
  shape.push_back(S);
  std::vector<int64_t> in_shape(shape);
  in_shape.insert(in_shape.begin(), k);
  const auto opts = out.options().dtype(at::kDouble);
  Tensor mean = at::zeros(shape, opts), var = at::zeros(shape, opts);
  Tensor in_mean = at::zeros(in_shape, opts), in_var = at::zeros(in_shape, opts);
  const int64_t np = static_cast<int64_t>(pieces.size());
  if (np == 0) return {mean, var, in_mean, in_var};
  std::vector<Moments> pm_out(np), pm_in(k * np);
  dispatch_pair(out.scalar_type(), in_t, "weighted_sum_stats_", [&](auto to, auto ti) {
    using To = decltype(to);
    using Ti = decltype(ti);
#if defined(__GNUC__)
    if constexpr (std::is_same_v<To, float> && std::is_same_v<Ti, float>) {
      const auto xs = reinterpret_cast<const float* const*>(ptrs.data());
      const int64_t work = out.numel() * (k + 1);
      const bool done =
          self_weight.has_value()
              ? wsum_stats_f32_k<true>(out.data_ptr<float>(), xs, weights.data(), k,
                                       *self_weight, pieces, pm_out.data(), pm_in.data(), work)
              : wsum_stats_f32_k<false>(out.data_ptr<float>(), xs, weights.data(), k, 0.0,
                                        pieces, pm_out.data(), pm_in.data(), work);
      if (done) return;
    }
#endif
    wsum_stats_interleaved<To, Ti>(out.data_ptr<To>(),
                                   reinterpret_cast<const Ti* const*>(ptrs.data()),
                                   weights.data(), k, self_weight.has_value(),
                                   self_weight.value_or(0.0), pieces, pm_out.data(), pm_in.data(),
                                   out.numel() * (k + 1));
  });
  merge_pieces(pm_out.data(), first, mean.data_ptr<double>(), var.data_ptr<double>());
  const int64_t nout = static_cast<int64_t>(first.size()) - 1;
  for (int64_t q = 0; q < k; ++q) {
    merge_pieces(pm_in.data() + q * np, first, in_mean.data_ptr<double>() + q * nout,
                 in_var.data_ptr<double>() + q * nout);
  }
  return {mean, var, in_mean, in_var};
}

}  // namespace cpu
}  // namespace gossip
