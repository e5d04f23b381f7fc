//! **Test doubles** for the STS broker under tokio's paused clock: a wall clock that moves
//! with tokio's time, and an in-memory STS that counts its calls. The broker against real
//! STS semantics (moto) is covered by the server's API tests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use futures::{FutureExt, future::BoxFuture};
use podiam_common::{protocol::Credentials, secret::Secret};
use podiam_server::sts::{AssumeRole, Clock, SessionKey, StsError};
use tokio::time::Instant;

/// Wall-clock time that moves with tokio's (paused) clock.
#[derive(Debug)]
pub struct TokioClock {
    start: Instant,
    wall: SystemTime,
}

impl TokioClock {
    /// Starts at the real wall-clock time.
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            wall: SystemTime::now(),
        }
    }
}

impl Default for TokioClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for TokioClock {
    fn now(&self) -> SystemTime {
        self.wall + self.start.elapsed()
    }
}

/// An STS that issues credentials for `key.duration` from the clock's now, after
/// `delay`, numbering them; it can be made to fail.
#[derive(Debug)]
pub struct FakeSts {
    clock: Arc<TokioClock>,
    /// AssumeRole calls so far.
    pub calls: AtomicU64,
    /// While set, every call fails with Throttling.
    pub failing: AtomicBool,
    /// While set, every call is refused with AccessDenied.
    pub refusing: AtomicBool,
    delay: Duration,
}

impl FakeSts {
    /// Answers after `delay` (tokio time).
    pub fn new(clock: Arc<TokioClock>, delay: Duration) -> Self {
        Self {
            clock,
            calls: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            refusing: AtomicBool::new(false),
            delay,
        }
    }

    /// Calls so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }
}

impl AssumeRole for FakeSts {
    fn assume_role(&self, key: &SessionKey) -> BoxFuture<'static, Result<Credentials, StsError>> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        let failing = self.failing.load(Ordering::SeqCst);
        let refusing = self.refusing.load(Ordering::SeqCst);
        let clock = self.clock.clone();
        let delay = self.delay;
        let duration = key.duration;
        async move {
            tokio::time::sleep(delay).await;
            if refusing {
                return Err(StsError::Service {
                    code: "AccessDenied".into(),
                    message: "not authorized to perform sts:AssumeRole".into(),
                });
            }
            if failing {
                return Err(StsError::Service {
                    code: "Throttling".into(),
                    message: "Rate exceeded".into(),
                });
            }
            Ok(Credentials {
                access_key_id: format!("ASIAFAKE{n:08}"),
                secret_access_key: Secret::new(format!("secret-{n}")),
                session_token: Secret::new(format!("token-{n}")),
                expiration: clock.now() + duration,
            })
        }
        .boxed()
    }
}
