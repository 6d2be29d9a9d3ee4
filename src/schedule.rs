//! Pure timing arithmetic: a token's lifetime, when to refresh it, how long to back off.
//! No runtime, no clock: callers pass the time and the random samples in.

use std::time::{Duration, SystemTime};

use crate::config::RefreshPolicy;

/// A token's lifetime from issuance: `expires_in` when the provider sent it, else the
/// JWT `exp` claim, else the configured default.
pub fn lifetime(
    expires_in: Option<Duration>,
    jwt_exp: Option<SystemTime>,
    issued_at: SystemTime,
    policy: &RefreshPolicy,
) -> Duration {
    if let Some(d) = expires_in {
        return d;
    }
    if let Some(exp) = jwt_exp {
        return exp.duration_since(issued_at).unwrap_or(Duration::ZERO);
    }
    policy.default_lifetime
}

/// How long after issuance to refresh a token of `lifetime`.
///
/// At `ratio` of the lifetime, minus up to `jitter` of it at random (`sample` in `[0, 1)`),
/// and no later than `margin` before expiry when the lifetime is longer than the margin.
/// Never sooner than `min_interval`, so a provider handing out ever-shorter tokens cannot
/// drive the daemon into a refresh loop.
pub fn refresh_delay(lifetime: Duration, policy: &RefreshPolicy, sample: f64) -> Duration {
    let sample = sample.clamp(0.0, 1.0);
    let life = lifetime.as_secs_f64();
    let mut delay = life * (policy.ratio - policy.jitter * sample);
    if lifetime > policy.margin {
        delay = delay.min((lifetime - policy.margin).as_secs_f64());
    }
    if let Some(max) = policy.max_interval {
        delay = delay.min(max.as_secs_f64());
    }
    Duration::from_secs_f64(delay.max(0.0)).max(policy.min_interval)
}

/// Capped exponential backoff with full jitter: a uniform pick (by `sample` in `[0, 1)`)
/// in `[0, min(backoff_max, backoff_initial × 2^attempt)]`. A server's `Retry-After` is a
/// floor, itself capped at `slow_retry` so a bogus header cannot park an account for days.
pub fn backoff(
    attempt: u32,
    policy: &RefreshPolicy,
    sample: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let ceiling = policy
        .backoff_initial
        .saturating_mul(2u32.saturating_pow(attempt.min(31)))
        .min(policy.backoff_max);
    let jittered = ceiling.mul_f64(sample.clamp(0.0, 1.0));
    match retry_after {
        Some(ra) => jittered.max(ra.min(policy.slow_retry)),
        None => jittered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RefreshPolicy {
        RefreshPolicy::default()
    }

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn lifetime_prefers_expires_in_then_jwt_then_default() {
        let t0 = SystemTime::UNIX_EPOCH + S(1_000);
        let p = policy();
        assert_eq!(lifetime(Some(S(120)), Some(t0 + S(999)), t0, &p), S(120));
        assert_eq!(lifetime(None, Some(t0 + S(300)), t0, &p), S(300));
        assert_eq!(lifetime(None, Some(t0 - S(5)), t0, &p), S(0));
        assert_eq!(lifetime(None, None, t0, &p), p.default_lifetime);
    }

    #[test]
    fn an_hour_token_refreshes_at_eighty_percent_minus_jitter() {
        let p = policy();
        assert_eq!(refresh_delay(S(3600), &p, 0.0), S(2880));
        let earliest = refresh_delay(S(3600), &p, 0.999_999);
        assert!(earliest > S(2699) && earliest < S(2701), "{earliest:?}");
    }

    #[test]
    fn the_margin_bounds_the_refresh_when_the_lifetime_allows() {
        let p = policy();
        // 80% of 200 s is 160 s, but 60 s of margin puts it at 140 s.
        assert_eq!(refresh_delay(S(200), &p, 0.0), S(140));
        // A 30 s token cannot keep a 60 s margin: the ratio decides.
        assert_eq!(refresh_delay(S(30), &p, 0.0), S(24));
    }

    #[test]
    fn max_interval_keeps_an_idle_refresh_token_in_use() {
        let p = RefreshPolicy {
            max_interval: Some(S(6 * 3600)),
            ..policy()
        };
        // A 24 h access token would be refreshed after ~19 h; the bound makes it 6 h.
        assert_eq!(refresh_delay(S(86_400), &p, 0.0), S(6 * 3600));
        assert_eq!(
            refresh_delay(S(3600), &p, 0.0),
            S(2880),
            "no effect on shorter tokens"
        );
    }

    #[test]
    fn refreshes_never_come_sooner_than_the_minimum_interval() {
        let p = policy();
        assert_eq!(refresh_delay(S(2), &p, 0.0), p.min_interval);
        assert_eq!(refresh_delay(S(0), &p, 0.5), p.min_interval);
        assert_eq!(refresh_delay(S(61), &p, 0.0), p.min_interval);
    }

    #[test]
    fn backoff_grows_exponentially_to_its_cap_with_full_jitter() {
        let p = policy();
        assert_eq!(backoff(0, &p, 1.0, None), S(1));
        assert_eq!(backoff(3, &p, 1.0, None), S(8));
        assert_eq!(backoff(30, &p, 1.0, None), p.backoff_max);
        assert_eq!(backoff(u32::MAX, &p, 1.0, None), p.backoff_max);
        assert_eq!(backoff(3, &p, 0.5, None), S(4));
        assert_eq!(backoff(3, &p, 0.0, None), S(0));
    }

    #[test]
    fn retry_after_is_a_floor_capped_by_slow_retry() {
        let p = policy();
        assert_eq!(backoff(0, &p, 1.0, Some(S(120))), S(120));
        assert_eq!(backoff(20, &p, 1.0, Some(S(10))), p.backoff_max);
        assert_eq!(backoff(0, &p, 1.0, Some(S(86_400 * 7))), p.slow_retry);
    }
}
