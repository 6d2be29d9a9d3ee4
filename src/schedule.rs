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
/// At `ratio` of the lifetime, no later than `margin` before expiry when the lifetime is
/// longer than the margin, nor later than `max_interval`; then minus up to `jitter` at
/// random (`sample` in `[0, 1)`). Never sooner than `min_interval`, so a provider handing
/// out ever-shorter tokens cannot drive the daemon into a refresh loop.
///
/// The jitter is a fraction of the lifetime the plan stands for (`plan ÷ ratio`, the
/// lifetime itself when no cap applies): applied before the caps, it would vanish
/// whenever one of them decides, and capped accounts would all refresh in step.
pub fn refresh_delay(lifetime: Duration, policy: &RefreshPolicy, sample: f64) -> Duration {
    let sample = sample.clamp(0.0, 1.0);
    let life = lifetime.as_secs_f64();
    let mut plan = life * policy.ratio;
    if lifetime > policy.margin {
        plan = plan.min((lifetime - policy.margin).as_secs_f64());
    }
    if let Some(max) = policy.max_interval {
        plan = plan.min(max.as_secs_f64());
    }
    let span = if policy.ratio > 0.0 {
        life.min(plan / policy.ratio)
    } else {
        life
    };
    let delay = plan - policy.jitter * sample * span;
    Duration::from_secs_f64(delay.max(0.0)).max(policy.min_interval)
}

/// How long after issuance to refresh a token that was *not* obtained by a planned
/// refresh (the first token, one after a re-seed, a retry, a reader's demand): uniform
/// (by `sample` in `[0, 1)`) over the whole period, from `lo` up to the normal plan's
/// latest point.
///
/// Accounts that obtain tokens together (10,000 at a cold start, within seconds) would
/// otherwise keep one phase: the normal plan's small jitter spreads them only as the
/// square root of the number of cycles, and the provider sees a burst every period. One
/// uniform draw makes the phases uniform; planned refreshes then keep them so. `lo` is
/// half the jitter window, so the window is as long as the mean planned period (uniform
/// phases modulo that period), and never below `min_interval`. Nothing is planned later
/// than [`refresh_delay`] could plan it.
pub fn spread_refresh_delay(lifetime: Duration, policy: &RefreshPolicy, sample: f64) -> Duration {
    let latest = refresh_delay(lifetime, policy, 0.0);
    let earliest = refresh_delay(lifetime, policy, 1.0);
    let lo = ((latest - earliest) / 2)
        .max(policy.min_interval)
        .min(latest);
    lo + (latest - lo).mul_f64(sample.clamp(0.0, 1.0))
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
    fn capped_plans_keep_their_jitter() {
        let p = policy();
        // 140 s is 80% of 175 s: the jitter spans 5% of that, 8.75 s.
        let earliest = refresh_delay(S(200), &p, 0.999_999);
        assert!(earliest > S(131) && earliest < S(132), "{earliest:?}");
        let p = RefreshPolicy {
            max_interval: Some(S(6 * 3600)),
            ..policy()
        };
        // 6 h is 80% of 7.5 h: up to 22.5 min earlier.
        let earliest = refresh_delay(S(86_400), &p, 0.999_999);
        assert!(
            earliest > S(6 * 3600 - 1351) && earliest < S(6 * 3600 - 1349),
            "{earliest:?}"
        );
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
    fn an_unplanned_token_is_refreshed_anywhere_in_the_period_up_to_the_normal_plan() {
        let p = policy();
        // An hour token: normally 2700–2880 s (mean 2790 s). Spread: 90–2880 s, a
        // window as long as that mean period.
        assert_eq!(spread_refresh_delay(S(3600), &p, 0.0), S(90));
        assert_eq!(spread_refresh_delay(S(3600), &p, 0.5), S(1485));
        let latest = spread_refresh_delay(S(3600), &p, 0.999_999);
        assert!(latest > S(2879) && latest <= S(2880), "{latest:?}");
        assert_eq!(spread_refresh_delay(S(3600), &p, 1.0), S(2880));
        // Out-of-range samples are clamped, never beyond the normal latest point.
        assert_eq!(spread_refresh_delay(S(3600), &p, 7.0), S(2880));
        assert_eq!(spread_refresh_delay(S(3600), &p, -1.0), S(90));
    }

    #[test]
    fn the_spread_window_respects_the_minimum_interval_and_the_caps() {
        let p = policy();
        // 60 s tokens: normally 45–48 s; half the jitter window (1.5 s) is below the
        // 10 s minimum interval.
        assert_eq!(spread_refresh_delay(S(60), &p, 0.0), p.min_interval);
        assert_eq!(spread_refresh_delay(S(60), &p, 1.0), S(48));
        // The margin caps the latest point (140 s of a 200 s token).
        assert_eq!(spread_refresh_delay(S(200), &p, 1.0), S(140));
        assert_eq!(spread_refresh_delay(S(200), &p, 0.0), p.min_interval);
        // So does max_interval.
        let capped = RefreshPolicy {
            max_interval: Some(S(6 * 3600)),
            ..policy()
        };
        assert_eq!(spread_refresh_delay(S(86_400), &capped, 1.0), S(6 * 3600));
        // A token too short for the minimum interval: both ends are the minimum.
        assert_eq!(spread_refresh_delay(S(2), &p, 0.0), p.min_interval);
        assert_eq!(spread_refresh_delay(S(2), &p, 1.0), p.min_interval);
    }

    #[test]
    fn spread_never_plans_later_than_the_normal_plan() {
        let p = policy();
        for secs in [0, 1, 9, 10, 11, 30, 60, 61, 200, 300, 3600, 86_400] {
            for i in 0..=20 {
                let sample = f64::from(i) / 20.0;
                let spread = spread_refresh_delay(S(secs), &p, sample);
                assert!(
                    spread <= refresh_delay(S(secs), &p, 0.0),
                    "{secs} s, {sample}"
                );
                assert!(spread >= p.min_interval, "{secs} s, {sample}");
            }
        }
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
