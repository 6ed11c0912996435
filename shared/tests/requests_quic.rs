//! Request streams over a real QUIC connection on loopback.

mod common;
use common::{loopback, TEST_TIMEOUT};
use std::time::Duration;

/// A request and its answer are one frame each way, and each side reads its stream to the end:
/// neither sends STOP_SENDING, which used to cost one more packet each way per request (half of
/// the datagrams a coordinator's no-op task took in `bench_coordinator`).
#[tokio::test]
async fn requests_end_without_stop_sending() {
    use ragd_shared::protocol::jobs::TaskRef;
    use ragd_shared::protocol::messages::{Request, Response};
    use ragd_shared::transport::{request, serve_requests};
    tokio::time::timeout(TEST_TIMEOUT, async {
        let link = loopback().await;
        let cancel = tokio_util::sync::CancellationToken::new();
        let server = tokio::spawn(serve_requests(
            link.server.clone(),
            |req| async move {
                match req {
                    Request::ForgetTask(_) => Response::Forgotten,
                    other => panic!("unexpected request {other:?}"),
                }
            },
            Duration::from_secs(5),
            cancel.clone(),
        ));
        for attempt in 1..=20 {
            let forget = Request::ForgetTask(TaskRef {
                task_id: "t".into(),
                attempt,
            });
            let answer = request(&link.client, &forget, Duration::from_secs(5)).await;
            assert_eq!(answer.unwrap(), Response::Forgotten);
        }
        let (client, server_side) = (link.client.stats(), link.server.stats());
        assert_eq!(client.frame_rx.stream, 20, "one answer per request");
        assert_eq!(
            (
                client.frame_tx.stop_sending,
                server_side.frame_tx.stop_sending
            ),
            (0, 0)
        );
        cancel.cancel();
        server.await.unwrap();
    })
    .await
    .unwrap();
}
