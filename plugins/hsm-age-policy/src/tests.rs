use super::*;
use strata_plugin_sdk::dm::{DataEvent, NamespaceEvent, RegionFlags};
use strata_plugin_sdk::testing::{DmOp, DmRequest, MemHost};
use strata_plugin_sdk::{Env, KvError, LogLevel};

const DAY: u64 = 24 * 3600;
const MIB: usize = 1 << 20;

fn policy(host: &mut MemHost, config: &str) -> AgePolicy {
    AgePolicy::init(config, host).unwrap()
}

fn action_of<'a>(actions: &'a [ScanAction], handle: &[u8]) -> &'a Action {
    &actions.iter().find(|a| a.handle == handle).unwrap().action
}

fn data_event(kind: EventType, handle: &[u8]) -> Event {
    Event {
        kind,
        token: 42,
        sequence: 9,
        session: 1,
        data: EventData::Data(DataEvent {
            handle: handle.to_vec(),
            offset: 0,
            length: 4096,
        }),
    }
}

fn counter(host: &mut MemHost, key: &str) -> u64 {
    host.kv_counter(key)
}

#[test]
fn config_defaults_and_keys() {
    assert_eq!(Config::parse("").unwrap(), Config::default());
    let cfg = Config::parse(
        "tier=tape min_size=4KiB min_age_secs=10 min_idle_secs=20 release_after_migrate=true",
    )
    .unwrap();
    assert_eq!(
        cfg,
        Config {
            tier: "tape".into(),
            min_size: 4096,
            min_age_secs: 10,
            min_idle_secs: 20,
            release_after_migrate: true,
        }
    );
    for bad in [
        "tier=",
        "release_after_migrate=yes",
        "min_size=big",
        "age=1",
    ] {
        assert!(Config::parse(bad).is_err(), "{bad}");
    }
    let host = &mut MemHost::new();
    let err = AgePolicy::init("colour=blue", host).unwrap_err();
    assert!(err.contains("unknown config key `colour`"), "{err}");
}

#[test]
fn decide_without_io() {
    let cfg = Config {
        tier: "t".into(),
        min_size: 100,
        min_age_secs: 50,
        min_idle_secs: 10,
        release_after_migrate: true,
    };
    let mut host = MemHost::new();
    let mut f = host.add_file(b"f", vec![1; 100]).stat.clone();
    f.mtime = Timestamp::from_secs(1000);
    f.atime = Timestamp::from_secs(1040);
    let at = Timestamp::from_secs;
    let migrate = Action::Migrate("t".into());
    assert_eq!(decide(&f, Migration::None, at(1050), &cfg), migrate);
    assert_eq!(decide(&f, Migration::Stale, at(1050), &cfg), migrate);
    assert_eq!(decide(&f, Migration::None, at(1049), &cfg), Action::Ignore);
    assert_eq!(
        decide(&f, Migration::Current, at(1050), &cfg),
        Action::Release
    );
    f.atime = at(1045);
    assert_eq!(decide(&f, Migration::None, at(1050), &cfg), Action::Ignore);
    f.atime = at(0);
    f.size = 99;
    assert_eq!(decide(&f, Migration::None, at(1050), &cfg), Action::Ignore);
    f.size = 100;
    f.blocks = 0;
    assert_eq!(
        decide(&f, Migration::Current, at(1050), &cfg),
        Action::Ignore
    );
    f.mode = 0o040_755; // a directory
    assert_eq!(decide(&f, Migration::None, at(1050), &cfg), Action::Ignore);
}

#[test]
fn migration_state_from_dtime() {
    let mut host = MemHost::new();
    let mut f = host.add_file(b"f", vec![1]).stat.clone();
    f.mtime = Timestamp::from_secs(10);
    f.dtime = Timestamp::from_secs(10);
    assert_eq!(Migration::of(&f, false), Migration::None);
    assert_eq!(Migration::of(&f, true), Migration::Current);
    f.mtime.nanoseconds = 1;
    assert_eq!(Migration::of(&f, true), Migration::Stale);
}

#[test]
fn scan_picks_big_old_idle_files() {
    let host = &mut MemHost::new();
    host.add_file(b"big-old", vec![7; 2 * MIB]);
    host.add_file(b"small-old", vec![7; 1000]);
    host.add_file(b"big-recent", vec![7; 2 * MIB]);
    host.add_file(b"big-read", vec![7; 2 * MIB]);
    host.add_file(b"dir", vec![]).stat.mode = 0o040_755;
    host.env.advance(40 * DAY);
    let now = host.env.now();
    host.file_mut(b"big-recent").unwrap().stat.mtime = now;
    host.file_mut(b"big-read").unwrap().stat.atime = now;

    let mut p = policy(host, "tier=tape");
    let actions = p.scan(&host.batch(), host);
    assert_eq!(actions.len(), 5);
    assert_eq!(
        action_of(&actions, b"big-old"),
        &Action::Migrate("tape".into())
    );
    for h in [&b"small-old"[..], b"big-recent", b"big-read", b"dir"] {
        assert_eq!(action_of(&actions, h), &Action::Ignore);
    }
    assert_eq!(counter(host, "stats.migrate"), 1);
    assert_eq!(counter(host, "stats.ignore"), 4);
    assert_eq!(counter(host, "stats.release"), 0);
}

#[test]
fn lifecycle_migrate_release_recall() {
    let host = &mut MemHost::new();
    let content: Vec<u8> = (0..3 * MIB).map(|i| (i % 253) as u8).collect();
    host.add_file(b"f", content.clone());
    host.env.advance(40 * DAY);
    let mut p = policy(host, "tier=tape release_after_migrate=true");

    // 1. Old and idle: migrate.
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Migrate("tape".into()));
    host.apply(&actions).unwrap();

    // 2. Migrated and resident: release.
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Release);
    host.apply(&actions).unwrap();
    assert_eq!(host.stat(b"f").unwrap().blocks, 0);

    // 3. Released: nothing more to do.
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Ignore);

    // 4. A read brings the data back before it proceeds.
    let r = p.on_event(&data_event(EventType::Read, b"f"), host);
    assert_eq!(r, Response::Continue);
    assert_eq!(
        host.read_invis(b"f", 0, content.len() as u64).unwrap(),
        content
    );
    assert!(host.get_regions(b"f").unwrap().is_empty());
    assert_eq!(
        host.requests.last(),
        Some(&DmRequest::Recall {
            handle: b"f".to_vec(),
            offset: 0,
            length: 0
        })
    );
    assert_eq!(counter(host, "stats.recall"), 1);
    assert_eq!(counter(host, "stats.migrate"), 1);
    assert_eq!(counter(host, "stats.release"), 1);

    // 5. A write after the recall makes the tier copy stale: never released on its strength,
    //    migrated again once old and idle.
    host.env.advance(DAY);
    let now = host.env.now();
    host.file_mut(b"f").unwrap().stat.mtime = now;
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Ignore);
    host.env.advance(40 * DAY);
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Migrate("tape".into()));
}

#[test]
fn migrated_files_stay_resident_without_release() {
    let host = &mut MemHost::new();
    host.add_file(b"f", vec![1; 2 * MIB]);
    host.env.advance(40 * DAY);
    let mut p = policy(host, "");
    let actions = p.scan(&host.batch(), host);
    assert_eq!(
        action_of(&actions, b"f"),
        &Action::Migrate("archive".into())
    );
    host.apply(&actions).unwrap();
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Ignore);
}

fn released_file(host: &mut MemHost) -> AgePolicy {
    host.add_file(b"f", vec![1; 2 * MIB]);
    host.request_migrate(b"f", "tape").unwrap();
    let release = ScanAction {
        handle: b"f".to_vec(),
        action: Action::Release,
    };
    host.apply(&[release]).unwrap();
    policy(host, "")
}

#[test]
fn failed_recall_aborts_with_eio() {
    let host = &mut MemHost::new();
    let mut p = released_file(host);
    host.fail_on(DmOp::RequestRecall, DmError::Eio);
    for kind in [EventType::Read, EventType::Write, EventType::Truncate] {
        assert_eq!(
            p.on_event(&data_event(kind, b"f"), host),
            Response::Abort(EIO)
        );
    }
    assert_eq!(counter(host, "stats.recall_failed"), 3);
    assert!(host.env.has_log(LogLevel::Error, "recall"));
    assert_eq!(host.stat(b"f").unwrap().blocks, 0);
}

#[test]
fn unreadable_migration_record_aborts_events_and_skips_scans() {
    let host = &mut MemHost::new();
    let mut p = released_file(host);
    host.fail_on(DmOp::GetDmattr, DmError::Eio);
    let r = p.on_event(&data_event(EventType::Write, b"f"), host);
    assert_eq!(r, Response::Abort(EIO));
    host.env.advance(40 * DAY);
    let actions = p.scan(&host.batch(), host);
    assert_eq!(action_of(&actions, b"f"), &Action::Ignore);
    assert!(host.env.has_log(LogLevel::Warn, "leaving it alone"));
}

#[test]
fn events_on_unmigrated_files_and_other_events_continue() {
    let host = &mut MemHost::new();
    host.add_file(b"plain", vec![1; 10]);
    let mut p = policy(host, "");
    let r = p.on_event(&data_event(EventType::Read, b"plain"), host);
    assert_eq!(r, Response::Continue);
    let remove = Event {
        kind: EventType::Remove,
        token: 1,
        sequence: 2,
        session: 1,
        data: EventData::Namespace(NamespaceEvent {
            mode: 0,
            handle1: b"dir".to_vec(),
            handle2: None,
            name1: Some("plain".into()),
            name2: None,
            retcode: 0,
        }),
    };
    assert_eq!(p.on_event(&remove, host), Response::Continue);
    assert!(host.requests.is_empty());
    p.on_notify(&remove, host);
    assert!(host.env.has_log(LogLevel::Info, "notified of remove event"));
}

#[test]
fn regions_survive_a_failed_clear() {
    let host = &mut MemHost::new();
    let mut p = released_file(host);
    host.fail_on(DmOp::SetRegions, DmError::Eacces);
    let r = p.on_event(&data_event(EventType::Read, b"f"), host);
    assert_eq!(
        r,
        Response::Continue,
        "the data is back; the region is a nuisance"
    );
    let regions = host.get_regions(b"f").unwrap();
    assert_eq!(regions.len(), 1);
    assert!(regions[0].flags.contains(RegionFlags::READ));
}

#[test]
fn kv_failures_do_not_change_decisions() {
    let host = &mut MemHost::new();
    host.add_file(b"f", vec![1; 2 * MIB]);
    host.env.advance(40 * DAY);
    host.env.fail_kv_writes(Some(KvError::QuotaExceeded));
    let mut p = policy(host, "");
    let actions = p.scan(&host.batch(), host);
    assert_eq!(
        action_of(&actions, b"f"),
        &Action::Migrate("archive".into())
    );
    assert!(host.env.has_log(LogLevel::Warn, "stats.migrate"));
}
