//! The deny-all WASI context for components that import WASI (componentize-py, jco, ...).
//!
//! No preopened directories (every `open` fails inside the guest), no environment variables,
//! no arguments, no stdin, TCP/UDP/name lookup disabled and every socket address refused.
//! Clocks and random are allowed. stdout/stderr become lines in the daemon's log, tagged
//! with the plugin's slot, at most [`OUTPUT_CAP`] bytes per instance.

use bytes::Bytes;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder};

/// Most bytes of stdout+stderr one instance may log; the rest is dropped (and said so once).
pub const OUTPUT_CAP: usize = 1 << 20;

/// A WASI context that grants nothing but clocks, random and logged stdout/stderr.
pub(crate) fn deny_all(slot: &Arc<str>) -> WasiCtx {
    let budget = Arc::new(Mutex::new(OUTPUT_CAP));
    let mut b = WasiCtxBuilder::new();
    b.stdout(LogStream::new(slot.clone(), "stdout", budget.clone()))
        .stderr(LogStream::new(slot.clone(), "stderr", budget))
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .socket_addr_check(|_, _| Box::pin(async { false }));
    b.build()
}

#[derive(Clone)]
struct LogStream {
    slot: Arc<str>,
    name: &'static str,
    line: Arc<Mutex<Vec<u8>>>,
    budget: Arc<Mutex<usize>>,
}

impl LogStream {
    fn new(slot: Arc<str>, name: &'static str, budget: Arc<Mutex<usize>>) -> Self {
        LogStream {
            slot,
            name,
            line: Arc::default(),
            budget,
        }
    }

    fn take(&self, bytes: &[u8]) {
        let allowed = {
            let mut left = self.budget.lock().unwrap_or_else(|p| p.into_inner());
            if *left == 0 {
                return;
            }
            let n = bytes.len().min(*left);
            *left -= n;
            if *left == 0 {
                tracing::warn!(plugin = %self.slot, stream = self.name, "plugin output cap reached; dropping further output of this instance");
            }
            n
        };
        let mut line = self.line.lock().unwrap_or_else(|p| p.into_inner());
        for &b in &bytes[..allowed] {
            if b == b'\n' || line.len() >= 4096 {
                self.emit(&line);
                line.clear();
                if b == b'\n' {
                    continue;
                }
            }
            line.push(b);
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        // Lines end at `\n`; any other control character (`\r`, escapes) is escaped so the
        // plugin's output never forges or rewrites a log line.
        let text = super::bindings::escape_controls(text.trim_end());
        tracing::info!(plugin = %self.slot, stream = self.name, "{text}");
    }
}

impl Drop for LogStream {
    fn drop(&mut self) {
        // The last clone flushes a partial line.
        if Arc::strong_count(&self.line) == 1 {
            let line = self.line.lock().unwrap_or_else(|p| p.into_inner());
            if !line.is_empty() {
                self.emit(&line);
            }
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.take(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.take(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
