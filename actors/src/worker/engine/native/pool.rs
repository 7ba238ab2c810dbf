//! One thread pool for every operation of the forward pass.
//!
//! A decode step runs ~200 parallel sections of a few microseconds each; handing work to
//! sleeping threads (a condvar wake-up is ~5–50 µs) would cost more than the work. The
//! pool's threads therefore spin on an epoch counter between sections and only sleep
//! after [`SPIN`] without work, so an idle worker costs no CPU. The calling thread is
//! thread 0 and works too.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a pool thread spins for the next section before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

type Job = dyn Fn(usize) + Sync;

struct Shared {
    /// Bumped once per section; a pool thread runs the job when it sees a new value.
    epoch: AtomicU64,
    /// The current section's job (a borrowed closure; valid until `pending` is 0).
    job: Mutex<Option<&'static Job>>,
    /// Pool threads that have not finished the current section.
    pending: AtomicUsize,
    /// A pool thread's job panicked in the current section.
    panicked: AtomicBool,
    sleepers: AtomicUsize,
    sleep: Mutex<()>,
    wake: Condvar,
    stop: AtomicBool,
}

/// A pool of `threads` (the caller included).
pub struct Pool {
    threads: usize,
    shared: Arc<Shared>,
    handles: Vec<JoinHandle<()>>,
    /// One section at a time (several sessions of a worker share the pool).
    section: Mutex<()>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pool({} threads)", self.threads)
    }
}

impl Pool {
    /// A pool of `threads` threads in all (at least 1: the caller).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicU64::new(0),
            job: Mutex::new(None),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleepers: AtomicUsize::new(0),
            sleep: Mutex::new(()),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        // A thread that cannot be spawned leaves its share to the others.
        let mut handles = Vec::new();
        for index in 1..threads.max(1) {
            let shared = shared.clone();
            match std::thread::Builder::new()
                .name(format!("rbee-engine-{index}"))
                .spawn(move || worker(&shared, index))
            {
                Ok(handle) => handles.push(handle),
                Err(_) => break,
            }
        }
        Pool {
            threads: handles.len() + 1,
            shared,
            handles,
            section: Mutex::new(()),
        }
    }

    /// Threads in the pool, the caller included.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `job(i)` for every thread index `i` (0 on the caller) and returns when all
    /// have finished. A panic in any of them is re-raised here.
    pub fn run(&self, job: &(dyn Fn(usize) + Sync)) {
        let shared = &*self.shared;
        if self.threads == 1 {
            job(0);
            return;
        }
        let _section = self.section.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the reference is only used by pool threads between the epoch bump below
        // and their decrement of `pending`, and this function does not return (not even by
        // unwinding: the caller's panic is caught) before `pending` is 0.
        let job_static: &'static Job = unsafe { std::mem::transmute(job) };
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = Some(job_static);
        shared.panicked.store(false, Ordering::Relaxed);
        shared.pending.store(self.threads - 1, Ordering::SeqCst);
        shared.epoch.fetch_add(1, Ordering::SeqCst);
        if shared.sleepers.load(Ordering::SeqCst) > 0 {
            let _guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            shared.wake.notify_all();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| job(0)));
        while shared.pending.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        *shared.job.lock().unwrap_or_else(|e| e.into_inner()) = None;
        if let Err(panic) = mine {
            std::panic::resume_unwind(panic);
        }
        if shared.panicked.load(Ordering::Relaxed) {
            panic!("an engine thread panicked");
        }
    }

    /// Splits `0..n` into one contiguous segment per thread (multiples of `align`) and
    /// runs `job(thread, range)` over all of it. Each thread works through its own segment
    /// front to back, a chunk at a time; a thread done with its own takes chunks from the
    /// back of another's. On a shared machine one core is often slower for a while (steal
    /// time, the process's own I/O threads); with fixed segments the other core spun at
    /// every section's end waiting for it. Each output is computed by the same code
    /// whichever thread takes it, so results do not depend on who did.
    pub fn split(
        &self,
        n: usize,
        align: usize,
        job: &(dyn Fn(usize, std::ops::Range<usize>) + Sync),
    ) {
        let threads = self.threads();
        let align = align.max(1);
        // Segment bounds are packed in 32 bits each: rows of one matrix, far below that.
        debug_assert!(n <= u32::MAX as usize);
        let per = n.div_ceil(threads).next_multiple_of(align);
        let chunk = (per / CHUNKS_PER_SEGMENT).max(1).next_multiple_of(align);
        let segments: Vec<Segment> = (0..threads)
            .map(|i| Segment::new((i * per).min(n), ((i + 1) * per).min(n)))
            .collect();
        self.run(&|i| {
            while let Some(range) = segments[i].take_front(chunk) {
                job(i, range);
            }
            for other in (1..threads).map(|k| (i + k) % threads) {
                while let Some(range) = segments[other].take_back(chunk) {
                    job(i, range);
                }
            }
        });
    }
}

/// Chunks a thread's segment is taken in by [`Pool::split`]: the grain of stealing.
const CHUNKS_PER_SEGMENT: usize = 4;

/// What is left of one thread's segment, `front..back` packed in one atomic word: its
/// owner takes chunks from the front, others from the back, never the same chunk.
struct Segment(AtomicU64);

impl Segment {
    fn new(front: usize, back: usize) -> Segment {
        Segment(AtomicU64::new(Self::pack(front, back)))
    }

    fn pack(front: usize, back: usize) -> u64 {
        ((front as u64) << 32) | back as u64
    }

    /// Takes up to `chunk` from the front.
    fn take_front(&self, chunk: usize) -> Option<std::ops::Range<usize>> {
        self.take(|front, back| {
            let end = (front + chunk).min(back);
            (front..end, Self::pack(end, back))
        })
    }

    /// Takes up to `chunk` from the back.
    fn take_back(&self, chunk: usize) -> Option<std::ops::Range<usize>> {
        self.take(|front, back| {
            let start = back.saturating_sub(chunk).max(front);
            (start..back, Self::pack(front, start))
        })
    }

    fn take(
        &self,
        cut: impl Fn(usize, usize) -> (std::ops::Range<usize>, u64),
    ) -> Option<std::ops::Range<usize>> {
        let mut now = self.0.load(Ordering::Acquire);
        loop {
            let (front, back) = ((now >> 32) as usize, (now & 0xFFFF_FFFF) as usize);
            if front >= back {
                return None;
            }
            let (range, next) = cut(front, back);
            match self
                .0
                .compare_exchange_weak(now, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return Some(range),
                Err(seen) => now = seen,
            }
        }
    }
}

fn worker(shared: &Shared, index: usize) {
    let mut seen = 0u64;
    loop {
        let mut since = None;
        let mut spins = 0u32;
        let epoch = loop {
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen || shared.stop.load(Ordering::Relaxed) {
                break epoch;
            }
            std::hint::spin_loop();
            spins += 1;
            if spins.is_multiple_of(1024) {
                let started = *since.get_or_insert_with(Instant::now);
                if started.elapsed() > SPIN {
                    let guard = shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
                    shared.sleepers.fetch_add(1, Ordering::SeqCst);
                    let guard = shared
                        .wake
                        .wait_while(guard, |_| {
                            shared.epoch.load(Ordering::SeqCst) == seen
                                && !shared.stop.load(Ordering::SeqCst)
                        })
                        .unwrap_or_else(|e| e.into_inner());
                    shared.sleepers.fetch_sub(1, Ordering::SeqCst);
                    drop(guard);
                    since = None;
                }
            }
        };
        if shared.stop.load(Ordering::Relaxed) {
            return;
        }
        seen = epoch;
        let job = *shared.job.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(job) = job
            && catch_unwind(AssertUnwindSafe(|| job(index))).is_err()
        {
            shared.panicked.store(true, Ordering::Relaxed);
        }
        shared.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        {
            let _guard = self.shared.sleep.lock().unwrap_or_else(|e| e.into_inner());
            self.shared.wake.notify_all();
        }
        for handle in self.handles.drain(..) {
            let _ = handle.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_index_runs_once_per_section_and_sections_do_not_overlap() {
        let pool = Pool::new(3);
        let hits = [
            AtomicUsize::new(0),
            AtomicUsize::new(0),
            AtomicUsize::new(0),
        ];
        for _ in 0..1000 {
            pool.run(&|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
        }
        // Sleeping threads are woken for the next section.
        std::thread::sleep(SPIN * 3);
        pool.run(&|i| {
            hits[i].fetch_add(1, Ordering::Relaxed);
        });
        for h in &hits {
            assert_eq!(h.load(Ordering::Relaxed), 1001);
        }
        let covered: Vec<AtomicUsize> = (0..100).map(|_| AtomicUsize::new(0)).collect();
        pool.split(100, 8, &|_, range| {
            for i in range {
                covered[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(covered.iter().all(|c| c.load(Ordering::Relaxed) == 1));
    }

    #[test]
    fn a_thread_done_with_its_segment_takes_the_rest_of_a_slow_one() {
        let pool = Pool::new(2);
        let covered: Vec<AtomicUsize> = (0..4096).map(|_| AtomicUsize::new(0)).collect();
        let by_caller = AtomicUsize::new(0);
        pool.split(4096, 16, &|thread, range| {
            // The pool thread is slow: the caller takes over most of its segment.
            if thread == 1 {
                std::thread::sleep(Duration::from_millis(20));
            } else {
                by_caller.fetch_add(range.len(), Ordering::Relaxed);
            }
            assert!(range.start.is_multiple_of(16));
            for i in range {
                covered[i].fetch_add(1, Ordering::Relaxed);
            }
        });
        assert!(covered.iter().all(|c| c.load(Ordering::Relaxed) == 1));
        assert!(
            by_caller.load(Ordering::Relaxed) > 2048,
            "nothing was taken over"
        );

        // Racing takes from both ends of one segment hand out every index once.
        for _ in 0..200 {
            let segment = Segment::new(0, 1000);
            let taken: Vec<AtomicUsize> = (0..1000).map(|_| AtomicUsize::new(0)).collect();
            std::thread::scope(|s| {
                for front in [true, false] {
                    let (segment, taken) = (&segment, &taken);
                    s.spawn(move || {
                        loop {
                            let range = match front {
                                true => segment.take_front(7),
                                false => segment.take_back(5),
                            };
                            let Some(range) = range else { break };
                            for i in range {
                                taken[i].fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    });
                }
            });
            assert!(taken.iter().all(|t| t.load(Ordering::Relaxed) == 1));
        }
    }

    #[test]
    fn a_panic_on_a_pool_thread_reaches_the_caller_and_the_pool_goes_on() {
        let pool = Pool::new(2);
        let result = catch_unwind(AssertUnwindSafe(|| {
            pool.run(&|i| {
                if i == 1 {
                    panic!("injected");
                }
            })
        }));
        assert!(result.is_err());
        let ran = AtomicUsize::new(0);
        pool.run(&|_| {
            ran.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(ran.load(Ordering::Relaxed), 2);
    }
}
