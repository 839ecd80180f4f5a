// Reusable CUDA device helpers: shuffles and warp / block all-reductions of small state structs,
// 16-byte vector loads and the row layout used to vectorise a row that may start misaligned.
// The maths of the states lives in csrc/include/kdkernels/*.h; this file only moves them around.
#pragma once
#include <cstdint>
#include <cstring>

#include "kdkernels/common.h"
#include "kdkernels/softmax_kl.h"

namespace kdkernels {
namespace cuda {

constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kWarpSize = 32;
constexpr int kMaxWarpsPerBlock = 32;  // blocks of at most 1024 threads

// ---- shuffles of any trivially copyable struct (float / double fields) -------------------------
template <typename S>
__device__ __forceinline__ S shfl_xor(S v, int lane_mask) {
  static_assert(sizeof(S) % sizeof(int) == 0, "shuffled state must be a whole number of 32-bit words");
  constexpr int kWords = sizeof(S) / sizeof(int);
  int w[kWords];
  memcpy(w, &v, sizeof(S));  // compiles to register moves
#pragma unroll
  for (int i = 0; i < kWords; ++i) w[i] = __shfl_xor_sync(kFullWarpMask, w[i], lane_mask);
  memcpy(&v, w, sizeof(S));
  return v;
}

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

// ---- merge operators ----------------------------------------------------------------------------
// All of them are symmetric (op(a, b) == op(b, a) bit for bit, NaN payloads aside), so a butterfly
// leaves the same value in every lane.
struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const {
    return a + b;
  }
};

// Element-wise sum of a pair (two accumulators reduced with one set of shuffles / barriers).
template <typename T>
struct Pair {
  T first, second;
};

struct PairSumOp {
  template <typename T>
  __device__ __forceinline__ Pair<T> operator()(Pair<T> a, Pair<T> b) const {
    return {a.first + b.first, a.second + b.second};
  }
};

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

// ---- warp / block all-reductions ------------------------------------------------------------------
// Butterfly: every lane ends with the reduction of the whole warp. All 32 lanes must call it.
template <typename S, typename Op>
__device__ __forceinline__ S warp_allreduce(S v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Shared scratch for block_allreduce: 32 partial slots of up to kReduceMaxStateBytes each, then a
// result slot at a fixed offset. Keeping the result slot apart from every partial slot, whatever the
// state type, lets consecutive calls (even with different state types) share one buffer with two
// barriers per call: a call's partial writes can only overlap the previous call's reads of its result
// slot, which never aliases a partial slot.
constexpr int kReduceMaxStateBytes = 64;
constexpr int kReduceSmemBytes = (kMaxWarpsPerBlock + 1) * kReduceMaxStateBytes;

// All threads of the block must call it (blockDim.x a multiple of 32, at most 1024), with the same
// identity. Every thread gets the same result (broadcast through shared memory).
template <typename S, typename Op>
__device__ __forceinline__ S block_allreduce(S v, Op op, S identity, unsigned char* smem) {
  static_assert(sizeof(S) <= kReduceMaxStateBytes, "state too large for the reduction scratch");
  v = warp_allreduce(v, op);
  const int nwarps = static_cast<int>(blockDim.x) / kWarpSize;
  if (nwarps == 1) return v;  // uniform across the block
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  S* partial = reinterpret_cast<S*>(smem);
  S* result = reinterpret_cast<S*>(smem + kMaxWarpsPerBlock * kReduceMaxStateBytes);
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    S w = lane < nwarps ? partial[lane] : identity;
    w = warp_allreduce(w, op);
    if (lane == 0) *result = w;
  }
  __syncthreads();
  return *result;
}

// A group of `group` consecutive threads reduces one row: a single warp (group == 32, no barriers,
// so warps may leave the row loop independently) or the whole block (group == blockDim.x).
template <typename S, typename Op>
__device__ __forceinline__ S group_allreduce(S v, Op op, S identity, unsigned char* smem, int group) {
  if (group == kWarpSize) return warp_allreduce(v, op);
  return block_allreduce(v, op, identity, smem);
}

// ---- 16-byte vectors ------------------------------------------------------------------------------
template <typename T>
struct VecTraits {
  static constexpr int kBytes = 16;
  static constexpr int kWidth = kBytes / static_cast<int>(sizeof(T));
};

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T v[N];
};

// ---- row layout -------------------------------------------------------------------------------------
// A contiguous row of V elements starting at `row` (any element-aligned address) is split into a
// scalar head (up to the first 16-byte boundary), a body of whole 16-byte vectors and a scalar tail.
// Head and tail are numbered together as "scalar slots" 0..nscalar-1 so one strided loop covers both.
// Without vectorisation (vec_ok == false: the tensors a kernel touches do not share their alignment)
// the whole row is scalar. Offsets *within* a row are 32-bit (fewer registers); the host must check
// V <= kMaxRowLength so that loop indices (< V + one block's stride) cannot overflow. Row starts are
// computed by the caller in 64 bits.
constexpr int64_t kMaxRowLength = (int64_t{1} << 31) - (int64_t{1} << 20);

struct RowLayout {
  int head;        // elements before the first vector
  int nvec;        // whole vectors in the body
  int tail_start;  // first element after the body
  int nscalar;     // head + tail elements

  template <typename T>
  __device__ __forceinline__ static RowLayout make(const T* row, int64_t V64, bool vec_ok) {
    constexpr int W = VecTraits<T>::kWidth;
    const int V = static_cast<int>(V64);
    RowLayout L;
    if (vec_ok) {
      const int mis = static_cast<int>(reinterpret_cast<uintptr_t>(row) % VecTraits<T>::kBytes);
      const int h = mis == 0 ? 0 : (VecTraits<T>::kBytes - mis) / static_cast<int>(sizeof(T));
      L.head = h < V ? h : V;
    } else {
      L.head = V;
    }
    L.nvec = (V - L.head) / W;
    L.tail_start = L.head + L.nvec * W;
    L.nscalar = L.head + (V - L.tail_start);
    return L;
  }

  // element index of scalar slot si (0 <= si < nscalar)
  __device__ __forceinline__ int scalar_index(int si) const { return si < head ? si : si + (tail_start - head); }
};

}  // namespace cuda
}  // namespace kdkernels
