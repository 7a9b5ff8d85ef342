//! `strata-hostile`: a hostile local client of `stratad`, for the hardening and load tests
//! (they run it as an unprivileged uid). Loopback only: it talks to one Unix socket.
//!
//! ```text
//! strata-hostile SOCKET ROLE COUNT SECS [SLOT]
//!   idle   COUNT connections opened one after the other and held silent
//!   big    COUNT connections each announcing a 256 MiB `status` payload and sending it
//!   slow   COUNT connections sending a frame header one byte every 500 ms (slowloris)
//!   place  COUNT threads calling `place` on SLOT back to back (reconnecting if refused)
//!   load   one `plugin-load` header announcing COUNT MiB of component, no bytes sent
//! ```
//!
//! It stops after SECS seconds and prints one JSON line of what happened: how many
//! connections were admitted, refused by a limit (the daemon's error frame), closed by the
//! daemon (and after how long), calls done and their latencies.

use serde_json::{json, Value};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strata_client::frame;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        eprintln!("usage: strata-hostile SOCKET idle|big|slow|place COUNT SECS [SLOT]");
        std::process::exit(2);
    }
    let socket = PathBuf::from(&a[1]);
    let count: usize = a[3].parse().expect("COUNT");
    let secs: f64 = a[4].parse().expect("SECS");
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let out = match a[2].as_str() {
        "idle" => idle(&socket, count, until),
        "big" => big(&socket, count, until),
        "slow" => slow(&socket, count, until),
        "load" => load(&socket, count, until),
        "place" => place(
            &socket,
            count,
            until,
            a.get(5).map(String::as_str).unwrap_or("p"),
        ),
        other => {
            eprintln!("unknown role {other}");
            std::process::exit(2);
        }
    };
    println!("{out}");
}

/// What a connection the daemon closed said before closing: the error reply's kind and
/// message, if it sent one.
fn last_words(s: &mut UnixStream) -> Option<(String, String)> {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let (reply, _): (Value, Vec<u8>) = frame::read_frame(s).ok()?;
    let v = reply.get("value")?;
    Some((
        v.get("kind")?.as_str()?.to_string(),
        v.get("message")?.as_str()?.to_string(),
    ))
}

/// Whether the daemon has closed `s` (or written to it): a non-blocking peek.
fn closed_or_spoke(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: recv writes at most 1 byte into `b`, which lives across the call.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n >= 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn idle(socket: &Path, count: usize, until: Instant) -> Value {
    let t0 = Instant::now();
    let mut conns = Vec::with_capacity(count);
    let mut connect_errors = 0u64;
    for _ in 0..count {
        match UnixStream::connect(socket) {
            Ok(s) => conns.push(s),
            Err(_) => connect_errors += 1,
        }
        if Instant::now() > until {
            break;
        }
    }
    let opened_ms = t0.elapsed().as_secs_f64() * 1e3;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    let (mut open, mut refused, mut closed) = (0u64, 0u64, 0u64);
    let mut message = String::new();
    for s in &mut conns {
        if !closed_or_spoke(s) {
            open += 1;
            continue;
        }
        match last_words(s) {
            Some((kind, m)) if kind == "limit" => {
                refused += 1;
                message = m;
            }
            _ => closed += 1,
        }
    }
    json!({"role": "idle", "count": conns.len(), "connect_errors": connect_errors,
           "opened_ms": opened_ms, "open": open, "refused": refused, "closed": closed,
           "message": message})
}

fn big(socket: &Path, count: usize, until: Instant) -> Value {
    let sent_max = Arc::new(AtomicU64::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let (socket, sent_max, results) =
                (socket.to_owned(), sent_max.clone(), results.clone());
            std::thread::spawn(move || {
                let Ok(mut s) = UnixStream::connect(&socket) else {
                    results
                        .lock()
                        .unwrap()
                        .push(("connect".to_string(), String::new(), 0.0));
                    return;
                };
                let t0 = Instant::now();
                let head = frame::head(&json!({"op": "status"}), frame::MAX_PAYLOAD as usize)
                    .expect("head");
                let block = vec![0u8; 1 << 20];
                let mut sent = 0u64;
                let mut ok = s.write_all(&head).is_ok();
                let _ = s.set_write_timeout(Some(Duration::from_millis(200)));
                while ok && sent < frame::MAX_PAYLOAD && Instant::now() < until {
                    match s.write(&block) {
                        Ok(n) => sent += n as u64,
                        Err(e)
                            if e.kind() == std::io::ErrorKind::WouldBlock
                                || e.kind() == std::io::ErrorKind::TimedOut => {}
                        Err(_) => ok = false,
                    }
                }
                sent_max.fetch_max(sent, Ordering::Relaxed);
                let ms = t0.elapsed().as_secs_f64() * 1e3;
                let (kind, m) = last_words(&mut s).unwrap_or_default();
                results.lock().unwrap().push((kind, m, ms));
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let r = results.lock().unwrap();
    let answered = r.iter().filter(|(k, _, _)| !k.is_empty()).count();
    let mut ms: Vec<f64> = r.iter().map(|x| x.2).collect();
    let message = r
        .iter()
        .find(|x| !x.1.is_empty())
        .map(|x| x.1.clone())
        .unwrap_or_default();
    let kinds: Vec<String> = r.iter().map(|x| x.0.clone()).collect();
    json!({"role": "big", "count": count, "answered": answered, "kinds": kinds,
           "message": message, "sent_max": sent_max.load(Ordering::Relaxed),
           "max_ms": percentile(&mut ms, 1.0)})
}

fn slow(socket: &Path, count: usize, until: Instant) -> Value {
    // a long header (a place request), sent a byte at a time and never completed
    let hosts: Vec<Value> = (0..16)
        .map(|i| json!({"id": format!("host-{i}"), "free_bytes": 1, "capacity_bytes": 2}))
        .collect();
    let req = json!({"op": "place", "slot": "none", "chunk": {"space": "s", "name": "c"},
        "size": 1, "hosts": hosts});
    let frame = frame::encode(&req, b"").expect("frame");
    // (connection, opened at, bytes sent)
    let mut conns: Vec<(Option<UnixStream>, Instant, usize)> = Vec::new();
    let mut connect_errors = 0u64;
    for _ in 0..count {
        match UnixStream::connect(socket) {
            Ok(s) => {
                let _ = s.set_nonblocking(true);
                conns.push((Some(s), Instant::now(), 0))
            }
            Err(_) => connect_errors += 1,
        }
    }
    let (mut refused, mut cut, mut other) = (0u64, 0u64, 0u64);
    let mut cut_ms: Vec<f64> = Vec::new();
    let mut message = String::new();
    while Instant::now() < until {
        for (slot, opened, sent) in conns.iter_mut() {
            let Some(s) = slot.as_mut() else { continue };
            // never complete the frame: its last byte is never sent
            let gone = if *sent + 1 < frame.len() {
                match s.write(&frame[*sent..*sent + 1]) {
                    Ok(n) => {
                        *sent += n;
                        closed_or_spoke(s)
                    }
                    Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                }
            } else {
                closed_or_spoke(s)
            };
            if gone {
                let ms = opened.elapsed().as_secs_f64() * 1e3;
                match last_words(s) {
                    Some((k, _)) if k == "limit" => refused += 1,
                    Some((k, m)) if k == "protocol" => {
                        cut += 1;
                        cut_ms.push(ms);
                        message = m;
                    }
                    _ => other += 1,
                }
                *slot = None;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let open = conns.iter().filter(|c| c.0.is_some()).count();
    json!({"role": "slow", "count": conns.len(), "connect_errors": connect_errors,
           "refused": refused, "cut": cut, "other": other, "open": open,
           "cut_max_ms": percentile(&mut cut_ms.clone(), 1.0),
           "cut_p50_ms": percentile(&mut cut_ms, 0.5), "message": message})
}

fn load(socket: &Path, mib: usize, until: Instant) -> Value {
    let mut s = UnixStream::connect(socket).expect("connect");
    let req = json!({"op": "plugin-load", "name": "x", "kind": "placement", "source": "x",
        "settings": null});
    s.write_all(&frame::head(&req, mib << 20).expect("head"))
        .expect("send");
    let _ = s.set_read_timeout(Some(until.saturating_duration_since(Instant::now())));
    let (kind, message) = last_words(&mut s).unwrap_or_default();
    json!({"role": "load", "kind": kind, "message": message})
}

fn place(socket: &Path, count: usize, until: Instant, slot: &str) -> Value {
    let lat = Arc::new(Mutex::new(Vec::<f64>::new()));
    let (refused, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let req = json!({"op": "place", "slot": slot, "chunk": {"space": "s", "name": "c"},
        "size": 4096, "hosts": (0..8).map(|i| json!({"id": format!("h{i}"),
        "free_bytes": 1u64 << 30, "capacity_bytes": 1u64 << 31})).collect::<Vec<_>>()});
    let threads: Vec<_> = (0..count)
        .map(|_| {
            let (socket, lat, refused, errors, stop, req) = (
                socket.to_owned(),
                lat.clone(),
                refused.clone(),
                errors.clone(),
                stop.clone(),
                req.clone(),
            );
            std::thread::Builder::new()
                .stack_size(128 << 10)
                .spawn(move || {
                    let mut mine = Vec::new();
                    'conn: while Instant::now() < until && !stop.load(Ordering::Relaxed) {
                        let Ok(mut s) = UnixStream::connect(&socket) else {
                            errors.fetch_add(1, Ordering::Relaxed);
                            std::thread::sleep(Duration::from_millis(50));
                            continue;
                        };
                        let mut r = s.try_clone().expect("clone");
                        while Instant::now() < until {
                            // a call still waiting at the end is abandoned (connection closed)
                            let left = until.saturating_duration_since(Instant::now());
                            let _ = r.set_read_timeout(Some(left.max(Duration::from_millis(1))));
                            let t = Instant::now();
                            let got: Result<(Value, Vec<u8>), _> =
                                frame::exchange(&mut s, &mut r, &req, b"");
                            match got {
                                Ok((v, _)) if v["reply"] == "placed" => {
                                    mine.push(t.elapsed().as_secs_f64() * 1e3)
                                }
                                Ok((v, _)) if v["value"]["kind"] == "limit" => {
                                    // refused by the connection cap: try again in a while
                                    refused.fetch_add(1, Ordering::Relaxed);
                                    std::thread::sleep(Duration::from_millis(500));
                                    continue 'conn;
                                }
                                _ if Instant::now() >= until => break 'conn,
                                _ => {
                                    errors.fetch_add(1, Ordering::Relaxed);
                                    std::thread::sleep(Duration::from_millis(50));
                                    continue 'conn;
                                }
                            }
                        }
                    }
                    lat.lock().unwrap().extend(mine);
                })
                .expect("thread")
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
    let mut l = lat.lock().unwrap();
    let n = l.len();
    json!({"role": "place", "count": count, "calls": n,
           "p50_ms": percentile(&mut l, 0.5), "p99_ms": percentile(&mut l, 0.99),
           "refused": refused.load(Ordering::Relaxed), "errors": errors.load(Ordering::Relaxed)})
}
