//! The closed sets of a run's record: what ran, what started it, and how its steps came out.

crate::string_enum!(
    /// What a run belongs to.
    RunKind { Schedule = "schedule", Workflow = "workflow", Dispatch = "dispatch" }
);

crate::string_enum!(
    /// What started a run.
    Trigger {
        /// A schedule's fire time, on time.
        Cron = "cron",
        /// A schedule's fire time run late (after downtime); the run says how many it caught up on.
        CatchUp = "catch_up",
        /// Run now, by an admin or operator.
        Manual = "manual",
        /// A workflow's matching event.
        Event = "event",
        /// An ad-hoc dispatch from an outside tool.
        Dispatch = "dispatch",
    }
);

crate::string_enum!(
    /// How a run's steps came out.
    RunStatus {
        /// Every step queued its message.
        Queued = "queued",
        /// Some steps failed; the others queued their messages.
        Partial = "partial",
        /// No step queued a message.
        Failed = "failed",
    }
);

crate::string_enum!(
    /// What became of a run's mail, following its messages (the run's status says only how its
    /// steps were planned).
    RunDelivery {
        /// Some message is still queued, being sent or retrying.
        Sending = "sending",
        /// Every step queued its message and every message was delivered.
        Sent = "sent",
        /// Some mail was delivered, some was not (a step failed, a message or a recipient was
        /// refused, or a message was cancelled).
        PartlyFailed = "partly_failed",
        /// Nothing was delivered.
        Failed = "failed",
    }
);

impl RunDelivery {
    /// From the run's planning status and its messages' current states.
    pub fn of(status: RunStatus, messages: &[crate::MessageState]) -> RunDelivery {
        use crate::MessageState as M;
        if messages.iter().any(|m| !m.is_final()) {
            return RunDelivery::Sending;
        }
        let delivered = messages.iter().filter(|m| **m == M::Delivered).count();
        let some = delivered > 0 || messages.contains(&M::PartlyFailed);
        match (status, some) {
            (RunStatus::Queued, _) if delivered == messages.len() && delivered > 0 => RunDelivery::Sent,
            (_, true) => RunDelivery::PartlyFailed,
            (_, false) => RunDelivery::Failed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MessageState as M;

    #[test]
    fn a_runs_delivery_follows_its_messages() {
        use RunDelivery::*;
        let cases: &[(RunStatus, &[M], RunDelivery)] = &[
            (RunStatus::Queued, &[M::Queued], Sending),
            (RunStatus::Queued, &[M::Delivered, M::Retrying], Sending),
            (RunStatus::Queued, &[M::Delivered, M::Delivered], Sent),
            (RunStatus::Partial, &[M::Delivered], PartlyFailed),
            (RunStatus::Queued, &[M::Delivered, M::Failed], PartlyFailed),
            (RunStatus::Queued, &[M::PartlyFailed], PartlyFailed),
            (RunStatus::Queued, &[M::Delivered, M::Cancelled], PartlyFailed),
            (RunStatus::Queued, &[M::Failed, M::Cancelled], Failed),
            (RunStatus::Failed, &[], Failed),
        ];
        for (status, messages, expected) in cases {
            assert_eq!(RunDelivery::of(*status, messages), *expected, "{status} {messages:?}");
        }
    }
}
