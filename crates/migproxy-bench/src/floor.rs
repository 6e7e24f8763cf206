//! The simplest splice relay there can be, as a yardstick: one connection, two blocking
//! threads, each `splice(socket → pipe)` then `splice(pipe → socket)` until end of stream —
//! no event loop, no counters, no cancellation, no error reports. Whatever a splice relay
//! does on this machine, this does no more, so its throughput is the ceiling of every
//! splice-based proxy here (migproxy's relay and haproxy's `splice-auto` alike). Run by the
//! synthetic benchmark as `migproxy-bench splice-floor PORT SINK_PORT`.

use std::io;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};

use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};

use crate::BenchError;

const PIPE: usize = 1 << 20;

/// Accepts one connection on `port`, connects it to `sink`, relays both ways to their ends.
pub fn run(port: u16, sink: u16) -> Result<(), BenchError> {
    let listener = TcpListener::bind(("127.0.0.1", port))?;
    let (client, _) = listener.accept()?;
    let server = TcpStream::connect(("127.0.0.1", sink))?;
    for stream in [&client, &server] {
        stream.set_nodelay(true)?;
    }
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    let back = std::thread::spawn(move || pump(&server2, &client2));
    pump(&client, &server)?;
    back.join().map_err(|_| "a splice thread panicked")??;
    // Stay until the benchmark kills it, which reads its peak RSS first (a process that has
    // exited has none to read).
    loop {
        std::thread::park();
    }
}

fn pump(from: &TcpStream, to: &TcpStream) -> io::Result<()> {
    let (read, write) = nix::unistd::pipe()?;
    fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE as i32))?;
    loop {
        let mut held = splice(
            from.as_fd(),
            None,
            &write,
            None,
            PIPE,
            SpliceFFlags::SPLICE_F_MOVE,
        )?;
        if held == 0 {
            to.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        while held > 0 {
            held -= splice(
                &read,
                None,
                to.as_fd(),
                None,
                held,
                SpliceFFlags::SPLICE_F_MOVE,
            )?;
        }
    }
}
