//! Settings of a Symphony channel, with chatom's names (`SymphonyConfig`), valid once
//! constructed: the key or certificate is read and parsed here, so a channel that builds can
//! sign in.
//!
//! Hosts and proxies follow the BDK: the pod, agent, session-auth and key-manager endpoints
//! each default to the global `host`/`port`, and each may have its own proxy block
//! (`{endpoint}_proxy_host`, `_port`, `_username`, `_password`) that replaces the global
//! `proxy_*` one for that endpoint.

use crate::jwt::{normalize_pem, pem_block, RsaKey};
use patchbay_channel_core::{backoff::Backoff, parse_settings, Secret, SettingsError};
use serde::Deserialize;
use std::time::Duration;

/// The settings keys that are secrets (resolved from `file:`/`env:`, sealed at rest, never
/// shown).
pub const SECRET_FIELDS: &[&str] = &[
    "bot_private_key_content",
    "bot_certificate_content",
    "proxy_password",
    "pod_proxy_password",
    "agent_proxy_password",
    "session_auth_proxy_password",
    "key_manager_proxy_password",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    scheme: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    bot_username: Option<String>,
    #[serde(default)]
    bot_private_key_path: Option<String>,
    #[serde(default)]
    bot_private_key_content: Option<Secret>,
    #[serde(default)]
    bot_certificate_path: Option<String>,
    #[serde(default)]
    bot_certificate_content: Option<Secret>,
    #[serde(default)]
    pod_host: Option<String>,
    #[serde(default)]
    pod_port: Option<u16>,
    #[serde(default)]
    agent_host: Option<String>,
    #[serde(default)]
    agent_port: Option<u16>,
    #[serde(default)]
    session_auth_host: Option<String>,
    #[serde(default)]
    session_auth_port: Option<u16>,
    #[serde(default)]
    key_manager_host: Option<String>,
    #[serde(default)]
    key_manager_port: Option<u16>,
    #[serde(default)]
    proxy_host: Option<String>,
    #[serde(default)]
    proxy_port: Option<u16>,
    #[serde(default)]
    proxy_username: Option<String>,
    #[serde(default)]
    proxy_password: Option<Secret>,
    #[serde(default)]
    pod_proxy_host: Option<String>,
    #[serde(default)]
    pod_proxy_port: Option<u16>,
    #[serde(default)]
    pod_proxy_username: Option<String>,
    #[serde(default)]
    pod_proxy_password: Option<Secret>,
    #[serde(default)]
    agent_proxy_host: Option<String>,
    #[serde(default)]
    agent_proxy_port: Option<u16>,
    #[serde(default)]
    agent_proxy_username: Option<String>,
    #[serde(default)]
    agent_proxy_password: Option<Secret>,
    #[serde(default)]
    session_auth_proxy_host: Option<String>,
    #[serde(default)]
    session_auth_proxy_port: Option<u16>,
    #[serde(default)]
    session_auth_proxy_username: Option<String>,
    #[serde(default)]
    session_auth_proxy_password: Option<Secret>,
    #[serde(default)]
    key_manager_proxy_host: Option<String>,
    #[serde(default)]
    key_manager_proxy_port: Option<u16>,
    #[serde(default)]
    key_manager_proxy_username: Option<String>,
    #[serde(default)]
    key_manager_proxy_password: Option<Secret>,
    #[serde(default)]
    trust_store_path: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
    #[serde(default)]
    max_attempts: Option<i64>,
    #[serde(default)]
    initial_interval_ms: Option<u64>,
    #[serde(default)]
    multiplier: Option<f64>,
    #[serde(default)]
    max_interval_ms: Option<u64>,
    #[serde(default)]
    datafeed_version: Option<String>,
    #[serde(default)]
    error_room: Option<String>,
    #[serde(default)]
    inform_client: Option<bool>,
}

/// Which datafeed API the connector reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatafeedVersion {
    /// `/agent/v5/datafeeds`: listed, shared, acknowledged with `ackId`.
    V2,
    /// `/agent/v4/datafeed`: created per run, read until `400`, no acknowledgement.
    V1,
}

/// How the bot proves who it is.
#[derive(Clone)]
pub enum Auth {
    /// A signed JWT to `/login/pubkey/authenticate` and `/relay/pubkey/authenticate`.
    Rsa(RsaKey),
    /// A client certificate (PEM: certificate chain and unencrypted key) presented to
    /// `/sessionauth/v1/authenticate` and `/keyauth/v1/authenticate`.
    Certificate(Secret),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::Rsa(k) => write!(f, "Rsa({k:?})"),
            Auth::Certificate(_) => f.write_str("Certificate(***)"),
        }
    }
}

/// An HTTP proxy, and the settings prefix it came from (for error messages).
#[derive(Clone, Debug, PartialEq)]
pub struct Proxy {
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// `proxy_` or `pod_proxy_`, `agent_proxy_`, …: what an admin fixes.
    pub prefix: &'static str,
}

impl Proxy {
    pub fn url(&self) -> String {
        format!("http://{}:{}", self.host, self.port)
    }

    /// Names the settings an admin checks when this proxy refuses the credentials.
    pub fn credential_fields(&self) -> String {
        format!("{p}username / {p}password", p = self.prefix)
    }
}

/// One of the four endpoints of a pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Which {
    Pod,
    Agent,
    SessionAuth,
    KeyManager,
}

impl Which {
    pub fn label(self) -> &'static str {
        match self {
            Which::Pod => "pod",
            Which::Agent => "agent",
            Which::SessionAuth => "session auth",
            Which::KeyManager => "key manager",
        }
    }

    pub fn prefix(self) -> &'static str {
        match self {
            Which::Pod => "pod_",
            Which::Agent => "agent_",
            Which::SessionAuth => "session_auth_",
            Which::KeyManager => "key_manager_",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Endpoint {
    pub which: Which,
    /// `{scheme}://{host}:{port}{context}`, no trailing slash.
    pub base: String,
    pub proxy: Option<Proxy>,
}

impl Endpoint {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

#[derive(Clone, Debug)]
pub struct Settings {
    pub bot_username: String,
    pub auth: Auth,
    pub pod: Endpoint,
    pub agent: Endpoint,
    pub session_auth: Endpoint,
    pub key_manager: Endpoint,
    /// Extra trusted CAs (PEM), for pods behind a private CA or a TLS-inspecting proxy.
    pub trust_store: Option<Vec<u8>>,
    /// Per request; the datafeed's long poll gets 35 s more.
    pub timeout: Duration,
    /// Consecutive failures after which the channel shows `failed` (it keeps retrying);
    /// `None` (`max_attempts = -1`): never.
    pub max_attempts: Option<u32>,
    pub retry: Backoff,
    pub datafeed_version: DatafeedVersion,
    pub error_room: Option<String>,
    pub inform_client: bool,
}

impl Settings {
    pub fn endpoint(&self, which: Which) -> &Endpoint {
        match which {
            Which::Pod => &self.pod,
            Which::Agent => &self.agent,
            Which::SessionAuth => &self.session_auth,
            Which::KeyManager => &self.key_manager,
        }
    }

    pub fn parse(value: &serde_json::Value) -> Result<Settings, SettingsError> {
        let raw: Raw = parse_settings(value)?;

        let scheme = raw.scheme.clone().unwrap_or_else(|| "https".into());
        if !matches!(scheme.as_str(), "https" | "http") {
            return Err(err("scheme", "must be \"https\" (the default) or \"http\""));
        }
        let port = raw.port.unwrap_or(443);
        let context = match raw.context.as_deref().map(str::trim).unwrap_or("") {
            "" | "/" => String::new(),
            c if c.contains(['?', '#', ' ']) => return Err(err("context", "must be a path prefix like /symphony")),
            c => format!("/{}", c.trim_matches('/')),
        };
        let host = match (raw.host.as_deref(), raw.pod_host.as_deref()) {
            (Some(h), _) if !h.trim().is_empty() => check_host("host", h)?,
            (_, Some(h)) if !h.trim().is_empty() => check_host("pod_host", h)?,
            _ => return Err(err("host", "is required: the pod's host name, like acme.symphony.com")),
        };

        let bot_username = raw.bot_username.as_deref().map(str::trim).unwrap_or("").to_owned();
        if bot_username.is_empty() {
            return Err(err(
                "bot_username",
                "is required: the bot's service account username, as the pod administrator created it",
            ));
        }

        let auth = auth(&raw)?;

        let global_proxy = proxy_block(
            "proxy_",
            raw.proxy_host.clone(),
            raw.proxy_port,
            raw.proxy_username.clone(),
            raw.proxy_password.clone(),
        )?;
        let endpoint = |which: Which,
                        h: &Option<String>,
                        p: Option<u16>,
                        proxy: Option<Proxy>|
         -> Result<Endpoint, SettingsError> {
            let prefix = which.prefix();
            let host = match h.as_deref() {
                Some(h) if !h.trim().is_empty() => check_host(&format!("{prefix}host"), h)?,
                _ => host.clone(),
            };
            let port = p.unwrap_or(port);
            if port == 0 {
                return Err(err(format!("{prefix}port"), "must be between 1 and 65535"));
            }
            Ok(Endpoint {
                which,
                base: format!("{scheme}://{host}:{port}{context}"),
                proxy: proxy.or_else(|| global_proxy.clone()),
            })
        };
        let pod = endpoint(
            Which::Pod,
            &raw.pod_host,
            raw.pod_port,
            proxy_block("pod_proxy_", raw.pod_proxy_host.clone(), raw.pod_proxy_port, raw.pod_proxy_username.clone(), raw.pod_proxy_password.clone())?,
        )?;
        let agent = endpoint(
            Which::Agent,
            &raw.agent_host,
            raw.agent_port,
            proxy_block("agent_proxy_", raw.agent_proxy_host.clone(), raw.agent_proxy_port, raw.agent_proxy_username.clone(), raw.agent_proxy_password.clone())?,
        )?;
        let session_auth = endpoint(
            Which::SessionAuth,
            &raw.session_auth_host,
            raw.session_auth_port,
            proxy_block(
                "session_auth_proxy_",
                raw.session_auth_proxy_host.clone(),
                raw.session_auth_proxy_port,
                raw.session_auth_proxy_username.clone(),
                raw.session_auth_proxy_password.clone(),
            )?,
        )?;
        let key_manager = endpoint(
            Which::KeyManager,
            &raw.key_manager_host,
            raw.key_manager_port,
            proxy_block(
                "key_manager_proxy_",
                raw.key_manager_proxy_host.clone(),
                raw.key_manager_proxy_port,
                raw.key_manager_proxy_username.clone(),
                raw.key_manager_proxy_password.clone(),
            )?,
        )?;

        let trust_store = match &raw.trust_store_path {
            None => None,
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| err("trust_store_path", format!("cannot read {path}: {e}")))?;
                if reqwest::Certificate::from_pem_bundle(&pem).map(|c| c.is_empty()).unwrap_or(true) {
                    return Err(err("trust_store_path", format!("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")));
                }
                Some(pem)
            }
        };

        let timeout = raw.timeout.unwrap_or(30);
        if !(1..=600).contains(&timeout) {
            return Err(err("timeout", "must be between 1 and 600 seconds"));
        }
        let max_attempts = match raw.max_attempts.unwrap_or(10) {
            -1 => None,
            n if (1..=1_000_000).contains(&n) => Some(n as u32),
            _ => return Err(err("max_attempts", "must be at least 1, or -1 for no limit")),
        };
        let initial = raw.initial_interval_ms.unwrap_or(500);
        if !(10..=3_600_000).contains(&initial) {
            return Err(err("initial_interval_ms", "must be between 10 and 3600000"));
        }
        let max_interval = raw.max_interval_ms.unwrap_or(300_000);
        if max_interval < initial || max_interval > 86_400_000 {
            return Err(err("max_interval_ms", "must be at least initial_interval_ms and at most 86400000"));
        }
        let multiplier = raw.multiplier.unwrap_or(2.0);
        if !(1.0..=10.0).contains(&multiplier) {
            return Err(err("multiplier", "must be between 1 and 10"));
        }
        let datafeed_version = match raw.datafeed_version.as_deref().map(|v| v.trim().to_ascii_lowercase()).as_deref() {
            None | Some("v2") => DatafeedVersion::V2,
            Some("v1") => DatafeedVersion::V1,
            Some(_) => return Err(err("datafeed_version", "must be \"v2\" (the default) or \"v1\"")),
        };
        let error_room = match raw.error_room.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(r) => Some(r.to_owned()),
        };
        Ok(Settings {
            bot_username,
            auth,
            pod,
            agent,
            session_auth,
            key_manager,
            trust_store,
            timeout: Duration::from_secs(timeout),
            max_attempts,
            retry: Backoff {
                initial: Duration::from_millis(initial),
                max: Duration::from_millis(max_interval),
                factor: multiplier,
            },
            datafeed_version,
            error_room,
            inform_client: raw.inform_client.unwrap_or(false),
        })
    }
}

fn err(field: impl Into<String>, message: impl Into<String>) -> SettingsError {
    SettingsError::new(field, message)
}

/// A host name (or IP address) without scheme, port or path.
fn check_host(field: &str, h: &str) -> Result<String, SettingsError> {
    let h = h.trim();
    if h.contains("://") {
        return Err(SettingsError::new(field, "is a host name, like acme.symphony.com: put the scheme in `scheme`"));
    }
    let bracketed = h.starts_with('[') && h.ends_with(']');
    if h.contains('/') || h.contains(char::is_whitespace) || (h.contains(':') && !bracketed) {
        return Err(SettingsError::new(
            field,
            "is a host name, like acme.symphony.com, without a port or path (ports go in the *_port settings, a path prefix in `context`)",
        ));
    }
    Ok(h.to_owned())
}

fn proxy_block(
    prefix: &'static str,
    host: Option<String>,
    port: Option<u16>,
    username: Option<String>,
    password: Option<Secret>,
) -> Result<Option<Proxy>, SettingsError> {
    let field = |f: &str| format!("{prefix}{f}");
    let host = host.map(|h| h.trim().to_owned()).filter(|h| !h.is_empty());
    let Some(host) = host else {
        let stray = [("port", port.is_some()), ("username", username.is_some()), ("password", password.is_some())];
        if let Some((f, _)) = stray.iter().find(|(_, set)| *set) {
            return Err(SettingsError::new(field(f), format!("is set but {} is not: give the proxy's host too", field("host"))));
        }
        return Ok(None);
    };
    let host = check_host(&field("host"), &host)?;
    let Some(port) = port.filter(|p| *p != 0) else {
        return Err(SettingsError::new(field("port"), "is required with a proxy host: the proxy's port, like 8080"));
    };
    let username = username.filter(|u| !u.is_empty());
    let password = password.filter(|p| !p.is_empty());
    match (&username, &password) {
        (Some(u), _) if u.contains(':') => {
            return Err(SettingsError::new(field("username"), "must not contain `:` (Basic proxy authentication joins user and password with it)"))
        }
        (Some(_), None) => return Err(SettingsError::new(field("password"), format!("is required with {}", field("username")))),
        (None, Some(_)) => return Err(SettingsError::new(field("username"), format!("is required with {}", field("password")))),
        _ => {}
    }
    Ok(Some(Proxy { host, port, username, password, prefix }))
}

fn auth(raw: &Raw) -> Result<Auth, SettingsError> {
    let given: Vec<&str> = [
        ("bot_private_key_path", raw.bot_private_key_path.is_some()),
        ("bot_private_key_content", raw.bot_private_key_content.is_some()),
        ("bot_certificate_path", raw.bot_certificate_path.is_some()),
        ("bot_certificate_content", raw.bot_certificate_content.is_some()),
    ]
    .iter()
    .filter(|(_, set)| *set)
    .map(|(f, _)| *f)
    .collect();
    match given.as_slice() {
        [] => Err(SettingsError::new(
            "bot_private_key_path",
            "no authentication method: give exactly one of bot_private_key_path, bot_private_key_content (RSA key, PEM) \
             or bot_certificate_path, bot_certificate_content (client certificate and key, PEM)",
        )),
        [one] => {
            let field = *one;
            let (text, origin) = match field {
                "bot_private_key_path" | "bot_certificate_path" => {
                    let path = if field == "bot_private_key_path" { &raw.bot_private_key_path } else { &raw.bot_certificate_path };
                    let path = path.as_deref().unwrap_or_default();
                    let text = std::fs::read_to_string(path)
                        .map_err(|e| SettingsError::new(field, format!("cannot read {path}: {e}")))?;
                    (text, format!("{path} "))
                }
                "bot_private_key_content" => (raw.bot_private_key_content.clone().unwrap_or_default().expose().to_owned(), String::new()),
                _ => (raw.bot_certificate_content.clone().unwrap_or_default().expose().to_owned(), String::new()),
            };
            if field.starts_with("bot_private_key") {
                RsaKey::from_pem(&text)
                    .map(Auth::Rsa)
                    .map_err(|e| SettingsError::new(field, format!("{}{e}", if origin.is_empty() { "the key ".to_owned() } else { origin })))
            } else {
                certificate(&text).map(Auth::Certificate).map_err(|e| SettingsError::new(field, format!("{origin}{e}")))
            }
        }
        [a, b, ..] => Err(SettingsError::new(
            *b,
            format!("two authentication methods are given ({a} and {b}): keep exactly one"),
        )),
    }
}

/// A client certificate with its key, as one PEM text (the Python BDK's format).
fn certificate(text: &str) -> Result<Secret, String> {
    let pem = normalize_pem(text);
    if pem.contains("ENCRYPTED") {
        return Err("holds an encrypted private key, which patchbay cannot use: convert it \
                    (`openssl pkcs12 -in bot.p12 -out bot.pem -nodes`) and keep the file readable only by patchbay"
            .into());
    }
    match pem_block(&pem, "CERTIFICATE") {
        None => return Err("holds no certificate: give one PEM text with the bot's certificate (-----BEGIN CERTIFICATE-----) and its private key".into()),
        Some(Err(e)) => return Err(e),
        Some(Ok(_)) => {}
    }
    if !["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"].iter().any(|l| pem.contains(&format!("-----BEGIN {l}-----"))) {
        return Err("holds a certificate but no private key: append the certificate's unencrypted private key (PEM) to it".into());
    }
    reqwest::Identity::from_pem(pem.as_bytes())
        .map_err(|_| "could not be used as a TLS client identity: check that the private key belongs to the certificate".to_owned())?;
    Ok(Secret::new(pem))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const PKCS8: &str = include_str!("../../../tests/fixtures/symphony/bot_pkcs8.pem");

    fn key_path() -> String {
        format!("{}/../../tests/fixtures/symphony/bot_pkcs1.pem", env!("CARGO_MANIFEST_DIR"))
    }

    fn parse(extra: serde_json::Value) -> Result<Settings, SettingsError> {
        let mut v = json!({"host": "acme.symphony.com", "bot_username": "patchbay-bot", "bot_private_key_path": key_path()});
        for (k, x) in extra.as_object().unwrap() {
            if x.is_null() {
                v.as_object_mut().unwrap().remove(k);
            } else {
                v[k] = x.clone();
            }
        }
        Settings::parse(&v)
    }

    #[test]
    fn endpoints_default_to_the_global_host_as_the_bdk_does() {
        let s = parse(json!({})).unwrap();
        for ep in [&s.pod, &s.agent, &s.session_auth, &s.key_manager] {
            assert_eq!(ep.base, "https://acme.symphony.com:443");
            assert!(ep.proxy.is_none());
        }
        assert_eq!(s.pod.url("/login/pubkey/authenticate"), "https://acme.symphony.com:443/login/pubkey/authenticate");
        assert_eq!(s.datafeed_version, DatafeedVersion::V2);
        assert_eq!(s.timeout, Duration::from_secs(30));
        assert_eq!(s.max_attempts, Some(10));
        assert!(!s.inform_client && s.error_room.is_none());
        assert!(matches!(s.auth, Auth::Rsa(_)));

        let s = parse(json!({"agent_host": "agent.acme.com", "agent_port": 8443, "key_manager_host": "km.acme.com",
                             "scheme": "http", "port": 8080, "context": "/sym/"}))
        .unwrap();
        assert_eq!(s.pod.base, "http://acme.symphony.com:8080/sym");
        assert_eq!(s.agent.base, "http://agent.acme.com:8443/sym");
        assert_eq!(s.key_manager.base, "http://km.acme.com:8080/sym");
        assert_eq!(s.session_auth.base, "http://acme.symphony.com:8080/sym");
    }

    #[test]
    fn a_per_endpoint_proxy_replaces_the_global_one() {
        let s = parse(json!({"proxy_host": "proxy.corp", "proxy_port": 3128, "proxy_username": "svc", "proxy_password": "pw",
                             "key_manager_proxy_host": "km-proxy.corp", "key_manager_proxy_port": 8080}))
        .unwrap();
        let global = s.pod.proxy.clone().unwrap();
        assert_eq!((global.url().as_str(), global.username.as_deref()), ("http://proxy.corp:3128", Some("svc")));
        assert_eq!(s.agent.proxy, s.pod.proxy);
        assert_eq!(s.session_auth.proxy, s.pod.proxy);
        let km = s.key_manager.proxy.clone().unwrap();
        assert_eq!((km.url().as_str(), km.username.as_deref(), km.prefix), ("http://km-proxy.corp:8080", None, "key_manager_proxy_"));
        assert_eq!(km.credential_fields(), "key_manager_proxy_username / key_manager_proxy_password");
    }

    #[test]
    fn one_auth_method_exactly() {
        let e = parse(json!({"bot_private_key_path": null})).unwrap_err();
        assert_eq!(e.field, "bot_private_key_path");
        assert!(e.message.contains("no authentication method"), "{e}");
        let e = parse(json!({"bot_certificate_path": "/x.pem"})).unwrap_err();
        assert_eq!(e.field, "bot_certificate_path");
        assert!(e.message.contains("two authentication methods"), "{e}");
        let e = parse(json!({"bot_private_key_path": "/nonexistent/key.pem"})).unwrap_err();
        assert_eq!(e.field, "bot_private_key_path");
        assert!(e.message.contains("cannot read /nonexistent/key.pem"), "{e}");
    }

    #[test]
    fn key_content_in_either_format_with_literal_newlines() {
        let one_line = PKCS8.trim().replace('\n', "\\n");
        let s = parse(json!({"bot_private_key_path": null, "bot_private_key_content": one_line})).unwrap();
        assert!(matches!(s.auth, Auth::Rsa(_)));
        let e = parse(json!({"bot_private_key_path": null, "bot_private_key_content": "MIIEvQIBADANBgkqhkiG9w0BAQEFAASC"})).unwrap_err();
        assert_eq!(e.field, "bot_private_key_content");
        assert!(e.message.contains("not a PEM private key") && !e.message.contains("MIIE"), "the key must not be echoed: {e}");
    }

    #[test]
    fn certificate_content_needs_a_certificate_and_a_key() {
        let e = parse(json!({"bot_private_key_path": null, "bot_certificate_content": PKCS8})).unwrap_err();
        assert_eq!(e.field, "bot_certificate_content");
        assert!(e.message.contains("no certificate"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (json!({"host": null}), "host"),
            (json!({"host": "https://acme.symphony.com"}), "host"),
            (json!({"agent_host": "agent.acme.com:8443"}), "agent_host"),
            (json!({"bot_username": " "}), "bot_username"),
            (json!({"scheme": "ftp"}), "scheme"),
            (json!({"proxy_host": "proxy.corp"}), "proxy_port"),
            (json!({"proxy_port": 3128}), "proxy_port"),
            (json!({"proxy_host": "p", "proxy_port": 1, "proxy_username": "svc"}), "proxy_password"),
            (json!({"pod_proxy_host": "p", "pod_proxy_port": 1, "pod_proxy_password": "pw"}), "pod_proxy_username"),
            (json!({"timeout": 0}), "timeout"),
            (json!({"max_attempts": 0}), "max_attempts"),
            (json!({"datafeed_version": "v3"}), "datafeed_version"),
            (json!({"trust_store_path": "/nonexistent.pem"}), "trust_store_path"),
            (json!({"max_interval_ms": 1}), "max_interval_ms"),
            (json!({"bot_usrname": "x"}), "bot_usrname"),
        ];
        for (extra, field) in cases {
            let e = parse(extra.clone()).unwrap_err();
            assert_eq!(e.field, field, "{extra}: {e}");
        }
        assert_eq!(parse(json!({"max_attempts": -1})).unwrap().max_attempts, None);
        assert_eq!(parse(json!({"datafeed_version": "v1"})).unwrap().datafeed_version, DatafeedVersion::V1);
        assert_eq!(parse(json!({"host": null, "pod_host": "pod.acme.com"})).unwrap().agent.base, "https://pod.acme.com:443");
    }

    #[test]
    fn secrets_are_not_printed() {
        let s = parse(json!({"proxy_host": "p", "proxy_port": 1, "proxy_username": "svc", "proxy_password": "hunter2-proxy"})).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("hunter2-proxy") && !shown.contains("PRIVATE KEY"), "{shown}");
    }
}
