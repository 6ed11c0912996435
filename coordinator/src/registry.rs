//! The live view of the cluster: every known worker, its state and what it last reported.
//!
//! Keyed by worker id, so a worker that restarts with the same identity (or is found both by mDNS
//! and as a static peer) is one entry, never a ghost duplicate.

pub use ragd_shared::protocol::admin::{WorkerRecord, WorkerState};
use ragd_shared::protocol::capabilities::{Capabilities, Load};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::RwLock;

use crate::store::now_ms;

/// A successful connection to a worker.
#[derive(Debug, Clone)]
pub struct Connected {
    /// Worker id.
    pub id: String,
    /// Remote address.
    pub addr: SocketAddr,
    /// How it was found.
    pub found_by: &'static str,
    /// Negotiated version.
    pub version: u16,
    /// Capabilities from the Welcome.
    pub capabilities: Option<Capabilities>,
}

/// The live table of workers.
#[derive(Debug, Default)]
pub struct Registry {
    workers: RwLock<BTreeMap<String, WorkerRecord>>,
}

impl Registry {
    fn update<T>(&self, f: impl FnOnce(&mut BTreeMap<String, WorkerRecord>) -> T) -> T {
        f(&mut self.workers.write().unwrap_or_else(|p| p.into_inner()))
    }

    /// Adds an enrolled worker not seen yet (Unreachable), or a removed one (Removed).
    pub fn insert_enrolled(&self, id: &str, removed: bool) {
        let state = if removed {
            WorkerState::Removed
        } else {
            WorkerState::Unreachable
        };
        self.update(|w| {
            let rec = w
                .entry(id.to_string())
                .or_insert_with(|| WorkerRecord::new(id, state, now_ms()));
            rec.set_state(state, now_ms());
        });
    }

    /// Records a completed handshake.
    pub fn connected(&self, c: Connected) {
        self.update(|w| {
            let rec = w
                .entry(c.id.clone())
                .or_insert_with(|| WorkerRecord::new(&c.id, WorkerState::Unreachable, now_ms()));
            rec.addr = Some(c.addr);
            rec.found_by = Some(c.found_by.to_string());
            rec.protocol_version = Some(c.version);
            if c.capabilities.is_some() {
                rec.capabilities = c.capabilities;
            }
            rec.last_seen_ms = Some(now_ms());
            rec.last_error = None;
            if rec.state != WorkerState::Removed {
                rec.set_state(WorkerState::Ready, now_ms());
            }
        });
    }

    /// The protocol version negotiated with a worker on its latest connection.
    pub fn protocol_version(&self, id: &str) -> Option<u16> {
        self.record(id, |r| r.protocol_version).flatten()
    }

    /// Records a heartbeat answer.
    pub fn heartbeat(&self, id: &str, load: Load, capabilities: Option<Capabilities>) {
        self.update(|w| {
            if let Some(rec) = w.get_mut(id) {
                rec.last_seen_ms = Some(now_ms());
                rec.load = Some(load);
                if capabilities.is_some() {
                    rec.capabilities = capabilities;
                }
                if rec.state == WorkerState::Removed {
                    return;
                }
                let busy = load.total_slots > 0 && load.busy_slots >= load.total_slots;
                rec.set_state(
                    if busy {
                        WorkerState::Busy
                    } else {
                        WorkerState::Ready
                    },
                    now_ms(),
                );
            }
        });
    }

    /// Records that a worker stopped answering.
    pub fn unreachable(&self, id: &str, why: &str) {
        self.update(|w| {
            if let Some(rec) = w.get_mut(id) {
                rec.last_error = Some(why.to_string());
                if rec.state != WorkerState::Removed {
                    rec.set_state(WorkerState::Unreachable, now_ms());
                }
            }
        });
    }

    /// Records a removal by the admin.
    pub fn removed(&self, id: &str) {
        self.update(|w| {
            w.entry(id.to_string())
                .or_insert_with(|| WorkerRecord::new(id, WorkerState::Removed, now_ms()))
                .set_state(WorkerState::Removed, now_ms())
        });
    }

    /// The state of one worker.
    pub fn state_of(&self, id: &str) -> Option<WorkerState> {
        self.record(id, |r| r.state)
    }

    /// `f` of one worker's record, if it is known.
    fn record<T>(&self, id: &str, f: impl FnOnce(&WorkerRecord) -> T) -> Option<T> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(f)
    }

    /// A copy of every record, ordered by id.
    pub fn snapshot(&self) -> Vec<WorkerRecord> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifecycle_keeps_one_entry_per_id_and_removal_sticks() {
        let reg = Registry::default();
        reg.insert_enrolled("w1", false);
        assert_eq!(reg.state_of("w1"), Some(WorkerState::Unreachable));
        let connect = || Connected {
            id: "w1".into(),
            addr: "127.0.0.1:7701".parse().unwrap(),
            found_by: "static",
            version: 1,
            capabilities: None,
        };
        reg.connected(connect());
        assert_eq!(reg.state_of("w1"), Some(WorkerState::Ready));
        let full = Load {
            busy_slots: 1,
            total_slots: 1,
            available_memory_bytes: 1,
        };
        reg.heartbeat("w1", full, None);
        assert_eq!(reg.state_of("w1"), Some(WorkerState::Busy));
        reg.unreachable("w1", "timeout");
        assert_eq!(reg.state_of("w1"), Some(WorkerState::Unreachable));
        reg.connected(connect());
        assert_eq!(reg.snapshot().len(), 1);
        reg.removed("w1");
        reg.connected(connect());
        reg.heartbeat("w1", Load::default(), None);
        reg.unreachable("w1", "x");
        assert_eq!(reg.state_of("w1"), Some(WorkerState::Removed));
    }
}
