//! The engine: what a request is, what the policies say about it, what an approval is worth, and
//! how an update differs from what it replaces. Pure: no I/O, no clock but the one it is given,
//! no other layer of the crate. The same engine decides in the webhook, in `agentguard check`
//! and in the benchmarks.

pub mod admission;
pub mod api;
pub mod approval;
pub mod diff;
pub mod policy;
pub mod session;
