//! The operator's kit (issue 15): what an operator runs around the daemon.

use std::process::Command;
use strata_tests::bin;

fn check(text: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stratad.toml");
    std::fs::write(&p, text).unwrap();
    let o = Command::new(bin("stratad"))
        .arg("--check-config")
        .arg(&p)
        .output()
        .unwrap();
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

#[test]
fn check_config_names_unknown_keys_and_bad_values_with_their_line_and_starts_nothing() {
    let (ok, out) = check("log = \"info\"\n[spaces]\ndefault_slots = 64\n");
    assert!(ok && out.contains(": ok"), "{out}");
    // an unknown key: the parser's position
    let (ok, out) = check("log = \"info\"\n[spaces]\ndefault_slot = 64\n");
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 3") && out.contains("default_slot"),
        "{out}"
    );
    // a value of the wrong type
    let (ok, out) = check("[plugins]\n\ndeadline_ms = \"ten\"\n");
    assert!(!ok && out.contains("line 3"), "{out}");
    // a value the daemon cannot run with: the line of its key
    let (ok, out) = check("[limits]\nmax_connections = 10\nheader_timeout_ms = 0\n");
    assert!(!ok, "{out}");
    assert!(
        out.contains("line 3") && out.contains("header_timeout_ms"),
        "{out}"
    );
    // nothing was started or created: the default data dir is not touched by a check
    let (ok, _) = check("data_dir = \"/nonexistent/strata-check\"\n");
    assert!(ok);
    assert!(!std::path::Path::new("/nonexistent/strata-check").exists());
}

#[test]
fn the_debian_package_holds_the_daemon_cli_plugins_config_unit_man_pages_and_completions() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bins = bin("stratad").parent().unwrap().to_path_buf();
    let out = tempfile::tempdir().unwrap();
    let o = Command::new("bash")
        .arg(root.join("scripts/build-deb.sh"))
        .env("STRATA_DEB_BIN_DIR", &bins)
        .env("STRATA_DEB_COMPRESS", "gzip")
        .env("CARGO_TARGET_DIR", out.path())
        .env(
            "STRATA_COMPONENTS",
            std::env::var_os("STRATA_COMPONENTS")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(strata_tests::components_dir),
        )
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "build-deb.sh failed: {log}");
    let deb = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let x = out.path().join("x");
    let st = Command::new("dpkg-deb")
        .args(["-x", &deb])
        .arg(&x)
        .status()
        .unwrap();
    assert!(st.success());
    for f in [
        "usr/bin/stratad",
        "usr/bin/strata",
        "usr/lib/strata/plugins/placement-rendezvous.wasm",
        "usr/lib/strata/plugins/hsm-age-policy.wasm",
        "etc/strata/stratad.toml",
        "lib/systemd/system/stratad.service",
        "usr/share/man/man1/stratad.1.gz",
        "usr/share/man/man1/strata.1.gz",
        "usr/share/man/man1/strata-space.1.gz",
        "usr/share/bash-completion/completions/strata",
        "usr/share/zsh/vendor-completions/_strata",
        "usr/share/fish/vendor_completions.d/strata.fish",
    ] {
        assert!(x.join(f).exists(), "{f} is not in the package");
    }
    // the packaged config is valid as shipped (for the packaged daemon)
    let o = Command::new(x.join("usr/bin/stratad"))
        .arg("--check-config")
        .arg(x.join("etc/strata/stratad.toml"))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // the unit waits for readiness, restarts, raises the fd limit, keeps the host's mounts
    let unit = std::fs::read_to_string(x.join("lib/systemd/system/stratad.service")).unwrap();
    for line in [
        "Type=notify",
        "Restart=on-failure",
        "LimitNOFILE=",
        "StateDirectoryMode=0700",
    ] {
        assert!(unit.contains(line), "unit lacks {line}");
    }
    // systemd's own check, on a copy naming the extracted binary (it checks ExecStart
    // paths exist; the test does not install into /usr)
    if let Ok(v) = Command::new("systemd-analyze").arg("--version").output() {
        assert!(v.status.success());
        let copy = out.path().join("stratad.service");
        let stratad = x.join("usr/bin/stratad").display().to_string();
        std::fs::write(&copy, unit.replace("/usr/bin/stratad", &stratad)).unwrap();
        let o = Command::new("systemd-analyze")
            .args(["verify", "--man=no"])
            .arg(&copy)
            .output()
            .unwrap();
        assert!(
            o.status.success() && o.stderr.is_empty(),
            "systemd-analyze verify: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    } else {
        eprintln!(
            "PREREQUISITE MISSING: systemd-analyze (package systemd): the unit is not verified"
        );
        panic!("systemd-analyze is missing");
    }
    for ns in ["ProtectSystem=", "PrivateTmp=", "ProtectHome="] {
        assert!(
            !unit.lines().any(|l| l.starts_with(ns)),
            "{ns} would hide the daemon's FUSE mounts from the host"
        );
    }
    // the conffile is declared, so an operator's edits survive upgrades
    let info = Command::new("dpkg-deb")
        .args(["-I", &deb, "conffiles"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("/etc/strata/stratad.toml"));
}

/// `GET /metrics` from the daemon's endpoint.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("the metrics endpoint answers");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

/// The value of the first sample of `series` whose line contains every `labels` text.
fn sample(text: &str, series: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(series) && !l.starts_with('#'))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .next()
}

#[test]
fn the_metrics_endpoint_serves_series_that_move_with_the_work() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let d = strata_tests::Daemon::start_with(&format!(
        "[metrics]\nenabled = true\nlisten = \"{addr}\"\n"
    ));
    let rendezvous = strata_tests::component("placement-rendezvous")
        .display()
        .to_string();
    d.ok(&["plugin", "load", "rdv", &rendezvous, "--kind", "placement"]);
    let mut c = strata_client::Client::connect(d.socket()).unwrap();
    c.create("m", strata_client::SpaceOptions::default())
        .unwrap();
    let before = scrape(&addr);
    let writes = |t: &str| {
        sample(
            t,
            "strata_requests_total",
            &["op=\"chunk-write\"", "result=\"ok\""],
        )
        .unwrap_or(0.0)
    };
    let places = |t: &str| {
        sample(
            t,
            "strata_plugin_calls_total",
            &["slot=\"rdv\"", "result=\"ok\""],
        )
        .unwrap_or(0.0)
    };
    for i in 0..5 {
        c.write("m", &format!("k{i}"), b"data").unwrap();
    }
    for _ in 0..3 {
        d.ok(&["place", "rdv", "m", "k0", "--host", "a:1", "--host", "b:1"]);
    }
    // gauges are refreshed once a second
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let after = scrape(&addr);
    assert_eq!(writes(&after) - writes(&before), 5.0, "{after}");
    assert_eq!(places(&after) - places(&before), 3.0, "{after}");
    for series in [
        "strata_request_seconds_bucket",
        "strata_durable_commit_seconds_bucket",
        "strata_durable_commit_records_bucket",
        "strata_spaces",
        "strata_shm_bytes",
        "strata_chunks",
    ] {
        assert!(after.contains(series), "no {series} in {after}");
    }
    assert!(
        sample(&after, "strata_chunks", &[]).unwrap() >= 5.0,
        "{after}"
    );
    // no label carries a chunk or space name
    assert!(
        !after.contains("\"k0\"") && !after.contains("\"m\""),
        "{after}"
    );
}
