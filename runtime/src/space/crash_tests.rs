//! Crash tests of the spaces shell over [`MemStorage`] (redb's crash tests are the model):
//! a script of durable operations runs with the storage failing at, or "crashing" at
//! (dropping it and every later commit), each of its commits in turn; then the spaces are
//! opened again from what was committed and checked against a model of the acknowledged
//! operations: every acknowledged operation is there with its exact bytes, nothing
//! unacknowledged shows as done, and versions never repeat.

use super::durable::{MemStorage, Storage};
use super::*;
use std::collections::BTreeMap;
use std::time::Duration;
use strata_client::SpaceOptions;

const UID: u32 = 1000;

fn cfg() -> SpaceConfig {
    SpaceConfig {
        host_id: Some("h1".into()),
        ..SpaceConfig::default()
    }
}

struct Rig {
    spaces: Spaces,
    caller: Caller,
    _dir: tempfile::TempDir,
}

fn open(storage: Arc<dyn Storage>) -> Rig {
    let dir = tempfile::tempdir().unwrap();
    let spaces = Spaces::open_with(cfg(), storage, dir.path(), dir.path().join("s.sock"), 0)
        .expect("open spaces");
    let client = spaces.connect(UID);
    Rig {
        spaces,
        caller: Caller {
            client,
            uid: UID,
            gid: UID,
        },
        _dir: dir,
    }
}

fn done(step: Step) -> Result<SpaceReply, Reason> {
    match step {
        Step::Done((r, _)) => Ok(r),
        Step::Refused(r) => Err(r),
        Step::Parked { .. } => panic!("a request of the script was parked"),
    }
}

/// The script's operations (durable space "d", volatile space "v").
#[derive(Debug, Clone)]
enum Op {
    Create(&'static str, bool),
    Write(&'static str, &'static str, Vec<u8>),
    /// start_write + stop_write with the bytes.
    LeaseWrite(&'static str, Vec<u8>),
    Invalidate(&'static str),
    /// start_invalidate + stop_invalidate.
    LeaseInvalidate(&'static str),
    Unjoin(&'static str),
    Join(&'static str),
}

fn bytes(tag: u8, n: usize) -> Vec<u8> {
    (0..n).map(|i| tag.wrapping_add(i as u8)).collect()
}

fn script() -> Vec<Op> {
    use Op::*;
    vec![
        Create("d", false),
        Create("v", true),
        Write("d", "a", bytes(1, 100)),
        Write("v", "x", bytes(2, 10)),
        Write("d", "a", bytes(3, 200)),
        LeaseWrite("b", bytes(4, 300)),
        Write("d", "c", bytes(5, 50)),
        Invalidate("a"),
        LeaseInvalidate("b"),
        Write("v", "x", bytes(6, 20)),
        Unjoin("d"),
        Join("d"),
        Write("d", "a", bytes(7, 70)),
        LeaseWrite("c", bytes(8, 80)),
        Unjoin("v"),
    ]
}

/// A chunk's last version and its bytes (`None`: invalid, or lost with a volatile space).
type ChunkState = (u64, Option<Vec<u8>>);

/// What the acknowledged operations made.
#[derive(Debug, Default)]
struct Model {
    /// Space -> (volatile, joined).
    spaces: BTreeMap<&'static str, (bool, bool)>,
    /// (space, chunk) -> (last version, bytes if valid).
    chunks: BTreeMap<(&'static str, &'static str), ChunkState>,
    /// Every acknowledged (space, chunk, version) and its bytes: a version is never given
    /// to other bytes.
    seen: BTreeMap<(&'static str, &'static str, u64), Vec<u8>>,
}

impl Model {
    fn published(&mut self, space: &'static str, chunk: &'static str, v: u64, data: &[u8]) {
        let prev = self.chunks.get(&(space, chunk)).map(|c| c.0).unwrap_or(0);
        assert!(v > prev, "{space}/{chunk}: version {v} after {prev}");
        if let Some(old) = self.seen.insert((space, chunk, v), data.to_vec()) {
            assert_eq!(old, data, "{space}/{chunk} v{v} repeated with other bytes");
        }
        self.chunks.insert((space, chunk), (v, Some(data.to_vec())));
    }

    fn invalidated(&mut self, space: &'static str, chunk: &'static str) {
        if let Some(c) = self.chunks.get_mut(&(space, chunk)) {
            c.1 = None;
        }
    }
}

/// Run one operation; whether it was acknowledged as done (the model follows it then).
fn run(r: &Rig, m: &mut Model, op: &Op) -> bool {
    use SpaceReply as R;
    let (s, c) = (&r.spaces, &r.caller);
    match op.clone() {
        Op::Create(space, volatile) => {
            let options = SpaceOptions {
                volatile,
                slot_size: Some(4096),
                slots: Some(8),
                mode: None,
            };
            let req = SpaceRequest::Create {
                space: space.into(),
                options,
            };
            let ok = matches!(done(s.begin(c, req, vec![])), Ok(R::CreateOk));
            if ok {
                m.spaces.insert(space, (volatile, true));
            }
            ok
        }
        Op::Write(space, chunk, data) => {
            let req = SpaceRequest::Write {
                space: space.into(),
                chunk: chunk.into(),
            };
            match done(s.begin(c, req, data.clone())) {
                Ok(R::WriteOk { version, .. }) => {
                    m.published(space, chunk, version, &data);
                    true
                }
                _ => false,
            }
        }
        Op::LeaseWrite(chunk, data) => {
            let req = SpaceRequest::StartWrite {
                space: "d".into(),
                chunk: chunk.into(),
                wait: false,
                timeout_ms: None,
                keep: false,
            };
            let lease = match done(s.begin(c, req, vec![])) {
                Ok(R::StartWriteOk { lease, .. }) => lease,
                _ => return false,
            };
            let req = SpaceRequest::StopWrite {
                lease,
                len: data.len() as u64,
            };
            match done(s.begin(c, req, data.clone())) {
                Ok(R::WriteOk { version, .. }) => {
                    m.published("d", chunk, version, &data);
                    true
                }
                other => {
                    // a failed publish ends the lease (the chunk keeps its version)
                    let kept = s.lock().core.lease_space(lease).is_some();
                    assert!(!kept, "lease kept after a failed stop_write: {other:?}");
                    false
                }
            }
        }
        Op::Invalidate(chunk) => {
            let req = SpaceRequest::Invalidate {
                space: "d".into(),
                chunk: chunk.into(),
            };
            let ok = matches!(
                done(s.begin(c, req, vec![])),
                Ok(R::WriteFail { reason: None })
            );
            if ok {
                m.invalidated("d", chunk);
            }
            ok
        }
        Op::LeaseInvalidate(chunk) => {
            let req = SpaceRequest::StartInvalidate {
                space: "d".into(),
                chunk: chunk.into(),
                wait: false,
                timeout_ms: None,
            };
            let lease = match done(s.begin(c, req, vec![])) {
                Ok(R::StartWriteOk { lease, .. }) => lease,
                _ => return false,
            };
            let stop = || {
                let req = SpaceRequest::StopInvalidate { lease };
                matches!(
                    done(s.begin(c, req, vec![])),
                    Ok(R::WriteFail { reason: None })
                )
            };
            if stop() {
                m.invalidated("d", chunk);
                true
            } else {
                // the lease is still held after a failed store: try again (after a crash
                // that fails too, and the lease stays held until the end)
                if stop() {
                    m.invalidated("d", chunk);
                }
                false
            }
        }
        Op::Unjoin(space) => {
            let req = SpaceRequest::Unjoin {
                space: space.into(),
            };
            let ok = matches!(done(s.begin(c, req, vec![])), Ok(R::UnjoinOk));
            if ok {
                m.spaces.get_mut(space).expect("unjoined a known space").1 = false;
                if m.spaces[space].0 {
                    m.chunks.retain(|k, _| k.0 != space);
                }
            }
            ok
        }
        Op::Join(space) => {
            let req = SpaceRequest::Join {
                space: space.into(),
                host: "h1".into(),
            };
            let ok = matches!(done(s.begin(c, req, vec![])), Ok(R::JoinOk));
            if ok {
                m.spaces.get_mut(space).expect("joined a known space").1 = true;
            }
            ok
        }
    }
}

/// The spaces as they are now agree with the model (`restarted`: volatile chunks are gone).
fn check(r: &Rig, m: &mut Model, restarted: bool, what: &str) {
    let (s, c) = (&r.spaces, &r.caller);
    for name in ["d", "v"] {
        let rec = s.lock().core.space_record(name).cloned();
        match m.spaces.get(name) {
            None => assert!(rec.is_none(), "{what}: space {name} exists unacknowledged"),
            Some(&(volatile, joined)) => {
                let rec = rec.unwrap_or_else(|| panic!("{what}: acknowledged space {name} lost"));
                assert_eq!(rec.volatile, volatile, "{what}: {name}");
                assert_eq!(rec.joined, joined, "{what}: space {name} joined");
            }
        }
    }
    if restarted {
        for (&name, &(volatile, _)) in &m.spaces {
            if volatile {
                // volatile chunks end with the daemon; their versions do not
                for (k, v) in m.chunks.iter_mut() {
                    if k.0 == name {
                        v.1 = None;
                    }
                }
            }
        }
    }
    for (&(space, chunk), (version, data)) in &m.chunks {
        if !m.spaces[space].1 {
            continue;
        }
        let req = SpaceRequest::Read {
            space: space.into(),
            chunk: chunk.into(),
        };
        match (s.begin(c, req, vec![]), data) {
            (Step::Done((SpaceReply::ReadOk { version: v }, got)), Some(want)) => {
                assert_eq!(v, *version, "{what}: {space}/{chunk} version");
                assert_eq!(&got, want, "{what}: {space}/{chunk} bytes");
            }
            (Step::Done((SpaceReply::ReadOk { version: v }, _)), None) => {
                panic!("{what}: {space}/{chunk} v{v} readable; it was invalidated (or lost)")
            }
            (other, Some(_)) => panic!(
                "{what}: {space}/{chunk} v{version} not readable: {:?}",
                match other {
                    Step::Done(a) => format!("{:?}", a.0),
                    Step::Refused(r) => r.message,
                    Step::Parked { .. } => "parked".into(),
                }
            ),
            (_, None) => {}
        }
    }
}

/// Then every chunk gets a new version above every one acknowledged before.
fn check_versions_go_on(r: &Rig, m: &mut Model, what: &str) {
    let chunks: Vec<_> = m.chunks.keys().copied().collect();
    for (space, chunk) in chunks {
        if !m.spaces[space].1 {
            continue;
        }
        let data = bytes(99, 33);
        assert!(
            run(r, m, &Op::Write(space, chunk, data)),
            "{what}: write after reopening"
        );
    }
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Fail,
    Crash,
}

/// Run the script with `fault` at commit `n`; `None` when commit `n` never happened.
fn scenario(fault: Fault, n: u64) -> Option<()> {
    let st = Arc::new(MemStorage::new());
    match fault {
        Fault::Fail => st.fail_at(n),
        Fault::Crash => st.crash_at(n),
    }
    let r = open(st.clone());
    let mut m = Model::default();
    let mut acked = Vec::new();
    for op in script() {
        let before = st.writes();
        let ok = run(&r, &mut m, &op);
        let failing = before < n && st.writes() >= n;
        if failing {
            assert!(
                !ok,
                "{fault:?} at {n}: {op:?} acknowledged though its commit failed"
            );
        }
        acked.push((op, ok));
    }
    if st.writes() < n {
        return None;
    }
    let what = format!("{fault:?} at commit {n}");
    if matches!(fault, Fault::Fail) {
        check(&r, &mut m, false, &format!("{what}, before the restart"));
    }
    drop(r);
    let r = open(Arc::new(MemStorage::with_state(st.committed())));
    check(
        &r,
        &mut m,
        true,
        &format!("{what}, after the restart ({acked:?})"),
    );
    check_versions_go_on(&r, &mut m, &what);
    Some(())
}

#[test]
fn every_commit_of_the_script_may_fail_or_crash() {
    for fault in [Fault::Fail, Fault::Crash] {
        let mut n = 1;
        while scenario(fault, n).is_some() {
            n += 1;
        }
        assert!(n > 10, "{fault:?}: the script made only {} commits", n - 1);
    }
}

#[test]
fn the_script_without_faults() {
    let st = Arc::new(MemStorage::new());
    let r = open(st.clone());
    let mut m = Model::default();
    for op in script() {
        assert!(run(&r, &mut m, &op), "{op:?}");
    }
    check(&r, &mut m, false, "live");
    drop(r);
    let r = open(Arc::new(MemStorage::with_state(st.committed())));
    check(&r, &mut m, true, "restarted");
    check_versions_go_on(&r, &mut m, "restarted");
}

/// A storage whose commits take a while (so that writers pile up behind one).
struct Slow(MemStorage, Duration);

impl Storage for Slow {
    fn commit(&self, batch: &[durable::Record]) -> anyhow::Result<()> {
        std::thread::sleep(self.1);
        self.0.commit(batch)
    }
    fn chunk(
        &self,
        space: &str,
        chunk: &str,
    ) -> anyhow::Result<Option<(ChunkMeta, Option<Vec<u8>>)>> {
        self.0.chunk(space, chunk)
    }
    fn load(&self) -> anyhow::Result<Vec<durable::Recorded>> {
        self.0.load()
    }
}

fn concurrent_writes(s: &Spaces, writers: usize, tag: u8) -> Vec<Result<u64, Reason>> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..writers)
            .map(|i| {
                sc.spawn(move || {
                    let c = Caller {
                        client: s.connect(UID),
                        uid: UID,
                        gid: UID,
                    };
                    let req = SpaceRequest::Write {
                        space: "d".into(),
                        chunk: format!("w{i}"),
                    };
                    match done(s.begin(&c, req, bytes(tag + i as u8, 64))) {
                        Ok(SpaceReply::WriteOk { version, .. }) => Ok(version),
                        Ok(SpaceReply::WriteFail { reason: Some(r) }) => Err(r),
                        other => panic!("{other:?}"),
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn concurrent_writers_share_commits_and_a_failed_one_fails_its_whole_batch() {
    let slow = Arc::new(Slow(MemStorage::new(), Duration::from_millis(50)));
    let r = open(slow.clone());
    let req = SpaceRequest::Create {
        space: "d".into(),
        options: SpaceOptions {
            slot_size: Some(4096),
            slots: Some(16),
            ..SpaceOptions::default()
        },
    };
    assert!(matches!(
        done(r.spaces.begin(&r.caller, req, vec![])),
        Ok(SpaceReply::CreateOk)
    ));
    let (b0, _) = r.spaces.durable.commits();
    let out = concurrent_writes(&r.spaces, 8, 10);
    assert!(out.iter().all(|o| o == &Ok(1)), "{out:?}");
    let (b1, rec1) = r.spaces.durable.commits();
    assert!(b1 - b0 < 8, "8 writers made {} commits", b1 - b0);
    assert!(rec1 >= 9);
    // the next commits fail: every writer of a failed batch fails, and leaves nothing held
    let next = slow.0.writes();
    for n in next + 1..next + 9 {
        slow.0.fail_at(n);
    }
    let out = concurrent_writes(&r.spaces, 8, 20);
    assert!(out.iter().all(|o| o.is_err()), "{out:?}");
    slow.0.clear_faults();
    {
        let g = r.spaces.lock();
        assert_eq!(
            g.core.usage(UID).pending_bytes,
            0,
            "pending bytes left reserved"
        );
        assert!(g.leased.is_empty());
    }
    // and nothing of them is published or stored: the chunks keep version 1 and go on
    let out = concurrent_writes(&r.spaces, 8, 30);
    assert!(out.iter().all(|o| o == &Ok(2)), "{out:?}");
    let state = slow.0.committed();
    for i in 0..8u8 {
        assert_eq!(state.data[&format!("d/w{i}")], bytes(30 + i, 64));
        assert_eq!(state.metas[&format!("d/w{i}")].version, 2);
    }
}
