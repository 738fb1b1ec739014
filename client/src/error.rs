//! SDK errors. Each variant says whose fault it is: the server's answer
//! ([`ClientError::Server`]), the network ([`ClientError::Io`],
//! [`ClientError::Closed`]), the peer's bytes ([`ClientError::Decode`]), the
//! local profile ([`ClientError::Profile`]) or the caller
//! ([`ClientError::InvalidArgument`]).

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use starling_protocol::v1::{self, ErrorCode};
use starling_protocol::{DecodeError, EncodeError};

use crate::ids::ClientMsgId;

/// An `Error` frame from the server, kept with its raw code so that codes
/// this SDK does not know survive (they are treated as `INTERNAL`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// The numeric code as sent.
    pub code_num: i32,
    /// Human-readable detail (for logs; never parse it).
    pub message: String,
    /// Retrying earlier than this will fail again (0: no hint).
    pub retry_after_ms: u32,
}

impl ServerError {
    /// The code; unknown numbers map to [`ErrorCode::Internal`].
    #[must_use]
    pub fn code(&self) -> ErrorCode {
        ErrorCode::try_from(self.code_num).unwrap_or(ErrorCode::Internal)
    }

    /// The code's stable name without the `ERROR_CODE_` prefix, e.g.
    /// `"TOKEN_EXPIRED"`.
    #[must_use]
    pub fn code_name(&self) -> &'static str {
        let name = self.code().as_str_name();
        name.strip_prefix("ERROR_CODE_").unwrap_or(name)
    }

    /// True when the same request may succeed later (overload, outage,
    /// rate limit); false when retrying unchanged cannot help.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        matches!(
            self.code(),
            ErrorCode::TooManyInFlight
                | ErrorCode::HeartbeatTimeout
                | ErrorCode::DeadlineExceeded
                | ErrorCode::SlowConsumer
                | ErrorCode::RateLimited
                | ErrorCode::Internal
                | ErrorCode::Unavailable
                | ErrorCode::StorageFailure
                | ErrorCode::ShuttingDown
                | ErrorCode::Overloaded
        )
    }

    /// True when the session is gone for good and the user must sign in
    /// again.
    #[must_use]
    pub fn is_session_lost(&self) -> bool {
        matches!(
            self.code(),
            ErrorCode::SessionRevoked | ErrorCode::RefreshTokenReused | ErrorCode::TokenInvalid
        )
    }
}

impl From<v1::Error> for ServerError {
    fn from(e: v1::Error) -> Self {
        Self {
            code_num: e.code,
            message: e.message,
            retry_after_ms: e.retry_after_ms,
        }
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.code_name(), self.code_num)?;
        if !self.message.is_empty() {
            write!(f, ": {}", self.message)?;
        }
        if self.retry_after_ms > 0 {
            write!(f, " (retry after {} ms)", self.retry_after_ms)?;
        }
        Ok(())
    }
}

/// Everything that can go wrong in the SDK.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered the request with `Error`.
    #[error("server error {0}")]
    Server(ServerError),
    /// A socket operation failed (network's fault).
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// TLS set-up or handshake failed (bad CA, pin mismatch, ...).
    #[error("tls: {0}")]
    Tls(String),
    /// The server sent bytes that are not a valid frame (server's fault).
    #[error("server sent an invalid frame: {0}")]
    Decode(#[from] DecodeError),
    /// A frame was too large for the server's limit (caller's fault).
    #[error("frame not sent: {0}")]
    Encode(#[from] EncodeError),
    /// The server answered with a frame that does not fit the request.
    #[error("server answered {got} where {expected} was expected")]
    UnexpectedResponse {
        /// What the request expects.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// The connection is closed (the reason says why).
    #[error("connection closed: {0}")]
    Closed(String),
    /// No answer in time.
    #[error("no {what} within {after:?}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long we waited.
        after: Duration,
    },
    /// The profile has no credentials: register or log in first.
    #[error("not logged in: no credentials in {0}")]
    NotLoggedIn(PathBuf),
    /// The session ended for good (revoked, or the refresh token was
    /// rejected): log in again.
    #[error("session ended: {0}")]
    SessionLost(String),
    /// Reading or writing the profile directory failed.
    #[error("profile {path}: {source}")]
    Profile {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A profile file is not valid JSON of the expected shape.
    #[error("profile {path}: {source}")]
    ProfileFormat {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: serde_json::Error,
    },
    /// A bad argument from the caller.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A media transfer failed: the endpoint refused it (its status and reason), or the bytes
    /// did not match their id.
    #[error("media: {0}")]
    Media(String),
    /// The send did not go through yet; the message stays in the outbox and
    /// is retried under the same `client_msg_id`.
    #[error("message {client_msg_id} kept in the outbox for retry: {cause}")]
    StillQueued {
        /// The queued message.
        client_msg_id: ClientMsgId,
        /// Why this attempt failed.
        cause: Box<ClientError>,
    },
    /// The client was shut down.
    #[error("client stopped")]
    Stopped,
}

impl ClientError {
    /// The server's error, if this is (or wraps) one.
    #[must_use]
    pub fn server(&self) -> Option<&ServerError> {
        match self {
            ClientError::Server(e) => Some(e),
            ClientError::StillQueued { cause, .. } => cause.server(),
            _ => None,
        }
    }

    /// True when the same request may succeed after a reconnect or a wait.
    #[must_use]
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Server(e) => e.is_transient(),
            ClientError::Io(_)
            | ClientError::Closed(_)
            | ClientError::Timeout { .. }
            | ClientError::Decode(_)
            | ClientError::Tls(_) => true,
            ClientError::StillQueued { .. } => true,
            _ => false,
        }
    }

    pub(crate) fn unexpected(expected: &'static str, got: Option<&v1::frame::Body>) -> Self {
        ClientError::UnexpectedResponse {
            expected,
            got: got.map_or_else(
                || "an empty frame".to_owned(),
                |b| b.kind().name().to_owned(),
            ),
        }
    }
}
