//! The command line: `serve`, `config check`, `channels list|show|enable|disable`, `doctor`.
//! The channel commands and `doctor` speak to a running service through the admin API, so
//! they see and change exactly what the service does.

use crate::config::{self, Config, LogFormat};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "patchbay", version, about = "Connects assistants (bots) to the chat platforms where people work")]
struct Cli {
    /// Configuration file (default: config/default.toml in the working directory, if present).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service.
    Serve {
        /// Listen here instead of server.bind (port 0 picks a free port).
        #[arg(long, value_name = "ADDR")]
        bind: Option<String>,
    },
    /// Configuration commands.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Channels of the running service.
    Channels {
        #[command(flatten)]
        api: ApiArgs,
        #[command(subcommand)]
        command: ChannelsCommand,
    },
    /// Ask each channel's platform whether its credentials work (or one channel's).
    Doctor {
        #[command(flatten)]
        api: ApiArgs,
        channel: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate the configuration: names each wrong key and why; exits 1 if any.
    Check,
}

#[derive(Subcommand)]
enum ChannelsCommand {
    List {
        #[arg(long)]
        json: bool,
    },
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    Enable { id: String },
    Disable { id: String },
}

#[derive(clap::Args)]
struct ApiArgs {
    /// The service's address (default: from server.bind).
    #[arg(long, value_name = "URL", global = true)]
    url: Option<String>,
    /// The admin token (default: PATCHBAY_ADMIN_TOKEN, else security.admin_token).
    #[arg(long, env = "PATCHBAY_ADMIN_TOKEN", hide_env_values = true, global = true)]
    token: Option<String>,
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let cfg = match config::load(cli.config.as_deref()) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("patchbay: the configuration has problems:");
            for e in &errors.0 {
                eprintln!("  {e}");
            }
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Serve { bind } => serve(cfg, bind),
        Command::Config { command: ConfigCommand::Check } => config_check(&cfg),
        Command::Channels { api, command } => run_client(channels(&cfg, api, command)),
        Command::Doctor { api, channel } => run_client(doctor(&cfg, api, channel)),
    }
}

fn init_logging(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log.level));
    // Colours only on a terminal: a log file, journald or a container log gets plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn serve(mut cfg: Config, bind: Option<String>) -> ExitCode {
    if let Some(b) = bind {
        cfg.server.bind = b;
    }
    init_logging(&cfg);
    let listener = match std::net::TcpListener::bind(&cfg.server.bind) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("patchbay: cannot listen on {} (server.bind): {e}", cfg.server.bind);
            return ExitCode::from(1);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("patchbay: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async move {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let on_signal = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            on_signal.cancel();
        });
        match crate::server::run(cfg, listener, shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(crate::server::StartError::Config(errors)) => {
                eprintln!("patchbay: the configuration has problems:");
                for e in &errors.0 {
                    eprintln!("  {e}");
                }
                ExitCode::from(2)
            }
            Err(e) => {
                eprintln!("patchbay: {e}");
                ExitCode::from(1)
            }
        }
    })
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn config_check(cfg: &Config) -> ExitCode {
    // Build every assistant and channel as `serve` would, on a throwaway in-memory store:
    // checking touches neither the real database nor the key files.
    let sealer = crate::seal::Sealer::from_key(&patchbay_channel_core::Secret::new(crate::seal::Sealer::generate_key()))
        .expect("a generated key is valid");
    let store = match crate::store::sqlite::SqliteStore::open(std::path::Path::new(":memory:"), cfg.store.sqlite_synchronous) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("patchbay: cannot open an in-memory store for the check: {e}");
            return ExitCode::from(1);
        }
    };
    let registry = crate::registry::Registry::new(
        std::sync::Arc::new(store),
        crate::kinds::all(),
        sealer,
        crate::server::http_client(),
        cfg.public_url(),
        std::sync::Arc::new(patchbay_channel_core::MemoryLog::default()),
    );
    let mut errors = registry.check_config(cfg);
    for (key, raw) in [("security.admin_token", &cfg.security.admin_token), ("security.encryption_key", &cfg.security.encryption_key)] {
        // A `file:` that does not exist yet is created at first start: not a problem.
        let creatable = raw.strip_prefix("file:").is_some_and(|p| !std::path::Path::new(p).exists());
        if !creatable {
            if let Err(e) = config::resolve_secret(key, raw) {
                errors.push(e);
            }
        }
    }
    if errors.is_empty() {
        println!(
            "configuration ok: {} assistant(s), {} channel(s)",
            cfg.assistants.len(),
            cfg.channels.len()
        );
        ExitCode::SUCCESS
    } else {
        for e in &errors {
            eprintln!("{e}");
        }
        ExitCode::from(1)
    }
}

fn run_client(fut: impl std::future::Future<Output = Result<ExitCode, String>>) -> ExitCode {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    match rt.block_on(fut) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("patchbay: {e}");
            ExitCode::from(1)
        }
    }
}

struct Api {
    base: String,
    token: String,
    http: reqwest::Client,
}

impl Api {
    fn new(cfg: &Config, args: ApiArgs) -> Result<Api, String> {
        let base = args.url.unwrap_or_else(|| {
            let bind = cfg.server.bind.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]");
            format!("http://{bind}")
        });
        let token = match args.token {
            Some(t) => t,
            None => config::resolve_secret("security.admin_token", &cfg.security.admin_token)
                .map_err(|e| format!("{e} (or pass --token / PATCHBAY_ADMIN_TOKEN)"))?
                .expose()
                .to_owned(),
        };
        Ok(Api {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http: crate::server::http_client(),
        })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<serde_json::Value>) -> Result<serde_json::Value, String> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("cannot reach patchbay at {}: {} — is `patchbay serve` running?", self.base, e.without_url()))?;
        let status = resp.status();
        let value: serde_json::Value = resp.json().await.unwrap_or_default();
        if status.is_success() {
            Ok(value)
        } else {
            let msg = value.pointer("/error/message").and_then(|m| m.as_str()).unwrap_or("no details");
            Err(format!("{status}: {msg}"))
        }
    }
}

async fn channels(cfg: &Config, args: ApiArgs, command: ChannelsCommand) -> Result<ExitCode, String> {
    let api = Api::new(cfg, args)?;
    match command {
        ChannelsCommand::List { json } => {
            let v = api.call(reqwest::Method::GET, "/api/v1/channels", None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<24} {:<12} {:<16} {:<10} CALLBACK URL", "ID", "KIND", "ASSISTANT", "STATE");
            for c in v["channels"].as_array().cloned().unwrap_or_default() {
                println!(
                    "{:<24} {:<12} {:<16} {:<10} {}",
                    c["id"].as_str().unwrap_or(""),
                    c["kind"].as_str().unwrap_or(""),
                    c["assistant"].as_str().unwrap_or(""),
                    c["status"]["state"].as_str().unwrap_or(""),
                    c["callback_url"].as_str().unwrap_or("")
                );
            }
        }
        ChannelsCommand::Show { id, json } => {
            let c = api.call(reqwest::Method::GET, &format!("/api/v1/channels/{id}"), None).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&c).unwrap_or_default());
                return Ok(ExitCode::SUCCESS);
            }
            print_channel(&c);
        }
        ChannelsCommand::Enable { id } => {
            let c = api
                .call(reqwest::Method::PATCH, &format!("/api/v1/channels/{id}"), Some(serde_json::json!({"enabled": true})))
                .await?;
            println!("{} enabled", c["id"].as_str().unwrap_or(&id));
        }
        ChannelsCommand::Disable { id } => {
            let c = api
                .call(reqwest::Method::PATCH, &format!("/api/v1/channels/{id}"), Some(serde_json::json!({"enabled": false})))
                .await?;
            println!("{} disabled", c["id"].as_str().unwrap_or(&id));
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_channel(c: &serde_json::Value) {
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".into(),
        other => other.to_string(),
    };
    println!("id:           {}", s(&c["id"]));
    println!("kind:         {}", s(&c["kind"]));
    println!("assistant:    {}", s(&c["assistant"]));
    println!("enabled:      {}", s(&c["enabled"]));
    println!("source:       {}", s(&c["source"]));
    println!("callback_url: {}", s(&c["callback_url"]));
    println!("state:        {}", s(&c["status"]["state"]));
    println!("since:        {}", fmt_time(&c["status"]["since"]));
    println!("last event:   {}", fmt_time(&c["status"]["last_event_at"]));
    println!("reconnects:   {}", s(&c["status"]["reconnects"]));
    if let Some(e) = c["status"].get("last_error") {
        println!("last error:   {} ({})", s(&e["message"]), fmt_time(&e["at"]));
    }
    if let Some(details) = c["status"]["details"].as_object() {
        for (k, v) in details {
            println!("{:<13} {}", format!("{k}:"), s(v));
        }
    }
    println!("settings:");
    for (k, v) in c["settings"].as_object().cloned().unwrap_or_default() {
        let shown = if v.get("set").is_some() { "(secret, set)".to_owned() } else { s(&v) };
        println!("  {k} = {shown}");
    }
}

fn fmt_time(v: &serde_json::Value) -> String {
    match v.as_i64() {
        Some(ms) => humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64))
            .to_string(),
        None => "-".into(),
    }
}

async fn doctor(cfg: &Config, args: ApiArgs, channel: Option<String>) -> Result<ExitCode, String> {
    let api = Api::new(cfg, args)?;
    let ids: Vec<String> = match channel {
        Some(id) => vec![id],
        None => api.call(reqwest::Method::GET, "/api/v1/channels", None).await?["channels"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|c| c["id"].as_str().map(str::to_owned))
            .collect(),
    };
    let mut all_ok = true;
    for id in ids {
        let r = api.call(reqwest::Method::POST, &format!("/api/v1/channels/{id}/check"), None).await?;
        let report = &r["report"];
        let ok = report["ok"].as_bool().unwrap_or(false);
        all_ok &= ok;
        println!("{id}: {}", if ok { "ok" } else { "FAILED" });
        for step in report["steps"].as_array().cloned().unwrap_or_default() {
            println!(
                "  [{}] {}: {}",
                if step["ok"].as_bool().unwrap_or(false) { "ok" } else { "!!" },
                step["name"].as_str().unwrap_or(""),
                step["detail"].as_str().unwrap_or("")
            );
        }
        for u in report["unverifiable"].as_array().cloned().unwrap_or_default() {
            println!("  [??] cannot verify: {}", u.as_str().unwrap_or(""));
        }
    }
    Ok(if all_ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}
