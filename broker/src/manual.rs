//! `canopy generate-manual DIR` (hidden): the man pages and shell
//! completions, rendered from the clap definitions in `cli.rs`, plus the
//! hand-written config page `canopy.toml(5)`. Packaging runs it after the
//! build (scripts/deb.sh).

use anyhow::{anyhow, Result};
use clap::CommandFactory;
use std::path::{Path, PathBuf};

/// canopy.toml(5), written by hand from docs/config.md.
const CONFIG_PAGE: &str = include_str!("../man/canopy.toml.5");

/// Write DIR/man/*.1, DIR/man/canopy.toml.5 and DIR/completions/*.
/// Returns the files written.
pub(crate) fn generate(dir: &Path) -> Result<Vec<PathBuf>> {
    let man = dir.join("man");
    let completions = dir.join("completions");
    for d in [&man, &completions] {
        std::fs::create_dir_all(d).map_err(|e| {
            anyhow!(
                "cannot create {}: {e}; pass a directory you can write",
                d.display()
            )
        })?;
    }
    let mut written = Vec::new();
    let cmd = crate::cli::Cli::command();
    write_pages(&cmd, &man, &mut written)?;
    let page5 = man.join("canopy.toml.5");
    std::fs::write(&page5, CONFIG_PAGE)
        .map_err(|e| anyhow!("cannot write {}: {e}", page5.display()))?;
    written.push(page5);
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        let mut cmd = without_hidden(crate::cli::Cli::command());
        let path =
            clap_complete::generate_to(shell, &mut cmd, "canopy", &completions).map_err(|e| {
                anyhow!(
                    "cannot write the {shell} completions in {}: {e}",
                    completions.display()
                )
            })?;
        written.push(path);
    }
    Ok(written)
}

/// The command without its hidden subcommands (clap_complete offers them
/// otherwise), e.g. `generate-manual`.
fn without_hidden(cmd: clap::Command) -> clap::Command {
    let visible: Vec<clap::Command> = cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set())
        .cloned()
        .collect();
    let mut root = clap::Command::new(cmd.get_name().to_string())
        .version(env!("CANOPY_LONG_VERSION"))
        .subcommand_required(cmd.is_subcommand_required_set())
        .args(cmd.get_arguments().cloned())
        .subcommands(visible);
    if let Some(about) = cmd.get_about() {
        root = root.about(about.clone());
    }
    root
}

/// canopy(1), then one page per visible subcommand, recursively:
/// canopy-key(1), canopy-key-new(1), ...
fn write_pages(cmd: &clap::Command, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    // No `help` subcommand in the pages: it has no page of its own.
    let mut cmd = cmd.clone().disable_help_subcommand(true);
    cmd.build();
    page(&cmd, "canopy", dir, written)
}

fn page(cmd: &clap::Command, name: &str, dir: &Path, written: &mut Vec<PathBuf>) -> Result<()> {
    // The page's title and synopsis use the full command, e.g. `canopy key new`.
    let bin = name.replace('-', " ");
    let titled = cmd
        .clone()
        .name(name.to_string())
        .bin_name(bin)
        .version(env!("CANOPY_LONG_VERSION"));
    let path = dir.join(format!("{name}.1"));
    let mut buf = Vec::new();
    clap_mangen::Man::new(titled)
        .date(env!("CANOPY_BUILD_DATE"))
        .source(format!("canopy {}", env!("CARGO_PKG_VERSION")))
        .manual("Canopy Manual")
        .render(&mut buf)
        .map_err(|e| anyhow!("cannot render {}: {e}", path.display()))?;
    std::fs::write(&path, buf).map_err(|e| anyhow!("cannot write {}: {e}", path.display()))?;
    written.push(path);
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() {
            continue;
        }
        page(sub, &format!("{name}-{}", sub.get_name()), dir, written)?;
    }
    Ok(())
}
