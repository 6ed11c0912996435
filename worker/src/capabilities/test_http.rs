//! Test support: a loopback HTTP server that plays an LLM endpoint, and a log capture.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// `GET /api/tags` as documented by Ollama (docs.ollama.com/api/tags).
pub(crate) const OLLAMA_TAGS: &str = r#"{"models":[
    {"name":"gemma3:latest","model":"gemma3:latest","modified_at":"2025-10-03T23:34:03.409490317-07:00",
     "size":3338801804,"digest":"a2af6cc3eb7fa8be8504abaf9b04e88f17a119ec3f04a3addf55f92841195f5a",
     "details":{"format":"gguf","family":"gemma","families":["gemma"],"parameter_size":"4.3B","quantization_level":"Q4_K_M"}},
    {"name":"llama3.2:1b","model":"llama3.2:1b","modified_at":"2025-09-01T10:00:00Z","size":1321098329,
     "digest":"baf6a787fdffd633537aa2eb51cfd54cb93ff08e28040095462bb63daf552878","details":{"format":"gguf"}}]}"#;

/// `GET /v1/models` as OpenAI specifies it.
pub(crate) const OPENAI_MODELS: &str = r#"{"object":"list","data":[
    {"id":"qwen2.5-7b-instruct","object":"model","created":1700000000,"owned_by":"llamacpp"},
    {"id":"phi-4","object":"model","created":1700000001,"owned_by":"llamacpp"}]}"#;

/// What a test server does with a connection.
#[derive(Clone, Copy)]
pub(crate) enum Behaviour {
    /// Answers /api/tags and /v1/models like the real servers, 404 elsewhere.
    Real,
    /// Answers 200 with a body that is not a model list.
    GarbageJson,
    /// Answers bytes that are not HTTP at all.
    NotHttp,
    /// Accepts and never answers.
    Silent,
}

/// A loopback HTTP server owned by the test: stopped and joined by `stop`.
pub(crate) struct TestServer {
    addr: SocketAddr,
    /// Request lines and Authorization headers seen, one string per request.
    seen: Arc<Mutex<Vec<String>>>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    pub(crate) async fn start(behaviour: Behaviour) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve(listener, behaviour, seen.clone(), cancel.clone()));
        Self {
            addr,
            seen,
            cancel,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) async fn stop(self) -> Vec<String> {
        self.cancel.cancel();
        self.task.await.unwrap();
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

async fn serve(
    listener: TcpListener,
    behaviour: Behaviour,
    seen: Arc<Mutex<Vec<String>>>,
    cancel: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { break };
                let (seen, cancel) = (seen.clone(), cancel.clone());
                connections.spawn(async move {
                    tokio::select! {
                        () = cancel.cancelled() => {}
                        () = answer(stream, behaviour, seen) => {}
                    }
                });
            }
        }
    }
    connections.shutdown().await;
}

async fn answer(mut stream: TcpStream, behaviour: Behaviour, seen: Arc<Mutex<Vec<String>>>) {
    // Read the request head (bounded).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let head = String::from_utf8_lossy(&head).to_string();
    let request_line = head.lines().next().unwrap_or_default().to_string();
    let auth = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("authorization:"))
        .map(|l| l.trim().to_string())
        .unwrap_or_default();
    seen.lock()
        .unwrap()
        .push(format!("{request_line} | {auth}"));
    let path = request_line.split(' ').nth(1).unwrap_or_default();
    let (status, body) = match behaviour {
        Behaviour::Silent => {
            std::future::pending::<()>().await;
            return;
        }
        Behaviour::NotHttp => {
            let _ = stream
                .write_all(b"SSH-2.0-OpenSSH_9.2\r\ngarbage\r\n\r\n")
                .await;
            return;
        }
        Behaviour::GarbageJson => ("200 OK", "<html>hello, not a model list</html>"),
        Behaviour::Real => match path {
            "/api/tags" => ("200 OK", OLLAMA_TAGS),
            "/v1/models" => ("200 OK", OPENAI_MODELS),
            _ => ("404 Not Found", "404 page not found"),
        },
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// A port on which nothing listens (bound, then released).
pub(crate) async fn closed_port_url() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}")
}

/// Collects the log output of the current thread while the guard lives.
#[derive(Clone, Default)]
pub(crate) struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    pub(crate) fn capture(&self) -> tracing::subscriber::DefaultGuard {
        let logs = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || logs.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    pub(crate) fn lines(&self, level: &str) -> Vec<String> {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .lines()
            .filter(|l| l.contains(level))
            .map(str::to_string)
            .collect()
    }
}
