//! What the command line shares as a process: exit codes, stdout that a closed pipe ends
//! quietly, and cancellation on SIGINT and SIGTERM.

/// Exit code for a command that ran but did not succeed.
pub const EXIT_FAILED: u8 = 1;
/// Exit code for bad flags or arguments (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// Writes the command's output; see [`say!`].
pub fn write_stdout(text: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        if error.kind() == std::io::ErrorKind::BrokenPipe {
            die_of_sigpipe();
        }
        eprintln!(
            "migproxy: cannot write to stdout: {}",
            crate::human::OsError(&error)
        );
        std::process::exit(EXIT_FAILED.into());
    }
}

/// Ends the process as the kernel ends a writer to a closed pipe, so that the shell sees
/// what it sees of `yes | head -1`.
#[allow(unsafe_code)]
fn die_of_sigpipe() -> ! {
    use nix::sys::signal::{SigHandler, Signal, raise, signal};
    // SAFETY: SIG_DFL installs no handler of ours, so no code of ours runs in signal context.
    let _ = unsafe { signal(Signal::SIGPIPE, SigHandler::SigDfl) };
    let _ = raise(Signal::SIGPIPE);
    // Not reached: SIGPIPE's default action ends the process. 128 + 13 as the shell would say.
    std::process::exit(141)
}

/// Cancels `shutdown` on the first SIGINT or SIGTERM; says on stderr, as `who`, that `what`
/// is being cancelled.
pub(super) fn cancel_on_signals(
    shutdown: tokio_util::sync::CancellationToken,
    who: &'static str,
    what: &'static str,
) -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::spawn(async move {
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        eprintln!("{who}: {name} received, cancelling {what}");
        shutdown.cancel();
    });
    Ok(())
}
