//! The HTTP server: the actix-web `App` served by actix-server and actix-http, the way
//! actix-web's `HttpServer` assembles them, plus the one thing `HttpServer` cannot do: hand a
//! connection out of actix's HTTP/1 dispatcher once a hook answered its upgrade request with
//! `101` (see `patchbay_channel_core::upgrade`).
//!
//! Why: an upgraded connection left in the dispatcher keeps the dispatcher's read and write
//! buffers and state for its whole life, about 13 KB per idle web chat socket, more than the
//! 5 KB a socket may cost. Handed out, an idle socket holds only its own small state.
//!
//! Every request with `Upgrade: websocket` reaches the `App` through [`hand_over`], marked
//! with [`HandOver`]; every other request goes through actix-http's dispatcher to the same
//! `App`, exactly as with `HttpServer`.

use actix_codec::Framed;
use actix_http::body::{BoxBody, MessageBody};
use actix_http::{h1, HttpMessage, HttpService, KeepAlive, Request, Response, StatusCode};
use actix_server::{Server, ServerHandle};
use actix_service::{fn_factory, fn_service, map_config, IntoServiceFactory, Service, ServiceFactory, ServiceFactoryExt};
use actix_web::dev::AppConfig;
use patchbay_channel_core::upgrade::{HandOver, TakeOver, Upgraded};
use std::fmt;
use std::net::TcpListener;
use futures_util::future::LocalBoxFuture;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How the server runs; the same knobs `HttpServer` was given before.
pub struct Settings {
    pub workers: usize,
    pub keep_alive: Duration,
    pub tcp_nodelay: bool,
    /// How long a graceful stop waits for requests in flight.
    pub shutdown_timeout: Duration,
}

/// The running server and the connections it handed over.
pub struct Running {
    handle: ServerHandle,
    /// The server's own future (accepting, worker supervision), spawned on the runtime.
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    sockets: Sockets,
}

/// The handed-over connections: they run outside actix's connection count, so the server's
/// graceful stop does not wait for them; they are told to stop and waited for here.
#[derive(Clone, Default)]
struct Sockets {
    /// How many run, and a wake-up for the wait at shutdown when the last one ends.
    open: Arc<(AtomicUsize, Notify)>,
    stop: CancellationToken,
}

impl Sockets {
    /// Runs `socket` as its own task on this worker thread, counted until it ends.
    fn spawn(&self, socket: LocalBoxFuture<'static, ()>) {
        struct Open(Arc<(AtomicUsize, Notify)>);
        impl Drop for Open {
            fn drop(&mut self) {
                if self.0 .0.fetch_sub(1, Ordering::AcqRel) == 1 {
                    self.0 .1.notify_waiters();
                }
            }
        }
        self.open.0.fetch_add(1, Ordering::AcqRel);
        let open = Open(self.open.clone());
        // The worker threads run a tokio `LocalSet` (actix-rt).
        tokio::task::spawn_local(async move {
            let _open = open;
            socket.await
        });
    }

    /// Waits until no socket runs.
    async fn closed(&self) {
        loop {
            let notified = self.open.1.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.open.0.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Running {
    /// Stops accepting, closes handed-over connections (each says goodbye with a close frame,
    /// 1001 "going away", so clients reconnect to the next process), waiting at most
    /// `within` for them, then stops the server gracefully.
    pub async fn stop(self, within: Duration) {
        self.handle.pause().await;
        self.sockets.stop.cancel();
        if tokio::time::timeout(within, self.sockets.closed()).await.is_err() {
            tracing::debug!(open = self.sockets.open.0.load(Ordering::Relaxed), "WebSockets still closing at shutdown");
        }
        self.handle.stop(true).await;
        let _ = self.task.await;
    }
}

/// Serves `app` on `listener`.
pub fn start<F, I, S, B>(listener: TcpListener, settings: Settings, app: F) -> std::io::Result<Running>
where
    F: Fn() -> I + Send + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    <S::Service as Service<Request>>::Future: 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    let local = listener.local_addr()?;
    let sockets = Sockets::default();
    let builder = Server::build();
    let graceful = builder.graceful_shutdown_signal();
    let keep_alive = KeepAlive::Timeout(settings.keep_alive);
    let nodelay = settings.tcp_nodelay;
    let for_workers = sockets.clone();
    let server = builder
        .workers(settings.workers)
        .disable_signals()
        .shutdown_timeout(settings.shutdown_timeout.as_secs().max(1))
        .listen("patchbay-http", listener, move || {
            let graceful = graceful.clone();
            let fac = app().into_factory().map_err(|e| e.into().error_response());
            // As HttpServer: request head within 5 s, 1 s to finish a disconnect, half-closed
            // connections allowed; and patchbay's keep-alive and TCP_NODELAY.
            HttpService::build()
                .graceful_shutdown_signal(move || {
                    let signal = graceful.clone();
                    async move { signal.notified().await }
                })
                .keep_alive(keep_alive)
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                .h1_allow_half_closed(true)
                .tcp_nodelay(nodelay)
                .local_addr(local)
                .upgrade(upgrades(app.clone(), for_workers.clone()))
                // The host and address of AppConfig only serve URL generation from the
                // connection (`url_for`, `connection_info` without a Host header), which
                // patchbay does not use: its URLs come from `server.public_url`.
                .finish(map_config(fac, |_| AppConfig::default()))
                .tcp()
        })?
        .run();
    Ok(Running { handle: server.handle(), task: tokio::spawn(server), sockets })
}

/// The service every upgrade request goes to: the same `App`, called directly.
fn upgrades<F, I, S, B>(
    app: F,
    sockets: Sockets,
) -> impl ServiceFactory<(Request, Framed<TcpStream, h1::Codec>), Config = (), Response = (), Error = actix_http::Error, InitError = ()>
where
    F: Fn() -> I + Clone + 'static,
    I: IntoServiceFactory<S, Request>,
    S: ServiceFactory<Request, Config = AppConfig> + 'static,
    S::Error: Into<actix_web::Error> + 'static,
    S::InitError: fmt::Debug,
    S::Response: Into<Response<B>> + 'static,
    S::Service: 'static,
    B: MessageBody + 'static,
{
    fn_factory(move || {
        let fac = app().into_factory();
        let sockets = sockets.clone();
        async move {
            let svc = Rc::new(fac.new_service(AppConfig::default()).await.map_err(|e| {
                tracing::error!(error = ?e, "the HTTP app could not be built for upgrades");
            })?);
            Ok(fn_service(move |(req, framed): (Request, Framed<TcpStream, h1::Codec>)| {
                hand_over(svc.clone(), req, framed, sockets.clone())
            }))
        }
    })
}

/// Answers an upgrade request through the `App`; a `101` carrying a [`TakeOver`] gets the
/// connection, run on this worker thread as its own task. Any other answer is written and the
/// connection closed, as actix does after an upgrade request it did not upgrade.
async fn hand_over<Svc, B>(
    app: Rc<Svc>,
    req: Request,
    framed: Framed<TcpStream, h1::Codec>,
    sockets: Sockets,
) -> Result<(), actix_http::Error>
where
    Svc: Service<Request>,
    Svc::Error: Into<actix_web::Error>,
    Svc::Response: Into<Response<B>>,
    B: MessageBody + 'static,
{
    req.extensions_mut().insert(HandOver);
    let mut res: Response<BoxBody> = match app.call(req).await {
        Ok(r) => r.into().map_into_boxed_body(),
        Err(e) => e.into().error_response().into(),
    };
    let take = if res.status() == StatusCode::SWITCHING_PROTOCOLS {
        res.extensions_mut().remove::<TakeOver>()
    } else {
        None
    };
    // Whole, then written: these answers are a `101` or a short error.
    let (res, body) = res.into_parts();
    let body = actix_http::body::to_bytes(body)
        .await
        .map_err(|e| actix_http::error::PayloadError::Io(std::io::Error::other(e.to_string())))?;
    let res = res.set_body(body);
    let framed = h1::SendResponse::new(framed, res).await?;
    let Some(take) = take else { return Ok(()) };
    // From here on actix holds nothing of this connection: its buffers go with `parts`.
    let parts = framed.into_parts();
    let conn = Upgraded {
        io: parts.io,
        buffered: parts.read_buf.to_vec(),
        stop: sockets.stop.clone(),
    };
    sockets.spawn(take.run(conn));
    Ok(())
}
