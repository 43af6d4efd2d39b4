// The team of threads a call runs on: the calling thread and helpers from XLA's intra-op
// pool (or the native code's own threads), meeting at a spin barrier once per step.
//
// CPU affinity (sched_getaffinity, pthread_setaffinity_np, sched_getcpu) is Linux's: elsewhere
// the team runs unpinned, on as many threads as the C++ runtime reports.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#include <unistd.h>
#define JAXLSTM_AFFINITY 1
#else
#define JAXLSTM_AFFINITY 0
#endif

#include "xla/ffi/api/ffi.h"

namespace jaxlstm {

namespace ffi = xla::ffi;

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

// Spins until done(); after a few microseconds yields the core, so that a waiting
// thread does not hold up the one it waits for: when XLA's pool threads spin beside a
// team on 2 cores (3 runnable threads), a barrier that waits for a descheduled
// member must give up its CPU, or a 1.3 ms call takes 9-14 ms (measured; yielding
// after 50 spins brought that to ~2-3 ms and left the base shape as it was).
constexpr int kSpinsBeforeYield = 50;

template <typename F>
void spin_until(F&& done) {
  for (int i = 0; !done(); ++i) {
    if (i < kSpinsBeforeYield) {
      cpu_relax();
    } else {
      std::this_thread::yield();
    }
  }
}

class SpinBarrier {
 public:
  explicit SpinBarrier(int n) : n_(n) {}
  void wait() {
    if (n_ == 1) return;
    const int gen = gen_.load(std::memory_order_acquire);
    if (count_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {
      count_.store(0, std::memory_order_relaxed);
      gen_.fetch_add(1, std::memory_order_release);
    } else {
      spin_until([&] { return gen_.load(std::memory_order_acquire) != gen; });
    }
  }

 private:
  const int n_;
  alignas(64) std::atomic<int> count_{0};
  alignas(64) std::atomic<int> gen_{0};
};

// The CPUs this process may run on.
inline int cpu_count() {
#if JAXLSTM_AFFINITY
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) return std::max(1, CPU_COUNT(&set));
#endif
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

// JAXLSTM_NATIVE_THREADS (or its earlier name JAXLSTM_KERNEL_THREADS, where the new one is
// unset), or 0 where neither is set, at most one per CPU this process may run on: more threads
// than CPUs only wait on each other at the barriers, and a large value once started a thousand
// threads per call (jaxlstm/_native.py rejects a value that is no positive integer before any call).
inline int requested_threads() {
  const char* env = std::getenv("JAXLSTM_NATIVE_THREADS");
  if (env == nullptr) env = std::getenv("JAXLSTM_KERNEL_THREADS");
  const long asked = env ? std::strtol(env, nullptr, 10) : 0;
  return asked > 0 ? static_cast<int>(std::min<long>(asked, cpu_count())) : 0;
}

// Threads worth using: one per CPU at most (the calling thread is one more than XLA's
// pool holds: a third thread on 2 cores made a 1.3 ms call take 14 ms, measured), at
// least `width` units each (a vector's), and per step at least kMinWork
// multiply-adds each. A smaller step (B=1, H=64: 25k) is over before a second thread
// has crossed its barrier, and on this project's 2-core machines a second thread made
// such steps 2x slower in some processes and 30x in others (measured).
// JAXLSTM_NATIVE_THREADS=n asks for n threads (up to the CPUs) whatever the work (the tests use it).
constexpr long kMinWork = 128 * 1024;

// How many CPUs other processes kept busy since an earlier call (Linux: /proc/stat's CPU time
// against this process's own, read at most every 50 ms; 0 elsewhere or before a first
// window). A team thread that shares its CPU with another process waits for its time slice at
// every barrier: with one busy process beside it on 2 cores, a 2-thread call at B=16, H=128,
// T=4096 took 2.8 s against 0.10 s idle (measured, Zen 4); one thread took 0.16 s.
inline double others_busy_cpus() {
#if defined(__linux__)
  struct Sample {
    double total = 0, idle = 0, own = 0;
  };
  static std::mutex mu;
  static Sample last;
  static double busy = 0.0;
  static auto last_time = std::chrono::steady_clock::time_point{};
  std::lock_guard<std::mutex> lock(mu);
  const auto now = std::chrono::steady_clock::now();
  if (now - last_time < std::chrono::milliseconds(50)) return busy;
  Sample cur;
  if (FILE* f = std::fopen("/proc/stat", "r")) {
    unsigned long long v[8] = {};
    const int got = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2], &v[3], &v[4],
                                &v[5], &v[6], &v[7]);
    std::fclose(f);
    if (got < 5) return busy;
    for (int i = 0; i < 8; ++i) cur.total += static_cast<double>(v[i]);
    cur.idle = static_cast<double>(v[3] + v[4]);  // idle + iowait
  } else {
    return busy;
  }
  timespec ts;
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  cur.own = (ts.tv_sec + ts.tv_nsec * 1e-9) * static_cast<double>(sysconf(_SC_CLK_TCK));
  const double total = cur.total - last.total;
  if (last_time != std::chrono::steady_clock::time_point{} && total > 0) {
    const long cpus = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));
    const double others = (total - (cur.idle - last.idle) - (cur.own - last.own)) / total;
    busy = std::max(0.0, others) * static_cast<double>(cpus);
  }
  last = cur;
  last_time = now;
  return busy;
#else
  return 0.0;
#endif
}

inline int thread_count(long units, long width, long work_per_step) {
  const long by_units = std::max<long>(1, units / width);
  const int asked = requested_threads();
  if (asked > 0) return static_cast<int>(std::min<long>(asked, by_units));
  const long by_work = std::max<long>(1, work_per_step / kMinWork);
  // CPUs left free by other processes (rounded: a sliver of background work costs no thread)
  const long free_cpus = std::max(1L, cpu_count() - std::lround(others_busy_cpus()));
  return static_cast<int>(std::min<long>(free_cpus, std::min(by_units, by_work)));
}

// A team for one call: the calling thread and up to want-1 helpers from XLA's own
// intra-op thread pool. XLA promises nothing about when (or whether) a scheduled task
// runs, so helpers are recruited, not assumed: each task joins only while the caller is
// still recruiting, the caller waits a short while for them and then closes the team
// with whoever came; a task that comes late, or that XLA runs inline on the calling
// thread, returns at once. Where none came, the native code's own Pool serves. (XLA's pool
// comes first: threads of the native code's own compete for the cores with XLA's pool
// threads, which spin after their work; on 2 cores that made steps up to 5x slower.)
struct Team {
  std::mutex mu;
  bool open = true;
  int joined = 0;                  // helpers admitted (ids 1 ... joined)
  std::atomic<int> arrived{0};     // the same count, for the caller's spin
  std::atomic<int> size{0};        // the closed team's size; 0 while recruiting
  std::atomic<int> finished{0};    // helpers done
  std::thread::id caller;
  std::function<void(int, int)> job;
  std::condition_variable over_cv;  // extra pool threads sleep on it until the call ends
  bool over = false;
  std::vector<int> cpus;  // the allowed CPUs but the caller's: helper k runs on cpus[(k-1) % size]
};

// Runs f with the calling thread held to one CPU, then restores its affinity. A pool
// thread woken for the team often started on the caller's CPU (wake-affine placement)
// and stayed there, so that each barrier cost two context switches: at B=8, H=128 such
// calls took 2.1-2.9 ms against 1.2-1.5 ms (measured).
template <typename F>
void on_cpu(int cpu, F&& f) {
#if JAXLSTM_AFFINITY
  cpu_set_t old_set, one;
  if (cpu < 0 || pthread_getaffinity_np(pthread_self(), sizeof(old_set), &old_set) != 0) return f();
  CPU_ZERO(&one);
  CPU_SET(cpu, &one);
  const bool moved = pthread_setaffinity_np(pthread_self(), sizeof(one), &one) == 0;
  f();
  if (moved) pthread_setaffinity_np(pthread_self(), sizeof(old_set), &old_set);
#else
  (void)cpu;
  f();
#endif
}

// The fallback when XLA's pool sends no helper in time (measured: at B=64, H=1024, in
// some processes XLA ran no scheduled task for the whole call, so the forward pass ran
// at one thread's speed): threads of the native code's own, which sleep between calls.
class Pool {
 public:
  static Pool& get() {
    // Never destroyed: its workers outlive static teardown.
    static Pool* pool = new Pool(cpu_count());
    return *pool;
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Runs f(0), ..., f(n-1) on n threads (the caller is thread 0). A second call
  // while one runs (XLA may run two custom calls at once) gets the caller alone.
  int run(int n, const std::function<void(int, int)>& f) {
    std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
    if (!busy.owns_lock() || n <= 1) {
      f(0, 1);
      return 1;
    }
    n = std::min(n, size());
    {
      std::lock_guard<std::mutex> lock(mu_);
      job_ = &f;
      active_ = n;
      pending_.store(n - 1, std::memory_order_relaxed);
      ++generation_;
    }
    cv_.notify_all();
    f(0, n);
    spin_until([&] { return pending_.load(std::memory_order_acquire) == 0; });
    return n;
  }

 private:
  explicit Pool(int n) {
    for (int i = 1; i < n; ++i) workers_.emplace_back([this, i] { loop(i); });
    for (auto& w : workers_) w.detach();
  }

  void loop(int id) {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* job;
      int n;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        job = job_;
        n = active_;
      }
      if (id < n) {
        (*job)(id, n);
        pending_.fetch_sub(1, std::memory_order_acq_rel);
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex busy_, mu_;
  std::condition_variable cv_;
  uint64_t generation_ = 0;
  const std::function<void(int, int)>* job_ = nullptr;
  int active_ = 0;
  std::atomic<int> pending_{0};
};

// How long the caller waits for helpers: a parked pool thread took 5-40 µs to start a
// task, now and then more than 200 µs (measured); a call of `work` multiply-adds waits
// up to 5 % of its one-thread time (at ~100 GMAC/s), within [200 µs, 2 ms].
inline std::chrono::microseconds recruit_timeout(double work) {
  return std::chrono::microseconds(static_cast<long>(std::clamp(work / 100e3 * 0.05, 200.0, 2000.0)));
}

// Wakes the pool threads that slept through the call, and closes it to late ones.
inline void end_call(Team& team) {
  {
    std::lock_guard<std::mutex> lock(team.mu);
    team.open = false;
    team.over = true;
  }
  team.over_cv.notify_all();
}

// The team size the last call asked for (JaxlstmLastThreads: what a test can see).
inline std::atomic<int>& last_threads() {
  static std::atomic<int> n{0};
  return n;
}

template <typename F>
void run_team(ffi::ThreadPool& pool, int want, double work, F&& body) {
  last_threads().store(want, std::memory_order_relaxed);
  const int pool_threads = static_cast<int>(std::max<int64_t>(0, pool.num_threads()));
  const int helpers = std::min(want - 1, pool_threads);
  if (helpers <= 0) {
    SpinBarrier barrier(1);
    body(0, 1, barrier);
    return;
  }
  auto team = std::make_shared<Team>();
  team->caller = std::this_thread::get_id();
  int here = -1;  // the caller's CPU; the helpers go to the others (team->cpus)
#if JAXLSTM_AFFINITY
  cpu_set_t allowed;
  here = sched_getcpu();
  if (here >= 0 && sched_getaffinity(0, sizeof(allowed), &allowed) == 0)
    for (int c = 0; c < CPU_SETSIZE; ++c)
      if (c != here && CPU_ISSET(c, &allowed)) team->cpus.push_back(c);
#endif
  std::unique_ptr<SpinBarrier> barrier;
  team->job = [&](int p, int n) { body(p, n, *barrier); };
  // A task for every pool thread: the first helpers join; the others sleep until the
  // call ends, so that no idle pool thread spins beside the team (measured: with one
  // spinning, a 1.3 ms call at B=8, H=128 took 2.5-5 ms).
  for (int i = 0; i < pool_threads; ++i) {
    pool.Schedule([team, helpers] {
      if (std::this_thread::get_id() == team->caller) return;  // run inline: not a second thread
      int id;
      {
        std::unique_lock<std::mutex> lock(team->mu);
        if (!team->open) return;
        if (team->joined >= helpers) {
          team->over_cv.wait(lock, [&] { return team->over; });
          return;
        }
        id = ++team->joined;
        team->arrived.store(team->joined, std::memory_order_release);
      }
      int n;
      spin_until([&] { return (n = team->size.load(std::memory_order_acquire)) != 0; });
      if (id < n) {
        const int cpu = team->cpus.empty() ? -1 : team->cpus[(id - 1) % team->cpus.size()];
        on_cpu(cpu, [&] { team->job(id, n); });
      }
      team->finished.fetch_add(1, std::memory_order_acq_rel);
    });
  }
  const auto deadline = std::chrono::steady_clock::now() + recruit_timeout(work);
  while (team->arrived.load(std::memory_order_acquire) < helpers && std::chrono::steady_clock::now() < deadline)
    cpu_relax();
  int n, admitted;
  {
    std::lock_guard<std::mutex> lock(team->mu);
    team->open = false;
    admitted = team->joined;
    n = 1 + admitted;
  }
  if (n == 1) {  // none came: the native code's own threads
    team->size.store(1, std::memory_order_release);
    std::mutex mu;
    std::unique_ptr<SpinBarrier> own_barrier;
    std::function<void(int, int)> job = [&](int p, int m) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (!own_barrier) own_barrier = std::make_unique<SpinBarrier>(m);
      }
      body(p, m, *own_barrier);
    };
    Pool::get().run(want, job);
    end_call(*team);
    return;
  }
  barrier = std::make_unique<SpinBarrier>(n);
  team->size.store(n, std::memory_order_release);
  on_cpu(team->cpus.empty() ? -1 : here, [&] { team->job(0, n); });  // the caller stays on its CPU too
  spin_until([&] { return team->finished.load(std::memory_order_acquire) == admitted; });  // also those sent home
  end_call(*team);
}

}  // namespace jaxlstm
