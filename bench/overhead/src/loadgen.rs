//! An open-loop HTTP/1.1 load generator: requests leave on a fixed schedule (`rate` per
//! second, spread over `conns` keep-alive connections) whether or not earlier ones came back.
//!
//! Latency of a request runs from when it was sent until its response is read in full. When a
//! request's connection was still busy at its scheduled time, its latency runs from the
//! scheduled time instead (so queueing in the generator is not hidden: no coordinated
//! omission). A late timer on an idle connection is the generator's own delay and does not
//! count. One blocking thread per connection, `PR_SET_TIMERSLACK` 1 ns.

use crate::proc;
use anyhow::{bail, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// What an open-loop run measured.
#[derive(Debug, Clone, Serialize)]
pub struct OpenLoop {
    /// Offered rate (requests per second).
    pub rate: f64,
    /// Requests sent.
    pub sent: u64,
    /// 2xx responses.
    pub ok: u64,
    /// Failed requests (non-2xx, connection errors).
    pub errors: u64,
    /// Requests whose connection was still busy at their scheduled time.
    pub queued: u64,
    /// Latency quantiles in microseconds.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// Sends `request` (a complete HTTP/1.1 request) to `addr` at `rate` per second for `duration`.
pub fn run(
    addr: SocketAddr,
    request: &[u8],
    rate: f64,
    duration: Duration,
    conns: usize,
    cpu: Option<usize>,
) -> Result<OpenLoop> {
    if rate <= 0.0 || conns == 0 {
        bail!("rate and conns must be positive");
    }
    let mut streams = Vec::with_capacity(conns);
    for _ in 0..conns {
        streams.push(connect(addr)?);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let total = (duration.as_secs_f64() * rate).floor() as u64;
    let mut handles = Vec::with_capacity(conns);
    for (k, stream) in streams.into_iter().enumerate() {
        let request = request.to_vec();
        handles.push(std::thread::spawn(move || {
            if let Some(cpu) = cpu {
                let _ = proc::pin(0, cpu);
            }
            // SAFETY: prctl with plain integer arguments.
            unsafe {
                libc::prctl(libc::PR_SET_TIMERSLACK, 1u64, 0u64, 0u64, 0u64);
            }
            worker(addr, stream, &request, start, interval, k as u64, conns as u64, total)
        }));
    }
    // Nanoseconds to five significant digits.
    let mut lat = Histogram::<u64>::new_with_bounds(1, 1 << 50, 5).ok();
    let (mut sent, mut ok, mut errors, mut queued) = (0, 0, 0, 0);
    for h in handles {
        let w = h.join().map_err(|_| anyhow::anyhow!("load thread panicked"))?;
        if let Some(lat) = lat.as_mut() {
            for v in w.latencies_ns {
                lat.saturating_record(v);
            }
        }
        sent += w.sent;
        ok += w.ok;
        errors += w.errors;
        queued += w.queued;
    }
    let us = |q: f64| match &lat {
        Some(h) if !h.is_empty() => h.lowest_equivalent(h.value_at_quantile(q)) as f64 / 1000.0,
        _ => 0.0,
    };
    Ok(OpenLoop {
        rate,
        sent,
        ok,
        errors,
        queued,
        p50_us: us(0.5),
        p90_us: us(0.9),
        p99_us: us(0.99),
        max_us: us(1.0),
    })
}

fn connect(addr: SocketAddr) -> Result<TcpStream> {
    let s = TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

#[derive(Default)]
struct WorkerResult {
    latencies_ns: Vec<u64>,
    sent: u64,
    ok: u64,
    errors: u64,
    queued: u64,
}

#[allow(clippy::too_many_arguments)]
fn worker(
    addr: SocketAddr,
    stream: TcpStream,
    request: &[u8],
    start: Instant,
    interval: Duration,
    first: u64,
    step: u64,
    total: u64,
) -> WorkerResult {
    let mut r = WorkerResult::default();
    let mut stream = Some(stream);
    let mut buf = Vec::with_capacity(16 * 1024);
    let mut prev_done = start;
    let mut i = first;
    while i < total {
        let intended = start + interval.mul_f64(i as f64);
        i += step;
        let now = Instant::now();
        if intended > now {
            std::thread::sleep(intended - now);
        }
        let send = Instant::now();
        let from = if prev_done > intended {
            r.queued += 1;
            intended
        } else {
            send
        };
        r.sent += 1;
        let s = match stream.take() {
            Some(s) => s,
            None => match connect(addr) {
                Ok(s) => s,
                Err(_) => {
                    r.errors += 1;
                    prev_done = Instant::now();
                    continue;
                }
            },
        };
        match exchange(s, request, &mut buf) {
            Ok((s, status, keep)) => {
                let done = Instant::now();
                prev_done = done;
                if (200..300).contains(&status) {
                    r.ok += 1;
                    r.latencies_ns.push(done.duration_since(from).as_nanos() as u64);
                } else {
                    r.errors += 1;
                }
                if keep {
                    stream = Some(s);
                }
            }
            Err(_) => {
                r.errors += 1;
                prev_done = Instant::now();
            }
        }
    }
    r
}

/// Sends one request and reads one response; returns the stream, the status and whether the
/// connection stays open.
fn exchange(mut s: TcpStream, request: &[u8], buf: &mut Vec<u8>) -> Result<(TcpStream, u16, bool)> {
    s.write_all(request)?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(p) = find(buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    };
    let head = std::str::from_utf8(buf.get(..head_end).unwrap_or(&[]))?;
    let (status, len, keep) = parse_head(head)?;
    while buf.len() < head_end + len {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("connection closed in body");
        }
        buf.extend_from_slice(chunk.get(..n).unwrap_or(&[]));
    }
    Ok((s, status, keep))
}

/// Status, content length and keep-alive of a response head.
pub fn parse_head(head: &str) -> Result<(u16, usize, bool)> {
    let mut lines = head.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .context("bad status line")?;
    let (mut len, mut keep) = (0usize, true);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else { continue };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("content-length") {
            len = v.parse().context("bad content-length")?;
        } else if k.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked responses are not supported");
        } else if k.eq_ignore_ascii_case("connection") && v.eq_ignore_ascii_case("close") {
            keep = false;
        }
    }
    Ok((status, len, keep))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_heads() {
        let h = "HTTP/1.1 200 OK\r\ncontent-length: 3\r\nx: y\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), (200, 3, true));
        let h = "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n";
        assert_eq!(parse_head(h).unwrap(), (503, 0, false));
        assert!(parse_head("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head("garbage").is_err());
    }

    #[test]
    fn open_loop_against_the_upstream() {
        let up = crate::upstream::Upstream::start(1, 2, None).unwrap();
        let addr: SocketAddr = up.addrs()[0].parse().unwrap();
        let r = run(addr, b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", 2000.0, Duration::from_millis(200), 4, None)
            .unwrap();
        assert_eq!(r.sent, 400);
        assert_eq!(r.ok, 400, "{r:?}");
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us && r.p99_us <= r.max_us);
    }
}
