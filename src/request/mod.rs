//! The request path: the HTTPS [`server`] receives an AdmissionReview, the engine decodes and
//! reviews it (pure, [`crate::engine::admission`]), [`actions`] carries out what admitting it
//! requires (records, charges, registrations, Events) with the fail-closed rules written once,
//! and the server answers. The handler only glues these steps together.

pub mod actions;

pub mod server;
