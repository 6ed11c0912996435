//! Feeds arbitrary bytes to `decode_frame` for every message type a peer can send first.
//!
//! Checks: no panic, no huge allocation (libFuzzer's -rss_limit_mb / -malloc_limit_mb catch
//! those), `consumed` within the input, and a decoded message re-encodes to a frame that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::protocol::handshake::{Hello, HelloReply};
use ragd_shared::protocol::messages::{Request, Response};
use ragd_shared::transfer::TransferHeader;
#[path = "roundtrip.rs"]
mod roundtrip;
use roundtrip::check;

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<HelloReply>(data);
    check::<Request>(data);
    check::<Response>(data);
    check::<TransferHeader>(data);
});
