//! The real binary as a user runs it: start-up on the exported model, the healthcheck
//! subcommand, SIGTERM, and start-up errors.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_tch-serve");

/// The server binary as a child process on a port it picks itself (`--port 0`, read from its
/// `listening` log line: a port picked here and handed over could be taken by another test's
/// server in between). It is killed and reaped when dropped, also when a failed assertion
/// unwinds through the test, so that no test leaves a server running.
struct ServerProcess {
    child: Child,
    /// Log lines from its standard output, read as it writes them (it never blocks on a full
    /// pipe).
    lines: mpsc::Receiver<String>,
    logs: Vec<String>,
    port: Option<u16>,
}

impl ServerProcess {
    /// `tch-serve ARGS...` on the exported model (with `--port 0`, `--grpc-port 0` and `--host
    /// 127.0.0.1` ahead of ARGS, `--model-dir` after): standard output piped, standard error as
    /// given.
    fn spawn(args: &[&str], stderr: Stdio) -> Self {
        let mut child = Command::new(BIN)
            .args(["serve", "--host", "127.0.0.1", "--port", "0"])
            // Tests run in parallel: no fixed gRPC port.
            .args(["--grpc-port", "0"])
            .args(args)
            .arg("--model-dir")
            .arg(model_dir())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in stdout.lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self {
            child,
            lines,
            logs: Vec::new(),
            port: None,
        }
    }

    /// The port it listens on, once it says so; None when it exits first (or is not listening
    /// within `limit`).
    fn port(&mut self, limit: Duration) -> Option<u16> {
        let deadline = Instant::now() + limit;
        while self.port.is_none() {
            let left = deadline.checked_duration_since(Instant::now())?;
            let line = self.lines.recv_timeout(left).ok()?;
            self.port = listening_port(&line);
            self.logs.push(line);
        }
        self.port
    }

    /// Every log line, once it has exited (the pipe closes).
    fn logs(mut self) -> Vec<String> {
        self.logs.extend(self.lines.iter());
        std::mem::take(&mut self.logs)
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        // Err when it has exited and been reaped already: nothing left to stop.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The port of a `listening` log line (text or JSON), as `127.0.0.1:PORT`.
fn listening_port(line: &str) -> Option<u16> {
    if !line.contains("listening") || line.contains("gRPC") {
        return None;
    }
    let rest = &line[line.find("127.0.0.1:")? + "127.0.0.1:".len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The server on the exported model with `extra`, healthy.
fn serve(extra: &[&str]) -> (ServerProcess, u16) {
    let mut server = ServerProcess::spawn(extra, Stdio::inherit());
    let port = wait_healthy(&mut server, Duration::from_secs(60));
    (server, port)
}

fn get(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
    let resp = reqwest::blocking_get(port, path)?;
    Some(resp)
}

/// A tiny blocking HTTP/1.1 GET, enough for /health.
mod reqwest {
    use std::io::{Read, Write};
    pub fn blocking_get(port: u16, path: &str) -> Option<(u16, serde_json::Value)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let status = buf.split(' ').nth(1)?.parse().ok()?;
        let body = buf.split("\r\n\r\n").nth(1).unwrap_or("");
        Some((
            status,
            serde_json::from_str(body).unwrap_or(serde_json::Value::Null),
        ))
    }
}

/// The status of `GET /models` with `Authorization: Bearer <key>`.
fn status_with_key(port: u16, key: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    buf.split(' ').nth(1)?.parse().ok()
}

/// Waits for its port, then for /health to answer 200 there; the port.
fn wait_healthy(server: &mut ServerProcess, limit: Duration) -> u16 {
    let start = Instant::now();
    let Some(port) = server.port(limit) else {
        match server.child.try_wait().unwrap() {
            Some(status) => panic!("server exited during start-up: {status}"),
            None => panic!("not listening within {limit:?}"),
        }
    };
    loop {
        if let Some((200, _)) = get(port, "/health") {
            return port;
        }
        if let Ok(Some(status)) = server.child.try_wait() {
            panic!("server exited during start-up: {status}");
        }
        assert!(start.elapsed() < limit, "not healthy within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sigterm(child: &Child) {
    let rc = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
}

fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(start.elapsed() < limit, "did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn starts_healthy_serves_and_exits_cleanly_on_sigterm() {
    let spawned = Instant::now();
    let (mut server, port) = serve(&["--log-format", "json"]);
    let took = spawned.elapsed();
    println!(
        "STARTUP: healthy {:.0} ms after spawn",
        took.as_secs_f64() * 1000.0
    );
    let (_, health) = get(port, "/health").unwrap();
    assert_eq!(health["model"], "resnet18", "{health}");
    assert_eq!(health["device"], "cpu", "{health}");
    assert_eq!(health["trained"], false, "{health}");
    let hc = Command::new(BIN)
        .args(["healthcheck", "--port", &port.to_string()])
        .status()
        .unwrap();
    assert!(
        hc.success(),
        "healthcheck must exit 0 against a healthy server"
    );
    let (status, metrics) = get(port, "/live").unwrap();
    assert_eq!((status, metrics["status"].as_str()), (200, Some("alive")));

    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    // JSON logs: one object per line, with the startup and shutdown events.
    let lines: Vec<serde_json::Value> = server
        .logs()
        .into_iter()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(&l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.contains("ready")), "{messages:?}");
    assert!(
        messages.iter().any(|m| m.contains("SIGTERM")),
        "{messages:?}"
    );
    let hc = Command::new(BIN)
        .args(["healthcheck", "--port", &port.to_string()])
        .status()
        .unwrap();
    assert!(!hc.success(), "healthcheck must fail when nothing listens");
}

#[test]
fn cuda_requested_without_a_gpu_fails_at_start_up_and_says_why() {
    if tch::Cuda::is_available() {
        return; // on a GPU machine this would start fine
    }
    let out = Command::new(BIN)
        .args([
            "--port",
            "0",
            "--grpc-port",
            "0",
            "--device",
            "cuda",
            "--model-dir",
        ])
        .arg(model_dir())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--device cuda:0") && stderr.contains("CUDA"),
        "{stderr}"
    );
}

/// bf16 on a CPU without native bf16 is refused at start-up with the reason; on one with it
/// (or with --allow-emulated-bf16) the same flags get past loading to serving.
#[test]
fn bf16_is_refused_where_the_cpu_only_emulates_it() {
    let features = tch_serve::config::cpu_features();
    let native = tch_serve::config::native_bf16(features);
    let run = |extra: &[&str]| {
        let args: Vec<&str> = ["--device", "cpu", "--precision", "bf16"]
            .into_iter()
            .chain(["--warmup-iterations", "0"])
            .chain(extra.iter().copied())
            .collect();
        let mut server = ServerProcess::spawn(&args, Stdio::piped());
        // Either it listens and serves /health (then it is stopped as it is dropped), or it
        // exits (refused).
        if server.port(Duration::from_secs(60)).is_some() {
            wait_healthy(&mut server, Duration::from_secs(60));
            return (None, String::new());
        }
        let status = wait_exit(&mut server.child, Duration::from_secs(30));
        let mut err = String::new();
        std::io::Read::read_to_string(server.child.stderr.as_mut().unwrap(), &mut err).unwrap();
        (Some(status.success()), err)
    };
    let (exited, stderr) = run(&[]);
    if native {
        assert_eq!(exited, None, "refused on a CPU with native bf16: {stderr}");
    } else {
        assert_eq!(exited, Some(false), "bf16 served on {features:?}");
        assert!(
            stderr.contains("no native bf16") && stderr.contains("--allow-emulated-bf16"),
            "{stderr}"
        );
        let (exited, stderr) = run(&["--allow-emulated-bf16"]);
        assert_eq!(exited, None, "--allow-emulated-bf16 refused: {stderr}");
    }
}

#[test]
fn bad_settings_fail_at_start_up_naming_the_flags() {
    let out = Command::new(BIN)
        .args(["--queue-capacity", "2", "--max-images-per-request", "4"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("--queue-capacity") && stderr.contains("--max-images-per-request"),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args(["--model-dir", "/nonexistent/model"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("metadata.json") && stderr.contains("export.py"),
        "{stderr}"
    );

    // Settings come from the environment too.
    let out = Command::new(BIN)
        .env("TCH_SERVE_DEVICE", "tpu")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--device"));
}

/// SIGHUP reads `--api-key-file` again, with no restart: the new key works at once, the
/// removed one for the rotation grace only, and the process keeps serving (SIGHUP's default
/// action would end it).
#[test]
fn sighup_rotates_the_api_keys() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("keys");
    std::fs::write(&file, "key-before-rotation\n").unwrap();
    let (mut server, port) = serve(&[
        "--api-key-file",
        file.to_str().unwrap(),
        "--api-key-file-poll-secs",
        "0",
        "--api-key-rotation-grace-secs",
        "2",
    ]);
    assert_eq!(status_with_key(port, "key-before-rotation"), Some(200));
    assert_eq!(status_with_key(port, "key-after-rotation"), Some(401));
    std::fs::write(&file, "key-after-rotation\n").unwrap();
    let rc = Command::new("kill")
        .args(["-HUP", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(rc.success());
    let start = Instant::now();
    while status_with_key(port, "key-after-rotation") != Some(200) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "SIGHUP did not reload the keys"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        server.child.try_wait().unwrap(),
        None,
        "SIGHUP ended the server"
    );
    // Within the grace, the old key still works; then it is refused.
    assert_eq!(status_with_key(port, "key-before-rotation"), Some(200));
    while status_with_key(port, "key-before-rotation") != Some(401) {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the old key outlived its grace"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(status_with_key(port, "key-after-rotation"), Some(200));
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
}

/// `--port 0`: the server listens on a port the system picks, and its `listening` log line
/// names it.
#[test]
fn port_zero_listens_on_a_free_port_and_names_it() {
    let mut server = ServerProcess::spawn(&[], Stdio::inherit());
    let port = server
        .port(Duration::from_secs(60))
        .expect("a listening line");
    assert_ne!(
        port, 0,
        "the listening line names the port bound: {:?}",
        server.logs
    );
    assert_eq!(wait_healthy(&mut server, Duration::from_secs(60)), port);
}

/// A test that fails while its server runs leaves no server behind: one left running would
/// hold the test runner's output open, and keep whatever reads it waiting.
#[test]
fn a_failed_test_leaves_no_server_running() {
    let pid = std::sync::Mutex::new(None);
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (server, _) = serve(&[]);
        *pid.lock().unwrap() = Some(server.child.id());
        panic!("a deliberate failure, with the server running (the test checks what it leaves)");
    }));
    assert!(failed.is_err());
    let pid = pid.into_inner().unwrap().expect("the server started");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "server {pid} still running after the test failed"
    );
}

/// SIGTERM while the model is still warming up: the server waits for the forward pass under
/// way (within the shutdown timeout) and exits cleanly, instead of tearing libtorch down under
/// it (a crash at exit: SIGSEGV, or an abort on a corrupted heap).
#[test]
fn sigterm_during_the_warm_up_exits_cleanly() {
    // A warm-up of seconds (about 10 on 2 cores), so that the signal lands in it on a faster
    // machine too, and a shutdown timeout longer than that.
    let args = [
        "--warmup-iterations",
        "24",
        "--shutdown-timeout-secs",
        "120",
    ];
    let mut server = ServerProcess::spawn(&args, Stdio::inherit());
    let port = server
        .port(Duration::from_secs(60))
        .expect("a listening line");
    // Once /health answers, the signal handlers are in place; 503: still starting.
    let start = Instant::now();
    while get(port, "/health").is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "/health never answered"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // The model loads in a fraction of a second; the warm-up takes seconds.
    std::thread::sleep(Duration::from_secs(1));
    let (status, health) = get(port, "/health").unwrap();
    assert_eq!(status, 503, "warmed up before the signal: {health}");
    sigterm(&server.child);
    let status = wait_exit(&mut server.child, Duration::from_secs(120));
    assert!(
        status.success(),
        "exit status after SIGTERM in the warm-up: {status}"
    );
    let logs = server.logs();
    assert!(logs.iter().any(|l| l.contains("stopped")), "{logs:?}");
}
