//! The one retry delay policy: exponential backoff with jitter.

use std::time::Duration;

/// Delays between attempts: the first, then doubling up to a ceiling, each drawn uniformly from the
/// upper half of its step ("equal jitter"), so that replicas which failed together (a dependency's
/// outage) do not retry together.
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Starts at `first` (at least 1 ms), never above `max` (the first delay included).
    pub fn new(first: Duration, max: Duration) -> Self {
        let max = max.max(Duration::from_millis(1));
        let first = first.clamp(Duration::from_millis(1), max);
        Self { first, max, step: first }
    }

    /// The delay before the next attempt; the one after is twice as long (up to the ceiling).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = (step * 2).min(self.max);
        let half = step / 2;
        half + half.mul_f64(rand::random::<f64>())
    }

    /// After a success: the next failure starts from the first delay again.
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_ceiling_within_their_jitter() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay()).collect();
        for (delay, step) in delays.iter().zip([100, 200, 400, 800, 1000, 1000]) {
            let step = Duration::from_millis(step);
            assert!(*delay >= step / 2 && *delay <= step, "{delay:?} outside ({step:?}/2, {step:?})");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
        // A first delay above the ceiling is held to it too.
        assert!(Backoff::new(Duration::from_secs(60), Duration::from_secs(5)).next_delay() <= Duration::from_secs(5));
    }

    #[test]
    fn jitter_spreads_replicas_that_failed_together() {
        let delays: std::collections::HashSet<Duration> =
            (0..20).map(|_| Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay()).collect();
        assert!(delays.len() > 10, "{delays:?}");
    }
}
