//! Call policy: who may call whom, when, and how often; how long a call may
//! last. Read from a TOML file and checked whole before it takes effect, so
//! a bad file never replaces a good policy.
//!
//! ```toml
//! time_zone = "Europe/Paris"          # for `hours`; default UTC
//! max_call_duration = "30m"           # forced FINISH after this long talking
//!
//! blocked_callers = ["mallory"]
//! blocked_callees = ["ceo"]
//! blocked_pairs = [["alice", "eve"]]  # caller, callee (one direction)
//!
//! [groups]
//! agents = ["agent-1", "agent-2"]
//! customers = ["cust-1", "cust-2"]
//!
//! [[only]]                            # calls to `callees` only from `callers`
//! callees = "customers"
//! callers = "agents"
//!
//! [rate_limit]                        # per caller, counting approved calls
//! calls = 20
//! per = "1h"
//!
//! [redial]                            # per caller→callee pair; on by default
//! after_rejection = "10s"             # no new call to a callee who declined, for this long
//! calls = 6                           # approved calls to one callee ...
//! per = "1m"                          # ... in any window this long
//!
//! [hours]                             # calls only in this window
//! from = "08:00"
//! to = "20:00"
//! days = ["mon", "tue", "wed", "thu", "fri"]
//!
//! [codes]                             # refusal code of each rule
//! blocked_caller = 200001
//! ```
//!
//! Deciding is pure: [`Policy::decide`] takes the time and the caller's
//! recent approvals as arguments, [`Policy::redial`] the pair's history,
//! and neither does I/O.
//!
//! **Re-dialling.** A user being called is busy for everyone else, so a
//! caller re-dialling a user who declines every call could keep them busy
//! (and unable to call out) for as long as it liked. By default a caller
//! may not call a callee again for 10 s after that callee declined (any
//! non-zero REPLY from the callee), nor more than 6 times a minute (approved
//! calls); both refuse with `codes.redial_too_soon` (200008). `after_rejection
//! = "0s"` or `calls = 0` turns that part off.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use jiff::Timestamp;
use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use serde::Deserialize;

/// Why a policy file was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("invalid policy: {0}")]
    Toml(#[from] toml::de::Error),
    #[error("invalid policy: {0}")]
    Invalid(String),
}

/// The refusal code of each rule. Every code reaches the caller unchanged.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct Codes {
    pub blocked_caller: u32,
    pub blocked_callee: u32,
    pub blocked_pair: u32,
    pub not_on_allow_list: u32,
    pub rate_limited: u32,
    pub outside_hours: u32,
    /// The code of the forced FINISH at the maximum call duration.
    pub max_duration: u32,
    /// A caller re-dialling the same callee too soon or too often.
    pub redial_too_soon: u32,
}

impl Default for Codes {
    fn default() -> Self {
        Self {
            blocked_caller: 200_001,
            blocked_callee: 200_002,
            blocked_pair: 200_003,
            not_on_allow_list: 200_004,
            rate_limited: 200_005,
            outside_hours: 200_006,
            max_duration: 200_007,
            redial_too_soon: 200_008,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OnlyRule {
    callees: String,
    callers: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateLimitFile {
    calls: u32,
    per: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RedialFile {
    after_rejection: Option<String>,
    calls: Option<u32>,
    per: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HoursFile {
    from: String,
    to: String,
    #[serde(default)]
    days: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyFile {
    time_zone: Option<String>,
    max_call_duration: Option<String>,
    #[serde(default)]
    blocked_callers: Vec<String>,
    #[serde(default)]
    blocked_callees: Vec<String>,
    #[serde(default)]
    blocked_pairs: Vec<(String, String)>,
    #[serde(default)]
    groups: HashMap<String, Vec<String>>,
    #[serde(default)]
    only: Vec<OnlyRule>,
    rate_limit: Option<RateLimitFile>,
    redial: Option<RedialFile>,
    hours: Option<HoursFile>,
    #[serde(default)]
    codes: Codes,
}

/// At most `calls` approved calls per caller in any window of `per`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub calls: u32,
    pub per: Duration,
}

/// Limits on one caller calling one callee again (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redial {
    /// No call to a callee who declined within this long; zero: no wait.
    pub after_rejection: Duration,
    /// At most this many approved calls to one callee per `per`; 0: no limit.
    pub calls: u32,
    pub per: Duration,
}

impl Default for Redial {
    fn default() -> Self {
        Self {
            after_rejection: Duration::from_secs(10),
            calls: 6,
            per: Duration::from_secs(60),
        }
    }
}

/// What a caller did to one callee lately, for [`Policy::redial`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PairHistory {
    /// When the callee last declined the caller's call.
    pub declined: Option<Timestamp>,
    /// When the caller's recent calls to the callee were approved.
    pub approved: Vec<Timestamp>,
}

/// Calls allowed only between `from` and `to` (local time), on `days`.
#[derive(Clone, Debug, PartialEq)]
pub struct Hours {
    pub from: Time,
    pub to: Time,
    pub days: Vec<Weekday>,
}

/// A checked policy. `Policy::default()` allows everything but re-dialling
/// too soon or too often ([`Redial::default`]).
#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub time_zone: Option<TimeZone>,
    pub max_call_duration: Option<Duration>,
    pub blocked_callers: HashSet<String>,
    pub blocked_callees: HashSet<String>,
    pub blocked_pairs: HashSet<(String, String)>,
    /// (callee group members, allowed caller group members).
    only: Vec<(HashSet<String>, HashSet<String>)>,
    pub rate_limit: Option<RateLimit>,
    pub redial: Redial,
    pub hours: Option<Hours>,
    pub codes: Codes,
    /// Callers refused with their own code, from the command line.
    pub extra_blocked: HashMap<String, u32>,
}

/// Which rule refused a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Blocked on the command line, with this code.
    Blocked(u32),
    BlockedCaller,
    BlockedCallee,
    BlockedPair,
    NotOnAllowList,
    RateLimited,
    OutsideHours,
    RedialTooSoon,
}

impl Policy {
    /// Reads and checks a policy file.
    pub fn load(path: &std::path::Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text)
    }

    /// Parses and checks a policy.
    pub fn parse(text: &str) -> Result<Self, PolicyError> {
        let file: PolicyFile = toml::from_str(text)?;
        let invalid = |m: String| PolicyError::Invalid(m);
        let time_zone = file
            .time_zone
            .map(|tz| TimeZone::get(&tz).map_err(|e| invalid(format!("time_zone {tz:?}: {e}"))))
            .transpose()?;
        let duration = |what: &str, s: &str| {
            humantime::parse_duration(s)
                .map_err(|e| invalid(format!("{what} {s:?}: {e}")))
                .and_then(|d| {
                    if d.is_zero() {
                        Err(invalid(format!("{what} must be more than zero")))
                    } else {
                        Ok(d)
                    }
                })
        };
        let max_call_duration = file
            .max_call_duration
            .as_deref()
            .map(|s| duration("max_call_duration", s))
            .transpose()?;
        let group = |name: &str| {
            file.groups
                .get(name)
                .map(|members| members.iter().cloned().collect::<HashSet<_>>())
                .ok_or_else(|| invalid(format!("unknown group {name:?}")))
        };
        let only = file
            .only
            .iter()
            .map(|r| Ok((group(&r.callees)?, group(&r.callers)?)))
            .collect::<Result<Vec<_>, PolicyError>>()?;
        let rate_limit = file
            .rate_limit
            .map(|r| {
                if r.calls == 0 {
                    return Err(invalid("rate_limit.calls must be at least 1".into()));
                }
                Ok(RateLimit {
                    calls: r.calls,
                    per: duration("rate_limit.per", &r.per)?,
                })
            })
            .transpose()?;
        let redial = match file.redial {
            None => Redial::default(),
            Some(r) => {
                let defaults = Redial::default();
                let any = |what: &str, s: &str| {
                    humantime::parse_duration(s).map_err(|e| invalid(format!("{what} {s:?}: {e}")))
                };
                Redial {
                    after_rejection: match &r.after_rejection {
                        Some(s) => any("redial.after_rejection", s)?,
                        None => defaults.after_rejection,
                    },
                    calls: r.calls.unwrap_or(defaults.calls),
                    per: match &r.per {
                        Some(s) => duration("redial.per", s)?,
                        None => defaults.per,
                    },
                }
            }
        };
        let hours = file
            .hours
            .map(|h| {
                let time = |s: &str| {
                    s.parse::<Time>()
                        .map_err(|e| invalid(format!("hours: {s:?} is not a time like 08:00: {e}")))
                };
                let days = h
                    .days
                    .iter()
                    .map(|d| weekday(d))
                    .collect::<Result<Vec<_>, _>>()?;
                Ok::<_, PolicyError>(Hours {
                    from: time(&h.from)?,
                    to: time(&h.to)?,
                    days,
                })
            })
            .transpose()?;
        Ok(Self {
            time_zone,
            max_call_duration,
            blocked_callers: file.blocked_callers.into_iter().collect(),
            blocked_callees: file.blocked_callees.into_iter().collect(),
            blocked_pairs: file.blocked_pairs.into_iter().collect(),
            only,
            rate_limit,
            redial,
            hours,
            codes: file.codes,
            extra_blocked: HashMap::new(),
        })
    }

    /// Whether `caller` may call `callee` at `now`, given the times of the
    /// caller's recently approved calls. Pure.
    pub fn decide(
        &self,
        caller: &str,
        callee: &str,
        now: Timestamp,
        recent: &[Timestamp],
    ) -> Result<(), Refusal> {
        if let Some(code) = self.extra_blocked.get(caller) {
            return Err(Refusal::Blocked(*code));
        }
        if self.blocked_callers.contains(caller) {
            return Err(Refusal::BlockedCaller);
        }
        if self.blocked_callees.contains(callee) {
            return Err(Refusal::BlockedCallee);
        }
        if self
            .blocked_pairs
            .contains(&(caller.to_owned(), callee.to_owned()))
        {
            return Err(Refusal::BlockedPair);
        }
        for (callees, callers) in &self.only {
            if callees.contains(callee) && !callers.contains(caller) {
                return Err(Refusal::NotOnAllowList);
            }
        }
        if let Some(hours) = &self.hours {
            let tz = self.time_zone.clone().unwrap_or(TimeZone::UTC);
            let local = now.to_zoned_datetime(tz);
            let t = local.time();
            let in_window = if hours.from <= hours.to {
                hours.from <= t && t < hours.to
            } else {
                // Over midnight, e.g. 22:00 to 06:00.
                t >= hours.from || t < hours.to
            };
            let day_ok = hours.days.is_empty() || hours.days.contains(&local.weekday());
            if !in_window || !day_ok {
                return Err(Refusal::OutsideHours);
            }
        }
        if let Some(limit) = &self.rate_limit {
            let window =
                jiff::SignedDuration::try_from(limit.per).unwrap_or(jiff::SignedDuration::MAX);
            let since = now.checked_sub(window).unwrap_or(Timestamp::MIN);
            let used = recent.iter().filter(|t| **t > since).count();
            if used >= limit.calls as usize {
                return Err(Refusal::RateLimited);
            }
        }
        Ok(())
    }

    /// Whether a caller may call this callee again now, given what it did
    /// to them lately. Pure.
    pub fn redial(&self, history: &PairHistory, now: Timestamp) -> Result<(), Refusal> {
        let within = |d: Duration, t: &Timestamp| {
            let window = jiff::SignedDuration::try_from(d).unwrap_or(jiff::SignedDuration::MAX);
            *t > now.checked_sub(window).unwrap_or(Timestamp::MIN)
        };
        let r = &self.redial;
        if !r.after_rejection.is_zero()
            && history
                .declined
                .is_some_and(|t| within(r.after_rejection, &t))
        {
            return Err(Refusal::RedialTooSoon);
        }
        if r.calls > 0
            && history.approved.iter().filter(|t| within(r.per, t)).count() >= r.calls as usize
        {
            return Err(Refusal::RedialTooSoon);
        }
        Ok(())
    }

    /// How long a pair's history matters: past it, it can be forgotten.
    pub fn redial_memory(&self) -> Duration {
        self.redial.after_rejection.max(self.redial.per)
    }

    /// The result code for a refusal.
    pub fn code(&self, r: Refusal) -> u32 {
        match r {
            Refusal::Blocked(code) => code,
            Refusal::BlockedCaller => self.codes.blocked_caller,
            Refusal::BlockedCallee => self.codes.blocked_callee,
            Refusal::BlockedPair => self.codes.blocked_pair,
            Refusal::NotOnAllowList => self.codes.not_on_allow_list,
            Refusal::RateLimited => self.codes.rate_limited,
            Refusal::RedialTooSoon => self.codes.redial_too_soon,
            Refusal::OutsideHours => self.codes.outside_hours,
        }
    }
}

fn weekday(s: &str) -> Result<Weekday, PolicyError> {
    Ok(match s.to_ascii_lowercase().as_str() {
        "mon" | "monday" => Weekday::Monday,
        "tue" | "tuesday" => Weekday::Tuesday,
        "wed" | "wednesday" => Weekday::Wednesday,
        "thu" | "thursday" => Weekday::Thursday,
        "fri" | "friday" => Weekday::Friday,
        "sat" | "saturday" => Weekday::Saturday,
        "sun" | "sunday" => Weekday::Sunday,
        _ => {
            return Err(PolicyError::Invalid(format!(
                "hours.days: {s:?} is not a day"
            )));
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    const FULL: &str = r#"
        time_zone = "America/New_York"
        max_call_duration = "30m"
        blocked_callers = ["mallory"]
        blocked_callees = ["ceo"]
        blocked_pairs = [["alice", "eve"]]
        [groups]
        agents = ["agent-1"]
        customers = ["cust-1"]
        [[only]]
        callees = "customers"
        callers = "agents"
        [rate_limit]
        calls = 2
        per = "1h"
        [hours]
        from = "08:00"
        to = "20:00"
        days = ["mon", "tue", "wed", "thu", "fri"]
        [codes]
        blocked_caller = 300001
    "#;

    #[test]
    fn every_rule_refuses_with_its_code() {
        let p = Policy::parse(FULL).unwrap();
        // Tuesday 2026-11-24 12:00 in New York is 17:00 UTC.
        let noon = at("2026-11-24T17:00:00Z");
        assert_eq!(p.decide("alice", "bob", noon, &[]), Ok(()));
        assert_eq!(
            p.decide("mallory", "bob", noon, &[]),
            Err(Refusal::BlockedCaller)
        );
        assert_eq!(p.code(Refusal::BlockedCaller), 300_001);
        assert_eq!(
            p.decide("alice", "ceo", noon, &[]),
            Err(Refusal::BlockedCallee)
        );
        assert_eq!(
            p.decide("alice", "eve", noon, &[]),
            Err(Refusal::BlockedPair)
        );
        assert_eq!(p.decide("eve", "alice", noon, &[]), Ok(()));
        assert_eq!(
            p.decide("alice", "cust-1", noon, &[]),
            Err(Refusal::NotOnAllowList)
        );
        assert_eq!(p.decide("agent-1", "cust-1", noon, &[]), Ok(()));
        // 21:00 in New York; and a Saturday noon.
        assert_eq!(
            p.decide("alice", "bob", at("2026-11-25T02:00:00Z"), &[]),
            Err(Refusal::OutsideHours)
        );
        assert_eq!(
            p.decide("alice", "bob", at("2026-11-28T17:00:00Z"), &[]),
            Err(Refusal::OutsideHours)
        );
        // Two approved calls in the last hour use up the limit; an older one does not count.
        let recent = [at("2026-11-24T16:30:00Z"), at("2026-11-24T16:45:00Z")];
        assert_eq!(
            p.decide("alice", "bob", noon, &recent),
            Err(Refusal::RateLimited)
        );
        let older = [at("2026-11-24T15:30:00Z"), at("2026-11-24T16:45:00Z")];
        assert_eq!(p.decide("alice", "bob", noon, &older), Ok(()));
        assert_eq!(p.max_call_duration, Some(Duration::from_secs(1800)));
        assert_eq!(p.code(Refusal::RateLimited), 200_005);
    }

    #[test]
    fn re_dialling_a_callee_who_declined_waits_and_is_counted() {
        let p = Policy::parse("").unwrap();
        let noon = at("2026-11-24T12:00:00Z");
        let secs = |s: i64| {
            noon.checked_sub(jiff::SignedDuration::from_secs(s))
                .unwrap()
        };
        let declined = |ago| PairHistory {
            declined: Some(secs(ago)),
            approved: vec![secs(ago)],
        };
        assert_eq!(p.redial(&PairHistory::default(), noon), Ok(()));
        assert_eq!(p.redial(&declined(3), noon), Err(Refusal::RedialTooSoon));
        assert_eq!(p.redial(&declined(11), noon), Ok(()));
        // Six approved calls in the last minute use it up; older ones do not count.
        let six = PairHistory {
            declined: None,
            approved: (1..=6).map(|i| secs(i * 9)).collect(),
        };
        assert_eq!(p.redial(&six, noon), Err(Refusal::RedialTooSoon));
        let old = PairHistory {
            declined: None,
            approved: (1..=6).map(|i| secs(i * 11)).collect(),
        };
        assert_eq!(p.redial(&old, noon), Ok(()));
        assert_eq!(p.code(Refusal::RedialTooSoon), 200_008);
        // Both parts can be turned off.
        let off = Policy::parse("[redial]\nafter_rejection = \"0s\"\ncalls = 0").unwrap();
        assert_eq!(off.redial(&declined(0), noon), Ok(()));
        assert_eq!(off.redial(&six, noon), Ok(()));
    }

    #[test]
    fn an_empty_policy_allows_everything() {
        let p = Policy::parse("").unwrap();
        assert_eq!(p.decide("a", "b", Timestamp::now(), &[]), Ok(()));
    }

    #[test]
    fn hours_over_midnight() {
        let p = Policy::parse("[hours]\nfrom = \"22:00\"\nto = \"06:00\"").unwrap();
        assert_eq!(p.decide("a", "b", at("2026-11-24T23:00:00Z"), &[]), Ok(()));
        assert_eq!(p.decide("a", "b", at("2026-11-24T05:59:00Z"), &[]), Ok(()));
        assert_eq!(
            p.decide("a", "b", at("2026-11-24T12:00:00Z"), &[]),
            Err(Refusal::OutsideHours)
        );
    }

    #[test]
    fn bad_files_are_refused_with_a_clear_message() {
        for (text, needle) in [
            ("blocked_callers = \"mallory\"", "invalid policy"),
            ("time_zone = \"Mars/Olympus\"", "time_zone"),
            ("max_call_duration = \"forever\"", "max_call_duration"),
            (
                "[[only]]\ncallees = \"nobody\"\ncallers = \"x\"",
                "unknown group",
            ),
            ("[rate_limit]\ncalls = 0\nper = \"1h\"", "at least 1"),
            ("[hours]\nfrom = \"8am\"\nto = \"20:00\"", "hours"),
            (
                "[hours]\nfrom = \"08:00\"\nto = \"20:00\"\ndays = [\"someday\"]",
                "someday",
            ),
            ("unknown_rule = 1", "unknown"),
        ] {
            let err = Policy::parse(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text:?} gave {err:?}");
        }
    }
}

#[cfg(test)]
mod example_file {
    /// The example shipped in `examples/policy.toml` stays valid.
    #[test]
    fn the_example_policy_parses() {
        let text = include_str!("../../examples/policy.toml");
        let p = super::Policy::parse(text).unwrap();
        assert_eq!(
            p.max_call_duration,
            Some(std::time::Duration::from_secs(1800))
        );
    }
}
