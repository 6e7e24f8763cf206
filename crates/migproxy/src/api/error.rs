//! The API's error answer: `{"error": "...", "causes": [...]}` with a status that says whose
//! fault it is; `causes` is the error's `source()` chain.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::types::ErrorBody;

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    pub(super) error: String,
    causes: Vec<String>,
}

impl ApiError {
    pub(super) fn new(status: StatusCode, error: impl Into<String>) -> ApiError {
        ApiError {
            status,
            error: error.into(),
            causes: Vec::new(),
        }
    }

    pub(super) fn bad_request(error: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, error)
    }

    /// `error` as the message, its sources as the causes.
    pub(super) fn chain(status: StatusCode, error: &dyn std::error::Error) -> ApiError {
        ApiError {
            status,
            error: error.to_string(),
            causes: crate::human::causes(error),
        }
    }

    /// A request field that does not hold: the field named, then the error; its sources as
    /// the causes.
    pub(super) fn field(field: &str, error: &dyn std::error::Error) -> ApiError {
        let mut answer = ApiError::chain(StatusCode::BAD_REQUEST, error);
        answer.error = format!("{field}: {}", answer.error);
        answer
    }

    /// `self` with `cause` and its sources as the causes.
    pub(super) fn caused_by(mut self, cause: &dyn std::error::Error) -> ApiError {
        self.causes = std::iter::once(cause.to_string())
            .chain(crate::human::causes(cause))
            .collect();
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.error,
            causes: self.causes,
        };
        (self.status, Json(body)).into_response()
    }
}
