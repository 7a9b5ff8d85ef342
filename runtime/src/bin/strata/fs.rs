//! `strata fs …`: managed filesystems.

use anyhow::bail;
use clap::Subcommand;
use std::path::{Path, PathBuf};
use strata_runtime::api::client::Client;
use strata_runtime::api::{Reply, Request};

/// `strata fs …`.
#[derive(Subcommand)]
pub enum FsCmd {
    /// Serve BACKING (a directory on a real filesystem) at MOUNTPOINT as a managed
    /// filesystem whose operations raise DMAPI events.
    Mount {
        /// Backing directory.
        backing: PathBuf,
        /// Mount point (an existing directory).
        mountpoint: PathBuf,
        /// Mount read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Unmount (PREUNMOUNT and UNMOUNT events on the way).
    Umount {
        /// Mount point or backing directory.
        target: PathBuf,
        /// Detach even if files are open (lazy unmount).
        #[arg(long)]
        force: bool,
    },
    /// Managed filesystems, mounted or known.
    List,
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// Run a `strata fs` command.
pub fn fs(client: &mut Client, c: &FsCmd) -> anyhow::Result<()> {
    match c {
        FsCmd::Mount {
            backing,
            mountpoint,
            read_only,
        } => {
            let req = Request::FsMount {
                backing: abs(backing)?,
                mountpoint: abs(mountpoint)?,
                read_only: *read_only,
            };
            match client.request(&req, b"")? {
                Reply::Mounted(m) => println!(
                    "mounted {} at {} (fs {}, {}{})",
                    m.backing.display(),
                    m.mountpoint
                        .map(|p| p.display().to_string())
                        .unwrap_or_default(),
                    m.fs,
                    if m.passthrough {
                        "kernel passthrough for unmanaged files"
                    } else {
                        "no kernel passthrough"
                    },
                    if m.read_only { ", read-only" } else { "" }
                ),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        FsCmd::Umount { target, force } => {
            let req = Request::FsUmount {
                target: abs(target)?,
                force: *force,
            };
            match client.request(&req, b"")? {
                Reply::Unmounted => println!("unmounted {}", target.display()),
                other => bail!("unexpected reply {other:?}"),
            }
        }
        FsCmd::List => match client.request(&Request::FsList, b"")? {
            Reply::Filesystems(list) => {
                println!(
                    "{:>4}  {:<40}  {:<30}  flags",
                    "fs", "backing", "mounted at"
                );
                for m in list {
                    println!(
                        "{:>4}  {:<40}  {:<30}  {}{}",
                        m.fs,
                        m.backing.display(),
                        m.mountpoint
                            .map(|p| p.display().to_string())
                            .unwrap_or_else(|| "-".into()),
                        if m.passthrough { "passthrough " } else { "" },
                        if m.read_only { "ro" } else { "" }
                    );
                }
            }
            other => bail!("unexpected reply {other:?}"),
        },
    }
    Ok(())
}
