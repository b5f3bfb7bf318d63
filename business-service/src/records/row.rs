//! One call's record as the writer folds events into it: pure, no I/O.
//!
//! Each event type sets only its own columns and its own bit of `kinds`,
//! so a record comes out the same whatever order its events arrive in and
//! however often each is delivered: that is what makes redelivery harmless
//! (the call service delivers at least once). `complete` and `duration_ms`
//! follow from the columns. A call has at most one event of each type
//! (REQUEST, REPLY, START, FINISH), so its bit says the event is in.

use super::CallRecord;
use videocall_proto::v1 as pb;

/// Bits of [`Row::kinds`], one per event type that is in.
pub const REQUEST: u8 = 1;
pub const REPLY: u8 = 2;
pub const START: u8 = 4;
pub const FINISH: u8 = 8;

/// A call's record and which of its events are in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    pub record: CallRecord,
    /// [`REQUEST`] | [`REPLY`] | [`START`] | [`FINISH`]: the events folded in.
    pub kinds: u8,
}

impl Row {
    /// The row of a call none of whose events is in yet.
    pub fn new(n: &pb::CallEventNotice) -> Self {
        Self {
            record: CallRecord {
                call_id: n.call_id.clone(),
                caller: n.caller_user_id.clone(),
                callee: n.callee_user_id.clone(),
                flags: None,
                param: None,
                user_str: None,
                requested_ms: None,
                rang_ms: None,
                answered_ms: None,
                ended_ms: None,
                duration_ms: None,
                end_code: None,
                ended_by: None,
                room_id: None,
                missed: false,
                complete: false,
            },
            kinds: 0,
        }
    }

    /// Folds one event in (with, for an approved REQUEST, when it was
    /// allowed); returns whether the row changed. An event already in
    /// changes nothing, except an approval's `rang_ms` that was not known.
    pub fn fold(&mut self, n: &pb::CallEventNotice, rang_ms: Option<i64>) -> bool {
        let (kinds, rang) = (self.kinds, self.record.rang_ms);
        let r = &mut self.record;
        let t = millis(n);
        match pb::EventType::try_from(n.event_type) {
            Ok(pb::EventType::Request) => {
                if self.kinds & REQUEST == 0 {
                    self.kinds |= REQUEST;
                    r.flags = Some(n.flags);
                    r.param = Some(n.param);
                    r.user_str = Some(n.user_str.clone());
                    r.requested_ms = Some(t);
                }
                // The first time it was allowed stands (a replay of the
                // journal brings it again).
                r.rang_ms = r.rang_ms.or(rang_ms);
            }
            Ok(pb::EventType::Reply) if self.kinds & REPLY == 0 => {
                self.kinds |= REPLY;
                if n.error_code == 0 {
                    // The answer's own time, over START's stand-in.
                    r.answered_ms = Some(t);
                } else {
                    r.missed = true;
                    r.ended_ms = Some(t);
                    r.end_code = Some(n.error_code);
                    r.ended_by = Some(ended_by(n));
                }
            }
            Ok(pb::EventType::Start) if self.kinds & START == 0 => {
                self.kinds |= START;
                r.room_id = Some(n.param);
                // Until the REPLY is in, START stands in for the answer.
                if self.kinds & REPLY == 0 {
                    r.answered_ms = r.answered_ms.or(Some(t));
                }
            }
            Ok(pb::EventType::Finish) if self.kinds & FINISH == 0 => {
                self.kinds |= FINISH;
                r.ended_ms = Some(t);
                r.end_code = Some(n.error_code);
                r.ended_by = Some(ended_by(n));
            }
            // An event already in, or of a type no record has a column for.
            _ => {}
        }
        // Every column but `rang_ms` is set with its event's bit, and the
        // rest follows from them.
        if self.kinds == kinds {
            return r.rang_ms != rang;
        }
        r.duration_ms = match (r.missed, r.answered_ms, r.ended_ms) {
            (false, Some(a), Some(e)) if self.kinds & FINISH != 0 => Some(e - a),
            _ => None,
        };
        r.complete = if r.missed {
            self.kinds & (REQUEST | REPLY) == REQUEST | REPLY
        } else {
            self.kinds == REQUEST | REPLY | START | FINISH
        };
        true
    }
}

fn millis(n: &pb::CallEventNotice) -> i64 {
    n.time
        .as_ref()
        .map(|t| t.seconds.saturating_mul(1000) + i64::from(t.nanos) / 1_000_000)
        .unwrap_or(0)
}

fn ended_by(n: &pb::CallEventNotice) -> String {
    match pb::Initiator::try_from(n.initiator) {
        Ok(pb::Initiator::Caller) => n.caller_user_id.clone(),
        Ok(pb::Initiator::Callee) => n.callee_user_id.clone(),
        Ok(pb::Initiator::Business) => "business".into(),
        _ => "service".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn event(
        t: pb::EventType,
        code: u32,
        second: i64,
        initiator: pb::Initiator,
    ) -> pb::CallEventNotice {
        pb::CallEventNotice {
            event_type: t as i32,
            source_user_id: "alice".into(),
            target_user_id: "bob".into(),
            error_code: code,
            flags: 3,
            param: if t == pb::EventType::Start { 77 } else { 5 },
            user_str: "hi".into(),
            call_id: "c".into(),
            time: Some(prost_types::Timestamp {
                seconds: second,
                nanos: 0,
            }),
            event_id: format!("c-{}", t as i32),
            sequence: t as u32,
            decision_required: t == pb::EventType::Request,
            initiator: initiator as i32,
            caller_user_id: "alice".into(),
            callee_user_id: "bob".into(),
        }
    }

    /// The events of one call: answered (four) or missed (two).
    fn call(answered: bool) -> Vec<pb::CallEventNotice> {
        use pb::EventType::*;
        if answered {
            vec![
                event(Request, 0, 1, pb::Initiator::Caller),
                event(Reply, 0, 2, pb::Initiator::Callee),
                event(Start, 0, 3, pb::Initiator::Service),
                event(Finish, 0, 9, pb::Initiator::Callee),
            ]
        } else {
            vec![
                event(Request, 0, 1, pb::Initiator::Caller),
                event(Reply, 100_104, 2, pb::Initiator::Callee),
            ]
        }
    }

    fn fold_all(events: &[(pb::CallEventNotice, Option<i64>)]) -> Row {
        let mut row = Row::new(&events[0].0);
        for (n, rang) in events {
            row.fold(n, *rang);
        }
        row
    }

    #[test]
    fn an_answered_call_in_order() {
        let events: Vec<_> = call(true)
            .into_iter()
            .map(|n| {
                let rang = (n.event_type == 1).then_some(1_500);
                (n, rang)
            })
            .collect();
        let r = fold_all(&events).record;
        assert!(r.complete && !r.missed);
        assert_eq!(
            (
                r.requested_ms,
                r.rang_ms,
                r.answered_ms,
                r.ended_ms,
                r.duration_ms
            ),
            (
                Some(1_000),
                Some(1_500),
                Some(2_000),
                Some(9_000),
                Some(7_000)
            )
        );
        assert_eq!(
            (r.room_id, r.end_code, r.ended_by.as_deref()),
            (Some(77), Some(0), Some("bob"))
        );
    }

    #[test]
    fn an_event_already_in_changes_nothing() {
        let mut row = Row::new(&call(true)[0]);
        for n in call(true) {
            assert!(row.fold(&n, None), "{} is new", n.event_type);
        }
        for n in call(true) {
            assert!(!row.fold(&n, None), "{} again", n.event_type);
        }
        // An approval's time that was not known yet is a change; the
        // first one known stands.
        let request = &call(true)[0];
        assert!(row.fold(request, Some(1_500)));
        assert!(!row.fold(request, Some(1_700)));
        assert_eq!(row.record.rang_ms, Some(1_500));
    }

    #[test]
    fn an_unknown_event_type_sets_nothing() {
        let mut n = call(true)[0].clone();
        n.event_type = 9;
        let mut row = Row::new(&n);
        assert!(!row.fold(&n, None));
        assert_eq!(row, Row::new(&n));
    }

    proptest! {
        /// Any order of a call's events, each delivered one to three
        /// times, with the approval's time on any copy of its REQUEST: the
        /// record the events make in order, complete only once every event
        /// is in.
        #[test]
        fn every_order_and_redelivery_gives_the_same_record(
            answered in any::<bool>(),
            copies in proptest::collection::vec(1usize..=3, 4),
            order in any::<u64>(),
            approval_copy in 0usize..3,
        ) {
            let events = call(answered);
            let mut deliveries = Vec::new();
            for (i, n) in events.iter().enumerate() {
                for c in 0..copies[i] {
                    let rang = (i == 0 && c == approval_copy % copies[i]).then_some(1_500);
                    deliveries.push((n.clone(), rang));
                }
            }
            // A shuffle seeded by the case.
            let mut seed = order;
            for i in (1..deliveries.len()).rev() {
                seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let j = (seed >> 33) as usize % (i + 1);
                deliveries.swap(i, j);
            }
            let in_order: Vec<_> = events
                .iter()
                .map(|n| (n.clone(), (n.event_type == 1).then_some(1_500)))
                .collect();
            let want = fold_all(&in_order);
            let mut row = Row::new(&deliveries[0].0);
            let mut seen = std::collections::HashSet::new();
            for (n, rang) in &deliveries {
                row.fold(n, *rang);
                seen.insert(n.event_type);
                prop_assert_eq!(row.record.complete, seen.len() == events.len());
            }
            prop_assert_eq!(row, want);
        }
    }
}
