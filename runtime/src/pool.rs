//! A persistent thread pool that runs a session's step list on several cores.
//!
//! Every kernel splits its work by `part`/`nparts`, so one forward chunk is a single job: each
//! thread walks the whole step list doing its part of each kernel, with a spin barrier between
//! steps (a kernel reads what earlier kernels wrote). Threads wake once per job, not per kernel;
//! idle workers spin briefly, then sleep on a condition variable.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use crate::exec::KernelFn;

/// One step: a kernel and its ABI pointer array.
#[derive(Clone, Copy)]
pub struct Call {
    pub kernel: KernelFn,
    pub args: *const *mut u8,
}

#[derive(Clone, Copy)]
struct Job {
    calls: *const Call,
    len: usize,
    s: i64,
    p: i64,
}

struct Shared {
    nthreads: usize,
    /// Incremented (Release) after `job` is written; workers run each new generation once.
    generation: AtomicU64,
    job: Mutex<Option<Job>>,
    wake: Condvar,
    /// Barrier arrivals within the current job (reset before each job).
    arrived: AtomicUsize,
    /// Workers that finished the current job.
    finished: AtomicUsize,
    shutdown: AtomicBool,
}

// SAFETY: the raw pointers in `Job` are only dereferenced while `Pool::run` (which owns the
// borrowed data) waits for every worker to finish the job.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

pub struct Pool {
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
}

/// Barrier spins before yielding the core: kernels are microseconds apart, but on an
/// oversubscribed machine a peer may be descheduled and spinning only delays it.
const BARRIER_SPINS: u32 = 1 << 10;
/// Idle spins before a worker sleeps: decode steps come back to back within ~1 ms.
const IDLE_SPINS: u32 = 1 << 14;

impl Pool {
    /// A pool running jobs on `nthreads` threads: the caller's and `nthreads - 1` workers.
    pub fn new(nthreads: usize) -> Pool {
        let nthreads = nthreads.max(1);
        let shared = Arc::new(Shared {
            nthreads,
            generation: AtomicU64::new(0),
            job: Mutex::new(None),
            wake: Condvar::new(),
            arrived: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            shutdown: AtomicBool::new(false),
        });
        let handles = (1..nthreads)
            .map(|part| {
                let sh = Arc::clone(&shared);
                std::thread::Builder::new()
                    .name(format!("llmc-worker-{part}"))
                    .spawn(move || worker(sh, part))
                    .expect("spawning a worker thread")
            })
            .collect();
        Pool { shared, handles }
    }

    pub fn threads(&self) -> usize {
        self.shared.nthreads
    }

    /// Runs `calls` in order for a step of `s` tokens after `p` cached ones, every kernel split
    /// across all threads. Returns when all threads are done.
    ///
    /// # Safety
    /// Each call's pointers must be valid for the kernel ABI with these `s`, `p` for the duration.
    pub unsafe fn run(&self, calls: &[Call], s: i64, p: i64) {
        let sh = &*self.shared;
        if sh.nthreads == 1 {
            for c in calls {
                (c.kernel)(c.args, s, p, 0, 1);
            }
            return;
        }
        sh.arrived.store(0, Ordering::Relaxed);
        sh.finished.store(0, Ordering::Relaxed);
        {
            let mut j = sh.job.lock().unwrap_or_else(|e| e.into_inner());
            *j = Some(Job { calls: calls.as_ptr(), len: calls.len(), s, p });
            sh.generation.fetch_add(1, Ordering::Release);
        }
        sh.wake.notify_all();
        let job = Job { calls: calls.as_ptr(), len: calls.len(), s, p };
        run_job(sh, job, 0);
        let mut spins = 0u32;
        while sh.finished.load(Ordering::Acquire) < sh.nthreads - 1 {
            spin_or_yield(&mut spins);
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::Release);
        {
            let _j = self.shared.job.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.generation.fetch_add(1, Ordering::Release);
        }
        self.shared.wake.notify_all();
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

fn spin_or_yield(spins: &mut u32) {
    if *spins < BARRIER_SPINS {
        *spins += 1;
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

/// Runs this thread's part of every call, with a barrier after each.
fn run_job(sh: &Shared, job: Job, part: usize) {
    let n = sh.nthreads;
    for i in 0..job.len {
        // SAFETY: `Pool::run` keeps `calls` alive until every thread has finished.
        let c = unsafe { *job.calls.add(i) };
        unsafe { (c.kernel)(c.args, job.s, job.p, part as i64, n as i64) };
        // Barrier: step i is complete when all n threads have arrived (i + 1) times.
        let target = n * (i + 1);
        sh.arrived.fetch_add(1, Ordering::AcqRel);
        let mut spins = 0u32;
        while sh.arrived.load(Ordering::Acquire) < target {
            spin_or_yield(&mut spins);
        }
    }
}

fn worker(sh: Arc<Shared>, part: usize) {
    let mut seen = 0u64;
    loop {
        // Wait for a new generation: spin first (jobs come back to back while generating), then sleep.
        let mut spins = 0u32;
        let mut gen = sh.generation.load(Ordering::Acquire);
        while gen == seen && spins < IDLE_SPINS {
            std::hint::spin_loop();
            spins += 1;
            gen = sh.generation.load(Ordering::Acquire);
        }
        let job = {
            let mut j = sh.job.lock().unwrap_or_else(|e| e.into_inner());
            while sh.generation.load(Ordering::Acquire) == seen {
                j = sh.wake.wait(j).unwrap_or_else(|e| e.into_inner());
            }
            seen = sh.generation.load(Ordering::Acquire);
            *j
        };
        if sh.shutdown.load(Ordering::Acquire) {
            return;
        }
        if let Some(job) = job {
            run_job(&sh, job, part);
            sh.finished.fetch_add(1, Ordering::AcqRel);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test kernel: adds 1 to its part of a 1000-element i64 buffer (bufs[0]), then (second
    /// call) checks the whole buffer was done by the previous step before doubling its part.
    unsafe extern "sysv64" fn add_one(bufs: *const *mut u8, _s: i64, _p: i64, part: i64, nparts: i64) {
        let buf = *bufs as *mut i64;
        let (lo, hi) = (1000 * part / nparts, 1000 * (part + 1) / nparts);
        for i in lo..hi {
            *buf.add(i as usize) += 1;
        }
    }
    unsafe extern "sysv64" fn sum_then_mark(bufs: *const *mut u8, _s: i64, _p: i64, part: i64, nparts: i64) {
        let buf = *bufs as *mut i64;
        let out = *bufs.add(1) as *mut i64;
        // Every element must already be incremented by the previous step (barrier works).
        let total: i64 = (0..1000).map(|i| *buf.add(i)).sum();
        *out.add(part as usize) = total;
        let _ = nparts;
    }

    #[test]
    fn steps_run_in_lockstep_across_threads() {
        for n in [1, 2, 3, 4] {
            let pool = Pool::new(n);
            let mut data = vec![0i64; 1000];
            let mut sums = vec![0i64; n];
            let a: Vec<*mut u8> = vec![data.as_mut_ptr() as *mut u8];
            let b: Vec<*mut u8> = vec![data.as_mut_ptr() as *mut u8, sums.as_mut_ptr() as *mut u8];
            let calls = [
                Call { kernel: add_one, args: a.as_ptr() },
                Call { kernel: sum_then_mark, args: b.as_ptr() },
                Call { kernel: add_one, args: a.as_ptr() },
            ];
            for round in 1..=50i64 {
                unsafe { pool.run(&calls, 1, 0) };
                assert!(data.iter().all(|&x| x == 2 * round), "n={n} round {round}");
                assert!(sums.iter().all(|&s| s == 1000 * (2 * round - 1)), "n={n}: a step saw a partial previous step");
            }
        }
    }
}
