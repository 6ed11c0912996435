//! The live view of the cluster: every known worker, its state and what it last reported.
//!
//! Keyed by worker id, so a worker that restarts with the same identity (or is found both by mDNS
//! and as a static peer) is one entry, never a ghost duplicate.

use ragd_shared::protocol::capabilities::{Capabilities, Load};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::RwLock;

use crate::store::now_ms;

/// Where a worker stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WorkerState {
    /// Connected, answering heartbeats, with free work slots.
    Ready,
    /// Connected and answering, but every work slot is in use.
    Busy,
    /// Enrolled but not answering (never seen since start, or heartbeats missed).
    Unreachable,
    /// Removed by the admin; its certificate is refused.
    Removed,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Ready => "ready",
            WorkerState::Busy => "busy",
            WorkerState::Unreachable => "unreachable",
            WorkerState::Removed => "removed",
        })
    }
}

/// Everything the coordinator knows about one worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// Worker id (from its certificate).
    pub id: String,
    /// Current state.
    pub state: WorkerState,
    /// When the state last changed (unix ms).
    pub state_since_ms: u64,
    /// Last successful heartbeat or handshake (unix ms).
    pub last_seen_ms: Option<u64>,
    /// Address of the current or last connection.
    pub addr: Option<SocketAddr>,
    /// How the worker was found ("mdns" or "static").
    pub found_by: Option<String>,
    /// Negotiated protocol version of the current or last connection.
    pub protocol_version: Option<u16>,
    /// Capabilities from the handshake, refreshed by heartbeats.
    pub capabilities: Option<Capabilities>,
    /// Load from the last heartbeat.
    pub load: Option<Load>,
    /// Why the worker is unreachable, when it is.
    pub last_error: Option<String>,
}

impl WorkerRecord {
    fn new(id: &str, state: WorkerState) -> Self {
        Self {
            id: id.to_string(),
            state,
            state_since_ms: now_ms(),
            last_seen_ms: None,
            addr: None,
            found_by: None,
            protocol_version: None,
            capabilities: None,
            load: None,
            last_error: None,
        }
    }

    fn set_state(&mut self, state: WorkerState) {
        if self.state != state {
            tracing::info!(worker = %self.id, from = %self.state, to = %state, "worker state changed");
            self.state = state;
            self.state_since_ms = now_ms();
        }
    }
}

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
                .or_insert_with(|| WorkerRecord::new(id, state));
            rec.set_state(state);
        });
    }

    /// Records a completed handshake.
    pub fn connected(&self, c: Connected) {
        self.update(|w| {
            let rec = w
                .entry(c.id.clone())
                .or_insert_with(|| WorkerRecord::new(&c.id, WorkerState::Unreachable));
            rec.addr = Some(c.addr);
            rec.found_by = Some(c.found_by.to_string());
            rec.protocol_version = Some(c.version);
            if c.capabilities.is_some() {
                rec.capabilities = c.capabilities;
            }
            rec.last_seen_ms = Some(now_ms());
            rec.last_error = None;
            if rec.state != WorkerState::Removed {
                rec.set_state(WorkerState::Ready);
            }
        });
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
                rec.set_state(if busy {
                    WorkerState::Busy
                } else {
                    WorkerState::Ready
                });
            }
        });
    }

    /// Records that a worker stopped answering.
    pub fn unreachable(&self, id: &str, why: &str) {
        self.update(|w| {
            if let Some(rec) = w.get_mut(id) {
                rec.last_error = Some(why.to_string());
                if rec.state != WorkerState::Removed {
                    rec.set_state(WorkerState::Unreachable);
                }
            }
        });
    }

    /// Records a removal by the admin.
    pub fn removed(&self, id: &str) {
        self.update(|w| {
            w.entry(id.to_string())
                .or_insert_with(|| WorkerRecord::new(id, WorkerState::Removed))
                .set_state(WorkerState::Removed)
        });
    }

    /// The state of one worker.
    pub fn state_of(&self, id: &str) -> Option<WorkerState> {
        self.workers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .map(|r| r.state)
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
