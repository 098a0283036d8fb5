//! Hostile and unusual clients over real sockets, on the fake model: uploads that stall,
//! thousands of half-sent requests (slowloris), half-sent headers and idle keep-alive
//! connections. The property each time: a client that is slow, or many of them, never denies
//! service to a normal client, and what they held (connections, upload memory, file
//! descriptors) comes back. Tests wait on events (a metric reaching a value, a socket closed by
//! the server), never on a sleep.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

/// File descriptors this process holds (server and clients alike: they share it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// Waits until the process holds no more than two file descriptors beyond `before` (all the
/// clients' sockets closed on both sides), and prints how many it holds then.
async fn fds_come_back(label: &str, before: usize) {
    assert!(
        eventually(Duration::from_secs(20), || open_fds() <= before + 2).await,
        "{label}: fds {before} before, {} after",
        open_fds()
    );
    println!("{label}: fds {} after the clients left", open_fds());
}

fn value(metrics: &tch_serve::telemetry::Metrics, series: &str) -> Option<f64> {
    metric(&metrics.render(), series)
}

/// One HTTP/1.1 response read from `s`: status, head, body (by Content-Length). None when the
/// server closed the connection without an answer (or nothing came within the read timeout).
fn read_response(s: &mut TcpStream) -> Option<(u16, String, String)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let status = head.split(' ').nth(1)?.parse().ok()?;
    let length = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .unwrap_or(0);
    while buf.len() < head_end + length {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
    Some((status, head, body))
}

/// Whether the server has closed `s` (EOF or reset), waiting up to `limit` for it.
fn closed_by_server(s: &mut TcpStream, limit: Duration) -> bool {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 1024];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return false;
            }
            Err(_) => return true,
        }
    }
}

/// Whether `s` is still open with nothing to read (the server neither answered nor closed).
fn still_held(mut s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let mut b = [0u8; 1];
    let held = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
    s.set_nonblocking(false).unwrap();
    held
}

async fn normal_predict(addr: SocketAddr) -> (u16, serde_json::Value, Duration) {
    let t0 = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/predict"))
        .header("content-type", "image/png")
        .body(png(7))
        .send()
        .await
        .expect("the normal client's request was not answered");
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body, t0.elapsed())
}

/// Settings that keep the slow uploads' own deadlines out of the way of this test.
const HOLD_UPLOADS: &[&str] = &[
    "--upload-rate-grace-secs",
    "25",
    "--upload-timeout-secs",
    "28",
];

/// 200 connections send the headers of a 1 MB upload and 10 bytes of it, then nothing. While
/// they are held, a normal client is served at once: a slow upload holds the bytes it sent,
/// not a place that others need.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_uploads_do_not_lock_out_other_clients() {
    const SLOW: usize = 200;
    let server = fake_server(HOLD_UPLOADS, Duration::ZERO).await;
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let fds_before = open_fds();
    let slow = tokio::task::spawn_blocking(move || {
        (0..SLOW)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                s.write_all(
                    b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
                      Content-Length: 1000000\r\n\r\n\x89PNG\r\n\x1a\n\0\0",
                )
                .unwrap();
                s
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(20), || value(
            &metrics,
            "tch_serve_connections_total{door=\"http\"}"
        ) == Some(SLOW as f64))
        .await
    );
    // Every slow upload is being received (its handler has started) before the normal client
    // comes. (Where the server has no such gauge, this gives them a moment instead.)
    let receiving = eventually(Duration::from_secs(5), || {
        value(&metrics, "tch_serve_uploads_in_progress") == Some(SLOW as f64)
    })
    .await;
    let fds_during = open_fds();

    let (status, body, took) = normal_predict(addr).await;
    assert_eq!(
        status, 200,
        "a normal client was refused while {SLOW} slow uploads were held: {body}"
    );
    assert!(receiving, "the slow uploads were not all being received");
    // They are all still held: the normal client was served beside them, not after them.
    let held = slow.iter().filter(|s| still_held(s)).count();
    assert_eq!(held, SLOW, "slow uploads still held");
    // They hold the bytes they sent, 10 each, not a megabyte each.
    assert_eq!(
        value(&metrics, "tch_serve_upload_buffered_bytes"),
        Some((SLOW * 10) as f64)
    );
    println!(
        "SLOW UPLOADS: {SLOW} held, normal client 200 in {:.1} ms; upload memory held {} bytes; fds {fds_before} before, {fds_during} during",
        took.as_secs_f64() * 1000.0,
        SLOW * 10
    );
    drop(slow);
    assert!(
        eventually(Duration::from_secs(20), || value(
            &metrics,
            "tch_serve_upload_buffered_bytes"
        ) == Some(0.0))
        .await
    );
    fds_come_back("SLOW UPLOADS", fds_before).await;
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// An upload that stalls is answered 408 `request_timeout` once it falls behind the minimum
/// rate (after its grace), and the connection is closed; one that keeps up with the rate but
/// takes longer than the upload timeout is answered 408 too. Over a real socket, as a client
/// sees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_endless_uploads_are_answered_408() {
    let server = fake_server(
        &[
            "--upload-timeout-secs",
            "3",
            "--upload-rate-grace-secs",
            "1",
            "--upload-min-rate-bytes",
            "1000",
        ],
        Duration::ZERO,
    )
    .await;
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let outcomes = tokio::task::spawn_blocking(move || {
        let headers = b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n\
                        Content-Length: 1000000\r\n\r\n";
        // 1. 100 bytes, then nothing: cut at about grace + 100 / rate = 1.1 s.
        let mut stalled = TcpStream::connect(addr).unwrap();
        stalled
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        stalled.write_all(headers).unwrap();
        stalled.write_all(&[0u8; 100]).unwrap();
        let t0 = Instant::now();
        let first = read_response(&mut stalled);
        let first_took = t0.elapsed();
        let first_closed = closed_by_server(&mut stalled, Duration::from_secs(10));
        // 2. 4 KB/s, four times the minimum rate, for longer than the upload timeout.
        let mut endless = TcpStream::connect(addr).unwrap();
        endless.write_all(headers).unwrap();
        endless.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut got = Vec::new();
        while t0.elapsed() < Duration::from_secs(20) {
            let _ = endless.write(&[0u8; 400]);
            let mut b = [0u8; 4096];
            match endless.read(&mut b) {
                Ok(0) => break,
                Ok(n) => {
                    got.extend_from_slice(&b[..n]);
                    if got.ends_with(b"}") {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => break,
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let second_took = t0.elapsed();
        (
            first,
            first_took,
            first_closed,
            String::from_utf8_lossy(&got).into_owned(),
            second_took,
        )
    })
    .await
    .unwrap();
    let (first, first_took, first_closed, second, second_took) = outcomes;
    let (status, head, body) = first.expect("the stalled upload got no answer");
    assert_eq!(status, 408, "{head}{body}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["code"], "request_timeout", "{body}");
    assert!(
        head.to_ascii_lowercase().contains("connection: close"),
        "{head}"
    );
    assert!(
        first_closed,
        "the connection of a timed-out upload stays open"
    );
    assert!(second.starts_with("HTTP/1.1 408"), "{second}");
    assert!(second.contains("\"code\":\"request_timeout\""), "{second}");
    println!(
        "UPLOAD DEADLINES: stalled after 100 bytes -> 408 in {:.2} s; 4 KB/s for ever -> 408 in {:.2} s",
        first_took.as_secs_f64(),
        second_took.as_secs_f64()
    );
    assert_eq!(
        value(
            &metrics,
            "tch_serve_rejections_total{model=\"fake\",reason=\"request_timeout\"}"
        ),
        Some(2.0)
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// Thousands of connections send half a request line and stay. The connection cap is reached,
/// and each newcomer takes the place of the connection that has been stuck in its headers the
/// longest: a normal client is served at once, the server's connections stay at the cap, and
/// every file descriptor comes back when the clients go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_half_open_connections_do_not_lock_out_a_normal_client() {
    const CAP: usize = 256;
    // The server's own start-up step: the soft limit raised to the hard one.
    let limit = tch_serve::listener::raise_open_file_limit(CAP) as usize;
    // Each half-open connection costs this process two descriptors while the server holds it
    // (its client end and the server's end), one once the server has closed its end.
    let n = 3000.min(limit.saturating_sub(CAP + 200));
    assert!(n > 2 * CAP, "open-file limit {limit} too low for this test");
    let server = fake_server(&["--max-connections", &CAP.to_string()], Duration::ZERO).await;
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let fds_before = open_fds();
    let t0 = Instant::now();
    let clients = tokio::task::spawn_blocking(move || {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(addr).unwrap();
                let _ = s.write_all(b"GET /predict HT");
                s
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    assert!(
        eventually(Duration::from_secs(30), || value(
            &metrics,
            "tch_serve_connections_total{door=\"http\"}"
        ) == Some(n as f64))
        .await,
        "accepted {:?} of {n}",
        value(&metrics, "tch_serve_connections_total{door=\"http\"}")
    );
    let opened_in = t0.elapsed();
    let fds_during = open_fds();
    // The server's sockets: at most the cap, plus the few it has displaced and not yet closed
    // (the accept loop waits for them beyond 16).
    assert!(
        fds_during <= fds_before + n + CAP + 16 + 8,
        "fds {fds_before} before, {fds_during} with {n} clients over a cap of {CAP}"
    );
    assert!(
        eventually(Duration::from_secs(10), || value(
            &metrics,
            "tch_serve_connections_open{door=\"http\"}"
        ) == Some(CAP as f64))
        .await
    );
    let open = value(&metrics, "tch_serve_connections_open{door=\"http\"}").unwrap();
    let (status, body, took) = normal_predict(addr).await;
    assert_eq!(
        status, 200,
        "the normal client was not served among {n} half-open connections: {body}"
    );
    let health = reqwest::get(format!("http://{addr}/health")).await.unwrap();
    assert_eq!(health.status(), 200);
    let evicted = value(
        &metrics,
        "tch_serve_connections_closed_total{door=\"http\",reason=\"evicted\"}",
    )
    .unwrap_or(0.0);
    assert!(
        evicted >= (n - CAP) as f64,
        "{evicted} evicted of {n} over a cap of {CAP}"
    );
    assert_eq!(
        value(
            &metrics,
            "tch_serve_connections_refused_total{door=\"http\",reason=\"max_connections\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "no newcomer is refused while stuck connections can make room"
    );
    println!(
        "SLOWLORIS: {n} half-open connections in {:.1} s over a cap of {CAP}: {open} open, {evicted} evicted; \
         normal client 200 in {:.1} ms; fds {fds_before} before, {fds_during} during",
        opened_in.as_secs_f64(),
        took.as_secs_f64() * 1000.0
    );
    drop(clients);
    assert!(
        eventually(Duration::from_secs(20), || value(
            &metrics,
            "tch_serve_connections_open{door=\"http\"}"
        ) == Some(0.0))
        .await,
        "{:?} still open",
        value(&metrics, "tch_serve_connections_open{door=\"http\"}")
    );
    fds_come_back("SLOWLORIS", fds_before).await;
    stop.cancel();
    serving.await.unwrap().unwrap();
}

/// A half-sent request is closed after the header timeout, even one that trickles a byte at a
/// time; a keep-alive connection idle between requests for longer than that stays open, and is
/// closed after the keep-alive timeout. Each closing is counted by its reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_timeout_and_keep_alive_timeout_are_separate() {
    let server = fake_server(
        &[
            "--header-read-timeout-secs",
            "1",
            "--keep-alive-timeout-secs",
            "4",
        ],
        Duration::ZERO,
    )
    .await;
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = serve_on_socket(server.server).await;
    let report = tokio::task::spawn_blocking(move || {
        let get = b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n";
        // A keep-alive connection: one request, then idle.
        let mut idle = TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        idle.write_all(get).unwrap();
        let first = read_response(&mut idle).map(|r| r.0);
        let idle_since = Instant::now();
        // A request whose headers never end.
        let mut half = TcpStream::connect(addr).unwrap();
        half.write_all(b"GET /live HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        let half_closed = closed_by_server(&mut half, Duration::from_secs(10));
        // One that sends a header byte every 100 ms: busy, and never done.
        let mut trickle = TcpStream::connect(addr).unwrap();
        trickle.set_nonblocking(true).unwrap();
        let t0 = Instant::now();
        let mut trickle_closed = false;
        for b in b"GET /live HTTP/1.1\r\nX-Slow: "
            .iter()
            .chain([b'a'; 200].iter())
        {
            if trickle.write_all(&[*b]).is_err() {
                trickle_closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            if matches!(trickle.read(&mut buf), Ok(0)) {
                trickle_closed = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let trickle_took = t0.elapsed();
        // The idle connection has outlived the header timeout; it still serves.
        let idle_for = idle_since.elapsed();
        idle.write_all(get).unwrap();
        let second = read_response(&mut idle).map(|r| r.0);
        let t1 = Instant::now();
        let idle_closed = closed_by_server(&mut idle, Duration::from_secs(15));
        (
            first,
            half_closed,
            trickle_closed,
            trickle_took,
            idle_for,
            second,
            idle_closed,
            t1.elapsed(),
        )
    })
    .await
    .unwrap();
    let (
        first,
        half_closed,
        trickle_closed,
        trickle_took,
        idle_for,
        second,
        idle_closed,
        idle_took,
    ) = report;
    assert_eq!(first, Some(200));
    assert!(half_closed, "a half-sent request was never closed");
    assert!(
        trickle_closed,
        "headers trickled for {trickle_took:?} without being closed"
    );
    assert!(idle_for > Duration::from_secs(1));
    assert_eq!(
        second,
        Some(200),
        "a keep-alive connection idle for {idle_for:?} (over the header timeout) was closed"
    );
    assert!(idle_closed, "the idle connection was never closed");
    println!(
        "TIMEOUTS: half-sent headers closed; trickled headers closed after {:.1} s; idle keep-alive \
         connection served after {:.1} s idle, closed {:.1} s after its last response",
        trickle_took.as_secs_f64(),
        idle_for.as_secs_f64(),
        idle_took.as_secs_f64()
    );
    assert_eq!(
        value(
            &metrics,
            "tch_serve_connections_closed_total{door=\"http\",reason=\"header_timeout\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        value(
            &metrics,
            "tch_serve_connections_closed_total{door=\"http\",reason=\"idle\"}"
        ),
        Some(1.0)
    );
    stop.cancel();
    serving.await.unwrap().unwrap();
}
