//! The real binary as a user runs it: start-up on the exported model, the healthcheck
//! subcommand, SIGTERM, and start-up errors.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const BIN: &str = env!("CARGO_BIN_EXE_tch-serve");

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn spawn(port: u16, extra: &[&str]) -> Child {
    Command::new(BIN)
        .args([
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            &port.to_string(),
            // Tests run in parallel: no fixed gRPC port.
            "--grpc-port",
            "0",
            "--model-dir",
        ])
        .arg(model_dir())
        .args(extra)
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
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

fn wait_healthy(port: u16, child: &mut Child, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        if let Some((200, _)) = get(port, "/health") {
            return start.elapsed();
        }
        if let Ok(Some(status)) = child.try_wait() {
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
    let port = free_port();
    let mut child = spawn(port, &["--log-format", "json"]);
    // Drain the log pipe as the server writes, so it never blocks on a full pipe.
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let logs = std::thread::spawn(move || {
        stdout
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    let took = wait_healthy(port, &mut child, Duration::from_secs(60));
    println!(
        "STARTUP: healthy {:.0} ms after spawn",
        took.as_secs_f64() * 1000.0
    );
    let (_, health) = get(port, "/health").unwrap();
    assert_eq!(health["model"], "resnet18");
    assert_eq!(health["device"], "cpu");
    assert_eq!(health["trained"], false);
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

    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(30));
    assert!(status.success(), "exit status after SIGTERM: {status}");
    // JSON logs: one object per line, with the startup and shutdown events.
    let lines: Vec<serde_json::Value> = logs
        .join()
        .unwrap()
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
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "--port",
            &port.to_string(),
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
        let port = free_port();
        let mut child = Command::new(BIN)
            .args(["--port", &port.to_string(), "--grpc-port", "0"])
            .args([
                "--device",
                "cpu",
                "--precision",
                "bf16",
                "--warmup-iterations",
                "0",
            ])
            .args(extra)
            .arg("--model-dir")
            .arg(model_dir())
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        // Either it exits (refused), or it serves /live: then it is stopped.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                return (Some(status.success()), err);
            }
            if matches!(get(port, "/health"), Some((200, _)))
                || std::time::Instant::now() > deadline
            {
                child.kill().unwrap();
                child.wait().unwrap();
                return (None, String::new());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
    let port = free_port();
    let mut child = spawn(
        port,
        &[
            "--api-key-file",
            file.to_str().unwrap(),
            "--api-key-file-poll-secs",
            "0",
            "--api-key-rotation-grace-secs",
            "2",
        ],
    );
    wait_healthy(port, &mut child, Duration::from_secs(60));
    assert_eq!(status_with_key(port, "key-before-rotation"), Some(200));
    assert_eq!(status_with_key(port, "key-after-rotation"), Some(401));
    std::fs::write(&file, "key-after-rotation\n").unwrap();
    let rc = Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
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
    assert_eq!(child.try_wait().unwrap(), None, "SIGHUP ended the server");
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
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).success());
}
