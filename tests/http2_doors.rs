//! Both front doors under the attacks of HTTP/2 and of plain TCP, over real sockets, on the
//! fake model: connections that never send a request, stalled prefaces, rapid reset
//! (CVE-2023-44487), CONTINUATION floods, too many concurrent streams, huge header lists, and a
//! flow-control window kept shut. Each test runs against the HTTP port and the gRPC port; the
//! property each time: the attacker's connection is refused or closed, a normal client keeps
//! being served beside it, and the file descriptors come back. The attacks speak raw HTTP/2
//! frames (what an attacker sends need not be what a polite client library would); the normal
//! clients are reqwest, tonic and the `h2` crate.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tch_serve::telemetry::Metrics;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const DOORS: [&str; 2] = ["http", "grpc"];

struct Doors {
    http: SocketAddr,
    grpc: SocketAddr,
    metrics: Arc<Metrics>,
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    _root: tempfile::TempDir,
}

impl Doors {
    async fn start(args: &[&str]) -> Self {
        let FakeServer { server, _root, .. } = fake_server(args, Duration::ZERO).await;
        let metrics = server.state.metrics.clone();
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (h, g) = (http.local_addr().unwrap(), grpc.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn(server.serve_with_grpc(http, Some(grpc), stop.clone()));
        Self {
            http: h,
            grpc: g,
            metrics,
            stop,
            task,
            _root,
        }
    }

    fn addr(&self, door: &str) -> SocketAddr {
        if door == "grpc" { self.grpc } else { self.http }
    }

    fn value(&self, series: &str) -> f64 {
        metric(&self.metrics.render(), series).unwrap_or(f64::NAN)
    }

    fn closed(&self, door: &str, reason: &str) -> f64 {
        self.value(&format!(
            "tch_serve_connections_closed_total{{door=\"{door}\",reason=\"{reason}\"}}"
        ))
    }

    /// A normal client's request on a new connection: `GET /health` (reqwest) on the HTTP
    /// door, `grpc.health.v1.Health/Check` (tonic) on the gRPC door.
    async fn served(&self, door: &str) -> bool {
        let addr = self.addr(door);
        let attempt = async {
            if door == "grpc" {
                let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                    .ok()?
                    .connect()
                    .await
                    .ok()?;
                let mut c = HealthClient::new(channel);
                let r = c.check(HealthCheckRequest::default()).await.ok()?;
                Some(r.into_inner().status == ServingStatus::Serving as i32)
            } else {
                let r = reqwest::get(format!("http://{addr}/health")).await.ok()?;
                Some(r.status() == 200)
            }
        };
        tokio::time::timeout(Duration::from_secs(10), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false)
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

// --- Raw HTTP/2 frames (RFC 9113) -------------------------------------------------------------

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const ACK: u8 = 0x1;
const CANCEL: u32 = 0x8;
const REFUSED_STREAM: u32 = 0x7;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn settings(pairs: &[(u16, u32)]) -> Vec<u8> {
    let mut p = Vec::new();
    for (id, v) in pairs {
        p.extend_from_slice(&id.to_be_bytes());
        p.extend_from_slice(&v.to_be_bytes());
    }
    frame(SETTINGS, 0, 0, &p)
}

/// An HPACK string literal, not Huffman-coded (lengths under 127 here).
fn hpack_str(out: &mut Vec<u8>, s: &[u8]) {
    assert!(s.len() < 127);
    out.push(s.len() as u8);
    out.extend_from_slice(s);
}

/// A header field "literal without indexing" with a new name.
fn hpack_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.push(0x00);
    hpack_str(out, name);
    hpack_str(out, value);
}

/// The header block of a request the door serves: `POST /predict` (an image upload) on the
/// HTTP door, a `ModelInfer` call on the gRPC door; `get` asks for `GET /health` and the
/// health service's Check instead.
fn request_block(door: &str, get: bool) -> Vec<u8> {
    let mut b = Vec::new();
    let path: &[u8] = match (door, get) {
        ("grpc", false) => b"/inference.GRPCInferenceService/ModelInfer",
        ("grpc", true) => b"/grpc.health.v1.Health/Check",
        (_, false) => b"/predict",
        (_, true) => b"/health",
    };
    // :method GET (2) or POST (3), :scheme http (6): indexed.
    b.push(if get && door != "grpc" { 0x82 } else { 0x83 });
    b.push(0x86);
    // :path (4) and :authority (1): literal without indexing, indexed name.
    b.push(0x04);
    hpack_str(&mut b, path);
    b.push(0x01);
    hpack_str(&mut b, b"localhost");
    if door == "grpc" {
        hpack_field(&mut b, b"content-type", b"application/grpc");
        hpack_field(&mut b, b"te", b"trailers");
    } else if !get {
        hpack_field(&mut b, b"content-type", b"image/png");
        hpack_field(&mut b, b"content-length", b"1000000");
    }
    b
}

/// A raw HTTP/2 connection: the preface and our SETTINGS sent.
fn raw_connection(addr: SocketAddr, our_settings: &[(u16, u32)]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(settings(our_settings));
    s.write_all(&hello).unwrap();
    s
}

struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

/// The next frame from the server; None at EOF, a reset, or when nothing came in the read
/// timeout.
fn read_frame(s: &mut TcpStream) -> Option<Frame> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).ok()?;
    let len = (head[0] as usize) << 16 | (head[1] as usize) << 8 | head[2] as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff,
        payload,
    })
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// What the server did with the connection, read until it closed it (or `limit` passed).
#[derive(Debug, Default)]
struct Outcome {
    goaway: Option<u32>,
    resets: Vec<(u32, u32)>,
    closed: bool,
}

fn read_until_closed(s: &mut TcpStream, limit: Duration) -> Outcome {
    s.set_read_timeout(Some(limit)).unwrap();
    let mut o = Outcome::default();
    loop {
        match read_frame(s) {
            Some(f) if f.kind == GOAWAY => o.goaway = Some(u32_at(&f.payload, 4)),
            Some(f) if f.kind == RST_STREAM => o.resets.push((f.stream, u32_at(&f.payload, 0))),
            Some(_) => {}
            None => {
                let mut b = [0u8; 1];
                o.closed = match s.read(&mut b) {
                    Ok(0) => true,
                    Ok(_) => false,
                    Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
                };
                return o;
            }
        }
    }
}

/// A raw connection that asks for `GET /health` (the health service's Check on the gRPC door)
/// with its flow-control window shut (SETTINGS INITIAL_WINDOW_SIZE 0): the response's body
/// cannot come until the client sends a WINDOW_UPDATE.
async fn shut_window_request(addr: SocketAddr, door: &'static str) -> TcpStream {
    let block = request_block(door, true);
    tokio::task::spawn_blocking(move || {
        let mut s = raw_connection(addr, &[(0x4, 0)]);
        if door == "grpc" {
            s.write_all(&frame(HEADERS, END_HEADERS, 1, &block))
                .unwrap();
            s.write_all(&frame(DATA, END_STREAM, 1, &[0, 0, 0, 0, 0]))
                .unwrap();
        } else {
            s.write_all(&frame(HEADERS, END_HEADERS | END_STREAM, 1, &block))
                .unwrap();
        }
        s
    })
    .await
    .unwrap()
}

/// Whether the connection still answers a PING.
fn answers_ping(s: &mut TcpStream) -> bool {
    if s.write_all(&frame(PING, 0, 0, b"tchserve")).is_err() {
        return false;
    }
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while let Some(f) = read_frame(s) {
        if f.kind == PING && f.flags & ACK != 0 && f.payload == b"tchserve" {
            return true;
        }
    }
    false
}

// --- The tests --------------------------------------------------------------------------------

/// Plain TCP connections that send nothing, and HTTP/2 connections that send the preface and
/// stall, far over the cap: the door keeps to its cap by evicting the stuck ones, closes the
/// rest at the header timeout, serves a normal client throughout, and gives every descriptor
/// back. (The gRPC door once accepted and held them all, with no timeout.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_capped_evicted_and_closed_on_both_doors() {
    const CAP: usize = 32;
    const EACH: usize = 150;
    let doors = Doors::start(&["--max-connections", "32", "--header-read-timeout-secs", "2"]).await;
    for door in DOORS {
        let addr = doors.addr(door);
        let fds_before = open_fds();
        let socks = tokio::task::spawn_blocking(move || {
            let mut socks = Vec::new();
            for i in 0..2 * EACH {
                let mut s = TcpStream::connect(addr).unwrap();
                if i % 2 == 1 {
                    let mut hello = PREFACE.to_vec();
                    hello.extend(settings(&[]));
                    let _ = s.write_all(&hello);
                }
                socks.push(s);
            }
            socks
        })
        .await
        .unwrap();
        let open = format!("tch_serve_connections_open{{door=\"{door}\"}}");
        assert!(
            eventually(Duration::from_secs(10), || doors.value(&open)
                <= (CAP + 16) as f64)
            .await,
            "{door}: {} open over a cap of {CAP}",
            doors.value(&open)
        );
        for _ in 0..5 {
            assert!(
                doors.served(door).await,
                "{door}: the normal client was not served"
            );
        }
        let evicted = doors.closed(door, "evicted");
        assert!(
            evicted >= (2 * EACH - CAP - 16) as f64,
            "{door}: {evicted} evicted"
        );
        // Every stalled socket is closed by the server: evicted, or at the header timeout.
        let all_closed = tokio::task::spawn_blocking(move || {
            socks.into_iter().all(|mut s| {
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                let mut b = [0u8; 256];
                loop {
                    match s.read(&mut b) {
                        Ok(0) => return true,
                        Ok(_) => continue,
                        Err(e) => {
                            return !matches!(
                                e.kind(),
                                ErrorKind::WouldBlock | ErrorKind::TimedOut
                            );
                        }
                    }
                }
            })
        })
        .await
        .unwrap();
        assert!(all_closed, "{door}: a stalled connection was held open");
        assert!(doors.closed(door, "header_timeout") >= 1.0);
        assert!(
            eventually(Duration::from_secs(10), || open_fds() <= fds_before + 2).await,
            "{door}: fds {fds_before} before, {} after",
            open_fds()
        );
        println!(
            "{door}: {} connections, cap {CAP}: {evicted} evicted, {} closed at the header timeout; fds {fds_before} -> {}",
            2 * EACH,
            doors.closed(door, "header_timeout"),
            open_fds()
        );
    }
    doors.stop().await;
}

/// Rapid reset: streams opened and cancelled at once, over and over. A connection that cancels
/// more than `--http2-max-resets` streams within 10 s is closed, whether the streams were
/// cancelled before the server took them up (h2's own count, GOAWAY) or after their handlers
/// started (the listener's count, `reset_flood`); a client that cancels a few keeps its
/// connection; a normal client is served throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rapid_reset_closes_the_connection_on_both_doors() {
    let doors = Doors::start(&["--http2-max-resets", "20"]).await;
    for door in DOORS {
        let addr = doors.addr(door);
        let block = request_block(door, false);
        // A few cancelled streams: the connection stays.
        let b = block.clone();
        let kept = tokio::task::spawn_blocking(move || {
            let mut s = raw_connection(addr, &[]);
            for i in 0..10u32 {
                let id = 2 * i + 1;
                s.write_all(&frame(HEADERS, END_HEADERS, id, &b)).unwrap();
                s.write_all(&frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()))
                    .unwrap();
            }
            answers_ping(&mut s)
        })
        .await
        .unwrap();
        assert!(kept, "{door}: 10 cancelled streams cost the connection");

        // Streams whose handlers have started (an upload awaited), then all cancelled.
        let b = block.clone();
        let started = tokio::task::spawn_blocking(move || {
            let mut s = raw_connection(addr, &[]);
            for i in 0..30u32 {
                s.write_all(&frame(HEADERS, END_HEADERS, 2 * i + 1, &b))
                    .unwrap();
            }
            std::thread::sleep(Duration::from_millis(300));
            for i in 0..30u32 {
                let _ = s.write_all(&frame(RST_STREAM, 0, 2 * i + 1, &CANCEL.to_be_bytes()));
            }
            read_until_closed(&mut s, Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert!(started.closed, "{door}: {started:?}");
        assert!(
            eventually(Duration::from_secs(5), || doors.closed(door, "reset_flood")
                >= 1.0)
            .await,
            "{door}: not counted as reset_flood"
        );

        // The classic attack: HEADERS and RST_STREAM back to back, thousands of times.
        let b = block.clone();
        let flood = tokio::task::spawn_blocking(move || {
            let mut s = raw_connection(addr, &[]);
            let mut sent = 0;
            for i in 0..5000u32 {
                let id = 2 * i + 1;
                let mut pair = frame(HEADERS, END_HEADERS, id, &b);
                pair.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                if s.write_all(&pair).is_err() {
                    break;
                }
                sent += 1;
            }
            (sent, read_until_closed(&mut s, Duration::from_secs(10)))
        })
        .await
        .unwrap();
        assert!(flood.1.closed, "{door}: {flood:?}");
        assert!(
            doors.served(door).await,
            "{door}: the normal client was not served"
        );
        println!(
            "{door}: rapid reset: connection closed after {} of 5000 streams sent (GOAWAY {:?}); reset_flood closes: {}",
            flood.0,
            flood.1.goaway,
            doors.closed(door, "reset_flood")
        );
    }
    doors.stop().await;
}

/// A CONTINUATION flood (CVE-2024-27316 and its kin): a header block that never ends, sent
/// 16 KB at a time. The server ends the connection (GOAWAY) long before the attacker is done,
/// without buffering what it sent, and a normal client is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_floods_end_the_connection_on_both_doors() {
    let doors = Doors::start(&[]).await;
    for door in DOORS {
        let addr = doors.addr(door);
        let block = request_block(door, false);
        let (sent, outcome) = tokio::task::spawn_blocking(move || {
            let mut s = raw_connection(addr, &[]);
            s.write_all(&frame(HEADERS, 0, 1, &block)).unwrap();
            let mut junk = Vec::new();
            while junk.len() < 16_000 {
                hpack_field(&mut junk, b"x-flood", &[b'a'; 100]);
            }
            let mut sent = 0usize;
            for _ in 0..2000 {
                if s.write_all(&frame(CONTINUATION, 0, 1, &junk)).is_err() {
                    break;
                }
                sent += 1;
            }
            (sent, read_until_closed(&mut s, Duration::from_secs(10)))
        })
        .await
        .unwrap();
        assert!(outcome.closed, "{door}: {outcome:?}");
        assert!(
            outcome.goaway.is_some() || sent < 2000,
            "{door}: {outcome:?}"
        );
        assert!(
            doors.served(door).await,
            "{door}: the normal client was not served"
        );
        println!(
            "{door}: CONTINUATION flood: GOAWAY {:?}, {sent} of 2000 frames of 16 KB written before the server closed",
            outcome.goaway
        );
    }
    doors.stop().await;
}

/// The server's SETTINGS say its limits, and it holds a client to them: streams beyond
/// `--http2-max-concurrent-streams` are refused (REFUSED_STREAM), while those within stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_beyond_the_limit_are_refused_on_both_doors() {
    let doors = Doors::start(&[
        "--http2-max-concurrent-streams",
        "8",
        "--http2-stream-window-bytes",
        "524288",
    ])
    .await;
    for door in DOORS {
        let addr = doors.addr(door);
        let block = request_block(door, false);
        let (server_settings, outcome) = tokio::task::spawn_blocking(move || {
            let mut s = raw_connection(addr, &[]);
            let first = read_frame(&mut s).expect("the server's SETTINGS");
            assert_eq!(first.kind, SETTINGS);
            let pairs: Vec<(u16, u32)> = first
                .payload
                .chunks(6)
                .map(|c| (u16::from_be_bytes([c[0], c[1]]), u32_at(c, 2)))
                .collect();
            s.write_all(&frame(SETTINGS, ACK, 0, &[])).unwrap();
            for i in 0..12u32 {
                s.write_all(&frame(HEADERS, END_HEADERS, 2 * i + 1, &block))
                    .unwrap();
            }
            (pairs, read_until_closed(&mut s, Duration::from_secs(2)))
        })
        .await
        .unwrap();
        // MAX_CONCURRENT_STREAMS (3), INITIAL_WINDOW_SIZE (4), MAX_FRAME_SIZE (5),
        // MAX_HEADER_LIST_SIZE (6).
        for want in [(3, 8), (4, 524_288), (6, 16_384)] {
            assert!(
                server_settings.contains(&want),
                "{door}: {server_settings:?}"
            );
        }
        let refused: Vec<u32> = outcome
            .resets
            .iter()
            .filter(|(_, code)| *code == REFUSED_STREAM)
            .map(|(id, _)| *id)
            .collect();
        assert_eq!(refused.len(), 4, "{door}: {outcome:?}");
        assert!(refused.iter().all(|id| *id > 15), "{door}: {refused:?}");
        println!("{door}: SETTINGS {server_settings:?}; streams refused: {refused:?}");
    }
    doors.stop().await;
}

/// A header list over `--http2-max-header-list-bytes` gets 431 (or its stream refused), and the
/// same connection then serves a normal request: a stream error, not a connection's end. One
/// far over it (1 MB) ends the connection, and a new one is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_header_lists_are_refused_on_both_doors() {
    let doors = Doors::start(&[]).await;
    for door in DOORS {
        let addr = doors.addr(door);
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        let request = |big: usize| {
            let (path, ct) = if door == "grpc" {
                ("/grpc.health.v1.Health/Check", "application/grpc")
            } else {
                ("/health", "text/plain")
            };
            let mut r = axum::http::Request::builder()
                .method(if door == "grpc" { "POST" } else { "GET" })
                .uri(format!("http://{addr}{path}"))
                .header("content-type", ct)
                .header("te", "trailers");
            if big > 0 {
                r = r.header("x-big", "b".repeat(big));
            }
            r.body(()).unwrap()
        };
        let ask = |client: &mut h2::client::SendRequest<bytes::Bytes>, big: usize| {
            let (response, mut body) = client.send_request(request(big), false).unwrap();
            // An empty message (HealthCheckRequest {}), or an empty body.
            let data: &[u8] = if door == "grpc" {
                &[0, 0, 0, 0, 0]
            } else {
                &[]
            };
            // The server may have refused the stream already (431): then this is not sent.
            let _ = body.send_data(bytes::Bytes::copy_from_slice(data), true);
            response
        };
        let mut client = client.ready().await.unwrap();
        let big = ask(&mut client, 20 * 1024).await;
        match &big {
            Ok(r) => assert_eq!(r.status(), 431, "{door}"),
            Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{door}: {e}"),
        }
        let mut client = client.ready().await.unwrap();
        let normal = ask(&mut client, 0).await.unwrap();
        assert_eq!(normal.status(), 200, "{door}");
        // Far over the limit, the whole connection is refused (GOAWAY ENHANCE_YOUR_CALM).
        let mut client = client.ready().await.unwrap();
        // (The client sees the GOAWAY, or the socket closed under its writes.)
        let huge = ask(&mut client, 1024 * 1024).await.unwrap_err();
        assert!(huge.is_go_away() || huge.is_io(), "{door}: {huge}");
        assert!(
            doors.served(door).await,
            "{door}: the normal client was not served"
        );
        println!(
            "{door}: 20 KB header list: {:?}, then a normal request on the same connection: {}; 1 MB: {huge}",
            big.map(|r| r.status()),
            normal.status()
        );
    }
    doors.stop().await;
}

/// A client that asks for a response and keeps its flow-control window shut (SETTINGS
/// INITIAL_WINDOW_SIZE 0, no WINDOW_UPDATE) holds the response forever unless the server gives
/// up: the connection is closed after `--send-timeout-secs` (counted `send_timeout`), and a
/// normal client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shut_window_is_closed_after_the_send_timeout_on_both_doors() {
    let doors = Doors::start(&["--send-timeout-secs", "1"]).await;
    for door in DOORS {
        let addr = doors.addr(door);
        let stalled = shut_window_request(addr, door).await;
        let sending =
            format!("tch_serve_connections_by_state{{door=\"{door}\",state=\"sending\"}}");
        assert!(
            eventually(Duration::from_secs(5), || doors.value(&sending) >= 1.0).await,
            "{door}: the response never waited on the client"
        );
        assert!(
            doors.served(door).await,
            "{door}: the normal client was not served"
        );
        let outcome = tokio::task::spawn_blocking(move || {
            let mut s = stalled;
            read_until_closed(&mut s, Duration::from_secs(10))
        })
        .await
        .unwrap();
        assert!(outcome.closed, "{door}: {outcome:?}");
        assert!(
            eventually(Duration::from_secs(5), || doors
                .closed(door, "send_timeout")
                >= 1.0)
            .await,
            "{door}: not counted as send_timeout"
        );
        println!("{door}: shut window: closed after the send timeout ({outcome:?})");
    }
    doors.stop().await;
}

/// A response still waiting on its client's flow-control window when the server is told to
/// stop is delivered once the client opens the window, within the shutdown timeout: draining
/// closes the connections with no request in, not those with a response on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_on_its_way_at_shutdown_is_delivered_on_both_doors() {
    for door in DOORS {
        let doors = Doors::start(&[
            "--shutdown-delay-secs",
            "0",
            "--shutdown-timeout-secs",
            "10",
        ])
        .await;
        let addr = doors.addr(door);
        let waiting = shut_window_request(addr, door).await;
        let sending =
            format!("tch_serve_connections_by_state{{door=\"{door}\",state=\"sending\"}}");
        assert!(
            eventually(Duration::from_secs(5), || doors.value(&sending) >= 1.0).await,
            "{door}: the response never waited on the client"
        );
        doors.stop.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (body_bytes, ended) = tokio::task::spawn_blocking(move || {
            let mut s = waiting;
            // The stream's window opened: the response's body may now come.
            if s.write_all(&frame(WINDOW_UPDATE, 0, 1, &(1u32 << 20).to_be_bytes()))
                .is_err()
            {
                return (0, false);
            }
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let (mut bytes, mut ended) = (0, false);
            while let Some(f) = read_frame(&mut s) {
                if f.stream == 1 && (f.kind == DATA || f.kind == HEADERS) {
                    bytes += if f.kind == DATA { f.payload.len() } else { 0 };
                    if f.flags & END_STREAM != 0 {
                        ended = true;
                        break;
                    }
                }
            }
            (bytes, ended)
        })
        .await
        .unwrap();
        assert!(
            ended && body_bytes > 0,
            "{door}: the response was cut off by the shutdown ({body_bytes} body bytes, ended: {ended})"
        );
        doors.task.await.unwrap().unwrap();
        println!(
            "{door}: a response waiting on its window at shutdown: {body_bytes} bytes delivered"
        );
    }
}
