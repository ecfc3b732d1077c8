// CUDA emulation: runs kernels written against csrc/common/cuda_device.cuh on the CPU. Never part
// of the extension build: the kernel headers include it only under HYCAM_CUDA_EMULATION, as the
// emulation tests (python_tests/cuda_emulation) and the cost model (benchmarks/gpu_model.py) compile
// them.
//
// Every CUDA thread of a block is a fiber (ucontext) with its own stack, run by one host thread:
// a fiber runs until it reaches a barrier, a warp collective or its end, then the next runnable
// fiber runs. Because the scheduler sees every thread's state, it rejects, naming the kernel, the
// block, the thread and the source line, what the GPU does not forgive:
//  - a warp collective (shuffle, __syncwarp, wmma load/mma/store, warp-uniform checks) whose mask
//    names a lane that has exited, or whose lanes wait at different call sites;
//  - a lane exiting while its warp waits at a collective that names it;
//  - __syncthreads() after some (not all) threads of the block have exited, or a thread exiting
//    while others wait at a __syncthreads();
//  - __syncthreads() reached from different call sites in one barrier phase;
//  - any other wait that can never complete (deadlock);
//  - dynamic shared memory used beyond the launch's size (a guard page right after it and a canary
//    in the bytes up to it), and more dynamic shared memory than an sm_90 block may opt in to.
// Dynamic shared memory is refilled with a NaN pattern (0xFF bytes) for every block, so reads of
// never-written shared memory poison the results.
//
// Memory-traffic counters (set_counting(true)): every global load and store of the kernels goes
// through hycam::cuda::ld / st (cuda_device.cuh), which here records lane, call site and width.
// At the end of each block the accesses are grouped into warp requests: the n-th execution of a
// call site by the lanes of a warp is one request (exact when the lanes of a warp execute a site
// equally often, or drop out only at the end of a loop, as in grid-stride and tail loops). Per
// launch: requests, 32-byte sectors, 128-byte lines (L1 wavefronts), bytes requested, unique bytes
// touched, and per warp the tensor-core mma and shuffle instructions. See docs/gpu-cost-model.md.
//
// Under ThreadSanitizer (-fsanitize=thread) each fiber is a TSan fiber switched without implied
// synchronisation; only the emulated barriers and collectives create happens-before edges, so a
// shared-memory race that lacks a barrier is reported by TSan even though fibers never run at once.
#pragma once

#include <signal.h>
#include <sys/mman.h>
#include <setjmp.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <source_location>
#include <string>
#include <unordered_map>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#define HYCAM_EMU_ASAN 1
#endif
// Without sanitizers, fibers switch with _setjmp/_longjmp after their first entry (swapcontext
// makes a signal-mask system call per switch); the sanitizers are told about every switch and
// keep swapcontext, which they understand.
#if !defined(__SANITIZE_ADDRESS__) && !defined(__SANITIZE_THREAD__)
#define HYCAM_EMU_JMP 1
#endif
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define HYCAM_EMU_TSAN 1
extern "C" void AnnotateIgnoreReadsBegin(const char* f, int l);
extern "C" void AnnotateIgnoreReadsEnd(const char* f, int l);
extern "C" void AnnotateIgnoreWritesBegin(const char* f, int l);
extern "C" void AnnotateIgnoreWritesEnd(const char* f, int l);
#endif

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
// One host thread runs every fiber: the scheduler sets threadIdx before it switches to a fiber.
inline dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

using std::max;
using std::min;

namespace hycam_emu {

using Loc = std::source_location;

inline std::string where(const Loc& l) {
  const char* f = l.file_name();
  const char* s = std::strrchr(f, '/');
  return std::string(s ? s + 1 : f) + ":" + std::to_string(l.line());
}
inline bool same_site(const Loc& a, const Loc& b) {
  return a.line() == b.line() && a.column() == b.column() && std::strcmp(a.file_name(), b.file_name()) == 0;
}

// sm_90's largest opt-in dynamic shared memory per block (CUDA C++ Programming Guide, "Features and
// Technical Specifications", compute capability 9.0: 227 KB).
constexpr size_t kMaxDynamicSmem = 227 * 1024;
constexpr size_t kStackBytes = 256 * 1024;  // per fiber; sanitizer frames are large

enum class St : uint8_t { kRun, kWarp, kBlock, kDone };

struct Collective {
  bool active = false;
  unsigned mask = 0, arrived = 0;
  Loc loc;
  const char* what = "";
};

// Memory-traffic counters of one launch (loads and stores separately).
struct Traffic {
  uint64_t requests = 0, sectors = 0, lines = 0, bytes = 0, request_unique_bytes = 0, unique_bytes = 0,
           unique_sectors = 0;
};
// `"name": {...}` of one Traffic as JSON, for the drivers that report counters to Python.
inline void print_traffic_json(const char* name, const Traffic& t) {
  std::printf("\"%s\": {\"requests\": %llu, \"sectors\": %llu, \"lines\": %llu, \"bytes\": %llu, "
              "\"request_unique_bytes\": %llu, \"unique_bytes\": %llu, \"unique_sectors\": %llu}",
              name, (unsigned long long)t.requests, (unsigned long long)t.sectors, (unsigned long long)t.lines,
              (unsigned long long)t.bytes, (unsigned long long)t.request_unique_bytes,
              (unsigned long long)t.unique_bytes, (unsigned long long)t.unique_sectors);
}
// Shared-memory bank counters of one launch (see smem_wavefronts): warp instructions, the
// wavefronts their addresses cost, and the wavefronts they would cost without bank conflicts.
struct SmemTraffic {
  uint64_t requests = 0, wavefronts = 0, ideal = 0;
};
inline void print_smem_json(const char* name, const SmemTraffic& t) {
  std::printf("\"%s\": {\"requests\": %llu, \"wavefronts\": %llu, \"ideal\": %llu}", name,
              (unsigned long long)t.requests, (unsigned long long)t.wavefronts, (unsigned long long)t.ideal);
}
struct Counters {
  std::string kernel;
  uint64_t blocks = 0, threads_per_block = 0, smem_bytes = 0, mma = 0, shfl = 0;  // mma, shfl: per warp
  Traffic load, store;
  // global requests by access width (bytes 1..16 -> index), loads and stores: what the machine
  // code must contain (benchmarks/gpu_model.py checks it against the SASS)
  uint64_t load_width[17] = {}, store_width[17] = {};
  SmemTraffic smem;  // shared accesses through the counted helpers (lds_lane, sts_lane, cuda::sld/sst, ...)
  SmemTraffic frag;  // tensor-core fragment loads and stores (wmma)
};

struct Access {
  uint64_t addr;
  uint32_t site, tid, occ;
  uint16_t bytes;
  uint8_t store;  // bit 0: store; bit 1: shared memory
};

// Wavefronts of one shared-memory phase (sm_80 / sm_90 bank model: 32 banks of 4 bytes, one
// wavefront serves at most one 4-byte word per bank, lanes reading the same word share it): the
// largest number of distinct words any bank is asked for, at least 1. Addresses: (byte address,
// bytes) per lane.
inline uint64_t bank_wavefronts(const std::pair<uint64_t, unsigned>* a, size_t n) {
  uint64_t words[32][64];
  unsigned cnt[32] = {};
  uint64_t worst = n ? 1 : 0;
  for (size_t i = 0; i < n; ++i)
    for (uint64_t w = a[i].first >> 2; w <= (a[i].first + a[i].second - 1) >> 2; ++w) {
      const unsigned b = unsigned(w & 31);
      unsigned k = 0;
      while (k < cnt[b] && words[b][k] != w) ++k;
      if (k == cnt[b] && cnt[b] < 64) {
        words[b][cnt[b]++] = w;
        worst = std::max<uint64_t>(worst, cnt[b]);
      }
    }
  return worst;
}
// A warp's shared-memory access (the lanes' addresses and widths): the wavefronts are the largest
// number of distinct 4-byte words any bank is asked for (lanes asking for the same word share
// it: broadcasts cost nothing extra), at least the distinct bytes / 128 (a wavefront moves 128
// bytes); ideal is the latter, the cost without bank conflicts (Nsight Compute's "ideal
// wavefronts"). Fragment loads (record_fragment) are counted per 8 x 8 matrix instead.
inline void add_smem_request(SmemTraffic& t, const std::vector<std::pair<uint32_t, std::pair<uint64_t, unsigned>>>& lanes) {
  std::vector<std::pair<uint64_t, unsigned>> a;
  std::vector<uint64_t> words;
  for (const auto& l : lanes) {
    a.push_back(l.second);
    for (uint64_t w = l.second.first >> 2; w <= (l.second.first + l.second.second - 1) >> 2; ++w) words.push_back(w);
  }
  std::sort(words.begin(), words.end());
  const uint64_t distinct = uint64_t(std::unique(words.begin(), words.end()) - words.begin());
  const uint64_t ideal = std::max<uint64_t>(1, (distinct * 4 + 127) / 128);
  t.requests += 1;
  t.wavefronts += std::max(ideal, bank_wavefronts(a.data(), a.size()));
  t.ideal += ideal;
}

struct Emu {
  const char* kernel = "kernel";
  Loc launch_loc;
  unsigned nt = 0;
  std::vector<St> st;
  std::vector<Loc> wait_loc;
  std::vector<ucontext_t> ctx;
  ucontext_t sched;
#if HYCAM_EMU_JMP
  struct Jmp {
    jmp_buf b;
  };
  std::vector<Jmp> jb;
  std::vector<char> started;
  jmp_buf sched_jb;
#endif
  char* stacks = nullptr;
  size_t stacks_len = 0;
  unsigned cur = 0;
  void* body = nullptr;
  void (*call)(void*) = nullptr;
  Collective bar;
  std::vector<Collective> warp;
  std::vector<double> lane_in, lane_out;
  std::vector<uintptr_t> lane_u;
  std::vector<void*> lane_p[3];  // per-thread pointers for warp collectives on fragments
  // dynamic shared memory: [smem, smem + smem_bytes) then canary bytes up to the guard page
  unsigned char* map = nullptr;
  size_t map_len = 0, smem_bytes = 0;
  unsigned char* smem = nullptr;
  unsigned char* guard = nullptr;
  struct sigaction old_segv {}, old_bus {};
  // counters
  bool counting = false;
  std::vector<Loc> sites;
  std::unordered_map<std::string, uint32_t> site_ids;
  std::unordered_map<uint64_t, uint32_t> site_fast;
  std::vector<uint32_t> occ;  // [thread][site]: executions of the site by the thread in this block
  uint32_t occ_sites = 0;
  std::vector<Access> acc;
  std::unordered_map<uint64_t, uint32_t> load_mask, store_mask;  // sector -> touched byte mask
  Counters counters;
  std::vector<Counters> history;
#if HYCAM_EMU_ASAN
  std::vector<void*> fake;
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
#endif
#if HYCAM_EMU_TSAN
  void* tsan_main = nullptr;
  std::vector<void*> tsan_fiber;
  char launch_sync = 0, done_sync = 0;
#endif
};
inline Emu g;

// Emulator bookkeeping is invisible to TSan: only the kernels' own accesses are checked.
struct Quiet {
#if HYCAM_EMU_TSAN
  Quiet() {
    AnnotateIgnoreReadsBegin(__FILE__, __LINE__);
    AnnotateIgnoreWritesBegin(__FILE__, __LINE__);
  }
  ~Quiet() {
    AnnotateIgnoreWritesEnd(__FILE__, __LINE__);
    AnnotateIgnoreReadsEnd(__FILE__, __LINE__);
  }
#endif
};

[[noreturn]] inline void fail(const std::string& what) {
  std::fprintf(stderr,
               "emulated CUDA error in kernel %s (launched at %s), block (%u,%u,%u), thread %u: %s\n",
               g.kernel, where(g.launch_loc).c_str(), blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
               what.c_str());
  std::fflush(stderr);
  std::abort();
}

inline unsigned char* block_smem() { return g.smem; }

inline void set_counting(bool on) { g.counting = on; }
inline const Counters& last_counters() { return g.counters; }
// Counters of every launch since the last call, oldest first.
inline std::vector<Counters> take_history() {
  std::vector<Counters> h;
  h.swap(g.history);
  return h;
}

// ---- fiber switching ---------------------------------------------------------------------------

inline char* stack_of(unsigned t) { return g.stacks + size_t(t) * kStackBytes; }

inline void on_fiber_entry(unsigned t) {
  (void)t;
#if HYCAM_EMU_ASAN
  __sanitizer_finish_switch_fiber(g.fake[t], &g.sched_bottom, &g.sched_size);
#endif
}

// From the running fiber back to the scheduler (the fiber resumes when its state is kRun again).
inline void yield() {
  const unsigned t = g.cur;
#if HYCAM_EMU_ASAN
  __sanitizer_start_switch_fiber(&g.fake[t], g.sched_bottom, g.sched_size);
#endif
#if HYCAM_EMU_TSAN
  __tsan_switch_to_fiber(g.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if HYCAM_EMU_JMP
  if (_setjmp(g.jb[t].b) == 0) _longjmp(g.sched_jb, 1);
#else
  swapcontext(&g.ctx[t], &g.sched);
#endif
  on_fiber_entry(t);
}

inline void exit_thread();

inline void trampoline() {
  const unsigned t = g.cur;
  on_fiber_entry(t);
#if HYCAM_EMU_TSAN
  __tsan_acquire(&g.launch_sync);
#endif
  g.call(g.body);
  exit_thread();
}

// ---- barriers and warp collectives ----------------------------------------------------------------

inline void release_waiters(St kind, unsigned first, unsigned count) {
  for (unsigned t = first; t < first + count; ++t)
    if (g.st[t] == kind) g.st[t] = St::kRun;
}

// The calling lane arrives at a warp collective `what` at `loc`; returns once every lane of `mask`
// has arrived at the same call site. `done` runs once, by the last lane to arrive, before any
// lane returns (it computes the collective's results from g.lane_in / g.lane_u).
template <class Done>
void warp_collective(unsigned mask, const Loc& loc, const char* what, Done done) {
  const unsigned t = threadIdx.x, w = t >> 5, lane = t & 31;
  {
    Quiet q;
    Collective& c = g.warp[w];
    if (!((mask >> lane) & 1u))
      fail(std::string(what) + " at " + where(loc) + ": the calling lane " + std::to_string(lane) +
           " is not in its mask");
    for (unsigned l = 0; l < 32; ++l)
      if (((mask >> l) & 1u) && g.st[w * 32 + l] == St::kDone)
        fail(std::string(what) + " at " + where(loc) + ": its mask names lane " + std::to_string(l) +
             " of warp " + std::to_string(w) + ", which has already exited");
    if (c.active) {
      if (!same_site(c.loc, loc) || c.mask != mask || std::strcmp(c.what, what) != 0)
        fail(std::string("lanes of warp ") + std::to_string(w) + " meet at different warp collectives: " + c.what +
             " at " + where(c.loc) + " and " + what + " at " + where(loc));
    } else {
      c.active = true;
      c.mask = mask;
      c.arrived = 0;
      c.loc = loc;
      c.what = what;
    }
    c.arrived |= 1u << lane;
    if (c.arrived == mask) {
      done();
      c.active = false;
      release_waiters(St::kWarp, w * 32, 32);
#if HYCAM_EMU_TSAN
      __tsan_release(&c);
      __tsan_acquire(&c);
#endif
      return;
    }
    g.st[t] = St::kWarp;
    g.wait_loc[t] = loc;
#if HYCAM_EMU_TSAN
    __tsan_release(&c);
#endif
  }
  yield();
#if HYCAM_EMU_TSAN
  __tsan_acquire(&g.warp[w]);
#endif
}

inline void block_barrier(const Loc& loc) {
  const unsigned t = threadIdx.x;
  {
    Quiet q;
    for (unsigned u = 0; u < g.nt; ++u)
      if (g.st[u] == St::kDone)
        fail("__syncthreads() at " + where(loc) + " after thread " + std::to_string(u) +
             " of the block has exited (a barrier after a partial return)");
    if (g.bar.active) {
      if (!same_site(g.bar.loc, loc))
        fail("__syncthreads() reached from different call sites in one phase: " + where(g.bar.loc) + " and " +
             where(loc));
    } else {
      g.bar.active = true;
      g.bar.arrived = 0;
      g.bar.loc = loc;
    }
    if (++g.bar.arrived == g.nt) {
      g.bar.active = false;
      release_waiters(St::kBlock, 0, g.nt);
#if HYCAM_EMU_TSAN
      __tsan_release(&g.bar);
      __tsan_acquire(&g.bar);
#endif
      return;
    }
    g.st[t] = St::kBlock;
    g.wait_loc[t] = loc;
#if HYCAM_EMU_TSAN
    __tsan_release(&g.bar);
#endif
  }
  yield();
#if HYCAM_EMU_TSAN
  __tsan_acquire(&g.bar);
#endif
}

inline void exit_thread() {
  const unsigned t = g.cur, w = t >> 5, lane = t & 31;
  {
    Quiet q;
    g.st[t] = St::kDone;
    if (g.bar.active)
      fail("thread exits while other threads of its block wait at __syncthreads() at " + where(g.bar.loc));
    const Collective& c = g.warp[w];
    if (c.active && ((c.mask >> lane) & 1u))
      fail("lane " + std::to_string(lane) + " exits while its warp waits for it at " + c.what + " at " +
           where(c.loc));
  }
#if HYCAM_EMU_TSAN
  __tsan_release(&g.done_sync);
#endif
#if HYCAM_EMU_ASAN
  __sanitizer_start_switch_fiber(nullptr, g.sched_bottom, g.sched_size);
#endif
#if HYCAM_EMU_TSAN
  __tsan_switch_to_fiber(g.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if HYCAM_EMU_JMP
  _longjmp(g.sched_jb, 1);
#else
  setcontext(&g.sched);
#endif
}

// ---- memory-traffic counters ------------------------------------------------------------------

inline uint32_t site_id(const Loc& loc) {
  const uint64_t key = (uint64_t(reinterpret_cast<uintptr_t>(loc.file_name())) << 24) ^ (uint64_t(loc.line()) << 10) ^
                       uint64_t(loc.column());
  auto it = g.site_fast.find(key);
  if (it != g.site_fast.end() && same_site(g.sites[it->second], loc)) return it->second;
  std::string name = std::string(loc.file_name()) + ":" + std::to_string(loc.line()) + ":" +
                     std::to_string(loc.column());
  auto jt = g.site_ids.find(name);
  uint32_t id;
  if (jt != g.site_ids.end()) {
    id = jt->second;
  } else {
    id = uint32_t(g.sites.size());
    g.sites.push_back(loc);
    g.site_ids.emplace(std::move(name), id);
  }
  g.site_fast[key] = id;
  return id;
}

// One global access of `bytes` bytes at p by the current thread (called by hycam::cuda::ld/st);
// shared: a shared-memory access (hycam::cuda::check_smem_aligned and the sld / sst helpers).
inline void record(const void* p, unsigned bytes, bool store, const Loc& loc, bool shared = false) {
  if (!g.counting) return;
  Quiet q;
  const uint32_t s = site_id(loc), t = g.cur;
  if (s >= g.occ_sites) {  // a new call site: widen the per-thread occurrence table
    const uint32_t n = s + 16;
    std::vector<uint32_t> o(size_t(g.nt) * n, 0);
    for (uint32_t u = 0; u < g.nt; ++u)
      for (uint32_t k = 0; k < g.occ_sites; ++k) o[size_t(u) * n + k] = g.occ[size_t(u) * g.occ_sites + k];
    g.occ.swap(o);
    g.occ_sites = n;
  }
  const uint32_t o = g.occ[size_t(t) * g.occ_sites + s]++;
  g.acc.push_back(Access{reinterpret_cast<uint64_t>(p), s, t, o, uint16_t(bytes),
                         uint8_t((store ? 1 : 0) | (shared ? 2 : 0))});
}
// A wmma fragment load (16-bit elements, 16 rows of 32 bytes at p + q * row_bytes: LDSM, four
// phases of 8 rows x 16 bytes) or a row-major float accumulator store (four 64-bit stores per
// lane of 8 rows x 8 floats, each in two phases of 4 rows x 32 bytes), counted once per warp.
inline void record_fragment(const void* p, uint64_t row_bytes, bool float_store) {
  if (!g.counting || (g.cur & 31) != 0) return;
  Quiet q;
  const uint64_t base = reinterpret_cast<uint64_t>(p);
  std::pair<uint64_t, unsigned> buf[8];
  SmemTraffic& t = g.counters.frag;
  if (!float_store) {
    t.requests += 1;
    for (int half = 0; half < 2; ++half)
      for (int rows = 0; rows < 2; ++rows) {
        for (int i = 0; i < 8; ++i) buf[i] = {base + uint64_t(rows * 8 + i) * row_bytes + half * 16, 16u};
        t.wavefronts += bank_wavefronts(buf, 8);
        t.ideal += 1;
      }
  } else {
    for (int rh = 0; rh < 2; ++rh)
      for (int ch = 0; ch < 2; ++ch) {
        t.requests += 1;
        for (int ph = 0; ph < 2; ++ph) {
          for (int i = 0; i < 4; ++i) buf[i] = {base + uint64_t(rh * 8 + ph * 4 + i) * row_bytes + ch * 32, 32u};
          t.wavefronts += bank_wavefronts(buf, 4);
          t.ideal += 1;
        }
      }
  }
}

// Groups the block's accesses into warp requests and adds them to the launch's counters.
inline void flush_block_accesses() {
  const auto& A = g.acc;
  // sort by (warp, site, occurrence); the index keeps the lanes of a request in thread order
  std::vector<std::pair<uint64_t, uint32_t>> order(A.size());
  for (size_t i = 0; i < A.size(); ++i) {
    const Access& x = A[i];
    order[i] = {(uint64_t(x.tid >> 5) << 48) | (uint64_t(x.site) << 32) | x.occ, uint32_t(i)};
  }
  std::sort(order.begin(), order.end());
  uint64_t sec[64 * 2];
  uint32_t msk[64 * 2];
  std::vector<uint64_t> lines;
  for (size_t i = 0; i < order.size();) {
    size_t j = i;
    int nsec = 0;
    lines.clear();
    const Access& first = A[order[i].second];
    if (first.store & 2) {  // shared memory: bank conflicts from the lanes' addresses
      std::vector<std::pair<uint32_t, std::pair<uint64_t, unsigned>>> lanes;
      for (; j < order.size() && order[j].first == order[i].first; ++j) {
        const Access& x = A[order[j].second];
        lanes.push_back({x.tid, {x.addr, x.bytes}});
      }
      add_smem_request(g.counters.smem, lanes);
      i = j;
      continue;
    }
    Traffic& tr = (first.store & 1) ? g.counters.store : g.counters.load;
    auto& global_mask = (first.store & 1) ? g.store_mask : g.load_mask;
    uint64_t* widths = (first.store & 1) ? g.counters.store_width : g.counters.load_width;
    widths[std::min<unsigned>(first.bytes, 16u)] += 1;
    for (; j < order.size() && order[j].first == order[i].first; ++j) {
      const Access& x = A[order[j].second];
      for (uint64_t a = x.addr; a < x.addr + x.bytes;) {  // bytes of this lane, sector by sector
        const uint64_t s = a >> 5, end = std::min<uint64_t>(x.addr + x.bytes, (s + 1) << 5);
        uint32_t bits = 0;
        for (uint64_t b = a; b < end; ++b) bits |= 1u << (b & 31);
        int k = 0;
        while (k < nsec && sec[k] != s) ++k;
        if (k == nsec) {
          if (nsec == 128) fail("internal: more than 128 sectors in one warp request");
          sec[nsec] = s;
          msk[nsec++] = 0;
        }
        msk[k] |= bits;
        a = end;
      }
      for (uint64_t l = x.addr >> 7; l <= (x.addr + x.bytes - 1) >> 7; ++l) lines.push_back(l);
      tr.bytes += x.bytes;
    }
    std::sort(lines.begin(), lines.end());
    tr.lines += uint64_t(std::unique(lines.begin(), lines.end()) - lines.begin());
    tr.requests += 1;
    tr.sectors += uint64_t(nsec);
    for (int k = 0; k < nsec; ++k) {
      tr.request_unique_bytes += uint64_t(__builtin_popcount(msk[k]));
      global_mask[sec[k]] |= msk[k];
    }
    i = j;
  }
  g.acc.clear();
  std::fill(g.occ.begin(), g.occ.end(), 0u);
}

// ---- launch --------------------------------------------------------------------------------------

inline void on_segv(int sig, siginfo_t* info, void*) {
  const auto* a = static_cast<unsigned char*>(info->si_addr);
  if (g.guard && a >= g.guard && a < g.guard + sysconf(_SC_PAGESIZE)) {
    char msg[512];
    const int n = std::snprintf(msg, sizeof msg,
                                "emulated CUDA error in kernel %s, block (%u,%u,%u), thread %u: dynamic shared "
                                "memory accessed at byte %ld of a launch with %zu bytes\n",
                                g.kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x,
                                long(a - g.smem), g.smem_bytes);
    if (n > 0) (void)!write(2, msg, size_t(n));
    std::abort();
  }
  signal(sig, SIG_DFL);  // any other fault: the default action when the access repeats
}

inline void map_smem(size_t bytes) {
  const size_t page = size_t(sysconf(_SC_PAGESIZE));
  const size_t body = (bytes + 15) / 16 * 16;  // the buffer starts 16-byte aligned
  const size_t len = (body + page - 1) / page * page + page;
  void* m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (m == MAP_FAILED) fail("cannot map emulated shared memory");
  g.map = static_cast<unsigned char*>(m);
  g.map_len = len;
  g.guard = g.map + len - page;
  mprotect(g.guard, page, PROT_NONE);
  g.smem = g.guard - body;
  g.smem_bytes = bytes;
  struct sigaction sa {};
  sa.sa_sigaction = on_segv;
  sa.sa_flags = SA_SIGINFO;
  sigaction(SIGSEGV, &sa, &g.old_segv);  // restored after the launch (ASan's handler, say)
  sigaction(SIGBUS, &sa, &g.old_bus);
}

inline void check_smem_canary() {
  for (unsigned char* p = g.smem + g.smem_bytes; p < g.guard; ++p)
    if (*p != 0xFF)
      fail("wrote dynamic shared memory at byte " + std::to_string(p - g.smem) + " of a launch with " +
           std::to_string(g.smem_bytes) + " bytes");
}

// Runs f() as the kernel body of every thread of every block of the grid, one block at a time
// (x fastest, then y, then z), each block with fresh barrier state and NaN-filled dynamic shared
// memory. `name` names the kernel in error messages and counters.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F f, const char* name = "kernel",
            const Loc& loc = Loc::current()) {
  g.kernel = name;
  g.launch_loc = loc;
  blockIdx = threadIdx = dim3(0, 0, 0);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("invalid configuration argument: a zero grid dimension");
  if (grid.y > 65535 || grid.z > 65535) fail("invalid configuration argument: grid.y or grid.z > 65535");
  if (block.y != 1 || block.z != 1) fail("the emulation runs 1-D blocks only");
  if (block.x == 0 || block.x > 1024 || block.x % 32) fail("block size must be a multiple of 32 and <= 1024");
  if (smem_bytes > kMaxDynamicSmem)
    fail("invalid argument: " + std::to_string(smem_bytes) + " bytes of dynamic shared memory, more than an sm_90 "
         "block may opt in to (" + std::to_string(kMaxDynamicSmem) + ")");
  gridDim = grid;
  blockDim = block;
  const unsigned nt = block.x;
  g.nt = nt;
  g.st.assign(nt, St::kRun);
  g.wait_loc.assign(nt, Loc());
  g.ctx.assign(nt, ucontext_t{});
#if HYCAM_EMU_JMP
  g.jb.resize(nt);
  g.started.assign(nt, 0);
#endif
  g.warp.assign(nt / 32, Collective{});
  g.lane_in.assign(nt, 0.0);
  g.lane_out.assign(nt, 0.0);
  g.lane_u.assign(nt, 0);
  for (auto& v : g.lane_p) v.assign(nt, nullptr);
  g.body = &f;
  g.call = [](void* p) { (*static_cast<F*>(p))(); };
  const size_t need = size_t(nt) * kStackBytes;
  if (g.stacks_len < need) {
    if (g.stacks) munmap(g.stacks, g.stacks_len);
    void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) fail("cannot map fiber stacks");
    g.stacks = static_cast<char*>(m);
    g.stacks_len = need;
  }
  map_smem(smem_bytes);
  g.counters = Counters{};
  g.counters.kernel = name;
  g.counters.threads_per_block = nt;
  g.counters.smem_bytes = smem_bytes;
  g.load_mask.clear();
  g.store_mask.clear();
  g.acc.clear();
  g.occ.assign(size_t(nt) * g.occ_sites, 0u);
#if HYCAM_EMU_ASAN
  g.fake.assign(nt, nullptr);
#endif
#if HYCAM_EMU_TSAN
  if (!g.tsan_main) g.tsan_main = __tsan_get_current_fiber();
  if (g.tsan_fiber.size() < nt) {
    while (g.tsan_fiber.size() < nt) g.tsan_fiber.push_back(__tsan_create_fiber(0));
  }
#endif
  const uint64_t nblocks = uint64_t(grid.x) * grid.y * grid.z;
  for (uint64_t b = 0; b < nblocks; ++b) {
    const uint64_t plane = uint64_t(grid.x) * grid.y;
    {
      Quiet q;
      blockIdx = dim3(unsigned(b % grid.x), unsigned((b / grid.x) % grid.y), unsigned(b / plane));
    }
    std::memset(g.smem, 0xFF, size_t(g.guard - g.smem));  // NaN pattern, canary up to the guard
    g.bar = Collective{};
    for (auto& c : g.warp) c = Collective{};
    for (unsigned t = 0; t < nt; ++t) {
      g.st[t] = St::kRun;
#if HYCAM_EMU_JMP
      g.started[t] = 0;
      if (b == 0) getcontext(&g.ctx[t]);  // once per launch: makecontext reuses it
#else
      getcontext(&g.ctx[t]);
#endif
      g.ctx[t].uc_stack.ss_sp = stack_of(t);
      g.ctx[t].uc_stack.ss_size = kStackBytes;
      g.ctx[t].uc_link = nullptr;
      makecontext(&g.ctx[t], trampoline, 0);
    }
#if HYCAM_EMU_TSAN
    __tsan_release(&g.launch_sync);
#endif
    unsigned done = 0;
    while (done < nt) {
      bool ran = false;
      for (unsigned t = 0; t < nt; ++t) {
        if (g.st[t] != St::kRun) continue;
        ran = true;
        {
          Quiet q;  // fibers read these without synchronisation from the scheduler
          g.cur = t;
          threadIdx = dim3(t, 0, 0);
        }
#if HYCAM_EMU_ASAN
        void* fake = nullptr;
        __sanitizer_start_switch_fiber(&fake, stack_of(t), kStackBytes);
#endif
#if HYCAM_EMU_TSAN
        __tsan_switch_to_fiber(g.tsan_fiber[t], __tsan_switch_to_fiber_no_sync);
#endif
#if HYCAM_EMU_JMP
        if (_setjmp(g.sched_jb) == 0) {  // the fiber comes back with _longjmp(sched_jb)
          if (!g.started[t]) {
            g.started[t] = 1;
            swapcontext(&g.sched, &g.ctx[t]);
          } else {
            _longjmp(g.jb[t].b, 1);
          }
        }
#else
        swapcontext(&g.sched, &g.ctx[t]);
#endif
#if HYCAM_EMU_ASAN
        __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
      }
      done = 0;
      for (unsigned t = 0; t < nt; ++t) done += g.st[t] == St::kDone;
      if (!ran && done < nt) {
        std::string msg = "deadlock: no thread can proceed;";
        int shown = 0;
        for (unsigned t = 0; t < nt && shown < 6; ++t) {
          if (g.st[t] == St::kDone) continue;
          const bool w = g.st[t] == St::kWarp;
          msg += " thread " + std::to_string(t) + " waits at " +
                 (w ? std::string(g.warp[t >> 5].what) : std::string("__syncthreads()")) + " (" +
                 where(g.wait_loc[t]) + ");";
          ++shown;
        }
        threadIdx = dim3(0, 0, 0);
        fail(msg);
      }
    }
#if HYCAM_EMU_TSAN
    __tsan_acquire(&g.done_sync);
#endif
    check_smem_canary();
    if (g.counting) flush_block_accesses();
  }
  g.counters.blocks = nblocks;
  for (auto* m : {&g.load_mask, &g.store_mask}) {
    Traffic& tr = m == &g.load_mask ? g.counters.load : g.counters.store;
    tr.unique_sectors = m->size();
    for (const auto& kv : *m) tr.unique_bytes += uint64_t(__builtin_popcount(kv.second));
  }
  if (g.counting) g.history.push_back(g.counters);
  munmap(g.map, g.map_len);
  g.map = g.smem = g.guard = nullptr;
  sigaction(SIGSEGV, &g.old_segv, nullptr);
  sigaction(SIGBUS, &g.old_bus, nullptr);
}

// A warp barrier of the calling warp (warp-collective operations: wmma, __syncwarp).
inline void warp_sync(const char* what = "__syncwarp", unsigned mask = 0xffffffffu, const Loc& loc = Loc::current()) {
  warp_collective(mask, loc, what, [] {});
}

// Aborts unless all 32 lanes of the warp pass the same value (warp-collective arguments).
inline void warp_uniform(uintptr_t v, const char* what, const Loc& loc = Loc::current()) {
  g.lane_u[threadIdx.x] = v;
  const unsigned w = threadIdx.x >> 5;
  warp_collective(0xffffffffu, loc, what, [w, what, &loc] {
    for (unsigned l = 1; l < 32; ++l)
      if (g.lane_u[w * 32 + l] != g.lane_u[w * 32])
        fail(std::string(what) + " at " + where(loc) + ": lanes 0 and " + std::to_string(l) +
             " pass different values");
  });
}

}  // namespace hycam_emu

inline void __syncthreads(const std::source_location& loc = std::source_location::current()) {
  hycam_emu::block_barrier(loc);
}

inline void __syncwarp(unsigned mask = 0xffffffffu, const std::source_location& loc = std::source_location::current()) {
  hycam_emu::warp_collective(mask, loc, "__syncwarp", [] {});
}

namespace hycam_emu {
// A shuffle: lane l receives v of lane source(l), or its own v when that is past the warp or
// outside the mask, as on the GPU.
template <typename T, typename Source>
T shuffle(unsigned mask, T v, const char* what, const std::source_location& loc, Source source) {
  const unsigned t = threadIdx.x, w = t >> 5;
  g.lane_in[t] = static_cast<double>(v);
  warp_collective(mask, loc, what, [w, mask, source] {
    ++g.counters.shfl;
    for (unsigned l = 0; l < 32; ++l) {
      const unsigned src = source(l);
      const bool ok = src < 32 && ((mask >> src) & 1u);
      g.lane_out[w * 32 + l] = g.lane_in[w * 32 + (ok ? src : l)];
    }
  });
  return static_cast<T>(g.lane_out[t]);
}
}  // namespace hycam_emu

template <typename T>
T __shfl_down_sync(unsigned mask, T v, int off, const std::source_location& loc = std::source_location::current()) {
  return hycam_emu::shuffle(mask, v, "__shfl_down_sync", loc, [off](unsigned l) { return l + unsigned(off); });
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, const std::source_location& loc = std::source_location::current()) {
  return hycam_emu::shuffle(mask, v, "__shfl_xor_sync", loc,
                            [lane_mask](unsigned l) { return (l ^ unsigned(lane_mask)) & 31u; });
}

// cuda_fp16.h / cuda_bf16.h storage types and the explicit conversions the kernels use (torch
// builds CUDA with implicit half/bfloat16 conversions disabled, so the kernels never rely on them).
struct __half {
  _Float16 v;
  __half() = default;
  explicit __half(float f) : v(static_cast<_Float16>(f)) {}
  explicit operator float() const { return static_cast<float>(v); }
};
struct __nv_bfloat16 {
  uint16_t bits;
  __nv_bfloat16() = default;
  explicit __nv_bfloat16(float f) {  // round to nearest even, NaN stays NaN
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = static_cast<uint16_t>((u >> 16) | 0x40u);
    } else {
      bits = static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  explicit operator float() const {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
