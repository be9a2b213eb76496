//! Errors of ledger operations and how they reach gRPC callers.
//!
//! A storage failure that may pass (lost connection, pool exhausted, a
//! serialization conflict that outlived its retries, Postgres shutting down) is
//! `UNAVAILABLE`, never `UNKNOWN`, so the caller's failure policy decides what to do.

use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum LedgerError {
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("storage error: {0}")]
    Storage(#[source] sqlx::Error),
}

/// SQLSTATE codes worth running the whole transaction again for.
const RETRYABLE: &[&str] = &[
    "40001", // serialization_failure
    "40P01", // deadlock_detected
];

/// SQLSTATE classes and codes that mean "the database is not there right now".
fn transient_code(code: &str) -> bool {
    code.starts_with("08") // connection exception
        || code.starts_with("53") // insufficient resources
        || code.starts_with("57P") // admin/crash shutdown, cannot connect now
        || RETRYABLE.contains(&code)
}

pub(crate) fn sqlstate(err: &sqlx::Error) -> Option<String> {
    match err {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}

pub(crate) fn constraint(err: &sqlx::Error) -> Option<&str> {
    match err {
        sqlx::Error::Database(db) => db.constraint(),
        _ => None,
    }
}

/// True for errors after which running the same transaction again can succeed.
pub(crate) fn is_retryable(err: &sqlx::Error) -> bool {
    sqlstate(err).is_some_and(|c| RETRYABLE.contains(&c.as_str()))
}

impl From<sqlx::Error> for LedgerError {
    fn from(err: sqlx::Error) -> Self {
        let transient = match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Protocol(_) => true,
            sqlx::Error::Database(db) => db.code().is_some_and(|c| transient_code(&c)),
            _ => false,
        };
        if transient {
            LedgerError::Unavailable(err)
        } else {
            LedgerError::Storage(err)
        }
    }
}

impl From<LedgerError> for Status {
    fn from(err: LedgerError) -> Self {
        match err {
            LedgerError::Unavailable(e) => {
                tracing::warn!(error = %e, "storage unavailable");
                Status::unavailable("settlement storage is unavailable")
            }
            LedgerError::InvalidArgument(m) => Status::invalid_argument(m),
            LedgerError::NotFound(m) => Status::not_found(m),
            LedgerError::AlreadyExists(m) => Status::already_exists(m),
            LedgerError::FailedPrecondition(m) => Status::failed_precondition(m),
            LedgerError::Storage(e) => {
                tracing::error!(error = %e, "storage error");
                Status::internal("settlement storage error")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_connections_are_unavailable() {
        let io = sqlx::Error::Io(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "refused",
        ));
        let status = Status::from(LedgerError::from(io));
        assert_eq!(status.code(), tonic::Code::Unavailable);
        let status = Status::from(LedgerError::from(sqlx::Error::PoolTimedOut));
        assert_eq!(status.code(), tonic::Code::Unavailable);
    }

    #[test]
    fn transient_sqlstates_are_recognised() {
        for code in ["08006", "57P01", "57P03", "53300", "40001", "40P01"] {
            assert!(transient_code(code), "{code}");
        }
        for code in ["23505", "23514", "22003", "42P01"] {
            assert!(!transient_code(code), "{code}");
        }
    }
}
