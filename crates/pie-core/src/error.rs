//! The one error type of pie-core. Every message says what to change.

use std::fmt;

/// Result alias used throughout pie-core.
pub type Result<T, E = PieError> = std::result::Result<T, E>;

/// Which part of the system an error comes from; bindings map each kind to one
/// exception class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The device budget cannot hold what was asked (for example not even one layer).
    Budget,
    /// An argument or configuration is invalid (shapes, indices, plan, options).
    Config,
    /// The backend (driver, allocation, copy engine) failed.
    Backend,
    /// The engine was used in a way its state does not allow (closed, poisoned, wrong order).
    State,
    /// An engine invariant broke: a bug in pie-rs, not the caller's doing.
    Internal,
}

/// An error raised by the engine or a backend.
#[derive(Debug, thiserror::Error)]
pub enum PieError {
    /// The device budget is too small or otherwise unusable.
    #[error("{0}")]
    Budget(String),
    /// Invalid argument or configuration.
    #[error("{0}")]
    Config(String),
    /// A backend call failed; `call` names the failing operation.
    #[error("{call} failed: {message}")]
    Backend {
        /// The failing call, e.g. `cuMemAlloc_v2` or `host arena allocation`.
        call: String,
        /// What went wrong and what to change.
        message: String,
    },
    /// The engine's state does not allow this operation.
    #[error("{0}")]
    State(String),
    /// An engine invariant broke (a bug in pie-rs).
    #[error("internal error in pie-rs, please report it: {0}")]
    Internal(String),
}

impl PieError {
    /// The category of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            PieError::Budget(_) => ErrorKind::Budget,
            PieError::Config(_) => ErrorKind::Config,
            PieError::Backend { .. } => ErrorKind::Backend,
            PieError::State(_) => ErrorKind::State,
            PieError::Internal(_) => ErrorKind::Internal,
        }
    }

    /// Shorthand for a [`PieError::Config`].
    pub fn config(msg: impl fmt::Display) -> Self {
        PieError::Config(msg.to_string())
    }

    /// Shorthand for a [`PieError::Budget`].
    pub fn budget(msg: impl fmt::Display) -> Self {
        PieError::Budget(msg.to_string())
    }

    /// Shorthand for a [`PieError::State`].
    pub fn state(msg: impl fmt::Display) -> Self {
        PieError::State(msg.to_string())
    }

    /// Shorthand for a [`PieError::Internal`].
    pub fn internal(msg: impl fmt::Display) -> Self {
        PieError::Internal(msg.to_string())
    }

    /// Shorthand for a [`PieError::Backend`] naming the failing call.
    pub fn backend(call: impl fmt::Display, msg: impl fmt::Display) -> Self {
        PieError::Backend {
            call: call.to_string(),
            message: msg.to_string(),
        }
    }
}
