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
