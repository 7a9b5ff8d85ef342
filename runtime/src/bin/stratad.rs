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
    /// Check this config file (unknown keys and bad values are named with their line) and
    /// exit without starting: 0 when the daemon would run with it.
    #[arg(long, value_name = "FILE", conflicts_with = "config")]
    check_config: Option<PathBuf>,
    /// Write man pages and shell completions under this directory and exit.
    #[arg(long, value_name = "DIR", hide = true)]
    generate_docs: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(dir) = &args.generate_docs {
        use clap::CommandFactory;
        return strata_runtime::docs::generate(Args::command().name("stratad"), dir);
    }
    if let Some(p) = &args.check_config {
        match Config::load(p) {
            Ok(_) => {
                println!("config {}: ok", p.display());
                return Ok(());
            }
            Err(e) => {
                eprintln!("{e}");
                std::process::exit(1);
            }
        }
    }
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
    let mut directive = std::env::var("STRATA_LOG").unwrap_or_else(|_| cfg.log.clone());
    if !directive.contains("fuser") {
        // fuser reports unimplemented requests the kernel then stops sending (create: the
        // kernel falls back to mknod + open, which gets passthrough) and a second unmount
        // of a filesystem the daemon already unmounted: noise, unless asked for
        directive.push_str(",fuser=off");
    }
    let filter = tracing_subscriber::EnvFilter::new(&directive);
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(cfg.limits.max_blocking_threads)
        .enable_all()
        .build()?;
    rt.block_on(strata_runtime::api::server::run(cfg))
}

/// A managed filesystem holds a descriptor per object the kernel knows: take the hard limit
/// of open files, not the soft one (often 1024).
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    if l.current != l.maximum {
        let new = Rlimit {
            current: l.maximum,
            maximum: l.maximum,
        };
        if let Err(e) = setrlimit(Resource::Nofile, new) {
            eprintln!("stratad: cannot raise the open-file limit: {e}");
        }
    }
}
