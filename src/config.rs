//! Layered configuration: built-in defaults → `config/default.toml` or `--config FILE` →
//! `PATCHBAY__SECTION__KEY` environment, with every problem reported as the exact key and
//! the reason.

use patchbay_channel_core::Secret;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The defaults, compiled in: the same file that documents every key.
pub const BUILTIN_DEFAULTS: &str = include_str!("../config/default.toml");
const ENV_PREFIX: &str = "PATCHBAY__";

/// One configuration problem: the key (as a dotted path) and what is wrong with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.key, self.message)
        }
    }
}

/// All the problems found, so one `config check` shows them all.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    pub bind: String,
    pub public_url: String,
    pub body_limit_bytes: usize,
    pub workers: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    pub sqlite_synchronous: SqliteSynchronous,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SqliteSynchronous {
    Normal,
    Full,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    /// Secret sources (`file:`, `env:` or the value); resolved by [`resolve_secret`].
    pub admin_token: String,
    pub encryption_key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub dedupe_window_secs: u64,
    pub lease_secs: u64,
    pub concurrency: usize,
    pub claim_batch: usize,
    pub max_attempts: u32,
    pub retry_initial_ms: u64,
    pub retry_max_ms: u64,
    pub poll_interval_ms: u64,
    pub shutdown_grace_secs: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// An assistant or channel as declared: a few fields the core reads, the rest handed to the
/// backend or the kind to validate.
pub type Table = serde_json::Map<String, serde_json::Value>;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub store: StoreConfig,
    pub security: SecurityConfig,
    pub pipeline: PipelineConfig,
    pub log: LogConfig,
    #[serde(default)]
    pub assistants: BTreeMap<String, Table>,
    #[serde(default)]
    pub channels: BTreeMap<String, Table>,
}

impl Config {
    /// The URL callback URLs are built from.
    pub fn public_url(&self) -> String {
        let url = if self.server.public_url.is_empty() {
            format!("http://{}", self.server.bind)
        } else {
            self.server.public_url.clone()
        };
        url.trim_end_matches('/').to_owned()
    }

    /// The SQLite path when the store is SQLite.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.store.url.strip_prefix("sqlite://").map(PathBuf::from)
    }

    /// With nothing declared, an echo assistant and a loopback channel: something to try.
    fn apply_embedded_default(&mut self) {
        if self.assistants.is_empty() && self.channels.is_empty() {
            let echo = serde_json::json!({"backend": "echo"});
            let demo = serde_json::json!({"kind": "loopback", "assistant": "echo", "enabled": true});
            self.assistants.insert("echo".into(), echo.as_object().cloned().unwrap_or_default());
            self.channels.insert("demo".into(), demo.as_object().cloned().unwrap_or_default());
            // The built-in web chat, so a fresh `patchbay serve` is something to try in a
            // browser: /chat opens it.
            let chat = serde_json::json!({"kind": "webchat", "assistant": "echo", "enabled": true, "title": "patchbay echo"});
            self.channels.insert("chat".into(), chat.as_object().cloned().unwrap_or_default());
        }
    }
}

/// Loads the configuration from the layers. `file` is `--config FILE`; without it
/// `config/default.toml` in the working directory is read when present.
pub fn load(file: Option<&Path>) -> Result<Config, ConfigErrors> {
    let env: Vec<(String, String)> = std::env::vars().filter(|(k, _)| k.starts_with(ENV_PREFIX)).collect();
    load_from(file, &env)
}

pub fn load_from(file: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigErrors> {
    let mut builder = config::Config::builder().add_source(config::File::from_str(BUILTIN_DEFAULTS, config::FileFormat::Toml));
    match file {
        Some(path) => {
            if !path.exists() {
                return Err(ConfigErrors(vec![ConfigError::new(
                    "--config",
                    format!("{} does not exist", path.display()),
                )]));
            }
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        None => {
            let local = Path::new("config/default.toml");
            if local.exists() {
                builder = builder.add_source(config::File::from(local).format(config::FileFormat::Toml));
            }
        }
    }
    let mut errors = Vec::new();
    let mut env_map = config::Map::new();
    for (name, value) in env {
        let path = env_path(name);
        if let Err(e) = check_env_path(&path) {
            errors.push(ConfigError::new(name.clone(), e));
            continue;
        }
        env_map.insert(path.join("."), parse_env_value(value));
    }
    for (path, value) in env_map {
        builder = match builder.set_override(path, value) {
            Ok(b) => b,
            Err(e) => return Err(ConfigErrors(vec![ConfigError::new("", e.to_string())])),
        };
    }
    let merged = builder
        .build()
        .map_err(|e| ConfigErrors(vec![ConfigError::new(file.map(|p| p.display().to_string()).unwrap_or_default(), e.to_string())]))?;
    let value: serde_json::Value = merged
        .try_deserialize()
        .map_err(|e| ConfigErrors(vec![ConfigError::new("", e.to_string())]))?;
    let mut cfg: Config = match serde_path_to_error::deserialize(&value) {
        Ok(c) => c,
        Err(e) => {
            let settings_err = patchbay_channel_core::parse_settings::<Config>(&value).err();
            let key = settings_err.map(|s| s.field).unwrap_or_else(|| e.path().to_string());
            errors.push(ConfigError::new(key, e.into_inner().to_string()));
            return Err(ConfigErrors(errors));
        }
    };
    errors.extend(validate(&cfg));
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    cfg.apply_embedded_default();
    Ok(cfg)
}

/// `PATCHBAY__CHANNELS__DEMO__ENABLED` → `["channels", "demo", "enabled"]`.
fn env_path(name: &str) -> Vec<String> {
    name[ENV_PREFIX.len()..].split("__").map(|s| s.to_ascii_lowercase()).collect()
}

fn check_env_path(path: &[String]) -> Result<(), String> {
    const SECTIONS: &[(&str, &[&str])] = &[
        ("server", &["bind", "public_url", "body_limit_bytes", "workers"]),
        ("store", &["url", "sqlite_synchronous"]),
        ("security", &["admin_token", "encryption_key"]),
        (
            "pipeline",
            &[
                "dedupe_window_secs",
                "lease_secs",
                "concurrency",
                "claim_batch",
                "max_attempts",
                "retry_initial_ms",
                "retry_max_ms",
                "poll_interval_ms",
                "shutdown_grace_secs",
            ],
        ),
        ("log", &["level", "format"]),
    ];
    let known_sections = "server, store, security, pipeline, log, assistants, channels";
    match path {
        [] => Err("names no key".into()),
        [section, rest @ ..] if section == "assistants" || section == "channels" => {
            if rest.len() < 2 || rest.iter().any(|p| p.is_empty()) {
                Err(format!("should be PATCHBAY__{}__<ID>__<KEY>", section.to_ascii_uppercase()))
            } else {
                Ok(())
            }
        }
        [section, key] => match SECTIONS.iter().find(|(s, _)| s == section) {
            None => Err(format!("unknown section `{section}` (known: {known_sections})")),
            Some((_, keys)) if keys.contains(&key.as_str()) => Ok(()),
            Some((_, keys)) => Err(format!("unknown key `{section}.{key}` (known: {})", keys.join(", "))),
        },
        _ => Err(format!(
            "unknown key `{}`: expected PATCHBAY__SECTION__KEY with a section of {known_sections}",
            path.join(".")
        )),
    }
}

/// Environment values are strings; numbers and booleans are read as such so that
/// `PATCHBAY__SERVER__WORKERS=4` fills a number.
fn parse_env_value(v: &str) -> config::Value {
    if let Ok(b) = v.parse::<bool>() {
        return b.into();
    }
    if let Ok(i) = v.parse::<i64>() {
        return i.into();
    }
    if let Ok(f) = v.parse::<f64>() {
        if v.contains('.') {
            return f.into();
        }
    }
    v.into()
}

fn validate(cfg: &Config) -> Vec<ConfigError> {
    let mut errors = Vec::new();
    if cfg.server.bind.parse::<std::net::SocketAddr>().is_err() {
        errors.push(ConfigError::new(
            "server.bind",
            format!("`{}` is not an address:port such as 127.0.0.1:8080", cfg.server.bind),
        ));
    }
    if !cfg.server.public_url.is_empty()
        && !(cfg.server.public_url.starts_with("http://") || cfg.server.public_url.starts_with("https://"))
    {
        errors.push(ConfigError::new("server.public_url", "must start with http:// or https://"));
    }
    if cfg.server.body_limit_bytes < 1024 {
        errors.push(ConfigError::new("server.body_limit_bytes", "must be at least 1024"));
    }
    if !cfg.store.url.starts_with("sqlite://") {
        errors.push(ConfigError::new(
            "store.url",
            "only sqlite://PATH is supported by this build (PostgreSQL comes in a later release)",
        ));
    }
    let p = &cfg.pipeline;
    if p.dedupe_window_secs < 600 {
        errors.push(ConfigError::new(
            "pipeline.dedupe_window_secs",
            "must be at least 600: platforms redeliver for several minutes",
        ));
    }
    if p.lease_secs < 5 {
        errors.push(ConfigError::new("pipeline.lease_secs", "must be at least 5"));
    }
    for (key, v) in [("pipeline.concurrency", p.concurrency), ("pipeline.claim_batch", p.claim_batch)] {
        if v == 0 {
            errors.push(ConfigError::new(key, "must be at least 1"));
        }
    }
    if p.max_attempts == 0 {
        errors.push(ConfigError::new("pipeline.max_attempts", "must be at least 1"));
    }
    if p.retry_initial_ms == 0 || p.retry_max_ms < p.retry_initial_ms {
        errors.push(ConfigError::new(
            "pipeline.retry_max_ms",
            "retry_initial_ms must be positive and retry_max_ms at least as large",
        ));
    }
    if p.poll_interval_ms == 0 || p.poll_interval_ms > 1000 {
        errors.push(ConfigError::new(
            "pipeline.poll_interval_ms",
            "must be between 1 and 1000, so that work of other replicas is seen within a second",
        ));
    }
    if tracing_subscriber::EnvFilter::try_new(&cfg.log.level).is_err() {
        errors.push(ConfigError::new("log.level", "is not a level or a tracing filter"));
    }
    for id in cfg.assistants.keys() {
        if let Err(e) = patchbay_channel_core::ids::valid_name(id) {
            errors.push(ConfigError::new(format!("assistants.{id}"), e));
        }
    }
    for id in cfg.channels.keys() {
        if let Err(e) = patchbay_channel_core::ids::valid_name(id) {
            errors.push(ConfigError::new(format!("channels.{id}"), e));
        }
    }
    errors
}

/// Resolves a secret written as a value, `file:/path` or `env:NAME`. `key` names it in
/// errors (which never contain the value).
pub fn resolve_secret(key: &str, raw: &str) -> Result<Secret, ConfigError> {
    if let Some(path) = raw.strip_prefix("file:") {
        let content = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::new(key, format!("cannot read the file {path}: {e}")))?;
        let value = content.trim_end_matches(['\n', '\r']).to_owned();
        if value.is_empty() {
            return Err(ConfigError::new(key, format!("the file {path} is empty")));
        }
        Ok(Secret::new(value))
    } else if let Some(name) = raw.strip_prefix("env:") {
        match std::env::var(name) {
            Ok(v) if !v.is_empty() => Ok(Secret::new(v)),
            Ok(_) => Err(ConfigError::new(key, format!("the environment variable {name} is empty"))),
            Err(_) => Err(ConfigError::new(key, format!("the environment variable {name} is not set"))),
        }
    } else if raw.is_empty() {
        Err(ConfigError::new(key, "is empty"))
    } else {
        Ok(Secret::new(raw))
    }
}

/// Resolves a secret that patchbay may create: a `file:` that does not exist yet is created
/// (mode 0600, parent directories too) with `make()`'s value.
pub fn resolve_or_create_secret(key: &str, raw: &str, make: impl FnOnce() -> String) -> Result<Secret, ConfigError> {
    if let Some(path) = raw.strip_prefix("file:") {
        let p = Path::new(path);
        if !p.exists() {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)
                    .map_err(|e| ConfigError::new(key, format!("cannot create {}: {e}", dir.display())))?;
            }
            write_private(p, &make()).map_err(|e| ConfigError::new(key, format!("cannot create {path}: {e}")))?;
            tracing::info!(key, path, "created a new secret file");
        }
    }
    resolve_secret(key, raw)
}

fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_load_and_add_the_demo() {
        let cfg = load_from(None, &[]).unwrap();
        assert_eq!(cfg.server.bind, "127.0.0.1:8080");
        assert_eq!(cfg.public_url(), "http://127.0.0.1:8080");
        assert!(cfg.channels.contains_key("demo"));
        assert!(cfg.assistants.contains_key("echo"));
    }

    #[test]
    fn environment_overrides_and_types() {
        let cfg = load_from(None, &env(&[("PATCHBAY__SERVER__WORKERS", "3"), ("PATCHBAY__SERVER__BIND", "127.0.0.1:0")])).unwrap();
        assert_eq!(cfg.server.workers, 3);
        assert_eq!(cfg.server.bind, "127.0.0.1:0");
    }

    #[test]
    fn unknown_environment_variable_is_named() {
        let e = load_from(None, &env(&[("PATCHBAY__SERVER__BINDD", "x")])).unwrap_err();
        assert_eq!(e.0[0].key, "PATCHBAY__SERVER__BINDD");
        assert!(e.0[0].message.contains("unknown key `server.bindd`"), "{e}");
        let e = load_from(None, &env(&[("PATCHBAY__SERVRE__BIND", "x")])).unwrap_err();
        assert!(e.0[0].message.contains("unknown section `servre`"), "{e}");
    }

    #[test]
    fn unknown_file_key_is_named() {
        let dir = std::env::temp_dir().join(format!("pb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[pipeline]\nlease_sec = 3\n").unwrap();
        let e = load_from(Some(&path), &[]).unwrap_err();
        assert_eq!(e.0[0].key, "pipeline.lease_sec", "{e}");
        std::fs::write(&path, "[server]\nworkers = \"many\"\n").unwrap();
        let e = load_from(Some(&path), &[]).unwrap_err();
        assert_eq!(e.0[0].key, "server.workers", "{e}");
        std::fs::write(&path, "[pipeline]\ndedupe_window_secs = 5\n").unwrap();
        let e = load_from(Some(&path), &[]).unwrap_err();
        assert_eq!(e.0[0].key, "pipeline.dedupe_window_secs", "{e}");
    }

    #[test]
    fn secrets_from_file_and_env() {
        let dir = std::env::temp_dir().join(format!("pb-sec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tok");
        std::fs::write(&path, "s3cret\n").unwrap();
        let s = resolve_secret("x", &format!("file:{}", path.display())).unwrap();
        assert_eq!(s.expose(), "s3cret");
        let e = resolve_secret("channels.a.token", "env:PATCHBAY_TEST_SURELY_UNSET").unwrap_err();
        assert_eq!(e.key, "channels.a.token");
        assert!(e.message.contains("PATCHBAY_TEST_SURELY_UNSET is not set"));
        let created = dir.join("sub/new.key");
        let _ = std::fs::remove_file(&created);
        let s = resolve_or_create_secret("k", &format!("file:{}", created.display()), || "generated".into()).unwrap();
        assert_eq!(s.expose(), "generated");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&created).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
