//! `strata`: the admin CLI of the Strata runtime.

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use strata_runtime::api::client::{Client, ClientError};
use strata_runtime::api::{cache_word, Reply, Request};
mod dm;
mod fs;
mod spaces;

use strata_runtime::plugin::{
    ChunkRef, FailurePolicy, HostInfo, PluginKind, SlotInfo, SlotSettings,
};

/// Administer a Strata daemon.
/// `strata --generate-docs DIR` (hidden, for packaging): man pages and completions.
fn docs_dir() -> Option<PathBuf> {
    let mut args = std::env::args_os().skip(1);
    match (args.next(), args.next(), args.next()) {
        (Some(flag), Some(dir), None) if flag == "--generate-docs" => Some(PathBuf::from(dir)),
        _ => None,
    }
}

#[derive(Parser)]
#[command(version)]
struct Cli {
    /// The daemon's socket.
    #[arg(
        long,
        env = "STRATA_SOCKET",
        default_value = "/run/strata/stratad.sock",
        global = true
    )]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Daemon version and uptime.
    Status,
    /// Manage plugin slots.
    #[command(subcommand)]
    Plugin(PluginCmd),
    /// Chunk spaces: create, join, unjoin, hosts, chunk lists, cache, repair.
    #[command(subcommand)]
    Space(spaces::SpaceCmd),
    /// Chunks: read, write, wait, invalidate.
    #[command(subcommand)]
    Chunk(spaces::ChunkCmd),
    /// DMAPI: sessions, events, respond, DM attributes, regions, holes.
    #[command(subcommand)]
    Dm(dm::DmCmd),
    /// Managed filesystems: mount, umount, list.
    #[command(subcommand)]
    Fs(fs::FsCmd),
    /// Start an allow-listed program on a host of a space, as you.
    Spawn {
        /// Space.
        space: String,
        /// Host (from `strata space hosts`).
        host: String,
        /// Program (absolute path, allow-listed in the daemon's config).
        program: String,
        /// Its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Ask a placement slot to order hosts for a chunk.
    Place {
        /// Placement slot.
        slot: String,
        /// Space name.
        space: String,
        /// Chunk name.
        chunk: String,
        /// Chunk size in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        size: u64,
        /// A candidate host: ID:FREE_BYTES[:CAPACITY_BYTES]; repeat for each host.
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
    },
}

#[derive(clap::Args, Clone)]
struct SettingsArgs {
    /// Config text handed to the plugin's init.
    #[arg(long, conflicts_with = "config_file")]
    config: Option<String>,
    /// File whose text is handed to the plugin's init.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Per-call deadline in milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Memory cap per instance in bytes.
    #[arg(long)]
    memory_limit: Option<usize>,
    /// Failure policy of a hook: HOOK=continue|builtin|abort|abort:ERRNO; repeatable.
    #[arg(long = "on-failure")]
    on_failure: Vec<String>,
    /// Calls a version serves before auto-rollback judges it.
    #[arg(long)]
    rollback_min_calls: Option<u64>,
    /// Failure rate (0..1) above which a version is rolled back.
    #[arg(long)]
    rollback_max_rate: Option<f64>,
}

impl SettingsArgs {
    fn any(&self) -> bool {
        self.config.is_some()
            || self.config_file.is_some()
            || self.deadline_ms.is_some()
            || self.memory_limit.is_some()
            || !self.on_failure.is_empty()
            || self.rollback_min_calls.is_some()
            || self.rollback_max_rate.is_some()
    }

    fn apply(&self, mut s: SlotSettings) -> anyhow::Result<SlotSettings> {
        if let Some(c) = &self.config {
            s.config = c.clone();
        }
        if let Some(f) = &self.config_file {
            s.config =
                std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        }
        if let Some(d) = self.deadline_ms {
            s.deadline_ms = d;
        }
        if let Some(m) = self.memory_limit {
            s.memory_limit = m;
        }
        for spec in &self.on_failure {
            let (hook, policy) = spec
                .split_once('=')
                .context("--on-failure takes HOOK=POLICY")?;
            let p: FailurePolicy = policy.parse().map_err(anyhow::Error::msg)?;
            s.on_failure.insert(hook.to_string(), p);
        }
        if let Some(n) = self.rollback_min_calls {
            s.rollback.min_calls = n;
        }
        if let Some(r) = self.rollback_max_rate {
            s.rollback.max_failure_rate = r;
        }
        Ok(s)
    }
}

#[derive(Subcommand)]
enum PluginCmd {
    /// Load a component into a new slot.
    Load {
        /// Slot name.
        name: String,
        /// Component file (.wasm).
        file: PathBuf,
        /// World: placement or dm-policy.
        #[arg(long)]
        kind: PluginKind,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Hot-swap a new version into a slot (self-tested before the switch).
    Swap {
        /// Slot name.
        name: String,
        /// Component file (.wasm).
        file: PathBuf,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// Slots, versions and counters.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A slot's key-value state (UTF-8 values as text, others in hex).
    State {
        /// Slot name.
        name: String,
    },
    /// Go back to the previous version.
    Rollback {
        /// Slot name.
        name: String,
    },
    /// Remove a slot.
    Unload {
        /// Slot name.
        name: String,
    },
    /// Drive a placement slot with concurrent calls and report who answered (a load tool).
    Bench {
        /// Placement slot.
        slot: String,
        /// Total calls.
        #[arg(long, default_value_t = 10_000)]
        calls: u64,
        /// Concurrent clients (one connection each).
        #[arg(long, default_value_t = 4)]
        concurrency: u64,
        /// Hosts offered per call.
        #[arg(long, default_value_t = 8)]
        hosts: usize,
    },
}

fn connect(cli: &Cli) -> anyhow::Result<Client> {
    Ok(Client::connect(&cli.socket)?)
}

fn parse_host(spec: &str) -> anyhow::Result<HostInfo> {
    let mut it = spec.split(':');
    let id = it
        .next()
        .filter(|s| !s.is_empty())
        .context("host spec needs an id")?;
    let free: u64 = it
        .next()
        .context("host spec is ID:FREE[:CAPACITY]")?
        .parse()
        .context("free bytes")?;
    let capacity: u64 = match it.next() {
        Some(c) => c.parse().context("capacity bytes")?,
        None => free,
    };
    if it.next().is_some() {
        bail!("host spec is ID:FREE[:CAPACITY]");
    }
    Ok(HostInfo {
        id: id.into(),
        free_bytes: free,
        capacity_bytes: capacity,
    })
}

fn print_slots(slots: &[SlotInfo]) {
    if slots.is_empty() {
        println!("no plugins loaded");
    }
    for s in slots {
        let c = &s.current;
        println!(
            "{:<16} {:<10} v{:<3} {} {:>9} B  cache {:<4} compile {:>7.1} ms  src {}",
            s.name,
            s.kind.world(),
            c.id,
            &c.digest[..12],
            c.size,
            cache_word(c.cache),
            c.compile_ms,
            c.source
        );
        let t = &s.total;
        println!(
            "    calls {}  ok {}  traps {}  timeouts {}  memory {}  (excused {})  malformed {}  errors {}  policy {}  instances {}  mean {} ns  p99 < {} ns  max {} ns",
            t.calls, t.ok, t.traps, t.timeouts, t.memory_limits, t.excused, t.malformed, t.plugin_errors, t.policy_applied, t.instances, t.mean_ns, t.p99_ns_upper, t.max_ns
        );
        for h in &s.history {
            println!(
                "    earlier: v{} {} src {} (calls {})",
                h.id,
                &h.digest[..12],
                h.source,
                h.stats.calls
            );
        }
        for e in &s.events {
            println!("    event: {e}");
        }
    }
}

fn main() {
    if let Some(dir) = docs_dir() {
        use clap::CommandFactory;
        if let Err(e) = strata_runtime::docs::generate(Cli::command().name("strata"), &dir) {
            eprintln!("strata: {e:#}");
            std::process::exit(1);
        }
        return;
    }
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("strata: {e:#}");
        let code = match e.downcast_ref::<ClientError>() {
            Some(ClientError::Connect { .. }) => 3,
            Some(ClientError::Api(_)) => 2,
            _ if e.downcast_ref::<spaces::NotOk>().is_some() => 4,
            _ if e.downcast_ref::<dm::DmFailed>().is_some() => 5,
            _ => 1,
        };
        std::process::exit(code);
    }
}

fn current_settings(client: &mut Client, name: &str) -> anyhow::Result<SlotSettings> {
    match client.request(&Request::PluginList, b"")? {
        Reply::Plugins(slots) => slots
            .into_iter()
            .find(|s| s.name == name)
            .map(|s| s.settings)
            .with_context(|| format!("no plugin slot named '{name}'")),
        other => bail!("unexpected reply {other:?}"),
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    match &cli.cmd {
        Cmd::Status => {
            if let Reply::Status {
                version,
                uptime_s,
                wit,
            } = connect(cli)?.request(&Request::Status, b"")?
            {
                println!("stratad {version}, up {uptime_s} s, plugin contract strata:plugin@{wit}");
            }
        }
        Cmd::Place {
            slot,
            space,
            chunk,
            size,
            hosts,
        } => {
            let hosts = hosts
                .iter()
                .map(|h| parse_host(h))
                .collect::<anyhow::Result<Vec<_>>>()?;
            let req = Request::Place {
                slot: slot.clone(),
                chunk: ChunkRef {
                    space: space.clone(),
                    name: chunk.clone(),
                },
                size: *size,
                hosts,
            };
            if let Reply::Placed {
                hosts,
                version,
                failure,
            } = connect(cli)?.request(&req, b"")?
            {
                println!("{}", hosts.join(" "));
                match failure {
                    Some(f) => {
                        eprintln!("(version {version} failed: {f}; answered by the failure policy)")
                    }
                    None => eprintln!("(answered by version {version})"),
                }
            }
        }
        Cmd::Plugin(p) => plugin(cli, p)?,
        Cmd::Space(c) => spaces::space(&cli.socket, c)?,
        Cmd::Fs(c) => fs::fs(&mut connect(cli)?, c)?,
        Cmd::Dm(c) => dm::run(&cli.socket, c)?,
        Cmd::Chunk(c) => spaces::chunk(&cli.socket, c)?,
        Cmd::Spawn {
            space,
            host,
            program,
            args,
        } => spaces::spawn(&cli.socket, space, host, program, args)?,
    }
    Ok(())
}

fn plugin(cli: &Cli, cmd: &PluginCmd) -> anyhow::Result<()> {
    match cmd {
        PluginCmd::Load {
            name,
            file,
            kind,
            settings,
        } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let s = if settings.any() {
                Some(settings.apply(SlotSettings::default())?)
            } else {
                None
            };
            let req = Request::PluginLoad {
                name: name.clone(),
                kind: *kind,
                source: file.display().to_string(),
                settings: s,
            };
            if let Reply::Loaded(v) = connect(cli)?.request(&req, &bytes)? {
                println!(
                    "loaded {name} v{} ({} bytes, sha256 {}…, cache {}, compile {:.1} ms, self-test {:.1} ms)",
                    v.id, v.size, &v.digest[..12], cache_word(v.cache), v.compile_ms, v.selftest_ms
                );
                for n in &v.notes {
                    println!("note: {n}");
                }
            }
        }
        PluginCmd::Swap {
            name,
            file,
            settings,
        } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let mut c = connect(cli)?;
            let s = if settings.any() {
                Some(settings.apply(current_settings(&mut c, name)?)?)
            } else {
                None
            };
            let req = Request::PluginSwap {
                name: name.clone(),
                source: file.display().to_string(),
                settings: s,
            };
            if let Reply::Swapped(r) = c.request(&req, &bytes)? {
                println!(
                    "swapped {name}: v{} -> v{} (compile {:.1} ms, cache {}, self-test {:.1} ms, switch {} ns)",
                    r.from, r.to, r.compile_ms, cache_word(r.cache), r.selftest_ms, r.switch_ns
                );
                for n in &r.notes {
                    println!("note: {n}");
                }
            }
        }
        PluginCmd::List { json } => {
            if let Reply::Plugins(slots) = connect(cli)?.request(&Request::PluginList, b"")? {
                if *json {
                    println!("{}", serde_json::to_string_pretty(&slots)?);
                } else {
                    print_slots(&slots);
                }
            }
        }
        PluginCmd::State { name } => {
            // The daemon answers in pages; a value may be split over several.
            let mut c = connect(cli)?;
            let mut from = None;
            let mut value: Option<(String, Vec<u8>)> = None;
            // control characters (a newline in a value) are shown escaped: one line per key
            let printable = |t: &str| -> String {
                t.chars()
                    .flat_map(|c| {
                        let e: Vec<char> = if c.is_control() {
                            c.escape_default().collect()
                        } else {
                            vec![c]
                        };
                        e
                    })
                    .collect()
            };
            let print = |k: &str, v: &[u8]| match std::str::from_utf8(v) {
                Ok(text) => println!("{}\t{}", printable(k), printable(text)),
                Err(_) => println!(
                    "{}\t0x{}",
                    printable(k),
                    v.iter().map(|b| format!("{b:02x}")).collect::<String>()
                ),
            };
            loop {
                let req = Request::PluginState {
                    name: name.clone(),
                    from: from.take(),
                };
                let Reply::State(page) = c.request(&req, b"")? else {
                    bail!("unexpected reply to plugin-state");
                };
                for part in page.parts {
                    match &mut value {
                        Some((k, v)) if *k == part.key && part.offset > 0 => {
                            v.extend_from_slice(&part.data)
                        }
                        _ => {
                            if let Some((k, v)) = value.take() {
                                print(&k, &v);
                            }
                            value = Some((part.key, part.data));
                        }
                    }
                }
                match page.next {
                    Some(n) => from = Some(n),
                    None => break,
                }
            }
            if let Some((k, v)) = value {
                print(&k, &v);
            }
        }
        PluginCmd::Rollback { name } => {
            if let Reply::RolledBack { from, to } =
                connect(cli)?.request(&Request::PluginRollback { name: name.clone() }, b"")?
            {
                println!("rolled back {name}: v{from} -> v{to}");
            }
        }
        PluginCmd::Unload { name } => {
            connect(cli)?.request(&Request::PluginUnload { name: name.clone() }, b"")?;
            println!("unloaded {name}");
        }
        PluginCmd::Bench {
            slot,
            calls,
            concurrency,
            hosts,
        } => bench(cli, slot, *calls, *concurrency, *hosts)?,
    }
    Ok(())
}

/// What one bench worker saw: calls per version, answers by policy, refusals, longest call.
type Tally = (std::collections::BTreeMap<u64, u64>, u64, u64, Duration);

/// Concurrent `place` calls; prints how many each version answered and the latency.
fn bench(cli: &Cli, slot: &str, calls: u64, concurrency: u64, nhosts: usize) -> anyhow::Result<()> {
    use std::collections::BTreeMap;
    let hosts: Vec<HostInfo> = (0..nhosts)
        .map(|i| HostInfo {
            id: format!("host-{i}"),
            free_bytes: (i as u64 + 1) << 30,
            capacity_bytes: 64 << 30,
        })
        .collect();
    let concurrency = concurrency.max(1);
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<Tally>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..concurrency)
            .map(|w| {
                let hosts = hosts.clone();
                sc.spawn(move || -> anyhow::Result<_> {
                    let mut c = connect(cli)?;
                    let mut per_version = BTreeMap::new();
                    let (mut policy, mut errors, mut worst) = (0u64, 0u64, Duration::ZERO);
                    let mine = calls / concurrency + u64::from(w < calls % concurrency);
                    for i in 0..mine {
                        let req = Request::Place {
                            slot: slot.to_string(),
                            chunk: ChunkRef {
                                space: "bench".into(),
                                name: format!("chunk-{w}-{i}"),
                            },
                            size: 1 << 20,
                            hosts: hosts.clone(),
                        };
                        let t = Instant::now();
                        match c.request(&req, b"") {
                            Ok(Reply::Placed {
                                version, failure, ..
                            }) => {
                                *per_version.entry(version).or_insert(0) += 1;
                                policy += u64::from(failure.is_some());
                            }
                            Ok(_) | Err(ClientError::Api(_)) => errors += 1,
                            Err(e) => return Err(e.into()),
                        }
                        worst = worst.max(t.elapsed());
                    }
                    Ok((per_version, policy, errors, worst))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
            })
            .collect()
    });
    let elapsed = t0.elapsed();
    let mut per_version = BTreeMap::new();
    let (mut policy, mut errors, mut worst) = (0, 0, Duration::ZERO);
    for r in results {
        let (pv, p, e, w) = r?;
        for (v, n) in pv {
            *per_version.entry(v).or_insert(0u64) += n;
        }
        policy += p;
        errors += e;
        worst = worst.max(w);
    }
    let answered: u64 = per_version.values().sum();
    println!(
        "{answered} of {calls} calls answered ({errors} refused) in {:.2} s: {:.0} calls/s, longest {:.2} ms",
        elapsed.as_secs_f64(),
        calls as f64 / elapsed.as_secs_f64(),
        worst.as_secs_f64() * 1000.0
    );
    for (v, n) in &per_version {
        println!("  version {v}: {n} calls");
    }
    if policy > 0 {
        println!("  {policy} answers came from the failure policy");
    }
    Ok(())
}
