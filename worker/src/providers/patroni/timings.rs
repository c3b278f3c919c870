//! Patroni's failure-detection timings. A leader's key lives `ttl` seconds unless renewed; Patroni renews it
//! every `loop_wait` seconds and gives a DCS or Postgres call `retry_timeout` seconds. A primary that cannot
//! reach etcd retries for up to `retry_timeout`, twice in the worst case, after a full `loop_wait`: unless
//! `loop_wait + 2 × retry_timeout ≤ ttl`, its key can expire while it still believes it leads, and two
//! primaries may accept writes. A crash is noticed when the key expires, so `ttl` bounds failover time.

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Timings {
    pub ttl: u32,
    pub loop_wait: u32,
    pub retry_timeout: u32,
}

/// berth's: failover in about `ttl` seconds after a crash (7 s, plus the promotion), with the rule kept exactly.
pub const FAST: Timings = Timings {
    ttl: 7,
    loop_wait: 1,
    retry_timeout: 3,
};

impl Timings {
    /// Why these timings are unsafe (or unusable), if they are.
    pub fn check(&self) -> Result<(), String> {
        if self.loop_wait == 0 || self.retry_timeout == 0 {
            return Err(format!(
                "loop_wait ({}) and retry_timeout ({}) must be at least 1 s",
                self.loop_wait, self.retry_timeout
            ));
        }
        let worst = self.loop_wait + 2 * self.retry_timeout;
        if worst > self.ttl {
            return Err(format!(
                "loop_wait + 2 × retry_timeout = {} + 2 × {} = {worst} s exceeds ttl = {} s: a primary cut off from \
                 etcd could still accept writes after its leader key expired",
                self.loop_wait, self.retry_timeout, self.ttl
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed cluster's (Patroni's defaults): 30 s to notice a crashed primary. The benchmark compares with it
    /// (`bench/run.sh ha`, through HA_PATRONI_TTL=30 HA_PATRONI_LOOP_WAIT=10 HA_PATRONI_RETRY_TIMEOUT=10).
    const SEED: Timings = Timings {
        ttl: 30,
        loop_wait: 10,
        retry_timeout: 10,
    };

    #[test]
    fn berth_timings_keep_the_rule_and_beat_the_seed_threefold() {
        FAST.check().unwrap();
        SEED.check().unwrap();
        const {
            assert!(
                FAST.ttl * 3 <= SEED.ttl,
                "berth fails over at least three times faster than the seed"
            )
        };
    }

    #[test]
    fn timings_that_break_the_rule_are_refused() {
        let err = Timings {
            ttl: 10,
            loop_wait: 5,
            retry_timeout: 3,
        }
        .check()
        .unwrap_err();
        assert!(err.contains("11 s exceeds ttl = 10 s"), "{err}");
        assert!(
            Timings {
                ttl: 30,
                loop_wait: 10,
                retry_timeout: 15
            }
            .check()
            .is_err()
        );
        assert!(
            Timings {
                ttl: 5,
                loop_wait: 0,
                retry_timeout: 1
            }
            .check()
            .is_err()
        );
        Timings {
            ttl: 11,
            loop_wait: 5,
            retry_timeout: 3,
        }
        .check()
        .unwrap();
    }
}
