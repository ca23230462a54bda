//! agentguard: human-approved brakes on destructive Kubernetes changes made by AI agents.
//!
//! Modules follow the data flow of one admission request:
//!
//! ```text
//!  api ─▶ index (reflectors) ─▶ policy (pure engine) ◀─ approval, diff
//!                                   ▲
//!  server (axum + rustls) ─▶ admission (decode → review → respond)
//! ```
//!
//! `cli` and `run` are the binary's front door and wiring; `rbac_audit` is `agentguard audit`.
pub mod admission;
pub mod api;
pub mod approval;
pub mod approval_key;
pub mod breaker;
pub mod certs;
pub mod check;
pub mod cli;
pub mod diff;
pub mod events;
pub mod index;
pub mod metrics;
pub mod ownership;
pub mod pending;
pub mod policy;
pub mod rbac_audit;
pub mod restore;
pub mod run;
pub mod server;
pub mod status;
pub mod trail;
pub mod webhook;
