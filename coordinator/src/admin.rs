//! The local admin channel: a Unix socket in the state directory through which `ragd-coord
//! workers`, `workers remove` and `token ...` reach the running daemon.
//!
//! Only the local admin can use it: the state directory is 0700, the socket 0600, and every
//! connection's peer credentials are checked (the owner of the state directory or root).

use ragd_shared::codec::{self, CodecError};
pub use ragd_shared::protocol::admin::{AdminRequest, AdminResponse};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// File name of the socket inside the state directory.
pub const SOCKET_NAME: &str = "admin.sock";

/// How long one admin exchange may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Errors of the admin channel.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The daemon is not running (or the socket is stale).
    #[error("the coordinator daemon is not running (nothing answers on {path}): start it with `ragd-coord serve`")]
    NotRunning {
        /// Socket path.
        path: PathBuf,
    },
    /// Socket I/O failed.
    #[error("admin socket {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// A frame could not be read or written.
    #[error("admin socket: {0}")]
    Codec(#[from] CodecError),
    /// The daemon did not answer in time.
    #[error("the coordinator daemon did not answer within {0:?}")]
    Timeout(Duration),
    /// The daemon closed the connection without answering.
    #[error("the coordinator daemon closed the admin connection without answering")]
    NoAnswer,
}

/// Sends one request to the daemon whose state directory is `state_dir`.
pub async fn call(state_dir: &Path, req: &AdminRequest) -> Result<AdminResponse, AdminError> {
    let path = state_dir.join(SOCKET_NAME);
    let mut stream = UnixStream::connect(&path)
        .await
        .map_err(|_| AdminError::NotRunning { path: path.clone() })?;
    tokio::time::timeout(ADMIN_TIMEOUT, async {
        codec::write_frame(&mut stream, req).await?;
        codec::read_frame::<_, AdminResponse>(&mut stream)
            .await?
            .ok_or(AdminError::NoAnswer)
    })
    .await
    .map_err(|_| AdminError::Timeout(ADMIN_TIMEOUT))?
}

/// Whether a daemon is serving `state_dir` (its admin socket accepts a connection).
pub fn daemon_listening(state_dir: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(state_dir.join(SOCKET_NAME)).is_ok()
}

/// Binds the admin socket (replacing a stale one) with owner-only permissions.
pub fn bind(state_dir: &Path) -> Result<UnixListener, AdminError> {
    let path = state_dir.join(SOCKET_NAME);
    let io = |source| AdminError::Io {
        path: path.clone(),
        source,
    };
    if path.exists() {
        if daemon_listening(state_dir) {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another coordinator daemon is already serving this state directory",
            )));
        }
        std::fs::remove_file(&path).map_err(io)?;
    }
    let listener = UnixListener::bind(&path).map_err(io)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map_err(io)?;
    Ok(listener)
}

/// Serves admin requests with `handler` until `cancel` fires; removes the socket afterwards.
pub async fn serve<H, F>(
    listener: UnixListener,
    state_dir: PathBuf,
    handler: H,
    cancel: CancellationToken,
) where
    H: Fn(AdminRequest) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = AdminResponse> + Send + 'static,
{
    use std::os::unix::fs::MetadataExt;
    let owner = std::fs::metadata(&state_dir).map(|m| m.uid()).ok();
    let mut tasks = JoinSet::new();
    loop {
        let (mut stream, _) = tokio::select! {
            _ = cancel.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(s) => s,
                Err(e) => { tracing::warn!(error = %e, "admin accept failed"); continue; }
            },
        };
        let uid = stream.peer_cred().ok().map(|c| c.uid());
        if uid.is_none() || (uid != owner && uid != Some(0)) {
            tracing::warn!(?uid, "refused an admin connection from another user");
            continue;
        }
        let handler = handler.clone();
        tasks.spawn(async move {
            let exchange = async {
                if let Some(req) = codec::read_frame::<_, AdminRequest>(&mut stream).await? {
                    let resp = handler(req).await;
                    codec::write_frame(&mut stream, &resp).await?;
                }
                Ok::<_, CodecError>(())
            };
            match tokio::time::timeout(ADMIN_TIMEOUT, exchange).await {
                Ok(Err(e)) => tracing::warn!(error = %e, "bad admin request"),
                Err(_) => tracing::warn!("admin client too slow"),
                Ok(Ok(())) => {}
            }
        });
    }
    tasks.shutdown().await;
    let _ = std::fs::remove_file(state_dir.join(SOCKET_NAME));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_stale_socket_and_second_daemon() {
        let dir = tempfile::tempdir().unwrap();
        // Nothing listening: a clear "not running" error.
        let err = call(dir.path(), &AdminRequest::ShowToken)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("ragd-coord serve"), "{err}");

        // A stale socket file (no daemon behind it) is replaced.
        drop(std::os::unix::net::UnixListener::bind(dir.path().join(SOCKET_NAME)).unwrap());
        let listener = bind(dir.path()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(SOCKET_NAME))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "socket mode {mode:o}");

        let cancel = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            dir.path().to_path_buf(),
            |req| async move {
                match req {
                    AdminRequest::RemoveWorker { id } => AdminResponse::Removed { id },
                    _ => AdminResponse::Error("unsupported".into()),
                }
            },
            cancel.clone(),
        ));
        // A second daemon on the same state directory is refused.
        assert!(bind(dir.path()).is_err());
        let resp = call(dir.path(), &AdminRequest::RemoveWorker { id: "w1".into() })
            .await
            .unwrap();
        assert_eq!(resp, AdminResponse::Removed { id: "w1".into() });
        // Garbage does not take the daemon down.
        let mut raw = UnixStream::connect(dir.path().join(SOCKET_NAME))
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut raw, &[0xff; 16])
            .await
            .unwrap();
        drop(raw);
        let resp = call(dir.path(), &AdminRequest::ShowToken).await.unwrap();
        assert_eq!(resp, AdminResponse::Error("unsupported".into()));

        cancel.cancel();
        server.await.unwrap();
        assert!(
            !dir.path().join(SOCKET_NAME).exists(),
            "socket not removed at shutdown"
        );
    }
}
