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
            // A value can come from a hostile file: quote a short, escaped excerpt.
            value: excerpt(&value.to_string()),
            why: why.into(),
        }
    }

    /// The same error with truesize's field names replaced by the spelling of the file the user
    /// wrote (`n_embd` -> `hidden_size` for a Llama config.json), in the field and the reason.
    /// `spelling` pairs (truesize name, user's name).
    pub fn respelled(self, spelling: &[(&str, &str)]) -> Self {
        match self {
            Error::InvalidField {
                source_name,
                field,
                value,
                why,
            } => {
                let swap = |w: &str| {
                    spelling
                        .iter()
                        .find(|(ours, _)| *ours == w)
                        .map_or(w.to_string(), |(_, theirs)| theirs.to_string())
                };
                // Whole identifiers only: `n_head` must not rewrite `n_heads`.
                let mut out = String::with_capacity(why.len());
                let mut word = String::new();
                for c in why.chars().chain(std::iter::once(' ')) {
                    if c.is_ascii_alphanumeric() || c == '_' {
                        word.push(c);
                    } else {
                        out.push_str(&swap(&word));
                        word.clear();
                        out.push(c);
                    }
                }
                out.pop();
                Error::InvalidField {
                    source_name,
                    field: swap(&field),
                    value,
                    why: out,
                }
            }
            e => e,
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

// ---------------------------------------------------------------------------------------------
// Text from user files, made safe to print

/// How much of a bad value an error message quotes.
pub const MAX_EXCERPT_CHARS: usize = 80;

/// `s` with every control character (ESC, NUL, CR, BEL…) and Unicode bidirectional override
/// escaped, so that text from a user's file cannot drive the terminal it is printed on.
/// Newlines and tabs stay: messages and tables use them.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    let bad = |c: char| {
        (c.is_control() && c != '\n' && c != '\t') || ('\u{202a}'..='\u{202e}').contains(&c)
    };
    if !s.chars().any(bad) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if bad(c) {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// A short, escaped excerpt of a value for an error message: at most [`MAX_EXCERPT_CHARS`]
/// characters, with the full length said when it was cut.
pub fn excerpt(s: &str) -> String {
    let n = s.chars().count();
    let cut: String = s.chars().take(MAX_EXCERPT_CHARS).collect();
    let cut = printable(&cut).into_owned();
    if n > MAX_EXCERPT_CHARS {
        format!("{cut}… ({} bytes in all)", s.len())
    } else {
        cut
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn printable_escapes_terminal_control() {
        assert_eq!(printable("plain"), "plain");
        assert_eq!(printable("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
        assert_eq!(printable("l1\nl2\t"), "l1\nl2\t");
        let long = "z".repeat(500);
        let e = excerpt(&long);
        assert!(e.starts_with(&"z".repeat(80)) && e.ends_with("(500 bytes in all)"));
    }
}
