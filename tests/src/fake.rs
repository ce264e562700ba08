//! A scripted, misbehaving runner for fault tests: a small threaded HTTP/1.1 server on
//! 127.0.0.1 whose `/hints` answer can be switched at run time (garbage, huge, slow, 500,
//! hanging, lying). Inference requests get a canned 200 with `x-fal-runner-hints`.
//!
//! Real runners (`runner-example`) are used wherever a well-behaved runner is needed; this
//! one exists because a real runner cannot be made to lie.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What `GET /hints` answers.
#[derive(Debug, Clone)]
pub enum HintsMode {
    /// A valid report with these hints.
    Report(Vec<String>),
    /// This status code, empty body.
    Status(u16),
    /// 200 with this raw body.
    Body(Vec<u8>),
    /// Never answer (until the mode changes or the server stops).
    Hang,
    /// Close the connection without answering.
    Close,
}

struct Shared {
    mode: Mutex<HintsMode>,
    /// Hints sent in the inference response header.
    header_hints: Mutex<String>,
    stop: AtomicBool,
    inference: AtomicU64,
    polls: AtomicU64,
    /// Close the connection after reading each inference request, without answering.
    reset_inference: AtomicBool,
    /// Status of `GET /health` and `/healthz`.
    health: AtomicU16,
}

/// The fake runner; stops on drop.
pub struct FakeRunner {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    shared: Arc<Shared>,
}

impl FakeRunner {
    /// Starts the server with `mode`.
    pub fn start(mode: HintsMode) -> FakeRunner {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let shared = Arc::new(Shared {
            mode: Mutex::new(mode),
            header_hints: Mutex::new(String::new()),
            stop: AtomicBool::new(false),
            inference: AtomicU64::new(0),
            polls: AtomicU64::new(0),
            reset_inference: AtomicBool::new(false),
            health: AtomicU16::new(200),
        });
        let (s, a) = (shared.clone(), addr.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok(c) = conn {
                    let (s, a) = (s.clone(), a.clone());
                    std::thread::spawn(move || serve(c, &s, &a));
                }
            }
        });
        FakeRunner { addr, shared }
    }

    /// Switches the `/hints` behaviour.
    pub fn set_mode(&self, mode: HintsMode) {
        *self.shared.mode.lock().expect("lock") = mode;
    }

    /// Sets the `x-fal-runner-hints` value of inference responses.
    pub fn set_header_hints(&self, v: &str) {
        *self.shared.header_hints.lock().expect("lock") = v.to_string();
    }

    /// From now on, reads each inference request, counts it, then closes the connection
    /// without answering (a runner that died while running it).
    pub fn reset_inference(&self, on: bool) {
        self.shared.reset_inference.store(on, Ordering::Relaxed);
    }

    /// Sets the status `GET /health` answers (Envoy's active health check).
    pub fn set_health_status(&self, status: u16) {
        self.shared.health.store(status, Ordering::Relaxed);
    }

    /// Inference requests served so far.
    pub fn inference_count(&self) -> u64 {
        self.shared.inference.load(Ordering::Relaxed)
    }

    /// `/hints` requests received so far.
    pub fn poll_count(&self) -> u64 {
        self.shared.polls.load(Ordering::Relaxed)
    }
}

impl Drop for FakeRunner {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(&self.addr); // wake the accept loop
    }
}

/// A valid `/hints` body for `addr`.
pub fn report_body(addr: &str, hints: &[String]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "runner": addr, "hints": hints, "capacity": 3, "in_flight": 0, "max_concurrency": 4
    }))
    .expect("json")
}

/// [`report_body`] of a runner that serves fal's queue with `token` (docs/queue.md).
pub fn queue_report_body(addr: &str, hints: &[String], token: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "runner": addr, "hints": hints, "capacity": 3, "in_flight": 0, "max_concurrency": 4,
        "queue_token": token
    }))
    .expect("json")
}

fn serve(mut c: TcpStream, s: &Shared, addr: &str) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(match c.try_clone() {
        Ok(r) => r,
        Err(_) => return,
    });
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let ok = if path == "/hints" {
            s.polls.fetch_add(1, Ordering::Relaxed);
            let mode = s.mode.lock().map(|m| m.clone()).unwrap_or(HintsMode::Status(500));
            match mode {
                HintsMode::Report(h) => respond(&mut c, 200, "", &report_body(addr, &h)),
                HintsMode::Status(code) => respond(&mut c, code, "", b""),
                HintsMode::Body(b) => respond(&mut c, 200, "", &b),
                HintsMode::Hang => {
                    while !s.stop.load(Ordering::Relaxed)
                        && matches!(*s.mode.lock().expect("lock"), HintsMode::Hang)
                    {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    false
                }
                HintsMode::Close => false,
            }
        } else if path == "/healthz" || path == "/health" {
            respond(&mut c, s.health.load(Ordering::Relaxed), "", b"ok")
        } else {
            s.inference.fetch_add(1, Ordering::Relaxed);
            if s.reset_inference.load(Ordering::Relaxed) {
                return;
            }
            let hh = s.header_hints.lock().map(|h| h.clone()).unwrap_or_default();
            respond(
                &mut c,
                200,
                &format!("x-cache: hit\r\nx-fal-runner-hints: {hh}\r\n"),
                b"{\"output\":\"fake\"}",
            )
        };
        if !ok {
            return;
        }
    }
}

fn respond(c: &mut TcpStream, status: u16, extra: &str, body: &[u8]) -> bool {
    let head = format!(
        "HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{extra}\r\n",
        body.len()
    );
    c.write_all(head.as_bytes()).is_ok() && c.write_all(body).is_ok()
}
