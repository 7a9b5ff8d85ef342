//! `stratad`: the Strata daemon.

use clap::Parser;
use std::path::PathBuf;
use strata_runtime::config::Config;

/// The Strata storage runtime daemon (one per host).
#[derive(Parser)]
#[command(version)]
struct Args {
    /// TOML config file (all fields optional).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Override `data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Override `socket`.
    #[arg(long)]
    socket: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cfg = match &args.config {
        Some(p) => Config::load(p)?,
        None => Config::default(),
    };
    if let Some(d) = args.data_dir {
        cfg.data_dir = d;
    }
    if let Some(s) = args.socket {
        cfg.socket = s;
    }
    cfg.check()?;
    let filter = tracing_subscriber::EnvFilter::try_from_env("STRATA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cfg.log));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(strata_runtime::api::server::run(cfg))
}
