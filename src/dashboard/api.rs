//! What the dashboard serves and does, as the server asks a backend for it:
//! the `Backend` trait and the types of its answers and actions.

use serde_json::Value;

/// An admin action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Pause, resume, drain or kill one operation.
    Operation {
        /// The operation's name.
        op: String,
        /// What to do to it.
        verb: OpVerb,
    },
    /// Hold (true) or release (false) every queued token: admission.
    Admission {
        /// Pause rather than resume.
        pause: bool,
    },
}

/// What an admin action does to an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpVerb {
    /// Its unstarted tokens wait until `Resume`.
    Pause,
    /// Releases what `Pause` held.
    Resume,
    /// Cancels its unstarted tokens.
    Drain,
    /// Kills its unresolved tokens.
    Kill,
}

impl OpVerb {
    pub(super) fn parse(s: &str) -> Option<OpVerb> {
        Some(match s {
            "pause" => OpVerb::Pause,
            "resume" => OpVerb::Resume,
            "drain" => OpVerb::Drain,
            "kill" => OpVerb::Kill,
            _ => return None,
        })
    }
}

/// Why the backend cannot answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The coordinator stopped, or the interpreter is exiting (503).
    Gone,
    /// No such operation (404).
    UnknownOperation(String),
    /// A query the backend cannot answer as asked (400).
    BadRequest(String),
    /// Anything else (500).
    Failed(String),
}

/// What the tokens route asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenQuery {
    /// Only tokens in this state (`executing`, `admitted`, ... as `TaskToken.state` reads).
    pub state: Option<String>,
    /// Only tokens of this operation.
    pub op: Option<String>,
    /// At most this many (newest first).
    pub limit: usize,
}

/// What the server serves and does.
pub trait Backend: Send + Sync + 'static {
    /// Prometheus text (format 0.0.4).
    fn metrics(&self) -> Result<String, Refusal>;
    /// Everything the page shows, as one JSON object.
    fn snapshot(&self) -> Result<Value, Refusal>;
    /// The operations, as a JSON array.
    fn operations(&self) -> Result<Value, Refusal>;
    /// Unresolved tokens, as a JSON array.
    fn tokens(&self, query: &TokenQuery) -> Result<Value, Refusal>;
    /// Does `action`; the JSON says what it did.
    fn act(&self, action: &Action) -> Result<Value, Refusal>;
}
