//! `GET /metrics`: Prometheus text.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;

use crate::daemon::Daemon;

pub(super) async fn metrics(State(daemon): State<Arc<Daemon>>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        daemon.render_metrics(),
    )
}
