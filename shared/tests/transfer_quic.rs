//! Bulk transfers over a real QUIC connection on loopback, with a self-signed rcgen certificate.

use quinn::Connection;
use ragd_shared::codec;
use ragd_shared::transfer::{
    receive_blob, receive_file, send_blob, send_file, TransferError, TransferHeader, CHUNK_LEN,
    RESET_CANCELLED, STOP_TOO_LARGE,
};
use std::time::Duration;

mod common;
use common::{loopback, TEST_TIMEOUT};

/// Deterministic, non-repeating test data.
fn data(len: usize) -> Vec<u8> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `body` raw after `header`, as a sender that does not use `send_blob` (may lie).
async fn send_raw(conn: &Connection, header: &TransferHeader, body: &[u8]) {
    let mut stream = conn.open_uni().await.unwrap();
    stream
        .write_all(&codec::encode_frame(header).unwrap())
        .await
        .unwrap();
    stream.write_all(body).await.unwrap();
    stream.finish().unwrap();
    // The receiver may stop the stream early; either way the sender is done.
    let _ = stream.stopped().await;
}

fn header_for(name: &str, body: &[u8]) -> TransferHeader {
    TransferHeader {
        transfer_id: 42,
        name: name.to_owned(),
        total_len: body.len() as u64,
        chunk_len: CHUNK_LEN as u32,
        blake3: *blake3::hash(body).as_bytes(),
    }
}

async fn receive_raw(conn: &Connection, max_len: u64) -> (Vec<u8>, Result<(), TransferError>) {
    let mut stream = conn.accept_uni().await.unwrap();
    let mut out = Vec::new();
    let result = receive_blob(&mut stream, max_len, &mut out)
        .await
        .map(|_| ());
    (out, result)
}

#[tokio::test]
async fn a_blob_arrives_whole_and_verified() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(3 * CHUNK_LEN + 17);
        let hash = *blake3::hash(&body).as_bytes();
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            send_blob(
                &mut stream,
                "train.jsonl",
                body.len() as u64,
                &body[..],
                hash,
            )
            .await
        };
        let receive = async {
            let mut stream = lo.server.accept_uni().await.unwrap();
            let mut out = Vec::new();
            let got = receive_blob(&mut stream, 1 << 30, &mut out).await;
            (got, out)
        };
        let (sent, (received, out)) = tokio::join!(send, receive);
        let sent = sent.unwrap();
        let (header, stats) = received.unwrap();
        assert_eq!(out, body);
        assert_eq!(header.name, "train.jsonl");
        assert_eq!(header.total_len, body.len() as u64);
        assert_eq!(header.transfer_id, sent.transfer_id);
        assert_eq!((stats.bytes, stats.hash), (body.len() as u64, hash));
        assert_eq!((sent.bytes, sent.hash), (body.len() as u64, hash));
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_empty_blob_is_a_valid_transfer() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let hash = *blake3::hash(b"").as_bytes();
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            send_blob(&mut stream, "empty", 0, &b""[..], hash).await
        };
        let (sent, (out, received)) = tokio::join!(send, receive_raw(&lo.server, 0));
        sent.unwrap();
        received.unwrap();
        assert!(out.is_empty());
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_sender_that_lies_about_the_hash_is_caught() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(CHUNK_LEN + 5);
        let mut header = header_for("model.safetensors", &body);
        header.blake3[0] ^= 1;
        let (_, (_, received)) = tokio::join!(
            send_raw(&lo.client, &header, &body),
            receive_raw(&lo.server, 1 << 30)
        );
        match received {
            Err(TransferError::HashMismatch {
                expected, actual, ..
            }) => {
                assert_eq!(expected, header.blake3);
                assert_eq!(actual, *blake3::hash(&body).as_bytes());
            }
            other => panic!("expected HashMismatch, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_truncated_stream_is_an_error() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(2 * CHUNK_LEN);
        let header = header_for("half", &body);
        let half = &body[..CHUNK_LEN + 3];
        let (_, (_, received)) = tokio::join!(
            send_raw(&lo.client, &header, half),
            receive_raw(&lo.server, 1 << 30)
        );
        match received {
            Err(TransferError::Truncated {
                expected, received, ..
            }) => assert_eq!((expected, received), (body.len() as u64, half.len() as u64)),
            other => panic!("expected Truncated, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn bytes_beyond_the_announced_length_are_refused() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(1000);
        let header = header_for("short", &body[..900]);
        let (_, (_, received)) = tokio::join!(
            send_raw(&lo.client, &header, &body),
            receive_raw(&lo.server, 1 << 30)
        );
        assert!(
            matches!(
                received,
                Err(TransferError::TrailingData { expected: 900, .. })
            ),
            "{received:?}"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn an_oversized_transfer_is_refused_and_the_sender_is_told() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(2 * CHUNK_LEN);
        let hash = *blake3::hash(&body).as_bytes();
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            send_blob(&mut stream, "big", body.len() as u64, &body[..], hash).await
        };
        let (sent, (out, received)) = tokio::join!(send, receive_raw(&lo.server, 1024));
        assert!(out.is_empty(), "no body byte may be written");
        match received {
            Err(TransferError::TooLarge { len, max, .. }) => {
                assert_eq!((len, max), (body.len() as u64, 1024))
            }
            other => panic!("expected TooLarge, got {other:?}"),
        }
        match sent {
            Err(TransferError::StoppedByPeer { code }) => {
                assert_eq!(code, STOP_TOO_LARGE.into_inner())
            }
            other => panic!("expected StoppedByPeer, got {other:?}"),
        }
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_short_source_resets_the_stream() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let body = data(1000);
        let hash = *blake3::hash(&body).as_bytes();
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            send_blob(&mut stream, "shrunk", 5000, &body[..], hash).await
        };
        let (sent, (_, received)) = tokio::join!(send, receive_raw(&lo.server, 1 << 30));
        assert!(
            matches!(
                sent,
                Err(TransferError::SourceShort {
                    expected: 5000,
                    got: 1000,
                    ..
                })
            ),
            "{sent:?}"
        );
        assert!(
            received.is_err(),
            "the receiver must not accept a reset stream"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_sender_dropped_mid_transfer_resets_the_stream_as_cancelled() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        // A source that yields its first chunk and then never more: the sender is dropped while
        // it waits, as a cancelled task's future is.
        let body = data(CHUNK_LEN);
        let hash = *blake3::hash(&body).as_bytes();
        let (mut tx, rx) = tokio::io::duplex(64 * 1024);
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            let sending = send_blob(&mut stream, "cancelled", 4 * CHUNK_LEN as u64, rx, hash);
            // Cancelled once the first chunk is through: the receiver already holds its bytes.
            let _ = tokio::time::timeout(Duration::from_millis(300), sending).await;
        };
        let feed = async {
            use tokio::io::AsyncWriteExt;
            tx.write_all(&body).await.unwrap();
            tx
        };
        let (_, _tx, (got, received)) = tokio::join!(send, feed, receive_raw(&lo.server, 1 << 30));
        let err = received.expect_err("a cancelled transfer must not be accepted");
        assert!(
            err.is_cancelled_by_sender(),
            "the receiver saw {err:?} ({err}) after {} bytes",
            got.len()
        );
        assert!(err.to_string().contains("cancelled"), "{err}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_sender_cancelled_inside_its_header_is_reported_as_cancelled() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            // Two bytes of the four-byte length prefix, then the reset a cancelled sender sends.
            stream.write_all(&[0, 0]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            stream.reset(RESET_CANCELLED).unwrap();
            stream
        };
        let (_stream, (got, received)) = tokio::join!(send, receive_raw(&lo.server, 1 << 30));
        let err = received.expect_err("a reset header is no transfer");
        assert!(got.is_empty());
        assert!(
            err.is_cancelled_by_sender(),
            "the receiver saw {err:?} ({err}), not the sender's cancel"
        );
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn files_move_verified_and_failures_leave_nothing_behind() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("source.bin");
        let body = data(CHUNK_LEN * 2 + 1);
        std::fs::write(&src, &body).unwrap();
        let dest = dir.path().join("copy.bin");

        let send = async {
            let mut stream = lo.client.open_uni().await.unwrap();
            send_file(&mut stream, &src, "source.bin").await
        };
        let receive = async {
            let mut stream = lo.server.accept_uni().await.unwrap();
            receive_file(&mut stream, 1 << 30, &dest).await
        };
        let (sent, received) = tokio::join!(send, receive);
        sent.unwrap();
        let (header, _) = received.unwrap();
        assert_eq!(header.name, "source.bin");
        assert_eq!(std::fs::read(&dest).unwrap(), body);

        // A corrupt transfer must leave neither the destination nor a partial file.
        let bad_dest = dir.path().join("bad.bin");
        let mut header = header_for("bad.bin", &body);
        header.blake3 = [0; 32];
        let receive = async {
            let mut stream = lo.server.accept_uni().await.unwrap();
            receive_file(&mut stream, 1 << 30, &bad_dest).await
        };
        let (_, received) = tokio::join!(send_raw(&lo.client, &header, &body), receive);
        assert!(
            matches!(received, Err(TransferError::HashMismatch { .. })),
            "{received:?}"
        );
        let mut names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["copy.bin", "source.bin"]);
    })
    .await
    .unwrap();
}

mod blob_pushes {
    use super::*;
    use ragd_shared::blobs::{accept_blobs, BlobStore};
    use ragd_shared::protocol::jobs::BlobId;
    use tokio_util::sync::CancellationToken;

    async fn wait_sealed(store: &BlobStore, id: &BlobId) -> bool {
        for _ in 0..100 {
            if store.has(id) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    #[tokio::test]
    async fn blobs_resume_and_corrupt_sources_are_never_sealed() {
        tokio::time::timeout(TEST_TIMEOUT, async {
            let tmp = tempfile::tempdir().unwrap();
            let sender = BlobStore::open(&tmp.path().join("sender")).unwrap();
            let receiver = BlobStore::open(&tmp.path().join("receiver")).unwrap();
            let lo = loopback().await;
            let cancel = CancellationToken::new();
            let intake = tokio::spawn(accept_blobs(
                lo.server.clone(),
                receiver.clone(),
                cancel.clone(),
            ));

            // A 3 MiB blob whose first MiB already arrived (an interrupted transfer).
            let data: Vec<u8> = (0..3 * CHUNK_LEN as u32).map(|i| (i % 253) as u8).collect();
            let id = sender.put_bytes(&data).unwrap();
            let partial = receiver.root().join("partial").join(id.to_hex());
            std::fs::write(&partial, &data[..CHUNK_LEN]).unwrap();
            let offset = receiver.holdings(&[id]).missing[0].unwrap();
            assert_eq!(offset, CHUNK_LEN as u64);
            let sent = sender.push(&lo.client, &id, offset).await.unwrap();
            assert_eq!(sent, 2 * CHUNK_LEN as u64, "only the missing part travels");
            assert!(wait_sealed(&receiver, &id).await);
            assert_eq!(receiver.read(&id).unwrap(), data);

            // Bit rot in the sender's copy: the receiver's whole-file check refuses it.
            let good = b"checkpoint bytes".repeat(1000);
            let id2 = sender.put_bytes(&good).unwrap();
            let mut rotten = good.clone();
            rotten[5000] ^= 0xff;
            std::fs::write(sender.path(&id2), &rotten).unwrap();
            sender.push(&lo.client, &id2, 0).await.unwrap();
            assert!(
                !wait_sealed(&receiver, &id2).await,
                "a corrupt blob was sealed"
            );
            assert_eq!(
                receiver.holdings(&[id2]).missing,
                vec![Some(0)],
                "and nothing kept"
            );
            cancel.cancel();
            intake.await.unwrap();
        })
        .await
        .expect("test timed out");
    }
}

/// Files in a directory (none when it does not exist).
fn files_in(dir: &std::path::Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn a_store_that_expects_refuses_unasked_pushes_before_writing_a_byte() {
    use ragd_shared::blobs::{accept_blobs, BlobError, BlobStore, Intake};
    use ragd_shared::transfer::STOP_NOT_EXPECTED;
    tokio::time::timeout(TEST_TIMEOUT, async {
        let lo = loopback().await;
        let tmp = tempfile::tempdir().unwrap();
        let worker = BlobStore::open(&tmp.path().join("worker")).unwrap();
        let coord = BlobStore::open_with(&tmp.path().join("coord"), Intake::Expected).unwrap();
        let cancel = tokio_util::sync::CancellationToken::new();
        let intake = tokio::spawn(accept_blobs(
            lo.server.clone(),
            coord.clone(),
            cancel.clone(),
        ));
        let body = data(3 * CHUNK_LEN + 5);
        let id = worker.put_bytes(&body).unwrap();
        let stopped = |e: &BlobError| {
            matches!(e, BlobError::Transfer(TransferError::StoppedByPeer { code })
                if *code == STOP_NOT_EXPECTED.into_inner())
        };
        let nothing_written = |coord: &BlobStore| {
            let partial = files_in(&coord.root().join("partial"));
            assert!(partial.is_empty(), "written before refusal: {partial:?}");
            assert!(files_in(&coord.root().join("objects")).is_empty());
        };

        // Nobody asked: refused from the header, nothing written.
        let e = worker.push(&lo.client, &id, 0).await.unwrap_err();
        assert!(stopped(&e), "{e}");
        nothing_written(&coord);

        // Asked, but the worker declared one byte less than it pushes: refused too.
        let len = body.len() as u64;
        let short = coord.expect(lo.server.stable_id(), id, 0, len);
        short.declare(len - 1).unwrap();
        let e = worker.push(&lo.client, &id, 0).await.unwrap_err();
        assert!(stopped(&e), "{e}");
        nothing_written(&coord);
        drop(short);

        // Asked and declared: received whole.
        let fetch = coord.expect(lo.server.stable_id(), id, 0, len);
        fetch.declare(len).unwrap();
        assert_eq!(worker.push(&lo.client, &id, 0).await.unwrap(), len);
        for _ in 0..100 {
            if coord.has(&id) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(coord.read(&id).unwrap(), body);
        // Held already: the next push stops at once and counts as done.
        assert_eq!(worker.push(&lo.client, &id, 0).await.unwrap(), 0);
        cancel.cancel();
        intake.await.unwrap();
    })
    .await
    .expect("test timed out");
}
