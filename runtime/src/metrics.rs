//! Prometheus metrics (off by default; `[metrics] enabled = true`, served on
//! `listen`, loopback by default): the `metrics` facade in every part of the daemon and
//! `metrics-exporter-prometheus` serving `GET /metrics`. Labels take values from fixed
//! sets only (operations, results, event types, reasons, slot names an administrator
//! chose): never a chunk, space or file name. When metrics are off, recording is a no-op.
//!
//! Series (all prefixed `strata_`):
//!
//! | series | type | labels |
//! |---|---|---|
//! | `requests_total` | counter | `op`, `result` (ok, error) |
//! | `request_seconds` | histogram | `op` |
//! | `connections_refused_total` | counter | `reason` |
//! | `connections_open` | gauge | |
//! | `spaces`, `shm_bytes`, `durable_bytes`, `chunks`, `lease_buffer_bytes` | gauge (host totals, against `[spaces]` quotas) | |
//! | `durable_commit_seconds`, `durable_commit_records` | histogram (group commits) | |
//! | `plugin_calls_total` | counter | `slot`, `result` (ok, trap, timeout, memory, malformed, plugin-error) |
//! | `plugin_rollbacks_total` | counter | `slot` |
//! | `dm_events_total` | counter | `type` |
//! | `dm_event_answer_seconds` | histogram (synchronous events) | `type` |
//! | `dm_sessions` | gauge | |

use crate::api::Request;
use serde::{Deserialize, Serialize};

/// `[metrics]` of the config.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve `GET /metrics`.
    pub enabled: bool,
    /// Where (`host:port`).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            enabled: false,
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl MetricsConfig {
    /// The listen address, checked.
    pub fn addr(&self) -> anyhow::Result<std::net::SocketAddr> {
        self.listen.parse().map_err(|e| {
            anyhow::anyhow!(
                "metrics.listen {:?} is not an address and port: {e}",
                self.listen
            )
        })
    }
}

/// Latency buckets (seconds): 10 µs to 10 s.
const SECONDS: &[f64] = &[
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0,
];
/// Batch-size buckets (records per commit).
const RECORDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

/// Start serving metrics (in the daemon's tokio runtime), if enabled.
pub fn install(cfg: &MetricsConfig) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    if !cfg.enabled {
        return Ok(());
    }
    let addr = cfg.addr()?;
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)?
        .set_buckets_for_metric(Matcher::Suffix("_records".into()), RECORDS)?
        .build()
        .map_err(|e| anyhow::anyhow!("metrics on {addr}: {e}"))?;
    metrics::set_global_recorder(recorder).map_err(|e| anyhow::anyhow!("metrics recorder: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!("the metrics endpoint stopped: {e:?}");
        }
    });
    tracing::info!(%addr, "metrics served on http://{addr}/metrics");
    Ok(())
}

/// The `op` label of a request: one of a fixed set.
pub fn op_label(req: &Request) -> &'static str {
    use strata_client::SpaceRequest as S;
    match req {
        Request::Status => "status",
        Request::PluginLoad { .. } => "plugin-load",
        Request::PluginSwap { .. } => "plugin-swap",
        Request::PluginRollback { .. } => "plugin-rollback",
        Request::PluginUnload { .. } => "plugin-unload",
        Request::PluginList => "plugin-list",
        Request::PluginState { .. } => "plugin-state",
        Request::Place { .. } => "place",
        Request::Rebalance { .. } => "rebalance",
        Request::Dm(_) => "dm",
        Request::FsMount { .. } => "fs-mount",
        Request::FsUmount { .. } => "fs-umount",
        Request::FsList => "fs-list",
        Request::DmAttach { .. } => "dm-attach",
        Request::DmDetach { .. } => "dm-detach",
        Request::DmAttachments => "dm-attachments",
        Request::Space(s) => match s {
            S::Create { .. } => "space-create",
            S::Join { .. } => "space-join",
            S::Unjoin { .. } => "space-unjoin",
            S::Hosts { .. } => "space-hosts",
            S::Chunks { .. } => "space-chunks",
            S::Cache { .. } => "space-cache",
            S::Spawn { .. } => "space-spawn",
            S::Read { .. } => "chunk-read",
            S::Wait { .. } => "chunk-wait",
            S::Write { .. } => "chunk-write",
            S::StartWrite { .. } => "chunk-start-write",
            S::StopWrite { .. } => "chunk-stop-write",
            S::AbortWrite { .. } => "chunk-abort-write",
            S::Invalidate { .. } => "chunk-invalidate",
            S::StartInvalidate { .. } => "chunk-start-invalidate",
            S::StopInvalidate { .. } => "chunk-stop-invalidate",
            S::Repair { .. } => "space-repair",
        },
    }
}
