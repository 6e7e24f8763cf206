//! Speaking the peer protocol as a source daemon would, up to the hello's reply.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::daemon::TestDaemon;

/// Speaks the peer protocol as a source daemon would, up to the hello's reply.
/// A stand-in source daemon's hello, in protocol `version`, presenting `token` (hex); the
/// connection and the destination's answer.
pub async fn hello_as(
    destination: &TestDaemon,
    version: u16,
    kind: migproxy_proto::Kind,
    id: &str,
    token: &str,
    (channel, flags): (u32, u8),
) -> (TcpStream, migproxy_proto::HelloReply) {
    let mut stream = TcpStream::connect(&destination.peer).await.unwrap();
    let reply = hello_on(&mut stream, version, kind, id, token, (channel, flags)).await;
    (stream, reply)
}

/// [`hello_as`] on a connection already open (a control link parked at a pause).
pub async fn hello_on(
    stream: &mut TcpStream,
    version: u16,
    kind: migproxy_proto::Kind,
    id: &str,
    token: &str,
    (channel, flags): (u32, u8),
) -> migproxy_proto::HelloReply {
    use migproxy_proto::{Hello, HelloReply};
    let token = migproxy::daemon::token::Token::from_hex(token).unwrap();
    let mut hello = Vec::new();
    Hello {
        version,
        kind,
        migration: id.into(),
        channel,
        token: *token.bytes(),
        flags,
    }
    .encode(&mut hello);
    stream.write_all(&hello).await.unwrap();
    let mut reply = vec![0; HelloReply::HEADER];
    stream.read_exact(&mut reply).await.unwrap();
    let len = migproxy_proto::reply_len(&reply).unwrap();
    reply.resize(HelloReply::HEADER + len, 0);
    stream
        .read_exact(&mut reply[HelloReply::HEADER..])
        .await
        .unwrap();
    HelloReply::decode(&reply).unwrap()
}

/// A stand-in source daemon's accepted hello in this build's protocol version; for a control
/// link, also the credential its data connections must present.
pub async fn peer_hello(
    destination: &TestDaemon,
    kind: migproxy_proto::Kind,
    id: &str,
    token: &str,
    channel_and_flags: (u32, u8),
) -> (TcpStream, String) {
    use migproxy_proto::{Status, VERSION};
    let (stream, reply) = hello_as(destination, VERSION, kind, id, token, channel_and_flags).await;
    assert_eq!(reply.status, Status::Ok, "{reply:?}");
    (stream, reply.message)
}
