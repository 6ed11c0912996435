//! The check both frame targets run: a frame that decodes stays within the input and survives
//! a round trip through the codec (compared as bytes, since a float field may hold NaN).

use ragd_shared::codec::{decode_frame, encode_frame};
use serde::{de::DeserializeOwned, Serialize};
use std::fmt::Debug;

/// Decodes `data` as a frame of `T`; if it decodes, checks `consumed` and the round trip.
pub fn check<T: DeserializeOwned + Serialize + Debug>(data: &[u8]) {
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
