//! The simplest splice relay there can be, as a yardstick: one connection, two blocking
//! threads, each `splice(socket → pipe)` then `splice(pipe → socket)` until end of stream —
//! no event loop, no counters, no cancellation, no error reports. It does only what every
//! splice-based proxy must (migproxy's relay and daemons, haproxy's `splice-auto`): when
//! migproxy is as fast, what it adds costs nothing measurable, and what is left between it
//! and a target is the kernel's socket and splice path that any such proxy pays.
//! Run by the benchmarks as `migproxy-bench splice-floor LISTEN CONNECT`, each `PORT` (TCP on
//! 127.0.0.1), `ADDR:PORT` or `unix:PATH`.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::net::{UnixListener, UnixStream};

use nix::fcntl::{FcntlArg, SpliceFFlags, fcntl, splice};

use crate::measure::BenchError;

const PIPE: usize = 1 << 20;

/// A connected socket of either kind.
enum Conn {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Conn {
    fn accept(listen: &str) -> io::Result<Conn> {
        Ok(match listen.strip_prefix("unix:") {
            Some(path) => {
                // Bound and listening under another name first: the file appears ready.
                let early = format!("{path}.binding");
                let _ = std::fs::remove_file(&early);
                let listener = UnixListener::bind(&early)?;
                std::fs::rename(&early, path)?;
                Conn::Unix(listener.accept()?.0)
            }
            None => Conn::Tcp(TcpListener::bind(address(listen)?)?.accept()?.0),
        })
    }

    /// Connects, retrying for a few seconds while nobody listens yet (the other relay of a
    /// pair may still be starting).
    fn connect(to: &str) -> io::Result<Conn> {
        let started = std::time::Instant::now();
        loop {
            match Conn::connect_once(to) {
                Err(e)
                    if e.kind() == io::ErrorKind::ConnectionRefused
                        && started.elapsed() < std::time::Duration::from_secs(5) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                other => return other,
            }
        }
    }

    fn connect_once(to: &str) -> io::Result<Conn> {
        Ok(match to.strip_prefix("unix:") {
            Some(path) => Conn::Unix(UnixStream::connect(path)?),
            None => {
                let stream = TcpStream::connect(address(to)?)?;
                stream.set_nodelay(true)?;
                Conn::Tcp(stream)
            }
        })
    }

    fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
        })
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Tcp(s) => s.as_fd(),
            Conn::Unix(s) => s.as_fd(),
        }
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Conn::Tcp(s) => s.shutdown(Shutdown::Write),
            Conn::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

/// `PORT` (on 127.0.0.1) or `ADDR:PORT`.
fn address(text: &str) -> io::Result<SocketAddr> {
    if let Ok(address) = text.parse() {
        return Ok(address);
    }
    let port: u16 = text
        .parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("not a port: {text}")))?;
    Ok(SocketAddr::from(([127, 0, 0, 1], port)))
}

/// Accepts one connection on `listen`, connects it to `connect`, relays both ways to their
/// ends, then waits to be killed.
pub fn run(listen: &str, connect: &str) -> Result<(), BenchError> {
    let client = Conn::accept(listen)?;
    let server = Conn::connect(connect)?;
    if let Conn::Tcp(s) = &client {
        s.set_nodelay(true)?;
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

fn pump(from: &Conn, to: &Conn) -> io::Result<()> {
    let (read, write) = nix::unistd::pipe()?;
    fcntl(write.as_raw_fd(), FcntlArg::F_SETPIPE_SZ(PIPE as i32))?;
    loop {
        let mut held = splice(
            from.fd(),
            None,
            &write,
            None,
            PIPE,
            SpliceFFlags::SPLICE_F_MOVE,
        )?;
        if held == 0 {
            return to.shutdown_write();
        }
        while held > 0 {
            held -= splice(
                &read,
                None,
                to.fd(),
                None,
                held,
                SpliceFFlags::SPLICE_F_MOVE,
            )?;
        }
    }
}
