//! The scheduler: every Panel Service (and `panel worker`) runs one. Each wakes when the
//! earliest schedule is due (and at least once a second, to see schedules other processes
//! saved) and fires what is due; the store lets exactly one service run each fire time.

use std::time::Duration;

use tokio::sync::watch;

use crate::ops::Panel;

const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Runs until `shutdown` turns true.
pub async fn run_scheduler(panel: Panel, service_id: String, mut shutdown: watch::Receiver<bool>) {
    while !*shutdown.borrow() {
        if let Err(e) = panel.fire_due_schedules(&service_id).await {
            tracing::warn!(error = %e, "scheduler: could not read the schedules; trying again");
        }
        let sleep = match panel.store.next_schedule_fire().await {
            Ok(Some(next)) => (next - panel.now()).to_std().unwrap_or_default().min(MAX_SLEEP),
            _ => MAX_SLEEP,
        };
        tokio::select! {
            _ = tokio::time::sleep(sleep.max(Duration::from_millis(5))) => {}
            _ = shutdown.changed() => {}
        }
    }
}
