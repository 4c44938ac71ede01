//! What turns workflows, schedules and dispatches into messages: sandboxed templates, email
//! steps, schedule time rules and workflow conditions. Pure rules, no I/O: the service loads
//! definitions from the store and enqueues what these render.

pub mod definitions;
pub mod plan;
pub mod step;
pub mod template;
pub mod timing;

pub use definitions::{DispatchDef, EventContext, ScheduleDef, WorkflowDef, check_name, event_context};
pub use panel_domain::run::RunStatus;
pub use plan::{Plan, PlannedStep, Sender, StepOutcome, StepStatus, plan_steps};
pub use step::{EmailStep, Step, StepMessage};
pub use template::{Engine, Rendered, Template, TemplateError, Undefined};
pub use timing::{CatchUp, Timing, WeeklyRule};
