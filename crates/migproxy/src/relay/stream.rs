//! One direction between two byte streams that are not both plain sockets (TLS, in-memory):
//! a copy through one large buffer, reused for the whole stream.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::counters::Counters;
use super::pump::{Direction, Op, Options, PumpError, TapFn, Turn};

/// Moves one direction until end of stream, then shuts the writer down.
pub(super) async fn pump(
    mut reader: impl AsyncRead + Unpin,
    mut writer: impl AsyncWrite + Unpin,
    direction: Direction,
    counters: &Counters,
    options: &Options,
    tap: Option<TapFn>,
) -> Result<(), PumpError> {
    let mut buf = vec![0u8; options.copy_buffer].into_boxed_slice();
    let mut turn = Turn::new();
    loop {
        let filled = reader.read(&mut buf).await.map_err(PumpError::read)?;
        if filled == 0 {
            counters.mark_end(direction);
            break;
        }
        if let Some(TapFn(tap)) = &tap {
            tap(&buf[..filled]);
        }
        counters.hold(direction, filled);
        // Delivered once flushed: a layer that buffers (TLS, up to 1 MiB of sealed records)
        // has not delivered what it merely accepted, and must not sit on a small
        // return-path message either. On failure the whole chunk counts as undelivered.
        writer
            .write_all(&buf[..filled])
            .await
            .and(writer.flush().await)
            .map_err(|e| PumpError::write(e).holding(filled))?;
        counters.record(direction, filled, false);
        turn.take().await;
    }
    writer.shutdown().await.map_err(|error| PumpError {
        op: Op::Shutdown,
        error,
        held: 0,
    })
}
