// Response-family CUDA helpers (docs/design.md §2.1), for softmax_kl.cu and the response ops that
// join it: the NaN-propagating max of the chunk maxima, merge operators of the softmax-KL states
// (kdkernels/softmax_kl.h) for block_reduce.cuh's all-reductions, 16-byte vector loads and the row
// layout used to vectorise a row that may start misaligned.
#pragma once
#include <cstdint>

#include "../block_reduce.cuh"
#include "kdkernels/common.h"
#include "kdkernels/softmax_kl.h"

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

}  // namespace response
}  // namespace cuda
}  // namespace kdkernels
