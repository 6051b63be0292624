//! One error type for the whole tool, and the one place that maps errors to exit codes.

use std::path::PathBuf;

/// Exit code when every check passed.
pub const EXIT_OK: u8 = 0;
/// Exit code when a check failed or a run was refused for resources.
pub const EXIT_CHECK_FAILED: u8 = 1;
/// Exit code for bad input (and any other error): the message names the file, field and value.
pub const EXIT_BAD_INPUT: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value that is present but wrong: names the source, the field and the value.
    #[error("{source_name}: {field} = {value}: {why}")]
    InvalidField {
        source_name: String,
        field: String,
        value: String,
        why: String,
    },
    /// A file that could not be read or parsed at all.
    #[error("{path}: {why}")]
    File { path: PathBuf, why: String },
    /// Anything the user asked for that does not exist (preset, device, dtype...).
    #[error("{0}")]
    Usage(String),
    /// The run would need more memory than the device has; refused before allocating.
    #[error("{0}")]
    Refused(String),
    /// The output could not be written (a full disk, a closed stdout that is not a pipe).
    #[error("cannot write the output: {0}")]
    Output(String),
    /// A failure inside candle or elsewhere that is not the user's input.
    #[error("{0:#}")]
    Internal(#[from] anyhow::Error),
}

impl Error {
    pub fn field(
        source_name: impl Into<String>,
        field: impl Into<String>,
        value: impl std::fmt::Display,
        why: impl Into<String>,
    ) -> Self {
        Error::InvalidField {
            source_name: source_name.into(),
            field: field.into(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    pub fn file(path: impl Into<PathBuf>, why: impl std::fmt::Display) -> Self {
        Error::File {
            path: path.into(),
            why: why.to_string(),
        }
    }

    /// The exit code, decided here and nowhere else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::InvalidField { .. } | Error::File { .. } | Error::Usage(_) => EXIT_BAD_INPUT,
            Error::Refused(_) => EXIT_CHECK_FAILED,
            Error::Internal(_) | Error::Output(_) => EXIT_BAD_INPUT,
        }
    }
}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        Error::Internal(anyhow::Error::new(without_backtrace(e)))
    }
}

/// candle attaches a backtrace to its errors when RUST_BACKTRACE is set, and prints it as part
/// of the message: a user's terminal gets the cause, not a stack.
pub fn without_backtrace(e: candle_core::Error) -> candle_core::Error {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        candle_core::Error::Context { inner, context } => candle_core::Error::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        e => e,
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
