//! `GET /v1/info`: version, protocol, TLS or plaintext, limits, uptime.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use serde_json::json;

use crate::daemon::Daemon;

pub(super) async fn info(State(daemon): State<Arc<Daemon>>) -> Json<serde_json::Value> {
    let config = &daemon.config;
    let timing = &config.timing;
    Json(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "protocol_version": migproxy_proto::VERSION,
        "link": if config.tls.is_some() { "tls" } else { "plaintext" },
        "tls_dir": config.tls.as_ref().map(|tls| tls.dir().display().to_string()),
        "advertise": config.advertise,
        "api_tls": config.api_tls,
        "runtime_dir": config.runtime_dir.display().to_string(),
        "limits": {
            "max_migrations": config.max_migrations,
            "max_channels": config.max_channels,
            "max_handshakes": config.max_handshakes,
            "max_handshakes_per_address": config.max_handshakes_per_address,
            "reserved_handshakes": config.reserved_handshakes,
            "max_silent_connections": config.max_silent_connections,
        },
        "timeouts_ms": {
            "connect": timing.connect_timeout.as_millis() as u64,
            "handshake": timing.handshake_timeout.as_millis() as u64,
            "heartbeat": timing.heartbeat_interval.as_millis() as u64,
            "peer": timing.peer_timeout.as_millis() as u64,
            "stall": config.stall_timeout.as_millis() as u64,
            "token_ttl": config.token_ttl.as_millis() as u64,
            "first_channel": config.first_channel_timeout.as_millis() as u64,
            "first_byte": config.first_byte_timeout.as_millis() as u64,
        },
        "uptime_s": daemon.started.elapsed().as_secs(),
        "peer_rejections": daemon.rejections.counts(),
    }))
}
