//! edgehub-router: the message model shared by the workspace and the engine
//! that decides, for every message, which endpoints get it.
//!
//! Owns: [`Message`], IoT Edge route syntax and the IoT Hub routing query
//! language (lexer, parser, type-checking compiler, three-valued evaluator).
//! Must not touch: I/O, async, clocks, storage — it is a pure function from
//! (routes, message) to endpoints, so every other crate can trust and test it.

pub mod condition;
pub mod message;
pub mod route;
mod syntax;

pub use condition::{CompileErrors, Condition, Type, Value};
pub use message::{Message, MessageSource, SystemProperty};
pub use route::{
    Decision, Endpoint, Route, RouteError, RouteTable, SharedRouteTable, Source, DEFAULT_PRIORITY,
    DEFAULT_TTL_SECS,
};
pub use syntax::{Pos, SyntaxError};
