//! agentguard: human-approved brakes on destructive Kubernetes changes made by AI agents.
//!
//! The crate is layered along the path of one admission request:
//!
//! ```text
//!  commands ─▶ serve wires everything below
//!
//!  request:  server (axum + rustls) ─▶ admission (decode → review → respond) ─▶ actions
//!                                            │ pure                              │ side effects
//!                                            ▼                                   ▼
//!  engine:   policy, approval, diff, api     cluster: caches (reflectors), webhook registration,
//!            (no I/O)                                 ownership, trail, breaker, events, status,
//!                                                     certificates, the approval key
//! ```
//!
//! The engine imports nothing else of the crate; the request path and the cluster side import
//! the engine; only `commands` sees everything.
pub mod cluster;
pub mod commands;
pub mod engine;
pub mod metrics;
pub mod request;
