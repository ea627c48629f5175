// A caching CPU allocator for training: large blocks are mmapped once and reused, never handed to
// glibc's heap.
//
// A checkpointed training step allocates and frees thousands of MB-sized tensors while a few of
// them (each layer's saved input) live until the backward pass. On glibc's heap those long-lived
// blocks pin freed space that is neither reused nor returned (resident memory grows step by step,
// far above what is live); giving every large block its own mmap fixes that but pays a page fault
// per 4 KiB on every allocation. Here a freed
// large block goes to a cache keyed by size and is reused by the next request of (almost) the same
// size, which is what the next layer asks for, so the pages are faulted in once. Cached free
// blocks are capped (`cap_bytes`); beyond that a freed block is unmapped. Small requests go to
// c10's aligned heap allocation. `restore_cpu_allocator` puts the previous allocator back and
// unmaps the cache; blocks still alive keep their deleter and are unmapped when freed. Every block carries a 64-byte header (its mapped size, 0 for a heap
// block) so that one raw deleter frees either kind: torch's `raw_allocate` (oneDNN's buffers among
// its users) needs the data pointer to be the whole context.
#include <torch/library.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <sys/mman.h>

#include <cstring>
#include <map>
#include <mutex>

namespace {

constexpr size_t kHeader = 64;          // the block's mapped size lives here; keeps 64-byte alignment
constexpr size_t kGranule = 64 << 10;   // mapped sizes are multiples of 64 KiB

struct BlockCache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // mapped size -> region
  size_t cached = 0, cap = 0, min_bytes = 0;
};
BlockCache& cache() {
  static auto* c = new BlockCache();  // never destroyed: tensors may be freed during interpreter exit
  return *c;
}

void release(void* data) {
  void* region = static_cast<char*>(data) - kHeader;
  size_t size = *static_cast<size_t*>(region);
  if (size == 0) return c10::free_cpu(region);  // a small block from the heap
  BlockCache& c = cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.cached + size <= c.cap) {
      c.free_blocks.emplace(size, region);
      c.cached += size;
      return;
    }
  }
  munmap(region, size);
}

void* map_block(size_t size) {
  void* region = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return region == MAP_FAILED ? nullptr : region;
}

struct CachingCPUAllocator final : c10::Allocator {
  c10::Allocator* previous = nullptr;  // set while installed

  c10::DataPtr allocate(size_t n) override {
    BlockCache& c = cache();
    if (n < c.min_bytes) {
      void* region = c10::alloc_cpu(n + kHeader);  // 64-byte aligned, throws when out of memory
      *static_cast<size_t*>(region) = 0;
      return as_data_ptr(region);
    }
    size_t size = (n + kHeader + kGranule - 1) / kGranule * kGranule;
    void* region = nullptr;
    {
      std::lock_guard<std::mutex> lock(c.mu);
      auto it = c.free_blocks.lower_bound(size);
      if (it != c.free_blocks.end() && it->first <= size + size / 8) {  // waste at most 1/8
        region = it->second;
        size = it->first;
        c.cached -= size;
        c.free_blocks.erase(it);
      }
    }
    if (!region) {
      region = map_block(size);
      if (!region) {  // out of memory: give every cached block back, then try once more
        std::multimap<size_t, void*> drop;
        {
          std::lock_guard<std::mutex> lock(c.mu);
          drop.swap(c.free_blocks);
          c.cached = 0;
        }
        for (auto& kv : drop) munmap(kv.second, kv.first);
        region = map_block(size);
        TORCH_CHECK(region, "CPU out of memory: could not map ", size, " bytes");
      }
      *static_cast<size_t*>(region) = size;
    }
    return as_data_ptr(region);
  }

  static c10::DataPtr as_data_ptr(void* region) {
    void* data = static_cast<char*>(region) + kHeader;
    return {data, data, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    std::memcpy(dest, src, count);
  }
};

CachingCPUAllocator* the_allocator() {
  static auto* allocator = new CachingCPUAllocator();  // never destroyed, like the cache
  return allocator;
}

// Install the cache (or only set its limits if it is installed); true when this call installed it.
bool use_caching_allocator(int64_t cap_bytes, int64_t min_bytes) {
  CachingCPUAllocator* allocator = the_allocator();
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.cap = static_cast<size_t>(cap_bytes);
  c.min_bytes = static_cast<size_t>(min_bytes);
  if (allocator->previous) return false;
  allocator->previous = c10::GetCPUAllocator();
  c10::SetCPUAllocator(allocator, /*priority=*/10);  // above the default allocator's 0
  return true;
}

// Put the allocator that was there before back and unmap every cached block.
void restore_cpu_allocator() {
  CachingCPUAllocator* allocator = the_allocator();
  BlockCache& c = cache();
  std::multimap<size_t, void*> drop;
  {
    std::lock_guard<std::mutex> lock(c.mu);
    if (!allocator->previous) return;
    c10::SetCPUAllocator(allocator->previous, /*priority=*/10);
    allocator->previous = nullptr;
    c.cap = 0;  // blocks freed from now on are unmapped
    drop.swap(c.free_blocks);
    c.cached = 0;
  }
  for (auto& kv : drop) munmap(kv.second, kv.first);
}

int64_t allocator_cached_bytes() {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  return static_cast<int64_t>(c.cached);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(qkernels_cpu, m) {
  m.def("use_caching_allocator(int cap_bytes, int min_bytes) -> bool", &use_caching_allocator);
  m.def("restore_cpu_allocator() -> ()", &restore_cpu_allocator);
  m.def("allocator_cached_bytes() -> int", &allocator_cached_bytes);
}
