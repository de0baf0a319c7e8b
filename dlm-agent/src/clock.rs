//! The agent's one clock: tokio's (so tests can pause and advance it),
//! mapped to the engine's `Instant` as time since the agent started.

use tokio::time::Instant;

/// Converts between tokio's clock and the engine's.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    origin: Instant,
}

impl Clock {
    /// A clock whose origin is now.
    #[must_use]
    pub fn start() -> Clock {
        Clock { origin: Instant::now() }
    }

    /// Now, for tokio.
    #[must_use]
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Now, for the engine.
    #[must_use]
    pub fn engine_now(&self) -> dlm_core::Instant {
        self.to_engine(Instant::now())
    }

    /// A tokio instant as the engine's.
    #[must_use]
    pub fn to_engine(self, at: Instant) -> dlm_core::Instant {
        let nanos = at.saturating_duration_since(self.origin).as_nanos();
        dlm_core::Instant::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// An engine instant as tokio's.
    #[must_use]
    pub fn to_tokio(self, at: dlm_core::Instant) -> Instant {
        self.origin + std::time::Duration::from_nanos(at.as_nanos())
    }
}
