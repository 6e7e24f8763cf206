//! `GET /v1/events[?migration=ID]`: server-sent events, one per state change or channel
//! event.

use std::sync::Arc;

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::daemon::Daemon;

use super::error::ApiError;
use super::types::Lagged;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    migration: Option<String>,
}

/// Server-sent events, one per state change or channel event, as JSON; a client too slow to
/// keep up gets a `lagged` event saying how many it missed.
pub(super) async fn events(
    State(daemon): State<Arc<Daemon>>,
    query: Result<axum::extract::Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use tokio_stream::StreamExt;
    use tokio_stream::wrappers::BroadcastStream;
    use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

    let query = query.map_err(|e| ApiError::bad_request(format!("query: {}", e.body_text())))?;
    let wanted = query.0.migration;
    // The daemon publishes a `shutdown` event when it stops: the stream ends there, so that
    // an open subscription does not hold up graceful shutdown.
    let stream = BroadcastStream::new(daemon.events.subscribe())
        .take_while(|event| !matches!(event, Ok(e) if e.name() == "shutdown"))
        .filter_map(move |event| match event {
            Ok(event) => {
                let matches = wanted
                    .as_ref()
                    .is_none_or(|id| event.migration.as_ref() == Some(id));
                let data = serde_json::to_string(&event).unwrap_or_default();
                matches.then(|| {
                    Ok::<_, std::convert::Infallible>(
                        Event::default().event(event.name()).data(data),
                    )
                })
            }
            Err(BroadcastStreamRecvError::Lagged(missed)) => Some(Ok(Event::default()
                .event("lagged")
                .data(serde_json::to_string(&Lagged { missed }).unwrap_or_default()))),
        });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}
