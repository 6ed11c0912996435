//! The global allocator (mimalloc) and how long it keeps freed memory.
//!
//! Candle allocates a fresh buffer for nearly every tensor op. glibc's malloc hands large ones
//! back to the kernel and faults them in again (a third of training CPU time was in the kernel).
//! mimalloc reuses them, but still returns ("purges") freed pages after a delay, and the kernel
//! must zero every page it hands back: 12% of training time was in `clear_page`. While a
//! [`ReuseFreedMemory`] guard lives (a training run, a batch of embeddings), nothing is purged;
//! when the last guard drops, the delay is restored and freed memory goes back to the OS, so an
//! idle worker does not hold its training peak.
//!
//! mimalloc does that housekeeping only on a thread that calls into it; a runtime thread that
//! goes idle after a burst (a flood of enrolment peers, a batch of transfers) would hold what it
//! freed. [`runtime`] builds the binaries' tokio runtime so that a thread waking after at least
//! 100 ms parked collects its heap, at most once a second.

use std::cell::Cell;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// `mi_option_purge_delay` in mimalloc 3's `mi_option_e` (include/mimalloc.h): milliseconds
/// before freed memory is returned to the OS, -1 for never.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Every binary linking this crate (the worker, benchmarks, tests) allocates through mimalloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Live guards and the purge delay to restore when the last one drops.
static HOLDERS: Mutex<(usize, i64)> = Mutex::new((0, 0));

/// While any guard is alive, freed memory stays with the allocator for reuse.
#[derive(Debug)]
#[must_use = "memory is kept only while the guard lives"]
pub struct ReuseFreedMemory(());

impl ReuseFreedMemory {
    /// Stops returning freed memory to the OS until every guard has dropped.
    pub fn hold() -> Self {
        let mut h = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        if h.0 == 0 {
            h.1 = purge_delay_ms();
            set_purge_delay(-1);
        }
        h.0 += 1;
        Self(())
    }
}

impl Drop for ReuseFreedMemory {
    fn drop(&mut self) {
        let mut h = HOLDERS.lock().unwrap_or_else(|e| e.into_inner());
        h.0 -= 1;
        if h.0 == 0 {
            set_purge_delay(h.1);
            // SAFETY: asks mimalloc to free what it can; no pointers are involved.
            #[allow(unsafe_code)]
            unsafe {
                libmimalloc_sys::mi_collect(true)
            };
            tracing::debug!(purge_delay_ms = h.1, "freed memory returned to the OS");
        }
    }
}

/// How often a runtime thread collects its heap at most.
const IDLE_COLLECT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a runtime thread must have been parked for its wake-up to count as the end of a
/// quiet spell: a busy thread parks for microseconds, and collecting there would hand back
/// memory it needs again at once (measured: -10% dispatch throughput when every park collected).
const IDLE_BEFORE_COLLECT: Duration = Duration::from_millis(100);

thread_local! {
    static LAST_COLLECT: Cell<Option<Instant>> = const { Cell::new(None) };
    static PARKED_AT: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Collects this thread's heap (frees its empty pages, purges what has waited out the purge
/// delay) unless it did so less than [`IDLE_COLLECT_INTERVAL`] ago or a [`ReuseFreedMemory`]
/// guard is alive; says whether it collected.
fn collect_thread_heap() -> bool {
    let now = Instant::now();
    let due = LAST_COLLECT.with(|last| match last.get() {
        Some(t) if now.duration_since(t) < IDLE_COLLECT_INTERVAL => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if !due || purge_delay_ms() < 0 {
        return false;
    }
    // SAFETY: asks mimalloc to collect this thread's heap; no pointers are involved.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_collect(false)
    };
    true
}

/// For a runtime's `on_thread_park`: notes when this thread went idle.
fn note_thread_parked() {
    PARKED_AT.with(|p| p.set(Some(Instant::now())));
}

/// For a runtime's `on_thread_unpark`: after at least [`IDLE_BEFORE_COLLECT`] parked, collects
/// this thread's heap ([`collect_thread_heap`]); says whether it did.
fn collect_after_idle() -> bool {
    let idle = PARKED_AT.with(|p| p.take()).map(|t| t.elapsed());
    match idle {
        Some(idle) if idle >= IDLE_BEFORE_COLLECT => collect_thread_heap(),
        _ => false,
    }
}

/// The multi-threaded tokio runtime the binaries run on: all drivers enabled, and a worker
/// thread that wakes from a quiet spell hands freed memory back.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_park(note_thread_parked)
        .on_thread_unpark(|| {
            collect_after_idle();
        })
        .build()
}

fn set_purge_delay(ms: i64) {
    // SAFETY: sets one integer option.
    #[allow(unsafe_code)]
    unsafe {
        libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms as _)
    };
}

/// The allocator's current purge delay in milliseconds (-1: never).
pub fn purge_delay_ms() -> i64 {
    // SAFETY: reads one integer option.
    #[allow(unsafe_code)]
    let v = unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) };
    v as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_wake_from_a_quiet_spell_collects_and_at_most_once_per_interval() {
        // A fresh thread: its own park times and rate limit.
        std::thread::spawn(|| {
            note_thread_parked();
            assert!(!collect_after_idle(), "collected after a short park");
            assert!(!collect_after_idle(), "collected without a park");
            PARKED_AT.with(|p| p.set(Some(Instant::now() - IDLE_BEFORE_COLLECT)));
            // Collects unless a concurrent test holds a guard; the next one is rate-limited.
            collect_after_idle();
            PARKED_AT.with(|p| p.set(Some(Instant::now() - IDLE_BEFORE_COLLECT)));
            assert!(
                !collect_after_idle(),
                "collected twice within {IDLE_COLLECT_INTERVAL:?}"
            );
            let _guard = ReuseFreedMemory::hold();
            LAST_COLLECT.with(|l| l.set(None));
            assert!(!collect_thread_heap(), "collected while a guard was alive");
        })
        .join()
        .unwrap();
    }

    #[test]
    fn guards_nest_and_restore_the_delay() {
        {
            // Other tests may hold guards; the value is only stable while the lock is held.
            let h = HOLDERS.lock().unwrap();
            if h.0 == 0 {
                // mimalloc 3.3's default purge delay (the value proves the option index).
                assert_eq!(purge_delay_ms(), 1000);
            }
        }
        let a = ReuseFreedMemory::hold();
        let b = ReuseFreedMemory::hold();
        assert_eq!(purge_delay_ms(), -1);
        drop(a);
        assert_eq!(purge_delay_ms(), -1);
        drop(b);
        let h = HOLDERS.lock().unwrap();
        if h.0 == 0 {
            assert_eq!(purge_delay_ms(), h.1);
            assert_ne!(h.1, -1);
        }
    }
}
