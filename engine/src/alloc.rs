//! The global allocator (mimalloc) and how long it keeps freed memory.
//!
//! Candle allocates a fresh buffer for nearly every tensor op. glibc's malloc hands large ones
//! back to the kernel and faults them in again (a third of training CPU time was in the kernel).
//! mimalloc reuses them, but still returns ("purges") freed pages after a delay, and the kernel
//! must zero every page it hands back: 12% of training time was in `clear_page`. While a
//! [`ReuseFreedMemory`] guard lives (a training run, a batch of embeddings), nothing is purged;
//! when the last guard drops, the delay is restored and freed memory goes back to the OS, so an
//! idle worker does not hold its training peak.

use std::sync::Mutex;

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
