//! Everything the fabric must refuse, each with a clear error, while the coordinator keeps
//! serving its real workers: a worker or client with another cluster's certificate, a client
//! with no certificate, a wrong or rotated join token, a revoked worker, an incompatible protocol
//! version, garbage / oversized / truncated frames, and a public-address peer.

use anyhow::{Context, Result};
use ragd_shared::identity::{
    self, AllowAll, ClusterCa, JoinSecret, JoinToken, NodeCredentials, WorkerKeyRequest,
    COORDINATOR_SERVER_NAME, WORKER_SERVER_NAME,
};
use ragd_shared::protocol::handshake::{Hello, RefusalReason, Role};
use ragd_shared::protocol::{VersionRange, ALPN, SUPPORTED_VERSIONS};
use ragd_shared::transport::{self, TransportError, CLOSE_REFUSED};
use ragd_tests::cluster::{free_udp_port, run, token_from, TestCluster};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const PUBLIC_PEER: &str = "198.51.100.7:7701";

fn client_endpoint() -> quinn::Endpoint {
    quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap()
}

/// Connects and runs a Hello round trip; returns the handshake result.
async fn hello_via(
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
    name: &str,
    hello: Hello,
) -> Result<(), TransportError> {
    let ep = client_endpoint();
    let conn = match ep.connect_with(cfg, addr, name).unwrap().await {
        Ok(c) => c,
        Err(source) => return Err(TransportError::Connection { peer: addr, source }),
    };
    let r = transport::client_handshake(&conn, &hello, Duration::from_secs(5))
        .await
        .map(|_| ());
    conn.close(0u32.into(), b"done");
    r
}

/// A client config that trusts the cluster CA but presents no certificate.
fn no_cert_client(ca_pem: &str) -> quinn::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap(),
    ))
}

/// Sends raw bytes as the first stream of an enrolment connection and returns how the
/// coordinator closed the connection.
async fn send_raw(
    addr: SocketAddr,
    pinned: identity::Fingerprint,
    bytes: &[u8],
) -> quinn::ConnectionError {
    let ep = client_endpoint();
    let conn = ep
        .connect_with(
            identity::enrolment_client_config(pinned).unwrap(),
            addr,
            COORDINATOR_SERVER_NAME,
        )
        .unwrap()
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(bytes).await;
    let _ = send.finish();
    tokio::time::timeout(Duration::from_secs(15), conn.closed())
        .await
        .expect("coordinator did not close the connection")
}

fn close_reason(e: &quinn::ConnectionError) -> (u64, String) {
    match e {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => (u64::MAX, other.to_string()),
    }
}

#[test]
fn the_fabric_refuses_what_it_must_and_keeps_serving() -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let mut cluster = TestCluster::new()?;
    cluster
        .env
        .push(("RAGD_COORD_RECONNECT_MAX".into(), "1s".into()));
    let token = cluster.init()?;
    let parsed: JoinToken = token.parse()?;
    let ca = ClusterCa::load(&cluster.coord_dir())?;

    // Another cluster, with a worker that the coordinator is told to dial.
    let foreign = ClusterCa::generate("someone else")?;
    let (rogue_key, rogue_csr) = WorkerKeyRequest::generate("rogue")?;
    let rogue_creds =
        NodeCredentials::from_parts(foreign.sign_worker_csr(&rogue_csr, "rogue")?, rogue_key)?;
    let rogue_port = free_udp_port();
    let rogue_addr: SocketAddr = format!("127.0.0.1:{rogue_port}").parse()?;
    let _rogue = {
        let _guard = rt.enter();
        let cfg =
            identity::worker_server_config(foreign.cert_pem(), &rogue_creds, Arc::new(AllowAll))?;
        let ep = quinn::Endpoint::server(cfg, rogue_addr)?;
        let accept = ep.clone();
        rt.spawn(async move {
            while let Some(incoming) = accept.accept().await {
                let _ = incoming.await;
            }
        });
        ep
    };

    let (alpha_port, bravo_port) = (free_udp_port(), free_udp_port());
    let mut args: Vec<String> = vec![
        "--no-mdns".into(),
        "--heartbeat-interval".into(),
        "300ms".into(),
    ];
    for p in [
        format!("127.0.0.1:{alpha_port}"),
        format!("127.0.0.1:{bravo_port}"),
        rogue_addr.to_string(),
        PUBLIC_PEER.into(),
    ] {
        args.push("--peer".into());
        args.push(p);
    }
    cluster.start_coordinator(&args)?;
    let coord = cluster.coord_addr();

    // Wrong join token (right cluster, wrong secret): refused with a clear error.
    let wrong = JoinToken {
        ca_fingerprint: parsed.ca_fingerprint,
        secret: JoinSecret::generate()?,
    }
    .to_string();
    let out = cluster.join("mallory", &wrong)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("wrong or was rotated"),
        "wrong token not refused clearly: {err}"
    );

    // A coordinator address outside the LAN is not dialled by `join` (the same guard as peers).
    let started = std::time::Instant::now();
    let out = cluster
        .worker_cmd("mallory")
        .args([
            "--no-mdns",
            "join",
            &token,
            "--coordinator",
            PUBLIC_PEER,
            "--name",
            "mallory",
        ])
        .output()?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("allowed_networks"),
        "a public coordinator address was not refused by the guard: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "it was dialled");

    // A token of another cluster: the worker refuses the coordinator (pinned CA mismatch).
    let other = JoinToken::generate(foreign.fingerprint())?.to_string();
    let out = cluster.join("mallory", &other)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("another cluster"),
        "foreign token not refused clearly: {err}"
    );

    for name in ["alpha", "bravo"] {
        let out = cluster.join(name, &token)?;
        assert!(
            out.status.success(),
            "join {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let no_mdns = vec!["--no-mdns".to_string()];
    let _alpha = cluster.start_worker("alpha", alpha_port, &no_mdns)?;
    let _bravo = cluster.start_worker("bravo", bravo_port, &no_mdns)?;
    cluster.wait_for(Duration::from_secs(30), "alpha and bravo Ready", |c| {
        Ok(c.state_of("alpha")?.as_deref() == Some("Ready")
            && c.state_of("bravo")?.as_deref() == Some("Ready"))
    })?;

    // Rotated token: the old one stops working, the new one works.
    let rotated = token_from(&run(cluster.coord_cmd().args(["token", "rotate"]))?)?;
    assert_ne!(rotated, token);
    let out = cluster.join("charlie", &token)?;
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("rotated"));
    let out = cluster.join("charlie", &rotated)?;
    assert!(
        out.status.success(),
        "rotated token refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A worker's name cannot be taken over, token or not (a join from another machine, here
    // another state directory, under the name of an enrolled worker).
    let join_as = |dir: &str, name: &str, token: &str| {
        cluster
            .worker_cmd(dir)
            .args(["--no-mdns", "join", token, "--coordinator"])
            .arg(cluster.coord_addr().to_string())
            .args(["--name", name])
            .output()
    };
    let out = join_as("impostor", "alpha", &rotated)?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains("already enrolled")
            && err.contains("workers replace"),
        "a join under an enrolled name was not refused: {err}"
    );
    // `workers replace` lets a reinstalled machine take its name with the same token.
    run(cluster.coord_cmd().args(["workers", "replace", "charlie"]))?;
    let out = join_as("charlie-reinstalled", "charlie", &rotated)?;
    assert!(
        out.status.success(),
        "the replacement was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `workers remove` rotates the token (the removed machine knew it) and says so.
    let said = run(cluster.coord_cmd().args(["workers", "remove", "charlie"]))?;
    assert!(said.contains("rotated"), "{said}");
    let fresh = token_from(&said)?;
    assert_ne!(fresh, rotated);
    let out = join_as("delta", "delta", &rotated)?;
    assert!(
        !out.status.success(),
        "the token of before the removal still works"
    );
    let out = join_as("delta", "delta", &fresh)?;
    assert!(
        out.status.success(),
        "the token printed by remove was refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let alpha: SocketAddr = format!("127.0.0.1:{alpha_port}").parse()?;
    rt.block_on(async {
        // A client with another cluster's (coordinator) certificate, dialling a real worker.
        let foreign_coord = foreign.issue_coordinator("coord")?;
        let cfg =
            identity::coordinator_client_config(ca.cert_pem(), &foreign_coord, Arc::new(AllowAll))?;
        let err = hello_via(
            cfg,
            alpha,
            WORKER_SERVER_NAME,
            Hello::new(Role::Coordinator, "coord"),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, TransportError::Connection { .. }),
            "foreign cert not refused by TLS: {err}"
        );
        eprintln!("foreign-CA client -> worker: {err}");

        // A client with no certificate, dialling a real worker.
        let err = hello_via(
            no_cert_client(ca.cert_pem()),
            alpha,
            WORKER_SERVER_NAME,
            Hello::new(Role::Coordinator, "x"),
        )
        .await
        .unwrap_err();
        assert!(
            matches!(err, TransportError::Connection { .. }),
            "no-cert client not refused by TLS: {err}"
        );
        eprintln!("no-cert client -> worker: {err}");

        // A client with no certificate claiming to be a worker, at the coordinator.
        let cfg = identity::enrolment_client_config(parsed.ca_fingerprint)?;
        let err = hello_via(
            cfg,
            coord,
            COORDINATOR_SERVER_NAME,
            Hello::new(Role::Worker, "alpha"),
        )
        .await
        .unwrap_err();
        let refusal = err
            .refusal()
            .cloned()
            .with_context(|| format!("expected a refusal, got {err}"))?;
        assert!(
            refusal
                .message
                .contains("must present a cluster certificate"),
            "{refusal}"
        );

        // Incompatible protocol versions, both directions, with both ranges and advice.
        let mut hello = Hello::new(Role::Enrollee, "future");
        hello.versions = VersionRange::new(90, 99);
        let cfg = identity::enrolment_client_config(parsed.ca_fingerprint)?;
        let err = hello_via(cfg, coord, COORDINATOR_SERVER_NAME, hello.clone())
            .await
            .unwrap_err();
        let refusal = err
            .refusal()
            .cloned()
            .with_context(|| format!("expected a refusal, got {err}"))?;
        assert!(
            matches!(refusal.reason, RefusalReason::IncompatibleVersion(_)),
            "{refusal:?}"
        );
        assert!(
            refusal.message.contains("v90..=v99")
                && refusal.message.contains(&SUPPORTED_VERSIONS.to_string())
                && refusal.message.contains("upgrade"),
            "{refusal}"
        );
        let coord_creds = ca.issue_coordinator("coord")?;
        let cfg =
            identity::coordinator_client_config(ca.cert_pem(), &coord_creds, Arc::new(AllowAll))?;
        hello.role = Role::Coordinator;
        let err = hello_via(cfg, alpha, WORKER_SERVER_NAME, hello)
            .await
            .unwrap_err();
        assert!(
            matches!(
                err.refusal().map(|r| &r.reason),
                Some(RefusalReason::IncompatibleVersion(_))
            ),
            "{err}"
        );

        // Garbage, oversized and truncated frames: the connection is closed with a reason.
        for (what, bytes) in [
            ("garbage", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
            ("oversized", [&u32::MAX.to_be_bytes()[..], b"xx"].concat()),
            ("truncated", [&100u32.to_be_bytes()[..], b"short"].concat()),
            (
                "undecodable",
                [&8u32.to_be_bytes()[..], &[0xff; 8][..]].concat(),
            ),
        ] {
            let closed = send_raw(coord, parsed.ca_fingerprint, &bytes).await;
            let (code, reason) = close_reason(&closed);
            assert_eq!(code, CLOSE_REFUSED.into_inner(), "{what}: {closed}");
            assert!(
                reason.contains("Hello"),
                "{what}: unclear reason {reason:?}"
            );
            eprintln!("{what} frame -> {reason}");
        }
        // The admin socket rejects garbage too, without harming the daemon.
        let mut s = tokio::net::UnixStream::connect(cluster.coord_dir().join("admin.sock")).await?;
        s.write_all(&[0xff; 64]).await?;
        drop(s);
        anyhow::Ok(())
    })?;

    // Revoke bravo: Removed at once, its connection closed, every redial refused at TLS.
    run(cluster.coord_cmd().args(["workers", "remove", "bravo"]))?;
    assert_eq!(cluster.state_of("bravo")?.as_deref(), Some("Removed"));
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(cluster.state_of("bravo")?.as_deref(), Some("Removed"));

    // The coordinator logged clear reasons for the peers it refused to talk to.
    let log = cluster.coordinator.as_ref().unwrap().log_text();
    assert!(
        log.contains("198.51.100.7") && log.contains("allowed_networks"),
        "no LAN-guard message in the log"
    );
    assert!(
        log.contains(&rogue_addr.to_string()),
        "foreign-CA worker not reported"
    );
    assert!(
        log.contains("was removed"),
        "revoked worker's refusal not reported"
    );
    let ws = cluster.workers()?;
    assert!(
        ws.iter().all(|w| w["id"] != "rogue"),
        "foreign worker listed: {ws:?}"
    );

    // And it keeps serving its real worker.
    let seen = |c: &TestCluster| -> Result<u64> {
        Ok(c.workers()?
            .iter()
            .find(|w| w["id"] == "alpha")
            .and_then(|w| w["last_seen_ms"].as_u64())
            .unwrap_or(0))
    };
    let before = seen(&cluster)?;
    cluster.wait_for(Duration::from_secs(10), "alpha's next heartbeat", |c| {
        Ok(seen(c)? > before)
    })?;
    assert_eq!(cluster.state_of("alpha")?.as_deref(), Some("Ready"));
    Ok(())
}
