//! Plugins through a real daemon: the CLI, the socket, persistence across restarts.

use std::os::unix::process::CommandExt;
use strata_tests::{component, is_root, Daemon};

fn comp(name: &str) -> String {
    component(name).display().to_string()
}

#[test]
fn cli_load_place_swap_list_rollback_unload() {
    let d = Daemon::start();
    let out = d.ok(&[
        "plugin",
        "load",
        "placement",
        &comp("placement-rendezvous"),
        "--kind",
        "placement",
    ]);
    assert!(out.contains("loaded placement v1"), "{out}");
    let order = d.ok(&[
        "place",
        "placement",
        "s",
        "c1",
        "--host",
        "a:100",
        "--host",
        "b:200",
        "--host",
        "c:300",
    ]);
    let hosts: Vec<&str> = order.split_whitespace().collect();
    assert_eq!(hosts.len(), 3);
    let out = d.ok(&["plugin", "swap", "placement", &comp("placement-echo")]);
    assert!(out.contains("v1 -> v2"), "{out}");
    let order = d.ok(&[
        "place",
        "placement",
        "s",
        "c1",
        "--host",
        "a:100",
        "--host",
        "b:200",
    ]);
    assert_eq!(order.trim(), "a b");
    let list = d.ok(&["plugin", "list"]);
    assert!(
        list.contains("placement") && list.contains("earlier: v1"),
        "{list}"
    );
    let out = d.ok(&["plugin", "rollback", "placement"]);
    assert!(out.contains("v2 -> v1"), "{out}");
    d.ok(&["plugin", "unload", "placement"]);
    assert!(d.ok(&["plugin", "list"]).contains("no plugins loaded"));
}

#[test]
fn refused_swap_names_the_plugin_and_changes_nothing() {
    let d = Daemon::start();
    d.ok(&[
        "plugin",
        "load",
        "p",
        &comp("placement-echo"),
        "--kind",
        "placement",
    ]);
    for bad in [
        "faulty-init",
        "wrong-version",
        "missing-export",
        "hsm-age-policy",
    ] {
        let o = d.strata(&["plugin", "swap", "p", &comp(bad)]);
        assert_eq!(o.status.code(), Some(2), "{bad}");
        let msg = String::from_utf8_lossy(&o.stderr);
        assert!(msg.contains("plugin 'p'"), "{bad}: {msg}");
    }
    let junk = d.dir.join("junk.wasm");
    std::fs::write(&junk, b"not a component").unwrap();
    let o = d.strata(&["plugin", "swap", "p", junk.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("not a WebAssembly file"));
    let list = d.ok(&["plugin", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["current"]["id"], 1);
    assert_eq!(v[0]["history"].as_array().unwrap().len(), 0);
    // Still serving.
    assert_eq!(d.ok(&["place", "p", "s", "c", "--host", "x:1"]).trim(), "x");
}

#[test]
fn restart_restores_slots_from_the_precompiled_cache_with_their_state() {
    let mut d = Daemon::start();
    d.ok(&[
        "plugin",
        "load",
        "p",
        &comp("placement-echo"),
        "--kind",
        "placement",
        "--config",
        "count=true",
    ]);
    for _ in 0..4 {
        d.ok(&["place", "p", "s", "c", "--host", "x:1"]);
    }
    d.restart();
    let list = d.ok(&["plugin", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v[0]["name"], "p");
    assert_eq!(v[0]["current"]["cache"], "hit", "{list}");
    assert_eq!(v[0]["settings"]["config"], "count=true");
    assert!(d.log().contains("plugin restored"));
    // The plugin's kv state survived the restart: the next call makes it 5.
    assert_eq!(d.ok(&["plugin", "state", "p"]).trim(), "calls\t4");
    d.ok(&["place", "p", "s", "c", "--host", "x:1"]);
    assert_eq!(d.ok(&["plugin", "state", "p"]).trim(), "calls\t5");
    // A swap after the restart keeps it too.
    d.ok(&[
        "plugin",
        "swap",
        "p",
        &comp("placement-rendezvous"),
        "--config",
        "",
    ]);
    d.ok(&["place", "p", "s", "c", "--host", "x:1"]);
    assert_eq!(
        d.ok(&["plugin", "state", "p"]).trim(),
        "calls\t5",
        "rendezvous does not count"
    );
    // The rollback history survives a restart too: back to the counting echo plugin.
    d.restart();
    let list = d.ok(&["plugin", "list"]);
    assert!(
        list.contains("placement-rendezvous") && list.contains("earlier:"),
        "{list}"
    );
    d.ok(&["plugin", "rollback", "p"]);
    d.ok(&["place", "p", "s", "c", "--host", "x:1"]);
    assert_eq!(d.ok(&["plugin", "state", "p"]).trim(), "calls\t6");
}

#[test]
fn management_needs_privilege_but_queries_do_not() {
    if !is_root() {
        panic!("PREREQUISITE MISSING: this test must run as root to act as an unprivileged user");
    }
    let d = Daemon::start();
    d.ok(&[
        "plugin",
        "load",
        "p",
        &comp("placement-echo"),
        "--kind",
        "placement",
    ]);
    let nobody = |args: &[&str]| d.strata_cmd(args).uid(65534).gid(65534).output().unwrap();
    for args in [
        &["plugin", "unload", "p"][..],
        &["plugin", "state", "p"],
        &["plugin", "rollback", "p"],
    ] {
        let o = nobody(args);
        assert_eq!(o.status.code(), Some(2), "{args:?}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("needs root"),
            "{args:?}"
        );
    }
    let o = nobody(&["plugin", "list"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = nobody(&["place", "p", "s", "c", "--host", "x:1"]);
    assert!(o.status.success());
}

#[test]
fn swap_under_cli_load_answers_every_call() {
    let d = Daemon::start();
    d.ok(&[
        "plugin",
        "load",
        "p",
        &comp("placement-rendezvous"),
        "--kind",
        "placement",
    ]);
    let bench = d
        .strata_cmd(&[
            "plugin",
            "bench",
            "p",
            "--calls",
            "12000",
            "--concurrency",
            "4",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    d.ok(&["plugin", "swap", "p", &comp("placement-echo")]);
    let out = bench.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("12000 of 12000 calls answered (0 refused)"),
        "{text}"
    );
}

#[test]
fn garbage_on_the_socket_is_refused_and_the_daemon_keeps_serving() {
    use std::io::{Read, Write};
    let d = Daemon::start();
    let payloads: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.0\r\n\r\n".to_vec(),
        vec![0xff; 64],
        [&5u32.to_be_bytes()[..], b"{\"op\"", &0u64.to_be_bytes()[..]].concat(),
        [&2u32.to_be_bytes()[..], b"{}", &0u64.to_be_bytes()[..]].concat(),
        3u32.to_be_bytes().to_vec(), // then hang up mid-frame
    ];
    for p in payloads {
        let mut s = std::os::unix::net::UnixStream::connect(d.socket()).unwrap();
        s.write_all(&p).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    assert!(d.ok(&["status"]).contains("stratad"));
}

#[test]
fn faulty_plugins_leave_the_daemon_serving() {
    let d = Daemon::start();
    d.ok(&[
        "plugin",
        "load",
        "good",
        &comp("placement-echo"),
        "--kind",
        "placement",
    ]);
    for (name, extra) in [
        ("faulty-loop", vec!["--deadline-ms", "20"]),
        (
            "faulty-hog",
            vec!["--memory-limit", "16777216", "--deadline-ms", "5000"],
        ),
        ("faulty-panic", vec![]),
        ("faulty-malformed", vec![]),
    ] {
        let file = comp(name);
        let mut args = vec!["plugin", "load", name, file.as_str(), "--kind", "placement"];
        args.extend(extra);
        d.ok(&args);
        // The builtin policy answers: most free space first.
        let o = d.strata(&["place", name, "s", "c", "--host", "a:1", "--host", "b:2"]);
        assert!(o.status.success(), "{name}");
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "b a", "{name}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("answered by the failure policy"),
            "{name}"
        );
        // The abort policy makes the call fail with the errno, exit code 2.
        let file = comp(name);
        let slot = format!("{name}-abort");
        let o = d.strata(&[
            "plugin",
            "load",
            &slot,
            &file,
            "--kind",
            "placement",
            "--on-failure",
            "place=abort:EACCES",
            "--deadline-ms",
            "20",
            "--memory-limit",
            "16777216",
        ]);
        assert!(
            o.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let o = d.strata(&["place", &slot, "s", "c", "--host", "a:1"]);
        assert_eq!(o.status.code(), Some(2), "{name}");
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("errno 13"),
            "{name}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        // Still serving everyone else.
        assert_eq!(
            d.ok(&["place", "good", "s", "c", "--host", "x:1"]).trim(),
            "x"
        );
    }
    let list = d.ok(&["plugin", "list", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    let by_name = |n: &str| {
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == n)
            .unwrap()["total"]
            .clone()
    };
    assert_eq!(by_name("faulty-loop")["timeouts"], 1);
    assert_eq!(by_name("faulty-hog")["memory_limits"], 1);
    assert_eq!(by_name("faulty-panic")["traps"], 1);
    assert_eq!(by_name("faulty-malformed")["malformed"], 1);
}
