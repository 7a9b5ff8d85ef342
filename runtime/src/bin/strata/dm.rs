//! `strata dm …`: DMAPI from the shell: sessions, events and responses, DM attributes,
//! managed regions, holes. Commands that work on a file use a session given with
//! `--session`, or a short-lived one of their own.
//!
//! Exit status: 5 with the DMAPI error name (EPERM, EINVAL, ...) when a call fails.

use clap::Subcommand;
use std::path::{Path, PathBuf};
use strata_client::dm::{DmError, EventSet, EventType, Region, Response, SessionId};
use strata_client::session::DmSession;

/// A DMAPI call failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DmFailed(pub DmError);

fn dm(e: DmError) -> anyhow::Error {
    DmFailed(e).into()
}

/// `strata dm …`.
#[derive(Subcommand)]
pub enum DmCmd {
    /// Attach a dm-policy plugin slot to a managed filesystem: it gets its own session and
    /// receives the events of `--events` there (recorded: it comes back after a restart).
    Attach {
        /// The plugin slot (world dm-policy).
        slot: String,
        /// The mount point.
        path: PathBuf,
        /// Event types, comma separated (read,write,truncate,destroy,...).
        #[arg(long)]
        events: String,
    },
    /// Detach a plugin slot (its session goes).
    Detach {
        /// The plugin slot.
        slot: String,
    },
    /// Plugin slots attached to filesystems.
    Attachments,
    /// List sessions (id, info, outstanding tokens); or create / destroy one.
    Sessions {
        /// Create a session with this info string and print its id.
        #[arg(long, conflicts_with = "destroy")]
        create: Option<String>,
        /// Destroy this session.
        #[arg(long)]
        destroy: Option<SessionId>,
    },
    /// Receive events of a session (one JSON message per line). With `--dispose`, first
    /// send the filesystem at that path's events of `--events` to the session (and
    /// enable them in its event list).
    Events {
        /// Session.
        session: SessionId,
        /// Block until at least one event arrives (DM_EV_WAIT).
        #[arg(long)]
        wait: bool,
        /// At most this many.
        #[arg(long, default_value_t = 64)]
        max: u32,
        /// A path in a managed filesystem whose dispositions to set.
        #[arg(long)]
        dispose: Option<PathBuf>,
        /// Event types, comma separated (create,remove,read,...); empty: none. They replace
        /// the session's dispositions there and are added to the filesystem's event list.
        #[arg(long, default_value = "")]
        events: String,
    },
    /// Answer a synchronous event: continue, dontcare, or abort with an errno.
    Respond {
        /// Session.
        session: SessionId,
        /// The event's token.
        token: u64,
        /// continue | dontcare | abort
        answer: String,
        /// The errno of an abort.
        #[arg(default_value_t = libc::EIO)]
        errno: i32,
    },
    /// DM attributes of a file: get NAME, set NAME VALUE, rm NAME, list.
    Attr {
        /// get | set | rm | list
        action: String,
        /// The file (through the mount).
        path: PathBuf,
        /// Attribute name (exactly 8 bytes; shorter names are padded with NUL).
        name: Option<String>,
        /// Value (set).
        value: Option<String>,
        /// Use this session (default: a short-lived one).
        #[arg(long)]
        session: Option<SessionId>,
    },
    /// Managed regions of a file: get, or set OFFSET:SIZE:FLAGS ... (flags from r, w, t;
    /// `-` for none; size 0 is through EOF and beyond; no region clears them).
    Region {
        /// get | set
        action: String,
        /// The file (through the mount).
        path: PathBuf,
        /// Regions (set).
        regions: Vec<String>,
        /// Use this session.
        #[arg(long)]
        session: Option<SessionId>,
    },
    /// Holes: alloc (resident extents and holes), probe OFFSET LEN, punch OFFSET LEN
    /// (LEN 0: through EOF).
    Hole {
        /// alloc | probe | punch
        action: String,
        /// The file (through the mount).
        path: PathBuf,
        /// Offset.
        #[arg(default_value_t = 0, allow_negative_numbers = true)]
        offset: i64,
        /// Length.
        #[arg(default_value_t = 0)]
        length: u64,
        /// Use this session.
        #[arg(long)]
        session: Option<SessionId>,
    },
}

fn parse_events(s: &str) -> anyhow::Result<EventSet> {
    let mut set = EventSet::empty();
    for name in s.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let t: EventType = serde_json::from_value(serde_json::Value::String(name.to_lowercase()))
            .map_err(|_| anyhow::anyhow!("unknown event type '{name}'"))?;
        set.set(t);
    }
    Ok(set)
}

fn attr_name(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut v = s.as_bytes().to_vec();
    if v.len() > 8 {
        anyhow::bail!("attribute names are at most 8 bytes");
    }
    v.resize(8, 0);
    Ok(v)
}

fn abs(p: &Path) -> anyhow::Result<PathBuf> {
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir()?.join(p)
    })
}

/// A session for one command: the one given, or a short-lived one.
struct Scoped {
    s: DmSession,
    own: bool,
}

impl Scoped {
    fn open(socket: &Path, session: Option<SessionId>) -> anyhow::Result<Scoped> {
        Ok(match session {
            Some(sid) => Scoped {
                s: DmSession::assume(socket, sid, b"").map_err(dm)?,
                own: false,
            },
            None => Scoped {
                s: DmSession::create(socket, b"strata cli").map_err(dm)?,
                own: true,
            },
        })
    }
}

impl Drop for Scoped {
    fn drop(&mut self) {
        if self.own {
            let sid = self.s.sid();
            let _ = self
                .s
                .call(&strata_client::dm::DmRequest::DestroySession { sid }, &[]);
        }
    }
}

fn region_text(r: &Region) -> String {
    let mut f = String::new();
    for (bit, c) in [(1, 'r'), (2, 'w'), (4, 't')] {
        if r.flags & bit != 0 {
            f.push(c);
        }
    }
    if f.is_empty() {
        f.push('-');
    }
    format!("{}:{}:{f}", r.offset, r.size)
}

fn parse_region(s: &str) -> anyhow::Result<Region> {
    let parts: Vec<&str> = s.split(':').collect();
    let [o, z, f] = parts[..] else {
        anyhow::bail!("a region is OFFSET:SIZE:FLAGS, got '{s}'");
    };
    let mut flags = 0;
    for c in f.chars() {
        flags |= match c {
            'r' => 1,
            'w' => 2,
            't' => 4,
            '-' => 0,
            _ => anyhow::bail!("region flags are r, w, t or -, got '{c}'"),
        };
    }
    Ok(Region {
        offset: o.parse()?,
        size: z.parse()?,
        flags,
    })
}

/// Run a `strata dm` command.
pub fn run(socket: &Path, c: &DmCmd) -> anyhow::Result<()> {
    use strata_runtime::api::{Reply, Request};
    let client = || strata_runtime::api::client::Client::connect(socket);
    match c {
        DmCmd::Attach { slot, path, events } => {
            let req = Request::DmAttach {
                slot: slot.clone(),
                path: abs(path)?,
                events: parse_events(events)?,
            };
            match client()?.request(&req, b"")? {
                Reply::Attached { sid } => println!("{slot} attached (session {sid})"),
                other => anyhow::bail!("unexpected reply {other:?}"),
            }
        }
        DmCmd::Detach { slot } => {
            client()?.request(&Request::DmDetach { slot: slot.clone() }, b"")?;
        }
        DmCmd::Attachments => match client()?.request(&Request::DmAttachments, b"")? {
            Reply::Attachments(list) => {
                for (slot, r) in list {
                    let events: Vec<String> = r
                        .events
                        .types()
                        .iter()
                        .map(|t| {
                            serde_json::to_value(t)
                                .ok()
                                .and_then(|v| v.as_str().map(String::from))
                                .unwrap_or_default()
                        })
                        .collect();
                    println!(
                        "{slot}\t{}\tsession {}\t{}",
                        r.path.display(),
                        r.sid,
                        events.join(",")
                    );
                }
            }
            other => anyhow::bail!("unexpected reply {other:?}"),
        },
        DmCmd::Sessions { create, destroy } => {
            if let Some(info) = create {
                let s = DmSession::create(socket, info.as_bytes()).map_err(dm)?;
                println!("{}", s.sid());
                return Ok(());
            }
            if let Some(sid) = destroy {
                let s = DmSession::assume(socket, *sid, b"").map_err(dm)?;
                s.destroy().map_err(dm)?;
                return Ok(());
            }
            let mut s = DmSession::create(socket, b"strata cli (listing)").map_err(dm)?;
            let me = s.sid();
            println!("{:>6}  {:>6}  info", "sid", "tokens");
            for sid in s.sessions().map_err(dm)? {
                if sid == me {
                    continue;
                }
                let info = s.query(sid).map_err(dm)?;
                let tokens = s.tokens_of(sid).map(|t| t.len()).unwrap_or(0);
                println!("{sid:>6}  {tokens:>6}  {}", String::from_utf8_lossy(&info));
            }
            s.destroy().map_err(dm)?;
        }
        DmCmd::Events {
            session,
            wait,
            max,
            dispose,
            events,
        } => {
            let mut s = DmSession::assume(socket, *session, b"").map_err(dm)?;
            if let Some(p) = dispose {
                let set = parse_events(events)?;
                let fs = s.path_to_fshandle(abs(p)?).map_err(dm)?;
                let (mount, rest): (Vec<EventType>, Vec<EventType>) = set
                    .types()
                    .into_iter()
                    .partition(|t| *t == EventType::Mount);
                s.set_disp(&fs, EventSet::of(&rest)).map_err(dm)?;
                // the filesystem's event list is shared by its sessions: add to it
                let mut list = s.get_eventlist(&fs).map_err(dm)?;
                for t in &rest {
                    list.set(*t);
                }
                s.set_eventlist(&fs, list).map_err(dm)?;
                if !mount.is_empty() {
                    s.set_disp(&[], EventSet::of(&mount)).map_err(dm)?;
                }
                return Ok(());
            }
            match s.get_events(*max, *wait) {
                Ok(msgs) => {
                    for m in msgs {
                        println!("{}", serde_json::to_string(&m)?);
                    }
                }
                Err(DmError::Eagain) => {}
                Err(e) => return Err(dm(e)),
            }
        }
        DmCmd::Respond {
            session,
            token,
            answer,
            errno,
        } => {
            let mut s = DmSession::assume(socket, *session, b"").map_err(dm)?;
            let r = match answer.as_str() {
                "continue" => Response::Continue,
                "dontcare" => Response::Dontcare,
                "abort" => Response::Abort(*errno),
                other => anyhow::bail!("answer continue, dontcare or abort, not '{other}'"),
            };
            s.respond(*token, r).map_err(dm)?;
        }
        DmCmd::Attr {
            action,
            path,
            name,
            value,
            session,
        } => {
            let mut sc = Scoped::open(socket, *session)?;
            let s = &mut sc.s;
            let h = s.path_to_handle(abs(path)?).map_err(dm)?;
            let name = || -> anyhow::Result<Vec<u8>> {
                attr_name(
                    name.as_deref()
                        .ok_or_else(|| anyhow::anyhow!("NAME is needed"))?,
                )
            };
            match action.as_str() {
                "get" => {
                    let v = s.get_dmattr(0, &h, &name()?).map_err(dm)?;
                    println!("{}", String::from_utf8_lossy(&v));
                }
                "set" => {
                    let v = value.as_deref().unwrap_or("");
                    s.set_dmattr(0, &h, &name()?, v.as_bytes()).map_err(dm)?;
                }
                "rm" => s.remove_dmattr(0, &h, &name()?).map_err(dm)?,
                "list" => {
                    for a in s.getall_dmattr(0, &h).map_err(dm)? {
                        println!(
                            "{}\t{}",
                            String::from_utf8_lossy(&a.name).trim_end_matches('\0'),
                            String::from_utf8_lossy(&a.value)
                        );
                    }
                }
                other => anyhow::bail!("attr actions are get, set, rm, list; not '{other}'"),
            }
        }
        DmCmd::Region {
            action,
            path,
            regions,
            session,
        } => {
            let mut sc = Scoped::open(socket, *session)?;
            let s = &mut sc.s;
            let h = s.path_to_handle(abs(path)?).map_err(dm)?;
            match action.as_str() {
                "get" => {
                    for r in s.get_region(0, &h).map_err(dm)? {
                        println!("{}", region_text(&r));
                    }
                }
                "set" => {
                    let r = regions
                        .iter()
                        .map(|r| parse_region(r))
                        .collect::<anyhow::Result<Vec<_>>>()?;
                    s.set_region(0, &h, &r).map_err(dm)?;
                }
                other => anyhow::bail!("region actions are get and set; not '{other}'"),
            }
        }
        DmCmd::Hole {
            action,
            path,
            offset,
            length,
            session,
        } => {
            let mut sc = Scoped::open(socket, *session)?;
            let s = &mut sc.s;
            let h = s.path_to_handle(abs(path)?).map_err(dm)?;
            match action.as_str() {
                "alloc" => {
                    let mut at = *offset;
                    loop {
                        let (ext, more) = s.get_allocinfo(0, &h, at, 256).map_err(dm)?;
                        for e in &ext {
                            println!(
                                "{:>12} {:>12} {}",
                                e.offset,
                                e.length,
                                if e.resident { "resident" } else { "hole" }
                            );
                        }
                        match ext.last() {
                            Some(e) if more => at = (e.offset + e.length) as i64,
                            _ => break,
                        }
                    }
                }
                "probe" => {
                    let (o, l) = s.probe_hole(0, &h, *offset, *length).map_err(dm)?;
                    println!("{o} {l}");
                }
                "punch" => s.punch_hole(0, &h, *offset, *length).map_err(dm)?,
                other => anyhow::bail!("hole actions are alloc, probe, punch; not '{other}'"),
            }
        }
    }
    Ok(())
}
