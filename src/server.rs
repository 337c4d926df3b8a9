//! Assembles the service: store, registry, pipeline, supervisor and HTTP server; runs until
//! the shutdown token is cancelled, then shuts down in order.

use crate::admin;
use crate::config::{self, Config, ConfigErrors};
use crate::metrics::Metrics;
use crate::pipeline::{Pipeline, PipelineSettings};
use crate::registry::Registry;
use crate::seal::Sealer;
use crate::store::{sqlite::SqliteStore, Store};
use crate::http_server;
use actix_web::{web, App, HttpResponse};
use patchbay_channel_core::{Inbox, Secret};
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// What every handler can reach.
pub struct AppState {
    pub registry: Arc<Registry>,
    pub inbox: Arc<dyn Inbox>,
    pub pipeline: Arc<Pipeline>,
    pub store: Arc<dyn Store>,
    pub metrics: Arc<Metrics>,
    pub admin_token: Secret,
    pub body_limit: usize,
    pub public_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    #[error("store: {0}")]
    Store(String),
    #[error("http: {0}")]
    Http(String),
}

/// The shared outbound HTTP client: rustls, pooled, bounded connect time.
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .user_agent(concat!("patchbay/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90))
        .build()
        .expect("the TLS backend initialises")
}

fn config_error(key: &str, e: impl std::fmt::Display) -> StartError {
    StartError::Config(ConfigErrors(vec![config::ConfigError::new(key, e.to_string())]))
}

/// Runs the service on `listener` until `shutdown` is cancelled.
pub async fn run(cfg: Config, listener: TcpListener, shutdown: CancellationToken) -> Result<(), StartError> {
    let sealer = {
        let key = config::resolve_or_create_secret("security.encryption_key", &cfg.security.encryption_key, Sealer::generate_key)
            .map_err(|e| StartError::Config(ConfigErrors(vec![e])))?;
        Sealer::from_key(&key).map_err(|e| config_error("security.encryption_key", e))?
    };
    let admin_token = config::resolve_or_create_secret("security.admin_token", &cfg.security.admin_token, || {
        patchbay_channel_core::ids::random_token(40)
    })
    .map_err(|e| StartError::Config(ConfigErrors(vec![e])))?;
    if admin_token.expose().len() < 16 {
        return Err(config_error("security.admin_token", "must be at least 16 characters"));
    }

    let path = cfg.sqlite_path().ok_or_else(|| config_error("store.url", "only sqlite:// is supported"))?;
    let store: Arc<dyn Store> =
        Arc::new(SqliteStore::open(&path, cfg.store.sqlite_synchronous).map_err(|e| StartError::Store(e.to_string()))?);

    let local = listener.local_addr().map_err(|e| StartError::Http(e.to_string()))?;
    let public_url = if cfg.server.public_url.is_empty() {
        format!("http://{local}")
    } else {
        cfg.public_url()
    };
    let http = http_client();
    let log = Arc::new(crate::store::StoreLog(store.clone()));
    let registry = Registry::new(store.clone(), crate::kinds::all(), sealer, http, public_url.clone(), log);
    registry.apply_config(&cfg).await?;

    let metrics = Arc::new(Metrics::default());
    let pipeline = Pipeline::new(store.clone(), registry.clone(), metrics.clone(), PipelineSettings::from_config(&cfg.pipeline));
    let pipeline_tasks = pipeline.start();
    let inbox: Arc<dyn Inbox> = pipeline.clone();

    let background = CancellationToken::new();
    let supervisor = tokio::spawn(crate::supervisor::run(registry.clone(), inbox.clone(), background.clone()));
    let follower = tokio::spawn(registry.clone().follow(Duration::from_millis(500), background.clone()));

    let state = web::Data::new(AppState {
        registry: registry.clone(),
        inbox,
        pipeline: pipeline.clone(),
        store: store.clone(),
        metrics,
        admin_token,
        body_limit: cfg.server.body_limit_bytes,
        public_url: public_url.clone(),
    });
    let grace = Duration::from_secs(cfg.pipeline.shutdown_grace_secs);
    let workers = if cfg.server.workers == 0 {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        cfg.server.workers
    };
    let app = move || {
        App::new()
            .app_data(state.clone())
            .configure(admin::routes)
            // A static prefix, split by hand in `hooks::handle`: every platform event comes
            // this way, and a pattern with `{kind}/{hook_id}` costs a regex match per request.
            .service(web::scope("/hooks").default_service(web::to(crate::hooks::handle)))
            .route("/healthz", web::get().to(|| async { HttpResponse::Ok().json(serde_json::json!({"status": "ok"})) }))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_page))
            .route("/docs", web::get().to(admin::openapi::page))
            .route("/chat", web::get().to(chat_page))
            .route("/chat/{channel}", web::get().to(chat_page))
    };
    let settings = http_server::Settings {
        workers,
        // Platforms and proxies keep connections in their pools for a minute or more; closing
        // idle ones after actix's default 5 s makes a client that reuses one at that moment see
        // its request fail unanswered.
        keep_alive: Duration::from_secs(75),
        // Small frames (a web chat's `received`, `typing` and reply; a WebSocket ping) must not
        // wait ~40 ms for the peer's delayed ACK of the previous one (Nagle's algorithm).
        tcp_nodelay: true,
        shutdown_timeout: grace,
    };
    // Served like actix-web's HttpServer, except that WebSockets leave actix's HTTP
    // dispatcher once upgraded (src/http_server.rs).
    let server = http_server::start(listener, settings, app).map_err(|e| StartError::Http(e.to_string()))?;

    tracing::info!(url = %public_url, "patchbay is listening");
    println!("patchbay listening on http://{local}");
    if let Some(url) = chat_url(&registry, None) {
        // The public URL of the chat page: what a person opens to try it.
        let short = format!("{public_url}/chat");
        println!("  chat: {short} (opens {url})");
    }
    for c in registry.snapshot().channels.values() {
        println!(
            "  channel {} ({}, {}): {}",
            c.record.id,
            c.record.kind,
            if c.record.enabled { "enabled" } else { "disabled" },
            c.callback_url
        );
    }

    shutdown.cancelled().await;
    tracing::info!("shutting down: no new requests; finishing in-flight work");
    // 1. Stop accepting; close the web chat sockets; let in-flight requests (whose messages
    // are being stored) finish.
    server.stop(grace).await;
    // 2. Stop connectors and the registry follower.
    background.cancel();
    let _ = supervisor.await;
    let _ = follower.await;
    // 3. Let the pipeline finish what it holds, within the grace period.
    pipeline.shutdown(grace, pipeline_tasks).await;
    // 4. Flush the store.
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// The web chat's address for `channel` (or the first enabled web chat channel), if any.
pub fn chat_url(registry: &Registry, channel: Option<&str>) -> Option<String> {
    let snap = registry.snapshot();
    let entry = match channel {
        Some(id) => snap.channels.get(id).filter(|c| c.record.kind == "webchat"),
        None => snap.channels.values().find(|c| c.record.kind == "webchat" && c.record.enabled),
    }?;
    Some(format!("{}/chat", entry.callback_url))
}

/// `GET /chat[/{channel}]`: sends the browser to that web chat channel's page.
async fn chat_page(req: actix_web::HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    let channel = req.match_info().get("channel");
    match chat_url(&state.registry, channel) {
        Some(url) => {
            // Relative to this server, so it works whatever name the browser used.
            let path = url.strip_prefix(&state.public_url).unwrap_or(&url).to_owned();
            HttpResponse::Found().insert_header(("Location", path)).finish()
        }
        None => HttpResponse::NotFound().content_type("text/html; charset=utf-8").body(match channel {
            Some(_) => "<!doctype html><title>Chat</title><p>There is no web chat channel of that name.</p>",
            None => "<!doctype html><title>Chat</title><p>No web chat channel is enabled. Add one with <code>kind = \"webchat\"</code>.</p>",
        }),
    }
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    match state.store.depths().await {
        Ok(d) => HttpResponse::Ok().json(serde_json::json!({
            "status": "ready",
            "channels": state.registry.snapshot().channels.len(),
            "queues": d,
        })),
        Err(e) => patchbay_channel_core::channel::error_response(
            actix_web::http::StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            &format!("the store does not answer: {e}"),
            None,
        ),
    }
}

async fn metrics_page(state: web::Data<AppState>) -> HttpResponse {
    // Every channel has its series from the start, at zero, not only once it saw traffic.
    for id in state.registry.snapshot().channels.keys() {
        state.metrics.channel(id);
    }
    let depths = state.store.depths().await.ok();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(state.metrics.render(depths))
}
