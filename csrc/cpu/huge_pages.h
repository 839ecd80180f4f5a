// Large CPU outputs that a kernel writes once, in full (the (rows x vocab) gradients of the
// softmax-KL ops): ask Linux for transparent huge pages before the first write. A fresh allocation
// of that size comes straight from mmap, and its first touch costs one page fault per 4 KiB page:
// measured here, a 125 MiB gradient took 43 ms to allocate and fill against 11 ms to refill, which
// is more than the whole traffic floor of the step; with 2 MiB pages it takes 15 ms. (torch does
// the same for every allocation under THP_MEM_ALLOC_ENABLE=1.) Only a hint: where THP is off, or
// off Linux, nothing changes.
#pragma once
#include <ATen/core/Tensor.h>

#include <cstdint>
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace kdkernels {
namespace cpu {

inline void prefer_huge_pages(const at::Tensor& t) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + static_cast<uintptr_t>(t.numel()) * t.element_size();
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = end & ~(kHuge - 1);
  if (t.numel() > 0 && last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

}  // namespace cpu
}  // namespace kdkernels
