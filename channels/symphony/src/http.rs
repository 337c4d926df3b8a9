//! One HTTP client per endpoint (pod, agent, session auth, key manager), each with its own
//! proxy (Basic proxy authentication: HTTPS through `CONNECT`, plain HTTP in absolute form),
//! trusted CAs and, for certificate authentication, the bot's client certificate. The
//! environment's `HTTP(S)_PROXY` is ignored: the channel's settings are the whole truth.

use crate::settings::{Auth, Endpoint, Settings, Which};
use patchbay_channel_core::SettingsError;
use std::time::Duration;

#[derive(Clone)]
pub struct Clients {
    pod: reqwest::Client,
    agent: reqwest::Client,
    session_auth: reqwest::Client,
    key_manager: reqwest::Client,
}

impl Clients {
    pub fn new(s: &Settings) -> Result<Clients, SettingsError> {
        let identity = match &s.auth {
            Auth::Certificate(pem) => Some(
                reqwest::Identity::from_pem(pem.expose().as_bytes())
                    .map_err(|_| SettingsError::new("bot_certificate_content", "could not be used as a TLS client identity"))?,
            ),
            Auth::Rsa(_) => None,
        };
        Ok(Clients {
            pod: client(s, &s.pod, None)?,
            agent: client(s, &s.agent, None)?,
            // Only the certificate endpoints present the client certificate.
            session_auth: client(s, &s.session_auth, identity.clone())?,
            key_manager: client(s, &s.key_manager, identity)?,
        })
    }

    pub fn get(&self, which: Which) -> &reqwest::Client {
        match which {
            Which::Pod => &self.pod,
            Which::Agent => &self.agent,
            Which::SessionAuth => &self.session_auth,
            Which::KeyManager => &self.key_manager,
        }
    }
}

fn client(s: &Settings, ep: &Endpoint, identity: Option<reqwest::Identity>) -> Result<reqwest::Client, SettingsError> {
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        .user_agent(concat!("patchbay/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(s.timeout.min(Duration::from_secs(15)))
        .pool_idle_timeout(Duration::from_secs(50));
    if let Some(pem) = &s.trust_store {
        for cert in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| SettingsError::new("trust_store_path", format!("is not a PEM bundle: {e}")))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b = match &ep.proxy {
        None => b.no_proxy(),
        Some(p) => {
            let mut proxy = reqwest::Proxy::all(p.url())
                .map_err(|e| SettingsError::new(format!("{}host", p.prefix), format!("is not a usable proxy address: {e}")))?;
            if let (Some(u), Some(pw)) = (&p.username, &p.password) {
                proxy = proxy.basic_auth(u, pw.expose());
            }
            b.proxy(proxy)
        }
    };
    if let Some(id) = identity {
        b = b.identity(id);
    }
    b.build()
        .map_err(|e| SettingsError::new(format!("{}host", ep.which.prefix()), format!("cannot build an HTTP client: {e}")))
}

/// What went wrong on the way to an endpoint, before it answered.
#[derive(Clone, Debug, PartialEq)]
pub enum Transport {
    /// The proxy refused our credentials (407, or a `CONNECT` answered 407).
    ProxyAuth(String),
    /// The proxy could not be reached, or could not reach the endpoint.
    ProxyUnreachable(String),
    /// The TLS handshake failed (a certificate refused either way): needs an admin.
    Tls(String),
    /// Anything else: DNS, refused connection, timeout, a reset.
    Failed(String),
}

/// Words for a transport error: which endpoint, through which proxy, and the cause chain.
/// URLs hold no secret here (proxy credentials are never part of a URL).
pub fn transport_error(ep: &Endpoint, e: &reqwest::Error) -> Transport {
    use std::error::Error;
    let mut chain = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        chain.push(s.to_string());
        cur = s.source();
    }
    let detail = if chain.is_empty() { e.to_string() } else { chain.join(": ") };
    let via = ep.proxy.as_ref().map(|p| format!(" through the proxy {}", p.url())).unwrap_or_default();
    if let Some(p) = &ep.proxy {
        if detail.contains("proxy authorization required") {
            return Transport::ProxyAuth(proxy_refused(ep, p));
        }
    }
    let what = ep.which.label();
    if detail.contains("fatal alert") || detail.contains("invalid peer certificate") || detail.contains("UnknownIssuer") {
        return Transport::Tls(format!(
            "the TLS handshake with the {what} at {}{via} failed: {detail}; check trust_store_path (patchbay must trust the \
             {what}'s certificate) and, for certificate authentication, bot_certificate_path / bot_certificate_content (the \
             pod must trust the bot's certificate)",
            ep.base
        ));
    }
    if e.is_timeout() {
        Transport::Failed(format!("the {what} ({}) did not answer in time{via}", ep.base))
    } else if e.is_connect() {
        match &ep.proxy {
            Some(p) => Transport::ProxyUnreachable(format!(
                "cannot connect to the {what} at {}{via}: {detail}; check {prefix}host / {prefix}port and that the proxy can reach {}",
                ep.base,
                ep.base,
                prefix = p.prefix
            )),
            None => Transport::Failed(format!(
                "cannot connect to the {what} at {}: {detail}; check {p}host / {p}port and the network",
                ep.base,
                p = ep.which.prefix()
            )),
        }
    } else {
        Transport::Failed(format!("the request to the {what} at {}{via} failed: {detail}", ep.base))
    }
}

/// The message for a 407.
pub fn proxy_refused(ep: &Endpoint, p: &crate::settings::Proxy) -> String {
    let creds = if p.username.is_some() {
        format!("check {}", p.credential_fields())
    } else {
        format!("the proxy wants credentials: set {}", p.credential_fields())
    };
    format!(
        "the proxy {} refused the credentials for the {} ({}) with 407 Proxy Authentication Required: {creds}",
        p.url(),
        ep.which.label(),
        ep.base
    )
}
