//! `strata space …`, `strata chunk …` and `strata spawn`: the chunk-space commands.
//!
//! Exit status: 0 when the seed status is the operation's success (for invalidate: the
//! chunk is now invalid), 4 for any other seed status (printed with its reason), 2 when the
//! daemon refused the request, 3 when it could not be reached.

use anyhow::Context;
use clap::Subcommand;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use strata_client::{
    CacheStatus, ChunkList, ChunkListStatus, Client, CreateStatus, HostsStatus, InvalidateStatus,
    JoinStatus, ReadStatus, Reason, SpaceOptions, SpawnStatus, StartWriteStatus, UnjoinStatus,
    WaitStatus, WriteStatus,
};

/// A seed status other than the operation's success.
#[derive(Debug, thiserror::Error)]
#[error("{code}{}", .reason.as_ref().map(|r| format!(": {} ({:?})", r.message, r.kind)).unwrap_or_default())]
pub struct NotOk {
    /// Seed code.
    pub code: &'static str,
    /// Why.
    pub reason: Option<Reason>,
}

fn not_ok(code: &'static str, reason: Option<Reason>) -> anyhow::Error {
    NotOk { code, reason }.into()
}

/// `strata space …`.
#[derive(Subcommand)]
pub enum SpaceCmd {
    /// Create a space on this host (CREATE_OK / CREATE_EXISTS).
    Create {
        /// Space name.
        space: String,
        /// Keep chunks in shared memory only (lost when the daemon stops).
        #[arg(long)]
        volatile: bool,
        /// Slot size = largest chunk, bytes (multiple of 4096).
        #[arg(long)]
        slot_size: Option<u64>,
        /// Cache slots.
        #[arg(long)]
        slots: Option<u32>,
        /// Permission bits, octal (default 660).
        #[arg(long, value_parser = parse_mode)]
        mode: Option<u32>,
    },
    /// Join a space that exists on HOST.
    Join {
        /// Space name.
        space: String,
        /// A host that has it.
        host: String,
    },
    /// Leave a space (durable chunks stay on disk for a later join).
    Unjoin {
        /// Space name.
        space: String,
    },
    /// The space's host list.
    Hosts {
        /// Space name.
        space: String,
    },
    /// A chunk list.
    Chunks {
        /// Space name.
        space: String,
        /// all, alpha or local.
        #[arg(long, default_value = "all", value_parser = parse_list)]
        list: ChunkList,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// The shared-memory chunk cache of a space: its region (a memfd the daemon lends) and size.
    Cache {
        /// Space name.
        space: String,
    },
    /// Check the shared-memory cache and rebuild it (needs write access to the space).
    Repair {
        /// Space name.
        space: String,
    },
}

/// `strata chunk …`.
#[derive(Subcommand)]
pub enum ChunkCmd {
    /// Read a chunk to stdout or a file (READ_OK / READ_WAITING / READ_FAIL).
    Read {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Write the bytes here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Ask the daemon even when the chunk is in the shared-memory cache.
        #[arg(long)]
        no_cache: bool,
    },
    /// Write a chunk from stdin or a file (WRITE_OK with the version).
    Write {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Read the bytes from this file ("-" or nothing: stdin).
        input: Option<PathBuf>,
        /// Write in place through a start_write lease instead of sending the bytes.
        #[arg(long)]
        lease: bool,
        /// With --lease: queue behind another writer instead of failing busy.
        #[arg(long)]
        wait: bool,
    },
    /// Wait until the chunk exists (or is newer than --after) and print it.
    Wait {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
        /// Only a version newer than this.
        #[arg(long)]
        after: Option<u64>,
        /// Give up after this many milliseconds (WAIT_FAIL).
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Write the bytes here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Invalidate a chunk (seed: WRITE_FAIL = now invalid; WRITE_OK = still valid).
    Invalidate {
        /// Space.
        space: String,
        /// Chunk.
        chunk: String,
    },
}

fn parse_mode(s: &str) -> Result<u32, String> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| format!("{s:?} is not an octal mode like 660"))
}

fn parse_list(s: &str) -> Result<ChunkList, String> {
    match s.to_ascii_lowercase().as_str() {
        "all" => Ok(ChunkList::All),
        "alpha" => Ok(ChunkList::Alpha),
        "local" => Ok(ChunkList::Local),
        _ => Err(format!("{s:?}: expected all, alpha or local")),
    }
}

fn output(path: Option<&Path>, data: &[u8]) -> anyhow::Result<()> {
    match path {
        Some(p) => std::fs::write(p, data).with_context(|| format!("cannot write {}", p.display())),
        None => {
            let mut out = std::io::stdout().lock();
            out.write_all(data)?;
            out.flush()?;
            Ok(())
        }
    }
}

fn input(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) if p != Path::new("-") => {
            std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))
        }
        _ => {
            let mut v = Vec::new();
            std::io::stdin().read_to_end(&mut v)?;
            Ok(v)
        }
    }
}

/// Run a `space` command.
pub fn space(socket: &Path, cmd: &SpaceCmd) -> anyhow::Result<()> {
    let mut c = Client::connect(socket)?;
    match cmd {
        SpaceCmd::Create {
            space,
            volatile,
            slot_size,
            slots,
            mode,
        } => {
            let opts = SpaceOptions {
                volatile: *volatile,
                slot_size: *slot_size,
                slots: *slots,
                mode: *mode,
            };
            match c.create(space, opts)? {
                CreateStatus::Ok => eprintln!("CREATE_OK"),
                CreateStatus::Exists => return Err(not_ok("CREATE_EXISTS", None)),
            }
        }
        SpaceCmd::Join { space, host } => match c.join(space, host)? {
            JoinStatus::Ok => eprintln!("JOINSPACE_OK"),
            JoinStatus::Exists => return Err(not_ok("JOINSPACE_EXISTS", None)),
            JoinStatus::Fail(r) => return Err(not_ok("JOINSPACE_FAIL", Some(r))),
        },
        SpaceCmd::Unjoin { space } => match c.unjoin(space)? {
            UnjoinStatus::Ok => eprintln!("UNJOINSPACE_OK"),
            UnjoinStatus::NoExist => return Err(not_ok("UNJOINSPACE_NOEXIST", None)),
        },
        SpaceCmd::Hosts { space } => match c.hosts(space)? {
            HostsStatus::Ok(hosts) => {
                for h in hosts {
                    println!("{h}");
                }
            }
            HostsStatus::NoExist => return Err(not_ok("SPACEGETHOSTS_NOEXIST", None)),
        },
        SpaceCmd::Chunks { space, list, json } => match c.chunks(space, *list)? {
            ChunkListStatus::Ok(entries) => {
                if *json {
                    println!("{}", serde_json::to_string_pretty(&entries)?);
                } else {
                    println!(
                        "{:<40} {:>8} {:>12} {:<6} {:<6} HOST",
                        "CHUNK", "VERSION", "BYTES", "ALPHA", "CACHED"
                    );
                    for e in entries {
                        println!(
                            "{:<40} {:>8} {:>12} {:<6} {:<6} {}",
                            e.chunk, e.version, e.len, e.alpha, e.cached, e.host
                        );
                    }
                }
            }
            ChunkListStatus::Fail(r) => return Err(not_ok("GETCHUNKLIST_FAIL", Some(r))),
        },
        SpaceCmd::Cache { space } => match c.cache(space)? {
            CacheStatus::Ok { region, size } => println!("{region} {size}"),
            CacheStatus::Fail(r) => return Err(not_ok("GETCHUNKCACHE_FAIL", Some(r))),
        },
        SpaceCmd::Repair { space } => println!("{}", c.repair(space)?),
    }
    Ok(())
}

/// Run a `chunk` command.
pub fn chunk(socket: &Path, cmd: &ChunkCmd) -> anyhow::Result<()> {
    let mut c = Client::connect(socket)?;
    match cmd {
        ChunkCmd::Read {
            space,
            chunk,
            output: out,
            no_cache,
        } => {
            c.set_use_cache(!no_cache);
            match c.read(space, chunk)? {
                ReadStatus::Ok(ch) => {
                    output(out.as_deref(), &ch.data)?;
                    eprintln!(
                        "READ_OK version {} ({} bytes{})",
                        ch.version,
                        ch.data.len(),
                        if ch.from_cache {
                            ", from the shm cache"
                        } else {
                            ""
                        }
                    );
                }
                ReadStatus::Waiting => return Err(not_ok("READ_WAITING", None)),
                ReadStatus::Fail(r) => return Err(not_ok("READ_FAIL", Some(r))),
            }
        }
        ChunkCmd::Write {
            space,
            chunk,
            input: inp,
            lease,
            wait,
        } => {
            let data = input(inp.as_deref())?;
            let st = if *lease {
                match c.start_write(space, chunk, *wait, None, false)? {
                    StartWriteStatus::Ok(mut l) => {
                        l.fill(&data)?;
                        c.stop_write(l)?
                    }
                    StartWriteStatus::Fail(r) => return Err(not_ok("STARTWRITE_FAIL", Some(r))),
                }
            } else {
                c.write(space, chunk, &data)?
            };
            match st {
                WriteStatus::Ok(v) => eprintln!("WRITE_OK version {v} ({} bytes)", data.len()),
                WriteStatus::Fail(r) => return Err(not_ok("WRITE_FAIL", Some(r))),
            }
        }
        ChunkCmd::Wait {
            space,
            chunk,
            after,
            timeout_ms,
            output: out,
        } => match c.wait(space, chunk, *after, timeout_ms.map(Duration::from_millis))? {
            WaitStatus::Ok(ch) => {
                output(out.as_deref(), &ch.data)?;
                eprintln!("WAIT_OK version {} ({} bytes)", ch.version, ch.data.len());
            }
            WaitStatus::Fail(r) => return Err(not_ok("WAIT_FAIL", Some(r))),
        },
        ChunkCmd::Invalidate { space, chunk } => match c.invalidate(space, chunk)? {
            InvalidateStatus::Invalidated => eprintln!("WRITE_FAIL (the chunk is now invalid)"),
            InvalidateStatus::StillValid { version, reason } => {
                eprintln!("the chunk is still valid at version {version}");
                return Err(not_ok("WRITE_OK", Some(reason)));
            }
        },
    }
    Ok(())
}

/// `strata spawn`.
pub fn spawn(
    socket: &Path,
    space: &str,
    host: &str,
    program: &str,
    args: &[String],
) -> anyhow::Result<()> {
    let mut c = Client::connect(socket)?;
    match c.spawn(space, host, program, args)? {
        SpawnStatus::Ok(pid) => println!("{pid}"),
        SpawnStatus::NoSpace => return Err(not_ok("SPAWNPROCESS_NOSPACE", None)),
        SpawnStatus::NoHost => return Err(not_ok("SPAWNPROCESS_NOHOST", None)),
        SpawnStatus::Fail { errno, reason } => {
            eprintln!("errno {errno}");
            return Err(not_ok("SPAWNPROCESS_FAIL", Some(reason)));
        }
    }
    Ok(())
}
