//! A small persistent fork-join pool tuned for the many short parallel regions of a decode step.
//!
//! A decode step at batch 1 runs a few hundred matrix-vector products of ~100 µs each, so the cost of
//! waking threads matters more than scheduling finesse: workers spin briefly on an epoch counter before
//! sleeping, the caller takes part in the work, and tasks are handed out by one atomic counter. Which
//! thread runs a task never changes its result (kernels are written per task), so scheduling is free to
//! be dynamic.
//!
//! Contract: [`parallel_for`] runs `f(i)` exactly once for every `i < n` and returns when all have
//! finished. Calls from several threads are serialised; a call made from inside a task runs inline.
//! A panic in a task is re-raised in the caller after the region completes.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

type Task<'a> = dyn Fn(usize) + Sync + 'a;

struct Region {
    /// Lifetime-erased pointer to the caller's closure; valid while `active > 0`.
    task: *const Task<'static>,
    n: usize,
}
// SAFETY: a region is shared only while its tasks run; its closure is `Sync` and outlives them.
unsafe impl Send for Region {}
// SAFETY: as above.
unsafe impl Sync for Region {}

struct Shared {
    epoch: AtomicUsize,
    region: Mutex<Region>,
    next: AtomicUsize,
    /// Workers that have not yet finished the current region.
    active: AtomicUsize,
    panicked: AtomicBool,
    sleep_lock: Mutex<()>,
    wake: Condvar,
    sleepers: AtomicUsize,
}

pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    submit: Mutex<()>,
}

thread_local! {
    static IN_POOL: Cell<bool> = const { Cell::new(false) };
}

const SPIN: Duration = Duration::from_micros(200);

impl Pool {
    /// A pool whose regions run on `threads` threads in all (the caller plus `threads - 1` workers).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            region: Mutex::new(Region { task: std::ptr::null::<fn(usize)>() as *const Task<'static>, n: 0 }),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleep_lock: Mutex::new(()),
            wake: Condvar::new(),
            sleepers: AtomicUsize::new(0),
        });
        let workers = threads.max(1) - 1;
        for w in 0..workers {
            let s = shared.clone();
            std::thread::Builder::new().name(format!("sy-kernel-{w}")).spawn(move || worker_loop(&s)).expect("spawn kernel worker thread");
        }
        Pool { shared, workers, submit: Mutex::new(()) }
    }

    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    pub fn parallel_for(&self, n: usize, f: &(dyn Fn(usize) + Sync)) {
        if n == 0 {
            return;
        }
        if n == 1 || self.workers == 0 || IN_POOL.with(|c| c.get()) {
            (0..n).for_each(f);
            return;
        }
        let _guard = self.submit.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        {
            let mut r = s.region.lock().unwrap();
            // SAFETY: the pointer is only dereferenced by workers while `active > 0`, and this function
            // does not return (so `f` stays alive) until `active` is back to 0.
            r.task = unsafe { std::mem::transmute::<*const Task<'_>, *const Task<'static>>(f as *const Task<'_>) };
            r.n = n;
        }
        s.next.store(0, Ordering::Relaxed);
        s.panicked.store(false, Ordering::Relaxed);
        s.active.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if s.sleepers.load(Ordering::Acquire) > 0 {
            let _l = s.sleep_lock.lock().unwrap();
            s.wake.notify_all();
        }
        IN_POOL.with(|c| c.set(true));
        let caller = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f, n)));
        IN_POOL.with(|c| c.set(false));
        while s.active.load(Ordering::Acquire) != 0 {
            std::hint::spin_loop();
        }
        if let Err(p) = caller {
            std::panic::resume_unwind(p);
        }
        if s.panicked.load(Ordering::Relaxed) {
            panic!("a kernel task panicked on a pool worker");
        }
    }
}

fn run_tasks(s: &Shared, f: &Task<'_>, n: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= n {
            break;
        }
        f(i);
    }
}

fn worker_loop(s: &Shared) {
    IN_POOL.with(|c| c.set(true));
    let mut seen = 0usize;
    loop {
        // Wait for a new epoch: spin first (regions come back-to-back during a step), then sleep.
        let start = Instant::now();
        let mut spins = 0u32;
        loop {
            let e = s.epoch.load(Ordering::Acquire);
            if e != seen {
                seen = e;
                break;
            }
            spins += 1;
            if spins.is_multiple_of(1024) && start.elapsed() > SPIN {
                let g = s.sleep_lock.lock().unwrap();
                s.sleepers.fetch_add(1, Ordering::AcqRel);
                if s.epoch.load(Ordering::Acquire) == seen {
                    let _g = s.wake.wait_timeout(g, Duration::from_millis(50)).unwrap();
                }
                s.sleepers.fetch_sub(1, Ordering::AcqRel);
            } else {
                std::hint::spin_loop();
            }
        }
        let (task, n) = {
            let r = s.region.lock().unwrap();
            (r.task, r.n)
        };
        // SAFETY: see `parallel_for`: the closure outlives this region.
        let f: &Task<'_> = unsafe { &*task };
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_tasks(s, f, n))).is_err() {
            s.panicked.store(true, Ordering::Relaxed);
        }
        s.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Keeps glibc from returning large freed buffers to the OS. A forward pass allocates and frees
/// activation buffers of a few MiB per layer; with glibc's defaults each one is a fresh `mmap`, and
/// touching it costs a page fault per 4 KiB (7% of a prefill step, measured with `perf`).
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        // SAFETY: mallopt only adjusts allocator tunables; called once, before the pool starts.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20); // glibc's maximum on 64-bit: larger values are ignored
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
        }
    }
}

/// The process-wide pool: `SWITCHYARD_THREADS` threads, or every available core.
pub fn global() -> &'static Pool {
    static POOL: OnceLock<Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        keep_freed_memory();
        let n = std::env::var("SWITCHYARD_THREADS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
        Pool::new(n)
    })
}

/// Runs `f(i)` for `i in 0..n` on the global pool.
pub fn parallel_for(n: usize, f: &(dyn Fn(usize) + Sync)) {
    global().parallel_for(n, f)
}

/// Runs `f(row, out_row)` for `rows` rows of width `width` on the global pool; returns `[rows, width]`.
pub fn parallel_rows(rows: usize, width: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) -> Vec<f32> {
    build_chunks(rows * width, width, 0, f)
}

/// A new buffer of `n` elements made as [`for_each_chunk_mut_above`] would fill `zeros(n)`: `f(i, chunk)`
/// on each chunk, in parallel from `min` elements. Each task clears its own chunk just before `f` fills
/// it, while the chunk is in cache: no separate clearing pass through memory over the whole buffer (a
/// prefill's activations are megabytes; that pass was 3-4% of a batch-16 prefill's profile).
pub fn build_chunks<T: Copy + Default + Send>(n: usize, chunk: usize, min: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) -> Vec<T> {
    let mut v: Vec<T> = Vec::with_capacity(n);
    for_each_chunk_mut_above(&mut v.spare_capacity_mut()[..n], chunk.max(1), min, &|i, c| {
        for x in c.iter_mut() {
            x.write(T::default());
        }
        // SAFETY: every element of the chunk was just written, and MaybeUninit<T> has T's layout.
        let c = unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) };
        f(i, c)
    });
    // SAFETY: the capacity is at least n, and the chunks cover the first n elements, each written above.
    unsafe { v.set_len(n) };
    v
}

/// `vec![T::default(); n]` (zeros, for the numeric types the model uses), written by the pool's
/// threads from 256 KB: a prefill's activation buffers are megabytes, the heap hands back memory that
/// must be cleared, and one thread's `memset` was 7% of a prefill.
pub fn zeros<T: Copy + Default + Send>(n: usize) -> Vec<T> {
    if n * std::mem::size_of::<T>() < 1 << 18 {
        return vec![T::default(); n];
    }
    build_chunks(n, 1 << 16, 0, &|_, _| {})
}

/// Below this many elements an elementwise pass is not worth a parallel region (decode steps).
pub const PARALLEL_MIN: usize = 1 << 15;

/// Runs `f(index, chunk)` over `data.chunks_mut(chunk)`, on the global pool when `data` holds at least
/// [`PARALLEL_MIN`] elements and inline otherwise. Each element is written by exactly one task, so the
/// result never depends on how the work was split.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    for_each_chunk_mut_above(data, chunk, PARALLEL_MIN, f)
}

/// [`for_each_chunk_mut`] with its own threshold, for passes whose elements are expensive (a tanh each).
pub fn for_each_chunk_mut_above<T: Send>(data: &mut [T], chunk: usize, min: usize, f: &(dyn Fn(usize, &mut [T]) + Sync)) {
    if data.len() < min || data.len() <= chunk {
        data.chunks_mut(chunk).enumerate().for_each(|(i, c)| f(i, c));
        return;
    }
    struct Out<T>(*mut T);
    // SAFETY: tasks only build disjoint `&mut [T]` from it, and `T: Send`.
    unsafe impl<T: Send> Sync for Out<T> {}
    let (len, ptr) = (data.len(), Out(data.as_mut_ptr()));
    parallel_for(len.div_ceil(chunk), &|i| {
        let p = &ptr;
        let start = i * chunk;
        // SAFETY: chunks are disjoint and within `data`, which outlives the region.
        let c = unsafe { std::slice::from_raw_parts_mut(p.0.add(start), chunk.min(len - start)) };
        f(i, c);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeros_are_zeros_at_every_size() {
        for n in [0usize, 5, (1 << 16) + 3, (1 << 18) + 3, 3 << 20] {
            let v: Vec<f32> = zeros(n);
            assert_eq!(v.len(), n);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "n={n}");
            let u: Vec<u16> = zeros(n);
            assert!(u.len() == n && u.iter().all(|&x| x == 0), "n={n}");
        }
    }

    #[test]
    fn chunks_cover_every_element_once() {
        for len in [10usize, PARALLEL_MIN + 77] {
            let mut v = vec![0f32; len];
            for_each_chunk_mut(&mut v, 1000, &|i, c| c.iter_mut().enumerate().for_each(|(j, x)| *x += (i * 1000 + j) as f32));
            assert!(v.iter().enumerate().all(|(i, &x)| x == i as f32));
        }
    }

    #[test]
    fn every_task_runs_exactly_once() {
        let pool = Pool::new(3);
        for n in [0usize, 1, 2, 7, 1000] {
            let hits: Vec<AtomicUsize> = (0..n).map(|_| AtomicUsize::new(0)).collect();
            pool.parallel_for(n, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "n={n}");
        }
    }

    #[test]
    fn nested_calls_run_inline_and_panics_propagate() {
        let pool = Pool::new(2);
        let total = AtomicUsize::new(0);
        pool.parallel_for(4, &|_| {
            pool.parallel_for(3, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            })
        });
        assert_eq!(total.load(Ordering::Relaxed), 12);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.parallel_for(8, &|i| assert!(i != 5, "task 5 fails"))));
        assert!(r.is_err());
        // The pool still works after a panic.
        let count = AtomicUsize::new(0);
        pool.parallel_for(8, &|_| {
            count.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(count.load(Ordering::Relaxed), 8);
    }
}
