// CUDA kernels for the temperature softmax-KL ops (docs/design.md §2.1): kdkernels::softmax_kl_forward and
// kdkernels::softmax_kl_backward. The per-element / per-state maths is in
// csrc/include/kdkernels/softmax_kl.h; this file only streams rows through it.
//
// Mapping: a "group" of threads owns one row. For short rows the group is one warp and a block of
// 256 threads holds 8 rows (no barriers); for long rows the group is the whole block (128..512
// threads, one row per block). Each thread streams its share of the row in chunks of 16-byte vector
// loads (scalar loads for the misaligned head and the tail), keeps a partial state, and the group
// merges the partial states with shuffles (+ shared memory across warps).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "kdkernels/softmax_kl.h"
#include "kdkernels/softmax_kl_args.h"
#include "_rows.cuh"

namespace kdkernels {
namespace cuda {
namespace {
using namespace response;

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

// ---- kernels ----------------------------------------------------------------------------------------
template <typename scalar_t>
struct ForwardArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;  // null: no labels
  opmath_t* loss;         // (R,)
  opmath_t* stats;        // (R, kRowStats)
  int64_t R, V, ignore_index;
  opmath_t inv_t, loss_scale;
  JsdConstants<opmath_t> jsd;
  int divergence;
  int group;  // threads per row: kWarpSize or blockDim.x
  bool vec_ok;
};

template <typename scalar_t, bool kJsd>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_forward_kernel(const ForwardArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int N = Tile<scalar_t>::kChunk;
  __shared__ alignas(16) unsigned char smem[kReduceSmemBytes];
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  // row is uniform over a group, so every barrier inside group_allreduce is reached by the whole block
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    opmath_t* st_out = a.stats + row * kRowStats;
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (t == 0) {
        a.loss[row] = opmath_t(0);
#pragma unroll
        for (int i = 0; i < kRowStats; ++i) st_out[i] = opmath_t(0);
      }
      continue;
    }
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.V;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // teacher rows share it when vec_ok

    if constexpr (!kJsd) {
      // one pass: the weighting row is the teacher for forward KL, the student for reverse KL
      const bool fwd = a.divergence == kForwardKL;
      const scalar_t* xr = fwd ? trow : srow;
      const scalar_t* yr = fwd ? srow : trow;
      LogRatioState<opmath_t> st = log_ratio_empty<opmath_t>();
      for_each_chunk<scalar_t, opmath_t>(xr, yr, L, t, G, a.inv_t, [&](const Chunk<scalar_t, opmath_t>& c) {
        st = log_ratio_merge(st, chunk_log_ratio(c));
      });
      st = group_allreduce(st, LogRatioMergeOp{}, log_ratio_empty<opmath_t>(), smem, G);
      if (t == 0) {
        const opmath_t log_sum_w = std::log(st.sw), log_sum_o = std::log(st.so);
        const opmath_t kl = log_ratio_kl(st);
        st_out[0] = fwd ? st.mo : st.mw;           // m_s
        st_out[1] = fwd ? log_sum_o : log_sum_w;   // log_sum_s
        st_out[2] = fwd ? st.mw : st.mo;           // m_t
        st_out[3] = fwd ? log_sum_w : log_sum_o;   // log_sum_t
        st_out[4] = fwd ? opmath_t(0) : kl;        // c_s
        st_out[5] = fwd ? kl : opmath_t(0);        // c_t
        a.loss[row] = kl * a.loss_scale;
      }
    } else {
      // pass 1: both log-sum-exps (x = student b, y = teacher a)
      Pair<LseState<opmath_t>> ls{lse_empty<opmath_t>(), lse_empty<opmath_t>()};
      for_each_chunk<scalar_t, opmath_t>(srow, trow, L, t, G, a.inv_t, [&](const Chunk<scalar_t, opmath_t>& c) {
        ls.first = lse_merge(ls.first, chunk_lse<opmath_t>(N, [&](int j) { return c.x(j); }));
        ls.second = lse_merge(ls.second, chunk_lse<opmath_t>(N, [&](int j) { return c.y(j); }));
      });
      ls = group_allreduce(ls, LsePairMergeOp{}, Pair<LseState<opmath_t>>{lse_empty<opmath_t>(), lse_empty<opmath_t>()},
                           smem, G);
      const opmath_t m_s = ls.first.m, log_sum_s = std::log(ls.first.s);
      const opmath_t m_t = ls.second.m, log_sum_t = std::log(ls.second.s);
      // pass 2 (the row is usually still in L2): c_s, c_t, with the centred logs of softmax_kl.h.
      // Padding slots give log p = log q = -inf, which jsd_accumulate skips (zero probability).
      Pair<opmath_t> c{opmath_t(0), opmath_t(0)};
      const JsdConstants<opmath_t> k = a.jsd;
      for_each_chunk<scalar_t, opmath_t>(srow, trow, L, t, G, a.inv_t, [&](const Chunk<scalar_t, opmath_t>& ch) {
#pragma unroll
        for (int j = 0; j < N; ++j) {
          jsd_accumulate((ch.y(j) - m_t) - log_sum_t, (ch.x(j) - m_s) - log_sum_s, k, c.first, c.second);
        }
      });
      c = group_allreduce(c, PairSumOp{}, Pair<opmath_t>{opmath_t(0), opmath_t(0)}, smem, G);
      if (t == 0) {
        st_out[0] = m_s;
        st_out[1] = log_sum_s;
        st_out[2] = m_t;
        st_out[3] = log_sum_t;
        st_out[4] = c.first;
        st_out[5] = c.second;
        a.loss[row] = (c.first + c.second) * a.loss_scale;
      }
    }
  }
}

template <typename scalar_t>
struct BackwardArgs {
  using opmath_t = at::opmath_type<scalar_t>;
  const opmath_t* grad_loss;  // (R,), any stride (an expanded gradient of a sum has stride 0)
  int64_t grad_loss_stride;
  const scalar_t* student;
  const scalar_t* teacher;
  const int64_t* labels;    // null: no labels
  const opmath_t* stats;    // (R, kRowStats) contiguous
  scalar_t* grad_student;   // null: not requested
  scalar_t* grad_teacher;   // null: not requested
  int64_t R, V, ignore_index;
  opmath_t inv_t, grad_scale;  // grad_scale = T (t2_scale) or 1/T
  JsdConstants<opmath_t> jsd;
  int group;
  bool vec_ok;
};

template <typename scalar_t, int kDivergence>
__global__ void __launch_bounds__(kMaxBlockThreads, kMinBlocksPerSm) softmax_kl_backward_kernel(const BackwardArgs<scalar_t> a) {
  using opmath_t = at::opmath_type<scalar_t>;
  const int G = a.group;
  const int rows_per_block = static_cast<int>(blockDim.x) / G;
  const int t = static_cast<int>(threadIdx.x) % G;
  const int64_t row_step = static_cast<int64_t>(gridDim.x) * rows_per_block;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * rows_per_block + threadIdx.x / G; row < a.R;
       row += row_step) {
    const scalar_t* srow = a.student + row * a.V;
    const scalar_t* trow = a.teacher + row * a.V;
    scalar_t* gs = a.grad_student != nullptr ? a.grad_student + row * a.V : nullptr;
    scalar_t* gt = a.grad_teacher != nullptr ? a.grad_teacher + row * a.V : nullptr;
    const RowLayout L = RowLayout::make(srow, a.V, a.vec_ok);  // shared by all four rows when vec_ok
    if (a.labels != nullptr && a.labels[row] == a.ignore_index) {
      if (gs != nullptr) zero_row(gs, L, t, G);
      if (gt != nullptr) zero_row(gt, L, t, G);
      continue;
    }
    const opmath_t* sp = a.stats + row * kRowStats;
    const RowStats<opmath_t> st{sp[0], sp[1], sp[2], sp[3], sp[4], sp[5]};
    const opmath_t g = a.grad_loss[row * a.grad_loss_stride] * a.grad_scale;
    const JsdConstants<opmath_t> k = a.jsd;
    // x = student (b), y = teacher (a); outputs ox -> grad_student, oy -> grad_teacher
    map_chunks<scalar_t, opmath_t>(srow, trow, gs, gt, L, t, G, a.inv_t,
                                   [&](opmath_t b, opmath_t av, opmath_t& gb, opmath_t& ga) {
                                     softmax_kl_grad(kDivergence, av, b, st, k, gb, ga);
                                     gb *= g;
                                     ga *= g;
                                   });
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

unsigned grid_for(int64_t R, const LaunchConfig& cfg) {
  const int64_t rows_per_block = cfg.block / cfg.group;
  const int64_t blocks = (R + rows_per_block - 1) / rows_per_block;
  // rows are grid-strided, so capping the grid only matters for absurd R
  return static_cast<unsigned>(std::min<int64_t>(blocks, int64_t{1} << 30));
}

// 16-byte vectors are used only when every row pointer the kernel touches has the same offset within
// 16 bytes (then one RowLayout fits all of them); otherwise the rows are read and written as scalars.
bool same_alignment(std::initializer_list<const void*> ptrs) {
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

void check_common(const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& labels,
                  double temperature, int64_t divergence, double beta) {
  check_softmax_kl_args(student, teacher, labels, temperature, divergence, beta);
  TORCH_CHECK_VALUE(student.is_cuda(), "softmax_kl (CUDA): tensors must be CUDA tensors, got ", student.device());
  TORCH_CHECK_VALUE(student.size(1) <= kMaxRowLength, "softmax_kl (CUDA): V must be <= ", kMaxRowLength, ", got ",
                    student.size(1));
}


std::tuple<at::Tensor, at::Tensor> softmax_kl_forward_cuda(const at::Tensor& student_in, const at::Tensor& teacher_in,
                                                           const std::optional<at::Tensor>& labels_in,
                                                           double temperature, int64_t divergence, double beta,
                                                           int64_t ignore_index, bool t2_scale) {
  check_common(student_in, teacher_in, labels_in, temperature, divergence, beta);
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  const int64_t R = student.size(0), V = student.size(1);
  const auto opmath_opts = student.options().dtype(opmath_scalar_type(student.scalar_type()));
  at::Tensor loss = at::empty({R}, opmath_opts);
  at::Tensor stats = at::empty({R, kRowStats}, opmath_opts);
  if (R == 0) return {loss, stats};
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_forward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    ForwardArgs<scalar_t> a;
    a.student = student.data_ptr<scalar_t>();
    a.teacher = teacher.data_ptr<scalar_t>();
    a.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
    a.loss = loss.data_ptr<opmath_t>();
    a.stats = stats.data_ptr<opmath_t>();
    a.R = R;
    a.V = V;
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<opmath_t>(1.0 / temperature);
    a.loss_scale = static_cast<opmath_t>(t2_scale ? temperature * temperature : 1.0);
    a.jsd = jsd_constants<opmath_t>(static_cast<opmath_t>(divergence == kJSD ? beta : 0.5));
    a.divergence = static_cast<int>(divergence);
    const LaunchConfig cfg = pick_config<scalar_t>(V);
    a.group = cfg.group;
    a.vec_ok = same_alignment({a.student, a.teacher});
    const unsigned grid = grid_for(R, cfg);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (divergence == kJSD) {
      softmax_kl_forward_kernel<scalar_t, true><<<grid, cfg.block, 0, stream>>>(a);
    } else {
      softmax_kl_forward_kernel<scalar_t, false><<<grid, cfg.block, 0, stream>>>(a);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, stats};
}

std::tuple<at::Tensor, at::Tensor> softmax_kl_backward_cuda(const at::Tensor& grad_loss_in, const at::Tensor& student_in,
                                                            const at::Tensor& teacher_in,
                                                            const std::optional<at::Tensor>& labels_in,
                                                            const at::Tensor& stats_in, double temperature,
                                                            int64_t divergence, double beta, int64_t ignore_index,
                                                            bool t2_scale, bool student_grad, bool teacher_grad) {
  check_common(student_in, teacher_in, labels_in, temperature, divergence, beta);
  const int64_t R = student_in.size(0), V = student_in.size(1);
  TORCH_CHECK_VALUE(grad_loss_in.dim() == 1 && grad_loss_in.size(0) == R, "softmax_kl_backward: grad_loss must have shape (",
                    R, "), got ", grad_loss_in.sizes());
  TORCH_CHECK_VALUE(stats_in.dim() == 2 && stats_in.size(0) == R && stats_in.size(1) == kRowStats,
                    "softmax_kl_backward: stats must have shape (", R, ", ", kRowStats, "), got ", stats_in.sizes());
  TORCH_CHECK_VALUE(grad_loss_in.device() == student_in.device() && stats_in.device() == student_in.device(),
                    "softmax_kl_backward: grad_loss and stats must be on ", student_in.device());
  c10::cuda::CUDAGuard guard(student_in.device());
  const at::Tensor student = student_in.contiguous();
  const at::Tensor teacher = teacher_in.contiguous();
  // a gradient that is not requested is an empty (0,) tensor of the input dtype
  at::Tensor grad_student = student_grad ? at::empty({R, V}, student.options()) : at::empty({0}, student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty({R, V}, teacher.options()) : at::empty({0}, teacher.options());
  if (R == 0 || (!student_grad && !teacher_grad)) return {grad_student, grad_teacher};

  const at::ScalarType opmath_dtype = opmath_scalar_type(student.scalar_type());
  // grad_loss keeps its stride (a broadcast gradient is stride 0); only its dtype is normalised
  const at::Tensor grad_loss = grad_loss_in.scalar_type() == opmath_dtype ? grad_loss_in : grad_loss_in.to(opmath_dtype);
  const at::Tensor stats = stats_in.to(opmath_dtype).contiguous();
  at::Tensor labels;
  if (labels_in.has_value()) labels = labels_in->contiguous();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    BackwardArgs<scalar_t> a;
    a.grad_loss = grad_loss.data_ptr<opmath_t>();
    a.grad_loss_stride = grad_loss.stride(0);
    a.student = student.data_ptr<scalar_t>();
    a.teacher = teacher.data_ptr<scalar_t>();
    a.labels = labels.defined() ? labels.data_ptr<int64_t>() : nullptr;
    a.stats = stats.data_ptr<opmath_t>();
    a.grad_student = student_grad ? grad_student.data_ptr<scalar_t>() : nullptr;
    a.grad_teacher = teacher_grad ? grad_teacher.data_ptr<scalar_t>() : nullptr;
    a.R = R;
    a.V = V;
    a.ignore_index = ignore_index;
    a.inv_t = static_cast<opmath_t>(1.0 / temperature);
    a.grad_scale = static_cast<opmath_t>(t2_scale ? temperature : 1.0 / temperature);
    a.jsd = jsd_constants<opmath_t>(static_cast<opmath_t>(divergence == kJSD ? beta : 0.5));
    const LaunchConfig cfg = pick_config<scalar_t>(V);
    a.group = cfg.group;
    a.vec_ok = same_alignment({a.student, a.teacher, a.grad_student, a.grad_teacher});
    const unsigned grid = grid_for(R, cfg);
    const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    switch (divergence) {
      case kForwardKL:
        softmax_kl_backward_kernel<scalar_t, kForwardKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      case kReverseKL:
        softmax_kl_backward_kernel<scalar_t, kReverseKL><<<grid, cfg.block, 0, stream>>>(a);
        break;
      default:
        softmax_kl_backward_kernel<scalar_t, kJSD><<<grid, cfg.block, 0, stream>>>(a);
        break;
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_student, grad_teacher};
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("softmax_kl_forward", &kdkernels::cuda::softmax_kl_forward_cuda);
  m.impl("softmax_kl_backward", &kdkernels::cuda::softmax_kl_backward_cuda);
}
