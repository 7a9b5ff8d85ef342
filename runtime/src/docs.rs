//! Man pages and shell completions generated from the CLIs' own definitions (clap_mangen,
//! clap_complete), so that they never disagree with `--help`. Each binary writes its own
//! with the hidden option `--generate-docs DIR`; `scripts/build-deb.sh` packages them.

use std::path::Path;

/// Write `DIR/man/<name>.1` (and one page per subcommand, `<name>-<sub>.1`) and
/// `DIR/completions/{<name>.bash, _<name>, <name>.fish}` for `cmd`.
pub fn generate(cmd: clap::Command, dir: &Path) -> anyhow::Result<()> {
    use clap_complete::Shell;
    let name = cmd.get_name().to_string();
    let man = dir.join("man");
    let comp = dir.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&comp)?;
    let mut cmd = cmd;
    cmd.build();
    write_man(&cmd, &name, &man)?;
    for sub in (cmd.get_subcommands()).filter(|s| !s.is_hide_set() && s.get_name() != "help") {
        let page = format!("{name}-{}", sub.get_name());
        let sub = sub.clone().name(page.clone());
        write_man(&sub, &page, &man)?;
    }
    for (shell, file) in [
        (Shell::Bash, format!("{name}.bash")),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let mut out = std::fs::File::create(comp.join(file))?;
        clap_complete::generate(shell, &mut cmd, name.clone(), &mut out);
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, page: &str, dir: &Path) -> anyhow::Result<()> {
    let mut out = Vec::new();
    clap_mangen::Man::new(cmd.clone()).render(&mut out)?;
    std::fs::write(dir.join(format!("{page}.1")), out)?;
    Ok(())
}
