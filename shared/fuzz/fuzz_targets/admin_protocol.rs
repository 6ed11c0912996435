//! Feeds arbitrary bytes to the admin protocol's decoder: what the coordinator daemon reads
//! from its Unix socket ([`AdminRequest`]) and what the CLI reads back ([`AdminResponse`]).
//!
//! Checks: no panic, no huge allocation, `consumed` within the input, and a decoded message
//! re-encodes to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::protocol::admin::{AdminRequest, AdminResponse};
#[path = "roundtrip.rs"]
mod roundtrip;
use roundtrip::check;

fuzz_target!(|data: &[u8]| {
    check::<AdminRequest>(data);
    check::<AdminResponse>(data);
});
