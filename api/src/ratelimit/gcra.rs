//! The generic cell rate algorithm (GCRA): a token bucket kept as one number per client, the
//! theoretical arrival time (TAT) of its next request. Each request moves the TAT one emission
//! interval later; a client whose TAT lies more than the bucket's worth of intervals ahead is over
//! its limit. Times are milliseconds. [`SHARED_SCRIPT`] is the same arithmetic run atomically in
//! Redis (all replicas share one TAT per client); [`Rate::take`] runs it in memory when Redis is away.
//!
//! Precision: both work with how far ahead of now a TAT is (small numbers) rather than with two
//! epoch times (large ones, whose difference loses digits), Redis's clock counts from 2023-11-14
//! rather than 1970, and a hundredth of a unit of slack keeps rounding from making a whole bucket one
//! unit short, down to the 10 µs interval of the highest `RATE_LIMIT_RPS`.

/// The Lua twin of [`Rate::take`], on Redis's clock. `KEYS[1]`: the client's TAT; `ARGV`: emission
/// interval (ms), burst, units wanted. Grants as many of the wanted units as the bucket holds and
/// returns `{granted, remaining, reset_ms, retry_after_ms}`.
pub const SHARED_SCRIPT: &str = r"
local clock = redis.call('TIME')
local now = (tonumber(clock[1]) - 1700000000) * 1000 + tonumber(clock[2]) / 1000
local interval, burst, wanted = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
-- How far ahead of now the client's TAT is: 0 when idle, never more than a full bucket (a TAT stored
-- under a looser, older limit must not refuse longer).
local debt = math.min(math.max(tonumber(redis.call('GET', KEYS[1]) or 0) - now, 0), burst * interval)
local available = math.floor((burst * interval - debt) / interval + 0.01)
local granted = math.max(0, math.min(wanted, available))
if granted == 0 then
  return {0, 0, math.ceil(debt), math.ceil(debt - (burst - 1) * interval)}
end
debt = debt + granted * interval
redis.call('SET', KEYS[1], string.format('%.6f', now + debt), 'PX', math.max(1, math.ceil(debt)))
return {granted, available - granted, math.ceil(debt), 0}
";

/// A limit: one request per `interval_ms` sustained, `burst` (at least 1) at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    interval_ms: f64,
    burst: u32,
}

/// What a bucket answered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Grant {
    /// Units granted (0: over the limit).
    pub granted: u32,
    /// Units still available at once after this grant.
    pub remaining: u32,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: f64,
    /// When nothing was granted: milliseconds until one unit is.
    pub retry_after_ms: f64,
}

impl Rate {
    /// `rps` requests per second, `burst` at once.
    pub fn new(rps: u32, burst: u32) -> Self {
        Self { interval_ms: 1000.0 / f64::from(rps.max(1)), burst: burst.max(1) }
    }

    /// Milliseconds between requests at the sustained rate.
    pub fn interval_ms(&self) -> f64 {
        self.interval_ms
    }

    /// The bucket's size.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// Takes up to `wanted` units from the bucket whose TAT is `*tat`, at `now`; moves the TAT.
    pub fn take(&self, tat: &mut f64, now: f64, wanted: u32) -> Grant {
        let full = f64::from(self.burst) * self.interval_ms;
        let debt = (*tat - now).clamp(0.0, full);
        // A hundredth of a unit of slack: rounding must never make a whole bucket one unit short.
        let available = ((full - debt) / self.interval_ms + 0.01).floor() as u32;
        let granted = wanted.min(available);
        if granted == 0 {
            let retry_after_ms = debt - f64::from(self.burst - 1) * self.interval_ms;
            return Grant { granted: 0, remaining: 0, reset_ms: debt, retry_after_ms };
        }
        let debt = debt + f64::from(granted) * self.interval_ms;
        *tat = now + debt;
        Grant { granted, remaining: available - granted, reset_ms: debt, retry_after_ms: 0.0 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_grants_the_burst_then_one_request_per_interval() {
        let rate = Rate::new(10, 3); // 100 ms apart, 3 at once
        let mut tat = 0.0;
        let grants: Vec<u32> = (0..4).map(|_| rate.take(&mut tat, 1000.0, 1).granted).collect();
        assert_eq!(grants, [1, 1, 1, 0]);
        let refused = rate.take(&mut tat, 1000.0, 1);
        assert_eq!((refused.retry_after_ms, refused.reset_ms), (100.0, 300.0));
        assert_eq!(rate.take(&mut tat, 1098.0, 1).granted, 0); // (the slack: at most 1 % of an interval early)
        assert_eq!(rate.take(&mut tat, 1100.0, 1).granted, 1);
        // Idle for long enough, the bucket is full again (and no fuller).
        assert_eq!(rate.take(&mut tat, 5000.0, 10).granted, 3);
    }

    #[test]
    fn batches_take_what_is_there_and_report_the_rest() {
        let rate = Rate::new(100, 50);
        let mut tat = 0.0;
        let first = rate.take(&mut tat, 0.0, 20);
        assert_eq!((first.granted, first.remaining), (20, 30));
        assert_eq!(rate.take(&mut tat, 0.0, 40).granted, 30);
        assert_eq!(rate.take(&mut tat, 0.0, 1).granted, 0);
    }
}
