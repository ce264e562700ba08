//! Serving the API on a socket, and draining on shutdown.

use std::future::{Future, IntoFuture};
use std::io::{self, Write};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::cli::Args;
use crate::http::router;
use crate::runner::Runner;

/// How a server stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drained {
    /// Every request in progress finished.
    Complete,
    /// The drain timeout ran out with requests still in progress.
    TimedOut,
}

/// A listener that holds at most `max` connections open at once: a connection accepted
/// beyond is closed at once, unread (the peer sees the connection closed before any
/// answer), and counted.
struct LimitedListener {
    inner: TcpListener,
    slots: Arc<Semaphore>,
    max: usize,
    runner: Runner,
}

/// A connection, holding one of its listener's slots until closed.
struct LimitedConnection {
    stream: TcpStream,
    _slot: OwnedSemaphorePermit,
}

impl AsyncRead for LimitedConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for LimitedConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl axum::serve::Listener for LimitedListener {
    type Io = LimitedConnection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = axum::serve::Listener::accept(&mut self.inner).await;
            match Arc::clone(&self.slots).try_acquire_owned() {
                Ok(slot) => return (LimitedConnection { stream, _slot: slot }, addr),
                Err(_) => {
                    log::warn!("closing a connection from {addr}: {} connections open already", self.max);
                    self.runner.count_refused_connection();
                    drop(stream);
                }
            }
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves `runner`'s API on `listener` until `shutdown` completes, then drains: marks the
/// runner as draining, stops accepting connections, lets the requests in progress finish
/// (closing idle connections), and returns once they have, inferences whose client went
/// away included, or once `drain_timeout` has passed since `shutdown`.
///
/// At most [`RunnerConfig::max_connections`](crate::runner::RunnerConfig::max_connections)
/// connections are open at once; one more is closed as soon as it is accepted.
pub async fn serve<F>(
    listener: TcpListener,
    runner: Runner,
    shutdown: F,
    drain_timeout: Duration,
) -> io::Result<Drained>
where
    F: Future<Output = ()> + Send + 'static,
{
    let drain_started = Arc::new(Notify::new());
    let signal = {
        let runner = runner.clone();
        let drain_started = Arc::clone(&drain_started);
        async move {
            shutdown.await;
            log::info!(
                "draining: {} request(s) in progress, stopping within {} ms",
                runner.in_flight(),
                drain_timeout.as_millis()
            );
            runner.start_draining();
            drain_started.notify_one();
        }
    };
    let max =
        usize::try_from(runner.config().max_connections).unwrap_or(usize::MAX).min(Semaphore::MAX_PERMITS);
    let listener = LimitedListener {
        inner: listener,
        slots: Arc::new(Semaphore::new(max)),
        max,
        runner: runner.clone(),
    };
    let server = axum::serve(listener, router(runner.clone())).with_graceful_shutdown(signal).into_future();
    // The connections are closed; inferences whose client went away may still run.
    let drained = async {
        server.await?;
        while runner.in_flight() > 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        io::Result::Ok(())
    };
    let deadline = async {
        drain_started.notified().await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        result = drained => result.map(|()| Drained::Complete),
        () = deadline => Ok(Drained::TimedOut),
    }
}

/// Waits for SIGTERM or SIGINT. Registers for both at once, when called, so that a signal
/// arriving before the future is polled still counts.
pub fn termination_signal() -> io::Result<impl Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => log::info!("got SIGTERM"),
                _ = int.recv() => log::info!("got SIGINT"),
            }
        })
    }
    #[cfg(not(unix))]
    {
        Ok(async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                log::error!("cannot wait for ctrl-c: {e}");
                std::future::pending::<()>().await;
            }
        })
    }
}

/// The whole program: binds `--listen`, prints `listening on ADDR` to stdout, serves until
/// SIGTERM/SIGINT, advertises draining for `--drain-grace-ms` while still serving, drains. A second signal during the drain exits the process at once with
/// status 130.
pub async fn run(args: Args) -> io::Result<Drained> {
    // The backend first: a missing models directory or GPU fails the start, before listening.
    let backend = {
        let opening = args.clone();
        match tokio::task::spawn_blocking(move || opening.backend()).await {
            Ok(Ok(backend)) => backend,
            Ok(Err(e)) => {
                return Err(io::Error::other(format!("cannot start the {} backend: {e}", args.backend)))
            }
            Err(e) => {
                return Err(io::Error::other(format!("cannot start the {} backend: {e}", args.backend)))
            }
        }
    };
    let listener = TcpListener::bind(args.listen).await?;
    let bound = listener.local_addr()?;
    let runner = Runner::new(args.runner_config(bound), backend);
    // Signal handlers go in before anyone can learn the port, so no SIGTERM is missed.
    let first = termination_signal()?;
    let grace = args.drain_grace();
    let draining = runner.clone();
    let shutdown = async move {
        first.await;
        match termination_signal() {
            Ok(second) => {
                tokio::spawn(async move {
                    second.await;
                    log::warn!("second signal: exiting without finishing the drain");
                    std::process::exit(130);
                });
            }
            Err(e) => log::warn!("cannot watch for a second signal: {e}"),
        }
        // Tell routers first (no hints, /healthz 503, `draining: true`), keep serving what
        // they still send, then stop accepting connections.
        draining.start_draining();
        if !grace.is_zero() {
            log::info!("draining: still serving for {} ms so routers can stop sending", grace.as_millis());
            tokio::time::sleep(grace).await;
        }
    };
    log::info!(
        "runner {} serving with capacity {}, max concurrency {}, max queue {}, max connections {}, \
         memory budget {}, backend {}, queue {}",
        runner.advertise(),
        runner.config().capacity,
        runner.config().max_concurrency,
        runner.config().max_queue,
        runner.config().max_connections,
        runner.config().memory_budget_bytes.map_or("none".to_string(), |b| format!("{b} bytes")),
        args.backend.name(),
        runner.queue().map_or("off".to_string(), |queue| format!(
            "token {} (jobs kept {} s, at most {} finished)",
            hint_router_core::queue::format_token(queue.token()),
            queue.config().job_ttl.as_secs(),
            queue.config().max_finished_jobs
        ))
    );
    {
        let mut stdout = io::stdout().lock();
        writeln!(stdout, "listening on {bound}")?;
        stdout.flush()?;
    }
    let drained = serve(listener, runner, shutdown, args.drain_timeout()).await?;
    match drained {
        Drained::Complete => log::info!("drained, exiting"),
        Drained::TimedOut => log::warn!("drain timed out, exiting with requests in progress"),
    }
    Ok(drained)
}
