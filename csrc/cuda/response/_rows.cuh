// Response-family CUDA helpers (docs/design.md §2.1), shared by the softmax-KL ops (softmax_kl.cu,
// softmax_kl_step.cu): the NaN-propagating max of the chunk maxima, merge operators of the softmax-KL
// states (kdkernels/softmax_kl.h) for block_reduce.cuh's all-reductions, the chunked row walks, the
// row statistics pass, and the host-side launch configuration and argument checks.
//
// Mapping: a "group" of threads owns one row. For short rows the group is one warp and a block of
// 256 threads holds 8 rows (no barriers); for long rows the group is the whole block (128..512
// threads, one row per block). Each thread streams its share of the row in chunks of 16-byte vector
// loads (scalar loads for the misaligned head and the tail), keeps a partial state, and the group
// merges the partial states with shuffles (+ shared memory across warps).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>

#include "../block_reduce.cuh"
#include "../row_layout.cuh"
#include "kdkernels/common.h"
#include "kdkernels/softmax_kl.h"
#include "kdkernels/softmax_kl_args.h"

namespace kdkernels {
namespace cuda {
namespace response {  // the family's shared CUDA code (`using namespace response;` in its op files)

// ---- NaN-propagating max -----------------------------------------------------------------------------
// Same result as kdkernels::max_nan (NaN if either side is NaN), in one instruction on sm_80+ instead
// of compare / NaN-test / select: the chunk maxima run once per element.
template <typename T>
__device__ __forceinline__ T fast_max_nan(T a, T b) {
  return max_nan(a, b);
}

__device__ __forceinline__ float fast_max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  float r;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
#else
  return max_nan(a, b);
#endif
}

// ---- merge operators of the softmax-KL states (symmetric, as block_reduce.cuh requires) ------------
struct LseMergeOp {
  template <typename T>
  __device__ __forceinline__ LseState<T> operator()(LseState<T> a, LseState<T> b) const {
    return lse_merge(a, b);
  }
};

// Two independent log-sum-exp states (student and teacher rows) reduced together.
struct LsePairMergeOp {
  template <typename T>
  __device__ __forceinline__ Pair<LseState<T>> operator()(Pair<LseState<T>> a, Pair<LseState<T>> b) const {
    return {lse_merge(a.first, b.first), lse_merge(a.second, b.second)};
  }
};

struct LogRatioMergeOp {
  template <typename T>
  __device__ __forceinline__ LogRatioState<T> operator()(LogRatioState<T> a, LogRatioState<T> b) const {
    return log_ratio_merge(a, b);
  }
};

// ---- launch shape and tiles ---------------------------------------------------------------------------
// At most 512 threads per block and 64 registers per thread: two row-blocks per SM, so one block's
// end-of-row reduction overlaps the other's streaming (a single 1024-thread block would idle the SM).
constexpr int kMaxBlockThreads = 512;
constexpr int kMinBlocksPerSm = 2;
constexpr int kWarpModeBlock = 256;  // 8 rows of one warp each

template <typename scalar_t>
struct Tile {
  static constexpr int kVec = VecTraits<scalar_t>::kWidth;  // elements per 16-byte vector
  // Vectors per thread per step and per tensor: 2 x 2 x 16 bytes in flight per thread covers HBM
  // latency at the occupancy 64 registers allow, and keeps the per-step state merge cheap.
  static constexpr int kUnroll = 2;
  static constexpr int kChunk = kVec * kUnroll;  // elements per thread per step and per tensor
  // Scalar steps fill only the first vector slot: with vectors they cover at most 2 * (kVec - 1) head
  // and tail elements per row, and fewer live addresses keep the register budget for the vector loop.
  static constexpr int kScalarChunk = kVec;
};

// ---- scaled logits ------------------------------------------------------------------------------------
// a = z * (1/T) rounded to the op-math type: the one definition of the scaled logits in every pass of
// the forward and the backward (as rounded_scale in csrc/cpu/response/softmax_kl.cpp). nvcc contracts a product
// followed by a subtraction into an FMA by default (and --use_fast_math implies it), which would skip
// this rounding in `a - max a`: that would no longer be exactly 0 at the max, and the centred logs
// of softmax_kl.h would lose their exactness for logits of magnitude 1e4. The _rn intrinsics are
// never contracted.
__device__ __forceinline__ float mul_rn(float x, float y) {
  return __fmul_rn(x, y);
}
__device__ __forceinline__ double mul_rn(double x, double y) {
  return __dmul_rn(x, y);
}

// ---- chunks -------------------------------------------------------------------------------------------
// One step's worth of two rows x, y (same layout) held raw in registers (16-bit data stays packed, half
// the registers of floats) and converted to op-math, times `scale` (1/T, by mul_rn), on use. Slots past the end of
// the row hold -inf, which every consumer below treats as "no element" (zero probability).
template <typename scalar_t, typename opmath_t>
struct Chunk {
  using TL = Tile<scalar_t>;
  using Vec = AlignedVec<scalar_t, TL::kVec>;
  Vec xv[TL::kUnroll], yv[TL::kUnroll];
  opmath_t scale;

  __device__ __forceinline__ opmath_t x(int j) const {
    return mul_rn(static_cast<opmath_t>(xv[j / TL::kVec].v[j % TL::kVec]), scale);
  }
  __device__ __forceinline__ opmath_t y(int j) const {
    return mul_rn(static_cast<opmath_t>(yv[j / TL::kVec].v[j % TL::kVec]), scale);
  }

  // Vector part: vectors base + u * G + t, u < kUnroll (consecutive threads read consecutive vectors).
  __device__ __forceinline__ void load_vec(const scalar_t* xr, const scalar_t* yr, const RowLayout& L, int base,
                                           int t, int G) {
    const Vec* xs = reinterpret_cast<const Vec*>(xr + L.head);
    const Vec* ys = reinterpret_cast<const Vec*>(yr + L.head);
#pragma unroll
    for (int u = 0; u < TL::kUnroll; ++u) {
      const int vi = base + u * G + t;
      if (vi < L.nvec) {
        xv[u] = xs[vi];
        yv[u] = ys[vi];
      } else {
        fill_neg_inf(u);
      }
    }
  }

  // Scalar part (head and tail, or the whole row without vectors): slots base + j * G + t for
  // j < kScalarChunk go to elements j of the chunk; the other elements are padding.
  __device__ __forceinline__ void load_scalar(const scalar_t* xr, const scalar_t* yr, const RowLayout& L, int base,
                                              int t, int G) {
    static_assert(TL::kScalarChunk == TL::kVec, "scalar steps fill exactly vector slot 0");
    const scalar_t ninf = static_cast<scalar_t>(neg_inf<opmath_t>());
#pragma unroll
    for (int j = 0; j < TL::kScalarChunk; ++j) {
      const int si = base + j * G + t;
      const bool ok = si < L.nscalar;
      const int idx = ok ? L.scalar_index(si) : 0;
      xv[0].v[j] = ok ? xr[idx] : ninf;
      yv[0].v[j] = ok ? yr[idx] : ninf;
    }
#pragma unroll
    for (int u = 1; u < TL::kUnroll; ++u) fill_neg_inf(u);
  }

  __device__ __forceinline__ void fill_neg_inf(int u) {
    const scalar_t ninf = static_cast<scalar_t>(neg_inf<opmath_t>());
#pragma unroll
    for (int j = 0; j < TL::kVec; ++j) xv[u].v[j] = yv[u].v[j] = ninf;
  }
};

// Calls f(chunk) on every chunk this thread (index t of a group of G) owns in rows xr, yr.
template <typename scalar_t, typename opmath_t, typename F>
__device__ __forceinline__ void for_each_chunk(const scalar_t* xr, const scalar_t* yr, const RowLayout& L, int t,
                                               int G, opmath_t scale, F&& f) {
  using TL = Tile<scalar_t>;
  Chunk<scalar_t, opmath_t> c;
  c.scale = scale;
  for (int base = 0; base + t < L.nvec; base += G * TL::kUnroll) {
    c.load_vec(xr, yr, L, base, t, G);
    f(c);
  }
  for (int base = 0; base + t < L.nscalar; base += G * TL::kScalarChunk) {
    c.load_scalar(xr, yr, L, base, t, G);
    f(c);
  }
}

// Same walk, but f(x, y, ox, oy) maps each element pair to two outputs, stored (cast to scalar_t) to
// out_x / out_y at the element's position; a null output is skipped. Padding slots are not computed.
template <typename scalar_t, typename opmath_t, typename F>
__device__ __forceinline__ void map_chunks(const scalar_t* xr, const scalar_t* yr, scalar_t* out_x, scalar_t* out_y,
                                           const RowLayout& L, int t, int G, opmath_t scale, F&& f) {
  using TL = Tile<scalar_t>;
  using Vec = AlignedVec<scalar_t, TL::kVec>;
  Chunk<scalar_t, opmath_t> c;
  c.scale = scale;
  Vec* oxv = out_x != nullptr ? reinterpret_cast<Vec*>(out_x + L.head) : nullptr;
  Vec* oyv = out_y != nullptr ? reinterpret_cast<Vec*>(out_y + L.head) : nullptr;
  for (int base = 0; base + t < L.nvec; base += G * TL::kUnroll) {
    c.load_vec(xr, yr, L, base, t, G);
#pragma unroll
    for (int u = 0; u < TL::kUnroll; ++u) {
      const int vi = base + u * G + t;
      if (vi < L.nvec) {
        Vec ox, oy;
#pragma unroll
        for (int j = 0; j < TL::kVec; ++j) {
          opmath_t gx, gy;
          f(c.x(u * TL::kVec + j), c.y(u * TL::kVec + j), gx, gy);
          ox.v[j] = static_cast<scalar_t>(gx);
          oy.v[j] = static_cast<scalar_t>(gy);
        }
        if (oxv != nullptr) oxv[vi] = ox;
        if (oyv != nullptr) oyv[vi] = oy;
      }
    }
  }
  for (int base = 0; base + t < L.nscalar; base += G * TL::kScalarChunk) {
    c.load_scalar(xr, yr, L, base, t, G);
#pragma unroll
    for (int j = 0; j < TL::kScalarChunk; ++j) {
      const int si = base + j * G + t;
      if (si < L.nscalar) {
        const int idx = L.scalar_index(si);
        opmath_t gx, gy;
        f(c.x(j), c.y(j), gx, gy);
        if (out_x != nullptr) out_x[idx] = static_cast<scalar_t>(gx);
        if (out_y != nullptr) out_y[idx] = static_cast<scalar_t>(gy);
      }
    }
  }
}

// Zero one row of an output (ignored rows get zero gradient).
template <typename scalar_t>
__device__ __forceinline__ void zero_row(scalar_t* out, const RowLayout& L, int t, int G) {
  using TL = Tile<scalar_t>;
  using Vec = AlignedVec<scalar_t, TL::kVec>;
  Vec z;
#pragma unroll
  for (int j = 0; j < TL::kVec; ++j) z.v[j] = static_cast<scalar_t>(0.0f);
  Vec* ov = reinterpret_cast<Vec*>(out + L.head);
  for (int vi = t; vi < L.nvec; vi += G) ov[vi] = z;
  for (int si = t; si < L.nscalar; si += G) out[L.scalar_index(si)] = static_cast<scalar_t>(0.0f);
}

// ---- per-chunk partial states (thin wrappers over softmax_kl.h) -----------------------------------
// Chunk maxes first, then the centred sums; a chunk whose max is -inf (all -inf / padding) is the
// empty state (the exps would otherwise see -inf - -inf = NaN).
template <typename opmath_t, typename Get>
__device__ __forceinline__ LseState<opmath_t> chunk_lse(int n, Get get) {
  opmath_t m = get(0);
#pragma unroll
  for (int j = 1; j < n; ++j) m = fast_max_nan(m, get(j));
  opmath_t s = opmath_t(0);
  if (m != neg_inf<opmath_t>()) {
#pragma unroll
    for (int j = 0; j < n; ++j) s += std::exp(get(j) - m);
  }
  return {m, s};
}

// Forward / reverse KL partial state of a chunk; the weighting row is c.x.
template <typename C>
__device__ __forceinline__ auto chunk_log_ratio(const C& c) {
  using opmath_t = decltype(c.scale);
  constexpr int N = C::TL::kChunk;
  LogRatioState<opmath_t> s = log_ratio_empty<opmath_t>();
  s.mw = c.x(0);
  s.mo = c.y(0);
#pragma unroll
  for (int j = 1; j < N; ++j) {
    s.mw = fast_max_nan(s.mw, c.x(j));
    s.mo = fast_max_nan(s.mo, c.y(j));
  }
  if (s.mw != neg_inf<opmath_t>()) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      // exp(x - mw) here and inside log_ratio_term is one common subexpression after inlining
      s.sw += std::exp(c.x(j) - s.mw);
      s.acc += log_ratio_term(c.x(j), s.mw, c.y(j), s.mo);
    }
  }
  if (s.mo != neg_inf<opmath_t>()) {
#pragma unroll
    for (int j = 0; j < N; ++j) s.so += std::exp(c.y(j) - s.mo);
  }
  return s;
}


// ---- row statistics --------------------------------------------------------------------------------
// The stats of softmax_kl.h of one row (x = student b, y = teacher a), in every thread of the group:
// forward / reverse KL in one streaming pass (the weighting row is the teacher for forward KL, the
// student for reverse KL), JSD in two (log-sum-exps, then c_s, c_t; the row is usually still in L2).
// Every thread of the group must call it (group_allreduce).
template <typename scalar_t, typename opmath_t, bool kJsd>
__device__ __forceinline__ RowStats<opmath_t> row_stats(const scalar_t* srow, const scalar_t* trow,
                                                        const RowLayout& L, int t, int G, opmath_t inv_t,
                                                        int divergence, const JsdConstants<opmath_t>& k,
                                                        unsigned char* smem) {
  using C = Chunk<scalar_t, opmath_t>;
  if constexpr (!kJsd) {
    const bool fwd = divergence == kForwardKL;
    const scalar_t* xr = fwd ? trow : srow;
    const scalar_t* yr = fwd ? srow : trow;
    LogRatioState<opmath_t> st = log_ratio_empty<opmath_t>();
    for_each_chunk<scalar_t, opmath_t>(xr, yr, L, t, G, inv_t,
                                       [&](const C& c) { st = log_ratio_merge(st, chunk_log_ratio(c)); });
    st = group_allreduce(st, LogRatioMergeOp{}, log_ratio_empty<opmath_t>(), smem, G);
    const opmath_t log_sum_w = std::log(st.sw), log_sum_o = std::log(st.so);
    const opmath_t kl = log_ratio_kl(st);
    return fwd ? RowStats<opmath_t>{st.mo, log_sum_o, st.mw, log_sum_w, opmath_t(0), kl}
               : RowStats<opmath_t>{st.mw, log_sum_w, st.mo, log_sum_o, kl, opmath_t(0)};
  } else {
    constexpr int N = Tile<scalar_t>::kChunk;
    using LsePair = Pair<LseState<opmath_t>>;
    LsePair ls{lse_empty<opmath_t>(), lse_empty<opmath_t>()};
    for_each_chunk<scalar_t, opmath_t>(srow, trow, L, t, G, inv_t, [&](const C& c) {
      ls.first = lse_merge(ls.first, chunk_lse<opmath_t>(N, [&](int j) { return c.x(j); }));
      ls.second = lse_merge(ls.second, chunk_lse<opmath_t>(N, [&](int j) { return c.y(j); }));
    });
    ls = group_allreduce(ls, LsePairMergeOp{}, LsePair{lse_empty<opmath_t>(), lse_empty<opmath_t>()}, smem, G);
    const opmath_t m_s = ls.first.m, log_sum_s = std::log(ls.first.s);
    const opmath_t m_t = ls.second.m, log_sum_t = std::log(ls.second.s);
    // padding slots give log p = log q = -inf, which jsd_accumulate skips (zero probability)
    Pair<opmath_t> c{opmath_t(0), opmath_t(0)};
    for_each_chunk<scalar_t, opmath_t>(srow, trow, L, t, G, inv_t, [&](const C& ch) {
#pragma unroll
      for (int j = 0; j < N; ++j) {
        jsd_accumulate((ch.y(j) - m_t) - log_sum_t, (ch.x(j) - m_s) - log_sum_s, k, c.first, c.second);
      }
    });
    c = group_allreduce(c, PairSumOp{}, Pair<opmath_t>{opmath_t(0), opmath_t(0)}, smem, G);
    return {m_s, log_sum_s, m_t, log_sum_t, c.first, c.second};
  }
}

// ---- host side ----------------------------------------------------------------------------------------
struct LaunchConfig {
  int block;  // threads per block
  int group;  // threads per row
};

// Short rows (at most 8 vectors per lane): a warp per row, 8 rows per block, no barriers. Longer rows:
// one block per row, sized for about 8 vectors per thread (128..512 threads).
template <typename scalar_t>
LaunchConfig pick_config(int64_t V) {
  const int64_t nvec = (V + Tile<scalar_t>::kVec - 1) / Tile<scalar_t>::kVec;
  if (nvec <= 8 * kWarpSize) return {kWarpModeBlock, kWarpSize};
  int threads = 128;
  while (threads < kMaxBlockThreads && threads * int64_t{8} < nvec) threads *= 2;
  return {threads, threads};
}

inline unsigned grid_for(int64_t R, const LaunchConfig& cfg) {
  const int64_t rows_per_block = cfg.block / cfg.group;
  const int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  // rows are grid-strided, so capping the grid only matters for absurd R
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{1} << 30));
}

// 16-byte vectors are used only when every row pointer the kernel touches has the same offset within
// 16 bytes (then one RowLayout fits all of them); otherwise the rows are read and written as scalars.
inline bool same_alignment(std::initializer_list<const void*> ptrs) {
  bool first = true;
  uintptr_t mis = 0;
  for (const void* p : ptrs) {
    if (p == nullptr) continue;
    const uintptr_t m = reinterpret_cast<uintptr_t>(p) % 16;
    if (first) {
      mis = m;
      first = false;
    } else if (m != mis) {
      return false;
    }
  }
  return true;
}

// The checks of every softmax-KL CUDA entry point: the shared ones plus the device and the row length.
inline void check_softmax_kl_cuda_args(const at::Tensor& student, const at::Tensor& teacher,
                                       const std::optional<at::Tensor>& labels, double temperature,
                                       int64_t divergence, double beta) {
  check_softmax_kl_args(student, teacher, labels, temperature, divergence, beta);
  TORCH_CHECK_VALUE(student.is_cuda(), "softmax_kl (CUDA): tensors must be CUDA tensors, got ", student.device());
  TORCH_CHECK_VALUE(student.size(1) <= kMaxRowLength, "softmax_kl (CUDA): V must be <= ", kMaxRowLength, ", got ",
                    student.size(1));
}

}  // namespace response
}  // namespace cuda
}  // namespace kdkernels
