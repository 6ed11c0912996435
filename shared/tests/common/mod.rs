//! What the QUIC tests share: one loopback connection with a self-signed rcgen certificate.

use quinn::{ClientConfig, Connection, Endpoint, ServerConfig};
use ragd_shared::protocol::ALPN;
use ragd_shared::transfer::bulk_transport_config;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Whole-test bound, so a hung transfer fails instead of blocking CI.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Both ends of one loopback connection; the endpoints stay alive as long as this does.
pub struct Loopback {
    _server: Endpoint,
    _client: Endpoint,
    pub client: Connection,
    pub server: Connection,
}

fn tls_configs() -> (ServerConfig, ClientConfig) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let cert_der: CertificateDer<'static> = cert.der().clone();
    let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));

    let mut server_tls = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert_der.clone()], key_der)
        .unwrap();
    server_tls.alpn_protocols = vec![ALPN.to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert_der).unwrap();
    let mut client_tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client_tls.alpn_protocols = vec![ALPN.to_vec()];

    let transport = Arc::new(bulk_transport_config(
        Duration::from_secs(2),
        Duration::from_secs(20),
        ragd_shared::path_mtu::MAX_UDP_PAYLOAD,
    ));
    let mut server = ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(server_tls).unwrap(),
    ));
    server.transport_config(transport.clone());
    let mut client = ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(client_tls).unwrap(),
    ));
    client.transport_config(transport);
    (server, client)
}

pub async fn loopback() -> Loopback {
    let (server_config, client_config) = tls_configs();
    let localhost: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let server = Endpoint::server(server_config, localhost).unwrap();
    let client = Endpoint::client(localhost).unwrap();
    let server_addr = server.local_addr().unwrap();
    let connecting = client
        .connect_with(client_config, server_addr, "localhost")
        .unwrap();
    let accepted = async { server.accept().await.expect("incoming").await.unwrap() };
    let (client_conn, server_conn) = tokio::join!(async { connecting.await.unwrap() }, accepted);
    Loopback {
        _server: server,
        _client: client,
        client: client_conn,
        server: server_conn,
    }
}
