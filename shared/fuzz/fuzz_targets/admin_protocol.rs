//! Feeds arbitrary bytes to the admin protocol's decoder: what the coordinator daemon reads
//! from its Unix socket ([`AdminRequest`]) and what the CLI reads back ([`AdminResponse`]).
//!
//! Checks: no panic, no huge allocation, `consumed` within the input, and a decoded message
//! re-encodes to a frame that decodes to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::codec::{decode_frame, encode_frame};
use ragd_shared::protocol::admin::{AdminRequest, AdminResponse};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

fn check<T: DeserializeOwned + Serialize + Debug>(data: &[u8]) {
    if let Ok((msg, consumed)) = decode_frame::<T>(data) {
        assert!(consumed <= data.len());
        let frame = encode_frame(&msg).expect("a decoded message re-encodes");
        let (again, used) = decode_frame::<T>(&frame).expect("a re-encoded frame decodes");
        assert_eq!(used, frame.len());
        // Compared as bytes: a float field may hold NaN, which is not equal to itself.
        let reframed = encode_frame(&again).expect("and re-encodes");
        assert_eq!(reframed, frame, "{msg:?} changed in a round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check::<AdminRequest>(data);
    check::<AdminResponse>(data);
});
