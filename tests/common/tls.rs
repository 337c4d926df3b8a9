//! TLS for the fake Symphony pod: a throwaway CA (rcgen), a server certificate for the fake's
//! host names, a client certificate for the bot, and a TLS front (tokio-rustls) that
//! terminates HTTPS and forwards the plain bytes to one of two inner listeners of the fake —
//! one for connections that presented a client certificate signed by the CA, one for those
//! that did not. The fake tells them apart by the local port, so a request can only reach the
//! certificate endpoints if its connection really was mutually authenticated.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;

pub struct Pki {
    pub ca_pem: String,
    server_cert_der: Vec<u8>,
    server_key_der: Vec<u8>,
    /// The bot's certificate followed by its private key (PEM), as `bot_certificate_*` takes.
    pub client_pem: String,
    /// A certificate and key from another CA (the pod must refuse it).
    pub stranger_pem: String,
}

impl Pki {
    /// A CA, a server certificate for `hosts`, and a client certificate with common name
    /// `bot_username`.
    pub fn new(hosts: &[&str], bot_username: &str) -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.distinguished_name.push(DnType::CommonName, "patchbay test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::from_params(&ca_params, &ca_key);

        let server_key = KeyPair::generate().unwrap();
        let mut server_params = CertificateParams::new(hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()).unwrap();
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();

        let client = |username: &str, issuer: &Issuer<'_, &KeyPair>| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.distinguished_name.push(DnType::CommonName, username);
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let cert = params.signed_by(&key, issuer).unwrap();
            format!("{}{}", cert.pem(), key.serialize_pem())
        };
        let client_pem = client(bot_username, &issuer);

        let other_key = KeyPair::generate().unwrap();
        let mut other_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        other_params.distinguished_name.push(DnType::CommonName, "some other CA");
        other_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let other_issuer = Issuer::from_params(&other_params, &other_key);
        let stranger_pem = client(bot_username, &other_issuer);

        Pki {
            ca_pem: ca_cert.pem(),
            server_cert_der: server_cert.der().to_vec(),
            server_key_der: server_key.serialize_der(),
            client_pem,
            stranger_pem,
        }
    }

    pub fn write_ca(&self, dir: &Path) -> String {
        let p = dir.join("symphony-ca.pem");
        std::fs::write(&p, &self.ca_pem).unwrap();
        p.display().to_string()
    }
}

/// Starts the TLS front on 127.0.0.1; answers its port. Connections with a verified client
/// certificate are forwarded to `with_cert`, the others to `anonymous`.
pub async fn front(pki: &Pki, anonymous: u16, with_cert: u16) -> (u16, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca_der = {
        let b64: String = pki.ca_pem.lines().filter(|l| !l.starts_with("-----")).collect();
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64).unwrap()
    };
    roots.add(CertificateDer::from(ca_der)).unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![CertificateDer::from(pki.server_cert_der.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key_der.clone())),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = tokio::spawn(async move {
        loop {
            let Ok((socket, _)) = listener.accept().await else { continue };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(socket).await else { return };
                let has_cert = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let Ok(mut inner) = TcpStream::connect(("127.0.0.1", if has_cert { with_cert } else { anonymous })).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut inner).await;
            });
        }
    });
    (port, task)
}
