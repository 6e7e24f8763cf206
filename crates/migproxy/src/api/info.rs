//! `GET /v1/info`: version, protocol, TLS or plaintext, limits, uptime.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;

use crate::daemon::Daemon;
use crate::daemon::names::Link;

use super::types::{Info, Limits, TimeoutsMs};

pub(super) async fn info(State(daemon): State<Arc<Daemon>>) -> Json<Info> {
    let config = &daemon.config;
    let timing = &config.timing;
    let ms = |d: std::time::Duration| d.as_millis() as u64;
    Json(Info {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        protocol_version: migproxy_proto::VERSION,
        link: Link::of(config.tls.is_some()),
        tls_dir: config
            .tls
            .as_ref()
            .map(|tls| tls.dir().display().to_string()),
        advertise: config.advertise.clone(),
        api_tls: config.api_tls.clone(),
        runtime_dir: config.runtime_dir.display().to_string(),
        limits: Limits {
            max_migrations: config.max_migrations,
            max_channels: config.max_channels,
            max_handshakes: config.max_handshakes,
            max_handshakes_per_address: config.max_handshakes_per_address,
            reserved_handshakes: config.reserved_handshakes,
            max_silent_connections: config.max_silent_connections,
        },
        timeouts_ms: TimeoutsMs {
            connect: ms(timing.connect_timeout),
            handshake: ms(timing.handshake_timeout),
            heartbeat: ms(timing.heartbeat_interval),
            peer: ms(timing.peer_timeout),
            stall: ms(config.stall_timeout),
            token_ttl: ms(config.token_ttl),
            first_channel: ms(config.first_channel_timeout),
            recover: ms(config.recover_timeout),
            resume: ms(config.resume_timeout),
            first_byte: ms(config.first_byte_timeout),
        },
        uptime_s: daemon.started.elapsed().as_secs(),
        peer_rejections: daemon
            .rejections
            .counts()
            .into_iter()
            .map(|(reason, count)| (reason.to_owned(), count))
            .collect(),
    })
}
