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
//!   [`crate::upload`]) or being served, until its response is ready.
//! - `sending`: every response is ready, and some wait on the client to take them (an HTTP/2
//!   client that keeps its flow-control window shut, a client that stops reading). Closed
//!   after `--send-timeout-secs`.
//!
//! hyper's own `header_read_timeout` runs from the end of a response, idle time included, so it
//! cannot tell the two timeouts apart: it stays set, as a backstop, to their sum.
//!
//! When `--max-connections` are open, a newcomer takes the place of the connection in `headers`,
//! `idle` or `sending` that has been so the longest (closed at once, counted `evicted`), as
//! servers shed slowloris load: connections that make the server wait cannot lock newcomers
//! out. Only when every connection is `busy` is a newcomer closed at once (counted
//! `max_connections`).
//!
//! Both front doors accept through this code, each with its own cap and its own `door` label
//! in the metrics: `http` (HTTP/1.1 and HTTP/2) and `grpc` (HTTP/2 only). Their HTTP/2 limits
//! are [`Http2Limits`]: concurrent streams, header list and frame sizes, flow-control windows,
//! keep-alive PINGs, and a cap on resets: a client that cancels more than `--http2-max-resets`
//! streams on one connection within [`RESET_WINDOW`] (CVE-2023-44487, "rapid reset") has the
//! connection closed (counted `reset_flood`).

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

/// One front door: its name in the metrics, and whether it speaks HTTP/2 alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Door {
    pub name: &'static str,
    pub http2_only: bool,
}

impl Door {
    pub const HTTP: Door = Door {
        name: "http",
        http2_only: false,
    };
    pub const GRPC: Door = Door {
        name: "grpc",
        http2_only: true,
    };
}

/// The span over which a connection's client-cancelled streams are counted.
pub const RESET_WINDOW: Duration = Duration::from_secs(10);

/// HTTP/2 settings of a door.
#[derive(Debug, Clone, Copy)]
pub struct Http2Limits {
    /// Streams in flight at once on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
    /// Largest header list of a request (SETTINGS_MAX_HEADER_LIST_SIZE).
    pub max_header_list_bytes: u32,
    /// Largest frame the client may send (SETTINGS_MAX_FRAME_SIZE).
    pub max_frame_bytes: u32,
    /// Streams the client may cancel within [`RESET_WINDOW`], and the server may reset for
    /// the client's errors, on one connection.
    pub max_resets: u32,
    /// SETTINGS_INITIAL_WINDOW_SIZE, for the streams of uploads.
    pub stream_window_bytes: u32,
    /// The connection's window, shared by its streams.
    pub connection_window_bytes: u32,
    /// Between keep-alive PINGs; None: no PINGs.
    pub keep_alive_interval: Option<Duration>,
    /// Time the client has to answer a PING.
    pub keep_alive_timeout: Duration,
}

impl Http2Limits {
    /// The protocol's own bounds (RFC 9113, section 6.5.2); the message names the flag.
    pub fn validate(&self) -> Result<(), String> {
        if !(16_384..=16_777_215).contains(&self.max_frame_bytes) {
            return Err(format!(
                "--http2-max-frame-bytes ({}) must be between 16384 and 16777215",
                self.max_frame_bytes
            ));
        }
        for (flag, v) in [
            ("--http2-stream-window-bytes", self.stream_window_bytes),
            (
                "--http2-connection-window-bytes",
                self.connection_window_bytes,
            ),
        ] {
            if !(65_535..=i32::MAX as u32).contains(&v) {
                return Err(format!("{flag} ({v}) must be between 65535 and 2147483647"));
            }
        }
        if self.max_concurrent_streams == 0 {
            return Err("--http2-max-concurrent-streams must be at least 1".into());
        }
        if self.max_header_list_bytes < 1024 {
            return Err("--http2-max-header-list-bytes must be at least 1024".into());
        }
        if self.max_resets == 0 {
            return Err("--http2-max-resets must be at least 1".into());
        }
        if self.keep_alive_timeout.is_zero() && self.keep_alive_interval.is_some() {
            return Err("--http2-keep-alive-timeout-secs must be at least 1".into());
        }
        Ok(())
    }
}

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
    /// Time finished responses may wait on the client to take them.
    pub send_timeout: Duration,
    pub http2: Http2Limits,
}

/// What a connection is doing, as far as the server can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Headers,
    Idle,
    Busy,
    Sending,
}

impl Phase {
    const ALL: [Phase; 4] = [Phase::Headers, Phase::Idle, Phase::Busy, Phase::Sending];

    fn label(self) -> &'static str {
        match self {
            Phase::Headers => "headers",
            Phase::Idle => "idle",
            Phase::Busy => "busy",
            Phase::Sending => "sending",
        }
    }
}

/// Why the server closed a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Closed {
    HeaderTimeout,
    Idle,
    SendTimeout,
    Evicted,
    ResetFlood,
}

impl Closed {
    const ALL: [Closed; 5] = [
        Closed::HeaderTimeout,
        Closed::Idle,
        Closed::SendTimeout,
        Closed::Evicted,
        Closed::ResetFlood,
    ];

    fn label(self) -> &'static str {
        match self {
            Closed::HeaderTimeout => "header_timeout",
            Closed::Idle => "idle",
            Closed::SendTimeout => "send_timeout",
            Closed::Evicted => "evicted",
            Closed::ResetFlood => "reset_flood",
        }
    }
}

/// The reasons a connection can be closed for, as the metrics label them.
pub fn closed_reasons() -> impl Iterator<Item = &'static str> {
    Closed::ALL.into_iter().map(Closed::label)
}

/// The states a connection can be in, as the metrics label them.
pub fn connection_states() -> impl Iterator<Item = &'static str> {
    Phase::ALL.into_iter().map(Phase::label)
}

struct State {
    phase: Phase,
    since: Instant,
    /// Requests in whose responses are not ready (HTTP/2 can have several at once).
    computing: usize,
    /// Responses ready and not yet all taken by the client.
    sending: usize,
    /// Streams the client cancelled since `resets_since`.
    resets: u32,
    resets_since: Instant,
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
    /// Cancelled too many streams: to be closed.
    flooded: CancellationToken,
    max_resets: u32,
    phases: [IntGauge; 4],
}

impl Tracked {
    fn set(&self, s: &mut State, phase: Phase) {
        if s.phase != phase {
            self.phases[s.phase as usize].dec();
            self.phases[phase as usize].inc();
            s.phase = phase;
            s.since = Instant::now();
            self.idle.store(phase == Phase::Idle, Ordering::Release);
        }
        self.changed.notify_one();
    }

    /// The phase that the requests in make.
    fn settle(&self, s: &mut State) {
        let phase = if s.computing > 0 {
            Phase::Busy
        } else if s.sending > 0 {
            Phase::Sending
        } else {
            Phase::Idle
        };
        self.set(s, phase);
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

    fn request_started(self: &Arc<Self>) -> Computing {
        let mut s = self.state.lock().unwrap();
        s.computing += 1;
        self.settle(&mut s);
        Computing {
            conn: Some(self.clone()),
            counted: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A stream the client cancelled before its response was ready: past the cap within
    /// [`RESET_WINDOW`], the connection is to be closed.
    fn cancelled(&self, s: &mut State) {
        if !self.h2.load(Ordering::Acquire) {
            return;
        }
        let now = Instant::now();
        if now.duration_since(s.resets_since) > RESET_WINDOW {
            s.resets = 0;
            s.resets_since = now;
        }
        s.resets += 1;
        if s.resets > self.max_resets {
            self.flooded.cancel();
        }
    }

    /// When this connection is due to be closed, and why; None while busy.
    fn deadline(&self, limits: &ConnectionLimits) -> Option<(Instant, Closed)> {
        let s = self.state.lock().unwrap();
        match s.phase {
            Phase::Headers => Some((s.since + limits.header_read_timeout, Closed::HeaderTimeout)),
            Phase::Idle => Some((s.since + limits.keep_alive_timeout, Closed::Idle)),
            Phase::Sending => Some((s.since + limits.send_timeout, Closed::SendTimeout)),
            Phase::Busy => None,
        }
    }

    /// Whether no request is in: idle between requests, or still sending the headers of one
    /// (not a response on its way to the client, which shutdown lets finish).
    fn has_no_request(&self) -> bool {
        matches!(
            self.state.lock().unwrap().phase,
            Phase::Idle | Phase::Headers
        )
    }

    /// Since when the connection has been waiting on its client, unless it is busy.
    fn waiting_since(&self) -> Option<Instant> {
        let s = self.state.lock().unwrap();
        (s.phase != Phase::Busy).then_some(s.since)
    }
}

/// A request whose response is not ready yet. Dropped before [`Computing::ready`], the request
/// was abandoned: on HTTP/2, the client cancelled the stream (counted once, here or by
/// [`ResetWatch`], whichever sees it first).
struct Computing {
    conn: Option<Arc<Tracked>>,
    counted: Arc<AtomicBool>,
}

/// A request body that tells its connection when the client cancels the stream while the body
/// is being read: the handler then answers (an error nobody receives) rather than being
/// dropped, so [`Computing`] alone would not see the reset.
struct ResetWatch {
    inner: hyper::body::Incoming,
    conn: Arc<Tracked>,
    counted: Arc<AtomicBool>,
}

/// Whether a request body's error is the client's RST_STREAM.
fn is_remote_reset(e: &hyper::Error) -> bool {
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .is_some_and(|h| h.is_reset() && h.is_remote())
}

impl HttpBody for ResetWatch {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let r = std::task::ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Err(e)) = &r
            && is_remote_reset(e)
            && !self.counted.swap(true, Ordering::AcqRel)
        {
            let mut s = self.conn.state.lock().unwrap();
            self.conn.cancelled(&mut s);
        }
        Poll::Ready(r)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Computing {
    /// The response is ready: from now on it waits on the client to take it.
    fn ready(mut self) -> Sending {
        let conn = self.conn.take().expect("a request is ready once");
        let mut s = conn.state.lock().unwrap();
        s.computing = s.computing.saturating_sub(1);
        s.sending += 1;
        conn.settle(&mut s);
        drop(s);
        Sending(conn)
    }
}

impl Drop for Computing {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut s = conn.state.lock().unwrap();
            s.computing = s.computing.saturating_sub(1);
            if !self.counted.swap(true, Ordering::AcqRel) {
                conn.cancelled(&mut s);
            }
            conn.settle(&mut s);
        }
    }
}

/// A response being written; dropped once hyper has written it all (or the stream is gone),
/// which makes the connection idle if it was the last.
struct Sending(Arc<Tracked>);

impl Drop for Sending {
    fn drop(&mut self) {
        let mut s = self.0.state.lock().unwrap();
        s.sending = s.sending.saturating_sub(1);
        self.0.settle(&mut s);
    }
}

/// A response body that holds its request's place until hyper has written it all.
pub struct ResponseBody {
    inner: axum::body::Body,
    _sending: Sending,
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
    door: Door,
    max_resets: u32,
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
                .with_label_values(&[self.door.name, p.label()])
        });
        phases[Phase::Headers as usize].inc();
        let conn = Arc::new(Tracked {
            id,
            state: Mutex::new(State {
                phase: Phase::Headers,
                since: Instant::now(),
                computing: 0,
                sending: 0,
                resets: 0,
                resets_since: Instant::now(),
            }),
            idle: AtomicBool::new(false),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(false),
            changed: Notify::new(),
            evicted: CancellationToken::new(),
            made_room: AtomicBool::new(false),
            flooded: CancellationToken::new(),
            max_resets: self.max_resets,
            phases,
        });
        places.insert(id, conn.clone());
        Some(conn)
    }

    fn closed(&self, why: Closed) {
        self.metrics
            .connections_closed
            .with_label_values(&[self.door.name, why.label()])
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

/// hyper's server for a door: HTTP/1.1 (unless the door is HTTP/2 only) and HTTP/2 with the
/// door's limits.
fn connection_builder(door: Door, limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    if door.http2_only {
        builder = builder.http2_only();
    } else {
        builder
            .http1()
            .timer(TokioTimer::new())
            // A backstop only: the phases above close connections first (see the module's notes).
            .header_read_timeout(limits.header_read_timeout + limits.keep_alive_timeout)
            .keep_alive(true);
    }
    let h2 = limits.http2;
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(h2.max_concurrent_streams)
        .max_header_list_size(h2.max_header_list_bytes)
        .max_frame_size(h2.max_frame_bytes)
        .initial_stream_window_size(h2.stream_window_bytes)
        .initial_connection_window_size(h2.connection_window_bytes)
        // Streams reset before the server took them up, and streams the server reset for the
        // client's protocol errors: h2's own counts, closed with GOAWAY beyond.
        .max_pending_accept_reset_streams(h2.max_resets.min(20) as usize)
        .max_local_error_reset_streams(h2.max_resets as usize)
        .keep_alive_interval(h2.keep_alive_interval)
        .keep_alive_timeout(h2.keep_alive_timeout);
    builder
}

/// Accepts and serves connections until `stop` is cancelled; the listener is closed on return.
pub async fn accept(
    listener: TcpListener,
    app: Router,
    door: Door,
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
        door,
        max_resets: limits.http2.max_resets,
        metrics: metrics.clone(),
        closing: AtomicUsize::new(0),
        closed_one: Notify::new(),
    });
    let builder = connection_builder(door, &limits);
    let accepted_total = metrics.connections.with_label_values(&[door.name]);
    let open_now = metrics.connections_open.with_label_values(&[door.name]);
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
        accepted_total.inc();
        let Some(conn) = registry.admit() else {
            metrics
                .connections_refused
                .with_label_values(&[door.name, "max_connections"])
                .inc();
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        open_now.inc();
        let open = Open {
            conn: conn.clone(),
            registry: registry.clone(),
            open: open_now.clone(),
        };
        let service = {
            let (app, conn) = (app.clone(), conn.clone());
            tower::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let computing = conn.request_started();
                let mut req = req.map(|inner| ResetWatch {
                    inner,
                    conn: conn.clone(),
                    counted: computing.counted.clone(),
                });
                req.extensions_mut()
                    .insert(ConnectInfo::<SocketAddr>(remote));
                let response = app.clone().oneshot(req);
                async move {
                    let response = response.await?;
                    let sending = computing.ready();
                    Ok::<_, std::convert::Infallible>(response.map(|inner| ResponseBody {
                        inner,
                        _sending: sending,
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
                    _ = conn.flooded.cancelled() => {
                        registry.closed(Closed::ResetFlood);
                        tracing::info!(%remote, door = door.name, "connection closed: too many streams cancelled");
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
            if conn.has_no_request() {
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
impl crate::config::ServeConfig {
    /// The connection discipline of both front doors.
    pub fn connection_limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            max_connections: self.max_connections,
            header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
            keep_alive_timeout: Duration::from_secs(self.keep_alive_timeout_secs),
            send_timeout: Duration::from_secs(self.send_timeout_secs),
            http2: self.http2_limits(),
        }
    }

    pub fn http2_limits(&self) -> Http2Limits {
        Http2Limits {
            max_concurrent_streams: self.http2_max_concurrent_streams,
            max_header_list_bytes: self.http2_max_header_list_bytes,
            max_frame_bytes: self.http2_max_frame_bytes,
            max_resets: self.http2_max_resets,
            stream_window_bytes: self.http2_stream_window_bytes,
            connection_window_bytes: self.http2_connection_window_bytes,
            keep_alive_interval: (self.http2_keep_alive_interval_secs > 0)
                .then(|| Duration::from_secs(self.http2_keep_alive_interval_secs)),
            keep_alive_timeout: Duration::from_secs(self.http2_keep_alive_timeout_secs),
        }
    }
}
