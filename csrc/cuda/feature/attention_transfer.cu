// CUDA kernels of the one-pass attention-transfer op (contract: ATTENTION_TRANSFER in
// kdkernels/ops/feature.py; math in kdkernels/attention.h, shared with the CPU kernel
// csrc/cpu/feature/attention_transfer.cpp).
//
// One kernel; each sample belongs to a thread block, or to a cluster of up to kMaxCluster blocks
// (sm_90+) when there are too few samples to fill the GPU. A block owns a tile of the sample's
// spatial positions:
//   pass 1  a_s, a_t for the tile (threads along the positions: coalesced rows; channel groups when
//           the tile is narrow), kept in shared memory (global op-math scratch for huge tiles);
//   sums    ||a_s||^2, ||a_t||^2, then sum d^2, <v_s, d>, <v_t, d>: block reductions, then the
//           cluster's partials added in rank order through distributed shared memory, so every
//           block of a sample derives the same norms and factors bit for bit;
//   pass 2  a_s, a_t overwritten in place by g_a / C, then dF written while re-reading the tile's
//           rows (C x tile elements, usually still in L2 from pass 1).
// DRAM sees each map read once (twice where a tile's rows fall out of L2) and each gradient written
// once; no (N, C, S) temporary. The per-sample losses go to an (N,) op-math buffer, weighted and
// reduced by ATen as in the CPU kernel. The backward scales the saved gradients in place.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/sum.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <tuple>

#include "../block_reduce.cuh"
#include "../row_layout.cuh"
#include "../scale_rows.cuh"
#include "kdkernels/attention.h"
#include "kdkernels/feature_args.h"
#include "kdkernels/op_args.h"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define KDK_AT_CLUSTERS 1  // thread-block clusters and distributed shared memory (Hopper and later)
#else
#define KDK_AT_CLUSTERS 0
#endif

namespace kdkernels {
namespace cuda {
namespace {
using namespace attention;

constexpr int kThreads = 512;
constexpr int kMaxCluster = 8;  // the portable cluster size
// Bytes of shared memory for a block's a_s and a_t: with the reduction scratch and the channel-group
// buffer this stays under the 48 KiB a launch gets without opting in.
constexpr int64_t kTileSmemBytes = 40 * 1024;
// A block's tile: at least a warp's width of units when a sample is split over a cluster.
constexpr int64_t kMinUnitsPerBlock = 32;

// Rows are read in units of VW consecutive positions (16-byte vectors when every row is aligned).
template <typename scalar_t, int VW>
using Unit = AlignedVec<scalar_t, VW>;

// Rows in flight per thread: loads to cover DRAM latency, fewer for a general p (std::pow's registers:
// no spills under __launch_bounds__(kThreads, 2)).
template <int KIND, int VW, typename T>
constexpr int rows_in_flight() {
  constexpr int base = VW == 1 ? 8 : 4;
  if constexpr (KIND != kPowerAny) return base;
  return sizeof(T) == 8 ? base / 4 : base / 2;
}

template <typename scalar_t, int VW>
__device__ __forceinline__ Unit<scalar_t, VW> load_unit(const scalar_t* p) {
  return *reinterpret_cast<const Unit<scalar_t, VW>*>(p);
}

template <typename scalar_t>
struct AtArgs {
  using T = at::opmath_type<scalar_t>;
  const scalar_t* student;  // (N, Cs, S)
  const scalar_t* teacher;  // (N, Ct, S)
  scalar_t* grad_student;   // null: not requested
  scalar_t* grad_teacher;   // null: not requested
  T* rows;                  // (N,): l_n, unweighted
  T* scratch;               // (N, 2, S) a_s / a_t rows; null: they live in shared memory
  const T* weight;          // 0-d on the device; null: weight_value (a CPU weight)
  T weight_value;
  T p;
  int64_t Cs, Ct, S;
  int units_per_block;  // tile width in units (VW positions each)
  int units;            // S / VW
  int lanes;            // threads along the units (power of two, kWarpSize..kThreads); the rest: channel groups
  int cluster;          // blocks per sample
  bool squared;
};

// Three sums of the second reduction, reduced with one set of shuffles and barriers.
struct Sums3 {
  double d2, vs_d, vt_d;  // sum d^2, <v_s, d>, <v_t, d>
};

struct Sums3Op {
  __device__ __forceinline__ Sums3 operator()(Sums3 a, Sums3 b) const {
    return {a.d2 + b.d2, a.vs_d + b.vs_d, a.vt_d + b.vt_d};
  }
};

// The cluster's sum of the blocks' partials v (v is the same in every thread of a block), added in
// rank order so that every block of the sample gets the same bits. slot: this block's shared slot,
// one per call site (a later call never overwrites a slot another block may still be reading).
template <typename State, typename Op>
__device__ __forceinline__ State cluster_allreduce(State v, Op op, State* slot, int cluster) {
#if KDK_AT_CLUSTERS
  if (cluster > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cl = cg::this_cluster();
    if (threadIdx.x == 0) *slot = v;
    cl.sync();  // every block's slot written (also a block barrier)
    State total = *cl.map_shared_rank(slot, 0);
    for (int r = 1; r < cluster; ++r) total = op(total, *cl.map_shared_rank(slot, r));
    return total;
  }
#endif
  return v;  // one block per sample (the host clusters only binaries built for sm_90+)
}

// No block of the cluster leaves (its shared memory must outlive the others' reads of its slots).
__device__ __forceinline__ void cluster_exit_barrier(int cluster) {
#if KDK_AT_CLUSTERS
  if (cluster > 1) cooperative_groups::this_cluster().sync();
#endif
}

// Pass 1: a[j * VW + i] = (1/C) sum_c |F[c, (u0 + j) * VW + i]|^p for the block's nu units.
// f: the sample's (C, S) map. Thread (g, x) = (tid / lanes, tid % lanes) takes unit x of each chunk of
// `lanes` units and channels g, g + groups, ...; with several groups their partial sums meet in buf
// (kThreads * VW values) and are added in group order.
template <int KIND, int VW, typename scalar_t, typename T>
__device__ __forceinline__ void pool_channels(const scalar_t* __restrict__ f, int64_t C, int64_t S, int u0, int nu,
                                              int lanes, T p, T* a, T* buf) {
  constexpr int kUnroll = rows_in_flight<KIND, VW, T>();
  const int tid = static_cast<int>(threadIdx.x);
  const int x = tid % lanes, g = tid / lanes, groups = kThreads / lanes;
  const T inv_c = T(1) / static_cast<T>(C);
  for (int j0 = 0; j0 < nu; j0 += lanes) {
    const int j = j0 + x;
    T acc[VW];
#pragma unroll
    for (int i = 0; i < VW; ++i) acc[i] = T(0);
    if (j < nu) {
      const scalar_t* col = f + static_cast<int64_t>(u0 + j) * VW;
      int64_t c = g;
      for (; c + (kUnroll - 1) * groups < C; c += kUnroll * groups) {
        Unit<scalar_t, VW> v[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) v[u] = load_unit<scalar_t, VW>(col + (c + u * groups) * S);
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
          for (int i = 0; i < VW; ++i) acc[i] += abs_pow<KIND>(static_cast<T>(v[u].v[i]), p);
        }
      }
      for (; c < C; c += groups) {
        const Unit<scalar_t, VW> v = load_unit<scalar_t, VW>(col + c * S);
#pragma unroll
        for (int i = 0; i < VW; ++i) acc[i] += abs_pow<KIND>(static_cast<T>(v.v[i]), p);
      }
    }
    if (groups == 1) {
      if (j < nu) {
#pragma unroll
        for (int i = 0; i < VW; ++i) a[j * VW + i] = acc[i] * inv_c;
      }
    } else {  // then nu <= lanes: this is the only chunk
      const int width = lanes * VW;
      if (j < nu) {
#pragma unroll
        for (int i = 0; i < VW; ++i) buf[g * width + x * VW + i] = acc[i];
      }
      __syncthreads();
      for (int o = tid; o < width; o += kThreads) {
        if (j0 + o / VW < nu) {
          T s = T(0);
          for (int q = 0; q < groups; ++q) s += buf[q * width + o];
          a[j0 * VW + o] = s * inv_c;
        }
      }
      __syncthreads();  // buf is reused by the next call
    }
  }
}

// Pass 2: out[c, k] = g[k] * |F|^p'(F[c, k]) over the block's units (g already divided by C), with
// the thread layout of pass 1 (coalesced along the rows).
template <int KIND, int VW, typename scalar_t, typename T>
__device__ __forceinline__ void write_gradient(const scalar_t* __restrict__ f, scalar_t* __restrict__ out, int64_t C,
                                               int64_t S, int u0, int nu, int lanes, T p, const T* gk) {
  constexpr int kUnroll = rows_in_flight<KIND, VW, T>();
  const int tid = static_cast<int>(threadIdx.x);
  const int x = tid % lanes, g = tid / lanes, groups = kThreads / lanes;
  for (int j = x; j < nu; j += lanes) {
    T gj[VW];
#pragma unroll
    for (int i = 0; i < VW; ++i) gj[i] = gk[j * VW + i];
    const int64_t k0 = static_cast<int64_t>(u0 + j) * VW;
    int64_t c = g;
    for (; c + (kUnroll - 1) * groups < C; c += kUnroll * groups) {
      Unit<scalar_t, VW> v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) v[u] = load_unit<scalar_t, VW>(f + (c + u * groups) * S + k0);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < VW; ++i) v[u].v[i] = static_cast<scalar_t>(gj[i] * abs_pow_grad<KIND>(static_cast<T>(v[u].v[i]), p));
        *reinterpret_cast<Unit<scalar_t, VW>*>(out + (c + u * groups) * S + k0) = v[u];
      }
    }
    for (; c < C; c += groups) {
      Unit<scalar_t, VW> v = load_unit<scalar_t, VW>(f + c * S + k0);
#pragma unroll
      for (int i = 0; i < VW; ++i) v.v[i] = static_cast<scalar_t>(gj[i] * abs_pow_grad<KIND>(static_cast<T>(v.v[i]), p));
      *reinterpret_cast<Unit<scalar_t, VW>*>(out + c * S + k0) = v;
    }
  }
}

// Block b serves sample b / cluster, units [r * units_per_block, ...) of it, r = b % cluster.
// Everything that decides a barrier (cluster, units_per_block, lanes, which gradients) is uniform.
template <int KIND, int VW, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) attention_transfer_kernel(const AtArgs<scalar_t> a) {
  using T = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char dyn_smem[];
  __shared__ __align__(16) unsigned char reduce_smem[kReduceSmemBytes];
  __shared__ Pair<double> slot_norms;
  __shared__ Sums3 slot_sums;

  const int64_t n = blockIdx.x / a.cluster;
  const int r = static_cast<int>(blockIdx.x % a.cluster);
  const int u0 = r * a.units_per_block;
  const int left = a.units - u0;  // < 0 for trailing ranks of a tiny map
  const int nu = left < 0 ? 0 : (left < a.units_per_block ? left : a.units_per_block);
  const int tile = a.units_per_block * VW;  // positions of a full tile
  const int nk = nu * VW;                   // positions of this block's tile
  const int tid = static_cast<int>(threadIdx.x);

  T* smem = reinterpret_cast<T*>(dyn_smem);
  T *a_s, *a_t, *buf;
  if (a.scratch != nullptr) {
    a_s = a.scratch + (2 * n) * a.S + static_cast<int64_t>(u0) * VW;
    a_t = a.scratch + (2 * n + 1) * a.S + static_cast<int64_t>(u0) * VW;
    buf = smem;
  } else {
    a_s = smem;
    a_t = smem + tile;
    buf = smem + 2 * tile;
  }
  const scalar_t* fs = a.student + n * a.Cs * a.S;
  const scalar_t* ft = a.teacher + n * a.Ct * a.S;
  pool_channels<KIND, VW>(fs, a.Cs, a.S, u0, nu, a.lanes, a.p, a_s, buf);
  pool_channels<KIND, VW>(ft, a.Ct, a.S, u0, nu, a.lanes, a.p, a_t, buf);
  __syncthreads();  // a_s, a_t complete (written by other threads than those reading them below)

  Pair<double> sq{0.0, 0.0};
  for (int k = tid; k < nk; k += kThreads) {
    const double xs = a_s[k], xt = a_t[k];
    sq.first += xs * xs;
    sq.second += xt * xt;
  }
  sq = block_allreduce(sq, PairSumOp{}, Pair<double>{0.0, 0.0}, reduce_smem);
  sq = cluster_allreduce(sq, PairSumOp{}, &slot_norms, a.cluster);
  const T ns = clamped_norm(static_cast<T>(sq.first)), nt = clamped_norm(static_cast<T>(sq.second));

  Sums3 sums{0.0, 0.0, 0.0};
  for (int k = tid; k < nk; k += kThreads) {
    const T vs = a_s[k] / ns, vt = a_t[k] / nt, d = vs - vt;
    sums.d2 += static_cast<double>(d) * d;
    sums.vs_d += static_cast<double>(vs) * d;
    sums.vt_d += static_cast<double>(vt) * d;
  }
  sums = block_allreduce(sums, Sums3Op{}, Sums3{0.0, 0.0, 0.0}, reduce_smem);
  sums = cluster_allreduce(sums, Sums3Op{}, &slot_sums, a.cluster);
  if (r == 0 && tid == 0) a.rows[n] = sample_loss(static_cast<T>(sums.d2), a.squared);

  if (a.grad_student != nullptr || a.grad_teacher != nullptr) {
    const T w = a.weight != nullptr ? *a.weight : a.weight_value;
    const T f = grad_v_factor(static_cast<T>(sums.d2), a.squared, w);
    const T fs_dot = f * static_cast<T>(sums.vs_d), ft_dot = -f * static_cast<T>(sums.vt_d);
    const T inv_cs = T(1) / static_cast<T>(a.Cs), inv_ct = T(1) / static_cast<T>(a.Ct);
    // g_a / C of both sides over a_s, a_t: each thread rewrites only the positions it reads
    for (int k = tid; k < nk; k += kThreads) {
      const T vs = a_s[k] / ns, vt = a_t[k] / nt, gv = f * (vs - vt);
      a_s[k] = grad_a(gv, vs, fs_dot, ns) * inv_cs;
      a_t[k] = grad_a(-gv, vt, ft_dot, nt) * inv_ct;
    }
    __syncthreads();  // pass 2 reads positions other threads wrote
    if (a.grad_student != nullptr)
      write_gradient<KIND, VW>(fs, a.grad_student + n * a.Cs * a.S, a.Cs, a.S, u0, nu, a.lanes, a.p, a_s);
    if (a.grad_teacher != nullptr)
      write_gradient<KIND, VW>(ft, a.grad_teacher + n * a.Ct * a.S, a.Ct, a.S, u0, nu, a.lanes, a.p, a_t);
  }
  cluster_exit_barrier(a.cluster);
}

// Whether every given pointer (null: an absent tensor) is 16-byte aligned: with S a multiple of the
// vector width, every row of every map then is.
bool aligned_16(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs) {
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0) return false;
  }
  return true;
}

// Per-device facts the launch needs, read once per (device, kernel) and cached: the SM count, and
// whether clusters can be launched (the device is sm_90+ and the kernel's code was compiled for it;
// a binary JIT-compiled from older PTX has no cluster code path). Benign races: every writer
// stores the same value.
constexpr int kMaxDevices = 64;

inline int sm_count(int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};
  if (device >= 0 && device < kMaxDevices && cache[device].load(std::memory_order_relaxed) > 0) {
    return cache[device].load(std::memory_order_relaxed);
  }
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  if (device >= 0 && device < kMaxDevices) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

template <typename Kernel>
bool clusters_supported(Kernel kernel, int device) {
  static std::array<std::atomic<int>, kMaxDevices> cache{};  // per kernel instantiation: 0 unknown, 1 no, 2 yes
  if (device >= 0 && device < kMaxDevices) {
    const int known = cache[device].load(std::memory_order_relaxed);
    if (known != 0) return known == 2;
  }
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  bool ok = major >= 9;
  if (ok) {
    cudaFuncAttributes attr{};
    C10_CUDA_CHECK(cudaFuncGetAttributes(&attr, kernel));
    ok = attr.ptxVersion >= 90;
  }
  if (device >= 0 && device < kMaxDevices) cache[device].store(ok ? 2 : 1, std::memory_order_relaxed);
  return ok;
}

// The launch shape for one cluster size: blocks per sample, units per block, lanes, shared memory.
template <typename T>
struct LaunchShape {
  int cluster;
  int64_t units_per_block;
  int lanes;
  int64_t tile_bytes;
  int64_t smem;  // dynamic shared memory (the scratch case: the channel-group buffer only)
};

template <int VW, typename T>
LaunchShape<T> launch_shape(int64_t units, int cluster) {
  LaunchShape<T> sh{};
  sh.cluster = cluster;
  sh.units_per_block = (units + cluster - 1) / cluster;
  sh.lanes = kWarpSize;
  while (sh.lanes < kThreads && sh.lanes < sh.units_per_block) sh.lanes *= 2;
  sh.tile_bytes = 2 * sh.units_per_block * VW * static_cast<int64_t>(sizeof(T));
  const int64_t buf_bytes = sh.lanes < kThreads ? int64_t{kThreads} * VW * static_cast<int64_t>(sizeof(T)) : 0;
  sh.smem = buf_bytes + (sh.tile_bytes <= kTileSmemBytes ? sh.tile_bytes : 0);
  return sh;
}

template <int KIND, int VW, typename scalar_t>
void launch(AtArgs<scalar_t> a, int64_t N, const at::Tensor& like, at::Tensor& scratch_holder) {
  using T = at::opmath_type<scalar_t>;
  const auto kernel = attention_transfer_kernel<KIND, VW, scalar_t>;
  const int device = like.get_device();
  const int sms = sm_count(device);
  const int64_t units = a.units;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // Split samples over a cluster while the grid is under two blocks per SM and tiles stay wide.
  int cluster = 1;
  if (N < 2 * static_cast<int64_t>(sms) && units >= 2 * kMinUnitsPerBlock && clusters_supported(kernel, device)) {
    while (cluster < kMaxCluster && N * cluster < 2 * static_cast<int64_t>(sms) &&
           (units + 2 * cluster - 1) / (2 * cluster) >= kMinUnitsPerBlock) {
      cluster *= 2;
    }
  }
  LaunchShape<T> sh = launch_shape<VW, T>(units, cluster);
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr[1];
  if (cluster > 1) {  // a cluster shape the device cannot schedule (e.g. a small partition): one block per sample
    cfg.gridDim = dim3(static_cast<unsigned>(N * cluster));
    cfg.blockDim = dim3(kThreads);
    cfg.dynamicSmemBytes = static_cast<size_t>(sh.smem);
    cfg.stream = stream;
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = static_cast<unsigned>(cluster);
    attr[0].val.clusterDim.y = 1;
    attr[0].val.clusterDim.z = 1;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    int active = 0;
    if (cudaOccupancyMaxActiveClusters(&active, kernel, &cfg) != cudaSuccess || active < 1) {
      (void)cudaGetLastError();  // clear the query's error: it is not the launch's
      sh = launch_shape<VW, T>(units, 1);
    }
  }
  a.cluster = sh.cluster;
  a.units_per_block = static_cast<int>(sh.units_per_block);
  a.lanes = sh.lanes;
  if (sh.tile_bytes <= kTileSmemBytes) {
    a.scratch = nullptr;
  } else {  // a wide tile: a_s, a_t rows in global memory (then lanes == kThreads: no buf)
    const std::array<int64_t, 3> shape{N, 2, a.S};
    scratch_holder = at::empty(shape, like.options().dtype(c10::CppTypeToScalarType<T>::value));
    a.scratch = scratch_holder.data_ptr<T>();
  }
  const dim3 grid(static_cast<unsigned>(N * sh.cluster));
  if (sh.cluster == 1) {
    kernel<<<grid, kThreads, static_cast<size_t>(sh.smem), stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  cfg.gridDim = grid;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kernel, a));
}

template <int KIND, typename scalar_t>
void forward_samples(const at::Tensor& student, const at::Tensor& teacher, double p, bool squared,
                     const at::Tensor& weight, at::Tensor& rows, at::Tensor& grad_s, at::Tensor& grad_t) {
  using T = at::opmath_type<scalar_t>;
  const int64_t N = student.size(0), S = student.size(2);
  AtArgs<scalar_t> a{};
  a.student = student.const_data_ptr<scalar_t>();
  a.teacher = teacher.const_data_ptr<scalar_t>();
  a.grad_student = grad_s.defined() ? grad_s.data_ptr<scalar_t>() : nullptr;
  a.grad_teacher = grad_t.defined() ? grad_t.data_ptr<scalar_t>() : nullptr;
  a.rows = rows.data_ptr<T>();
  if (weight.is_cpu()) {  // a host value: no device read, no sync
    a.weight = nullptr;
    a.weight_value = weight.item<T>();
  } else {
    a.weight = weight.const_data_ptr<T>();
    a.weight_value = T(0);
  }
  a.p = static_cast<T>(p);
  a.Cs = student.size(1);
  a.Ct = teacher.size(1);
  a.S = S;
  a.squared = squared;
  constexpr int W = VecTraits<scalar_t>::kWidth;
  at::Tensor scratch;
  // 16-byte units when every row of every map starts on a 16-byte boundary; not for float64 with a
  // general p (two double pows per unit spill registers, and float64 is the accuracy path anyway)
  if constexpr (!(KIND == kPowerAny && sizeof(T) == 8)) {
    if (S % W == 0 && aligned_16({a.student, a.teacher, a.grad_student, a.grad_teacher})) {
      a.units = static_cast<int>(S / W);
      launch<KIND, W, scalar_t>(a, N, student, scratch);
      return;
    }
  }
  a.units = static_cast<int>(S);
  launch<KIND, 1, scalar_t>(a, N, student, scratch);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_transfer_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& weight_in, double p, bool squared,
    bool per_row, bool student_grad, bool teacher_grad) {
  check_attention_transfer_args(student, teacher, weight_in, p, "attention_transfer_forward");
  TORCH_CHECK(student.is_cuda() && teacher.device() == student.device(),
              "attention_transfer_forward: student and teacher must be CUDA tensors on one device, got ",
              student.device(), " and ", teacher.device());
  TORCH_CHECK(weight_in.is_cpu() || weight_in.device() == student.device(),
              "attention_transfer_forward: weight must be on the CPU or on ", student.device(), ", got ",
              weight_in.device());
  const int64_t N = student.size(0), S = student.size(2);
  TORCH_CHECK(N <= std::numeric_limits<int32_t>::max() / kMaxCluster && S <= kMaxRowLength,
              "attention_transfer_forward (CUDA): at most ", std::numeric_limits<int32_t>::max() / kMaxCluster,
              " samples of at most ", kMaxRowLength, " positions, got ", student.sizes());
  c10::cuda::CUDAGuard guard(student.device());
  const at::ScalarType opmath = opmath_scalar_type(student.scalar_type());
  const std::array<int64_t, 1> rows_shape{N};
  at::Tensor rows = at::empty(rows_shape, student.options().dtype(opmath));
  at::Tensor grad_s = student_grad ? at::empty(student.sizes(), student.options()) : at::Tensor();
  at::Tensor grad_t = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : at::Tensor();
  const at::Tensor weight = weight_in.scalar_type() == opmath ? weight_in : weight_in.to(opmath);
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "attention_transfer_forward_cuda",
                                    [&] {
                                      switch (power_kind(p)) {
                                        case kPowerOne:
                                          forward_samples<kPowerOne, scalar_t>(student, teacher, p, squared, weight,
                                                                               rows, grad_s, grad_t);
                                          break;
                                        case kPowerTwo:
                                          forward_samples<kPowerTwo, scalar_t>(student, teacher, p, squared, weight,
                                                                               rows, grad_s, grad_t);
                                          break;
                                        default:
                                          forward_samples<kPowerAny, scalar_t>(student, teacher, p, squared, weight,
                                                                               rows, grad_s, grad_t);
                                      }
                                    });
  }
  // weight * l_n or weight * sum_n l_n, as the CPU kernel; at::sum is deterministic (no atomics)
  at::Tensor loss = per_row ? at::mul(rows, weight) : at::mul(at::sum(rows), weight);
  const std::array<int64_t, 1> empty_shape{0};
  return {loss, student_grad ? grad_s : at::empty(empty_shape, student.options()),
          teacher_grad ? grad_t : at::empty(empty_shape, teacher.options())};
}

void attention_transfer_backward_cuda(const at::Tensor& grad_loss_in, at::Tensor& grad_student,
                                      at::Tensor& grad_teacher) {
  check_attention_transfer_backward_args(grad_loss_in, grad_student, grad_teacher, "attention_transfer_backward");
  const at::Tensor& like = grad_student.numel() > 0 ? grad_student : grad_teacher;
  if (like.numel() == 0) return;
  for (const at::Tensor* g : {&grad_student, &grad_teacher}) {
    TORCH_CHECK(g->numel() == 0 || (g->is_cuda() && g->device() == grad_loss_in.device()),
                "attention_transfer_backward: grad_loss and the saved gradients must be on one CUDA device, got ",
                grad_loss_in.device(), " and ", g->device());
  }
  c10::cuda::CUDAGuard guard(like.device());
  // convert once for both gradients (they share the dtype)
  const at::ScalarType opmath = opmath_scalar_type(like.scalar_type());
  const at::Tensor grad_loss = grad_loss_in.scalar_type() == opmath ? grad_loss_in : grad_loss_in.to(opmath);
  scale_samples_(grad_student, grad_loss);
  scale_samples_(grad_teacher, grad_loss);
}

}  // namespace
}  // namespace cuda
}  // namespace kdkernels

TORCH_LIBRARY_IMPL(kdkernels, CUDA, m) {
  m.impl("attention_transfer_forward", &kdkernels::cuda::attention_transfer_forward_cuda);
  m.impl("attention_transfer_backward", &kdkernels::cuda::attention_transfer_backward_cuda);
}
