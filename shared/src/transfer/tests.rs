//! Unit tests of the transfer module; transfers over real QUIC connections are tested in
//! `shared/tests/transfer_quic.rs`.

use super::*;

fn header(name: &str, chunk_len: u32) -> TransferHeader {
    TransferHeader {
        transfer_id: 7,
        name: name.to_owned(),
        total_len: 10,
        chunk_len,
        blake3: [0; 32],
    }
}

#[test]
fn headers_with_absurd_fields_are_refused() {
    assert!(validate_header(&header("model.safetensors", CHUNK_LEN as u32)).is_ok());
    assert!(validate_header(&header("x", 0)).is_err());
    assert!(validate_header(&header("x", MAX_CHUNK_LEN + 1)).is_err());
    let long = "n".repeat(MAX_NAME_LEN + 1);
    let err = validate_header(&header(&long, 1)).unwrap_err();
    assert!(err.to_string().contains("use a shorter name"), "{err}");
}

#[test]
fn header_round_trips_through_the_codec() {
    let h = header("data/train.jsonl", CHUNK_LEN as u32);
    let frame = codec::encode_frame(&h).unwrap();
    assert_eq!(
        codec::decode_frame::<TransferHeader>(&frame).unwrap(),
        (h, frame.len())
    );
}

#[test]
fn chunks_never_exceed_the_buffer_or_the_rest() {
    assert_eq!(chunk_len_for(10, CHUNK_LEN), 10);
    assert_eq!(chunk_len_for(u64::MAX, CHUNK_LEN), CHUNK_LEN);
    assert_eq!(chunk_len_for(CHUNK_LEN as u64 + 1, CHUNK_LEN), CHUNK_LEN);
}

#[test]
fn stop_codes_are_explained() {
    let err = TransferError::StoppedByPeer {
        code: STOP_TOO_LARGE.into_inner(),
    };
    assert!(
        err.to_string().contains("larger than the receiver accepts"),
        "{err}"
    );
    let unknown = TransferError::StoppedByPeer { code: 99 };
    assert!(unknown.to_string().contains("receiver's log"), "{unknown}");
}

#[test]
fn reset_codes_are_explained_and_only_a_cancel_is_no_fault() {
    let reset = |code: VarInt| TransferError::from(quinn::ReadError::Reset(code));
    let cancelled = reset(RESET_CANCELLED);
    assert!(cancelled.is_cancelled_by_sender());
    assert!(
        cancelled.to_string().contains("task was cancelled"),
        "{cancelled}"
    );
    let short = reset(RESET_SOURCE_SHORT);
    assert!(!short.is_cancelled_by_sender());
    assert!(short.to_string().contains("file shrank"), "{short}");
    let unknown = reset(VarInt::from_u32(99));
    assert!(unknown.to_string().contains("sender's log"), "{unknown}");
}

#[test]
fn hash_mismatch_shows_both_hashes() {
    let err = TransferError::HashMismatch {
        name: "m".into(),
        expected: [0xab; 32],
        actual: [0xcd; 32],
    };
    let text = err.to_string();
    assert!(
        text.contains(&"ab".repeat(32)) && text.contains(&"cd".repeat(32)),
        "{text}"
    );
}

#[test]
fn bulk_config_accepts_any_timeouts() {
    // An idle timeout beyond QUIC's range is clamped, not a panic.
    let _ = bulk_transport_config(Duration::from_secs(5), Duration::MAX, 1452);
    let _ = bulk_transport_config(Duration::from_secs(5), Duration::from_secs(30), 1452);
}

#[test]
fn packets_too_large_for_offload_batches_go_one_per_write() {
    let offload = |payload| {
        let config =
            bulk_transport_config(Duration::from_secs(5), Duration::from_secs(30), payload);
        let debug = format!("{config:?}");
        assert!(debug.contains("enable_segmentation_offload"), "{debug}");
        !debug.contains("enable_segmentation_offload: false")
    };
    assert!(offload(1452));
    assert!(offload(crate::path_mtu::GSO_UDP_PAYLOAD));
    assert!(!offload(crate::path_mtu::GSO_UDP_PAYLOAD + 1));
    assert!(!offload(crate::path_mtu::IPV4_MAX_UDP_PAYLOAD));
}
