//! One error type for the whole crate. Its `kind` is what the C ABI maps to a status
//! and what the metrics count under `errors_total{kind=…}`.

use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// A caller passed something unusable (bad setting, NULL, empty name).
    InvalidArgument,
    /// Reading or writing a file failed.
    Io,
    /// A file or config is malformed: corrupt safetensors, bad JSON, missing field.
    Format,
    /// Tensor shapes do not fit together (B·A vs base, rank of A vs rank of B, …).
    Shape,
    /// NaN or Inf in an adapter tensor, or in a base tensor.
    NonFinite,
    /// Valid input the library refuses on purpose (pickle weights, a dtype it cannot read, …).
    Unsupported,
    /// Adapter modules that match no base tensor (or several), or no module at all.
    BaseMismatch,
    /// A configured limit (file size, header size, rank, dimension) was exceeded.
    Limit,
    /// The CUDA backend was asked for and cannot run.
    Cuda,
    /// A bug or numerical failure inside the library.
    Internal,
}

impl ErrorKind {
    /// Stable lower-case label, used in JSON and in metrics.
    pub fn label(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "invalid_argument",
            ErrorKind::Io => "io",
            ErrorKind::Format => "format",
            ErrorKind::Shape => "shape",
            ErrorKind::NonFinite => "non_finite",
            ErrorKind::Unsupported => "unsupported",
            ErrorKind::BaseMismatch => "base_mismatch",
            ErrorKind::Limit => "limit",
            ErrorKind::Cuda => "cuda",
            ErrorKind::Internal => "internal",
        }
    }

    /// The adapter itself is malformed or does not fit the base (as opposed to a bad call, an
    /// I/O failure or a bug): the policy may turn these into a `reject` verdict.
    pub fn is_validation(self) -> bool {
        matches!(
            self,
            ErrorKind::Format
                | ErrorKind::Shape
                | ErrorKind::NonFinite
                | ErrorKind::Unsupported
                | ErrorKind::BaseMismatch
                | ErrorKind::Limit
        )
    }
}

/// The underlying error a library `Error` was made from (a cudarc status, …), kept for
/// `std::error::Error::source`. Shared so that `Error` stays `Clone`.
pub type Source = Arc<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, Clone)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<Source>,
}

/// Two errors are equal when kind and message are; the source is their cause, not their identity.
impl PartialEq for Error {
    fn eq(&self, other: &Self) -> bool {
        self.kind == other.kind && self.message == other.message
    }
}

impl Eq for Error {}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            source: None,
        }
    }
    /// The same error, remembering what caused it.
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
    pub fn message(&self) -> &str {
        &self.message
    }
    /// An I/O error on `path`, keeping the OS's words.
    pub fn io(path: &std::path::Path, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, format!("{}: {err}", path.display())).with_source(err)
    }
    /// Prefix the message with context (a file, a module) and keep the kind.
    pub fn context(self, what: impl fmt::Display) -> Self {
        Error {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|s| s as &(dyn std::error::Error + 'static))
    }
}

/// `bail!(Kind, "fmt", args…)` returns an `Err(Error)` of that kind.
#[macro_export]
macro_rules! bail {
    ($kind:ident, $($arg:tt)*) => {
        return Err($crate::error::Error::new($crate::error::ErrorKind::$kind, format!($($arg)*)))
    };
}
