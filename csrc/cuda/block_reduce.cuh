// The one block reduction of the CUDA kernels, family-agnostic: shuffles and warp / block
// all-reductions of any small trivially copyable state (a scalar, a Pair, a family's merge state)
// under a symmetric merge operator. Families bring their own states and operators (e.g.
// csrc/cuda/response/_rows.cuh); the maths of those lives in csrc/include/kdkernels/*.h.
//
// Reduction order: a butterfly (xor 16, 8, 4, 2, 1) within each warp, then the warps' results, in
// warp order, by the same butterfly in warp 0 (missing warps contribute `identity`). Lane 0 of a
// warp therefore sees the same tree as a shfl_down reduction, so kernels that used one keep their
// results bit for bit.
#pragma once
#include <cstdint>
#include <cstring>

namespace kdkernels {
namespace cuda {

constexpr int kWarpSize = 32;  // the one spelling of the warp size in every CUDA kernel
constexpr unsigned kFullWarpMask = 0xffffffffu;
constexpr int kMaxWarpsPerBlock = 1024 / kWarpSize;  // blocks of at most 1024 threads

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

// ---- warp / block all-reductions ------------------------------------------------------------------
// Butterfly: every lane ends with the reduction of the whole warp. All lanes of the warp must call it.
template <typename S, typename Op>
__device__ __forceinline__ S warp_allreduce(S v, Op op) {
#pragma unroll
  for (int m = kWarpSize / 2; m > 0; m >>= 1) v = op(v, shfl_xor(v, m));
  return v;
}

// Shared scratch for block_allreduce: kMaxWarpsPerBlock partial slots of up to kReduceMaxStateBytes
// each, then a result slot at a fixed offset. Keeping the result slot apart from every partial slot,
// whatever the state type, lets consecutive calls (even with different state types) share one buffer
// with two barriers per call: a call's partial writes can only overlap the previous call's reads of
// its result slot, which never aliases a partial slot.
constexpr int kReduceMaxStateBytes = 64;
constexpr int kReduceSmemBytes = (kMaxWarpsPerBlock + 1) * kReduceMaxStateBytes;

// Linear thread index and thread count of the block (1-, 2- or 3-D blocks; warps are runs of
// kWarpSize consecutive linear indices).
__device__ __forceinline__ int block_thread_index() {
  return static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

__device__ __forceinline__ int block_thread_count() {
  return static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
}

// All threads of the block must call it (a multiple of kWarpSize threads, at most 1024), with the
// same identity. Every thread gets the same result (broadcast through shared memory).
template <typename S, typename Op>
__device__ __forceinline__ S block_allreduce(S v, Op op, S identity, unsigned char* smem) {
  static_assert(sizeof(S) <= kReduceMaxStateBytes, "state too large for the reduction scratch");
  v = warp_allreduce(v, op);
  const int nwarps = block_thread_count() / kWarpSize;
  if (nwarps == 1) return v;  // uniform across the block
  const int tid = block_thread_index();
  const int lane = tid % kWarpSize;
  const int warp = tid / kWarpSize;
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

// A group of `group` consecutive threads reduces one row: a single warp (group == kWarpSize, no
// barriers, so warps may leave the row loop independently) or the whole block (group == blockDim.x).
template <typename S, typename Op>
__device__ __forceinline__ S group_allreduce(S v, Op op, S identity, unsigned char* smem, int group) {
  if (group == kWarpSize) return warp_allreduce(v, op);
  return block_allreduce(v, op, identity, smem);
}

// Sum of v over the block, in every thread, with its own shared scratch (one buffer per type, reused
// by consecutive calls). All threads of the block must call it.
template <typename T>
__device__ __forceinline__ T block_sum(T v) {
  __shared__ alignas(16) unsigned char smem[kReduceSmemBytes];
  return block_allreduce(v, SumOp{}, T(0), smem);
}

}  // namespace cuda
}  // namespace kdkernels
