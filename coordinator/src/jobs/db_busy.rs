//! How the connections of `jobs.db` wait for a lock another connection holds.
//!
//! SQLite's own busy handler (`busy_timeout`) sleeps 1, 2, 5, 10, 15, 20, 25 ... ms between
//! tries, so a connection held up for a few milliseconds goes on only after tens: the writer
//! held up by a RESTART checkpoint (which takes the write lock, copies what is left of the WAL,
//! then waits for the readers) tried again at 1, 3, 8, 18, 33, 53 ms, and every lease and
//! commit queued behind it waited as long. Here a waiting connection tries again every
//! [`RETRY_EVERY`] (`bench_coordinator`, 100,000 tasks, four alternating pairs: the largest
//! latency 34-56 ms before, 18-38 ms after; p99 unchanged).
//!
//! A RESTART checkpoint waits for the readers while it holds the write lock, so it waits only
//! [`RESTART_WAIT`]: when a reader is still busy by then, the checkpoint gives up and the next
//! one tries again, instead of stalling the writer for as long as a reader takes.

use rusqlite::Connection;
use std::cell::Cell;
use std::time::{Duration, Instant};

/// How long a connection waits for a lock before SQLite reports it busy.
pub(super) const WAIT_LIMIT: Duration = Duration::from_secs(5);
/// How long a RESTART checkpoint waits for the write lock and then for readers.
pub(super) const RESTART_WAIT: Duration = Duration::from_millis(2);
/// How often a waiting connection tries again.
pub(super) const RETRY_EVERY: Duration = Duration::from_micros(200);

thread_local! {
    /// When this thread's current wait for a lock began.
    static WAITING_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Whether to try again after `tries` tries, waiting at most `limit` in all (sleeps
/// [`RETRY_EVERY`] first). A wait is one thread's: SQLite calls the handler on the thread
/// that asked for the lock, with `tries` 0 at the start of each wait.
fn retry_within(tries: i32, limit: Duration) -> bool {
    let since = WAITING_SINCE.with(|w| match w.get() {
        Some(t) if tries > 0 => t,
        _ => {
            let now = Instant::now();
            w.set(Some(now));
            now
        }
    });
    if since.elapsed() >= limit {
        return false;
    }
    std::thread::sleep(RETRY_EVERY);
    true
}

fn retry_up_to_limit(tries: i32) -> bool {
    retry_within(tries, WAIT_LIMIT)
}

fn retry_briefly(tries: i32) -> bool {
    retry_within(tries, RESTART_WAIT)
}

/// Makes `conn` wait up to [`WAIT_LIMIT`] for a lock, trying every [`RETRY_EVERY`].
pub(super) fn wait_for_locks(conn: &mut Connection) -> rusqlite::Result<()> {
    conn.busy_handler(Some(retry_up_to_limit))
}

/// Runs `f` with `conn` waiting only [`RESTART_WAIT`] for a lock (a RESTART checkpoint), then
/// restores [`wait_for_locks`].
pub(super) fn waiting_briefly<T>(
    conn: &mut Connection,
    f: impl FnOnce(&Connection) -> rusqlite::Result<T>,
) -> rusqlite::Result<T> {
    conn.busy_handler(Some(retry_briefly))?;
    let out = f(conn);
    wait_for_locks(conn)?;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wait_gives_up_after_its_limit_and_a_new_wait_starts_over() {
        let limit = Duration::from_millis(5);
        let start = Instant::now();
        let mut tries = 0;
        while retry_within(tries, limit) {
            tries += 1;
        }
        let waited = start.elapsed();
        assert!(waited >= limit, "gave up after {waited:?}");
        assert!(
            waited < Duration::from_secs(1),
            "waited {waited:?} for a {limit:?} limit"
        );
        assert!(tries >= 2, "tried {tries} times in {waited:?}");
        // The next wait (tries 0) has its own limit.
        assert!(retry_within(0, limit));
    }

    #[test]
    fn a_writer_waits_out_a_lock_held_for_a_while_and_a_brief_wait_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let holder = Connection::open(&path).unwrap();
        holder
            .execute_batch("PRAGMA journal_mode = WAL; CREATE TABLE t (x INTEGER);")
            .unwrap();
        let mut waiter = Connection::open(&path).unwrap();
        wait_for_locks(&mut waiter).unwrap();

        // Held for 20 ms: the waiter gets the lock once it is let go.
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            holder.execute_batch("COMMIT").unwrap();
            holder
        });
        waiter.execute_batch("BEGIN IMMEDIATE; COMMIT").unwrap();
        let holder = release.join().unwrap();

        // Held past the brief wait: busy, not an endless wait.
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = waiting_briefly(&mut waiter, |c| c.execute_batch("BEGIN IMMEDIATE"))
            .expect_err("the lock is held");
        assert!(err.to_string().contains("locked"), "{err}");
        holder.execute_batch("COMMIT").unwrap();
        waiter.execute_batch("BEGIN IMMEDIATE; COMMIT").unwrap();
    }
}
