//! Logging setup shared by both binaries: `tracing` to stderr, plain or JSON.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Plain,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Logging flags.
#[derive(Clone, Debug, clap::Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "PODIAM_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain, global = true)]
    pub log_format: LogFormat,

    /// Log level, or a tracing filter such as `info,podiam_server::pods=debug`.
    /// Per-request access logs are at debug level.
    #[arg(long, env = "PODIAM_LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
}

/// The logging setup failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// `--log-level` is not a valid filter.
    #[error("invalid --log-level {value:?}: {source}")]
    Filter {
        /// What was given.
        value: String,
        /// Why it was refused.
        source: tracing_subscriber::filter::ParseError,
    },
    /// A global subscriber was already installed.
    #[error("logging was already initialised: {0}")]
    AlreadySet(#[from] tracing_subscriber::util::TryInitError),
}

// === impl LogArgs ===

impl LogArgs {
    /// Installs the global subscriber.
    pub fn init(&self) -> Result<(), LogError> {
        let filter = EnvFilter::try_new(&self.log_level).map_err(|source| LogError::Filter {
            value: self.log_level.clone(),
            source,
        })?;
        let registry = tracing_subscriber::registry().with(filter);
        match self.log_format {
            LogFormat::Plain => registry
                .with(fmt::layer().with_writer(std::io::stderr))
                .try_init()?,
            LogFormat::Json => registry
                .with(
                    fmt::layer()
                        .json()
                        .flatten_event(true)
                        .with_current_span(true)
                        .with_writer(std::io::stderr),
                )
                .try_init()?,
        }
        Ok(())
    }
}
