//! The long-running tasks of `panel serve` and `panel worker` (worker, scheduler, web) under
//! watch. Each should run until shutdown, so a task that ends early or panics stops the
//! process with the reason and a non-zero exit: systemd restarts it, and the heartbeat never
//! says "running" for a service whose worker is dead.

use std::collections::HashMap;
use std::future::Future;

use tokio::task::{Id, JoinError, JoinSet};

#[derive(Default)]
pub struct Supervisor {
    tasks: JoinSet<Result<(), String>>,
    names: HashMap<Id, &'static str>,
}

impl Supervisor {
    pub fn spawn(&mut self, name: &'static str, task: impl Future<Output = Result<(), String>> + Send + 'static) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    /// Waits until a task ends and says which one and why. Pending forever with no task.
    pub async fn first_end(&mut self) -> String {
        match self.tasks.join_next_with_id().await {
            Some(ended) => self.describe(ended),
            None => std::future::pending().await,
        }
    }

    /// After shutdown was asked for: waits for every task, and returns what went wrong.
    pub async fn finish(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        while let Some(ended) = self.tasks.join_next_with_id().await {
            if !matches!(ended, Ok((_, Ok(())))) {
                problems.push(self.describe(ended));
            }
        }
        problems
    }

    fn describe(&self, ended: Result<(Id, Result<(), String>), JoinError>) -> String {
        let name = |id: Id| self.names.get(&id).copied().unwrap_or("a task");
        match ended {
            Ok((id, Ok(()))) => format!("the {} stopped by itself", name(id)),
            Ok((id, Err(e))) => format!("the {} failed: {e}", name(id)),
            Err(e) if e.is_panic() => {
                let id = e.id();
                format!("the {} panicked: {}", name(id), panic_message(e.into_panic()))
            }
            Err(e) => format!("the {} was cancelled", name(e.id())),
        }
    }
}

/// What a panic said: its message when it has one.
pub(crate) fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_task_to_end_is_named_with_its_reason() {
        let mut s = Supervisor::default();
        s.spawn("worker", async { panic!("lost the database") });
        s.spawn("web", std::future::pending());
        let why = s.first_end().await;
        assert_eq!(why, "the worker panicked: lost the database");

        let mut s = Supervisor::default();
        s.spawn("scheduler", async { Err("cannot read schedules".into()) });
        assert_eq!(s.first_end().await, "the scheduler failed: cannot read schedules");
        let mut s = Supervisor::default();
        s.spawn("web", async { Ok(()) });
        assert_eq!(s.first_end().await, "the web stopped by itself");
        assert!(s.finish().await.is_empty());
    }
}
