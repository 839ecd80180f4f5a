// Family-agnostic row helpers of the CUDA kernels: 16-byte vectors and the layout used to vectorise
// a contiguous row that may start misaligned (the response kernels and scale_rows.cuh share it).
#pragma once
#include <cstdint>

namespace kdkernels {
namespace cuda {

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
