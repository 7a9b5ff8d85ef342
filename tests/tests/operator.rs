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
