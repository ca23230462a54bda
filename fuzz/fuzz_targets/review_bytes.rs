//! Arbitrary bytes as an AdmissionReview body, down the whole request path (decode → review →
//! respond): no panic, and a malformed review is never allowed.
#![no_main]

libfuzzer_sys::fuzz_target!(|body: &[u8]| agentguard_fuzz::request_path(body));
