//! Property tests of the codec over the real protocol types.

use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use ragd_shared::codec::{
    decode, decode_frame, encode, encode_frame, read_frame, CodecError, LEN_PREFIX_BYTES,
    MAX_FRAME_LEN,
};
use ragd_shared::protocol::capabilities::{
    Backend, Capabilities, GpuInfo, LlmApi, LlmEndpoint, Load,
};
use ragd_shared::protocol::handshake::{Hello, HelloReply, Refusal, RefusalReason, Role, Welcome};
use ragd_shared::protocol::messages::{
    EnrolReply, EnrolRequest, ErrorCode, ErrorReply, HeartbeatReply, HeartbeatRequest, Request,
    Response,
};
use ragd_shared::protocol::{VersionMismatch, VersionRange};
use ragd_shared::transfer::TransferHeader;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fmt::Debug;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, ReadBuf};

// ---- strategies for the protocol types ----

fn text() -> impl Strategy<Value = String> {
    prop_oneof![any::<String>(), "[a-z0-9.-]{0,24}".prop_map(String::from)]
}

fn version_range() -> impl Strategy<Value = VersionRange> {
    (any::<u16>(), any::<u16>()).prop_map(|(min, max)| VersionRange { min, max })
}

fn role() -> impl Strategy<Value = Role> {
    prop_oneof![
        Just(Role::Coordinator),
        Just(Role::Worker),
        Just(Role::Enrollee)
    ]
}

fn backend() -> impl Strategy<Value = Backend> {
    prop_oneof![
        Just(Backend::Cpu),
        Just(Backend::Cuda),
        Just(Backend::Metal)
    ]
}

fn hello() -> impl Strategy<Value = Hello> {
    (version_range(), role(), text(), text()).prop_map(|(versions, role, node_id, software)| {
        Hello {
            versions,
            role,
            node_id,
            software,
        }
    })
}

fn gpu() -> impl Strategy<Value = GpuInfo> {
    (
        backend(),
        any::<u32>(),
        text(),
        any::<u64>(),
        option::of(any::<(u32, u32)>()),
    )
        .prop_map(
            |(backend, index, name, memory_bytes, compute_capability)| GpuInfo {
                backend,
                index,
                name,
                memory_bytes,
                compute_capability,
            },
        )
}

fn llm_endpoint() -> impl Strategy<Value = LlmEndpoint> {
    (
        text(),
        prop_oneof![Just(LlmApi::Ollama), Just(LlmApi::OpenAiCompatible)],
        text(),
        vec(text(), 0..4),
    )
        .prop_map(|(name, api, url, models)| LlmEndpoint {
            name,
            api,
            url,
            models,
        })
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (
        (text(), text(), text(), text()),
        (any::<u32>(), any::<u64>(), any::<u64>()),
        vec(gpu(), 0..3),
        vec(backend(), 0..3),
        vec(llm_endpoint(), 0..3),
    )
        .prop_map(
            |((os, arch, hostname, cpu_model), (cores, total, avail), gpus, backends, llms)| {
                Capabilities {
                    os,
                    arch,
                    hostname,
                    cpu_model,
                    logical_cores: cores,
                    total_memory_bytes: total,
                    available_memory_bytes: avail,
                    gpus,
                    backends,
                    llm_endpoints: llms,
                }
            },
        )
}

fn load() -> impl Strategy<Value = Load> {
    any::<(u32, u32, u64)>().prop_map(|(busy_slots, total_slots, available_memory_bytes)| Load {
        busy_slots,
        total_slots,
        available_memory_bytes,
    })
}

fn refusal() -> impl Strategy<Value = Refusal> {
    let reason = prop_oneof![
        (version_range(), version_range()).prop_map(|(ours, theirs)| {
            RefusalReason::IncompatibleVersion(VersionMismatch { ours, theirs })
        }),
        role().prop_map(|claimed| RefusalReason::WrongRole { claimed }),
        Just(RefusalReason::NotEnrolled),
        Just(RefusalReason::BadJoinToken),
        Just(RefusalReason::AddressNotAllowed),
        Just(RefusalReason::Malformed),
        Just(RefusalReason::AlreadyEnrolled),
    ];
    (reason, text()).prop_map(|(reason, message)| Refusal { reason, message })
}

fn hello_reply() -> impl Strategy<Value = HelloReply> {
    let welcome = (any::<u16>(), text(), text(), option::of(capabilities())).prop_map(
        |(version, node_id, software, capabilities)| Welcome {
            version,
            node_id,
            software,
            capabilities,
        },
    );
    prop_oneof![
        welcome.prop_map(HelloReply::Welcome),
        refusal().prop_map(HelloReply::Refused)
    ]
}

fn request() -> impl Strategy<Value = Request> {
    prop_oneof![
        any::<(u64, bool)>().prop_map(|(seq, want_capabilities)| Request::Heartbeat(
            HeartbeatRequest {
                seq,
                want_capabilities
            }
        )),
        (text(), text(), vec(any::<u8>(), 0..64)).prop_map(|(worker_id, csr_pem, proof)| {
            Request::Enrol(EnrolRequest {
                worker_id,
                csr_pem,
                proof,
            })
        }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let code = prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::Unsupported),
        Just(ErrorCode::Internal)
    ];
    prop_oneof![
        (any::<u64>(), load(), option::of(capabilities())).prop_map(|(seq, load, capabilities)| {
            Response::Heartbeat(HeartbeatReply {
                seq,
                load,
                capabilities,
            })
        }),
        (text(), text(), text()).prop_map(|(worker_cert_pem, ca_cert_pem, coordinator_id)| {
            Response::Enrolled(EnrolReply {
                worker_cert_pem,
                ca_cert_pem,
                coordinator_id,
            })
        }),
        refusal().prop_map(Response::Refused),
        (code, text()).prop_map(|(code, message)| Response::Error(ErrorReply { code, message })),
    ]
}

fn transfer_header() -> impl Strategy<Value = TransferHeader> {
    (
        any::<u64>(),
        text(),
        any::<u64>(),
        any::<u32>(),
        any::<[u8; 32]>(),
    )
        .prop_map(
            |(transfer_id, name, total_len, chunk_len, blake3)| TransferHeader {
                transfer_id,
                name,
                total_len,
                chunk_len,
                blake3,
            },
        )
}

// ---- helpers ----

/// Runs a future that never waits on anything but in-memory readers.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime")
        .block_on(f)
}

/// A reader that yields `data`, then fails the test if anything reads further.
struct NoReadsPast {
    data: Vec<u8>,
    pos: usize,
}

impl AsyncRead for NoReadsPast {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        assert!(
            self.pos < self.data.len(),
            "read_frame read past the length prefix of an oversized frame"
        );
        let n = buf.remaining().min(self.data.len() - self.pos);
        let start = self.pos;
        buf.put_slice(&self.data[start..start + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// All the properties a message type must have.
fn check_message<T>(msg: &T) -> Result<(), TestCaseError>
where
    T: Serialize + DeserializeOwned + PartialEq + Debug,
{
    // Round trip, body and frame.
    let body = encode(msg).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&decode::<T>(&body).unwrap(), msg);
    let frame = encode_frame(msg).unwrap();
    prop_assert_eq!(frame.len(), LEN_PREFIX_BYTES + body.len());
    prop_assert!(body.len() <= MAX_FRAME_LEN);
    prop_assert_eq!(
        &frame[..LEN_PREFIX_BYTES],
        &(body.len() as u32).to_be_bytes()[..]
    );
    let (back, used) = decode_frame::<T>(&frame).unwrap();
    prop_assert_eq!(&back, msg);
    prop_assert_eq!(used, frame.len());

    // Bytes after the message inside its body (or inside its frame) are refused.
    let mut padded = body.clone();
    padded.extend_from_slice(&[0, 1, 2]);
    prop_assert!(
        matches!(
            decode::<T>(&padded),
            Err(CodecError::TrailingBytes { extra: 3, .. })
        ),
        "a body with 3 extra bytes was not refused"
    );
    let mut padded_frame = (padded.len() as u32).to_be_bytes().to_vec();
    padded_frame.extend_from_slice(&padded);
    prop_assert!(
        matches!(
            decode_frame::<T>(&padded_frame),
            Err(CodecError::TrailingBytes { extra: 3, .. })
        ),
        "a frame with 3 extra body bytes was not refused"
    );

    // A frame followed by more bytes decodes and reports only its own length.
    let mut two = frame.clone();
    two.extend_from_slice(&frame);
    prop_assert_eq!(decode_frame::<T>(&two).unwrap().1, frame.len());

    // Every strict prefix is incomplete, from a buffer and from a stream.
    for cut in 0..frame.len() {
        let part = &frame[..cut];
        match decode_frame::<T>(part) {
            Err(CodecError::Truncated { needed, available }) => {
                prop_assert_eq!(available, cut);
                prop_assert!(needed > cut);
            }
            other => prop_assert!(false, "prefix of {} bytes gave {:?}", cut, other),
        }
        let mut reader = part;
        let read = block_on(read_frame::<_, T>(&mut reader));
        match (cut, read) {
            (0, Ok(None)) => {}
            (1..=3, Err(CodecError::UnexpectedEof)) => {}
            (4.., Err(CodecError::Truncated { .. })) => {}
            (_, other) => prop_assert!(false, "stream cut at {} gave {:?}", cut, other),
        }
    }

    // A whole frame read from a stream, then a clean end.
    let mut reader = &frame[..];
    let first = block_on(read_frame::<_, T>(&mut reader)).unwrap();
    prop_assert_eq!(first.as_ref(), Some(msg));
    prop_assert!(block_on(read_frame::<_, T>(&mut reader)).unwrap().is_none());
    Ok(())
}

/// Arbitrary bytes never panic and never claim more than the input.
fn check_garbage<T: DeserializeOwned + Debug>(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Ok((_, used)) = decode_frame::<T>(bytes) {
        prop_assert!(used <= bytes.len());
    }
    let _ = decode::<T>(bytes);
    let mut reader = bytes;
    let _ = block_on(read_frame::<_, T>(&mut reader));
    Ok(())
}

fn check_all_garbage(bytes: &[u8]) -> Result<(), TestCaseError> {
    check_garbage::<Hello>(bytes)?;
    check_garbage::<HelloReply>(bytes)?;
    check_garbage::<Request>(bytes)?;
    check_garbage::<Response>(bytes)?;
    check_garbage::<TransferHeader>(bytes)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    #[test]
    fn hello_properties(msg in hello()) { check_message(&msg)?; }

    #[test]
    fn hello_reply_properties(msg in hello_reply()) { check_message(&msg)?; }

    #[test]
    fn request_properties(msg in request()) { check_message(&msg)?; }

    #[test]
    fn response_properties(msg in response()) { check_message(&msg)?; }

    #[test]
    fn transfer_header_properties(msg in transfer_header()) { check_message(&msg)?; }

    #[test]
    fn oversized_prefix_is_refused_before_the_body(
        len in (MAX_FRAME_LEN as u32 + 1)..=u32::MAX,
        tail in vec(any::<u8>(), 0..16),
    ) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&tail);
        match decode_frame::<Response>(&buf) {
            Err(CodecError::FrameTooLarge { len: got, max }) => {
                prop_assert_eq!(got, u64::from(len));
                prop_assert_eq!(max, MAX_FRAME_LEN);
            }
            other => prop_assert!(false, "expected FrameTooLarge, got {:?}", other),
        }
        // From a stream: refused right after the prefix; reading further would panic the reader.
        let mut reader = NoReadsPast { data: len.to_be_bytes().to_vec(), pos: 0 };
        let read = block_on(read_frame::<_, Response>(&mut reader));
        prop_assert!(matches!(read, Err(CodecError::FrameTooLarge { .. })), "{:?}", read);
    }

    #[test]
    fn random_bytes_never_panic(bytes in vec(any::<u8>(), 0..256)) {
        check_all_garbage(&bytes)?;
    }

    #[test]
    fn random_bodies_behind_a_valid_prefix_never_panic(body in vec(any::<u8>(), 0..256)) {
        let mut frame = (body.len() as u32).to_be_bytes().to_vec();
        frame.extend_from_slice(&body);
        check_all_garbage(&frame)?;
    }

    #[test]
    fn mutated_frames_never_panic(
        msg in response(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
    ) {
        let mut frame = encode_frame(&msg).unwrap();
        for (at, byte) in flips {
            let i = at.index(frame.len());
            frame[i] ^= byte;
        }
        check_all_garbage(&frame)?;
    }
}
