//! Bulk-transfer throughput on loopback: ragd's QUIC path against TCP + TLS.
//!
//! Both paths send the same file (written once to a temporary directory, so read from the page
//! cache) over one stream, with mutual TLS 1.3 (rustls, ring, an rcgen CA) and BLAKE3
//! verification on receive, as the daemons send blobs:
//! - QUIC: `send_blob` from a `tokio::fs::File` / `receive_blob` over quinn with
//!   `bulk_transport_config`, on endpoints made as the daemons make theirs
//!   (`transport::bind_endpoint`: enlarged socket buffers);
//! - TCP: tokio-rustls, 8-byte length then the body, read from the file in 1 MiB chunks into one
//!   buffer by the sender and hashed in 1 MiB chunks by the receiver.
//!
//! Each run uses a fresh connection; the figure is the median of the runs, timed from the first
//! byte sent to the receiver's verified end. Each QUIC run also prints the packet size its path
//! MTU discovery reached (loopback: `path_mtu::IPV4_MAX_UDP_PAYLOAD`) and the packets lost.
//!
//! `cargo run --release -p ragd-tests --bin bench_transfer -- --size-mib 1024 --runs 3`

use anyhow::{bail, ensure, Context as _, Result};
use clap::Parser;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use ragd_shared::path_mtu::max_udp_payload_to;
use ragd_shared::protocol::ALPN;
use ragd_shared::transfer::{bulk_transport_config, receive_blob, send_blob, CHUNK_LEN};
use ragd_shared::transport::bind_endpoint;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Measure bulk-transfer throughput on loopback: ragd QUIC vs TCP + TLS")]
struct Args {
    /// Bytes to move per run, in MiB.
    #[arg(long, default_value_t = 1024)]
    size_mib: u64,
    /// Runs per path; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Give up on a single run after this many seconds.
    #[arg(long, default_value_t = 300)]
    run_timeout_s: u64,
    /// Measure one path only (`quic` or `tcp`), e.g. to profile it; no ratio is printed.
    #[arg(long, value_parser = ["quic", "tcp"])]
    only: Option<String>,
}

/// Certificates and keys for both sides, issued by one CA.
struct Pki {
    ca: CertificateDer<'static>,
    server_chain: Vec<CertificateDer<'static>>,
    server_key: PrivatePkcs8KeyDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivatePkcs8KeyDer<'static>,
}

fn make_pki() -> Result<Pki> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "bench cluster CA");
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca_params, ca_key);

    let leaf = |name: &str, usage: ExtendedKeyUsagePurpose| -> Result<_> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((
            vec![cert.der().clone()],
            PrivatePkcs8KeyDer::from(key.serialize_der()),
        ))
    };
    let (server_chain, server_key) = leaf("localhost", ExtendedKeyUsagePurpose::ServerAuth)?;
    let (client_chain, client_key) = leaf("bench-client", ExtendedKeyUsagePurpose::ClientAuth)?;
    Ok(Pki {
        ca: ca_cert.der().clone(),
        server_chain,
        server_key,
        client_chain,
        client_key,
    })
}

/// Mutual-TLS 1.3 rustls configs (ring provider) for a server and a client.
fn tls_configs(pki: &Pki) -> Result<(rustls::ServerConfig, rustls::ClientConfig)> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.ca.clone())?;
    let roots = Arc::new(roots);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .context("building the client certificate verifier")?;
    let server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            pki.server_chain.clone(),
            PrivateKeyDer::Pkcs8(pki.server_key.clone_key()),
        )?;
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            pki.client_chain.clone(),
            PrivateKeyDer::Pkcs8(pki.client_key.clone_key()),
        )?;
    Ok((server, client))
}

/// One QUIC transfer of the source file on a fresh connection; returns the elapsed time and what the
/// sender's path settled on.
async fn quic_run(pki: &Pki, source: Arc<Source>) -> Result<(Duration, QuicPath)> {
    let (mut server_tls, mut client_tls) = tls_configs(pki)?;
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    client_tls.alpn_protocols = vec![ALPN.to_vec()];
    let localhost: SocketAddr = "127.0.0.1:0".parse()?;
    // As the daemons do: the packet size bound from the route to the peer.
    let transport = Arc::new(bulk_transport_config(
        Duration::from_secs(5),
        Duration::from_secs(30),
        max_udp_payload_to(localhost),
    ));
    let mut server_config =
        quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(server_tls)?));
    server_config.transport_config(transport.clone());
    let mut client_config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(client_tls)?));
    client_config.transport_config(transport);

    let server = bind_endpoint(localhost, Some(server_config))?;
    let client = bind_endpoint(localhost, None)?;
    let server_addr = server.local_addr()?;
    let max_len = source.len;

    let receiver_endpoint = server.clone();
    let receiver = tokio::spawn(async move {
        let incoming = receiver_endpoint
            .accept()
            .await
            .context("server endpoint closed")?;
        let conn = incoming.await?;
        let mut stream = conn.accept_uni().await?;
        let (_, stats) = receive_blob(&mut stream, max_len, tokio::io::sink()).await?;
        anyhow::Ok((stats, conn))
    });
    let conn = client
        .connect_with(client_config, server_addr, "localhost")?
        .await?;
    let mut stream = conn.open_uni().await?;
    let hash = source.hash;
    let start = Instant::now();
    // The sender runs as a task, as in the daemons (not on the thread blocked in `main`).
    let sender = tokio::spawn(async move {
        let file = tokio::fs::File::open(&source.path).await?;
        anyhow::Ok(send_blob(&mut stream, "bench", source.len, file, source.hash).await?)
    });
    sender.await.context("sender task panicked")??;
    let (stats, server_conn) = receiver.await.context("receiver task panicked")??;
    let elapsed = start.elapsed();
    ensure!(
        stats.hash == hash && stats.bytes == max_len,
        "QUIC receiver got other bytes"
    );
    let path = conn.stats().path;
    let sent = QuicPath {
        mtu: path.current_mtu,
        lost_packets: path.lost_packets,
    };
    conn.close(0u32.into(), b"done");
    server_conn.close(0u32.into(), b"done");
    client.wait_idle().await;
    server.wait_idle().await;
    Ok((elapsed, sent))
}

/// What the sender's path settled on in one QUIC run.
struct QuicPath {
    /// Packet size (UDP payload) path MTU discovery reached.
    mtu: u16,
    /// Packets declared lost.
    lost_packets: u64,
}

/// One TCP + TLS transfer of the source file on a fresh connection; returns the elapsed time.
async fn tcp_run(pki: &Pki, source: Arc<Source>) -> Result<Duration> {
    let (server_tls, client_tls) = tls_configs(pki)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls));
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;

    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        let mut tls = acceptor.accept(tcp).await?;
        let total = tls.read_u64().await?;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; CHUNK_LEN];
        let mut received = 0u64;
        while received < total {
            let want = (total - received).min(CHUNK_LEN as u64) as usize;
            tls.read_exact(&mut buf[..want]).await?;
            hasher.update(&buf[..want]);
            received += want as u64;
        }
        if tls.read(&mut buf[..1]).await? != 0 {
            bail!("TCP sender sent more than it announced");
        }
        anyhow::Ok(*hasher.finalize().as_bytes())
    });
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let hash = source.hash;
    let start = Instant::now();
    let name = ServerName::try_from("localhost")?;
    let sender = tokio::spawn(async move {
        let mut tls = connector.connect(name, tcp).await?;
        let mut file = tokio::fs::File::open(&source.path).await?;
        tls.write_u64(source.len).await?;
        let mut buf = vec![0u8; CHUNK_LEN];
        let mut sent = 0u64;
        while sent < source.len {
            let want = (source.len - sent).min(CHUNK_LEN as u64) as usize;
            file.read_exact(&mut buf[..want]).await?;
            tls.write_all(&buf[..want]).await?;
            sent += want as u64;
        }
        tls.shutdown().await?;
        // Kept open until the receiver is done: closing a socket with unread bytes (the
        // server's session tickets) would reset the connection.
        anyhow::Ok(tls)
    });
    let _tls = sender.await.context("sender task panicked")??;
    let got = receiver.await.context("receiver task panicked")??;
    let elapsed = start.elapsed();
    ensure!(got == hash, "TCP receiver got other bytes");
    Ok(elapsed)
}

/// The file both paths send.
struct Source {
    path: std::path::PathBuf,
    len: u64,
    hash: [u8; 32],
}

/// Deterministic incompressible-looking bytes.
fn make_data(len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for word in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        word.copy_from_slice(&x.to_le_bytes()[..word.len()]);
    }
    data
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len().is_multiple_of(2) {
        (v[mid - 1] + v[mid]) / 2.0
    } else {
        v[mid]
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args = Args::parse();
    ensure!(args.runs >= 1, "--runs must be at least 1");
    ensure!(args.size_mib >= 1, "--size-mib must be at least 1");
    let len = usize::try_from(args.size_mib * 1024 * 1024).context("--size-mib too large")?;
    let pki = make_pki()?;
    let dir = tempfile::tempdir().context("creating a directory for the file to send")?;
    let source = {
        let data = make_data(len);
        let path = dir.path().join("source.bin");
        std::fs::write(&path, &data).with_context(|| format!("writing {}", path.display()))?;
        Arc::new(Source {
            path,
            len: len as u64,
            hash: *blake3::hash(&data).as_bytes(),
        })
    };
    let limit = Duration::from_secs(args.run_timeout_s);
    println!(
        "sending a {} MiB file per run, {} runs per path, loopback, mutual TLS 1.3 (rustls ring), BLAKE3 on receive",
        args.size_mib, args.runs
    );

    let mut quic = Vec::new();
    let mut tcp = Vec::new();
    // Interleave the paths so drift in machine load hits both alike.
    let run_quic = args.only.as_deref() != Some("tcp");
    let run_tcp = args.only.as_deref() != Some("quic");
    for run in 1..=args.runs {
        let mut line = format!("run {run}:");
        if run_quic {
            let (t, path) = tokio::time::timeout(limit, quic_run(&pki, source.clone()))
                .await
                .context("QUIC run timed out")??;
            let q = len as f64 / 1e6 / t.as_secs_f64();
            line += &format!(
                " QUIC {q:8.1} MB/s ({} B packets, {} lost)  ",
                path.mtu, path.lost_packets
            );
            quic.push(q);
        }
        if run_tcp {
            let t = tokio::time::timeout(limit, tcp_run(&pki, source.clone()))
                .await
                .context("TCP run timed out")??;
            let c = len as f64 / 1e6 / t.as_secs_f64();
            line += &format!(" TCP+TLS {c:8.1} MB/s");
            tcp.push(c);
        }
        println!("{line}");
    }
    if !(run_quic && run_tcp) {
        let (name, v) = if run_quic {
            ("QUIC", quic)
        } else {
            ("TCP+TLS", tcp)
        };
        println!("median: {name} {:.1} MB/s", median(v));
        return Ok(());
    }
    let (q, c) = (median(quic), median(tcp));
    println!(
        "median: QUIC {q:.1} MB/s, TCP+TLS {c:.1} MB/s, QUIC/TCP = {:.2}",
        q / c
    );
    Ok(())
}
