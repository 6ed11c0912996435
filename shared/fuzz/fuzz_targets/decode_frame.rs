//! Feeds arbitrary bytes to `decode_frame` for every message type a peer can send first.
//!
//! Checks: no panic, no huge allocation (libFuzzer's -rss_limit_mb / -malloc_limit_mb catch
//! those), `consumed` within the input, and a decoded message re-encodes to a frame that decodes
//! to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ragd_shared::codec::{decode_frame, encode_frame};
use ragd_shared::protocol::handshake::{Hello, HelloReply};
use ragd_shared::protocol::messages::{Request, Response};
use ragd_shared::transfer::TransferHeader;
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

fn check<T: DeserializeOwned + Serialize + Debug>(data: &[u8]) {
    if let Ok((msg, consumed)) = decode_frame::<T>(data) {
        assert!(
            consumed <= data.len(),
            "consumed {consumed} of {}",
            data.len()
        );
        let frame = encode_frame(&msg).expect("a decoded message re-encodes");
        let (again, used) = decode_frame::<T>(&frame).expect("a re-encoded frame decodes");
        assert_eq!(used, frame.len());
        // Compared as bytes: a float field may hold NaN, which is not equal to itself.
        let reframed = encode_frame(&again).expect("and re-encodes");
        assert_eq!(reframed, frame, "{msg:?} changed in a round trip");
    }
}

fuzz_target!(|data: &[u8]| {
    check::<Hello>(data);
    check::<HelloReply>(data);
    check::<Request>(data);
    check::<Response>(data);
    check::<TransferHeader>(data);
});
