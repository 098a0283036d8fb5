//! Accepting and serving connections: hyper-util's HTTP/1 and HTTP/2 server with a timer, a
//! cap on open connections that makes room by closing the connection waiting on its client the
//! longest, a header timeout and a keep-alive timeout of their own, per-connection metrics,
//! and a drain with a deadline.
//!
//! Each connection is, at any moment, in one phase, from the server's point of view:
//! - `headers`: waiting for a request's headers: from the connection's start until its first
//!   request's headers are in, or from the first byte of a later request on a keep-alive
//!   connection until its headers are in. Closed after `--header-read-timeout-secs`, however
//!   slowly the bytes keep coming (slowloris).
//! - `idle`: a keep-alive connection between two requests, after the last response and before
//!   the next request's first byte. Closed after `--keep-alive-timeout-secs`, which is set
//!   apart from the header timeout so that it can exceed a load balancer's idle timeout (a
//!   backend that closes an idle connection first makes the balancer answer 502) while the
//!   header timeout stays short.
//! - `busy`: a request is in (its body being received, under the upload deadlines of
//!   [`crate::api::upload`]) or being served, until its response has been written.
//!
//! hyper's own `header_read_timeout` runs from the end of a response, idle time included, so it
//! cannot tell the two timeouts apart: it stays set, as a backstop, to their sum.
//!
//! When `--max-connections` are open, a newcomer takes the place of the connection in `headers`
//! or `idle` that has been so the longest (closed at once, counted `evicted`), as servers shed
//! slowloris load: connections that make the server wait cannot lock newcomers out. Only when
//! every connection is `busy` is a newcomer closed at once (counted `max_connections`).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use prometheus::IntGauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::telemetry::Metrics;

/// Limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections open at once; a newcomer beyond it takes the place of the connection waiting
    /// on its client the longest, or is closed at once when every one is busy.
    pub max_connections: usize,
    /// Time a client has to send a request's headers, from the connection's start or the
    /// request's first byte.
    pub header_read_timeout: Duration,
    /// Time a keep-alive connection may stay idle between requests.
    pub keep_alive_timeout: Duration,
}

/// What a connection is doing, as far as the server can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Headers,
    Idle,
    Busy,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Headers, Phase::Idle, Phase::Busy];

    fn label(self) -> &'static str {
        match self {
            Phase::Headers => "headers",
            Phase::Idle => "idle",
            Phase::Busy => "busy",
        }
    }
}

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    HeaderTimeout,
    Idle,
    Evicted,
}

impl Closed {
    fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::Idle => "idle",
            Closed::Evicted => "evicted",
        }
    }
}

struct State {
    phase: Phase,
    since: Instant,
    /// Requests in (HTTP/2 can have several at once).
    active: usize,
}

/// One open connection's phase, shared by its task, its socket and its requests.
struct Tracked {
    id: u64,
    state: Mutex<State>,
    /// `phase == Idle`, readable without the lock (checked on every read from the socket).
    idle: AtomicBool,
    /// An HTTP/2 connection: reads between requests are pings and settings, not a request's
    /// first byte.
    h2: AtomicBool,
    first_read: AtomicBool,
    changed: Notify,
    evicted: CancellationToken,
    /// Evicted to make room: counted in [`Registry::closing`] until its task has ended.
    made_room: AtomicBool,
    phases: [IntGauge; 3],
}

impl Tracked {
    fn set(&self, s: &mut State, phase: Phase) {
        if s.phase != phase {
            self.phases[s.phase as usize].dec();
            self.phases[phase as usize].inc();
            s.phase = phase;
            self.idle.store(phase == Phase::Idle, Ordering::Release);
        }
        s.since = Instant::now();
        self.changed.notify_one();
    }

    /// Bytes came from the client: on an idle HTTP/1 connection, the next request has begun.
    fn on_read(&self, data: &[u8]) {
        if !self.first_read.swap(true, Ordering::AcqRel) && data.starts_with(b"PRI ") {
            self.h2.store(true, Ordering::Release);
        }
        if self.idle.load(Ordering::Acquire) && !self.h2.load(Ordering::Acquire) {
            let mut s = self.state.lock().unwrap();
            if s.phase == Phase::Idle {
                self.set(&mut s, Phase::Headers);
            }
        }
    }

    fn request_started(self: &Arc<Self>) -> ActiveRequest {
        let mut s = self.state.lock().unwrap();
        s.active += 1;
        self.set(&mut s, Phase::Busy);
        ActiveRequest(self.clone())
    }

    /// When this connection is due to be closed, and why; None while busy.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Closed)> {
        let s = self.state.lock().unwrap();
        match s.phase {
            Phase::Headers => Some((s.since + limits.header_read_timeout, Closed::HeaderTimeout)),
            Phase::Idle => Some((s.since + limits.keep_alive_timeout, Closed::Idle)),
            Phase::Busy => None,
        }
    }

    /// Since when the connection has been waiting on its client, unless it is busy.
    fn waiting_since(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        (s.phase != Phase::Busy).then_some(s.since)
    }
}

/// A request in progress on a connection; dropped once its response has been written (or the
/// request abandoned), which makes the connection idle if it was the last.
struct ActiveRequest(Arc<Tracked>);

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        s.active = s.active.saturating_sub(1);
        if s.active == 0 {
            self.0.set(&mut s, Phase::Idle);
        }
    }
}

/// A response body that holds its request's place until hyper has written it all.
pub struct ResponseBody {
    inner: axum::body::Body,
    _active: ActiveRequest,
}

impl HttpBody for ResponseBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, telling its connection when bytes arrive.
struct TrackedIo {
    stream: TcpStream,
    conn: Arc<Tracked>,
}

impl AsyncRead for TrackedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.conn.on_read(&buf.filled()[before..]);
        }
        r
    }
}

impl AsyncWrite for TrackedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// Evicted connections whose sockets are not closed yet, at most: the accept loop waits for them
/// beyond it, so that a flood cannot keep more than `--max-connections` + this many sockets.
const CLOSING_MAX: usize = 16;

/// The connections that hold a place under the cap.
struct Registry {
    places: Mutex<HashMap<u64, Arc<Tracked>>>,
    next: AtomicU64,
    cap: usize,
    metrics: Arc<Metrics>,
    /// Evicted connections still closing, and a wake-up when one has.
    closing: AtomicUsize,
    closed_one: Notify,
}

impl Registry {
    /// A place for a new connection: a free one, or the place of the connection waiting on its
    /// client the longest (closed); None when every connection is busy.
    fn admit(&self) -> Option<Arc<Tracked>> {
        let mut places = self.places.lock().unwrap();
        if places.len() >= self.cap {
            let victim = places
                .values()
                .filter_map(|c| c.waiting_since().map(|since| (since, c.id)))
                .min()
                .map(|(_, id)| id)?;
            if let Some(v) = places.remove(&victim) {
                v.made_room.store(true, Ordering::Release);
                self.closing.fetch_add(1, Ordering::AcqRel);
                v.evicted.cancel();
                self.closed(Closed::Evicted);
            }
        }
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let phases = Phase::ALL.map(|p| {
            self.metrics
                .connections_by_state
                .with_label_values(&[p.label()])
        });
        phases[Phase::Headers as usize].inc();
        let conn = Arc::new(Tracked {
            id,
            state: Mutex::new(State {
                phase: Phase::Headers,
                since: Instant::now(),
                active: 0,
            }),
            idle: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(false),
            changed: Notify::new(),
            evicted: CancellationToken::new(),
            made_room: AtomicBool::new(false),
            phases,
        });
        places.insert(id, conn.clone());
        Some(conn)
    }

    fn closed(&self, why: Closed) {
        self.metrics
            .connections_closed
            .with_label_values(&[why.label()])
            .inc();
    }
}

/// A connection's hold on its place and on the gauges, released when its task ends, whatever
/// ends it.
struct Open {
    conn: Arc<Tracked>,
    registry: Arc<Registry>,
    open: IntGauge,
}

impl Drop for Open {
    fn drop(&mut self) {
        self.open.dec();
        let phase = self.conn.state.lock().unwrap().phase;
        self.conn.phases[phase as usize].dec();
        let mut places = self.registry.places.lock().unwrap();
        if places
            .get(&self.conn.id)
            .is_some_and(|c| Arc::ptr_eq(c, &self.conn))
        {
            places.remove(&self.conn.id);
        }
        drop(places);
        if self.conn.made_room.load(Ordering::Acquire) {
            self.registry.closing.fetch_sub(1, Ordering::AcqRel);
            self.registry.closed_one.notify_one();
        }
    }
}

/// Raises the soft limit on open files to the hard limit (as Go's runtime and nginx's
/// `worker_rlimit_nofile` do): each connection is a descriptor, and a soft limit of 1024 (many
/// distributions' default) would make `--max-connections 1024` fail on `accept` first. Warns
/// when even the hard limit leaves too little room. Returns the soft limit.
// rlim_t is u64 on Linux but not on every target.
#[allow(clippy::unnecessary_cast)]
pub fn raise_open_file_limit(max_connections: usize) -> u64 {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed to them.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return 0;
        }
        if l.rlim_cur < l.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: l.rlim_max,
                rlim_max: l.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                l.rlim_cur = l.rlim_max;
            }
        }
    }
    // Model files, the listener, logs, libtorch's own: a margin for what is not a connection.
    let needed = max_connections as u64 + 128;
    if l.rlim_cur < needed {
        tracing::warn!(
            open_files = l.rlim_cur,
            needed,
            "the open-file limit is below --max-connections + 128: new connections may fail before the cap (raise `ulimit -n`, or lower --max-connections)"
        );
    }
    l.rlim_cur as u64
}

/// The connections being served, to drain at shutdown.
pub struct Connections {
    graceful: GracefulShutdown,
    tasks: JoinSet<()>,
    registry: Arc<Registry>,
}

/// Accepts and serves connections until `stop` is cancelled; the listener is closed on return.
pub async fn accept(
    listener: TcpListener,
    app: Router,
    limits: ConnectionLimits,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) -> Connections {
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let registry = Arc::new(Registry {
        places: Mutex::new(HashMap::new()),
        next: AtomicU64::new(0),
        cap: limits.max_connections.max(1),
        metrics: metrics.clone(),
        closing: AtomicUsize::new(0),
        closed_one: Notify::new(),
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // A backstop only: the phases above close connections first (see the module's notes).
        .header_read_timeout(limits.header_read_timeout + limits.keep_alive_timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    loop {
        // Under a flood of newcomers, let the connections they displaced close first.
        if registry.closing.load(Ordering::Acquire) >= CLOSING_MAX {
            let closed = registry.closed_one.notified();
            if registry.closing.load(Ordering::Acquire) >= CLOSING_MAX {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = closed => {}
                    // A backstop, should a wake-up be missed.
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
            continue;
        }
        let (stream, remote) = tokio::select! {
            _ = stop.cancelled() => break,
            // Reap finished connections as they end, so the set stays small.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        metrics.connections.inc();
        let Some(conn) = registry.admit() else {
            metrics
                .connections_refused
                .with_label_values(&["max_connections"])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        metrics.connections_open.inc();
        let open = Open {
            conn: conn.clone(),
            registry: registry.clone(),
            open: metrics.connections_open.clone(),
        };
        let service = {
            let (app, conn) = (app.clone(), conn.clone());
            tower::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                req.extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(remote));
                let active = conn.request_started();
                let response = app.clone().oneshot(req);
                async move {
                    let response = response.await?;
                    Ok::<_, std::convert::Infallible>(response.map(|inner| ResponseBody {
                        inner,
                        _active: active,
                    }))
                }
            })
        };
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let registry = registry.clone();
        tasks.spawn(async move {
            let _open = open;
            let io = TrackedIo {
                stream,
                conn: conn.clone(),
            };
            let served = builder.serve_connection_with_upgrades(
                TokioIo::new(io),
                TowerToHyperService::new(service),
            );
            let served = watcher.watch(served.into_owned());
            tokio::pin!(served);
            // While busy, the phase is looked at again this often (or when it changes).
            let recheck = limits.header_read_timeout.min(limits.keep_alive_timeout);
            loop {
                let due = conn.deadline(&limits);
                let wake = due.map_or(Instant::now() + recheck, |(at, _)| at);
                tokio::select! {
                    r = &mut served => {
                        if let Err(e) = r {
                            tracing::debug!(error = %e, %remote, "connection ended with an error");
                        }
                        break;
                    }
                    _ = conn.evicted.cancelled() => {
                        tracing::debug!(%remote, "connection closed: room for a new one, or shutdown");
                        break;
                    }
                    _ = conn.changed.notified() => continue,
                    _ = tokio::time::sleep_until(wake) => {
                        if let Some((at, why)) = conn.deadline(&limits)
                            && at <= Instant::now()
                        {
                            registry.closed(why);
                            tracing::debug!(%remote, reason = why.label(), "connection closed");
                            break;
                        }
                    }
                }
            }
        });
    }
    Connections {
        graceful,
        tasks,
        registry,
    }
}

impl Connections {
    /// Closes the connections that have no request in (idle, or still sending headers), asks
    /// the others to finish their request in flight and close, and waits for them until
    /// `deadline`; then drops those still open (their requests end there). Returns whether all
    /// finished in time.
    pub async fn drain(self, deadline: Instant) -> bool {
        let Connections {
            graceful,
            mut tasks,
            registry,
        } = self;
        for conn in registry.places.lock().unwrap().values() {
            if conn.waiting_since().is_some() {
                conn.evicted.cancel();
            }
        }
        let finished = tokio::time::timeout_at(deadline, graceful.shutdown())
            .await
            .is_ok();
        if !finished {
            tasks.abort_all();
        }
        while tasks.join_next().await.is_some() {}
        finished
    }
}
