//! Model time: milliseconds since the workload started, as every output
//! reports it. The host runs the model `dilation` times slower than real
//! time, so a model millisecond lasts `dilation` wall milliseconds.

use std::time::Duration;

use tokio::time::Instant;

/// Converts between the host's instants and model milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct ModelClock {
    /// The instant model time 0 (the workload's start) fell on.
    start: Instant,
    /// Wall time per model time (at least 1).
    dilation: f64,
}

impl ModelClock {
    /// Model time 0 is now.
    pub fn start_now(dilation: f64) -> Self {
        ModelClock {
            start: Instant::now(),
            dilation,
        }
    }

    /// Model ms of `at` (negative before the start).
    pub fn ms(&self, at: Instant) -> f64 {
        if at >= self.start {
            at.duration_since(self.start).as_secs_f64() * 1000.0 / self.dilation
        } else {
            -(self.start.duration_since(at).as_secs_f64() * 1000.0 / self.dilation)
        }
    }

    /// The instant of model ms `ms` (not negative).
    pub fn at(&self, ms: f64) -> Instant {
        self.start + wall(ms / 1000.0, self.dilation)
    }
}

/// How long `model_secs` of model time last on the host.
pub fn wall(model_secs: f64, dilation: f64) -> Duration {
    Duration::from_secs_f64(model_secs * dilation)
}
