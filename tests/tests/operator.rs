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
