//! Time, injected. Expiry logic reads the wall clock through a [`Clock`] so that tests
//! can move it; this module holds the one call to `SystemTime::now` in production code
//! (`clippy.toml` forbids it everywhere else). Monotonic time is tokio's `Instant`,
//! which tests pause and advance.

use std::{fmt, time::SystemTime};

/// Now, as the caller sees it.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// The current wall-clock time.
    fn now(&self) -> SystemTime;
}

/// The system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)] // The one place the wall clock is read.
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}
