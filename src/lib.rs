//! agentguard: human-approved brakes on destructive Kubernetes changes made by AI agents.
pub mod api;
pub mod approval;
pub mod diff;
pub mod policy;
