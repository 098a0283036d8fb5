//! Receiving request bodies: their memory bounded by a byte budget taken as the bytes arrive,
//! and a deadline of each upload's own.
//!
//! Why a budget of bytes and not a count of uploads: a count is taken whole by a client that
//! has sent nothing. 64 places, each held up to the request timeout by a connection that sent
//! its headers and a few bytes, locked every other client out (503) for that long. A budget
//! of bytes is held in proportion to what was really received: such a client holds a few
//! bytes, and thousands of them hold less than one photo. The guarantees stay: memory of bodies
//! being received never exceeds `--max-upload-memory-bytes`, and a request that does not fit
//! is refused at once (503 `overloaded`), when it arrives if its declared length does not fit,
//! or as soon as its bytes would overflow the budget.
//!
//! The deadline is what nginx's `client_body_timeout` and Apache's `RequestReadTimeout
//! body=...,MinRate=...` do: a body must arrive within `--upload-timeout-secs` of its headers
//! (and within the request's own time budget), and keep up a minimum rate: at any moment it
//! may be at most `--upload-rate-grace-secs` behind `--upload-min-rate-bytes` per second. An
//! upload that stalls is thus answered after the grace plus what its bytes have earned, not
//! after the whole request timeout, with 408 `request_timeout`, and its connection is closed.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::header;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use prometheus::IntGauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

use crate::error::ApiError;
use crate::telemetry::Metrics;

/// How fast a body must arrive.
#[derive(Debug, Clone, Copy)]
pub struct UploadLimits {
    /// The longest a body may take, from the start of its reception.
    pub timeout: Duration,
    /// Bytes per second a body must keep up on average (0: no minimum).
    pub min_rate: u64,
    /// How far behind that rate a body may fall.
    pub grace: Duration,
}

/// The memory that request bodies being received may take, shared by every front door.
pub struct UploadBudget {
    bytes: Arc<Semaphore>,
    capacity: usize,
    limits: UploadLimits,
    in_progress: IntGauge,
    buffered: IntGauge,
}

/// Why an upload was cut short, when it was.
#[derive(Debug, Clone)]
enum Cut {
    TooSlow(String),
    OverBudget,
}

/// One body being received. After a failed read, [`Receiving::explain`] turns the body's error
/// into the reason it was cut short (408 or 503), if that is why.
#[derive(Debug)]
pub struct Receiving {
    cut: Arc<Mutex<Option<Cut>>>,
    capacity: usize,
}

impl UploadBudget {
    pub fn new(capacity: usize, limits: UploadLimits, metrics: &Metrics) -> Self {
        metrics.upload_budget_bytes.set(capacity as i64);
        Self {
            bytes: Arc::new(Semaphore::new(capacity)),
            capacity,
            limits,
            in_progress: metrics.uploads_in_progress.clone(),
            buffered: metrics.upload_buffered_bytes.clone(),
        }
    }

    /// Bytes of the budget free now.
    pub fn available(&self) -> usize {
        self.bytes.available_permits()
    }

    /// Starts receiving `request`'s body: refused at once (503) when the budget is full or
    /// cannot hold the declared length; otherwise the request with its body metered (bytes
    /// taken from the budget as they arrive and held until the body is dropped; the deadline
    /// enforced, `deadline` being the request's own, if it has one).
    pub fn receive(
        &self,
        request: Request,
        deadline: Option<Instant>,
    ) -> Result<(Request, Receiving), ApiError> {
        let available = self.available();
        let declared = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if available == 0 || declared.is_some_and(|n| n > available as u64) {
            linger_unless_expected(request);
            return Err(overloaded(self.capacity));
        }
        let start = Instant::now();
        let mut cap = start + self.limits.timeout;
        if let Some(d) = deadline {
            // Just before the request's deadline, so that the upload's own answer (408) wins
            // over the request timeout's while the body is still arriving.
            cap = cap.min(d.checked_sub(Duration::from_millis(1)).unwrap_or(d));
        }
        let cut = Arc::new(Mutex::new(None));
        let (parts, body) = request.into_parts();
        self.in_progress.inc();
        let mut metered = MeteredBody {
            inner: body,
            budget: self.bytes.clone(),
            held: None,
            buffered: self.buffered.clone(),
            in_progress: self.in_progress.clone(),
            start,
            received: 0,
            limits: self.limits,
            cap,
            timer: Box::pin(tokio::time::sleep_until(cap)),
            cut: cut.clone(),
            ended: false,
        };
        let first = metered.deadline();
        metered.timer.as_mut().reset(first);
        Ok((
            Request::from_parts(parts, Body::new(metered)),
            Receiving {
                cut,
                capacity: self.capacity,
            },
        ))
    }

    /// The whole body of `request`, up to `limit` bytes (413 beyond), received under the
    /// budget and the deadline: for front doors that take the body in one piece.
    pub async fn read_all(
        &self,
        request: Request,
        limit: usize,
        deadline: Option<Instant>,
    ) -> Result<Bytes, ApiError> {
        let (request, receiving) = self.receive(request, deadline)?;
        axum::body::to_bytes(request.into_body(), limit)
            .await
            .map_err(|e| receiving.explain(body_error(e, limit)))
    }
}

fn overloaded(capacity: usize) -> ApiError {
    ApiError::Overloaded(format!(
        "the server is receiving {:.1} MiB of request bodies already (--max-upload-memory-bytes); retry shortly",
        capacity as f64 / (1 << 20) as f64
    ))
}

impl Receiving {
    /// The reason the body was cut short (408 too slow, 503 over the budget), if it was;
    /// otherwise `error` itself.
    pub fn explain(&self, error: ApiError) -> ApiError {
        match self.cut.lock().unwrap().take() {
            Some(Cut::TooSlow(why)) => ApiError::RequestTimeout(why),
            Some(Cut::OverBudget) => overloaded(self.capacity),
            None => error,
        }
    }
}

/// A request body that takes its bytes from the budget as they arrive, and fails when it falls
/// behind its deadline.
struct MeteredBody {
    inner: Body,
    budget: Arc<Semaphore>,
    held: Option<OwnedSemaphorePermit>,
    buffered: IntGauge,
    in_progress: IntGauge,
    start: Instant,
    received: u64,
    limits: UploadLimits,
    /// The total deadline: the upload timeout, or the request's, whichever comes first.
    cap: Instant,
    timer: Pin<Box<Sleep>>,
    cut: Arc<Mutex<Option<Cut>>>,
    ended: bool,
}

/// The error a metered body ends with; [`Receiving::explain`] says what it means.
#[derive(Debug)]
struct UploadCut;

impl std::fmt::Display for UploadCut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the upload was cut short")
    }
}

impl std::error::Error for UploadCut {}

impl MeteredBody {
    /// When the body must have arrived (or have received more): the total deadline, or the
    /// moment it falls more than the grace behind the minimum rate.
    fn deadline(&self) -> Instant {
        if self.limits.min_rate == 0 {
            return self.cap;
        }
        let earned = Duration::from_secs_f64(self.received as f64 / self.limits.min_rate as f64);
        self.cap.min(self.start + self.limits.grace + earned)
    }

    fn fail(&mut self, cut: Cut) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        self.ended = true;
        self.release();
        *self.cut.lock().unwrap() = Some(cut);
        Poll::Ready(Some(Err(Box::new(UploadCut))))
    }

    fn too_slow(&self) -> Cut {
        let elapsed = self.start.elapsed().as_secs_f64();
        if Instant::now() >= self.cap {
            Cut::TooSlow(format!(
                "the request body did not arrive in time: {} bytes in {elapsed:.1} s",
                self.received
            ))
        } else {
            Cut::TooSlow(format!(
                "the request body arrives too slowly: {} bytes in {elapsed:.1} s, under the minimum of {} bytes/s",
                self.received, self.limits.min_rate
            ))
        }
    }

    fn release(&mut self) {
        if let Some(p) = self.held.take() {
            self.buffered.sub(p.num_permits() as i64);
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.release();
        self.in_progress.dec();
    }
}

impl HttpBody for MeteredBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let n = frame.data_ref().map_or(0, Bytes::len);
                if n > 0 {
                    let Ok(taken) = u32::try_from(n)
                        .map_err(drop)
                        .and_then(|n| this.budget.clone().try_acquire_many_owned(n).map_err(drop))
                    else {
                        return this.fail(Cut::OverBudget);
                    };
                    match &mut this.held {
                        Some(held) => held.merge(taken),
                        None => this.held = Some(taken),
                    }
                    this.buffered.add(n as i64);
                    this.received += n as u64;
                    let deadline = this.deadline();
                    if Instant::now() >= deadline {
                        let cut = this.too_slow();
                        return this.fail(cut);
                    }
                    this.timer.as_mut().reset(deadline);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into_inner()))),
            Poll::Pending => {
                if this.timer.as_mut().poll(cx).is_ready() {
                    let cut = this.too_slow();
                    return this.fail(cut);
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Most bytes of a refused body read and dropped after the answer, and for how long.
const LINGER_BYTES: usize = 64 << 20;
const LINGER_TIME: Duration = Duration::from_secs(10);

/// Reads and drops what the client still sends of a request refused before its body was read,
/// as [`linger`] does, unless the client waits for `100 Continue` before sending it (then it
/// sends nothing, and reading would ask it to).
pub fn linger_unless_expected(request: Request) {
    let expects = request
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let body = request.into_body();
    if !expects && !HttpBody::is_end_stream(&body) {
        linger(body);
    }
}

/// Reads and drops what the client still sends of a refused body, up to [`LINGER_BYTES`] and
/// [`LINGER_TIME`] (as nginx's lingering close does); then the connection is closed.
fn linger(body: axum::body::Body) {
    use http_body_util::BodyExt;
    tokio::spawn(async move {
        let mut body = body;
        let mut read = 0usize;
        let drain = async {
            while let Some(Ok(frame)) = body.frame().await {
                read += frame.data_ref().map_or(0, |d| d.len());
                if read > LINGER_BYTES {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(LINGER_TIME, drain).await;
    });
}

/// A body that could not be read: 413 when it passed the limit, else 400 saying why.
pub fn body_error(e: axum::Error, limit: usize) -> ApiError {
    let inner = e.into_inner();
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(inner.as_ref());
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return ApiError::PayloadTooLarge { limit };
        }
        source = err.source();
    }
    ApiError::BadRequest(format!("could not read the request body: {inner}"))
}

impl crate::config::ServeConfig {
    /// The upload deadlines of both front doors.
    pub fn upload_limits(&self) -> UploadLimits {
        UploadLimits {
            timeout: Duration::from_secs(self.upload_timeout_secs),
            min_rate: self.upload_min_rate_bytes,
            grace: Duration::from_secs(self.upload_rate_grace_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(capacity: usize, limits: UploadLimits) -> (UploadBudget, Metrics) {
        let m = Metrics::new();
        (UploadBudget::new(capacity, limits, &m), m)
    }

    const SLOW: UploadLimits = UploadLimits {
        timeout: Duration::from_secs(3600),
        min_rate: 0,
        grace: Duration::from_secs(3600),
    };

    fn streaming() -> (
        tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
        Request,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let body = Body::from_stream(futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx)));
        (tx, Request::post("/").body(body).unwrap())
    }

    #[tokio::test]
    async fn bytes_are_held_as_they_arrive_and_released_with_the_body() {
        let (b, m) = budget(1000, SLOW);
        let (tx, req) = streaming();
        let (req, _receiving) = b.receive(req, None).unwrap();
        let mut body = req.into_body();
        tx.send(Ok(Bytes::from(vec![0u8; 300]))).await.unwrap();
        use http_body_util::BodyExt;
        let frame = body.frame().await.unwrap().unwrap();
        assert_eq!(frame.data_ref().unwrap().len(), 300);
        assert_eq!(b.available(), 700);
        assert_eq!(m.upload_buffered_bytes.get(), 300);
        assert_eq!(m.uploads_in_progress.get(), 1);
        drop(body);
        assert_eq!(b.available(), 1000);
        assert_eq!(m.upload_buffered_bytes.get(), 0);
        assert_eq!(m.uploads_in_progress.get(), 0);
    }

    #[tokio::test]
    async fn over_the_budget_is_overloaded() {
        let (b, _m) = budget(1000, SLOW);
        // A declared length that does not fit: refused at once.
        let req = Request::post("/")
            .header("content-length", "1001")
            .body(Body::empty())
            .unwrap();
        assert_eq!(b.receive(req, None).unwrap_err().code(), "overloaded");
        // Bytes that do not fit, mid-way.
        let (tx, req) = streaming();
        let (req, receiving) = b.receive(req, None).unwrap();
        tx.send(Ok(Bytes::from(vec![0u8; 600]))).await.unwrap();
        tx.send(Ok(Bytes::from(vec![0u8; 600]))).await.unwrap();
        let err = axum::body::to_bytes(req.into_body(), 10_000)
            .await
            .unwrap_err();
        let err = receiving.explain(ApiError::BadRequest(err.to_string()));
        assert_eq!(err.code(), "overloaded");
        assert_eq!(b.available(), 1000, "what it held is given back");
    }

    #[tokio::test]
    async fn a_stalled_body_is_cut_after_the_grace_and_what_it_earned() {
        let limits = UploadLimits {
            timeout: Duration::from_secs(60),
            min_rate: 1000,
            grace: Duration::from_millis(200),
        };
        let (b, _m) = budget(10_000, limits);
        let (tx, req) = streaming();
        let (req, receiving) = b.receive(req, None).unwrap();
        let t0 = Instant::now();
        tx.send(Ok(Bytes::from(vec![0u8; 300]))).await.unwrap();
        let err = axum::body::to_bytes(req.into_body(), 10_000)
            .await
            .unwrap_err();
        // Not before 200 ms of grace + 300 bytes at 1000 bytes/s.
        assert!(
            t0.elapsed() >= Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
        let err = receiving.explain(ApiError::BadRequest(err.to_string()));
        assert_eq!(err.code(), "request_timeout");
        assert!(err.to_string().contains("too slowly"), "{err}");
        drop(tx);
    }

    #[tokio::test]
    async fn the_total_deadline_is_the_upload_timeout_or_the_requests() {
        let limits = UploadLimits {
            timeout: Duration::from_millis(1000),
            min_rate: 0,
            grace: Duration::from_millis(100),
        };
        let (b, _m) = budget(10_000, limits);
        // The upload timeout; then a request deadline before it, which wins.
        for (request_deadline, at_least, below) in [
            (None, 1000, u64::MAX),
            (Some(Duration::from_millis(150)), 140, 1000),
        ] {
            let (tx, req) = streaming();
            let t0 = Instant::now();
            let (req, receiving) = b.receive(req, request_deadline.map(|d| t0 + d)).unwrap();
            let err = axum::body::to_bytes(req.into_body(), 10_000)
                .await
                .unwrap_err();
            let took = t0.elapsed().as_millis() as u64;
            assert!((at_least..below).contains(&took), "{took} ms");
            let err = receiving.explain(ApiError::BadRequest(err.to_string()));
            assert_eq!(err.code(), "request_timeout");
            assert!(err.to_string().contains("in time"), "{err}");
            drop(tx);
        }
    }
}
