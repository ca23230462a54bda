//! The cluster side: everything that talks to the API server apart from the request path's own
//! socket. Reflector caches the engine decides from, agentguard's webhook registration and its
//! repair, the ownership view of cascades, the audit trail, the churn breaker's Leases, Events,
//! policy status, certificates and the approval key.

pub mod approval_key;
pub mod breaker;
pub mod caches;
pub mod certs;
pub mod events;
pub mod freshness;
pub mod ownership;
pub mod sessions;
pub mod status;
pub mod trail;
pub mod webhook;
