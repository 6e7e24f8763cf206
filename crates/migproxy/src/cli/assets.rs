//! `migproxy assets DIR` (hidden): the man pages and the shell completions, generated from
//! this binary's own command-line definitions so that they cannot drift from it.
//!
//! A subcommand rather than a build script: the definitions are the `cli` module's clap
//! types, which need the whole library to compile; a build script would have to compile
//! them a second time. The package build (`scripts/deb`) runs the release binary it packs.

use std::io;
use std::path::{Path, PathBuf};

use clap::{Args as _, FromArgMatches};
use clap_complete::Shell;

use super::process::EXIT_FAILED;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Directory to fill: `man/` (migproxy.1, one page per subcommand) and `completions/`
    /// (bash, zsh, fish). Created when missing; files there are replaced.
    #[arg(value_name = "DIR")]
    out: PathBuf,
}

/// The shells whose completions the package ships, with their file names as generated.
const SHELLS: [Shell; 3] = [Shell::Bash, Shell::Zsh, Shell::Fish];

pub const NAME: &str = "assets";

/// The subcommand, hidden from `--help`.
pub fn command() -> clap::Command {
    Args::augment_args(
        clap::Command::new(NAME)
            .about("Write the man pages and shell completions (for the package; see scripts/deb)")
            .hide(true),
    )
}

/// Writes the assets for `command`, the program's clap definition (without this subcommand).
pub fn run(matches: &clap::ArgMatches, command: clap::Command) -> u8 {
    let args = match Args::from_arg_matches(matches) {
        Ok(args) => args,
        Err(error) => error.exit(),
    };
    match write(&args.out, command) {
        Ok(written) => {
            for path in written {
                say!("{}", path.display());
            }
            0
        }
        Err(error) => {
            eprintln!("migproxy assets: {}: {error}", args.out.display());
            EXIT_FAILED
        }
    }
}

/// Writes every page and completion; returns their paths.
fn write(out: &Path, command: clap::Command) -> io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let completions = out.join("completions");
    std::fs::create_dir_all(&man)?;
    std::fs::create_dir_all(&completions)?;
    // Recurses into every subcommand that is not hidden (this one is), one page each:
    // migproxy-relay.1, migproxy-migration-create-incoming.1, …
    clap_mangen::generate_to(command.clone(), &man)?;
    let mut written = sorted_files(&man)?;
    let mut command = command;
    let name = command.get_name().to_owned();
    for shell in SHELLS {
        written.push(clap_complete::generate_to(
            shell,
            &mut command,
            &name,
            &completions,
        )?);
    }
    Ok(written)
}

fn sorted_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = std::fs::read_dir(dir)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<io::Result<Vec<_>>>()?;
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn program() -> clap::Command {
        clap::Command::new("prog")
            .version("1.2.3 (git abc)")
            .subcommand(clap::Command::new("run").about("Runs"))
            .subcommand(
                clap::Command::new("group").subcommand(clap::Command::new("list").about("Lists")),
            )
            .subcommand(clap::Command::new("secret").hide(true))
    }

    #[test]
    fn one_page_per_visible_subcommand_and_three_completions() {
        let dir = tempfile::tempdir().unwrap();
        let written = write(dir.path(), program()).unwrap();
        let names: Vec<String> = written
            .iter()
            .map(|path| path.strip_prefix(dir.path()).unwrap().display().to_string())
            .collect();
        assert_eq!(
            names,
            [
                "man/prog-group-list.1",
                "man/prog-group.1",
                "man/prog-run.1",
                "man/prog.1",
                "completions/prog.bash",
                "completions/_prog",
                "completions/prog.fish",
            ]
        );
        let page = std::fs::read_to_string(dir.path().join("man/prog.1")).unwrap();
        assert!(page.contains("1.2.3 (git abc)"), "{page}");
        assert!(page.contains("prog\\-run(1)"), "{page}");
    }

    #[test]
    fn an_unwritable_directory_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert!(write(&file, program()).is_err());
    }
}
