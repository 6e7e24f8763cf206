//! Records the git revision the binary is built from, for `migproxy --version`.
//!
//! The build never fails for it: outside a git checkout (a source tarball, a Debian source
//! package) or without git, the revision is `MIGPROXY_GIT_REVISION` from the environment
//! when set, else `unknown`. A worktree has `.git` as a file, and a clean clone may keep its
//! branch in `packed-refs`: git itself answers where HEAD and its ref live, so the script
//! reruns exactly when the commit changes, not on every edit.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=MIGPROXY_GIT_REVISION");
    let revision = std::env::var("MIGPROXY_GIT_REVISION")
        .ok()
        .filter(|value| !value.trim().is_empty())
        .or_else(git_revision)
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MIGPROXY_GIT_REVISION={}", revision.trim());
}

/// The commit checked out. Not marked `-dirty`: an edit after the build script ran would not
/// rerun it, and a mark that can be stale is worse than none.
fn git_revision() -> Option<String> {
    let commit = git(&["rev-parse", "--short=12", "HEAD"])?;
    watch_head();
    Some(commit)
}

/// Reruns the script when HEAD moves: HEAD itself (a checkout), the branch's ref file (a
/// commit) and packed-refs (a branch that lives there).
fn watch_head() {
    let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]).map(PathBuf::from) else {
        return;
    };
    let common = git(&["rev-parse", "--git-common-dir"])
        .map(|dir| absolute(&git_dir, &dir))
        .unwrap_or_else(|| git_dir.clone());
    rerun_if_exists(&git_dir.join("HEAD"));
    rerun_if_exists(&common.join("packed-refs"));
    if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
        rerun_if_exists(&common.join(branch));
    }
}

/// `--git-common-dir` may answer relative to the current directory (`.git`).
fn absolute(git_dir: &Path, dir: &str) -> PathBuf {
    let path = PathBuf::from(dir);
    if path.is_absolute() {
        path
    } else {
        std::env::current_dir()
            .map(|cwd| cwd.join(&path))
            .unwrap_or_else(|_| git_dir.to_path_buf())
    }
}

fn rerun_if_exists(path: &Path) {
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

/// git's answer, trimmed; `None` when git is missing, fails, or this is no checkout.
fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8(output.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}
