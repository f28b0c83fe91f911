// Per-piece moments in fp64 and their merge (CPU): shared by segment_stats and the fused
// weighted_sum_stats_.
//
// A piece's (count, mean, M2) come from fp64 sums of deviations from a shift (its first element),
// which keeps the sum of squares free of cancellation; kLanes independent partial sums per moment
// let the loop run at load/convert throughput instead of waiting on one chain of fp64 adds. The
// pieces of a (row, segment) are merged in order with Chan's formula.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu.h"

namespace gossip {
namespace cpu {

struct Moments {
  double n = 0, mean = 0, m2 = 0;
};

constexpr int kLanes = 32;

struct MomentLanes {
  double a1[kLanes] = {}, a2[kLanes] = {};

  template <typename T>
  void add_block(const T* __restrict p, double shift) {
#pragma omp simd
    for (int j = 0; j < kLanes; ++j) {
      const double d = ld<double>(p[j]) - shift;
      a1[j] += d;
#ifdef __FMA__
      a2[j] = std::fma(d, d, a2[j]);  // one instruction (and one rounding) fewer
#else
      a2[j] += d * d;
#endif
    }
  }

  template <typename T>
  void add_tail(const T* p, int64_t m, double shift) {
    for (int64_t j = 0; j < m; ++j) {
      const double d = ld<double>(p[j]) - shift;
      a1[j] += d;
      a2[j] += d * d;
    }
  }

  Moments finish(int64_t m, double shift) const {
    double s1 = 0, s2 = 0;
    for (int j = 0; j < kLanes; ++j) {
      s1 += a1[j];
      s2 += a2[j];
    }
    const double n = static_cast<double>(m);
    return {n, shift + s1 / n, std::max(0.0, s2 - s1 * s1 / n)};
  }
};

inline void chan_merge(Moments& a, const Moments& b) {
  const double n = a.n + b.n;
  if (n == 0) return;
  const double delta = b.mean - a.mean;
  a.mean += delta * (b.n / n);
  a.m2 += b.m2 + delta * delta * (a.n * b.n / n);
  a.n = n;
}

// mean[o], var[o] (population) of the pieces first[o] .. first[o + 1] - 1; 0 for empty ones.
inline void merge_pieces(const Moments* pm, const std::vector<int64_t>& first, double* mean,
                         double* var) {
  const int64_t nout = static_cast<int64_t>(first.size()) - 1;
  const int nt = threads_for(nout * 64);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1)
  for (int64_t o = 0; o < nout; ++o) {
    Moments acc;
    for (int64_t j = first[o]; j < first[o + 1]; ++j) chan_merge(acc, pm[j]);
    mean[o] = acc.n > 0 ? acc.mean : 0.0;
    var[o] = acc.n > 0 ? acc.m2 / acc.n : 0.0;
  }
}

}  // namespace cpu
}  // namespace gossip
