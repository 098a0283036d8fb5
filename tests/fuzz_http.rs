//! Property-based fuzzing (proptest) of the HTTP layer, beside tests/suite/fuzz_preprocess.rs (which
//! fuzzes the images): multipart framing, headers (Content-Type, Content-Length,
//! Authorization, Transfer-Encoding, Expect, Connection) and query strings, with an API key
//! configured. Through the router in-process for what `http` can express, and as raw bytes over
//! a real socket for what only a client writing its own bytes can send (framing that hyper
//! parses: conflicting lengths, broken chunks, odd transfer codings, raw bytes in headers).
//!
//! The properties: every answer is a 200 with one result per image, or a JSON error
//! (`{"error", "code"}`, `application/json`) with a 4xx status; a request that hyper's HTTP/1
//! parser refuses before it reaches the router gets hyper's own bodiless 400, 414, 431, 501 or
//! 505; never a 5xx, never a panic (a panic hook counts them, tokio tasks included), never a
//! connection closed without an answer; a request without the right `Bearer` key for a
//! protected route gets 401, and a 200 only ever answers one with it. Afterwards the server
//! answers a normal request, `/health`, and has closed every connection.
//!
//! Cases per property: `PROPTEST_CASES` (default: each property's own, about 15 s for both in
//! release mode on 2 cores). `FUZZ_SEED=<u64>` makes a run reproducible. Each property prints its case
//! count, time and outcomes (`--nocapture`).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;

const KEY: &str = "fuzz-key.5f0c2a9e7d41";

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic of the server's threads (handlers, hyper's connection tasks, the decoding
/// pool, ...), then reports it as usual. (The tests' own threads, named after them, panic when
/// a property fails: those are not counted.)
fn count_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let name = std::thread::current().name().unwrap_or("").to_owned();
            if !name.starts_with("fuzz_") {
                PANICS.fetch_add(1, Ordering::SeqCst);
            }
            default(info);
        }));
    });
}

/// Shrinking a failing case stops after this many steps (each step replays requests through the server).
const MAX_SHRINK_ITERS: u32 = 500;

/// Runs `property` over `strategy`, tallying the outcomes it reports (see common::fuzzing).
fn fuzz<S: Strategy>(
    name: &str,
    default_cases: u32,
    strategy: S,
    property: impl Fn(S::Value) -> Result<String, TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    common::fuzzing::fuzz(name, default_cases, MAX_SHRINK_ITERS, strategy, property);
}

// --------------------------------------------------------------- multipart ---

#[derive(Debug, Clone)]
enum Content {
    Image(u32),
    Random(Vec<u8>),
    Empty,
}

impl Content {
    fn bytes(&self) -> Vec<u8> {
        match self {
            Content::Image(seed) => common::png(*seed),
            Content::Random(b) => b.clone(),
            Content::Empty => Vec::new(),
        }
    }
}

#[derive(Debug, Clone)]
enum PartHeader {
    /// Content-Disposition: form-data; name=...; filename=...
    Disposition {
        name: Option<String>,
        filename: Option<String>,
        quoted: bool,
    },
    ContentType(String),
    /// Any bytes as a header line (no colon, raw bytes, ...).
    Raw(Vec<u8>),
    /// A header line this long.
    Long(usize),
}

#[derive(Debug, Clone)]
struct FormPart {
    headers: Vec<PartHeader>,
    content: Content,
    /// The boundary, or a prefix of it, inside the content.
    boundary_inside: Option<bool>,
}

#[derive(Debug, Clone)]
enum Closing {
    Proper,
    Missing,
    WithoutDashes,
    Twice,
}

#[derive(Debug, Clone)]
struct Form {
    boundary: String,
    preamble: Vec<u8>,
    parts: Vec<FormPart>,
    closing: Closing,
    epilogue: Vec<u8>,
    /// Line ends: CRLF, LF, or CRLF with some LF.
    newline: u8,
    /// Cut the encoded form at this point.
    truncate: Option<Index>,
}

fn name_text() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => Just("file".to_string()),
        1 => Just("image".to_string()),
        1 => Just(String::new()),
        1 => Just("fi\\\"le".to_string()),
        1 => "[ -~]{0,16}",
        1 => ".{0,6}",
    ]
}

fn part_header() -> impl Strategy<Value = PartHeader> {
    prop_oneof![
        6 => (
            prop::option::weighted(0.95, name_text()),
            prop::option::of("[ -~]{0,20}"),
            prop::bool::weighted(0.9)
        )
            .prop_map(|(name, filename, quoted)| PartHeader::Disposition {
                name,
                filename,
                quoted
            }),
        2 => prop_oneof![
            Just("image/png".to_string()),
            Just("application/octet-stream".to_string()),
            "[ -~]{0,30}",
        ]
        .prop_map(PartHeader::ContentType),
        1 => prop::collection::vec(any::<u8>(), 0..40).prop_map(PartHeader::Raw),
        1 => prop_oneof![Just(9_000usize), Just(70_000), 0usize..2000].prop_map(PartHeader::Long),
    ]
}

fn content() -> impl Strategy<Value = Content> {
    prop_oneof![
        5 => (0u32..50).prop_map(Content::Image),
        2 => prop::collection::vec(any::<u8>(), 0..400).prop_map(Content::Random),
        1 => Just(Content::Empty),
    ]
}

fn form() -> impl Strategy<Value = Form> {
    let boundary = prop_oneof![
        4 => Just("fuzz-boundary-0123".to_string()),
        1 => "[A-Za-z0-9'()+_,./:=? -]{1,70}",
        1 => "[ -~]{0,90}",
    ];
    let part = (
        prop::collection::vec(part_header(), 0..4),
        content(),
        prop::option::weighted(0.05, any::<bool>()),
    )
        .prop_map(|(headers, content, boundary_inside)| FormPart {
            headers,
            content,
            boundary_inside,
        });
    let closing = prop_oneof![
        6 => Just(Closing::Proper),
        1 => Just(Closing::Missing),
        1 => Just(Closing::WithoutDashes),
        1 => Just(Closing::Twice),
    ];
    (
        boundary,
        prop::collection::vec(any::<u8>(), 0..20).prop_map(|b| b.into_iter().take(8).collect()),
        prop::collection::vec(part, 0..4),
        closing,
        prop::collection::vec(any::<u8>(), 0..10),
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8)],
        prop::option::weighted(0.1, any::<Index>()),
    )
        .prop_map(
            |(boundary, preamble, parts, closing, epilogue, newline, truncate)| Form {
                boundary,
                preamble,
                parts,
                closing,
                epilogue,
                newline,
                truncate,
            },
        )
}

impl Form {
    /// The encoded body and the number of `file` parts in it.
    fn encode(&self) -> (Vec<u8>, usize) {
        let mut line_no = 0usize;
        let mut nl = |out: &mut Vec<u8>| {
            line_no += 1;
            match self.newline {
                0 => out.extend_from_slice(b"\r\n"),
                1 => out.push(b'\n'),
                _ if line_no.is_multiple_of(3) => out.push(b'\n'),
                _ => out.extend_from_slice(b"\r\n"),
            }
        };
        let b = self.boundary.as_bytes();
        let mut out = self.preamble.clone();
        if !out.is_empty() {
            nl(&mut out);
        }
        let mut files = 0;
        for p in &self.parts {
            out.extend_from_slice(b"--");
            out.extend_from_slice(b);
            nl(&mut out);
            for h in &p.headers {
                match h {
                    PartHeader::Disposition {
                        name,
                        filename,
                        quoted,
                    } => {
                        out.extend_from_slice(b"Content-Disposition: form-data");
                        let q = if *quoted { "\"" } else { "" };
                        if let Some(n) = name {
                            out.extend_from_slice(format!("; name={q}{n}{q}").as_bytes());
                            if n == "file" {
                                files += 1;
                            }
                        }
                        if let Some(f) = filename {
                            out.extend_from_slice(format!("; filename={q}{f}{q}").as_bytes());
                        }
                    }
                    PartHeader::ContentType(t) => {
                        out.extend_from_slice(format!("Content-Type: {t}").as_bytes())
                    }
                    PartHeader::Raw(bytes) => out.extend_from_slice(bytes),
                    PartHeader::Long(n) => {
                        out.extend_from_slice(b"X-Long: ");
                        out.extend(std::iter::repeat_n(b'a', *n));
                    }
                }
                nl(&mut out);
            }
            nl(&mut out);
            let mut body = p.content.bytes();
            if let Some(whole) = p.boundary_inside {
                let at = body.len() / 2;
                let inside = if whole { b } else { &b[..b.len() / 2] };
                let mut marker = b"\r\n--".to_vec();
                marker.extend_from_slice(inside);
                body.splice(at..at, marker);
            }
            out.extend_from_slice(&body);
            nl(&mut out);
        }
        match self.closing {
            Closing::Proper | Closing::Twice => {
                for _ in 0..if matches!(self.closing, Closing::Twice) {
                    2
                } else {
                    1
                } {
                    out.extend_from_slice(b"--");
                    out.extend_from_slice(b);
                    out.extend_from_slice(b"--");
                    nl(&mut out);
                }
            }
            Closing::WithoutDashes => {
                out.extend_from_slice(b"--");
                out.extend_from_slice(b);
                nl(&mut out);
            }
            Closing::Missing => {}
        }
        out.extend_from_slice(&self.epilogue);
        if let Some(cut) = &self.truncate {
            out.truncate(cut.index(out.len() + 1));
        }
        (out, files)
    }
}

// ------------------------------------------------------------ the request ---

#[derive(Debug, Clone)]
enum Payload {
    Form(Form),
    Image(u32),
    Random(Vec<u8>),
    Empty,
}

#[derive(Debug, Clone)]
enum ContentType {
    Multipart,
    MultipartQuoted,
    MultipartNoBoundary,
    MultipartOtherBoundary(String),
    Image,
    None,
    Other(String),
    Twice,
}

#[derive(Debug, Clone)]
enum Length {
    Right,
    Off(i64),
    Text(String),
    Two(i64),
    None,
}

#[derive(Debug, Clone)]
enum Chunking {
    Valid(Vec<usize>),
    BadSize(String),
    NoLastChunk,
    Extension,
    MissingCrlf,
    Huge,
}

#[derive(Debug, Clone)]
struct HttpSpec {
    method: String,
    path: String,
    query: Option<Vec<u8>>,
    content_type: ContentType,
    length: Length,
    /// Transfer-Encoding value and how the body is chunked under it.
    transfer: Option<(String, Chunking)>,
    authorization: Option<Vec<u8>>,
    expect_continue: bool,
    connection: Option<String>,
    /// Extra header lines, raw.
    extra: Vec<Vec<u8>>,
    payload: Payload,
}

fn authorization() -> impl Strategy<Value = Option<Vec<u8>>> {
    let right = format!("Bearer {KEY}").into_bytes();
    prop_oneof![
        6 => Just(Some(right.clone())),
        1 => Just(Some(format!("bearer  {KEY}").into_bytes())),
        1 => Just(None),
        1 => Just(Some(format!("Bearer {KEY}x").into_bytes())),
        1 => Just(Some(format!("Basic {KEY}").into_bytes())),
        1 => Just(Some(b"Bearer".to_vec())),
        1 => Just(Some(format!("Bearer {KEY} extra").into_bytes())),
        1 => prop::collection::vec(any::<u8>(), 0..60).prop_map(Some),
        1 => "Bearer [ -~]{0,40}".prop_map(|s| Some(s.into_bytes())),
    ]
}

fn http_spec() -> impl Strategy<Value = HttpSpec> {
    let method = prop_oneof![
        12 => Just("POST".to_string()),
        2 => Just("GET".to_string()),
        1 => Just("PUT".to_string()),
        1 => Just("post".to_string()),
        1 => "[A-Z]{1,8}".prop_filter("HEAD has no body to check", |m| m != "HEAD"),
    ];
    let path = prop_oneof![
        10 => Just("/predict".to_string()),
        3 => Just("/models/fake/predict".to_string()),
        1 => Just("/models/nope/predict".to_string()),
        1 => Just("/live".to_string()),
        1 => Just("/health".to_string()),
        1 => Just("/metrics".to_string()),
        1 => Just("/v2/models/fake/infer".to_string()),
        1 => Just("//predict".to_string()),
        2 => "/[!-~]{0,30}",
        1 => "/[ -~]{0,30}",
    ];
    let query = prop::option::weighted(
        0.4,
        prop_oneof![
            (0usize..300).prop_map(|k| format!("top_k={k}").into_bytes()),
            Just(b"model=fake&top_k=3".to_vec()),
            Just(b"model=%66ake".to_vec()),
            "[a-z_=&0-9%]{0,30}".prop_map(String::into_bytes),
            prop::collection::vec(any::<u8>(), 0..30),
        ],
    );
    let content_type = prop_oneof![
        8 => Just(ContentType::Multipart),
        1 => Just(ContentType::MultipartQuoted),
        1 => Just(ContentType::MultipartNoBoundary),
        1 => "[ -~]{0,20}".prop_map(ContentType::MultipartOtherBoundary),
        3 => Just(ContentType::Image),
        1 => Just(ContentType::None),
        1 => "[ -~]{0,30}".prop_map(ContentType::Other),
        1 => Just(ContentType::Twice),
    ];
    let length = prop_oneof![
        10 => Just(Length::Right),
        1 => (-20i64..20).prop_map(Length::Off),
        1 => prop_oneof![
            Just("99999999999999999999999".to_string()),
            Just("-1".to_string()),
            Just(" 12".to_string()),
            Just("0x10".to_string()),
            Just("1,1".to_string()),
            "[0-9]{0,12}",
        ]
        .prop_map(Length::Text),
        1 => (-5i64..5).prop_map(Length::Two),
        1 => Just(Length::None),
    ];
    let chunking = prop_oneof![
        4 => prop::collection::vec(1usize..300, 1..6).prop_map(Chunking::Valid),
        1 => "[ -~]{0,10}".prop_map(Chunking::BadSize),
        1 => Just(Chunking::NoLastChunk),
        1 => Just(Chunking::Extension),
        1 => Just(Chunking::MissingCrlf),
        1 => Just(Chunking::Huge),
    ];
    let transfer = prop::option::weighted(
        0.2,
        (
            prop_oneof![
                4 => Just("chunked".to_string()),
                1 => Just("Chunked".to_string()),
                1 => Just("chunked, chunked".to_string()),
                1 => Just("gzip, chunked".to_string()),
                1 => Just("chunked, gzip".to_string()),
                1 => Just("identity".to_string()),
                1 => Just("gzip".to_string()),
                1 => "[ -~]{0,15}",
            ],
            chunking,
        ),
    );
    let extra = prop::collection::vec(
        prop_oneof![
            12 => "X-[A-Za-z-]{1,10}: [ -~]{0,40}".prop_map(String::into_bytes),
            1 => Just(b"Host: second".to_vec()),
            1 => Just(b"X-Folded: a\r\n  b".to_vec()),
            1 => Just(b"X-Empty:".to_vec()),
            1 => Just(b": no name".to_vec()),
            1 => Just(b"No colon".to_vec()),
            1 => Just(b"X-Nul: a\0b".to_vec()),
            1 => Just(b"X-Latin: caf\xe9".to_vec()),
            1 => Just(b"Content-Encoding: gzip".to_vec()),
            1 => Just(b"X-Request-Id: \xff\xfe".to_vec()),
            1 => prop::collection::vec(any::<u8>(), 0..30),
        ],
        0..3,
    );
    let payload = prop_oneof![
        6 => form().prop_map(Payload::Form),
        2 => (0u32..50).prop_map(Payload::Image),
        1 => prop::collection::vec(any::<u8>(), 0..300).prop_map(Payload::Random),
        1 => Just(Payload::Empty),
    ];
    (
        (method, path, query, content_type, length),
        (
            transfer,
            authorization(),
            prop::bool::weighted(0.1),
            prop::option::weighted(
                0.2,
                prop_oneof![
                    Just("close".to_string()),
                    Just("keep-alive".to_string()),
                    Just("upgrade".to_string()),
                    "[ -~]{0,12}",
                ],
            ),
            extra,
            payload,
        ),
    )
        .prop_map(
            |(
                (method, path, query, content_type, length),
                (transfer, authorization, expect_continue, connection, extra, payload),
            )| HttpSpec {
                method,
                path,
                query,
                content_type,
                length,
                transfer,
                authorization,
                expect_continue,
                connection,
                extra,
                payload,
            },
        )
}

const BOUNDARY: &str = "fuzz-boundary-0123";

impl HttpSpec {
    /// The body before any transfer coding, and the `file` parts in it.
    fn body(&self) -> (Vec<u8>, usize, String) {
        match &self.payload {
            Payload::Form(f) => {
                let (b, files) = f.encode();
                (b, files, f.boundary.clone())
            }
            Payload::Image(seed) => (common::png(*seed), 1, BOUNDARY.to_string()),
            Payload::Random(b) => (b.clone(), 1, BOUNDARY.to_string()),
            Payload::Empty => (Vec::new(), 0, BOUNDARY.to_string()),
        }
    }

    fn content_type(&self, boundary: &str) -> Option<Vec<u8>> {
        Some(match &self.content_type {
            ContentType::Multipart => format!("multipart/form-data; boundary={boundary}").into(),
            ContentType::MultipartQuoted => {
                format!("multipart/form-data; boundary=\"{boundary}\"").into()
            }
            ContentType::MultipartNoBoundary => b"multipart/form-data".to_vec(),
            ContentType::MultipartOtherBoundary(b) => {
                format!("multipart/form-data; boundary={b}").into()
            }
            ContentType::Image => b"image/png".to_vec(),
            ContentType::None => return None,
            ContentType::Other(t) => t.clone().into(),
            ContentType::Twice => {
                format!("multipart/form-data; boundary={boundary}\r\nContent-Type: image/png")
                    .into()
            }
        })
    }

    /// Whether the request carries the configured key as a bearer credential.
    fn authorized(&self) -> bool {
        self.authorization.as_deref().is_some_and(|a| {
            let a = a.trim_ascii();
            let Some(sp) = a.iter().position(|&b| b == b' ') else {
                return false;
            };
            a[..sp].eq_ignore_ascii_case(b"bearer") && a[sp..].trim_ascii() == KEY.as_bytes()
        })
    }

    /// Whether the server has the whole request once the bytes are sent (so it must answer
    /// without waiting for more): no transfer coding, and no more body declared than sent.
    fn whole(&self) -> bool {
        self.transfer.is_none()
            && matches!(
                self.length,
                Length::Right | Length::None | Length::Off(..=0) | Length::Two(0)
            )
    }

    fn protected(&self) -> bool {
        !(matches!(self.path.as_str(), "/live" | "/health" | "/metrics")
            || self.path.starts_with("/v2/health/"))
    }

    fn target(&self) -> Vec<u8> {
        let mut t = self.path.clone().into_bytes();
        if let Some(q) = &self.query {
            t.push(b'?');
            t.extend_from_slice(q);
        }
        t
    }

    /// The request as bytes on the wire: the head, the body, and the `file` parts in it.
    fn wire(&self) -> (Vec<u8>, Vec<u8>, usize) {
        let (body, files, boundary) = self.body();
        let mut out = self.method.clone().into_bytes();
        out.push(b' ');
        out.extend_from_slice(&self.target());
        out.extend_from_slice(b" HTTP/1.1\r\nHost: fuzz\r\n");
        let mut header = |name: &[u8], value: &[u8]| {
            out.extend_from_slice(name);
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        };
        if let Some(ct) = self.content_type(&boundary) {
            header(b"Content-Type", &ct);
        }
        if let Some(a) = &self.authorization {
            header(b"Authorization", a);
        }
        if self.expect_continue {
            header(b"Expect", b"100-continue");
        }
        if let Some(c) = &self.connection {
            header(b"Connection", c.as_bytes());
        }
        let sent = match &self.transfer {
            Some((te, chunking)) => {
                header(b"Transfer-Encoding", te.as_bytes());
                chunk(&body, chunking)
            }
            None => body.clone(),
        };
        let n = body.len() as i64;
        match &self.length {
            Length::Right if self.transfer.is_none() => {
                header(b"Content-Length", n.to_string().as_bytes())
            }
            Length::Right | Length::None => {}
            Length::Off(d) => header(b"Content-Length", (n + d).max(0).to_string().as_bytes()),
            Length::Text(t) => header(b"Content-Length", t.as_bytes()),
            Length::Two(d) => {
                header(b"Content-Length", n.to_string().as_bytes());
                header(b"Content-Length", (n + d).max(0).to_string().as_bytes());
            }
        }
        for line in &self.extra {
            out.extend_from_slice(line);
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");
        (out, sent, files)
    }

    /// The request for the router, or None when `http` cannot express it.
    fn request(&self) -> Option<(Request<Body>, usize)> {
        let (body, files, boundary) = self.body();
        let uri = String::from_utf8(self.target()).ok()?;
        let mut req = Request::builder().method(self.method.as_str()).uri(uri);
        if let Some(ct) = self.content_type(&boundary) {
            req = req.header("content-type", ct);
        }
        if let Some(a) = &self.authorization {
            req = req.header("authorization", a.as_slice());
        }
        if let Length::Right = self.length {
            req = req.header("content-length", body.len());
        }
        Some((req.body(Body::from(body)).ok()?, files))
    }
}

fn chunk(body: &[u8], how: &Chunking) -> Vec<u8> {
    let mut out = Vec::new();
    let mut pieces = |sizes: &[usize]| {
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let n = sizes[i % sizes.len()].min(rest.len());
            out.extend_from_slice(format!("{n:x}\r\n").as_bytes());
            out.extend_from_slice(&rest[..n]);
            out.extend_from_slice(b"\r\n");
            rest = &rest[n..];
            i += 1;
        }
    };
    match how {
        Chunking::Valid(sizes) => {
            pieces(sizes);
            out.extend_from_slice(b"0\r\n\r\n");
        }
        Chunking::BadSize(s) => {
            out.extend_from_slice(format!("{s}\r\n").as_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
        }
        Chunking::NoLastChunk => pieces(&[64]),
        Chunking::Extension => {
            out.extend_from_slice(format!("{:x};name=value\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(b"\r\n0\r\n\r\n");
        }
        Chunking::MissingCrlf => {
            out.extend_from_slice(format!("{:x}\r\n", body.len()).as_bytes());
            out.extend_from_slice(body);
            out.extend_from_slice(b"0\r\n\r\n");
        }
        Chunking::Huge => {
            out.extend_from_slice(b"ffffffffffffffffff\r\n");
            out.extend_from_slice(body);
        }
    }
    out
}

// ---------------------------------------------------------------- answers ---

/// One response as read from the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    content_type: Option<String>,
    www_authenticate: bool,
    body: Vec<u8>,
}

/// Every whole response in `bytes` (a 100 Continue is skipped), and whether bytes of an
/// unfinished one follow; Err when they do not parse.
fn parse_answers(mut bytes: &[u8]) -> Result<(Vec<Answer>, bool), String> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") else {
            return Ok((out, true));
        };
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        bytes = &bytes[end + 4..];
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("no status in {head:?}"))?;
        let field = |name: &str| {
            head.lines().skip(1).find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_owned())
            })
        };
        if status == 100 {
            continue;
        }
        let n: usize = match field("content-length") {
            Some(n) => n.parse().map_err(|_| format!("bad length in {head:?}"))?,
            None if field("transfer-encoding").is_some() => {
                return Err(format!("a chunked answer: {head:?}"));
            }
            None => 0,
        };
        if bytes.len() < n {
            return Ok((out, true));
        }
        let (body, rest) = bytes.split_at(n);
        bytes = rest;
        let body = body.to_vec();
        out.push(Answer {
            status,
            content_type: field("content-type"),
            www_authenticate: field("www-authenticate").is_some_and(|v| v.starts_with("Bearer")),
            body,
        });
    }
    Ok((out, false))
}

/// The properties of one answer to `spec` (its first, the one to the fuzzed request).
fn check(
    spec_authorized: bool,
    protected: bool,
    files: usize,
    a: &Answer,
) -> Result<String, TestCaseError> {
    prop_assert!(
        a.status < 500,
        "answered {}: {:?}",
        a.status,
        String::from_utf8_lossy(&a.body)
    );
    if a.body.is_empty() && a.content_type.is_none() {
        // Refused by hyper's HTTP/1 parser, before the router.
        prop_assert!(
            matches!(a.status, 400 | 414 | 431 | 501 | 505),
            "a bodiless {} from the server",
            a.status
        );
        return Ok(format!("{} (HTTP parser)", a.status));
    }
    if a.status == 200 {
        prop_assert!(spec_authorized || !protected, "200 without the key");
        // /metrics answers text; the rest JSON.
        if let Ok(json) = serde_json::from_slice::<serde_json::Value>(&a.body)
            && json.get("results").is_some()
        {
            let n = json["results"].as_array().map_or(0, Vec::len);
            prop_assert!(
                (1..=files.max(1)).contains(&n),
                "{n} results for {files} files: {json}"
            );
        }
        return Ok("200".into());
    }
    let json: serde_json::Value = serde_json::from_slice(&a.body).map_err(|e| {
        TestCaseError::fail(format!(
            "{} with a body that is not JSON ({e}): {:?}",
            a.status,
            String::from_utf8_lossy(&a.body)
        ))
    })?;
    prop_assert_eq!(a.content_type.as_deref(), Some("application/json"));
    prop_assert!(
        json["code"].is_string() && json["error"].is_string(),
        "{json}"
    );
    if protected && !spec_authorized {
        prop_assert_eq!(a.status, 401, "without the key: {}", json);
    }
    if a.status == 401 {
        prop_assert!(a.www_authenticate, "401 without WWW-Authenticate");
    }
    Ok(format!(
        "{} {}",
        a.status,
        json["code"].as_str().unwrap_or("")
    ))
}

fn fuzz_server(rt: &tokio::runtime::Runtime) -> common::FakeServer {
    rt.block_on(common::fake_server(
        &[
            "--max-body-bytes",
            "200000",
            "--max-images-per-request",
            "3",
            "--warmup-iterations",
            "0",
            "--api-key",
            KEY,
            "--upload-timeout-secs",
            "2",
            "--upload-rate-grace-secs",
            "1",
            "--header-read-timeout-secs",
            "2",
        ],
        Duration::ZERO,
    ))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A normal request after the fuzzing: still served.
fn still_serves(addr: SocketAddr) {
    let (head, body, _) = HttpSpec {
        method: "POST".into(),
        path: "/predict".into(),
        query: None,
        content_type: ContentType::Image,
        length: Length::Right,
        transfer: None,
        authorization: Some(format!("Bearer {KEY}").into_bytes()),
        expect_continue: false,
        connection: Some("close".into()),
        extra: Vec::new(),
        payload: Payload::Image(3),
    }
    .wire();
    let answers = exchange(addr, &head, &body, false, true).unwrap().answers;
    assert_eq!(answers[0].status, 200, "{:?}", answers[0]);
}

/// What became of one request on its connection.
struct Exchange {
    answers: Vec<Answer>,
    /// No answer came in time to a request the server may rightly wait on (a body shorter
    /// than declared, an unfinished chunked body), so the client gave up and closed its side.
    gave_up: bool,
}

/// Sends a request and reads its answer: as long as it takes for a request the server has
/// whole, 300 ms for one it may rightly wait on (then the client closes its sending side, as a
/// client giving up does). With `Expect: 100-continue`, as a client does: the body only after
/// `100 Continue`, none after a final answer. Then reads what else comes until the server
/// closes.
fn exchange(
    addr: SocketAddr,
    head: &[u8],
    body: &[u8],
    expect: bool,
    whole: bool,
) -> Result<Exchange, String> {
    let mut s = TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let patient = Duration::from_secs(10);
    s.set_read_timeout(Some(patient)).unwrap();
    // The server may close before reading all of it (after a refusal): not an error.
    let _ = s.write_all(head);
    let mut got = Vec::new();
    let mut buf = [0u8; 16384];
    if expect {
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        if got.starts_with(b"HTTP/1.1 100") {
            let _ = s.write_all(body);
        }
    } else {
        let _ = s.write_all(body);
    }
    if !whole {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
    }
    let mut gave_up = false;
    let mut closed = false;
    while parse_answers(&got)?.0.is_empty() {
        match s.read(&mut buf) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                if whole || gave_up {
                    return Err(format!("no answer in {patient:?} to a whole request"));
                }
                gave_up = true;
                let _ = s.shutdown(Shutdown::Write);
                s.set_read_timeout(Some(patient)).unwrap();
            }
            Err(_) => {
                closed = true;
                break;
            }
        }
    }
    // The rest: answers to bytes past the request, until the server closes.
    let _ = s.shutdown(Shutdown::Write);
    if !closed {
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => return Err(format!("{e} after {} bytes", got.len())),
            }
        }
    }
    let (answers, _) = parse_answers(&got)?;
    Ok(Exchange { answers, gave_up })
}

#[test]
fn fuzz_raw_requests_over_a_socket() {
    count_panics();
    let rt = runtime();
    let server = fuzz_server(&rt);
    let metrics = server.state.metrics.clone();
    let (addr, stop, serving) = rt.block_on(common::serve_on_socket(server.server));
    fuzz(
        "raw HTTP/1.1 requests over a socket",
        8_000,
        http_spec(),
        |spec| {
            let (head, body, files) = spec.wire();
            let Exchange { answers, gave_up } =
                exchange(addr, &head, &body, spec.expect_continue, spec.whole())
                    .map_err(TestCaseError::fail)?;
            if answers.is_empty() {
                prop_assert!(gave_up, "closed without an answer");
                return Ok("no answer: the client gave up on an unfinished request".into());
            }
            // Bytes past the request (a wrong Content-Length) are read as more requests: their
            // answers must be as sound, if not about the key.
            for later in &answers[1..] {
                check(true, false, usize::MAX, later)?;
            }
            check(spec.authorized(), spec.protected(), files, &answers[0])
        },
    );
    still_serves(addr);
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "panics while fuzzing");
    let closed = rt.block_on(common::eventually(Duration::from_secs(10), || {
        common::metric(
            &metrics.render(),
            "tch_serve_connections_open{door=\"http\"}",
        ) == Some(0.0)
    }));
    assert!(closed, "connections left open: {}", metrics.render());
    stop.cancel();
    rt.block_on(serving).unwrap().unwrap();
}

#[test]
fn fuzz_requests_through_the_router_with_a_key() {
    count_panics();
    let rt = runtime();
    let server = fuzz_server(&rt);
    fuzz(
        "requests through the router, with a key",
        20_000,
        http_spec(),
        |spec| {
            let Some((req, files)) = spec.request() else {
                return Ok("not expressible in HTTP".into());
            };
            let (resp, body) = rt.block_on(common::send(&server, req));
            let answer = Answer {
                status: resp.status().as_u16(),
                content_type: resp
                    .headers()
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                www_authenticate: resp
                    .headers()
                    .get("www-authenticate")
                    .is_some_and(|v| v.as_bytes().starts_with(b"Bearer")),
                body: match &body {
                    serde_json::Value::String(s) => s.clone().into_bytes(),
                    v => v.to_string().into_bytes(),
                },
            };
            check(spec.authorized(), spec.protected(), files, &answer)
        },
    );
    assert_eq!(PANICS.load(Ordering::SeqCst), 0, "panics while fuzzing");
    let (resp, _) = rt.block_on(common::send(
        &server,
        Request::get("/health").body(Body::empty()).unwrap(),
    ));
    assert_eq!(resp.status(), 200);
}
